"""The frozen LM head's exact work, over the rows the loss scores.

With the loss on completions only (SFT), on masked tokens (MLM) or on padded batches, most
rows of the LM head's output are never read by the loss, and every unscored token's row of
the error at the head is exactly zero; autograd still multiplies each of them by the head
(vocabulary × hidden: the largest matrix of a small LLM), forward and backward. When LDFA
leaves the head exact (``exact_top``, ``exclude_modules``), this hook

- in a training forward whose ``labels`` go into the model (the model computes its own causal-
  or masked-LM loss, as the ``Trainer`` has it), projects only the scored tokens' hidden states
  and returns zeros for the logits of the others, which that loss never reads;
- in the backward, sends down the same ``δ W``, computed for the error's non-zero rows only.

Nothing is approximated: the loss and every gradient are backprop's. The backward part stands
aside (plain autograd) whenever the head's weight trains or is sharded; the forward part, exact
for a training head too, only for a sharded one.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .distributed import is_dtensor, sharded_weight_reason
from .feedback import InputDetachingHook, Switch, _Feedback, _Registered, layer_input

# which positions' logits a model's own loss reads, by its loss: a causal LM's position t predicts
# label t + 1 (transformers' ``ForCausalLMLoss``); a masked LM's predicts label t
SHIFTED_LOSSES = {"ForCausalLM": True, "ForMaskedLM": False}


def output_layer(model: nn.Module) -> Optional[nn.Module]:
    """The model's LM head as a plain ``nn.Linear`` (PEFT's wrapper unwrapped), or ``None``."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    head = getattr(head, "base_layer", head)  # a PEFT LoRA layer on the head: its frozen base
    return head if type(head) is nn.Linear else None


def loss_shift(module: nn.Module) -> Optional[bool]:
    """Whether ``module``'s own loss reads logit t against label t + 1 (a causal LM: ``True``) or
    against label t (a masked LM: ``False``); ``None`` for any other loss, or one the user replaced.
    transformers names a model's loss by ``loss_type``; a model without one (GPT-2's
    ``LMHeadModel``) gets its causal-LM loss."""
    own = vars(module)  # the model's own attributes (PEFT's wrappers forward theirs to the model they wrap)
    if "_loss_function" in own:  # model.loss_function = ...: a loss of the user's
        return None
    kind = own.get("loss_type", "unknown")
    if kind is None and type(module).__name__.endswith("LMHeadModel"):
        kind = "ForCausalLM"
    return SHIFTED_LOSSES.get(kind)


def language_model_of(model: nn.Module, head: nn.Module) -> Optional[nn.Module]:
    """The module of ``model`` whose forward computes a causal- or masked-LM loss from ``head``."""
    return next((m for m in model.modules() if loss_shift(m) is not None and output_layer(m) is head), None)


def scored_positions(kwargs: dict, shift: bool) -> Optional[Tensor]:
    """Which positions' logits the model's loss reads, from the ``labels`` (or transformers'
    ``shift_labels``) of its forward's keyword arguments; ``None`` without labels."""
    ignore = kwargs.get("ignore_index", -100)
    labels = kwargs.get("shift_labels") if shift else None
    if labels is None:
        labels = kwargs.get("labels")
        if shift and isinstance(labels, Tensor) and labels.dim():
            labels = nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:]
    return labels != ignore if isinstance(labels, Tensor) and labels.dim() else None


def nonzero_rows_times(g: Tensor, W: Tensor) -> tuple[Tensor, int]:
    """``g @ W`` computed only for the rows of ``g`` that are not all zero (the others are zero),
    and how many rows were multiplied. The kept rows are gathered into one product: W, larger
    than the error, is read once (a product per run of rows would read it once per run)."""
    rows = g.reshape(-1, g.shape[-1])
    W = W.to(g.dtype)
    if bool((rows[:, 0] != 0).all()):  # one column proves every row non-zero: the dense product
        return g @ W, rows.shape[0]
    keep = rows.any(-1).nonzero().squeeze(1)
    out = rows.new_zeros(rows.shape[0], W.shape[1])
    if keep.numel():
        out.index_copy_(0, keep, rows.index_select(0, keep) @ W)
    return out.view(*g.shape[:-1], W.shape[1]), keep.numel()


