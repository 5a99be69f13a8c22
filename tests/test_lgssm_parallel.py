"""Parallel-in-time (associative-scan) Kalman filter and RTS smoother against the sequential ones and the oracle.

Tolerances (``helpers.TOLERANCES``):

* float64, parallel vs sequential ``ssmjax.kalman_filter`` / ``ssmjax.rts_smoother`` (every field, incl.
  ``smoothed_cross_covs``, padded outputs, vmapped ragged batches) and vs the dense-Gaussian oracle:
  ``helpers.tol(float64)`` = ``rtol=1e-9, atol=1e-10``; observed ~1e-15.
* float64 gradients (log-likelihood and a function of every smoothed output, w.r.t. all model fields and
  the emissions) vs the sequential ones: ``helpers.tol(float64)``; observed ~1e-14.
* float32, benign problem (Dx = 4, Dy = 2, stable dynamics, T = 2000): filtered and smoothed means within
  ``helpers.tol(float32)`` (``rtol=2e-4, atol=1e-5``) of float64, log-likelihood within relative
  ``2e-4`` (``helpers.tol(float32)['rtol']``). Observed: means ~7e-7 and covariances ~8e-8 absolute
  (values of order 1), log-likelihood ~4e-8 relative (see ``test_float32_long_sequence``).
* Test time is dominated by XLA compilation of the associative scan (one copy of the combine per tree
  level: ~20-30 s for ``T = 10^4`` on a shared 2-core CPU).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_allclose, tol
from test_lgssm_inference import CONFIGS, FIELDS, _pad, make_case, make_params, to_model
from test_lgssm_oracle import oracle

from ssmjax._lgssm.params import FIELDS as FIELD_NAMES

import ssmjax

# the parallel-in-time algorithms, reached through the public functions
kalman_filter_parallel = functools.partial(ssmjax.kalman_filter, parallel=True)
rts_smoother_parallel = functools.partial(ssmjax.rts_smoother, parallel=True)
from ssmjax._lgssm import parallel, small

F64 = tol(np.float64)
FILTER_FIELDS = FIELDS[:5]


def _close(a, b, fields=FIELDS):
    for field in fields:
        got, want = np.asarray(getattr(a, field)), np.asarray(getattr(b, field))
        assert got.shape == want.shape, field
        np.testing.assert_allclose(got, want, err_msg=field, **F64)


def _grads_close(g_par, g_seq, pad_from=None):
    """Model gradients field by field (covariances: symmetric parts, the only meaningful ones for a
    symmetric parameter), then any other arguments; ``pad_from`` = (T, ...) checks zeros past T."""
    (m_par, *rest_par), (m_seq, *rest_seq) = g_par, g_seq
    pairs = []
    for field in FIELD_NAMES:
        a, b = getattr(m_par, field), getattr(m_seq, field)
        if a is None:
            continue
        a, b = np.asarray(a), np.asarray(b)
        if "cov" in field:
            a, b = 0.5 * (a + np.swapaxes(a, -1, -2)), 0.5 * (b + np.swapaxes(b, -1, -2))
        pairs.append((field, a, b))
    pairs += [(f"argument {i}", np.asarray(a), np.asarray(b)) for i, (a, b) in enumerate(zip(rest_par, rest_seq))]
    for name, a, b in pairs:
        assert np.all(np.isfinite(a)), name
        if a.shape != b.shape:  # padded time-varying fields, emissions, inputs: real part equal, padding zero
            np.testing.assert_allclose(a[: b.shape[0]], b, err_msg=name, **F64)
            assert np.all(a[b.shape[0] :] == 0.0), name
        else:
            np.testing.assert_allclose(a, b, err_msg=name, **F64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equal_sequential_and_oracle(name):
    """Stationary, time-varying, inputs, offsets, partial and whole missing steps."""
    params, y, u = make_case(name, seed=1)
    model = to_model(params)
    post = rts_smoother_parallel(model, y, inputs=u)
    _close(post, ssmjax.rts_smoother(model, y, inputs=u))
    if name == "full":
        _close(kalman_filter_parallel(model, y, inputs=u), ssmjax.kalman_filter(model, y, inputs=u), FILTER_FIELDS)
    ref = oracle(params, y, u)
    for field in FIELDS:
        assert_allclose(getattr(post, field), ref[field], dtype=np.float64, err_msg=field)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_unrolled_lu_solves_match_lapack(n):
    """The unrolled LU (small dimensions) against LAPACK's ``getrf``/``getrs`` and NumPy, for X and X^T,
    including matrices that need row swaps: a zero leading pivot, row-permuted triangular ones."""
    rng = np.random.default_rng(n)
    X = rng.normal(size=(40, n, n))
    X[:8] = np.triu(X[:8])[:, rng.permutation(n)]  # pivoting undoes the permutation
    if n > 1:
        X[8:16, 0, 0] = 0.0  # the first column's pivot must come from another row
    rhs, rhs_t = rng.normal(size=(40, n, 4)), rng.normal(size=(40, n, 3))
    got, got_t = small.SmallOps.lu_solve_both(jnp.asarray(X), jnp.asarray(rhs), jnp.asarray(rhs_t))
    lib, lib_t = small.GeneralOps.lu_solve_both(jnp.asarray(X), jnp.asarray(rhs), jnp.asarray(rhs_t))
    want, want_t = np.linalg.solve(X, rhs), np.linalg.solve(np.swapaxes(X, -1, -2), rhs_t)
    for a, b in ((got, want), (got_t, want_t), (lib, want), (lib_t, want_t)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["full", "inputs-missing"])
def test_small_path_equals_general_path(monkeypatch, name):
    """The unrolled small-dimension path (SmallOps, unrolled LU) and the library path agree: values,
    padded outputs and gradients."""
    from ssmjax._lgssm import inference as lgssm_inference

    params, y, u = make_case(name, seed=4)  # Dy < Dx and Dy > Dx
    model = to_model(params)
    T, T_pad = y.shape[0], y.shape[0] + 2
    padded_params, y_p, u_p = _pad(params, y, u, T_pad, np.nan)
    padded = to_model(padded_params)

    def loss(model, y):
        out = rts_smoother_parallel(model, y, inputs=u)
        return out.marginal_loglik + jnp.sum(jnp.sin(out.smoothed_means)) + jnp.sum(out.smoothed_cross_covs)

    def run():
        with ssmjax.value_checks(False):
            out = rts_smoother_parallel(model, y, inputs=u)
            out_pad = rts_smoother_parallel(padded, y_p, inputs=u_p, length=T)
            grads = jax.grad(loss, argnums=(0, 1))(model, jnp.asarray(y))
        return out, out_pad, grads

    assert lgssm_inference._ops_for(model) is small.SmallOps
    fast = run()
    monkeypatch.setattr(small, "SMALL_MAX_DX", 0)
    assert lgssm_inference._ops_for(model) is small.GeneralOps
    general = run()
    _close(fast[0], general[0])
    _close(fast[1], general[1])
    assert fast[1].smoothed_means.shape[0] == T_pad
    _grads_close(fast[2], general[2])


def test_deterministic_component_and_all_missing():
    """Singular transition noise (exactly deterministic state component); a sequence with nothing observed."""
    rng = np.random.default_rng(2)
    params = make_params(rng, 3, 2, 6, du=1, offsets=True, singular_q=True)
    model = to_model(params)
    y = rng.normal(size=(6, 2))
    y[2, 1] = np.nan
    u = rng.normal(size=(6, 1))
    _close(rts_smoother_parallel(model, y, inputs=u), ssmjax.rts_smoother(model, y, inputs=u))
    y_none = np.full_like(y, np.nan)
    post = rts_smoother_parallel(model, y_none, inputs=u)
    _close(post, ssmjax.rts_smoother(model, y_none, inputs=u))
    assert float(post.marginal_loglik) == 0.0


@pytest.mark.parametrize("garbage", [np.nan, np.inf])
def test_padding_values_and_gradients(garbage):
    params, y, u = make_case("full", seed=5)
    T, T_pad = y.shape[0], 9
    padded, y_p, u_p = _pad(params, y, u, T_pad, garbage)
    out = rts_smoother_parallel(to_model(padded), y_p, inputs=u_p, length=T)
    _close(out, ssmjax.rts_smoother(to_model(padded), y_p, inputs=u_p, length=T))
    for field in FIELDS:
        assert np.all(np.isfinite(np.asarray(getattr(out, field)))), field
    # documented padded outputs, exactly: the filtered moments of step length - 1, zero cross-covariances
    for field in ("filtered_means", "predicted_means", "smoothed_means"):
        np.testing.assert_array_equal(np.asarray(getattr(out, field))[T:], np.broadcast_to(out.filtered_means[T - 1], (T_pad - T, 3)))
    for field in ("filtered_covs", "predicted_covs", "smoothed_covs"):
        np.testing.assert_array_equal(np.asarray(getattr(out, field))[T:], np.broadcast_to(out.filtered_covs[T - 1], (T_pad - T, 3, 3)))
    assert np.all(np.asarray(out.smoothed_cross_covs)[T - 1 :] == 0.0)

    def loss(fn, model, y, u, length):  # a function of the real steps only
        out = fn(model, y, inputs=u, length=length)
        return out.marginal_loglik + jnp.sum(jnp.sin(out.filtered_means[:T])) + jnp.sum(out.predicted_covs[:T] ** 2)

    if garbage is np.inf:
        return  # same compiled functions as for NaN; values checked above
    with ssmjax.value_checks(False):
        g_ref = jax.grad(loss, argnums=(1, 2, 3))(ssmjax.kalman_filter, to_model(params), jnp.asarray(y), jnp.asarray(u), None)
        g_pad = jax.grad(loss, argnums=(1, 2, 3))(
            kalman_filter_parallel, to_model(padded), jnp.asarray(y_p), jnp.asarray(u_p), T
        )
    _grads_close(g_pad, g_ref)


def test_gradients_equal_sequential():
    """float64 smoother gradients w.r.t. every model field, the emissions (missing entries too) and the inputs."""
    params, y, u = make_case("full", seed=8)
    model = to_model(params)

    def loss(fn, model, y, u):
        out = fn(model, y, inputs=u)
        value = out.marginal_loglik + jnp.sum(jnp.cos(out.filtered_means)) + jnp.sum(out.predicted_covs**2)
        value = value + jnp.sum(jnp.sin(out.smoothed_means)) + jnp.sum(out.smoothed_covs**2)
        return value + jnp.sum(out.smoothed_cross_covs)

    with ssmjax.value_checks(False):
        g_par = jax.grad(loss, argnums=(1, 2, 3))(rts_smoother_parallel, model, jnp.asarray(y), jnp.asarray(u))
        g_seq = jax.grad(loss, argnums=(1, 2, 3))(ssmjax.rts_smoother, model, jnp.asarray(y), jnp.asarray(u))
    _grads_close(g_par, g_seq)


def test_jit_and_vmap_ragged_batch():
    rng = np.random.default_rng(6)
    T = 7
    model = to_model(make_params(rng, 2, 2, T, du=1, offsets=True))
    lengths = [7, 4, 1]
    ys, us = [], []
    for L in lengths:
        y = rng.normal(size=(L, 2))
        if L > 2:
            y[1, 1] = np.nan
        y_p = np.full((T, 2), np.nan)
        y_p[:L] = y
        u_p = np.full((T, 1), np.inf)
        u_p[:L] = rng.normal(size=(L, 1))
        ys.append(y_p)
        us.append(u_p)
    Y, U, N = jnp.asarray(np.stack(ys)), jnp.asarray(np.stack(us)), jnp.asarray(lengths)

    def run(fn, y, u, length):
        return fn(model, y, inputs=u, length=length)

    got = jax.jit(jax.vmap(lambda y, u, n: run(rts_smoother_parallel, y, u, n)))(Y, U, N)
    want = jax.vmap(lambda y, u, n: run(ssmjax.rts_smoother, y, u, n))(Y, U, N)
    _close(got, want)
    i, L = 1, lengths[1]  # a row equals its own unpadded run
    single = rts_smoother_parallel(model, ys[i][:L], inputs=us[i][:L])
    np.testing.assert_allclose(got.marginal_loglik[i], single.marginal_loglik, **F64)
    np.testing.assert_allclose(got.smoothed_means[i, :L], single.smoothed_means, **F64)
    np.testing.assert_allclose(got.smoothed_cross_covs[i, : L - 1], single.smoothed_cross_covs, **F64)


def test_no_recompilation_on_second_call():
    params, y, u = make_case("inputs-missing", seed=3)
    model = to_model(params)
    rts_smoother_parallel(model, y, inputs=u)
    before = parallel._smoother_parallel._cache_size()
    rts_smoother_parallel(model, y + 1.0, inputs=u)
    assert parallel._smoother_parallel._cache_size() == before


def test_single_step():
    params, y, u = make_case("inputs-missing", seed=4)
    params = {k: (v[:1] if np.ndim(v) == 3 else v) for k, v in params.items()}
    model = to_model(params)
    _close(rts_smoother_parallel(model, y[:1], inputs=u[:1]), ssmjax.rts_smoother(model, y[:1], inputs=u[:1]))


_ONE_CPU_SCRIPT = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before JAX starts its CPU client
sys.path.insert(0, sys.argv[1])
from helpers import assert_allclose
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import ssmjax
rng = np.random.default_rng(0)
model = ssmjax.LGSSM(initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2), transition_matrix=0.9 * jnp.eye(2),
    transition_cov=0.1 * jnp.eye(2), emission_matrix=jnp.asarray(rng.normal(size=(3, 2))),
    emission_cov=jnp.eye(3))
y = jnp.asarray(rng.normal(size=(1, 3)))
par, seq = ssmjax.rts_smoother(model, y, parallel=True), ssmjax.rts_smoother(model, y)
assert_allclose(par.smoothed_covs, seq.smoothed_covs, np.float64)
assert_allclose(par.smoothed_means, seq.smoothed_means, np.float64)
assert par.smoothed_cross_covs.shape == (0, 2, 2)
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_single_step_on_one_cpu():
    """Regression: a one-step parallel smoother on a process pinned to one CPU failed at run time with
    "No registered implementation for untyped custom call to lapack_dpotrf_ffi" (jaxlib 0.10.2), which
    test_single_step does not see on a multi-CPU worker. Runs in a child pinned before JAX starts."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-c", _ONE_CPU_SCRIPT, tests_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


