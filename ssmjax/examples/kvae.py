r"""A Kalman variational auto-encoder (Fraccaro et al., NeurIPS 2017) built on ssmjax.

The model, for frames :math:`x_t` (here 32x32 binary images of a bouncing ball),

.. math::

    a_t \mid z_t &\sim \mathcal N(C_t z_t, R), \qquad
    z_{t+1} \mid z_t \sim \mathcal N(A_{t+1} z_t, Q), \qquad z_1 \sim \mathcal N(0, \Sigma_0), \\
    x_t \mid a_t &\sim \textstyle\prod_{\text{pixels}} \mathrm{Bernoulli}(\sigma(\mathrm{decoder}(a_t))),

where :math:`A_t = \sum_k \alpha_t^{(k)} A^{(k)}` and :math:`C_t = \sum_k \alpha_t^{(k)} C^{(k)}`
mix :math:`K` learned base matrices with weights :math:`\alpha_t = \mathrm{softmax}(f(a_{<t}))`
from a GRU over the previous :math:`a` (the "dynamics parameter network"). The encoder
:math:`q(a_t \mid x_t) = \mathcal N(\mu(x_t), \mathrm{diag}\,\sigma^2(x_t))` is an MLP.

**What ssmjax provides.** The per-step matrices produced by the network form a
time-varying :class:`ssmjax.LGSSM`; :func:`ssmjax.rts_smoother` gives the exact posterior
:math:`q(z \mid a) = p_\gamma(z \mid a)` and :math:`\log p_\gamma(a)`,
:func:`ssmjax.lgssm_sample_posterior` a reparameterised draw :math:`\tilde z`, and
:func:`ssmjax.lgssm_log_joint` / :func:`ssmjax.lgssm_posterior_entropy` the path terms.
Everything runs under ``vmap``, ``jit`` and ``grad``.

**The ELBO.** With :math:`\tilde a \sim q(a \mid x)` (reparameterised),

.. math::

    \mathcal L = \sum_t \log p(x_t \mid \tilde a_t) + \sum_t \mathbb H[q(a_t \mid x_t)]
    + \underbrace{\mathbb E_{q(z \mid \tilde a)}\big[\log p_\gamma(\tilde a, z)\big]
      + \mathbb H[q(z \mid \tilde a)]}_{= \log p_\gamma(\tilde a)} .

Because :math:`q(z \mid a)` is the *exact* smoothing posterior, the bracket equals the
Kalman filter's marginal log-likelihood :math:`\log p_\gamma(\tilde a)`; ``estimator="exact"``
(the default) uses it directly (zero variance). ``estimator="sampled"`` follows the
paper's Monte Carlo form, :math:`\log p_\gamma(\tilde a, \tilde z) + \mathbb H[q]` with
:math:`\tilde z` from the smoother's posterior sampler; it has the same expectation.

**Missing frames** (imputation, Sec. 5 of the paper): the encoder's mean stands in for
observed frames, missing ones are NaN for the LGSSM (exact conditioning on what is
observed). The dynamics network needs :math:`a_{t}` for every step, so a missing
:math:`a_t` is replaced by the filter's one-step prediction :math:`C_t\, E[z_t \mid a_{<t}]`;
because the network is causal, iterating "weights from the filled sequence, then filter"
reaches the paper's sequential scheme exactly after at most (number of missing frames)
iterations. Inside a run of missing frames these weights never see the frames after it, so by
default the weights are then re-chosen from the completion of the missing :math:`a_t` that
maximises the model's density :math:`p_\gamma(a)` (:meth:`KalmanVAE.most_probable_completion`;
with the weights fixed, that maximiser is the smoother's mean, so only the weights change).
The smoother then imputes :math:`a_t = C_t\, E[z_t \mid a_{\text{obs}}]`, which is decoded.

Run a training from the command line (defaults are the small CPU configuration of
``notebooks/05_kalman_vae.ipynb``; ``--full`` is the larger one, meant for a GPU; ``--save`` keeps the
weights, ``--init`` continues from them)::

    python -m ssmjax.examples.kvae --steps 3000
    python -m ssmjax.examples.kvae --full
    python -m ssmjax.examples.kvae --pretrained     # evaluate the shipped weights (see pretrained)
    python -m ssmjax.examples.kvae --pretrained --figure imputation.png
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssmjax

__all__ = [
    "KVAEConfig",
    "KalmanVAE",
    "bouncing_ball",
    "make_train_step",
    "train",
    "drop_frames",
    "imputation_error",
    "last_frame_baseline",
    "plot_imputation",
    "pretrained",
    "train_pretrained",
]


# --------------------------------------------------------------------------- data


def bouncing_ball(
    key: PRNGKeyArray,
    num_sequences: int,
    num_timesteps: int = 20,
    *,
    size: int = 32,
    radius: float = 3.0,
    speed: tuple[float, float] = (1.5, 3.0),
) -> Float[Array, "N T H W"]:
    """Binary videos of a ball of ``radius`` pixels bouncing elastically in a ``size`` x ``size`` box.

    Start positions are uniform in the box, directions uniform on the circle and speeds
    (pixels per frame) uniform in ``speed``. Pixels whose centres are within ``radius``
    of the ball's centre are 1. Deterministic given ``key``; float32 {0, 1} values.
    """
    k_pos, k_dir, k_speed = jax.random.split(key, 3)
    span = size - 2.0 * radius  # the centre moves in [radius, size - radius]
    start = radius + span * jax.random.uniform(k_pos, (num_sequences, 2))
    angle = 2.0 * jnp.pi * jax.random.uniform(k_dir, (num_sequences,))
    speeds = jax.random.uniform(k_speed, (num_sequences,), minval=speed[0], maxval=speed[1])
    velocity = speeds[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    t = jnp.arange(num_timesteps, dtype=jnp.float32)
    free = start[:, None, :] - radius + velocity[:, None, :] * t[None, :, None]  # unfolded path
    folded = jnp.mod(free, 2.0 * span)
    centre = radius + jnp.where(folded <= span, folded, 2.0 * span - folded)  # reflections
    grid = jnp.arange(size, dtype=jnp.float32) + 0.5
    d2 = (grid[None, None, :, None] - centre[..., 0, None, None]) ** 2 + (
        grid[None, None, None, :] - centre[..., 1, None, None]
    ) ** 2
    return (d2 <= radius**2).astype(jnp.float32)


def drop_frames(
    key: PRNGKeyArray,
    num_sequences: int,
    num_timesteps: int,
    *,
    gap: Optional[int] = None,
    probability: Optional[float] = None,
    keep_first: int = 4,
) -> Bool[Array, "N T"]:
    """Observed-frame masks (N, T) for the paper's two imputation tasks; the first ``keep_first`` frames are kept.

    ``gap``: one run of ``gap`` consecutive missing frames per sequence, starting uniformly in
    ``[keep_first, T - gap]``. ``probability``: every later frame is dropped independently with
    this probability. Give exactly one of the two.
    """
    if (gap is None) == (probability is None):
        raise ValueError("give exactly one of `gap` and `probability`.")
    t = jnp.arange(num_timesteps)
    if probability is not None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"`probability` must be in [0, 1]; got {probability}.")
        dropped = jax.random.bernoulli(key, probability, (num_sequences, num_timesteps))
        return ~(dropped & (t[None] >= keep_first))
    if not 0 < gap <= num_timesteps - keep_first:
        raise ValueError(f"`gap` must be in 1..{num_timesteps - keep_first}; got {gap}.")
    starts = jax.random.randint(key, (num_sequences,), keep_first, num_timesteps - gap + 1)
    return ~((t[None] >= starts[:, None]) & (t[None] < starts[:, None] + gap))


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class KVAEConfig:
    """Sizes and fixed noise levels (defaults follow the paper's bouncing-ball setting)."""

    image_size: int = 32
    a_dim: int = 2  # encoded observation a_t
    z_dim: int = 4  # LGSSM state z_t
    num_matrices: int = 3  # K base matrices
    hidden: int = 128  # encoder / decoder MLP width
    rnn_hidden: int = 32  # dynamics parameter network (GRU) width
    transition_noise: float = 0.08  # Q = transition_noise * I
    emission_noise: float = 0.03  # R = emission_noise * I
    initial_cov: float = 1.0  # Sigma_0 = initial_cov * I


@eqx.filter_jit
def _init_parts(key: PRNGKeyArray, c: KVAEConfig, dtype):
    """The networks and base matrices of a :class:`KalmanVAE`, initialised in one compiled program
    (built op by op, the layers' initialisers compile ~35 small programs: 10.4 s against 6.0 s for
    the first model on the 2-core CPU of ``benchmarks/README.md``, mostly compiling the samplers)."""
    k_enc, k_dec, k_cell, k_out, k_c = jax.random.split(key, 5)
    pixels = c.image_size**2
    return (
        eqx.nn.MLP(pixels, 2 * c.a_dim, c.hidden, 2, activation=jax.nn.relu, key=k_enc, dtype=dtype),
        eqx.nn.MLP(c.a_dim, pixels, c.hidden, 2, activation=jax.nn.relu, key=k_dec, dtype=dtype),
        eqx.nn.GRUCell(c.a_dim, c.rnn_hidden, key=k_cell, dtype=dtype),
        eqx.nn.Linear(c.rnn_hidden, c.num_matrices, key=k_out, dtype=dtype),
        jnp.tile(jnp.eye(c.z_dim, dtype=dtype), (c.num_matrices, 1, 1)),
        0.05 * jax.random.normal(k_c, (c.num_matrices, c.a_dim, c.z_dim), dtype),
    )


class KalmanVAE(eqx.Module):
    """Encoder, decoder, dynamics parameter network and the K base LGSSM matrices.

    Methods take one sequence (vmap them for a batch); frames are (T, H, W) in [0, 1].
    """

    encoder: eqx.nn.MLP
    decoder: eqx.nn.MLP
    dpn_cell: eqx.nn.GRUCell
    dpn_out: eqx.nn.Linear
    base_transitions: Float[Array, "K Dz Dz"]
    base_emissions: Float[Array, "K Da Dz"]
    config: KVAEConfig = eqx.field(static=True)

    def __init__(self, key: PRNGKeyArray, config: KVAEConfig = KVAEConfig(), dtype=jnp.float32):
        parts = _init_parts(key, config, jnp.dtype(dtype))
        self.encoder, self.decoder, self.dpn_cell, self.dpn_out, self.base_transitions, self.base_emissions = parts
        self.config = config

    # ---------------------------------------------------------------- pieces
    def encode(self, frames: Float[Array, "T H W"]) -> tuple[Float[Array, "T Da"], Float[Array, "T Da"]]:
        """Mean and standard deviation of q(a_t | x_t)."""
        out = jax.vmap(self.encoder)(frames.reshape(frames.shape[0], -1))
        mean, raw = jnp.split(out, 2, axis=-1)
        return mean, jax.nn.softplus(raw) + 1e-4

    def decode_logits(self, a: Float[Array, "T Da"]) -> Float[Array, "T H W"]:
        """Bernoulli logits of p(x_t | a_t)."""
        s = self.config.image_size
        return jax.vmap(self.decoder)(a).reshape(a.shape[0], s, s)

    def mixture_weights(self, a: Float[Array, "T Da"]) -> Float[Array, "T K"]:
        """alpha_t from a_{<t} (a_0 := 0): a GRU over the previous encodings."""

        def _step(h, a_prev):
            logits = self.dpn_out(h)
            return self.dpn_cell(a_prev, h), jax.nn.softmax(logits)

        h0 = jnp.zeros((self.config.rnn_hidden,), a.dtype)
        _, alphas = jax.lax.scan(_step, h0, a)  # alpha_t uses h after a_{t-1}
        return alphas

    def lgssm(self, alphas: Float[Array, "T K"]) -> ssmjax.LGSSM:
        """The time-varying LGSSM over z with A_t, C_t mixed by ``alphas``."""
        c = self.config
        dtype = alphas.dtype
        transition = jnp.einsum("tk,kij->tij", alphas[1:], self.base_transitions)  # moves z_t -> z_{t+1}
        emission = jnp.einsum("tk,kij->tij", alphas, self.base_emissions)
        return ssmjax.LGSSM(
            initial_mean=jnp.zeros((c.z_dim,), dtype),
            initial_cov=c.initial_cov * jnp.eye(c.z_dim, dtype=dtype),
            transition_matrix=transition,
            transition_cov=c.transition_noise * jnp.eye(c.z_dim, dtype=dtype),
            emission_matrix=emission,
            emission_cov=c.emission_noise * jnp.eye(c.a_dim, dtype=dtype),
        )

    # ---------------------------------------------------------------- objective
    def elbo(
        self,
        key: PRNGKeyArray,
        frames: Float[Array, "T H W"],
        *,
        estimator: str = "exact",
        length=None,
        uniform_weights: bool = False,
    ) -> tuple[Float[Array, ""], dict]:
        """One-sample ELBO of a sequence (see the module docstring) and its parts.

        ``length`` marks frames ``t >= length`` as padding (they contribute nothing).
        ``uniform_weights=True`` replaces alpha_t by 1/K (the warm-up phase of training).
        """
        if estimator not in ("exact", "sampled"):
            raise ValueError(f"`estimator` must be 'exact' or 'sampled'; got {estimator!r}.")
        k_a, k_z = jax.random.split(key)
        T = frames.shape[0]
        real = jnp.ones((T,), bool) if length is None else jnp.arange(T) < length
        frames = jnp.where(real[:, None, None], frames, 0.0)  # padding may hold NaN: never let it reach a gradient
        mean, std = self.encode(frames)
        # one key per frame, so that padding does not change the noise of the real frames
        eps = jax.vmap(lambda t: jax.random.normal(jax.random.fold_in(k_a, t), mean.shape[1:], mean.dtype))(
            jnp.arange(T)
        )
        a = mean + std * eps
        logits = self.decode_logits(a)
        recon = jnp.sum(jnp.where(real, jnp.sum(frames * logits - jax.nn.softplus(logits), axis=(1, 2)), 0.0))
        entropy_a = jnp.sum(jnp.where(real[:, None], jnp.log(std) + 0.5 * (1.0 + jnp.log(2.0 * jnp.pi)), 0.0))
        lgssm_term = self.lgssm_term(k_z, a, estimator=estimator, length=length, uniform_weights=uniform_weights)
        elbo = recon + entropy_a + lgssm_term
        return elbo, dict(reconstruction=recon, entropy_a=entropy_a, lgssm=lgssm_term)

    def lgssm_term(
        self,
        key: PRNGKeyArray,
        a: Float[Array, "T Da"],
        *,
        estimator: str = "exact",
        length=None,
        uniform_weights: bool = False,
    ):
        r"""The LGSSM part of the ELBO, :math:`E_{q(z \mid a)}[\log p(a, z)] + H[q(z \mid a)] = \log p(a)`.

        ``"exact"``: the Kalman filter's :math:`\log p(a)`. ``"sampled"``: one posterior draw
        :math:`\tilde z` (``key``), :math:`\log p(a, \tilde z) + H[q]` -- unbiased for the same value.
        """
        alphas = self.mixture_weights(a)
        if uniform_weights:
            alphas = jnp.full_like(alphas, 1.0 / alphas.shape[-1])
        model = self.lgssm(alphas)
        if estimator == "exact":
            return ssmjax.kalman_filter(model, a, length=length).marginal_loglik
        post = ssmjax.rts_smoother(model, a, length=length)
        z = ssmjax.lgssm_sample_posterior(model, a, length=length, key=key)
        return ssmjax.lgssm_log_joint(model, z, a, length=length) + ssmjax.lgssm_posterior_entropy(
            post, length=length
        )

    # ---------------------------------------------------------------- imputation
    def impute(
        self,
        frames: Float[Array, "T H W"],
        observed: Bool[Array, " T"],
        *,
        weights: str = "map",
        iterations: int = 20,
    ) -> dict[str, Array]:
        r"""Fill the frames where ``observed`` is False (see the module docstring).

        ``weights`` chooses the mixture weights that the smoother runs with:
        ``"sequential"`` is the paper's causal scheme (a missing :math:`a_t` is the filter's
        prediction); ``"map"`` (the default) takes the completion of the missing encodings that
        maximises the model's density :math:`p_\gamma(a_{\text{obs}}, a_{\text{mis}})`, found by
        ``iterations`` L-BFGS steps from three starts (the sequential scheme's smoothed and
        filtered encodings, and a linear interpolation of the observed ones), so that the weights
        inside a gap also see the frames after it (see :meth:`most_probable_completion`).

        Returns ``probs`` (T, H, W) pixel probabilities of every frame (observed ones
        reconstructed, missing ones imputed by the smoother), ``a`` (T, Da) the encodings used
        (imputed where missing), ``z_means`` (T, Dz) the smoothed state means and ``alphas`` (T, K);
        and, from the sequential scheme's pass (which ``"map"`` starts from), ``sequential_probs``
        (its smoother's frames, equal to ``probs`` when ``weights="sequential"``) and ``filter_probs``
        (its filter's frames, which use only past frames).
        """
        if weights not in ("map", "sequential"):
            raise ValueError(f"`weights` must be 'map' or 'sequential'; got {weights!r}.")
        return _impute_jit(self, frames, observed, weights, iterations)

    def _impute(self, frames, observed, weights: str, iterations: int) -> dict[str, Array]:
        mean, _ = self.encode(frames)
        a_obs = jnp.where(observed[:, None], mean, jnp.nan)
        num_missing = jnp.sum(~observed)

        def emitted(model, z):
            return jnp.where(observed[:, None], mean, jnp.einsum("tij,tj->ti", model.emission_matrix, z))

        def fill(_, a_fill):
            model = self.lgssm(self.mixture_weights(a_fill))
            return emitted(model, ssmjax.kalman_filter(model, a_obs).predicted_means)

        a_fill = jax.lax.fori_loop(0, num_missing, fill, jnp.where(observed[:, None], mean, 0.0))
        alphas = self.mixture_weights(a_fill)
        model = self.lgssm(alphas)
        post = ssmjax.rts_smoother(model, a_obs)
        a_sequential = a = emitted(model, post.smoothed_means)
        a_filtered = emitted(model, post.filtered_means)
        if weights == "map":
            starts = jnp.stack([a_sequential, a_filtered, _interpolated(mean, observed)])
            alphas = self.mixture_weights(self.most_probable_completion(mean, observed, starts, iterations=iterations))
            model = self.lgssm(alphas)
            post = ssmjax.rts_smoother(model, a_obs)
            a = emitted(model, post.smoothed_means)
        return dict(
            probs=jax.nn.sigmoid(self.decode_logits(a)),
            a=a,
            z_means=post.smoothed_means,
            alphas=alphas,
            sequential_probs=jax.nn.sigmoid(self.decode_logits(a_sequential)),
            filter_probs=jax.nn.sigmoid(self.decode_logits(a_filtered)),
        )

    def most_probable_completion(
        self,
        a: Float[Array, "T Da"],
        observed: Bool[Array, " T"],
        starts: Float[Array, "S T Da"],
        *,
        iterations: int = 20,
    ) -> Float[Array, "T Da"]:
        r"""The encodings ``a`` with the rows where ``observed`` is False replaced by the values that
        maximise :math:`\log p_\gamma(a)` (the Kalman filter's marginal log-likelihood of the whole
        completed sequence, with the mixture weights computed from it).

        With the weights held fixed the maximiser would be the smoother's mean; letting them depend
        on the completion lets frames after a gap choose the dynamics inside it. The density is not
        concave in the weights, so each of the ``starts`` (S, T, Da) is refined by ``iterations``
        L-BFGS steps (``optax.lbfgs``), and the best of the starts and their refinements is
        returned: never a lower density than the best start.
        """

        def negative_log_density(a_missing):
            completed = jnp.where(observed[:, None], a, a_missing)
            model = self.lgssm(self.mixture_weights(completed))
            # the line search's trial points are the solver's, not the caller's: a non-finite value
            # is discarded by the selection below rather than raised as an input error
            with ssmjax.value_checks(False):
                return -ssmjax.kalman_filter(model, completed).marginal_loglik

        # under vmap a line search runs as long as its slowest sequence; past 5 steps it only
        # polishes converged sequences (same errors in notebook 05, at 2-3x the time)
        solver = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=5))
        value_and_grad = optax.value_and_grad_from_state(negative_log_density)

        def refine(start):
            def step(carry, _):
                x, state = carry
                value, grad = value_and_grad(x, state=state)
                updates, state = solver.update(
                    grad, state, x, value=value, grad=grad, value_fn=negative_log_density
                )
                return (optax.apply_updates(x, updates), state), None

            (x, _), _ = jax.lax.scan(step, (start, solver.init(start)), None, length=iterations)
            return x

        # one start after another (vmapped, every start's line search would wait for the slowest), as
        # a loop over the starts: one copy of the solver in the program (unrolled, three compiled)
        candidates = jnp.concatenate([starts, jax.lax.map(refine, starts)])
        values = jax.vmap(negative_log_density)(candidates)
        best = jnp.argmin(jnp.where(jnp.isfinite(values), values, jnp.inf))
        return jnp.where(observed[:, None], a, candidates[best])


