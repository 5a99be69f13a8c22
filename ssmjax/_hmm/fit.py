"""How an HMM is fitted: the protocol of :mod:`ssmjax._fit.protocol` for :class:`ssmjax.HMM`.

Batch checks, the E-step (per sequence, and batched as :func:`ssmjax.fit_em` runs it: the
state-major forward-backward of :func:`~ssmjax._hmm.rules.batch_smoother_stats` with the emission
statistics pooled over every step), the priors' log-density, the M-step (closed form, with
entries held by ``fixed`` as :mod:`ssmjax._hmm.constraints` says) and the unconstrained view that
:func:`ssmjax.fit_sgd` trains. Each takes the model first; :class:`ssmjax.HMM`'s methods call them,
so a subclass (:class:`ssmjax.InputDrivenHMM`) overrides the method and reaches these through
``super()``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._fit.protocol import fast_e_step
from . import constraints as _constraints
from .emissions import AbstractEmissions, AbstractExponentialFamilyEmissions
from .inference import hmm_smoother
from .priors import HMMPrior, check_broadcasts
from .rules import batch_smoother_stats


def emission_fields(emissions: AbstractEmissions) -> dict[str, tuple[str, ...]]:
    """Public parameter name -> stored fields of an emission family (its ``parameter_fields``)."""
    return dict(getattr(type(emissions), "parameter_fields", {}))


def log_normalize(weights, old_log_probs, axis=-1):
    """log of ``weights / sum(weights)``; a row with zero total keeps ``old_log_probs``."""
    total = jnp.sum(weights, axis=axis, keepdims=True)
    empty = total <= 0
    safe_total = jnp.where(empty, 1.0, total)
    new = jnp.log(weights) - jnp.log(safe_total)
    return jnp.where(empty, old_log_probs, new)


def check_batch(model, emissions, lengths, inputs):
    shape = tuple(model.emissions.emission_shape)
    emissions = _checks.to_device(emissions)
    _checks.check_shape("emissions", emissions, ("B", "T") + shape, "a padded batch of sequences")
    num_seq, num_timesteps = emissions.shape[:2]
    if lengths is None:  # host-built: no eager XLA kernel to compile
        lengths = _checks.to_device(np.full((num_seq,), num_timesteps, np.int32))
    else:
        lengths = _checks.check_lengths(lengths, num_seq, num_timesteps)
    # Host copies (free on CPU): the emission family checks values with NumPy.
    host = np.asarray(emissions) if _checks.host_namespace(emissions) is np else emissions
    xp = np if host is not emissions else jnp
    mask = xp.arange(num_timesteps)[None, :] < xp.asarray(lengths)[:, None]
    model.emissions.check_emissions(host, mask)  # (B, T, ...): errors name emissions[b, t, ...]
    return emissions, lengths, model._checked_batch_inputs(inputs, num_seq, num_timesteps, mask)


def checked_batch_inputs(model, inputs, num_seq, num_timesteps, mask):
    """``inputs`` ``(B, T, Du)`` of a batch, checked by the emission family (None for families without)."""
    if inputs is None:
        model._check_inputs(None, num_timesteps)
        return None
    inputs = _checks.to_device(inputs)
    _checks.check_shape("inputs", inputs, (num_seq, num_timesteps, None), "a padded batch of input sequences")
    _, host = _checks.host_arrays(inputs)  # a host reshape compiles nothing
    flat = host.reshape((num_seq * num_timesteps,) + inputs.shape[2:])
    model._check_inputs(flat, num_seq * num_timesteps, mask.reshape(-1))
    return inputs


def check_em(model, frozen):
    frozen = frozen | _constraints.held_whole(model.constraints)
    if not isinstance(model.emissions, AbstractExponentialFamilyEmissions) and not (
        "emissions" in frozen
    ):
        raise ValueError(
            f"{type(model.emissions).__name__} has no closed-form M-step; fit this HMM with fit_sgd, "
            "or freeze its emissions (frozen=('emissions',)) to fit the Markov chain by EM."
        )


def e_step(model, emissions, length, inputs):
    ll = model.log_likelihoods(emissions, length=length, inputs=inputs)
    post = hmm_smoother(model.initial_probs, model.transition_matrix, ll, length=length)
    stats = {
        "initial": post.smoothed_probs[0],
        "transitions": post.expected_transitions,
        "emissions": model._emission_stats(emissions, length, inputs, post.smoothed_probs),
    }
    return stats, post.marginal_loglik


def emission_stats(model, emissions, length, inputs, smoothed_probs):
    """One sequence's emission statistics (None for a family without a closed-form M-step)."""
    if not isinstance(model.emissions, AbstractExponentialFamilyEmissions):
        return None
    rows = model.emissions.joined(emissions, model._emission_inputs(inputs))
    return model.emissions.suff_stats(rows, smoothed_probs, jnp.arange(emissions.shape[0]) < length)


