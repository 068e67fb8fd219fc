"""The scripts' inputs: flags, the YAML ``training:`` section (checked by the experiment
schema's own code), their validation, and the gate on layouts the loop has not been proven at.
Everything here runs before any process group exists and has no side effects."""

from __future__ import annotations

import argparse
import math
import os
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import List, Optional, Union

import torch

from ..arguments import add_lora_args, lora_config_from_args
from ..adapter_file import read_adapter
from ..errors import MegatronLoraError
from ..experiment import (
    ExperimentConfigError,
    checked_value,
    flatten_overrides,
    load_experiment,
    read_experiment_data,
    unknown_key,
)
from ..hf import is_hf_directory
from .base import check_base_fits, model_checkpoint_dir
from .errors import TrainingError
from .rundir import check_path_flags, check_save_directory, latest_iteration_directory

LR_DECAY_STYLES = ("constant", "linear", "cosine")


def _as_list(value) -> List[str]:
    return [] if value is None else [value] if isinstance(value, str) else [str(v) for v in value]

# flag destination -> key in the YAML experiment's megatron_config
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

_FLOAT_SETTINGS = ("lr", "min_lr", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2",
                   "adam_eps")

_POSITIVE_SETTINGS = ("train_iters", "micro_batch_size", "global_batch_size", "save_interval",
                      "eval_interval", "eval_iters", "log_interval")


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
    # AdamW's (Megatron-LM's --adam-beta1/--adam-beta2/--adam-eps; torch's defaults)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # one indexed-dataset prefix; with --sft, JSONL files: one, or a blend "W1 F1 W2 F2 ..."
    data_path: Union[str, List[str], None] = None
    valid_data_path: Union[str, List[str], None] = None
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
    # Megatron-LM's names; with a Hugging Face --pretrained-checkpoint that holds tokenizer
    # files, its tokenizer is the default
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    progress_bar: bool = True
    # instruction data (docs/sft.md); Megatron-LM's --sft
    sft: bool = False
    sft_sequence_packing: bool = False
    sft_loss_on_all_tokens: bool = False
    sft_no_truncation: bool = False
    data_cache_path: Optional[str] = None

    @property
    def data_format(self) -> str:
        """The name of the data format in megatron_lora.data.FORMATS."""
        return "sft" if self.sft else "pretraining"

    def data_path_values(self) -> List[str]:
        return _as_list(self.data_path)

    def valid_data_path_values(self) -> List[str]:
        return _as_list(self.valid_data_path)

    @classmethod
    def from_section(cls, section: dict, source: str) -> "TrainingSettings":
        """The YAML ``training:`` section, each value checked against the field's type."""
        known = sorted({f.name for f in fields(cls)} - _FLAG_ONLY)
        hints = typing.get_type_hints(cls)
        values = {}
        try:
            for key, value in section.items():
                if key not in known:
                    raise unknown_key("training", str(key), known)
                values[key] = checked_value(f"training.{key}", value, hints[key])
        except ExperimentConfigError as error:
            raise TrainingError(f"{source}: {error}") from None
        return cls(**values)

    def check(self, mode: str) -> None:
        check_path_flags(self)
        for name in _POSITIVE_SETTINGS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise TrainingError(f"--{name.replace('_', '-')} {value!r} is invalid: expected "
                                    f"a positive integer")
        self._check_schedule()
        self._check_paths()
        if self.save is not None:
            check_save_directory(self)

    def _check_schedule(self) -> None:
        # a NaN passes every comparison below as False and trains to NaN factors: refuse any
        # non-finite float first (flags and the YAML alike)
        for name in _FLOAT_SETTINGS:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise TrainingError(f"--{name.replace('_', '-')} {value} is invalid: expected "
                                    f"a finite number")
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
        if self.weight_decay < 0:
            raise TrainingError(f"--weight-decay {self.weight_decay} is invalid: expected >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} {getattr(self, name)} is "
                                    f"invalid: expected 0 <= beta < 1")
        if not self.adam_eps > 0:
            raise TrainingError(f"--adam-eps {self.adam_eps} is invalid: expected > 0")
        # AdamW's first step is lr / (1 - beta1) in float32: past its range torch raises
        largest = torch.finfo(torch.float32).max * (1 - self.adam_beta1)
        if self.lr > largest:
            raise TrainingError(f"--lr {self.lr} is invalid: AdamW's step lr / (1 - "
                                f"--adam-beta1) overflows float32; expected at most {largest:.3g}")

    def _check_paths(self) -> None:
        if not self.data_path:
            raise TrainingError("--data-path is required: the prefix of a megatron indexed "
                                "dataset (PREFIX.bin / PREFIX.idx), e.g. made by "
                                "`python -m megatron_lora.data preprocess`, or with --sft "
                                "a JSONL file of conversations")
        if self.sft:
            self._check_instruction_files()
        else:
            self._check_indexed_datasets()
        if self.load:  # its latest marker names a complete save (the same message everywhere)
            latest_iteration_directory(self.load)
        if self.pretrained_checkpoint:
            _check_pretrained_path(self.pretrained_checkpoint)


    def _check_indexed_datasets(self) -> None:
        if self.sft_sequence_packing or self.sft_loss_on_all_tokens or self.sft_no_truncation:
            raise TrainingError("--sft-sequence-packing, --sft-loss-on-all-tokens and "
                                "--sft-no-truncation are for instruction data: add --sft")
        for name in ("data_path", "valid_data_path"):
            prefixes = _as_list(getattr(self, name))
            if len(prefixes) > 1:
                raise TrainingError(f"--{name.replace('_', '-')} takes one prefix here (got "
                                    f"{len(prefixes)}); blends of indexed datasets are not "
                                    f"supported yet (they are for --sft JSONL files)")
            for prefix in prefixes:
                missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not Path(p).is_file()]
                if missing:
                    raise TrainingError(f"--{name.replace('_', '-')} {prefix}: "
                                        f"{', '.join(missing)} does not exist")

    def _check_instruction_files(self) -> None:
        from ..data.instructions import Blend

        for name in ("data_path", "valid_data_path"):
            values = _as_list(getattr(self, name))
            if not values:
                continue
            flag = f"--{name.replace('_', '-')}"
            try:
                blend = Blend.parse(values, flag)
            except MegatronLoraError as error:
                raise TrainingError(str(error)) from None
            for path in blend.paths:
                if not Path(path).is_file():
                    hint = " (--sft reads JSONL files, not indexed-dataset prefixes)" \
                        if Path(f"{path}.idx").is_file() else ""
                    raise TrainingError(f"{flag} {path}: no such file{hint}")


