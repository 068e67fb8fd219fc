"""What the pretrain / finetune scripts share: flags and YAML, the model, data, the optimiser
over the trainable parameters, the step, evaluation, checkpoint and exact resume, logging.

The loop uses megatron-core for the model, the parallel layout, the forward-backward schedule
(micro-batches, 1F1B under PP) and indexed datasets, and plain ``torch.optim.AdamW`` for the
optimiser: with LoRA the trainable state is tiny, so megatron's distributed optimiser buys
nothing, and a plain optimiser's state is simple to checkpoint bit-exactly. What happens to
gradients between backward and the step lives in one place, ``grad_sync.finalize_gradients``.

Checkpoints (``--save DIR``):

    DIR/latest_checkpointed_iteration.txt      written last, atomically
    DIR/iter_0000100/adapter/                  LoRA: the consolidated adapter (any layout)
    DIR/iter_0000100/model/                    full training: megatron dist-checkpoint
    DIR/iter_0000100/rank_00000.safetensors    optimiser state and RNG states of each rank
    DIR/iter_0000100/trainer_state.json        iteration, consumed samples, layout
    DIR/adapter/ or DIR/model/                 the final result
    DIR/metrics.jsonl, DIR/tensorboard/, DIR/loss_curve.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from .arguments import add_lora_args, lora_config_from_args
from .errors import MegatronLoraError
from .grad_sync import finalize_gradients

LATEST = "latest_checkpointed_iteration.txt"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.jsonl"
# beside a full-training dist-checkpoint's metadata.json: the model it holds, so a later run
# is checked against it before any model is built
MODEL_DESCRIPTION = "model_description.json"
# what these scripts write into --save; a directory holding anything else is not theirs
_RUN_ENTRIES = (LATEST, METRICS, "tensorboard", "loss_curve.png", "adapter", "model")
LR_DECAY_STYLES = ("constant", "linear", "cosine")


class TrainingError(MegatronLoraError):
    """Bad flags, config or files: reported as one line, exit code 2, nothing written."""


# --- flags and settings ------------------------------------------------------------------------

# flag destination -> (section, key) in the YAML experiment
_MODEL_FLAGS = {
    "tensor_model_parallel_size": "tensor_model_parallel_size",
    "pipeline_model_parallel_size": "pipeline_model_parallel_size",
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "seq_length": "seq_length",
    "vocab_size": "vocab_size",
    "seed": "seed",
    "recompute_granularity": "recompute_granularity",
    "recompute_method": "recompute_method",
    "recompute_num_layers": "recompute_num_layers",
}


# settings a YAML file must not carry into every later run: a flag each time it is meant
_FLAG_ONLY = {"overwrite", "allow_longer_sequences"}


@dataclass
class TrainingSettings:
    """The loop's settings (YAML ``training:`` section, overridden by flags)."""

    train_iters: int = 0
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    data_path: Optional[str] = None
    valid_data_path: Optional[str] = None
    split: str = "98,2,0"
    save: Optional[str] = None
    load: Optional[str] = None
    pretrained_checkpoint: Optional[str] = None
    overwrite: bool = False
    allow_longer_sequences: bool = False
    save_interval: Optional[int] = None
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    log_interval: int = 10
    tokenizer: str = "byte"
    progress_bar: bool = True

    @classmethod
    def from_section(cls, section: dict, source: str) -> "TrainingSettings":
        import difflib

        from .experiment import ExperimentConfigError, checked_value

        known = {f.name for f in fields(cls)} - _FLAG_ONLY
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in section.items():
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(known)}"
                raise TrainingError(f"{source}: training.{key} is not a known key{hint}")
            try:
                values[key] = checked_value(f"training.{key}", value, hints[key])
            except ExperimentConfigError as error:
                raise TrainingError(f"{source}: {error}") from None
        return cls(**values)

    def check(self, mode: str) -> None:
        def positive(name):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise TrainingError(f"--{name.replace('_', '-')} {value!r} is invalid: expected "
                                    f"a positive integer")

        for name in ("train_iters", "micro_batch_size", "global_batch_size", "save_interval",
                     "eval_interval", "eval_iters", "log_interval"):
            positive(name)
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise TrainingError(f"--lr-decay-style {self.lr_decay_style!r} is invalid: expected "
                                f"one of {', '.join(LR_DECAY_STYLES)}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise TrainingError(f"--lr {self.lr} / --min-lr {self.min_lr} are invalid: expected "
                                f"0 <= min-lr <= lr and lr > 0")
        if self.lr_warmup_iters < 0 or self.lr_warmup_iters > self.train_iters:
            raise TrainingError(f"--lr-warmup-iters {self.lr_warmup_iters} is invalid: expected "
                                f"0 .. --train-iters ({self.train_iters})")
        if not self.clip_grad >= 0:
            raise TrainingError(f"--clip-grad {self.clip_grad} is invalid: expected >= 0 "
                                f"(0 turns clipping off)")
        if not self.data_path:
            raise TrainingError("--data-path is required: the prefix of a megatron indexed "
                                "dataset (PREFIX.bin / PREFIX.idx), e.g. made by "
                                "`python -m megatron_lora.data preprocess`")
        for name in ("data_path", "valid_data_path"):
            prefix = getattr(self, name)
            if prefix:
                missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not Path(p).is_file()]
                if missing:
                    raise TrainingError(f"--{name.replace('_', '-')} {prefix}: {', '.join(missing)} "
                                        f"does not exist")
        if self.load and not (Path(self.load) / LATEST).is_file():
            raise TrainingError(f"--load {self.load} is not a checkpoint directory of these "
                                f"scripts: {LATEST} is missing")
        if self.pretrained_checkpoint and not _model_checkpoint_dir(self.pretrained_checkpoint):
            raise TrainingError(f"--pretrained-checkpoint {self.pretrained_checkpoint} holds no "
                                f"megatron dist-checkpoint (expected a metadata.json, or a "
                                f"model/ folder written by pretrain_gpt.py)")
        if self.load:
            _latest_iteration_directory(self.load)
        if self.save:
            check_save_directory(self)


