"""The per-branch hook that decides, step by step, whether a residual branch runs its backward.

A sibling of ``FeedbackHook`` with the same shape (pre- and post-forward, register, remove), on
a branch's two end modules (``branches.py``). Its ``mode`` for the step is:

- ``"exact"``: autograd as usual. Two identity taps (at the branch's input and output) see the
  error leaving the branch's output and the part of the input's error that came through the
  branch, for the sensitivity and, with a bridge, its fit;
- ``"skip"``: the branch's output is detached, so the error goes down the residual path alone
  and nothing of the branch (attention core, norm, adapters) runs backward;
- ``"bridge"``: skipped, but the input still receives ``(δ P) Q``, a rank-r linear map fitted
  from the exact steps' (output error, input error) pairs: ``N·r·2d`` instead of the branch.

With ``tail``, a skipped (or bridged) branch's output projection still learns: the projection's
input is detached instead of the branch's output, so its adapters see the branch's output error
and nothing below them runs backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .branches import Branch
from .feedback import Switch, _Registered

class _Tap(torch.autograd.Function):
    """Identity; its backward hands the error it sees to the hook."""

    @staticmethod
    def forward(ctx, y: Tensor, hook: "BranchHook", end: str) -> Tensor:
        ctx.hook, ctx.end = hook, end
        return y.view_as(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        hook = ctx.hook
        hook.observe(ctx.end, g)
        return (g * hook.scale if ctx.end == "in" and hook.scale != 1.0 else g), None, None


class _Bridge(torch.autograd.Function):
    """The detached output of a skipped branch, tied to the branch's input by ``(δ P) Q``."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, P: Tensor, Q: Tensor) -> Tensor:
        ctx.save_for_backward(P, Q)
        ctx.x_dtype = x.dtype
        return y.view_as(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        P, Q = ctx.saved_tensors
        gx = (g.to(P.dtype) @ P) @ Q
        # with a learning tail the output is not detached: the error also goes on into the tail
        return (g if ctx.needs_input_grad[0] else None), gx.to(ctx.x_dtype), None, None


def _branch_input(args: tuple, kwargs: dict) -> tuple[Optional[Tensor], Optional[str]]:
    """The residual stream entering the branch: the first positional argument, else the
    ``hidden_states`` keyword (or the only keyword); with the keyword's name."""
    if args:
        return (args[0], None) if isinstance(args[0], Tensor) else (None, None)
    key = "hidden_states" if "hidden_states" in kwargs else (next(iter(kwargs)) if len(kwargs) == 1 else None)
    x = kwargs.get(key) if key is not None else None
    return (x, key) if isinstance(x, Tensor) else (None, None)


def _with_input(args: tuple, kwargs: dict, key: Optional[str], x: Tensor):
    """The module's arguments with the branch input (found by ``_branch_input``) replaced by ``x``."""
    if key is None:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, key: x}


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, y: Tensor):
    return (y, *output[1:]) if isinstance(output, tuple) else y


