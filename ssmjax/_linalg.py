"""Cholesky factorisation and triangular solves that never make a batched LAPACK call.

With jaxlib 0.10.2, XLA:CPU's LAPACK kernels split a stack of matrices into chunks on the
intra-op thread pool and block until the chunks finish. When as many such calls run at once as
the pool has threads (two on a 2-core machine), every thread waits for chunks that no thread is
free to run, and the program hangs. ``jax.vmap`` reaches this easily: the derivative rules of
``cholesky`` and ``triangular_solve`` make several independent solves over the whole batch in each
step of a vmapped Kalman filter with per-sequence covariances
(``benchmarks/lapack_deadlock.py --task gradient``).

The two primitives here choose their lowering from the operand shapes. A single matrix (one
sequence, or a model shared by a vmapped batch, whose batch becomes right-hand-side columns) is
one LAPACK call. A stack of matrices is a loop of single-matrix LAPACK calls, which cannot split
and so cannot block; it costs a loop step per matrix, where XLA's own ``cholesky`` and
``triangular_solve`` operations (the other deadlock-free choice) are several times slower on CPU.
Other platforms lower as :mod:`jax.lax.linalg` does. The derivative rules are
:mod:`jax.lax.linalg`'s, written with these primitives, so gradients of any order keep the same
guarantee.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["cholesky", "solve_triangular"]


def _num_matrices(aval) -> int:
    return math.prod(aval.shape[:-2])


# --------------------------------------------------------------------------- Cholesky

def _one_at_a_time(fn, *operands, **params):
    """``fn`` over the stacked matrices of ``operands`` (equal leading axes), one matrix per call."""
    lead = operands[0].shape[:-2]
    flat = [x.reshape((-1,) + x.shape[-2:]) for x in operands]
    out = jax.lax.map(lambda xs: fn(*xs, **params), flat)
    return out.reshape(lead + out.shape[-2:])


def _register(primitive, library_fn):
    """Eager calls and non-CPU platforms use ``library_fn`` (:mod:`jax.lax.linalg`) as it is; on CPU a
    stack of matrices (the first operand's leading axes) is one ``library_fn`` call per matrix."""

    def cpu_lowering(ctx, *operands, **params):
        whole = _num_matrices(ctx.avals_in[0]) <= 1
        fn = library_fn if whole else functools.partial(_one_at_a_time, library_fn)
        return mlir.lower_fun(functools.partial(fn, **params), False)(ctx, *operands)

    primitive.def_impl(library_fn)  # eager: a single call, nothing runs beside it
    mlir.register_lowering(primitive, cpu_lowering, platform="cpu")
    mlir.register_lowering(primitive, mlir.lower_fun(library_fn, False))


def _lapack_cholesky(s):
    return jax.lax.linalg.cholesky(s, symmetrize_input=False)


_cholesky_p = Primitive("ssmjax_cholesky")
_cholesky_p.def_abstract_eval(lambda x: x.update(shape=x.shape, dtype=x.dtype))
_register(_cholesky_p, _lapack_cholesky)


def _cholesky_batch(args, dims):
    (x,), (d,) = args, dims
    return _cholesky_p.bind(jnp.moveaxis(x, d, 0)), 0


batching.primitive_batchers[_cholesky_p] = _cholesky_batch


def _cholesky_jvp(primals, tangents):
    # Murray (2016), as jax.lax.linalg.cholesky: dL = L Phi(L^{-1} dS L^{-T}), Phi = lower
    # triangle with the diagonal halved
    (x,), (x_dot,) = primals, tangents
    chol = _cholesky_p.bind(x)
    x_dot = ad.instantiate_zeros(x_dot)
    inner = solve_triangular(chol, jnp.swapaxes(solve_triangular(chol, x_dot, lower=True), -1, -2), lower=True)
    phi = jnp.tril(inner) - 0.5 * jnp.eye(x.shape[-1], dtype=x.dtype) * inner
    return chol, jnp.matmul(chol, phi, precision=jax.lax.Precision.HIGHEST)


ad.primitive_jvps[_cholesky_p] = _cholesky_jvp


def cholesky(x: jax.Array) -> jax.Array:
    """Lower Cholesky factor of a symmetric positive-definite ``x`` (symmetrised first, as
    :func:`jax.numpy.linalg.cholesky` does), batched over leading axes."""
    return _cholesky_p.bind(0.5 * (x + jnp.swapaxes(x, -1, -2)))


# --------------------------------------------------------------------------- triangular solve

def _lapack_solve(a, b, *, transpose):
    return jax.lax.linalg.triangular_solve(a, b, left_side=True, lower=True, transpose_a=transpose)


_solve_p = Primitive("ssmjax_solve_triangular")  # solve op(a) x = b, a lower triangular, op = id or transpose
_solve_p.def_abstract_eval(lambda a, b, *, transpose: b.update(shape=b.shape, dtype=b.dtype))
_register(_solve_p, _lapack_solve)


def _solve_batch(args, dims, *, transpose):  # an unmapped operand has dimension None
    a, b = args
    da, db = dims
    if da is None:
        # one matrix, many right-hand sides: the batch becomes columns (one LAPACK call)
        b = jnp.moveaxis(b, db, -1)  # (..., n, k, B)
        shape = b.shape
        x = _solve_p.bind(a, b.reshape(shape[:-2] + (shape[-2] * shape[-1],)), transpose=transpose)
        return x.reshape(shape), len(shape) - 1
    # a stack of matrices: the batch leads both operands (solve_triangular gave them equal leading axes)
    a = jnp.moveaxis(a, da, 0)
    b = jnp.broadcast_to(b, (a.shape[0],) + b.shape) if db is None else jnp.moveaxis(b, db, 0)
    return _solve_p.bind(a, b, transpose=transpose), 0


batching.primitive_batchers[_solve_p] = _solve_batch


def _solve_jvp_a(a_dot, x, a, *, transpose):
    # op(a) x = b  =>  op(a) dx = -op(da) x
    a_dot = jnp.tril(a_dot)
    op_a_dot = jnp.swapaxes(a_dot, -1, -2) if transpose else a_dot
    return -_solve_p.bind(a, jnp.matmul(op_a_dot, x, precision=jax.lax.Precision.HIGHEST), transpose=transpose)


def _solve_jvp(primals, tangents, *, transpose):
    a, b = primals
    a_dot, b_dot = tangents
    x = _solve_p.bind(a, b, transpose=transpose)
    out = None
    if type(b_dot) is not ad.Zero:
        out = _solve_p.bind(a, b_dot, transpose=transpose)
    if type(a_dot) is not ad.Zero:
        term = _solve_jvp_a(a_dot, x, a, transpose=transpose)
        out = term if out is None else out + term
    if out is None:
        out = ad.Zero.from_primal_value(x)
    return x, out


def _solve_transpose(ct, a, b, *, transpose):
    # linear in b only (the JVP above applies it to b_dot and to a term built from a_dot)
    assert not ad.is_undefined_primal(a) and ad.is_undefined_primal(b)
    if type(ct) is ad.Zero:
        return None, ad.Zero(b.aval)
    return None, _solve_p.bind(a, ct, transpose=not transpose)


ad.primitive_jvps[_solve_p] = _solve_jvp
ad.primitive_transposes[_solve_p] = _solve_transpose


def solve_triangular(a: jax.Array, b: jax.Array, *, lower: bool = True, trans: str = "N") -> jax.Array:
    """``a^{-1} b`` (``trans="N"``) or ``a^{-T} b`` (``trans="T"``) for a lower-triangular ``a``,
    batched over matching leading axes (as :func:`jax.scipy.linalg.solve_triangular` with
    ``lower=True``); ``b`` is (..., n, k) or (..., n)."""
    if not lower:
        raise ValueError("solve_triangular: only lower-triangular factors are used here (lower=True).")
    if trans not in ("N", "T"):
        raise ValueError(f"solve_triangular: `trans` must be 'N' or 'T'; got {trans!r}.")
    vector = b.ndim == a.ndim - 1
    if vector:
        b = b[..., None]
    lead = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = jnp.broadcast_to(a, lead + a.shape[-2:])
    b = jnp.broadcast_to(b, lead + b.shape[-2:])
    x = _solve_p.bind(a, b, transpose=trans == "T")
    return x[..., 0] if vector else x