# --- where a run writes: never over another run, the base or a file by surprise ------------------


def _is_run_entry(name: str) -> bool:
    return name in _RUN_ENTRIES or (name.startswith("iter_") and name[5:].isdigit())


def _inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies under it (both resolved)."""
    return path == other or other in path.parents


def check_save_directory(settings: "TrainingSettings") -> None:
    """--save must be a new or empty directory, this run's own (resumed with --load of it), or
    replaced on purpose (--overwrite); never the base checkpoint; writable. No side effects."""
    save = Path(settings.save)
    target = save.resolve()
    if settings.pretrained_checkpoint:
        base = Path(settings.pretrained_checkpoint).resolve()
        if _inside(target, base) or _inside(base, target):
            raise TrainingError(
                f"--save {settings.save} overlaps --pretrained-checkpoint "
                f"{settings.pretrained_checkpoint}: the base checkpoint is never written to; "
                f"save to another directory")
    if save.exists() and not save.is_dir():
        raise TrainingError(f"--save {settings.save} is a file, not a directory")
    entries = sorted(p.name for p in save.iterdir()) if save.is_dir() else []
    if entries:
        foreign = [name for name in entries if not _is_run_entry(name)]
        if foreign:
            raise TrainingError(
                f"--save {settings.save} holds files that are not a run of these scripts "
                f"({', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}); choose a new or "
                f"empty directory")
        resuming = settings.load and Path(settings.load).resolve() == target
        if not resuming and not settings.overwrite:
            marker = save / LATEST
            where = f" (at iteration {marker.read_text().strip()})" if marker.is_file() else ""
            raise TrainingError(
                f"--save {settings.save} holds another run{where}; resume it with --load "
                f"{settings.save}, or replace it with --overwrite")
    existing = save
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise TrainingError(f"--save {settings.save} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"--save {settings.save} cannot be written: {existing} is not "
                            f"writable by this user")


def clear_previous_run(save: Path) -> None:
    """--overwrite: remove what an earlier run wrote into --save (only the scripts' own
    entries; check_save_directory refused anything else). Rank 0, before anything is written."""
    import shutil

    if not save.is_dir():
        return
    for entry in save.iterdir():
        if _is_run_entry(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _latest_iteration_directory(load) -> Path:
    """The iteration directory --load resumes from, checked to hold a complete save."""
    marker = Path(load) / LATEST
    if not marker.is_file():
        raise TrainingError(f"--load {load} is not a checkpoint directory of these scripts: "
                            f"{LATEST} is missing")
    text = marker.read_text(errors="replace").strip()
    if not text.isdigit():
        raise TrainingError(f"--load {load}: {marker} holds {text[:40]!r}, not an iteration "
                            f"number")
    directory = Path(load) / f"iter_{int(text):07d}"
    if not (directory / TRAINER_STATE).is_file():
        raise TrainingError(f"--load {load}: {LATEST} points at iteration {int(text)}, but "
                            f"{directory / TRAINER_STATE} does not exist")
    return directory


# What the loop runs is what tests/test_training.py compares with a one-process run (loss and
# grad norm per iteration): dense TP + SP, PP (1F1B, tied embeddings), DP; MoE at EP, expert-TP
# and TP + SP + EP. Anything else is refused before a process starts.
_UNPROVEN_LAYOUTS = (
    (lambda m: m.get("virtual_pipeline_model_parallel_size") is not None,
     "virtual_pipeline_model_parallel_size (interleaved 1F1B): the loop trains one model chunk "
     "per stage"),
    (lambda m: any(m.get(k) is not None for k in (
        "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
        "pipeline_model_parallel_layout")),
     "uneven pipeline stages (num_layers_in_first/last_pipeline_stage, "
     "pipeline_model_parallel_layout): not yet compared with a one-process run; split "
     "num_layers evenly"),
    (lambda m: m.get("num_moe_experts") and m["pipeline_model_parallel_size"] > 1,
     "a mixture-of-experts model with pipeline_model_parallel_size > 1: not yet compared with "
     "a one-process run; use expert or tensor parallelism for MoE"),
)


def check_layout_is_proven(experiment) -> None:
    """Refuse a layout whose training has not been shown equal to one process (the reason)."""
    settings = experiment.megatron_config
    for unproven, reason in _UNPROVEN_LAYOUTS:
        if unproven(settings):
            raise TrainingError(f"the training scripts refuse {reason}")


def _model_checkpoint_dir(path) -> Optional[Path]:
    path = Path(path)
    for candidate in (path / "model", path):
        if (candidate / "metadata.json").is_file():
            return candidate
    return None


# the megatron_config keys that decide a base checkpoint's tensors (and what it was trained on)
_DESCRIBED_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                   "num_query_groups", "kv_channels", "vocab_size", "num_moe_experts",
                   "moe_ffn_hidden_size", "activation", "normalization", "add_bias_linear",
                   "untie_embeddings_and_output_weights", "position_embedding_type",
                   "rotary_base", "rotary_percent", "seq_length")


def describe_model(experiment) -> dict:
    return {key: experiment.megatron_config.get(key) for key in _DESCRIBED_KEYS}


def check_base_fits(experiment, settings: "TrainingSettings") -> None:
    """The model of --pretrained-checkpoint (its model_description.json, written by
    pretrain_gpt.py) against this run's, before any model is built. A longer --seq-length than
    the base was trained with is refused unless --allow-longer-sequences: positions it never
    saw (RoPE) give a model that runs but is not the one the user meant."""
    directory = _model_checkpoint_dir(settings.pretrained_checkpoint)
    path = directory / MODEL_DESCRIPTION
    if not path.is_file():
        return  # a checkpoint from elsewhere: its shapes are checked when it is loaded
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise TrainingError(f"--pretrained-checkpoint: {path} is damaged ({error})") from None
    ours = describe_model(experiment)
    differing = [f"{key}: checkpoint {saved[key]!r}, this run {ours[key]!r}"
                 for key in _DESCRIBED_KEYS if key != "seq_length" and key in saved
                 and saved[key] != ours[key]]
    if differing:
        raise TrainingError(f"--pretrained-checkpoint {settings.pretrained_checkpoint} holds "
                            f"another model ({'; '.join(differing)}); {path}")
    trained, asked = saved.get("seq_length"), ours["seq_length"]
    if isinstance(trained, int) and asked > trained:
        if ours["position_embedding_type"] == "learned_absolute":
            raise TrainingError(f"--seq-length {asked} is longer than the {trained} positions "
                                f"the base's learned position embeddings have")
        if not settings.allow_longer_sequences:
            raise TrainingError(f"--seq-length {asked} is longer than the base was trained with "
                                f"({trained}, {path}); pass --allow-longer-sequences to run "
                                f"positions the base never saw")


def load_base_weights(model, path) -> None:
    """Base weights from a megatron dist-checkpoint (pretrain_gpt.py's --save, or its model/),
    at any TP/PP layout. Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    directory = _model_checkpoint_dir(path)
    if directory is None:
        raise TrainingError(f"{path} holds no megatron dist-checkpoint (no metadata.json)")
    try:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(directory)))
    except (CheckpointingException, CheckpointException) as error:
        # a key or shape this model does not have; torch's exception carries megatron's as
        # the last line of each failed rank's traceback
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = next((line.split("Exception: ", 1)[1] for line in reversed(lines)
                      if "CheckpointingException: " in line), lines[0] if lines else "")
        raise TrainingError(f"{directory} does not fit this model: {cause[:300]}") from None


