"""Checkers: Python functions that score one answer, named as a pipeline's `call` stages name theirs
(`module:function` or `file.py:function`).

A checker is called as `f(prompt, response)` — the prompt's last user message and the answer's text — or, when it
has a parameter named `row`, as `f(prompt, response, row=row)` with the prompt set's row (for an `answer` column).
It returns a number (one score, named after the checker), an object with a numeric `.total` (likewise), or a
mapping of named numbers (several scores; e.g. the synthetic task's reward, capability and preference).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from align_distill.callables import load_callable
from align_distill.data.tokens import prompt_text, response_text
from align_distill.errors import ConfigError, UserError
from align_distill.synthetic import reward


class CheckerError(UserError, ValueError):
    """A checker returned something that is not a score, naming the checker and the row."""


def synthetic_task(prompt: str, response: str) -> dict[str, float]:
    """The embedded synthetic task's ground truth (`align_distill.synthetic.reward`): reward = 0.5 capability + 0.5
    preference, capability = exact answer, preference = the polite marker."""
    value = reward(prompt, response)
    return {"reward": value.total, "capability": value.capability, "preference": value.preference}


class Checker:
    """One named checker, loaded once."""

    def __init__(self, name: str, spec: str):
        self.name, self.spec = name, spec
        try:
            self.function: Callable[..., Any] = load_callable(spec, f"checker `{name}`")
        except ValueError as error:
            raise ConfigError(f"checkers.{name}: {error}") from None
        try:
            self.takes_row = "row" in inspect.signature(self.function).parameters
        except (TypeError, ValueError):
            self.takes_row = False

    def __call__(self, prompt: Any, response: Any, row: Mapping[str, Any], where: str) -> dict[str, float]:
        """Named scores of one answer; `where` names the row in errors."""
        arguments = (prompt_text(prompt), response_text(response))
        try:
            value = self.function(*arguments, row=dict(row)) if self.takes_row else self.function(*arguments)
        except Exception as error:  # the user's code: say which checker and row, keep the cause for --debug
            raise CheckerError(f"checker `{self.name}` ({self.spec}) failed at {where}: {error}") from error
        return self._scores(value, where)

    def _scores(self, value: Any, where: str) -> dict[str, float]:
        if isinstance(value, Mapping):
            scores = {str(k): v for k, v in value.items()}
        else:
            scores = {self.name: getattr(value, "total", value)}
        for key, score in scores.items():
            if isinstance(score, bool):
                scores[key] = float(score)
            elif not isinstance(score, numbers.Real) or not math.isfinite(float(score)):
                raise CheckerError(
                    f"checker `{self.name}` ({self.spec}) returned {score!r} for `{key}` at {where}; expected a "
                    "finite number, an object with a numeric `.total`, or a mapping of such numbers"
                )
            else:
                scores[key] = float(score)
        return scores
