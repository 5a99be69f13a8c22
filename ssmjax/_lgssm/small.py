"""Dense linear algebra for the Kalman recursions, in two interchangeable flavours.

On CPU, a Kalman step at small dimensions is dominated by the fixed cost of each
LAPACK/BLAS custom call (``cholesky``, ``triangular_solve``, ``dot``) inside the
``lax.scan``, not by arithmetic. :class:`SmallOps` writes the same operations as
elementwise arithmetic unrolled over the (static, small) matrix size -- a
column-by-column Cholesky, forward/backward substitution, broadcast-multiply-sum
products -- which XLA fuses into a handful of loop kernels. :class:`GeneralOps`
calls the library routines and is used for larger dimensions.

Both are exact (same algorithm, same rounding class); ``tests/test_lgssm_inference.py``
checks that they agree. :func:`choose_ops` picks one from the dimensions; the
thresholds were measured with ``benchmarks/lgssm_inference.py``.

All matrix products use ``Precision.HIGHEST`` on GPU/TPU (no TF32/bf16 passes); see
:func:`matmul_precision`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _linalg

HIGHEST = jax.lax.Precision.HIGHEST


def matmul_precision():
    """``HIGHEST`` on accelerators (no TF32/bf16 passes); on CPU float32 dots are always
    full precision and the explicit flag only selects a slower code path, so it is omitted."""
    return None if jax.default_backend() == "cpu" else HIGHEST

# Use the unrolled elementwise path when every matrix that is factorised inside the
# scan is at most this size (the filter factorises the Dy x Dy innovation covariance;
# products involve Dx). Measured on a 2-core CPU (benchmarks/lgssm_inference.py):
# at (Dx, Dy) = (8, 4) the unrolled path is faster, at (32, 8) the library path is.
SMALL_MAX_DX = 8
SMALL_MAX_DY = 8


def symmetrize(m):
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


class GeneralOps:
    """Library (BLAS/LAPACK) implementations; batched over leading axes.

    Factorisations and triangular solves go through :mod:`ssmjax._linalg`: on CPU a single matrix
    is one LAPACK call and a stack of matrices (what ``jax.vmap`` and the derivative rules make of
    per-sequence covariances) one LAPACK call per matrix, since batched LAPACK calls running at
    once can deadlock XLA:CPU.
    """

    name = "general"

    @staticmethod
    def mm(a, b):
        return jnp.matmul(a, b, precision=matmul_precision())

    @staticmethod
    def mv(a, x):
        return jnp.matmul(a, x[..., None], precision=matmul_precision())[..., 0]

    @staticmethod
    def cholesky(s):
        return _linalg.cholesky(s)

    @staticmethod
    def solve_lower(chol, b):
        """``chol^{-1} b`` for lower-triangular ``chol`` and matrix ``b``."""
        return _linalg.solve_triangular(chol, b)

    @staticmethod
    def solve_lower_t(chol, b):
        """``chol^{-T} b``."""
        return _linalg.solve_triangular(chol, b, trans="T")

    @staticmethod
    def cholesky_solve_lower(s, b):
        """``(log diag(L), L^{-1} b)`` with ``L L^T = s``: the filter's factor-and-solve."""
        chol = _linalg.cholesky(s)
        return jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), _linalg.solve_triangular(chol, b)

    @staticmethod
    def lu_solve_both(X, rhs, rhs_t):
        """``(X^{-1} rhs, X^{-T} rhs_t)`` with LAPACK (LU with partial pivoting), as one batched solve of the
        stacked systems ``[X, X^T]``: a single getrf -> trsm -> trsm chain.

        Two independent LAPACK calls in one program (say, one LU and two ``lu_solve``) can deadlock
        XLA:CPU with jaxlib 0.10.2: its batched LAPACK kernels split a large batch into chunks on the
        intra-op thread pool and block until they finish, so when as many such calls run at once as the
        pool has threads (two on a 2-core machine), every thread waits for chunks that no thread is free
        to run. The vmapped parallel filter hung that way in about half of the runs; see
        ``benchmarks/lapack_deadlock.py``. Factorising X^T again costs one more small LU per combination.
        """
        width, width_t = rhs.shape[-1], rhs_t.shape[-1]
        m = max(width, width_t)
        pad = lambda b: jnp.concatenate([b, jnp.zeros(b.shape[:-1] + (m - b.shape[-1],), b.dtype)], axis=-1)  # noqa: E731
        both = jnp.linalg.solve(jnp.stack([X, jnp.swapaxes(X, -1, -2)]), jnp.stack([pad(rhs), pad(rhs_t)]))
        return both[0][..., :width], both[1][..., :width_t]


