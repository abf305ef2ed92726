"""Warm-start the tiny local model with supervised fine-tuning, so GRPO has signal on a CPU.

GRPO learns only from groups whose completions differ in reward: a model that never answers right gets no
gradient. A randomly initialised ~1M-parameter Llama never does, so ``rlarith bootstrap`` first trains it
with TRL's ``SFTTrainer`` on the run's own task and prompt format (training-bucket problems only, so the
held-out sets stay unseen) to partial accuracy, and saves it at ``model.path``. The default CPU positive
control (configs/default.yaml, 2-digit + 2-digit addition) then improves on it with GRPO.

SFT stops at a target accuracy, not a step count: the accuracy of this model jumps suddenly (2% -> 78%
within ~300 steps) and *when* it jumps moves by a hundred steps between seeds and even between CPUs, so a
fixed count starts GRPO anywhere between 10% and 90%. Every ``CHECK_EVERY`` steps greedy accuracy is
measured on ``CHECK_N`` training-bucket problems that SFT never sees (not the validation set the demo
scores); SFT stops once it reaches ``TARGET``, or at ``MAX_STEPS`` with a message saying so.

The model is saved with ``RECORD``, what built it, so that ``rlarith demo`` refuses to reuse it for a run
whose seed, task, prompt or held-out split differ (another split could hold problems SFT trained on).

On a cluster you skip this: ``model.path`` is a pretrained model.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rlarith.config import ConfigError, RunConfig
from rlarith.data import TrainProblems, heldout, make_task
from rlarith.durable import write_atomic
from rlarith.prompts import messages
from rlarith.tinymodel import init_model

log = logging.getLogger("rlarith")

TARGET = 0.5
"""Greedy accuracy on the check slice at which SFT stops: half right leaves GRPO both signal (groups with
right and wrong answers) and room to improve."""
CHECK_EVERY = 20
"""SFT steps between two accuracy checks (one check: ~0.3 s on 2 CPU cores)."""
CHECK_N = 200
"""Training-bucket problems held out from SFT to measure it on."""
MAX_STEPS = 2000
"""Step cap: the default task reaches the target in 300-700 steps."""
BATCH = 32
LEARNING_RATE = 1e-3
RECORD = "rlarith-bootstrap.json"
"""Written into the model folder last: the settings that made the model (``provenance``) and how SFT went."""


def provenance(cfg: RunConfig) -> dict[str, Any]:
    """The config keys a bootstrapped model depends on, by dotted name: its seed, the problems and prompt
    it was trained on, and the split that kept the held-out sets out of its training data.

    >>> keys = provenance(RunConfig())
    >>> keys["training.seed"], keys["task.op"], keys["data.split_salt"]
    (0, '*', 'rlarith-split-v1')
    """
    keys = {"training.seed": cfg.training.seed}
    keys.update({f"task.{k}": v for k, v in asdict(cfg.task).items()})
    keys.update({f"prompt.{k}": v for k, v in asdict(cfg.prompt).items()})
    keys.update({f"data.{k}": getattr(cfg.data, k) for k in ("split_salt", "val_fraction", "test_fraction")})
    return keys


def check_reusable(model: Path, cfg: RunConfig) -> bool:
    """Whether ``model`` says what built it (``RECORD``). Raises ``ConfigError`` when it was bootstrapped
    with other settings than ``cfg``'s: a demo on it would measure another seed's or task's model, or score
    held-out problems its SFT saw."""
    record = model / RECORD
    if not record.is_file():
        return False
    try:
        built = json.loads(record.read_text())["provenance"]
    except (ValueError, KeyError) as err:
        raise ConfigError(
            f"model.path: {record} is unreadable ({err}); delete {model} to build it again."
        ) from err
    wanted = provenance(cfg)
    differ = [f"{k} {built.get(k)!r} (this config: {v!r})" for k, v in wanted.items() if built.get(k) != v]
    if differ:
        raise ConfigError(
            f"model.path: {model} was bootstrapped with {'; '.join(differ)}. Point model.path at another "
            f"folder to bootstrap one for this config (e.g. model.path={model.parent}/model-seed"
            f"{cfg.training.seed}), or delete {model} to build it again."
        )
    return True


@dataclass(frozen=True)
class BootstrapResult:
    path: Path
    accuracy: float
    """Greedy exact-match accuracy on the validation set (NaN when not evaluated)."""
    steps: int = 0
    """SFT steps taken."""
    check_accuracy: float = float("nan")
    """Greedy accuracy on the check slice when SFT stopped (NaN with a fixed step count)."""


def bootstrap(
    cfg: RunConfig, steps: int | None = None, out: str | Path | None = None, evaluate: bool = True
) -> BootstrapResult:
    """Build the tiny model, fine-tune it on training problems until its greedy accuracy on a slice held
    out from SFT reaches ``TARGET`` (or exactly ``steps`` steps, with no checks, when given), and save it to
    ``out``; with ``evaluate``, report its greedy accuracy on the validation set."""
    import torch
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from rlarith.quiet import warn_once
    from rlarith.training.logs import setup_logging

    step_filter = setup_logging()  # the same timestamped lines as `rlarith train`
    disable_progress_bar()  # datasets' map bars over every example: noise, not progress
    hf_logging.disable_progress_bar()  # and transformers' weight loading/writing bars
    warn_once()
    out = Path(out or cfg.model.path)
    task = make_task(cfg.task)
    # Training-bucket problems only: SFT sees nothing the held-out sets hold, and not the check slice.
    pool = TrainProblems(task, replace(cfg.data, strategy="fresh"), cfg.training.seed + 1)
    check = [pool.problem(i) for i in range(pool.distinct - CHECK_N, pool.distinct)] if steps is None else []
    rows = {"prompt": [], "completion": []}
    # The trainer cycles through them, reshuffled every epoch; a short fixed run needs no more than it uses.
    for i in range(min(pool.distinct - len(check), (steps or MAX_STEPS) * BATCH)):
        problem = pool.problem(i)
        rows["prompt"].append(messages(problem, cfg.prompt, task.integer_answers))
        rows["completion"].append([{"role": "assistant", "content": str(problem.answer)}])
    cap = MAX_STEPS if steps is None else steps

    with tempfile.TemporaryDirectory(prefix="rlarith-bootstrap-") as work:
        init_model(Path(work) / "init", seed=cfg.training.seed)
        tokenizer = AutoTokenizer.from_pretrained(Path(work) / "init")
        model = AutoModelForCausalLM.from_pretrained(Path(work) / "init", dtype=torch.float32)
        args = SFTConfig(
            output_dir=str(Path(work) / "sft"),
            max_steps=cap,
            per_device_train_batch_size=BATCH,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant_with_warmup",  # constant: stopping early is a shorter run, no decay
            warmup_steps=min(50, cap // 10),
            seed=cfg.training.seed,
            data_seed=cfg.training.seed,
            logging_steps=CHECK_EVERY,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            disable_tqdm=True,
            gradient_checkpointing=False,
            completion_only_loss=True,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer
        )
        trainer.remove_callback(PrinterCallback)  # raw log dicts; _progress prints timestamped lines
        progress = _progress(cfg, tokenizer, check, cap)
        trainer.add_callback(progress)
        step_filter.trainer = trainer
        what = (
            f"until {TARGET:.0%} greedy accuracy on {len(check)} held-out training problems" if check else ""
        )
        log.info("bootstrap: SFT of the tiny model, at most %d steps %s", cap, what)
        trainer.train()
        out.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    step = trainer.state.global_step
    reached = None if math.isnan(progress.accuracy) else progress.accuracy  # NaN: no check (--steps)
    done = {"provenance": provenance(cfg), "steps": step, "check_accuracy": reached}
    write_atomic(out / RECORD, json.dumps(done, indent=1) + "\n")  # last: a model cut short has none
    if check and progress.accuracy < TARGET:
        log.info(
            "bootstrap: hit the step cap (%d steps) at %.1f%% greedy accuracy, below the %.0f%% target: GRPO "
            "will start from a weaker model than usual. Try another training.seed, or `rlarith bootstrap "
            "--steps N` for a fixed count.",
            step,
            100 * progress.accuracy,
            100 * TARGET,
        )
    log.info("bootstrap: saved %s after %d steps (%.0f s)", out, step, time.time() - progress.started)
    step_filter.trainer = None

    if not evaluate:
        return BootstrapResult(path=out, accuracy=float("nan"), steps=step, check_accuracy=progress.accuracy)
    from rlarith.evaluate import evaluate_model

    val = heldout(task, cfg.data, "val", min(cfg.data.val_size, 200))
    result = evaluate_model(
        out, val, cfg, batch_size=100, max_new_tokens=cfg.training.max_completion_length, progress=False
    )
    return BootstrapResult(path=out, accuracy=result.accuracy, steps=step, check_accuracy=progress.accuracy)


def greedy_accuracy(model: Any, tokenizer: Any, problems: list[Any], cfg: RunConfig) -> float:
    """Greedy exact-match accuracy of an in-memory ``model`` on ``problems`` (strict extraction); leaves the
    model in training mode and the global torch RNG as it found them."""
    import torch

    from rlarith.answers import extract_answer
    from rlarith.evaluate import chat_prompts, generate

    rng, side, was_training = torch.get_rng_state(), tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    model.eval()
    try:
        texts = generate(
            model,
            tokenizer,
            chat_prompts(problems, cfg, tokenizer),
            batch_size=len(problems),
            max_new_tokens=cfg.training.max_completion_length,
            progress=False,
        )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        torch.set_rng_state(rng)  # generate() reseeds: SFT must not depend on whether it was checked
    right = sum(extract_answer(t, "strict") == p.answer for t, p in zip(texts, problems))
    return right / len(problems)


def _progress(cfg: RunConfig, tokenizer: Any, check: list[Any], cap: int) -> Any:
    """The SFT callback: a timestamped line at every log (``CHECK_EVERY`` steps); with a check slice, the
    accuracy check and the stop at ``TARGET``."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.accuracy, self.started = float("nan"), time.time()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, model: Any = None, **kw: Any
        ) -> Any:
            if not logs or "loss" not in logs:
                return control  # the end-of-training summary
            line = f"bootstrap step {state.global_step}/{cap}: loss {float(logs['loss']):.3f}"
            if check:
                self.accuracy = greedy_accuracy(model, tokenizer, check, cfg)
                line += f", held-out greedy accuracy {self.accuracy:.1%} (target {TARGET:.0%})"
                if self.accuracy >= TARGET:
                    control.should_training_stop = True
            log.info("%s, %.0f s", line, time.time() - self.started)
            return control

    return Progress()