def _check_pretrained_path(path) -> None:
    if not model_checkpoint_dir(path) and not is_hf_directory(path):
        raise TrainingError(f"--pretrained-checkpoint {path} holds no megatron dist-checkpoint "
                            f"(expected a metadata.json, or a model/ folder written by "
                            f"pretrain_gpt.py) and is no Hugging Face model directory (no "
                            f"config.json)")


# --- the layout gate ------------------------------------------------------------------------------

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


# --- flags --------------------------------------------------------------------------------------


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
    _add_model_flags(parser.add_argument_group("model and layout"))
    _add_loop_flags(parser.add_argument_group("training loop"))
    _add_sft_flags(parser.add_argument_group("instruction data (--sft, docs/sft.md)"))
    add_lora_args(parser)
    return parser


def _add_model_flags(model) -> None:
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


def _add_loop_flags(loop) -> None:
    for flag in ("--micro-batch-size", "--global-batch-size", "--train-iters", "--lr-warmup-iters",
                 "--save-interval", "--eval-interval", "--eval-iters", "--log-interval"):
        loop.add_argument(flag, type=int, default=None)
    for flag in ("--lr", "--min-lr", "--clip-grad", "--weight-decay", "--adam-beta1",
                 "--adam-beta2", "--adam-eps"):
        loop.add_argument(flag, type=float, default=None)
    loop.add_argument("--lr-decay-style", default=None, choices=LR_DECAY_STYLES)
    loop.add_argument("--data-path", nargs="+", default=None,
                      help="indexed dataset prefix (one); with --sft, a JSONL file or a blend "
                           "W1 FILE1 W2 FILE2 ...")
    loop.add_argument("--valid-data-path", nargs="+", default=None,
                      help="separate held-out data for evaluation (as --data-path)")
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
    loop.add_argument("--tokenizer-type", default=None,
                      help="HuggingFaceTokenizer (with --tokenizer-model DIR) or byte; default: "
                           "the Hugging Face --pretrained-checkpoint's own tokenizer, else byte")
    loop.add_argument("--tokenizer-model", default=None,
                      help="directory of a Hugging Face tokenizer (local files only)")
    loop.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", default=None)


