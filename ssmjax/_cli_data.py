"""Reading sequence data for the command line: CSV and .npy into a padded batch.

CSV: a header row, then one row per time step. An optional sequence-id column
splits the rows into sequences (rows of one sequence must be contiguous, in time
order). The emission columns are ``--columns`` or, by default, every column but
the id column. Empty cells (and ``nan``/``NA``) are missing values.

.npy: ``(T,)``, ``(T, D)`` or ``(B, T, D)``. In a ``(B, T, D)`` array, trailing
all-NaN rows of a sequence are padding (they set that sequence's length).

Every problem raises :class:`DataError` with one line naming the file and, where
it applies, the row and column.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

import numpy as np

_MISSING = {"", "nan", "na", "n/a", "null", "none"}


class DataError(ValueError):
    """A problem with an input file; the message is one line naming file, row and column."""


@dataclass
class SequenceData:
    """A padded batch: ``values`` (B, T, D) with NaN padding, ``lengths`` (B,), ``ids``, ``columns``."""

    values: np.ndarray
    lengths: np.ndarray
    ids: list[str]
    columns: list[str]
    path: str
    source_rows: np.ndarray | None = None  # (B, T) file row of each step (CSV only)

    def locate(self, b: int, t: int) -> str:
        """Where sequence ``b``, step ``t`` came from (for messages): the file row for a CSV."""
        if self.source_rows is not None:
            return f"row {int(self.source_rows[b, t])}"
        return f"sequence {self.ids[b]!r}, step {t}"


def _parse(value: str, path: str, row: int, column: str) -> float:
    text = value.strip()
    if text.lower() in _MISSING:
        return math.nan
    try:
        number = float(text)
    except ValueError:
        raise DataError(f"{path}, row {row}, column {column!r}: cannot parse {value!r} as a number") from None
    if math.isinf(number):
        raise DataError(f"{path}, row {row}, column {column!r}: {value.strip()!r} is not a finite number "
                        "(leave the cell empty for a missing value)")
    return number


def read_csv(path: str, *, columns: list[str] | None = None, id_column: str | None = "sequence") -> SequenceData:
    """Read a CSV file of one or several sequences (see the module docstring)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: the file is empty (expected a header row)") from None
        rows = list(reader)
    if len(set(header)) != len(header):
        raise DataError(f"{path}, row 1: duplicate column names in the header {header}")
    use_id = id_column is not None and id_column in header
    if columns is None:
        columns = [h for h in header if not (use_id and h == id_column)]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}, row 1: missing column(s) {missing}; the header has {header}")
    if not columns:
        raise DataError(f"{path}, row 1: no emission columns (the header has {header})")
    idx = [header.index(c) for c in columns]
    id_idx = header.index(id_column) if use_id else None

    seqs: dict[str, list[list[float]]] = {}
    row_numbers: dict[str, list[int]] = {}
    order: list[str] = []
    last = None
    for i, row in enumerate(rows, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}, row {i}: {len(row)} fields, but the header has {len(header)}")
        sid = row[id_idx].strip() if id_idx is not None else "0"
        if sid != last:
            if sid in seqs:
                raise DataError(f"{path}, row {i}, column {id_column!r}: rows of sequence {sid!r} are not contiguous")
            seqs[sid] = []
            row_numbers[sid] = []
            order.append(sid)
            last = sid
        seqs[sid].append([_parse(row[j], path, i, header[j]) for j in idx])
        row_numbers[sid].append(i)
    if not order:
        raise DataError(f"{path}: no data rows after the header")
    lengths = np.array([len(seqs[s]) for s in order])
    values = np.full((len(order), int(lengths.max()), len(columns)), np.nan)
    source_rows = np.zeros(values.shape[:2], dtype=np.int64)
    for b, s in enumerate(order):
        values[b, : lengths[b]] = np.asarray(seqs[s])
        source_rows[b, : lengths[b]] = row_numbers[s]
    return SequenceData(values, lengths, order, list(columns), path, source_rows)


def read_npy(path: str) -> SequenceData:
    """Read a ``.npy`` array ``(T,)``, ``(T, D)`` or ``(B, T, D)``."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path}: not a numeric .npy array ({err})") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{path}: expected a numeric array; got dtype {arr.dtype}")
    arr = arr.astype(float)
    if arr.ndim == 1:
        arr = arr[None, :, None]
    elif arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim != 3:
        raise DataError(f"{path}: expected shape (T,), (T, D) or (B, T, D); got {arr.shape}")
    infinite = np.argwhere(np.isinf(arr))
    if infinite.size:
        b, t, d = (int(v) for v in infinite[0])
        raise DataError(f"{path}: sequence {b}, step {t}, column {d} holds {arr[b, t, d]} (values must be finite; "
                        "NaN marks a missing value)")
    real = ~np.all(np.isnan(arr), axis=2)  # (B, T): rows with any value
    lengths = np.array([int(np.nonzero(r)[0].max()) + 1 if r.any() else 0 for r in real])
    empty = np.nonzero(lengths == 0)[0]
    if empty.size:
        raise DataError(f"{path}: sequence {int(empty[0])} holds no values (all NaN)")
    return SequenceData(arr, lengths, [str(b) for b in range(arr.shape[0])],
                        [f"y{d}" for d in range(arr.shape[2])], path)


def read_data(path: str, *, columns=None, id_column="sequence") -> SequenceData:
    """Read ``path`` by its extension (``.csv`` or ``.npy``)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        if columns:
            raise DataError(f"{path}: --columns applies to CSV files only")
        return read_npy(path)
    if ext in (".csv", ".txt"):
        return read_csv(path, columns=columns, id_column=id_column)
    raise DataError(f"{path}: unsupported file type {ext!r} (expected .csv or .npy)")


def require_complete(data: SequenceData, what: str) -> None:
    """Raise if any real (unpadded) step has a missing value (HMMs allow none)."""
    for b, n in enumerate(data.lengths):
        bad = np.argwhere(np.isnan(data.values[b, :n]))
        if bad.size:
            t, d = (int(v) for v in bad[0])
            raise DataError(f"{data.path}, {data.locate(b, t)}, column {data.columns[d]!r}: "
                            f"missing value, but {what} allows none")


def require_counts(data: SequenceData, what: str, *, categorical: bool = False) -> None:
    """Raise unless every real value is a non-negative integer."""
    for b, n in enumerate(data.lengths):
        vals = data.values[b, :n]
        bad = np.argwhere((vals < 0) | (vals != np.round(vals)))
        if bad.size:
            t, d = (int(v) for v in bad[0])
            kind = "symbols 0, 1, 2, ..." if categorical else "non-negative integer counts"
            raise DataError(f"{data.path}, {data.locate(b, t)}, column {data.columns[d]!r}: "
                            f"{float(vals[t, d]):g} is not valid; {what} needs {kind}")
