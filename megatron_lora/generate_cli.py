"""scripts/generate.py: completions of prompts from a megatron dist-checkpoint or a Hugging Face
directory, with an optional megatron_lora adapter, at any TP size (pipeline size 1).

Inputs are checked in one process before any process group exists (a bad one is one line on
stderr and exit code 2); ``--nproc-per-node N`` then starts N workers through torchrun as the
training scripts do. Every rank generates (the same tokens: see megatron_lora.generation);
rank 0 prints and writes ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from .errors import MegatronLoraError

SCRIPT = "generate.py"
HF_TOKENIZER = "HuggingFaceTokenizer"


class GenerateError(MegatronLoraError):
    """Bad flags or files for scripts/generate.py."""


def build_parser() -> argparse.ArgumentParser:
    from .training.settings import _add_model_flags

    parser = argparse.ArgumentParser(
        prog=SCRIPT, description="Completions from a megatron-core GPT (a dist-checkpoint or a "
                                 "Hugging Face directory), optionally with a LoRA adapter.")
    parser.add_argument("--config", help="YAML experiment (megatron_config); flags override it")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="start this many workers on this machine (torchrun --standalone)")
    _add_model_flags(parser.add_argument_group("model and layout"))
    run = parser.add_argument_group("generation")
    run.add_argument("--pretrained-checkpoint", default=None,
                     help="a megatron dist-checkpoint, or a Hugging Face model directory")
    run.add_argument("--lora-load", default=None, help="a megatron_lora adapter directory")
    run.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    run.add_argument("--prompts-file", default=None,
                     help='JSONL: one {"prompt": TEXT} or {"messages": [...]} per line')
    run.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                     help="tokenize prompts as they are")
    run.add_argument("--tokenizer-type", default=None, choices=(HF_TOKENIZER, "byte"))
    run.add_argument("--tokenizer-model", default=None, help="a Hugging Face tokenizer directory")
    run.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--output", default=None, help="also write the completions here (JSONL)")
    return parser


@dataclass
class Prompt:
    text: Optional[str] = None
    messages: Optional[list] = None

    def shown(self) -> str:
        return self.text if self.text is not None else json.dumps(self.messages)


@dataclass
class Request:
    experiment: object
    checkpoint: Path
    hf: bool
    args: argparse.Namespace
    prompts: List[Prompt] = field(default_factory=list)
    world_size: int = 1


from .hf import is_hf_directory  # noqa: E402  (one rule for what a Hugging Face directory is)
from .tokenizers import holds_tokenizer  # noqa: E402
from .untrusted import loads_json

def _read_prompts(args) -> List[Prompt]:
    prompts = [Prompt(text=text) for text in args.prompt]
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise GenerateError(f"--prompts-file {args.prompts_file}: cannot read it "
                                f"({error})") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"--prompts-file {args.prompts_file} line {number}"
            try:
                row = loads_json(line, where, GenerateError)
            except ValueError:
                raise GenerateError(f"{where} is not JSON") from None
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append(Prompt(text=row["prompt"]))
            elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
                prompts.append(Prompt(messages=row["messages"]))
            else:
                raise GenerateError(f'{where}: expected {{"prompt": TEXT}} or {{"messages": '
                                    f'[...]}}, got {line.strip()[:80]}')
    if not prompts:
        raise GenerateError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    if not args.chat_template and any(p.messages is not None for p in prompts):
        raise GenerateError("--no-chat-template cannot take {\"messages\": ...} rows: only a "
                            "chat template turns messages into text")
    return prompts


def _experiment(args, checkpoint: Path, hf: bool, world: int):
    from .experiment import ExperimentConfigError, load_experiment
    from .training.settings import model_flag_overrides

    overrides = model_flag_overrides(args)
    try:
        if hf:
            from .hf import hf_experiment

            if args.config:
                raise GenerateError("--config with a Hugging Face --pretrained-checkpoint: its "
                                    "config.json defines the model; give layout flags instead")
            return hf_experiment(checkpoint, overrides=overrides, world_size=world)
        if args.config:
            return load_experiment(args.config, overrides=overrides)
        # without --config: the model the checkpoint describes (pretrain_gpt.py writes it)
        from .training.base import model_checkpoint_dir, read_model_description
        from .training.errors import TrainingError
        from .training.rundir import MODEL_DESCRIPTION

        description = model_checkpoint_dir(checkpoint) / MODEL_DESCRIPTION
        if not description.is_file():
            raise GenerateError(f"--pretrained-checkpoint {checkpoint} has no "
                                f"{MODEL_DESCRIPTION}: give the model with --config")
        try:
            saved = {k: v for k, v in read_model_description(description).items() if v is not None}
        except TrainingError as error:
            raise GenerateError(str(error)) from None
        return load_experiment(data={"megatron_config": saved}, overrides=overrides)
    except ExperimentConfigError as error:
        raise GenerateError(str(error)) from None


def check_inputs(argv: Sequence[str]) -> Request:
    """Everything checked before a process group exists; no side effects."""
    from .training.launch import world_size_to_run

    args = build_parser().parse_args(list(argv))
    if not args.pretrained_checkpoint:
        raise GenerateError("--pretrained-checkpoint is required: a megatron dist-checkpoint or "
                            "a Hugging Face model directory")
    checkpoint = Path(args.pretrained_checkpoint)
    hf = is_hf_directory(checkpoint)
    if not hf:
        from .training.base import model_checkpoint_dir

        if model_checkpoint_dir(checkpoint) is None:
            raise GenerateError(f"--pretrained-checkpoint {checkpoint} is neither a megatron "
                                f"dist-checkpoint (metadata.json, or model/metadata.json) nor a "
                                f"Hugging Face directory (config.json)")
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {args.max_new_tokens} is invalid: expected >= 1")
    if not args.temperature >= 0:
        raise GenerateError(f"--temperature {args.temperature} is invalid: expected >= 0 "
                            f"(0 is greedy)")
    if not 0 < args.top_p <= 1:
        raise GenerateError(f"--top-p {args.top_p} is invalid: expected 0 < top-p <= 1")
    world = world_size_to_run(args.nproc_per_node)
    experiment = _experiment(args, checkpoint, hf, world)
    pp = experiment.megatron_config["pipeline_model_parallel_size"]
    if pp != 1:
        raise GenerateError(f"--pipeline-model-parallel-size {pp} is invalid for generation: "
                            f"expected 1 (use tensor parallelism)")
    try:
        experiment.check_world_size(world)
    except MegatronLoraError as error:
        raise GenerateError(str(error)) from None
    if args.tokenizer_type == HF_TOKENIZER and not args.tokenizer_model:
        raise GenerateError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
    if args.tokenizer_model and not Path(args.tokenizer_model).is_dir():
        raise GenerateError(f"--tokenizer-model {args.tokenizer_model} is not a directory")
    if args.lora_load:
        from .adapter_file import read_adapter

        read_adapter(args.lora_load)  # a bad adapter directory is named here, before any work
    return Request(experiment, checkpoint, hf, args, _read_prompts(args), world)


# --- tokenizers ----------------------------------------------------------------------------------

class TextCodec:
    """Prompts to token ids and back, with the ids that end a completion."""

    def __init__(self, request: Request):
        args = request.args
        directory = args.tokenizer_model
        if directory is None and args.tokenizer_type != "byte" and request.hf and \
                holds_tokenizer(request.checkpoint):
            directory = str(request.checkpoint)
        self.chat = args.chat_template
        if directory is None:
            from .tokenizers import get_tokenizer

            self.hf, self.tokenizer = False, get_tokenizer("byte")
            self.stop = [self.tokenizer.eod]
            return
        from .tokenizers import HuggingFaceTokenizer  # local files only, no code from the files

        self.hf = True
        self.tokenizer = HuggingFaceTokenizer(directory).hf
        if self.chat and not getattr(self.tokenizer, "chat_template", None):
            raise GenerateError(f"the tokenizer in {directory} has no chat template; pass "
                                f"--no-chat-template to tokenize the prompts as they are")
        self.stop = sorted(set(_eos_ids(self.tokenizer.eos_token_id)
                               + _generation_config_eos(directory, request)))

    def encode(self, prompt: Prompt) -> List[int]:
        if not self.hf:
            if prompt.messages is not None:
                raise GenerateError("the byte tokenizer has no chat template: give prompts as "
                                    "text, not messages")
            return self.tokenizer.tokenize(prompt.text)
        if self.chat:
            messages = prompt.messages or [{"role": "user", "content": prompt.text}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
            # the template writes the special tokens itself
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt.text)["input_ids"]

    def decode(self, tokens: List[int]) -> str:
        if not self.hf:
            return self.tokenizer.detokenize(tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def _eos_ids(value) -> List[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _generation_config_eos(directory: str, request: Request) -> List[int]:
    """generation_config.json's eos_token_id(s): chat models list their end-of-turn there."""
    ids = []
    for folder in {Path(directory), request.checkpoint}:
        path = folder / "generation_config.json"
        if path.is_file():
            try:
                ids += _eos_ids(loads_json(path.read_text(), path, GenerateError)
                                .get("eos_token_id"))
            except (ValueError, TypeError, AttributeError):
                raise GenerateError(f"{path} is damaged: expected a JSON object whose "
                                    f"eos_token_id is an integer or a list of them") from None
    return ids


