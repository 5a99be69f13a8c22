"""Sequences of different lengths to the padded batch that ssmjax's batched functions take, and back.

:func:`ssmjax.fit_em`, :func:`ssmjax.fit_sgd`, the models' batch methods and ``jax.vmap`` of the
inference functions take a batch ``(B, T, ...)`` with ``lengths`` ``(B,)``: sequence ``b`` fills
the first ``lengths[b]`` steps of row ``b``, and the steps after it are padding, never read
(whatever they hold). :func:`pad` builds that batch from a list of sequences or from hmmlearn's
layout (the sequences one after another, with their lengths); :func:`unpad` undoes it. Both run
on the host (NumPy): the batch is data preparation, done once before the compiled work.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import numpy as np
from jaxtyping import ArrayLike, Int, Shaped

__all__ = ["pad", "unpad"]


def _check_lengths(lengths, total: int | None) -> np.ndarray:
    values = np.asarray(lengths)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"`lengths` must be a non-empty 1-d sequence of ints; got shape {values.shape}.")
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"`lengths` must hold integers; got dtype {values.dtype}.")
    if np.any(values < 1):
        raise ValueError(f"`lengths` must all be at least 1; got {values.tolist()}.")
    if total is not None and int(values.sum()) != total:
        raise ValueError(
            f"`lengths` must sum to the number of steps in `sequences` ({total}); got lengths summing to {int(values.sum())}."
        )
    return values.astype(np.int32)


@typing.no_type_check  # loosely typed inputs (lists too), checked below with errors naming the argument
def pad(
    sequences: Sequence[Shaped[ArrayLike, "_ ..."]] | Shaped[ArrayLike, "N ..."],
    lengths: Int[ArrayLike, " B"] | Sequence[int] | None = None,
    *,
    fill: float | int | None = None,
) -> tuple[Shaped[np.ndarray, "B T ..."], Int[np.ndarray, " B"]]:
    """A padded batch ``(B, max(lengths), ...)`` and its ``lengths`` ``(B,)`` (int32).

    Args:
        sequences: a list of ``B`` arrays ``(L_b, ...)`` with equal trailing shapes; or, with
            ``lengths``, one array ``(N, ...)`` holding the sequences one after another
            (hmmlearn's ``X``).
        lengths: with one array, the length of each sequence (summing to ``N``); with a list,
            None.
        fill: the padding value; default NaN for floating data, 0 for integer or boolean data.

    Returns:
        ``(batch, lengths)``, NumPy arrays.

    Raises:
        ValueError: an empty list, trailing shapes that differ, or ``lengths`` that are not
            positive integers summing to ``N``.

    Example:
        >>> import numpy as np, ssmjax
        >>> batch, lengths = ssmjax.pad([np.ones((3, 2)), np.zeros((2, 2))])
        >>> batch.shape, lengths.tolist()
        ((2, 3, 2), [3, 2])
        >>> X = np.arange(5.0)[:, None]                     # hmmlearn's layout: two sequences, 3 + 2 steps
        >>> ssmjax.pad(X, [3, 2])[0][..., 0].tolist()
        [[0.0, 1.0, 2.0], [3.0, 4.0, nan]]
    """
    if lengths is None:
        if not isinstance(sequences, (list, tuple)):
            raise ValueError("`sequences` given as one array needs `lengths` (the length of each sequence); "
                             "or pass a list of arrays.")
        parts = [np.asarray(s) for s in sequences]
        if not parts:
            raise ValueError("`sequences` must hold at least one sequence; got an empty list.")
        shapes = {p.shape[1:] for p in parts if p.ndim >= 1}
        if any(p.ndim == 0 for p in parts) or len(shapes) != 1:
            raise ValueError(
                "`sequences` must be arrays (L_b, ...) with equal trailing shapes; "
                f"got shapes {[p.shape for p in parts]}."
            )
        lengths = _check_lengths([p.shape[0] for p in parts], None)
        rows = np.concatenate(parts, axis=0)
    else:
        rows = np.asarray(sequences)
        if rows.ndim == 0:
            raise ValueError(f"`sequences` with `lengths` must be one array (N, ...); got a scalar {rows!r}.")
        lengths = _check_lengths(lengths, rows.shape[0])
    if fill is None:
        fill = np.nan if np.issubdtype(rows.dtype, np.floating) else 0
    dtype = np.result_type(rows.dtype, fill)  # a Python scalar fill keeps the data's precision
    batch = np.full((lengths.size, int(lengths.max())) + rows.shape[1:], fill, dtype)
    batch[np.arange(batch.shape[1])[None, :] < lengths[:, None]] = rows
    return batch, lengths


@typing.no_type_check
def unpad(
    batch: Shaped[ArrayLike, "B T ..."],
    lengths: Int[ArrayLike, " B"] | Sequence[int],
    *,
    concatenate: bool = False,
) -> list[np.ndarray] | Shaped[np.ndarray, "N ..."]:
    """The real steps of a padded batch: the inverse of :func:`pad`.

    Args:
        batch: ``(B, T, ...)``, e.g. the smoothed probabilities of a ``jax.vmap`` over a batch.
        lengths: ``(B,)``, each at most ``T``.
        concatenate: return one array ``(sum(lengths), ...)`` (hmmlearn's layout) instead of a
            list of ``B`` arrays ``(L_b, ...)``.

    Example:
        >>> import numpy as np, ssmjax
        >>> batch, lengths = ssmjax.pad([np.arange(3), np.arange(2)])
        >>> [s.tolist() for s in ssmjax.unpad(batch, lengths)], ssmjax.unpad(batch, lengths, concatenate=True).tolist()
        ([[0, 1, 2], [0, 1]], [0, 1, 2, 0, 1])
    """
    batch = np.asarray(batch)
    if batch.ndim < 2:
        raise ValueError(f"`batch` must be (B, T, ...); got shape {batch.shape}.")
    lengths = _check_lengths(lengths, None)
    if lengths.size != batch.shape[0] or int(lengths.max()) > batch.shape[1]:
        raise ValueError(
            f"`lengths` must hold one length per sequence of `batch` ({batch.shape[0]}), each at most T = "
            f"{batch.shape[1]}; got {lengths.tolist()}."
        )
    if concatenate:
        return batch[np.arange(batch.shape[1])[None, :] < lengths[:, None]]
    return [batch[b, :n] for b, n in enumerate(lengths.tolist())]
