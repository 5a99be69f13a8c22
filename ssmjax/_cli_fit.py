"""``ssmjax fit``'s numeric work: starting models, the fit, posteriors and the printed parameters.

Two routes give the same numbers. The program route (:func:`fit_program`) runs the whole fit --
starting model, EM, log-likelihood, posteriors and every printed parameter -- as one function
that :mod:`ssmjax._cli_programs` exports and keeps between runs. It covers EM without a progress
bar (a bar is fed by a host callback, which an exported program cannot hold). Everything else --
SGD, a progress bar, or an EM run the program saw stop on a bad step -- takes the route of the
public functions (:func:`fit_reference`): ``HMM.from_data``, ``fit_em``, ``fit_em_restarts`` and
``fit_sgd``, which then also give the warning such a run deserves.

The program route takes its starting models as inputs: ``HMM.from_data`` computes them on the host
(nothing to compile), as the public route does, and its host callbacks could not be exported. It
needs a traceable form of one host-side step: :func:`em`, the compiled loop of ``fit_em`` /
``fit_em_restarts`` without their host-side driver (the driver's checks run on the host before,
through the command's own data checks and :func:`em_pattern`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._cli_data import DataError, require_complete, require_counts


class FitResult(NamedTuple):
    """What ``ssmjax fit`` prints, saves and plots."""

    model: object
    loglik: float
    how: str
    report: list  # (label, value, named): value an array; named: the emission columns are its columns
    smoothed: tuple  # HMM: (probs (B, T, K), paths (B, T)); LGSSM: (means, sds) (B, T, Dx)


# ----------------------------------------------------------------------------- data and starts


def prepare_hmm_data(data, emissions_type):
    what = f"an HMM with {emissions_type} emissions"
    require_complete(data, what)
    if emissions_type in ("poisson", "categorical"):
        require_counts(data, what, categorical=emissions_type == "categorical")
    mask = np.arange(data.values.shape[1])[None, :] < data.lengths[:, None]
    values = np.where(mask[..., None], data.values, 0.0)
    if emissions_type == "categorical":
        if values.shape[-1] != 1:
            raise DataError(f"{data.path}: categorical emissions need exactly one column; got {data.columns}")
        return values[..., 0].astype(np.int64)
    return values


def _family_name(emissions_type: str) -> str:
    return {"gaussian-diag": "gaussian_diag"}.get(emissions_type, emissions_type)


def initial_hmms(key, y, lengths, num_states, emissions_type, restarts):
    """Starting models from ``HMM.from_data``: one per restart, the later ones with random transitions."""
    import jax
    import jax.numpy as jnp

    import ssmjax

    kind = _family_name(emissions_type)
    models = []
    # one start takes the key itself: nothing to compile before the command's program
    for r, k in enumerate([key] if restarts == 1 else jax.random.split(key, restarts)):
        m = ssmjax.HMM.from_data(y, num_states, kind, lengths=lengths, key=k)
        if r:  # later restarts: random transitions, and jittered Poisson rates (their start is deterministic)
            m = ssmjax.HMM.random(num_states, m.emissions, key=k)
            if kind == "poisson":
                jitter = jnp.exp(0.3 * jax.random.normal(jax.random.fold_in(k, 1), m.emissions.log_rates.shape))
                m = ssmjax.HMM(initial_probs=m.initial_probs, transition_matrix=m.transition_matrix,
                               emissions=ssmjax.PoissonEmissions(rates=m.emissions.rates * jitter))
        models.append(m)
    return models


def lgssm_basis(y, lengths, state_dim):
    """``(basis, variances, mean)`` of the pooled fully observed steps: the LGSSM starts' emission
    matrix is the leading principal axes (scaled), its offset the mean."""
    mask = np.arange(y.shape[1])[None, :] < lengths[:, None]
    pooled = y[mask]
    pooled = pooled[~np.isnan(pooled).any(axis=1)]
    if pooled.shape[0] < 2:
        raise DataError("too few fully observed steps to initialise an LGSSM (need at least 2)")
    mean = pooled.mean(0)
    _, s, vt = np.linalg.svd(pooled - mean, full_matrices=False)
    basis = np.zeros((y.shape[2], state_dim))
    r = min(state_dim, vt.shape[0])
    basis[:, :r] = vt[:r].T * (s[:r] / np.sqrt(pooled.shape[0]))[None, :]
    return basis, np.maximum(pooled.var(0), 1e-6), mean


def initial_lgssms(key, basis, var, mean, state_dim, restarts):
    """Starting LGSSMs around :func:`lgssm_basis` (later restarts perturb the emission matrix); traceable."""
    import jax
    import jax.numpy as jnp

    import ssmjax

    models = []
    for i, k in enumerate(jax.random.split(key, restarts)):
        c = basis + (0.1 * jnp.sqrt(var.mean()) * jax.random.normal(k, basis.shape) if i else 0.0)
        models.append(ssmjax.LGSSM(
            initial_mean=jnp.zeros(state_dim), initial_cov=jnp.eye(state_dim),
            transition_matrix=0.9 * jnp.eye(state_dim), transition_cov=0.1 * jnp.eye(state_dim),
            emission_matrix=jnp.asarray(c), emission_cov=jnp.diag(jnp.asarray(0.5 * var)),
            emission_offset=jnp.asarray(mean),
        ))
    return models


# ----------------------------------------------------------------------------- traced EM


def em_pattern(y, lengths):
    """The static facts of a batch that ``fit_em`` compiles for (no NaN; no padding), on the host."""
    from ._fit.em import _batch_pattern

    y = np.asarray(y)
    lengths = np.full(y.shape[0], y.shape[1]) if lengths is None else np.asarray(lengths)
    return tuple(bool(v) for v in _batch_pattern(y, lengths))


def em(models, y, lengths, tol, max_iters: int, pattern, frozen=()):
    """``fit_em`` (one model) or ``fit_em_restarts`` (several), traced: ``(fitted, num_iters, status)``.

    For one model this is ``fit_em``'s compiled loop, with the HMM's fast E-step; a ``status`` other
    than converged or max_iters (a bad step, or an E-step that needs the exact fallback) means the
    caller must run ``fit_em`` itself. For several it is ``fit_em_restarts``, whose loop holds each
    restart's last good model; ``num_iters`` and ``status`` are then None.
    """
    import equinox as eqx

    from ._checks import value_checks
    from ._fit.em import _em_restarts, _em_single, _initial_carry, best_restart, stack_models
    from ._fit.protocol import check_frozen

    first = models[0]
    frozen = check_frozen(first, frozen)
    first._check_em(frozen)
    with value_checks(False):
        y, lengths, inputs = first._check_batch(y, lengths, None)
        if len(models) == 1:
            fast = bool(getattr(first, "_has_fast_e_step", False))
            final = _em_single(first, y, lengths, inputs, tol, max_iters, frozen, False, pattern, fast,
                               _initial_carry(first, max_iters), None, np.int32(max_iters))
            return eqx.combine(final.params, eqx.partition(first, eqx.is_array)[1]), final.it, final.status
        stacked = stack_models(models)
        params, _, _, _, final_lls = _em_restarts(stacked, y, lengths, inputs, tol, max_iters, frozen, False,
                                                  pattern, None)
    return best_restart(stacked, params, final_lls), None, None


def em_status(status) -> str | None:
    """The name of a traced :func:`em` run's status, or None where ``fit_em`` itself must run."""
    from ._fit.em import _CONVERGED, _MAX_ITERS, STATUS_NAMES

    return STATUS_NAMES[int(status)] if int(status) in (_CONVERGED, _MAX_ITERS) else None


