"""``local``: descend the task loss as if W were P Q, from pre/post-synaptic signals only (v4 "bio")."""

from __future__ import annotations

from ..linalg import svd_factors
from .base import Rule


class Local(Rule):
    """``∇P = Σ δ (Q x)ᵀ``, ``∇Q = Σ (δ P)ᵀ x``, applied by AdamW; factors start at W's truncated SVD."""

    name = "local"
    label = "LDFA local"
    trains = True
    needs_input = True
    settings = ("feedback_lr", "feedback_weight_decay")
    lr = 5e-4
    weight_decay = 0.1

    def init_factors(self, W, r, generator):
        return svd_factors(W, r, generator)

    def stat_shapes(self, layer):
        (m, n), r = layer.shape, layer.rank
        return {"delta_xq": (m, r), "z_x": (r, n)}

    def statistics(self, layer, g, z, x):
        kind = layer.kind
        return {
            "delta_xq": kind.rows(g).T @ kind.x_q(x, layer.Q).to(g.dtype),
            "z_x": kind.z_x(z, x, layer.Q),
        }

    def gradients(self, layers):
        return [(layer.stats["delta_xq"], layer.stats["z_x"]) for layer in layers]

    def work(self, layer, config):
        return layer.N * layer.r * (layer.m + 2 * layer.n) if layer.input_grad else 0