class SmallOps:
    """Elementwise implementations unrolled over the (static) matrix size."""

    name = "small"

    @staticmethod
    def mm(a, b):
        return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)

    @staticmethod
    def mv(a, x):
        return jnp.sum(a * x[..., None, :], axis=-1)

    @staticmethod
    def cholesky(s):
        n = s.shape[-1]
        if n == 1:
            return jnp.sqrt(s)
        # column j of L: (s[:, j] - sum_{k<j} L[:, k] L[j, k]) / sqrt(pivot), zero above j
        cols = []
        rows_idx = jnp.arange(n)
        for j in range(n):
            c = s[..., :, j]
            for k in range(j):
                c = c - cols[k] * cols[k][..., j : j + 1]
            pivot = c[..., j : j + 1]
            c = jnp.where(rows_idx >= j, c / jnp.sqrt(pivot), 0.0)
            cols.append(c)
        return jnp.stack(cols, axis=-1)

    @staticmethod
    def solve_lower(chol, b):
        n = chol.shape[-1]
        if n == 1:
            return b / chol
        rows = []
        for i in range(n):
            r = b[..., i, :]
            for k in range(i):
                r = r - chol[..., i, k : k + 1] * rows[k]
            rows.append(r / chol[..., i, i : i + 1])
        return jnp.stack(rows, axis=-2)

    @staticmethod
    def cholesky_solve_lower(s, b):
        """``(log diag(L), L^{-1} b)`` with ``L L^T = s`` in one unrolled pass.

        Each pivot costs one ``rsqrt`` and everything else is multiply-add (no divisions),
        so XLA fuses the factorisation and the substitution into fewer kernels per scan
        step than :meth:`cholesky` followed by :meth:`solve_lower`.
        """
        n = s.shape[-1]
        rows_idx = jnp.arange(n)
        cols, inv, log_diag = [], [], []
        for j in range(n):
            c = s[..., :, j]
            for k in range(j):
                c = c - cols[k] * cols[k][..., j : j + 1]
            pivot = c[..., j : j + 1]
            inv_j = jax.lax.rsqrt(pivot)
            cols.append(jnp.where(rows_idx >= j, c * inv_j, 0.0) if n > 1 else c * inv_j)
            inv.append(inv_j)
            log_diag.append(0.5 * jnp.log(pivot))
        rows = []
        for i in range(n):
            r = b[..., i, :]
            for k in range(i):
                r = r - cols[k][..., i : i + 1] * rows[k]
            rows.append(r * inv[i])
        return jnp.concatenate(log_diag, axis=-1), jnp.stack(rows, axis=-2)

    @staticmethod
    def solve_lower_t(chol, b):
        n = chol.shape[-1]
        if n == 1:
            return b / chol
        rows = [None] * n
        for i in reversed(range(n)):
            r = b[..., i, :]
            for k in range(i + 1, n):
                r = r - chol[..., k, i : i + 1] * rows[k]
            rows[i] = r / chol[..., i, i : i + 1]
        return jnp.stack(rows, axis=-2)

    @staticmethod
    def lu_solve_both(X, rhs, rhs_t):
        """:meth:`GeneralOps.lu_solve_both` unrolled over the (static, small) size: the same algorithm as LAPACK's
        ``getrf`` -- Gaussian elimination with partial pivoting (largest magnitude in the column, first
        one on ties), multipliers stored in place -- written as elementwise arithmetic on rows, so
        that XLA fuses the factorisation and both solves into a few loop kernels (on a GPU, instead of
        batched solver calls for tiny matrices). Batched over leading axes."""
        n = X.shape[-1]
        cols = jnp.arange(n)
        rows = [X[..., i, :] for i in range(n)]  # (..., n) each; L below the diagonal, U on and above
        b_rows = [rhs[..., i, :] for i in range(n)]
        perm = [jnp.full(X.shape[:-2], i, jnp.int32) for i in range(n)]  # row i of P X is row perm[i] of X
        for k in range(n):
            # pivot: the first row i >= k with the largest |X[i, k]| (what LAPACK's i*amax picks)
            best, piv = jnp.abs(rows[k][..., k]), jnp.full(X.shape[:-2], k, jnp.int32)
            for i in range(k + 1, n):
                mag = jnp.abs(rows[i][..., k])
                take = mag > best
                best, piv = jnp.where(take, mag, best), jnp.where(take, i, piv)
            old_k, old_b, old_p = rows[k], b_rows[k], perm[k]
            for i in range(k + 1, n):  # swap rows k and piv
                sel = piv == i
                rows[k] = jnp.where(sel[..., None], rows[i], rows[k])
                b_rows[k] = jnp.where(sel[..., None], b_rows[i], b_rows[k])
                perm[k] = jnp.where(sel, perm[i], perm[k])
                rows[i] = jnp.where(sel[..., None], old_k, rows[i])
                b_rows[i] = jnp.where(sel[..., None], old_b, b_rows[i])
                perm[i] = jnp.where(sel, old_p, perm[i])
            inv_pivot = 1.0 / rows[k][..., k : k + 1]
            for i in range(k + 1, n):
                factor = rows[i][..., k : k + 1] * inv_pivot
                rows[i] = jnp.where(cols > k, rows[i] - factor * rows[k], jnp.where(cols == k, factor, rows[i]))
                b_rows[i] = b_rows[i] - factor * b_rows[k]
        # X sol = rhs: back substitution with U (rhs already permuted and eliminated)
        sol = [None] * n
        for i in reversed(range(n)):
            acc = b_rows[i]
            for k in range(i + 1, n):
                acc = acc - rows[i][..., k : k + 1] * sol[k]
            sol[i] = acc / rows[i][..., i : i + 1]
        # X^T sol_t = rhs_t with X = P^T L U: U^T w = rhs_t, L^T v = w, sol_t = P^T v
        w = [None] * n
        for i in range(n):
            acc = rhs_t[..., i, :]
            for k in range(i):
                acc = acc - rows[k][..., i : i + 1] * w[k]
            w[i] = acc / rows[i][..., i : i + 1]
        v = [None] * n
        for i in reversed(range(n)):
            acc = w[i]
            for k in range(i + 1, n):
                acc = acc - rows[k][..., i : i + 1] * v[k]
            v[i] = acc
        sol_t = []
        for j in range(n):  # sol_t[perm[i]] = v[i]
            acc = jnp.zeros_like(v[0])
            for i in range(n):
                acc = jnp.where((perm[i] == j)[..., None], v[i], acc)
            sol_t.append(acc)
        return jnp.stack(sol, axis=-2), jnp.stack(sol_t, axis=-2)


