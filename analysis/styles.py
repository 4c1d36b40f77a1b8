"""How each estimator configuration is drawn: colour by family, line style and marker by variant.

The family is the module of ``estimators/`` that defines the registered estimator
(score-function, relaxed, straight-through, control variates, antithetic, multi-sample, exact);
plugins from elsewhere are 'other'. Within a family, variants (configurations) get distinct line
styles, markers and a shade of the family colour, so twenty-odd configurations stay apart.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable
from dataclasses import dataclass

from matplotlib.colors import to_rgb

from estbench.errors import EstbenchError
from estbench.registry import ESTIMATORS

__all__ = ["FAMILIES", "Style", "family_of", "config_styles"]

#: family (by module name) -> (display name, colour); Okabe-Ito colours, safe for colour-blindness
FAMILIES: dict[str, tuple[str, str]] = {
    "score_function": ("score-function", "#0072B2"),
    "relaxed": ("relaxed", "#E69F00"),
    "straight_through": ("straight-through", "#D55E00"),
    "control_variates": ("control variates", "#009E73"),
    "antithetic": ("antithetic", "#CC79A7"),
    "multi_sample": ("multi-sample", "#56B4E9"),
    "exact": ("exact", "#000000"),
}
OTHER = ("other", "#7f7f7f")

LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)),
              (0, (8, 2, 2, 2))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


@dataclass(frozen=True)
class Style:
    family: str
    color: tuple[float, float, float]
    linestyle: object
    marker: str


def family_of(estimator: str) -> str:
    """Display name of the family of a registered estimator ('other' when unknown)."""
    try:
        module = ESTIMATORS.get(estimator).__module__
    except EstbenchError:
        return OTHER[0]
    return FAMILIES.get(module.rsplit(".", 1)[-1], OTHER)[0]


def _shade(color: str, index: int, count: int) -> tuple[float, float, float]:
    """The family colour, darker for the first variants and lighter for the last."""
    if count <= 1:
        return to_rgb(color)
    hue, light, sat = colorsys.rgb_to_hls(*to_rgb(color))
    span = min(0.3, 0.08 * count)
    light = min(0.85, max(0.1, light - span / 2 + span * index / (count - 1)))
    return colorsys.hls_to_rgb(hue, light, sat)


def config_styles(configs: Iterable[tuple[str, str]]) -> dict[str, Style]:
    """A style per configuration label, from ``(estimator_label, estimator)`` pairs: ordered by
    family, then label, so the legend groups families."""
    families = {name: color for name, color in [*FAMILIES.values(), OTHER]}
    by_family: dict[str, list[str]] = {}
    for label, estimator in sorted(set(configs)):
        by_family.setdefault(family_of(estimator), []).append(label)
    order = [name for name, _ in [*FAMILIES.values(), OTHER]]
    styles = {}
    for family in sorted(by_family, key=order.index):
        labels = by_family[family]
        for i, label in enumerate(labels):
            styles[label] = Style(family, _shade(families[family], i, len(labels)),
                                  LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)])
    return styles
