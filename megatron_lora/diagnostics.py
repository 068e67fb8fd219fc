"""Measuring what LoRA costs: collectives per step and peak tensor memory on any device."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# the first tensor argument of these is the output buffer; the second is what is sent
_SENDS_SECOND = ("all_gather_into_tensor", "reduce_scatter_tensor", "_all_gather_base",
                 "_reduce_scatter_base")


class CollectiveCounter:
    """Records every torch.distributed collective (name, elements sent) while active.

    megatron-core's mappings keep their own references to the all-gather / reduce-scatter
    functions, so those are wrapped too.
    """

    NAMES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather",
             "reduce_scatter", "broadcast", "all_to_all_single", "_all_gather_base",
             "_reduce_scatter_base", "send", "recv", "isend", "irecv")

    def __init__(self):
        self.calls = []
        self._saved = []

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            tensor = args[1] if name in _SENDS_SECOND else args[0]
            if isinstance(tensor, torch.Tensor):
                numel = tensor.numel()
            else:
                numel = sum(t.numel() for t in tensor)
            self.calls.append((name, numel))
            return original(*args, **kwargs)

        return counted

    def __enter__(self):
        from megatron.core.tensor_parallel import mappings

        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved.append((dist, name, original))
            setattr(dist, name, self._wrap(name, original))
        for attr, name in (("dist_all_gather_func", "all_gather_into_tensor"),
                           ("dist_reduce_scatter_func", "reduce_scatter_tensor")):
            original = getattr(mappings, attr)
            self._saved.append((mappings, attr, original))
            setattr(mappings, attr, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated while active (CPU or GPU, op granularity).

    CPU builds of torch keep no allocator statistics, so every op's outputs are tracked by a
    weak reference to their storage; a storage counts until it is freed. Tensors that existed
    before entering (parameters, inputs) are not counted: add them yourself.
    """

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak_ref = StorageWeakRef
        self._live = {}
        self.current = 0
        self.peak = 0

    def _collect_freed(self):
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect_freed()
        # a view, an in-place or an out= result shares an input's storage: not an allocation
        # (else a parameter would count from its first .t() on)
        inputs = {item.untyped_storage().data_ptr()
                  for item in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(item, torch.Tensor) and item.layout == torch.strided}
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.layout == torch.strided:
                storage = item.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self._live and key not in inputs:
                    self._live[key] = (self._weak_ref(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out
