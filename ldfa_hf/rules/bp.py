"""``bp``: exact backprop through the same hooks (``P Q ≡ W``), the A/B reference."""

from __future__ import annotations

from .base import Rule


class BP(Rule):
    """Sends ``δ W`` down, exactly as autograd would: the hooks' own cost is all that differs."""

    name = "bp"
    label = "backprop (hooks)"
    full_rank = True
    has_factors = False
    exact = True

    def init_factors(self, W, r, generator):
        return None

    def input_grad(self, layer, g, x, x_shape, need_gx, collect):
        return layer.kind.exact(g, x_shape) if need_gx else None

    def cost(self, layer, config):
        return layer.exact_backward, 0
