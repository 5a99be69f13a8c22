"""Small real data sets bundled with ssmjax (no downloads).

* :func:`load_earthquakes` -- annual counts of major (magnitude 7 and above)
  earthquakes worldwide, 1900-2006 (107 values), the running example of
  Zucchini & MacDonald, *Hidden Markov Models for Time Series* (2009), also used in
  hmmlearn's Poisson-HMM example.
* :func:`load_nile` -- annual flow volume of the Nile at Aswan, 1871-1970
  (100 values, 10^8 m^3), the local-level example of Durbin & Koopman,
  *Time Series Analysis by State Space Methods* (2nd ed., 2012), chapter 2.
"""

from __future__ import annotations

import csv
from importlib import resources
from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "load_earthquakes", "load_nile"]


class Dataset(NamedTuple):
    """A bundled univariate annual series.

    Attributes:
        years: (T,) int array of calendar years.
        values: (T,) array of observations (int counts or float flows).
        name: short name of the data set.
        source: where the numbers come from.
    """

    years: np.ndarray
    values: np.ndarray
    name: str
    source: str


def _read(filename: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    text = resources.files(__package__).joinpath("data", filename).read_text()
    rows = list(csv.reader(text.splitlines()))[1:]
    years = np.array([int(r[0]) for r in rows], dtype=np.int64)
    values = np.array([r[1] for r in rows], dtype=dtype)
    return years, values


def load_earthquakes() -> Dataset:
    """Annual counts of major (M7+) earthquakes, 1900-2006.

    Returns:
        A :class:`Dataset` with ``years`` (107,) and integer ``values`` (107,).

    Example:
        >>> from ssmjax.datasets import load_earthquakes
        >>> data = load_earthquakes()
        >>> int(data.values.sum()), int(data.years[0]), int(data.years[-1])
        (2072, 1900, 2006)
    """
    years, values = _read("earthquakes.csv", np.int64)
    return Dataset(
        years,
        values,
        "earthquakes",
        "Zucchini & MacDonald (2009), Hidden Markov Models for Time Series, Table 1.1",
    )


def load_nile() -> Dataset:
    """Annual flow of the Nile at Aswan, 1871-1970 (10^8 cubic metres).

    Returns:
        A :class:`Dataset` with ``years`` (100,) and float ``values`` (100,).

    Example:
        >>> from ssmjax.datasets import load_nile
        >>> data = load_nile()
        >>> len(data.values), int(data.years[0]), int(data.years[-1])
        (100, 1871, 1970)
    """
    years, values = _read("nile.csv", np.float64)
    return Dataset(
        years,
        values,
        "nile",
        "Durbin & Koopman (2012), Time Series Analysis by State Space Methods, ch. 2",
    )
