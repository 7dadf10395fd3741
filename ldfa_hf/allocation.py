"""Which residual branches skip their backward this step: rates from measured sensitivity, then a
seeded draw.

The sensitivity of a branch is its error gain, ``‖J_bᵀ δ‖ / ‖δ‖``: how much error it adds to the
residual stream's on the way down, measured on the steps it ran exact. Skipping a branch drops
that error from every layer below it and its adapters' update for the step, so branches that add
little are skipped more often: ``p_b = min(cap, c / gain_b)``, with ``c`` set so that the rates
average the configured share. The cap keeps every branch's adapters learning on at least
``1 − cap`` of the steps (docs/METHOD.md §3e).

The draw is a function of (seed, step) alone, so every process makes the same one and a resumed
run repeats the uninterrupted run's draws. It is systematic sampling in a shuffled order: each
branch is skipped with exactly its rate, and every step skips the same number of branches
(``round(Σ p_b)`` give or take one), so no step is slow by chance. A random cut
(``draw_cut``) instead skips a bottom prefix of a uniformly drawn length, so every branch above
it runs exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_SKIP = 0.75  # no branch skips more often than this


def uniform_rates(n: int, mean: float) -> Tensor:
    return torch.full((n,), float(mean), dtype=torch.float64)


def bottom_rates(n: int, mean: float) -> Tensor:
    """The bottom ``round(mean · n)`` branches (bottom first) skip on every step, the rest never."""
    rates = torch.zeros(n, dtype=torch.float64)
    rates[:round(mean * n)] = 1.0
    return rates


def cut_bounds(n: int, mean: float, width: float = 0.5) -> tuple[int, int]:
    """The range ``[lo, hi]`` of a random cut: the number of bottom branches skipped, uniform over it,
    centred on ``mean · n`` and never all ``n``. ``width`` is its share of the widest such range
    (1: from no branch to all but one at ``mean`` 0.5; 0: a fixed cut). With the default, half, at
    ``mean`` 0.5 the bottom quarter of the branches always skips and the top quarter never does;
    the widest range lost 5 points more on SmolLM2 (RESULTS.md h)."""
    if n == 0 or mean <= 0:
        return 0, 0
    centre = min(mean * n, n - 1)
    radius = width * min(centre, n - 1 - centre)
    return round(centre - radius), round(centre + radius)


def cut_rates(lo: int, hi: int, n: int) -> Tensor:
    """Each branch's probability of lying below a cut drawn uniformly from ``[lo, hi]`` (bottom first)."""
    below = torch.tensor([max(0, hi - max(i, lo - 1)) for i in range(n)], dtype=torch.float64)
    return below / (hi - lo + 1)


def draw_cut(lo: int, hi: int, n: int, seed: int, step: int) -> Tensor:
    """A bool mask, True = skip: the bottom ``c`` branches, ``c`` uniform in ``[lo, hi]``, the same on
    every process for the same (seed, step). Every branch above the cut runs exact, so no adapter
    learns from an error that a skipped branch above it has left incomplete."""
    cut = int(torch.randint(lo, hi + 1, (), generator=_generator(seed, step)))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:cut] = True
    return mask


def depth_rates(depths: Tensor, mean: float, cap: float = MAX_SKIP) -> Tensor:
    """Falling linearly from the bottom block to 0 at the top, averaging ``mean`` (capped)."""
    top = float(depths.max()) if depths.numel() else 0.0
    shape = 1.0 - depths.double() / max(top, 1.0)
    return _scaled(shape, mean, cap)


def sensitivity_rates(gain: Tensor, mean: float, cap: float = MAX_SKIP) -> Tensor:
    """``min(cap, c / gain)`` averaging ``mean``; a branch not measured yet (NaN) is never skipped,
    one that sends nothing down (gain 0) is skipped at the cap."""
    gain = gain.double()
    measured = ~torch.isnan(gain)
    shape = torch.where(measured, 1.0 / gain.nan_to_num(1.0).clamp_min(1e-12), torch.zeros_like(gain))
    return _scaled(shape, mean, cap)


def _scaled(shape: Tensor, mean: float, cap: float) -> Tensor:
    """``min(cap, c · shape)`` with ``c`` found by bisection so that the mean is ``mean`` (or as
    close as the cap allows)."""
    n = shape.numel()
    if n == 0 or mean <= 0 or float(shape.max()) <= 0:
        return torch.zeros_like(shape)
    target = min(mean, cap * float((shape > 0).sum()) / n)
    lo, hi = 0.0, cap / float(shape[shape > 0].min())
    for _ in range(60):
        c = (lo + hi) / 2
        if float((c * shape).clamp(max=cap).mean()) < target:
            lo = c
        else:
            hi = c
    return (hi * shape).clamp(max=cap)


def draw(rates: Tensor, seed: int, step: int, independent: bool = False) -> Tensor:
    """A bool mask, True = skip this step: branch b with probability ``rates[b]``, the same on every
    process for the same (seed, step). Systematic (a near-constant count per step), or
    ``independent`` (one coin per branch: what an unbiased product of branches needs, since the
    error below two branches multiplies their two coins)."""
    n = rates.numel()
    if n == 0 or float(rates.sum()) == 0:
        return torch.zeros(n, dtype=torch.bool)
    generator = _generator(seed, step)
    if independent:
        mask = torch.rand(n, generator=generator, dtype=torch.float64) < rates.double()
        if bool(mask.all()):  # never every branch: the loss would reach no trainable weight
            mask[int(torch.argmin(rates))] = False
        return mask
    order = torch.randperm(n, generator=generator)
    offset = float(torch.rand((), generator=generator, dtype=torch.float64))
    ends = torch.cumsum(rates.double()[order], 0)
    starts = ends - rates.double()[order]
    # a point offset + k (k = 0, 1, ...) falling in [start, end) picks that branch
    picked = torch.floor(ends - offset) > torch.floor(starts - offset)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order] = picked
    return mask


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))
