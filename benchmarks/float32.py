"""float32 accuracy of every inference function at long T, against float64, beside dynamax.

    python benchmarks/float32.py [--timesteps 10000]

Each function runs twice on the same problem, in float32 and in float64 (64-bit mode on,
inputs cast), and the float32 output is compared with the float64 one: probabilities by
their largest absolute error, log-likelihoods and entropies relative to their magnitude,
means and covariances by their largest absolute error over the largest float64 entry,
Viterbi paths by the fraction of steps that differ. dynamax runs the same problems where
it has the function. Problems: an HMM with K = 16 states (log-likelihoods of a Gaussian
HMM sample); a stable LGSSM with (Dx, Dy) = (4, 2); the same LGSSM with a diffuse-like
initial covariance (1e7 I), and with an exact diffuse prior. Results: ``results/float32.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ssmjax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def hmm_problem(num_states, num_timesteps, seed=0):
    rng = np.random.default_rng(seed)
    transition = 0.9 * np.eye(num_states) + 0.1 * rng.dirichlet(np.ones(num_states), num_states)
    means = np.linspace(-3, 3, num_states)
    z = np.zeros(num_timesteps, int)
    for t in range(1, num_timesteps):
        z[t] = rng.choice(num_states, p=transition[z[t - 1]])
    y = means[z] + rng.standard_normal(num_timesteps)
    ll = -0.5 * (y[:, None] - means[None, :]) ** 2 - 0.5 * np.log(2 * np.pi)
    return np.full(num_states, 1.0 / num_states), transition, ll


def lgssm_problem(num_timesteps, initial_var, seed=0):
    rng = np.random.default_rng(seed)
    dx, dy = 4, 2
    a = rng.standard_normal((dx, dx))
    a = 0.95 * a / np.max(np.abs(np.linalg.eigvals(a)))
    p = dict(m0=np.zeros(dx), P0=initial_var * np.eye(dx), A=a, Q=0.1 * np.eye(dx),
             C=rng.standard_normal((dy, dx)), R=0.5 * np.eye(dy))
    model = ssmjax.LGSSM(initial_mean=p["m0"], initial_cov=p["P0"], transition_matrix=p["A"],
                         transition_cov=p["Q"], emission_matrix=p["C"], emission_cov=p["R"])
    _, y = ssmjax.lgssm_sample(model, num_timesteps, key=jax.random.key(seed))
    return p, np.asarray(y)


def cast(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
                        tree)


def err_prob(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def err_rel(a, b):
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def err_path(a, b):
    return float(np.mean(np.asarray(a) != np.asarray(b)))


def both(fn, *args):
    """``fn`` on float32 copies of ``args`` in JAX's default 32-bit mode, and on float64 copies."""
    with jax.enable_x64(False):
        low = jax.tree.map(np.asarray, fn(*cast(args, jnp.float32)))
    return low, fn(*cast(args, jnp.float64))


def hmm_rows(num_timesteps):
    pi, a, ll = hmm_problem(16, num_timesteps)
    rows = []
    try:
        from dynamax.hidden_markov_model import hmm_filter as d_filter
        from dynamax.hidden_markov_model import hmm_posterior_mode as d_mode
        from dynamax.hidden_markov_model import hmm_smoother as d_smoother
        from dynamax.hidden_markov_model import parallel_hmm_filter as d_pfilter
        from dynamax.hidden_markov_model import parallel_hmm_smoother as d_psmoother
    except ImportError:
        d_filter = d_smoother = d_mode = d_pfilter = d_psmoother = None

    def add(function, output, ours, theirs=None):
        rows.append(dict(function=function, output=output, ssmjax=ours, dynamax=theirs))

    for parallel, name, dfilter, dsmooth in ((False, "hmm_smoother", d_filter, d_smoother),
                                             (True, "hmm_smoother parallel", d_pfilter, d_psmoother)):
        f32, f64 = both(lambda p, t, l: ssmjax.hmm_smoother(p, t, l, parallel=parallel), pi, a, ll)
        d32, d64 = both(dsmooth, pi, a, ll) if dsmooth else (None, None)
        add(name, "filtered probs", err_prob(f32.filtered_probs, f64.filtered_probs),
            d32 and err_prob(d32.filtered_probs, d64.filtered_probs))
        add(name, "smoothed probs", err_prob(f32.smoothed_probs, f64.smoothed_probs),
            d32 and err_prob(d32.smoothed_probs, d64.smoothed_probs))
        add(name, "log-likelihood (rel)", err_rel(f32.marginal_loglik, f64.marginal_loglik),
            d32 and err_rel(d32.marginal_loglik, d64.marginal_loglik))
    s32, s64 = both(ssmjax.hmm_two_slice_marginals, pi, a, ll)
    add("hmm_two_slice_marginals", "two-slice probs", err_prob(s32, s64))
    (v32, m32), (v64, m64) = both(ssmjax.hmm_viterbi, pi, a, ll)
    dv = both(d_mode, pi, a, ll) if d_mode else None
    add("hmm_viterbi", "path (fraction differing)", err_path(v32, v64), dv and err_path(*dv))
    add("hmm_viterbi", "path log-probability (rel)", err_rel(m32, m64))
    g32, g64 = both(lambda p, t, l: ssmjax.hmm_fixed_lag_smoother(p, t, l, 10), pi, a, ll)
    add("hmm_fixed_lag_smoother lag 10", "probs", err_prob(g32, g64))
    h32, h64 = both(lambda p, t, l: ssmjax.hmm_predict(p, t, l, 20), pi, a, ll)
    add("hmm_predict 20 steps", "probs", err_prob(h32, h64))
    return rows


