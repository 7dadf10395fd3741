"""``calibrated``: fine-tuning — some steps run exact backprop and re-aim the feedback at what they sent down."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import distributed
from ..linalg import factor_generator, top_subspace, truncated_svd
from ..warning import LDFAWarning
from .base import Rule


class Calibrated(Rule):
    """Every ``calibrate_every`` steps one step runs exact backprop, and each layer re-aims its
    feedback at the gradients it sent down in that step (docs/METHOD.md §3).

    The rank-r feedback closest to backprop on a layer's errors, ``min E‖δW − δPQ‖²``, is the
    reduced-rank regression ``P = W V``, ``Q = Vᵀ`` with V the top-r eigenvectors of the
    covariance of the exact input gradients ``δW``; it does not depend on what W was
    pretrained for (the ``svd`` rule's top singular directions of W carry the error only when
    W was trained from scratch). P and Q stay fixed in between.

    ``rule_options`` (measured in benchmarks/results/RESULTS.md e):
    ``subspace = "output"`` aims P at the top-r subspace of the output errors instead, with
    ``Q = PᵀW`` (close to the optimum, equal to it when the errors have rank ≤ r);
    ``warmup = True`` also calibrates on steps 1, 2, 4, … below ``calibrate_every``; and
    ``memory = β > 0`` fits each calibration to a running sum of the normalised sketches,
    ``β·old + new`` (one fixed Ω per layer, saved with the plugin), so several batches inform it.
    """

    name = "calibrated"
    label = "LDFA calibrated"
    options = {"subspace": "input", "warmup": False, "memory": 0.0}
    settings = ("calibrate_every",)
    state_keys = ("memory",)
    oversample = 8

    def __init__(self, config) -> None:
        super().__init__(config)
        self.calibrating = False
        self.step = 0

    @classmethod
    def check_options(cls, options):
        options = super().check_options(options)
        if options.get("subspace", "input") not in ("input", "output"):
            raise ValueError(f"rule_options['subspace'] must be 'input' or 'output'; got {options['subspace']!r}")
        if options.get("memory", 0.0) < 0:
            raise ValueError(f"rule_options['memory'] must be >= 0; got {options['memory']!r}")
        return options

    def init_factors(self, W, r, generator):
        U, S, Vh = truncated_svd(W, r, generator)  # orthonormal P, Q = PᵀW until the first calibration
        return U.contiguous(), (S[:, None] * Vh).contiguous()

    # -- schedule ----------------------------------------------------------------------------
    def due(self, step: int, every: Optional[int] = None) -> bool:
        """Whether optimizer step ``step`` (0-based) is a calibration step."""
        every = self.config.calibrate_every if every is None else every
        if step % every == 0:
            return True
        return self.options["warmup"] and step < every and step & (step - 1) == 0

    def begin_step(self, step):
        self.step = step
        self.calibrating = self.due(step)

    # -- backward ----------------------------------------------------------------------------
    def stat_shapes(self, layer):
        if not self.calibrating:
            return {}
        dim = self.sketch_dim(*layer.shape)
        return {"sketch": (dim, self.sketch_size(dim, layer.rank))}

    def input_grad(self, layer, g, x, x_shape, need_gx, collect):
        if not collect:  # a plain LDFA step (or a layer that is not training)
            return super().input_grad(layer, g, x, x_shape, need_gx, collect)
        kind = layer.kind
        gx = kind.exact(g, x_shape) if need_gx else None
        # the sketch Σ dᵀ(d Ω) of this micro-batch, d = δW per sample (or δ for "output")
        d = (kind.input_rows(g, gx) if self.sketches_inputs else kind.rows(g)).float()
        layer.accumulate({"sketch": d.T @ (d @ self.omega(layer, g.device))}, kind.samples(g))
        return gx

    def sketch_dim(self, m: int, n: int) -> int:
        """Dimension of the vectors sketched: input gradients (n) or output errors (m)."""
        return n if self.sketches_inputs else m

    @property
    def sketches_inputs(self) -> bool:
        """Whether the sketch is of the input gradients ``δW`` (the default) or of the output errors."""
        return self.options.get("subspace", "input") == "input"

    def sketch_size(self, dim: int, r: int) -> int:
        """Columns of the random test matrix Ω: 2r + 8 (capped at the dimension, where Ω = I)."""
        return min(dim, 2 * r + self.oversample)

    def omega(self, layer, device: torch.device) -> Tensor:
        """The calibration step's random test matrix Ω, the same for every micro-batch and process:
        a fresh one every calibration, or one for good with memory."""
        step = self.omega_step()
        cached = layer.state.get("omega")
        if cached is None or cached[0] != step or cached[1].device != device:
            layer.state["omega"] = cached = (step, self.test_matrix(layer.name, layer.shape, layer.rank, device))
        return cached[1]

    def test_matrix(self, name: str, shape: tuple, rank: int, device: torch.device) -> Tensor:
        """Ω for the layer called ``name`` at this step (uncached): seeded by name and step alone."""
        dim = self.sketch_dim(*shape)
        k = self.sketch_size(dim, rank)
        if k >= dim:
            return torch.eye(dim, device=device)
        gen = factor_generator(self.config.seed, name, self.omega_step())
        return torch.linalg.qr(torch.randn(dim, k, generator=gen)).Q.to(device)

    def omega_step(self) -> int:
        """The step whose seed draws Ω: this one, or step 0 for good when sketches are pooled."""
        return 0 if self.options["memory"] else self.step

    # -- learning ----------------------------------------------------------------------------
    def update(self, layers, step, refreshing=False):
        if not self.calibrating:
            return
        layers = [layer for layer in layers if layer.P is not None]
        eval_mode = all(layer.eval_forward for layer in layers)  # the plugin warns about that itself
        if layers and not eval_mode and not any(layer.backward_seen for layer in layers):
            warnings.warn("LDFA calibrated: plugin.step() was called with no backward since the last step, so this "
                          "calibration step saw no gradients (call it once per optimizer step, after backward)",
                          LDFAWarning, stacklevel=4)
        self.recalibrate(layers)

    def recalibrate(self, layers) -> None:
        """Re-aim every layer whose sketch saw errors this step; a non-finite sketch is skipped."""
        for layer in layers:
            if layer.P is None or layer.samples == 0 or "sketch" not in layer.stats:
                continue
            if not bool(torch.isfinite(layer.stats["sketch"]).all()):
                self.skip(layer)
                continue
            factors = self.calibrate(layer)
            if factors is not None:
                self.set_factors(layer, *factors)

    def calibrate(self, layer) -> Optional[tuple[Tensor, Tensor]]:
        """(P, Q) from the step's sketch and the current weight; ``None`` if no error arrived."""
        sketch = layer.stats["sketch"]
        if not bool(sketch.any()):
            return None
        beta = self.options["memory"]
        if beta:
            sketch = self.pool(layer, sketch, beta)
        return self.aim(layer, sketch)

    @staticmethod
    def pool(layer, sketch: Tensor, beta: float) -> Tensor:
        """``β·old + new/‖new‖``, kept in ``layer.state["memory"]`` (saved with the plugin)."""
        sketch = sketch / sketch.norm()
        if layer.state.get("memory") is not None:
            sketch = sketch + beta * layer.state["memory"].to(sketch.device)
        layer.state["memory"] = sketch
        return sketch

    def aim(self, layer, sketch: Tensor) -> tuple[Tensor, Tensor]:
        """(P, Q) aimed at the top-r subspace of what ``sketch`` saw."""
        inputs = self.sketches_inputs
        if inputs and layer.rank >= min(layer.shape):
            # every δW lies in W's row space, which V can span whole: exact feedback, P Q = W
            W = layer.weight_matrix().float()
            basis = torch.linalg.qr(W.T).Q if layer.rank < W.shape[1] else torch.eye(W.shape[1], device=W.device)
            return (W @ basis).contiguous(), basis.T.contiguous()
        basis, _ = top_subspace(sketch, self.omega(layer, sketch.device), layer.rank)
        if inputs:
            return self._times_basis(layer, basis), basis.T.contiguous()
        return basis.contiguous(), (basis.T @ layer.weight_matrix().float()).contiguous()

    @staticmethod
    def _times_basis(layer, basis: Tensor) -> Tensor:
        """``W V`` (m × r); from FSDP2's row shards each process fills its rows (O(m·r) to sum)."""
        shard = layer.weight_rows()
        if shard is None:
            return (layer.weight_matrix().float() @ basis).contiguous()
        W, start = shard
        out = torch.zeros(layer.P.shape, device=basis.device, dtype=torch.float32)
        out[start:start + W.shape[0]] = W.float() @ basis
        distributed.all_reduce_sum_([out])
        return out

    def describe(self) -> str:
        return f"exact calibration every {self.config.calibrate_every} steps"

    # -- cost --------------------------------------------------------------------------------
    def cost(self, layer, config):
        """One step in ``calibrate_every`` is exact backprop plus the sketch (2·N·d·k) and the
        re-aim (m·n·r); the others are plain LDFA steps."""
        every = config.calibrate_every
        if not layer.input_grad:
            return layer.exact_backward, 0
        dim = self.sketch_dim(layer.m, layer.n)
        calibration_work = 2 * layer.N * dim * self.sketch_size(dim, layer.r) + layer.m * layer.n * layer.r
        work = calibration_work // every
        total = ((every - 1) * layer.feedback_backward + layer.exact_backward + calibration_work) // every
        return total, work
