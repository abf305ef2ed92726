"""Held-out evaluation: score a model, a checkpoint, or every checkpoint of a run on problems it never saw.

Order of operations, and why:

1. The held-out problems come from ``<run>/data/<split>.jsonl`` (written by ``rlarith data check``) or are
   rebuilt from the config with ``rlarith.data.heldout`` (same salt, same problems).
2. Contamination check before any scoring: every problem the run can have trained on (its config's data
   stream, plus whatever its traces recorded) is compared with the held-out keys. An overlap refuses the
   evaluation (``Contaminated``, exit status 2) unless forced; a forced result records the overlap.
3. Batched generation (left padding, the tokenizer's chat template, greedy or seeded sampling).
4. Scoring with the one shared parser (``rlarith.answers.extract_answer``), both modes reported: exact
   match (strict) with a Wilson interval, the same with ``last``, extraction failures apart from wrong
   answers, an error breakdown, the ``partial`` mean and the config-weighted reward.

Results go to ``<run>/eval/`` as JSON and a markdown table (written atomically); ``--all-checkpoints``
adds the accuracy-over-steps plot, and ``compare`` puts several runs side by side.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rlarith.answers import extract_answer
from rlarith.checkpoints import COMPLETE, step_of, valid_checkpoints
from rlarith.config import ConfigError, RunConfig, load_config
from rlarith.data import TrainProblems, heldout, make_task, read_problems
from rlarith.prompts import messages
from rlarith.rewards import REWARD_FUNCTIONS
from rlarith.tasks import Problem

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ERROR_KINDS = ("correct", "extraction_failure", "wrong_sign", "wrong_digit_count", "wrong_digits")


class Contaminated(ConfigError):
    """Held-out problems overlap what the run can have trained on; scoring them would flatter the model."""


# ----------------------------------------------------------------------------------------------------------
# Results and scoring (pure: no model involved)


@dataclass
class EvalResult:
    """One model scored on one held-out set. ``to_dict`` is JSON-serialisable."""

    n: int
    """Problems scored."""
    samples: int
    """Completions per problem."""
    temperature: float
    split: str
    step: int | None
    """Training step of the checkpoint (0: the base model; None: a bare model outside a run)."""
    model: str
    accuracy: float
    """Exact match, strict extraction, over all completions."""
    ci95: tuple[float, float]
    """Wilson 95% interval of ``accuracy`` (over problems, see ``score_completions``)."""
    accuracy_last: float
    """The same completions scored with ``mode="last"``."""
    extraction_failure_rate: float
    extraction_failure_rate_last: float
    partial_mean: float
    """Mean of ``rlarith.rewards.partial`` (strict)."""
    mean_reward: float
    """Config-weighted total reward (``rewards.weights``, ``rewards.extraction``): the training objective."""
    errors: dict[str, int]
    """Counts per kind (``ERROR_KINDS``) and, for ``wrong_digits``, per digit position from the right
    (``digit_position_0`` is the units digit)."""
    contaminated: int = 0
    """Held-out problems that could have been trained on (non-zero only when forced)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """Per completion: question, truth, completion, parsed_strict, parsed_last."""

    def to_dict(self, records: bool = True) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        if not records:
            out.pop("records")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["ci95"] = tuple(kwargs["ci95"])
        return cls(**kwargs)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; sensible at 0 and n successes, unlike the normal one.

    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    >>> lo, hi = wilson_interval(0, 100); lo == 0.0 and 0.03 < hi < 0.04
    True
    >>> [round(x, 4) for x in wilson_interval(50, 100)]
    [0.4038, 0.5962]
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The bounds are exactly 0 at no successes and 1 at all; rounding would leave 1e-18 crumbs.
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return (lo, hi)


def classify(predicted: int | None, truth: int) -> tuple[str, list[int]]:
    """The error kind of one parsed answer, and for ``wrong_digits`` the wrong positions (0: units).

    Kinds are exclusive and checked in order: no answer, right, wrong sign, wrong digit count, and
    otherwise same sign and length with some digits wrong.

    >>> classify(None, 5535), classify(5535, 5535), classify(-5535, 5535), classify(535, 5535)
    (('extraction_failure', []), ('correct', []), ('wrong_sign', []), ('wrong_digit_count', []))
    >>> classify(5935, 5535), classify(6534, 5535)
    (('wrong_digits', [2]), ('wrong_digits', [0, 3]))
    """
    if predicted is None:
        return "extraction_failure", []
    if predicted == truth:
        return "correct", []
    if (predicted < 0) != (truth < 0):
        return "wrong_sign", []
    p, t = str(abs(predicted)), str(abs(truth))
    if len(p) != len(t):
        return "wrong_digit_count", []
    return "wrong_digits", [i for i, (a, b) in enumerate(zip(reversed(p), reversed(t))) if a != b]


