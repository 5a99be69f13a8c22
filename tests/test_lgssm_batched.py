"""Batched LGSSM inference: ``jax.vmap`` over sequences with a shared model (:mod:`ssmjax._lgssm.strategy`).

Under ``jax.vmap``, a batch with no missing entry and no padding takes the ``"observed"``
masking, where the covariance recursion runs once for the whole batch; any other batch takes
the per-sequence ``"masked"`` one. Both are checked against the dense-Gaussian oracle sequence
by sequence (full recursion and steady-state path), and the structure test checks that the
covariances really are computed once (an unbatched ``(Dx, Dx)`` carry in the compiled loops).
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax
from helpers import assert_allclose
from ssmjax._lgssm import strategy
from test_lgssm_inference import FIELDS, make_params, to_model
from test_lgssm_oracle import oracle

B, DX, DY = 5, 3, 2


def _batch(seed, T, time_varying=False):
    rng = np.random.default_rng(seed)
    params = make_params(rng, DX, DY, T, time_varying=time_varying, offsets=True)
    ys = rng.normal(size=(B, T, DY))
    return params, ys


def _check_against_oracle(params, post, ys, lengths=None):
    for i in range(ys.shape[0]):
        n = ys.shape[1] if lengths is None else int(lengths[i])
        ref = oracle(params, ys[i, :n])
        for name in FIELDS:
            got = np.asarray(getattr(post, name))[i]
            if name != "marginal_loglik":
                got = got[: n - 1] if name == "smoothed_cross_covs" else got[:n]
            assert_allclose(got, ref[name], dtype=np.float64, err_msg=f"sequence {i}, {name}")


def test_choose_masking_on_concrete_and_traced_arguments():
    y = np.zeros((4, 2))
    assert strategy.choose_masking(y, None) == "observed"
    assert strategy.choose_masking(y, np.int32(4)) == "observed"
    assert strategy.choose_masking(y, np.int32(3)) == "masked"
    y_missing = y.copy()
    y_missing[1, 0] = np.nan
    assert strategy.choose_masking(y_missing, None) == "masked"
    y_padding = y.copy()
    y_padding[3] = np.nan  # NaN only in padding: still padded, so masked
    assert strategy.choose_masking(y_padding, np.int32(3)) == "masked"
    seen = []
    jax.jit(lambda a: seen.append(strategy.choose_masking(a, None)) or a)(y)
    assert seen == ["auto"]


@pytest.mark.parametrize("smoother", [False, True], ids=["filter", "smoother"])
def test_vmap_observed_batch_equals_oracle(smoother):
    params, ys = _batch(0, 7)
    model = to_model(params)
    fn = ssmjax.rts_smoother if smoother else ssmjax.kalman_filter
    post = jax.jit(jax.vmap(lambda y: fn(model, y)))(jnp.asarray(ys))
    if smoother:
        _check_against_oracle(params, post, ys)
    else:
        for i in range(B):
            ref = oracle(params, ys[i])
            for name in ("marginal_loglik", "filtered_means", "filtered_covs", "predicted_means", "predicted_covs"):
                assert_allclose(np.asarray(getattr(post, name))[i], ref[name], dtype=np.float64)


def test_vmap_batch_with_missing_entries_or_padding_equals_oracle():
    """One sequence with a missing entry, one padded (NaN in its padding): the whole batch is masked."""
    params, ys = _batch(1, 7)
    ys[2, 3, 1] = np.nan
    lengths = np.full(B, 7, np.int32)
    lengths[4] = 5
    padded = ys.copy()
    padded[4, 5:] = np.nan
    model = to_model(params)
    post = jax.jit(jax.vmap(lambda y, n: ssmjax.rts_smoother(model, y, length=n)))(jnp.asarray(padded), jnp.asarray(lengths))
    _check_against_oracle(params, post, ys, lengths)


def test_vmap_observed_batch_on_the_steady_state_path_equals_unbatched():
    """T > 512 on a time-invariant model: the steady-state path, covariances once for the batch."""
    params, ys = _batch(2, 700)
    model = to_model(params)
    post = jax.jit(jax.vmap(lambda y: ssmjax.rts_smoother(model, y)))(jnp.asarray(ys))
    for i in (0, B - 1):
        # the unbatched call goes through the same masking ("observed"), so the check is the
        # masked recursion: the same sequence with a NaN appended past a length of T
        y_masked = np.concatenate([ys[i], np.full((1, DY), np.nan)])
        ref = ssmjax.rts_smoother(model, y_masked, length=700)
        for name in FIELDS:
            want = getattr(ref, name)
            if name != "marginal_loglik":
                want = want[:-1]
            assert_allclose(np.asarray(getattr(post, name))[i], want, dtype=np.float64, err_msg=name)


def _loop_carry_shapes(jaxpr):
    """Shapes of every ``scan``/``while`` carry in ``jaxpr``, recursively (conditionals included)."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            n_carry = eqn.params["num_carry"]
            consts = eqn.params["num_consts"]
            shapes += [v.aval.shape for v in eqn.invars[consts : consts + n_carry]]
        elif eqn.primitive.name == "while":
            body_consts = eqn.params["body_nconsts"] + eqn.params["cond_nconsts"]
            shapes += [v.aval.shape for v in eqn.invars[body_consts:]]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _loop_carry_shapes(sub)
    return shapes


