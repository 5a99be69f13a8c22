"""The validation layer, the bundled datasets and the README/CI contract."""

from __future__ import annotations

import pathlib
import subprocess

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax
from ssmjax import _checks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_check_shape_names_argument_and_both_shapes():
    with pytest.raises(ValueError, match=r"`initial_probs` must have shape \(3,\).*got shape \(2,\)"):
        _checks.check_shape("initial_probs", jnp.zeros(2), (3,))
    _checks.check_shape("x", jnp.zeros((4, 3)), ("T", 3))  # named axes accept any size


def test_check_shape_options_reports_every_alternative():
    assert _checks.check_shape_options("A", jnp.zeros((5, 2, 2)), [(2, 2), ("T-1", 2, 2)]) == 1
    with pytest.raises(ValueError, match=r"\(2, 2\) or \(T-1, 2, 2\).*got shape \(3, 3\)"):
        _checks.check_shape_options("A", jnp.zeros((3, 3)), [(2, 2), ("T-1", 2, 2)])


def test_value_check_eager_raises_value_error():
    with pytest.raises(ValueError, match="`p` must hold finite non-negative probabilities"):
        _checks.check_probability_vector("p", jnp.array([0.5, 0.6]))
    out = _checks.check_probability_vector("p", jnp.array([0.5, 0.5]))
    np.testing.assert_array_equal(out, [0.5, 0.5])


def test_value_check_fires_under_jit_and_switch_disables_it():
    @jax.jit
    def f(p):
        return _checks.check_probability_vector("p", p).sum()

    assert float(f(jnp.array([0.25, 0.75]))) == 1.0
    with pytest.raises(Exception, match="`p` must hold finite non-negative probabilities"):
        f(jnp.array([0.5, 0.6])).block_until_ready()

    with ssmjax.value_checks(False):
        assert not ssmjax.value_checks_enabled()
        g = jax.jit(lambda p: _checks.check_probability_vector("p", p).sum())
        np.testing.assert_allclose(float(g(jnp.array([0.5, 0.6]))), 1.1)
    assert ssmjax.value_checks_enabled()


def test_a_static_length_out_of_range_raises_even_with_value_checks_off():
    """A Python-int ``length`` is known on the host like a shape: switching value checks off (which
    skips run-time checks of data) must not let ``length=0`` or ``length > T`` through."""
    pi, A, ll = np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.2, 0.8]]), np.zeros((4, 2))
    with ssmjax.value_checks(False):
        for bad in (0, 5):
            with pytest.raises(ValueError, match=rf"`length` must lie in \[1, 4\].*got {bad}"):
                ssmjax.hmm_filter(pi, A, ll, length=bad)
        assert ssmjax.hmm_filter(pi, A, ll, length=3).filtered_probs.shape == (4, 2)


def test_check_psd_rejects_asymmetric_and_indefinite():
    with pytest.raises(ValueError, match="`Q` must be finite and symmetric"):
        _checks.check_psd("Q", jnp.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="`Q` must be positive definite"):
        _checks.check_psd("Q", jnp.array([[1.0, 2.0], [2.0, 1.0]]))
    _checks.check_psd("Q", jnp.eye(3))


def test_check_psd_traced_rejects_indefinite_at_run_time():
    f = jax.jit(lambda q: _checks.check_psd("Q", q).sum())
    assert float(f(jnp.eye(2))) == 2.0
    with pytest.raises(Exception, match="`Q` must be positive definite"):
        f(jnp.array([[1.0, 2.0], [2.0, 1.0]])).block_until_ready()


class _CompileCounter:
    """Counts XLA backend compilations while active (a jax.monitoring listener, registered once)."""

    active = False
    count = 0

    @classmethod
    def listener(cls, event, duration, **kwargs):
        if cls.active and event == "/jax/core/compile/backend_compile_duration":
            cls.count += 1

    def __enter__(self):
        type(self).count, type(self).active = 0, True
        return self

    def __exit__(self, *exc):
        type(self).active = False


jax.monitoring.register_event_duration_secs_listener(_CompileCounter.listener)