# ----------------------------------------------------------------------------- what is printed


def posterior_arrays(model, y, lengths, decode: bool):
    """Every sequence's posterior (padded, ``length=`` per sequence), traceable: for an HMM the state
    probabilities (B, T, K) and Viterbi paths (or None), for an LGSSM the smoothed means and
    standard deviations (B, T, Dx)."""
    import jax
    import jax.numpy as jnp

    import ssmjax

    if isinstance(model, ssmjax.HMM):
        probs = jax.vmap(lambda s, n: model.smoother(s, length=n).smoothed_probs)(y, lengths)
        paths = jax.vmap(lambda s, n: model.viterbi(s, length=n))(y, lengths) if decode else None
        return probs, paths
    post = jax.vmap(lambda s, n: model.smoother(s, length=n))(y, lengths)
    return post.smoothed_means, jnp.sqrt(jnp.diagonal(post.smoothed_covs, axis1=-2, axis2=-1))


def report_items(model) -> list:
    """Every fitted parameter as ``(label, value, named)``, traceable; ``named``: the value's
    columns are the data's emission columns."""
    import ssmjax

    if isinstance(model, ssmjax.HMM):
        items = [("initial_probs", model.initial_probs, False), ("transition_matrix", model.transition_matrix, False)]
        em_ = model.emissions
        for name in ("rates", "probs", "means", "variances", "covs"):
            value = getattr(em_, name, None)
            if value is None or (name == "variances" and hasattr(em_, "chol_covs")):
                continue  # a full covariance is printed whole below
            if value.ndim == 3:  # per state: one matrix each
                items += [(f"emissions.{name}[{k}]", value[k], k == 0) for k in range(value.shape[0])]
            else:
                items.append((f"emissions.{name}", value, True))
        return items
    return [(name, getattr(model, name), name.startswith("emission") and name != "emission_cov")
            for name in model.parameter_names()]


