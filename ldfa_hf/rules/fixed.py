"""``fixed`` and ``fa``: random feedback that never learns (the ablation, and classic FA)."""

from __future__ import annotations

from .base import Rule


class Fixed(Rule):
    """Random low-rank feedback, never updated: task-agnostic, so it can misassign credit."""

    name = "fixed"
    label = "fixed low-rank"


class FA(Fixed):
    """Classic Feedback Alignment (Lillicrap 2016): fixed random feedback at full rank."""

    name = "fa"
    label = "FA"
    full_rank = True
