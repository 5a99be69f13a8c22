"""Expectation-maximisation over ragged batches, compiled end to end.

The whole loop -- E-step over the batch (``jax.vmap``), reduction of the
sufficient statistics, M-step, convergence test, NaN/decrease guard and the
progress report -- is one ``lax.while_loop`` inside one compiled function. A
second call with equal shapes reuses it. For models with a fast E-step (the HMM),
that program leaves out a rarely needed fallback; if an E-step needs it, the run
continues from that iteration in a second program that has it (``_resume``).
"""

from __future__ import annotations

import os
import typing
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PyTree, Shaped

from .. import _deprecation
from .._checks import host_arrays, is_non_negative_number, positive_int, to_device, value_checks
from . import checkpoint as _checkpoint
from . import progress as _progress
from .compiler import fast_compile_jit
from .protocol import AbstractFittableModel, Model, check_frozen, tracing_batch_pattern, tracing_fast_e_step

# Status codes of an EM run (see EMInfo.status).
_RUNNING, _CONVERGED, _MAX_ITERS, _DECREASED, _NOT_FINITE = 0, 1, 2, 3, 4
# Internal: a fast program's E-step was not finite; redo it with the exact program
# (see fast_e_step in protocol.py). Never reported to users.
_RETRY = 5
STATUS_NAMES = {
    _CONVERGED: "converged",
    _MAX_ITERS: "max_iters",
    _DECREASED: "decreased",
    _NOT_FINITE: "not_finite",
}


class EMInfo(NamedTuple):
    """Diagnostics of an EM run (the third value :func:`fit_em` returns).

    Attributes:
        num_iters: number of E-steps evaluated (= ``len(log_likelihoods)``).
        status: ``"converged"`` (relative improvement below ``tol``), ``"max_iters"``,
            ``"decreased"`` (the log-likelihood fell by more than round-off: the
            last good model is returned) or ``"not_finite"`` (a NaN/inf
            log-likelihood: the last good model is returned).
        converged: ``status == "converged"``.
    """

    num_iters: int
    status: str
    converged: bool


def _decrease_rtol(dtype) -> float:
    # Round-off allowance of a summed log-likelihood, relative to its magnitude.
    return 1e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-10


def _prepare_batch(model, emissions, lengths, inputs):
    """The E-step's view of the batch, computed once outside the loop (see protocol.py)."""
    if hasattr(model, "_batched_e_step"):
        return model._prepare_batch(emissions, lengths, inputs)
    return emissions, lengths, inputs


def _batch_e_step(model, batch):
    if hasattr(model, "_batched_e_step"):  # optional hooks, see protocol.py
        return model._batched_e_step(batch)
    emissions, lengths, inputs = batch
    stats, lls = jax.vmap(lambda y, n, u: model._e_step(y, n, u))(emissions, lengths, inputs)
    stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)
    return stats, jnp.sum(lls)


class _Carry(eqx.Module):
    it: jax.Array
    params: Any  # the model the next E-step evaluates
    prev_params: Any  # the model the last E-step evaluated
    before_prev: Any  # the one before: the last good model when that E-step was bad
    prev_ll: jax.Array
    lls: jax.Array
    status: jax.Array


def _is_bad(status):
    return (status == _DECREASED) | (status == _NOT_FINITE)


def _last_good(params, before_prev, status):
    """The model to return: ``before_prev`` if the loop stopped on a bad E-step (traced)."""
    bad = _is_bad(status)
    return jax.tree.map(lambda b, p: jnp.where(bad, b, p), before_prev, params)


def _ll_dtype(params):
    return jnp.result_type(*[x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)])


def _initial_carry(model, max_iters: int) -> "_Carry":
    """The loop's state before its first iteration (built on the host: nothing to compile)."""
    params, _ = eqx.partition(model, eqx.is_array)
    ll_dtype = np.dtype(_ll_dtype(params))
    return _Carry(
        it=to_device(np.int32(0)),
        params=params,
        prev_params=params,
        before_prev=params,
        prev_ll=to_device(np.array(-np.inf, ll_dtype)),
        lls=to_device(np.full((max_iters,), np.nan, ll_dtype)),
        status=to_device(np.int32(_RUNNING)),
    )


