r"""What fitting may change in an HMM: entries held at their current values.

:class:`ssmjax.HMM` takes ``fixed`` (in its constructor and :meth:`ssmjax.HMM.with_constraints`):
per parameter name (those of :meth:`ssmjax.HMM.parameter_names`), ``True`` (the whole field is
held) or a boolean mask of the field's stored shape, ``True`` where the entry is held. The
masks are kept in the model (a static field), so :func:`ssmjax.fit_em`, :func:`ssmjax.fit_sgd`,
:meth:`ssmjax.HMM.num_parameters` and saved files agree on them, as for the LGSSM
(:mod:`ssmjax._lgssm.constraints`).

Entry masks are taken where the M-step stays exact with some entries held:

* probability rows (``initial_probs``, ``transition_matrix``, the ``probs`` of categorical and
  multinomial emissions): held entries keep their values; the free entries of a row get the
  maximiser on the mass the held ones leave, :math:`p_j = (1 - m) c_j / \sum_{\text{free}} c`
  (:math:`m` the held mass, :math:`c` the expected counts; a row with no free counts keeps its
  values). Gradient fitting sees the same rows as ``(1 - m) softmax(free logits)``, so no
  gradient moves a held entry.
* entrywise parameters (Poisson ``rates``, Bernoulli ``probs``, Gamma ``shapes`` and
  ``rates``, diagonal and spherical Gaussian ``means`` and ``covs``): each entry's maximiser
  given the held ones (the Gamma shape given a held rate and the rate given a held shape,
  the variances about the means).
* the ``means`` of full and tied Gaussians: the maximiser given the current covariance,
  :math:`\mu_F = \bar y_F + \Sigma_{FX} \Sigma_{XX}^{-1} (\mu_X - \bar y_X)` (``X`` held, ``F``
  free, :math:`\bar y` the weighted mean), then the covariances about the new means -- a
  conditional maximisation, so EM still never decreases the likelihood.

Any other field is held whole or not at all (``ValueError`` naming it otherwise).

Stored form, hashable and saved as JSON: a tuple of ``(name, mask)`` with ``mask`` ``True``
(the whole field) or the row-major tuple of the field's mask.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .emissions import (
    BernoulliEmissions,
    CategoricalEmissions,
    DiagonalGaussianEmissions,
    GammaEmissions,
    GaussianEmissions,
    MultinomialEmissions,
    PoissonEmissions,
    SphericalGaussianEmissions,
    TiedGaussianEmissions,
)
from .emissions.gaussian_ops import GaussianStats, _gaussian_m_step

ROWS = ("initial_probs", "transition_matrix")

# family -> {public name: how its entries are fitted}; other fields are held whole or not at all
_ENTRY_KINDS = (
    (PoissonEmissions, {"rates": "entries"}),
    (BernoulliEmissions, {"probs": "entries"}),
    (CategoricalEmissions, {"probs": "rows"}),
    (MultinomialEmissions, {"probs": "rows"}),
    (GammaEmissions, {"shapes": "gamma", "rates": "gamma"}),
    (GaussianEmissions, {"means": "means"}),
    (TiedGaussianEmissions, {"means": "means"}),
    (DiagonalGaussianEmissions, {"means": "means", "covs": "variances"}),
    (SphericalGaussianEmissions, {"means": "means", "covs": "variances"}),
)


def _entry_kinds(emissions) -> dict[str, str]:
    for family, kinds in _ENTRY_KINDS:
        if type(emissions) is family:
            return kinds
    return {}


def _emission_attr(emissions, name: str) -> str:
    return type(emissions).parameter_fields[name][0]


def stored(model, name: str):
    """The stored array a mask of ``name`` refers to (None for a field without one array)."""
    if name == "initial_probs":
        return model.initial_log_probs
    if name == "transition_matrix":
        return model.transition_log_probs
    if name.startswith("emissions."):
        attrs = type(model.emissions).parameter_fields[name.split(".", 1)[1]]
        return getattr(model.emissions, attrs[0]) if len(attrs) == 1 else None
    return None


def kind_of(model, name: str) -> str:
    """``"rows"``, ``"entries"``, ``"gamma"``, ``"means"``, ``"variances"``; ``""`` (whole only)."""
    if name in ROWS:
        return "rows"
    if name.startswith("emissions."):
        return _entry_kinds(model.emissions).get(name.split(".", 1)[1], "")
    return ""


def canonical(model, fixed) -> tuple:
    """Validate ``fixed`` against ``model``; the stored form (see the module doc)."""
    if fixed is None:
        return ()
    if not isinstance(fixed, dict):
        raise ValueError(f"`fixed` must be a dict from parameter names; got {type(fixed).__name__}.")
    names = model.parameter_names()
    out = []
    for name, given in fixed.items():
        if name not in names:
            raise ValueError(f"`fixed` names `{name}`, not a parameter of this model; expected one of {list(names)}.")
        if isinstance(given, (bool, np.bool_)):
            if given:
                out.append((name, True))
            continue
        value = stored(model, name)
        mask = np.asarray(given)
        if mask.dtype != bool:
            raise ValueError(f"`fixed['{name}']` must be True, False or a boolean array; got dtype {mask.dtype}.")
        if value is None or not kind_of(model, name):
            if mask.all():
                out.append((name, True))
                continue
            raise ValueError(
                f"entries of `{name}` cannot be fixed; fix the whole field with fixed={{'{name}': True}} "
                "(or frozen=) instead."
            )
        if mask.shape != tuple(value.shape):
            raise ValueError(
                f"`fixed['{name}']` must have the field's shape {tuple(value.shape)}; got shape {mask.shape}."
            )
        if mask.all():
            out.append((name, True))
        elif mask.any():
            if kind_of(model, name) == "rows":
                _check_mass(name, value, mask)
            out.append((name, tuple(bool(b) for b in mask.reshape(-1))))
    return tuple(sorted(out))


def _check_mass(name, logits, mask) -> None:
    try:
        probs = np.exp(np.asarray(logits, np.float64))
    except Exception:  # a tracer: checked where the values are concrete
        return
    probs = probs / probs.sum(-1, keepdims=True)
    mass = np.where(mask, probs, 0.0).sum(-1)
    if np.any(mass > 1.0 + 1e-9):
        raise ValueError(f"`fixed['{name}']` holds entries of total probability {mass.max()} in a row; expected at most 1.")


def held_whole(constraints: tuple) -> frozenset[str]:
    """Names held whole (treated by fitting as ``frozen``)."""
    return frozenset(name for name, mask in constraints if mask is True)


def masks(model) -> dict[str, np.ndarray]:
    """Name -> boolean mask of held entries, for the fields with some (not all) entries held."""
    return {name: np.asarray(mask, bool).reshape(stored(model, name).shape)
            for name, mask in model.constraints if mask is not True}


def normalised(model):
    """``model`` with its constrained probability rows stored normalised (``log_softmax``), so
    a held entry's stored log-probability is its value."""
    out = model
    for name in masks(model):
        if kind_of(model, name) != "rows":
            continue
        if name == "initial_probs":
            out = eqx.tree_at(lambda m: m.initial_log_probs, out, jax.nn.log_softmax(out.initial_log_probs))
        elif name == "transition_matrix":
            out = eqx.tree_at(lambda m: m.transition_log_probs, out, jax.nn.log_softmax(out.transition_log_probs, -1))
        else:
            out = eqx.tree_at(lambda m: m.emissions.logits, out, jax.nn.log_softmax(out.emissions.logits, -1))
    return out


