"""Multi-sample estimators over product domains: the unordered set estimator and IndeCateR.

``unordered-set`` (Kool, van Hoof, Welling 2020, ICLR, arXiv 2002.06043): draw k distinct joint
configurations S without replacement (Gumbel-top-k over the K^D joint states, by stochastic beam
search over the D variables; Kool et al. 2019, arXiv 1903.06059). With
p(S) = sum over orderings of prod_i p(s_i) / (1 - sum_{j<i} p(s_j)), p^{D\\A} the distribution
restricted to D \\ A and R(S, s) = p^{D\\{s}}(S \\ {s}) / p(S):
    g = sum_{s in S} grad p(s) R(S, s) [f(s) - B(S, s)],
    B(S, s) = p(s) f(s) + sum_{s' in S\\{s}} p(s') R^{D\\{s}}(S, s') f(s'),
    R^{D\\{s}}(S, s') = p^{D\\{s,s'}}(S \\ {s, s'}) / p^{D\\{s}}(S \\ {s}).
Unbiased with or without the built-in baseline (used for k >= 2); k evaluations of f; k = 1 is
REINFORCE. The orderings are enumerated (k! terms, vectorised, in float64 and log space), so k is
limited to 7. Everything is per batch element without a Python loop over the batch.

``indecater`` (De Smet, Sansone, Zuidberg Dos Martires 2023, NeurIPS, arXiv 2311.12569), the
CatLog-derivative estimator for D independent categoricals: with N samples x^(n) and
f_bar[i, k] = (1/N) sum_n f(x^(n) with x_i replaced by k),
    g = sum_i sum_k f_bar[i, k] grad p_i(k).
Unbiased (the sum over x_i is exact, x_{-i} is sampled); N D K evaluations of f, all in one call.

Bernoulli latents run as 2-class categoricals with logits [0, theta].
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from estbench.contracts import Cost, Estimate, Estimator
from estbench.errors import EstbenchError
from estbench.hyperparams import hyper
from estbench.latents import Latent, as_categorical, gumbel, one_hot
from estbench.registry import register_estimator

__all__ = ["UnorderedSet", "IndeCateR", "stochastic_beam_search", "log_set_probability"]

MAX_SET_SIZE = 7


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def stochastic_beam_search(log_probs: Tensor, k: int) -> Tensor:
    """k distinct joint configurations drawn without replacement from independent categoricals.

    log_probs: ``[*batch, D, K]`` normalised. Returns category indices ``[*batch, k, D]``: the
    top-k of the Gumbel-perturbed joint log-probabilities, found level by level by keeping the k
    largest perturbed prefixes, each child's perturbation drawn conditionally on its parent's
    (the maximum over its children equals the parent's).
    """
    batch = log_probs.shape[:-2]
    dim, categories = log_probs.shape[-2:]
    neg_inf = torch.tensor(-math.inf, dtype=log_probs.dtype, device=log_probs.device)
    prefix_logp = torch.full((*batch, k), -math.inf, dtype=log_probs.dtype, device=log_probs.device)
    prefix_logp[..., 0] = 0.0
    perturbed = gumbel((*batch, 1), log_probs).expand(*batch, k).clone()  # root ~ Gumbel(0)
    perturbed[..., 1:] = -math.inf
    prefixes = torch.zeros((*batch, k, 0), dtype=torch.long, device=log_probs.device)
    for i in range(dim):
        child_logp = prefix_logp.unsqueeze(-1) + log_probs[..., i, :].unsqueeze(-2)  # [*b, k, K]
        valid = torch.isfinite(child_logp)
        free = child_logp + gumbel(child_logp.shape, child_logp)
        top = free.max(-1, keepdim=True).values
        parent = perturbed.unsqueeze(-1)
        v = parent - free + _log1mexp((free - top).clamp(max=0.0))
        child = parent - torch.nn.functional.softplus(v)  # truncated at the parent's value
        child = torch.where(valid, child, neg_inf)
        best = child.flatten(-2).topk(k, dim=-1).indices  # [*b, k]
        origin, category = best // categories, best % categories
        prefix_logp = child_logp.flatten(-2).gather(-1, best)
        perturbed = child.flatten(-2).gather(-1, best)
        kept = prefixes.gather(-2, origin.unsqueeze(-1).expand(*origin.shape, i))
        prefixes = torch.cat([kept, category.unsqueeze(-1)], -1)
    return prefixes


def log_set_probability(probs: Tensor, excluded: Tensor | float = 0.0) -> Tensor:
    """log of sum over orderings of prod_i q_i / (1 - excluded - sum_{j<i} q_j).

    probs ``[*, m]`` (float64), excluded broadcastable to ``[*]``: the probability of drawing the
    m items in any order without replacement from the distribution with mass ``excluded``
    removed. m = 0 gives log 1 = 0.
    """
    m = probs.shape[-1]
    if m == 0:
        return torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    orders = torch.tensor(list(itertools.permutations(range(m))), device=probs.device)
    ordered = probs[..., orders]  # [*, m!, m]
    before = ordered.cumsum(-1) - ordered
    excluded = torch.as_tensor(excluded, dtype=probs.dtype, device=probs.device)
    remaining = (1 - excluded[..., None, None] - before).clamp_min(torch.finfo(probs.dtype).tiny)
    return (ordered.log() - remaining.log()).sum(-1).logsumexp(-1)


def _leave_out(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Index tables: the k-1 others of each s ``[k, k-1]``, and the k-2 others of each pair
    ``[k, k, k-2]`` (diagonal entries are unused)."""
    one = torch.tensor([[j for j in range(k) if j != s] for s in range(k)], dtype=torch.long,
                       device=device).reshape(k, k - 1)
    pairs = [[[j for j in range(k) if j not in (s, t)] if s != t else list(range(k - 2))
              for t in range(k)] for s in range(k)]
    two = torch.tensor(pairs, dtype=torch.long, device=device).reshape(k, k, max(k - 2, 0))
    return one, two


@register_estimator("unordered-set")
@dataclass(kw_only=True)
class UnorderedSet(Estimator):
    """The unordered set estimator: k samples without replacement, built-in baseline. Unbiased."""

    description = "unordered set estimator: k samples without replacement + built-in baseline"
    unbiased = True

    samples: int = hyper(4, ge=1, le=MAX_SET_SIZE, doc="set size k (distinct joint samples)")
    baseline: bool = hyper(True, doc="use the built-in baseline (only when samples >= 2)")

    def check_latent(self, latent: Latent) -> None:
        if self.samples > latent.num_states:
            raise EstbenchError(
                f"estimator 'unordered-set': samples = {self.samples} distinct configurations "
                f"cannot be drawn from a {latent.describe()} latent with {latent.num_states} "
                f"states; lower samples"
            )

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        self.check_latent(latent)
        latent, logits, f = as_categorical(latent, logits, f)
        k = self.samples
        log_probs = torch.log_softmax(logits.detach(), -1)
        chosen = stochastic_beam_search(log_probs, k)  # [*batch, k, D]
        z = one_hot(chosen.movedim(-2, 0), latent.categories, logits.dtype)  # [k, *batch, D, K]
        costs = f(z)  # [k, *batch]
        log_p = latent.log_prob(logits, z)  # [k, *batch], differentiable
        q = log_p.detach().double().exp().movedim(0, -1)  # [*batch, k]
        fq = costs.detach().double().movedim(0, -1)
        one, two = _leave_out(k, q.device)
        log_set = log_set_probability(q)  # [*batch]
        log_without = log_set_probability(q[..., one], q)  # [*batch, k]: p^{D\s}(S\s)
        ratio = (log_without - log_set.unsqueeze(-1)).exp()  # R(S, s)
        weight = q * ratio
        signal = fq
        if self.baseline and k >= 2:
            pair_mass = q.unsqueeze(-1) + q.unsqueeze(-2)  # q_s + q_s'
            log_without_pair = log_set_probability(q[..., two], pair_mass)  # [*batch, k, k]
            off_diagonal = ~torch.eye(k, dtype=torch.bool, device=q.device)
            log_inner = (log_without_pair - log_without.unsqueeze(-1)).masked_fill(
                ~off_diagonal, -math.inf)  # the diagonal (s' = s) is not a term
            inner = log_inner.exp()  # R^{D\s}(S, s')
            baseline = q * fq + (inner * (q * fq).unsqueeze(-2)).sum(-1)
            signal = fq - baseline
        coefficient = (weight * signal).to(logits.dtype).movedim(-1, 0)  # [k, *batch]
        pathwise = weight.to(logits.dtype).movedim(-1, 0)
        surrogate = (coefficient * log_p + pathwise * costs).sum(0)
        value = (pathwise * costs.detach()).sum(0)
        return Estimate(surrogate, value, k)


@register_estimator("indecater")
@dataclass(kw_only=True)
class IndeCateR(Estimator):
    """IndeCateR: exact sum over each variable's categories, the others sampled. Unbiased;
    N D K evaluations of f."""

    description = "IndeCateR: CatLog-derivative estimator for independent categoricals"
    unbiased = True

    samples: int = hyper(1, ge=1, doc="samples N of the other variables")

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        latent, logits, f = as_categorical(latent, logits, f)
        dim, categories = latent.dim, latent.categories
        x = latent.sample(logits, (self.samples,))  # [N, *batch, D, K]
        batch_ndim = logits.dim() - 2
        # z[n, i, k] = x[n] with variable i set to category k: [N, D, K, *batch, D, K]
        eye_d = torch.eye(dim, dtype=logits.dtype, device=logits.device)
        eye_k = torch.eye(categories, dtype=logits.dtype, device=logits.device)
        shape = (1, dim, 1) + (1,) * batch_ndim + (dim, 1)
        replace = eye_d.reshape(shape)  # 1 where the variable is the replaced one
        value_k = eye_k.reshape((1, 1, categories) + (1,) * batch_ndim + (1, categories))
        z = x.reshape((self.samples, 1, 1) + x.shape[1:]) * (1 - replace) + replace * value_k
        costs = f(z)  # [N, D, K, *batch]
        f_bar = costs.mean(0).movedim(0, -1).movedim(0, -1)  # [*batch, D, K]
        probs = torch.softmax(logits, -1)
        surrogate = (f_bar.detach() * probs).sum((-2, -1)) + (probs.detach() * f_bar).sum((-2, -1)) / dim
        value = (probs.detach() * f_bar.detach()).sum((-2, -1)) / dim
        return Estimate(surrogate, value, self.samples * dim * categories)