def test_eager_value_checks_compile_nothing():
    # Eager checks of concrete host arrays are decided with NumPy: an eager jnp op would
    # compile an XLA kernel per new shape (odd shapes here, so nothing can be cached).
    rng = np.random.default_rng(0)
    g = rng.normal(size=(7, 5, 5))
    cov = jnp.asarray(g @ np.swapaxes(g, -1, -2) + 0.1 * np.eye(5), jnp.float32)
    probs = jnp.asarray(rng.dirichlet(np.ones(11), size=3), jnp.float32)
    indefinite, asymmetric, unnormalised = -cov, cov.at[0, 0, 1].add(1.0), 2.0 * probs
    with _CompileCounter() as counter:
        _checks.check_psd("cov", cov)
        _checks.check_probability_vector("probs", probs)
        with pytest.raises(ValueError, match="`cov` must be positive definite"):
            _checks.check_psd("cov", indefinite)
        with pytest.raises(ValueError, match="`cov` must be finite and symmetric"):
            _checks.check_psd("cov", asymmetric)
        with pytest.raises(ValueError, match="`probs` must hold finite non-negative probabilities"):
            _checks.check_probability_vector("probs", unnormalised)
    assert counter.count == 0


def test_gaussian_from_data_compiles_once_per_shape():
    ys = np.random.default_rng(1).normal(size=(4, 37, 2))
    first = ssmjax.HMM.from_data(ys, 3, "gaussian", key=jax.random.key(0))
    with _CompileCounter() as counter:
        again = ssmjax.HMM.from_data(ys, 3, "gaussian", key=jax.random.key(0))
    assert counter.count == 0  # op by op, its k-means loops recompiled on every call
    np.testing.assert_array_equal(first.emissions.means, again.emissions.means)
    np.testing.assert_array_equal(first.emissions.covs, again.emissions.covs)


def test_to_device_copies_host_data_and_compiles_nothing():
    x = np.arange(6.0).reshape(2, 3)
    with _CompileCounter() as counter:
        y = _checks.to_device(x)
        n = _checks.to_device(np.int64(4))
    assert counter.count == 0  # jnp.asarray compiles a staging program per new host shape
    assert y.dtype == jnp.result_type(float) and n.dtype == jnp.result_type(int)
    x[0, 0] = 99.0  # the caller's array changes afterwards; the device array must not
    np.testing.assert_array_equal(np.asarray(y), np.arange(6.0).reshape(2, 3))


def test_first_fit_em_call_compiles_only_its_loop():
    ys = np.random.default_rng(2).normal(size=(3, 43, 2))  # shapes no other test uses
    model = ssmjax.HMM.from_data(ys, 3, "gaussian", key=jax.random.key(0))
    with _CompileCounter() as counter:
        fitted, lls, _ = ssmjax.fit_em(model, ys, max_iters=3)
        np.asarray(lls), np.asarray(fitted.emissions.means)
    assert counter.count == 1


def test_check_length_static_and_traced():
    with pytest.raises(ValueError, match=r"`length` must lie in \[1, 5\]"):
        _checks.check_length(6, 5)
    with pytest.raises(ValueError, match="scalar integer"):
        _checks.check_length(jnp.array([1, 2]), 5)
    with pytest.raises(ValueError, match="must be an integer"):
        _checks.check_length(2.0, 5)
    f = jax.jit(lambda n: _checks.check_length(n, 5) + 0)
    assert int(f(3)) == 3
    with pytest.raises(Exception, match=r"`length` must lie in \[1, 5\]"):
        f(0).block_until_ready()


def test_runtime_error_types_are_the_documented_ones():
    # Under equinox.filter_jit: EquinoxRuntimeError; under jax.jit: JaxRuntimeError. Both carry the message.
    bad = jnp.array([2.0, -1.0])
    f = eqx.filter_jit(lambda p: _checks.check_probability_vector("p", p))
    with pytest.raises(eqx.EquinoxRuntimeError, match="`p` must hold"):
        f(bad).block_until_ready()
    g = jax.jit(lambda p: _checks.check_probability_vector("p", p))
    with pytest.raises(jax.errors.JaxRuntimeError, match="`p` must hold"):
        g(bad).block_until_ready()


