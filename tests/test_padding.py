"""``ssmjax.pad`` / ``ssmjax.unpad``: ragged sequences to a padded batch and back, against a loop
written out here, and the batch they give equals the sequences one at a time in a fit's E-step."""

from __future__ import annotations

import numpy as np
import pytest

import ssmjax


def _sequences(rng, lengths, trailing=(2,), dtype=np.float64):
    return [rng.normal(size=(n,) + trailing).astype(dtype) for n in lengths]


def test_pad_from_a_list_and_from_hmmlearns_layout_and_back():
    rng = np.random.default_rng(0)
    seqs = _sequences(rng, [4, 1, 3], dtype=np.float32)
    batch, lengths = ssmjax.pad(seqs)
    assert batch.shape == (3, 4, 2) and batch.dtype == np.float32
    assert lengths.dtype == np.int32 and lengths.tolist() == [4, 1, 3]
    for b, s in enumerate(seqs):  # real steps copied, padding NaN
        np.testing.assert_array_equal(batch[b, : len(s)], s)
        assert np.all(np.isnan(batch[b, len(s):]))
    X = np.concatenate(seqs)
    same, same_lengths = ssmjax.pad(X, [4, 1, 3])
    np.testing.assert_array_equal(same, batch)
    np.testing.assert_array_equal(same_lengths, lengths)
    for got, want in zip(ssmjax.unpad(batch, lengths), seqs):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ssmjax.unpad(batch, lengths, concatenate=True), X)


def test_integer_data_pads_with_zero_and_fill_is_kept():
    batch, _ = ssmjax.pad([np.array([3, 1], np.int32), np.array([2], np.int32)])
    assert batch.dtype == np.int32 and batch.tolist() == [[3, 1], [2, 0]]
    filled, _ = ssmjax.pad([np.ones(2), np.ones(1)], fill=-7.0)
    assert filled.tolist() == [[1.0, 1.0], [1.0, -7.0]]


def test_a_padded_batch_fits_as_its_sequences_do():
    """The batch from ``pad`` gives the summed log-likelihood of the sequences one at a time."""
    rng = np.random.default_rng(1)
    counts = [rng.poisson(4.0, size=(n, 1)).astype(float) for n in (30, 12, 21)]
    hmm = ssmjax.HMM(np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.2, 0.8]]),
                     ssmjax.PoissonEmissions(rates=np.array([[2.0], [6.0]])))
    batch, lengths = ssmjax.pad(counts)
    total = sum(float(hmm.marginal_loglik(c)) for c in counts)
    np.testing.assert_allclose(float(hmm.log_likelihood(batch, lengths=lengths)), total, rtol=1e-12)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`sequences` must hold at least one sequence"):
        ssmjax.pad([])
    with pytest.raises(ValueError, match=r"equal trailing shapes; got shapes \[\(2, 2\), \(2, 3\)\]"):
        ssmjax.pad([np.ones((2, 2)), np.ones((2, 3))])
    with pytest.raises(ValueError, match="needs `lengths`"):
        ssmjax.pad(np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"`lengths` must sum to the number of steps in `sequences` \(5\); got lengths summing to 4"):
        ssmjax.pad(np.ones((5, 2)), [3, 1])
    with pytest.raises(ValueError, match="`lengths` must all be at least 1"):
        ssmjax.pad(np.ones((5, 2)), [5, 0])
    with pytest.raises(ValueError, match="`lengths` must hold integers"):
        ssmjax.pad(np.ones((5, 2)), [2.5, 2.5])
    with pytest.raises(ValueError, match="each at most T = 3"):
        ssmjax.unpad(np.ones((2, 3)), [3, 4])