def _add_sft_flags(sft) -> None:
    sft.add_argument("--sft", action="store_true", default=None,
                     help="--data-path / --valid-data-path are JSONL conversations "
                          "(messages, prompt/response or input/output rows); the loss is on "
                          "the assistant turns")
    sft.add_argument("--sft-sequence-packing", action="store_true", default=None,
                     help="pack several conversations into each --seq-length sequence, "
                          "attention and positions confined to each")
    sft.add_argument("--sft-loss-on-all-tokens", action="store_true", default=None,
                     help="count every token of a conversation, not only the answers")
    sft.add_argument("--sft-no-truncation", action="store_true", default=None,
                     help="refuse a conversation longer than --seq-length (naming its file and "
                          "line) instead of truncating it")
    sft.add_argument("--data-cache-path", default=None,
                     help="where tokenized --sft files are cached (default: sft-cache/ beside "
                          "each file)")


# --- flags + YAML -> what the run uses ------------------------------------------------------------


def parse_arguments(argv, mode: str):
    """(experiment, training settings, lora config or None, args), all validated; no side
    effects. Values: the code's defaults < the YAML --config < the flags."""
    args = build_parser(mode).parse_args(argv)
    experiment = _experiment_from(args)
    check_layout_is_proven(experiment)
    training = _training_settings_from(args, experiment)
    training.check(mode)
    if training.pretrained_checkpoint:
        check_base_fits(experiment, training)
    _choose_tokenizer(training, experiment)
    _check_packing(training, experiment)
    _check_token_data(training, experiment)
    lora = _lora_config_from(args, experiment, mode)
    if training.load:
        _check_resume(training, experiment, lora, args)
    return experiment, training, lora, args


def global_batch_size(training: TrainingSettings, dp_size: int) -> int:
    """--global-batch-size (default: one micro-batch per data-parallel rank), checked to be a
    whole number of micro-batches on every data-parallel rank."""
    per_step = training.micro_batch_size * dp_size
    global_batch = training.global_batch_size or per_step
    if global_batch % per_step:
        raise TrainingError(f"--global-batch-size {global_batch} is not a multiple of "
                            f"--micro-batch-size x data-parallel size = {per_step}")
    return global_batch


def _check_token_data(training: TrainingSettings, experiment) -> None:
    """Indexed datasets: the .idx describes the .bin and every token id fits the model's
    vocabulary, checked here once, before any worker starts or anything is written."""
    from ..data.pretraining import check_indexed_dataset

    if training.sft:
        return  # JSONL: tokenized with this run's tokenizer, checked against it (docs/sft.md)
    for name in ("data_path", "valid_data_path"):
        for prefix in _as_list(getattr(training, name)):
            try:
                check_indexed_dataset(prefix, experiment.vocab_size,
                                      f"--{name.replace('_', '-')}")
            except MegatronLoraError as error:
                raise TrainingError(str(error)) from None


def _check_resume(training: TrainingSettings, experiment, lora, args) -> None:
    """--load: this run's settings against those the run saved (state.check_resume_matches)."""
    from .rundir import check_resume_layout
    from .state import check_resume_matches, run_record

    world = args.nproc_per_node or int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        return  # the launcher names the bad --nproc-per-node
    try:
        data_parallel = experiment.check_world_size(world)
    except MegatronLoraError as error:
        raise TrainingError(str(error)) from None
    # the layout first: at another layout the batch sizes differ too, and this says why
    check_resume_layout(training.load, experiment, world)
    global_batch = global_batch_size(training, data_parallel)
    check_resume_matches(training.load, run_record(training, experiment, lora, global_batch))


def _check_packing(training: TrainingSettings, experiment) -> None:
    """Packing restarts positions by re-indexing plain RoPE or learned absolute embeddings;
    other position schemes would see the packed sequence as one conversation."""
    settings = experiment.megatron_config
    kind = settings.get("position_embedding_type", "learned_absolute")
    if training.sft_sequence_packing and (kind not in ("rope", "learned_absolute")
                                          or settings.get("multi_latent_attention")):
        raise TrainingError(f"--sft-sequence-packing restarts positions for rope and "
                            f"learned_absolute position embeddings only; this model has "
                            f"{'multi-latent attention' if settings.get('multi_latent_attention') else kind}"
                            f" (train unpacked)")


