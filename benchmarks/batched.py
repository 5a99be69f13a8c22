"""Batched throughput and float32 accuracy: many sequences at once, ssmjax vs dynamax, one process.

What a user who batch-trains on a GPU runs: ``jax.jit(jax.vmap(...))`` over B sequences.

* LGSSM: B = 4096, T = 1000, Dx = 4, Dy = 2 (the issue's GPU setting), float32. Kalman filter
  and RTS smoother, sequential (``lax.scan``) and parallel-in-time (``parallel=True``), plus a
  ragged batch (lengths uniform in [T/2, T], padding NaN, ``length=``).
* HMM: B = 4096, T = 1000, K in {16, 64}, float32: filter and smoother, sequential and (K = 16)
  parallel.

Each call is jitted and warmed (compile time reported), timed with ``block_until_ready``, median
of repeats; throughput is sequence-steps per second (B T / time). dynamax runs the same problems
(vmap of its functions) where it is installed. Value checks are off for ssmjax (they are a
separate, optional pass).

Accuracy: every library's float32 result on the first ``--check`` sequences against an
independent float64 NumPy reference (textbook Kalman filter / RTS smoother with explicit solves;
scaled forward-backward for the HMM): relative error ``||out - ref|| / ||ref||`` of the
smoothed means and covariances (posterior marginals for the HMM) and of the log-likelihood. On
GPUs this shows whether float32 products ran in full precision or with TF32 passes.

    python benchmarks/batched.py [--device cpu|gpu] [--batch B] [--num-timesteps T] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--batch", default="4096", help="comma-separated batch sizes")
    ap.add_argument("--num-timesteps", type=int, default=1000)
    ap.add_argument("--dims", default="4x2", help="comma-separated LGSSM sizes DxxDy, e.g. 4x2,8x4")
    ap.add_argument("--num-states", default="16,64", help="comma-separated HMM state counts ('' for none)")
    ap.add_argument("--models", default="lgssm,hmm", help="comma-separated subset of lgssm,hmm,training (time-varying LGSSM and value_and_grad rows at their own B, T)")
    ap.add_argument("--hmm-sequential-only", action="store_true", help="skip the parallel HMM rows")
    ap.add_argument("--sequential-only", action="store_true", help="skip every parallel-in-time row (and the ragged LGSSM rows)")
    ap.add_argument("--check", type=int, default=4, help="sequences checked against the float64 reference")
    ap.add_argument("--quick", action="store_true", help="5 repeats instead of 11")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "batched.json"))
    return ap.parse_args()


ARGS = _parse()
os.environ.setdefault("JAX_PLATFORMS", "cuda" if ARGS.device == "gpu" else "cpu")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import ssmjax  # noqa: E402
from _common import compile_and_time, dynamax_lgssm_params, installed_versions, write_record  # noqa: E402

REPEATS = 5 if ARGS.quick else 11


def _timed(fn, *args):
    return compile_and_time(fn, *args, repeats=REPEATS)


def _rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# ----------------------------------------------------------------------------- LGSSM


def _lgssm_problem(B, T, dx, dy, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
    p = dict(
        m0=np.zeros(dx), P0=np.eye(dx), A=0.95 * q, Q=0.1 * np.eye(dx),
        C=rng.normal(size=(dy, dx)) / np.sqrt(dx), R=0.5 * np.eye(dy),
    )
    p = {k: v.astype(np.float32) for k, v in p.items()}
    # B sequences from the model, generated on the host in float64 (independent of ssmjax)
    x = rng.normal(size=(B, dx))
    ys = np.empty((B, T, dy))
    for t in range(T):
        ys[:, t] = x @ p["C"].T.astype(np.float64) + rng.normal(size=(B, dy)) * np.sqrt(0.5)
        x = x @ p["A"].T.astype(np.float64) + rng.normal(size=(B, dx)) * np.sqrt(0.1)
    lengths = rng.integers(T // 2, T + 1, size=B)
    return p, ys.astype(np.float32), lengths.astype(np.int32)


def _kalman_reference(p, y):
    """float64 textbook Kalman filter + RTS smoother for one sequence: (loglik, means, covs)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    A, Q, C, R = p["A"], p["Q"], p["C"], p["R"]
    T, dy = y.shape
    m, P = p["m0"], p["P0"]
    fm, fP, pm, pP, ll = [], [], [], [], 0.0
    for t in range(T):
        pm.append(m)
        pP.append(P)
        S = C @ P @ C.T + R
        r = y[t] - C @ m
        K = np.linalg.solve(S, C @ P).T
        ll += -0.5 * (r @ np.linalg.solve(S, r) + np.linalg.slogdet(S)[1] + dy * np.log(2 * np.pi))
        m, P = m + K @ r, P - K @ S @ K.T
        fm.append(m)
        fP.append(P)
        m, P = A @ m, A @ P @ A.T + Q
    sm, sP = [fm[-1]], [fP[-1]]
    for t in range(T - 2, -1, -1):
        J = np.linalg.solve(pP[t + 1], A @ fP[t]).T
        sm.insert(0, fm[t] + J @ (sm[0] - pm[t + 1]))
        sP.insert(0, fP[t] + J @ (sP[0] - pP[t + 1]) @ J.T)
    return ll, np.array(sm), np.array(sP)