def _em_loop(
    model, emissions, lengths, inputs, tol, max_iters: int, frozen: frozenset, progress: bool,
    fast: bool = False, start: "_Carry | None" = None, prior=None, stop_at=None,
) -> "_Carry":
    """The EM while-loop from ``model`` (or from the carry ``start``); returns the final carry.

    ``fast``: the program is traced with :func:`~ssmjax._fit.protocol.fast_e_step`, and a
    non-finite E-step stops it with the internal status ``_RETRY`` (see :func:`_resume`).
    ``stop_at`` (traced): pause, still running, once that many iterations are done (the
    segments between two checkpoints run one program).
    """
    params, static = eqx.partition(model, eqx.is_array)
    ll_dtype = _ll_dtype(params)
    rtol_down = _decrease_rtol(ll_dtype)

    def cond(c: _Carry):
        going = (c.status == _RUNNING) & (c.it < max_iters)
        return going if stop_at is None else going & (c.it < stop_at)

    batch = _prepare_batch(model, emissions, lengths, inputs)

    def body(c: _Carry):
        current = eqx.combine(c.params, static)
        stats, ll = _batch_e_step(current, batch)
        if prior is not None:  # the log posterior: EM's M-steps are then conditional modes
            ll = ll + current._log_prior(prior)
        ll = ll.astype(ll_dtype)
        _progress.report(progress, c.it, ll)
        first = c.it == 0
        not_finite = ~jnp.isfinite(ll)
        decreased = (~first) & (ll < c.prev_ll - rtol_down * jnp.abs(c.prev_ll))
        improvement = jnp.abs(ll - c.prev_ll)
        converged = (~first) & (improvement <= tol * jnp.abs(c.prev_ll))
        new = current._m_step(stats, frozen) if prior is None else current._m_step(stats, frozen, prior)
        new_params, _ = eqx.partition(new, eqx.is_array)
        status = jnp.where(
            not_finite,
            _RETRY if fast else _NOT_FINITE,
            jnp.where(decreased, _DECREASED, jnp.where(converged, _CONVERGED, _RUNNING)),
        )
        status = jnp.where((status == _RUNNING) & (c.it + 1 >= max_iters), _MAX_ITERS, status)
        # No select between models in the loop: a bad E-step stops it, and the last good
        # model (the one evaluated before) is picked afterwards (see _last_good).
        return _Carry(
            it=c.it + 1,
            params=new_params,
            prev_params=c.params,
            before_prev=c.prev_params,
            prev_ll=ll,
            lls=c.lls.at[c.it].set(ll),
            status=status.astype(jnp.int32),
        )

    init = _initial_carry(model, max_iters) if start is None else start
    return jax.lax.while_loop(cond, body, init)


def _resume(final: _Carry) -> _Carry:
    """Where the exact program starts after the fast one stopped with ``_RETRY``.

    The fast loop stopped after evaluating iteration ``n = it - 1``; its carry still
    holds that model (``prev_params``) and the one before (``before_prev``), and the
    log-likelihoods of iterations ``< n``. The exact program redoes iteration ``n`` from
    the same state, so the run is that of the exact program alone (host-side, rare).
    """
    n = int(final.it) - 1
    lls = np.array(final.lls)
    lls[n] = np.nan
    prev_ll = lls[n - 1] if n > 0 else -np.inf
    return _Carry(
        it=to_device(np.int32(n)),
        params=final.prev_params,
        prev_params=final.before_prev,
        before_prev=final.before_prev,  # unread: the first iteration overwrites it
        prev_ll=to_device(lls.dtype.type(prev_ll)),
        lls=to_device(lls),
        status=to_device(np.int32(_RUNNING)),
    )


def _em_single(model, emissions, lengths, inputs, tol, max_iters, frozen, progress, pattern, fast, start, prior,
               stop_at=None):
    # Inputs were validated eagerly; iterates come from our own M-steps. Value checks
    # inside the loop would turn a degenerate iterate (e.g. a covariance collapsing on
    # tiny data) into an exception instead of the guard's "last good model".
    with value_checks(False), tracing_batch_pattern(pattern), tracing_fast_e_step(fast):
        return _em_loop(model, emissions, lengths, inputs, tol, max_iters, frozen, progress, fast, start, prior,
                        stop_at)


_em_compiled = fast_compile_jit(_em_single)


