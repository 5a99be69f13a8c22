"""Checkpointed fits: killed mid-run, resumed, and equal bit for bit to the uninterrupted fit.

Two real processes fit with a checkpoint after every iteration (LGSSM EM, HMM mini-batch SGD)
and are killed with SIGKILL once their checkpoints are ten iterations in; a third resumes
both and also runs them uninterrupted (see tests/_checkpoint_script.py).
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import child_env

import ssmjax

SCRIPT = pathlib.Path(__file__).with_name("_checkpoint_script.py")


def _iteration(path: pathlib.Path) -> int:
    try:
        with open(path, "rb") as f:
            return int(json.loads(f.readline())["iteration"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    env = child_env()
    runs = {kind: subprocess.Popen([sys.executable, str(SCRIPT), "run", kind, str(folder / f"{kind}.ckpt")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for kind in ("em", "sgd")}
    deadline = time.monotonic() + 300
    for kind, proc in runs.items():
        while _iteration(folder / f"{kind}.ckpt") < 10 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        log = proc.communicate()[0]
        assert proc.returncode == -signal.SIGKILL, f"the {kind} fit ended before it was killed:\n{log[-2000:]}"
    done = subprocess.run([sys.executable, str(SCRIPT), "finish", str(folder)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "result.json").read_text())


@pytest.mark.parametrize("kind,total", [("em", 100), ("sgd", 120)])
def test_killed_fit_resumes_to_the_uninterrupted_result(result, kind, total):
    assert 10 <= result[f"{kind}_killed_at"] < total  # killed mid-run
    resumed, uninterrupted = result[f"{kind}_resumed"], result[f"{kind}_uninterrupted"]
    assert len(resumed["values"]) == total and np.all(np.isfinite(resumed["values"]))
    assert resumed == uninterrupted  # bit for bit: the same compiled segments on the same values
    plain = result[f"{kind}_plain"]  # without checkpoints: one segment
    np.testing.assert_allclose(resumed["values"], plain["values"], rtol=1e-12)
    for got, want in zip(resumed["leaves"], plain["leaves"]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def _hmm():
    return ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.8, 0.2], [0.2, 0.8]]),
                      ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [20.0]])))


def _counts(scale=1.0):
    rng = np.random.default_rng(0)
    return scale * rng.poisson(np.where(rng.random((4, 30, 1)) < 0.5, 3.0, 12.0)).astype(float)


def test_checkpoint_of_another_fit_is_refused(tmp_path):
    path = tmp_path / "fit.ckpt"
    fitted, lls, _ = ssmjax.fit_em(_hmm(), _counts(), max_iters=6, tol=0.0, checkpoint=path, checkpoint_every=4)
    again, lls_again, _ = ssmjax.fit_em(_hmm(), _counts(), max_iters=6, tol=0.0, checkpoint=path)
    np.testing.assert_array_equal(lls_again, lls)  # a finished checkpoint returns its result
    with pytest.raises(ValueError, match=r"fit\.ckpt is a checkpoint of another fit: data\.emissions\.sum"):
        ssmjax.fit_em(_hmm(), _counts(2.0), max_iters=6, tol=0.0, checkpoint=path)
    with pytest.raises(ValueError, match=r"another fit: max_iters \(saved 6, now 7\)"):
        ssmjax.fit_em(_hmm(), _counts(), max_iters=7, tol=0.0, checkpoint=path)
    with pytest.raises(ValueError, match=r"another fit: kind"):
        ssmjax.fit_sgd(_hmm(), _counts(), optax.adam(0.1), num_steps=6, checkpoint=path)


def test_damaged_checkpoint_is_named(tmp_path):
    path = tmp_path / "sgd.ckpt"
    ssmjax.fit_sgd(_hmm(), _counts(), optax.adam(0.1), num_steps=6, checkpoint=path, checkpoint_every=3,
                   key=jax.random.key(0))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 20])
    with pytest.raises(ValueError, match=r"sgd\.ckpt is damaged or incomplete"):
        ssmjax.fit_sgd(_hmm(), _counts(), optax.adam(0.1), num_steps=6, checkpoint=path, key=jax.random.key(0))
    path.write_bytes(b"not a checkpoint\n")
    with pytest.raises(ValueError, match=r"sgd\.ckpt is not an ssmjax checkpoint"):
        ssmjax.fit_sgd(_hmm(), _counts(), optax.adam(0.1), num_steps=6, checkpoint=path, key=jax.random.key(0))


@pytest.mark.parametrize("every", [0, 2.5, True])
def test_checkpoint_every_is_checked(tmp_path, every):
    with pytest.raises(ValueError, match="`checkpoint_every` must be a positive int"):
        ssmjax.fit_em(_hmm(), _counts(), checkpoint=tmp_path / "x.ckpt", checkpoint_every=every)