def score_completions(
    completions: Sequence[str],
    truths: Sequence[int],
    weights: dict[str, float],
    extraction: str = "strict",
    samples: int = 1,
) -> dict[str, Any]:
    """Every score of ``EvalResult`` for completions (grouped by problem, ``samples`` each) and their truths.

    The Wilson interval counts problems, not completions: samples of one problem are correlated, and
    counting them as independent would make the interval too narrow.
    """
    if len(completions) != len(truths):
        raise ValueError(f"{len(completions)} completions but {len(truths)} truths")
    total = len(completions)
    strict = [extract_answer(c, "strict") for c in completions]
    last = [extract_answer(c, "last") for c in completions]
    truths = [int(t) for t in truths]
    width = max((len(str(abs(t))) for t in truths), default=0)
    errors = dict.fromkeys(ERROR_KINDS, 0) | {f"digit_position_{i}": 0 for i in range(width)}
    for got, truth in zip(strict, truths):
        kind, positions = classify(got, truth)
        errors[kind] += 1
        for i in positions:
            errors[f"digit_position_{i}"] += 1

    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    correct = errors["correct"]
    correct_last = sum(g is not None and g == t for g, t in zip(last, truths))
    accuracy = correct / total if total else 0.0
    n_problems = total // samples if samples else total
    partial = REWARD_FUNCTIONS["partial"](completions, answer=truths, mode="strict")
    # The training objective: each component as the trainer computes it, weighted by the config.
    reward = sum(
        w * mean(REWARD_FUNCTIONS[name](completions, answer=truths, mode=extraction))
        for name, w in weights.items()
    )
    return {
        "accuracy": accuracy,
        "ci95": wilson_interval(accuracy * n_problems, n_problems),
        "accuracy_last": correct_last / total if total else 0.0,
        "extraction_failure_rate": errors["extraction_failure"] / total if total else 0.0,
        "extraction_failure_rate_last": sum(g is None for g in last) / total if total else 0.0,
        "partial_mean": mean(partial),
        "mean_reward": float(reward),
        "errors": errors,
        "parsed_strict": strict,
        "parsed_last": last,
    }


# ----------------------------------------------------------------------------------------------------------
# Generation


def _device_and_dtype(cfg: RunConfig) -> tuple[Any, Any]:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), getattr(torch, cfg.model.dtype)
    return torch.device("cpu"), torch.float32  # half precision on CPU is slow and buys nothing here


def load_model(model_path: str | Path, cfg: RunConfig) -> tuple[Any, Any]:
    """Model (eval mode, on the GPU when there is one) and left-padding tokenizer from a model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{str(path)!r} is not a model directory (no config.json); pass a run, a checkpoint or a "
            "directory saved with save_pretrained."
        )
    device, dtype = _device_and_dtype(cfg)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # generation continues from the right edge of every row
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    return model, tok


def chat_prompts(problems: Sequence[Problem], cfg: RunConfig, tok: Any) -> list[str]:
    """The exact prompt texts the trainer shows: config template, then the tokenizer's chat template."""
    integer_answers = make_task(cfg.task).integer_answers
    return [
        tok.apply_chat_template(
            messages(p, cfg.prompt, integer_answers), tokenize=False, add_generation_prompt=True
        )
        for p in problems
    ]


def generate(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """``samples`` completions per prompt, grouped by prompt (``out[i * samples + j]``)."""
    import torch
    from tqdm.auto import tqdm

    check_sampling(samples, temperature)
    torch.manual_seed(seed)  # seeds CUDA too; one seed for the whole pass, so a rerun is identical
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}  # as TRL's rollouts
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    device = next(model.parameters()).device
    out: list[str] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        batch = list(prompts[start : start + batch_size])
        # The chat template already holds any special tokens the model expects.
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            ids = model.generate(
                **enc,  # input_ids, attention_mask: (B, T)
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                pad_token_id=tok.pad_token_id,
                **sampling,
            )  # (B * samples, T + new), rows grouped by prompt
        new = ids[:, enc["input_ids"].shape[1] :]  # (B * samples, new): left padding aligns the prompt end
        out += tok.batch_decode(new, skip_special_tokens=True)
    return out