# --- the run ---------------------------------------------------------------------------------


def _build_model(request: Request):
    from . import apply_lora
    from .checkpoint import load_adapter
    from .gpt import build_gpt_model, initialize_model_parallel

    experiment = request.experiment
    initialize_model_parallel(experiment)
    # the checkpoint overwrites every base weight: nothing is drawn first
    model = build_gpt_model(experiment, initialize=False)
    if request.hf:
        from .hf import load_hf_weights

        load_hf_weights(model, request.checkpoint, experiment)
    else:
        from .training.base import load_base_weights

        load_base_weights(model, request.checkpoint)
    if request.args.lora_load:
        from .training.settings import _saved_adapter_config

        apply_lora(model, _saved_adapter_config(request.args.lora_load, None), verbose=False)
        load_adapter(model, request.args.lora_load)
    return model


def run(request: Request) -> None:
    import torch.distributed as dist

    from .generation import generate

    codec = TextCodec(request)
    prompts = [codec.encode(prompt) for prompt in request.prompts]
    model = _build_model(request)
    args = request.args
    completions = generate(model, prompts, args.max_new_tokens, stop_tokens=codec.stop,
                           temperature=args.temperature, top_p=args.top_p,
                           seed=request.experiment.seed)
    if dist.get_rank() != 0:
        return
    rows = [{"prompt": prompt.shown(), "completion": codec.decode(tokens), "tokens": tokens}
            for prompt, tokens in zip(request.prompts, completions)]
    for row in rows:
        print(f"### prompt: {row['prompt']}\n{row['completion']}", flush=True)
    if args.output:
        from .atomic import write_file_atomically

        write_file_atomically(Path(args.output),
                              "".join(json.dumps(row) + "\n" for row in rows))


def main(argv=None) -> int:
    """scripts/generate.py: exit code 0, or 2 with a one-line error (training.launch.run_script)."""
    from .training.launch import run_script

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_script(SCRIPT, argv, check_inputs, run)
