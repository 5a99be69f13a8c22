r"""Kalman EM: expected sufficient statistics and the closed-form M-step.

Model (see :mod:`ssmjax._lgssm.model` for the convention)

.. math::
    x_{t+1} = A x_t + B u_{t+1} + b + w_t,\quad w_t \sim N(0, Q); \qquad
    y_t = C x_t + D u_t + d + v_t,\quad v_t \sim N(0, R).

Both equations are linear regressions with Gaussian noise, on regressors
:math:`\phi_t = [x_t; u_{t+1}; 1]` (transition) and :math:`\psi_t = [x_t; u_t; 1]`
(emission). The E-step returns the expected outer products of targets and
regressors under the smoother's posterior, summed over time; the M-step solves the
(possibly partly frozen) regressions and sets the noise covariance to the expected
residual covariance given the new (or frozen) weights. Blocks a model does not
have (no inputs, ``None`` offsets) are absent and stay absent.

Missing entries of ``y_t`` (NaN) are treated as latent variables, which keeps EM
exact: given :math:`x_t` and the observed entries, the missing ones are Gaussian
and affine in :math:`x_t`, :math:`y_t = H_t x_t + h_t + e_t` with
:math:`e_t \sim N(0, \Sigma_t)` (``H = 0``, ``h = y``, ``Σ = 0`` on a fully
observed step), so their expected outer products follow in closed form.

Only time-invariant parameters are estimated; time-varying fields must be frozen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def _regressor_moments(mean, cov, extra):
    """E[z] and E[z z^T] for z = [x; extra] with x ~ N(mean, cov) and ``extra`` known."""
    ez = jnp.concatenate([mean, extra], axis=-1)
    dx = mean.shape[-1]
    second = _outer(ez, ez)
    second = second.at[..., :dx, :dx].add(cov)
    return ez, second


def _missing_emission_affine(y, mask, emission_matrix, emission_cov, mean_shift):
    """Write y = H x + h + e given the observed entries (mask) for one step.

    ``mean_shift`` is D u_t + d (zeros when absent). Returns (H, h, Sigma).
    """
    obs = mask.astype(y.dtype)
    mis = 1.0 - obs
    y0 = jnp.where(mask, y, 0.0)
    # R restricted to observed entries, padded with the identity on missing ones.
    r_oo = emission_cov * _outer(obs, obs) + jnp.diag(mis)
    r_mo = emission_cov * _outer(mis, obs)
    # G = R_mo R_oo^{-1} (rows of missing entries, columns of observed entries)
    chol = jnp.linalg.cholesky(r_oo)
    gain = jax.scipy.linalg.cho_solve((chol, True), r_mo.T).T
    gain = gain * _outer(mis, obs)
    resid_obs = (y0 - mean_shift) * obs
    h_cond = mean_shift * mis + _mm(gain, resid_obs)
    h_matrix = (emission_matrix - _mm(gain, emission_matrix)) * mis[:, None]
    sigma = (emission_cov - _mm(gain, emission_cov.T)) * _outer(mis, mis)
    h_vec = y0 * obs + h_cond
    return h_matrix, h_vec, 0.5 * (sigma + sigma.T)


def expected_stats(model, emissions, inputs, length, posterior, observed: bool = False):
    """Summed expected sufficient statistics of one sequence (padding excluded).

    Args:
        model: an :class:`ssmjax.LGSSM` with time-invariant parameters.
        emissions: (T, Dy) with NaN for missing entries.
        inputs: (T, Du) or None.
        length: int scalar (number of real steps).
        posterior: the :func:`ssmjax.rts_smoother` result for this sequence.
        observed: static promise that no real step has a missing entry; the
            emission moments are then ``y psi^T`` and ``y y^T`` directly, skipping
            the per-step conditioning of missing entries (a Cholesky factorisation
            per step).

    Returns:
        A dict of arrays that add across sequences.
    """
    num_timesteps, dy = emissions.shape
    dtype = posterior.smoothed_means.dtype
    means, covs = posterior.smoothed_means, posterior.smoothed_covs
    cross = posterior.smoothed_cross_covs  # Cov(x_t, x_{t+1})
    steps = jnp.arange(num_timesteps)
    real = steps < length
    pair_real = steps[:-1] < length - 1

    def transition_extra(t):
        parts = []
        if model.transition_input_matrix is not None:
            parts.append(inputs[t + 1])
        if model.transition_offset is not None:
            parts.append(jnp.ones((1,), dtype))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), dtype)

    def emission_extra(t):
        parts = []
        if model.emission_input_matrix is not None:
            parts.append(inputs[t])
        if model.emission_offset is not None:
            parts.append(jnp.ones((1,), dtype))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), dtype)

    # --- transition regression: target x_{t+1}, regressor phi_t = [x_t; extra]
    extra_tr = jax.vmap(transition_extra)(steps[:-1])
    e_phi, e_phiphi = jax.vmap(_regressor_moments)(means[:-1], covs[:-1], extra_tr)
    e_next = means[1:]
    dx = means.shape[-1]
    # E[x_{t+1} phi_t^T] = [E[x_{t+1} x_t^T], m_{t+1} extra^T]
    e_next_x = jnp.swapaxes(cross, -1, -2) + _outer(means[1:], means[:-1])
    e_next_phi = jnp.concatenate([e_next_x, _outer(e_next, extra_tr)], axis=-1)
    e_nextnext = covs[1:] + _outer(means[1:], means[1:])
    w_pair = pair_real.astype(dtype)
    tr_phiphi = jnp.einsum("t,tij->ij", w_pair, e_phiphi, precision=_HI)
    tr_nextphi = jnp.einsum("t,tij->ij", w_pair, e_next_phi, precision=_HI)
    tr_nextnext = jnp.einsum("t,tij->ij", w_pair, e_nextnext, precision=_HI)

    # --- emission regression: target y_t, regressor psi_t = [x_t; extra]
    extra_em = jax.vmap(emission_extra)(steps)
    e_psi, e_psipsi = jax.vmap(_regressor_moments)(means, covs, extra_em)
    mask = ~jnp.isnan(emissions)
    mask = mask & real[:, None]

    def emission_target_moments(y, m, e_psi_t, e_psipsi_t, extra_t, u_t, mask_t):
        shift = jnp.zeros((dy,), dtype)
        if model.emission_input_matrix is not None:
            shift = shift + _mm(model.emission_input_matrix, u_t)
        if model.emission_offset is not None:
            shift = shift + model.emission_offset
        h_mat, h_vec, sigma = _missing_emission_affine(
            y, mask_t, model.emission_matrix, model.emission_cov, shift
        )
        # y = H x + h + e; E[y psi^T] = H E[x psi^T] + h E[psi]^T
        e_x_psi = e_psipsi_t[:dx, :]
        e_y_psi = _mm(h_mat, e_x_psi) + _outer(h_vec, e_psi_t)
        e_xx = e_psipsi_t[:dx, :dx]
        e_yy = (
            _mm(_mm(h_mat, e_xx), h_mat.T)
            + _outer(_mm(h_mat, m), h_vec)
            + _outer(h_vec, _mm(h_mat, m))
            + _outer(h_vec, h_vec)
            + sigma
        )
        return e_y_psi, e_yy

    if observed:
        # y is known at every real step: E[y psi^T] = y E[psi]^T, E[y y^T] = y y^T.
        w_step = real.astype(dtype)
        y = jnp.where(real[:, None], emissions, 0.0).astype(dtype)
        em_psipsi = jnp.einsum("t,tij->ij", w_step, e_psipsi, precision=_HI)
        em_ypsi = jnp.einsum("ti,tj->ij", y, e_psi, precision=_HI)
        em_yy = jnp.einsum("ti,tj->ij", y, y, precision=_HI)
    else:
        inputs_em = inputs if inputs is not None else jnp.zeros((num_timesteps, 0), dtype)
        e_ypsi, e_yy = jax.vmap(emission_target_moments)(
            emissions, means, e_psi, e_psipsi, extra_em, inputs_em, mask
        )
        # A step with no observed entry carries no information about C, D, d, R; it
        # would contribute exactly its prior expectation, so it can be dropped (and
        # dropping it keeps the update exact).
        w_step = (real & jnp.any(mask, axis=-1)).astype(dtype)
        em_psipsi = jnp.einsum("t,tij->ij", w_step, e_psipsi, precision=_HI)
        em_ypsi = jnp.einsum("t,tij->ij", w_step, e_ypsi, precision=_HI)
        em_yy = jnp.einsum("t,tij->ij", w_step, e_yy, precision=_HI)

    return {
        "init_mean": means[0],
        "init_second": covs[0] + _outer(means[0], means[0]),
        "init_count": jnp.ones((), dtype),
        "tr_phiphi": tr_phiphi,
        "tr_nextphi": tr_nextphi,
        "tr_nextnext": tr_nextnext,
        "tr_count": jnp.sum(w_pair),
        "em_psipsi": em_psipsi,
        "em_ypsi": em_ypsi,
        "em_yy": em_yy,
        "em_count": jnp.sum(w_step),
    }


def _solve_regression(s_zz, s_yz, current_w, held, metric):
    r"""Weights maximising the expected Gaussian log-likelihood with the ``held`` entries kept.

    Args:
        s_zz: (P, P) summed E[z z^T]; s_yz: (N, P) summed E[y z^T].
        current_w: (N, P) current weights (the values of held entries).
        held: (N, P) boolean numpy mask (static).
        metric: (N, N) inverse noise covariance, or None when the rows decouple (a diagonal
            noise covariance, or held columns): the maximiser then does not depend on it.

    Whole held columns leave a regression per row on the same free columns, solved at once.
    Otherwise, with :math:`W = W_0 + F` (``F`` on the free entries), the gradient
    :math:`\Sigma^{-1}(S_{yz} - W S_{zz})` vanishes on the free entries where
    :math:`(\Sigma^{-1} \otimes S_{zz})\,\mathrm{vec} F = \mathrm{vec}\,\Sigma^{-1}(S_{yz} - W_0 S_{zz})`
    (row-major ``vec``), restricted to them. With a full noise covariance that is the maximiser
    given the current covariance (a conditional maximisation step: EM still never decreases).
    """
    held = np.asarray(held, dtype=bool)
    if held.all():
        return current_w
    if (held == held[:1]).all():  # whole columns
        free = ~held[0]
        fixed = held[0]
        s_ff = s_zz[np.ix_(free, free)]
        rhs = s_yz[:, free]
        if fixed.any():
            rhs = rhs - _mm(current_w[:, fixed], s_zz[np.ix_(fixed, free)])
        chol = jnp.linalg.cholesky(0.5 * (s_ff + s_ff.T))
        w_free = jax.scipy.linalg.cho_solve((chol, True), rhs.T).T
        return current_w.at[:, free].set(w_free)
    n = current_w.shape[0]
    metric = jnp.eye(n, dtype=s_zz.dtype) if metric is None else metric
    w0 = jnp.where(held, current_w, 0.0)
    rhs = _mm(metric, s_yz - _mm(w0, s_zz)).reshape(-1)
    idx = np.flatnonzero(~held.reshape(-1))
    hess = jnp.kron(metric, s_zz)[np.ix_(idx, idx)]
    chol = jnp.linalg.cholesky(0.5 * (hess + hess.T))
    f = jax.scipy.linalg.cho_solve((chol, True), rhs[idx])
    return w0.reshape(-1).at[idx].set(f).reshape(current_w.shape)


def _residual_cov(s_yy, s_yz, s_zz, w, count):
    cov = (s_yy - _mm(w, s_yz.T) - _mm(s_yz, w.T) + _mm(_mm(w, s_zz), w.T)) / count
    return 0.5 * (cov + cov.T)


def _structured(cov, current, structure, held):
    """The maximiser over covariances of ``structure`` given the expected residual covariance ``cov``."""
    if structure == "scalar":
        return jnp.mean(jnp.diagonal(cov)) * jnp.eye(cov.shape[-1], dtype=cov.dtype)
    if structure == "diagonal":  # the variances separate: each free one is its residual variance
        return jnp.diag(jnp.where(np.diag(held), jnp.diagonal(current), jnp.diagonal(cov)))
    return cov


_EQUATIONS = {
    # name: (weight blocks, noise covariance, summed E[z z^T], E[target z^T], E[target target^T], count)
    "initial": (("initial_mean",), "initial_cov", "init_count", "init_mean", "init_second", "init_count"),
    "transition": (("transition_matrix", "transition_input_matrix", "transition_offset"), "transition_cov",
                   "tr_phiphi", "tr_nextphi", "tr_nextnext", "tr_count"),
    "emission": (("emission_matrix", "emission_input_matrix", "emission_offset"), "emission_cov",
                 "em_psipsi", "em_ypsi", "em_yy", "em_count"),
}


def _regression_m_step(model, equation, stats, held, structure, new):
    """Update the weights ``W = [matrix, input_matrix, offset]`` and the noise covariance of one equation.

    The initial state is the regression of :math:`x_1` on the constant 1 (``W`` is the mean).
    Blocks the model does not have are absent; held entries keep their values and the others
    are the regression given them; the covariance is the expected residual covariance of the
    new weights, in its ``structure``. Writes into ``new``.
    """
    names, cov_name, *keys = _EQUATIONS[equation]
    s_zz, s_tz, s_tt, count = (stats[k] for k in keys)
    if equation == "initial":
        s_zz, s_tz = count[None, None], s_tz[:, None]
    blocks = []
    for name in names:
        value = getattr(model, name)
        if value is not None:
            column = name.endswith(("offset", "mean"))
            blocks.append((name, column, value[:, None] if column else value,
                           held[name][:, None] if column else held[name]))
    w = jnp.concatenate([b for _, _, b, _ in blocks], axis=1)
    mask = np.concatenate([m for _, _, _, m in blocks], axis=1)
    kind = structure[cov_name]
    metric = None
    if kind == "full" and not (mask == mask[:1]).all():
        cov = getattr(model, cov_name)
        metric = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(cov), True), jnp.eye(cov.shape[-1], dtype=cov.dtype))
    w = _solve_regression(s_zz, s_tz, w, mask, metric)
    col = 0
    for name, column, b, _ in blocks:
        part = w[:, col : col + b.shape[1]]
        col += b.shape[1]
        new[name] = part[:, 0] if column else part
    if not held[cov_name].all():
        current = getattr(model, cov_name)
        new[cov_name] = _structured(_residual_cov(s_tt, s_tz, s_zz, w, count), current, kind, held[cov_name])


def m_step(model, stats, held: dict, structure: dict):
    """Closed-form M-step. ``held``: per field, the numpy mask of entries kept (``fixed`` or frozen);
    ``structure``: per covariance, ``"full"``, ``"diagonal"`` or ``"scalar"``. Returns a dict of
    new field values (fields held whole are left out)."""
    new = {}
    for equation in _EQUATIONS:
        _regression_m_step(model, equation, stats, held, structure, new)
    return {name: value for name, value in new.items() if not held[name].all()}
