"""LoRA adds no collective to a row layer, none to a column layer (its r columns ride in the
base's own SP all-gather), and the gradient sync is one collective for the whole model."""

import pytest

R = 5  # mp_checks.RANK


def _check_fast(entry, label):
    base, lora = entry["base"], entry["lora"]
    assert [name for name, _ in lora] == [name for name, _ in base], label
    if label.startswith("fast-sp-column"):
        width = entry["in_features"]
        for (name, base_numel), (_, lora_numel) in zip(base, lora):
            if base_numel % width == 0 and lora_numel != base_numel:
                # the sequence gather / reduce-scatter of x carries h (r more columns)
                assert lora_numel * width == base_numel * (width + R), (label, name)
    else:
        assert lora == base, label


@pytest.mark.parametrize("tp", (2, 4))
def test_fast_path_adds_no_collective(spawned, tp):
    for result in spawned(tp):
        counts = result.collectives
        fast = [label for label in counts if label.startswith("fast-")]
        assert len(fast) == 7
        for label in fast:
            _check_fast(counts[label], label)


@pytest.mark.parametrize("tp", (2, 4))
def test_fallback_adds_only_rank_sized_collectives(spawned, tp):
    for result in spawned(tp):
        counts = result.collectives
        for label, entry in counts.items():
            if not label.startswith("fallback-") or label.endswith("row-scatter"):
                continue
            extra = list(entry["lora"])
            for call in entry["base"]:
                extra.remove(call)
            assert 1 <= len(extra) <= 2, (label, extra)  # one forward, at most one backward
            for _, numel in extra:
                assert numel <= 8 * 2 * R, (label, extra)  # seq x batch x r


@pytest.mark.parametrize("tp", (2, 4))
def test_grad_sync_is_one_collective_for_the_model(spawned, tp):
    for result in spawned(tp):
        sync = result.collectives["grad_sync"]
        assert sync["returned"] == 1
        assert [name for name, _ in sync["calls"]] == ["all_reduce"]
        # 4 column A's [5, 16] + 4 row B's [16, 5]
        assert sync["calls"][0][1] == sync["layers"] // 2 * (5 * 16 + 16 * 5)
