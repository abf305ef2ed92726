"""Stopping at a step boundary: a signal only raises a flag; the training loop answers it.

SLURM (and submitit) warn a job before killing it: SIGUSR2 ``--signal`` ahead of a time limit or a
preemption, SIGTERM at the end of the grace time. Saving inside a signal handler fails intermittently
(the handler interrupts arbitrary code, possibly a collective or a half-written file), so the handler here
only sets a flag. At every step boundary the ranks agree on it (one all-reduce of a single number: if any
rank was signalled, every rank stops), and the trainer answers with a full checkpoint on every rank,
sealed traces and a clean exit with ``EXIT_STOPPED``: the job asks to be requeued and resumes exactly.
A stop that arrives during the final step changes nothing: training finished, the exit is 0.

Ctrl-C (SIGINT) follows the convention users expect: the first one stops at the next step boundary with
a save, like SIGTERM, and says so ("press Ctrl-C again to abort without saving"); the second raises
``KeyboardInterrupt`` and the run aborts without saving (exit ``EXIT_ABORTED``). A process started with
SIGINT ignored (a background job of a script) keeps ignoring it.

``rlarith train`` installs the handlers first thing, before its heavy imports. A launcher can close the
remaining window (interpreter start-up) completely by starting the trainer with the stop signals blocked
(``preexec_fn=block_stop_signals``): a blocked signal waits, and ``install()`` unblocks them once the
handlers are in place, so a signal sent at any moment after the fork is answered.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

EXIT_STOPPED = 75
"""Exit status of a run that stopped on a signal after saving (EX_TEMPFAIL: "try again later"). A
requeue wrapper resumes it; a finished run exits 0, a failed one with anything else."""

EXIT_ABORTED = 130
"""Exit status of a run aborted by a second Ctrl-C (128 + SIGINT, the shell's convention): nothing saved."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
INTERRUPT_HINT = "press Ctrl-C again to abort without saving"


def block_stop_signals() -> None:
    """Block SIGTERM, SIGUSR2 and SIGINT in the calling process (for ``subprocess.Popen(preexec_fn=...)``:
    the child starts with them pending, not fatal, until ``StopRequest.install`` unblocks them)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {*STOP_SIGNALS, signal.SIGINT})


class StopRequest:
    """A flag set by SIGTERM/SIGUSR2 (and the first SIGINT, with ``interrupt``). ``install()`` replaces
    the handlers; ``uninstall()`` restores them."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, interrupt: bool = True) -> None:
        self.signals = signals
        self.interrupt = interrupt
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._interrupts = 0

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now, without saving
            os.write(2, f"rlarith: received SIGINT: stopping at the next step boundary with a save; "
                        f"{INTERRUPT_HINT}\n".encode())  # fmt: skip
            if self.received is None:
                self.received, self.received_at = signal.SIGINT, time.time()
            return
        if self.received is None:  # keep the first; SLURM may send USR2 then TERM
            self.received, self.received_at = signal.Signals(signum), time.time()
            # os.write, not print: print could deadlock on a stream lock the interrupted code holds.
            os.write(
                2,
                f"rlarith: received {signal.Signals(signum).name}: stopping at the next step boundary\n".encode(),
            )

    def install(self) -> StopRequest:
        """Replace the handlers, then unblock the signals (a launcher may have started us with them blocked)."""
        handled = list(self.signals)
        if self.interrupt and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            handled.append(signal.SIGINT)
        for sig in handled:
            self._previous[sig] = signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
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
