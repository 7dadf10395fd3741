"""``sampled``: low-rank feedback made unbiased by a few exact rows — fine-tuning without exact steps.

Every other rule sends ``(δ P) Q`` down and drops ``δ (W − P Q)`` for good: a bias that no
amount of training averages out, and on a pretrained LLM, whose token errors are
high-dimensional, a rank-32 pathway keeps only ~0.6 of the adapters' gradient direction.
Here each layer also computes the exact input gradient ``δ_t W`` of a random subset of its rows
(tokens) and adds, on those rows only, what the feedback missed, divided by the row's
probability of being picked:

    g_t = (δ_t P) Q  +  [t picked] · (δ_t W − (δ_t P) Q) / π_t

so ``E[g_t] = δ_t W``: the input gradient, and through the linear backward every gradient
below, is unbiased. The low-rank term is a control variate: the better ``P Q`` fits, the less
variance the correction adds. Rows are picked independently with ``π_t ∝ ‖δ_t‖`` (capped at 1)
and ``fraction · N`` rows expected, so rows with no error (prompt tokens under a completion-only
loss, at the LM head) are never computed, and large errors are always exact.

The picked rows are exact input gradients, so they also keep the subspace up to date, as in
``streaming``: on the step before each re-aim (every ``reaim_every`` steps, and the first) their
sketch is pooled into a running sum, and the feedback is re-aimed at its top-r subspace V
(``P = W V``, ``Q = Vᵀ``). No step is exact.

Cost per layer and step: ``N·r·(m+n)`` (feedback) ``+ fraction·N·m·n`` (exact rows), against
backprop's ``N·m·n`` for the input gradient.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..layers import LinearKind
from ..linalg import factor_generator
from ..warning import LDFAWarning
from .streaming import Streaming


def inclusion_probabilities(weights: Tensor, budget: float) -> Tensor:
    """Probabilities ``π ∝ weights``, capped at 1, summing to ``budget`` (or 1 on every row with
    weight, if fewer have any): the capped rows are taken for sure, the rest share what is left.
    Exact water-filling from one sort, tensor ops only (no host sync: it runs in every backward)."""
    n = weights.numel()
    if budget >= n:
        return (weights > 0).to(weights.dtype)
    ws = weights.sort(descending=True).values
    tail = ws.flip(0).cumsum(0).flip(0)  # tail[k]: the weight left once the k largest are capped
    k = torch.arange(n, device=weights.device, dtype=weights.dtype)
    fits = (budget - k) * ws <= tail * (1 + 1e-6)  # with k capped, the largest of the rest stays <= 1
    first = fits.to(torch.int8).argmax()  # the fewest capped rows that fit (k = n - 1 always does)
    scale = (budget - first) / tail[first].clamp_min(torch.finfo(weights.dtype).tiny)
    return torch.where(weights > 0, (weights * scale).clamp(max=1.0), torch.zeros_like(weights))


class Sampled(Streaming):
    """``(δ P) Q`` plus an unbiased, importance-sampled correction from exact rows."""

    name = "sampled"
    label = "LDFA sampled"
    options = {"fraction": 0.25, "reaim_every": 4, "decay": 0.8}
    settings = ()

    def __init__(self, config) -> None:
        super().__init__(config)
        self.sketching = True
        self._warned_convs = False

    @classmethod
    def check_options(cls, options):
        options = super().check_options(options)
        fraction = options.get("fraction", cls.options["fraction"])
        if not 0 < fraction <= 1:
            raise ValueError(f"rule_options['fraction'] must be in (0, 1] (the share of rows computed exactly); "
                             f"got {fraction!r}")
        every = options.get("reaim_every", cls.options["reaim_every"])
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"rule_options['reaim_every'] must be an int >= 1; got {every!r}")
        return options

    def attach(self, layers):
        convs = [layer.name for layer in layers if not isinstance(layer.kind, LinearKind)]
        if convs and not self._warned_convs:
            self._warned_convs = True
            warnings.warn(f"LDFA sampled: {len(convs)} convolution layer(s) (e.g. {convs[0]!r}) get the plain, "
                          "uncorrected feedback; the exact-row correction is for linear layers", LDFAWarning,
                          stacklevel=4)
        super().attach(layers)

    def due(self, step, every=None):
        return False  # never an exact step: the correction keeps every step unbiased

    def begin_step(self, step):
        super().begin_step(step)
        # the rows are sketched only on the steps right before a re-aim (the first, then every k-th)
        self.sketching = step == 0 or (step + 1) % self.options["reaim_every"] == 0

    def stat_shapes(self, layer):
        return super().stat_shapes(layer) if self.sketching else {}

    def collects(self, layer):
        return self.sketching

    def input_grad(self, layer, g, x, x_shape, need_gx, collect):
        if not need_gx:
            return None  # nothing below needs this layer's input gradient
        kind = layer.kind
        gx = kind.up(kind.down(g, layer.P), layer.Q, x_shape)
        if not isinstance(kind, LinearKind):  # a convolution's rows are patches: plain feedback there
            return gx
        rows, gx_rows = kind.rows(g), kind.rows(gx)  # views: corrections land in gx
        pi = inclusion_probabilities(rows.detach().float().norm(dim=1), self.options["fraction"] * rows.shape[0])
        picked = (torch.rand(pi.shape, generator=self.generator(layer)).to(pi.device) < pi).nonzero().squeeze(1)
        if picked.numel():
            exact = rows[picked] @ kind.matrix().detach().to(g.dtype)
            scale = pi[picked].reciprocal()[:, None]
            gx_rows.index_add_(0, picked, (exact - gx_rows[picked]) * scale.to(g.dtype))
            if collect:  # Σ dᵀd/π over the picked rows estimates the step's Σ dᵀd
                d = exact.float() * scale.sqrt()
                layer.accumulate({"sketch": d.T @ (d @ self.omega(layer, g.device))}, kind.samples(g))
        return gx

    def generator(self, layer) -> torch.Generator:
        """The row draw of this layer's next micro-batch: seeded by step and micro-batch, so a
        resumed run draws the same rows."""
        step, count = layer.state.get("draws", (self.step, 0))
        count = count if step == self.step else 0
        layer.state["draws"] = (self.step, count + 1)
        return factor_generator(self.config.seed, layer.name, self.step * 65_537 + count)

    def describe(self):
        return (f"no exact steps; ~{self.options['fraction']:.0%} of rows exact (unbiased correction), "
                f"re-aimed every {self.options['reaim_every']} steps")

    def cost(self, layer, config):
        """Plain LDFA, plus per step: the exact rows (fraction·N·m·n), and a share of the sketch and re-aim."""
        if not layer.input_grad:
            return layer.exact_backward, 0
        s = math.ceil(self.options["fraction"] * layer.N)
        k = self.sketch_size(layer.n, layer.r)
        work = s * layer.m * layer.n + (2 * s * layer.n * k + layer.m * layer.n * layer.r) // self.options["reaim_every"]
        return layer.feedback_backward + work, work
