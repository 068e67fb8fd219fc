"""The one writer of outputs (megatron_lora.atomic): a reader sees the old file or the new one,
never a torn one; a failure (a full disk included) leaves no temporary behind; an output that
is a symbolic link is refused; two writers of one path do not collide."""

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from megatron_lora.atomic import (
    OutputPathError,
    build_directory_atomically,
    staged_files,
    write_file_atomically,
    write_synced,
)

ROOT = Path(__file__).resolve().parents[1]


def _listing(directory: Path):
    return sorted(p.name for p in directory.iterdir())


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest.txt"
    write_file_atomically(path, "1\n")
    write_file_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert _listing(tmp_path) == ["latest.txt"]


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_file_atomically(path, "old")

    def no_rename(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        write_file_atomically(path, "new")
    assert path.read_text() == "old"
    assert _listing(tmp_path) == ["state.json"]


def test_synced_write_takes_text_as_utf8(tmp_path):
    write_synced(tmp_path / "a", "é")
    assert (tmp_path / "a").read_bytes() == "é".encode("utf-8")


def test_outputs_get_the_mode_a_plain_open_gives(tmp_path):
    """Temporaries are made under the umask (not 0600), and the staging directory too."""
    plain = tmp_path / "plain"
    plain.write_text("x")
    plain_dir = tmp_path / "plain_dir"
    plain_dir.mkdir()
    write_file_atomically(tmp_path / "file", "x")
    build_directory_atomically(tmp_path / "dir", lambda staging: None, lambda existing: None)
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == \
        stat.S_IMODE(plain_dir.stat().st_mode)


# --- symbolic links are refused, neither followed nor replaced -----------------------------


def test_a_file_output_that_is_a_link_is_refused(tmp_path):
    target, link = tmp_path / "target.txt", tmp_path / "out.txt"
    target.write_text("kept")
    link.symlink_to(target)
    with pytest.raises(OutputPathError, match="out.txt is a symbolic link"):
        write_file_atomically(link, "new")
    assert link.is_symlink() and target.read_text() == "kept"
    assert _listing(tmp_path) == ["out.txt", "target.txt"]


def test_a_dangling_link_is_refused_too(tmp_path):
    link = tmp_path / "out.txt"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputPathError, match="symbolic link"):
        write_file_atomically(link, "new")
    assert not (tmp_path / "nowhere").exists() and _listing(tmp_path) == ["out.txt"]


def test_a_directory_output_that_is_a_link_is_refused(tmp_path):
    target, link = tmp_path / "target", tmp_path / "out"
    target.mkdir()
    (target / "kept").write_text("kept")
    link.symlink_to(target)

    def fill(staging):
        (staging / "new").write_text("new")

    with pytest.raises(OutputPathError, match="out is a symbolic link"):
        build_directory_atomically(link, fill, lambda existing: None)
    assert link.is_symlink() and _listing(target) == ["kept"]
    assert _listing(tmp_path) == ["out", "target"]  # no .out.saving-* left


def test_a_link_made_while_the_file_was_written_is_not_replaced(tmp_path):
    target, path = tmp_path / "target", tmp_path / "out"
    target.write_text("kept")
    with pytest.raises(OutputPathError, match="symbolic link"):
        with staged_files(path) as (temporary,):
            temporary.write_text("new")
            path.symlink_to(target)
    assert path.is_symlink() and target.read_text() == "kept"
    assert _listing(tmp_path) == ["out", "target"]


# --- failures leave no temporary -----------------------------------------------------------


def test_an_error_in_the_writer_removes_the_temporaries(tmp_path):
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        with staged_files(tmp_path / "data.bin", tmp_path / "data.idx") as (bin_, idx):
            bin_.write_bytes(b"x" * 100)
            raise RuntimeError("tokenizer broke")
    assert _listing(tmp_path) == []


def test_an_error_in_fill_leaves_the_old_directory_and_no_staging(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "weights").write_text("old")

    def fill(staging):
        (staging / "weights").write_text("half")
        raise RuntimeError("merge failed")

    with pytest.raises(RuntimeError, match="merge failed"):
        build_directory_atomically(out, fill, lambda existing: None)
    assert (out / "weights").read_text() == "old" and _listing(tmp_path) == ["adapter"]


_FULL_DISK_WRITER = textwrap.dedent("""
    import errno, sys
    from pathlib import Path
    from megatron_lora.atomic import build_directory_atomically, staged_files, write_file_atomically

    directory, how = Path(sys.argv[1]), sys.argv[2]
    big = b"x" * (1 << 20)
    try:
        if how == "file":
            write_file_atomically(directory / "rank_00000.safetensors", big)
        elif how == "safetensors":
            import torch
            from safetensors.torch import save_file
            with staged_files(directory / "cache.safetensors") as (temporary,):
                save_file({"tokens": torch.zeros(1 << 18)}, str(temporary))
        else:
            def fill(staging):
                (staging / "adapter_model.safetensors").write_bytes(big)
            build_directory_atomically(directory / "adapter", fill, lambda existing: None)
    except OSError as error:
        print(errno.errorcode.get(error.errno, error.errno))
        sys.exit(0)
    except Exception as error:  # safetensors' own error type, naming the OS error
        print(type(error).__name__, error)
        sys.exit(0)
    sys.exit("the write did not fail")
""")


