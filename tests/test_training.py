"""The training scripts: bad input, a real torchrun run with its outputs, and exact resume
after one rank is killed. Tiny model and data, so the whole file takes about a minute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "megatron_config": {
        "tensor_model_parallel_size": 2, "sequence_parallel": True, "num_layers": 2,
        "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 128, "vocab_size": 512, "seq_length": 32, "seed": 7,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
    },
    "lora": {"r": 4, "lora_alpha": 8.0, "target_modules": [
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]},
    "training": {"micro_batch_size": 2, "global_batch_size": 4, "lr": 5e-3, "min_lr": 5e-4,
                 "lr_warmup_iters": 2, "lr_decay_style": "cosine", "clip_grad": 1.0,
                 "eval_iters": 1, "log_interval": 1, "progress_bar": False},
}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def torchrun(script, *flags, nproc=2, wait=True, timeout=300, env=None):
    """torchrun in its own session, so that on a timeout the launcher *and* its ranks (and
    nothing else) are ended."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(nproc), str(ROOT / "scripts" / script), *map(str, flags)]
    return in_own_session(command, wait=wait, timeout=timeout, env=env)


def in_own_session(command, wait=True, timeout=300, env=None):
    """Run ``command`` in its own session; on a timeout that whole session (and nothing
    else) is ended. ``wait=False`` returns the running process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT, start_new_session=True)
    if not wait:
        return process
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def finetune_flags(config, data, save, iters, *extra):
    return ["--config", config, "--data-path", data / "finetune_text_document",
            "--valid-data-path", data / "finetune_heldout_text_document", "--train-iters", iters,
            "--save", save, *extra]


# --- bad input: one line, exit code != 0, nothing written ----------------------------------------


def _run_main(capsys, argv, mode="finetune", world=None, monkeypatch=None):
    from megatron_lora.training import main

    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(argv, mode=mode)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("case", ["missing_data", "yaml_typo", "tp_world", "negative_rank",
                                  "load_not_checkpoint", "finetune_without_rank", "bad_lr_style",
                                  "recompute_layers"])
def test_bad_input_is_one_line_and_writes_nothing(case, config, demo_data, tmp_path, capsys,
                                                  monkeypatch):
    save = tmp_path / "save"
    data = demo_data / "finetune_text_document"
    argv = ["--config", str(config), "--data-path", str(data), "--train-iters", "2",
            "--save", str(save)]
    world, mode, expected = None, "finetune", None
    if case == "missing_data":
        argv[3] = str(tmp_path / "nope")
        expected = f"--data-path {tmp_path / 'nope'}: {tmp_path / 'nope'}.bin"
    elif case == "yaml_typo":
        typo = dict(TINY, megatron_config=dict(TINY["megatron_config"], num_layer=2))
        (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
        argv[1] = str(tmp_path / "typo.yaml")
        expected = "did you mean 'num_layers'"
    elif case == "tp_world":
        world, expected = 3, "does not divide the world size 3"
    elif case == "negative_rank":
        argv += ["--lora-rank", "-1"]
        expected = "--lora-rank -1 is invalid"
    elif case == "load_not_checkpoint":
        argv += ["--load", str(demo_data)]
        expected = f"--load {demo_data} is not a checkpoint directory"
    elif case == "finetune_without_rank":
        plain = {k: v for k, v in TINY.items() if k != "lora"}
        (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
        argv[1] = str(tmp_path / "plain.yaml")
        expected = "give --lora-rank > 0"
    elif case == "recompute_layers":  # the tiny model has 2 layers
        argv += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "3"]
        expected = "megatron_config.recompute_num_layers=3 must be between 1 and the 2 layers"
    elif case == "bad_lr_style":
        with pytest.raises(SystemExit) as exit_info:  # argparse's own choices check
            _run_main(capsys, argv + ["--lr-decay-style", "cosin"], mode)
        assert exit_info.value.code == 2 and "invalid choice: 'cosin'" in capsys.readouterr().err
        assert not save.exists()
        return
    code, err = _run_main(capsys, argv, mode, world, monkeypatch)
    assert code == 2
    assert err.startswith("finetune_gpt.py: error: ") and "\n" not in err, err
    assert expected in err, err
    assert not save.exists()


def _script(script, *flags, timeout=300):
    """A script run as a user runs it (no launcher), in its own session."""
    return in_own_session([sys.executable, str(ROOT / "scripts" / script), *map(str, flags)],
                          timeout=timeout)


def test_nproc_per_node_checks_the_inputs_once_then_starts_the_workers(config, demo_data,
                                                                        tmp_path):
    """`python scripts/finetune_gpt.py --nproc-per-node 2 ...`: a bad input is the one line
    and exit code 2 with no worker started (nothing else on stderr); good input trains."""
    bad = _script("finetune_gpt.py", *finetune_flags(config, demo_data, tmp_path / "bad", 2),
                  "--nproc-per-node", 3)  # TP=2 does not divide 3 workers
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, bad.stderr
    assert lines[0].startswith("finetune_gpt.py: error: ") and \
        "does not divide the world size 3" in lines[0], lines[0]
    assert not (tmp_path / "bad").exists()
    good = _script("finetune_gpt.py", *finetune_flags(config, demo_data, tmp_path / "good", 2),
                   "--nproc-per-node", 2)
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    assert len(_losses(tmp_path / "good")) == 2


# --- a real run ------------------------------------------------------------------------------------


def test_finetune_run_learns_and_writes_its_outputs(config, demo_data, tmp_path):
    save = tmp_path / "run"
    result = torchrun("finetune_gpt.py", *finetune_flags(config, demo_data, save, 12,
                                                         "--eval-interval", "6"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout
    before = float(output.split("held-out loss before training: ")[1].split()[0])
    after = float(output.split("held-out loss after training: ")[1].split()[0])
    assert after < before
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in steps] == list(range(1, 13))
    assert all({"lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in steps)
    assert any("valid_loss" in r for r in steps)
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))
    assert (save / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (save / "adapter" / "adapter_model.safetensors").is_file()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "12"


# --- exact resume after a rank is killed -----------------------------------------------------------


def _adapter_tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "adapter" / "adapter_model.safetensors")


def test_killed_run_resumes_bit_identically(config, demo_data, tmp_path):
    import psutil

    iters, interval = "16", "4"
    straight = torchrun("finetune_gpt.py", *finetune_flags(config, demo_data, tmp_path / "straight",
                                                           iters, "--save-interval", interval))
    assert straight.returncode == 0, straight.stdout[-3000:]

    save = tmp_path / "killed"
    launcher = torchrun("finetune_gpt.py", *finetune_flags(config, demo_data, save, iters,
                                                           "--save-interval", interval), wait=False)
    latest = save / "latest_checkpointed_iteration.txt"
    killed = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and launcher.poll() is None:
            if latest.is_file() and latest.read_text().strip() == interval:
                workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                           if "finetune_gpt.py" in " ".join(p.cmdline())]
                killed = workers[-1]
                killed.send_signal(signal.SIGKILL)  # one rank dies mid-run
                killed_at = time.monotonic()
                break
            time.sleep(0.02)
        _, stderr = launcher.communicate(timeout=120)
        ended_after = time.monotonic() - killed_at if killed else None
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert killed is not None, "the run ended before its first checkpoint"
    assert launcher.returncode != 0
    # the whole job ends promptly (the other rank does not wait for the dead one), saying why
    assert ended_after < 60, f"the job took {ended_after:.0f} s to end after a rank died"
    assert f"exitcode  : -9 (pid: {killed.pid})" in stderr, stderr[-3000:]
    assert not (save / "adapter").exists()  # it did not get to the end
    resumed_from = int(latest.read_text())
    assert resumed_from < int(iters)

    # a rank killed at once usually stops rank 0 before it logs past the checkpoint; a record
    # it did log, as a slower kill would leave it, must not survive the resume
    with open(save / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"iteration": resumed_from + 1, "loss": -1.0}) + "\n")
    resumed = torchrun("finetune_gpt.py", *finetune_flags(config, demo_data, save, iters,
                                                          "--save-interval", interval,
                                                          "--load", save))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {save} at iteration {resumed_from}" in resumed.stdout
    expected, actual = _adapter_tensors(tmp_path / "straight"), _adapter_tensors(save)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert (expected[key] == actual[key]).all(), key  # bit-identical
    # the log holds each iteration once: the killed run's records past the resume point are
    # gone, and the resumed run's equal the uninterrupted run's
    def logged(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["iteration"], r["loss"]) for r in records if "loss" in r]

    assert logged(save) == logged(tmp_path / "straight")
    assert [iteration for iteration, _ in logged(save)] == list(range(1, int(iters) + 1))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == list(range(1, int(iters) + 1))


def test_a_failing_checkpoint_writer_ends_the_job_with_its_cause(config, demo_data, tmp_path):
    """megatron's dist-checkpointing writer needs psutil; without it the writer dies before it
    reports. Once that hung both ranks forever (megatron-core 0.16); now the job ends."""
    hidden = tmp_path / "no_psutil"
    hidden.mkdir()
    (hidden / "psutil.py").write_text('raise ImportError("psutil is hidden by this test")\n')
    started = time.monotonic()
    result = torchrun("pretrain_gpt.py", "--config", config, "--data-path",
                      demo_data / "pretrain_text_document", "--train-iters", "2",
                      "--eval-iters", "1", "--save", tmp_path / "save", timeout=120,
                      env={"PYTHONPATH": str(hidden)})
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "psutil is not installed" in result.stderr, result.stderr[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
    assert not (tmp_path / "save" / "latest_checkpointed_iteration.txt").exists()


# --- the same run at other layouts -----------------------------------------------------------------


def _losses(save):
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def tp2_sp_finetune(config, demo_data, tmp_path_factory):
    """The reference run of the layout comparisons: 6 LoRA steps at TP=2 + SP."""
    reference = tmp_path_factory.mktemp("tp2")
    result = torchrun("finetune_gpt.py", *finetune_flags(config, demo_data, reference, 6))
    assert result.returncode == 0, result.stdout[-3000:]
    return reference


@pytest.mark.parametrize("layout", ["pp2", "dp2"])
def test_pipeline_and_data_parallel_runs_match_tp2_sp(config, demo_data, tmp_path, layout,
                                                      tp2_sp_finetune):
    """The loop's grad sync, norm and data order: PP=2 (1F1B) and DP=2 give the TP=2 + SP loss
    curve (the same global batches, the same logical model and adapter)."""
    reference = tp2_sp_finetune
    flags = {"pp2": ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"],
             "dp2": ["--tensor-model-parallel-size", "1"]}[layout]
    other = tmp_path / layout
    no_sp = tmp_path / "no_sp.yaml"
    no_sp.write_text(yaml.safe_dump(dict(TINY, megatron_config=dict(
        TINY["megatron_config"], sequence_parallel=False, tensor_model_parallel_size=1))))
    result = torchrun("finetune_gpt.py", *finetune_flags(no_sp, demo_data, other, 6, *flags))
    assert result.returncode == 0, result.stdout[-3000:]
    assert _losses(other) == pytest.approx(_losses(reference), rel=1e-4)


def test_recompute_flags_reach_the_megatron_config(config, demo_data, tmp_path):
    from megatron_lora.training import parse_arguments

    flags = ["--recompute-granularity", "full", "--recompute-method", "block",
             "--recompute-num-layers", "1"]
    experiment = parse_arguments([str(f) for f in finetune_flags(
        config, demo_data, tmp_path / "save", 2, *flags)], "finetune")[0]
    settings = experiment.transformer_config()
    assert (settings.recompute_granularity, settings.recompute_method,
            settings.recompute_num_layers) == ("full", "block", 1)


def test_full_recompute_flags_give_the_no_recompute_curve(config, demo_data, tmp_path,
                                                           tp2_sp_finetune):
    """Megatron-LM's recompute flags reach megatron's config, and LoRA under full recompute
    (layer 0 of 2 recomputed, the case that once left its adapter untrained) gives the
    TP=2 + SP loss curve and adapter bit for bit (docs/recompute.md)."""
    save = tmp_path / "recompute"
    result = torchrun("finetune_gpt.py", *finetune_flags(
        config, demo_data, save, 6, "--recompute-granularity", "full", "--recompute-method",
        "block", "--recompute-num-layers", "1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _losses(save) == _losses(tp2_sp_finetune)
    expected, actual = _adapter_tensors(tp2_sp_finetune), _adapter_tensors(save)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert (expected[key] == actual[key]).all(), key


def _held_out(output, when):
    return float(output.split(f"held-out loss {when} training: ")[1].split()[0])


def test_tied_embedding_pretraining_at_pp2_matches_tp2_sp_and_loads_at_pp1(demo_data, tmp_path):
    """Full training with tied embeddings: at PP=2 the last stage's copy of the embeddings gets
    the gradient of both uses (summed over the embedding group), so the loss curve is the
    TP=2 + SP one; the PP=2 dist-checkpoint (the copy saved under the embedding's key) loads
    at PP=1 with the same held-out loss."""
    def tied_config(name, **layout):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"megatron_config": dict(
            TINY["megatron_config"], untie_embeddings_and_output_weights=False, **layout),
            "training": TINY["training"]}))
        return path

    def pretrain(config, save, iters, *flags):
        result = torchrun("pretrain_gpt.py", "--config", config,
                          "--data-path", demo_data / "pretrain_text_document",
                          "--valid-data-path", demo_data / "finetune_heldout_text_document",
                          "--train-iters", iters, "--save", save, *flags)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    tp2_sp = tied_config("tp2_sp")
    pp2 = tied_config("pp2", tensor_model_parallel_size=1, sequence_parallel=False,
                      pipeline_model_parallel_size=2)
    pretrain(tp2_sp, tmp_path / "tp2", 6)
    pp2_output = pretrain(pp2, tmp_path / "pp2", 6)
    assert _losses(tmp_path / "pp2") == pytest.approx(_losses(tmp_path / "tp2"), rel=1e-4)
    loaded = pretrain(tp2_sp, tmp_path / "loaded", 1, "--pretrained-checkpoint", tmp_path / "pp2",
                      "--lr-warmup-iters", "0")
    assert _held_out(loaded, "before") == pytest.approx(_held_out(pp2_output, "after"), rel=1e-5)


# --- script-level parity: every layout the loop runs gives the one-process run's numbers ----------

MOE = dict(num_moe_experts=4, moe_router_topk=2)
ALLTOALL = dict(MOE, moe_token_dispatcher_type="alltoall")
TIED = dict(untie_embeddings_and_output_weights=False)
TP2_SP = dict(tensor_model_parallel_size=2, sequence_parallel=True)
# name -> (mode, model settings, ranks, layout settings); each is compared with the same mode
# and model settings in one process. Clipping is active on every step (norms > clip_grad).
SCRIPT_LAYOUTS = {
    "ep2-allgather": ("finetune", MOE, 2, dict(expert_model_parallel_size=2)),
    "ep2-alltoall": ("finetune", ALLTOALL, 2, dict(expert_model_parallel_size=2)),
    "tp2-sp-etp2": ("finetune", MOE, 2, TP2_SP),
    "tp2-sp-ep2-etp2": ("finetune", MOE, 4, dict(TP2_SP, expert_model_parallel_size=2)),
    "tp2-sp-ep2-etp1": ("finetune", ALLTOALL, 2, dict(TP2_SP, expert_model_parallel_size=2,
                                                      expert_tensor_parallel_size=1)),
    "pretrain-ep2": ("pretrain", MOE, 2, dict(expert_model_parallel_size=2)),
    "pretrain-tied-pp2": ("pretrain", TIED, 2, dict(pipeline_model_parallel_size=2)),
}
CLIP = {"finetune": 0.25, "pretrain": 1.0}


def _metrics(save):
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in records if "loss" in r]


def _script_run(mode, settings, world, data, save):
    config = save.with_suffix(".yaml")
    megatron = dict(TINY["megatron_config"], tensor_model_parallel_size=1,
                    sequence_parallel=False)
    megatron.update(settings)
    experiment = {"megatron_config": megatron,
                  "training": dict(TINY["training"], clip_grad=CLIP[mode])}
    if mode == "finetune":
        experiment["lora"] = TINY["lora"]
    config.write_text(yaml.safe_dump(experiment))
    corpus = "finetune" if mode == "finetune" else "pretrain"
    result = torchrun(f"{mode}_gpt.py", "--config", config,
                      "--data-path", data / f"{corpus}_text_document", "--train-iters", 5,
                      "--save", save, nproc=world)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return _metrics(save)


@pytest.fixture(scope="module")
def one_process_runs(demo_data, tmp_path_factory):
    """The reference of each (mode, model settings), run once in one process."""
    cache = {}

    def get(mode, settings):
        key = (mode, json.dumps(settings, sort_keys=True))
        if key not in cache:
            save = tmp_path_factory.mktemp("one_process") / "run"
            cache[key] = _script_run(mode, settings, 1, demo_data, save)
        return cache[key]

    return get


@pytest.mark.parametrize("name", list(SCRIPT_LAYOUTS))
def test_layout_gives_the_one_process_loss_and_grad_norm(name, demo_data, tmp_path,
                                                         one_process_runs):
    """The loop's gradient handling (grad_sync.finalize_gradients) under each parallel layout:
    per iteration, loss and grad norm (with clipping active) equal the one-process run's."""
    mode, settings, world, layout = SCRIPT_LAYOUTS[name]
    reference = one_process_runs(mode, settings)
    other = _script_run(mode, dict(settings, **layout), world, demo_data, tmp_path / name)
    assert len(other) == len(reference) == 5
    assert all(norm > CLIP[mode] for _, norm in reference)  # clipping acted on every step
    for (loss, norm), (ref_loss, ref_norm) in zip(other, reference):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-5)