def _ssmjax_lgssm(p, parallel, ragged, smoother):
    model = ssmjax.LGSSM(
        initial_mean=p["m0"], initial_cov=p["P0"], transition_matrix=p["A"], transition_cov=p["Q"],
        emission_matrix=p["C"], emission_cov=p["R"],
    )
    fn = ssmjax.rts_smoother if smoother else ssmjax.kalman_filter
    if ragged:
        one = lambda y, n: fn(model, y, length=n, parallel=parallel)  # noqa: E731
        return jax.vmap(one), lambda r: (r.marginal_loglik, getattr(r, "smoothed_means", None), getattr(r, "smoothed_covs", None))
    one = lambda y: fn(model, y, parallel=parallel)  # noqa: E731
    return jax.vmap(one), lambda r: (r.marginal_loglik, getattr(r, "smoothed_means", None), getattr(r, "smoothed_covs", None))


def _dynamax_lgssm(p, parallel, smoother):
    from dynamax.linear_gaussian_ssm import inference as seq
    from dynamax.linear_gaussian_ssm import parallel_inference as par

    params = dynamax_lgssm_params(p)
    lib = par if parallel else seq
    fn = lib.lgssm_smoother if smoother else lib.lgssm_filter
    return jax.vmap(lambda y: fn(params, y)), lambda r: (
        r.marginal_loglik, getattr(r, "smoothed_means", None), getattr(r, "smoothed_covariances", None),
    )