def plot_centres(report):
    """Each state's mean (or rate) of the emissions, (K, D), from :func:`report_items`; None if none."""
    return next((np.asarray(v) for label, v, _ in report if label in ("emissions.means", "emissions.rates")), None)


def _summary(model, y, lengths, decode: bool) -> dict:
    return {"model": model, "loglik": model.log_likelihood(y, lengths=lengths),
            "smoothed": posterior_arrays(model, y, lengths, decode), "report": report_items(model)}


# ----------------------------------------------------------------------------- the two routes


def fit_program(args, data, y, cache_dir) -> FitResult | None:
    """The fit as one cached program (see the module doc); None where it does not apply."""
    if args.method != "em" or args.progress:
        return None
    import jax

    from . import _cli_programs
    from ._cli_plot import preload

    lengths = np.asarray(data.lengths)
    options = dict(model=args.model, iters=args.iters, restarts=args.restarts, pattern=em_pattern(y, lengths))
    if args.model == "hmm":
        if int(lengths.sum()) < args.states:
            return None  # HMM.from_data says why
        options.update(emissions=args.emissions, states=args.states)  # the starts' shapes give the rest
        starts, tree = jax.tree.flatten(
            initial_hmms(jax.random.key(args.seed), y, lengths, args.states, args.emissions, args.restarts))

        def program(y, lengths, tol, *starts):
            models = jax.tree.unflatten(tree, starts)
            fitted, num_iters, status = em(models, y, lengths, tol, args.iters, options["pattern"])
            return {**_summary(fitted, y, lengths, True), "num_iters": num_iters, "status": status}

        out = _cli_programs.run("fit-hmm", program, (y, lengths, np.float64(args.tol), *starts), options, cache_dir,
                                while_loading=preload)
    else:
        options.update(state_dim=args.state_dim)

        def program(y, lengths, basis, var, mean, seed, tol):
            models = initial_lgssms(jax.random.key(seed), basis, var, mean, args.state_dim, args.restarts)
            fitted, num_iters, status = em(models, y, lengths, tol, args.iters, options["pattern"])
            return {**_summary(fitted, y, lengths, False), "num_iters": num_iters, "status": status}

        inputs = (y, lengths, *lgssm_basis(y, lengths, args.state_dim))
        out = _cli_programs.run("fit-lgssm", program, (*inputs, np.int64(args.seed), np.float64(args.tol)),
                                options, cache_dir, while_loading=preload)
    if args.restarts > 1:
        how = f"EM, best of {args.restarts} restarts"
    else:
        status = em_status(out["status"])
        if status is None:
            return None
        how = f"EM, {int(out['num_iters'])} iterations ({status})"
    smoothed = tuple(None if a is None else np.asarray(a) for a in out["smoothed"])
    return FitResult(out["model"], float(out["loglik"]), how, out["report"], smoothed)


