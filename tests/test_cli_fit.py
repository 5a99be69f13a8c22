"""`ssmjax fit / decode / smooth`: real fits from files, round-trips, and one-line errors (exit 2)."""

from __future__ import annotations

import ast
import csv
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax
from ssmjax import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    with open(d / "counts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sequence", "count"])
        for s, n in (("a", 70), ("b", 40)):
            z = 0
            for _ in range(n):
                z = 1 - z if rng.random() < 0.1 else z
                w.writerow([s, rng.poisson([4, 15][z])])
    x = np.cumsum(rng.standard_normal(60))
    y = np.stack([x + 0.3 * rng.standard_normal(60), -x + 0.3 * rng.standard_normal(60)], axis=1)
    y[5:8, 1] = np.nan  # missing entries are fine for an LGSSM
    np.save(d / "track.npy", y)
    return d


def run(*argv):
    buf = io.StringIO()
    code = cli.main([str(a) for a in argv], out=buf)
    return code, buf.getvalue()


def test_fit_hmm_from_csv_writes_model_posteriors_plot(files, tmp_path):
    out = tmp_path / "fit"
    code, text = run("fit", "hmm", files / "counts.csv", "--emissions", "poisson", "--states", "2",
                     "--restarts", "2", "--output", out)
    assert code == 0, text
    model = ssmjax.load(out / "model.eqx")
    assert isinstance(model, ssmjax.HMM) and model.num_states == 2
    # the saved model is an EM optimum: one more EM step cannot improve it beyond round-off
    y = np.loadtxt(files / "counts.csv", delimiter=",", skiprows=1, usecols=1)
    batch = np.full((2, 70, 1), np.nan)
    batch[0, :70, 0], batch[1, :40, 0] = y[:70], y[70:]
    _, lls, _ = ssmjax.fit_em(model, np.nan_to_num(batch), lengths=[70, 40], max_iters=2, tol=0.0)
    np.testing.assert_allclose(lls[1], lls[0], rtol=1e-6)
    with open(out / "posteriors.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sequence", "step", "viterbi_state", "p_state_0", "p_state_1"] and len(rows) == 111
    probs = np.array([[float(v) for v in r[3:]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    if pytest.importorskip("matplotlib"):
        assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "log-likelihood" in text


def test_fit_lgssm_from_npy_then_smooth(files, tmp_path):
    code, text = run("fit", "lgssm", files / "track.npy", "--state-dim", "1", "--iters", "50", "--output", tmp_path / "f")
    assert code == 0, text
    model = ssmjax.load(tmp_path / "f" / "model.eqx")
    assert isinstance(model, ssmjax.LGSSM)
    code, text = run("smooth", tmp_path / "f" / "model.eqx", files / "track.npy", "--output", tmp_path / "s")
    assert code == 0, text
    y = jnp.asarray(np.load(files / "track.npy"))
    expected = float(model.marginal_loglik(y))
    assert f"{expected:.4f}" in text
    means = np.loadtxt(tmp_path / "s" / "posteriors.csv", delimiter=",", skiprows=1, usecols=2)
    np.testing.assert_allclose(means, np.asarray(model.smoother(y).smoothed_means[:, 0]), rtol=1e-5, atol=1e-8)


def test_fit_hmm_by_sgd(files, tmp_path):
    code, text = run("fit", "hmm", files / "counts.csv", "--emissions", "poisson", "--method", "sgd",
                     "--iters", "300", "--learning-rate", "0.05", "--output", tmp_path / "o")
    assert code == 0 and "SGD" in text


def test_decode_matches_viterbi(files, tmp_path):
    run("fit", "hmm", files / "counts.csv", "--emissions", "poisson", "--output", tmp_path / "f")
    code, _ = run("decode", tmp_path / "f" / "model.eqx", files / "counts.csv", "--output", tmp_path / "d")
    assert code == 0
    model = ssmjax.load(tmp_path / "f" / "model.eqx")
    y = np.loadtxt(files / "counts.csv", delimiter=",", skiprows=1, usecols=1)
    path = np.asarray(model.viterbi(jnp.asarray(y[:70, None])))
    states = np.loadtxt(tmp_path / "d" / "posteriors.csv", delimiter=",", skiprows=1, usecols=2, dtype=str)
    np.testing.assert_array_equal(states[:70].astype(int), path)


@pytest.mark.parametrize(
    "content, args, message",
    [
        ("sequence,count\na,3\na,x\n", ["--emissions", "poisson"], "row 3, column 'count': cannot parse 'x'"),
        ("sequence,count\na,3\na,4,5\n", ["--emissions", "poisson"], "row 3: 3 fields, but the header has 2"),
        ("sequence,count\na,3\nb,\n", ["--emissions", "poisson"], "row 3, column 'count': missing value"),
        ("sequence,count\na,3\nb,2.5\n", ["--emissions", "poisson"], "row 3, column 'count': 2.5 is not valid"),
        ("sequence,y\na,3\na,-inf\n", [], "row 3, column 'y': '-inf' is not a finite number"),
        ("y\n1\n2\n1e999\n", [], "row 4, column 'y': '1e999' is not a finite number"),
        ("sequence,count\na,3\nb,4\n", ["--columns", "rate"], "row 1: missing column(s) ['rate']"),
        ("sequence,count\na,3\nb,4\na,5\n", [], "row 4, column 'sequence': rows of sequence 'a' are not contiguous"),
        ("sequence,count\n", [], "no data rows after the header"),
    ],
)
def test_bad_files_give_one_line_and_exit_2_and_write_nothing(tmp_path, capsys, content, args, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    out = tmp_path / "out"
    code, _ = run("fit", "hmm", path, *args, "--output", out)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"ssmjax: error: {path}") and message in err and "\n" not in err
    assert not out.exists()


def test_bad_npy_and_model_mismatch(files, tmp_path, capsys):
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4, 5)))
    assert run("fit", "lgssm", tmp_path / "cube.npy")[0] == 2
    assert "expected shape (T,), (T, D) or (B, T, D)" in capsys.readouterr().err
    np.save(tmp_path / "inf.npy", np.array([[1.0, 2.0], [3.0, np.inf]]))
    assert run("fit", "lgssm", tmp_path / "inf.npy")[0] == 2
    assert "inf.npy: sequence 0, step 1, column 1 holds inf" in capsys.readouterr().err
    run("fit", "lgssm", files / "track.npy", "--iters", "5", "--output", tmp_path / "f")
    np.save(tmp_path / "three.npy", np.zeros((10, 3)))
    assert run("smooth", tmp_path / "f" / "model.eqx", tmp_path / "three.npy", "--output", tmp_path / "s")[0] == 2
    assert "the model expects 2 emission column(s)" in capsys.readouterr().err
    assert run("decode", tmp_path / "f" / "model.eqx", files / "track.npy", "--output", tmp_path / "d")[0] == 2
    assert "decode (Viterbi) applies to HMMs" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()