def _interpolated(a: Float[Array, "T Da"], observed: Bool[Array, " T"]) -> Float[Array, "T Da"]:
    """``a`` with each missing row linearly interpolated between the observed rows around it
    (held constant before the first and after the last observed row)."""
    T = a.shape[0]
    t = jnp.arange(T)
    before = jax.lax.cummax(jnp.where(observed, t, -1))
    after = jnp.flip(jax.lax.cummin(jnp.flip(jnp.where(observed, t, T))))
    before, after = jnp.where(before >= 0, before, after), jnp.where(after < T, after, before)
    before, after = jnp.clip(before, 0, T - 1), jnp.clip(after, 0, T - 1)
    w = jnp.where(after > before, (t - before) / jnp.maximum(after - before, 1), 0.0).astype(a.dtype)
    return jnp.where(observed[:, None], a, (1 - w)[:, None] * a[before] + w[:, None] * a[after])


# --------------------------------------------------------------------------- training


def _loss(model: KalmanVAE, key, batch, estimator, reconstruction_weight, uniform_weights):
    keys = jax.random.split(key, batch.shape[0])
    _, parts = jax.vmap(lambda k, x: model.elbo(k, x, estimator=estimator, uniform_weights=uniform_weights))(
        keys, batch
    )
    per_frame = batch.shape[0] * batch.shape[1]
    parts = jax.tree.map(lambda v: jnp.sum(v) / per_frame, parts)
    objective = reconstruction_weight * parts["reconstruction"] + parts["entropy_a"] + parts["lgssm"]
    return -objective, parts


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    estimator: str = "exact",
    reconstruction_weight: float = 1.0,
    uniform_weights: bool = False,
):
    """A compiled ``step(model, opt_state, key, batch) -> (model, opt_state, loss, parts)``.

    ``loss`` is the negative objective per frame (nats) of ``batch`` (B, T, H, W) before the
    update: the negative ELBO when ``reconstruction_weight`` is 1, otherwise the ELBO with
    the reconstruction term scaled (a weight below 1 makes the encodings follow the linear
    dynamics more closely). ``parts`` holds the unweighted ELBO terms per frame.
    ``uniform_weights`` fixes alpha_t = 1/K (warm-up).
    """

    @eqx.filter_jit
    def step(model, opt_state, key, batch):
        (loss, parts), grads = eqx.filter_value_and_grad(_loss, has_aux=True)(
            model, key, batch, estimator, reconstruction_weight, uniform_weights
        )
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss, parts

    return step