def test_datasets_match_published_series():
    eq = ssmjax.datasets.load_earthquakes()
    assert eq.values.shape == (107,) and eq.years[0] == 1900 and eq.years[-1] == 2006
    assert eq.values[:5].tolist() == [13, 14, 8, 10, 16] and eq.values[-3:].tolist() == [16, 11, 11]
    assert int(eq.values.max()) == 41 and int(eq.values.sum()) == 2072
    nile = ssmjax.datasets.load_nile()
    assert nile.values.shape == (100,) and nile.years[0] == 1871 and nile.years[-1] == 1970
    assert nile.values[0] == 1120 and nile.values[-1] == 740 and nile.values.min() == 456
    np.testing.assert_allclose(nile.values.mean(), 919.35)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert readme.lstrip().startswith("# ssmjax")
    i = lines.index("<!-- test-command -->")
    command = lines[i + 2]
    assert "pytest" in command
    j = lines.index("<!-- demo-command -->")
    assert "ssmjax demo" in lines[j + 2]
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", str(ROOT / "README.md")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == command
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_hmm_methods_validate_eagerly_and_compile_one_program():
    hmm = ssmjax.HMM(
        jnp.array([0.6, 0.4]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
        ssmjax.PoissonEmissions(rates=jnp.array([[1.0, 2.0], [6.0, 9.0]])),
    )
    y = jnp.asarray(np.random.default_rng(2).poisson(3.0, size=(23, 2)), jnp.float32)
    ll = hmm.emissions.log_likelihoods(y)
    # the methods equal the functional API on the model's log-likelihoods
    helpers_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    helpers_close(hmm.marginal_loglik(y), ssmjax.hmm_filter(hmm.initial_probs, hmm.transition_matrix, ll).marginal_loglik)
    helpers_close(hmm.smoother(y).smoothed_probs,
                  ssmjax.hmm_smoother(hmm.initial_probs, hmm.transition_matrix, ll).smoothed_probs)
    np.testing.assert_array_equal(hmm.viterbi(y),
                                  ssmjax.hmm_viterbi(hmm.initial_probs, hmm.transition_matrix, ll)[0])
    # eager errors are ValueErrors naming the problem, before any compute
    bad = y.at[5, 1].set(-1.0)
    with pytest.raises(ValueError, match="non-negative"):
        hmm.filter(bad)
    with pytest.raises(ValueError, match="`emissions` must have shape"):
        hmm.smoother(y[:, :1])
    with pytest.raises(ValueError, match=r"`length` must lie in \[1, 23\]"):
        hmm.viterbi(y, length=24)
    # padding may hold anything
    padded = hmm.filter(bad, length=5)
    helpers_close(padded.marginal_loglik, hmm.marginal_loglik(y[:5]))
    # under jit the same check is a run-time error
    with pytest.raises(Exception, match="non-negative"):
        jax.jit(lambda m, e: m.marginal_loglik(e))(hmm, bad).block_until_ready()
    # one compiled program per eager call on a new shape (op by op it compiled dozens)
    fresh = jnp.asarray(np.random.default_rng(3).poisson(3.0, size=(29, 2)), jnp.float32)
    jnp.asarray(np.int32(1))  # JAX compiles a transfer program once per scalar dtype; not ours to count
    for method in (hmm.filter, hmm.smoother, hmm.viterbi):
        with _CompileCounter() as counter:
            jax.block_until_ready(method(fresh, length=27))
        assert counter.count == 1, method.__name__


def test_lgssm_eager_call_compiles_one_program():
    rng = np.random.default_rng(4)
    dx, dy, num_timesteps = 3, 5, 17  # shapes no other test uses
    g = rng.normal(size=(dx, dx))
    model = ssmjax.LGSSM(
        initial_mean=jnp.zeros(dx), initial_cov=jnp.eye(dx),
        transition_matrix=jnp.asarray(0.5 * g), transition_cov=jnp.asarray(g @ g.T + np.eye(dx)),
        emission_matrix=jnp.asarray(rng.normal(size=(dy, dx))), emission_cov=jnp.eye(dy),
    )
    y = jnp.asarray(rng.normal(size=(num_timesteps, dy)))
    jnp.asarray(np.int32(1))  # JAX compiles a transfer program once per scalar dtype; not ours to count
    with _CompileCounter() as counter:
        jax.block_until_ready(ssmjax.rts_smoother(model, y, length=15))
    assert counter.count == 1  # the covariance checks run in NumPy (op by op they compiled ~25 kernels)
    with pytest.raises(ValueError, match="`transition_cov` must be positive semi-definite"):
        ssmjax.kalman_filter(eqx.tree_at(lambda m: m.transition_cov, model, -model.transition_cov), y)


def test_markov_chain_eager_calls_compile_one_program_each():
    states = np.random.default_rng(5).integers(0, 3, (4, 31))  # shapes no other test uses
    jnp.asarray(np.int32(1))  # JAX compiles a transfer program once per scalar dtype; not ours to count
    chain = ssmjax.MarkovChain.fit(states)
    sequence = jnp.asarray(states[0, :29].astype(np.int32))
    with _CompileCounter() as counter:
        jax.block_until_ready(chain.marginal_loglik(sequence))
    assert counter.count == 1  # op by op: 36 kernels
    with pytest.raises(ValueError, match=r"`states` must hold states in \[0, 3\)"):
        chain.marginal_loglik(np.array([0, 1, 5]))
    a, b = (int(v) for v in states[0, :2])  # an observed start and transition: positive probability
    np.testing.assert_allclose(chain.marginal_loglik(np.array([a, b, 5]), length=2),
                               np.log(chain.initial_probs[a] * chain.transition_matrix[a, b]), rtol=1e-6)


def test_batch_log_likelihood_runs_under_jit_with_traced_lengths():
    """``log_likelihood`` of a padded batch inside a user's ``jit``: traced ``lengths`` are checked at
    run time (naming the first bad entry), and the value equals the eager one."""
    hmm = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
                     ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [6.0]])))
    lgssm = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1), transition_matrix=jnp.eye(1),
                         transition_cov=jnp.eye(1), emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1))
    counts = jnp.array([[[0], [1], [7]], [[5], [6], [0]]])
    for model, ys in ((hmm, counts), (lgssm, counts.astype(float))):
        lengths = jnp.array([3, 2])
        jitted = jax.jit(lambda y, n, model=model: model.log_likelihood(y, lengths=n))
        np.testing.assert_allclose(jitted(ys, lengths), model.log_likelihood(ys, lengths=lengths), rtol=1e-12)
        # the first bad position is found in a host callback; XLA reports its error as either type
        with pytest.raises((jax.errors.JaxRuntimeError, ValueError), match=r"lengths\[1\]"):
            jitted(ys, jnp.array([3, 4])).block_until_ready()


