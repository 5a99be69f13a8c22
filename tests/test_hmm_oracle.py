"""Brute-force HMM oracle: enumerate all K^T state paths (numpy, float64).

Written independently of ssmjax: no recursion, no scaling, just the joint
probability of every path, then marginalisation.
"""

from __future__ import annotations

import itertools

import numpy as np


def path_log_joints(initial_probs, transition_matrix, log_likelihoods):
    """``(paths (N, T), log p(z, y) (N,))`` over all ``K^T`` paths."""
    pi = np.asarray(initial_probs, np.float64)
    A = np.asarray(transition_matrix, np.float64)
    ll = np.asarray(log_likelihoods, np.float64)
    T, K = ll.shape
    paths = np.array(list(itertools.product(range(K), repeat=T)), dtype=np.int64).reshape(-1, T)
    with np.errstate(divide="ignore"):
        logj = np.log(pi[paths[:, 0]]) + ll[0, paths[:, 0]]
        for t in range(1, T):
            At = A[t - 1] if A.ndim == 3 else A
            logj = logj + np.log(At[paths[:, t - 1], paths[:, t]]) + ll[t, paths[:, t]]
    return paths, logj


def brute_force_loglik_linear(initial_probs, transition_matrix, log_likelihoods):
    """``log sum_z prod pi A exp(ll)`` as a polynomial in ``pi`` and ``A``.

    Defined (and smooth) for any real ``pi``/``A`` near a valid model, so central
    differences work at structural zeros too.
    """
    pi = np.asarray(initial_probs, np.float64)
    A = np.asarray(transition_matrix, np.float64)
    ll = np.asarray(log_likelihoods, np.float64)
    T, K = ll.shape
    paths = np.array(list(itertools.product(range(K), repeat=T)), dtype=np.int64).reshape(-1, T)
    shift = ll.max(axis=1)
    prod = pi[paths[:, 0]] * np.exp(ll[0, paths[:, 0]] - shift[0])
    for t in range(1, T):
        At = A[t - 1] if A.ndim == 3 else A
        prod = prod * At[paths[:, t - 1], paths[:, t]] * np.exp(ll[t, paths[:, t]] - shift[t])
    return np.log(prod.sum()) + shift.sum()


def brute_force_posteriors_linear(initial_probs, transition_matrix, log_likelihoods):
    """``(smoothed (T, K), summed two-slice (K, K))`` from path weights as products.

    Like :func:`brute_force_loglik_linear`, smooth in ``pi``/``A`` at structural zeros.
    """
    pi = np.asarray(initial_probs, np.float64)
    A = np.asarray(transition_matrix, np.float64)
    ll = np.asarray(log_likelihoods, np.float64)
    T, K = ll.shape
    paths = np.array(list(itertools.product(range(K), repeat=T)), dtype=np.int64).reshape(-1, T)
    shift = ll.max(axis=1)
    w = pi[paths[:, 0]] * np.exp(ll[0, paths[:, 0]] - shift[0])
    for t in range(1, T):
        At = A[t - 1] if A.ndim == 3 else A
        w = w * At[paths[:, t - 1], paths[:, t]] * np.exp(ll[t, paths[:, t]] - shift[t])
    w = w / w.sum()
    smoothed = np.zeros((T, K))
    for t in range(T):
        np.add.at(smoothed[t], paths[:, t], w)
    pair_sum = np.zeros((K, K))
    for t in range(T - 1):
        np.add.at(pair_sum, (paths[:, t], paths[:, t + 1]), w)
    return smoothed, pair_sum


def brute_force(initial_probs, transition_matrix, log_likelihoods):
    """Dictionary of exact posterior quantities for one short sequence."""
    ll = np.asarray(log_likelihoods, np.float64)
    T, K = ll.shape
    paths, logj = path_log_joints(initial_probs, transition_matrix, ll)
    top = np.max(logj)
    w = np.exp(logj - top)
    loglik = top + np.log(w.sum())
    post = w / w.sum()
    smoothed = np.zeros((T, K))
    for t in range(T):
        np.add.at(smoothed[t], paths[:, t], post)
    two_slice = np.zeros((max(T - 1, 0), K, K))
    for t in range(T - 1):
        np.add.at(two_slice[t], (paths[:, t], paths[:, t + 1]), post)
    best = int(np.argmax(logj))  # first maximum in lexicographic order
    return dict(
        loglik=loglik,
        smoothed=smoothed,
        two_slice=two_slice,
        viterbi_path=paths[best],
        viterbi_log_prob=logj[best],
        paths=paths,
        path_probs=post,
    )


def brute_force_prefix(initial_probs, transition_matrix, log_likelihoods, t):
    """Brute force on the prefix ``y_{0:t}`` (inclusive)."""
    A = np.asarray(transition_matrix)
    A = A[:t] if A.ndim == 3 else A
    return brute_force(initial_probs, A, np.asarray(log_likelihoods)[: t + 1])


def filtered_and_predicted(initial_probs, transition_matrix, log_likelihoods):
    """``p(z_t | y_{0:t})`` and ``p(z_t | y_{0:t-1})`` by brute force on every prefix."""
    ll = np.asarray(log_likelihoods, np.float64)
    T, K = ll.shape
    filtered = np.zeros((T, K))
    predicted = np.zeros((T, K))
    predicted[0] = initial_probs
    for t in range(T):
        filtered[t] = brute_force_prefix(initial_probs, transition_matrix, ll, t)["smoothed"][t]
        if t >= 1:
            # predicted: the prefix up to t with no information about y_t
            ll_no = ll[: t + 1].copy()
            ll_no[t] = 0.0
            A = np.asarray(transition_matrix)
            A = A[:t] if A.ndim == 3 else A
            predicted[t] = brute_force(initial_probs, A, ll_no)["smoothed"][t]
    return filtered, predicted


def test_oracle_hand_computed_two_steps():
    """The oracle on a 2-state, 2-step model computed by hand."""
    pi = np.array([0.6, 0.4])
    A = np.array([[0.7, 0.3], [0.2, 0.8]])
    lik = np.array([[0.5, 0.1], [0.2, 0.9]])
    joint = pi[:, None] * lik[0][:, None] * A * lik[1][None, :]
    out = brute_force(pi, A, np.log(lik))
    np.testing.assert_allclose(out["loglik"], np.log(joint.sum()), rtol=1e-12)
    np.testing.assert_allclose(out["two_slice"][0], joint / joint.sum(), rtol=1e-12)
    np.testing.assert_allclose(out["smoothed"][0], joint.sum(1) / joint.sum(), rtol=1e-12)
    assert tuple(out["viterbi_path"]) == np.unravel_index(np.argmax(joint), joint.shape)
    np.testing.assert_allclose(out["path_probs"].sum(), 1.0, rtol=1e-12)
