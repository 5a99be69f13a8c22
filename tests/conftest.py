"""Test configuration.

float64 is enabled for the whole run so exactness tests can compare against
oracles at tight tolerances; float32 stability tests build float32 arrays
explicitly (computation then stays in float32).

Every ``>>>`` doctest example of the package and the README's Python blocks run in
tests/test_docs.py.

Do not import ssmjax at module level here: jaxtyping's import hook
(``--jaxtyping-packages`` in pyproject.toml) must be installed first so the
package's shape annotations are checked during the tests.
"""

import os
import subprocess
import sys

# Test time is dominated by XLA:CPU compilation of many small programs. Two options halve it: the
# classic (non-MLIR) fusion emitters (the option that ``ssmjax._fit.compiler`` already applies to
# the fitting loops: about twice as fast to compile at equal run time), and LLVM's optimisation
# level 0, which compiles the suite's small programs about a quarter faster and runs its few
# long ones (T = 10^5) slower. They are set through XLA_FLAGS before JAX starts its backend, so
# they also reach every other compiled function and the notebook kernels (child processes inherit
# the environment). They change how XLA generates code for the same programs, not what the tests
# compute or check. An XLA that does not know a flag would abort on it, so they are only set after
# a child interpreter has accepted them.
# ``SSMJAX_TESTS_DEFAULT_COMPILER=1`` keeps XLA's defaults: tests/test_default_compiler.py runs the
# core oracle tests that way, so the code generator users get by default is tested too.
from helpers import DEFAULT_COMPILER_ENV, FAST_COMPILE_FLAGS  # numpy only: JAX is not started yet


def _use_fast_compile_flag() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if (
        any(f.split("=")[0] in flags for f in FAST_COMPILE_FLAGS)
        or os.environ.get("JAX_PLATFORMS", "cpu") != "cpu"
        or os.environ.get(DEFAULT_COMPILER_ENV) == "1"
    ):
        return
    env = dict(os.environ, XLA_FLAGS=" ".join([flags, *FAST_COMPILE_FLAGS]).strip(), JAX_PLATFORMS="cpu")
    probe = "import jax, jax.numpy as jnp; jax.block_until_ready(jax.jit(jnp.sin)(1.0))"
    try:
        ok = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if ok:
        os.environ["XLA_FLAGS"] = env["XLA_FLAGS"]


_use_fast_compile_flag()

# The console script keeps compiled programs in a persistent cache; tests that call its main()
# in this process must not switch that on for the rest of the worker (nor write to the user's
# cache folder). tests/test_cli.py turns it on in child processes, in a temporary folder.
os.environ["SSMJAX_NO_CACHE"] = "1"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

# The README's test command runs the suite under pytest-xdist with ``--dist loadfile``: each
# file goes whole to one worker, in collection order. The longest files are collected first so
# that no worker is left running one of them alone at the end (longest-first scheduling).
# Order within a file is unchanged (the sort is stable).
_LONGEST_FILES_FIRST = (
    "test_notebooks.py",
    "test_lgssm_parallel.py",
    "test_docs.py",
    "test_docs_pages.py",
    "test_lgssm_steady.py",
    "test_multiprocess.py",
    "test_extremes.py",
    "test_emission_families.py",
    "test_checkpoint.py",
    "test_kvae.py",
    "test_lgssm_fit.py",
    "test_lgssm_inference.py",
    "test_lgssm_joint.py",
    "test_hmm_parallel.py",
    "test_hmm_fit.py",
    "test_cli_fit.py",
    "test_default_compiler.py",
)


# Each compiled XLA:CPU program keeps about three memory mappings until its executable is freed, and a
# worker compiles thousands over a run: past the kernel's vm.max_map_count (65530 here) the next
# compilation cannot map its code and the worker dies with a segmentation fault inside XLA (seen twice
# in CI, in two different compilations, at about 16,000 mappings per test file). Dropping JAX's
# caches after each file frees them; a file compiles what it needs again.
import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_file():
    yield
    jax.clear_caches()
    gc.collect()


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