def default_optimizer(learning_rate: float = 3e-3, num_steps: int = 3000) -> optax.GradientTransformation:
    """Adam with global-norm clipping, cosine decay, and updates skipped on a non-finite gradient."""
    schedule = optax.cosine_decay_schedule(learning_rate, max(num_steps, 1), alpha=0.05)
    return optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(50.0), optax.adam(schedule)), max_consecutive_errors=20
    )


def train(
    key: PRNGKeyArray,
    model: KalmanVAE,
    data: Float[Array, "N T H W"],
    *,
    num_steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    estimator: str = "exact",
    reconstruction_weight: float = 1.0,
    warmup_steps: int = 0,
    progress: bool = True,
) -> tuple[KalmanVAE, np.ndarray]:
    """Minibatch training; returns the trained model and the per-step negative ELBO per frame.

    Each step is one compiled call (:func:`make_train_step`); a step whose gradient is not
    finite is skipped by ``optax.apply_if_finite`` (the returned loss shows it as non-finite).
    During the first ``warmup_steps`` the mixture weights are fixed to 1/K, so the encoder,
    decoder and base matrices settle before the dynamics parameter network is used.
    """
    from tqdm.auto import tqdm

    optimizer = default_optimizer(learning_rate, num_steps)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    steps = [
        make_train_step(optimizer, estimator=estimator, reconstruction_weight=reconstruction_weight,
                        uniform_weights=uniform)
        for uniform in (False, True)
    ]
    losses = np.empty(num_steps)
    bar = tqdm(range(num_steps), disable=not progress, desc="KVAE", mininterval=1.0)
    for i in bar:
        key, k_batch, k_step = jax.random.split(key, 3)
        idx = jax.random.choice(k_batch, data.shape[0], (batch_size,), replace=False)
        model, opt_state, _, parts = steps[i < warmup_steps](model, opt_state, k_step, data[idx])
        losses[i] = -float(parts["reconstruction"] + parts["entropy_a"] + parts["lgssm"])
        if i % 50 == 0:
            bar.set_postfix(loss=f"{losses[i]:.2f}")
    return model, losses


