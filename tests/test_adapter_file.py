"""The adapter file format is read and checked offline: megatron_lora.adapter_file imports no
megatron-core and none of the package's distributed modules, and checks a file without a
process group."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_format_module_imports_nothing_distributed():
    probe = ("import sys, megatron_lora.adapter_file; "
             "print(sorted(m for m in sys.modules if m.startswith(('megatron.', 'megatron_lora.'))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert result.returncode == 0, result.stderr
    loaded = eval(result.stdout)  # a list of module names printed by the probe above
    assert not [m for m in loaded if m.startswith("megatron.")], loaded
    for distributed in ("agreement", "topology", "model", "parallel", "checkpoint", "gather",
                        "dist_checkpoint"):
        assert f"megatron_lora.{distributed}" not in loaded, loaded


def _write(directory, tensors, **lora):
    from megatron_lora.adapter_file import adapter_directory_files, write_directory_atomically

    lora_config = {"r": 2, "lora_alpha": 4, "target_modules": ["linear_qkv"], **lora}
    base = {"hidden_size": 8, "num_attention_heads": 2, "num_query_groups": 2,
            "num_layers": 1}
    files = adapter_directory_files(tensors, lora_config, "default", {}, base)
    return write_directory_atomically(directory, files)


def test_an_adapter_is_written_and_checked_without_a_process_group(tmp_path):
    from megatron_lora.adapter_file import read_adapter

    assert not torch.distributed.is_initialized()
    key = "decoder.layers.0.self_attention.linear_qkv"
    tensors = {f"{key}.lora_A.weight": torch.zeros(2, 8), f"{key}.lora_B.weight": torch.zeros(24, 2)}
    adapter = read_adapter(_write(tmp_path / "adapter", tensors))
    assert adapter.config["modules"] == [key]
    assert adapter.shapes == {f"{key}.lora_A.weight": (2, 8), f"{key}.lora_B.weight": (24, 2)}


def test_a_file_that_disagrees_with_its_config_is_refused_offline(tmp_path):
    from megatron_lora.adapter_file import AdapterCheckpointError, read_adapter

    key = "decoder.layers.0.self_attention.linear_qkv"
    tensors = {f"{key}.lora_A.weight": torch.zeros(2, 8), f"{key}.lora_B.weight": torch.zeros(20, 2)}
    with pytest.raises(AdapterCheckpointError, match="give 24 qkv rows"):
        read_adapter(_write(tmp_path / "adapter", tensors))
