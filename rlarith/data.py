"""Which problems a run trains on, and the held-out sets it never trains on.

The split. A keyed hash of each problem's canonical id (``data.split_salt``) puts it in the train, val or
test bucket; the buckets are disjoint by construction and the same for every run that shares the salt, so
held-out sets are comparable across runs. Held-out sets are then *verified*: drawn oversized from their
bucket, anything whose key could appear in training (or that the caller says was seen, e.g. from traces)
is dropped, and exactly the requested size is returned, or ``HeldOutTooSmall`` says why not.

The training stream. ``TrainProblems(task, data_cfg, seed).problem(i)`` is the problem of the run's
``i``-th prompt, a pure function of ``(seed, i)``: a resume at step S needs no saved data state.

- ``fixed``: the first ``train_size`` problems of a seeded permutation of the train bucket, cycled; each
  pass over them is in a fresh seeded order.
- ``fresh``: the seeded permutation itself, one problem per prompt, never repeated; a run that would need
  more problems than the train bucket holds fails before it starts (``check_capacity``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rlarith.config import ConfigError, DataConfig, RunConfig, TaskConfig
from rlarith.durable import write_atomic
from rlarith.tasks import ArithmeticTask, Problem, Task

TRAIN, VAL, TEST = 0, 1, 2
SPLITS = {"train": TRAIN, "val": VAL, "test": TEST}
# Every position of a space is hashed once; beyond this a run would spend too long (and too much memory)
# on it, and a task that big needs a sampling scheme of its own.
MAX_SPACE = 50_000_000


class HeldOutTooSmall(ConfigError):
    """The problem space cannot supply the problems a config asks for."""


def make_task(cfg: TaskConfig) -> Task:
    """The task a config describes."""
    return ArithmeticTask(op=cfg.op, digits_a=cfg.digits_a, digits_b=cfg.digits_b)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-mixed 64-bit hash of each element (uint64 in, uint64 out)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _salt64(salt: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little"))


def bucket_of(canonical_ids: np.ndarray, salt: str, val_fraction: float, test_fraction: float) -> np.ndarray:
    """TRAIN, VAL or TEST for each canonical id: a keyed hash, so equal keys always share a bucket."""
    with np.errstate(over="ignore"):
        h = _mix64(canonical_ids.astype(np.uint64) ^ _salt64(salt))
    u = (h >> np.uint64(11)).astype(np.float64) / float(2**53)  # uniform in [0, 1)
    out = np.full(u.shape, TRAIN, dtype=np.int8)
    out[u < val_fraction + test_fraction] = TEST
    out[u < val_fraction] = VAL
    return out


def _space(task: Task, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(canonical ids, buckets) of every position of the task's space."""
    return _space_cached(task, data.split_salt, data.val_fraction, data.test_fraction)


@functools.lru_cache(maxsize=8)
def _space_cached(
    task: Task, salt: str, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    if task.size > MAX_SPACE:
        raise ValueError(
            f"task has {task.size:,} problems; at most {MAX_SPACE:,} are supported (fewer digits)."
        )
    ids = task.canonical_ids(np.arange(task.size, dtype=np.int64))
    return ids, bucket_of(ids, salt, val_fraction, test_fraction)


def _distinct_permutation(task: Task, data: DataConfig, bucket: int, rng_key: list[int]) -> np.ndarray:
    """Positions of ``bucket`` in a seeded order, keeping one position per canonical key."""
    ids, buckets = _space(task, data)
    positions = np.flatnonzero(buckets == bucket)
    positions = np.random.default_rng(rng_key).permutation(positions)
    _, first = np.unique(ids[positions], return_index=True)
    return positions[np.sort(first)]


def _salt_int(salt: str) -> int:
    return int(_salt64(salt))


class TrainProblems:
    """The training stream: ``problem(i)`` is the run's ``i``-th training prompt."""

    def __init__(self, task: Task, data: DataConfig, seed: int) -> None:
        self.task, self.data, self.seed = task, data, seed
        self._order = _distinct_permutation(task, data, TRAIN, [seed, 0x7EA1])
        if data.strategy == "fixed":
            if data.train_size > len(self._order):
                raise HeldOutTooSmall(
                    f"data.train_size: {data.train_size:,} asked, but the train bucket holds only "
                    f"{len(self._order):,} distinct problems; lower data.train_size or use more digits."
                )
            self._order = self._order[: data.train_size]

    @property
    def distinct(self) -> int:
        """Distinct problems this stream can produce."""
        return len(self._order)

    def position(self, index: int) -> int:
        if index < 0:
            raise IndexError(f"prompt index must be >= 0, got {index}")
        n = len(self._order)
        if self.data.strategy == "fresh":
            if index >= n:
                raise IndexError(
                    f"fresh data exhausted: prompt {index} but only {n:,} distinct training problems"
                )
            return int(self._order[index])
        epoch, offset = divmod(index, n)
        return int(self._order[self._epoch_order(epoch)[offset]])

    @functools.lru_cache(maxsize=2)  # noqa: B019  (a stream lives as long as the run)
    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0xE90C, epoch]).permutation(len(self._order))

    def problem(self, index: int) -> Problem:
        return self.task.problem(self.position(index))

    def check_capacity(self, prompts: int) -> None:
        """Fail before training when ``fresh`` would run out of problems."""
        if self.data.strategy == "fresh" and prompts > self.distinct:
            raise HeldOutTooSmall(
                f"data.strategy: 'fresh' needs {prompts:,} distinct problems (training.max_steps x "
                f"training.prompts_per_step) but the train bucket holds {self.distinct:,}; use the 'fixed' "
                "strategy, fewer steps, or a larger task."
            )

    def seen_keys(self, prompts: int) -> set[str]:
        """Keys of every problem the run's first ``prompts`` prompts can contain."""
        positions = self._order if self.data.strategy == "fixed" else self._order[:prompts]
        return {self.task.problem(int(p)).key for p in positions}