def _lgssm_rows(B, T, dx, dy, check):
    p, ys_np, lengths_np = _lgssm_problem(B, T, dx, dy)
    refs = [_kalman_reference(p, ys_np[i]) for i in range(check)]
    refs_ragged = [_kalman_reference(p, ys_np[i, : lengths_np[i]]) for i in range(check)]
    ys = jax.device_put(ys_np)
    padded = ys_np.copy()
    for i, n in enumerate(lengths_np):
        padded[i, n:] = np.nan
    padded = jax.device_put(padded)
    lengths = jax.device_put(lengths_np)
    rows = []
    cases = []
    for smoother in (False, True):
        for parallel in (False,) if ARGS.sequential_only else (False, True):
            cases.append(("ssmjax", smoother, parallel, False))
            if not ARGS.no_peers:
                cases.append(("dynamax", smoother, parallel, False))
        if not ARGS.sequential_only:
            cases.append(("ssmjax", smoother, False, True))
    for lib, smoother, parallel, ragged in cases:
        try:
            fn, fields = (
                _ssmjax_lgssm(p, parallel, ragged, smoother) if lib == "ssmjax" else _dynamax_lgssm(p, parallel, smoother)
            )
        except ImportError as err:
            print(f"  {lib}: not installed ({err})", flush=True)
            continue
        args = (padded, lengths) if ragged else (ys,)
        try:
            compile_s, run_s, out = _timed(fn, *args)
        except Exception as err:  # a peer that fails on this JAX/device: report and go on
            print(f"  {lib} {'smoother' if smoother else 'filter'} parallel={parallel}: failed: {err!r:.300}", flush=True)
            continue
        loglik, sm, sc = fields(out)
        errs = {}
        ref_list = refs_ragged if ragged else refs
        errs["loglik"] = max(_rel(np.asarray(loglik)[i], r[0]) for i, r in enumerate(ref_list))
        if smoother:
            n = [int(lengths_np[i]) if ragged else T for i in range(check)]
            errs["smoothed_means"] = max(_rel(np.asarray(sm)[i, : n[i]], r[1]) for i, r in enumerate(ref_list))
            errs["smoothed_covs"] = max(_rel(np.asarray(sc)[i, : n[i]], r[2]) for i, r in enumerate(ref_list))
        steps = float(lengths_np.sum()) if ragged else float(B * T)
        row = dict(
            model="lgssm", library=lib, algorithm="smoother" if smoother else "filter",
            variant=("ragged " if ragged else "") + ("parallel" if parallel else "sequential"),
            B=B, T=T, Dx=dx, Dy=dy, compile_s=compile_s, median_s=run_s, steps_per_s=steps / run_s,
            max_rel_error=errs,
        )
        rows.append(row)
        _print(row)
        if not (parallel or ragged):
            # what a training loop keeps: the log-likelihood and the means (under jit the
            # (B, T, Dx, Dx) covariance outputs are then never written)
            def kept(*a, fn=fn, smoother=smoother):
                r = fn(*a)
                means = (r.smoothed_means if smoother else r.filtered_means)
                return r.marginal_loglik, means

            kept_c, kept_s, _ = _timed(kept, *args)
            kept_row = dict(row, variant="loglik + means", compile_s=kept_c, median_s=kept_s, steps_per_s=steps / kept_s,
                            max_rel_error={})
            rows.append(kept_row)
            _print(kept_row)
    return rows


# ----------------------------------------------------------------------------- HMM


def _hmm_problem(B, T, K, seed=0):
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(K))
    A = 0.8 * np.eye(K) + 0.2 * rng.dirichlet(np.ones(K), K)
    ll = rng.normal(size=(B, T, K)) * 2.0
    return pi.astype(np.float32), A.astype(np.float32), ll.astype(np.float32)


def _hmm_reference(pi, A, ll):
    """float64 scaled forward-backward for one sequence: (loglik, smoothed probabilities)."""
    pi, A, ll = (np.asarray(v, np.float64) for v in (pi, A, ll))
    T, K = ll.shape
    lik = np.exp(ll - ll.max(1, keepdims=True))
    alpha = np.empty((T, K))
    c = np.empty(T)
    pred = pi
    for t in range(T):
        a = pred * lik[t]
        c[t] = a.sum()
        alpha[t] = a / c[t]
        pred = alpha[t] @ A
    beta = np.ones(K)
    post = np.empty((T, K))
    post[-1] = alpha[-1]
    for t in range(T - 2, -1, -1):
        beta = A @ (lik[t + 1] * beta) / c[t + 1]
        post[t] = alpha[t] * beta
    loglik = np.log(c).sum() + ll.max(1).sum()
    return loglik, post / post.sum(1, keepdims=True)


