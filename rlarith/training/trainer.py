"""The GRPOTrainer subclass and its one override of TRL's internals, behind a small adapter.

TRL (pinned in pyproject.toml) is used through public API everywhere else: the GRPOConfig, reward
functions, callbacks. The one private method overridden is ``_generate_and_score_completions``, to trace
every completion of a generation batch; ``generated`` names exactly which of its outputs rlarith reads and
how they are padded, and tests/test_trl_seam.py checks both against the installed TRL, so an upgrade that
changes them fails one clear test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlarith.training.context import RunContext
from rlarith.training.recording import record

GENERATED_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
"""The keys of ``_generate_and_score_completions``' output that rlarith reads."""


@dataclass(frozen=True)
class Generated:
    """One generation batch as TRL scored it (this rank's completions; tensors moved to the CPU)."""

    prompt_ids: Any  # (n, P) int, left-padded
    prompt_mask: Any  # (n, P) 0/1, zeros first
    completion_ids: Any  # (n, C) int, right-padded
    completion_mask: Any  # (n, C) 0/1, zeros last
    advantages: Any  # (n,) float


def generated(output: dict[str, Any]) -> Generated:
    """The adapter: what rlarith reads of ``GRPOTrainer._generate_and_score_completions``' output."""
    missing = [key for key in GENERATED_KEYS if key not in output]
    if missing:
        raise RuntimeError(
            f"TRL's GRPOTrainer._generate_and_score_completions no longer returns {missing}: this TRL is not "
            "the one rlarith was written for (pyproject.toml pins it); update rlarith.training.trainer."
            "generated and tests/test_trl_seam.py together."
        )
    return Generated(*(output[key].cpu() for key in GENERATED_KEYS))


def make_trainer_class() -> type:
    """Subclass GRPOTrainer (imported late: the launcher must not import torch)."""
    from trl import GRPOTrainer

    class RlarithTrainer(GRPOTrainer):
        """GRPOTrainer that records traces (saves are sealed by the ``on_save`` callback)."""

        run: RunContext

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            pass  # TRL writes it into the output dir (our staging folder) at every save; nothing reads it

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            output = super()._generate_and_score_completions(inputs)
            if self.run.traces is not None:
                record(self.run, self, inputs, generated(output))
            return output

    return RlarithTrainer
