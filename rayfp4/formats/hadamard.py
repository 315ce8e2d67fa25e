"""The 16x16 random Hadamard transform (RHT) of the Wgrad operands.

``H = (1/4) * diag(s) * H16``, with ``H16`` the Sylvester Hadamard matrix and ``s`` a sign vector
(by default the fixed one shared with the paper and Transformer Engine). Each tile of 16
consecutive elements ``v`` of a row (along the last dimension) becomes ``v @ H``: signs first,
then the Hadamard butterfly, then the factor 1/4. ``H`` is orthonormal, so applying it to both
operands of ``dW = dY^T X`` along their shared K dimension leaves the product unchanged.

The reference computes the transform as a fixed sequence of FP32 operations -- the exact sign
flip, four radix-2 butterfly stages (each ``a + b`` / ``a - b`` rounded to FP32), then the exact
multiplication by 1/4 -- so that fast kernels can reproduce it bit for bit. A dense matmul with
the same matrix agrees up to FP32 summation order.
"""

from __future__ import annotations

import functools

import torch

RHT_SIZE = 16

#: The fixed sign vector of the recipe (NVFP4_RECIPE.md section 4).
DEFAULT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def sylvester_hadamard(n: int = RHT_SIZE) -> torch.Tensor:
    """The unnormalised n x n Sylvester Hadamard matrix (n a power of two), FP32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def _default_signs_cpu() -> torch.Tensor:
    return torch.tensor(DEFAULT_SIGNS, dtype=torch.float32)


def random_signs(seed: int) -> torch.Tensor:
    """A reproducible random sign vector (e.g. one per layer) as an alternative to the default."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (RHT_SIZE,), generator=g).to(torch.float32) * 2 - 1


def _signs(signs: torch.Tensor | None, device) -> torch.Tensor:
    s = _default_signs_cpu() if signs is None else signs
    if s.shape != (RHT_SIZE,) or not bool(((s == 1) | (s == -1)).all()):
        raise ValueError(f"RHT signs must be a vector of {RHT_SIZE} entries of +-1, got {tuple(s.shape)}")
    return s.to(device=device, dtype=torch.float32)


def rht_matrix(signs: torch.Tensor | None = None) -> torch.Tensor:
    """The dense orthonormal matrix ``H = (1/4) diag(s) H16`` (FP32), for checks and docs."""
    s = _signs(signs, "cpu")
    return s[:, None] * sylvester_hadamard() * 0.25


def _butterfly(v: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the last dim (a power of two), Sylvester order:
    log2(n) radix-2 stages, each ``a + b`` / ``a - b`` rounded to FP32."""
    lead, n = v.shape[:-1], v.shape[-1]
    h = 1
    while h < n:
        w = v.reshape(*lead, n // (2 * h), 2, h)
        a, b = w[..., 0, :], w[..., 1, :]
        v = torch.stack([a + b, a - b], dim=-2).reshape(*lead, n)
        h *= 2
    return v


def _check(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.shape[-1] % RHT_SIZE:
        raise ValueError(
            f"{what}: the last dimension ({x.shape[-1]}) of shape {tuple(x.shape)} must be a "
            f"multiple of {RHT_SIZE} for the 16x16 Hadamard transform"
        )


def rht(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``v -> v @ H`` to every 16-element tile along the last dim of a 2-D tensor. FP32 out."""
    _check(x, "rht")
    m, k = x.shape
    v = x.to(torch.float32).reshape(m, k // RHT_SIZE, RHT_SIZE) * _signs(signs, x.device)
    return (_butterfly(v) * 0.25).reshape(m, k)


def inverse_rht(y: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Undo :func:`rht`: ``w -> w @ H^T`` (Hadamard butterfly, then signs, then 1/4). FP32 out."""
    _check(y, "inverse_rht")
    m, k = y.shape
    v = _butterfly(y.to(torch.float32).reshape(m, k // RHT_SIZE, RHT_SIZE))
    return (v * _signs(signs, y.device) * 0.25).reshape(m, k)
