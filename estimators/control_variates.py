"""Score-function estimators with control variates: REBAR, RELAX, MuProp, NVIL.

``rebar`` (Tucker, Mnih, Maddison, Lawson, Sohl-Dickstein 2017, NeurIPS, arXiv 1703.07370) and
``relax`` (Grathwohl, Choi, Wu, Roeder, Duvenaud 2018, ICLR, arXiv 1711.00123) share one sampler:
z = theta + noise (logistic for Bernoulli, Gumbel for categorical), b = H(z) (the hard sample),
and z~ ~ p(z | b), a conditional relaxation that is differentiable in theta. With a control
variate c(.) on relaxed points,

    g = [f(b) - c(z~)] grad log p(b) + grad c(z) - grad c(z~),

unbiased for any c because z and z~ have the same marginal. REBAR: c(z) = eta f(sigma_lambda(z))
(sigma_lambda = sigmoid(./lambda) or softmax(./lambda)), 3 evaluations of f; eta and lambda fixed
(``learn = false``) or adapted online. RELAX: c(z) = eta f(sigma_lambda(z)) + r_rho(sigma_lambda(z))
with r a small MLP (``use_f = false`` drops the first term and the two extra evaluations). The
learned parameters descend grad sum g^2 (the variance, since E g does not depend on them) through
a double backward pass taken while ``training``; :meth:`update` applies the step (Adam, ``cv_lr``).

``muprop`` (Gu, Levine, Sutskever, Mnih 2016, ICLR, arXiv 1511.05176): the first-order Taylor
expansion of f at the mean-field point z_bar = E z as control variate,
g = [f(z) - f(z_bar) - grad f(z_bar).(z - z_bar)] grad log p(z) + grad f(z_bar).grad_theta z_bar.
Unbiased; 2 evaluations of f and a backward pass at z_bar (f must accept relaxed inputs).

``nvil`` (Mnih & Gregor 2014, ICML, arXiv 1402.0030): REINFORCE with a running mean c of f, an
input-dependent baseline b_psi (an MLP on the detached logits, which are a function of the
input), trained to minimise E(f - c - b_psi)^2, and variance normalisation:
g = (f - c - b_psi) / max(1, sqrt(v)) grad log p(z), v a running variance of the centred signal.
The baselines do not depend on z, so the direction is unbiased; the normalisation rescales each
step by a positive factor, so the estimator is biased in magnitude (``normalise = false`` makes it
exactly unbiased). 1 evaluation of f.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from estbench.contracts import Cost, Estimate, Estimator
from estbench.hyperparams import hyper
from estbench.latents import Latent, conditional_gumbel, gumbel, logistic, one_hot, uniform
from estbench.registry import register_estimator

__all__ = ["REBAR", "RELAX", "MuProp", "NVIL", "conditional_relaxation"]


def conditional_relaxation(logits: Tensor, latent: Latent) -> tuple[Tensor, Tensor, Tensor]:
    """(b, z, z~): the hard sample b = H(z) (detached), the relaxed variable z = theta + noise and
    the conditional z~ ~ p(z | b); z and z~ are differentiable in ``logits``."""
    if latent.kind == "bernoulli":
        z = logits + logistic(logits.shape, logits)
        b = (z > 0).to(logits.dtype).detach()
        p = torch.sigmoid(logits)
        v = uniform(logits.shape, logits)
        u = torch.where(b.bool(), (1 - p) + v * p, v * (1 - p))  # u | b, differentiable in theta
        eps = torch.finfo(logits.dtype).eps
        u = u.clamp(eps, 1 - eps)
        return b, z, logits + torch.log(u) - torch.log1p(-u)
    z = logits + gumbel(logits.shape, logits)
    b = one_hot(z.argmax(-1), latent.categories, logits.dtype).detach()
    return b, z, conditional_gumbel(logits, b)


def score(logits: Tensor, b: Tensor, latent: Latent) -> Tensor:
    """d log p(b) / d logits, in closed form: b - sigmoid(theta) or b - softmax(theta)."""
    return b - latent.probs(logits)


def _expand(values: Tensor, latent: Latent) -> Tensor:
    return values.reshape(values.shape + (1,) * latent.event_ndim)


def _tanh_mlp(width: int, hidden: int, like: Tensor) -> nn.Module:
    """width -> hidden (tanh) -> 1, on the device and dtype of ``like`` (draws its initial
    weights from the ambient generator)."""
    net = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    return net.to(device=like.device, dtype=like.dtype)


class _LearnedState:
    """Parameters an estimator learns for itself, their optimiser, a device move, and their
    state for a checkpoint. Its networks are :func:`_tanh_mlp`s, created lazily at the first
    estimate, so a checkpoint rebuilds them from the saved weights' shapes."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.tensors: dict[str, Tensor] = {}
        self.modules: dict[str, nn.Module] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    def parameters(self) -> list[Tensor]:
        params = [t for t in self.tensors.values() if t.requires_grad]
        for module in self.modules.values():
            params += list(module.parameters())
        return params

    def to(self, device: torch.device) -> None:
        moved = any(t.device != device for t in self.tensors.values()) or any(
            p.device != device for m in self.modules.values() for p in m.parameters())
        if not moved:
            return
        for name, t in self.tensors.items():
            self.tensors[name] = t.detach().to(device).requires_grad_(t.requires_grad)
        for module in self.modules.values():
            module.to(device)
        self.optimizer = None

    def step(self, grads: list[Tensor | None]) -> None:
        params = self.parameters()
        if not params:
            return
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(params, lr=self.lr)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.detach()
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": {name: t.detach().clone() for name, t in self.tensors.items()},
            "learned": {name: t.requires_grad for name, t in self.tensors.items()},
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensors = {name: t.clone().requires_grad_(state["learned"][name])
                        for name, t in state["tensors"].items()}
        self.modules = {}
        for name, weights in state["modules"].items():
            hidden, width = weights["0.weight"].shape
            self.modules[name] = _tanh_mlp(width, hidden, weights["0.weight"])
            self.modules[name].load_state_dict(weights)
        self.optimizer = None
        if state["optimizer"] is not None:
            self.optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
            self.optimizer.load_state_dict(state["optimizer"])