def check_sampling(samples: int, temperature: float) -> None:
    """Greedy decoding gives one answer per problem; several samples need a temperature."""
    if temperature < 0:
        raise ConfigError(f"eval temperature must be >= 0; got {temperature}.")
    if samples < 1:
        raise ConfigError(f"eval samples must be at least 1; got {samples}.")
    if temperature == 0 and samples != 1:
        raise ConfigError(
            f"samples={samples} with temperature 0: greedy decoding returns the same completion every "
            "time; use samples=1, or a temperature > 0 (e.g. --samples 8 --temperature 1.0)."
        )


def evaluate_model(
    model_path: str | Path,
    problems: list[Problem],
    cfg: RunConfig,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    seed: int = 0,
    progress: bool = True,
    split: str = "",
    step: int | None = None,
) -> EvalResult:
    """Generate for ``problems`` with the model in ``model_path`` and score it (no contamination check:
    callers that own a run use ``trained_keys``/``check_contamination`` first)."""
    check_sampling(samples, temperature)
    model, tok = load_model(model_path, cfg)
    try:
        completions = generate(
            model,
            tok,
            chat_prompts(problems, cfg, tok),
            samples=samples,
            temperature=temperature,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress=progress,
        )
    finally:
        del model
        _free_gpu()
    truths = [p.answer for p in problems for _ in range(samples)]
    scores = score_completions(completions, truths, cfg.rewards.weights, cfg.rewards.extraction, samples)
    questions = [p.question for p in problems for _ in range(samples)]
    records = [
        {"question": q, "truth": t, "completion": c, "parsed_strict": s, "parsed_last": la}
        for q, t, c, s, la in zip(
            questions, truths, completions, scores["parsed_strict"], scores["parsed_last"]
        )
    ]
    return EvalResult(
        n=len(problems),
        samples=samples,
        temperature=float(temperature),
        split=split,
        step=step,
        model=str(model_path),
        accuracy=scores["accuracy"],
        ci95=scores["ci95"],
        accuracy_last=scores["accuracy_last"],
        extraction_failure_rate=scores["extraction_failure_rate"],
        extraction_failure_rate_last=scores["extraction_failure_rate_last"],
        partial_mean=scores["partial_mean"],
        mean_reward=scores["mean_reward"],
        errors=scores["errors"],
        records=records,
    )


def _free_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next checkpoint of an --all-checkpoints pass needs the memory


# ----------------------------------------------------------------------------------------------------------
# Runs, checkpoints, held-out sets and the contamination check


@dataclass
class Target:
    """What ``rlarith eval PATH`` points at."""

    run_dir: Path
    """The run (for a bare model: the run its config describes); results go to ``run_dir / "eval"``."""
    cfg: RunConfig
    model_path: Path | None
    """The model to score; None for a run without a valid checkpoint."""
    step: int | None
    is_run: bool
    """False for a bare model evaluated with ``--config``."""


def resolve_target(path: str | Path, config: str | Path | None = None) -> Target:
    """A run directory (latest valid checkpoint), a checkpoint directory, or a bare model + ``config``."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        if config is not None:
            raise ConfigError(
                f"{str(path)!r} is a run directory with its own config.yaml; drop --config (it is for bare "
                "model directories)."
            )
        cfg = load_config(path / "config.yaml")
        ckpts = valid_checkpoints(path)
        step, model = ckpts[-1] if ckpts else (None, None)
        return Target(run_dir=path, cfg=cfg, model_path=model, step=step, is_run=True)
    step = step_of(path)
    run_dir = path.parent.parent
    if step is not None and path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
        if not (path / COMPLETE).is_file():
            raise ConfigError(
                f"{str(path)!r} has no COMPLETE file: the checkpoint was never finished (or is still being "
                "written); evaluate the run directory to get its latest complete checkpoint."
            )
        if config is not None:
            raise ConfigError(
                f"{str(path)!r} is a checkpoint of a run with its own config.yaml; drop --config (it is for "
                "bare model directories)."
            )
        cfg = load_config(run_dir / "config.yaml")
        return Target(run_dir=run_dir, cfg=cfg, model_path=path, step=step, is_run=True)
    if not path.exists():
        raise ConfigError(
            f"{str(path)!r} not found; pass a run directory, a checkpoint or a model directory."
        )
    if config is None:
        raise ConfigError(
            f"{str(path)!r} is neither a run (no config.yaml) nor one of its checkpoints; for a bare model "
            "pass --config with the run config that describes its task and training data."
        )
    cfg = load_config(config)
    return Target(run_dir=cfg.run_dir, cfg=cfg, model_path=path, step=None, is_run=False)


def heldout_problems(run_dir: Path, cfg: RunConfig, split: str, n: int) -> tuple[list[Problem], str]:
    """The first ``n`` problems of the run's held-out ``split`` and where they came from."""
    path = Path(run_dir) / "data" / f"{split}.jsonl"
    if path.is_file():
        problems, source = read_problems(path), str(path)
    else:
        size = getattr(cfg.data, f"{split}_size")
        problems, source = heldout(make_task(cfg.task), cfg.data, split, size), f"heldout({split!r}, {size})"
    return problems[:n], source


