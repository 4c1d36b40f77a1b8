"""A user's own estimator, registered from outside estbench (see the README)."""

from dataclasses import dataclass

from estbench import Estimate, Estimator, hyper, register_estimator


@register_estimator("fixed-baseline")
@dataclass(kw_only=True)
class FixedBaseline(Estimator):
    """REINFORCE with a constant baseline b: unbiased for any b (Williams 1992)."""

    unbiased = True
    b: float = hyper(0.2, doc="constant subtracted from f")

    def _estimate(self, logits, f, latent):
        z = latent.sample(logits)
        cost = f(z)
        surrogate = (cost.detach() - self.b) * latent.log_prob(logits, z) + cost
        return Estimate(surrogate, cost.detach(), f_evals=1)
