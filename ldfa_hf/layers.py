"""How each targeted layer kind reads its weight as an ``m × n`` matrix and applies P and Q.

Three kinds share one contract, so the hook and the rules never branch on layer type:
``nn.Linear`` (``W = weight``), GPT-2's ``Conv1D`` (``W = weight.T``) and ``nn.Conv2d``
with ``groups == 1`` (``W = weight`` reshaped to ``C_out × C_in·kh·kw``; P mixes output
channels per position, Q is an ``r × C_in × kh × kw`` kernel).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # GPT-2's transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


class LayerKind(Protocol):
    """The contract a targeted layer type fulfils, so hooks and rules never branch on layer type."""

    name: str

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """``(m, n)`` of W as a matrix."""

    def matrix(self, module: nn.Module) -> Tensor:
        """W as an ``m × n`` matrix (a view where possible)."""

    def as_matrix(self, weight: Tensor) -> Tensor:
        """A weight tensor (or the rows an FSDP2 shard holds) as rows of W."""

    dim0_is_rows: bool  # the stored weight's dim 0 indexes W's rows (so an FSDP2 shard holds whole rows)

    def down(self, g: Tensor, P: Tensor) -> Tensor:
        """``z = δ P``: the r-dimensional error."""

    def up(self, z: Tensor, Q: Tensor, module: nn.Module, x_shape: torch.Size) -> Tensor:
        """``z Q`` shaped like the layer's input."""

    def exact(self, g: Tensor, module: nn.Module, x_shape: torch.Size) -> Tensor:
        """Backprop's input gradient ``δ W``."""

    def rows(self, t: Tensor) -> Tensor:
        """Samples × features view of an error, compressed error or input."""

    def input_rows(self, g: Tensor, gx: Optional[Tensor], module: nn.Module) -> Tensor:
        """``δ W`` per sample as rows (patch space for a convolution)."""

    def z_x(self, z: Tensor, x: Tensor, module: nn.Module, Q: Tensor) -> Tensor:
        """``Σ zᵀ x``, the r × n correlation the local rules feed to Q."""

    def x_q(self, x: Tensor, Q: Tensor, module: nn.Module) -> Tensor:
        """``x Qᵀ`` per sample, as rows."""

    def samples(self, g: Tensor) -> int:
        """Samples in an output-shaped tensor."""


class LinearKind:
    """``a = x Wᵀ + b`` over any number of leading dimensions; each leading index is a sample."""

    name = "linear"

    @staticmethod
    def shape(module: nn.Module) -> tuple[int, int]:
        return tuple(module.weight.shape)

    dim0_is_rows = True

    @classmethod
    def matrix(cls, module: nn.Module) -> Tensor:
        return cls.as_matrix(module.weight)

    @staticmethod
    def as_matrix(weight: Tensor) -> Tensor:
        return weight

    @staticmethod
    def down(g: Tensor, P: Tensor) -> Tensor:
        return g @ P.to(g.dtype)

    @staticmethod
    def up(z: Tensor, Q: Tensor, module: nn.Module, x_shape: torch.Size) -> Tensor:
        return z @ Q.to(z.dtype)

    @staticmethod
    def exact(g: Tensor, module: nn.Module, x_shape: torch.Size) -> Tensor:
        return g @ module.weight.to(g.dtype)

    @staticmethod
    def rows(t: Tensor) -> Tensor:
        """Samples × features view of an error, compressed error or input."""
        return t.reshape(-1, t.shape[-1])

    @classmethod
    def z_x(cls, z: Tensor, x: Tensor, module: nn.Module, Q: Tensor) -> Tensor:
        """``Σ zᵀ x`` — the ``r × n`` correlation the local rules feed to Q."""
        return cls.rows(z).T @ cls.rows(x).to(z.dtype)

    @classmethod
    def x_q(cls, x: Tensor, Q: Tensor, module: nn.Module) -> Tensor:
        """``x Qᵀ`` per sample, as rows: the input seen through the feedback row space."""
        return cls.rows(x) @ Q.to(x.dtype).T

    @classmethod
    def input_rows(cls, g: Tensor, gx: Optional[Tensor], module: nn.Module) -> Tensor:
        """``δ W`` per sample, as rows; reuses the exact input gradient when it was computed."""
        if gx is not None:
            return cls.rows(gx)
        return cls.rows(g) @ cls.matrix(module).detach().to(g.dtype)

    @staticmethod
    def samples(g: Tensor) -> int:
        return g.numel() // g.shape[-1]


