"""Small real data sets bundled with ssmjax (no downloads).

* :func:`load_earthquakes` -- annual counts of major (magnitude 7 and above)
  earthquakes worldwide, 1900-2006 (107 values), the running example of
  Zucchini & MacDonald, *Hidden Markov Models for Time Series* (2009), also used in
  hmmlearn's Poisson-HMM example.
* :func:`load_nile` -- annual flow volume of the Nile at Aswan, 1871-1970
  (100 values, 10^8 m^3), the local-level example of Durbin & Koopman,
  *Time Series Analysis by State Space Methods* (2nd ed., 2012), chapter 2.
* :func:`load_us_gdp_growth` -- quarterly growth of US real GDP, 1959Q2-2009Q3
  (202 values, per cent a year), the series of Hamilton's (1989) regime-switching
  model. Computed as ``400 * diff(log(realgdp))`` from statsmodels' ``macrodata``
  (real GDP in billions of chained 2005 dollars, seasonally adjusted annual rate;
  FRED, Federal Reserve Bank of St. Louis, accessed 2009-12-15), which statsmodels
  distributes as public domain.
"""

from __future__ import annotations

import csv
from importlib import resources
from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "QuarterlyDataset", "load_earthquakes", "load_nile", "load_us_gdp_growth"]


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


class QuarterlyDataset(NamedTuple):
    """A bundled univariate quarterly series.

    Attributes:
        years: (T,) int array of calendar years.
        quarters: (T,) int array of quarters, 1 to 4.
        values: (T,) float array of observations.
        name: short name of the data set.
        source: where the numbers come from.
    """

    years: np.ndarray
    quarters: np.ndarray
    values: np.ndarray
    name: str
    source: str

    @property
    def times(self) -> np.ndarray:
        """(T,) decimal years, ``year + (quarter - 1) / 4`` (the start of each quarter), for plotting."""
        return self.years + (self.quarters - 1) / 4


def _rows(filename: str) -> list[list[str]]:
    """The rows of a bundled CSV file, header left out."""
    text = resources.files(__package__).joinpath("data", filename).read_text()
    return list(csv.reader(text.splitlines()))[1:]


def _read(filename: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    rows = _rows(filename)
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


def load_us_gdp_growth() -> QuarterlyDataset:
    """Quarterly growth of US real GDP, 1959Q2-2009Q3, in per cent a year.

    ``values[t] = 400 * (log GDP_t - log GDP_{t-1})``, the annualised quarter-on-quarter
    growth of real GDP (billions of chained 2005 dollars, seasonally adjusted), computed from
    the ``realgdp`` column of statsmodels' ``macrodata`` (FRED, Federal Reserve Bank of
    St. Louis; public domain). Negative values cluster in the recessions, which is what
    Hamilton's (1989) two-regime model picks up.

    Returns:
        A :class:`QuarterlyDataset` with ``years``, ``quarters`` and float ``values``, each (202,).

    Example:
        >>> from ssmjax.datasets import load_us_gdp_growth
        >>> data = load_us_gdp_growth()
        >>> len(data.values), (int(data.years[0]), int(data.quarters[0])), (int(data.years[-1]), int(data.quarters[-1]))
        (202, (1959, 2), (2009, 3))
        >>> round(float(data.values.mean()), 2)
        3.1
    """
    rows = _rows("us_gdp_growth.csv")
    years = np.array([int(r[0]) for r in rows], dtype=np.int64)
    quarters = np.array([int(r[1]) for r in rows], dtype=np.int64)
    values = np.array([r[2] for r in rows], dtype=np.float64)
    return QuarterlyDataset(
        years,
        quarters,
        values,
        "us_gdp_growth",
        "statsmodels macrodata (FRED real GDP, public domain); 400 * diff(log(realgdp))",
    )
