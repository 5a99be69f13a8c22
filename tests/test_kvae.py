"""The Kalman VAE example (ssmjax.examples.kvae): data, objective, gradients, training, imputation."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax
from helpers import FD_TOLERANCE, assert_allclose, central_difference_grad
from ssmjax.examples import kvae

TINY = kvae.KVAEConfig(image_size=6, a_dim=2, z_dim=3, num_matrices=2, hidden=8, rnn_hidden=4)


def _tiny_model(dtype=jnp.float64, seed=0, config=TINY):
    model = kvae.KalmanVAE(jax.random.key(seed), config, dtype=dtype)
    # non-trivial base matrices so every path carries gradient
    k1, k2 = jax.random.split(jax.random.key(seed + 100))
    return eqx.tree_at(
        lambda m: (m.base_transitions, m.base_emissions),
        model,
        (
            model.base_transitions + 0.2 * jax.random.normal(k1, model.base_transitions.shape, dtype),
            model.base_emissions + 0.5 * jax.random.normal(k2, model.base_emissions.shape, dtype),
        ),
    )


def _tiny_frames(num_timesteps=5, seed=0):
    return kvae.bouncing_ball(jax.random.key(seed), 1, num_timesteps, size=6, radius=1.5, speed=(0.5, 1.0))[0]


# --------------------------------------------------------------------------- data


def test_bouncing_ball_stays_in_the_box_and_moves():
    videos = np.asarray(kvae.bouncing_ball(jax.random.key(0), 64, 30))
    assert videos.shape == (64, 30, 32, 32) and videos.dtype == np.float32
    assert set(np.unique(videos)) <= {0.0, 1.0}
    area = videos.sum(axis=(2, 3))
    # a disk of radius 3 covers ~28 pixel centres wherever it is, and never leaves the box
    assert area.min() >= 21 and area.max() <= 32
    moved = np.abs(np.diff(videos, axis=1)).sum(axis=(2, 3))
    assert moved.min() > 0  # speed >= 1.5 px/frame: consecutive frames always differ
    # elastic reflection: the centre of mass stays at least (about) a radius from each wall
    ii = np.arange(32) + 0.5
    com_r = (videos.sum(axis=3) * ii).sum(axis=2) / area
    com_c = (videos.sum(axis=2) * ii).sum(axis=2) / area
    for com in (com_r, com_c):
        assert com.min() > 2.5 and com.max() < 29.5


def test_last_frame_baseline_and_error_metric():
    frames = jnp.arange(5.0)[:, None, None] * jnp.ones((5, 2, 2)) / 10.0
    observed = jnp.array([False, True, False, False, True])
    base = kvae.last_frame_baseline(frames, observed)
    np.testing.assert_array_equal(base[:, 0, 0], np.array([0.1, 0.1, 0.1, 0.1, 0.4]))
    truth = jnp.zeros((2, 3, 2, 2)).at[0, 1, 0, 0].set(1.0)
    pred = jnp.zeros((2, 3, 2, 2))
    obs = jnp.array([[True, False, True], [True, True, True]])
    assert float(kvae.imputation_error(pred, truth, obs)) == pytest.approx(0.25)  # 1 of 4 pixels, 1 missing frame


def test_drop_frames_and_argument_errors():
    obs = np.asarray(kvae.drop_frames(jax.random.key(0), 50, 20, gap=6))
    assert obs.shape == (50, 20)
    assert np.all((~obs).sum(axis=1) == 6) and np.all(obs[:, :4])
    with pytest.raises(ValueError, match="`gap` must be in 1..16; got 17"):
        kvae.drop_frames(jax.random.key(0), 2, 20, gap=17)
    with pytest.raises(ValueError, match="exactly one of `gap` and `probability`"):
        kvae.drop_frames(jax.random.key(0), 2, 20, gap=3, probability=0.5)
    rand = np.asarray(kvae.drop_frames(jax.random.key(1), 400, 20, probability=0.5))
    assert np.all(rand[:, :4]) and abs((~rand[:, 4:]).mean() - 0.5) < 0.02
    model = _tiny_model()  # the estimator is checked before any computation, in any dtype
    with pytest.raises(ValueError, match="`estimator` must be 'exact' or 'sampled'; got 'mc'"):
        model.elbo(jax.random.key(0), _tiny_frames(), estimator="mc")


# --------------------------------------------------------------------------- objective


def test_sampled_estimator_is_unbiased_for_the_exact_one():
    # For fixed encodings a: E_z[log p(a, z~) + H[q(z | a)]] = log p(a) (the exact estimator).
    model = _tiny_model()
    mean, std = model.encode(_tiny_frames(8))
    a = mean + std * jax.random.normal(jax.random.key(3), mean.shape, mean.dtype)
    exact = model.lgssm_term(jax.random.key(0), a, estimator="exact")
    keys = jax.random.split(jax.random.key(1), 2000)
    draws = jax.jit(jax.vmap(lambda k: model.lgssm_term(k, a, estimator="sampled")))(keys)
    stderr = float(jnp.std(draws)) / np.sqrt(keys.shape[0])
    assert stderr > 0
    assert abs(float(jnp.mean(draws)) - float(exact)) < 4 * stderr


def test_padding_changes_nothing_and_gradients_stay_finite():
    model = _tiny_model()
    frames = _tiny_frames(7)
    L = 5
    padded = frames.at[L:].set(jnp.nan)
    key = jax.random.key(2)
    elbo = eqx.filter_jit(lambda m, x, n: m.elbo(key, x, length=n)[0])
    for estimator in ("exact", "sampled"):
        # one compiled program gives the padded ELBO and its gradient
        value, grads = eqx.filter_jit(
            eqx.filter_value_and_grad(lambda m: m.elbo(key, padded, estimator=estimator, length=L)[0])
        )(model)
        if estimator == "exact":  # the default estimator, as in `elbo`
            assert_allclose(value, elbo(model, frames[:L], None), jnp.float64)
        leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_gradients_through_smoother_and_sampler_match_finite_differences(estimator):
    model = _tiny_model()
    frames = _tiny_frames(5)
    key = jax.random.key(7)
    # the LGSSM base matrices and the dynamics network's output layer: their gradient flows
    # through the filter/smoother, the posterior sampler and the path densities
    get = lambda m: (m.base_transitions, m.base_emissions, m.dpn_out.weight)  # noqa: E731
    shapes = [p.shape for p in get(model)]
    sizes = [int(np.prod(s)) for s in shapes]

    @jax.jit
    def f(theta):
        parts, start = [], 0
        for shape, size in zip(shapes, sizes):
            parts.append(theta[start : start + size].reshape(shape))
            start += size
        return model_with(parts).elbo(key, frames, estimator=estimator)[0]

    def model_with(parts):
        return eqx.tree_at(get, model, tuple(parts))

    theta = np.concatenate([np.ravel(p) for p in get(model)])
    auto = jax.grad(f)(jnp.asarray(theta))
    fd = central_difference_grad(f, theta)
    assert bool(jnp.any(jnp.abs(auto) > 1e-3))
    assert_allclose(auto, fd, **FD_TOLERANCE)


# --------------------------------------------------------------------------- training


def test_float32_training_steps_are_finite_and_lower_the_loss_on_a_fixed_batch():
    model = kvae.KalmanVAE(jax.random.key(0), kvae.KVAEConfig(image_size=16, hidden=32, rnn_hidden=8))
    batch = kvae.bouncing_ball(jax.random.key(1), 8, 10, size=16, radius=2.0)
    # The sampled estimator's gradient is checked against finite differences, its value for
    # unbiasedness and its padding above; training it here as well would only repeat a
    # 25-second compilation.
    for estimator in ("exact",):
        optimizer = kvae.default_optimizer(3e-3, 30)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        step = kvae.make_train_step(optimizer, estimator=estimator)
        m, losses = model, []
        for i in range(30):
            m, opt_state, loss, parts = step(m, opt_state, jax.random.key(i), batch)
            assert loss.dtype == jnp.float32
            losses.append(float(loss))
        assert np.all(np.isfinite(losses)), estimator
        assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (estimator, losses[:5], losses[-5:])


# --------------------------------------------------------------------------- imputation


def _sequential_imputation(model, frames, observed):
    """The paper's scheme step by step: a missing a_t is the filter's prediction C_t E[z_t | a_<t]."""
    mean, _ = model.encode(frames)
    a_obs = jnp.where(observed[:, None], mean, jnp.nan)
    a_fill = np.where(np.asarray(observed)[:, None], np.asarray(mean), 0.0)
    for t in range(frames.shape[0]):
        if not bool(observed[t]):
            lgssm = model.lgssm(model.mixture_weights(jnp.asarray(a_fill)))  # alpha_t uses a_fill[:t] only
            pred = ssmjax.kalman_filter(lgssm, a_obs).predicted_means[t]  # depends on a_obs[:t] only
            a_fill[t] = np.asarray(lgssm.emission_matrix[t] @ pred)
    lgssm = model.lgssm(model.mixture_weights(jnp.asarray(a_fill)))
    z = ssmjax.rts_smoother(lgssm, a_obs).smoothed_means
    return np.where(np.asarray(observed)[:, None], np.asarray(mean), np.einsum("tij,tj->ti", lgssm.emission_matrix, z))


def test_imputation_equals_the_sequential_scheme():
    model = _tiny_model()
    frames = _tiny_frames(9)
    observed = jnp.array([True, True, False, True, False, False, True, False, False])
    got = eqx.filter_jit(model.impute)(frames, observed, weights="sequential")
    assert_allclose(got["a"], _sequential_imputation(model, frames, observed), jnp.float64)
    assert got["probs"].shape == frames.shape
    # observed frames are their own reconstructions
    mean, _ = model.encode(frames)
    recon = jax.nn.sigmoid(model.decode_logits(mean))
    assert_allclose(got["probs"][observed], recon[observed], jnp.float64)


def _log_density(model, a):
    return ssmjax.kalman_filter(model.lgssm(model.mixture_weights(a)), a).marginal_loglik


def test_most_probable_completion_with_one_base_matrix_is_the_conditional_mean():
    """With K = 1 the weights are constant and the encodings jointly Gaussian: the completion of highest
    density is the conditional mean of the missing rows, C_t E[z_t | a_obs], from any start."""
    model = _tiny_model(config=dataclasses.replace(TINY, num_matrices=1))
    frames = _tiny_frames(9)
    observed = jnp.array([True, True, False, True, False, False, True, False, True])
    mean, _ = model.encode(frames)
    lgssm = model.lgssm(model.mixture_weights(mean))
    z = ssmjax.rts_smoother(lgssm, jnp.where(observed[:, None], mean, jnp.nan)).smoothed_means
    want = jnp.where(observed[:, None], mean, jnp.einsum("tij,tj->ti", lgssm.emission_matrix, z))
    starts = jnp.where(observed[:, None], mean, jnp.stack([jnp.zeros_like(mean), 3.0 + mean[::-1]]))
    got = eqx.filter_jit(model.most_probable_completion)(mean, observed, starts, iterations=40)
    # an optimiser's answer: equal to the closed form to its convergence, far below the starts' distance
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert float(jnp.max(jnp.abs(starts[0] - want))) > 0.1


def test_most_probable_completion_is_a_stationary_point_above_its_starts():
    model = _tiny_model()  # K = 2: the density is not Gaussian in the missing rows
    frames = _tiny_frames(9)
    observed = jnp.array([True, True, True, False, False, False, True, True, True])
    mean, _ = model.encode(frames)
    starts = jnp.where(observed[:, None], mean, jnp.stack([jnp.zeros_like(mean), kvae._interpolated(mean, observed)]))
    got = eqx.filter_jit(model.most_probable_completion)(mean, observed, starts, iterations=40)
    np.testing.assert_array_equal(got[observed], mean[observed])
    best_start = max(float(_log_density(model, s)) for s in starts)
    assert float(_log_density(model, got)) > best_start + 1e-3
    grad = jax.grad(lambda a: _log_density(model, a))
    start_grad = jnp.linalg.norm(grad(starts[1])[~observed])
    assert float(jnp.linalg.norm(grad(got)[~observed])) < 1e-6 * float(start_grad)


def test_interpolated_fills_between_and_holds_at_the_ends():
    a = jnp.array([[9.0], [1.0], [9.0], [9.0], [9.0], [9.0], [7.0]])
    observed = jnp.array([False, True, False, False, False, False, True])
    # observed rows 1 (value 1) and 6 (value 7): row 0 holds 1, rows 2-5 step by 6/5
    np.testing.assert_allclose(kvae._interpolated(a, observed)[:, 0], [1.0, 1.0, 2.2, 3.4, 4.6, 5.8, 7.0])


def test_impute_rejects_an_unknown_weights_scheme():
    with pytest.raises(ValueError, match="`weights` must be"):
        _tiny_model().impute(_tiny_frames(4), jnp.array([True, False, True, True]), weights="smooth")


def test_plot_imputation_draws_four_rows_and_frames_the_missing_ones():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    observed = jnp.array([True, True, False, False, True])
    fig = kvae.plot_imputation(_tiny_model(), _tiny_frames(5), observed, weights="sequential")
    axes = np.array(fig.axes).reshape(4, 5)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["truth", "KVAE smoother", "KVAE filter", "last frame"]
    red = [[ax.spines["top"].get_edgecolor() == matplotlib.colors.to_rgba("red") for ax in row] for row in axes]
    assert np.array_equal(np.array(red), np.tile(~np.asarray(observed), (4, 1)))
    plt.close(fig)


def test_filter_imputation_uses_only_past_frames():
    model = _tiny_model()
    frames = _tiny_frames(9)
    observed = jnp.array([True, True, True, True, False, False, True, True, True])
    impute = eqx.filter_jit(model.impute)
    got = impute(frames, observed, weights="sequential")["filter_probs"]
    # frames after the gap cannot change the filter's imputation of the gap, whatever the smoother's weights
    later = observed.at[6:].set(False)
    sequential = impute(frames, later, weights="sequential")
    want = sequential["filter_probs"]
    assert_allclose(got[4:6], want[4:6], jnp.float64)
    # the map scheme hands on the sequential pass it starts from, unchanged
    best = impute(frames, later, iterations=1)
    np.testing.assert_array_equal(best["filter_probs"], want)
    np.testing.assert_array_equal(best["sequential_probs"], sequential["probs"])
    np.testing.assert_array_equal(sequential["sequential_probs"], sequential["probs"])


# --------------------------------------------------------------------------- the shipped weights


def test_shipped_weights_impute_better_than_the_filter_and_both_baselines():
    """kvae.pretrained() on 128 test videos of notebook 05's test key: on both imputation tasks the smoother
    beats the sequential scheme's smoother and the filter, and is at most half the better baseline
    (measured on 256 videos: 0.47 and 0.31 of it)."""
    model = kvae.pretrained()
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    _, k_test, k_mask, _, _ = kvae._seed_keys(0)
    videos = kvae.bouncing_ball(k_test, 128, 20)
    for observed in (kvae.drop_frames(k_mask, 128, 20, gap=6), kvae.drop_frames(k_mask, 128, 20, probability=0.5)):
        errors = kvae.evaluate_imputation(model, videos, observed)
        assert errors["smoother"] < errors["smoother_sequential"] < errors["filter"], errors
        assert errors["smoother"] <= 0.5 * min(errors["last_frame"], errors["empty_frame"]), errors