class Conv1DKind(LinearKind):
    """GPT-2 ``Conv1D``: a linear layer whose weight is stored transposed (``n × m``)."""

    name = "conv1d"

    @staticmethod
    def shape(module: nn.Module) -> tuple[int, int]:
        n, m = module.weight.shape
        return (m, n)

    dim0_is_rows = False  # stored n × m

    @staticmethod
    def as_matrix(weight: Tensor) -> Tensor:
        return weight.T

    @staticmethod
    def exact(g: Tensor, module: nn.Module, x_shape: torch.Size) -> Tensor:
        return g @ module.weight.to(g.dtype).T


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

    @staticmethod
    def shape(module: nn.Module) -> tuple[int, int]:
        c_out, c_in, kh, kw = module.weight.shape
        return (c_out, c_in * kh * kw)

    dim0_is_rows = True

    @classmethod
    def matrix(cls, module: nn.Module) -> Tensor:
        return cls.as_matrix(module.weight)

    @staticmethod
    def as_matrix(weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    @staticmethod
    def _kernel(Q: Tensor, module: nn.Module, dtype: torch.dtype) -> Tensor:
        return Q.to(dtype).reshape(Q.shape[0], *module.weight.shape[1:])

    @staticmethod
    def down(g: Tensor, P: Tensor) -> Tensor:
        return torch.einsum("nchw,cr->nrhw", g, P.to(g.dtype))

    @classmethod
    def up(cls, z: Tensor, Q: Tensor, module: nn.Module, x_shape: torch.Size) -> Tensor:
        kernel = cls._kernel(Q, module, z.dtype)
        return torch.nn.grad.conv2d_input(
            x_shape, kernel, z, module.stride, conv_padding(module), module.dilation
        )

    @staticmethod
    def exact(g: Tensor, module: nn.Module, x_shape: torch.Size) -> Tensor:
        return torch.nn.grad.conv2d_input(
            x_shape, module.weight.to(g.dtype), g, module.stride, conv_padding(module), module.dilation
        )

    @staticmethod
    def rows(t: Tensor) -> Tensor:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    @classmethod
    def z_x(cls, z: Tensor, x: Tensor, module: nn.Module, Q: Tensor) -> Tensor:
        grad = torch.nn.grad.conv2d_weight(
            x.to(z.dtype), (Q.shape[0], *module.weight.shape[1:]), z,
            module.stride, conv_padding(module), module.dilation,
        )
        return grad.reshape(Q.shape[0], -1)

    @classmethod
    def x_q(cls, x: Tensor, Q: Tensor, module: nn.Module) -> Tensor:
        out = F.conv2d(x, cls._kernel(Q, module, x.dtype), None, module.stride, conv_padding(module), module.dilation)
        return cls.rows(out)

    @classmethod
    def input_rows(cls, g: Tensor, gx: Optional[Tensor], module: nn.Module) -> Tensor:
        """``δ W`` per output position in patch space (C_in·kh·kw), as rows."""
        return cls.rows(g) @ cls.matrix(module).detach().to(g.dtype)

    @staticmethod
    def samples(g: Tensor) -> int:
        return g.numel() // g.shape[1]


def packed_weight_reason(module: nn.Module) -> Optional[str]:
    """Why a linear layer's weight is not a plain ``(out, in)`` float matrix (quantized or packed
    storage, e.g. bitsandbytes 4-bit), or ``None``; such layers are left exact."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return "it has no weight tensor"
    if not weight.is_floating_point():
        return f"its weight is stored as {weight.dtype}"
    if isinstance(module, nn.Linear) and tuple(weight.shape) != (module.out_features, module.in_features):
        return f"its weight has shape {tuple(weight.shape)}, not (out, in) = {(module.out_features, module.in_features)}"
    return None


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The layer kind LDFA can target, or ``None`` (embeddings, norms, grouped convs, packed weights, ...)."""
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
