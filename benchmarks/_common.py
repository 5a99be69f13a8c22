"""Helpers shared by the benchmark scripts: installed versions, a JSON record, timing, dynamax parameters."""

from __future__ import annotations

import importlib.metadata
import platform


def installed_versions(packages) -> dict:
    """``{package: version or None}`` for ``packages``, plus ssmjax's and Python's versions."""
    import ssmjax

    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["ssmjax"] = ssmjax.__version__
    versions["python"] = platform.python_version()
    return versions


def write_record(path, record: dict) -> None:
    """Write a benchmark's results as JSON (parent folders created) and say where."""
    import json
    import pathlib

    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


def record(packages, settings: dict, rows: list, **machine) -> dict:
    """A benchmark's JSON record: date, this machine (plus ``machine`` fields), the versions of
    ``packages``, the settings and the result rows."""
    import os
    import time

    return dict(
        date=time.strftime("%Y-%m-%dT%H:%M"),
        machine=dict(processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), **machine),
        versions=installed_versions(packages),
        settings=settings,
        rows=rows,
    )


def dynamax_lgssm_params(p: dict, dtype=None):
    """dynamax's ``ParamsLGSSM`` for the benchmark problems' ``dict(m0, P0, A, Q, C, R)`` (no inputs or biases;
    their zeros in ``dtype``, float32 by default)."""
    import jax.numpy as jnp
    from dynamax.linear_gaussian_ssm.inference import (
        ParamsLGSSM, ParamsLGSSMDynamics, ParamsLGSSMEmissions, ParamsLGSSMInitial,
    )

    dy, dx = p["C"].shape
    zeros = lambda *shape: jnp.zeros(shape, dtype or jnp.float32)  # noqa: E731
    return ParamsLGSSM(
        initial=ParamsLGSSMInitial(mean=jnp.asarray(p["m0"]), cov=jnp.asarray(p["P0"])),
        dynamics=ParamsLGSSMDynamics(
            weights=jnp.asarray(p["A"]), bias=zeros(dx), input_weights=zeros(dx, 0), cov=jnp.asarray(p["Q"]),
        ),
        emissions=ParamsLGSSMEmissions(
            weights=jnp.asarray(p["C"]), bias=zeros(dy), input_weights=zeros(dy, 0), cov=jnp.asarray(p["R"]),
        ),
    )


def compile_and_time(fn, *args, repeats: int):
    """``(compile s, median run s, output)`` of ``jax.jit(fn)(*args)``: compiled ahead, one warm call, then
    ``repeats`` timed calls (``block_until_ready``)."""
    import statistics
    import time

    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times), out
