"""``ssmjax._linalg``: Cholesky and triangular solves that never make a batched LAPACK call.

Values and derivatives are checked against ``jax.numpy.linalg.cholesky`` and
``jax.scipy.linalg.solve_triangular`` (float64), under every ``vmap`` arrangement; the compiled
programs of the vmapped Kalman paths that deadlocked are checked to factor one matrix per LAPACK
call. ``tests/test_lgssm_parallel.py::test_vmapped_library_path_does_not_deadlock`` runs them.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest

import ssmjax
from helpers import assert_allclose
from ssmjax import _linalg

RNG = np.random.default_rng(0)


def _spd(*lead, n=5):
    a = RNG.normal(size=lead + (n, n))
    return jnp.asarray(a @ np.swapaxes(a, -1, -2) + n * np.eye(n))


S = _spd(3, 4)
B = jnp.asarray(RNG.normal(size=(3, 4, 5, 2)))
CHOL = jnp.linalg.cholesky(S)


def _ref_solve(a, b, trans):
    if b.ndim == a.ndim - 1:  # a stack of vectors
        return jsl.solve_triangular(a, b[..., None], lower=True, trans=trans)[..., 0]
    return jsl.solve_triangular(a, b, lower=True, trans=trans)


def _solve(a, b, trans):
    return _linalg.solve_triangular(a, b, trans=trans)


@pytest.mark.parametrize("jit", [False, True])
def test_values_equal_the_library_functions(jit):
    wrap = jax.jit if jit else (lambda f: f)
    assert_allclose(wrap(_linalg.cholesky)(S), CHOL, jnp.float64)
    assert_allclose(wrap(_linalg.cholesky)(S[0, 0]), CHOL[0, 0], jnp.float64)
    for trans in "NT":
        f = wrap(lambda a, b: _solve(a, b, trans))  # noqa: B023
        assert_allclose(f(CHOL, B), _ref_solve(CHOL, B, trans), jnp.float64)
        assert_allclose(f(CHOL[0, 0], B[0, 0, :, 0]), _ref_solve(CHOL[0, 0], B[0, 0, :, 0], trans), jnp.float64)


@pytest.mark.parametrize("trans", ["N", "T"])
@pytest.mark.parametrize("axes", [(None, 0), (0, None), (0, 0), (1, 1)])
def test_every_vmap_arrangement(trans, axes):
    a, b = {
        (None, 0): (CHOL[0, 0], B[:, 0]),
        (0, None): (CHOL[0], B[0, 0]),
        (0, 0): (CHOL[0], B[0]),
        (1, 1): (CHOL, B[..., 0]),  # vector right-hand sides, mapped over the second axis
    }[axes]
    got = jax.jit(jax.vmap(lambda u, v: _solve(u, v, trans), axes))(a, b)
    assert_allclose(got, jax.vmap(lambda u, v: _ref_solve(u, v, trans), axes)(a, b), jnp.float64)
    # nested: a shared factor per outer entry, right-hand sides batched inside
    got = jax.vmap(jax.vmap(lambda u, v: _solve(u, v, trans), (None, 0)), (0, None))(CHOL[0], B[:, 0])
    ref = jax.vmap(jax.vmap(lambda u, v: _ref_solve(u, v, trans), (None, 0)), (0, None))(CHOL[0], B[:, 0])
    assert_allclose(got, ref, jnp.float64)
    assert_allclose(jax.vmap(_linalg.cholesky, 1)(S), jnp.swapaxes(CHOL, 0, 1), jnp.float64)


def _objective(chol_fn, solve_fn):
    def f(s, b):
        c = chol_fn(s)
        y = solve_fn(c, solve_fn(c, b, "N"), "T")
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.log(jnp.diagonal(c, axis1=-2, axis2=-1)))

    return f


MINE = _objective(_linalg.cholesky, _solve)
REF = _objective(jnp.linalg.cholesky, _ref_solve)


def test_derivatives_equal_the_library_rules():
    for got, ref in zip(jax.grad(MINE, (0, 1))(S, B), jax.grad(REF, (0, 1))(S, B)):
        assert_allclose(got, ref, jnp.float64)
    vg = jax.jit(jax.vmap(jax.grad(MINE, (0, 1)), (None, 0)))(S[0, 0], B[:, 0])
    for got, ref in zip(vg, jax.vmap(jax.grad(REF, (0, 1)), (None, 0))(S[0, 0], B[:, 0])):
        assert_allclose(got, ref, jnp.float64)
    tangents = (0.1 * S, B)
    assert_allclose(jax.jvp(MINE, (S, B), tangents)[1], jax.jvp(REF, (S, B), tangents)[1], jnp.float64)
    hess = jax.hessian(lambda s: MINE(s, B[0, 0]))(S[0, 0])
    assert_allclose(hess, jax.hessian(lambda s: REF(s, B[0, 0]))(S[0, 0]), jnp.float64)


def test_derivative_matches_finite_differences():
    s0, b0 = S[0, 0], B[0, 0]
    direction = jnp.asarray(RNG.normal(size=s0.shape))
    direction = direction + direction.T
    eps = 1e-6
    fd = (MINE(s0 + eps * direction, b0) - MINE(s0 - eps * direction, b0)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(jax.grad(MINE)(s0, b0), direction), fd, rtol=1e-6)


def _lapack_operands(program_text):
    """Shapes of the matrix operand of every LAPACK call in a compiled CPU program."""
    shapes = []
    for line in program_text.splitlines():
        if "custom_call_target=\"lapack_" not in line:
            continue
        operands = line.split("custom-call(", 1)[1]
        shapes.append(re.search(r"f(?:32|64)\[([\d,]*)\]", operands).group(1))
    return shapes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="LAPACK custom calls are the CPU lowering")
def test_vmapped_kalman_gradient_factors_one_matrix_per_lapack_call():
    rng = np.random.default_rng(1)
    dx, dy, T, batch = 10, 3, 6, 5
    q, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
    model = ssmjax.LGSSM(
        initial_mean=jnp.zeros(dx), initial_cov=jnp.eye(dx), transition_matrix=jnp.asarray(0.9 * q),
        transition_cov=0.1 * jnp.eye(dx), emission_matrix=jnp.asarray(rng.normal(size=(dy, dx))),
        emission_cov=0.5 * jnp.eye(dy),
    )
    ys = np.asarray(rng.normal(size=(batch, T, dy)))
    ys[:, 2, 0] = np.nan  # per-sequence covariances

    def total(m, ys):
        return jnp.sum(jax.vmap(lambda y: ssmjax.kalman_filter(m, y).marginal_loglik)(ys))

    text = jax.jit(jax.grad(total)).lower(model, jnp.asarray(ys)).compile().as_text()
    shapes = _lapack_operands(text)
    assert shapes, "the library path (Dx > 8) should call LAPACK"
    assert all(s.count(",") == 1 for s in shapes), shapes  # (n, n) or (n, k): no stack of matrices

    # equal to the sum of the single-sequence gradients (each a single-matrix LAPACK program)
    got = jax.grad(total)(model, jnp.asarray(ys))
    single = jax.jit(jax.grad(lambda m, y: ssmjax.kalman_filter(m, y).marginal_loglik))
    parts = [single(model, jnp.asarray(y)) for y in ys]
    for field in ("transition_matrix", "transition_cov", "emission_matrix", "emission_cov", "initial_cov"):
        ref = sum(getattr(p, field) for p in parts)
        assert_allclose(getattr(got, field), ref, jnp.float64, err_msg=field)
