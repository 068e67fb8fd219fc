"""``megatron-lora``: look into adapters and convert them, without a model or a GPU.

    megatron-lora inspect ADAPTER_DIR
    megatron-lora export-peft ADAPTER_DIR OUT_DIR [--overwrite] [--architecture NAME]
                              [--base HF_DIR]
    megatron-lora export-hf SOURCE OUT_DIR [--base HF_DIR] [--tokenizer-model DIR] [--overwrite]
    megatron-lora import-peft PEFT_DIR OUT_DIR (--config EXPERIMENT.yaml | --like ADAPTER_DIR)
                              [--overwrite]

Every error is one line on stderr naming the problem, with exit code 2; nothing is written
unless the whole conversion succeeded (the output directory is swapped in atomically). An
OUT_DIR that is, holds or lies inside an input (the source, --like, --base, --config) is
refused always; one that is an existing file or a non-empty directory unless --overwrite is
given; with it, an adapter directory there is replaced atomically (a directory holding other
files is still refused). Adapters are checked before anything is done: adapter_config.json
must agree with the tensors (rank, modules, base-model sizes). When stdout is closed early
(``megatron-lora inspect X | head -3``) the command stops without a message and exits with
141 (128 + SIGPIPE), the status a shell reports for a program ended by a closed pipe.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, Optional

from .errors import MegatronLoraError

EXIT_BAD_INPUT = 2
EXIT_CLOSED_PIPE = 128 + 13  # SIGPIPE


def _import_quietly() -> None:
    """Import megatron-core (through this package's modules) with its import-time notices
    silenced: the 'Transformer Engine and Apex are not installed' UserWarnings and torch's
    'No CUDA runtime is found' log line say nothing about a conversion on the CPU."""
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension.level
    cpp_extension.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not "
                                                      "installed", category=UserWarning)
            from . import adapter_file, experiment, hf_export, interop  # noqa: F401
    finally:
        cpp_extension.setLevel(level)


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _print_keys(shapes, dtypes, out) -> int:
    total = 0
    for key in sorted(shapes):
        numel = 1
        for size in shapes[key]:
            numel *= size
        total += numel
        print(f"  {key:<70} {str(list(shapes[key])):<14} {dtypes[key]}", file=out)
    return total


def inspect(path: Path, out=None) -> None:
    from .adapter_file import FORMAT, WEIGHTS_NAME, read_adapter, read_adapter_json

    out = out or sys.stdout
    raw, _, _ = read_adapter_json(path, "an adapter directory")
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    if raw.get("format") == FORMAT or not raw.get("peft_type"):
        adapter = read_adapter(path)  # validates the checksum, the header and the JSON
        lora = adapter.lora_config
        print(f"{path}: megatron_lora adapter, format version {adapter.config['format_version']}, "
              f"adapter {adapter.config.get('adapter_name')!r}", file=out)
        print(f"  LoRA: r={lora.r} lora_alpha={lora.lora_alpha} (scaling {lora.scaling:g}) "
              f"dropout={lora.lora_dropout} rslora={lora.use_rslora} "
              f"targets={lora.target_modules}", file=out)
        print(f"  trained with: {adapter.config.get('trained_layout')}", file=out)
        print(f"  base model: {adapter.config.get('base_model')}", file=out)
        print(f"  {len(adapter.config.get('modules', []))} modules, {len(adapter.shapes)} tensors:",
              file=out)
        total = _print_keys(adapter.shapes, adapter.dtypes, out)
    else:
        from safetensors import safe_open

        from .interop import read_peft

        config, _ = read_peft(path)  # validates r, target_modules and the factor pairs
        print(f"{path}: Hugging Face PEFT {config['peft_type']} adapter, r={config.get('r')} "
              f"lora_alpha={config.get('lora_alpha')} targets={config.get('target_modules')}",
              file=out)
        with safe_open(path / WEIGHTS_NAME, framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            dtypes = {k: handle.get_slice(k).get_dtype() for k in handle.keys()}
        print(f"  {len(shapes)} tensors:", file=out)
        total = _print_keys(shapes, dtypes, out)
    print(f"  {total:,} parameters, {_human_bytes(size)} on disk", file=out)


def check_output(out_dir: Path, inputs: Dict[str, Optional[Path]], overwrite: bool) -> None:
    """An adapter output directory: hf_export.check_output's rules (no input, no link, no file,
    not a non-empty directory without --overwrite), as adapter errors."""
    from .adapter_file import AdapterCheckpointError
    from .hf_export import check_output as check_any_output

    check_any_output(out_dir, inputs, overwrite, AdapterCheckpointError, "it")


def export_peft_files(adapter_dir: Path, out_dir: Path, architecture=None,
                      base_dir: Optional[Path] = None) -> Path:
    """The adapter as PEFT files; ``base_model_name_or_path`` is ``base_dir`` (checked against
    the adapter's base description; its model_type gives the default module names) or the
    Hugging Face directory the run started from."""
    from safetensors.torch import load_file

    from .adapter_file import WEIGHTS_NAME, read_adapter, write_directory_atomically
    from .hf_export import architecture_of, check_base_fits, read_base
    from .interop import peft_adapter_files, shape_from_description

    adapter = read_adapter(adapter_dir)
    base = adapter.config["base_model"]
    base_path = base.get("name_or_path")
    if base_dir is not None:
        config, _, _ = read_base(base_dir)
        family = architecture_of(config, base_dir)
        check_base_fits(config, family, base, adapter_dir, base_dir)
        architecture = architecture or family
        base_path = str(base_dir.resolve())
    files = peft_adapter_files(
        load_file(adapter_dir / WEIGHTS_NAME), adapter.lora_config, shape_from_description(base),
        provenance={"adapter_name": adapter.config.get("adapter_name"),
                    "trained_layout": adapter.config.get("trained_layout")},
        architecture=architecture, base_model_name_or_path=base_path)
    return write_directory_atomically(out_dir, files)


def _shape_source(args):
    if args.like:
        from .adapter_file import read_adapter

        return read_adapter(Path(args.like)).config.get("base_model", {})
    from .experiment import load_experiment

    experiment = load_experiment(args.config)
    from .adapter_file import describe_transformer_config

    with warnings.catch_warnings():  # megatron's notices on its own defaults say nothing here
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
        transformer = experiment.transformer_config()
    return describe_transformer_config(transformer, experiment.megatron_config["vocab_size"])


def import_peft_files(peft_dir: Path, out_dir: Path, base_model: dict, adapter_name: str,
                      described_by: str = "the base-model description") -> Path:
    from .adapter_file import write_directory_atomically
    from .interop import (check_peft_against_model, megatron_adapter_files, peft_modules,
                          read_peft, shape_from_description)

    config, tensors = read_peft(peft_dir)
    shape = shape_from_description(base_model)
    check_peft_against_model(config, peft_modules(tensors, peft_dir), shape, peft_dir,
                             described_by)
    files = megatron_adapter_files(config, tensors, shape, adapter_name, base_model=base_model)
    return write_directory_atomically(out_dir, files)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-lora", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("inspect", help="print an adapter's config, keys, shapes and size")
    show.add_argument("adapter_dir", type=Path)
    export = commands.add_parser("export-peft", help="consolidated adapter -> Hugging Face PEFT")
    export.add_argument("adapter_dir", type=Path)
    export.add_argument("out_dir", type=Path, help="a new or empty directory")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing adapter directory at OUT_DIR (atomically)")
    export.add_argument("--architecture", choices=["llama", "mixtral", "qwen2_moe", "qwen3_moe"],
                        help="the Hugging Face module names to write (default: the --base's "
                             "model_type, else llama for a dense model, mixtral / qwen2_moe for "
                             "experts without / with a shared expert)")
    export.add_argument("--base", type=Path,
                        help="the Hugging Face base directory to name in base_model_name_or_path "
                             "(default: the one the run started from)")
    merged = commands.add_parser("export-hf", help="adapter merged into its base, or a trained "
                                                   "model -> Hugging Face checkpoint")
    merged.add_argument("source", type=Path, help="an adapter directory, or a full-training save "
                                                  "of pretrain_gpt.py")
    merged.add_argument("out_dir", type=Path, help="a new or empty directory")
    merged.add_argument("--base", type=Path,
                        help="the adapter's Hugging Face base (default: the one the run started "
                             "from)")
    merged.add_argument("--tokenizer-model", type=Path,
                        help="a trained model: the directory whose tokenizer files to copy")
    merged.add_argument("--overwrite", action="store_true",
                        help="replace a previous export-hf output at OUT_DIR (atomically)")
    imp = commands.add_parser("import-peft", help="Hugging Face PEFT adapter -> consolidated")
    imp.add_argument("peft_dir", type=Path)
    imp.add_argument("out_dir", type=Path, help="a new or empty directory")
    imp.add_argument("--overwrite", action="store_true",
                     help="replace an existing adapter directory at OUT_DIR (atomically)")
    shape = imp.add_mutually_exclusive_group(required=True)
    shape.add_argument("--config", help="experiment YAML of the megatron model (gives the heads)")
    shape.add_argument("--like", help="an adapter of the same base model (its base description)")
    imp.add_argument("--adapter-name", default="default")
    return parser


def _run(args) -> None:
    if args.command == "inspect":
        inspect(args.adapter_dir)
    elif args.command == "export-peft":
        check_output(args.out_dir, {"input directory": args.adapter_dir, "--base directory":
                                    args.base}, args.overwrite)
        print(f"wrote {export_peft_files(args.adapter_dir, args.out_dir, args.architecture, args.base)}")
    elif args.command == "export-hf":
        from .hf_export import export_hf

        print(f"wrote {export_hf(args.source, args.out_dir, args.base, args.tokenizer_model, args.overwrite)}")
    else:
        check_output(args.out_dir, {"input directory": args.peft_dir, "--like adapter":
                                    args.like and Path(args.like), "--config file":
                                    args.config and Path(args.config)}, args.overwrite)
        written = import_peft_files(args.peft_dir, args.out_dir, _shape_source(args),
                                    args.adapter_name, args.config or args.like)
        print(f"wrote {written}")


def _stdout_to_devnull() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush does
    not report the same broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _import_quietly()
    try:
        _run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_CLOSED_PIPE
    except (OSError, MegatronLoraError) as error:  # anything else is a bug: its traceback
        if isinstance(error, OSError) and not error.filename:
            raise  # not about a file the user named: a bug or the system, with its traceback
        message = str(error) if not isinstance(error, OSError) else \
            f"{error.filename}: {error.strerror or error}"
        print(f"megatron-lora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
