"""The frozen LM head's exact backward, over the rows of its error that are not zero.

With the loss on completions only (SFT), or on padded batches, every unscored token's row
of the error at the LM head is exactly zero; autograd still multiplies each of them by the
head (vocabulary × hidden: the largest matrix of a small LLM). When LDFA leaves the head
exact (``exact_top``, ``exclude_modules``), this hook sends down the same ``δ W``, computed
for the non-zero rows only. Nothing is approximated: the skipped products are zeros.
The hook stands aside (plain autograd) whenever the head's weight trains or is sharded.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .distributed import is_dtensor, sharded_weight_reason
from .feedback import InputDetachingHook, Switch, _Feedback


def output_layer(model: nn.Module) -> Optional[nn.Module]:
    """The model's LM head as a plain ``nn.Linear`` (PEFT's wrapper unwrapped), or ``None``."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    head = getattr(head, "base_layer", head)  # a PEFT LoRA layer on the head: its frozen base
    return head if type(head) is nn.Linear else None


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
    """Exact backward for one frozen output layer that skips its error's zero rows: an
    ``InputDetachingHook`` with no factors, no statistics and no rule."""

    def __init__(self, name: str, module: nn.Module, switch: Switch) -> None:
        super().__init__(module, switch)
        self.name = name
        self.rows_seen = 0  # rows (tokens) in its last training backward
        self.rows_kept = 0  # of which had a non-zero error

    def applies(self) -> bool:
        """Only a frozen, whole (unsharded) weight: otherwise autograd does the backward itself."""
        weight = self.module.weight
        return not weight.requires_grad and not is_dtensor(weight) and sharded_weight_reason(weight) is None

    def post_forward(self, module, args, kwargs, output):
        x, self._x = self._x, None
        if x is None or not x.requires_grad or not isinstance(output, Tensor):
            return None
        return _Feedback.apply(output, x, self, False, False)

    def input_grad(self, g: Tensor, x, x_shape, need_gx: bool, collect: bool) -> Optional[Tensor]:
        if not need_gx:
            return None
        gx, kept = nonzero_rows_times(g, self.module.weight.detach())
        self.rows_seen, self.rows_kept = g.numel() // g.shape[-1], kept
        return gx
