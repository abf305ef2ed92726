"""What the trainer subclass and the callbacks share for one attempt of a run."""

from __future__ import annotations

import time
from typing import Any

from rlarith.config import RunConfig
from rlarith.preemption import StopRequest
from rlarith.rewards import REWARD_FUNCTIONS
from rlarith.save_policy import SavePolicy
from rlarith.training.identity import Attempt, run_id


class RunContext:
    """What the callbacks and the trainer subclass share for one attempt."""

    def __init__(self, cfg: RunConfig, attempt: Attempt, stop: StopRequest) -> None:
        self.cfg, self.attempt, self.stop = cfg, attempt, stop
        self.run_id = run_id(cfg)
        self.policy = SavePolicy.from_config(cfg.checkpoints)
        self.pending_reward, self.pending_reasons = 0.0, []  # set by the step callback before a save
        self.save_started = (
            0.0  # when the step callback asked for the save (its duration is measured from it)
        )
        self.stopped = False
        self.step_started, self.step_s = time.time(), 0.0  # the last step's wall time (grace budget)
        self.grace_checked = False  # the budget is judged once per attempt, after its first save
        self.traces: Any = None  # rlarith.traces.TraceWriter when enabled
        self.reward_names = list(REWARD_FUNCTIONS)
        self.weights = [float(cfg.rewards.weights.get(n, 0.0)) for n in self.reward_names]
        self.trace_seconds = 0.0  # time spent recording traces since the last log line
        self.rewards: dict[str, list[float]] = {}  # this generation batch's values, per component
        self.save_sync = True  # set per save by the step callback: stops and the final step never overlap
        self.snapshot: Any = None  # rlarith.training.async_save.Snapshot of the save being made
        self.buffers: Any = None  # its HostBuffers, kept across saves
        self.writer: Any = None  # rlarith.training.async_save.BackgroundWriter