def build_parser(mode: str) -> argparse.ArgumentParser:
    """Megatron-LM's flag names (defaults come from the YAML ``--config``, then from the code)."""
    parser = argparse.ArgumentParser(
        prog=f"{mode}_gpt.py",
        description=f"{'LoRA fine-tuning' if mode == 'finetune' else 'Pretraining'} of a "
                    f"megatron-core GPT (launch with torchrun; CPU gloo or GPU nccl).")
    parser.add_argument("--config", help="YAML experiment (megatron_config / lora / training); "
                                         "flags override its values")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="start this many workers on this machine (torchrun --standalone), "
                             "after checking every input once here; leave it out under torchrun")
    model = parser.add_argument_group("model and layout")
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers",
                 "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                 "--num-query-groups", "--seq-length", "--vocab-size", "--seed"):
        model.add_argument(flag, type=int, default=None)
    model.add_argument("--sequence-parallel", action="store_true", default=None)
    # activation recompute works with LoRA in every mode (docs/recompute.md)
    model.add_argument("--recompute-granularity", default=None, choices=("full", "selective"))
    model.add_argument("--recompute-method", default=None, choices=("uniform", "block"))
    model.add_argument("--recompute-num-layers", type=int, default=None)
    model.add_argument("--bf16", action="store_true", default=None)
    loop = parser.add_argument_group("training loop")
    for flag in ("--micro-batch-size", "--global-batch-size", "--train-iters", "--lr-warmup-iters",
                 "--save-interval", "--eval-interval", "--eval-iters", "--log-interval"):
        loop.add_argument(flag, type=int, default=None)
    for flag in ("--lr", "--min-lr", "--clip-grad", "--weight-decay"):
        loop.add_argument(flag, type=float, default=None)
    loop.add_argument("--lr-decay-style", default=None, choices=LR_DECAY_STYLES)
    loop.add_argument("--data-path", nargs="+", default=None,
                      help="indexed dataset prefix (one; blends are not supported yet)")
    loop.add_argument("--valid-data-path", nargs="+", default=None,
                      help="a separate held-out dataset prefix for evaluation")
    loop.add_argument("--split", default=None, help="train,valid,test weights, e.g. 98,2,0")
    loop.add_argument("--save", default=None)
    loop.add_argument("--load", default=None, help="resume from a --save directory")
    loop.add_argument("--overwrite", action="store_true", default=None,
                      help="let --save replace the run already in that directory")
    loop.add_argument("--allow-longer-sequences", action="store_true", default=None,
                      help="allow a --seq-length longer than --pretrained-checkpoint's")
    loop.add_argument("--pretrained-checkpoint", default=None,
                      help="base weights: a dist-checkpoint (e.g. pretrain_gpt.py's --save)")
    loop.add_argument("--tokenizer", default=None, help="tokenizer name (built in: byte)")
    loop.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", default=None)
    add_lora_args(parser)
    return parser


