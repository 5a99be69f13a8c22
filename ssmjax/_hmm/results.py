"""Result types of HMM inference: what :func:`ssmjax.hmm_filter` and :func:`ssmjax.hmm_smoother` return."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class HMMFilterResult(eqx.Module):
    r"""Output of :func:`ssmjax.hmm_filter`.

    Attributes:
        marginal_loglik: :math:`\log p(y_{0:L-1})` (real steps only), shape ().
        filtered_probs: :math:`p(z_t \mid y_{0:t})`, shape (T, K).
        predicted_probs: :math:`p(z_t \mid y_{0:t-1})`; ``predicted_probs[0]`` is
            ``initial_probs``, shape (T, K).

    At padded steps ``t >= length`` both fields repeat ``filtered_probs[length-1]``.
    """

    marginal_loglik: Float[Array, ""]
    filtered_probs: Float[Array, "T K"]
    predicted_probs: Float[Array, "T K"]


class HMMPosterior(eqx.Module):
    r"""Output of :func:`ssmjax.hmm_smoother`: the filter's fields plus smoothed ones.

    Attributes:
        marginal_loglik: :math:`\log p(y_{0:L-1})`, shape ().
        filtered_probs: :math:`p(z_t \mid y_{0:t})`, shape (T, K).
        predicted_probs: :math:`p(z_t \mid y_{0:t-1})`, shape (T, K).
        smoothed_probs: :math:`p(z_t \mid y_{0:L-1})`, shape (T, K).
        expected_transitions: :math:`\sum_{t=0}^{L-2} \xi_t` with
            :math:`\xi_t(i, j) = p(z_t = i, z_{t+1} = j \mid y_{0:L-1})`, shape (K, K).
            Also (K, K) for a time-varying ``transition_matrix``: the sum over
            time of the two-slice marginals (use :func:`ssmjax.hmm_two_slice_marginals`
            for the per-step ones).

    At padded steps ``t >= length`` the per-step fields repeat ``filtered_probs[length-1]``
    (which equals ``smoothed_probs[length-1]``); padded pairs add nothing to
    ``expected_transitions``.
    """

    marginal_loglik: Float[Array, ""]
    filtered_probs: Float[Array, "T K"]
    predicted_probs: Float[Array, "T K"]
    smoothed_probs: Float[Array, "T K"]
    expected_transitions: Float[Array, "K K"]


def posterior_treedef():
    """The tree structure of :class:`HMMPosterior`, for results assembled from batched fields (no
    (T, K) annotation to check against)."""
    one, row = jnp.zeros(()), jnp.zeros((1, 1))
    return jax.tree.structure(HMMPosterior(one, row, row, row, row))
