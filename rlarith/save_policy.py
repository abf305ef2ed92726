"""When to save: the lab notebook's save policy and its state, restored on resume.

``SavePolicy.observe`` runs once per step at generation boundaries. It saves always when the step is a
multiple of ``save_every``, at the final step and on a stop request; and, within a budget (a minimum gap in
steps, a maximum share of wall time spent saving), when the smoothed reward (an EMA of ``reward_metric``:
``exact`` or ``total``) first crosses ``reward_threshold`` and, with ``save_on_best``, at a new best of it.
Every save carries its reasons as sentences; ``SavePolicy.summary`` is its one screen line,
``SavePolicy.report`` the full report for the run's log (the reward, the old best and the new, the time
spent saving). A skipped trigger is reported in one line with the reason.

How a save becomes a valid checkpoint and which are kept is rlarith.checkpoints; the policy's state goes
into every checkpoint (``SavePolicy.state_dict``, read back with ``checkpoints.load_policy_state``).
This module never imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlarith.config import CheckpointConfig

EMA_ALPHA = 0.1
"""Weight of the newest step in the smoothed reward that drives threshold and best saves."""


def ema_update(previous: float | None, value: float, alpha: float = EMA_ALPHA) -> float:
    """Exponential moving average; the first value starts it.

    >>> ema_update(None, 1.0), ema_update(1.0, 0.0), round(ema_update(0.5, 1.0), 6)
    (1.0, 0.9, 0.55)
    """
    return value if previous is None else (1 - alpha) * previous + alpha * value


def best_saved(history: list[dict[str, Any]], metric: str) -> tuple[int, float] | None:
    """``(step, reward)`` of the saved checkpoint with the highest ``metric`` reward (earliest on ties).

    >>> best_saved([{"step": 20, "reward": 0.2, "metric": "exact"}, {"step": 30, "reward": 0.4, "metric": "exact"},
    ...             {"step": 40, "reward": 0.9, "metric": "total"}, {"step": 50, "reward": 0.4, "metric": "exact"}],
    ...            "exact")
    (30, 0.4)
    """
    best = None
    for entry in history:
        reward = entry.get("reward")
        if entry.get("metric", metric) != metric or not _usable(reward):
            continue
        if best is None or reward > best[1]:
            best = (int(entry["step"]), float(reward))
    return best


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


@dataclass
class SavePolicy:
    """The notebook's save policy and its state (restored on resume).

    Scheduled saves (every ``save_every`` steps) and the saves a caller forces (``observe(forced=...)``:
    the final step, a stop request) always happen. Reward-triggered saves follow the *smoothed* reward, an
    EMA (alpha ``EMA_ALPHA``) of ``reward_metric``, because one step's reward over a few dozen completions
    is mostly noise: a save when it first crosses ``reward_threshold``, and one at every new best (with
    ``save_on_best``). They are kept within a budget: at least ``min_save_gap`` steps since the previous
    save, and the share of wall time spent saving, counting the save about to happen (estimated to take as
    long as the previous one), at most ``max_save_fraction``. A trigger outside the budget is skipped and
    explained in ``skipped`` (one line each); a threshold crossing stays pending until a save happens.

    >>> clock = iter(range(0, 10_000, 10)).__next__  # a fake wall clock: 10 s between observations
    >>> policy = SavePolicy(save_every=20, reward_threshold=0.3, min_save_gap=5, clock=clock)
    >>> policy.observe(1, exact=0.4, total=0.4)
    ['smoothed exact 0.400 crossed reward_threshold=0.3']
    >>> policy.record_save(1, policy.current(), ['...'], seconds=1.0)
    >>> policy.observe(2, exact=1.0, total=1.0), policy.skipped  # doctest: +NORMALIZE_WHITESPACE
    ([], ['step 2: no save for new best smoothed exact 0.460 (previous best 0.400 at step 1):
           1 step since the save at step 1 (checkpoints.min_save_gap=5)'])
    >>> policy.observe(20, exact=0.0, total=0.0)
    ['step 20 is a multiple of save_every=20']
    """

    save_every: int
    reward_threshold: float
    save_on_best: bool = True
    keep_best: bool = True
    reward_metric: str = "exact"
    max_save_fraction: float = 0.05
    min_save_gap: int = 10
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)
    """Seconds, monotonic (tests pass a fake one). Only the budget reads it."""
    # State. best_reward is the best smoothed value observe() has seen (what "new best" compares with);
    # best_step is the best among *saved* checkpoints (what retention keeps): a best seen but never saved
    # must not make retention keep a checkpoint that is not the best one.
    best_reward: float | None = None
    best_reward_step: int | None = None
    best_step: int | None = None
    ema: float | None = None
    """The smoothed ``reward_metric``."""
    crossed_step: int | None = None
    """Step of the save that marked the threshold crossing (None: not crossed, or not saved yet)."""
    elapsed_s: float = 0.0
    """Wall seconds of the run at the last ``observe``, over every attempt (each counted up to its last
    checkpoint)."""
    save_s: float = 0.0
    """Seconds spent saving, over every attempt."""
    last_save_s: float = 0.0
    """Seconds the most recent save took: the estimate of the next one's cost."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per save: ``{"step", "reward", "metric", "reasons", "time"}``."""
    skipped: list[str] = field(default_factory=list, compare=False)
    """The reward triggers the last ``observe`` skipped, one line each with the reason (not state)."""
    _last: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    _started: float = field(default=0.0, init=False, repr=False, compare=False)
    _base_s: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._started = self.clock()  # the settings were checked once, by rlarith.config.CheckpointConfig

    @classmethod
    def from_config(cls, config: CheckpointConfig, clock: Callable[[], float] = time.monotonic) -> SavePolicy:
        return cls(
            config.save_every,
            config.reward_threshold,
            config.save_on_best,
            config.keep_best,
            config.reward_metric,
            config.max_save_fraction,
            config.min_save_gap,
            clock,
        )

    def elapsed(self) -> float:
        """Wall seconds of the run so far: earlier attempts (from the state resumed) plus this one."""
        return self._base_s + self.clock() - self._started

    def current(self) -> float:
        """The smoothed reward after the last ``observe`` (NaN before any usable reward)."""
        return math.nan if self.ema is None else self.ema

    def observe(
        self,
        step: int,
        exact: float,
        total: float,
        forced: list[str] | tuple[str, ...] = (),
        elapsed: float | None = None,
    ) -> list[str]:
        """Feed one step's mean exact-match and weighted total reward (over the generation window); returns
        the reasons to save now (empty: no save). ``forced`` are reasons that save in any case (final step,
        stop request). ``elapsed`` overrides ``elapsed()`` (ranks must decide alike: they pass rank 0's).
        Call once per step, at generation boundaries; ``skipped`` then lists the triggers left out."""
        raw = exact if self.reward_metric == "exact" else total
        if _usable(raw):  # a step without scored completions (NaN) must not poison the average
            self.ema = ema_update(self.ema, raw)
        self.elapsed_s = self.elapsed() if elapsed is None else float(elapsed)
        value, name = self.current(), f"smoothed {self.reward_metric}"
        reasons = []
        if step % self.save_every == 0:
            reasons.append(f"step {step} is a multiple of save_every={self.save_every}")
        reasons += forced

        triggers = []
        if self.crossed_step is None and _usable(value) and value > self.reward_threshold:
            triggers.append(f"{name} {value:.3f} crossed reward_threshold={self.reward_threshold:g}")
        previous, previous_step = self.best_reward, self.best_reward_step
        new_best = _usable(value) and previous is not None and value > previous
        if _usable(value) and (previous is None or value > previous):
            self.best_reward, self.best_reward_step = value, step  # the first value sets the bar
        if new_best and self.save_on_best:
            triggers.append(
                f"new best {name} {value:.3f} (previous best {previous:.3f} at step {previous_step})"
            )

        self.skipped = []
        if triggers and not reasons:
            over = self._over_budget(step)
            if over:
                self.skipped = [f"step {step}: no save for {trigger}: {over}" for trigger in triggers]
                triggers = []
        reasons += triggers
        if reasons and self.crossed_step is None and _usable(value) and value > self.reward_threshold:
            self.crossed_step = step  # any save above the threshold is the crossing's save
        self._last = {"step": step, "reward": value, "reasons": list(reasons), "new_best": new_best,
                      "previous": previous, "previous_step": previous_step}  # fmt: skip
        return reasons

    def _over_budget(self, step: int) -> str | None:
        """Why a reward-triggered save at ``step`` would break the budget; None when it fits."""
        if self.history:
            last = self.history[-1]["step"]
            if step - last < self.min_save_gap:
                gap = step - last
                return (
                    f"{gap} step{'s' * (gap != 1)} since the save at step {last} "
                    f"(checkpoints.min_save_gap={self.min_save_gap})"
                )
        spent, cost, wall = self.save_s, self.last_save_s, self.elapsed_s
        if cost > 0 and spent + cost > self.max_save_fraction * (wall + cost):
            return (
                f"saving would take {(spent + cost) / (wall + cost):.1%} of the wall time ({spent:.1f} s of "
                f"{wall:.0f} s so far, ~{cost:.1f} s more; checkpoints.max_save_fraction={self.max_save_fraction:g})"
            )
        return None

    def record_save(self, step: int, reward: float, reasons: list[str], seconds: float = 0.0) -> None:
        """Note a save of ``step`` with its smoothed reward (see ``current``), reasons and the seconds it
        took; updates ``history``, ``best_step`` and the budget. A re-save of the same step replaces its
        entry."""
        self.history = _with_save(self.history, step, reward, self.reward_metric, reasons)
        best = best_saved(self.history, self.reward_metric)
        self.best_step = best[0] if best else None
        self.add_save_time(seconds, new=True)
        if self._last is not None and self._last["step"] == step:
            self._last["recorded"] = True

    def add_save_time(self, seconds: float, new: bool = False) -> None:
        """Count ``seconds`` more of saving (e.g. sealing and pruning, after ``record_save``)."""
        self.save_s += seconds
        self.last_save_s = seconds if new else self.last_save_s + seconds

    def summary(self, step: int, reasons: list[str]) -> str:
        """One line for the screen about a save at ``step``: its reasons, shortest first."""
        return f"checkpoint-{step} saved: " + "; ".join(reasons or ["no policy reason (saved on request)"])

    def report(self, step: int, reasons: list[str]) -> str:
        """The full report for a save at ``step`` (for the run's log). When a reward caused it, the last
        line names the smoothed reward, the old best and the new (or the best that still stands)."""
        lines = [f"checkpoint-{step} saved:"]
        lines += [f"  - {reason}" for reason in reasons] or ["  - no policy reason (saved on request)"]
        last, name = self._last, f"smoothed {self.reward_metric}"
        rewarded = any(r.startswith(("new best", "smoothed")) for r in reasons)
        if last is not None and last["step"] == step and rewarded:
            value = last["reward"]
            if last["new_best"]:
                old = f"{last['previous']:.3f} (step {last['previous_step']})"
                lines.append(f"  reward {name}: old best {old}, new best {value:.3f} (step {step})")
            else:
                best = f"{self.best_reward:.3f} (step {self.best_reward_step})"
                lines.append(f"  reward {name}: {value:.3f}, best stays {best}")
        lines.append(
            f"  saving so far: {self.save_s:.1f} s of {self.elapsed_s:.0f} s wall time "
            f"(budget {self.max_save_fraction:.0%}), {len(self.history)} saves"
        )
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """The state to store in a checkpoint (JSON-serialisable). Taken between ``observe`` and
        ``record_save`` of a save, it already counts that save: the checkpoint it is stored in exists
        exactly when the save succeeded, so a run resumed from it must know it was saved."""
        history = [dict(entry) for entry in self.history]
        last = self._last
        if last is not None and last["reasons"] and not last.get("recorded"):
            history = _with_save(history, last["step"], last["reward"], self.reward_metric, last["reasons"])
        best = best_saved(history, self.reward_metric)
        return {
            "reward_metric": self.reward_metric,
            "best_reward": self.best_reward,
            "best_reward_step": self.best_reward_step,
            "best_step": best[0] if best else None,
            "ema": self.ema,
            "crossed_step": self.crossed_step,
            "elapsed_s": self.elapsed_s,
            "save_s": self.save_s,
            "last_save_s": self.last_save_s,
            "history": history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output (unknown keys, e.g. the trainer's, are ignored). When the
        config's ``reward_metric`` changed since, the smoothed reward, best and crossing restart: rewards of
        two metrics do not compare."""
        same_metric = state.get("reward_metric", self.reward_metric) == self.reward_metric
        self.best_reward = state.get("best_reward") if same_metric else None
        self.best_reward_step = state.get("best_reward_step") if same_metric else None
        self.ema = state.get("ema") if same_metric else None
        self.crossed_step = state.get("crossed_step") if same_metric else None
        self.elapsed_s = self._base_s = float(state.get("elapsed_s", 0.0))
        self.save_s = float(state.get("save_s", 0.0))
        self.last_save_s = float(state.get("last_save_s", 0.0))
        self.history = [dict(entry) for entry in state.get("history", [])]
        best = best_saved(self.history, self.reward_metric)
        self.best_step = best[0] if best else None
        self._last, self.skipped = None, []


def _with_save(
    history: list[dict[str, Any]], step: int, reward: float, metric: str, reasons: list[str]
) -> list[dict[str, Any]]:
    entry = {"step": step, "reward": reward, "metric": metric, "reasons": list(reasons), "time": _now()}
    return sorted([e for e in history if e["step"] != step] + [entry], key=lambda e: e["step"])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