def test_lora_load_continues_an_adapter_at_another_layout(config, demo_data, tmp_path,
                                                         tp2_sp_finetune):
    """--lora-load of the TP=2 + SP run's adapter at TP=1 (one process): the held-out loss
    before training equals the TP=2 + SP run's after it (the same adapter, its own r,
    scaling and modules, no --lora-rank needed)."""
    tp1 = tmp_path / "tp1.yaml"
    tp1.write_text(yaml.safe_dump({"megatron_config": dict(
        TINY["megatron_config"], tensor_model_parallel_size=1, sequence_parallel=False),
        "training": TINY["training"]}))
    reference = torchrun("finetune_gpt.py", "--config", config, "--data-path",
                         demo_data / "finetune_text_document", "--valid-data-path",
                         demo_data / "finetune_heldout_text_document", "--train-iters", 1,
                         "--save", tmp_path / "again", "--lora-load", tp2_sp_finetune / "adapter",
                         "--lr-warmup-iters", 0)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    continued = torchrun("finetune_gpt.py", "--config", tp1, "--data-path",
                         demo_data / "finetune_text_document", "--valid-data-path",
                         demo_data / "finetune_heldout_text_document", "--train-iters", 1,
                         "--save", tmp_path / "tp1", "--lora-load", tp2_sp_finetune / "adapter",
                         "--lr-warmup-iters", 0, nproc=1)
    assert continued.returncode == 0, continued.stdout[-3000:] + continued.stderr[-3000:]
    assert _held_out(continued.stdout, "before") == pytest.approx(
        _held_out(reference.stdout, "before"), rel=1e-5)