def test_count_arguments_accept_numpy_ints_and_name_themselves_when_not_positive_ints():
    """Every count argument goes through one check: a Python or NumPy integer >= 1 is accepted (and used
    as a Python int), anything else (0, a negative, a float, a bool, a string) is a ValueError naming it."""
    import optax

    key = jax.random.key(0)
    pi, a, ll = np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.2, 0.8]]), np.zeros((6, 2))
    counts = np.random.default_rng(0).poisson(3.0, size=(2, 20, 1)).astype(float)
    hmm = ssmjax.HMM.from_data(counts, 2, "poisson", key=key)
    lgssm = ssmjax.LGSSM(initial_mean=np.zeros(1), initial_cov=np.eye(1), transition_matrix=0.9 * np.eye(1),
                         transition_cov=np.eye(1), emission_matrix=np.eye(1), emission_cov=np.eye(1))
    calls = {
        "max_iters": lambda n: ssmjax.fit_em(hmm, counts, max_iters=n),
        "num_steps": lambda n: ssmjax.fit_sgd(hmm, counts, optax.adam(1e-2), num_steps=n),
        "checkpoint_every": lambda n: ssmjax.fit_em(hmm, counts, max_iters=1, checkpoint_every=n),
        "num_timesteps": lambda n: hmm.sample(n, key=key),
        "lgssm num_timesteps": lambda n: ssmjax.lgssm_sample(lgssm, n, key=key),
        "predict num_steps": lambda n: ssmjax.hmm_predict(pi, a, ll, num_steps=n),
        "chain num_timesteps": lambda n: ssmjax.MarkovChain(initial_probs=pi, transition_matrix=a).sample(n, key=key),
        "num_restarts": lambda n: ssmjax.select_num_states(counts, [2], "poisson", num_restarts=n, num_folds=2, key=key),
    }
    for label, call in calls.items():
        name = label.split()[-1]
        for bad in (0, -2, 2.0, True, "2"):
            with pytest.raises(ValueError, match=f"`{name}` must be a positive int; got {bad!r}"):
                call(bad)
        call(np.int64(2))  # a NumPy integer works like a Python one