def free_count(model, name: str, count: int) -> int:
    """Free parameters of ``name`` given the count without constraints."""
    if name in held_whole(model.constraints):
        return 0
    mask = masks(model).get(name)
    if mask is None:
        return count
    finite = np.isfinite(np.asarray(stored(model, name)))
    if kind_of(model, name) == "rows":
        return int(np.maximum((finite & ~mask).sum(-1) - 1, 0).sum())
    return int((finite & ~mask).sum())


# ----------------------------------------------------------------------------- EM
def rows_m_step(counts, old_log, mask, concentration=None):
    """New log-probability rows: held entries kept, the free ones the maximiser on the rest
    of the mass (the posterior mode with Dirichlet ``concentration``); structural zeros stay
    zero; a row with no free counts keeps its values."""
    if concentration is not None:
        alpha = jnp.broadcast_to(concentration, counts.shape).astype(counts.dtype)
        counts = jnp.maximum(counts + alpha - 1.0, 0.0)
    free = jnp.where(mask | jnp.isneginf(old_log), 0.0, counts)
    total = jnp.sum(free, -1, keepdims=True)
    held_mass = jnp.sum(jnp.where(mask, jnp.exp(old_log), 0.0), -1, keepdims=True)
    empty = total <= 0
    positive = free > 0
    new = jnp.log1p(-held_mass) + jnp.log(jnp.where(positive, free, 1.0)) - jnp.log(jnp.where(empty, 1.0, total))
    new = jnp.where(positive, new, -jnp.inf)
    return jnp.where(mask | empty, old_log, new)


def emissions_m_step(emissions, stats, field_masks: dict, frozen: frozenset, prior=None):
    """The emissions' M-step with the entries in ``field_masks`` (public name -> mask) held."""
    extra = {} if prior is None else {"prior": prior}
    kinds = _entry_kinds(emissions)
    if any(kinds[n] in ("means", "variances") for n in field_masks):
        return _gaussian_m_step_fixed(emissions, stats, field_masks, frozen, prior)
    if any(kinds[n] == "gamma" for n in field_masks):
        return _gamma_m_step_fixed(emissions, stats, field_masks, frozen)
    if any(kinds[n] == "rows" for n in field_masks):
        if "probs" in frozen:
            return emissions
        concentration = None if prior is None else prior.concentration
        logits = rows_m_step(stats.counts, emissions.logits, field_masks["probs"], concentration)
        return eqx.tree_at(lambda e: e.logits, emissions, logits)
    new = emissions.m_step_from_stats(stats, frozen=frozen, **extra) if frozen else emissions.m_step_from_stats(stats, **extra)
    for name, mask in field_masks.items():  # entrywise: each entry's maximiser is its own
        attr = _emission_attr(emissions, name)
        new = eqx.tree_at(lambda e: getattr(e, attr), new, jnp.where(mask, getattr(emissions, attr), getattr(new, attr)))
    return new


