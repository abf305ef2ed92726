"""Reward functions: pure, with TRL's reward signature, one per component.

TRL calls each with ``prompts``, ``completions`` and every dataset column as keyword arguments (ours:
``answer``) and expects one float per completion. Completions are plain strings or, for chat prompts, a
list of messages whose last ``content`` is the reply. The total reward is the config-weighted sum; TRL
logs each component on its own (``rewards/<name>/mean``).

- ``exact``: 1.0 when the extracted answer equals the ground truth, else 0.0.
- ``partial``: "you're getting closer". Right-align the digits of the answer and the truth, add one slot
  for the sign, and score the share of slots that agree: ``(matching digits + same sign) / (longest
  digit count + 1)``. It is 1.0 exactly when the answer is right and in [0, 1) otherwise. Why digits and
  not relative error: without chain of thought the leading digits of a product come cheaply from magnitude
  estimation, while the low digits need the actual multiplication; digit credit pays for those, and it is
  scale-free (a 6-digit answer is scored like a 2-digit one). An unparseable reply scores 0.
- ``format``: 1.0 when the reply is a strictly parseable number (right or wrong), else 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlarith.answers import Mode, extract_answer

COMPONENTS: tuple[str, ...] = ("exact", "partial", "format")


def completion_text(completion: Any) -> str:
    """The reply text of one completion, whether TRL passes a string or a list of chat messages.

    >>> completion_text("42"), completion_text([{"role": "assistant", "content": "42"}])
    ('42', '42')
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return ""


def digit_closeness(predicted: int, truth: int) -> float:
    """Share of right-aligned digit slots (plus one sign slot) on which ``predicted`` agrees with ``truth``.

    >>> digit_closeness(5535, 5535), digit_closeness(5525, 5535), digit_closeness(-5535, 5535)
    (1.0, 0.8, 0.8)
    >>> digit_closeness(35, 5535)
    0.6
    """
    p, t = str(abs(predicted)), str(abs(truth))
    width = max(len(p), len(t))
    p, t = p.rjust(width, " "), t.rjust(width, " ")
    same = sum(a == b for a, b in zip(p, t)) + ((predicted < 0) == (truth < 0))
    return same / (width + 1)


def exact(
    completions: Sequence[Any], answer: Sequence[int], mode: Mode = "strict", **kwargs: Any
) -> list[float]:
    """1.0 for a correct extracted answer, else 0.0.

    >>> exact(["5535", "5,535.", "5536", "five"], answer=[5535] * 4)
    [1.0, 1.0, 0.0, 0.0]
    """
    out = []
    for completion, truth in zip(completions, answer, strict=True):
        got = extract_answer(completion_text(completion), mode)
        out.append(1.0 if got is not None and got == int(truth) else 0.0)
    return out


def partial(
    completions: Sequence[Any], answer: Sequence[int], mode: Mode = "strict", **kwargs: Any
) -> list[float]:
    """Digit closeness of the extracted answer: 1.0 when right, in [0, 1) when wrong, 0.0 when unparseable.

    >>> partial(["5535", "5525", "35", "about 5535"], answer=[5535] * 4)
    [1.0, 0.8, 0.6, 0.0]
    """
    out = []
    for completion, truth in zip(completions, answer, strict=True):
        got = extract_answer(completion_text(completion), mode)
        out.append(0.0 if got is None else digit_closeness(got, int(truth)))
    return out


def format(completions: Sequence[Any], answer: Sequence[int] | None = None, **kwargs: Any) -> list[float]:  # noqa: A001
    """1.0 when the reply is strictly one number (right or wrong), else 0.0.

    >>> format(["5536", " = 5,536. ", "It is 5536", ""])
    [1.0, 1.0, 0.0, 0.0]
    """
    return [0.0 if extract_answer(completion_text(c), "strict") is None else 1.0 for c in completions]


REWARD_FUNCTIONS = {"exact": exact, "partial": partial, "format": format}
