"""The per-layer hook that gives a layer its low-rank backward pathway.

Forward pre-hook: the layer receives a *detached* input, so its own kernel computes
only the exact weight and bias gradients and never ``δ W``. Forward hook: the output is
routed through ``_Feedback``, an identity in forward whose backward sends ``(δ P) Q`` to
the real input and, while training, accumulates the statistics the rule asks for.
As in ``torch.nn.utils.prune``, the object doing the work is the hook, and ``remove``
takes it off again without a trace.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .distributed import full_tensor, is_dtensor, row_shard, sharded_weight_reason
from .layers import LayerKind


class Switch:
    """Plugin-wide flags every hook reads: LDFA on/off, statistics on/off."""

    def __init__(self) -> None:
        self.enabled = True
        self.collecting = True
        self.materialize = lambda: None  # the plugin's: makes factors deferred by meta-device weights


class _Feedback(torch.autograd.Function):
    """Identity on the layer output; its backward supplies the input's gradient."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, hook: "FeedbackHook", collect: bool, keep_input: bool) -> Tensor:
        ctx.hook, ctx.collect = hook, collect
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(x if keep_input else None)
        return y.view_as(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        gx = ctx.hook.input_grad(g, x, ctx.x_shape, ctx.needs_input_grad[1], ctx.collect)
        # a frozen layer's output needs no gradient: handing g on would keep it alive while x's grads are summed
        return (g if ctx.needs_input_grad[0] else None), (None if gx is None else gx.to(ctx.x_dtype)), None, None, None


class _Registered:
    """What a module's hook dict holds for LDFA: a call into the owning ``FeedbackHook``.

    A copy of the model (``copy.deepcopy``, pickling, ``torch.save``) gets an ``_Orphan`` in its
    place instead of a second, unowned LDFA layer: the copy trains with exact backprop and can
    be wrapped by a plugin of its own.
    """

    def __init__(self, owner: "FeedbackHook", method: str) -> None:
        self.owner, self.method = owner, method

    def __call__(self, *args):
        return getattr(self.owner, self.method)(*args)

    def __deepcopy__(self, memo) -> "_Orphan":
        return _Orphan()

    def __reduce__(self):
        return (_Orphan, ())


class _Orphan:
    """A copied LDFA hook: does nothing and takes itself off its module the first time it runs."""

    def __call__(self, module: nn.Module, *args):
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, v in hooks.items() if v is self]:
                hooks.pop(key)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)
        return None


def layer_input(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """A layer's input tensor: its first positional argument, or its only keyword argument."""
    if args:
        x = args[0]
    elif len(kwargs) == 1:
        x = next(iter(kwargs.values()))
    else:
        return None
    return x if isinstance(x, Tensor) else None


def registered_hook(hook) -> Optional["FeedbackHook"]:
    """The ``FeedbackHook`` behind an entry of a module's hook dict, or ``None``."""
    return hook.owner if isinstance(hook, _Registered) else None


def orphans(module: nn.Module) -> int:
    """Copied LDFA hooks still on ``module`` (they vanish on its next forward)."""
    return sum(isinstance(v, _Orphan) for v in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()))


class InputDetachingHook:
    """What every LDFA hook on a layer shares, attached and removed in the style of
    ``torch.nn.utils.prune``: a forward pre-hook hands the layer a *detached* input (so its own
    kernel never computes ``δ W``) and keeps the real one for ``post_forward``, which routes the
    output through ``_Feedback``; ``input_grad`` then supplies the input's gradient."""

    def __init__(self, module: nn.Module, switch: Switch) -> None:
        self.switch = switch
        self._module = module
        self._x: Optional[Tensor] = None
        self._handles = []

    @property
    def module(self) -> nn.Module:
        return self._module

    def register(self) -> "InputDetachingHook":
        module = self._module
        self._handles = [
            module.register_forward_pre_hook(_Registered(self, "pre_forward"), with_kwargs=True),
            module.register_forward_hook(_Registered(self, "post_forward"), with_kwargs=True),
        ]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._x = None

    def applies(self) -> bool:
        """Whether this forward goes through the hook at all (else plain autograd)."""
        return True

    def pre_forward(self, module, args, kwargs):
        if not torch.is_grad_enabled() or not self.switch.enabled or not self.applies():
            return None
        x = layer_input(args, kwargs)
        if x is None:
            return None
        self._x = x
        if args:
            return (x.detach(),) + tuple(args[1:]), kwargs
        return args, {k: v.detach() for k, v in kwargs.items()}


