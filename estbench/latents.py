"""Discrete latent spaces: Bernoulli ``[..., D]`` and categorical ``[..., D, K]`` logits.

Every sampler draws from the ambient torch generator (seeded by the runner), so results are
reproducible per cell, and works for any leading batch shape. Samples are float tensors (0/1 or
one-hot) so that a cost ``f`` written for hard samples also accepts relaxed ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from estbench.errors import EstbenchError
from estbench.memory import current_budget, megabytes, peak_bytes

__all__ = [
    "Latent",
    "uniform",
    "gumbel",
    "logistic",
    "one_hot",
    "expectation_by_enumeration",
    "states_per_chunk",
    "DEFAULT_MAX_STATES",
]

DEFAULT_MAX_STATES = 65_536
KINDS = ("bernoulli", "categorical")


def uniform(shape: torch.Size | tuple, like: Tensor) -> Tensor:
    """U(0, 1) noise strictly inside (0, 1), so that logs of it and of 1 - it stay finite."""
    tiny = torch.finfo(like.dtype).tiny
    u = torch.rand(shape, dtype=like.dtype, device=like.device)
    return u.clamp(tiny, 1.0 - torch.finfo(like.dtype).eps)


def gumbel(shape: torch.Size | tuple, like: Tensor) -> Tensor:
    """Standard Gumbel noise, G = -log E with E ~ Exp(1) = -log U."""
    return -torch.log(-torch.log(uniform(shape, like)))


def logistic(shape: torch.Size | tuple, like: Tensor) -> Tensor:
    """Standard logistic noise, log U - log(1 - U)."""
    u = uniform(shape, like)
    return torch.log(u) - torch.log1p(-u)


def one_hot(index: Tensor, categories: int, dtype: torch.dtype) -> Tensor:
    """One-hot encoding as a float tensor ``[..., K]`` (out of place, so it also runs under
    ``torch.func.vmap``)."""
    values = torch.arange(categories, device=index.device)
    return (index.unsqueeze(-1) == values).to(dtype)


@dataclass(frozen=True)
class Latent:
    """A product of ``dim`` independent discrete variables.

    ``kind='bernoulli'``: logits ``[..., D]``, samples in {0, 1}^D.
    ``kind='categorical'``: logits ``[..., D, K]``, one-hot samples ``[..., D, K]``.
    """

    kind: str
    dim: int
    categories: int = 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EstbenchError(f"latent kind must be one of {KINDS}, got {self.kind!r}")
        if self.dim < 1:
            raise EstbenchError(f"latent dim must be >= 1, got {self.dim}")
        if self.categories < 2:
            raise EstbenchError(f"latent categories must be >= 2, got {self.categories}")
        if self.kind == "bernoulli" and self.categories != 2:
            raise EstbenchError("a bernoulli latent has categories = 2")

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.dim,) if self.kind == "bernoulli" else (self.dim, self.categories)

    @property
    def event_ndim(self) -> int:
        return len(self.event_shape)

    @property
    def num_states(self) -> int:
        """Size of the joint latent space, K^D (an exact Python integer)."""
        return self.categories**self.dim

    def describe(self) -> str:
        if self.kind == "bernoulli":
            return f"bernoulli D={self.dim}"
        return f"categorical D={self.dim} K={self.categories}"

    def check_logits(self, logits: Tensor) -> None:
        """Raise a one-line error unless ``logits`` ends in :attr:`event_shape`."""
        if not isinstance(logits, Tensor):
            raise EstbenchError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if tuple(logits.shape[-self.event_ndim :]) != self.event_shape or (
            logits.dim() < self.event_ndim
        ):
            want = "[..., D]" if self.kind == "bernoulli" else "[..., D, K]"
            raise EstbenchError(
                f"logits of shape {tuple(logits.shape)} do not fit a {self.describe()} latent; "
                f"expected {want} ending in {self.event_shape}"
            )
        if not logits.is_floating_point():
            raise EstbenchError(f"logits must be floating point, got dtype {logits.dtype}")

    def batch_shape(self, logits: Tensor) -> torch.Size:
        return logits.shape[: logits.dim() - self.event_ndim]

    def probs(self, logits: Tensor) -> Tensor:
        """P(z_i = 1) ``[..., D]`` or softmax probabilities ``[..., D, K]``."""
        return torch.sigmoid(logits) if self.kind == "bernoulli" else torch.softmax(logits, -1)

    def sample(self, logits: Tensor, sample_shape: tuple[int, ...] = ()) -> Tensor:
        """Independent hard samples ``[*sample_shape, *logits.shape]`` (detached floats)."""
        shape = tuple(sample_shape) + tuple(logits.shape)
        logits = logits.detach()
        if self.kind == "bernoulli":
            u = torch.rand(shape, dtype=logits.dtype, device=logits.device)
            return u.add_(torch.sigmoid(logits)).floor_()  # 1[u >= 1 - p] ~ Bernoulli(p)
        index = (logits + gumbel(shape, logits)).argmax(-1)  # Gumbel-max: an exact Cat(softmax) draw
        return one_hot(index, self.categories, logits.dtype)

    def log_prob(self, logits: Tensor, z: Tensor) -> Tensor:
        """log p(z) summed over the D variables: ``[..., *batch]``; broadcasts over sample dims."""
        if self.kind == "bernoulli":
            logits = logits.expand(torch.broadcast_shapes(logits.shape, z.shape))
            return -F.binary_cross_entropy_with_logits(logits, z, reduction="none").sum(-1)
        # sum_i [theta_i . z_i - logsumexp(theta_i)]: no [.., D, K] log-softmax is materialised
        return (z * logits).sum((-2, -1)) - torch.logsumexp(logits, -1).sum(-1)

    def mean(self, logits: Tensor) -> Tensor:
        """E[z] (the mean-field point), same shape as ``logits``."""
        return self.probs(logits)

    def enumerate_states(self, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """All K^D joint states, ``[S, *event_shape]``."""
        index = torch.tensor(
            list(itertools.product(range(self.categories), repeat=self.dim)),
            dtype=torch.long,
            device=device,
        ).reshape(self.num_states, self.dim)
        if self.kind == "bernoulli":
            return index.to(dtype)
        return one_hot(index, self.categories, dtype)

    def check_enumerable(self, max_states: int, who: str = "exact enumeration") -> None:
        if self.num_states > max_states:
            size = f"{self.categories}^{self.dim}"
            magnitude = f"~1e{int(self.dim * math.log10(self.categories))}"
            raise EstbenchError(
                f"{who}: the {self.describe()} latent has {size} ({magnitude}) states, above "
                f"max_states={max_states}; use a smaller latent or raise max_states"
            )


def _weighted_sum(latent: Latent, logits: Tensor, f: Callable[[Tensor], Tensor],
                  states: Tensor) -> Tensor:
    """sum_{z in states} p(z) f(z): ``[*batch]``."""
    batch = latent.batch_shape(logits)
    view = (states.shape[0],) + (1,) * len(batch) + latent.event_shape
    z = states.reshape(view).expand((states.shape[0],) + tuple(logits.shape))
    weights = latent.log_prob(logits, z).exp()  # [S, *batch]
    return (weights * f(z)).sum(0)


def _graph_leaves(value: Tensor) -> list[Tensor]:
    """The leaf tensors that ``value``'s autograd graph accumulates gradients into."""
    leaves, seen, stack = [], set(), [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(child for child, _ in node.next_functions)
    return leaves


#: states in the probe chunk that measures the memory of enumeration per state
PROBE_STATES = 16
#: enumerations whose one-hot states take less than this share of the budget are not probed
UNPROBED_SHARE = 1e-4
_STATES_PER_CHUNK: dict[tuple, int] = {}


def _probe_bytes_per_state(latent: Latent, logits: Tensor, f: Callable[[Tensor], Tensor],
                           states: Tensor) -> float:
    """Measured peak bytes per state of the weighted sum (forward, and backward to every leaf
    when gradients are on) over the first :data:`PROBE_STATES` states."""
    probe = states[:PROBE_STATES]

    def run() -> None:
        value = _weighted_sum(latent, logits, f, probe).sum()
        leaves = _graph_leaves(value) if value.requires_grad else []
        if leaves:
            torch.autograd.grad(value, leaves, allow_unused=True, retain_graph=True)

    _, peak = peak_bytes(run, logits.device)
    return peak / probe.shape[0]


def states_per_chunk(latent: Latent, logits: Tensor, f: Callable[[Tensor], Tensor],
                     states: Tensor) -> int:
    """How many states one chunk of the enumeration may hold within the current memory budget,
    from a measured probe (cached per cost function, logits shape, device and budget)."""
    budget = current_budget(logits.device)
    one_hot_bytes = states.numel() * logits[..., :1].numel() * logits.element_size()
    if one_hot_bytes < UNPROBED_SHARE * budget:
        return states.shape[0]
    key = (latent, tuple(logits.shape), str(logits.device), torch.is_grad_enabled(),
           budget, getattr(f, "__code__", None))
    if key[-1] is None or key not in _STATES_PER_CHUNK:
        per_state = _probe_bytes_per_state(latent, logits, f, states)
        held = states.numel() * states.element_size()  # all the states, enumerated up front
        count = int((budget - held) // max(per_state, 1.0))
        if count < 1:
            raise EstbenchError(
                f"exact enumeration: one state of the {latent.describe()} latent needs "
                f"{megabytes(per_state)} for this batch, above the {megabytes(budget)} left of "
                f"the memory budget; raise [measure] memory_budget_mb or lower the batch size")
        _STATES_PER_CHUNK[key] = count
    return _STATES_PER_CHUNK[key]


def expectation_by_enumeration(
    latent: Latent, logits: Tensor, f: Callable[[Tensor], Tensor], max_states: int
) -> Tensor:
    """E_{z ~ p(logits)}[f(z)] by summing over all states: ``[*batch]``, differentiable in the
    logits (through p) and in any parameter inside ``f``.

    The states are summed in chunks that fit the current memory budget
    (:func:`estbench.memory.memory_budget`, measured by a probe); with gradients on, each chunk
    is checkpointed (its activations are recomputed in the backward pass instead of kept), so
    the forward and backward passes hold one chunk at a time."""
    latent.check_enumerable(max_states)
    states = latent.enumerate_states(logits.dtype, logits.device)  # [S, *event]
    if torch._C._functorch.is_functorch_wrapped_tensor(logits):  # inside vmap/grad: one pass
        return _weighted_sum(latent, logits, f, states)
    chunk = states_per_chunk(latent, logits, f, states)
    if chunk >= states.shape[0]:
        return _weighted_sum(latent, logits, f, states)
    total = None
    for part in states.split(chunk):
        if torch.is_grad_enabled():
            value = checkpoint(_weighted_sum, latent, logits, f, part, use_reentrant=False)
        else:
            value = _weighted_sum(latent, logits, f, part)
        total = value if total is None else total + value
    return total


def as_categorical(latent: Latent, logits: Tensor, f: Callable[[Tensor], Tensor]
                   ) -> tuple[Latent, Tensor, Callable[[Tensor], Tensor]]:
    """View a Bernoulli latent as 2-class categoricals with logits ``[0, theta]``, so that
    categorical-only estimators apply; ``f`` then receives the second one-hot coordinate.
    Categorical latents pass through unchanged."""
    if latent.kind == "categorical":
        return latent, logits, f
    pair = torch.stack([torch.zeros_like(logits), logits], -1)
    return Latent("categorical", latent.dim, 2), pair, lambda z: f(z[..., 1])


def conditional_gumbel(logits: Tensor, sample: Tensor, sample_shape: tuple[int, ...] = ()
                       ) -> Tensor:
    """Perturbed logits zeta ~ (theta + G | argmax(theta + G) = index of ``sample``): the maximum
    is Gumbel(log Z) and the others are Gumbels truncated below it (Maddison et al. 2014;
    Tucker et al. 2017, arXiv 1703.07370). With E_j ~ Exp(1) and log Z = logsumexp(theta):
    zeta_d = log Z - log E_d, zeta_j = -log(E_j exp(-theta_j) + E_d / Z) for j != d.
    Differentiable in ``logits``; shape ``[*sample_shape, *logits.shape]``; ``sample`` is one-hot."""
    shape = tuple(sample_shape) + tuple(torch.broadcast_shapes(logits.shape, sample.shape))
    log_e = torch.log(-torch.log(uniform(shape, logits)))  # log E, E ~ Exp(1)
    log_z = torch.logsumexp(logits, -1, keepdim=True)
    log_e_d = (log_e * sample).sum(-1, keepdim=True)
    top = log_z - log_e_d
    others = -torch.logaddexp(log_e - logits, log_e_d - log_z)
    return torch.where(sample.bool(), top, others)
