from hypothesis import given
from hypothesis import strategies as st

from rlarith.rewards import REWARD_FUNCTIONS, digit_closeness, exact, format, partial

ints = st.integers(min_value=-(10**9), max_value=10**9)


@given(ints, ints)
def test_partial_is_bounded_and_one_only_when_right(pred, truth):
    score = digit_closeness(pred, truth)
    assert 0.0 <= score <= 1.0
    assert (score == 1.0) == (pred == truth)


@given(ints, st.text(max_size=30))
def test_components_agree_on_any_reply(truth, reply):
    e, p, f = (fn([reply], answer=[truth])[0] for fn in (exact, partial, format))
    assert e in (0.0, 1.0) and f in (0.0, 1.0) and 0.0 <= p <= 1.0
    assert e <= p  # right answers get full closeness credit
    if f == 0.0:  # a reply that is not strictly a number never earns strict-mode credit
        assert e == 0.0 and p == 0.0


def test_chat_completions_and_modes():
    chat = [[{"role": "assistant", "content": "it is 5,535"}]]
    assert exact(chat, answer=[5535]) == [0.0]
    assert exact(chat, answer=[5535], mode="last") == [1.0]
    assert partial(chat, answer=[5536], mode="last") == [0.8]


def test_closer_answers_score_higher():
    scores = partial(["1000", "5000", "5500", "5530", "5535"], answer=[5535] * 5)
    assert scores == sorted(scores) and scores[-1] == 1.0 and scores[0] < scores[1]


def test_names_match_components():
    assert {name: fn.__name__ for name, fn in REWARD_FUNCTIONS.items()} == {n: n for n in REWARD_FUNCTIONS}
    assert format(["7", "x"]) == [1.0, 0.0]
