"""The full logical factors depend on (seed, module name, adapter name) only."""

import pytest
import torch


@pytest.mark.parametrize("tp", (2, 4))
def test_gathered_factors_bit_identical_to_tp1(spawned, tp):
    reference = spawned(1)[0].init
    for rank, result in enumerate(spawned(tp)):
        assert result.init.keys() == reference.keys()
        for key, factors in result.init.items():
            assert factors["A"] == reference[key]["A"], f"A of {key} differs on rank {rank}"
            assert factors["B"] == reference[key]["B"], f"B of {key} differs on rank {rank}"


def test_init_modes(spawned):
    init = spawned(1)[0].init
    for mode in ("True", "gaussian", "xavier"):
        b = torch.tensor(init[f"{mode}-column"]["B"])
        assert torch.count_nonzero(b) == 0, f"{mode}: a new adapter must not change the output"
        assert torch.tensor(init[f"{mode}-column"]["A"]).std() > 0
    assert torch.count_nonzero(torch.tensor(init["False-column"]["B"])) > 0
    # kaiming bound 1/sqrt(fan_in) from the FULL in-features (16 for column, 48 for row)
    a_row = torch.tensor(init["True-row"]["A"])
    assert a_row.abs().max() <= 1 / 48 ** 0.5 and a_row.abs().max() > 0.8 / 48 ** 0.5
    assert init["True-column"]["A"] != init["gaussian-column"]["A"]


def test_factors_depend_on_name_adapter_and_seed():
    from megatron_lora import LoraConfig
    from megatron_lora.init import full_lora_factors

    config = LoraConfig(r=4, init_lora_weights=False, seed=3)
    a, b = full_lora_factors(config, "layers.0.fc1", "default", 8, 12)
    again_a, again_b = full_lora_factors(config, "layers.0.fc1", "default", 8, 12)
    assert torch.equal(a, again_a) and torch.equal(b, again_b)
    assert not torch.equal(a, full_lora_factors(config, "layers.1.fc1", "default", 8, 12)[0])
    assert not torch.equal(a, full_lora_factors(config, "layers.0.fc1", "other", 8, 12)[0])
    other_seed = LoraConfig(r=4, init_lora_weights=False, seed=4)
    assert not torch.equal(a, full_lora_factors(other_seed, "layers.0.fc1", "default", 8, 12)[0])


def test_init_does_not_touch_global_rng():
    from megatron_lora import LoraConfig
    from megatron_lora.init import full_lora_factors

    torch.manual_seed(0)
    state = torch.get_rng_state()
    full_lora_factors(LoraConfig(r=4), "x", "default", 8, 8)
    assert torch.equal(state, torch.get_rng_state())
