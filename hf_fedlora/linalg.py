"""Low-rank linear algebra shared by the strategies and ``LoraAdapter.to_rank`` (pure float32 torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""The largest finite float32: past it a value (a fold, a norm) overflows to Inf."""


def pad_rows(a: torch.Tensor, rank: int) -> torch.Tensor:
    """``a`` ([r, in]) with zero rows appended up to ``rank`` rows, or cut to its first ``rank`` rows."""
    if a.shape[0] >= rank:
        return a[:rank]
    return torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)


def pad_cols(b: torch.Tensor, rank: int) -> torch.Tensor:
    """``b`` ([out, r]) with zero columns appended up to ``rank`` columns, or cut to its first ``rank``."""
    if b.shape[1] >= rank:
        return b[:, :rank]
    return torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)


def factored_svd(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``sum_k B_k @ A_k``, without forming the dense matrix.

    Stacks the factors (``[out, s]`` and ``[s, in]`` with ``s = sum r_k``), takes the R of a QR of
    each (the Q is never formed) and the leading singular triplets of the small ``s x s`` core
    (:func:`top_singular`), so the cost grows with ``s``, not with ``out x in``. The result is split
    evenly between the factors (``B = U sqrt(S)``, ``A = sqrt(S) V^T``) and is zero-padded when the
    sum has lower rank than asked (singular values under ``NEGLIGIBLE_SINGULAR`` times the largest
    count as zero).

    Args:
        bs: the ``B_k`` factors, ``[out, r_k]`` each (already scaled by any weight).
        as_: the ``A_k`` factors, ``[r_k, in]`` each.
        rank: the rank of the result.

    Returns:
        ``(A, B)`` with shapes ``[rank, in]`` and ``[out, rank]``, float32.
    """
    b_stack, a_stack = _stacks(bs, as_)
    if b_stack.shape[1] >= min(b_stack.shape[0], a_stack.shape[1]):
        # the stacked rank reaches the layer's size: the dense SVD is no more expensive
        u, s, vh = torch.linalg.svd((b_stack.double() @ a_stack.double()), full_matrices=False)
        keep = _kept(s[:rank])
        root = s[:keep].sqrt()
        b, a = u[:, :keep] * root, root[:, None] * vh[:keep]
        return pad_rows(a.float(), rank), pad_cols(b.float(), rank)
    # M = Q_b R_b R_a^T Q_a^T; with C = R_b R_a^T = U S V^T, M's singular vectors are Q_b U and
    # Q_a V, and since R_b^{-1} U = R_a^T V S^{-1} (and R_a^{-1} V = R_b^T U S^{-1}), neither Q is formed:
    # B' = B R_a^T V S^{-1/2} and A' = S^{-1/2} U^T R_b A
    r_b = torch.linalg.qr(b_stack, mode="r").R
    r_a = torch.linalg.qr(a_stack.T, mode="r").R
    # the core's product in float32 (its inputs' precision) unless that overflows, its leading
    # triplets in float64
    core = r_b @ r_a.T
    if not torch.isfinite(core).all():
        core = r_b.double() @ r_a.double().T
    u, s, vh = top_singular(core.double(), rank)
    keep = _kept(s)
    inv_root = s[:keep].rsqrt()
    # the small s x keep products in float64, the wide ones in float32 like the factors
    b = b_stack @ ((r_a.double().T @ vh[:keep].T) * inv_root).float()
    a = (inv_root[:, None] * (u[:, :keep].T @ r_b.double())).float() @ a_stack
    return pad_rows(a, rank), pad_cols(b, rank)


NEGLIGIBLE_SINGULAR = 1e-7
"""Singular values of a sum below this fraction of its largest are dropped by :func:`factored_svd`
(their share of the energy is under ``1e-14``; their directions are not resolvable in float32)."""


def _kept(s: torch.Tensor) -> int:
    """How many of the descending singular values ``s`` :func:`factored_svd` keeps; a NaN or Inf
    among them (non-finite inputs) raises ``RuntimeError``, as a failed SVD does, so the caller
    names the client instead of returning a silent zero module."""
    if not torch.isfinite(s).all():
        raise RuntimeError("factored_svd: the sum's singular values are not finite (NaN/Inf in its factors)")
    return int((s > s[0] * NEGLIGIBLE_SINGULAR).sum()) if s.numel() and s[0] > 0 else 0


PARTIAL_EIGH_MIN_SIZE = 256
"""From this core size on, :func:`top_singular` computes only the leading triplets when they are at
most a quarter of the core."""


def top_singular(core: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` leading singular triplets ``(U, S, Vh)`` of a CPU matrix, in float64 (another
    dtype is converted first), as ``torch.linalg.svd`` truncated to ``rank`` would give them
    (descending ``S``).

    A full SVD costs the whole spectrum; when few triplets of a large core are wanted and scipy is
    installed, only the leading eigenpairs of the Gram ``C C^T`` (its lower triangle, from BLAS
    ``syrk``) are computed (LAPACK's MRRR, ``syevr``, on an index range), and ``Vh = U^T C / S``.
    The rank-``rank`` product ``U S Vh = U U^T C`` is then the exact projection of ``C`` on those
    directions whatever the rounding of ``S``; float64 keeps the eigenvalues to ``1e-16 ||C||^2``.
    """
    core = core.double()
    size = min(core.shape)
    keep = min(rank, size)
    try:
        import scipy.linalg  # the `recipes` extra; without it, the full SVD
    except ImportError:
        scipy = None
    if scipy is None or keep == 0 or size < PARTIAL_EIGH_MIN_SIZE or 4 * keep > size:
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        return u[:, :keep], s[:keep], vh[:keep]
    import scipy.linalg.blas

    tall = core.shape[0] > core.shape[1]
    c = core.T if tall else core  # the Gram of the shorter side
    # its lower triangle only (BLAS syrk: half the products of c @ c.T), all that eigh reads
    gram = scipy.linalg.blas.dsyrk(1.0, c.numpy(), lower=1)
    if not torch.isfinite(torch.from_numpy(gram)).all():
        raise RuntimeError("top_singular: the core is not finite (NaN/Inf in its factors)")
    values, vectors = scipy.linalg.eigh(
        gram,
        lower=True,
        subset_by_index=[gram.shape[0] - keep, gram.shape[0] - 1],
        driver="evr",
        check_finite=False,
    )
    values, vectors = torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())
    s = values.clamp(min=0.0).sqrt()
    other = (vectors.T @ c) / torch.where(s > 0, s, 1.0)[:, None]  # rows of zero S: zero directions
    other[s == 0] = 0.0
    if tall:  # c = core^T: its left vectors are the core's right ones
        return other.T, s, vectors.T
    return vectors, s, other


