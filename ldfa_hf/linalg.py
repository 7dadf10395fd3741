"""The linear algebra the rules share: seeded generators, truncated SVDs with canonical signs,
the factor initialisations, and the top-r subspace of a matrix seen through its sketch."""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def factor_generator(seed: int, name: str, step: int) -> torch.Generator:
    """Same seed on every process and every run: the name's CRC, not Python's salted hash."""
    mixed = (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + step) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def canonical_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so that U's largest entry in the column is positive: the SVD
    fixes a pair only up to sign, and this makes the factors a continuous function of W
    (the same on every process and machine, whatever order W's sums were taken in)."""
    pivot = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.where(U.gather(-2, pivot) < 0, -1.0, 1.0).to(U.dtype)
    return U * signs, Vh * signs.mT


def truncated_svd(W: Tensor, r: int, generator: torch.Generator, oversample: int = 8, power_iters: int = 2):
    """Top-r singular triplets of W; randomised (Halko et al.) when r is well below min(m, n)."""
    W = W.float()
    m, n = W.shape
    k = min(r + oversample, m, n)
    if 2 * k >= min(m, n):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, Vh = canonical_signs(U[:, :r], Vh[:r])
        return U, S[:r], Vh
    sketch = torch.randn(n, k, generator=generator).to(W.device)
    Y = W @ sketch
    for _ in range(power_iters):
        Y = W @ (W.T @ torch.linalg.qr(Y).Q)
    basis = torch.linalg.qr(Y).Q
    Ub, S, Vh = torch.linalg.svd(basis.T @ W, full_matrices=False)
    U, Vh = canonical_signs((basis @ Ub)[:, :r], Vh[:r])
    return U, S[:r], Vh


def svd_factors(W: Tensor, r: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``P = U_r S_r^½``, ``Q = S_r^½ V_rᵀ``: the best rank-r approximation of W, split evenly."""
    U, S, Vh = truncated_svd(W, r, generator)
    root = S.sqrt()
    return (U * root).contiguous(), (root[:, None] * Vh).contiguous()


def random_factors(W: Tensor, r: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Gaussian P, Q scaled so that ‖P Q‖ = ‖W‖ (task-agnostic feedback)."""
    m, n = W.shape
    P = torch.randn(m, r, generator=generator) / r**0.5
    Q = torch.randn(r, n, generator=generator) / n**0.5
    target = float(W.float().norm())
    if target > 0:
        scale = (target / float((P @ Q).norm())) ** 0.5
        P, Q = P * scale, Q * scale
    return P.to(W.device), Q.to(W.device)


def top_subspace(sketch: Tensor, omega: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-r eigenvectors (m × r, orthonormal) and eigenvalues of a PSD matrix C seen only
    through its sketch ``C Ω``: a single-pass Nyström approximation (Tropp et al., 2017),
    so the errors are read once and no m × m matrix is formed. Exact when rank(C) ≤ k.
    """
    m, k = sketch.shape
    Y, omega = sketch.double(), omega.to(sketch.device).double()
    if k >= m:  # Ω = I: the sketch is C itself
        values, vectors = torch.linalg.eigh((Y + Y.T) / 2)
        order = values.argsort(descending=True)[:r]
        return vectors[:, order].float(), values[order].clamp_min(0).float()
    shift = float(Y.norm()) * 1e-12
    Y = Y + shift * omega
    core = omega.T @ Y
    values, vectors = torch.linalg.eigh((core + core.T) / 2)
    keep = values > values.max().clamp_min(0) * 1e-10
    F = Y @ (vectors[:, keep] / values[keep].sqrt())  # Y (ΩᵀY)^{-1/2}: Ĉ = F Fᵀ
    U, S, _ = torch.linalg.svd(F, full_matrices=False)
    width = min(r, U.shape[1])
    P = U[:, :width]
    if width < r:  # fewer error directions than r: pad with any orthonormal complement
        P = torch.linalg.qr(torch.cat([P, omega[:, : r - width]], dim=1)).Q
    return P.float(), (S[:width] ** 2 - shift).clamp_min(0).float()
