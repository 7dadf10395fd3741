"""How each targeted layer kind reads its weight as an ``m × n`` matrix and applies P and Q.

Three kinds share one contract, so the hook and the rules never branch on layer type:
``nn.Linear`` (``W = weight``), GPT-2's ``Conv1D`` (``W = weight.T``) and ``nn.Conv2d``
with ``groups == 1`` (``W = weight`` reshaped to ``C_out × C_in·kh·kw``; P mixes output
channels per position, Q is an ``r × C_in × kh × kw`` kernel).
"""

from __future__ import annotations

import copy
import sys
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # GPT-2's transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


class LayerKind(Protocol):
    """The contract a targeted layer type fulfils, bound to its module once (``kind(module)``),
    so hooks and rules never branch on layer type nor pass the module around."""

    name: str
    module: nn.Module
    dim0_is_rows: bool  # the stored weight's dim 0 indexes W's rows (so an FSDP2 shard holds whole rows)

    @staticmethod
    def shape(module: nn.Module) -> tuple[int, int]:
        """``(m, n)`` of W as a matrix."""

    @staticmethod
    def as_matrix(weight: Tensor) -> Tensor:
        """A weight tensor (or the rows an FSDP2 shard holds) as rows of W."""

    def matrix(self) -> Tensor:
        """W as an ``m × n`` matrix (a view where possible)."""

    def down(self, g: Tensor, P: Tensor) -> Tensor:
        """``z = δ P``: the r-dimensional error."""

    def up(self, z: Tensor, Q: Tensor, x_shape: torch.Size) -> Tensor:
        """``z Q`` shaped like the layer's input."""

    def exact(self, g: Tensor, x_shape: torch.Size) -> Tensor:
        """Backprop's input gradient ``δ W``."""

    def rows(self, t: Tensor) -> Tensor:
        """Samples × features view of an error, compressed error or input."""

    def input_rows(self, g: Tensor, gx: Optional[Tensor]) -> Tensor:
        """``δ W`` per sample as rows (patch space for a convolution)."""

    def z_x(self, z: Tensor, x: Tensor, Q: Tensor) -> Tensor:
        """``Σ zᵀ x``, the r × n correlation the local rules feed to Q."""

    def x_q(self, x: Tensor, Q: Tensor) -> Tensor:
        """``x Qᵀ`` per sample, as rows."""

    def samples(self, g: Tensor) -> int:
        """Samples in an output-shaped tensor."""

    def detached_forward(self, x: Tensor):
        """Before the layer runs on LDFA's detached input: keep its forward the one plain autograd runs."""

    def after_forward(self, token) -> None:
        """Undo ``detached_forward``."""


class LinearKind:
    """``a = x Wᵀ + b`` over any number of leading dimensions; each leading index is a sample."""

    name = "linear"
    dim0_is_rows = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @staticmethod
    def shape(module: nn.Module) -> tuple[int, int]:
        return tuple(module.weight.shape)

    def detached_forward(self, x: Tensor):
        """Called before the layer runs on LDFA's detached input (``x`` is the real one); what it
        returns goes to ``after_forward``. A no-op but for layers whose forward reads ``requires_grad``."""
        return None

    def after_forward(self, token) -> None:
        """Undo what ``detached_forward`` did."""

    @staticmethod
    def as_matrix(weight: Tensor) -> Tensor:
        return weight

    def matrix(self) -> Tensor:
        return self.as_matrix(self.module.weight)

    def down(self, g: Tensor, P: Tensor) -> Tensor:
        return g @ P.to(g.dtype)

    def up(self, z: Tensor, Q: Tensor, x_shape: torch.Size) -> Tensor:
        return z @ Q.to(z.dtype)

    def exact(self, g: Tensor, x_shape: torch.Size) -> Tensor:
        return g @ self.matrix().to(g.dtype)

    @staticmethod
    def rows(t: Tensor) -> Tensor:
        """Samples × features view of an error, compressed error or input."""
        return t.reshape(-1, t.shape[-1])

    def z_x(self, z: Tensor, x: Tensor, Q: Tensor) -> Tensor:
        """``Σ zᵀ x`` — the ``r × n`` correlation the local rules feed to Q."""
        return self.rows(z).T @ self.rows(x).to(z.dtype)

    def x_q(self, x: Tensor, Q: Tensor) -> Tensor:
        """``x Qᵀ`` per sample, as rows: the input seen through the feedback row space."""
        return self.rows(x) @ Q.to(x.dtype).T

    def input_rows(self, g: Tensor, gx: Optional[Tensor]) -> Tensor:
        """``δ W`` per sample, as rows; reuses the exact input gradient when it was computed."""
        if gx is not None:
            return self.rows(gx)
        return self.rows(g) @ self.matrix().detach().to(g.dtype)

    @staticmethod
    def samples(g: Tensor) -> int:
        return g.numel() // g.shape[-1]