def lgssm_rows(num_timesteps):
    rows = []
    try:
        from _common import dynamax_lgssm_params
        from dynamax.linear_gaussian_ssm import lgssm_smoother as d_smoother
        from dynamax.linear_gaussian_ssm import parallel_lgssm_smoother as d_psmoother
    except ImportError:
        d_smoother = d_psmoother = None

    def dynamax(fn, p, y):
        if fn is None:
            return None, None
        return both(lambda q, e: fn(dynamax_lgssm_params(q, e.dtype), e), p, y)

    for initial_var, label in ((1.0, "P0=I"), (1e7, "P0=1e7 I")):
        p, y = lgssm_problem(num_timesteps, initial_var)
        model = ssmjax.LGSSM(initial_mean=p["m0"], initial_cov=p["P0"], transition_matrix=p["A"],
                             transition_cov=p["Q"], emission_matrix=p["C"], emission_cov=p["R"])
        for method, parallel, dfn in (("standard", False, d_smoother), ("sqrt", False, None),
                                      ("standard", True, d_psmoother)):
            name = f"rts_smoother {label} " + ("parallel" if parallel else method)
            f32, f64 = both(lambda m, e: ssmjax.rts_smoother(m, e, method=method, parallel=parallel), model, y)
            d32, d64 = dynamax(dfn, p, y)
            for field, dfield, what in (("filtered_means", "filtered_means", "filtered means"),
                                        ("smoothed_means", "smoothed_means", "smoothed means"),
                                        ("smoothed_covs", "smoothed_covariances", "smoothed covs"),
                                        ("marginal_loglik", "marginal_loglik", "log-likelihood (rel)")):
                rows.append(dict(function=name, output=what,
                                 ssmjax=err_rel(getattr(f32, field), getattr(f64, field)),
                                 dynamax=d32 and err_rel(getattr(d32, dfield), getattr(d64, dfield))))
        if initial_var == 1.0:
            f32, f64 = both(lambda m, e: ssmjax.lgssm_forecast(m, e, 20), model, y)
            rows.append(dict(function="lgssm_forecast 20 steps", output="emission means",
                             ssmjax=err_rel(f32.emission_means, f64.emission_means), dynamax=None))
            h32, h64 = both(lambda m, e: ssmjax.lgssm_posterior_entropy(ssmjax.rts_smoother(m, e)), model, y)
            rows.append(dict(function="lgssm_posterior_entropy", output="entropy (rel)", ssmjax=err_rel(h32, h64),
                             dynamax=None))
            x = np.asarray(ssmjax.rts_smoother(model, y).smoothed_means)
            j32, j64 = both(lambda m, s, e: ssmjax.lgssm_log_joint(m, s, e), model, x, y)
            rows.append(dict(function="lgssm_log_joint", output="log density (rel)", ssmjax=err_rel(j32, j64),
                             dynamax=None))
    p, y = lgssm_problem(num_timesteps, 1.0)
    model = ssmjax.LGSSM(initial_mean=p["m0"], initial_cov=p["P0"], transition_matrix=p["A"], transition_cov=p["Q"],
                         emission_matrix=p["C"], emission_cov=p["R"], diffuse=True)
    f32, f64 = both(lambda m, e: ssmjax.rts_smoother(m, e), model, y)
    for field, what in (("smoothed_means", "smoothed means"), ("smoothed_covs", "smoothed covs"),
                        ("marginal_loglik", "log-likelihood (rel)")):
        rows.append(dict(function="rts_smoother, exact diffuse prior", output=what,
                         ssmjax=err_rel(getattr(f32, field), getattr(f64, field)), dynamax=None))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=10_000)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "float32.json"))
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from _common import record, write_record

    rows = hmm_rows(args.timesteps) + lgssm_rows(args.timesteps)
    for r in rows:
        print(r)

    write_record(args.out, record(("jax", "jaxlib", "equinox", "numpy", "dynamax"), dict(timesteps=args.timesteps),
                                  rows, device=str(jax.devices()[0])))


if __name__ == "__main__":
    main()