def _old_outputs(directory: Path) -> dict:
    (directory / "adapter").mkdir()
    (directory / "adapter" / "adapter_model.safetensors").write_bytes(b"old adapter")
    (directory / "rank_00000.safetensors").write_bytes(b"old rank state")
    (directory / "cache.safetensors").write_bytes(b"old cache")
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def _as_now(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("how", ["file", "safetensors", "directory"])
def test_a_file_size_limit_leaves_the_old_outputs_and_no_temporary(tmp_path, how):
    """RLIMIT_FSIZE makes the kernel refuse the write past 64 KiB with EFBIG, as a full disk
    refuses it with ENOSPC: a real failed write() in the middle of the file."""
    before = _old_outputs(tmp_path)
    limit = 64 * 1024
    preexec = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0}))\n"
    result = subprocess.run(
        [sys.executable, "-c", preexec.format(limit) + _FULL_DISK_WRITER, str(tmp_path), how],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "EFBIG" or "(os error 27)" in result.stdout, result.stdout
    assert _as_now(tmp_path) == before


def _tmpfs_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_available(),
                    reason="needs unshare and a user namespace that may mount a tmpfs")
@pytest.mark.parametrize("how", ["file", "directory"])
def test_a_full_disk_leaves_the_old_outputs_and_no_temporary(tmp_path, how):
    """A real ENOSPC: a 256 KiB tmpfs in a private mount namespace, already holding the old
    outputs, and a 1 MiB write."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(_FULL_DISK_WRITER)
    listing = (f"{sys.executable} -c \"import sys, json; from pathlib import Path; "
               f"d = Path(sys.argv[1]); print(json.dumps({{str(p.relative_to(d)): "
               f"p.read_bytes().hex() if p.is_file() else None for p in sorted(d.rglob('*'))}}))\"")
    seed = ("import sys; from pathlib import Path; d = Path(sys.argv[1]); "
            "(d / 'adapter').mkdir(); "
            "(d / 'adapter' / 'adapter_model.safetensors').write_bytes(b'old adapter'); "
            "(d / 'rank_00000.safetensors').write_bytes(b'old rank state')")
    command = (f"mount -t tmpfs -o size=256k tmpfs {disk} && "
               f"{sys.executable} -c \"{seed}\" {disk} && {listing} {disk} && "
               f"{sys.executable} {script} {disk} {how} && {listing} {disk}")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                             command], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    before, code, after = result.stdout.strip().splitlines()
    assert code == "ENOSPC"
    assert after == before


# --- two writers of one path ----------------------------------------------------------------


def test_concurrent_writers_never_share_a_temporary(tmp_path):
    """Four threads replace one file 100 times each: every write succeeds, the file always
    holds one writer's whole content, and no temporary is left."""
    path = tmp_path / "metrics.jsonl"
    contents = [bytes([65 + i]) * 200_000 for i in range(4)]
    errors, seen = [], set()

    def writer(content):
        try:
            for _ in range(100):
                write_file_atomically(path, content)
                seen.add(path.read_bytes() in contents)
        except Exception as error:  # collected: an exception in a thread does not fail a test
            errors.append(repr(error))

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert seen == {True} and path.read_bytes() in contents
    assert _listing(tmp_path) == ["metrics.jsonl"]


def test_a_temporary_name_is_never_reused(tmp_path):
    names = []
    for _ in range(50):
        with staged_files(tmp_path / "x") as (temporary,):
            names.append(temporary.name)
            assert temporary.name.startswith(".x.tmp-")
    assert len(set(names)) == 50


def test_a_long_name_still_gets_a_temporary(tmp_path):
    path = tmp_path / ("n" * 250)
    write_file_atomically(path, "x")
    assert path.read_text() == "x" and _listing(tmp_path) == [path.name]


def test_errno_is_kept(tmp_path):
    """A write refused by the system keeps its OSError (the callers name the file from it)."""
    with pytest.raises(OSError) as caught:
        write_file_atomically(tmp_path / "absent" / "file", "x")
    assert caught.value.errno == errno.ENOENT


def test_preprocess_refuses_an_output_that_is_a_link(tmp_path):
    """The indexed-dataset writer goes through the same rules: a .bin that is a link is
    refused, the file it points at keeps its bytes, and no .idx or temporary appears."""
    from megatron_lora.data import preprocess_jsonl

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"someone's data")
    (tmp_path / "out.bin").symlink_to(target)
    with pytest.raises(OutputPathError, match="out.bin is a symbolic link"):
        preprocess_jsonl(corpus, tmp_path / "out")
    assert target.read_bytes() == b"someone's data"
    assert _listing(tmp_path) == ["corpus.jsonl", "elsewhere.bin", "out.bin"]


def _directory_with(path: Path, content: str) -> None:
    path.mkdir()
    (path / "weights").write_text(content)


def test_without_an_exchange_two_renames_replace_the_directory(tmp_path, monkeypatch):
    """A filesystem without renameat2(RENAME_EXCHANGE): the old directory is moved aside and
    removed, nothing of either is left."""
    import megatron_lora.atomic as atomic

    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    out = tmp_path / "adapter"
    _directory_with(out, "old")
    build_directory_atomically(out, lambda s: (s / "weights").write_text("new"), lambda e: None)
    assert (out / "weights").read_text() == "new" and _listing(tmp_path) == ["adapter"]


def test_without_an_exchange_a_failed_second_rename_puts_the_old_directory_back(tmp_path,
                                                                               monkeypatch):
    import megatron_lora.atomic as atomic

    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    real_rename, calls = os.rename, []

    def second_rename_fails(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated failure")
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    out = tmp_path / "adapter"
    _directory_with(out, "old")
    with pytest.raises(OSError, match="simulated failure"):
        build_directory_atomically(out, lambda s: (s / "weights").write_text("new"),
                                   lambda e: None)
    assert (out / "weights").read_text() == "old" and _listing(tmp_path) == ["adapter"]