class Conv1DKind(LinearKind):
    """GPT-2 ``Conv1D``: a linear layer whose weight is stored transposed (``n × m``)."""

    name = "conv1d"
    dim0_is_rows = False  # stored n × m

    @staticmethod
    def shape(module: nn.Module) -> tuple[int, int]:
        n, m = module.weight.shape
        return (m, n)

    @staticmethod
    def as_matrix(weight: Tensor) -> Tensor:
        return weight.T


def conv_padding(module: nn.Conv2d) -> Optional[tuple[int, int]]:
    """Symmetric zero padding of a conv, or ``None`` when LDFA cannot mirror it exactly."""
    if module.padding_mode != "zeros":
        return None
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            return None  # asymmetric padding: keep the exact backward
        return tuple(t // 2 for t in total)
    return tuple(module.padding)


class Conv2dKind:
    """``nn.Conv2d`` with ``groups == 1``; every (image, output position) is a sample."""

    name = "conv2d"
    dim0_is_rows = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._geometry = (module.stride, conv_padding(module), module.dilation)

    def detached_forward(self, x: Tensor):
        return None

    def after_forward(self, token) -> None:
        pass

    @staticmethod
    def shape(module: nn.Module) -> tuple[int, int]:
        c_out, c_in, kh, kw = module.weight.shape
        return (c_out, c_in * kh * kw)

    @staticmethod
    def as_matrix(weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def matrix(self) -> Tensor:
        return self.as_matrix(self.module.weight)

    def _kernel(self, Q: Tensor, dtype: torch.dtype) -> Tensor:
        return Q.to(dtype).reshape(Q.shape[0], *self.module.weight.shape[1:])

    @staticmethod
    def down(g: Tensor, P: Tensor) -> Tensor:
        return torch.einsum("nchw,cr->nrhw", g, P.to(g.dtype))

    def up(self, z: Tensor, Q: Tensor, x_shape: torch.Size) -> Tensor:
        return torch.nn.grad.conv2d_input(x_shape, self._kernel(Q, z.dtype), z, *self._geometry)

    def exact(self, g: Tensor, x_shape: torch.Size) -> Tensor:
        return torch.nn.grad.conv2d_input(x_shape, self.module.weight.to(g.dtype), g, *self._geometry)

    @staticmethod
    def rows(t: Tensor) -> Tensor:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    def z_x(self, z: Tensor, x: Tensor, Q: Tensor) -> Tensor:
        grad = torch.nn.grad.conv2d_weight(x.to(z.dtype), (Q.shape[0], *self.module.weight.shape[1:]), z,
                                           *self._geometry)
        return grad.reshape(Q.shape[0], -1)

    def x_q(self, x: Tensor, Q: Tensor) -> Tensor:
        return self.rows(F.conv2d(x, self._kernel(Q, x.dtype), None, *self._geometry))

    def input_rows(self, g: Tensor, gx: Optional[Tensor]) -> Tensor:
        """``δ W`` per output position in patch space (C_in·kh·kw), as rows."""
        return self.rows(g) @ self.matrix().detach().to(g.dtype)

    @staticmethod
    def samples(g: Tensor) -> int:
        return g.numel() // g.shape[1]


def _bnb_linear4bit() -> Optional[type]:
    """bitsandbytes' ``Linear4bit`` if the user's program imported bitsandbytes (never imported here)."""
    bnb = sys.modules.get("bitsandbytes")
    return getattr(getattr(bnb, "nn", None), "Linear4bit", None) if bnb is not None else None


class Linear4bitKind(LinearKind):
    """A bitsandbytes ``Linear4bit`` base (QLoRA): W is read de-quantised, one layer at a time and
    only when a rule asks for it (factors at attach, exact steps); the 4-bit weight itself is never
    used in backward, since the feedback replaces ``δ W``."""

    name = "linear4bit"
    dim0_is_rows = False  # the packed storage's rows are not W's

    @staticmethod
    def shape(module: nn.Module) -> tuple[int, int]:
        return (module.out_features, module.in_features)

    @staticmethod
    def as_matrix(weight: Tensor) -> Tensor:
        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpacked_for_cpu(bnbf, data, state)
        return bnbf.dequantize_4bit(data, state)

    def matrix(self) -> Tensor:
        return self.as_matrix(self.module.weight)

    def detached_forward(self, x: Tensor):
        """Called before the layer runs on the detached input; returns what ``after_forward`` takes.

        bitsandbytes picks its CPU inference kernel (and re-packs the weight in place for it) when the
        input needs no gradient outside training mode. LDFA's detached input would send a forward with
        gradients there, which plain QLoRA never takes: that forward must stay the one the user had.
        The module's own setting is read once, so a forward that raised cannot leave it changed."""
        module = self.module
        if not hasattr(self, "_kernel_allowed"):
            self._kernel_allowed = bool(getattr(module, "support_avx512bf16_for_cpu", False))
        if x.requires_grad and self._kernel_allowed:
            module.support_avx512bf16_for_cpu = False
            return True
        return None

    def after_forward(self, token) -> None:
        if token:
            self.module.support_avx512bf16_for_cpu = self._kernel_allowed


def _unpacked_for_cpu(bnbf, data: Tensor, state):
    """A copy of a weight bitsandbytes re-packed for its CPU inference kernel, in the layout
    ``dequantize_4bit`` reads, with the block scales the kernel itself uses (bfloat16, one row of
    blocks per output feature). bitsandbytes' own inverse re-quantises those scales and, without
    double quantisation, leaves them transposed: its W can be off by a quarter."""
    unpack = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
    if unpack is None:
        raise ValueError("this bitsandbytes re-packed a 4-bit weight for CPU inference and offers no way to "
                         "read it back; run evaluation before wrapping or under model.train()")
    absmax = state.absmax.T.reshape(-1).float()  # packed: (in/blocksize, out) bfloat16
    data, unpacked = unpack(data.clone(), copy.deepcopy(state))  # the 4-bit codes come back exactly
    unpacked.absmax, unpacked.nested, unpacked.dtype = absmax, False, torch.float32
    for stale in ("state2", "offset"):
        if hasattr(unpacked, stale):
            setattr(unpacked, stale, None)
    return data, unpacked


def packed_weight_reason(module: nn.Module) -> Optional[str]:
    """Why a linear layer's weight is not a plain ``(out, in)`` float matrix (quantized or packed
    storage, e.g. bitsandbytes 4-bit), or ``None``; such layers are left exact."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return "it has no weight tensor"
    four_bit = _bnb_linear4bit()
    if four_bit is not None and isinstance(module, four_bit):
        return None if getattr(weight, "quant_state", None) is not None else "its 4-bit weight is not quantised yet"
    if not weight.is_floating_point():
        return f"its weight is stored as {weight.dtype}"
    if isinstance(module, nn.Linear) and tuple(weight.shape) != (module.out_features, module.in_features):
        return f"its weight has shape {tuple(weight.shape)}, not (out, in) = {(module.out_features, module.in_features)}"
    return None


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The layer kind LDFA can target, or ``None`` (embeddings, norms, grouped convs, packed weights, ...)."""
    four_bit = _bnb_linear4bit()
    if four_bit is not None and isinstance(module, four_bit):
        return Linear4bitKind if getattr(module.weight, "quant_state", None) is not None else None
    if isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
        if packed_weight_reason(module) is not None:
            return None
    if isinstance(module, nn.Linear):
        return LinearKind
    if Conv1D is not None and isinstance(module, Conv1D):
        return Conv1DKind
    if (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and conv_padding(module) is not None
    ):
        return Conv2dKind
    return None