def squared_update_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||B @ A||_F^2`` from the ``r x r`` Gram matrices (``sum((B^T B) * (A A^T))``), without
    forming ``B @ A``; clamped at zero against rounding."""
    return ((b.T @ b) * (a @ a.T)).sum().clamp(min=0.0)


def update_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||B @ A||_F`` of a factor pair (``a``: ``[r, in]``, ``b``: ``[out, r]``), without forming ``B @ A``.

    Returns:
        A 0-dim tensor in the factors' dtype.
    """
    return torch.sqrt(squared_update_norm(a, b))


def lora_a_init(num_rows: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """``num_rows`` fresh LoRA-A rows as PEFT initialises them (kaiming-uniform with ``a=sqrt(5)``):
    uniform in ``[-1/sqrt(in_features), 1/sqrt(in_features))``, drawn from ``generator``.

    Returns:
        A float32 tensor ``[num_rows, in_features]`` (reshape it for convolution layers).
    """
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(num_rows, in_features, generator=generator) * 2 - 1) * bound


def empty_directions(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Which slots of an SVD factor pair (``B = U sqrt(S)``, ``A = sqrt(S) V^T``) carry a singular
    value of (numerically) zero: ``||A_k|| ||B_k|| = s_k <= rtol * max(s)``. A boolean ``[r]`` mask."""
    strength = a.norm(dim=1) * b.norm(dim=0)
    return strength <= rtol * strength.max() if strength.numel() else strength.bool()


def _stacks(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b.float() for b in bs], dim=1), torch.cat([a.float() for a in as_], dim=0)


def randomized_factored_svd(
    bs: Sequence[torch.Tensor],
    as_: Sequence[torch.Tensor],
    rank: int,
    *,
    oversample: int = 16,
    power_iterations: int = 2,
    probes: int = 20,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A rank-``rank`` approximation of ``M = sum_k B_k @ A_k`` by a randomised range finder (Halko,
    Martinsson & Tropp, SIAM Review 2011, algorithms 4.3/4.4), never forming ``M``: every product
    with ``M`` or ``M^T`` is two products with the stacked factors.

    ``Y = M Omega`` for a Gaussian ``Omega`` of ``rank + oversample`` columns drawn from a generator
    seeded with ``seed`` (so the result is reproducible), ``power_iterations`` rounds of
    ``M^T``/``M`` with re-orthonormalisation (QR) in between, ``Q = qr(Y)``, then the SVD of the small
    ``Q^T M`` (in float64), truncated to ``rank``.

    Also returns a certificate: an upper bound on ``(||M - M_r||_F^2 - ||M - M_e||_F^2) / ||M||_F^2``,
    the share of ``M``'s energy that the result ``M_r`` misses beyond the exact truncation ``M_e``.
    By Ky Fan's inequality on ``M^T M = M^T P M + M^T (I - P) M`` (``P = Q Q^T``) that excess is at
    most ``||(I - P) M||_F^2``, and ``||M||_F^2 >= ||Q^T M||_F^2``. The residual's energy is bounded
    from ``probes`` Gaussian vectors: ``sum_j ||(I - P) M w_j||^2`` is a weighted sum of chi-square
    variables of mean ``probes ||(I - P) M||_F^2``, whose lower tail is heaviest when one direction
    carries all the weight (Szekely & Bakirov, 2003), so with 20 probes it is below
    ``||(I - P) M||_F^2`` with probability ``P(chi2_20 <= 1) < 2e-10``. For spectra without decay
    (independent random updates) the bound is large; for updates that share directions it is small.

    Returns:
        ``(A, B, bound)``: ``[rank, in]`` and ``[out, rank]`` float32, and the certificate.
    """
    b_stack, a_stack = _stacks(bs, as_)
    width = min(rank + oversample, b_stack.shape[1], b_stack.shape[0], a_stack.shape[1])
    generator = torch.Generator().manual_seed(seed)

    def apply(x: torch.Tensor) -> torch.Tensor:  # M x
        return b_stack @ (a_stack @ x)

    def apply_t(y: torch.Tensor) -> torch.Tensor:  # M^T y
        return a_stack.T @ (b_stack.T @ y)

    omega = torch.randn(a_stack.shape[1], width, generator=generator)
    q = torch.linalg.qr(apply(omega)).Q
    for _ in range(power_iterations):
        z = torch.linalg.qr(apply_t(q)).Q
        q = torch.linalg.qr(apply(z)).Q
    core = (q.T @ b_stack).double() @ a_stack.double()  # Q^T M, [width, in]
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    b = (q.double() @ u[:, :keep]) * root
    a = root[:, None] * vh[:keep]
    # certificate: sum_j ||(I - QQ^T) M w_j||^2 >= ||(I - QQ^T) M||_F^2 but with probability < 2e-10
    w = torch.randn(a_stack.shape[1], probes, generator=generator)
    mw = apply(w).double()
    residual = mw - q.double() @ (q.double().T @ mw)
    energy = float((s**2).sum())
    bound = float((residual**2).sum()) / energy if energy > 0 else 0.0
    return pad_rows(a.float(), rank), pad_cols(b.float(), rank), bound
