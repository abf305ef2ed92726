"""Held-out evaluation: score a model, a checkpoint, or every checkpoint of a run on problems it never saw.

One file per concept: ``scoring`` (completions against truths, ``EvalResult``), ``generation`` (batched
generation with a model directory), ``reports`` (JSON, markdown, plots, ``compare``) and ``job`` (the
``rlarith eval`` command: target, held-out set, contamination check, scoring). The contamination check
itself lives with the held-out sets, in ``rlarith.contamination``.
"""

from rlarith.contamination import (
    Contaminated,
    TracesUnreadable,
    check_contamination,
    contamination_error,
    trained_keys,
)
from rlarith.evaluate.generation import chat_prompts, check_sampling, evaluate_model, generate, load_model
from rlarith.evaluate.job import EvalSettings, Target, heldout_problems, resolve_target, run_eval
from rlarith.evaluate.reports import (
    compare,
    load_results,
    markdown_table,
    plot_over_steps,
    result_stem,
    write_result,
)
from rlarith.evaluate.scoring import (
    ERROR_KINDS,
    Z95,
    EvalResult,
    classify,
    score_completions,
    wilson_interval,
)

__all__ = [
    "ERROR_KINDS",
    "Z95",
    "Contaminated",
    "EvalResult",
    "EvalSettings",
    "Target",
    "TracesUnreadable",
    "chat_prompts",
    "check_contamination",
    "check_sampling",
    "classify",
    "compare",
    "contamination_error",
    "evaluate_model",
    "generate",
    "heldout_problems",
    "load_model",
    "load_results",
    "markdown_table",
    "plot_over_steps",
    "resolve_target",
    "result_stem",
    "run_eval",
    "score_completions",
    "trained_keys",
    "wilson_interval",
    "write_result",
]