class FeedbackHook(InputDetachingHook):
    """LDFA on one layer, and everything the plugin keeps about it: the layer kind bound to its
    module, its target, its factors P (m×r) and Q (r×n), the statistics of the step, skipped
    updates, and ``state``, a dict the rule owns."""

    def __init__(self, *, name: str, kind: "LayerKind", target, rule, switch: Switch,
                 error_clip: Optional[float] = None) -> None:
        super().__init__(kind.module, switch)
        self.name, self.kind, self.target, self.rule = name, kind, target, rule
        self.rank, self.shape = target.rank, target.shape
        self.P: Optional[Tensor] = None
        self.Q: Optional[Tensor] = None
        self.error_clip = error_clip
        self.stats: dict[str, Tensor] = {}
        self.samples = 0            # samples accumulated into ``stats`` since the last step
        self.last_samples = 0       # samples per forward, for the FLOP estimate
        self.input_needs_grad = True
        self.skipped = 0            # updates skipped for non-finite statistics
        self.eval_forward = False   # its last forward with gradients ran in eval mode
        self.backward_seen = False  # statistics reached this layer since the last step (kept by reset_statistics)
        self.state: dict = {}       # the rule's own per-layer state
        self._undo = None           # what kind.detached_forward changed for this forward

    def remove(self) -> None:
        super().remove()
        self.stats = {}

    # -- forward ---------------------------------------------------------------------------
    def pre_forward(self, module, args, kwargs):
        detached = super().pre_forward(module, args, kwargs)
        if detached is not None:
            self._undo = self.kind.detached_forward(self._x)
        return detached

    def post_forward(self, module, args, kwargs, output):
        x, self._x = self._x, None
        if x is None:
            return None
        self.kind.after_forward(self._undo)
        self._undo = None
        if not self.switch.enabled or not isinstance(output, Tensor):
            return None
        self.eval_forward = not module.training  # a rule's statistics are gathered in training mode only
        training = self.switch.collecting and module.training
        # an input that needs no gradient never uses the feedback, so its statistics would be waste
        collect = bool(training and x.requires_grad and self.rule.collects(self))
        self.input_needs_grad = x.requires_grad
        self.last_samples = self.kind.samples(output)
        if not x.requires_grad:
            return None
        if self.P is None and self.rule.has_factors:  # wrapped on the meta device: the weights are real now
            self.switch.materialize()
        self.follow_device(module.weight.device)
        return _Feedback.apply(output, x, self, collect, collect and self.rule.needs_input)

    # -- backward ----------------------------------------------------------------------------
    def input_grad(self, g: Tensor, x: Optional[Tensor], x_shape, need_gx: bool, collect: bool):
        """What the rule sends down to the input (``None`` if nothing needs it), clipped if asked."""
        gx = self.rule.input_grad(self, g, x, x_shape, need_gx, collect)
        if gx is not None and self.error_clip is not None:
            gx = gx.clamp(-self.error_clip, self.error_clip)
        return gx

    def accumulate(self, stats: dict, samples: int) -> None:
        self.backward_seen = True
        for key, value in stats.items():
            value = value.float()
            if key in self.stats:
                self.stats[key] += value
            else:
                self.stats[key] = value.clone()
        self.samples += samples

    def clear_stats(self) -> None:
        self.stats = {}
        self.samples = 0

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def weight_trains(self) -> bool:
        return self._module.weight.requires_grad

    def weight_matrix(self) -> Tensor:
        """W as ``m × n``. An FSDP2 shard is gathered (this one layer only, a collective: every
        process must ask); a weight FSDP1 / ZeRO-3 has flattened away is refused."""
        weight = self._module.weight
        reason = sharded_weight_reason(weight)
        if reason is not None:
            raise ValueError(
                f"LDFA needs the full weight of {self.name!r} outside forward, but {reason}. "
                "FSDP1 and DeepSpeed ZeRO-3 are not supported by rules that read W (the default "
                "rule, every refresh and stats()); use FSDP2 (fully_shard), DDP, or rule='bp'."
            )
        if is_dtensor(weight):
            return self.kind.as_matrix(full_tensor(weight.detach()))
        return self.kind.matrix().detach()  # a 4-bit weight comes back de-quantised

    def weight_rows(self) -> Optional[tuple[Tensor, int]]:
        """(the rows of W this process holds, index of the first) when FSDP2 shards W by rows."""
        if not self.kind.dim0_is_rows:
            return None
        shard = row_shard(self._module.weight.detach())
        if shard is None:
            return None
        rows, start = shard
        return self.kind.as_matrix(rows), start

    def held_weight(self) -> Tensor:
        """What this process holds of W (all of it unless sharded), for checks that all-reduce."""
        weight = self._module.weight.detach()
        return weight.to_local() if is_dtensor(weight) else weight

    def follow_device(self, device: torch.device) -> None:
        """Factors live outside the model, so they follow its weight when it moves."""
        if self.P is not None and self.P.device != device:
            self.P.data = self.P.data.to(device)
            if self.Q is not None:
                self.Q.data = self.Q.data.to(device)
            self.stats = {k: v.to(device) for k, v in self.stats.items()}
