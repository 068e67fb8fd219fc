"""What one TP rank of a column or row parallel layer should hold, computed from full tensors
by the tests themselves (independently of megatron_lora.parallel, which they check): the
one home of the "expected local shard" rules of the layer checks.

Column layer: weight and B split by output rows, A replicated; input replicated (split along
the sequence under SP); output split along the last dimension unless gathered.
Row layer: weight and A split by input columns, B replicated; input split along the last
dimension (unless the layer takes a full input); output full (split along the sequence under
SP); its bias is replicated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpectedShard:
    kind: str  # "column" or "row"
    rank: int
    world: int
    sp: bool = False
    gather_output: bool = False
    input_is_parallel: bool = True

    def _part(self, tensor, dim):
        return tensor.chunk(self.world, dim)[self.rank]

    def input(self, full):
        if self.kind == "column":
            return self._part(full, 0) if self.sp else full
        return self._part(full, -1) if self.input_is_parallel else full

    def output(self, full):
        if self.kind == "column":
            return full if self.gather_output else self._part(full, -1)
        return self._part(full, 0) if self.sp else full

    def lora_a(self, full):
        return full if self.kind == "column" else self._part(full, 1)

    def lora_b(self, full):
        return self._part(full, 0) if self.kind == "column" else full

    def weight(self, full):
        return self._part(full, 0 if self.kind == "column" else 1)

    def bias(self, full):
        return self._part(full, 0) if self.kind == "column" else full