def _hmm_rows(B, T, K, check):
    pi_np, A_np, ll_np = _hmm_problem(B, T, K)
    refs = [_hmm_reference(pi_np, A_np, ll_np[i]) for i in range(check)]
    pi, A, ll = (jax.device_put(v) for v in (pi_np, A_np, ll_np))
    rows = []
    for smoother in (False, True):
        # the parallel versions hold B T K^2 numbers (67 GB at K = 64): K <= 16 only
        sequential_only = ARGS.hmm_sequential_only or ARGS.sequential_only
        for parallel in (False, True) if K <= 16 and not sequential_only else (False,):
            for lib in ("ssmjax",) + (() if ARGS.no_peers else ("dynamax",)):
                if lib == "ssmjax":
                    f = ssmjax.hmm_smoother if smoother else ssmjax.hmm_filter
                    fn = jax.vmap(lambda l, f=f, parallel=parallel: f(pi, A, l, parallel=parallel))
                    post = (lambda r: r.smoothed_probs) if smoother else None
                else:
                    try:
                        import dynamax.hidden_markov_model as dhmm
                    except ImportError as err:
                        print(f"  dynamax: not installed ({err})", flush=True)
                        continue
                    f = {
                        (False, False): dhmm.hmm_filter, (False, True): dhmm.parallel_hmm_filter,
                        (True, False): dhmm.hmm_smoother, (True, True): dhmm.parallel_hmm_smoother,
                    }[(smoother, parallel)]
                    fn = jax.vmap(lambda l, f=f: f(pi, A, l))
                    post = (lambda r: r.smoothed_probs) if smoother else None
                try:
                    compile_s, run_s, out = _timed(fn, ll)
                except Exception as err:  # a peer that fails on this JAX/device: report and go on
                    print(f"  {lib} K={K} smoother={smoother} parallel={parallel}: failed: {err!r:.300}", flush=True)
                    continue
                errs = {"loglik": max(_rel(np.asarray(out.marginal_loglik)[i], r[0]) for i, r in enumerate(refs))}
                if post is not None:
                    errs["smoothed_probs"] = max(_rel(np.asarray(post(out))[i], r[1]) for i, r in enumerate(refs))
                row = dict(
                    model="hmm", library=lib, algorithm="smoother" if smoother else "filter",
                    variant="parallel" if parallel else "sequential", B=B, T=T, K=K,
                    compile_s=compile_s, median_s=run_s, steps_per_s=B * T / run_s, max_rel_error=errs,
                )
                rows.append(row)
                _print(row)
    return rows


# ----------------------------------------------------------------------------- per-sequence models, training steps


def _timing_row(model, lib, algorithm, variant, size, B, T, fn, *args):
    try:
        compile_s, run_s, _ = _timed(fn, *args)
    except Exception as err:  # a peer that fails on this JAX/device: report and go on
        print(f"  {lib} {algorithm} {variant}: failed: {err!r:.300}", flush=True)
        return []
    row = dict(model=model, library=lib, algorithm=algorithm, variant=variant, B=B, T=T, **size,
               compile_s=compile_s, median_s=run_s, steps_per_s=B * T / run_s, max_rel_error={})
    _print(row)
    return [row]


def _per_sequence_lgssm(p, B, T, seed=1):
    """Per-sequence time-varying transition matrices (B, T-1, Dx, Dx), as a Kalman VAE's network makes them."""
    rng = np.random.default_rng(seed)
    dx = p["A"].shape[0]
    A = p["A"][None, None] + 0.02 * rng.normal(size=(B, T - 1, dx, dx))
    return A.astype(np.float32)


