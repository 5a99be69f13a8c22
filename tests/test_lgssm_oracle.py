"""Independent numpy oracle for LGSSM inference: the dense joint Gaussian of (x_{1:T}, y_{1:T}).

Nothing here shares code with ssmjax: the joint mean and covariance of all states and
emissions are built directly from the model equations, and every posterior quantity is
plain Gaussian conditioning on the observed (non-NaN) emission entries.
"""

from __future__ import annotations

import numpy as np


def _at(a, t, static_ndim):
    if a is None:
        return None
    a = np.asarray(a, dtype=np.float64)
    return a[t] if a.ndim == static_ndim + 1 else a


def dense_joint(params: dict, num_timesteps: int, inputs=None):
    """Mean (N,) and covariance (N, N) of z = (x_1..x_T, y_1..y_T) stacked."""
    T = num_timesteps
    m0 = np.asarray(params["initial_mean"], np.float64)
    dx = m0.shape[0]
    dy = np.asarray(params["emission_matrix"]).shape[-2]
    u = None if inputs is None else np.asarray(inputs, np.float64)
    # states: x = M x_noise + c, with x_noise = (x_1 - m0, w_1, ..., w_{T-1})
    means = [m0]
    # linear map from noise blocks to each state
    maps = [[np.eye(dx)] + [np.zeros((dx, dx))] * (T - 1)]
    for t in range(T - 1):
        A = _at(params["transition_matrix"], t, 2)
        mean = A @ means[-1]
        if params.get("transition_input_matrix") is not None:
            mean = mean + _at(params["transition_input_matrix"], t, 2) @ u[t + 1]
        if params.get("transition_offset") is not None:
            mean = mean + _at(params["transition_offset"], t, 1)
        means.append(mean)
        row = [A @ blk for blk in maps[-1]]
        row[t + 1] = row[t + 1] + np.eye(dx)
        maps.append(row)
    noise_cov = np.zeros((T * dx, T * dx))
    noise_cov[:dx, :dx] = np.asarray(params["initial_cov"], np.float64)
    for t in range(T - 1):
        s = slice((t + 1) * dx, (t + 2) * dx)
        noise_cov[s, s] = _at(params["transition_cov"], t, 2)
    M = np.block(maps)
    cov_x = M @ noise_cov @ M.T
    mean_x = np.concatenate(means)
    Cbig = np.zeros((T * dy, T * dx))
    Rbig = np.zeros((T * dy, T * dy))
    mean_y = np.zeros(T * dy)
    for t in range(T):
        C = _at(params["emission_matrix"], t, 2)
        Cbig[t * dy : (t + 1) * dy, t * dx : (t + 1) * dx] = C
        Rbig[t * dy : (t + 1) * dy, t * dy : (t + 1) * dy] = _at(params["emission_cov"], t, 2)
        my = C @ means[t]
        if params.get("emission_input_matrix") is not None:
            my = my + _at(params["emission_input_matrix"], t, 2) @ u[t]
        if params.get("emission_offset") is not None:
            my = my + _at(params["emission_offset"], t, 1)
        mean_y[t * dy : (t + 1) * dy] = my
    cov_xy = cov_x @ Cbig.T
    cov_y = Cbig @ cov_x @ Cbig.T + Rbig
    mean = np.concatenate([mean_x, mean_y])
    cov = np.block([[cov_x, cov_xy], [cov_xy.T, cov_y]])
    return mean, cov, dx, dy


def condition(params, emissions, inputs=None, upto=None, joint=None):
    """Posterior mean/cov of x_{1:T} given observed entries of emissions[:upto], and log p(those).

    ``joint``: ``dense_joint(params, T, inputs)`` when the caller conditions the same joint many times.
    """
    emissions = np.asarray(emissions, np.float64)
    T = emissions.shape[0]
    mean, cov, dx, dy = dense_joint(params, T, inputs) if joint is None else joint
    n_x = T * dx
    y = emissions.copy()
    if upto is not None:
        y[upto:] = np.nan
    obs = ~np.isnan(y.reshape(-1))
    idx = n_x + np.flatnonzero(obs)
    xi = np.arange(n_x)
    if idx.size == 0:
        return mean[:n_x], cov[:n_x, :n_x], 0.0
    Syy = cov[np.ix_(idx, idx)]
    Sxy = cov[np.ix_(xi, idx)]
    r = y.reshape(-1)[obs] - mean[idx]
    sol = np.linalg.solve(Syy, r)
    post_mean = mean[:n_x] + Sxy @ sol
    post_cov = cov[:n_x, :n_x] - Sxy @ np.linalg.solve(Syy, Sxy.T)
    _, logdet = np.linalg.slogdet(Syy)
    loglik = -0.5 * (r @ sol + logdet + idx.size * np.log(2 * np.pi))
    return post_mean, post_cov, loglik


def oracle(params, emissions, inputs=None):
    """Filtered, predicted, smoothed moments, cross-covariances and log-likelihood."""
    emissions = np.asarray(emissions, np.float64)
    T = emissions.shape[0]
    dx = np.asarray(params["initial_mean"]).shape[0]
    blk = lambda v, t: v[t * dx : (t + 1) * dx]  # noqa: E731
    blk2 = lambda c, s, t: c[s * dx : (s + 1) * dx, t * dx : (t + 1) * dx]  # noqa: E731
    joint = dense_joint(params, T, inputs)
    fm, fc, pm, pc = [], [], [], []
    for t in range(T):
        m, c, _ = condition(params, emissions, inputs, upto=t + 1, joint=joint)
        fm.append(blk(m, t))
        fc.append(blk2(c, t, t))
        m, c, _ = condition(params, emissions, inputs, upto=t, joint=joint)
        pm.append(blk(m, t))
        pc.append(blk2(c, t, t))
    m, c, loglik = condition(params, emissions, inputs, joint=joint)
    sm = np.stack([blk(m, t) for t in range(T)])
    sc = np.stack([blk2(c, t, t) for t in range(T)])
    cross = np.stack([blk2(c, t, t + 1) for t in range(T - 1)]) if T > 1 else np.zeros((0, dx, dx))
    return dict(
        marginal_loglik=loglik,
        filtered_means=np.stack(fm),
        filtered_covs=np.stack(fc),
        predicted_means=np.stack(pm),
        predicted_covs=np.stack(pc),
        smoothed_means=sm,
        smoothed_covs=sc,
        smoothed_cross_covs=cross,
        joint_mean=m,
        joint_cov=c,
    )
