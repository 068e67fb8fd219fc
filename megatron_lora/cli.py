"""``megatron-lora``: look into adapters and convert them, without a model or a GPU.

    megatron-lora inspect ADAPTER_DIR
    megatron-lora export-peft ADAPTER_DIR OUT_DIR
    megatron-lora import-peft PEFT_DIR OUT_DIR (--config EXPERIMENT.yaml | --like ADAPTER_DIR)

Every error is one line on stderr naming the problem, with exit code 2; nothing is written
unless the whole conversion succeeded (the output directory is swapped in atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    from .checkpoint import CONFIG_NAME, FORMAT, WEIGHTS_NAME, read_adapter

    out = out or sys.stdout
    config_file = path / CONFIG_NAME
    raw = json.loads(config_file.read_text()) if config_file.is_file() else {}
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0
    if raw.get("format") == FORMAT or not raw.get("peft_type"):
        adapter = read_adapter(path)  # validates the checksum and header
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

        config, _ = read_peft(path)
        print(f"{path}: Hugging Face PEFT {config['peft_type']} adapter, r={config.get('r')} "
              f"lora_alpha={config.get('lora_alpha')} targets={config.get('target_modules')}",
              file=out)
        with safe_open(path / WEIGHTS_NAME, framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            dtypes = {k: handle.get_slice(k).get_dtype() for k in handle.keys()}
        print(f"  {len(shapes)} tensors:", file=out)
        total = _print_keys(shapes, dtypes, out)
    print(f"  {total:,} parameters, {_human_bytes(size)} on disk", file=out)


def export_peft_files(adapter_dir: Path, out_dir: Path) -> Path:
    from safetensors.torch import load_file

    from .checkpoint import WEIGHTS_NAME, read_adapter, write_directory_atomically
    from .interop import peft_adapter_files, shape_from_description

    adapter = read_adapter(adapter_dir)
    base = adapter.config.get("base_model", {})
    files = peft_adapter_files(
        load_file(adapter_dir / WEIGHTS_NAME), adapter.lora_config, shape_from_description(base),
        int(base.get("num_layers", 0)),
        provenance={"adapter_name": adapter.config.get("adapter_name"),
                    "trained_layout": adapter.config.get("trained_layout")})
    return write_directory_atomically(out_dir, files)


def _shape_source(args):
    if args.like:
        from .checkpoint import read_adapter

        return read_adapter(Path(args.like)).config.get("base_model", {})
    from .config import load_experiment

    experiment = load_experiment(args.config)
    settings = experiment.megatron_config
    transformer = experiment.transformer_config()
    return {"num_layers": settings["num_layers"], "hidden_size": settings["hidden_size"],
            "num_attention_heads": settings["num_attention_heads"],
            "num_query_groups": transformer.num_query_groups, "kv_channels": transformer.kv_channels,
            "ffn_hidden_size": transformer.ffn_hidden_size,
            "gated_linear_unit": transformer.gated_linear_unit, "vocab_size": settings["vocab_size"]}


def import_peft_files(peft_dir: Path, out_dir: Path, base_model: dict, adapter_name: str) -> Path:
    from .checkpoint import write_directory_atomically
    from .interop import megatron_adapter_files, read_peft, shape_from_description

    config, tensors = read_peft(peft_dir)
    files = megatron_adapter_files(config, tensors, shape_from_description(base_model),
                                   adapter_name, base_model=base_model)
    return write_directory_atomically(out_dir, files)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-lora", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("inspect", help="print an adapter's config, keys, shapes and size")
    show.add_argument("adapter_dir", type=Path)
    export = commands.add_parser("export-peft", help="consolidated adapter -> Hugging Face PEFT")
    export.add_argument("adapter_dir", type=Path)
    export.add_argument("out_dir", type=Path)
    imp = commands.add_parser("import-peft", help="Hugging Face PEFT adapter -> consolidated")
    imp.add_argument("peft_dir", type=Path)
    imp.add_argument("out_dir", type=Path)
    shape = imp.add_mutually_exclusive_group(required=True)
    shape.add_argument("--config", help="experiment YAML of the megatron model (gives the heads)")
    shape.add_argument("--like", help="an adapter of the same base model (its base description)")
    imp.add_argument("--adapter-name", default="default")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            inspect(args.adapter_dir)
        elif args.command == "export-peft":
            print(f"wrote {export_peft_files(args.adapter_dir, args.out_dir)}")
        else:
            written = import_peft_files(args.peft_dir, args.out_dir, _shape_source(args),
                                        args.adapter_name)
            print(f"wrote {written}")
    except (ValueError, OSError) as error:  # our errors are ValueErrors with the details
        print(f"megatron-lora {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
