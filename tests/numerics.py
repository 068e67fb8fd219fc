"""How the tests compare tensors: one definition of "relative error" for every check."""

from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor, *,
                   scale_floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, scale_floor), in float64.

    Relative to the largest expected value, not elementwise, so values near zero do not blow
    it up. ``scale_floor=1.0`` makes it absolute where every value is below 1 (the layer
    checks, whose gradients can be tiny). A shape mismatch is an infinite error.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        return float("inf")
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, scale_floor, 1e-30)
    difference = (actual - expected).abs().max().item() if actual.numel() else 0.0
    return difference / scale
