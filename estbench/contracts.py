"""The two contracts of the harness: :class:`Estimator` and :class:`Task`.

An estimator turns logits and a cost into an :class:`Estimate`; a task is a stochastic objective
``L(theta) = E_{z ~ p_theta}[f(z)]`` with parameters, data and (where feasible) exact answers.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from estbench.errors import EstbenchError
from estbench.hyperparams import HyperParams
from estbench.latents import DEFAULT_MAX_STATES, Latent, expectation_by_enumeration

__all__ = ["Estimate", "Estimator", "Task", "Cost", "Params"]

Cost = Callable[[Tensor], Tensor]
Params = dict[str, Tensor]


@dataclass
class Estimate:
    """What an estimator returns for one call.

    surrogate: ``[*batch]``; ``surrogate.mean().backward()`` deposits the gradient estimate of
        ``E[f(z)]`` (averaged over the batch) in every parameter upstream of the logits and in ``f``.
    value: ``[*batch]`` detached value of ``f`` at the points the estimator evaluated (averaged
        over its samples), for reporting; not the quantity differentiated.
    f_evals: evaluations of ``f`` per batch element spent on this estimate.
    """

    surrogate: Tensor
    value: Tensor
    f_evals: int
    extras: dict[str, Any] = field(default_factory=dict)


class Estimator(HyperParams, abc.ABC):
    """A gradient estimator for ``E_{z ~ p(logits)}[f(z)]``.

    Subclasses are dataclasses whose fields are hyperparameters (see :func:`estbench.hyper`), and
    implement :meth:`_estimate`. ``f`` receives ``z`` of shape ``[*S, *batch, *event]`` (any number
    of leading sample dims ``S``, then the logits' batch shape) and returns ``[*S, *batch]``.

    Class attributes state the contract that generic code and tests read.
    """

    kind: ClassVar[str] = "estimator"
    description: ClassVar[str] = ""
    supports: ClassVar[frozenset[str]] = frozenset({"bernoulli", "categorical"})
    unbiased: ClassVar[bool] = False
    reparameterised: ClassVar[bool] = False
    relaxed_inputs: ClassVar[bool] = False
    min_samples: ClassVar[int] = 1
    vectorisable: ClassVar[bool] = True
    #: True when an estimate has no randomness (the same logits give the same estimate, e.g.
    #: exact enumeration): the measurement draws it once and treats M draws as identical.
    deterministic: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.step = 0
        self.training = False

    def train(self, mode: bool = True) -> Estimator:
        """Switch learning of the estimator's own parameters (control variates, baselines) on or
        off. The runner turns it on for training steps and off for every fixed-parameter
        measurement, where state is frozen."""
        self.training = mode
        return self

    def estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        """Validate the logits against ``latent`` and return an :class:`Estimate`."""
        if latent.kind not in self.supports:
            raise EstbenchError(
                f"estimator '{self.name}' does not support {latent.kind} latents "
                f"(it supports: {', '.join(sorted(self.supports))})"
            )
        latent.check_logits(logits)
        return self._estimate(logits, f, latent)

    __call__ = estimate

    @abc.abstractmethod
    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        """The estimator itself; logits are already validated."""

    def check_latent(self, latent: Latent) -> None:
        """Raise :class:`EstbenchError` if this configuration cannot run on ``latent``."""

    def begin_step(self, step: int) -> None:
        """Tell the estimator the training step (for schedules such as temperature annealing)."""
        self.step = step

    def update(self, estimate: Estimate) -> None:
        """State hook, called by the training loop after each optimiser step with that step's
        estimate: move a baseline, or take a step on the estimator's own parameters with the
        gradients that :meth:`_estimate` left in ``estimate.extras`` while ``training``. Never
        called during fixed-parameter measurement, so state is frozen there."""

    def label(self) -> str:
        """A short human-readable name: the registry name plus non-default hyperparameters."""
        defaults = type(self)()
        diff = {k: v for k, v in self.params().items() if getattr(defaults, k) != getattr(self, k)}
        inner = ", ".join(f"{k}={v}" for k, v in diff.items())
        return f"{self.name}({inner})" if inner else self.name


class Task(HyperParams, abc.ABC):
    """A stochastic objective ``L(theta) = E_{z ~ p_theta}[f(z)]`` (a cost to minimise).

    Subclasses are dataclasses of hyperparameters; they implement :attr:`latent`, :meth:`init`,
    :meth:`logits` and :meth:`cost`, and override the exact answers when a closed form exists.
    ``logits`` and ``cost`` must be pure functions of ``params`` (no in-place updates), so that the
    measurement engine can batch replicas of the parameters.
    """

    kind: ClassVar[str] = "task"
    description: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    max_enumeration_states: ClassVar[int] = DEFAULT_MAX_STATES
    #: False when ``cost`` reads no parameter (toy costs): replicas then share one ``f``.
    cost_depends_on_params: ClassVar[bool] = True

    @property
    @abc.abstractmethod
    def latent(self) -> Latent:
        """The latent space."""

    @abc.abstractmethod
    def init(self, generator: torch.Generator, device: torch.device | str = "cpu") -> Params:
        """Draw the task's fixed constants (if any) and return fresh initial parameters (leaf
        tensors with ``requires_grad=True``)."""

    #: True when gradient quality should also be measured w.r.t. the logits themselves
    logits_metrics: ClassVar[bool] = False

    def preflight(self) -> None:
        """Check, before anything runs, that the task can run here (e.g. that its data files are
        present or can be downloaded); raise :class:`EstbenchError` with the fix if not."""

    def sample_batch(self, generator: torch.Generator) -> Any:
        """A training batch (``None`` for tasks without data)."""
        return None

    def gradient_batch(self, generator: torch.Generator) -> Any:
        """The fixed batch on which gradient quality is measured (default: a training batch)."""
        return self.sample_batch(generator)

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named subsets of the parameters (e.g. ``{"encoder": [...]}``) whose gradient quality
        is reported separately, as ``<group>/grad_*`` metrics."""
        return {}

    @abc.abstractmethod
    def logits(self, params: Params, batch: Any) -> Tensor:
        """Logits ``[*batch, *latent.event_shape]``."""

    @abc.abstractmethod
    def cost(self, params: Params, batch: Any) -> Cost:
        """The cost ``f(z) -> [*S, *batch]`` for ``z`` of shape ``[*S, *batch, *event]``; it must
        accept relaxed (continuous) ``z`` as well as hard samples."""

    def exact_objective(self, params: Params, batch: Any = None) -> Tensor | None:
        """Exact ``L(theta)`` averaged over the batch, or ``None`` when infeasible. The default
        enumerates the latent space when it has at most ``max_enumeration_states`` states."""
        if self.latent.num_states > self.max_enumeration_states:
            return None
        logits = self.logits(params, batch)
        f = self.cost(params, batch)
        return expectation_by_enumeration(
            self.latent, logits, f, self.max_enumeration_states
        ).mean()

    def exact_gradient(self, params: Params, batch: Any = None) -> Params | None:
        """Exact ``grad L(theta)`` per parameter, or ``None``. The default differentiates
        :meth:`exact_objective`."""
        detached = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            value = self.exact_objective(detached, batch)
            if value is None:
                return None
            grads = torch.autograd.grad(value, list(detached.values()), allow_unused=True)
        return {
            k: torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(detached.items(), grads)
        }

    def evaluate(self, params: Params, generator: torch.Generator) -> dict[str, float]:
        """Held-out evaluation metrics; by default ``loss_exact`` where it can be computed."""
        with torch.no_grad():
            value = self.exact_objective(params, self.sample_batch(generator))
        return {} if value is None else {"loss_exact": float(value)}