# --------------------------------------------------------------------------- the shipped weights

PRETRAINED_PATH = pathlib.Path(__file__).with_name("kvae_bouncing_ball.eqx")
PRETRAINED_SEQUENCES = 10000
# train()'s settings for the shipped weights: 26 minutes on the 2-core CPU of benchmarks/README.md
PRETRAINED_TRAINING = dict(num_steps=40000, batch_size=64, warmup_steps=3000, reconstruction_weight=0.3)


def _seed_keys(seed: int):
    """``(k_data, k_test, k_mask, k_model, k_train)``: the keys of :func:`main` and notebook 05."""
    return jax.random.split(jax.random.key(seed), 5)


def train_pretrained(seed: int = 0, progress: bool = True) -> KalmanVAE:
    """Train the weights that :func:`pretrained` loads: :func:`train` with :data:`PRETRAINED_TRAINING`
    on :data:`PRETRAINED_SEQUENCES` bouncing-ball videos of 20 frames, with the keys of :func:`main`;
    the same as ``python -m ssmjax.examples.kvae --sequences 10000 --batch-size 64 --steps 40000
    --warmup-steps 3000 --reconstruction-weight 0.3 --save kvae_bouncing_ball.eqx``."""
    k_data, _, _, k_model, k_train = _seed_keys(seed)
    data = bouncing_ball(k_data, PRETRAINED_SEQUENCES, 20)
    return train(k_train, KalmanVAE(k_model), data, progress=progress, **PRETRAINED_TRAINING)[0]