def prepare_batch(model, emissions, lengths, inputs):
    """The loop-invariant layouts of a padded batch, computed once per fit (see protocol.py)."""
    valid = jnp.arange(emissions.shape[1])[:, None] < lengths[None, :]  # (T, B)
    time_major = jnp.swapaxes(emissions, 0, 1)
    inputs = model._emission_inputs(inputs)
    inputs = None if inputs is None else jnp.swapaxes(inputs, 0, 1)
    return model.emissions.joined(time_major, inputs), valid


def batched_e_step(model, batch):
    """Summed statistics and log-likelihood of a padded batch (the hook fit_em uses).

    ``batch`` is :func:`prepare_batch`'s ``(time-major rows (T, B, ...), valid (T, B))``: the
    emissions, joined to their covariates for a family that has them
    (:meth:`~ssmjax.AbstractEmissions.joined`).
    Equal to summing :func:`e_step` over the batch, organised for speed: emission
    log-likelihoods come state-major ``(T, K, B)`` for all steps at once
    (``_time_major_terms``, whose by-products the family's statistics may reuse), forward-backward advances all sequences together
    (:func:`~ssmjax._hmm.rules.batch_smoother_stats`, the batch as the vectorised
    axis), and emission statistics are pooled over the ``T * B`` steps.
    """
    time_major, valid = batch
    lls, terms = model.emissions._time_major_terms(time_major, valid)
    smoothed, transitions, loglik = batch_smoother_stats(
        model.initial_probs, model.transition_matrix, lls, valid, fallback=not fast_e_step()
    )  # smoothed: (T, B, K), zero at padded steps
    if isinstance(model.emissions, AbstractExponentialFamilyEmissions):
        emission_stats = model.emissions._time_major_stats(time_major, valid, smoothed, terms)
    else:
        emission_stats = None
    stats = {
        "initial": jnp.sum(smoothed[0], axis=0),
        "transitions": transitions,
        "emissions": emission_stats,
    }
    return stats, loglik


def check_prior(model, prior) -> None:
    if prior is None:
        return
    if not isinstance(prior, HMMPrior):
        raise ValueError(f"`prior` must be an ssmjax.HMMPrior or None; got {type(prior).__name__}.")
    k = model.num_states
    check_broadcasts("prior.initial.concentration", prior.initial.concentration, (k,))
    check_broadcasts("prior.transition.concentration", prior.transition.concentration, (k, k))
    model.emissions.log_prior(prior.emissions)  # raises if the family takes no such prior


def log_prior(model, prior):
    if prior is None:
        return jnp.zeros(())
    return (
        prior.initial.log_prob(model.initial_log_probs)
        + prior.transition_prior(model.num_states).log_prob(model.transition_log_probs)
        + model.emissions.log_prior(prior.emissions)
    )


