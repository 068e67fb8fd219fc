"""A model holding TransformerEngine linears is refused by apply_lora on every rank, naming how
many of which kinds and the way out (megatron's local spec); broad targets never skip them
silently.

TransformerEngine is not installed on the CPU machines these tests run on, so real
TransformerEngine layers are not exercised. A layer is recognised by the module its class is
defined in (megatron.core.extensions.transformer_engine for megatron's wrappers,
transformer_engine.* for TransformerEngine's own); the stand-ins below are real
torch.nn.Module classes defined there by name, holding weights as the real ones do, swapped
into a tiny megatron GPT built with the local spec.
"""

import pytest
import torch

from gpt_checks import experiment

MEGATRON_TE = "megatron.core.extensions.transformer_engine"


class _HoldsWeight(torch.nn.Module):
    def __init__(self, rows=4, cols=4):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(rows, cols))


def _defined_in(home, name, base=_HoldsWeight):
    return type(name, (base,), {"__module__": home, "__qualname__": name})


TELayerNormColumnParallelLinear = _defined_in(MEGATRON_TE, "TELayerNormColumnParallelLinear")
TERowParallelLinear = _defined_in(MEGATRON_TE, "TERowParallelLinear")
TEGroupedLinear = _defined_in(MEGATRON_TE, "TEGroupedLinear")
TEFusedMLP = _defined_in(MEGATRON_TE, "TEFusedMLP")
TELinearOfTransformerEngine = _defined_in("transformer_engine.pytorch.module.linear", "Linear")
LayerNormOfTransformerEngine = _defined_in("transformer_engine.pytorch.module.layernorm",
                                           "LayerNorm")
SPEC_KINDS = {"linear_qkv": TELayerNormColumnParallelLinear, "linear_proj": TERowParallelLinear,
              "linear_fc1": TELayerNormColumnParallelLinear, "linear_fc2": TERowParallelLinear}


def test_transformer_engine_layers_are_known_by_where_their_class_is_defined():
    from megatron_lora.dispatch import transformer_engine_kind

    class MyLinear(TERowParallelLinear):  # a user's subclass of a megatron TE wrapper
        pass

    assert transformer_engine_kind(TELayerNormColumnParallelLinear()) == \
        "TELayerNormColumnParallelLinear"
    assert transformer_engine_kind(TEGroupedLinear()) == "TEGroupedLinear"
    assert transformer_engine_kind(TEFusedMLP()) == "TEFusedMLP"
    assert transformer_engine_kind(TELinearOfTransformerEngine()) == "Linear"
    assert transformer_engine_kind(MyLinear()) == "MyLinear"
    # not a layer LoRA would adapt, or not TransformerEngine's at all
    assert transformer_engine_kind(LayerNormOfTransformerEngine()) is None
    assert transformer_engine_kind(_defined_in(__name__, "TELinear")()) is None
    assert transformer_engine_kind(torch.nn.Linear(2, 2)) is None


def _swap_in_transformer_engine(model):
    """Every decoder linear of this stage replaced by its TransformerEngine spec's kind."""
    for layer in model.decoder.layers:
        for parent, name in ((layer.self_attention, "linear_qkv"),
                             (layer.self_attention, "linear_proj"),
                             (layer.mlp, "linear_fc1"), (layer.mlp, "linear_fc2")):
            setattr(parent, name, SPEC_KINDS[name]())


def _attempt(model, targets):
    from megatron_lora import AdapterError, apply_lora
    from megatron_lora.config import LoraConfig

    try:
        apply_lora(model, LoraConfig(r=2, target_modules=targets), verbose=False)
    except AdapterError as error:
        from megatron_lora.model import lora_layers

        return str(error), not list(lora_layers(model))
    return None, None


def refusals(rank, world):
    """Spawned at PP=2: a model whose every stage holds TransformerEngine linears, and one
    where only the last stage does (the first sees none and must still refuse)."""
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel

    exp = experiment(1, 2, False)
    initialize_model_parallel(exp)
    out = {}
    for case, targets in (("default", None), ("star", ["*"]), ("regex", ["re:.*"]),
                          ("output_layer", ["output_layer"])):
        model = build_gpt_model(exp)
        _swap_in_transformer_engine(model)
        out[case] = _attempt(model, targets)
    model = build_gpt_model(exp)
    if rank == 1:
        _swap_in_transformer_engine(model)
    out["last_stage_only"] = _attempt(model, None)
    model = build_gpt_model(exp)  # the local spec, untouched: adapted as always
    out["local_spec"] = _attempt(model, None)
    return out


@pytest.fixture(scope="module")
def refused():
    from megatron_lora.cpu import spawn_gloo

    return spawn_gloo(refusals, 2, timeout=240)


WAY_OUT = "build the model with megatron's local spec (get_gpt_layer_local_spec"
KINDS = "16 TransformerEngine layer(s): 8 TELayerNormColumnParallelLinear, 8 TERowParallelLinear"


def test_default_targets_say_they_matched_transformer_engine_layers(refused):
    for rank_out in refused:
        message, untouched = rank_out["default"]
        assert message.startswith("LoRA target(s) ['linear_qkv', 'linear_proj', 'linear_fc1', "
                                  "'linear_fc2'] match no supported layer on any rank: they match "
                                  "the model's " + KINDS)
        assert WAY_OUT in message and untouched
    assert refused[0]["default"] == refused[1]["default"]


@pytest.mark.parametrize("case", ["star", "regex", "output_layer"])
def test_broad_or_other_targets_never_skip_transformer_engine_layers(refused, case):
    for rank_out in refused:
        message, untouched = rank_out[case]
        assert message is not None, "apply_lora adapted the model and skipped its TE layers"
        assert message.startswith("the model holds " + KINDS + " (e.g. decoder.layers.0.mlp."
                                  "linear_fc1), which target_modules")
        assert WAY_OUT in message and untouched


def test_every_stage_refuses_when_one_stage_holds_them(refused):
    """Rank 0 (layers 0-1, local) sees no TransformerEngine layer and still refuses."""
    messages = [rank_out["last_stage_only"][0] for rank_out in refused]
    assert messages[0] == messages[1]
    assert messages[0].startswith("the model holds 8 TransformerEngine layer(s): "
                                  "4 TELayerNormColumnParallelLinear, 4 TERowParallelLinear "
                                  "(e.g. decoder.layers.2.mlp.linear_fc1)")
    assert all(rank_out["last_stage_only"][1] for rank_out in refused)


def test_the_local_spec_model_is_adapted(refused):
    assert [rank_out["local_spec"] for rank_out in refused] == [(None, None), (None, None)]