def pretrained() -> KalmanVAE:
    """The Kalman VAE shipped with ssmjax (``kvae_bouncing_ball.eqx``, 1.2 MB), made by
    :func:`train_pretrained` with seed 0. Its imputation errors on the 256 test videos of notebook 05:
    ``python -m ssmjax.examples.kvae --pretrained``."""
    return eqx.tree_deserialise_leaves(PRETRAINED_PATH, KalmanVAE(jax.random.key(0)))


# --------------------------------------------------------------------------- evaluation


def last_frame_baseline(frames: Float[Array, "T H W"], observed: Bool[Array, " T"]) -> Float[Array, "T H W"]:
    """Each missing frame replaced by the last observed one before it (the next one if none)."""
    T = frames.shape[0]
    idx = jnp.where(observed, jnp.arange(T), -1)
    last = jax.lax.cummax(idx)
    first_seen = jnp.argmax(observed)
    return frames[jnp.where(last >= 0, last, first_seen)]


def imputation_error(
    predicted: Float[Array, "*B T H W"], truth: Float[Array, "*B T H W"], observed: Bool[Array, "*B T"]
) -> Array:
    """Fraction of incorrectly imputed pixels (prediction thresholded at 0.5) over the missing frames."""
    wrong = ((predicted > 0.5) != (truth > 0.5)).mean(axis=(-1, -2))
    missing = ~observed
    return jnp.sum(jnp.where(missing, wrong, 0.0)) / jnp.maximum(jnp.sum(missing), 1)


