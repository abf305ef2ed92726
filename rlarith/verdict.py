"""The positive control's verdict: did held-out greedy correctness rise, by more than chance would give?

Before and after training the same held-out problems are scored, so the comparison is paired. Only the
discordant problems carry information: ``gained`` (wrong before, right after) and ``lost`` (right before,
wrong after). If training changed nothing, each discordant problem is as likely to go either way, so
``gained ~ Binomial(gained + lost, 1/2)``: the exact McNemar test. The control passes when more problems
were gained than lost and the two-sided exact p-value is below ``ALPHA``.

The rise in accuracy, ``(gained - lost) / n``, is reported with a 95% interval for a difference of paired
proportions: Wald on the table with 0.5 added to every cell (Agresti & Min 2005, "Simple improved
confidence intervals for comparing matched proportions"), which keeps its coverage near 95% even when few
problems change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

ALPHA = 0.01
"""Significance level of the verdict: a chance of one in a hundred to pass a control that learned nothing."""
Z95 = 1.959963984540054


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: twice the smaller binomial tail of ``gained`` among the discordant
    pairs at 1/2, capped at 1.

    >>> mcnemar_exact(0, 0), mcnemar_exact(5, 5), round(mcnemar_exact(10, 0), 6), round(mcnemar_exact(8, 2), 4)
    (1.0, 1.0, 0.001953, 0.1094)
    """
    m, k = gained + lost, min(gained, lost)
    if m == 0:
        return 1.0
    tail = Fraction(sum(math.comb(m, i) for i in range(k + 1)), 2**m)  # exact: no underflow at large m
    return float(min(Fraction(1), 2 * tail))


def paired_interval(gained: int, lost: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of the accuracy difference ``(gained - lost) / n`` of ``n`` paired problems (Agresti-Min:
    Wald with 0.5 added to each of the four cells).

    >>> [round(x, 4) for x in paired_interval(30, 10, 200)]
    [0.0384, 0.1596]
    """
    if n <= 0:
        raise ValueError(f"n must be positive; got {n}")
    b, c, size = gained + 0.5, lost + 0.5, n + 2
    diff = (b - c) / size
    se = math.sqrt(max(b + c - (b - c) ** 2 / size, 0.0)) / size
    return diff - z * se, diff + z * se


@dataclass(frozen=True)
class Verdict:
    """Greedy correctness of the same ``n`` problems before and after training, and what it means."""

    n: int
    right_before: int
    right_after: int
    gained: int
    """Problems wrong before and right after."""
    lost: int
    """Problems right before and wrong after."""
    p_value: float
    """Two-sided exact McNemar."""
    ci95: tuple[float, float]
    """95% interval of ``rise``."""

    @property
    def rise(self) -> float:
        return (self.gained - self.lost) / self.n

    @property
    def passed(self) -> bool:
        return self.gained > self.lost and self.p_value < ALPHA

    def __str__(self) -> str:
        low, high = self.ci95
        verdict = "PASS" if self.passed else "FAIL"
        why = (
            f"greedy accuracy rose {self.rise:+.3f} (95% CI {low:+.3f} to {high:+.3f}) on {self.n} held-out "
            f"problems: {self.gained} gained, {self.lost} lost, exact McNemar p = {self.p_value:.2g}"
        )
        if self.passed:
            return f"{verdict} ({why} < {ALPHA:g})"
        return f"{verdict} ({why}; a pass needs more gained than lost and p < {ALPHA:g}: look at the traces)"


def paired_verdict(before: Sequence[bool], after: Sequence[bool]) -> Verdict:
    """The verdict from per-problem greedy correctness, in the same problem order before and after.

    >>> v = paired_verdict([False] * 30 + [True] * 10 + [True] * 60, [True] * 30 + [False] * 2 + [True] * 68)
    >>> (v.gained, v.lost, v.passed, round(v.rise, 2))
    (30, 2, True, 0.28)
    """
    if len(before) != len(after) or not before:
        raise ValueError(
            f"need the same non-empty problems before and after; got {len(before)} and {len(after)}"
        )
    gained = sum(not b and a for b, a in zip(before, after))
    lost = sum(b and not a for b, a in zip(before, after))
    return Verdict(
        n=len(before),
        right_before=sum(map(bool, before)),
        right_after=sum(map(bool, after)),
        gained=gained,
        lost=lost,
        p_value=mcnemar_exact(gained, lost),
        ci95=paired_interval(gained, lost, len(before)),
    )