def parse_arguments(argv, mode: str):
    """(experiment, training settings, lora config or None, args), all validated; no side
    effects. Values: the code's defaults < the YAML --config < the flags."""
    from .config import ExperimentConfigError, load_experiment

    args = build_parser(mode).parse_args(argv)
    overrides = {f"megatron_config.{key}": getattr(args, dest)
                 for dest, key in _MODEL_FLAGS.items() if getattr(args, dest) is not None}
    if args.sequence_parallel:
        overrides["megatron_config.sequence_parallel"] = True
    if args.bf16:
        overrides["megatron_config.params_dtype"] = "bfloat16"
    try:
        if args.config:
            experiment = load_experiment(args.config, overrides=overrides)
        else:
            experiment = load_experiment(data={"megatron_config": {}}, overrides=overrides)
    except ExperimentConfigError as error:
        raise TrainingError(str(error)) from None
    source = args.config or "the command line"
    check_layout_is_proven(experiment)

    training = TrainingSettings.from_section(dict(experiment.training or {}), source)
    for f in fields(TrainingSettings):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name in ("data_path", "valid_data_path"):
            if len(value) != 1:
                raise TrainingError(f"--{f.name.replace('_', '-')} takes one prefix here (got "
                                    f"{len(value)}); dataset blends are not supported yet")
            value = value[0]
        setattr(training, f.name, value)
    training.check(mode)
    if training.pretrained_checkpoint:
        check_base_fits(experiment, training)

    # the YAML's lora: section is the starting point only when the file has one
    yaml_lora = experiment.lora if args.config and _has_section(args.config, "lora") else None
    saved = _saved_adapter_config(args.lora_load, yaml_lora) if args.lora_load else None
    try:
        lora = lora_config_from_args(args, saved or yaml_lora)
    except MegatronLoraError as error:
        raise TrainingError(str(error)) from None
    if saved is not None:
        _check_continues(saved, lora, f"--lora-load {args.lora_load}", "the flags")
    if mode == "pretrain" and args.lora_rank is None and not args.lora_load:
        lora = None  # pretraining is full training unless --lora-rank or --lora-load asks for LoRA
    if lora is not None and lora.lora_dtype is None and experiment.params_dtype != torch.float32:
        # a bf16/fp16 base: keep the trainable factors in fp32 (their own master copy); they
        # are cast to the activation dtype in the forward, never the activations up
        from dataclasses import replace

        lora = replace(lora, lora_dtype="float32")
    if mode == "finetune" and lora is None:
        raise TrainingError("finetune_gpt.py trains LoRA adapters: give --lora-rank > 0 (or a "
                            "lora: section in --config); full training is pretrain_gpt.py")
    return experiment, training, lora, args


def _saved_adapter_config(path, yaml_lora):
    """--lora-load: the saved adapter defines the one this run continues (its rank, scaling and
    modules); a YAML lora: section that says otherwise is an error, not silently ignored."""
    from dataclasses import replace

    from .checkpoint import read_adapter

    try:
        adapter = read_adapter(path)
    except MegatronLoraError as error:
        raise TrainingError(f"--lora-load: {error}") from None
    saved = replace(adapter.lora_config, target_modules=sorted(adapter.config["modules"]),
                    exclude_modules=None)
    if yaml_lora is not None:
        _check_continues(saved, replace(yaml_lora, target_modules=saved.target_modules),
                         f"--lora-load {path}", "the YAML lora: section")
    return saved


