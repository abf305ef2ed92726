"""The shared parser: table-driven cases from the issue and the notebook, plus properties."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlarith.answers import extract_answer

STRICT = [
    ("5535", 5535),
    ("  5535\n", 5535),
    ("5535.", 5535),
    ("= 5535", 5535),
    ("=5535", 5535),
    ("\\boxed{5535}", 5535),
    ("\\boxed{ 5,535 }.", 5535),
    ("-42", -42),
    ("0", 0),
    ("12,345", 12345),
    ("1,234,567", 1234567),
    ("12,34", None),
    ("1,2345", None),
    (",123", None),
    ("123,", None),
    ("5535.0", 5535),
    ("5535.000", 5535),
    ("5535.5", None),
    ("5535.05", None),
    ("5 535", None),
    ("5535 5536", None),
    ("5e3", None),
    ("5E3", None),
    ("five", None),
    ("The answer is 5535", None),
    ("", None),
    ("   ", None),
    ("+5535", None),
    ("--5", None),
    ("5535..", None),
    ("\\boxed{5535", None),
    ("٥٥٣٥", None),
    ("1" * 100, int("1" * 100)),
    ("1" * 101, None),
    ("1" * 5000, None),
]
LAST = [
    ("The answer is 5,535.", 5535),
    ("5535", 5535),
    ("I get 12 then 5535", 5535),
    ("3,4", None),
    ("first 3, 4", 4),
    ("so 12,34", None),
    ("It is 5e3", None),
    ("x2", None),
    ("about -17 apples", -17),
    ("5535.0 is it", 5535),
    ("no digits", None),
    ("1,234, then", 1234),
    ("value 5535.5", None),
    ("n = " + "9" * 101, None),
]


@pytest.mark.parametrize(("text", "expected"), STRICT)
def test_strict(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("text", "expected"), LAST)
def test_last(text, expected):
    assert extract_answer(text, mode="last") == expected


@given(st.text())
def test_never_raises_and_returns_int_or_none(text):
    for mode in ("strict", "last"):
        got = extract_answer(text, mode)
        assert got is None or type(got) is int


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_plain_and_grouped_round_trip(n):
    for text in (str(n), f"{n:,}", f" {n}. ", f"\\boxed{{{n:,}}}", f"= {n}.0"):
        assert extract_answer(text) == n
        assert extract_answer(f"the answer: {text.strip()}", mode="last") == n


@given(st.integers(min_value=100_000, max_value=10**12), st.integers(min_value=1, max_value=2))
def test_misgrouped_commas_rejected(n, group):
    digits = str(n)
    bad = digits[:group] + "," + digits[group:]  # a comma followed by more than 3 digits
    assert extract_answer(bad) is None


def test_bad_mode_is_a_programming_error():
    with pytest.raises(ValueError, match="mode"):
        extract_answer("1", mode="loose")  # type: ignore[arg-type]
