"""``jax.vmap`` of the HMM filter / smoother / log-likelihood gradient: the batched recursion.

With a model shared by the batch, the custom_vmap rules in :mod:`ssmjax._hmm.rules` run one
loop over time for all sequences (a (B, K) block of messages and one matrix product per step)
instead of a per-sequence recursion. Checked here per sequence against the brute-force oracle
(float64, ragged lengths with NaN padding, structural zeros), against the per-sequence functions
(float32, both sides of the precomputed-emissions switch, an underflow rescue), for gradients
in both orders (``grad(vmap)`` and ``vmap(grad)``, against finite differences and the
per-sequence custom VJP), for the cases that fall back to the per-sequence recursion (a batch of
models, a time-varying matrix, nested vmap), and for the structure of the program (one batched
loop, no per-sequence one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FD_TOLERANCE, assert_allclose, central_difference_grad, random_stochastic_matrix
from test_hmm_oracle import brute_force, filtered_and_predicted

import ssmjax
from ssmjax._hmm import recursion
from ssmjax._hmm import rules as hmm_rules

LENGTHS = np.array([5, 1, 3, 5, 4, 2])  # ragged, a length-1 sequence, two full ones


def _batch(seed, num_states=3, lengths=LENGTHS, num_timesteps=None, zeros=True, time_varying=False):
    rng = np.random.default_rng(seed)
    num_timesteps = num_timesteps or int(max(lengths))
    pi = random_stochastic_matrix(rng, (num_states,), zeros=zeros)
    shape = (num_timesteps - 1, num_states, num_states) if time_varying else (num_states, num_states)
    A = random_stochastic_matrix(rng, shape, zeros=zeros)
    ll = rng.normal(size=(len(lengths), num_timesteps, num_states)) * 2.0
    for b, n in enumerate(lengths):
        ll[b, n:] = np.nan  # padding may hold anything
    return pi, A, ll


def _vmapped(fn, pi, A):
    return jax.jit(jax.vmap(lambda l, n: fn(pi, A, l, length=n)))


@pytest.mark.parametrize("zeros", [False, True])
def test_vmapped_filter_and_smoother_match_brute_force(zeros):
    pi, A, ll = _batch(0, zeros=zeros)
    lengths = jnp.asarray(LENGTHS)
    filt = _vmapped(ssmjax.hmm_filter, pi, A)(jnp.asarray(ll), lengths)
    post = _vmapped(ssmjax.hmm_smoother, pi, A)(jnp.asarray(ll), lengths)
    for b, n in enumerate(LENGTHS):
        ref = brute_force(pi, A, ll[b, :n])
        filtered, predicted = filtered_and_predicted(pi, A, ll[b, :n])
        for out in (filt, post):
            assert_allclose(out.marginal_loglik[b], ref["loglik"])
            assert_allclose(out.filtered_probs[b, :n], filtered)
            assert_allclose(out.predicted_probs[b, :n], predicted)
            # padded rows repeat the last real filtered row
            assert_allclose(out.filtered_probs[b, n:], np.broadcast_to(filtered[-1], (len(ll[b]) - n, 3)))
            assert_allclose(out.predicted_probs[b, n:], np.broadcast_to(filtered[-1], (len(ll[b]) - n, 3)))
        assert_allclose(post.smoothed_probs[b, :n], ref["smoothed"])
        assert_allclose(post.smoothed_probs[b, n:], np.broadcast_to(ref["smoothed"][-1], (len(ll[b]) - n, 3)))
        assert_allclose(post.expected_transitions[b], ref["two_slice"].sum(axis=0))


@pytest.mark.parametrize("num_states", [3, 60])  # B * K = 60, 1200: emissions before / inside the loop
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vmapped_equals_per_sequence(num_states, dtype):
    """Every field of every sequence equals the unbatched call (to round-off), ragged and full."""
    lengths = np.array([60, 17, 60, 1, 33] * 4)
    pi, A, ll = _batch(1, num_states=num_states, lengths=lengths)
    pi, A, ll = (x.astype(dtype) for x in (pi, A, ll))
    for fn in (ssmjax.hmm_filter, ssmjax.hmm_smoother):
        for n in (jnp.asarray(lengths), None):
            data = ll if n is not None else np.nan_to_num(ll)
            if n is None:
                out = jax.jit(jax.vmap(lambda l: fn(pi, A, l)))(jnp.asarray(data))
            else:
                out = _vmapped(fn, pi, A)(jnp.asarray(data), n)
            for b in range(len(lengths)):
                one = fn(pi, A, data[b], length=None if n is None else int(lengths[b]))
                for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(one)):
                    assert_allclose(got[b], want, dtype=dtype, err_msg=f"{fn.__name__} K={num_states} seq {b}")


def test_vmapped_underflow_rescue_per_sequence():
    """A batch (both sides of the precomputed-emissions switch) where one sequence needs the
    underflow-proof pass: each sequence gets its unbatched result."""
    pi = np.array([1.0, 0.0])
    A = np.array([[1.0, 0.0], [0.5, 0.5]])
    rescue = np.array([[0.0, 0.0], [-2000.0, 0.0], [-2000.0, 0.0]])
    plain = np.array([[0.1, -0.3], [-1.0, 0.2], [0.4, 0.0]])
    for size in (2, 1100):  # 2 * 2 entries a step: emissions before the loop; 2200: inside
        batch = np.stack([plain] * (size - 1) + [rescue])
        for fn in (ssmjax.hmm_filter, ssmjax.hmm_smoother):
            out = jax.jit(jax.vmap(lambda l: fn(pi, A, l)))(jnp.asarray(batch))
            for b in (0, size - 1):
                one = fn(pi, A, batch[b])
                for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(one)):
                    assert_allclose(got[b], want)
            assert_allclose(out.marginal_loglik[-1], -4000.0)


def _loglik_sum(pi, A, ll, lengths):
    return jnp.sum(jax.vmap(lambda l, n: ssmjax.hmm_filter(pi, A, l, length=n).marginal_loglik)(ll, lengths))


def test_gradients_grad_of_vmap_and_vmap_of_grad():
    """Gradients of the log-likelihood w.r.t. pi, A and the log-likelihoods through the batched
    custom VJP, in both orders, against central differences of the brute-force oracle (shared
    model: summed over the batch) and the per-sequence custom VJP."""
    from test_hmm_oracle import brute_force_loglik_linear

    pi, A, ll = _batch(2, zeros=False)
    ll = np.where(np.isnan(ll), 0.0, ll)
    lengths = jnp.asarray(LENGTHS)
    grads = jax.jit(jax.grad(_loglik_sum, argnums=(0, 1, 2)))(pi, A, jnp.asarray(ll), lengths)

    def oracle_sum(p, a, l):
        return sum(brute_force_loglik_linear(p, a, l[b, :n]) for b, n in enumerate(LENGTHS))

    assert_allclose(grads[0], central_difference_grad(lambda p: oracle_sum(p, A, ll), pi), **FD_TOLERANCE)
    assert_allclose(grads[1], central_difference_grad(lambda a: oracle_sum(pi, a, ll), A), **FD_TOLERANCE)
    per_seq = jax.vmap(
        jax.grad(lambda p, a, l, n: ssmjax.hmm_filter(p, a, l, length=n).marginal_loglik, argnums=(0, 1, 2)),
        in_axes=(None, None, 0, 0),
    )(pi, A, jnp.asarray(ll), lengths)
    for b, n in enumerate(LENGTHS):
        one = jax.grad(lambda p, a, l: ssmjax.hmm_filter(p, a, l).marginal_loglik, argnums=(0, 1, 2))(
            pi, A, ll[b, :n]
        )
        assert_allclose(grads[2][b, :n], one[2])
        np.testing.assert_array_equal(np.asarray(grads[2][b, n:]), 0.0)
        for got, want in zip((per_seq[0][b], per_seq[1][b], per_seq[2][b, :n]), one):
            assert_allclose(got, want)
        np.testing.assert_array_equal(np.asarray(per_seq[2][b, n:]), 0.0)
    assert_allclose(grads[0], per_seq[0].sum(0))
    assert_allclose(grads[1], per_seq[1].sum(0))


def test_smoother_derivatives_under_vmap():
    """The smoother's values come from the batched recursion, its derivatives (reverse and
    forward mode, both orders) from autodiff of the per-sequence one."""
    pi, A, ll = _batch(3, zeros=False)
    ll = jnp.asarray(np.where(np.isnan(ll), 0.0, ll))
    lengths = jnp.asarray(LENGTHS)
    weights = jnp.asarray(np.random.default_rng(0).normal(size=ll.shape[1:]))

    def objective(a, l, n):
        return jnp.sum(ssmjax.hmm_smoother(pi, a, l, length=n).smoothed_probs * weights)

    grad_of_vmap = jax.grad(lambda a, L: jnp.sum(jax.vmap(objective, (None, 0, 0))(a, L, lengths)), argnums=(0, 1))(A, ll)
    vmap_of_grad = jax.vmap(jax.grad(objective, argnums=(0, 1)), (None, 0, 0))(A, ll, lengths)
    assert_allclose(grad_of_vmap[0], vmap_of_grad[0].sum(0))
    assert_allclose(grad_of_vmap[1], vmap_of_grad[1])
    tangent = jnp.asarray(np.random.default_rng(1).normal(size=ll.shape))
    _, jvp_of_vmap = jax.jvp(lambda L: jax.vmap(objective, (None, 0, 0))(A, L, lengths), (ll,), (tangent,))
    for b, n in enumerate(LENGTHS):
        g = jax.grad(objective, argnums=(0, 1))(A, ll[b], n)
        assert_allclose(vmap_of_grad[0][b], g[0])
        assert_allclose(vmap_of_grad[1][b], g[1])
        _, want = jax.jvp(lambda l: objective(A, l, n), (ll[b],), (tangent[b],))
        assert_allclose(jvp_of_vmap[b], want)


@pytest.mark.parametrize("case", ["time_varying", "batched_model", "nested"])
def test_fallback_cases_match_per_sequence(case):
    """A time-varying matrix or a batch of models runs the per-sequence recursion under vmap;
    a nested vmap runs the batched one inside the outer batch. Results as unbatched."""
    pi, A, ll = _batch(4, time_varying=case == "time_varying")
    lengths = jnp.asarray(LENGTHS)
    for fn in (ssmjax.hmm_filter, ssmjax.hmm_smoother):
        if case == "batched_model":
            As = np.stack([A, A[::-1], A, A[:, ::-1], A, A])
            As = As / As.sum(-1, keepdims=True)
            out = jax.vmap(lambda a, l, n: fn(pi, a, l, length=n))(jnp.asarray(As), jnp.asarray(ll), lengths)
            models = [As[b] for b in range(len(LENGTHS))]
        elif case == "nested":
            L = jnp.asarray(ll).reshape(2, 3, *ll.shape[1:])
            out = jax.vmap(jax.vmap(lambda l, n: fn(pi, A, l, length=n)))(L, lengths.reshape(2, 3))
            out = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)
            models = [A] * len(LENGTHS)
        else:
            out = jax.vmap(lambda l, n: fn(pi, A, l, length=n))(jnp.asarray(ll), lengths)
            models = [A] * len(LENGTHS)
        for b, n in enumerate(LENGTHS):
            one = fn(pi, models[b], ll[b], length=int(n))
            for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(one)):
                assert_allclose(got[b], want, err_msg=f"{case} {fn.__name__} seq {b}")


def _subjaxprs(eqn):
    """The jaxprs in an equation's parameters (loop bodies, branches, called functions)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _loops(jaxpr, inside_cond=False):
    """``(loop equation, inside a cond)`` for every scan / while loop of a (closed) jaxpr, recursively."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("scan", "while"):
            yield eqn, inside_cond
        for sub in _subjaxprs(eqn):
            yield from _loops(sub, inside_cond or eqn.primitive.name == "cond")


def _body_eqns(loop):
    for sub in _subjaxprs(loop):
        for eqn in sub.eqns:
            yield eqn
            for inner in _subjaxprs(eqn):
                yield from inner.eqns


@pytest.mark.parametrize("num_states", [4, 12])
@pytest.mark.parametrize("what", ["filter", "smoother", "gradient"])
def test_vmap_runs_one_batched_recursion(what, num_states):
    """The vmapped program's recursions advance the whole batch: loops over time that carry the
    (B, T, K) output buffers (plain vmap of the per-sequence scan stacks its outputs instead) and,
    above ``recursion._FUSED_BLOCK_MAX_STATES`` states, take one matrix product of a (B, K) block a
    step, with no (B, K, K) intermediate (what the per-sequence recursion's fused products become
    under plain vmap). Each comes twice (with and without padding masks, one conditional picks);
    any other loop is inside a conditional (the underflow rescue)."""
    num_seq, num_timesteps = 7, 11
    fused = num_states <= recursion._FUSED_BLOCK_MAX_STATES
    pi, A, ll = _batch(5, num_states=num_states, lengths=np.full(num_seq, num_timesteps))
    ll = jnp.asarray(ll)
    if what == "gradient":
        fn = jax.grad(lambda L: jnp.sum(jax.vmap(lambda l: ssmjax.hmm_filter(pi, A, l).marginal_loglik)(L)))
    else:
        f = ssmjax.hmm_filter if what == "filter" else ssmjax.hmm_smoother
        fn = jax.vmap(lambda l: f(pi, A, l))
    jaxpr = jax.make_jaxpr(fn)(ll).jaxpr
    block, buffer = (num_seq, num_states), (num_seq, num_timesteps, num_states)

    def batched(loop):
        eqns = list(_body_eqns(loop))
        products = [e for e in eqns if e.primitive.name == "dot_general"]
        shapes = {tuple(v.aval.shape) for e in eqns for v in e.outvars}
        carries = {tuple(v.aval.shape) for v in loop.outvars}
        return buffer in carries and (
            fused
            or (
                any(tuple(e.invars[0].aval.shape) == block for e in products)
                and (num_seq, num_states, num_states) not in shapes
            )
        )

    loops = list(_loops(jaxpr))
    recursions = [loop for loop, _ in loops if batched(loop)]
    expected = {"filter": 1, "smoother": 2, "gradient": 2}[what]  # forward (+ backward)
    assert len(recursions) >= 2 * expected, what
    assert all(in_cond for loop, in_cond in loops if not batched(loop)), what


def test_e_step_and_vmap_share_the_recursion():
    """fit_em's batched E-step statistics equal the sums of the vmapped smoother's outputs
    (both layouts of the E-step: state-major up to 8 states, rows beyond)."""
    for num_states in (3, 12):
        pi, A, ll = _batch(6, num_states=num_states, zeros=False)
        lengths = jnp.asarray(LENGTHS)
        valid = jnp.arange(ll.shape[1])[:, None] < lengths[None, :]
        smoothed, expected, loglik = jax.jit(hmm_rules.batch_smoother_stats)(
            pi, A, jnp.transpose(jnp.asarray(ll), (1, 2, 0)), valid
        )
        post = _vmapped(ssmjax.hmm_smoother, pi, A)(jnp.asarray(ll), lengths)
        assert_allclose(loglik, post.marginal_loglik.sum())
        assert_allclose(expected, post.expected_transitions.sum(0))
        want = jnp.where(valid.T[:, :, None], post.smoothed_probs, 0.0)
        assert_allclose(smoothed, jnp.swapaxes(want, 0, 1))
