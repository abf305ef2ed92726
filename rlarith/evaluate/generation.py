"""Batched generation with a model directory: left padding, the tokenizer's chat template, greedy or seeded
sampling; ``evaluate_model`` generates for a list of problems and scores the completions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlarith.config import ConfigError, RunConfig
from rlarith.data import make_task
from rlarith.evaluate.scoring import EvalResult, score_completions
from rlarith.prompts import messages
from rlarith.tasks import Problem


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
    loaded: Callable[[], None] | None = None,
) -> EvalResult:
    """Generate for ``problems`` with the model in ``model_path`` and score it (no contamination check:
    callers that own a run use ``trained_keys``/``check_contamination`` first). ``loaded`` is called once
    the model is in memory, before generating (``rlarith eval`` checks there that a checkpoint was whole)."""
    check_sampling(samples, temperature)
    model, tok = load_model(model_path, cfg)
    try:
        if loaded is not None:
            loaded()
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