def _trace_keys(trace_dir: Path) -> set[str]:
    if not trace_dir.is_dir() or not any(trace_dir.iterdir()):
        return set()
    # Imported here: h5py and pandas are only needed when there are traces to read. No fallback on an
    # ImportError: a check that silently skipped the traces would pass contaminated sets.
    from rlarith.traces import open as open_traces

    return set(open_traces(trace_dir).seen_keys())


def trained_keys(run_dir: Path, cfg: RunConfig) -> set[str]:
    """Keys of every problem the run can have trained on: its whole configured data stream, plus every
    problem its traces recorded (which also covers a run whose config changed mid-way)."""
    stream = TrainProblems(make_task(cfg.task), cfg.data, cfg.training.seed)
    keys = stream.seen_keys(cfg.training.max_steps * cfg.training.prompts_per_step)
    # The trace dir of the config may be elsewhere ($SCRATCH); a moved run keeps its traces/ beside it.
    for trace_dir in dict.fromkeys([Path(run_dir) / "traces", cfg.trace_dir]):
        keys |= _trace_keys(trace_dir)
    return keys


def check_contamination(problems: Sequence[Problem], trained: set[str]) -> list[Problem]:
    """The held-out problems whose key is among ``trained``."""
    return [p for p in problems if p.key in trained]


def contamination_error(overlap: Sequence[Problem], total: int, source: str, run_dir: Path) -> Contaminated:
    examples = ", ".join(repr(p.question) for p in overlap[:5])
    return Contaminated(
        f"{len(overlap)} of {total} held-out problems in {source} could have been trained on by "
        f"{str(run_dir)!r} (e.g. {examples}); scores on them would flatter the model. Rebuild the held-out "
        f"sets with `rlarith data check -c {Path(run_dir) / 'config.yaml'} --out {Path(run_dir) / 'data'}`, "
        "or pass --force to score anyway (the result records the overlap)."
    )


# ----------------------------------------------------------------------------------------------------------
# Writing results


def _write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def result_stem(result: EvalResult) -> str:
    """``val-step40`` for a run's checkpoint, ``val-<model dir name>`` for a bare model; sampled results
    get ``-k<samples>-t<temperature>`` so they never overwrite the greedy one (which ``compare`` reads)."""
    sampled = f"-k{result.samples}-t{result.temperature:g}" if result.temperature > 0 else ""
    if result.step is not None:
        return f"{result.split}-step{result.step}{sampled}"
    return f"{result.split}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(result.model).name)}{sampled}"


