"""Two processes joined by ``jax.distributed`` fit what one process fits.

Three real processes on localhost: two join ``jax.distributed.initialize`` with two
CPU devices each (four devices in all, gloo collectives) and fit a global batch that
each assembles from its own rows with ``jax.make_array_from_process_local_data``; a
third fits the same batch alone on one device. HMM and LGSSM, EM, restarts and SGD,
the batch methods and jitted ``vmap`` inference must agree to round-off (only the
order of the cross-device sums differs).
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import child_env

SCRIPT = pathlib.Path(__file__).with_name("_multiprocess_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    env = child_env()
    address = f"127.0.0.1:{_free_port()}"
    commands = [[sys.executable, str(SCRIPT), str(tmp / "single.json")]] + [
        [sys.executable, str(SCRIPT), str(tmp / "multi.json"), address, "2", str(i)] for i in range(2)
    ]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for c in commands]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return tuple(json.loads((tmp / f"{name}.json").read_text()) for name in ("single", "multi"))


def test_four_devices_in_two_processes(results):
    single, multi = results
    assert (single["devices"], single["processes"]) == (1, 1)
    assert (multi["devices"], multi["processes"]) == (4, 2)
    assert multi["sharded"], "the global batch should span both processes"


@pytest.mark.parametrize("name", ["hmm_em_lls", "hmm_em_rates", "hmm_loglik", "hmm_bic", "hmm_restart_scores",
                                  "hmm_sgd_losses", "hmm_smoothed", "lgssm_em_lls", "lgssm_transition",
                                  "lgssm_sgd_losses", "kalman_loglik"])
def test_two_processes_equal_one(results, name):
    single, multi = (np.asarray(r[name], float) for r in results)
    assert single.shape == multi.shape and np.all(np.isfinite(single))
    np.testing.assert_allclose(multi, single, rtol=1e-11, atol=1e-13)


def test_viterbi_paths_equal(results):
    single, multi = results
    assert single["hmm_viterbi"] == multi["hmm_viterbi"]


def test_documented_example_runs_on_two_processes(results):
    _, multi = results
    assert multi["example_sequences"] == 8  # 2 per device, 4 devices
    low, high = sorted(multi["example_rates"])
    assert 2.0 < low < 4.5 and 9.5 < high < 14.5
