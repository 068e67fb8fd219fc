"""Hostile files that the bad-input table cannot hold as rows (tests/bad_inputs_hostile.py has
those): a real dist-checkpoint passes the pickle check and a live payload is refused unrun, a
checkpoint's common.pt as Megatron-LM writes it is accepted, patterns end in time, a 64 GiB sparse
weights file is refused without being read, and a PEFT alpha_pattern imports with each module's
delta unchanged."""

from __future__ import annotations

import argparse
import enum
import hashlib
import resource
import shutil
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bad_inputs_hostile as hostile  # noqa: E402
from bad_inputs_scripts import TRAIN, _script  # noqa: E402

from megatron_lora.safe_pickle import UnsafeCheckpointError, check_dist_checkpoint  # noqa: E402
from megatron_lora.untrusted import (UntrustedInputError, check_safetensors_size,  # noqa: E402
                                     loads_json, sha256_of_file, short)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A real full-training save of the scripts' tiny model (pretrain_gpt.py, 1 iteration)."""
    directory = tmp_path_factory.mktemp("hostile")
    _script("make_demo_data.py", directory / "data")
    (directory / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    _script("pretrain_gpt.py", "--config", directory / "train.yaml", "--data-path",
            directory / "data" / "pretrain_text_document", "--train-iters", 1,
            "--save", directory / "base")
    return directory / "base" / "model"


def test_a_real_dist_checkpoint_passes(base):
    check_dist_checkpoint(base)  # .metadata, the layers' _extra_state byte items, common.pt


@pytest.mark.parametrize("payload", [hostile.payload_metadata, hostile.payload_inside_metadata,
                                     hostile.payload_common, hostile.payload_sharded_object],
                         ids=lambda f: f.__name__)
def test_a_payload_is_refused_and_never_runs(base, tmp_path, payload):
    model = tmp_path / "model"
    shutil.copytree(base, model)
    payload(model, tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="no checkpoint data is made of"):
        check_dist_checkpoint(model)
    assert not (tmp_path / hostile.MARKER).exists()


def test_the_payload_is_live_for_torch_reader(base, tmp_path):
    """The test above could not pass by accident: torch's own reader runs the same payload."""
    from torch.distributed.checkpoint import FileSystemReader

    model = tmp_path / "model"
    shutil.copytree(base, model)
    hostile.payload_metadata(model, tmp_path)
    try:
        FileSystemReader(str(model)).read_metadata()
    except Exception:  # the payload returns None, not Metadata: torch fails after running it
        pass
    assert (tmp_path / hostile.MARKER).exists()


class _Backend(enum.Enum):  # stands for a megatron.core enum in Megatron-LM's args
    local = 1


def test_megatron_lm_common_pt_is_accepted_and_foreign_enums_are_not(base, tmp_path):
    """Megatron-LM keeps its args (a Namespace with dtypes, tensors, megatron's enums) in
    common.pt: those load; an enum of any other module is refused."""
    from megatron.core.transformer.enums import AttnBackend

    model = tmp_path / "model"
    shutil.copytree(base, model)
    args = argparse.Namespace(params_dtype=torch.bfloat16, attention_backend=AttnBackend.auto,
                              layers=[1, 2], seen={"a"})
    torch.save({"args": args, "iteration": 3, "checkpoint_version": 3.0,
                "state": OrderedDict(x=torch.ones(2))}, model / "common.pt")
    check_dist_checkpoint(model)
    torch.save({"args": argparse.Namespace(backend=_Backend.local)}, model / "common.pt")
    with pytest.raises(UnsafeCheckpointError, match="_Backend"):
        check_dist_checkpoint(model)


def test_a_catastrophic_pattern_ends_within_seconds():
    from megatron_lora.config import name_matches

    start = time.monotonic()
    with pytest.raises(UntrustedInputError, match=r"the pattern 're:\(\.\*\)\{1,32000\}\[bc\]' "
                                                  r"did not finish matching"):
        name_matches(hostile.SLOW_PATTERN, "decoder.layers.0.self_attention.linear_qkv")
    assert time.monotonic() - start < 5
    assert name_matches("re:(.*.*)*z", "decoder.layers.0.mlp.linear_fc1") is False  # the issue's


def test_deep_json_is_one_error_and_short_quotes_a_huge_value():
    with pytest.raises(UntrustedInputError, match="nests deeper than 64 levels"):
        loads_json("[" * 65 + "]" * 65, "x.json")
    assert loads_json("[" * 64 + "]" * 64, "x.json")  # the limit itself is fine
    huge = ["x" * 10**6] * 10**5
    start = time.monotonic()
    assert len(short(huge)) <= 163 and time.monotonic() - start < 1


def test_a_sparse_64_gib_weights_file_is_refused_unread(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.zeros(2, 2)}, weights)
    check_safetensors_size(weights)
    with weights.open("r+b") as handle:
        handle.truncate(64 << 30)  # a hole: no disk used
    start = time.monotonic()
    with pytest.raises(UntrustedInputError, match="it is 68719476736 bytes, but its header "
                                                  "describes"):
        check_safetensors_size(weights)
    assert time.monotonic() - start < 1


def test_the_checksum_streams_the_file(tmp_path):
    path = tmp_path / "big"
    with path.open("wb") as handle:
        handle.truncate(1 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    digest = sha256_of_file(path)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 200 * 1024, f"peak memory grew by {grown} KiB while hashing 1 GiB"
    expected = hashlib.sha256()
    for _ in range(256):
        expected.update(bytes(1 << 22))
    assert digest == expected.hexdigest()


DENSE = dict(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=24, gated_linear_unit=True, vocab_size=32)


def test_a_peft_alpha_pattern_keeps_every_module_delta():
    """q, k and v sharing one A (as export-peft writes them) with q scaled by its own alpha:
    the import gives each its PEFT delta, alpha_pattern / r · B A."""
    from megatron_lora import LoraConfig
    from megatron_lora.interop import (hf_to_megatron_factors, megatron_to_hf_factors,
                                       shape_from_description)

    shape = shape_from_description(DENSE)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, generator=generator, dtype=torch.float64)
    outs = {"q_proj": 16, "k_proj": 8, "v_proj": 8}
    tensors = {}
    for layer in range(2):
        for name, out in outs.items():
            module = f"model.layers.{layer}.self_attn.{name}"
            tensors[f"{module}.lora_A.weight"] = a.clone()
            tensors[f"{module}.lora_B.weight"] = torch.randn(out, 2, generator=generator,
                                                             dtype=torch.float64)
    config = {"r": 2, "lora_alpha": 4, "alpha_pattern": {"q_proj": 16},
              "target_modules": list(outs)}
    megatron, kwargs = hf_to_megatron_factors(config, tensors, shape)
    lora = LoraConfig(**kwargs)
    back = megatron_to_hf_factors(megatron, shape)
    for layer in range(2):
        scaling = lora.scaling_for(f"decoder.layers.{layer}.self_attention.linear_qkv")
        for name in outs:
            module = f"model.layers.{layer}.self_attn.{name}"
            alpha = 16 if name == "q_proj" else 4
            expected = alpha / 2 * tensors[f"{module}.lora_B.weight"] @ a
            got = scaling * back[f"{module}.lora_B.weight"] @ back[f"{module}.lora_A.weight"]
            assert torch.allclose(got, expected), module