def _em_restarts(models, emissions, lengths, inputs, tol, max_iters, frozen, progress, pattern, prior):
    params, static = eqx.partition(models, eqx.is_array)

    def one(p):
        m = eqx.combine(p, static)
        final = _em_loop(m, emissions, lengths, inputs, tol, max_iters, frozen, progress, prior=prior)
        fitted_params = _last_good(final.params, final.before_prev, final.status)
        fitted = eqx.combine(fitted_params, static)
        _, final_ll = _batch_e_step(fitted, _prepare_batch(fitted, emissions, lengths, inputs))
        if prior is not None:
            final_ll = final_ll + fitted._log_prior(prior)
        return fitted_params, final.lls, final.it, final.status, final_ll

    with value_checks(False), tracing_batch_pattern(pattern):  # see _em_single
        return jax.vmap(one)(params)


_em_restarts_compiled = fast_compile_jit(_em_restarts)


def _prepare(model, emissions, lengths, inputs, max_iters, tol, frozen, prior=None):
    if not isinstance(model, AbstractFittableModel):
        raise ValueError(
            f"`model` must be an ssmjax model (HMM, LGSSM, ...); got {type(model).__name__}."
        )
    max_iters = positive_int("max_iters", max_iters)
    if tol is not None and not is_non_negative_number(tol):
        raise ValueError(f"`tol` must be a non-negative number, or None to run every iteration; got {tol!r}.")
    frozen = check_frozen(model, frozen)
    model._check_em(frozen)
    model._check_prior(prior)
    emissions, lengths, inputs = model._check_batch(emissions, lengths, inputs)
    return emissions, lengths, inputs, max_iters, frozen, _batch_pattern(emissions, lengths)


def _tol_array(tol):
    """``tol`` for the compiled loop; None is ``-inf``, which no relative improvement is below."""
    return np.asarray(-np.inf if tol is None else tol, dtype=np.float64 if jax.config.jax_enable_x64 else np.float32)


def _batch_pattern(emissions, lengths) -> tuple[bool, bool]:
    """``(observed, unpadded)``: static facts for the E-step (see protocol.py).

    Decided with NumPy on this process's data, or on the devices (a replicated answer
    every process can read) for a batch sharded over several processes."""
    xp, values, lengths = host_arrays(emissions, lengths)
    unpadded = bool(xp.all(lengths == emissions.shape[1]))
    if not xp.issubdtype(values.dtype, xp.floating):
        return True, unpadded  # no NaN in an integer array
    steps = xp.isnan(values.reshape(values.shape[:2] + (-1,))).any(axis=-1)
    real = xp.arange(values.shape[1])[None, :] < lengths[:, None]
    return not bool((steps & real).any()), unpadded


