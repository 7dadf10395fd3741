"""``oja``: Oja's subspace rule on the error stream for P, Kolen–Pollack for Q (paper v1–v3)."""

from __future__ import annotations

import torch

from ..linalg import truncated_svd
from .base import Rule


class Oja(Rule):
    """P converges to the top-r principal subspace of the standardised errors; ``∇Q = Σ zᵀ x``."""

    name = "oja"
    label = "LDFA oja"
    trains = True
    needs_input = True
    settings = ("feedback_lr", "feedback_weight_decay")
    lr = 1e-3
    weight_decay = 1e-4
    error_clip = 1.0

    def init_factors(self, W, r, generator):
        U, S, Vh = truncated_svd(W, r, generator)
        return U.contiguous(), (S[:, None] * Vh).contiguous()

    def stat_shapes(self, layer):
        (m, n), r = layer.shape, layer.rank
        return {"delta_z": (m, r), "delta_sum": (m,), "delta_sq": (m,), "z_x": (r, n)}

    def statistics(self, layer, g, z, x):
        kind = layer.kind
        d = kind.rows(g).float()
        return {
            "delta_z": d.T @ kind.rows(z).float(),
            "delta_sum": d.sum(0),
            "delta_sq": (d * d).sum(0),
            "z_x": kind.z_x(z, x, layer.Q),
        }

    def gradients(self, layers):
        return [self._gradient(layer) for layer in layers]

    @staticmethod
    def _gradient(layer):
        s, N, P = layer.stats, float(layer.samples), layer.P
        mean = s["delta_sum"] / N
        var = (s["delta_sq"] / N - mean * mean).clamp_min(0)
        scale = var.sqrt().max() + 1e-8
        # C P with C the covariance of the standardised errors Δ = (δ − mean) / scale
        CP = (s["delta_z"] - N * mean[:, None] * (mean @ P)[None, :]) / (N * scale * scale)
        if P.shape[1] >= P.shape[0]:
            # r = m: P already spans the whole error space and (I − PPᵀ)CP is rounding noise,
            # which Adam's normalisation would turn into full-size random steps.
            return torch.zeros_like(P), s["z_x"]
        grad_P = -(CP - P @ (P.T @ CP))
        return grad_P, s["z_x"]

    def work(self, layer, config):
        return layer.N * layer.r * (layer.m + layer.n) + layer.m * layer.r * layer.r if layer.input_grad else 0
