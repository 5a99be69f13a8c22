"""The `ssmjax demo` console script: runs end to end, prints the fits, writes the plots."""

from __future__ import annotations

import io

import numpy as np
import pytest

from ssmjax import cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()
    results = cli.run_demo(out=buffer, output_dir=str(out_dir))
    return results, buffer.getvalue(), out_dir


def test_demo_reports_the_nile_mle_of_durbin_and_koopman(demo):
    results, text, _ = demo
    nile = results["nile"]
    np.testing.assert_allclose(nile["emission_var"], 15099.0, rtol=2e-3)
    np.testing.assert_allclose(nile["level_var"], 1469.1, rtol=2e-3)
    assert f"{nile['emission_var']:.1f}" in text and f"{nile['level_var']:.1f}" in text


def test_demo_earthquake_fits_are_consistent(demo):
    results, text, _ = demo
    two, three = results["earthquakes"]
    assert two["num_states"] == 2 and three["num_states"] == 3
    assert three["loglik"] >= two["loglik"]  # nested models
    for r in (two, three):
        k = r["num_states"]
        n_par = (k - 1) + k * (k - 1) + k
        np.testing.assert_allclose(r["aic"], -2 * r["loglik"] + 2 * n_par)
        np.testing.assert_allclose(r["bic"], -2 * r["loglik"] + np.log(107) * n_par)
        assert np.all(np.diff(r["rates"]) > 0)
        np.testing.assert_allclose(r["transition_matrix"].sum(1), 1.0, rtol=1e-12)
        assert r["path"].shape == (107,) and set(np.unique(r["path"])) <= set(range(k))
    assert "Decoded regimes" in text and "BIC prefers" in text


def test_demo_writes_png_plots(demo):
    pytest.importorskip("matplotlib")
    results, text, out_dir = demo
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["earthquakes_hmm.png", "nile_local_level.png"]
    for p in out_dir.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert str(out_dir) in text


def test_main_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_version_and_the_persistent_compilation_cache(tmp_path):
    """A repeated command reads its programs from the cache folder (``SSMJAX_CACHE_DIR`` here);
    ``--no-cache`` writes nothing. Timings: benchmarks/first_use.py."""
    import os
    import subprocess
    import sys

    data = tmp_path / "counts.npy"
    np.save(data, np.random.default_rng(0).poisson(3.0, size=(60, 1)).astype(float))
    cache = tmp_path / "cache"
    env = dict(os.environ, SSMJAX_CACHE_DIR=str(cache), SSMJAX_NO_CACHE="0", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "ssmjax.cli"]
    fit = ["fit", "hmm", str(data), "--emissions", "poisson", "--iters", "5", "--output"]
    version = subprocess.run(command + ["--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("ssmjax ")
    off = subprocess.run(command + ["--no-cache"] + fit + [str(tmp_path / "a")], capture_output=True, text=True, env=env)
    assert off.returncode == 0, off.stderr[-2000:]
    assert not cache.exists() or not any(cache.iterdir())
    on = subprocess.run(command + fit + [str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert on.returncode == 0, on.stderr[-2000:]
    assert len(list(cache.iterdir())) > 5  # the programs of the fit
    assert on.stdout.splitlines()[:3] == off.stdout.splitlines()[:3]
