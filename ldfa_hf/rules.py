"""Feedback rules: how P and Q start and how they learn (docs/METHOD.md §2–3).

A rule says which statistics the backward hook must gather, turns them (or the
layer's weight) into gradients for P and Q, and the plugin's AdamW applies them.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import distributed


def factor_generator(seed: int, name: str, step: int) -> torch.Generator:
    """Same seed on every process and every run: the name's CRC, not Python's salted hash."""
    mixed = (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + step) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def canonical_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so that U's largest entry in the column is positive: the SVD
    fixes a pair only up to sign, and this makes the factors a continuous function of W
    (the same on every process and machine, whatever order W's sums were taken in)."""
    pivot = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.where(U.gather(-2, pivot) < 0, -1.0, 1.0).to(U.dtype)
    return U * signs, Vh * signs.mT


def truncated_svd(W: Tensor, r: int, generator: torch.Generator, oversample: int = 8, power_iters: int = 2):
    """Top-r singular triplets of W; randomised (Halko et al.) when r is well below min(m, n)."""
    W = W.float()
    m, n = W.shape
    k = min(r + oversample, m, n)
    if 2 * k >= min(m, n):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, Vh = canonical_signs(U[:, :r], Vh[:r])
        return U, S[:r], Vh
    sketch = torch.randn(n, k, generator=generator).to(W.device)
    Y = W @ sketch
    for _ in range(power_iters):
        Y = W @ (W.T @ torch.linalg.qr(Y).Q)
    basis = torch.linalg.qr(Y).Q
    Ub, S, Vh = torch.linalg.svd(basis.T @ W, full_matrices=False)
    U, Vh = canonical_signs((basis @ Ub)[:, :r], Vh[:r])
    return U, S[:r], Vh


