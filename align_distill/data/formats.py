"""Column schemas of the dataset formats align-distill accepts (TRL's standard formats plus `ranking`).

Every text field is either *plain* (a string) or *conversational* (a list of `{"role", "content"}` messages); one
dataset uses one form throughout, because a trainer applies the chat template to all rows or to none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
"""Message roles a chat template is expected to know."""

ID_COLUMN = "id"
"""Optional unique row id; added (see `validation.content_id`) when absent, because downstream stores join on it."""


@dataclass(frozen=True)
class FormatSchema:
    """The columns one format needs.

    `text_columns` hold a prompt or a response (plain or conversational); `response_columns` are the ones that must
    end in an assistant turn when conversational and that a length policy may truncate.
    """

    name: str
    required: tuple[str, ...]
    text_columns: tuple[str, ...]
    response_columns: tuple[str, ...]
    description: str


FORMATS: dict[str, FormatSchema] = {
    "preference": FormatSchema(
        name="preference",
        required=("prompt", "chosen", "rejected"),
        text_columns=("prompt", "chosen", "rejected"),
        response_columns=("chosen", "rejected"),
        description="prompt, chosen, rejected (conversational rows may omit prompt: it is the shared leading turns)",
    ),
    "completion": FormatSchema(
        name="completion",
        required=("prompt", "completion"),
        text_columns=("prompt", "completion"),
        response_columns=("completion",),
        description="prompt, completion (TRL's prompt-completion format: SFT data, teacher samples, rollouts)",
    ),
    "prompt": FormatSchema(
        name="prompt",
        required=("prompt",),
        text_columns=("prompt",),
        response_columns=(),
        description="prompt",
    ),
    "ranking": FormatSchema(
        name="ranking",
        required=("prompt", "completions"),
        text_columns=("prompt",),
        response_columns=("completions",),
        description="prompt, completions (>= 2), and ranking (indices, best first) or scores (one per completion)",
    ),
}


def get_format(name: str) -> FormatSchema:
    """The schema called `name`; the error lists the known formats."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown dataset format {name!r}; expected one of {', '.join(FORMATS)}") from None


def text_form(value: Any) -> str | None:
    """'plain' for a string, 'conversational' for a list, None for anything else (a type problem)."""
    if isinstance(value, str):
        return "plain"
    if isinstance(value, list):
        return "conversational"
    return None


def type_name(value: Any) -> str:
    """The value's type with its article, in JSON vocabulary, for error messages: 'a string', 'an object'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
