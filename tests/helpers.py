"""Shared test utilities: per-dtype tolerances and small random models.

Tolerances live here and only here. Do not loosen one to make a test pass.
"""

from __future__ import annotations

import os

import numpy as np

# (rtol, atol) for comparing against an independent oracle.
TOLERANCES = {
    np.dtype("float64"): dict(rtol=1e-9, atol=1e-10),
    np.dtype("float32"): dict(rtol=2e-4, atol=1e-5),
}
# finite-difference gradient checks (float64 only; central differences)
FD_TOLERANCE = dict(rtol=1e-5, atol=1e-7)

# The suite compiles with XLA:CPU's classic fusion emitters and without LLVM's optimisation passes
# (set by conftest.py, which imports this module before JAX starts); this environment variable set to
# "1" keeps XLA's defaults instead (tests/test_default_compiler.py).
FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")
DEFAULT_COMPILER_ENV = "SSMJAX_TESTS_DEFAULT_COMPILER"


def tol(dtype) -> dict:
    """Tolerances for arrays of ``dtype``."""
    return TOLERANCES[np.dtype(dtype)]


def assert_allclose(actual, desired, dtype=None, **override):
    """``np.testing.assert_allclose`` with the dtype's tolerances."""
    actual = np.asarray(actual)
    dtype = np.dtype(dtype) if dtype is not None else actual.dtype
    kw = dict(tol(dtype))
    kw.update(override)
    np.testing.assert_allclose(actual, np.asarray(desired), **kw)


def random_stochastic_matrix(rng: np.random.Generator, shape, concentration=1.0, zeros=False):
    """Rows drawn from a Dirichlet; with ``zeros`` some entries are exact structural zeros."""
    probs = rng.dirichlet(np.full(shape[-1], concentration), size=shape[:-1])
    if zeros:
        mask = rng.random(probs.shape) < 0.3
        # keep at least one entry per row
        mask[..., 0] &= ~mask.all(axis=-1)
        probs = np.where(mask, 0.0, probs)
        probs = probs / probs.sum(-1, keepdims=True)
    return probs


def central_difference_grad(f, x, eps=1e-6):
    """Central finite differences of scalar ``f`` at ``x`` (float64 numpy)."""
    x = np.asarray(x, dtype=np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = eps
        g[idx] = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
    return g

# Square-root Kalman filter/smoother in float32 on a near-singular problem (emission noise std 1e-6 of
# the signal scale, T = 1000) against float64: covariance error relative to the largest covariance
# entry. The limit is the QR's backward error: float32 eps times the pre-array norm, which is kappa =
# sqrt(max predicted cov / filtered cov scale) ~ 1e6 times the factor being computed, so the bound is
# eps32 * kappa (0.107 on the test problem; measured 0.054 on this machine's CPU). The earlier fixed
# constant 5e-2 sat at half that bound and failed on a CPU whose LAPACK rounds differently (0.0538).
# The covariance form fails completely there (errors 1e5 times the scale).
def sqrt_float32_near_singular_cov_rtol(kappa: float) -> float:
    return float(np.finfo(np.float32).eps) * kappa


def pad_batch(ys, lengths, fill=np.nan):
    """``(B, max(lengths), ...)`` padded batch of the concatenated sequences ``ys`` (padding = ``fill``)."""
    dtype = np.result_type(ys.dtype, np.asarray(fill).dtype)
    out = np.full((len(lengths), max(lengths)) + ys.shape[1:], fill, dtype)
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = ys[start : start + n]
        start += n
    return out


def gaussian_conditional_moments(means, covs, y):
    """Per state ``k``: ``(E[y], Cov[y])`` given the observed (non-NaN) entries of ``y`` under
    ``N(means[k], covs[k])``, by NumPy block by block (``np.ix_``)."""
    o, m = ~np.isnan(y), np.isnan(y)
    dim = len(y)
    out = []
    for k in range(len(means)):
        ey, cov = means[k].copy(), np.zeros((dim, dim))
        ey[o] = y[o]
        if m.any():
            if o.any():
                gain = covs[k][np.ix_(m, o)] @ np.linalg.inv(covs[k][np.ix_(o, o)])
                ey[m] = means[k][m] + gain @ (y[o] - means[k][o])
                cov[np.ix_(m, m)] = covs[k][np.ix_(m, m)] - gain @ covs[k][np.ix_(o, m)]
            else:
                cov = covs[k].copy()
        out.append((ey, cov))
    return out


def enumerate_paths(initial_probs, transitions, log_likelihoods):
    """``(log p(y), p(z_t = k | y))`` of an HMM by summing over every state path (tiny T only).

    ``transitions`` is ``(K, K)`` or, time-varying, ``(T - 1, K, K)``; ``log_likelihoods`` ``(T, K)``.
    """
    import itertools

    lls = np.asarray(log_likelihoods)
    pi, trans = np.asarray(initial_probs), np.asarray(transitions)
    steps = len(lls)
    trans = np.broadcast_to(trans, (max(steps - 1, 0),) + trans.shape[-2:])
    total, marginals = 0.0, np.zeros_like(lls)
    for path in itertools.product(range(len(pi)), repeat=steps):
        p = pi[path[0]] * np.prod([trans[t, a, b] for t, (a, b) in enumerate(zip(path[:-1], path[1:]))])
        p *= np.exp(sum(lls[t, z] for t, z in enumerate(path)))
        total += p
        marginals[np.arange(steps), list(path)] += p
    return np.log(total), marginals / total


def child_env() -> dict:
    """The environment for a child process that starts JAX itself (its own platform and device
    count): this one's, without ``JAX_PLATFORMS``, and with ``XLA_FLAGS`` reduced to the
    compile-speed options that conftest.py set (the child's script adds its own flags)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if f in FAST_COMPILE_FLAGS]
    if kept:
        env["XLA_FLAGS"] = " ".join(kept)
    return env
