"""The cost model: multiply-adds of one layer's backward under backprop and under LDFA."""

from __future__ import annotations

from typing import NamedTuple


class LayerCost(NamedTuple):
    """One layer's size for cost estimates: ``W`` is m × n, N samples per step."""

    m: int
    n: int
    r: int
    N: int
    weight_trains: bool
    input_grad: bool

    @property
    def weight_grad(self) -> int:
        return self.N * self.m * self.n if self.weight_trains else 0

    @property
    def exact_backward(self) -> int:
        """Backprop: ``δᵀx`` (if W trains) plus ``δ W`` (if the input needs a gradient)."""
        return self.weight_grad + (self.N * self.m * self.n if self.input_grad else 0)

    @property
    def feedback_backward(self) -> int:
        """LDFA: ``δᵀx`` plus ``(δ P) Q``."""
        return self.weight_grad + (self.N * self.r * (self.m + self.n) if self.input_grad else 0)
