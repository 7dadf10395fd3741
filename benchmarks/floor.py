"""The speed floor as a rule: the hooks' weight-gradient path with a zero input gradient.

It is the fastest any LDFA rule could be (no feedback or rule work at all), so
``benchmarks.speed`` reports each rule's share of the floor's saving. Registered like any
user rule: ``LDFAConfig(rule="floor")`` works once this module is imported.
"""

from __future__ import annotations

import ldfa_hf
from ldfa_hf.rules import Fixed


@ldfa_hf.register_rule
class Floor(Fixed):
    """Zero feedback: what the hooks cost when nothing is sent down."""

    name = "floor"
    label = "floor (zero feedback)"

    def init_factors(self, W, r, generator):
        return None  # no factors to make or store

    has_factors = False

    def input_grad(self, layer, g, x, x_shape, need_gx, collect):
        return g.new_zeros(x_shape) if need_gx else None
