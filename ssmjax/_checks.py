"""Two-tier input validation shared by every public function.

Tier 1, shapes and ranks: checked at trace time with :func:`check_shape` and
friends; they raise :class:`ValueError` naming the argument, the expected shape
and the received shape, whether the call is eager or under ``jax.jit``.

Tier 2, values (probabilities that do not sum to one, non-PSD covariances, NaN):
:func:`check_values` raises :class:`ValueError` on an eager call and, when its
inputs are traced (under ``jit``/``vmap``/``grad``), inserts an
:func:`equinox.error_if` so that the same check fires at run time. The run-time
error carries the same message; it is raised as :class:`equinox.EquinoxRuntimeError`
under :func:`equinox.filter_jit` and as :class:`jax.errors.JaxRuntimeError` under
plain :func:`jax.jit`.

Value checks cost a reduction over the inputs. They are on by default and can be
switched off for speed, globally with :func:`set_value_checks` or for a block
with the :func:`value_checks` context manager, or from the environment with
``SSMJAX_VALUE_CHECKS=0``. The switch is read when a function is traced: a
jitted function keeps the setting it was compiled with.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from types import ModuleType

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _linalg

_VALUE_CHECKS: bool = os.environ.get("SSMJAX_VALUE_CHECKS", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)


def set_value_checks(enabled: bool) -> None:
    """Switch ssmjax's value checks on or off for every call traced afterwards.

    Value checks verify, for example, that probabilities are non-negative and sum
    to one, that covariances are symmetric positive definite and that unpadded
    log-likelihoods are not NaN. Shape checks always run (they are free).

    Args:
        enabled: ``True`` (the default) to check values, ``False`` to skip them.

    Example:
        >>> import ssmjax
        >>> ssmjax.set_value_checks(False)
        >>> ssmjax.set_value_checks(True)
    """
    global _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether value checks are currently on (see :func:`set_value_checks`)."""
    return _VALUE_CHECKS


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Context manager that sets the value-check switch inside a block.

    Example:
        >>> import ssmjax
        >>> with ssmjax.value_checks(False):
        ...     pass
    """
    global _VALUE_CHECKS
    previous = _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS = previous


# --------------------------------------------------------------------------- shapes


def _fmt_shape(shape: Sequence[object]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def to_device(x: object) -> jax.Array:
    """``jnp.asarray(x)`` that compiles nothing for host (NumPy) data.

    With jax 0.10, ``jnp.asarray`` of a NumPy array or scalar compiles a small staging
    program for each new shape and dtype (about 10 ms each on first use, measured:
    four of them were 4% of a first ``fit_em`` call). A private NumPy copy handed to
    ``jax.device_put`` is a plain transfer with the same (canonical) dtype; being a
    copy, later changes to the caller's array never reach the result. Anything else
    (JAX arrays, Python scalars and lists) goes through ``jnp.asarray`` unchanged.
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return jax.device_put(np.array(x, copy=True))
    return jnp.asarray(x)


def as_float_array(name: str, x: object, dtype=None) -> jax.Array:
    """Convert ``x`` to a floating JAX array, or raise a ValueError naming ``name``."""
    try:
        arr = to_device(x)
    except Exception as err:  # pragma: no cover - message path
        raise ValueError(f"`{name}` must be an array of numbers; got {type(x).__name__}.") from err
    if dtype is not None:
        arr = arr.astype(dtype)
    elif not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    return arr


def as_int_array(name: str, x: object) -> jax.Array:
    """Convert ``x`` to an integer JAX array, or raise a ValueError naming ``name``."""
    arr = to_device(x)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"`{name}` must hold integers; got dtype {arr.dtype}.")
    return arr


def check_shape(name: str, x: jax.Array | np.ndarray, expected: Sequence[object], meaning: str = "") -> None:
    """Raise ``ValueError`` unless ``x.shape`` matches ``expected``.

    ``expected`` is a sequence whose entries are ints (must match), ``None`` (any
    size) or strings naming an axis (any size; used in the message only).
    """
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(
        not isinstance(e, int) or e == s for e, s in zip(expected, shape)
    )
    if not ok:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(
            f"`{name}` must have shape {_fmt_shape(expected)}{what}; got shape {_fmt_shape(shape)}."
        )


