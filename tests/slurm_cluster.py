"""A real one-node SLURM cluster in a temporary folder, for tests that sbatch the project's
batch scripts (docs/slurm.md says what it relies on).

    ok, reason = available()
    with SlurmCluster() as cluster:
        job = cluster.run_job(["scripts/slurm/finetune.sbatch"], env=..., timeout=300)
        assert job.exit_code == 0, job.log

The cluster is munged (as the munge user, with its own key and socket), `slurmctld -D -i` and
`slurmd -D -N <short hostname>`, all in the foreground as children of this process. Stopping
cancels the cluster's jobs, then sends TERM (KILL after a timeout) to exactly the PIDs started
here, never to processes found by name. Every client call has a timeout: with munge down,
`scontrol` hangs for minutes. Nothing is installed here: the packages are slurm-wlm, slurmd,
slurmctld, slurm-client and munge (Debian), installed by CI.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol",
            "squeue", "scancel", "sinfo")
PORTS = (6817, 6818)  # slurmctld, slurmd
CLIENT_TIMEOUT_S = 20
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port left in TIME_WAIT by an earlier cluster is still usable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def available() -> tuple[bool, str]:
    """(True, "") when a cluster can be started here, else (False, why not)."""
    missing = [name for name in BINARIES if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return False, ("SLURM/munge binaries missing: " + ", ".join(missing)
                       + " (apt-get install slurm-wlm slurmd slurmctld slurm-client munge)")
    if os.geteuid() != 0:
        return False, "starting slurmd/munged needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return False, "no 'munge' user (the munge package creates it)"
    busy = [str(port) for port in PORTS if not _port_free(port)]
    if busy:
        return False, f"port(s) {', '.join(busy)} in use (another slurmctld/slurmd running?)"
    return True, ""


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork


def _die_with_parent() -> None:
    """Runs in each daemon before exec: TERM it if this process dies without stopping it
    (e.g. a test run killed hard), so no daemon is left holding the ports."""
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class Job:
    job_id: int
    state: str          # final JobState, e.g. COMPLETED, FAILED, CANCELLED, or TIMEOUT(test)
    exit_code: int      # the batch script's exit code (ExitCode=N:signal)
    restarts: int       # how often the job was requeued
    log: str            # the job's --output file, "" if none
    seconds: float      # from submission to the final state


class SlurmCluster:
    """Context manager: a running one-node cluster; clients need env() (SLURM_CONF)."""

    def __init__(self, start_timeout: float = 30.0, stop_timeout: float = 15.0,
                 cpus: Optional[int] = None):
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.cpus = cpus or os.cpu_count() or 1
        self.host = short_hostname()
        self.root: Optional[Path] = None
        self._procs: list[tuple[str, subprocess.Popen]] = []  # in start order
        self._logs: list = []

    # ---------------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def conf(self) -> Path:
        return self.root / "slurm" / "slurm.conf"

    def env(self, extra: Optional[Mapping[str, str]] = None) -> dict:
        """The environment for client commands (and, through sbatch, for the jobs)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        # Job environment must not inherit an outer job's identity.
        for key in list(env):
            if key.startswith("SLURM_") and key != "SLURM_CONF":
                del env[key]
        env.update(extra or {})
        return env

    def client(self, *args: str, timeout: float = CLIENT_TIMEOUT_S, check: bool = True,
               env: Optional[Mapping[str, str]] = None, cwd=None) -> subprocess.CompletedProcess:
        """Runs a SLURM client command (scontrol, sbatch, ...) against this cluster."""
        return subprocess.run([_which(args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=timeout, check=check, env=env or self.env(), cwd=cwd)

    # ---------------------------------------------------------------------------------------
    def start(self) -> None:
        ok, reason = available()
        if not ok:
            raise RuntimeError(f"cannot start a SLURM cluster: {reason}")
        munge = pwd.getpwnam("munge")
        # Under the system temp folder, not pytest's 0700 one: munged (as munge) must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="slurm-cluster-", dir=tempfile.gettempdir()))
        self.root.chmod(0o755)

        # munge: socket folder 0755 (munged refuses 0700), key in its own 0700 folder.
        run_dir, key_dir = self.root / "munge", self.root / "munge-key"
        run_dir.mkdir(mode=0o755)
        key_dir.mkdir(mode=0o700)
        for folder in (run_dir, key_dir):
            os.chown(folder, munge.pw_uid, munge.pw_gid)
        key = key_dir / "munge.key"
        self.socket = run_dir / "munge.socket"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True,
                       capture_output=True, timeout=CLIENT_TIMEOUT_S,
                       user=munge.pw_uid, group=munge.pw_gid)
        self._spawn("munged", [_which("munged"), "--foreground", f"--socket={self.socket}",
                               f"--key-file={key}", f"--log-file={run_dir / 'munged.log'}",
                               f"--pid-file={run_dir / 'munged.pid'}",
                               f"--seed-file={run_dir / 'munged.seed'}"],
                    user=munge.pw_uid, group=munge.pw_gid)
        self._wait_for(lambda: self.socket.exists(), "munged socket")

        slurm = self.root / "slurm"
        for sub in ("state", "spool", "log"):
            (slurm / sub).mkdir(parents=True)
        self.conf.write_text(self._slurm_conf(slurm))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(self._controller_up, "slurmctld (scontrol ping UP)")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.host, "-f", str(self.conf)])
        self._wait_for(self._node_idle, f"node {self.host} idle (sinfo)")

    def _slurm_conf(self, slurm: Path) -> str:
        mem_total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        real_memory = max(mem_total_mb - 1024, 256)
        return "\n".join([
            "ClusterName=testcluster",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmctldPort=6817",
            "SlurmdPort=6818",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            "MailProg=/bin/true",
            f"StateSaveLocation={slurm / 'state'}",
            f"SlurmdSpoolDir={slurm / 'spool'}",
            f"SlurmctldPidFile={slurm / 'slurmctld.pid'}",
            f"SlurmdPidFile={slurm / 'slurmd.pid'}",
            f"SlurmctldLogFile={slurm / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={slurm / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            # Quick turnaround for tests: stragglers are killed 5 s after SIGTERM.
            "KillWait=5",
            "MinJobAge=600",
            # Start jobs as soon as they are submitted, not on the next 3 s scheduling pass.
            "SchedulerType=sched/builtin",
            "SchedulerParameters=batch_sched_delay=0",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={real_memory} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, name: str, argv: Sequence[str], **kwargs) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self._logs.append(log)
        env = self.env()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, **kwargs)
        self._procs.append((name, proc))

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.daemon_logs()}")

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if ready():
                    return
            except (subprocess.TimeoutExpired, subprocess.CalledProcessError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {self.start_timeout} s:\n{self.daemon_logs()}")

    def _controller_up(self) -> bool:
        out = self.client("scontrol", "ping", timeout=5, check=False).stdout
        return " is UP" in out

    def _node_idle(self) -> bool:
        out = self.client("sinfo", "-h", "-o", "%t", timeout=5, check=False).stdout
        return out.strip() == "idle"

    def daemon_logs(self, tail: int = 40) -> str:
        """The last lines of every daemon's output and log file, for failure messages."""
        if self.root is None:
            return ""
        parts = []
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and path.suffix in (".out", ".log"):
                try:
                    lines = path.read_text(errors="replace").splitlines()[-tail:]
                except OSError:
                    continue
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancels every job of this cluster, then stops exactly the daemons started here."""
        if self._procs and all(proc.poll() is None for _, proc in self._procs):
            self._cancel_all_jobs()
        for name, proc in reversed(self._procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=self.stop_timeout)
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self.root is not None and not os.environ.get("KEEP_SLURM_CLUSTER"):
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _cancel_all_jobs(self) -> None:
        # Job steps run under slurmstepd, which outlives slurmd: end them through SLURM first.
        try:
            ids = self.client("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if ids:
                self.client("scancel", *ids, check=False)
            deadline = time.monotonic() + self.stop_timeout
            while ids and time.monotonic() < deadline:
                time.sleep(0.5)
                ids = self.client("squeue", "-h", "-o", "%i", check=False).stdout.split()
        except subprocess.TimeoutExpired:
            pass

    # ---------------------------------------------------------------------------------------
    def job_info(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.client("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def submit(self, sbatch_args: Sequence[str], env: Optional[Mapping[str, str]] = None,
               cwd=None) -> int:
        """sbatch --parsable ...; returns the job id."""
        done = self.client("sbatch", "--parsable", *sbatch_args, env=self.env(env), cwd=cwd)
        return int(done.stdout.strip().split(";")[0])

    def wait(self, job_id: int, timeout: float = 300.0, poll: float = 0.5,
             on_poll=None) -> Job:
        """Waits until the job reaches a final state, through requeues; scancel at timeout.

        on_poll(info) is called with each job_info while waiting (e.g. to signal the job).
        """
        start = time.monotonic()
        deadline = start + timeout
        info = self.job_info(job_id)
        state = info.get("JobState", "")
        while state not in FINAL_STATES:
            if time.monotonic() > deadline:
                self.client("scancel", str(job_id), check=False)
                state = f"TIMEOUT(test, after {timeout:.0f} s, was {state})"
                break
            if on_poll is not None:
                on_poll(info)
            time.sleep(poll)
            info = self.job_info(job_id)
            state = info.get("JobState", "")
        exit_code = int(info.get("ExitCode", "-1:0").split(":")[0])
        log_path = info.get("StdOut", "")
        log = ""
        if log_path and Path(log_path).is_file():
            log = Path(log_path).read_text(errors="replace")
        return Job(job_id, state, exit_code, int(info.get("Restarts", "0")), log,
                   time.monotonic() - start)

    def run_job(self, sbatch_args: Sequence[str], env: Optional[Mapping[str, str]] = None,
                cwd=None, timeout: float = 300.0, on_poll=None) -> Job:
        """Submits and waits: the equivalent of `sbatch --wait`, bounded, cancelled at timeout."""
        job_id = self.submit(sbatch_args, env=env, cwd=cwd)
        return self.wait(job_id, timeout=timeout, on_poll=on_poll)
