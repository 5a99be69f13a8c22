"""GaussianHMM.fit through ssmjax.estimators against hmmlearn's, on benchmarks/fit.py's problem.

The Gaussian HMM of fit.py (K=5 states, D=3, B=100 sequences of T=1000, 50 EM iterations, full
covariances) in hmmlearn's layout: one (B*T, D) array and ``lengths``. Both estimators start from the
same parameters (``init_params=""``), with hmmlearn's priors and ``min_covar`` off so that both run
plain EM, and run exactly 50 iterations (``tol=None`` here, ``tol=-inf`` for hmmlearn). ssmjax runs in
float32 (JAX's default); hmmlearn in float64. The estimator is timed on its first call (compilation
included) and on a second call with equal shapes (compiled), beside ``ssmjax.fit_em`` on the padded
batch, to show what the scikit-learn layer adds; the final log-likelihoods are both evaluated by the
ssmjax estimator's ``score`` (float32).

    python benchmarks/estimators.py            # full sizes
    python benchmarks/estimators.py --quick    # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np

from _common import record, write_record
from fit import simulate_gaussian_hmm


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "estimators.json"))
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", False)
    from hmmlearn import hmm as hl

    import ssmjax
    from ssmjax.estimators import GaussianHMM

    K, D = 5, 3
    B, T, iters = (20, 200, 20) if args.quick else (100, 1000, 50)
    ys = simulate_gaussian_hmm(np.random.default_rng(0), K, D, B, T).astype(np.float32)
    X, lengths = ys.reshape(-1, D), [T] * B
    init = ssmjax.HMM.from_data(ys, K, "gaussian", key=jax.random.key(1))
    start = dict(startprob_=np.asarray(init.initial_probs, np.float64), transmat_=np.asarray(init.transition_matrix, np.float64),
                 means_=np.asarray(init.emissions.means, np.float64), covars_=np.asarray(init.emissions.covs, np.float64))

    def ours():
        est = GaussianHMM(K, "full", min_covar=0.0, covars_prior=0.0, covars_weight=0.0, n_iter=iters, tol=None,
                          init_params="")
        for name, value in start.items():
            setattr(est, name, value)
        est.fit(X, lengths)
        jax.block_until_ready(est.model_)
        return est

    def direct():
        fitted, _, _ = ssmjax.fit_em(init, ys, max_iters=iters, tol=None)
        return jax.block_until_ready(fitted)

    def theirs():
        est = hl.GaussianHMM(K, "full", min_covar=0.0, covars_prior=0.0, covars_weight=0.0, n_iter=iters,
                             tol=-np.inf, init_params="")
        for name, value in start.items():
            setattr(est, name, value)
        return est.fit(X.astype(np.float64), lengths)

    fitted, first = timed(ours)
    _, second = timed(ours)
    _, direct_first = timed(direct)
    _, direct_second = timed(direct)
    reference, hmmlearn_s = timed(theirs)
    scorer = copy.deepcopy(fitted)  # hmmlearn's parameters in a fitted estimator, scored the same way
    for name in start:
        setattr(scorer, name, getattr(reference, name))
    rows = [
        dict(library="ssmjax.estimators", first_call_s=first, compiled_s=second, final_loglik=fitted.score(X, lengths)),
        dict(library="ssmjax.fit_em", first_call_s=direct_first, compiled_s=direct_second, final_loglik=None),
        dict(library="hmmlearn", first_call_s=hmmlearn_s, compiled_s=hmmlearn_s, final_loglik=scorer.score(X, lengths)),
    ]
    settings = dict(K=K, D=D, B=B, T=T, iters=iters, covariance_type="full", dtype="float32 (hmmlearn float64)",
                    quick=args.quick)
    print(f"GaussianHMM.fit  {settings}")
    print(f"{'library':<20}{'first call s':>14}{'compiled s':>12}{'final loglik':>16}{'hmmlearn / this':>17}")
    for row in rows:
        loglik = "" if row["final_loglik"] is None else f"{row['final_loglik']:.1f}"
        print(f"{row['library']:<20}{row['first_call_s']:>14.2f}{row['compiled_s']:>12.2f}{loglik:>16}"
              f"{hmmlearn_s / row['first_call_s']:>16.1f}x")
    write_record(args.out, record(("jax", "jaxlib", "hmmlearn", "scikit-learn", "numpy"), settings, rows,
                                 device=str(jax.devices()[0])))


if __name__ == "__main__":
    main()
