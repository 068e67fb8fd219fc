"""The megatron-lora command line on the adapters saved at TP=2 + SP (tests/checkpoint_checks.py)."""

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from megatron_lora.cli import main


def tensors(directory):
    return load_file(directory / "adapter_model.safetensors")


def same(first, second):
    a, b = tensors(first), tensors(second)
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_inspect_prints_config_keys_and_size(saved_adapters, saved, capsys):
    directory = saved_adapters[0]
    assert main(["inspect", str(directory / "random")]) == 0
    out = capsys.readouterr().out
    assert "megatron_lora adapter, format version 1" in out and "r=4 lora_alpha=8.0" in out
    assert "'tensor_model_parallel_size': 2" in out and "34 tensors" in out
    assert "decoder.layers.0.mlp.linear_fc1.lora_B.weight" in out and "[192, 4]" in out
    assert "parameters" in out and "KiB on disk" in out
    assert main(["inspect", str(directory / "peft")]) == 0
    assert "Hugging Face PEFT LORA adapter, r=4" in capsys.readouterr().out


def test_export_and_import_peft_offline_match_the_model_paths(saved_adapters, saved, tmp_path):
    directory = saved_adapters[0]
    assert main(["export-peft", str(directory / "random"), str(tmp_path / "peft")]) == 0
    assert same(tmp_path / "peft", directory / "peft")  # what export_peft(model) wrote
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "back"),
                 "--like", str(directory / "random")]) == 0
    assert same(tmp_path / "back", directory / "random")  # the round trip is bit-exact


def test_import_with_an_experiment_config(saved_adapters, saved, tmp_path):
    import yaml

    from gpt_checks import TARGETS, TINY_GPT

    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({"megatron_config": dict(TINY_GPT),
                                      "lora": {"target_modules": TARGETS}}))
    assert main(["import-peft", str(saved_adapters[0] / "peft"), str(tmp_path / "back"),
                 "--config", str(config)]) == 0
    assert same(tmp_path / "back", saved_adapters[0] / "random")


@pytest.mark.parametrize("case", ["truncated", "not_adapter", "format_version"])
def test_errors_are_one_line_with_exit_code_2(saved_adapters, saved, tmp_path, capsys, case):
    broken = saved_adapters[0] / "broken" / case
    assert main(["export-peft", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-lora export-peft: error: ") and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_console_command_runs_without_warnings(saved_adapters, saved):
    result = subprocess.run([sys.executable, "-m", "megatron_lora", "inspect",
                             str(saved_adapters[0] / "random")], capture_output=True, text=True,
                            timeout=300)  # imports are slow on a loaded machine
    assert result.returncode == 0, result.stderr
    assert "megatron_lora adapter" in result.stdout
    assert result.stderr == ""  # no megatron / torch import-time notices


def test_a_closed_pipe_ends_quietly_with_141(saved_adapters, saved):
    """``megatron-lora inspect X | head -3``: stdout closed before the output is written."""
    process = subprocess.Popen([sys.executable, "-m", "megatron_lora", "inspect",
                                str(saved_adapters[0] / "random")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone long before the imports finish
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, err
    assert err == ""


def test_overwrite_replaces_an_existing_output(saved_adapters, saved, tmp_path, capsys):
    directory = saved_adapters[0]
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is not refused
    assert main(["export-peft", str(directory / "random"), str(out)]) == 0
    before = (out / "adapter_config.json").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(b"stale")
    assert main(["export-peft", str(directory / "random"), str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == b"stale"
    assert main(["export-peft", str(directory / "random"), str(out), "--overwrite"]) == 0
    assert same(out, directory / "peft") and (out / "adapter_config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
    back = tmp_path / "back"
    assert main(["import-peft", str(out), str(back), "--like", str(directory / "random")]) == 0
    assert main(["import-peft", str(out), str(back), "--like", str(directory / "random"),
                 "--overwrite"]) == 0
    assert same(back, directory / "random")


@pytest.mark.parametrize("error", [ValueError("an internal bug"), OSError(5, "no file named")])
def test_errors_that_are_not_about_the_input_keep_their_traceback(saved_adapters, saved,
                                                                  monkeypatch, error):
    import megatron_lora.cli as cli

    def broken(path, out=None):
        raise error

    monkeypatch.setattr(cli, "inspect", broken)
    with pytest.raises(type(error)):
        cli.main(["inspect", str(saved_adapters[0] / "random")])
