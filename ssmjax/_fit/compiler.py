"""Compilation settings shared by the fitting loops.

XLA:CPU compiles every fusion through its MLIR fusion emitters by default, at a
fixed cost per fusion that dominates the compile time of an EM loop (many small
kernels on ``K x K`` and ``D x D`` matrices). The classic emitters compile the
loops of ``benchmarks/fit.py`` about twice as fast at equal run time. The option
is applied on CPU only, and dropped for good if this jaxlib does not know it.

A model whose loop is dominated by elementwise transcendental work (the Newton steps of the GLM
emissions: ``exp``, ``log1p`` over every step, state and output) runs several times slower with
the classic emitters; it says so with ``_prefers_fusion_emitters`` and keeps XLA's defaults.
"""

from __future__ import annotations

import equinox as eqx
import jax

CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
_use_compiler_options = True


def fast_compile_jit(fun):
    """``equinox.filter_jit(fun)``, compiled with :data:`CPU_COMPILER_OPTIONS` on CPU when it is a
    program of its own (not traced inside another ``jit``)."""
    plain = eqx.filter_jit(fun)
    tuned = eqx.filter_jit(fun, compiler_options=CPU_COMPILER_OPTIONS)

    def call(*args):
        global _use_compiler_options
        # traced inside a caller's jit, the program is part of the caller's (options apply to top-level programs only)
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
        if (_use_compiler_options and not traced and jax.default_backend() == "cpu"
                and not getattr(args[0], "_prefers_fusion_emitters", False)):
            try:
                return tuned(*args)
            except Exception as err:  # noqa: BLE001 - only an unknown option is handled
                if "compile option" not in str(err):
                    raise
                _use_compiler_options = False
        return plain(*args)

    return call