_DEADLOCK_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "lapack_deadlock.py")


@pytest.mark.parametrize("task", ["filter", "smoother", "gradient", "path-density"])
def test_vmapped_library_path_does_not_deadlock(task):
    """Regression: with jaxlib 0.10.2 a jitted ``vmap`` of the parallel filter at Dx > 8 (LAPACK path), and
    one of ``lgssm_log_joint`` plus ``lgssm_posterior_entropy`` over posterior draws, hung XLA:CPU when
    independent batched LAPACK calls ran at once on its 2-thread pool. Runs ``benchmarks/lapack_deadlock.py``
    in a child with a watchdog (it exits 3 on a stalled call). Mutation checks: with the combine's two
    solves made separate calls again, 4 of 4 runs hung at the first call; with the smoother's
    ``_joint_cholesky_solves`` split into two Cholesky chains, the smoother case failed in 4 of 4 runs;
    with the log joint's three densities solved separately, path-density hung at the second call in
    3 of 3 runs; with ``jnp.linalg.cholesky`` / ``jax.scipy.linalg.solve_triangular`` in ``GeneralOps``
    instead of ``ssmjax._linalg``, gradient hung in 2 of 3 runs (the oracle tests pass in every one of
    these; ``tests/test_linalg.py`` checks the compiled program's LAPACK calls deterministically)."""
    calls = "3" if task == "gradient" else "8"  # 2.5 s per call
    cmd = [sys.executable, _DEADLOCK_SCRIPT, "--task", task, "--calls", calls, "--watchdog", "20", "--first-watchdog", "90"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok:"), (proc.returncode, proc.stdout, proc.stderr[-3000:])


def test_float32_long_sequence():
    """Benign problem, T = 2000, float32 vs float64 (tolerances in the module docstring)."""
    rng = np.random.default_rng(0)
    dx, dy, T = 4, 2, 2_000
    q, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
    params = dict(
        initial_mean=np.zeros(dx), initial_cov=np.eye(dx), transition_matrix=0.9 * q,
        transition_cov=0.1 * np.eye(dx), emission_matrix=rng.normal(size=(dy, dx)), emission_cov=0.5 * np.eye(dy),
        transition_offset=0.1 * rng.normal(size=dx),
    )
    model = to_model(params)
    states, y = ssmjax.lgssm_sample(model, T, key=jax.random.key(0))
    y = np.array(y)
    y[::37, 0] = np.nan
    ref = ssmjax.rts_smoother(model, y)
    out = rts_smoother_parallel(to_model(params, jnp.float32), jnp.asarray(y, jnp.float32))
    assert out.smoothed_means.dtype == jnp.float32
    for field in ("filtered_means", "smoothed_means", "filtered_covs", "smoothed_covs"):
        assert_allclose(getattr(out, field), getattr(ref, field), dtype=np.float32, err_msg=field)
    rel = abs(float(out.marginal_loglik) - float(ref.marginal_loglik)) / abs(float(ref.marginal_loglik))
    assert rel <= tol(np.float32)["rtol"]


def test_errors_identical_to_sequential():
    params, y, u = make_case("inputs-missing", seed=0)
    model = to_model(params)
    bad = dict(initial_cov=-np.eye(2))
    bad_cases = [
        (model, y[:, :1], dict(inputs=u)),
        (model, y, dict()),
        (model, y, dict(inputs=u[:, None])),
        (model, y, dict(inputs=u, length=0)),
        (to_model({**params, **bad}), y, dict(inputs=u)),
    ]
    for model_, y_, kw in bad_cases:
        for par, seq in (
            (kalman_filter_parallel, ssmjax.kalman_filter),
            (rts_smoother_parallel, ssmjax.rts_smoother),
        ):
            with pytest.raises(ValueError) as want:
                seq(model_, y_, **kw)
            with pytest.raises(ValueError) as got:
                par(model_, y_, **kw)
            assert str(got.value) == str(want.value)


def test_parallel_requires_the_standard_method():
    model = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1), transition_matrix=jnp.eye(1),
                         transition_cov=jnp.eye(1), emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1))
    with pytest.raises(ValueError, match="`parallel=True` supports method='standard' only"):
        ssmjax.kalman_filter(model, jnp.zeros((3, 1)), method="sqrt", parallel=True)
