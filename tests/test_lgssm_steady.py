"""The steady-state path of ``kalman_filter`` / ``rts_smoother`` (:mod:`ssmjax._lgssm.steady`).

Time-invariant models take this path on long sequences: the covariance recursions run only
until they settle, the means over every step. Checked here against the dense-Gaussian
oracle (small ``transient_steps`` so that a short sequence has a transient at the start, a
steady middle and a transient at the end), against the full recursion on long sequences
(float64 to round-off; float32 as accurate as the full recursion, against float64), and
for the fallback, ``vmap`` over ragged batches, and derivatives (the full recursion's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax
from helpers import assert_allclose
from ssmjax._lgssm import inference as lgssm_inference
from ssmjax._lgssm import steady
from test_lgssm_inference import FIELDS, make_params, to_model
from test_lgssm_oracle import oracle

NEVER = 10**9  # transient_steps that no sequence exceeds: the full recursion


def _case(seed, dx, dy, T, du=None, missing_at=(2, 5), slow=False):
    """A time-invariant model with offsets (and inputs), missing entries early in the sequence.

    ``slow``: the benchmark's kind of model (``benchmarks/lgssm_inference.py``), a rotation
    shrunk by 0.95, whose covariance recursions settle several times more slowly."""
    rng = np.random.default_rng(seed)
    params = make_params(rng, dx, dy, T, du, time_varying=False, offsets=True)
    if slow:
        q, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
        params.update(
            transition_matrix=0.95 * q, transition_cov=0.1 * np.eye(dx),
            emission_matrix=rng.normal(size=(dy, dx)) / np.sqrt(dx), emission_cov=0.5 * np.eye(dy),
        )
    y = rng.normal(size=(T, dy))
    y[missing_at[0], 0] = np.nan  # partial step
    y[missing_at[1]] = np.nan  # whole step
    u = None if du is None else rng.normal(size=(T, du))
    return params, y, u


def _smoother(model, y, u, length=None, transient_steps=steady.TRANSIENT_STEPS):
    ops = lgssm_inference._ops_for(model)
    return lgssm_inference._smoother_jit(model, y, u, length, method="standard", ops=ops, transient_steps=transient_steps)


def _filter(model, y, u, length=None, transient_steps=steady.TRANSIENT_STEPS):
    ops = lgssm_inference._ops_for(model)
    return lgssm_inference._filter_jit(model, y, u, length, method="standard", ops=ops, transient_steps=transient_steps)


def _steady_only(model, y, u, length, transient_steps, smoother=True):
    """The steady-state path without its fallback: ``(fields, need_full, settled_at)``."""
    ops = lgssm_inference._ops_for(model)
    run = jax.jit(steady.steady_outputs, static_argnums=(4, 5, 6))
    out, need_full, settled_at = run(model, y, u, length, smoother, ops, transient_steps)
    return dict(zip(FIELDS, out)), bool(need_full), int(settled_at)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dims", [(3, 2, 1), (3, 1, None)])
def test_matches_dense_oracle_through_all_three_regions(dims):
    """T = 120 with 70 stored steps: the forward pass settles part-way, the smoother's adjoint
    settles part-way back from the end, and the steps between use the steady entries."""
    dx, dy, du = dims
    T, transient = 120, 70
    params, y, u = _case(0, dx, dy, T, du)
    model = to_model(params)
    got, need_full, settled_at = _steady_only(model, jnp.asarray(y), u, None, transient)
    assert not need_full and 0 < settled_at < T // 2, settled_at
    ref = oracle(params, y, u)
    for field in FIELDS:
        assert_allclose(got[field], ref[field], dtype=np.float64, err_msg=field)
    # the public path (with its fallback) gives the same
    out = _smoother(model, y, u, transient_steps=transient)
    filt = _filter(model, y, u, transient_steps=transient)
    for field in FIELDS:
        assert_allclose(getattr(out, field), ref[field], dtype=np.float64, err_msg=field)
    for field in FIELDS[:5]:
        assert_allclose(getattr(filt, field), ref[field], dtype=np.float64, err_msg=field)


@pytest.mark.parametrize("T", [90, 12])
def test_padding_matches_the_unpadded_oracle(T):
    """``length`` on the steady path: real steps as the oracle of the unpadded sequence, padded
    steps repeat step ``length - 1`` (filtered moments for the filter's fields, smoothed for
    the smoother's, zero cross-covariances), whatever the padding holds. ``length`` 90 ends in
    the steady part, 12 inside the forward transient."""
    T_pad, transient = 110, 70
    params, y, u = _case(1, 3, 2, T, 1)
    ref = oracle(params, y, u)
    y_p = np.full((T_pad, 2), 1e6)
    y_p[:T] = y
    u_p = np.full((T_pad, 1), -1e6)
    u_p[:T] = u
    got, need_full, _ = _steady_only(to_model(params), jnp.asarray(y_p), jnp.asarray(u_p), jnp.asarray(T), transient)
    assert not need_full
    for field in FIELDS:
        real = got[field] if field == "marginal_loglik" else got[field][: (T - 1 if "cross" in field else T)]
        assert_allclose(real, ref[field], dtype=np.float64, err_msg=field)
    for field, source in (
        ("filtered_means", "filtered_means"), ("predicted_means", "filtered_means"),
        ("filtered_covs", "filtered_covs"), ("predicted_covs", "filtered_covs"),
        ("smoothed_means", "smoothed_means"), ("smoothed_covs", "smoothed_covs"),
    ):
        pad = np.asarray(got[field][T:])
        assert_allclose(pad, np.broadcast_to(ref[source][T - 1], pad.shape), dtype=np.float64, err_msg=field)
    assert np.all(np.asarray(got["smoothed_cross_covs"][T - 1 :]) == 0)


@pytest.mark.parametrize("dims", [(3, 2, 2), (10, 3, None)])
def test_long_sequence_float64_equals_full_recursion(dims):
    """T = 3000 at the default 512 stored steps (small-ops and library paths), with inputs,
    offsets and missing entries early on: equal to the full recursion to round-off."""
    dx, dy, du = dims
    T = 3000
    params, y, u = _case(2, dx, dy, T, du, missing_at=(40, 100))
    model = to_model(params)
    got, need_full, settled_at = _steady_only(model, jnp.asarray(y), u, None, steady.TRANSIENT_STEPS)
    assert not need_full and 100 < settled_at < 300, settled_at
    full = _smoother(model, y, u, transient_steps=NEVER)
    public = ssmjax.rts_smoother(model, y, inputs=u)
    for field in FIELDS:
        want = np.asarray(getattr(full, field))
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(got[field], want, rtol=0, atol=1e-12 * scale, err_msg=field)
        np.testing.assert_allclose(getattr(public, field), want, rtol=0, atol=1e-12 * scale, err_msg=field)


@pytest.mark.parametrize("slow", [False, True], ids=["fast-mixing", "slow-mixing"])
@pytest.mark.parametrize("dims", [(2, 1, None), (3, 1, None), (8, 4, None), (20, 6, 2)])
def test_float32_as_accurate_as_the_full_recursion(dims, slow):
    """float32, T = 5000: the steady path's error against float64 is at most that of the full
    float32 recursion, up to a small factor (both are round-off)."""
    dx, dy, du = dims
    T = 5000
    params, y, u = _case(3, dx, dy, T, du, missing_at=(10, 20), slow=slow)
    ref = _smoother(to_model(params), y, u, transient_steps=NEVER)
    y32 = jnp.asarray(y, jnp.float32)
    u32 = None if u is None else jnp.asarray(u, jnp.float32)
    model32 = to_model(params, jnp.float32)
    got, need_full, _ = _steady_only(model32, y32, u32, None, steady.TRANSIENT_STEPS)
    assert not need_full
    full32 = _smoother(model32, y32, u32, transient_steps=NEVER)
    for field in FIELDS:
        want = np.asarray(getattr(ref, field))
        scale = np.max(np.abs(want))
        err_steady = np.max(np.abs(np.asarray(got[field], np.float64) - want)) / scale
        err_full = np.max(np.abs(np.asarray(getattr(full32, field), np.float64) - want)) / scale
        assert np.isfinite(err_steady)
        assert err_steady <= 2 * err_full + 4 * np.finfo(np.float32).eps, (field, err_steady, err_full)


# --------------------------------------------------------------------------- fallback and batches


def _slow_model(dtype=jnp.float64):
    """Three random walks observed through heavy noise: the Riccati recursion needs ~10^3 steps."""
    return ssmjax.LGSSM(
        initial_mean=jnp.zeros(3, dtype), initial_cov=jnp.eye(3, dtype=dtype),
        transition_matrix=jnp.eye(3, dtype=dtype), transition_cov=1e-6 * jnp.eye(3, dtype=dtype),
        emission_matrix=jnp.eye(3, dtype=dtype), emission_cov=jnp.eye(3, dtype=dtype),
    )


def test_fallback_when_nothing_settles():
    """Missing entries near the end, or a slowly mixing model: the steady path reports that it
    needs the full recursion, and the public functions give the full recursion's results."""
    T = 1200
    params, y, u = _case(4, 3, 2, T, 1, missing_at=(T - 10, T - 5))
    slow_y = np.random.default_rng(5).normal(size=(T, 3))
    for model, ys, us in ((to_model(params), y, u), (_slow_model(), slow_y, None)):
        _, need_full, _ = _steady_only(model, jnp.asarray(ys), us, None, steady.TRANSIENT_STEPS)
        assert need_full
        full = _smoother(model, ys, us, transient_steps=NEVER)
        out = ssmjax.rts_smoother(model, ys, inputs=us)
        filt = ssmjax.kalman_filter(model, ys, inputs=us)
        for field in FIELDS:
            assert_allclose(getattr(out, field), getattr(full, field), dtype=np.float64, err_msg=field)
        for field in FIELDS[:5]:
            assert_allclose(getattr(filt, field), getattr(full, field), dtype=np.float64, err_msg=field)


def test_vmap_ragged_batch_with_and_without_fallback():
    """One batch holding a sequence that settles, one that needs the fallback (missing entries
    near its end) and a short one: each member equals its own unbatched result, and the
    fallback stays a conditional under ``vmap`` (not a select that runs it for everyone)."""
    T = 1100
    params, y, u = _case(6, 3, 2, T, 1, missing_at=(3, 7))
    late = y.copy()
    late[1000, 1] = np.nan
    lengths = np.array([T, 1050, 300])
    ys = np.stack([y, late, y])
    ys[2, 300:] = 7.0  # padding
    model = to_model(params)

    def smooth(yy, n):
        return ssmjax.rts_smoother(model, yy, inputs=u, length=n)

    out = jax.jit(jax.vmap(smooth))(jnp.asarray(ys), jnp.asarray(lengths))
    for i in range(3):
        one = smooth(ys[i], lengths[i])
        full = _smoother(model, ys[i], u, jnp.asarray(lengths[i]), transient_steps=NEVER)
        for field in FIELDS:
            assert_allclose(getattr(out, field)[i], getattr(one, field), dtype=np.float64, err_msg=f"{field} {i}")
            assert_allclose(getattr(one, field), getattr(full, field), dtype=np.float64, err_msg=f"{field} {i}")
    text = jax.jit(jax.vmap(smooth)).lower(jnp.asarray(ys), jnp.asarray(lengths)).as_text()
    assert text.count("stablehlo.case") >= 1


def test_the_public_functions_take_the_steady_path():
    """A long time-invariant sequence compiles to the steady path (its while loops and the
    fallback conditional); a time-varying model, ``method="sqrt"`` or two states (where the full
    recursion is faster) to the full scan only."""
    T = 2 * steady.TRANSIENT_STEPS
    params, y, _ = _case(7, 3, 1, T)
    model = to_model(params)

    def ops_in(fn, m):
        return jax.make_jaxpr(fn)(m, jnp.asarray(y)).pretty_print()

    for fn in (ssmjax.kalman_filter, ssmjax.rts_smoother):
        text = ops_in(fn, model)
        assert "while" in text and "cond" in text, fn.__name__
        assert "while" not in ops_in(lambda m, yy: fn(m, yy, method="sqrt"), model)
    tv = dict(params, transition_matrix=np.broadcast_to(params["transition_matrix"], (T - 1, 3, 3)))
    assert "while" not in ops_in(ssmjax.rts_smoother, to_model(tv))
    two, y2, _ = _case(7, 2, 1, T)
    assert "while" not in jax.make_jaxpr(ssmjax.rts_smoother)(to_model(two), jnp.asarray(y2)).pretty_print()


# --------------------------------------------------------------------------- derivatives


def test_derivatives_are_those_of_the_full_recursion():
    """``jax.grad`` (under ``jit`` and ``vmap``) and ``jax.jvp`` through the steady path equal
    those of the full recursion (itself checked against finite differences)."""
    T, transient = 300, 100
    params, y, u = _case(8, 3, 2, T, 1)
    model = to_model(params)

    def loglik(transient_steps):
        return lambda m, yy: _smoother(m, yy, u, transient_steps=transient_steps).marginal_loglik

    def smoothed(transient_steps):
        return lambda m, yy: jnp.sum(_smoother(m, yy, u, transient_steps=transient_steps).smoothed_covs[:, 0, 1])

    for f in (loglik, smoothed):
        got = jax.jit(jax.grad(f(transient), argnums=(0, 1)))(model, jnp.asarray(y))
        want = jax.grad(f(NEVER), argnums=(0, 1))(model, jnp.asarray(y))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert np.all(np.isfinite(np.asarray(g)))
            assert_allclose(g, w, dtype=np.float64)
    tangent = jax.tree.map(jnp.ones_like, model)
    _, got = jax.jvp(lambda m: loglik(transient)(m, jnp.asarray(y)), (model,), (tangent,))
    _, want = jax.jvp(lambda m: loglik(NEVER)(m, jnp.asarray(y)), (model,), (tangent,))
    assert_allclose(got, want, dtype=np.float64)
    batch = jnp.stack([jnp.asarray(y), jnp.asarray(y[::-1])])
    got = jax.vmap(jax.grad(loglik(transient), argnums=1), in_axes=(None, 0))(model, batch)
    for i in range(2):
        assert_allclose(got[i], jax.grad(loglik(NEVER), argnums=1)(model, batch[i]), dtype=np.float64)
