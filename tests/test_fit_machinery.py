"""The compiled EM / SGD loops, exercised on a toy model with a numpy oracle.

The toy model is an i.i.d. two-component 1-D Gaussian mixture with unit variances
(each time step independent), which has a closed-form EM whose trajectory a few
lines of numpy reproduce exactly. Model-specific EM (HMM, LGSSM) is tested in
their own files; here we test the loop: convergence, history, the NaN/decrease
guard, frozen parameters, restarts, progress, no recompilation, SGD.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ssmjax
from ssmjax._fit import em as em_module
from ssmjax._fit.protocol import AbstractFittableModel


class ToyMixture(AbstractFittableModel):
    logit: jax.Array  # mixing weight of component 1, unconstrained
    means: jax.Array  # (2,)
    sabotage: float = eqx.field(static=True, default=0.0)  # >0: M-step overshoots (tests the guard)

    def parameter_names(self):
        return ("weight", "means")

    def _log_joint(self, y):
        w = jax.nn.log_sigmoid(jnp.stack([-self.logit, self.logit]))
        return w + jax.scipy.stats.norm.logpdf(y[:, None], self.means, 1.0)  # (T, 2)

    def marginal_loglik(self, emissions, *, length=None, inputs=None):
        mask = jnp.arange(emissions.shape[0]) < (emissions.shape[0] if length is None else length)
        y = jnp.where(mask, emissions[:, 0], 0.0)  # double-where: padding never reaches a gradient
        lj = jax.nn.logsumexp(self._log_joint(y), axis=-1)
        return jnp.sum(jnp.where(mask, lj, 0.0))

    def _check_batch(self, emissions, lengths, inputs):
        emissions = jnp.asarray(emissions, dtype=self.means.dtype)
        if emissions.ndim != 3:
            raise ValueError(f"`emissions` must have shape (B, T, 1); got shape {emissions.shape}.")
        if lengths is None:
            lengths = jnp.full(emissions.shape[0], emissions.shape[1])
        return emissions, jnp.asarray(lengths), None

    def _check_em(self, frozen):
        pass

    def _e_step(self, emissions, length, inputs):
        y = emissions[:, 0]
        mask = jnp.arange(y.shape[0]) < length
        y = jnp.where(mask, y, 0.0)
        lj = self._log_joint(y)
        r = jnp.where(mask[:, None], jax.nn.softmax(lj, axis=-1), 0.0)
        ll = jnp.sum(jnp.where(mask, jax.nn.logsumexp(lj, axis=-1), 0.0))
        return {"n": r.sum(0), "sy": (r * y[:, None]).sum(0)}, ll

    def _m_step(self, stats, frozen):
        n, sy = stats["n"], stats["sy"]
        means = self.means if "means" in frozen else sy / n
        means = means + self.sabotage * jnp.array([1.0, -1.0])
        logit = self.logit if "weight" in frozen else jnp.log(n[1]) - jnp.log(n[0])
        return ToyMixture(logit, means, self.sabotage)

    def _unconstrained(self):
        return {"weight": self.logit, "means": self.means}

    def _from_unconstrained(self, params):
        return ToyMixture(params["weight"], params["means"], self.sabotage)


def numpy_em(y_list, logit, means, iters):
    """Independent oracle: textbook EM on the pooled observations."""
    y = np.concatenate(y_list)
    w1 = 1 / (1 + np.exp(-logit))
    w = np.array([1 - w1, w1])
    means = np.array(means, dtype=float)
    lls = []
    for _ in range(iters):
        lp = np.log(w) - 0.5 * np.log(2 * np.pi) - 0.5 * (y[:, None] - means) ** 2
        m = lp.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(lp - m).sum(1))
        lls.append(lse.sum())
        r = np.exp(lp - lse[:, None])
        w = r.sum(0) / r.sum()
        means = (r * y[:, None]).sum(0) / r.sum(0)
    return np.array(lls), w, means


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    lengths = np.array([50, 31, 17])
    y = np.full((3, 50, 1), np.nan)
    seqs = []
    for b, n in enumerate(lengths):
        z = rng.random(n) < 0.3
        s = np.where(z, 2.5, -1.0) + rng.standard_normal(n)
        y[b, :n, 0] = s
        seqs.append(s)
    return y, lengths, seqs


def test_em_trajectory_matches_numpy_oracle_on_ragged_batch(data):
    y, lengths, seqs = data
    model = ToyMixture(jnp.asarray(0.0), jnp.asarray([-0.5, 0.5]))
    fitted, lls, info = ssmjax.fit_em(model, y, lengths=lengths, max_iters=25, tol=0.0)
    ref_lls, ref_w, ref_means = numpy_em(seqs, 0.0, [-0.5, 0.5], 25)
    np.testing.assert_allclose(lls, ref_lls, rtol=1e-10)
    assert info.status == "max_iters" and info.num_iters == 25
    # the returned model is the 25th M-step
    np.testing.assert_allclose(fitted.means, ref_means, rtol=1e-9)
    np.testing.assert_allclose(jax.nn.sigmoid(fitted.logit), ref_w[1], rtol=1e-9)
    assert np.all(np.diff(lls) >= -1e-10 * np.abs(lls[1:]))


def test_em_converges_with_tolerance_and_does_not_recompile(data):
    y, lengths, _ = data
    model = ToyMixture(jnp.asarray(0.0), jnp.asarray([-0.5, 0.5]))
    _, lls1, info = ssmjax.fit_em(model, y, lengths=lengths, max_iters=500, tol=1e-8)
    assert info.converged and info.num_iters < 500
    rel = abs(lls1[-1] - lls1[-2]) / abs(lls1[-2])
    assert rel <= 1e-8
    traces = []
    original = em_module._em_loop

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    em_module._em_loop = counting
    try:
        other = ToyMixture(jnp.asarray(0.3), jnp.asarray([-1.0, 1.0]))
        ssmjax.fit_em(other, y, lengths=lengths, max_iters=500, tol=1e-8)
        ssmjax.fit_em(other, y * 1.1, lengths=lengths, max_iters=500, tol=1e-6)
    finally:
        em_module._em_loop = original
    assert traces == [], "a second call with equal shapes must not retrace the EM loop"


def test_tol_none_runs_every_iteration_past_an_exact_fixed_point(data):
    """``tol=0`` stops at the first iteration that leaves the objective exactly unchanged;
    ``tol=None`` runs all ``max_iters`` (what a timing against dynamax's fixed count needs), with the
    same trajectory up to that point. Also in ``fit_em_restarts`` and the estimators' ``tol``."""
    y, lengths, _ = data
    model = ToyMixture(jnp.asarray(0.0), jnp.asarray([-0.5, 0.5]))
    _, lls0, info0 = ssmjax.fit_em(model, y, lengths=lengths, max_iters=400, tol=0.0)
    assert info0.status == "converged" and info0.num_iters < 400 and lls0[-1] == lls0[-2]
    _, lls, info = ssmjax.fit_em(model, y, lengths=lengths, max_iters=400, tol=None)
    assert info.status == "max_iters" and info.num_iters == 400 and lls.shape == (400,)
    np.testing.assert_array_equal(lls[: lls0.shape[0]], lls0)
    one_restart = jax.tree.map(lambda a: a[None], model)
    _, _, histories = ssmjax.fit_em_restarts(one_restart, y, lengths=lengths, max_iters=400, tol=None)
    assert np.all(np.isfinite(np.asarray(histories)))
    with pytest.raises(ValueError, match="`tol` must be a non-negative number, or None"):
        ssmjax.fit_em(model, y, lengths=lengths, tol=-1.0)


def test_em_guard_returns_last_good_model_on_decrease(data):
    y, lengths, _ = data
    model = ToyMixture(jnp.asarray(0.0), jnp.asarray([-1.0, 2.5]), sabotage=3.0)
    with pytest.warns(RuntimeWarning, match="decreased"):
        fitted, lls, info = ssmjax.fit_em(model, y, lengths=lengths, max_iters=20)
    assert info.status == "decreased"
    # the returned model is the iterate whose log-likelihood was the last good one
    good = sum(float(fitted.marginal_loglik(jnp.asarray(y[b]), length=int(n))) for b, n in enumerate(lengths))
    np.testing.assert_allclose(good, lls[-2], rtol=1e-12)
    assert lls[-1] < lls[-2]


def test_em_guard_on_non_finite(data):
    y, lengths, _ = data
    model = ToyMixture(jnp.asarray(0.0), jnp.asarray([jnp.nan, 0.5]))
    with pytest.warns(RuntimeWarning, match="not finite"):
        fitted, lls, info = ssmjax.fit_em(model, y, lengths=lengths, max_iters=10)
    assert info.status == "not_finite" and info.num_iters == 1
    # nothing better was ever seen: the initial model comes back untouched
    assert np.isnan(np.asarray(fitted.means)[0])


def test_frozen_parameters_never_move(data):
    y, lengths, _ = data
    model = ToyMixture(jnp.asarray(0.7), jnp.asarray([-0.5, 0.5]))
    fitted, _, _ = ssmjax.fit_em(model, y, lengths=lengths, max_iters=10, frozen=("weight",))
    assert float(fitted.logit) == 0.7
    assert not np.allclose(fitted.means, model.means)
    fitted, _ = ssmjax.fit_sgd(model, y, optax.adam(0.05), lengths=lengths, num_steps=20, frozen=("means",))
    np.testing.assert_array_equal(fitted.means, model.means)
    assert float(fitted.logit) != 0.7
    with pytest.raises(ValueError, match=r"`frozen` names unknown parameters \['bogus'\]"):
        ssmjax.fit_em(model, y, lengths=lengths, frozen=("bogus",))


def test_restarts_pick_the_best(data):
    y, lengths, seqs = data
    inits = ToyMixture(jnp.asarray([0.0, 0.0, 0.0]), jnp.asarray([[-0.5, 0.5], [3.0, 3.1], [-1.0, 2.0]]))
    best, scores, histories = ssmjax.fit_em_restarts(inits, y, lengths=lengths, max_iters=60, tol=1e-10)
    assert scores.shape == (3,) and histories.shape == (3, 60)
    k = int(np.argmax(scores))
    np.testing.assert_allclose(
        sum(float(best.marginal_loglik(jnp.asarray(y[b]), length=int(n))) for b, n in enumerate(lengths)),
        scores[k], rtol=1e-12,
    )
    for r in range(3):  # each restart equals its own single fit
        single, _, _ = ssmjax.fit_em(
            ToyMixture(inits.logit[r], inits.means[r]), y, lengths=lengths, max_iters=60, tol=1e-10
        )
        np.testing.assert_allclose(
            sum(float(single.marginal_loglik(jnp.asarray(y[b]), length=int(n))) for b, n in enumerate(lengths)),
            scores[r], rtol=1e-10,
        )


def test_sgd_reaches_em_optimum(data):
    y, lengths, _ = data
    model = ToyMixture(jnp.asarray(0.0), jnp.asarray([-0.5, 0.5]))
    em_fit, lls, _ = ssmjax.fit_em(model, y, lengths=lengths, max_iters=2000, tol=1e-13)
    sgd_fit, losses = ssmjax.fit_sgd(model, y, optax.adam(0.05), lengths=lengths, num_steps=1500)
    assert losses.shape == (1500,)
    np.testing.assert_allclose(sgd_fit.means, em_fit.means, atol=1e-4)
    np.testing.assert_allclose(sgd_fit.logit, em_fit.logit, atol=1e-4)
    np.testing.assert_allclose(-losses[-1] * lengths.sum(), lls[-1], rtol=1e-7)


def test_sgd_minibatches_and_errors(data):
    y, lengths, _ = data
    model = ToyMixture(jnp.asarray(0.0), jnp.asarray([-0.5, 0.5]))
    fitted, losses = ssmjax.fit_sgd(
        model, y, optax.sgd(0.01), lengths=lengths, num_steps=50, batch_size=2, key=jax.random.key(1)
    )
    assert np.all(np.isfinite(losses))
    with pytest.raises(ValueError, match="`key` is required"):
        ssmjax.fit_sgd(model, y, optax.sgd(0.01), lengths=lengths, batch_size=2)
    with pytest.raises(ValueError, match=r"`batch_size` must be an int in \[1, 3\]"):
        ssmjax.fit_sgd(model, y, optax.sgd(0.01), lengths=lengths, batch_size=5)
    with pytest.raises(ValueError, match="`optimizer` must be an optax.GradientTransformation"):
        ssmjax.fit_sgd(model, y, "adam", lengths=lengths)
    with pytest.raises(ValueError, match="`max_iters` must be a positive int"):
        ssmjax.fit_em(model, y, lengths=lengths, max_iters=0)


def test_sgd_skips_non_finite_steps(data):
    y, lengths, _ = data
    model = ToyMixture(jnp.asarray(0.0), jnp.asarray([-0.5, 0.5]))
    y_bad = y.copy()
    y_bad[0, 0, 0] = np.inf  # an unpadded inf observation: every loss is -inf/NaN
    with pytest.warns(RuntimeWarning, match="skipped 5 of 5"):
        fitted, _ = ssmjax.fit_sgd(model, y_bad, optax.adam(0.1), lengths=lengths, num_steps=5)
    np.testing.assert_array_equal(fitted.means, model.means)


def test_progress_bar_reports_from_compiled_loop(data, capsys):
    y, lengths, _ = data
    model = ToyMixture(jnp.asarray(0.0), jnp.asarray([-0.5, 0.5]))
    ssmjax.fit_em(model, y, lengths=lengths, max_iters=7, tol=0.0, progress=True)
    err = capsys.readouterr().err
    assert "EM" in err and "7/7" in err and "loglik" in err
