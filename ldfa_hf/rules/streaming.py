"""``streaming``: fine-tuning without periodic exact steps — every step calibrates from a few rows.

The ``calibrated`` rule spends one full exact-backprop step in ``calibrate_every`` to learn where
each layer's input gradients lie. Here only the first step is exact; on every later step each
layer sends ``(δ P) Q`` down as usual and, besides, computes the exact input gradient ``δ W`` for
the ``rows`` samples with the largest output errors (s ≪ N rows, ``s·m·n`` multiply-adds). Their
sketch is folded into a running, normalised sum (``decay`` weighs the past), and at every
``plugin.step()`` the feedback is re-aimed at its top-r subspace V as in ``calibrated``:
``P = W V``, ``Q = Vᵀ`` (docs/METHOD.md §3). The subspace therefore follows the current errors
step by step at a fraction of the cost of exact steps.
"""

from __future__ import annotations

from .calibrated import Calibrated


class Streaming(Calibrated):
    """``calibrated`` whose subspace is refreshed every step from the ``rows`` largest errors."""

    name = "streaming"
    label = "LDFA streaming"
    options = {"rows": 16, "decay": 0.8}
    settings = ()

    def due(self, step, every=None):
        return step == 0  # only the very first step is exact: there is no subspace yet

    def stat_shapes(self, layer):
        dim = self.sketch_dim(*layer.shape)
        return {"sketch": (dim, self.sketch_size(dim, layer.rank))}

    def collects(self, layer):
        return True

    def omega_step(self):
        return 0  # one Ω for good: the sketches of different steps add up

    def input_grad(self, layer, g, x, x_shape, need_gx, collect):
        if self.calibrating or not collect:
            return super().input_grad(layer, g, x, x_shape, need_gx, collect)
        kind = layer.kind
        gx = None
        if need_gx:
            gx = kind.up(kind.down(g, layer.P), layer.Q, x_shape)
        rows = kind.rows(g)
        s = min(int(self.options["rows"]), rows.shape[0])
        pick = rows.float().square().sum(1).topk(s).indices  # the largest errors carry the covariance
        d = (rows[pick] @ kind.matrix().detach().to(g.dtype)).float()
        layer.accumulate({"sketch": d.T @ (d @ self.omega(layer, g.device))}, s)
        return gx

    def update(self, layers, step, refreshing=False):
        self.recalibrate(layers)  # every step, from the rows it sketched

    def calibrate(self, layer):
        sketch = layer.stats["sketch"]
        if not bool(sketch.any()):
            return None
        return self.aim(layer, self.pool(layer, sketch, self.options["decay"]))

    def describe(self):
        return f"exact first step, then {self.options['rows']} exact rows per layer and step"

    def cost(self, layer, config):
        """Plain LDFA, plus per step: the exact rows (s·m·n), their sketch (2·s·n·k) and the re-aim (m·n·r)."""
        if not layer.input_grad:
            return layer.exact_backward, 0
        s = min(self.options["rows"], layer.N)
        work = s * layer.m * layer.n + 2 * s * layer.n * self.sketch_size(layer.n, layer.r) + layer.m * layer.n * layer.r
        return layer.feedback_backward + work, work
