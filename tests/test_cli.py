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


def test_demo_program_equals_the_public_functions(demo):
    # the demo's one exported program and the public fit_em / smoother / viterbi route it stands for
    import ssmjax

    results, _, _ = demo
    public = cli.fit_earthquake_hmms(ssmjax.datasets.load_earthquakes().values)
    for ours, theirs in zip(results["earthquakes"], public):
        for name in ("rates", "transition_matrix", "loglik", "aic", "bic", "smoothed"):
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-9, atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(ours["path"], theirs["path"])
        assert ours["iterations"] == theirs["iterations"]


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
    """A repeated command reads its program from the cache folder (``SSMJAX_CACHE_DIR`` here) and
    prints and writes exactly what a ``--no-cache`` run does; ``--no-cache`` writes nothing.
    Timings: benchmarks/cli_cache.py."""
    import importlib.util
    import os
    import subprocess
    import sys

    data = tmp_path / "counts.npy"
    np.save(data, np.random.default_rng(0).poisson(3.0, size=(60, 1)).astype(float))
    cache = tmp_path / "cache"
    env = dict(os.environ, SSMJAX_CACHE_DIR=str(cache), SSMJAX_NO_CACHE="0", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "ssmjax.cli"]
    fit = ["fit", "hmm", str(data), "--emissions", "poisson", "--iters", "5", "--no-progress", "--output"]
    version = subprocess.run(command + ["--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("ssmjax ")

    def run(*flags, out):
        done = subprocess.run(command + list(flags) + fit + [str(tmp_path / out)], capture_output=True, text=True,
                              env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return [line for line in done.stdout.splitlines() if not line.startswith("Wrote ")]

    off = run("--no-cache", out="off")
    assert not cache.exists() or not any(cache.iterdir())
    first = run(out="first")
    assert any(p.name.endswith("-cache") for p in cache.iterdir())  # the fit's program, compiled
    if importlib.util.find_spec("flatbuffers") is None:  # JAX cannot serialize the exported program
        assert not (cache / "ssmjax-programs").exists()
        entry = None
    else:
        (entry,) = (cache / "ssmjax-programs").iterdir()  # and exported
        written = entry.stat()
    again = run(out="again")
    if entry is not None:
        read = entry.stat()
        assert (read.st_ino, read.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # read, not written again
    assert off == first == again and "log-likelihood" in off[-1]
    for name in sorted(p.name for p in (tmp_path / "off").iterdir()):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "off" / name).read_bytes(), name
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "off" / name).read_bytes(), name


def test_a_damaged_or_foreign_program_entry_is_recomputed(tmp_path):
    """Entries are checked before use: cut short, altered, or written for other inputs, they are
    ignored, computed anew and rewritten; a good one is used without tracing again."""
    import json

    import jax.numpy as jnp

    import ssmjax
    from ssmjax import _cli_programs

    pytest.importorskip("flatbuffers", reason="JAX serializes exported programs with flatbuffers")

    traced = []

    def program(x, scale):
        traced.append(1)
        return {"model": ssmjax.PoissonEmissions(rates=jnp.exp(x)[:, None]), "total": jnp.sum(x) * scale,
                "labels": ("rates", 2)}

    args = (np.array([0.5, 1.5]), np.float64(2.0))

    def check(out):
        assert isinstance(out["model"], ssmjax.PoissonEmissions) and out["labels"] == ["rates", 2]
        np.testing.assert_allclose(out["model"].rates[:, 0], np.exp(args[0]), rtol=1e-12)
        assert float(out["total"]) == 4.0

    check(_cli_programs.run("probe", program, args, {"option": 1}, str(tmp_path)))
    (entry,) = (tmp_path / "ssmjax-programs").iterdir()
    good = entry.read_bytes()
    check(_cli_programs.run("probe", program, args, {"option": 1}, str(tmp_path)))
    assert len(traced) == 1
    other = _cli_programs.run("probe", program, args, {"option": 2}, str(tmp_path))  # another key: its own entry
    check(other)
    assert len(traced) == 2 and len(list((tmp_path / "ssmjax-programs").iterdir())) == 2
    header_end = good.index(b"\n", len(b"ssmjax-program\n")) + 1
    foreign = next(p for p in (tmp_path / "ssmjax-programs").iterdir() if p != entry).read_bytes()
    damaged = [good[: len(good) // 2], good[:-1] + bytes([good[-1] ^ 1]), b"not a program",
               good[:header_end] + foreign[foreign.index(b"\n", 15) + 1:], foreign]
    key = json.loads(good[len(b"ssmjax-program\n"):header_end])["key"]
    for i, bad in enumerate(damaged):
        entry.write_bytes(bad)
        check(_cli_programs.run("probe", program, args, {"option": 1}, str(tmp_path)))
        assert len(traced) == 3 + i
        assert json.loads(entry.read_bytes()[len(b"ssmjax-program\n"):].split(b"\n")[0])["key"] == key  # rewritten
