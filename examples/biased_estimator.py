"""A deliberately wrong estimator for `estbench check` (see the README).

It claims to be unbiased, but its baseline is the mean cost of *all* samples, the current one
included, so each sample's cost leaks into its own baseline: E[g] = (n - 1)/n times the true
gradient. The leave-one-out baseline (estimator `rloo`) is the correct version.
"""

from dataclasses import dataclass

from estbench import Estimate, Estimator, hyper, register_estimator


@register_estimator("mean-baseline")
@dataclass(kw_only=True)
class MeanBaseline(Estimator):
    unbiased = True  # the claim `estbench check` will refute
    samples: int = hyper(2, ge=2)

    def _estimate(self, logits, f, latent):
        z = latent.sample(logits, (self.samples,))
        costs = f(z)
        signal = costs.detach() - costs.detach().mean(0)  # includes the sample itself: biased
        surrogate = (signal * latent.log_prob(logits, z) + costs).mean(0)
        return Estimate(surrogate, costs.detach().mean(0), self.samples)
