r"""The linear-Gaussian state-space model (LGSSM) and its conventions.

.. _lgssm-convention:

**Model.** For time steps :math:`t = 1, \dots, T` (0-based in arrays: ``emissions[t-1]``),

.. math::

    x_1 &\sim \mathcal N(\mu_0, \Sigma_0), \\
    x_{t+1} &= A_t x_t + B_t u_{t+1} + b_t + w_t, & w_t &\sim \mathcal N(0, Q_t), \\
    y_t &= C_t x_t + D_t u_t + d_t + v_t, & v_t &\sim \mathcal N(0, R_t),

with :math:`\mu_0` = ``initial_mean`` (Dx), :math:`\Sigma_0` = ``initial_cov`` (Dx, Dx),
:math:`A` = ``transition_matrix`` (Dx, Dx), :math:`Q` = ``transition_cov`` (Dx, Dx),
:math:`B` = ``transition_input_matrix`` (Dx, Du), :math:`b` = ``transition_offset`` (Dx),
:math:`C` = ``emission_matrix`` (Dy, Dx), :math:`R` = ``emission_cov`` (Dy, Dy),
:math:`D` = ``emission_input_matrix`` (Dy, Du), :math:`d` = ``emission_offset`` (Dy).

**Arrays are 0-based.** ``inputs`` has shape (T, Du): ``inputs[t]`` is :math:`u_{t+1}`.
Transition entry ``t`` (of a time-varying field with a leading ``T-1`` axis) moves
``x[t]`` to ``x[t+1]`` and uses ``inputs[t+1]``; emission entry ``t`` (leading ``T``
axis) produces ``emissions[t]`` and uses ``inputs[t]``. A field without the leading
axis is shared by all steps. Optional fields default to ``None`` (absent = zero).

**Noise.** ``initial_cov`` and ``emission_cov`` must be symmetric positive definite;
``transition_cov`` symmetric positive *semi*-definite (exactly deterministic state
components are allowed).

**Missing data.** ``NaN`` entries of ``emissions`` are missing: a whole step or any
subset of its dimensions. Inference conditions exactly on the observed entries only.

**Padding.** ``length`` (see :mod:`ssmjax._types`) marks steps ``t >= length`` as
padding. Emissions, inputs and time-varying parameters at padded steps may hold
anything (NaN, inf): they change neither the results at real steps nor gradients.
At padded steps the outputs repeat the last real step: filtered, predicted and
smoothed moments equal the filtered moments of step ``length - 1`` (which are also its
smoothed moments), smoothed cross-covariances of pairs ``(t, t+1)`` with
``t + 1 >= length`` are zero, and posterior samples repeat ``x[length - 1]``.

**Value checks.** Covariances are checked (symmetric, positive (semi-)definite) by each
inference function, eagerly (``ValueError``) or under ``jit`` (``equinox.error_if``),
behind :func:`ssmjax.set_value_checks`. Shapes are checked at construction and again,
against the emissions, by each function.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Optional

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .. import _checks, _deprecation
from . import constraints as _constraints
from . import diffuse as _diffuse
from . import fit
from .inference import kalman_filter, lgssm_forecast, marginal_loglik, lgssm_sample, lgssm_sample_posterior, rts_smoother
from .results import KalmanFilterResult, LGSSMForecastResult, RTSSmootherResult
from .joint import lgssm_log_joint
from .params import FIELDS, AbstractLGSSM, _to_array, model_dims, validate_shapes


class LGSSM(AbstractLGSSM):
    r"""A linear-Gaussian state-space model (see the :ref:`convention <lgssm-convention>`).

    .. math::

        x_1 \sim \mathcal N(\mu_0, \Sigma_0),\quad
        x_{t+1} = A_t x_t + B_t u_{t+1} + b_t + w_t,\quad
        y_t = C_t x_t + D_t u_t + d_t + v_t,

    with :math:`w_t \sim \mathcal N(0, Q_t)` and :math:`v_t \sim \mathcal N(0, R_t)`.
    Parameters are stored as given (covariances, not factors). Transition fields may
    carry a leading ``T-1`` axis and emission fields a leading ``T`` axis
    (time-varying). Optional fields are ``None`` when absent (zero).

    Args:
        initial_mean: :math:`\mu_0`, shape (Dx,).
        initial_cov: :math:`\Sigma_0`, shape (Dx, Dx), positive definite.
        transition_matrix: :math:`A`, shape (Dx, Dx) or (T-1, Dx, Dx).
        transition_cov: :math:`Q`, shape (Dx, Dx) or (T-1, Dx, Dx), positive semi-definite.
        emission_matrix: :math:`C`, shape (Dy, Dx) or (T, Dy, Dx).
        emission_cov: :math:`R`, shape (Dy, Dy) or (T, Dy, Dy), positive definite.
        transition_input_matrix: :math:`B`, shape (Dx, Du) or (T-1, Dx, Du), optional.
        emission_input_matrix: :math:`D`, shape (Dy, Du) or (T, Dy, Du), optional.
        transition_offset: :math:`b`, shape (Dx,) or (T-1, Dx), optional.
        emission_offset: :math:`d`, shape (Dy,) or (T, Dy), optional.
        structure: what fitting keeps of each covariance's form, e.g.
            ``{"emission_cov": "diagonal"}``: ``"full"`` (the default), ``"diagonal"`` or
            ``"scalar"`` (:math:`\sigma^2 I`). The given value must have that form.
        fixed: entries that fitting holds at their given values, e.g.
            ``{"transition_matrix": mask, "emission_offset": True}``: ``True`` for a whole field,
            or a boolean array of its shape (``True`` = held); for a diagonal covariance a
            ``(D,)`` mask over its variances. See :mod:`ssmjax._lgssm.constraints`.
        diffuse: ``True`` or a ``(Dx,)`` boolean mask: these components of the initial state get a
            flat (improper) prior, handled exactly (their ``initial_mean`` and ``initial_cov``
            entries are not used); the log-likelihood is then the exact diffuse one of Koopman
            and Durbin, as statsmodels reports it. See :mod:`ssmjax._lgssm.diffuse`.

    Raises:
        ValueError: a field has the wrong shape (the message names the field, the
            expected and the received shape), or a constraint does not fit the fields.

    Example:
        >>> import jax.numpy as jnp
        >>> import ssmjax
        >>> model = ssmjax.LGSSM(
        ...     initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2),
        ...     transition_matrix=jnp.array([[1.0, 1.0], [0.0, 1.0]]),
        ...     transition_cov=0.01 * jnp.eye(2),
        ...     emission_matrix=jnp.array([[1.0, 0.0]]), emission_cov=jnp.eye(1))
        >>> model.emission_matrix.shape
        (1, 2)

        The methods call the inference functions on one sequence (``(T, Dy)``) or, for the
        criteria, on a padded batch (``(B, T, Dy)``):

        >>> import jax
        >>> states, y = model.sample(50, key=jax.random.key(0))
        >>> post = model.smoother(y)
        >>> bool(jnp.allclose(post.marginal_loglik, model.filter(y).marginal_loglik))
        True
        >>> bool(jnp.allclose(model.marginal_loglik(y), post.marginal_loglik))
        True
        >>> draw = model.sample_posterior(y, key=jax.random.key(1))
        >>> draw.shape, model.log_joint(draw, y).shape
        ((50, 2), ())
        >>> model.forecast(y, 5).emission_means.shape
        (5, 1)
        >>> batch = jnp.stack([y, y])
        >>> bool(jnp.allclose(model.log_likelihood(batch), 2 * post.marginal_loglik))
        True
        >>> model.bic(batch) - model.aic(batch) > 0  # log(100) > 2 per parameter
        True
    """

    initial_mean: jax.Array
    initial_cov: jax.Array
    transition_matrix: jax.Array
    transition_cov: jax.Array
    emission_matrix: jax.Array
    emission_cov: jax.Array
    transition_input_matrix: Optional[jax.Array] = None
    emission_input_matrix: Optional[jax.Array] = None
    transition_offset: Optional[jax.Array] = None
    emission_offset: Optional[jax.Array] = None
    constraints: tuple = eqx.field(static=True, default=())
    diffuse: tuple = eqx.field(static=True, default=())

    @typing.no_type_check
    def __init__(
        self,
        *,
        initial_mean: Float[ArrayLike, " Dx"],
        initial_cov: Float[ArrayLike, "Dx Dx"],
        transition_matrix: Float[ArrayLike, "Dx Dx"] | Float[ArrayLike, "T_minus_1 Dx Dx"],
        transition_cov: Float[ArrayLike, "Dx Dx"] | Float[ArrayLike, "T_minus_1 Dx Dx"],
        emission_matrix: Float[ArrayLike, "Dy Dx"] | Float[ArrayLike, "T Dy Dx"],
        emission_cov: Float[ArrayLike, "Dy Dy"] | Float[ArrayLike, "T Dy Dy"],
        transition_input_matrix: Float[ArrayLike, "Dx Du"] | Float[ArrayLike, "T_minus_1 Dx Du"] | None = None,
        emission_input_matrix: Float[ArrayLike, "Dy Du"] | Float[ArrayLike, "T Dy Du"] | None = None,
        transition_offset: Float[ArrayLike, " Dx"] | Float[ArrayLike, "T_minus_1 Dx"] | None = None,
        emission_offset: Float[ArrayLike, " Dy"] | Float[ArrayLike, "T Dy"] | None = None,
        structure: dict[str, str] | None = None,
        fixed: dict[str, bool | Bool[ArrayLike, "..."]] | None = None,
        diffuse: bool | Bool[ArrayLike, " Dx"] | None = None,
    ):
        self.initial_mean = _to_array(initial_mean)
        self.initial_cov = _to_array(initial_cov)
        self.transition_matrix = _to_array(transition_matrix)
        self.transition_cov = _to_array(transition_cov)
        self.emission_matrix = _to_array(emission_matrix)
        self.emission_cov = _to_array(emission_cov)
        self.transition_input_matrix = _to_array(transition_input_matrix)
        self.emission_input_matrix = _to_array(emission_input_matrix)
        self.transition_offset = _to_array(transition_offset)
        self.emission_offset = _to_array(emission_offset)
        if self.transition_input_matrix is not None and self.emission_input_matrix is not None:
            du1 = self.transition_input_matrix.shape[-1]
            du2 = self.emission_input_matrix.shape[-1]
            if du1 != du2:
                raise ValueError(
                    "`transition_input_matrix` and `emission_input_matrix` must agree on Du; "
                    f"got shapes {tuple(self.transition_input_matrix.shape)} and "
                    f"{tuple(self.emission_input_matrix.shape)}."
                )
        validate_shapes(self)
        self.diffuse = _diffuse.canonical(diffuse, self.initial_mean.shape[-1])
        self.constraints = _constraints.canonical(
            {name: getattr(self, name) for name in FIELDS}, structure, fixed
        )

    @property
    def state_dim(self) -> int:
        """Dx."""
        return self.initial_mean.shape[-1]

    @property
    def emission_dim(self) -> int:
        """Dy."""
        return self.emission_matrix.shape[-2]

    @property
    def input_dim(self) -> Optional[int]:
        """Du, or None when the model takes no inputs."""
        return model_dims(self)[2]

    @property
    def structure(self) -> dict[str, str]:
        """The form each covariance keeps under fitting: ``"full"``, ``"diagonal"`` or ``"scalar"``."""
        return {name: _constraints.structure_of(self.constraints, name) for name in _constraints.COVARIANCES}

    @property
    def fixed(self) -> dict[str, np.ndarray]:
        """Masks of the entries fitting holds (``True`` = held), for the fields that have any."""
        out = {}
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None:
                mask = _constraints.fixed_of(self.constraints, name, tuple(value.shape))
                if mask.any():
                    out[name] = np.diag(mask) if self.structure.get(name) == "diagonal" else mask
        return out

    @typing.no_type_check
    def with_constraints(
        self,
        *,
        structure: dict[str, str] | None = None,
        fixed: dict[str, bool | Bool[ArrayLike, "..."]] | None = None,
    ) -> LGSSM:
        """The same model with these constraints in place of its own (see ``structure`` and ``fixed`` above).

        Example:
            >>> import jax.numpy as jnp, numpy as np, ssmjax
            >>> trend = ssmjax.LGSSM(  # local linear trend with a smooth (noise-free) slope
            ...     initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2),
            ...     transition_matrix=jnp.array([[1.0, 1.0], [0.0, 1.0]]),
            ...     transition_cov=jnp.diag(jnp.array([1.0, 0.0])),
            ...     emission_matrix=jnp.array([[1.0, 0.0]]), emission_cov=jnp.eye(1))
            >>> trend = trend.with_constraints(
            ...     structure={"transition_cov": "diagonal"},
            ...     fixed={"transition_matrix": True, "emission_matrix": True,
            ...            "transition_cov": np.array([False, True])})
            >>> trend.num_parameters()  # initial mean 2 and cov 3, level variance 1, noise variance 1
            7
        """
        fields = {name: getattr(self, name) for name in FIELDS}
        return LGSSM(**fields, structure=structure, fixed=fixed, diffuse=self.diffuse or None)

    # ------------------------------------------------------------ inference
    @typing.no_type_check
    def marginal_loglik(
        self,
        emissions: Float[ArrayLike, "T Dy"],
        *,
        length: Int[ArrayLike, ""] | None = None,
        inputs: Float[ArrayLike, "T Du"] | None = None,
    ) -> Float[Array, ""]:
        """``log p(y_{1:T})`` of one sequence (see :func:`ssmjax.kalman_filter`); the exact diffuse
        log-likelihood when the model has ``diffuse`` components."""
        return marginal_loglik(self, emissions, inputs=inputs, length=length)

    @typing.no_type_check
    def filter(
        self,
        emissions: Float[ArrayLike, "T Dy"],
        *,
        inputs: Float[ArrayLike, "T Du"] | None = None,
        length: Int[ArrayLike, ""] | None = None,
        method: str = "auto",
    ) -> KalmanFilterResult:
        """Kalman filter of one sequence; see :func:`ssmjax.kalman_filter`."""
        return kalman_filter(self, emissions, inputs=inputs, length=length, method=method)

    @typing.no_type_check
    def smoother(
        self,
        emissions: Float[ArrayLike, "T Dy"],
        *,
        inputs: Float[ArrayLike, "T Du"] | None = None,
        length: Int[ArrayLike, ""] | None = None,
        method: str = "auto",
    ) -> RTSSmootherResult:
        """RTS smoother of one sequence; see :func:`ssmjax.rts_smoother`."""
        return rts_smoother(self, emissions, inputs=inputs, length=length, method=method)

    @_deprecation.key_last("LGSSM.sample_posterior", skip=1)
    @typing.no_type_check
    def sample_posterior(
        self,
        emissions: Float[ArrayLike, "T Dy"],
        *,
        inputs: Float[ArrayLike, "T Du"] | None = None,
        length: Int[ArrayLike, ""] | None = None,
        key: PRNGKeyArray,
    ) -> Float[Array, "T Dx"]:
        """Exact joint draw of ``x_{1:T} | y``; see :func:`ssmjax.lgssm_sample_posterior`."""
        return lgssm_sample_posterior(self, emissions, inputs=inputs, length=length, key=key)

    def posterior_sample(self, key, emissions, *, inputs=None, length=None):
        """Deprecated spelling of :meth:`sample_posterior`."""
        _deprecation.warn("LGSSM.posterior_sample(key, ...)", "LGSSM.sample_posterior(..., key=key)")
        return self.sample_posterior(emissions, inputs=inputs, length=length, key=key)

    @typing.no_type_check
    def log_joint(
        self,
        states: Float[ArrayLike, "T Dx"],
        emissions: Float[ArrayLike, "T Dy"],
        *,
        inputs: Float[ArrayLike, "T Du"] | None = None,
        length: Int[ArrayLike, ""] | None = None,
    ) -> Float[Array, ""]:
        """``log p(y_{1:T}, x_{1:T})`` of a state path; see :func:`ssmjax.lgssm_log_joint`."""
        return lgssm_log_joint(self, states, emissions, inputs=inputs, length=length)

    @_deprecation.key_last("LGSSM.sample", skip=1)
    @typing.no_type_check
    def sample(
        self,
        num_timesteps: int,
        *,
        inputs: Float[ArrayLike, "T Du"] | None = None,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, "T Dx"], Float[Array, "T Dy"]]:
        """Draw ``(states, emissions)``; see :func:`ssmjax.lgssm_sample`."""
        return lgssm_sample(self, num_timesteps, inputs=inputs, key=key)

    @typing.no_type_check
    def forecast(
        self,
        emissions: Float[ArrayLike, "T Dy"],
        num_steps: int,
        *,
        inputs: Float[ArrayLike, "T Du"] | None = None,
        length: Int[ArrayLike, ""] | None = None,
        future_inputs: Float[ArrayLike, "H Du"] | None = None,
    ) -> LGSSMForecastResult:
        """Predictive moments of future states and emissions; see :func:`ssmjax.lgssm_forecast`."""
        return lgssm_forecast(self, emissions, num_steps, inputs=inputs, length=length,
                              future_inputs=future_inputs)

    # ------------------------------------------------------------- fitting
    # (implemented in ssmjax/_lgssm/fit.py)
    def parameter_names(self) -> tuple[str, ...]:
        """Names accepted by ``frozen``: the fields that are not ``None``."""
        return fit.parameter_names(self)

    @typing.no_type_check
    def num_parameters(self, frozen: Sequence[str] = ()) -> int:
        """Free parameters, as AIC and BIC count them: every entry not held (``fixed``), a full
        covariance counted once per pair, a diagonal one per free variance, a scalar one once;
        names in ``frozen`` (as :func:`ssmjax.fit_em` takes them) count nothing."""
        return fit.num_parameters(self, frozen)

    @typing.no_type_check
    def log_likelihood(
        self,
        emissions: Float[ArrayLike, "B T Dy"],
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        inputs: Float[ArrayLike, "B T Du"] | None = None,
    ) -> Float[Array, ""]:
        """``sum_b log p(y^(b))`` of a padded batch ``(B, T, Dy)`` (``lengths`` and ``inputs`` as :func:`ssmjax.fit_em`)."""
        return fit.batch_loglik(self, emissions, lengths, inputs)

    @typing.no_type_check
    def aic(
        self,
        emissions: Float[ArrayLike, "B T Dy"],
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        inputs: Float[ArrayLike, "B T Du"] | None = None,
        frozen: Sequence[str] = (),
    ) -> float:
        """Akaike's criterion of a padded batch, ``-2 log p(y) + 2 p`` (:meth:`num_parameters`); lower is better."""
        loglik = self.log_likelihood(emissions, lengths=lengths, inputs=inputs)
        return float(-2.0 * loglik + 2.0 * self.num_parameters(frozen))

    @typing.no_type_check
    def bic(
        self,
        emissions: Float[ArrayLike, "B T Dy"],
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        inputs: Float[ArrayLike, "B T Du"] | None = None,
        frozen: Sequence[str] = (),
    ) -> float:
        """Schwarz's criterion of a padded batch, ``-2 log p(y) + p log N`` with ``N`` the number of real
        steps; lower is better."""
        emissions, lengths, inputs = self._check_batch(emissions, lengths, inputs)
        loglik = self.log_likelihood(emissions, lengths=lengths, inputs=inputs)
        num_steps = int(np.sum(_checks.host_copy(lengths)))
        return float(-2.0 * loglik + np.log(num_steps) * self.num_parameters(frozen))

    def _check_batch(self, emissions, lengths, inputs):
        return fit.check_batch(self, emissions, lengths, inputs)

    def _check_em(self, frozen):
        return fit.check_em(self, frozen)

    def _e_step(self, emissions, length, inputs):
        return fit.e_step(self, emissions, length, inputs)

    def _m_step(self, stats, frozen):
        return fit.m_step(self, stats, frozen)

    def _unconstrained(self):
        return fit.unconstrained(self)

    def _from_unconstrained(self, params):
        return fit.from_unconstrained(self, params)
