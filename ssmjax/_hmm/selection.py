"""Choosing the number of hidden states: fits over a range of ``K``, scored by BIC, AIC and held-out likelihood.

:func:`select_num_states` fits an HMM for each ``K`` with parallel EM restarts
(:func:`ssmjax.fit_em_restarts`), scores it on the whole batch (log-likelihood, free
parameters, AIC, BIC), and, with ``num_folds > 1``, by sequence-level cross-validation: each
fold's sequences are scored by a model fitted on the other folds' sequences.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Optional

import jax
import numpy as np
from jaxtyping import ArrayLike, Int, PRNGKeyArray, Shaped

from .. import _checks
from .._fit.em import fit_em_restarts, stack_models
from .emissions.base import AbstractEmissions
from .model import HMM


@dataclasses.dataclass(frozen=True)
class NumStatesSelection:
    """What :func:`select_num_states` returns: one row per candidate ``K``.

    Attributes:
        num_states: the candidates, ``(R,)``.
        log_likelihood: summed log-likelihood of the whole batch under each fitted model.
        num_parameters: free parameters (:meth:`ssmjax.HMM.num_parameters`).
        aic, bic: the criteria on the whole batch (lower is better).
        heldout_log_likelihood: summed log-likelihood of every sequence under the model fitted
            without its fold (NaN without cross-validation; higher is better).
        models: the model fitted on the whole batch, per candidate.
    """

    num_states: np.ndarray
    log_likelihood: np.ndarray
    num_parameters: np.ndarray
    aic: np.ndarray
    bic: np.ndarray
    heldout_log_likelihood: np.ndarray
    models: tuple

    @property
    def best_by_bic(self) -> int:
        """The ``K`` with the lowest BIC."""
        return int(self.num_states[int(np.argmin(self.bic))])

    @property
    def best_by_heldout(self) -> Optional[int]:
        """The ``K`` with the highest held-out log-likelihood (None without cross-validation)."""
        if np.all(np.isnan(self.heldout_log_likelihood)):
            return None
        return int(self.num_states[int(np.nanargmax(self.heldout_log_likelihood))])

    def table(self) -> str:
        """The rows as aligned text."""
        lines = ["    K   params   log-likelihood          AIC          BIC   held-out"]
        for row in zip(self.num_states, self.num_parameters, self.log_likelihood, self.aic, self.bic,
                       self.heldout_log_likelihood):
            lines.append("{:5d} {:8d} {:16.3f} {:12.2f} {:12.2f} {:10.3f}".format(*row))
        return "\n".join(lines)


def _fit(emissions, lengths, num_states, emissions_type, num_restarts, max_iters, tol, key, from_data_kwargs):
    keys = jax.random.split(key, num_restarts)
    starts = [HMM.from_data(emissions, num_states, emissions_type, lengths=lengths, key=k, **from_data_kwargs)
              for k in keys]
    best, _, _ = fit_em_restarts(stack_models(starts), emissions, lengths=lengths, max_iters=max_iters, tol=tol)
    return best


@typing.no_type_check
def select_num_states(
    emissions: Shaped[ArrayLike, "B T ..."],
    num_states: Sequence[int],
    emissions_type: str | type[AbstractEmissions] = "gaussian",
    *,
    lengths: Int[ArrayLike, " B"] | None = None,
    num_restarts: int = 4,
    num_folds: int = 0,
    max_iters: int = 200,
    tol: float | None = 1e-6,
    from_data_kwargs: Optional[dict] = None,
    key: PRNGKeyArray,
) -> NumStatesSelection:
    """Fit an HMM for each number of states and score it.

    Args:
        emissions: padded batch ``(B, T, *emission_shape)``.
        num_states: the candidate numbers of states (an iterable of ints).
        emissions_type: as :meth:`ssmjax.HMM.from_data` takes it (a name or an emission class).
        lengths: ``(B,)`` lengths or None.
        num_restarts: EM restarts per fit, run in parallel (:func:`ssmjax.fit_em_restarts`), from
            :meth:`~ssmjax.HMM.from_data` with different keys.
        num_folds: sequence-level cross-validation folds (``0`` or ``1``: none); at most ``B``.
        max_iters, tol: as in :func:`ssmjax.fit_em`.
        key: PRNG key (keyword-only).
        from_data_kwargs: a dict passed to :meth:`~ssmjax.HMM.from_data` (``num_classes``, ``stay_prob``,
            ``structure``).

    Returns:
        A :class:`NumStatesSelection`.

    Example:
        >>> import jax, jax.numpy as jnp, ssmjax
        >>> counts = jnp.asarray(ssmjax.datasets.load_earthquakes().values, float)[None, :, None]
        >>> chosen = ssmjax.select_num_states(counts, [1, 2, 3], "poisson", num_restarts=2, key=jax.random.key(0))
        >>> chosen.best_by_bic
        2
    """
    from_data_kwargs = dict(from_data_kwargs or {})
    emissions = _checks.host_copy(emissions)
    values = list(num_states)
    if not values or not all(_checks.is_positive_int(k) for k in values):
        raise ValueError(f"`num_states` must hold positive ints; got {values!r}.")
    candidates = np.asarray([int(k) for k in values])
    num_seq, num_timesteps = emissions.shape[:2]
    lengths = np.full(num_seq, num_timesteps) if lengths is None else _checks.host_copy(lengths)
    if not (_checks.is_int(num_folds) and 0 <= num_folds <= num_seq):
        raise ValueError(
            f"`num_folds` must be an int in [0, {num_seq}] (at most the number of sequences B); got {num_folds!r}."
        )
    num_restarts = _checks.positive_int("num_restarts", num_restarts)
    fit_key, fold_key = jax.random.split(key)
    folds = np.asarray(jax.random.permutation(fold_key, num_seq)) % max(num_folds, 1)
    rows = {name: [] for name in ("log_likelihood", "num_parameters", "aic", "bic", "heldout")}
    models = []
    for i, k in enumerate(int(c) for c in candidates):
        key_k = jax.random.fold_in(fit_key, i)
        model = _fit(emissions, lengths, k, emissions_type, num_restarts, max_iters, tol, key_k, from_data_kwargs)
        models.append(model)
        rows["log_likelihood"].append(float(model.log_likelihood(emissions, lengths=lengths)))
        rows["num_parameters"].append(model.num_parameters())
        rows["aic"].append(model.aic(emissions, lengths=lengths))
        rows["bic"].append(model.bic(emissions, lengths=lengths))
        heldout = np.nan
        if num_folds > 1:
            heldout = 0.0
            for f in range(num_folds):
                train, test = folds != f, folds == f
                fold_model = _fit(emissions[train], lengths[train], k, emissions_type, num_restarts, max_iters, tol,
                                  jax.random.fold_in(key_k, f + 1), from_data_kwargs)
                heldout += float(fold_model.log_likelihood(emissions[test], lengths=lengths[test]))
        rows["heldout"].append(heldout)
    return NumStatesSelection(
        num_states=candidates,
        log_likelihood=np.asarray(rows["log_likelihood"]),
        num_parameters=np.asarray(rows["num_parameters"]),
        aic=np.asarray(rows["aic"]),
        bic=np.asarray(rows["bic"]),
        heldout_log_likelihood=np.asarray(rows["heldout"]),
        models=tuple(models),
    )