class _Relaxation(Estimator):
    """Shared machinery of REBAR and RELAX (see the module docstring)."""

    unbiased = True
    reparameterised = True
    relaxed_inputs = True
    use_net = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._state = _LearnedState(self.cv_lr)
        learn = self._learns()
        self._state.tensors["eta"] = torch.tensor(float(self.eta)).requires_grad_(learn)
        self._state.tensors["log_temperature"] = torch.tensor(
            math.log(self.temperature)).requires_grad_(learn)

    def _learns(self) -> bool:
        return True

    @property
    def current_eta(self) -> float:
        return float(self._state.tensors["eta"].detach())

    @property
    def current_temperature(self) -> float:
        return float(self._state.tensors["log_temperature"].detach().exp())

    def _net(self, width: int, like: Tensor) -> nn.Module:
        net = self._state.modules.get("net")
        if net is None:
            net = _tanh_mlp(width, self.hidden, like)
            self._state.modules["net"] = net
            self._state.optimizer = None
        return net

    def _control_variate(self, relaxed: Tensor, f_relaxed: Tensor | None, latent: Latent) -> Tensor:
        """c = eta f(sigma(z)) [+ r(sigma(z))] for relaxed points ``[*S, *batch, *event]``."""
        eta = self._state.tensors["eta"]
        total = 0.0 if f_relaxed is None else eta * f_relaxed
        if self.use_net:
            flat = relaxed.flatten(start_dim=relaxed.dim() - latent.event_ndim)
            total = total + self._net(flat.shape[-1], relaxed)(flat).squeeze(-1)
        return total

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        self._state.to(logits.device)
        b, z, z_tilde = conditional_relaxation(logits, latent)
        lam = self._state.tensors["log_temperature"].exp()
        if latent.kind == "bernoulli":
            relaxed = torch.sigmoid(torch.stack([z, z_tilde]) / lam)
        else:
            relaxed = torch.softmax(torch.stack([z, z_tilde]) / lam, -1)
        if self.uses_f:
            costs = f(torch.cat([b.unsqueeze(0), relaxed]))  # [3, *batch]: f(b), f(s(z)), f(s(z~))
            f_b, f_relaxed = costs[0], costs[1:]
        else:
            f_b, f_relaxed = f(b), None
        c = self._control_variate(relaxed, f_relaxed, latent)  # [2, *batch]
        bracket = f_b.detach() - c[1]  # depends on the control variate's parameters only
        log_p = latent.log_prob(logits, b)
        surrogate = bracket.detach() * log_p + c[0] - c[1] + f_b
        extras: dict[str, Any] = {}
        if self.training and self._learns() and logits.requires_grad:
            extras["cv_grads"] = self._variance_gradient(logits, b, bracket, c, latent)
        evals = 3 if self.uses_f else 1
        return Estimate(surrogate, f_b.detach(), evals, extras)

    def _variance_gradient(self, logits: Tensor, b: Tensor, bracket: Tensor, c: Tensor,
                           latent: Latent) -> list[Tensor | None]:
        """grad_phi sum g_hat^2 with g_hat the estimate w.r.t. the logits (double backward)."""
        batch = c[0].numel()
        (pathwise,) = torch.autograd.grad((c[0] - c[1]).sum() / batch, logits, create_graph=True,
                                          retain_graph=True)
        g_hat = _expand(bracket, latent) * score(logits.detach(), b, latent) / batch + pathwise
        return list(torch.autograd.grad(g_hat.pow(2).sum(), self._state.parameters(),
                                        retain_graph=True, allow_unused=True))

    def update(self, estimate: Estimate) -> None:
        grads = estimate.extras.get("cv_grads")
        if grads is not None:
            self._state.step(grads)