@pytest.mark.parametrize("T", [7, 700], ids=["full", "steady"])
def test_vmap_with_a_shared_model_computes_covariances_once(T):
    params, ys = _batch(3, T)
    model = to_model(params)
    jaxpr = jax.make_jaxpr(jax.vmap(lambda y: ssmjax.rts_smoother(model, y).smoothed_means))(jnp.asarray(ys)).jaxpr
    shapes = _loop_carry_shapes(jaxpr)
    # the masked branch carries per-sequence covariances, the observed branch one for the batch
    assert (B, DX, DX) in shapes
    assert (DX, DX) in shapes


def test_vmap_gradients_equal_the_sum_of_per_sequence_gradients():
    params, ys = _batch(4, 7, time_varying=True)
    model = to_model(params)

    def batched(m):
        return jnp.sum(jax.vmap(lambda y: ssmjax.kalman_filter(m, y).marginal_loglik)(jnp.asarray(ys)))

    got = jax.jit(jax.grad(batched))(model)
    want = [jax.grad(lambda m, y=y: ssmjax.kalman_filter(m, jnp.asarray(y)).marginal_loglik)(model) for y in ys]
    for leaf_got, *leaves in zip(jax.tree.leaves(got), *[jax.tree.leaves(w) for w in want]):
        assert_allclose(leaf_got, sum(np.asarray(leaf) for leaf in leaves), dtype=np.float64)


# --------------------------------------------------------------------------- strategy selection


def _steady_model(dx=4):
    rng = np.random.default_rng(5)
    return to_model(make_params(rng, dx, 2, 600, time_varying=False, offsets=True)), rng.normal(size=(600, 2))


def test_lgssm_strategy_names_each_choice_and_its_reason():
    model, y = _steady_model()
    chosen = ssmjax.lgssm_strategy(model, y)
    assert (chosen.schedule, chosen.form, chosen.ops, chosen.masking) == ("steady-state", "covariance", "small", "observed")
    assert len(chosen.reasons) == 4 and "T = 600 > 512" in chosen.reasons[2]
    y_missing = y.copy()
    y_missing[3, 1] = np.nan
    assert ssmjax.lgssm_strategy(model, y_missing).masking == "masked"
    assert ssmjax.lgssm_strategy(model, y[:100]).schedule == "sequential"
    assert ssmjax.lgssm_strategy(model, y, method="sqrt").schedule == "sequential"
    assert ssmjax.lgssm_strategy(model, y, parallel=True).schedule == "parallel"
    small_dx, y2 = _steady_model(dx=2)
    assert "Dx = 2 < 3" in ssmjax.lgssm_strategy(small_dx, y2).reasons[2]
    seen = []
    jax.jit(lambda yy: seen.append(ssmjax.lgssm_strategy(model, yy).masking) or yy)(jnp.asarray(y))
    assert seen == ["auto"]


@pytest.mark.parametrize(
    "schedule,form,ops,masking",
    [
        ("sequential", "covariance", "small", "masked"),
        ("sequential", "covariance", "general", "observed"),
        ("sequential", "sqrt", "general", "auto"),
        ("steady-state", "covariance", "general", "masked"),
        ("parallel", "covariance", "small", "masked"),
    ],
)
def test_forced_strategies_give_the_chosen_results(schedule, form, ops, masking):
    model, y = _steady_model()
    # the steady-state path needs T > 512; the others are compared on a shorter stretch (cheaper to compile)
    y = jnp.asarray(y if schedule == "steady-state" else y[:100])
    want = ssmjax.rts_smoother(model, y)
    forced = ssmjax.KalmanStrategy(schedule=schedule, form=form, ops=ops, masking=masking)
    got = ssmjax.rts_smoother(model, y, strategy=forced)
    for name in FIELDS:
        assert_allclose(getattr(got, name), getattr(want, name), dtype=np.float64, err_msg=name)


def test_forcing_a_strategy_that_cannot_run_raises():
    model, y = _steady_model()
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        ssmjax.KalmanStrategy(schedule="fast", form="covariance", ops="small", masking="auto")
    with pytest.raises(ValueError, match="supports form='covariance' only"):
        ssmjax.KalmanStrategy(schedule="parallel", form="sqrt", ops="general", masking="auto")
    with pytest.raises(ValueError, match="form='sqrt' runs on ops='general' only"):
        ssmjax.KalmanStrategy(schedule="sequential", form="sqrt", ops="small", masking="auto")
    assert ssmjax.lgssm_strategy(model, y, method="sqrt").ops == "general"  # what the square-root form runs
    steady = ssmjax.KalmanStrategy(schedule="steady-state", form="covariance", ops="small", masking="auto")
    with pytest.raises(ValueError, match="needs T > 512"):
        ssmjax.kalman_filter(model, y[:100], strategy=steady)
    observed = ssmjax.KalmanStrategy(schedule="sequential", form="covariance", ops="small", masking="observed")
    y_missing = y.copy()
    y_missing[3, 1] = np.nan
    with pytest.raises(ValueError, match="masking 'observed' needs"):
        ssmjax.kalman_filter(model, y_missing, strategy=observed)
    with pytest.raises(ValueError, match="`strategy` must be an ssmjax.KalmanStrategy"):
        ssmjax.kalman_filter(model, y, strategy="steady-state")
