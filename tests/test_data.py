"""Tasks, data strategies and held-out sets: determinism and disjointness, by construction and checked."""

import operator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlarith.config import DataConfig, PromptConfig, load_config
from rlarith.data import HeldOutTooSmall, TrainProblems, check, heldout, make_task, read_problems
from rlarith.prompts import messages
from rlarith.tasks import ArithmeticTask


def test_positive_control_task_space():
    task = ArithmeticTask("*", 3, 2)
    a, b = task.operands(np.arange(task.size))
    assert (a.min(), a.max(), b.min(), b.max()) == (100, 999, 10, 99)
    assert len({task.problem(p).key for p in range(0, task.size, 7)}) == len(range(0, task.size, 7))
    p = task.problem(12345)
    x, y = (int(v) for v in p.question.split(" * "))
    assert p.answer == x * y


@pytest.mark.parametrize("op", ["+", "-", "*", "/"])
def test_every_operator_answers_its_question(op):
    task = ArithmeticTask(op, 2, 1)
    for pos in range(0, task.size, 13):
        p = task.problem(pos)
        x, y = (int(v) for v in p.question.split(f" {op} "))
        assert p.answer == {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}[
            op
        ](x, y)
        if op == "/":
            assert x % y == 0


def test_canonical_ids_match_keys():
    task = ArithmeticTask("+", 2, 2)
    positions = np.arange(task.size)
    ids = task.canonical_ids(positions)
    by_key: dict[str, int] = {}
    for pos, cid in zip(positions.tolist(), ids.tolist()):
        assert by_key.setdefault(task.problem(pos).key, cid) == cid
    assert len(by_key) == len(set(ids.tolist()))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(["fixed", "fresh"]))
def test_stream_is_a_pure_function_of_seed_and_index(seed, strategy):
    task = ArithmeticTask("*", 3, 2)
    data = DataConfig(strategy=strategy, train_size=100)
    a, b = TrainProblems(task, data, seed), TrainProblems(task, data, seed)
    indices = [0, 1, 99, 100, 250, 7]
    assert [a.problem(i) for i in indices] == [b.problem(i) for i in reversed(indices)][::-1]
    other = TrainProblems(task, data, seed + 1)
    assert [a.problem(i) for i in range(20)] != [other.problem(i) for i in range(20)]


def test_fixed_cycles_its_pool_in_fresh_orders():
    stream = TrainProblems(ArithmeticTask("*", 3, 2), DataConfig(strategy="fixed", train_size=50), seed=3)
    first = [stream.problem(i).key for i in range(50)]
    second = [stream.problem(i).key for i in range(50, 100)]
    assert len(set(first)) == 50 and set(first) == set(second) and first != second


def test_fresh_never_repeats_and_runs_out_loudly():
    task = ArithmeticTask("+", 1, 1)  # 100 ordered pairs, 55 distinct keys
    stream = TrainProblems(task, DataConfig(strategy="fresh", val_fraction=0.1, test_fraction=0.1), seed=0)
    keys = [stream.problem(i).key for i in range(stream.distinct)]
    assert len(keys) == len(set(keys)) == stream.distinct
    with pytest.raises(IndexError, match="exhausted"):
        stream.problem(stream.distinct)
    with pytest.raises(HeldOutTooSmall, match="data.strategy"):
        stream.check_capacity(stream.distinct + 1)


@pytest.mark.parametrize(("op", "da", "db"), [("*", 3, 2), ("+", 2, 2), ("*", 2, 1), ("-", 2, 2)])
def test_heldout_never_overlaps_training(op, da, db):
    task = ArithmeticTask(op, da, db)
    data = DataConfig(strategy="fresh", val_fraction=0.1, test_fraction=0.1)
    size = 40
    val, test = heldout(task, data, "val", size), heldout(task, data, "test", size)
    assert len(val) == len(test) == size
    stream = TrainProblems(task, data, seed=0)
    train_keys = {stream.problem(i).key for i in range(stream.distinct)}  # every problem fresh could draw
    assert not ({p.key for p in val} & train_keys)
    assert not ({p.key for p in test} & train_keys)
    assert not ({p.key for p in val} & {p.key for p in test})
    assert heldout(task, data, "val", size) == val  # the same for every run


def test_heldout_drops_excluded_keys_and_keeps_its_size():
    task, data = ArithmeticTask("*", 3, 2), DataConfig()
    val = heldout(task, data, "val", 50)
    again = heldout(task, data, "val", 50, exclude_keys={p.key for p in val[:10]})
    assert len(again) == 50 and not ({p.key for p in val[:10]} & {p.key for p in again})


def test_heldout_too_small_is_a_clear_error():
    with pytest.raises(HeldOutTooSmall, match=r"data.val_size: 500 val problems asked.*810 problems"):
        heldout(ArithmeticTask("*", 2, 1), DataConfig(), "val", 500)


def test_check_writes_sets_that_read_back(tmp_path):
    cfg = load_config("configs/default.yaml")
    report = check(cfg, tmp_path)
    assert report.overlap_val_train == report.overlap_test_train == report.overlap_val_test == 0
    val = read_problems(tmp_path / "val.jsonl")
    assert len(val) == cfg.data.val_size == report.val
    assert val == heldout(make_task(cfg.task), cfg.data, "val", cfg.data.val_size)


def test_prompt_forbids_chain_of_thought_and_precision_only_when_needed():
    task = ArithmeticTask("*", 3, 2)
    text = messages(task.problem(0), PromptConfig(), task.integer_answers)[-1]["content"]
    assert "only the final number" in text and "decimal" not in text
    assert "decimal" in messages(task.problem(0), PromptConfig(), integer_answers=False)[-1]["content"]