class BranchHook:
    """One residual branch and what the plugin keeps about it: this step's mode, its measured
    error gain (sensitivity) and, with a bridge, its fitted factors and their statistics."""

    def __init__(self, branch: Branch, switch: Switch, bridge_rank: Optional[int] = None,
                 bridge_rows: int = 256, tail: bool = False, measure: bool = True) -> None:
        self.branch = branch
        self.name, self.role, self.depth = branch.name, branch.role, branch.depth
        self.switch = switch
        self.mode = "exact"
        self.measure = measure            # exact steps tap the errors (sensitivity, bridge fit)
        self.scale = 1.0                  # what an exact step multiplies the branch's input error by
        self.bridge_rank = bridge_rank
        self.tail = tail                  # a skipped branch's output projection still learns
        self.bridge_rows = bridge_rows    # rows (tokens) per backward that feed the bridge's fit
        self.P: Optional[Tensor] = None   # d × r
        self.Q: Optional[Tensor] = None   # r × d
        self.stats: dict[str, Tensor] = {}  # this step's sums: out² and in² (and the bridge's moments)
        self._g_out: Optional[Tensor] = None
        self._x: Optional[Tensor] = None
        self._tapped_in = False           # this forward's input tap is in place (else: out alone)
        self._handles = []
        self.backward_runs = 0            # backwards through this branch since attach (exact mode)

    # -- attach / remove ---------------------------------------------------------------------
    def register(self) -> "BranchHook":
        self._handles = [
            self.branch.input_module.register_forward_pre_hook(_Registered(self, "pre_forward"), with_kwargs=True),
            self.branch.output_module.register_forward_hook(_Registered(self, "post_forward"), with_kwargs=True),
        ]
        if self.tail:
            self._handles.append(self.branch.tail_module.register_forward_pre_hook(
                _Registered(self, "tail_forward"), with_kwargs=True, prepend=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._x, self._g_out, self.stats = [], None, None, {}

    # -- forward -------------------------------------------------------------------------------
    def _active(self) -> bool:
        return torch.is_grad_enabled() and self.switch.enabled and self.branch.output_module.training

    def pre_forward(self, module, args, kwargs):
        if not self._active():
            return None
        self._tapped_in = False
        x, key = _branch_input(args, kwargs)
        if x is None or not x.requires_grad:
            return None  # no error goes down from here (the bottom block of a frozen model)
        if self.mode != "exact":
            self._x = x  # the bridge's end; the branch itself runs forward as usual
            return None
        if not self.measure and self.scale == 1.0:
            return None
        self._tapped_in = True
        return _with_input(args, kwargs, key, _Tap.apply(x, self, "in"))

    def tail_forward(self, module, args, kwargs):
        """A skipped branch with a learning tail: the output projection gets a detached input."""
        if self.mode == "exact" or not self._active():
            return None
        x, key = _branch_input(args, kwargs)
        return None if x is None else _with_input(args, kwargs, key, x.detach())

    def post_forward(self, module, args, kwargs, output):
        x, self._x = self._x, None
        y = _first(output)
        if not self._active() or not isinstance(y, Tensor) or not y.requires_grad:
            return None
        if self.mode == "exact":
            if not self.measure and not self._tapped_in:
                return None
            paired, self._tapped_in = self._tapped_in, False
            return _with_first(output, _Tap.apply(y, self, "out" if paired else "out alone"))
        kept = y if self.tail else y.detach()  # a learning tail keeps the error path into itself
        if self.mode == "bridge" and self.P is not None and x is not None:
            return _with_first(output, _Bridge.apply(kept, x, self.P, self.Q))
        return None if self.tail else _with_first(output, kept)

    # -- backward ------------------------------------------------------------------------------
    def observe(self, end: str, g: Tensor) -> None:
        """The out tap fires first (it is later in forward); the in tap pairs with it. A branch whose
        input needs no gradient sends nothing down: its gain is 0."""
        if end == "out alone":
            if self.switch.collecting:
                self.backward_runs += 1
                self._add("out2", g.float().pow(2).sum())
                self._add("in2", g.new_zeros((), dtype=torch.float32))
            return
        if end == "out":
            self._g_out = g
            return
        g_out, self._g_out = self._g_out, None
        if g_out is None or g_out.shape != g.shape or not self.switch.collecting:
            return
        self.backward_runs += 1
        rows_out, rows_in = g_out.reshape(-1, g.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()
        self._add("out2", rows_out.pow(2).sum())
        self._add("in2", rows_in.pow(2).sum())
        if self.bridge_rank:
            norms = rows_out.norm(dim=1)
            k = min(self.bridge_rows, rows_out.shape[0])
            keep = norms.topk(k).indices  # scored tokens carry the error; unscored rows are zeros
            a, b = rows_out.index_select(0, keep), rows_in.index_select(0, keep)
            self._add("oo", a.T @ a)
            self._add("oi", a.T @ b)

    def _add(self, key: str, value: Tensor) -> None:
        if key in self.stats:
            self.stats[key] += value
        else:
            self.stats[key] = value.clone()

    def clear_stats(self) -> None:
        self.stats = {}
        self._g_out = None


# -- what step() does with a branch's statistics ----------------------------------------------------
POOL_DECAY = 0.9  # weight of the older statistics each time new ones arrive
REFIT_EVERY = 16  # steps between a bridge's refits (spread over the branches: a few refit each step)


def pool(hook: BranchHook, pooled: dict) -> bool:
    """Fold this step's statistics into the branch's pooled ones (decayed); False if it had none."""
    if not hook.stats:
        return False
    if not all(torch.isfinite(v).all() for v in hook.stats.values()):
        return False  # non-finite statistics never reach the rates or the bridge
    for key, value in hook.stats.items():
        pooled[key] = value.clone() if key not in pooled else POOL_DECAY * pooled[key] + value
    return True


def gain(pooled: dict) -> float:
    """``‖J_bᵀ δ‖ / ‖δ‖`` over the pooled exact steps (NaN before the first)."""
    out2 = float(pooled.get("out2", 0.0))
    return (float(pooled["in2"]) / out2) ** 0.5 if out2 > 0 else float("nan")


def fit_bridge(pooled: dict, rank: int) -> Optional[tuple[Tensor, Tensor]]:
    """Reduced-rank regression of the input error on the output error: the rank-r ``P Q`` that
    best predicts ``δ_in`` from ``δ_out`` over the pooled rows. ``B = C⁻¹ Σ δ_outᵀ δ_in`` is the
    full-rank fit; its best rank-r restriction keeps the top eigenvectors V of the fitted values'
    second moment ``Bᵀ C B``: ``P = B V``, ``Q = Vᵀ``."""
    if "oo" not in pooled:
        return None
    oo, oi = pooled["oo"], pooled["oi"]
    d = oo.shape[0]
    ridge = 1e-4 * float(oo.diagonal().mean()) + 1e-30
    C = oo + ridge * torch.eye(d, dtype=oo.dtype, device=oo.device)
    B = torch.linalg.solve(C, oi)
    M = oi.T @ B
    _, vectors = torch.linalg.eigh((M + M.T) / 2)
    V = vectors[:, -min(rank, d):]
    return (B @ V).float().contiguous(), V.T.float().contiguous()
