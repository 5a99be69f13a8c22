"""What a Kalman step at (Dx, Dy) = (32, 8) is made of on this CPU: two probes behind the
"Targets not met yet" notes in ``benchmarks/README.md``.

1. A 32x32 float32 matrix product inside a ``lax.scan`` (10^4 steps), with each operand
   layout: plain ``a @ b`` against transposed operands.
2. The cost of one extra (T, 32, 32) float32 scan output (41 MB) per call, written into
   fresh memory (the default) and into a donated, already-touched buffer. glibc serves
   blocks above its mmap threshold (at most 32 MB) with fresh pages on every call, so
   such an output pays one page fault per 4 KiB page each time.

    python benchmarks/cpu_costs.py          # prints a small table; pin with taskset -c 0

Nothing is asserted; the numbers vary with the machine.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

T, N = 10_000, 32


def _median_ms(fns: dict, rounds=11) -> dict:
    """Median ms per call of each function, timed in interleaved rounds (jit warm)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _dot_chain(product):
    """Two dependent products per step; returns a jitted scan over T steps."""

    @jax.jit
    def run(noise, start):
        def step(c, p):
            s = c + p
            return start + 1e-3 * product(product(s, p), p), None

        return jax.lax.scan(step, start, noise)[0]

    return run


def dot_layouts():
    rng = np.random.default_rng(0)
    start = jnp.eye(N, dtype=jnp.float32)
    noise = jnp.asarray(rng.normal(size=(T, N, N)).astype(np.float32) * 1e-3)
    dims = lambda lhs, rhs: (((lhs,), (rhs,)), ((), ()))  # noqa: E731
    layouts = {
        "a @ b": lambda a, b: a @ b,
        "a.T @ b": lambda a, b: a.T @ b,
        "a @ b.T": lambda a, b: a @ b.T,
        "dot_general, contract a0 b0": lambda a, b: jax.lax.dot_general(a, b, dims(0, 0)),
        "dot_general, contract a1 b1": lambda a, b: jax.lax.dot_general(a, b, dims(1, 1)),
    }
    runs = {name: _dot_chain(product) for name, product in layouts.items()}
    runs["base"] = _dot_chain(lambda a, b: a)  # the same loop without the products
    ms = _median_ms({name: (lambda run=run: run(noise, start)) for name, run in runs.items()})
    return {name: (ms[name] - ms["base"]) / (2 * T) * 1e3 for name in layouts}  # us per product


def fresh_output_cost():
    start = jnp.eye(N, dtype=jnp.float32)

    @jax.jit
    def no_output(s):
        return jax.lax.scan(lambda c, _: (c * 1.0001 + 1e-3, None), s, None, length=T)[0]

    @jax.jit
    def one_output(s):
        return jax.lax.scan(lambda c, _: (c * 1.0001 + 1e-3, c), s, None, length=T)

    def step(carry, i):
        c, buf = carry
        c = c * 1.0001 + 1e-3
        return (c, jax.lax.dynamic_update_slice_in_dim(buf, c[None], i, 0)), None

    into_buffer = jax.jit(lambda s, buf: jax.lax.scan(step, (s, buf), jnp.arange(T))[0], donate_argnums=1)
    state = {"buf": jnp.zeros((T, N, N), jnp.float32)}

    def donated():
        out = into_buffer(start, state["buf"])
        state["buf"] = out[1]
        return out

    ms = _median_ms({
        "base": lambda: no_output(start),
        "fresh (T, 32, 32) output": lambda: one_output(start),
        "same output into a donated buffer": donated,
    })
    return {name: ms[name] - ms["base"] for name in ms if name != "base"}


def main():
    print(f"jax {jax.__version__}, {jax.devices()[0]}, T = {T}")
    print("\n32x32 float32 product inside lax.scan, us per product:")
    for name, us in dot_layouts().items():
        print(f"  {name:32s} {us:6.2f}")
    print("\nextra ms per call for one (T, 32, 32) float32 scan output (41 MB):")
    for name, ms in fresh_output_cost().items():
        print(f"  {name:36s} {ms:6.1f}")


if __name__ == "__main__":
    main()
