"""Gradient-based maximum likelihood with optax, compiled as one ``lax.scan``."""

from __future__ import annotations

import os
import typing
import warnings
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree, Shaped

from .._checks import positive_int, to_device, value_checks
from . import checkpoint as _checkpoint
from . import progress as _progress
from .protocol import AbstractFittableModel, Model, check_frozen


def _minibatch_loss(model, trainable, fixed, emissions, lengths, inputs, prior, prior_weight):
    fitted = model._from_unconstrained({**trainable, **fixed})
    lls = jax.vmap(lambda y, n, u: fitted.marginal_loglik(y, length=n, inputs=u))(emissions, lengths, inputs)
    objective = jnp.sum(lls)
    if prior is not None:  # the mini-batch's share of the log prior
        objective = objective + prior_weight * fitted._log_prior(prior)
    return -objective / jnp.sum(lengths)


@eqx.filter_jit
def _sgd_compiled(
    model, trainable, opt_state, fixed, emissions, lengths, inputs, key, start, optimizer, num_steps, length,
    batch_size, progress, prior,
):
    """Steps ``start .. start + length`` (``start`` traced) of the ``num_steps`` a fit takes.

    ``opt_state=None`` initialises the optimizer here (the first segment). The step keys are
    always split ``num_steps`` ways from ``key``, so a fit cut into segments draws the same
    mini-batches as one run in a single segment.
    """
    num_sequences = emissions.shape[0]
    if opt_state is None:
        opt_state = optimizer.init(trainable)

    def take(idx):
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return emissions[idx], lengths[idx], jax.tree.map(pick, inputs)

    def step(carry, step_key):
        trainable, opt_state, i, skipped = carry
        if batch_size < num_sequences:
            idx = jax.random.choice(step_key, num_sequences, (batch_size,), replace=False)
        else:
            idx = jnp.arange(num_sequences)
        y, n, u = take(idx)
        loss, grads = jax.value_and_grad(_minibatch_loss, argnums=1)(
            model, trainable, fixed, y, n, u, prior, batch_size / num_sequences
        )
        updates, new_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        # A non-finite loss or gradient skips the update instead of poisoning the model.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        trainable = keep(new_trainable, trainable)
        opt_state = keep(new_state, opt_state)
        _progress.report(progress, i, loss)
        return (trainable, opt_state, i + 1, skipped + (~finite).astype(jnp.int32)), loss

    keys = jax.lax.dynamic_slice_in_dim(jax.random.split(key, num_steps), start, length)
    init = (trainable, opt_state, start, jnp.asarray(0, jnp.int32))
    # Iterates are valid by construction (unconstrained view); a degenerate step is
    # skipped by the finite-check above rather than raised by a value check.
    with value_checks(False):
        (trainable, opt_state, _, skipped), losses = jax.lax.scan(step, init, keys)
    return trainable, opt_state, losses, skipped