def heldout(
    task: Task, data: DataConfig, split: str, size: int, exclude_keys: Iterable[str] = ()
) -> list[Problem]:
    """Exactly ``size`` problems of ``split`` (``val``/``test``), none of which could appear in training.

    Drawn oversized (twice the size, more when ``exclude_keys`` is large) from the split's bucket in an
    order seeded by the salt alone (the same for every run), then every candidate whose canonical id is in
    the train bucket, or whose key is in ``exclude_keys`` (e.g. seen in a run's traces), is dropped.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    ids, buckets = _space(task, data)
    exclude = set(exclude_keys)
    order = _distinct_permutation(task, data, SPLITS[split], [_salt_int(data.split_salt), SPLITS[split]])
    candidates = order[: 2 * size + len(exclude)]
    train_ids = np.unique(ids[buckets == TRAIN])
    in_train = np.isin(ids[candidates], train_ids)
    keep = [task.problem(p) for p, bad in zip(candidates.tolist(), in_train.tolist()) if not bad]
    keep = [p for p in keep if p.key not in exclude]
    if len(keep) < size:
        raise HeldOutTooSmall(
            f"data.{split}_size: {size:,} {split} problems asked, but the task's {task.size:,} problems leave "
            f"only {len(keep):,} in the {split} bucket ({getattr(data, split + '_fraction'):.0%} of the space) "
            f"after removing anything seen in training; lower data.{split}_size or raise data.{split}_fraction."
        )
    return keep[:size]


@dataclass(frozen=True)
class DataReport:
    space: int
    train_distinct: int
    val: int
    test: int
    overlap_val_train: int
    overlap_test_train: int
    overlap_val_test: int
    files: dict[str, str]


def write_problems(problems: list[Problem], path: Path) -> None:
    """JSONL, one problem a line, written to a temporary name and renamed when complete."""
    write_atomic(path, "".join(json.dumps(asdict(p)) + "\n" for p in problems))


def read_problems(path: Path) -> list[Problem]:
    with Path(path).open() as fh:
        return [Problem(**json.loads(line)) for line in fh if line.strip()]


def check(cfg: RunConfig, out_dir: Path | None = None, exclude_keys: Iterable[str] = ()) -> DataReport:
    """``rlarith data check``: build the held-out sets without anything in training (nor in
    ``exclude_keys``, e.g. what a run's traces show it trained on), verify disjointness, and write them
    to ``out_dir`` when one is given (nothing is written otherwise)."""
    task = make_task(cfg.task)
    stream = TrainProblems(task, cfg.data, cfg.training.seed)
    prompts = cfg.training.max_steps * cfg.training.prompts_per_step
    stream.check_capacity(prompts)
    exclude = set(exclude_keys)
    val = heldout(task, cfg.data, "val", cfg.data.val_size, exclude)
    test = heldout(task, cfg.data, "test", cfg.data.test_size, exclude)
    seen = stream.seen_keys(prompts) | exclude
    val_keys, test_keys = {p.key for p in val}, {p.key for p in test}
    files = {}
    if out_dir is not None:
        files = {"val": str(Path(out_dir) / "val.jsonl"), "test": str(Path(out_dir) / "test.jsonl")}
        write_problems(val, Path(files["val"]))
        write_problems(test, Path(files["test"]))
    return DataReport(
        space=task.size,
        train_distinct=stream.distinct,
        val=len(val),
        test=len(test),
        overlap_val_train=len(val_keys & seen),
        overlap_test_train=len(test_keys & seen),
        overlap_val_test=len(val_keys & test_keys),
        files=files,
    )