def svd_factors(W: Tensor, r: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``P = U_r S_r^½``, ``Q = S_r^½ V_rᵀ``: the best rank-r approximation of W, split evenly."""
    U, S, Vh = truncated_svd(W, r, generator)
    root = S.sqrt()
    return (U * root).contiguous(), (root[:, None] * Vh).contiguous()


def random_factors(W: Tensor, r: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Gaussian P, Q scaled so that ‖P Q‖ = ‖W‖ (task-agnostic feedback)."""
    m, n = W.shape
    P = torch.randn(m, r, generator=generator) / r**0.5
    Q = torch.randn(r, n, generator=generator) / n**0.5
    target = float(W.float().norm())
    if target > 0:
        scale = (target / float((P @ Q).norm())) ** 0.5
        P, Q = P * scale, Q * scale
    return P.to(W.device), Q.to(W.device)


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


class Rule:
    """Base rule: fixed factors, no statistics, no training."""

    name = ""
    label = ""          # how tables and plots name it
    full_rank = False   # always uses min(m, n), whatever ``rank`` says (fa, dfa, bp)
    exact = False       # backward uses W itself (bp)
    direct = False      # the output error goes straight to every layer (dfa)
    trains = False      # P, Q have an optimizer
    refreshes = False   # re-initialised from W every ``refresh_every`` steps
    refits = False      # re-fitted to W every ``refit_every`` steps (svd)
    calibrates = False  # some steps run exact backprop and re-aim P, Q from their errors
    follows_weight = False  # P, Q only track W: nothing to learn while W is frozen
    lr = 0.0
    weight_decay = 0.0
    error_clip: Optional[float] = None
    grad_clip: Optional[float] = None

    @property
    def has_factors(self) -> bool:
        """Whether layers carry P and Q made at attach time."""
        return not (self.exact or self.direct)

    @property
    def needs(self) -> bool:
        """Whether the backward hook gathers statistics for this rule."""
        return bool(self.stat_shapes(1, 1, 1))

    def init(self, W: Tensor, r: int, generator: torch.Generator):
        """Initial (P, Q); only called when ``has_factors``."""
        return random_factors(W, r, generator)

    def stat_shapes(self, m: int, n: int, r: int) -> dict:
        return {}

    def statistics(self, kind, module, g, z, x, P, Q) -> dict:
        return {}

    def feedback(self, kind, module, g: Tensor, P: Tensor, Q: Tensor, x_shape, need_gx: bool,
                 need_z: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(input gradient ``(δ P) Q`` or ``None``, compressed error ``z = δ P`` or ``None``)."""
        z = kind.down(g, P) if need_gx or need_z else None
        gx = kind.up(z, Q, module, x_shape) if need_gx else None
        return gx, z

    def gradients(self, hook) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def configure(self, config) -> "Rule":
        """Read the config settings that change how the rule works (most rules have none)."""
        return self

    def interval(self, config) -> int:
        """Optimizer steps between two updates of the factors."""
        return 1

    def work(self, layer: LayerCost, config) -> int:
        """Multiply-adds the rule itself spends per step on one layer (statistics and update)."""
        return 0

    def cost(self, layer: LayerCost, config) -> tuple[int, int]:
        """(backward multiply-adds per step, rule work included; the rule work alone) for one layer."""
        if self.exact:
            return layer.exact_backward, 0
        work = self.work(layer, config)
        return layer.feedback_backward + work, work

    def all_gradients(self, hooks: list) -> list[tuple[Tensor, Tensor]]:
        """Gradients for every hook, in order (rules may batch same-shaped layers)."""
        return [self.gradients(hook) for hook in hooks]


class BP(Rule):
    """Exact backprop through the same hooks (``P Q ≡ W``): the A/B reference."""

    name = "bp"
    label = "backprop (hooks)"
    full_rank = True
    exact = True


class Fixed(Rule):
    """Random low-rank feedback, never updated: the ablation."""

    name = "fixed"
    label = "fixed low-rank"


class FA(Fixed):
    """Classic Feedback Alignment: fixed random feedback at full rank."""

    name = "fa"
    label = "FA"
    full_rank = True


class DFA(Rule):
    """Direct Feedback Alignment (Nøkland 2016): every layer's input receives the output
    error through its own fixed random matrix, instead of an error passed layer by layer.

    The output error is the one arriving at the last targeted layer in the model's module
    order (the head of a Hugging Face model); fixing it at attach time keeps gradient
    checkpointing's recomputed forwards from changing it. Its per-example error maps
    position by position when the layer's input has the same leading shape (tokens of a
    language model), otherwise through one matrix from the whole example's error to the
    whole input (images, pooled classifiers).
    """

    name = "dfa"
    label = "DFA"
    full_rank = True
    direct = True


class SVD(Rule):
    """P Q tracks the best rank-r approximation of W (the paper's v4 rule).

    By default AdamW descends ½‖PQ − W‖² every step, as the paper does. With
    ``refit_every=k`` one alternating-least-squares sweep re-fits P Q to the current W
    every k steps instead, warm-started from Q: ``U = orth(W Qᵀ)``, then the best rank-r
    factors of ``U Uᵀ W`` (one block power iteration, 2·m·n·r multiply-adds, what one
    descent step costs), so the rule's work drops k-fold.
    """

    name = "svd"
    label = "LDFA svd"
    refreshes = True
    follows_weight = True  # a frozen W (LoRA's base) keeps its truncated SVD from attach
    update = "descent"     # or "refit" (config.refit_every)
    lr = 0.015             # descent only
    weight_decay = 0.0
    grad_clip = 1.0
    batch_below = 512 * 512  # weight entries under which same-shaped layers are batched

    @property
    def trains(self) -> bool:
        return self.update == "descent"

    @property
    def refits(self) -> bool:
        return self.update == "refit"

    def init(self, W, r, generator):
        return svd_factors(W, r, generator)

    @staticmethod
    def _descent(W: Tensor, P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
        # ∇ of ½‖PQ − W‖² without forming PQ: 2·m·n·r multiply-adds (batched or not).
        grad_P = torch.baddbmm(P @ (Q @ Q.mT), W, Q.mT, alpha=-1) if W.dim() == 3 else torch.addmm(P @ (Q @ Q.T), W, Q.T, alpha=-1)
        grad_Q = torch.baddbmm((P.mT @ P) @ Q, P.mT, W, alpha=-1) if W.dim() == 3 else torch.addmm((P.T @ P) @ Q, P.T, W, alpha=-1)
        return grad_P, grad_Q

    @staticmethod
    def _refit(W: Tensor, P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
        """One ALS sweep from Q, returned balanced (``P = U S^½``, ``Q = S^½ Vᵀ``); batched or not."""
        U = torch.linalg.qr(W @ Q.mT).Q
        return SVD._balanced(U, U.mT @ W)

    @staticmethod
    def _balanced(U: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """(P, Q) = (U U_B S^½, S^½ V_Bᵀ) for ``U B`` with orthonormal U: the best rank-r factors, split evenly."""
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
        U, Vh = canonical_signs(U @ Ub, Vh)
        root = S.sqrt()
        return (U * root.unsqueeze(-2)).contiguous(), (root.unsqueeze(-1) * Vh).contiguous()

    def gradients(self, hook):
        return self._descent(hook.weight_matrix().float(), hook.P, hook.Q)

    def work(self, layer, config):
        if not (layer.weight_trains and layer.input_grad):  # frozen W or unused feedback: nothing to track
            return 0
        return 2 * layer.m * layer.n * layer.r // self.interval(config)

    def configure(self, config):
        self.update = "descent" if config.refit_every is None else "refit"
        return self

    def interval(self, config):
        return config.refit_every if self.refits else 1

    def all_gradients(self, hooks):
        shards = [hook.weight_rows() for hook in hooks]
        if any(shard is not None for shard in shards):
            return self._sharded_descent(hooks, shards)
        return self._batched(hooks, self._descent)

    def all_refits(self, hooks) -> list[tuple[Tensor, Tensor]]:
        """New (P, Q) for every hook, in order."""
        shards = [hook.weight_rows() for hook in hooks]
        if any(shard is not None for shard in shards):
            return [self._sharded_refit(hook, shard) for hook, shard in zip(hooks, shards)]
        return self._batched(hooks, self._refit)

    @staticmethod
    def _sharded_descent(hooks, shards) -> list[tuple[Tensor, Tensor]]:
        """The descent from FSDP2's row shards of W, no weight gathered: each process fills the
        rows of ∇P it holds W for and its part of PᵀW (r × n); one all-reduce sums them."""
        partial = []
        for hook, shard in zip(hooks, shards):
            P, Q = hook.P.detach(), hook.Q.detach()
            W, start = shard if shard is not None else (hook.weight_matrix(), 0)
            rows = slice(start, start + W.shape[0])
            W = W.float()
            grad_P = torch.zeros_like(P)
            grad_P[rows] = P[rows] @ (Q @ Q.T) - W @ Q.T
            PtW = P[rows].T @ W
            if shard is None:  # a layer every process holds whole: nothing to sum
                grad_P, PtW = grad_P / distributed.world_size(), PtW / distributed.world_size()
            partial += [grad_P, PtW]
        distributed.all_reduce_sum_(partial)
        return [(grad_P, (hook.P.T @ hook.P) @ hook.Q - PtW)
                for hook, grad_P, PtW in zip(hooks, partial[0::2], partial[1::2])]

    @staticmethod
    def _sharded_refit(hook, shard) -> tuple[Tensor, Tensor]:
        """The ALS sweep from row shards: W Qᵀ (m × r) and Uᵀ W (r × n) are summed across processes."""
        if shard is None:
            return SVD._refit(hook.weight_matrix().float(), hook.P.detach(), hook.Q.detach())
        W, start = shard
        rows = slice(start, start + W.shape[0])
        W = W.float()
        WQ = torch.zeros_like(hook.P)
        WQ[rows] = W @ hook.Q.detach().T
        distributed.all_reduce_sum_([WQ])
        U = torch.linalg.qr(WQ).Q
        B = U[rows].T @ W
        distributed.all_reduce_sum_([B])
        return SVD._balanced(U, B)

    def _batched(self, hooks, fn) -> list[tuple[Tensor, Tensor]]:
        """``fn(W, P, Q)`` per hook. Small same-shaped layers share one batched call (per-call
        overhead dominates there); large ones go one by one, since stacking would copy every W."""
        groups: dict = {}
        for i, hook in enumerate(hooks):
            m, n = hook.P.shape[0], hook.Q.shape[1]
            key = (m, n, hook.rank, hook.P.device) if m * n <= self.batch_below else i
            groups.setdefault(key, []).append(i)
        out = [None] * len(hooks)
        for members in groups.values():
            if len(members) == 1:
                hook = hooks[members[0]]
                out[members[0]] = fn(hook.weight_matrix().float(), hook.P.detach(), hook.Q.detach())
                continue
            W = torch.stack([hooks[i].weight_matrix().float() for i in members])
            P = torch.stack([hooks[i].P.detach() for i in members])
            Q = torch.stack([hooks[i].Q.detach() for i in members])
            for i, a, b in zip(members, *fn(W, P, Q)):
                out[i] = (a, b)
        return out


class Local(Rule):
    """Synapse-local: descend the task loss as if W were P Q (v4 "bio")."""

    name = "local"
    label = "LDFA local"
    trains = True
    lr = 5e-4
    weight_decay = 0.1

    def init(self, W, r, generator):
        return svd_factors(W, r, generator)

    def stat_shapes(self, m, n, r):
        return {"delta_xq": (m, r), "z_x": (r, n)}

    def statistics(self, kind, module, g, z, x, P, Q):
        return {
            "delta_xq": kind.rows(g).T @ kind.x_q(x, Q, module).to(g.dtype),
            "z_x": kind.z_x(z, x, module, Q),
        }

    def gradients(self, hook):
        return hook.stats["delta_xq"], hook.stats["z_x"]

    def work(self, layer, config):
        return layer.N * layer.r * (layer.m + 2 * layer.n) if layer.input_grad else 0


class Oja(Rule):
    """Oja's subspace rule on the error stream for P, Kolen–Pollack for Q (v1–v3)."""

    name = "oja"
    label = "LDFA oja"
    trains = True
    lr = 1e-3
    weight_decay = 1e-4
    error_clip = 1.0

    def init(self, W, r, generator):
        U, S, Vh = truncated_svd(W, r, generator)
        return U.contiguous(), (S[:, None] * Vh).contiguous()

    def stat_shapes(self, m, n, r):
        return {"delta_z": (m, r), "delta_sum": (m,), "delta_sq": (m,), "z_x": (r, n)}

    def statistics(self, kind, module, g, z, x, P, Q):
        d = kind.rows(g).float()
        return {
            "delta_z": d.T @ kind.rows(z).float(),
            "delta_sum": d.sum(0),
            "delta_sq": (d * d).sum(0),
            "z_x": kind.z_x(z, x, module, Q),
        }

    def gradients(self, hook):
        s, N, P = hook.stats, float(hook.samples), hook.P
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


def top_subspace(sketch: Tensor, omega: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-r eigenvectors (m × r, orthonormal) and eigenvalues of a PSD matrix C seen only
    through its sketch ``C Ω``: a single-pass Nyström approximation (Tropp et al., 2017),
    so the errors are read once and no m × m matrix is formed. Exact when rank(C) ≤ k.
    """
    m, k = sketch.shape
    Y, omega = sketch.double(), omega.to(sketch.device).double()
    if k >= m:  # Ω = I: the sketch is C itself
        values, vectors = torch.linalg.eigh((Y + Y.T) / 2)
        order = values.argsort(descending=True)[:r]
        return vectors[:, order].float(), values[order].clamp_min(0).float()
    shift = float(Y.norm()) * 1e-12
    Y = Y + shift * omega
    core = omega.T @ Y
    values, vectors = torch.linalg.eigh((core + core.T) / 2)
    keep = values > values.max().clamp_min(0) * 1e-10
    F = Y @ (vectors[:, keep] / values[keep].sqrt())  # Y (ΩᵀY)^{-1/2}: Ĉ = F Fᵀ
    U, S, _ = torch.linalg.svd(F, full_matrices=False)
    width = min(r, U.shape[1])
    P = U[:, :width]
    if width < r:  # fewer error directions than r: pad with any orthonormal complement
        P = torch.linalg.qr(torch.cat([P, omega[:, : r - width]], dim=1)).Q
    return P.float(), (S[:width] ** 2 - shift).clamp_min(0).float()


class Calibrated(Rule):
    """Fine-tuning: every ``calibrate_every`` steps one step runs exact backprop, and each layer
    re-aims its feedback at the gradients it sent down in that step (docs/METHOD.md §3).

    The rank-r feedback closest to backprop on a layer's errors, ``min E‖δW − δPQ‖²``, is the
    reduced-rank regression ``P = W V``, ``Q = Vᵀ`` with V the top-r eigenvectors of the
    covariance of the exact input gradients ``δW``; it does not depend on what W was
    pretrained for (the ``svd`` rule's top singular directions of W carry the error only when
    W was trained from scratch). P and Q stay fixed in between.

    Research switches (attributes, not config; measured in benchmarks/results/RESULTS.md):
    ``subspace = "output"`` aims P at the top-r subspace of the output errors instead, with
    ``Q = PᵀW`` (close to the optimum, equal to it when the errors have rank ≤ r);
    ``warmup = True`` also calibrates on steps 1, 2, 4, … below ``calibrate_every``; and
    ``memory = β > 0`` fits each calibration to a running sum of the normalised sketches,
    ``β·old + new`` (one fixed Ω per layer), so that several batches inform the subspace.
    """

    name = "calibrated"
    label = "LDFA calibrated"
    calibrates = True
    oversample = 8
    subspace = "input"
    warmup = False
    memory = 0.0

    def init(self, W, r, generator):
        U, S, Vh = truncated_svd(W, r, generator)  # orthonormal P, Q = PᵀW until the first calibration
        return U.contiguous(), (S[:, None] * Vh).contiguous()

    def due(self, step: int, every: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is a calibration step."""
        if step % every == 0:
            return True
        return self.warmup and step < every and step & (step - 1) == 0

    def sketch_dim(self, m: int, n: int) -> int:
        """Dimension of the vectors sketched: output errors (m) or input gradients (n)."""
        return n if self.subspace == "input" else m

    def sketch_size(self, dim: int, r: int) -> int:
        """Columns of the random test matrix Ω: 2r + 8 (capped at the dimension, where Ω = I)."""
        return min(dim, 2 * r + self.oversample)

    def sketch_step(self, step: int) -> int:
        """The step whose seed draws Ω: a fresh Ω every calibration, or one for good with memory."""
        return 0 if self.memory else step

    def sketch_matrix(self, dim: int, r: int, generator: torch.Generator) -> Tensor:
        k = self.sketch_size(dim, r)
        if k >= dim:
            return torch.eye(dim)
        return torch.linalg.qr(torch.randn(dim, k, generator=generator)).Q

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

    def calibration_shapes(self, m: int, n: int, r: int) -> dict:
        dim = self.sketch_dim(m, n)
        return {"sketch": (dim, self.sketch_size(dim, r))}

    def calibration_statistics(self, kind, module, g: Tensor, gx: Optional[Tensor], omega: Tensor) -> dict:
        """The sketch ``Σ dᵀ(d Ω)`` of this micro-batch, d = δW per sample (or δ for ``"output"``)."""
        d = kind.input_rows(g, gx, module) if self.subspace == "input" else kind.rows(g)
        d = d.float()
        return {"sketch": d.T @ (d @ omega)}

    def calibrate(self, hook, omega: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """(P, Q) from the step's sketch and the current weight; ``None`` if no error arrived."""
        sketch = hook.stats["sketch"]
        if not bool(sketch.any()):
            return None
        if self.memory:
            sketch = sketch / sketch.norm()
            if hook.memory is not None:
                sketch = sketch + self.memory * hook.memory.to(sketch.device)
            hook.memory = sketch
        if self.subspace == "input" and hook.rank >= min(hook.P.shape[0], hook.Q.shape[1]):
            # every δW lies in W's row space, which V can span whole: exact feedback, P Q = W
            W = hook.weight_matrix().float()
            basis = torch.linalg.qr(W.T).Q if hook.rank < W.shape[1] else torch.eye(W.shape[1], device=W.device)
            return (W @ basis).contiguous(), basis.T.contiguous()
        basis, _ = top_subspace(sketch, omega, hook.rank)
        if self.subspace == "input":
            return self._times_basis(hook, basis), basis.T.contiguous()
        return basis.contiguous(), (basis.T @ hook.weight_matrix().float()).contiguous()

    @staticmethod
    def _times_basis(hook, basis: Tensor) -> Tensor:
        """``W V`` (m × r); from FSDP2's row shards each process fills its rows (O(m·r) to sum)."""
        shard = hook.weight_rows()
        if shard is None:
            return (hook.weight_matrix().float() @ basis).contiguous()
        W, start = shard
        out = torch.zeros(hook.P.shape, device=basis.device, dtype=torch.float32)
        out[start:start + W.shape[0]] = W.float() @ basis
        distributed.all_reduce_sum_([out])
        return out


RULES = {rule.name: rule for rule in (SVD, Local, Oja, Calibrated, Fixed, FA, DFA, BP)}


def make_rule(name: str) -> Rule:
    return RULES[name]()
