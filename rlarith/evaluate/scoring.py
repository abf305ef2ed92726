"""Scoring completions against truths (no model involved): exact match with a Wilson interval, the error
breakdown, and ``EvalResult``, the record of one model scored on one held-out set.

Scoring uses the one shared parser (``rlarith.answers.extract_answer``); both modes are reported: exact
match (strict) with a Wilson interval, the same with ``last``, extraction failures apart from wrong
answers, an error breakdown, the ``partial`` mean and the config-weighted reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rlarith.answers import extract_answer
from rlarith.rewards import REWARD_FUNCTIONS

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ERROR_KINDS = ("correct", "extraction_failure", "wrong_sign", "wrong_digit_count", "wrong_digits")


@dataclass
class EvalResult:
    """One model scored on one held-out set. ``to_dict`` is JSON-serialisable."""

    n: int
    """Problems scored."""
    samples: int
    """Completions per problem."""
    temperature: float
    split: str
    step: int | None
    """Training step of the checkpoint (0: the base model; None: a bare model outside a run)."""
    model: str
    accuracy: float
    """Exact match, strict extraction, over all completions."""
    ci95: tuple[float, float]
    """Wilson 95% interval of ``accuracy`` (over problems, see ``score_completions``)."""
    accuracy_last: float
    """The same completions scored with ``mode="last"``."""
    extraction_failure_rate: float
    extraction_failure_rate_last: float
    partial_mean: float
    """Mean of ``rlarith.rewards.partial`` (strict)."""
    mean_reward: float
    """Config-weighted total reward (``rewards.weights``, ``rewards.extraction``): the training objective."""
    errors: dict[str, int]
    """Counts per kind (``ERROR_KINDS``) and, for ``wrong_digits``, per digit position from the right
    (``digit_position_0`` is the units digit)."""
    contaminated: int = 0
    """Held-out problems that could have been trained on (non-zero only when forced)."""
    unreadable_traces: list[str] = field(default_factory=list)
    """Trace files of the run that could not be read (non-empty only when forced)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """Per completion: question, truth, completion, parsed_strict, parsed_last."""

    def to_dict(self, records: bool = True) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        if not records:
            out.pop("records")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["ci95"] = tuple(kwargs["ci95"])
        return cls(**kwargs)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; sensible at 0 and n successes, unlike the normal one.

    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    >>> lo, hi = wilson_interval(0, 100); lo == 0.0 and 0.03 < hi < 0.04
    True
    >>> [round(x, 4) for x in wilson_interval(50, 100)]
    [0.4038, 0.5962]
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The bounds are exactly 0 at no successes and 1 at all; rounding would leave 1e-18 crumbs.
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return (lo, hi)


def classify(predicted: int | None, truth: int) -> tuple[str, list[int]]:
    """The error kind of one parsed answer, and for ``wrong_digits`` the wrong positions (0: units).

    Kinds are exclusive and checked in order: no answer, right, wrong sign, wrong digit count, and
    otherwise same sign and length with some digits wrong.

    >>> classify(None, 5535), classify(5535, 5535), classify(-5535, 5535), classify(535, 5535)
    (('extraction_failure', []), ('correct', []), ('wrong_sign', []), ('wrong_digit_count', []))
    >>> classify(5935, 5535), classify(6534, 5535)
    (('wrong_digits', [2]), ('wrong_digits', [0, 3]))
    """
    if predicted is None:
        return "extraction_failure", []
    if predicted == truth:
        return "correct", []
    if (predicted < 0) != (truth < 0):
        return "wrong_sign", []
    p, t = str(abs(predicted)), str(abs(truth))
    if len(p) != len(t):
        return "wrong_digit_count", []
    return "wrong_digits", [i for i, (a, b) in enumerate(zip(reversed(p), reversed(t))) if a != b]


def score_completions(
    completions: Sequence[str],
    truths: Sequence[int],
    weights: dict[str, float],
    extraction: str = "strict",
    samples: int = 1,
) -> dict[str, Any]:
    """Every score of ``EvalResult`` for completions (grouped by problem, ``samples`` each) and their truths.

    The Wilson interval counts problems, not completions: samples of one problem are correlated, and
    counting them as independent would make the interval too narrow.
    """
    if len(completions) != len(truths):
        raise ValueError(f"{len(completions)} completions but {len(truths)} truths")
    total = len(completions)
    strict = [extract_answer(c, "strict") for c in completions]
    last = [extract_answer(c, "last") for c in completions]
    truths = [int(t) for t in truths]
    width = max((len(str(abs(t))) for t in truths), default=0)
    errors = dict.fromkeys(ERROR_KINDS, 0) | {f"digit_position_{i}": 0 for i in range(width)}
    for got, truth in zip(strict, truths):
        kind, positions = classify(got, truth)
        errors[kind] += 1
        for i in positions:
            errors[f"digit_position_{i}"] += 1

    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    correct = errors["correct"]
    correct_last = sum(g is not None and g == t for g, t in zip(last, truths))
    accuracy = correct / total if total else 0.0
    n_problems = total // samples if samples else total
    partial = REWARD_FUNCTIONS["partial"](completions, answer=truths, mode="strict")
    # The training objective: each component as the trainer computes it, weighted by the config.
    reward = sum(
        w * mean(REWARD_FUNCTIONS[name](completions, answer=truths, mode=extraction))
        for name, w in weights.items()
    )
    return {
        "accuracy": accuracy,
        "ci95": wilson_interval(accuracy * n_problems, n_problems),
        "accuracy_last": correct_last / total if total else 0.0,
        "extraction_failure_rate": errors["extraction_failure"] / total if total else 0.0,
        "extraction_failure_rate_last": sum(g is None for g in last) / total if total else 0.0,
        "partial_mean": mean(partial),
        "mean_reward": float(reward),
        "errors": errors,
        "parsed_strict": strict,
        "parsed_last": last,
    }