@register_estimator("rebar")
@dataclass(kw_only=True)
class REBAR(_Relaxation):
    """REBAR: conditional-relaxation control variate eta f(sigma_lambda(z)). Unbiased; 3 evals."""

    description = "REBAR: REINFORCE with a conditional-relaxation control variate"
    uses_f = True

    eta: float = hyper(1.0, doc="control-variate scale eta (initial value when learned)")
    temperature: float = hyper(0.5, gt=0.0, doc="relaxation temperature lambda (initial value)")
    learn: bool = hyper(False, doc="adapt eta and log lambda online to minimise the variance")
    cv_lr: float = hyper(0.01, gt=0.0, doc="Adam learning rate of eta and log lambda")

    def _learns(self) -> bool:
        return self.learn


@register_estimator("relax")
@dataclass(kw_only=True)
class RELAX(_Relaxation):
    """RELAX: a learned control variate c_phi = eta f(sigma_lambda(z)) + r_rho(sigma_lambda(z)),
    trained along with the task to minimise the variance. Unbiased; 3 evals (1 without f)."""

    description = "RELAX: REINFORCE with a learned control-variate network"
    use_net = True

    eta: float = hyper(1.0, doc="initial scale of the f(sigma_lambda(z)) term")
    temperature: float = hyper(0.5, gt=0.0, doc="initial relaxation temperature lambda")
    hidden: int = hyper(10, ge=1, doc="hidden tanh units of the control-variate network r_rho")
    use_f: bool = hyper(True, doc="include eta f(sigma_lambda(z)) in c_phi (2 more evaluations)")
    cv_lr: float = hyper(0.01, gt=0.0, doc="Adam learning rate of the control variate")

    @property
    def uses_f(self) -> bool:
        return self.use_f


@register_estimator("muprop")
@dataclass(kw_only=True)
class MuProp(Estimator):
    """MuProp: first-order Taylor control variate at the mean-field point. Unbiased; 2 evals."""

    description = "MuProp: Taylor-expansion control variate at the mean-field point"
    unbiased = True
    relaxed_inputs = True

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        z = latent.sample(logits)
        mean = latent.mean(logits)  # z_bar, differentiable in theta
        anchor = mean.detach().requires_grad_(True)
        costs = f(torch.stack([z, anchor]))  # [2, *batch]: f(z), f(z_bar)
        (slope,) = torch.autograd.grad(costs[1].sum(), anchor, retain_graph=True)
        event_dims = tuple(range(-latent.event_ndim, 0))
        taylor = costs[1].detach() + (slope * (z - anchor.detach())).sum(event_dims)
        log_p = latent.log_prob(logits, z)
        surrogate = (costs[0].detach() - taylor) * log_p + (slope * mean).sum(event_dims) + costs[0]
        return Estimate(surrogate, costs[0].detach(), 2)


@register_estimator("nvil")
@dataclass(kw_only=True)
class NVIL(Estimator):
    """NVIL: REINFORCE with a running mean, a learned input-dependent baseline and variance
    normalisation. Unbiased in direction (exactly unbiased with ``normalise = false``)."""

    description = "NVIL: learned input-dependent baseline and variance normalisation"

    hidden: int = hyper(32, ge=1, doc="hidden tanh units of the baseline network b_psi")
    decay: float = hyper(0.8, ge=0.0, le=0.9999, doc="decay of the running mean and variance")
    normalise: bool = hyper(True, doc="divide the signal by max(1, running std)")
    baseline_lr: float = hyper(0.001, gt=0.0, doc="Adam learning rate of the baseline network")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._state = _LearnedState(self.baseline_lr)
        self._mean = 0.0
        self._var = 0.0

    def _baseline(self, logits: Tensor, latent: Latent) -> Tensor:
        flat = logits.detach().flatten(start_dim=logits.dim() - latent.event_ndim)
        net = self._state.modules.get("net")
        if net is None:
            net = _tanh_mlp(flat.shape[-1], self.hidden, logits)
            nn.init.zeros_(net[2].weight)
            nn.init.zeros_(net[2].bias)
            self._state.modules["net"] = net
        self._state.to(logits.device)
        return net(flat).squeeze(-1)

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        z = latent.sample(logits)
        cost = f(z)
        with torch.set_grad_enabled(self.training):
            baseline = self._baseline(logits, latent)
        centred = cost.detach() - self._mean
        signal = centred - baseline.detach()
        scale = max(1.0, math.sqrt(self._var)) if self.normalise else 1.0
        surrogate = signal / scale * latent.log_prob(logits, z) + cost
        extras: dict[str, Any] = {"signal": signal}
        if self.training:
            loss = (centred - baseline).pow(2).mean()
            extras["baseline_grads"] = list(torch.autograd.grad(loss, self._state.parameters()))
        return Estimate(surrogate, cost.detach(), 1, extras)

    def update(self, estimate: Estimate) -> None:
        grads = estimate.extras.get("baseline_grads")
        if grads is not None:
            self._state.step(grads)
        d = self.decay
        self._mean = d * self._mean + (1 - d) * float(estimate.value.mean())
        self._var = d * self._var + (1 - d) * float(estimate.extras["signal"].pow(2).mean())
