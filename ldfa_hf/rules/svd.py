"""``svd``: P Q tracks the best rank-r approximation of W (the paper's v4 rule, the default)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import distributed
from ..linalg import canonical_signs, svd_factors
from ..warning import LDFAWarning
from .base import Rule


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
    settings = ("refit_every", "feedback_lr", "feedback_weight_decay")
    lr = 0.015             # descent only
    weight_decay = 0.0
    grad_clip = 1.0
    batch_below = 512 * 512  # weight entries under which same-shaped layers are batched

    def __init__(self, config) -> None:
        self.update_style = "descent" if config.refit_every is None else "refit"
        super().__init__(config)

    @property
    def trains(self) -> bool:
        return self.update_style == "descent"

    @property
    def refits(self) -> bool:
        return self.update_style == "refit"

    def init_factors(self, W, r, generator):
        return svd_factors(W, r, generator)

    def attach(self, layers):
        super().attach(layers)
        frozen = sum(not layer.weight_trains for layer in layers)
        if layers and frozen * 2 >= len(layers):
            warnings.warn(
                f"LDFA rule='svd' on a model whose targeted weights are mostly frozen ({frozen} of {len(layers)}: "
                "a LoRA/QLoRA base or a frozen backbone). svd aims the feedback at W's top singular directions, "
                "which carry the error only for weights trained from scratch; fine-tuning a pretrained LLM this "
                "way measured 0% exact match (benchmarks/results/RESULTS.md g). Use LDFAConfig.for_finetuning().",
                LDFAWarning, stacklevel=4)

    def learns(self, layer) -> bool:
        """A frozen W (LoRA's base) keeps its truncated SVD from attach, and a layer whose input
        needs no gradient (a model's first layer) never uses its feedback: neither is tracked."""
        return layer.weight_trains and layer.input_needs_grad

    def update(self, layers, step, refreshing=False):
        if not self.refits:
            return super().update(layers, step, refreshing)
        if refreshing or step % self.interval() != 0:
            return
        layers = [layer for layer in layers if self.learns(layer)]
        if not layers:
            return
        # one fused check (a non-finite entry makes the norm non-finite), one sync: a non-finite W is skipped
        finite = distributed.all_finite([layer.held_weight() for layer in layers])
        for layer in [layer for layer, ok in zip(layers, finite) if not ok]:
            self.skip(layer)
        layers = [layer for layer, ok in zip(layers, finite) if ok]
        for layer, (P, Q) in zip(layers, self.all_refits(layers) if layers else []):
            layer.P.data.copy_(P)
            layer.Q.data.copy_(Q)

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

    def work(self, layer, config):
        if not (layer.weight_trains and layer.input_grad):  # frozen W or unused feedback: nothing to track
            return 0
        return 2 * layer.m * layer.n * layer.r // (config.refit_every if self.refits else 1)

    def interval(self) -> int:
        return self.config.refit_every if self.refits else 1

    def gradients(self, hooks):
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