def _check_continues(saved, asked, what: str, source: str) -> None:
    for field in ("r", "lora_alpha", "use_rslora"):
        if getattr(saved, field) != getattr(asked, field):
            raise TrainingError(
                f"{what} holds an adapter with {field}={getattr(saved, field)!r}, {source} "
                f"ask for {field}={getattr(asked, field)!r}; a loaded adapter keeps its own "
                f"(leave the setting out, or match it)")
    if sorted(saved.target_modules) != sorted(asked.target_modules or []):
        raise TrainingError(f"{what} adapts {len(saved.target_modules)} modules; {source} "
                            f"target {asked.target_modules}: a loaded adapter keeps its modules "
                            f"(leave --lora-target-modules out)")


def _has_section(path, name: str) -> bool:
    import yaml

    loaded = yaml.safe_load(Path(path).read_text())
    return isinstance(loaded, dict) and loaded.get(name) is not None


# --- process group -----------------------------------------------------------------------------


def initialize_distributed() -> None:
    """torch.distributed from torchrun's environment (a single process without it)."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        from .cpu import make_cpu_ready

        make_cpu_ready()
        backend = "gloo"
    if "RANK" not in os.environ:
        from .cpu import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    dist.init_process_group(backend=backend)


def learning_rate(settings: TrainingSettings, iteration: int) -> float:
    """Linear warm-up to --lr, then decay to --min-lr by --train-iters (Megatron's styles)."""
    if settings.lr_warmup_iters and iteration < settings.lr_warmup_iters:
        return settings.lr * (iteration + 1) / settings.lr_warmup_iters
    if settings.lr_decay_style == "constant":
        return settings.lr
    span = max(1, settings.train_iters - settings.lr_warmup_iters)
    progress = min(1.0, (iteration - settings.lr_warmup_iters) / span)
    if settings.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.min_lr + (settings.lr - settings.min_lr) * factor


# --- the step ------------------------------------------------------------------------------------


def _loss_from(batch):
    def loss_func(per_token_loss):
        mask = batch["loss_mask"].to(per_token_loss.device).float()
        loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp_min(1.0)
        # a copy: the schedule scales the returned loss in place (by 1 / micro-batches) for the
        # gradient, and a detached view would carry that into the reported value
        return loss, {"loss": loss.detach().clone()}

    return loss_func


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device)
    output = model(tokens, batch["position_ids"].to(device), None,
                   labels=batch["labels"].to(device))
    return output, _loss_from(batch)


def run_micro_batches(model, batches, settings: TrainingSettings, exp, forward_only: bool) -> float:
    """megatron-core's forward-backward schedule over ``batches``; the mean loss, the same on
    every rank (computed on the last pipeline stage, shared over PP and averaged over DP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .cpu import cuda_arguments_to_cpu

    context = cuda_arguments_to_cpu() if not torch.cuda.is_available() else contextlib.nullcontext()
    with context:
        outputs = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=exp.seq_length,
            micro_batch_size=settings.micro_batch_size, forward_only=forward_only)
    loss = sum(o["loss"].float() for o in outputs) / max(1, len(outputs)) if outputs else None
    value = torch.zeros((), dtype=torch.float64, device=_device())
    if ps.is_pipeline_last_stage() and loss is not None:
        value += loss.double().to(value.device)
    dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(value, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(value) / ps.get_data_parallel_world_size(with_context_parallel=True)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


# --- checkpoints ----------------------------------------------------------------------------------


def _rank_file(directory: Path) -> Path:
    return directory / f"rank_{dist.get_rank():05d}.safetensors"


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    # every size that decides which shard of parameters and optimiser state a rank holds
    return {"world_size": dist.get_world_size(),
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size()}


def save_checkpoint(trainer: "Trainer", iteration: int) -> Path:
    """Everything an exact resume needs, then the 'latest' marker (atomic, written last)."""
    from safetensors.torch import save_file

    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    save = Path(trainer.settings.save)
    directory = save / f"iter_{iteration:07d}"
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    trainer.save_weights(directory)
    state = {"rng.torch": torch.get_rng_state()}
    for name, value in get_cuda_rng_tracker().get_states().items():
        state[f"rng.tracker.{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    for index, param in enumerate(trainer.params):
        for key, value in trainer.optimizer.state.get(param, {}).items():
            state[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
    temporary = _rank_file(directory).with_suffix(".tmp")
    save_file(state, str(temporary))
    os.replace(temporary, _rank_file(directory))
    dist.barrier()
    if dist.get_rank() == 0:
        info = {"iteration": iteration, "consumed_samples": trainer.consumed_samples,
                "layout": _layout(), "lora": trainer.lora is not None}
        _write_atomically(directory / TRAINER_STATE, json.dumps(info, indent=2))
        _write_atomically(save / LATEST, f"{iteration}\n")
    dist.barrier()
    return directory


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _raise_on_every_rank(problem: Optional[str]) -> None:
    """Collective: if any rank found a problem, every rank raises it (the first one), so no
    rank walks on into a collective the others left."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)  # our own ranks' strings, not file contents
    first = next((p for p in problems if p), None)
    if first:
        raise TrainingError(first)


