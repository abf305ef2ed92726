"""The one answer parser, shared by training rewards and evaluation.

Two modes:

- ``strict``: the completion is exactly one number, optionally surrounded by whitespace, optionally
  preceded by ``=`` or wrapped as ``\\boxed{...}``, optionally followed by one period.
- ``last``: the last number anywhere in the text (for models that add words).

Both modes share the number rules: an optional leading minus; commas only as thousands separators in
valid groups (``12,345`` but not ``12,34`` or ``1,2345``; a blanket ``replace(",", "")`` would fuse
lists like ``3,4`` into 34); a decimal point followed only by zeros is the integer (``5535.0``); any other
fraction, exponent or space inside the number is not an integer answer. More than 100 digits is refused
(Python refuses to convert huge digit strings, and no answer here is that long).

``extract_answer`` never raises on a ``str``: ``None`` means *extraction failed*, which every caller counts
apart from a wrong answer.

>>> extract_answer("5,535")
5535
>>> extract_answer(" = 5535.0. ")
5535
>>> extract_answer("\\\\boxed{-1,234,567}")
-1234567
>>> extract_answer("12,34") is None, extract_answer("1,2345") is None, extract_answer("5535.5") is None
(True, True, True)
>>> extract_answer("The answer is 5,535.") is None
True
>>> extract_answer("The answer is 5,535.", mode="last")
5535
"""

from __future__ import annotations

import re
from typing import Literal

Mode = Literal["strict", "last"]
MODES: tuple[str, ...] = ("strict", "last")
MAX_DIGITS = 100

# One number: optional minus, digits with valid thousands groups or none, optional ".000".
_NUMBER = r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.0+)?"
_STRICT = re.compile(
    rf"\s*(?:=\s*)?(?:\\boxed\{{\s*(?P<boxed>{_NUMBER})\s*\}}|(?P<plain>{_NUMBER}))\.?\s*",
    re.ASCII,
)
# A number-like token in free text: not glued to a word, a number, or a sign before it, nor to a word
# after it (so "5e3", "x2" and "3rd" are not numbers). Validity is decided by _NUMBER afterwards.
_TOKEN = re.compile(r"(?<![\w.,\-])-?[0-9][0-9,]*(?:\.[0-9]+)?(?!\w)", re.ASCII)
_VALID = re.compile(_NUMBER, re.ASCII)


def _to_int(number: str) -> int | None:
    """Convert a string already matched by ``_NUMBER`` to an int; None when it is too long."""
    digits = number.split(".", 1)[0].replace(",", "")
    if len(digits.lstrip("-")) > MAX_DIGITS:
        return None
    return int(digits)


def extract_answer(text: str, mode: Mode = "strict") -> int | None:
    """Return the integer answer in ``text`` or None when there is none under ``mode``'s rules.

    >>> [extract_answer(s) for s in ["42", "-42", "4 2", "42 43", "4.2e1", "forty-two", ""]]
    [42, -42, None, None, None, None, None]
    >>> extract_answer("I think 3,4 and then 12,345", mode="last")
    12345
    >>> extract_answer("so it is 12,34", mode="last") is None
    True
    """
    if not isinstance(text, str):
        return None
    if mode == "strict":
        match = _STRICT.fullmatch(text)
        if match is None:
            return None
        return _to_int(match.group("boxed") or match.group("plain"))
    if mode == "last":
        tokens = _TOKEN.findall(text)
        if not tokens:
            return None
        token = tokens[-1].rstrip(",")  # a trailing comma is punctuation, not a group separator
        if not _VALID.fullmatch(token):
            return None
        return _to_int(token)
    raise ValueError(f"extract_answer: mode must be one of {MODES}, got {mode!r}")
