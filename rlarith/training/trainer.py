"""The GRPOTrainer subclass and its two overrides of private internals, behind small adapters.

TRL (pinned in pyproject.toml) is used through public API everywhere else: the GRPOConfig, reward
functions, callbacks. The private methods overridden are TRL's ``_generate_and_score_completions``, to trace
every completion of a generation batch (``generated`` names exactly which of its outputs rlarith reads and
how they are padded), and the HF Trainer's ``_save_checkpoint``, to run it under ``async_save.capture``
(which replaces the serializers it calls). tests/test_trl_seam.py checks both against the installed
versions, so an upgrade that changes them fails one clear test.
"""

from __future__ import annotations

from typing import Any

from rlarith.checkpoints import intact_after_failed_save, staging_dir
from rlarith.durable import storage_errors
from rlarith.training.async_save import Snapshot, capture
from rlarith.training.context import RunContext
from rlarith.training.logs import log
from rlarith.training.recording import Generated, record

GENERATED_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
"""The keys of ``_generate_and_score_completions``' output that rlarith reads."""


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
        """GRPOTrainer that records traces and saves in the background (sealed by the ``on_save``
        callback, or by the writer once written)."""

        run: RunContext

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            pass  # TRL writes it into the output dir (our staging folder) at every save; nothing reads it

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            run = self.run
            waited = run.writer.wait()  # at most one write in flight, on every rank
            if waited >= 0.1 and self.accelerator.is_main_process:
                log.info(
                    "the save of step %d waited %.1f s for the write of %s",
                    self.state.global_step,
                    waited,
                    run.writer.folder.name,
                )
            step, run_dir = self.state.global_step, run.cfg.run_dir
            # A full or read-only disk: one paragraph naming the file, not a serializer's raw error.
            with storage_errors(
                f"Writing checkpoint-{step}",
                staging_dir(run_dir) / f"checkpoint-{step}",
                lambda: intact_after_failed_save(run_dir, step),
            ):
                if run.save_sync:
                    return super()._save_checkpoint(model, trial)
                run.snapshot = Snapshot(run.buffers)
                with capture(run.snapshot):
                    super()._save_checkpoint(model, trial)
            return None

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            output = super()._generate_and_score_completions(inputs)
            if self.run.traces is not None:
                record(self.run, self, inputs, generated(output))
            return output

    return RlarithTrainer