def test_every_fitted_parameter_is_printed_and_columns_are_kept_with_the_model(tmp_path, capsys):
    """A Gaussian fit prints its means and covariances under the data's column names; the column
    names travel in the model file (``ssmjax.load_metadata``), so ``decode`` of a CSV without them is
    one line and exit 2, unless ``--columns`` picks others; ``--output`` naming a file fails before
    any work. The fit, one exported program (what the cache keeps) started from the models
    HMM.from_data computes on the host, finds what HMM.from_data, fit_em and the model's methods
    find."""
    rng = np.random.default_rng(1)
    states = np.repeat(rng.integers(0, 2, 8), 10)
    data = np.c_[3.0 * states + rng.normal(size=80), -2.0 * states + rng.normal(size=80)]
    np.savetxt(tmp_path / "train.csv", data, delimiter=",", header="speed,angle", comments="")
    np.savetxt(tmp_path / "renamed.csv", data, delimiter=",", header="x,y", comments="")
    code, text = run("fit", "hmm", tmp_path / "train.csv", "--iters", "20", "--output", tmp_path / "fit")
    assert code == 0, text
    model = ssmjax.load(tmp_path / "fit" / "model.eqx")
    line = next(row for row in text.splitlines() if "emissions.means" in row)
    assert line.endswith("(columns speed, angle)")
    printed = ast.literal_eval(line.split("=", 1)[1].split("(columns")[0].strip())
    np.testing.assert_allclose(printed, model.emissions.means, atol=6e-4)
    assert "emissions.covs[0]" in text and "emissions.covs[1]" in text
    assert ssmjax.load_metadata(tmp_path / "fit" / "model.eqx") == {"columns": ["speed", "angle"]}

    from types import SimpleNamespace

    from ssmjax import _cli_data, _cli_fit

    data = _cli_data.read_data(str(tmp_path / "train.csv"))
    args = SimpleNamespace(model="hmm", emissions="gaussian", states=2, restarts=1, iters=20, tol=1e-7, seed=0,
                           method="em", progress=False, learning_rate=0.02)
    public = _cli_fit.fit_reference(args, data, _cli_fit.prepare_hmm_data(data, "gaussian"))
    assert text.splitlines()[0].endswith(public.how)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(public.model), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    states = np.loadtxt(tmp_path / "fit" / "posteriors.csv", delimiter=",", skiprows=1, usecols=2)
    np.testing.assert_array_equal(states, public.smoothed[1][0])

    code, _ = run("decode", tmp_path / "fit" / "model.eqx", tmp_path / "renamed.csv", "--output", tmp_path / "d1")
    err = capsys.readouterr().err
    assert code == 2 and "fitted on columns ['speed', 'angle']" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d1").exists()
    code, text = run("decode", tmp_path / "fit" / "model.eqx", tmp_path / "renamed.csv", "--columns", "x,y",
                     "--output", tmp_path / "d2")
    assert code == 0, text

    (tmp_path / "taken").write_text("")
    code, _ = run("fit", "hmm", tmp_path / "train.csv", "--output", tmp_path / "taken")
    err = capsys.readouterr().err
    assert code == 2 and "--output" in err and "a file of that name exists" in err