@typing.no_type_check
def fit_sgd(
    model: Model,
    emissions: Shaped[ArrayLike, "B T ..."],
    optimizer: optax.GradientTransformation,
    *,
    lengths: Int[ArrayLike, " B"] | None = None,
    inputs: Float[ArrayLike, "B T Du"] | None = None,
    num_steps: int = 1000,
    batch_size: int | None = None,
    frozen: Sequence[str] = (),
    progress: bool = False,
    prior: PyTree | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    key: PRNGKeyArray | None = None,
) -> tuple[Model, Float[Array, " num_steps"]]:
    r"""Maximise the marginal log-likelihood with an optax optimizer.

    The loss is the negative log-likelihood per observed time step of a mini-batch,
    :math:`-\sum_{b \in \text{batch}} \log p(y^{(b)}) / \sum_{b} T_b`, optimised
    over the model's unconstrained view (logits for stochastic matrices, Cholesky
    factors with log-diagonals for covariances, log-rates), so every step is a valid
    model. All ``num_steps`` steps, including the mini-batch draws, run inside one
    compiled ``lax.scan``. A step whose loss or gradient is not finite is skipped
    (and counted in a warning) rather than corrupting the model.

    Args:
        model: the initial model.
        emissions: ``(B, T, ...)`` padded batch, as in :func:`ssmjax.fit_em`.
        optimizer: any ``optax.GradientTransformation``. Passing the same object again
            reuses the compiled loop.
        lengths: ``(B,)`` sequence lengths, or ``None``.
        inputs: ``(B, T, Du)`` inputs for models that take them.
        num_steps: number of optimizer steps.
        batch_size: sequences per step (drawn without replacement each step);
            ``None`` uses the full batch.
        key: PRNG key for the mini-batch draws (required when ``batch_size < B``).
        frozen: parameter names kept fixed (same names as in :func:`ssmjax.fit_em`).
        prior: a prior on the parameters (:class:`ssmjax.HMMPrior` for an HMM), or None; the loss
            then subtracts the mini-batch's share (its fraction of the sequences) of the log prior.
        progress: show a tqdm progress bar fed from inside the compiled loop.
        checkpoint: a file path, or None. The fit writes its whole state there (parameters,
            optimizer state, losses so far; atomically) every ``checkpoint_every`` steps and at
            the end; if the file exists when the fit starts, it resumes from it, and ends exactly
            as the uninterrupted fit would. Pass the same ``optimizer``: its state is restored,
            its settings are not stored. A checkpoint of another fit is refused with a ValueError.
        checkpoint_every: steps between two checkpoints.

    Returns:
        ``(fitted_model, losses)`` with ``losses`` of shape ``(num_steps,)``.

    Example:
        Fitting with the built-in loop:

        >>> import jax, jax.numpy as jnp, optax, ssmjax
        >>> counts = jnp.asarray(ssmjax.datasets.load_earthquakes().values)[None, :, None]
        >>> hmm = ssmjax.HMM.from_data(counts, num_states=2, emissions_type="poisson", key=jax.random.key(0))
        >>> fitted, losses = ssmjax.fit_sgd(hmm, counts, optax.adam(0.05), num_steps=200)
        >>> bool(losses[-1] < losses[0])
        True

        Writing your own loop: models are equinox Modules, so differentiate
        ``marginal_loglik`` directly.

        >>> import equinox as eqx
        >>> loss = lambda m: -m.marginal_loglik(counts[0])
        >>> value, grads = eqx.filter_value_and_grad(loss)(hmm)
    """
    if not isinstance(model, AbstractFittableModel):
        raise ValueError(f"`model` must be an ssmjax model (HMM, LGSSM, ...); got {type(model).__name__}.")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            f"`optimizer` must be an optax.GradientTransformation (e.g. optax.adam(1e-2)); "
            f"got {type(optimizer).__name__}."
        )
    num_steps = positive_int("num_steps", num_steps)
    every = _checkpoint.check_every(checkpoint, checkpoint_every)
    frozen = check_frozen(model, frozen)
    model._check_prior(prior)
    emissions, lengths, inputs = model._check_batch(emissions, lengths, inputs)
    num_sequences = emissions.shape[0]
    if batch_size is None:
        batch_size = num_sequences
    if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= num_sequences:
        raise ValueError(
            f"`batch_size` must be an int in [1, {num_sequences}] (the number of sequences); got {batch_size!r}."
        )
    if key is None:
        if batch_size < num_sequences:
            raise ValueError("`key` is required when `batch_size` is smaller than the number of sequences.")
        key = jax.random.key(0)
    params = model._unconstrained()
    # a group name ("emissions") freezes every parameter under it ("emissions.means", ...)
    is_frozen = lambda k: k in frozen or any(k.startswith(f + ".") for f in frozen)  # noqa: E731
    trainable = {k: v for k, v in params.items() if not is_frozen(k)}
    fixed = {k: v for k, v in params.items() if is_frozen(k)}
    losses = np.full((num_steps,), np.nan, np.dtype(jnp.result_type(float)))
    done, skipped, opt_state = 0, 0, None
    if checkpoint is not None:
        expected = _checkpoint.settings("fit_sgd", model, (emissions, lengths, inputs), prior,
                                        num_steps=num_steps, batch_size=int(batch_size), frozen=sorted(frozen),
                                        key=np.asarray(jax.random.key_data(key)).tolist())
        like = {"trainable": trainable, "opt_state": jax.eval_shape(optimizer.init, trainable),
                "losses": losses, "done": np.int32(0), "skipped": np.int32(0)}
        saved = _checkpoint.read(checkpoint, expected, like)
        if saved is not None:
            state = saved[0]
            trainable, opt_state = state["trainable"], state["opt_state"]
            losses, done, skipped = np.array(state["losses"]), int(state["done"]), int(state["skipped"])
    with _progress.progress_bar(progress, num_steps, "SGD", "loss"):
        while done < num_steps:
            # one segment between two checkpoints; without checkpoints, the whole run
            length = num_steps if checkpoint is None else min(every, num_steps - done)
            trainable, opt_state, segment, segment_skipped = _sgd_compiled(
                model, trainable, opt_state, fixed, emissions, lengths, inputs, key, np.int32(done), optimizer,
                num_steps, length, int(batch_size), progress, prior,
            )
            losses[done:done + length] = np.asarray(segment)
            done, skipped = done + length, skipped + int(segment_skipped)
            if checkpoint is not None:
                state = {"trainable": trainable, "opt_state": opt_state, "losses": losses,
                         "done": np.int32(done), "skipped": np.int32(skipped)}
                _checkpoint.write(checkpoint, expected, state, iteration=done)
    losses = to_device(losses)
    if skipped:
        warnings.warn(
            f"fit_sgd skipped {skipped} of {num_steps} steps whose loss or gradient was not finite.",
            RuntimeWarning,
            stacklevel=2,
        )
    return model._from_unconstrained({**trainable, **fixed}), losses