@typing.no_type_check
def fit_em(
    model: Model,
    emissions: Shaped[ArrayLike, "B T ..."],
    *,
    lengths: Int[ArrayLike, " B"] | None = None,
    inputs: Float[ArrayLike, "B T Du"] | None = None,
    max_iters: int = 100,
    tol: float | None = 1e-6,
    frozen: Sequence[str] = (),
    progress: bool = False,
    return_info: bool | None = None,
    prior: PyTree | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
) -> tuple[Model, Float[Array, " iters"], EMInfo]:
    r"""Fit a model by expectation-maximisation over a (ragged) batch of sequences.

    Each iteration computes the exact posterior of every sequence (forward-backward
    for an HMM, the RTS smoother for an LGSSM), sums their expected sufficient
    statistics, and applies the closed-form M-step. EM never decreases
    :math:`\sum_b \log p(y^{(b)})`; the loop stops when the relative improvement is
    at most ``tol``, after ``max_iters`` E-steps, or -- as a guard -- when the
    log-likelihood becomes non-finite or falls by more than round-off, in which case
    the last good model is returned and a warning is issued.

    The whole loop is one compiled ``lax.while_loop``; a second call with equal
    shapes and equal ``max_iters``/``frozen``/``progress`` does not recompile.

    Args:
        model: the initial model (``ssmjax.HMM``, ``ssmjax.LGSSM``, ...).
        emissions: ``(B, T, D)`` batch of sequences (``(B, T)`` integers for categorical
            emissions); padded past each sequence's length.
        lengths: ``(B,)`` ints in ``[1, T]``; ``None`` means every sequence has length ``T``.
        inputs: ``(B, T, Du)`` inputs for models that take them (an LGSSM with input weights, an
            HMM with regression emissions, an :class:`ssmjax.InputDrivenHMM`), else ``None``.
        max_iters: maximum number of EM iterations (E-steps).
        tol: relative-improvement tolerance: stop once ``|ll_i - ll_{i-1}| <= tol * |ll_{i-1}|``
            (``tol=0`` stops when an iteration leaves the objective exactly unchanged). ``None``:
            no convergence test, every one of ``max_iters`` iterations runs (as in dynamax's
            ``fit_em``), stopping early only on a non-finite objective or a decrease.
        frozen: names of parameters kept fixed (see ``model.parameter_names()``).
        progress: show a tqdm progress bar (iteration, log-likelihood) fed from inside
            the compiled loop.
        return_info: deprecated (the info is always returned); ``return_info=False``
            still returns the old ``(fitted_model, log_likelihoods)`` for one release.
        prior: a prior on the parameters (:class:`ssmjax.HMMPrior` for an HMM), or None. EM then
            maximises the log posterior, and ``log_likelihoods`` holds the log posterior
            (log-likelihood plus log prior) of each iterate.
        checkpoint: a file path, or None. The fit writes its whole state there (atomically)
            every ``checkpoint_every`` iterations and at the end; if the file exists when the
            fit starts, it resumes from it, and ends exactly as the uninterrupted fit would.
            A checkpoint of another fit (other data, starting model or options) is refused
            with a ValueError. With several processes, process 0 writes and all read it.
        checkpoint_every: iterations between two checkpoints.

    Returns:
        ``(fitted_model, log_likelihoods, info)``: ``log_likelihoods[i]`` is the summed
        log-likelihood of the ``i``-th iterate, evaluated before its M-step (so the
        returned model, the result of the last M-step, scores at least
        ``log_likelihoods[-1]``); ``info`` is an :class:`EMInfo`.

    Raises:
        ValueError: on malformed emissions/lengths/inputs for the model, unknown
            ``frozen`` names, or bad ``max_iters``/``tol`` -- before any compute.

    Example:
        >>> import jax, jax.numpy as jnp, ssmjax
        >>> counts = jnp.asarray(ssmjax.datasets.load_earthquakes().values)[None, :, None]
        >>> hmm = ssmjax.HMM.from_data(counts, num_states=2, emissions_type="poisson", key=jax.random.key(0))
        >>> fitted, lls, info = ssmjax.fit_em(hmm, counts, max_iters=50)
        >>> bool(lls[-1] >= lls[0]), info.converged
        (True, True)
    """
    every = _checkpoint.check_every(checkpoint, checkpoint_every)
    emissions, lengths, inputs, max_iters, frozen, pattern = _prepare(
        model, emissions, lengths, inputs, max_iters, tol, frozen, prior
    )
    tol_arr = _tol_array(tol)
    fast = bool(getattr(model, "_has_fast_e_step", False))
    carry = _initial_carry(model, max_iters)
    if checkpoint is not None:
        expected = _checkpoint.settings("fit_em", model, (emissions, lengths, inputs), prior,
                                        max_iters=max_iters, tol=None if tol is None else float(tol),
                                        frozen=sorted(frozen))
        saved = _checkpoint.read(checkpoint, expected, carry)
        if saved is not None:
            carry, header = saved
            fast = bool(header["fast"])
    with _progress.progress_bar(progress, max_iters, "EM", "loglik"):
        while int(carry.status) == _RUNNING:
            # one segment between two checkpoints; without checkpoints, the whole run
            stop_at = np.int32(max_iters if checkpoint is None else min(int(carry.it) + every, max_iters))
            final = _em_compiled(
                model, emissions, lengths, inputs, tol_arr, max_iters, frozen, progress, pattern, fast, carry, prior,
                stop_at,
            )
            if fast and int(final.status) == _RETRY:  # compiled only for data that need it
                fast = False
                final = _em_compiled(
                    model, emissions, lengths, inputs, tol_arr, max_iters, frozen, progress, pattern, False,
                    _resume(final), prior, stop_at,
                )
            carry = final
            if checkpoint is not None:
                _checkpoint.write(checkpoint, expected, carry, fast=fast, iteration=int(carry.it))
    final = carry
    last, before_prev, lls, it, status = final.params, final.before_prev, final.lls, final.it, final.status
    num_iters = int(it)
    status_name = STATUS_NAMES.get(int(status), "max_iters")
    bad = bool(_is_bad(int(status)))
    # the last good model is chosen here, not in the compiled loop (fewer kernels to compile)
    _, static = eqx.partition(model, eqx.is_array)
    fitted = eqx.combine(before_prev if bad else last, static)
    if bad:
        warnings.warn(
            f"fit_em stopped at iteration {num_iters}: the log-likelihood "
            f"{'was not finite' if status_name == 'not_finite' else 'decreased by more than round-off'}; "
            "the last good model is returned.",
            RuntimeWarning,
            stacklevel=2,
        )
    lls = to_device(np.asarray(lls)[:num_iters])  # sliced on the host: no eager kernel to compile
    info = EMInfo(num_iters, status_name, status_name == "converged")
    if return_info is not None:
        _deprecation.warn("fit_em(..., return_info=...)", "fit_em(...), which always returns (model, log_likelihoods, info)")
        if not return_info:
            return fitted, lls
    return fitted, lls, info