def choose_ops(state_dim: int, emission_dim: int, force: str | None = None):
    """The ops flavour for these dimensions (``force`` = "small"/"general" for tests)."""
    if force == "small":
        return SmallOps
    if force == "general":
        return GeneralOps
    if state_dim <= SMALL_MAX_DX and emission_dim <= SMALL_MAX_DY:
        return SmallOps
    return GeneralOps


def psd_cholesky(m):
    """A lower-triangular factor ``L`` with ``L L^T = m`` for symmetric PSD ``m`` (batched).

    Unlike :func:`jax.numpy.linalg.cholesky` it accepts singular matrices: a pivot
    that is zero (relative to the largest diagonal entry) gives a zero column.
    Gradients are finite (double ``where`` around the square root and division).
    """
    n = m.shape[-1]
    eps = jnp.finfo(m.dtype).eps
    scale = jnp.max(jnp.abs(jnp.diagonal(m, axis1=-2, axis2=-1)), axis=-1, keepdims=True)
    tiny = n * eps * scale
    rows_idx = jnp.arange(n)
    cols = []
    for j in range(n):
        c = m[..., :, j]
        for k in range(j):
            c = c - cols[k] * cols[k][..., j : j + 1]
        pivot = c[..., j : j + 1]
        ok = pivot > tiny
        root = jnp.sqrt(jnp.where(ok, pivot, 1.0))
        c = jnp.where(ok & (rows_idx >= j), c / root, 0.0)
        cols.append(c)
    return jnp.stack(cols, axis=-1)