def _gamma_m_step_fixed(emissions, stats, field_masks, frozen):
    shape_held = field_masks.get("shapes", np.zeros(emissions.log_shapes.shape, bool)) | ("shapes" in frozen)
    rate_held = field_masks.get("rates", np.zeros(emissions.log_rates.shape, bool)) | ("rates" in frozen)
    both = emissions.m_step_from_stats(stats)
    given_shape = emissions.m_step_from_stats(stats, frozen={"shapes"})
    given_rate = emissions.m_step_from_stats(stats, frozen={"rates"})
    log_shapes = jnp.where(shape_held, emissions.log_shapes, jnp.where(rate_held, given_rate.log_shapes, both.log_shapes))
    log_rates = jnp.where(rate_held, emissions.log_rates, jnp.where(shape_held, given_shape.log_rates, both.log_rates))
    return GammaEmissions(log_shapes=log_shapes, log_rates=log_rates)


def _recentred(stats: GaussianStats, delta, full: bool) -> GaussianStats:
    """Statistics about ``means + delta`` from statistics about ``means``."""
    if full:
        n = stats.sum_weights[:, None]
        sums = stats.weighted_sums - n * delta
        cross = stats.weighted_sums[:, :, None] * delta[:, None, :]
        outer = (stats.weighted_outer - cross - jnp.swapaxes(cross, -1, -2)
                 + n[:, :, None] * delta[:, :, None] * delta[:, None, :])
    else:
        sums = stats.weighted_sums - stats.dim_weights * delta
        outer = stats.weighted_outer - 2.0 * stats.weighted_sums * delta + stats.dim_weights * delta**2
    return GaussianStats(stats.sum_weights, sums, outer, stats.dim_weights)


def _gaussian_m_step_fixed(emissions, stats, field_masks, frozen, prior):
    """Means (held entries kept, the free ones their maximiser given the current covariance),
    then the covariances about those means (held variances kept)."""
    cov_type = emissions.covariance_type
    full = cov_type in ("full", "tied")
    old_means, old_cov = emissions.means, emissions._cov_param()
    means = old_means
    if "means" not in frozen:
        means, _ = _gaussian_m_step(old_means, old_cov, stats, emissions.min_variance, cov_type, False, prior)
        mask = field_masks.get("means")
        if mask is not None and full:  # generalised least squares given the current covariance
            means = _gls_means(means, old_means, old_cov, mask, cov_type == "tied")
        elif mask is not None:
            means = jnp.where(mask, old_means, means)
    cov = old_cov
    if "covs" not in frozen:
        centred = _recentred(stats, means - old_means, full)
        _, cov = _gaussian_m_step(means, old_cov, centred, emissions.min_variance, cov_type, True, prior)
        if "covs" in field_masks:
            cov = jnp.where(field_masks["covs"], old_cov, cov)
    return emissions._with_params(means, cov)


def _gls_means(weighted, old_means, chol, mask, tied: bool):
    rows = []
    for k in range(old_means.shape[0]):
        held = mask[k]
        if not held.any():
            rows.append(weighted[k])
            continue
        if held.all():
            rows.append(old_means[k])
            continue
        factor = chol if tied else chol[k]
        cov = factor @ factor.T
        free_idx, held_idx = np.flatnonzero(~held), np.flatnonzero(held)
        gap = jnp.linalg.solve(cov[np.ix_(held_idx, held_idx)], old_means[k, held_idx] - weighted[k, held_idx])
        row = weighted[k].at[free_idx].add(cov[np.ix_(free_idx, held_idx)] @ gap)
        rows.append(row.at[held_idx].set(old_means[k, held_idx]))
    return jnp.stack(rows)


# ---------------------------------------------------------------------------- SGD
def rows_from_free(logits, old_log, mask):
    """Rows with the held entries of ``old_log`` and ``(1 - held mass) softmax`` of the free
    ``logits``; the held logits take no gradient."""
    held_mass = jnp.sum(jnp.where(mask, jnp.exp(old_log), 0.0), -1, keepdims=True)
    free = jnp.where(mask, -jnp.inf, logits)
    has_free = jnp.any(jnp.isfinite(free), -1, keepdims=True)
    new = jnp.log1p(-held_mass) + jax.nn.log_softmax(jnp.where(has_free, free, 0.0), -1)
    return jnp.where(mask | ~has_free, old_log, new)


def entries_from_free(values, old, mask):
    return jnp.where(mask, old, values)