# compiled once per shape, with the model as an argument (a fresh ``filter_jit(model.impute)`` per call
# would recompile every time, with the weights baked in as constants); run op by op, one imputation
# took 10 s on the 2-core CPU, its loops traced and compiled anew on every call
_impute_jit = eqx.filter_jit(KalmanVAE._impute)


@eqx.filter_jit
def _impute_batch(model: KalmanVAE, frames, observed) -> dict[str, Array]:
    return jax.vmap(model.impute)(frames, observed)


def evaluate_imputation(model: KalmanVAE, frames, observed) -> dict[str, float]:
    """Imputation error of the smoother (mixture weights of the most probable completion, and of the
    paper's sequential scheme), the filter and two baselines on a batch.

    Baselines: ``last_frame`` copies the last observed frame, ``empty_frame`` predicts no
    ball at all (its error is the fraction of ball pixels: a model must beat both).
    """
    out = _impute_batch(model, frames, observed)  # the sequential scheme's results come with it
    base = jax.vmap(last_frame_baseline)(frames, observed)
    return dict(
        smoother=float(imputation_error(out["probs"], frames, observed)),
        smoother_sequential=float(imputation_error(out["sequential_probs"], frames, observed)),
        filter=float(imputation_error(out["filter_probs"], frames, observed)),
        last_frame=float(imputation_error(base, frames, observed)),
        empty_frame=float(imputation_error(jnp.zeros_like(frames), frames, observed)),
    )


