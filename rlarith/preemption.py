"""Stopping at a step boundary: a signal only raises a flag; the training loop answers it.

SLURM (and submitit) warn a job before killing it: SIGUSR2 ``--signal`` ahead of a time limit or a
preemption, SIGTERM at the end of the grace time. Saving inside a signal handler fails intermittently
(the handler interrupts arbitrary code, possibly a collective or a half-written file), so the handler here
only sets a flag. At every step boundary the ranks agree on it (one all-reduce of a single number: if any
rank was signalled, every rank stops), and the trainer answers with a full checkpoint on every rank,
sealed traces and a clean exit with ``EXIT_STOPPED``: the job asks to be requeued and resumes exactly.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

EXIT_STOPPED = 75
"""Exit status of a run that stopped on a signal after saving (EX_TEMPFAIL: "try again later"). A
requeue wrapper resumes it; a finished run exits 0, a failed one with anything else."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopRequest:
    """A flag set by SIGTERM/SIGUSR2. ``install()`` replaces the handlers; ``uninstall()`` restores them."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:  # keep the first; SLURM may send USR2 then TERM
            self.received, self.received_at = signal.Signals(signum), time.time()
            # os.write, not print: print could deadlock on a stream lock the interrupted code holds.
            os.write(
                2,
                f"rlarith: received {signal.Signals(signum).name}: stopping at the next step boundary\n".encode(),
            )

    def install(self) -> StopRequest:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


def agree(local: bool, device: object = "cpu") -> bool:
    """True on every rank when any rank asks to stop (a max all-reduce); the local flag without torch.distributed."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=device)  # (1,)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