@typing.no_type_check
def fit_em_restarts(
    models: Model,
    emissions: Shaped[ArrayLike, "B T ..."],
    *,
    lengths: Int[ArrayLike, " B"] | None = None,
    inputs: Float[ArrayLike, "B T Du"] | None = None,
    max_iters: int = 100,
    tol: float | None = 1e-6,
    frozen: Sequence[str] = (),
    progress: bool = False,
    prior: PyTree | None = None,
) -> tuple[Model, Float[Array, " R"], Float[Array, "R max_iters"]]:
    """Run EM from many initial models in parallel and keep the best.

    ``models`` is a *stacked* model: every array leaf has a leading restart axis
    ``R``, as produced by ``jax.vmap`` / ``equinox.filter_vmap`` over an initialiser,
    e.g. ``eqx.filter_vmap(lambda k: ssmjax.HMM.from_data(y, 3, "poisson", key=k))(keys)``.
    All restarts run in one compiled, vectorised EM loop (the loop continues until
    every restart has stopped; finished ones are held fixed).

    Args:
        models: stacked initial models (leading axis ``R`` on every array leaf).
        emissions, lengths, inputs, max_iters, tol, frozen, progress, prior: as in :func:`fit_em` (with a
            prior, the scores are log posteriors).

    Returns:
        ``(best_model, final_log_likelihoods, log_likelihood_histories)``:
        the restart with the highest final log-likelihood (an unstacked model),
        ``(R,)`` the exact log-likelihood of every fitted restart, and
        ``(R, max_iters)`` their per-iteration histories (NaN after a restart stopped).

    Example:
        >>> import jax, jax.numpy as jnp, equinox as eqx, ssmjax
        >>> counts = jnp.asarray(ssmjax.datasets.load_earthquakes().values)[None, :, None]
        >>> keys = jax.random.split(jax.random.key(0), 4)
        >>> init = lambda k: ssmjax.HMM.random(2, ssmjax.PoissonEmissions.random(2, 1, mean_rate=20.0, key=k), key=k)
        >>> inits = eqx.filter_vmap(init)(keys)
        >>> best, scores, histories = ssmjax.fit_em_restarts(inits, counts, max_iters=30)
        >>> scores.shape
        (4,)
    """
    leaves = [x for x in jax.tree.leaves(eqx.filter(models, eqx.is_array))]
    if not leaves or any(x.ndim < 1 for x in leaves):
        raise ValueError("`models` must be a stacked model with a leading restart axis on every array leaf.")
    num_restarts = leaves[0].shape[0]
    first = jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, models)
    emissions, lengths, inputs, max_iters, frozen, pattern = _prepare(
        first, emissions, lengths, inputs, max_iters, tol, frozen, prior
    )
    tol_arr = _tol_array(tol)
    with _progress.progress_bar(progress, max_iters, f"EM x{num_restarts}", "best loglik"):
        params, lls, _, _, final_lls = _em_restarts_compiled(
            models, emissions, lengths, inputs, tol_arr, max_iters, frozen, progress, pattern, prior
        )
    return best_restart(models, params, final_lls), final_lls, lls


def stack_models(models):
    """The stacked model :func:`fit_em_restarts` takes: each array leaf of ``models`` (a list of
    models of one structure) stacked along a new leading restart axis."""
    arrays = [eqx.filter(m, eqx.is_array) for m in models]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *arrays)
    return eqx.combine(stacked, eqx.filter(models[0], eqx.is_array, inverse=True))


def best_restart(models, params, final_lls):
    """The restart of ``params`` (stacked fitted arrays of the stacked ``models``) with the highest
    finite final log-likelihood, as an unstacked model (traceable)."""
    best = jnp.argmax(jnp.where(jnp.isfinite(final_lls), final_lls, -jnp.inf))
    _, static = eqx.partition(models, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda x: x[best], params), static)
