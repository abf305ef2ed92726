"""Third-party output, tamed: each Python warning once per process, and the messages a run expects silenced.

- transformers 5.x warns ``is_gradient_checkpointing is deprecated`` (a FutureWarning) from inside TRL twice
  per training step. Python's own once-per-location filter does not hold: every library that touches the
  warning filters resets it. ``warn_once`` shows each distinct warning (category and text) once.
- A model with tied input and output embeddings saves no ``lm_head.weight``; on resume the HF Trainer then
  warns ``There were missing keys in the checkpoint model loaded: ['lm_head.weight']`` although the weight is
  the embedding's. ``expect_tied_keys`` silences exactly that message, for exactly the tied keys.
"""

from __future__ import annotations

import ast
import logging
import warnings
from typing import Any

_seen: set[tuple[type, str]] = set()
_MISSING = "There were missing keys in the checkpoint model loaded: "


def warn_once() -> None:
    """From now on, show every distinct warning at most once in this process (idempotent)."""
    show = warnings.showwarning
    if getattr(show, "_rlarith_once", False):
        return

    def once(
        message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        key = (category, str(message))
        if key not in _seen:
            _seen.add(key)
            show(message, category, filename, lineno, file, line)

    once._rlarith_once = True  # type: ignore[attr-defined]
    warnings.showwarning = once


class _TiedKeysFilter(logging.Filter):
    """Drops the Trainer's missing-keys warning when every key it names is a tied weight."""

    def __init__(self, tied: set[str]) -> None:
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith(_MISSING):
            return True
        try:
            missing = ast.literal_eval(text[len(_MISSING) :].rstrip("."))
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(missing, list) and missing and set(missing) <= self.tied)


def tied_keys(model: Any) -> set[str]:
    """The parameter names ``model`` ties to another (not saved, so "missing" on every load)."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    config = getattr(model, "config", None)
    text_config = (
        config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    )
    if not getattr(text_config, "tie_word_embeddings", False):
        return set()
    return set(tied)


def expect_tied_keys(model: Any) -> None:
    """Silence the HF Trainer's missing-keys warning for ``model``'s tied weights (nothing else)."""
    logger = logging.getLogger("transformers.trainer")
    for old in [f for f in logger.filters if isinstance(f, _TiedKeysFilter)]:
        logger.removeFilter(old)
    tied = tied_keys(model)
    if tied:
        logger.addFilter(_TiedKeysFilter(tied))
