"""Turn a problem into the chat messages the model sees; the template lives in the config."""

from __future__ import annotations

from rlarith.config import PromptConfig
from rlarith.tasks import Problem


def messages(
    problem: Problem, prompt: PromptConfig, integer_answers: bool = True, decimals: int = 2
) -> list[dict[str, str]]:
    """Chat messages for ``problem``; the precision sentence appears only for non-integer answers.

    >>> messages(Problem("123 * 45", 5535, "*:45:123"), PromptConfig())
    [{'role': 'user', 'content': 'Compute 123 * 45. Reply with only the final number.'}]
    >>> messages(Problem("1 / 3", 0, "/:1:3"), PromptConfig(), integer_answers=False)[-1]["content"]
    'Compute 1 / 3. Reply with only the final number. Give the answer rounded to 2 decimal places.'
    """
    user = prompt.user.format(question=problem.question)
    if not integer_answers:
        user += " " + prompt.precision.format(decimals=decimals)
    out = [{"role": "system", "content": prompt.system}] if prompt.system else []
    return out + [{"role": "user", "content": user}]
