"""The core oracle tests once more under XLA's default CPU code generator.

The rest of the suite compiles with the classic fusion emitters and LLVM's level 0 for speed (see ``conftest.py``);
users get XLA's defaults (the fitting loops excepted). This runs the brute-force HMM checks
(filter, smoother, two-slice marginals, Viterbi) and the dense-Gaussian LGSSM checks (filter,
smoother and cross-covariances, standard and square-root) in a child pytest with the defaults
kept, so a code-generation difference between the two settings cannot hide behind the faster one.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import DEFAULT_COMPILER_ENV, FAST_COMPILE_FLAGS

TESTS = Path(__file__).resolve().parent
SELECTION = "filter_smoother_two_slice_match_brute_force or viterbi_matches_brute_force or matches_dense_oracle"


def test_oracles_under_default_compiler_settings():
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{DEFAULT_COMPILER_ENV: "1"})
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE_FLAGS)
    files = [str(TESTS / "test_hmm_inference.py"), str(TESTS / "test_lgssm_inference.py")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-k", SELECTION, *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # the selection must still find all of its tests (a renamed one would otherwise drop out silently)
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) >= 14, proc.stdout[-2000:]