def fit_reference(args, data, y) -> FitResult:
    """The fit through the public functions (SGD, a progress bar, or an EM run with a bad step)."""
    import jax
    import optax

    import ssmjax

    from ._fit.em import stack_models

    key = jax.random.key(args.seed)
    lengths = data.lengths
    if args.model == "hmm":
        models = initial_hmms(key, y, lengths, args.states, args.emissions, args.restarts)
    else:
        basis, var, mean = lgssm_basis(y, lengths, args.state_dim)
        models = initial_lgssms(key, basis, var, mean, args.state_dim, args.restarts)
    if args.method == "em":
        if len(models) > 1:
            fitted, _, _ = ssmjax.fit_em_restarts(stack_models(models), y, lengths=lengths, max_iters=args.iters,
                                                  tol=args.tol, progress=args.progress)
            how = f"EM, best of {len(models)} restarts"
        else:
            fitted, _, info = ssmjax.fit_em(models[0], y, lengths=lengths, max_iters=args.iters, tol=args.tol,
                                            progress=args.progress)
            how = f"EM, {info.num_iters} iterations ({info.status})"
    else:
        fitted, best_ll = None, -np.inf
        for r, m in enumerate(models):
            candidate, _ = ssmjax.fit_sgd(m, y, optax.adam(args.learning_rate), lengths=lengths,
                                          num_steps=args.iters, key=jax.random.key(args.seed + r),
                                          progress=args.progress)
            ll = total_loglik(candidate, y, lengths)
            if ll > best_ll:
                fitted, best_ll = candidate, ll
        how = f"SGD (adam, lr {args.learning_rate}), {args.iters} steps, best of {len(models)}"
    smoothed = smoothed_reference(fitted, y, lengths, decode=args.model == "hmm", checked=True)
    return FitResult(fitted, total_loglik(fitted, y, lengths), how, report_items(fitted), smoothed)


def total_loglik(model, y, lengths) -> float:
    import jax.numpy as jnp

    return float(model.log_likelihood(jnp.asarray(y), lengths=jnp.asarray(lengths)))


def smoothed_reference(model, y, lengths, decode: bool, checked: bool):
    """:func:`posterior_arrays` of a saved model in one compiled call (``ssmjax decode`` / ``smooth``)."""
    import jax
    import jax.numpy as jnp

    from . import _checks

    # A model just fitted to data checked on the host (``checked``) needs no in-program checks; without
    # them the program holds no host callback, and the persistent cache can keep it.
    with _checks.value_checks(not checked and _checks.value_checks_enabled()):
        out = jax.jit(lambda s, n: posterior_arrays(model, s, n, decode))(jnp.asarray(y), jnp.asarray(lengths))
    return tuple(None if a is None else np.asarray(a) for a in out)


# ----------------------------------------------------------------------------- text and rows


def fmt_matrix(m) -> str:
    return "[" + ", ".join("[" + ", ".join(f"{v:.3f}" for v in row) + "]" for row in m) + "]"


def print_report(report, out, columns=None) -> None:
    """Print :func:`report_items` (the emission rows and columns named after the data's columns)."""
    named = f"  (columns {', '.join(columns)})" if columns else ""
    for label, value, is_named in report:
        value = np.asarray(value)
        text = fmt_matrix(value) if value.ndim == 2 else str(np.round(value, 4).tolist())
        print(f"  {label:<21} = {text}{named if is_named else ''}", file=out)


def posterior_rows(model, smoothed, lengths, data, decode: bool):
    """Rows of the per-step posterior CSV and the header (``smoothed`` from :func:`posterior_arrays`)."""
    import ssmjax

    rows = []
    if isinstance(model, ssmjax.HMM):
        probs, paths = smoothed
        header = ["sequence", "step"] + (["viterbi_state"] if decode else []) + [f"p_state_{i}" for i in range(model.num_states)]
        for b, n in enumerate(lengths):
            for t in range(int(n)):
                rows.append([data.ids[b], t] + ([int(paths[b, t])] if decode else []) + [f"{p:.6g}" for p in probs[b, t]])
        return header, rows
    means, sds = smoothed
    dx = model.state_dim
    header = ["sequence", "step"] + [f"mean_{i}" for i in range(dx)] + [f"sd_{i}" for i in range(dx)]
    for b, n in enumerate(lengths):
        for t in range(int(n)):
            rows.append([data.ids[b], t] + [f"{v:.6g}" for v in means[b, t]] + [f"{v:.6g}" for v in sds[b, t]])
    return header, rows
