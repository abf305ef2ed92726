"""Problem generators behind one small interface.

A task enumerates its whole problem space: every problem has an integer *position* in ``range(task.size)``,
and ``task.problem(position)`` is a pure function (no RNG, no I/O). Which positions are trained on, held
out, or drawn at which step is decided elsewhere (``rlarith.data``) from the seed, so a later task (the
"interleave" task) only has to implement this interface to get the data strategies, the held-out splits
and the contamination checks for free.

Canonical keys: for the commutative operators (``+``, ``*``) operand order is *not* part of the key, so
``12 + 34`` and ``34 + 12`` are the same problem for de-duplication and for train/held-out separation. This
is the conservative choice: a model that trained on one order is never scored on the other as "unseen".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

OPERATORS = ("+", "-", "*", "/")
_COMMUTATIVE = {"+", "*"}


@dataclass(frozen=True)
class Problem:
    """One problem: the text shown to the model, its ground truth and its de-duplication key."""

    question: str
    """The bare question, e.g. ``"123 * 45"``; the prompt template wraps it."""
    answer: int
    """The ground-truth integer answer."""
    key: str
    """Canonical key: two problems with the same key are the same problem."""


class Task(Protocol):
    """What every task provides. Positions are ``0 .. size-1``."""

    name: str
    integer_answers: bool
    """False when answers are not integers; the prompt then states the precision wanted."""

    @property
    def size(self) -> int:
        """Number of positions in the problem space."""
        ...

    def problem(self, position: int) -> Problem:
        """The problem at ``position``; a pure function."""
        ...

    def canonical_ids(self, positions: np.ndarray) -> np.ndarray:
        """int64 ids, equal exactly when the problems' keys are equal (vectorised for whole spaces)."""
        ...


def digit_range(digits: int) -> tuple[int, int]:
    """Smallest and largest positive integer with exactly ``digits`` digits (0 is left out: it makes
    trivial problems).

    >>> digit_range(1), digit_range(3)
    ((1, 9), (100, 999))
    """
    return (10 ** (digits - 1), 10**digits - 1)


@dataclass(frozen=True)
class ArithmeticTask:
    """``a <op> b`` with ``a`` of ``digits_a`` digits and ``b`` of ``digits_b`` digits.

    For ``/`` the quotient has ``digits_a`` digits and the divisor ``digits_b`` (never 0): the question
    shows ``quotient * divisor / divisor``, so every answer is an integer. Operands are positive. The
    operator and digit counts are checked once, by rlarith.config.TaskConfig (``make_task`` builds this).

    >>> task = ArithmeticTask("*", 3, 2)
    >>> task.size, task.problem(0), task.problem(task.size - 1).answer
    (81000, Problem(question='100 * 10', answer=1000, key='*:10:100'), 98901)
    >>> adds = ArithmeticTask("+", 2, 2)
    >>> adds.problem(1).question, adds.problem(90).question, adds.problem(1).key == adds.problem(90).key
    ('10 + 11', '11 + 10', True)
    """

    op: str = "*"
    digits_a: int = 3
    digits_b: int = 2
    name: str = "arithmetic"
    integer_answers: bool = True

    @property
    def _ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return digit_range(self.digits_a), digit_range(self.digits_b)

    @property
    def size(self) -> int:
        (lo_a, hi_a), (lo_b, hi_b) = self._ranges
        return (hi_a - lo_a + 1) * (hi_b - lo_b + 1)

    def operands(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``(a, b)`` operand arrays at ``positions`` (for ``/``: quotient and divisor)."""
        (lo_a, _), (lo_b, hi_b) = self._ranges
        positions = np.asarray(positions, dtype=np.int64)
        n_b = hi_b - lo_b + 1
        return lo_a + positions // n_b, lo_b + positions % n_b

    def problem(self, position: int) -> Problem:
        if not 0 <= position < self.size:
            raise IndexError(f"position {position} outside this task's {self.size} problems")
        a_arr, b_arr = self.operands(np.array([position]))
        a, b = int(a_arr[0]), int(b_arr[0])
        if self.op == "+":
            answer, question = a + b, f"{a} + {b}"
        elif self.op == "-":
            answer, question = a - b, f"{a} - {b}"
        elif self.op == "*":
            answer, question = a * b, f"{a} * {b}"
        else:
            answer, question = a, f"{a * b} / {b}"
        return Problem(question=question, answer=answer, key=self._key(a, b))

    def _key(self, a: int, b: int) -> str:
        if self.op in _COMMUTATIVE:
            a, b = min(a, b), max(a, b)
        return f"{self.op}:{a}:{b}"

    def canonical_ids(self, positions: np.ndarray) -> np.ndarray:
        a, b = self.operands(positions)
        if self.op in _COMMUTATIVE:
            a, b = np.minimum(a, b), np.maximum(a, b)
        return a * np.int64(10**9) + b