def markdown_table(results: Sequence[EvalResult]) -> str:
    """Scores, then the error breakdown, one row per result."""
    rows = [
        "| step | model | split | n x k | T | exact (95% CI) | exact, last | no answer | no answer, last "
        "| partial | reward |",
        "|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        step = "-" if r.step is None else str(r.step)
        flag = f" (contaminated: {r.contaminated})" if r.contaminated else ""
        rows.append(
            f"| {step} | {Path(r.model).name}{flag} | {r.split} | {r.n} x {r.samples} | {r.temperature:g} "
            f"| {r.accuracy:.3f} [{r.ci95[0]:.3f}, {r.ci95[1]:.3f}] | {r.accuracy_last:.3f} "
            f"| {r.extraction_failure_rate:.3f} | {r.extraction_failure_rate_last:.3f} "
            f"| {r.partial_mean:.3f} | {r.mean_reward:.3f} |"
        )
    positions = sorted(
        {k for r in results for k in r.errors if k.startswith("digit_position_")}, key=lambda k: int(k[15:])
    )
    head = ["step", *ERROR_KINDS, *(f"wrong digit {k[15:]}" for k in positions)]
    rows += ["", "Errors (strict; wrong digit i: position i from the right, 0 = units):", ""]
    rows += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in results:
        cells = ["-" if r.step is None else str(r.step)]
        cells += [str(r.errors.get(k, 0)) for k in (*ERROR_KINDS, *positions)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_result(result: EvalResult, eval_dir: Path) -> Path:
    """``<stem>.json`` (with per-completion records) and ``<stem>.md``; returns the JSON path."""
    stem = result_stem(result)
    path = Path(eval_dir) / f"{stem}.json"
    _write_atomic(path, json.dumps(result.to_dict(), indent=1) + "\n")
    _write_atomic(path.with_suffix(".md"), markdown_table([result]))
    return path


def plot_over_steps(series: dict[str, list[EvalResult]], path: Path, title: str = "") -> None:
    """Held-out exact accuracy (with its Wilson band) against the training step, one line per series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)  # no pyplot, no global backend: safe in a headless job
    ax = fig.add_subplot()
    for label, results in series.items():
        pts = sorted((r for r in results if r.step is not None), key=lambda r: r.step)
        steps = [r.step for r in pts]
        line = ax.plot(steps, [r.accuracy for r in pts], marker="o", label=label)[0]
        ax.fill_between(
            steps, [r.ci95[0] for r in pts], [r.ci95[1] for r in pts], alpha=0.2, color=line.get_color()
        )
    ax.set(xlabel="training step", ylabel="held-out exact accuracy", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    _save_figure(fig, path)


def _save_figure(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# The `rlarith eval` and `rlarith compare` jobs


@dataclass
class EvalSettings:
    """Flags of ``rlarith eval``; None takes the run's ``eval`` config."""

    split: str | None = None
    n: int | None = None
    samples: int | None = None
    temperature: float | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    seed: int = 0

    def resolved(self, cfg: RunConfig) -> EvalSettings:
        out = EvalSettings(seed=self.seed)
        for f in ("split", "n", "samples", "temperature", "batch_size", "max_new_tokens"):
            value = getattr(self, f)
            setattr(out, f, getattr(cfg.eval, f) if value is None else value)
        if out.split not in ("val", "test"):
            raise ConfigError(f"--split: use val or test; got {out.split!r}.")
        for f in ("n", "batch_size", "max_new_tokens"):
            if getattr(out, f) < 1:
                raise ConfigError(f"--{f.replace('_', '-')}: must be at least 1; got {getattr(out, f)}.")
        check_sampling(out.samples, out.temperature)  # before any model is loaded
        return out


def run_eval(
    target: Target,
    settings: EvalSettings,
    *,
    force: bool = False,
    all_checkpoints: bool = False,
    progress: bool = True,
    log: Any = print,
) -> list[EvalResult]:
    """``rlarith eval``: held-out set, contamination check, then score one model or every checkpoint."""
    s = settings.resolved(target.cfg)
    problems, source = heldout_problems(target.run_dir, target.cfg, s.split, s.n)
    if len(problems) < s.n:
        log(f"note: {source} holds {len(problems)} problems; scoring all of them (asked for {s.n})")
    overlap = check_contamination(problems, trained_keys(target.run_dir, target.cfg))
    if overlap and not force:
        raise contamination_error(overlap, len(problems), source, target.run_dir)
    if overlap:
        log(f"warning: --force: scoring {len(overlap)} problems that could have been trained on")

    if all_checkpoints:
        if not target.is_run:
            raise ConfigError("--all-checkpoints needs a run directory (or one of its checkpoints).")
        models = [(0, Path(target.cfg.model.path))] + valid_checkpoints(target.run_dir)
        if not (models[0][1] / "config.json").is_file():
            raise ConfigError(
                f"model.path: the run's base model {target.cfg.model.path!r} is not a model directory from "
                "here; run from the directory the run was started in (relative paths), or fix model.path."
            )
    elif target.model_path is None:
        raise ConfigError(
            f"{str(target.run_dir)!r} has no valid checkpoint yet (checkpoints/checkpoint-<step>/ with "
            "COMPLETE); --all-checkpoints also scores the base model."
        )
    else:
        models = [(target.step, target.model_path)]

    eval_dir = target.run_dir / "eval"
    results = []
    for step, model_path in models:
        result = evaluate_model(
            model_path,
            problems,
            target.cfg,
            samples=s.samples,
            temperature=s.temperature,
            batch_size=s.batch_size,
            max_new_tokens=s.max_new_tokens,
            seed=s.seed,
            progress=progress,
            split=s.split,
            step=step,
        )
        result.contaminated = len(overlap)
        log(f"wrote {write_result(result, eval_dir)}")
        results.append(result)
    if all_checkpoints:
        stem = f"{s.split}-over-steps"
        _write_atomic(
            eval_dir / f"{stem}.json",
            json.dumps([r.to_dict(records=False) for r in results], indent=1) + "\n",
        )
        _write_atomic(eval_dir / f"{stem}.md", markdown_table(results))
        png = eval_dir / (
            "accuracy_over_steps.png" if s.split == "val" else f"accuracy_over_steps_{s.split}.png"
        )
        plot_over_steps({target.run_dir.name: results}, png, title=f"{target.run_dir.name}: {s.split}")
        log(f"wrote {eval_dir / (stem + '.json')} and {png}")
    return results


def load_results(run_dir: Path, split: str = "val") -> list[EvalResult]:
    """A run's saved greedy per-step results for ``split`` (``eval/<split>-step<k>.json``), by step."""
    out = []
    for path in (Path(run_dir) / "eval").glob(f"{split}-step*.json"):
        if re.fullmatch(rf"{split}-step\d+\.json", path.name):
            out.append(EvalResult.from_dict(json.loads(path.read_text())))
    return sorted(out, key=lambda r: r.step if r.step is not None else -1)


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` rows; a torn last line (a run killed mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def compare(runs: Sequence[Path], out: Path, split: str = "val") -> str:
    """One markdown table and one plot (held-out accuracy and training reward over steps) across runs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(set(Path(r).name for r in runs)) != len(runs):
        labels = [str(r) for r in runs]  # same names in different places: keep them apart
    else:
        labels = [Path(r).name for r in runs]
    rows = [
        f"| run | {split} points | base acc | latest step | latest acc (95% CI) | best acc (step) "
        "| n x k, T | train reward (last step) |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    fig = Figure(figsize=(12, 4.2))
    FigureCanvasAgg(fig)
    ax_acc, ax_rew = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    anything = False
    for run, label in zip(runs, labels):
        results, metrics = load_results(Path(run), split), load_metrics(Path(run))
        anything |= bool(results or metrics)
        rewards = [(m["step"], m["reward"]) for m in metrics if isinstance(m.get("reward"), (int, float))]
        last_reward = f"{rewards[-1][1]:.3f} ({rewards[-1][0]})" if rewards else "-"
        if results:
            base = next((r for r in results if r.step == 0), None)
            latest, best = results[-1], max(results, key=lambda r: r.accuracy)
            settings = sorted({f"{r.n} x {r.samples}, {r.temperature:g}" for r in results})
            rows.append(
                f"| {label} | {len(results)} | {'-' if base is None else f'{base.accuracy:.3f}'} "
                f"| {latest.step} | {latest.accuracy:.3f} [{latest.ci95[0]:.3f}, {latest.ci95[1]:.3f}] "
                f"| {best.accuracy:.3f} ({best.step}) | {'; '.join(settings)} | {last_reward} |"
            )
            steps = [r.step for r in results]
            line = ax_acc.plot(steps, [r.accuracy for r in results], marker="o", label=label)[0]
            ax_acc.fill_between(
                steps,
                [r.ci95[0] for r in results],
                [r.ci95[1] for r in results],
                alpha=0.2,
                color=line.get_color(),
            )
        else:
            rows.append(f"| {label} | 0 | - | - | - | - | - | {last_reward} |")
        if rewards:
            ax_rew.plot([s for s, _ in rewards], [r for _, r in rewards], label=label, linewidth=1)
    if not anything:
        raise ConfigError(
            "none of the runs has eval results or metrics.jsonl; run `rlarith eval RUN --all-checkpoints` first."
        )
    ax_acc.set(xlabel="training step", ylabel=f"held-out ({split}) exact accuracy", ylim=(-0.02, 1.02))
    ax_rew.set(xlabel="training step", ylabel="training reward (metrics.jsonl)")
    for ax in (ax_acc, ax_rew):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    _save_figure(fig, Path(out))
    table = "\n".join(rows) + "\n"
    _write_atomic(Path(out).with_suffix(".md"), table)
    return table