def m_step(model, stats, frozen, prior=None):
    frozen = frozen | _constraints.held_whole(model.constraints)
    masks = _constraints.masks(model)
    initial = model.initial_log_probs
    if "initial_probs" in masks and "initial_probs" not in frozen:
        alpha = None if prior is None else prior.initial.concentration
        initial = _constraints.rows_m_step(stats["initial"], initial, masks["initial_probs"], alpha)
    elif "initial_probs" not in frozen:
        if prior is None:
            initial = log_normalize(stats["initial"], model.initial_log_probs)
        else:
            initial = prior.initial.mode_logits(stats["initial"], model.initial_log_probs)
    transition = model.transition_log_probs
    if "transition_matrix" in masks and "transition_matrix" not in frozen:
        alpha = None if prior is None else prior.transition_prior(model.num_states).concentration
        transition = _constraints.rows_m_step(stats["transitions"], transition, masks["transition_matrix"], alpha)
    elif "transition_matrix" not in frozen:
        if prior is None:
            transition = log_normalize(stats["transitions"], model.transition_log_probs)
        else:
            transition = prior.transition_prior(model.num_states).mode_logits(stats["transitions"], transition)
    emissions = model.emissions
    emission_frozen = {n.split(".", 1)[1] for n in frozen if n.startswith("emissions.")}
    if "emissions" not in frozen and stats["emissions"] is not None:
        extra = {} if prior is None or prior.emissions is None else {"prior": prior.emissions}
        emission_masks = {n.split(".", 1)[1]: m for n, m in masks.items() if n.startswith("emissions.")}
        if emission_masks:
            emissions = _constraints.emissions_m_step(
                model.emissions, stats["emissions"], emission_masks, frozenset(emission_frozen), **extra
            )
        elif emission_frozen:
            emissions = model.emissions.m_step_from_stats(stats["emissions"], frozen=emission_frozen, **extra)
        else:
            emissions = model.emissions.m_step_from_stats(stats["emissions"], **extra)
    # tree_at, not HMM(...): a subclass (and any field it adds) survives the M-step
    return eqx.tree_at(
        lambda m: (m.initial_log_probs, m.transition_log_probs, m.emissions),
        model,
        (initial, transition, emissions),
    )


def unconstrained(model):
    """Name -> free values; fields held whole by ``fixed`` are left out (read back from ``model``)."""
    params = {
        "initial_probs": model.initial_log_probs,
        "transition_matrix": model.transition_log_probs,
    }
    fields = emission_fields(model.emissions)
    if fields:
        for name, attrs in fields.items():
            params[f"emissions.{name}"] = {a: getattr(model.emissions, a) for a in attrs}
    else:
        params["emissions"] = model.emissions
    held = _constraints.held_whole(model.constraints)
    if "emissions" in held:
        held = held | {n for n in params if n.startswith("emissions")}
    return {n: v for n, v in params.items() if n not in held}


def from_unconstrained(model, params):
    masks = _constraints.masks(model)
    fields = emission_fields(model.emissions)
    emissions = params.get("emissions", model.emissions)
    if fields:
        for name, attrs in fields.items():
            if f"emissions.{name}" not in params:
                continue
            for a in attrs:
                value = params[f"emissions.{name}"][a]
                mask = masks.get(f"emissions.{name}")
                if mask is not None and _constraints.kind_of(model, f"emissions.{name}") == "rows":
                    value = _constraints.rows_from_free(value, getattr(model.emissions, a), mask)
                elif mask is not None:
                    value = _constraints.entries_from_free(value, getattr(model.emissions, a), mask)
                emissions = eqx.tree_at(
                    lambda e, a=a: getattr(e, a), emissions, value, is_leaf=lambda x: x is None
                )
    # Renormalise so the stored log-probabilities always are normalised.
    rows = []
    for name, current in (("initial_probs", model.initial_log_probs), ("transition_matrix", model.transition_log_probs)):
        if name not in params:
            rows.append(current)
        elif name in masks:
            rows.append(_constraints.rows_from_free(params[name], current, masks[name]))
        else:
            rows.append(jax.nn.log_softmax(params[name], axis=-1))
    # tree_at, not HMM(...): the constraints (a static field) survive
    return eqx.tree_at(
        lambda m: (m.initial_log_probs, m.transition_log_probs, m.emissions), model, (rows[0], rows[1], emissions)
    )
