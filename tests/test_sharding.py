"""Data-parallel fitting over a device mesh gives the single-device answer.

Runs in a subprocess with 4 fake CPU devices (XLA flags must be set before JAX
starts). The batch axis is sharded with NamedSharding; the compiled EM loop must
contain an all-reduce (the E-step statistics are summed across devices).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from helpers import child_env

SCRIPT = pathlib.Path(__file__).with_name("_sharded_fit_script.py")


@pytest.fixture(scope="module")
def result():
    env = child_env()
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_batch_is_sharded_over_four_devices(result):
    assert result["devices"] == 4 and result["input_sharded"]
    assert result["hmm_em_all_reduce"], "the sharded EM loop should all-reduce its statistics"


def test_sharded_em_equals_single_device(result):
    assert result["hmm_em_lls_maxdiff"] <= 1e-9
    assert result["hmm_em_rates_maxdiff"] <= 1e-9
    assert result["lgssm_em_lls_maxdiff"] <= 1e-10 * result["lgssm_em_scale"]


def test_sharded_sgd_equals_single_device(result):
    assert result["hmm_sgd_losses_maxdiff"] <= 1e-9


def test_distributed_example_runs(result):
    assert result["example_devices"] == 4
    low, high = sorted(result["example_rates"])
    assert 2.0 < low < 4.0 and 10.0 < high < 14.0
