"""The two contracts of the harness: :class:`Estimator` and :class:`Task`.

An estimator turns logits and a cost into an :class:`Estimate`; a task is a stochastic objective
``L(theta) = E_{z ~ p_theta}[f(z)]`` with parameters, data and (where feasible) exact answers.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

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
        over its samples), for reporting (``loss_estimator`` along training); not the quantity
        differentiated.
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

    def state_dict(self) -> dict[str, Any]:
        """The estimator's state for a checkpoint: the training step and every instance attribute
        that is not a hyperparameter (baselines, control-variate networks, their optimisers).

        The default stores numbers, strings, None, tensors, ``nn.Module``s, optimisers, objects
        with their own ``state_dict`` / ``load_state_dict`` pair, and lists and dicts of these,
        so stateless estimators and estimators whose state lives in torch objects need nothing
        more. Anything else is refused with an error; override this pair for it.
        """
        return {"step": self.step,
                "attributes": {name: _encode_state(self, name, value)
                               for name, value in self._state_attributes().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, in place where possible (tensors are copied
        into the existing ones, modules and optimisers load their own state)."""
        current = self._state_attributes()
        saved = state["attributes"]
        if set(saved) != set(current):
            raise EstbenchError(
                f"estimator '{self.name}': saved state has attributes {sorted(saved)}, this "
                f"instance has {sorted(current)}; the checkpoint is from other code"
            )
        self.step = state["step"]
        for name, encoded in saved.items():
            setattr(self, name, _decode_state(self, name, current[name], encoded))

    def _state_attributes(self) -> dict[str, Any]:
        hyperparameters = {f.name for f in dataclasses.fields(self)}
        return {name: value for name, value in vars(self).items()
                if name not in hyperparameters and name not in ("step", "training")}

    def label(self) -> str:
        """A short human-readable name: the registry name plus non-default hyperparameters."""
        defaults = type(self)()
        diff = {k: v for k, v in self.params().items() if getattr(defaults, k) != getattr(self, k)}
        inner = ", ".join(f"{k}={v}" for k, v in diff.items())
        return f"{self.name}({inner})" if inner else self.name


_PLAIN = (type(None), bool, int, float, str)


def _has_state(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None))


def _encode_state(owner: Estimator, name: str, value: Any) -> tuple[str, Any]:
    """(kind, payload) for one attribute of an estimator's state (see
    :meth:`Estimator.state_dict`)."""
    if isinstance(value, _PLAIN):
        return "plain", value
    if isinstance(value, Tensor):
        return "tensor", value.detach().clone()
    if isinstance(value, (nn.Module, torch.optim.Optimizer)) or _has_state(value):
        return "state", value.state_dict()
    if isinstance(value, (list, tuple)):
        return "list", [_encode_state(owner, f"{name}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return "dict", {k: _encode_state(owner, f"{name}[{k!r}]", v) for k, v in value.items()}
    raise EstbenchError(
        f"estimator '{owner.name}': cannot checkpoint attribute '{name}' of type "
        f"{type(value).__name__}; give it state_dict() / load_state_dict() methods or override "
        f"the estimator's state_dict() and load_state_dict()"
    )


def _decode_state(owner: Estimator, name: str, current: Any, encoded: tuple[str, Any]) -> Any:
    """The restored value of one attribute, reusing ``current`` where it can hold the state."""
    kind, payload = encoded
    if kind == "plain":
        return payload
    if kind == "tensor":
        if isinstance(current, Tensor) and current.shape == payload.shape:
            with torch.no_grad():
                return current.copy_(payload)
        return payload.clone()
    if kind == "state":
        if not _has_state(current):
            raise EstbenchError(
                f"estimator '{owner.name}': attribute '{name}' holds saved state but is "
                f"{type(current).__name__} now; override load_state_dict() to rebuild it"
            )
        current.load_state_dict(payload)
        return current
    if kind == "list":
        items = list(current) if isinstance(current, (list, tuple)) else []
        items += [None] * (len(payload) - len(items))
        restored = [_decode_state(owner, f"{name}[{i}]", c, e)
                    for i, (c, e) in enumerate(zip(items, payload))]
        return tuple(restored) if isinstance(current, tuple) else restored
    items = current if isinstance(current, dict) else {}
    return {k: _decode_state(owner, f"{name}[{k!r}]", items.get(k), e) for k, e in payload.items()}


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