def _read_rank_state(load, directory: Path) -> dict:
    """This rank's optimiser and RNG state; a damaged file is an error on every rank."""
    from safetensors.torch import load_file

    path, state, problem = _rank_file(directory), None, None
    try:
        state = load_file(str(path))
        if "rng.torch" not in state:
            problem = f"--load {load}: {path} holds no RNG state (not written by these scripts)"
    except FileNotFoundError:
        problem = f"--load {load}: {path} is missing (the save did not finish on every rank)"
    except Exception as error:  # safetensors' own error type for a truncated/corrupt file
        problem = (f"--load {load}: {path} cannot be read ({str(error).splitlines()[0]}); the "
                   f"checkpoint is damaged: resume from an earlier iteration")
    _raise_on_every_rank(problem)
    return state


def load_checkpoint(trainer: "Trainer") -> None:
    """Resume exactly: weights, optimiser state, RNG states, iteration and data position."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    load = Path(trainer.settings.load)
    directory = _latest_iteration_directory(load)
    iteration = int(directory.name[len("iter_"):])
    try:
        info = json.loads((directory / TRAINER_STATE).read_text())
        info["layout"], info["lora"], info["consumed_samples"]  # noqa: B018 (presence)
    except (ValueError, KeyError, TypeError) as error:
        raise TrainingError(f"--load {load}: {directory / TRAINER_STATE} is damaged ({error})") \
            from None
    if info["layout"] != _layout():
        raise TrainingError(
            f"--load {load}: saved with layout {info['layout']}, this run has {_layout()}; exact "
            f"resume needs the same layout (start a new run with --lora-load "
            f"{directory}/adapter to continue the adapter at another layout)")
    if info["lora"] != (trainer.lora is not None):
        raise TrainingError(f"--load {load}: a {'LoRA' if info['lora'] else 'full'} training "
                            f"checkpoint cannot resume a {'LoRA' if trainer.lora else 'full'} run")
    state = _read_rank_state(load, directory)
    trainer.load_weights(directory)
    torch.set_rng_state(state["rng.torch"])
    tracker = get_cuda_rng_tracker()
    tracker.set_states({k[len("rng.tracker."):]: v for k, v in state.items()
                        if k.startswith("rng.tracker.")})
    for index, param in enumerate(trainer.params):
        entries = {k.split(".", 2)[2]: v for k, v in state.items()
                   if k.startswith(f"optimizer.{index}.")}
        if entries:
            trainer.optimizer.state[param] = {k: v.to(param.device) if k != "step" else v
                                              for k, v in entries.items()}
    trainer.iteration = iteration
    trainer.consumed_samples = info["consumed_samples"]


# --- logging -------------------------------------------------------------------------------------


class MetricsLog:
    """Rank 0: metrics.jsonl, TensorBoard events and, at the end, loss_curve.png.

    A run resumed at iteration N continues the log of iterations up to N: the records a killed
    run wrote past N are dropped from metrics.jsonl (rewritten atomically) and hidden from
    TensorBoard (its ``purge_step``), since the resumed run writes those iterations again.
    """

    def __init__(self, directory: Optional[str], resumed_at: int = 0):
        self.directory = Path(directory) if directory and dist.get_rank() == 0 else None
        self.records: List[dict] = []
        self.writer = None
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / METRICS
        if resumed_at and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short when the run was killed
                    continue
                if isinstance(record, dict) and record.get("iteration", 0) <= resumed_at:
                    self.records.append(record)
        _write_atomically(path, "".join(json.dumps(r) + "\n" for r in self.records))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.directory / "tensorboard"),
                                        purge_step=resumed_at + 1 if resumed_at else None)
        except ImportError:  # tensorboard is an optional extra
            self.writer = None

    def log(self, record: dict) -> None:
        if self.directory is None:
            return
        self.records.append(record)
        with open(self.directory / METRICS, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["iteration"])

    def close(self) -> None:
        if self.directory is None:
            return
        if self.writer is not None:
            self.writer.close()
        train = [(r["iteration"], r["loss"]) for r in self.records if "loss" in r]
        valid = [(r["iteration"], r["valid_loss"]) for r in self.records if "valid_loss" in r]
        if not train:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot(*zip(*train), label="train loss")
        if valid:
            axes.plot(*zip(*valid), marker="o", label="held-out loss")
        axes.set_xlabel("iteration")
        axes.set_ylabel("loss")
        axes.legend()
        figure.tight_layout()
        figure.savefig(self.directory / "loss_curve.png", dpi=100)
        plt.close(figure)


def _print0(*items) -> None:
    if dist.get_rank() == 0:
        print(*items, flush=True)


# --- the trainer ---------------------------------------------------------------------------------


class Trainer:
    def __init__(self, experiment, settings: TrainingSettings, lora, args):
        from megatron.core import parallel_state as ps

        from .data import build_gpt_datasets, get_tokenizer
        from .gpt import build_gpt_model, initialize_model_parallel

        self.experiment, self.settings, self.lora, self.args = experiment, settings, lora, args
        initialize_model_parallel(experiment)
        self.tokenizer = get_tokenizer(settings.tokenizer)
        if experiment.vocab_size < self.tokenizer.vocab_size:
            raise TrainingError(f"vocab_size {experiment.vocab_size} is smaller than the "
                                f"{settings.tokenizer} tokenizer's {self.tokenizer.vocab_size}")
        self.dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
        self.dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        per_step = settings.micro_batch_size * self.dp_size
        self.global_batch = settings.global_batch_size or per_step
        if self.global_batch % per_step:
            raise TrainingError(f"--global-batch-size {self.global_batch} is not a multiple of "
                                f"--micro-batch-size x data-parallel size = {per_step}")
        self.num_micro_batches = self.global_batch // per_step

        self.model = build_gpt_model(experiment)
        if settings.pretrained_checkpoint:
            load_base_weights(self.model, settings.pretrained_checkpoint)
        if lora is not None:
            from .model import apply_lora

            apply_lora(self.model, lora)
            if getattr(args, "lora_load", None):
                from .checkpoint import load_adapter

                load_adapter(self.model, args.lora_load)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr,
                                           weight_decay=settings.weight_decay)

        eval_samples = settings.eval_iters * self.global_batch
        train_samples = max(1, settings.train_iters) * self.global_batch
        self.train_data, valid, _ = build_gpt_datasets(
            settings.data_path, split=settings.split, seq_length=experiment.seq_length,
            seed=experiment.seed, num_samples=(train_samples, eval_samples, 0),
            tokenizer=self.tokenizer)
        if settings.valid_data_path:
            _, valid, _ = build_gpt_datasets(
                settings.valid_data_path, split="0,100,0", seq_length=experiment.seq_length,
                seed=experiment.seed, num_samples=(0, eval_samples, 0), tokenizer=self.tokenizer)
        self.valid_data = valid
        self.iteration, self.consumed_samples = 0, 0

    # weights: the adapter (LoRA) or the whole model (full training) --------------------------
    def save_weights(self, directory: Path) -> None:
        if self.lora is not None:
            from .checkpoint import save_adapter

            save_adapter(self.model, directory / "adapter")
        else:
            from .checkpoint import save_dist_checkpoint

            (directory / "model").mkdir(parents=True, exist_ok=True)
            dist.barrier()
            save_dist_checkpoint(self.model.sharded_state_dict(), directory / "model")
            if dist.get_rank() == 0:
                _write_atomically(directory / "model" / MODEL_DESCRIPTION,
                                  json.dumps(describe_model(self.experiment), indent=2))
            dist.barrier()

    def load_weights(self, directory: Path) -> None:
        if self.lora is not None:
            from .checkpoint import load_adapter

            load_adapter(self.model, directory / "adapter")
        else:
            load_base_weights(self.model, directory / "model")

    # data -----------------------------------------------------------------------------------
    def _batches(self, dataset, start_sample: int, count: int):
        from .data import micro_batches

        stream = micro_batches(dataset, micro_batch_size=self.settings.micro_batch_size,
                               start_sample=start_sample, data_parallel_rank=self.dp_rank,
                               data_parallel_size=self.dp_size)
        return [next(stream) for _ in range(count)]

    def evaluate(self) -> Optional[float]:
        if self.valid_data is None:
            return None
        self.model.eval()
        with torch.no_grad():
            losses = [run_micro_batches(self.model, self._batches(
                self.valid_data, i * self.global_batch, self.num_micro_batches),
                self.settings, self.experiment, forward_only=True)
                for i in range(self.settings.eval_iters)]
        self.model.train()
        return sum(losses) / len(losses)

    # the loop -------------------------------------------------------------------------------
    def train(self) -> dict:
        settings = self.settings
        metrics = MetricsLog(settings.save, resumed_at=self.iteration)
        before = self.evaluate() if self.iteration == 0 else None
        if before is not None:
            _print0(f"held-out loss before training: {before:.4f}")
            metrics.log({"iteration": 0, "valid_loss": before})
        progress = _progress_bar(settings, self.iteration)
        tokens_per_step = self.global_batch * self.experiment.seq_length
        last_loss, saved_at = None, None
        while self.iteration < settings.train_iters:
            started = time.perf_counter()
            lr = learning_rate(settings, self.iteration)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for param in self.params:
                param.grad = None
            batches = self._batches(self.train_data, self.consumed_samples, self.num_micro_batches)
            loss = run_micro_batches(self.model, batches, settings, self.experiment,
                                     forward_only=False)
            norm = finalize_gradients(self.model, self.params, self.lora is not None,
                                      settings.clip_grad)
            self.optimizer.step()
            self.iteration += 1
            self.consumed_samples += self.global_batch
            last_loss = loss
            elapsed = time.perf_counter() - started
            record = {"iteration": self.iteration, "loss": loss, "lr": lr, "grad_norm": norm,
                      "tokens_per_s": tokens_per_step / elapsed}
            if settings.eval_interval and self.iteration % settings.eval_interval == 0:
                record["valid_loss"] = self.evaluate()
            metrics.log(record)
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
                progress.update(1)
            elif self.iteration % settings.log_interval == 0:
                _print0(f"iteration {self.iteration}/{settings.train_iters} | loss {loss:.4f} | "
                        f"lr {lr:.3e} | grad norm {norm:.3f} | "
                        f"{record['tokens_per_s']:.0f} tokens/s")
            if settings.save and settings.save_interval and \
                    self.iteration % settings.save_interval == 0:
                save_checkpoint(self, self.iteration)
                saved_at = self.iteration
        if progress is not None:
            progress.close()
        after = self.evaluate()
        if after is not None:
            _print0(f"held-out loss after training: {after:.4f}")
            metrics.log({"iteration": self.iteration, "valid_loss": after})
        if settings.save:
            # decided from the loop's own state, the same on every rank (a file-system check
            # could differ between ranks and leave them in different collectives)
            if saved_at != self.iteration:
                save_checkpoint(self, self.iteration)
            self.save_weights(Path(settings.save))
            _print0(f"saved {'adapter' if self.lora else 'model'} to "
                    f"{Path(settings.save) / ('adapter' if self.lora else 'model')}")
        metrics.close()
        return {"loss": last_loss, "valid_loss_before": before, "valid_loss_after": after,
                "iteration": self.iteration}


def _progress_bar(settings: TrainingSettings, start: int):
    # a bar on a terminal; plain log lines in files (SLURM logs, CI), where a bar is noise
    if not settings.progress_bar or dist.get_rank() != 0 or not sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=settings.train_iters, initial=start, unit="it", dynamic_ncols=True,
                file=sys.stdout)


def _under_a_launcher() -> bool:
    return "LOCAL_RANK" in os.environ  # torchrun, or srun through scripts/slurm


def launch_workers(argv: List[str], nproc: int, mode: str) -> int:
    """--nproc-per-node N: the inputs were checked here, in one process; now torchrun starts
    the N workers on this machine with the same arguments (less this flag). Its exit code."""
    import subprocess

    script = Path(sys.argv[0]).resolve()
    if script.name != f"{mode}_gpt.py":
        raise TrainingError(f"--nproc-per-node launches scripts/{mode}_gpt.py itself; from "
                            f"{script.name} start the workers with torchrun")
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            rest.append(item)
    # OMP_NUM_THREADS set here keeps torchrun from printing its advice about it
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), str(script), *rest]
    code = subprocess.run(command, env=env).returncode
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def main(argv=None, mode: str = "finetune") -> int:
    """The scripts' entry point: exit code 0, or 2 with a one-line error and nothing written.

    Under torchrun every rank checks the inputs and rank 0 prints the error; with
    --nproc-per-node N (no launcher) they are checked once, before any worker starts.
    """
    name = f"{mode}_gpt.py"
    argv = list(sys.argv[1:] if argv is None else argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        experiment, settings, lora, args = parse_arguments(argv, mode)
        launching = args.nproc_per_node is not None
        if launching and _under_a_launcher():
            raise TrainingError(f"--nproc-per-node {args.nproc_per_node} starts the workers "
                                f"itself; under torchrun or srun leave it out")
        if launching and args.nproc_per_node < 1:
            raise TrainingError(f"--nproc-per-node {args.nproc_per_node} is invalid: expected "
                                f"a positive number of processes")
        world = args.nproc_per_node if launching else int(os.environ.get("WORLD_SIZE", "1"))
        experiment.check_world_size(world)
        if launching:
            return launch_workers(argv, args.nproc_per_node, mode)
    except MegatronLoraError as error:  # anything else is a bug: its traceback
        if rank0:
            print(f"{name}: error: {error}", file=sys.stderr, flush=True)
        return 2
    initialize_distributed()
    try:
        trainer = Trainer(experiment, settings, lora, args)
        if settings.overwrite and not settings.load and dist.get_rank() == 0:
            clear_previous_run(Path(settings.save))
        dist.barrier()
        if settings.load:
            load_checkpoint(trainer)
            _print0(f"resumed from {settings.load} at iteration {trainer.iteration}")
        trainer.train()
    except MegatronLoraError as error:
        if dist.get_rank() == 0:
            print(f"{name}: error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
