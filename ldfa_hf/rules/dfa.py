"""``dfa``: Direct Feedback Alignment (Nøkland 2016), a baseline."""

from __future__ import annotations

import math

import torch

from ..linalg import factor_generator
from .base import Rule


class DFA(Rule):
    """Every layer's input receives the output error through its own fixed random matrix B,
    instead of an error passed layer by layer.

    The output error is the one arriving at the last targeted layer in the model's module
    order (the head of a Hugging Face model); fixing it at attach time keeps gradient
    checkpointing's recomputed forwards from changing it. Its per-example error maps
    position by position when the layer's input has the same leading shape (tokens of a
    language model), otherwise through one matrix from the whole example's error to the
    whole input (images, pooled classifiers). B is kept in ``layer.P``, made from the seed
    at first use (so it is not stored in checkpoints).
    """

    name = "dfa"
    label = "DFA"
    full_rank = True
    has_factors = False

    def __init__(self, config) -> None:
        super().__init__(config)
        self.output_layer = None
        self.output_error = None  # the output layer's error in this backward

    def init_factors(self, W, r, generator):
        return None

    def attach(self, layers):
        super().attach(layers)
        self.output_layer = layers[-1]

    def input_grad(self, layer, g, x, x_shape, need_gx, collect):
        if layer is self.output_layer:
            self.output_error = g.detach()
        if not need_gx:
            return None
        error = self.output_error
        per_position = error.shape[:-1] == tuple(x_shape[:-1])
        e = error if per_position else error.reshape(x_shape[0], -1)
        width = x_shape[-1] if per_position else math.prod(x_shape[1:])
        if layer.P is None or tuple(layer.P.shape) != (e.shape[-1], width):
            gen = factor_generator(self.config.seed, layer.name, 0)
            layer.P = (torch.randn(e.shape[-1], width, generator=gen) / e.shape[-1] ** 0.5).to(error.device)
        return (e @ layer.P.to(e.dtype)).reshape(x_shape)