class ZeroRowSkipping(InputDetachingHook):
    """Exact forward and backward for one output layer over the rows that matter: an
    ``InputDetachingHook`` with no factors, no statistics and no rule, plus a pre-hook on the
    language model (``lm``) that reads its labels."""

    def __init__(self, name: str, module: nn.Module, switch: Switch, lm: Optional[nn.Module] = None) -> None:
        super().__init__(module, switch)
        self.name = name
        self.lm = lm
        self.rows_seen = 0  # rows (tokens) in its last training step
        self.rows_kept = 0  # of which it multiplied (scored in the forward, or non-zero in the backward)
        self.forward_skips = False  # whether that step's forward computed the scored rows only
        self._scored: Optional[Tensor] = None  # (batch, seq) bool from the labels of the LM's running forward
        self._gathered: Optional[tuple] = None  # (kept row indices, leading shape) of the head's running forward

    def register(self) -> "ZeroRowSkipping":
        super().register()
        if self.lm is not None:
            self._handles.append(self.lm.register_forward_pre_hook(_Registered(self, "read_labels"), with_kwargs=True))
        return self

    def remove(self) -> None:
        super().remove()
        self._scored = self._gathered = None

    def applies(self) -> bool:
        """Only a frozen, whole (unsharded) weight: otherwise autograd does the backward itself."""
        weight = self.module.weight
        return not weight.requires_grad and not is_dtensor(weight) and sharded_weight_reason(weight) is None

    def read_labels(self, module, args, kwargs):
        """The LM's forward starts: note which of the head's rows its loss will read (training only:
        an evaluation's or a caller's logits stay whole)."""
        self._scored = None
        if module.training and torch.is_grad_enabled() and self.switch.enabled:
            shift = loss_shift(module)
            self._scored = None if shift is None else scored_positions(kwargs, shift)
        return None

    def pre_forward(self, module, args, kwargs):
        scored, self._scored, self._gathered = self._scored, None, None
        if torch.is_grad_enabled():
            self.forward_skips = False
        x = layer_input(args, kwargs)
        if scored is None or x is None or tuple(x.shape[:-1]) != tuple(scored.shape) or is_dtensor(x) \
                or is_dtensor(module.weight):
            return super().pre_forward(module, args, kwargs)
        keep = scored.to(x.device).reshape(-1).nonzero().squeeze(1)
        self._gathered = (keep, x.shape[:-1])
        self.rows_seen, self.rows_kept, self.forward_skips = scored.numel(), keep.numel(), True
        x = x.reshape(-1, x.shape[-1]).index_select(0, keep)
        args, kwargs = ((x, *args[1:]), kwargs) if args else ((), {k: x for k in kwargs})
        return super().pre_forward(module, args, kwargs) or (args, kwargs)

    def post_forward(self, module, args, kwargs, output):
        x, self._x = self._x, None
        gathered, self._gathered = self._gathered, None
        if not isinstance(output, Tensor):
            return None
        if x is not None and x.requires_grad:
            output = _Feedback.apply(output, x, self, False, False)
        if gathered is not None:  # the unscored rows' logits: zeros, which the loss never reads
            keep, lead = gathered
            output = output.new_zeros(lead.numel(), output.shape[-1]).index_copy(0, keep, output)
            output = output.view(*lead, -1)
        return output

    def input_grad(self, g: Tensor, x, x_shape, need_gx: bool, collect: bool) -> Optional[Tensor]:
        if not need_gx:
            return None
        gx, kept = nonzero_rows_times(g, self.module.weight.detach())
        if not self.forward_skips:  # else the forward's count, of all the tokens, stands
            self.rows_seen, self.rows_kept = g.numel() // g.shape[-1], kept
        return gx