def _training_rows(dx, dy):
    """Time-varying LGSSM smoother (B = 64, T = 1000) and the training steps of the issue's targets:
    ``value_and_grad`` of the summed log-likelihood of a vmapped batch (LGSSM: B = 64, T = 200,
    per-sequence transition matrices; HMM: K = 16, B = 256, T = 1000, w.r.t. the log-likelihoods)."""
    from dynamax.linear_gaussian_ssm import inference as dlin
    import dynamax.hidden_markov_model as dhmm

    rows = []
    size = dict(Dx=dx, Dy=dy)
    for B, T, algorithm in ((64, 1000, "smoother"), (64, 200, "value_and_grad")):
        p, ys_np, _ = _lgssm_problem(B, T, dx, dy)
        A_np = _per_sequence_lgssm(p, B, T)
        ys, A = jax.device_put(ys_np), jax.device_put(A_np)
        A_dyn = jax.device_put(np.concatenate([A_np, A_np[:, -1:]], axis=1))  # dynamax reads T entries
        base = ssmjax.LGSSM(
            initial_mean=p["m0"], initial_cov=p["P0"], transition_matrix=A_np[0], transition_cov=p["Q"],
            emission_matrix=p["C"], emission_cov=p["R"],
        )
        params = dynamax_lgssm_params(p)

        def ours(a, y):
            return ssmjax.rts_smoother(eqx.tree_at(lambda m: m.transition_matrix, base, a), y)

        def theirs(a, y):
            return dlin.lgssm_smoother(params._replace(dynamics=params.dynamics._replace(weights=a)), y)

        if algorithm == "smoother":
            fns = {"ssmjax": jax.vmap(lambda a, y: ours(a, y).smoothed_means),
                   "dynamax": jax.vmap(lambda a, y: theirs(a, y).smoothed_means)}
            args = {"ssmjax": (A, ys), "dynamax": (A_dyn, ys)}
        else:
            def loss(one):
                return lambda a, y: -jnp.sum(jax.vmap(one)(a, y))
            fns = {
                "ssmjax": jax.value_and_grad(loss(lambda a, y: ssmjax.kalman_filter(eqx.tree_at(lambda m: m.transition_matrix, base, a), y).marginal_loglik)),
                "dynamax": jax.value_and_grad(loss(lambda a, y: dlin.lgssm_filter(params._replace(dynamics=params.dynamics._replace(weights=a)), y).marginal_loglik)),
            }
            args = {"ssmjax": (A, ys), "dynamax": (A_dyn, ys)}
        for lib in ("ssmjax",) + (() if ARGS.no_peers else ("dynamax",)):
            rows += _timing_row("lgssm", lib, algorithm, "per-sequence A_t", size, B, T, fns[lib], *args[lib])
    B, T, K = 256, 1000, 16
    pi, A, ll = (jax.device_put(v) for v in _hmm_problem(B, T, K))
    fns = {
        "ssmjax": lambda l: jnp.sum(jax.vmap(lambda x: ssmjax.hmm_filter(pi, A, x).marginal_loglik)(l)),
        "dynamax": lambda l: jnp.sum(jax.vmap(lambda x: dhmm.hmm_filter(pi, A, x).marginal_loglik)(l)),
    }
    for lib in ("ssmjax",) + (() if ARGS.no_peers else ("dynamax",)):
        rows += _timing_row("hmm", lib, "value_and_grad", "sequential", dict(K=K), B, T, jax.value_and_grad(fns[lib]), ll)
    return rows


# ----------------------------------------------------------------------------- report


def _print(row):
    size = f"K={row['K']}" if row["model"] == "hmm" else f"Dx={row['Dx']},Dy={row['Dy']}"
    errs = " ".join(f"{k} {v:.1e}" for k, v in row["max_rel_error"].items())
    print(
        f"  {row['model']:5s} {size:10s} {row['algorithm']:8s} {row['variant']:17s} {row['library']:7s} "
        f"{row['median_s'] * 1e3:9.2f} ms  {row['steps_per_s'] / 1e6:8.1f} M steps/s  "
        f"compile {row['compile_s']:6.2f} s  err {errs}",
        flush=True,
    )


def main():
    ssmjax.set_value_checks(False)
    device = jax.devices()[0]
    T = ARGS.num_timesteps
    models = ARGS.models.split(",")
    rows = []
    for B in [int(b) for b in ARGS.batch.split(",")]:
        check = min(ARGS.check, B)
        print(f"device {device} ({getattr(device, 'device_kind', '')}), B = {B}, T = {T}, float32, repeats {REPEATS}")
        if "lgssm" in models:
            for dims in ARGS.dims.split(","):
                dx, dy = (int(d) for d in dims.split("x"))
                rows += _lgssm_rows(B, T, dx, dy, check)
        for K in [int(k) for k in ARGS.num_states.split(",") if k] if "hmm" in models else []:
            rows += _hmm_rows(B, T, K, check)
    if "training" in models:
        dx, dy = (int(d) for d in ARGS.dims.split(",")[0].split("x"))
        rows += _training_rows(dx, dy)
    record = dict(
        benchmark="batched",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(
            platform=platform.platform(), cpu_count=os.cpu_count(), device=str(device),
            device_kind=getattr(device, "device_kind", None),
        ),
        versions=installed_versions(("jax", "jaxlib", "equinox", "numpy", "dynamax")),
        settings=dict(repeats=REPEATS, dtype="float32", value_checks=False, checked_sequences=ARGS.check),
        results=rows,
    )
    write_record(ARGS.out, record)


if __name__ == "__main__":
    main()