def prepare_instruction_data(training: TrainingSettings, experiment) -> None:
    """Tokenize (into the cache) and check every --sft file: a bad row, or with
    --sft-no-truncation a conversation too long, is a one-line error naming file and line."""
    from ..data.instructions import build_instruction_datasets
    from ..tokenizers import build_tokenizer

    try:
        build_instruction_datasets(
            training, seq_length=experiment.seq_length, seed=experiment.seed,
            num_samples=(0, 0), log=lambda message: None,
            tokenizer=build_tokenizer(training.tokenizer_type, training.tokenizer_model))
    except MegatronLoraError as error:
        raise TrainingError(str(error)) from None


def _choose_tokenizer(training: TrainingSettings, experiment) -> None:
    """Settle the tokenizer (a Hugging Face base's own by default) and check its vocabulary
    fits the model's, here, before any worker starts."""
    from ..tokenizers import HF_TOKENIZER, build_tokenizer, holds_tokenizer

    if training.tokenizer_type is None and training.tokenizer_model is None \
            and experiment.hf_path and holds_tokenizer(experiment.hf_path):
        training.tokenizer_type, training.tokenizer_model = HF_TOKENIZER, experiment.hf_path
    if training.tokenizer_type is None:
        training.tokenizer_type = HF_TOKENIZER if training.tokenizer_model else training.tokenizer
    try:
        tokenizer = build_tokenizer(training.tokenizer_type, training.tokenizer_model)
    except MegatronLoraError as error:
        raise TrainingError(str(error)) from None
    if tokenizer.vocab_size > experiment.vocab_size:
        raise TrainingError(f"the tokenizer ({tokenizer!r}) has {tokenizer.vocab_size} tokens, "
                            f"more than the model's vocab_size {experiment.vocab_size}")


def model_flag_overrides(args) -> dict:
    """The model and layout flags given, as experiment overrides (every script's)."""
    overrides = {f"megatron_config.{key}": getattr(args, dest)
                 for dest, key in _MODEL_FLAGS.items() if getattr(args, dest) is not None}
    if args.sequence_parallel:
        overrides["megatron_config.sequence_parallel"] = True
    if args.bf16:
        overrides["megatron_config.params_dtype"] = "bfloat16"
    return overrides


def _experiment_from(args):
    overrides = model_flag_overrides(args)
    if is_hf_directory(args.pretrained_checkpoint):
        return _hf_experiment_from(args, overrides)
    if args.pretrained_checkpoint and not args.config:
        # no model but the checkpoint's: say what the checkpoint lacks, not which keys
        _check_pretrained_path(args.pretrained_checkpoint)
    try:
        if args.config:
            return load_experiment(args.config, overrides=overrides)
        return load_experiment(data={"megatron_config": {}}, overrides=overrides)
    except ExperimentConfigError as error:
        raise TrainingError(str(error)) from None


def _hf_experiment_from(args, flag_overrides: dict):
    """The model of a Hugging Face --pretrained-checkpoint: config.json gives its shape; the
    YAML --config and the flags set the rest, and may repeat the shape but not contradict it."""
    from ..hf import hf_experiment

    try:
        data = read_experiment_data(args.config) if args.config else {}
        overrides = {**flatten_overrides(data), **flag_overrides}
        experiment = hf_experiment(args.pretrained_checkpoint, overrides=overrides)
    except MegatronLoraError as error:
        raise TrainingError(f"--pretrained-checkpoint: {error}") from None
    if args.config:
        experiment.source = args.config
    return experiment


def _training_settings_from(args, experiment) -> TrainingSettings:
    source = args.config or "the command line"
    training = TrainingSettings.from_section(dict(experiment.training or {}), source)
    for f in fields(TrainingSettings):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name in ("data_path", "valid_data_path") and len(value) == 1:
            value = value[0]
        setattr(training, f.name, value)
    return training


def _lora_config_from(args, experiment, mode: str):
    # the YAML's lora: section is the starting point only when the file has one
    yaml_lora = experiment.lora if "lora" in experiment.sections else None
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
        lora = replace(lora, lora_dtype="float32")
    if mode == "finetune" and lora is None:
        raise TrainingError("finetune_gpt.py trains LoRA adapters: give --lora-rank > 0 (or a "
                            "lora: section in --config); full training is pretrain_gpt.py")
    return lora


def _saved_adapter_config(path, yaml_lora):
    """--lora-load: the saved adapter defines the one this run continues (its rank, scaling and
    modules); a YAML lora: section that says otherwise is an error, not silently ignored."""
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