def plot_imputation(
    model: KalmanVAE, frames: Float[Array, "T H W"], observed: Bool[Array, " T"], *, weights: str = "map"
):
    """A matplotlib figure of one video: the truth, the smoother's and the filter's imputation
    (:meth:`KalmanVAE.impute` with ``weights``) and the last-frame baseline, one row each, missing
    frames framed in red."""
    import matplotlib.pyplot as plt

    result = model.impute(frames, observed, weights=weights)
    rows = [
        ("truth", frames),
        ("KVAE smoother", result["probs"]),
        ("KVAE filter", result["filter_probs"]),
        ("last frame", last_frame_baseline(frames, observed)),
    ]
    T = frames.shape[0]
    fig, axes = plt.subplots(len(rows), T, figsize=(0.75 * T, 0.9 * len(rows) + 0.1), squeeze=False)
    for r, (name, video) in enumerate(rows):
        for t in range(T):
            ax = axes[r, t]
            ax.imshow(np.asarray(video[t]), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if not bool(observed[t]):
                for spine in ax.spines.values():
                    spine.set_color("red")
                    spine.set_linewidth(2)
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", fontsize=8)
    fig.suptitle("missing frames framed in red", fontsize=9)
    return fig


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--sequences", type=int, default=2000)
    parser.add_argument("--timesteps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--estimator", choices=("exact", "sampled"), default="exact")
    parser.add_argument("--reconstruction-weight", type=float, default=1.0)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--gap", type=int, default=6, help="consecutive missing frames per test sequence")
    parser.add_argument("--drop-probability", type=float, default=0.5, help="for the random-drop task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="larger run for a GPU: 10000 sequences, 20000 steps, batch 64")
    parser.add_argument("--save", default=None, help="write the trained weights here (equinox.tree_serialise_leaves)")
    parser.add_argument("--init", default=None, help="start from weights written by --save (a fresh schedule)")
    parser.add_argument("--pretrained", action="store_true", help="no training: evaluate the shipped weights")
    parser.add_argument("--figure", default=None,
                        help="write plot_imputation of test video 3 with its gap here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.full:
        args.steps, args.sequences, args.batch_size = 20000, 10000, 64
    k_data, k_test, k_mask, k_model, k_train = _seed_keys(args.seed)
    test = bouncing_ball(k_test, 256, args.timesteps)
    observed = drop_frames(k_mask, 256, args.timesteps, gap=args.gap)
    if args.pretrained:
        model = pretrained()
    else:
        data = bouncing_ball(k_data, args.sequences, args.timesteps)
        model = KalmanVAE(k_model)
        if args.init:
            model = eqx.tree_deserialise_leaves(args.init, model)
        start = time.perf_counter()
        model, losses = train(
            k_train, model, data, num_steps=args.steps, batch_size=args.batch_size,
            learning_rate=args.learning_rate, estimator=args.estimator,
            reconstruction_weight=args.reconstruction_weight, warmup_steps=args.warmup_steps,
        )
        seconds = time.perf_counter() - start
        if args.save:
            eqx.tree_serialise_leaves(args.save, model)  # read back with eqx.tree_deserialise_leaves(path, KalmanVAE(key))
        print(f"device {jax.devices()[0].device_kind}; {args.steps} steps in {seconds:.1f} s")
        print(f"negative ELBO per frame: first 50 steps {np.mean(losses[:50]):.2f}, last 50 {np.mean(losses[-50:]):.2f}")
    tasks = {
        f"a run of {args.gap} missing frames": observed,
        f"frames dropped with probability {args.drop_probability}": drop_frames(
            k_mask, 256, args.timesteps, probability=args.drop_probability
        ),
    }
    print("fraction of incorrectly imputed pixels (256 test sequences):")
    for task, mask in tasks.items():
        errors = evaluate_imputation(model, test, mask)
        print(f"  {task}: " + ", ".join(f"{name} {value:.4f}" for name, value in errors.items()))
    if args.figure:
        plot_imputation(model, test[3], observed[3]).savefig(args.figure, dpi=80, bbox_inches="tight")

if __name__ == "__main__":
    main()