def check_shape_options(
    name: str, x: jax.Array, options: Sequence[Sequence[object]], meaning: str = ""
) -> int:
    """Like :func:`check_shape` with alternatives; returns the index of the one matched."""
    shape = tuple(x.shape)
    for i, expected in enumerate(options):
        if len(shape) == len(expected) and all(
            not isinstance(e, int) or e == s for e, s in zip(expected, shape)
        ):
            return i
    what = f" ({meaning})" if meaning else ""
    alternatives = " or ".join(_fmt_shape(o) for o in options)
    raise ValueError(f"`{name}` must have shape {alternatives}{what}; got shape {_fmt_shape(shape)}.")


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (Python or NumPy; not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an integer (:func:`is_int`) of at least 1."""
    return is_int(value) and bool(value >= 1)


def positive_int(name: str, value: object) -> int:
    """``value`` as a Python int if :func:`is_positive_int`, else a ``ValueError`` naming ``name``."""
    if not is_positive_int(value):
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
    return int(value)


def is_non_negative_number(value: object) -> bool:
    """Whether ``value`` is a finite real scalar at least 0 (Python, NumPy or JAX; not a bool)."""
    value = np.asarray(value)
    real = np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)
    return value.ndim == 0 and real and bool(np.isfinite(value)) and bool(value >= 0)


def check_length(length: object, num_timesteps: int) -> jax.Array | None:
    """Validate ``length`` (None, a Python int or a scalar integer array).

    Static lengths are checked eagerly (``1 <= length <= T``); traced lengths are
    checked at run time through :func:`check_values`. Returns an int32 scalar
    array, or ``None`` when ``length`` is ``None``.
    """
    if length is None:
        return None
    on_host = host_namespace(length) is np
    arr = np.asarray(length) if on_host else jnp.asarray(length)
    if arr.ndim != 0:
        raise ValueError(
            f"`length` must be a scalar integer (use jax.vmap for a batch of lengths); "
            f"got shape {_fmt_shape(arr.shape)}."
        )
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"`length` must be an integer; got dtype {arr.dtype}.")
    message = f"`length` must lie in [1, {num_timesteps}] (the number of time steps)"
    if on_host:  # decided here with NumPy (an eager jnp comparison would compile kernels)
        value = int(arr)
        if value < 1 or value > num_timesteps:  # a host value, like a shape: checked even with value checks off
            raise ValueError(f"{message}; got {value}.")
        return to_device(np.int32(value))
    arr = arr.astype(jnp.int32)
    bad = (arr < 1) | (arr > num_timesteps)
    return check_values(arr, bad, message)


def check_lengths(lengths: object, num_sequences: int, num_timesteps: int) -> jax.Array:
    """Validate a batch's ``lengths`` (eagerly); ``None`` means all ``num_timesteps``.

    Returns an int32 array of shape ``(num_sequences,)``.
    """
    if lengths is None:
        return jnp.full((num_sequences,), num_timesteps, jnp.int32)
    lengths = to_device(lengths)
    check_shape("lengths", lengths, (num_sequences,), "one length per sequence")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"`lengths` must hold integers; got dtype {lengths.dtype}.")
    if _is_traced(lengths):  # under jit: checked at run time, naming the first bad entry
        bad = (lengths < 1) | (lengths > num_timesteps)
        return check_values(lengths, bad, f"`lengths` must lie in [1, {num_timesteps}] (the padded length T).",
                            at="lengths").astype(jnp.int32)
    host = host_copy(lengths)  # on the host: eager jnp comparisons would compile four small kernels
    if np.any((host < 1) | (host > num_timesteps)):
        raise ValueError(
            f"`lengths` must lie in [1, {num_timesteps}] (the padded length T); "
            f"got min {int(host.min())}, max {int(host.max())}."
        )
    return lengths.astype(jnp.int32)


# --------------------------------------------------------------------------- values


def _is_traced(x: object) -> bool:
    return isinstance(x, jax.core.Tracer)


def host_namespace(*arrays) -> ModuleType:
    """``numpy`` when every array is concrete and in this process's host memory, else ``jax.numpy``.

    Eager checks then compute their flags with NumPy: each elementwise ``jnp`` op run
    eagerly compiles an XLA kernel per new shape (about 30-60 ms each on CPU), which
    made building a model in a fresh process cost seconds of compilation.
    """
    for x in arrays:
        if x is None or isinstance(x, (np.ndarray, np.generic, bool, int, float)):
            continue
        if _is_traced(x) or not isinstance(x, jax.Array):
            return jnp
        if not (x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices())):
            return jnp
    return np


def host_copy(x) -> np.ndarray:
    """``x`` as a NumPy array in this process, for host-side algorithms (initialisers).

    A global array sharded over several processes is gathered from all of them with
    :func:`jax.experimental.multihost_utils.process_allgather`, a collective: every
    process must make the same call, as they do when they run the same program.
    """
    if isinstance(x, jax.Array) and not _is_traced(x) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def host_arrays(*arrays):
    """``(xp, *arrays)``: :func:`host_namespace` and the arrays as ``xp`` arrays (None kept)."""
    xp = host_namespace(*arrays)
    if xp is jnp:
        return (jnp, *arrays)
    return (np, *(None if x is None else np.asarray(x) for x in arrays))


def linalg_arrays(*arrays):
    """:func:`host_arrays` for checks that factorise: ``jax.numpy`` for types NumPy's linear
    algebra lacks (half precision)."""
    out = host_arrays(*arrays)
    if out[0] is np and any(x is not None and x.dtype not in (np.float32, np.float64, np.bool_) for x in out[1:]):
        return (jnp, *(None if x is None else jnp.asarray(x) for x in arrays))
    return out


def cholesky_fails(xp, sym) -> "jax.Array | bool":
    """Whether the Cholesky factorisation of (a batch of) symmetric ``sym`` fails, with ``xp``."""
    if xp is np:
        try:
            return not np.all(np.isfinite(np.linalg.cholesky(sym)))
        except np.linalg.LinAlgError:
            return True
    return jnp.any(~jnp.isfinite(_linalg.cholesky(sym)))  # one matrix per LAPACK call (see _linalg)


class _FirstPosition(Sequence[str]):
    """``message`` naming the offending entry ``name[i, j, ...]``, one per flat position of an
    array of ``shape``: the messages of :func:`equinox.branched_error_if`, made only when read."""

    def __init__(self, message: str, name: str, shape: tuple[int, ...]):
        self.message, self.name, self.shape = message, name, tuple(int(s) for s in shape)

    def __len__(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, flat):
        if not isinstance(flat, (int, np.integer)) or not 0 <= flat < len(self):
            raise IndexError(flat)
        index = ", ".join(str(int(i)) for i in np.unravel_index(int(flat), self.shape))
        return f"{self.message.rstrip('.')}; the first is {self.name}[{index}]."

    def __eq__(self, other):
        return isinstance(other, _FirstPosition) and (self.message, self.name, self.shape) == (
            other.message, other.name, other.shape)

    def __hash__(self):
        return hash((self.message, self.name, self.shape))


def _first(flags):
    """The first true index of a 1-d ``flags``, or its length: one fused min-reduction."""
    size = flags.shape[0]
    return jnp.min(jnp.where(flags, jnp.arange(size, dtype=jnp.int32), size))


def _first_flagged(bad):
    """The flat index of the first true entry of ``bad``, or ``bad.size``: the first flagged row
    over a (T,)-sized reduction, then the entry within that row. No (T, ...)-sized index array
    is formed, so the check adds no buffer to programs that hold ``bad``'s source."""
    if bad.ndim == 1:
        return _first(bad)
    rows = bad.reshape(bad.shape[0], -1)
    row = _first(jnp.any(rows, axis=1))
    within = _first(jax.lax.dynamic_index_in_dim(rows, jnp.minimum(row, rows.shape[0] - 1), keepdims=False))
    return row * rows.shape[1] + within


def check_values(x, bad: "jax.Array | np.ndarray | np.generic | bool", message: str, *, at: str | None = None):
    """Return ``x`` guarded by the value check ``bad`` (a boolean scalar or array).

    Eager (``bad`` is concrete): raise ``ValueError(message)`` if any entry of
    ``bad`` is true. Traced: return ``equinox.error_if(x, bad, message)``, which
    raises at run time. The caller must use the returned ``x`` so the check is
    not removed as dead code. Does nothing when value checks are switched off.
    A NumPy ``bad`` (from :func:`host_namespace`) is decided here and now.

    ``at`` names the argument whose entries ``bad`` flags (same leading axes): the
    message then ends with the first offending position, ``name[i, j]``, eagerly and
    at run time (under ``vmap``, the position within one batch member).
    """
    if not _VALUE_CHECKS:
        return x
    shape = tuple(np.shape(bad))
    positions = _FirstPosition(message, at, shape) if at is not None and shape else None
    if isinstance(bad, (np.ndarray, np.generic, bool)):
        if np.any(bad):
            raise ValueError(positions[int(np.argmax(np.ravel(bad)))] if positions else message)
        return x
    traced = _is_traced(bad) or any(_is_traced(leaf) for leaf in jax.tree_util.tree_leaves(x))
    if positions is not None:
        first = _first_flagged(bad)
        size = len(positions)
        if traced:
            # a clean member of a vmapped batch points at 0: equinox reports the largest index of the batch
            return eqx.branched_error_if(x, first < size, jnp.where(first < size, first, 0), positions)
        first = int(np.asarray(first))  # a device array: replicated, readable by every process
        if first < size:
            raise ValueError(positions[first])
        return x
    bad = jnp.any(bad)
    if traced:
        return eqx.error_if(x, bad, message)
    if bool(np.asarray(bad)):
        raise ValueError(message)
    return x


def at_real_steps(bad, mask):
    """Value flags ``bad`` kept at real steps only (``mask`` over its leading axes; None: every step)."""
    if mask is None:
        return bad
    return bad & mask.reshape(mask.shape + (1,) * (bad.ndim - mask.ndim))


def check_finite(name: str, x, mask=None, *, missing: bool = False):
    """``x`` guarded against non-finite entries at real steps (``mask`` over its leading axes;
    None: every step). ``missing=True``: NaN marks a missing entry, only ±inf is refused."""
    xp, values, mask = host_arrays(x, mask)
    bad = at_real_steps(xp.isinf(values) if missing else ~xp.isfinite(values), mask)
    what = "must not hold ±inf (NaN marks a missing entry)" if missing else "must be finite"
    return check_values(x, bad, f"`{name}` {what}.", at=name)


def check_inputs(inputs, num_steps: int, width: int, mask=None, dtype=None):
    """``inputs`` of one sequence (or pooled steps), ``(num_steps, width)``, finite at real steps
    (``mask``, ``(num_steps,)``; None: every step)."""
    inputs = as_float_array("inputs", inputs, dtype)
    check_shape("inputs", inputs, (num_steps, width), "one input vector per time step")
    return check_finite("inputs", inputs, mask)


def probability_atol(dtype) -> float:
    """How far from one a row of probabilities held in ``dtype`` may sum."""
    return 1e-4 if jnp.finfo(dtype).bits <= 32 else 1e-8


def check_probability_vector(name: str, probs: jax.Array, axis: int = -1, atol: float | None = None):
    """Non-negative entries summing to one along ``axis`` (value check). ``atol``: by default
    :func:`probability_atol` of ``probs``; give the original one for probabilities promoted from a
    lower precision (their rounding error stays)."""
    if atol is None:
        atol = probability_atol(probs.dtype)
    xp = host_namespace(probs)
    values = np.asarray(probs) if xp is np else probs
    sums = xp.sum(values, axis=axis)
    bad = xp.any(values < 0) | xp.any(xp.abs(sums - 1) > atol) | xp.any(~xp.isfinite(values))
    return check_values(
        probs,
        bad,
        f"`{name}` must hold finite non-negative probabilities summing to 1 along its last axis "
        f"(tolerance {atol:g}).",
    )


def check_psd(name: str, cov: jax.Array, rtol: float | None = None, *, valid=None, semidefinite: bool = False):
    """Finite, symmetric, positive (semi-)definite matrices in the last two axes (value check).

    The one covariance check of the package. ``valid`` (T,) limits a time-varying ``cov``
    (T, D, D) to its real steps (padding may hold anything). Symmetry is relative to the
    largest entry (``rtol``: 1e-5 in float32, 1e-10 in float64); definiteness is a Cholesky
    factorisation, semi-definiteness the eigenvalues down to ``-10 D eps`` times that entry.
    """
    if not _VALUE_CHECKS:
        return cov
    if rtol is None:
        rtol = 1e-5 if cov.dtype == jnp.float32 else 1e-10
    # NumPy when everything is concrete and on the host: no XLA compilation per eager check
    xp, values, valid = linalg_arrays(cov, valid)
    test = values
    if valid is not None and cov.ndim == 3:
        test = xp.where(valid[:, None, None], values, 0.0 if semidefinite else xp.eye(cov.shape[-1], dtype=values.dtype))
    asym = xp.abs(test - xp.swapaxes(test, -1, -2))
    scale = xp.maximum(xp.max(xp.abs(test), axis=(-1, -2), keepdims=True), jnp.finfo(cov.dtype).tiny)
    not_symmetric = xp.any(asym > rtol * scale) | xp.any(~xp.isfinite(test))
    sym = xp.where(xp.isfinite(test), test, 0.0)
    sym = 0.5 * (sym + xp.swapaxes(sym, -1, -2))
    if semidefinite:
        eig = xp.linalg.eigvalsh(sym)
        bad_def = xp.any(eig < -(cov.shape[-1] * 10 * jnp.finfo(cov.dtype).eps) * scale[..., 0])
        what = "positive semi-definite (it has a negative eigenvalue)"
    else:
        bad_def = cholesky_fails(xp, sym)
        what = "positive definite (its Cholesky factorisation failed)"
    cov = check_values(cov, not_symmetric, f"`{name}` must be finite and symmetric (relative tolerance {rtol:g}).")
    return check_values(cov, bad_def, f"`{name}` must be {what}.")