def test_overwrite_replaces_the_previous_run_and_only_it(demo_data, tmp_path):
    """--save over another run needs --overwrite; it then holds only the new run (no
    iteration directory, metrics or adapter of the old one left)."""
    tp1 = tmp_path / "tp1.yaml"
    tp1.write_text(yaml.safe_dump(dict(TINY, megatron_config=dict(
        TINY["megatron_config"], tensor_model_parallel_size=1, sequence_parallel=False))))
    save = tmp_path / "run"

    def run(iters, *extra):
        return _script("finetune_gpt.py", *finetune_flags(tp1, demo_data, save, iters,
                                                          "--save-interval", 1, *extra))

    first = run(3)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (save / "iter_0000003").is_dir()
    refused = run(2)
    assert refused.returncode == 2 and "holds another run (at iteration 3)" in refused.stderr
    assert (save / "iter_0000003").is_dir()  # untouched
    replaced = run(2, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert [r["iteration"] for r in map(json.loads, (save / "metrics.jsonl").read_text()
                                        .splitlines()) if "loss" in r] == [1, 2]


def test_bf16_run_keeps_the_factors_in_fp32(config, demo_data, tmp_path):
    from safetensors import safe_open

    save = tmp_path / "bf16"
    result = torchrun("finetune_gpt.py", *finetune_flags(config, demo_data, save, 3, "--bf16"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with safe_open(str(save / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}
    base = json.loads((save / "adapter" / "adapter_config.json").read_text())
    assert base["lora_config"]["lora_dtype"] == "float32"
