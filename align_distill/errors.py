"""Errors that are a user's to fix (a config key, a file, a row): the CLI prints their message as one line and
exits with code 2, without a traceback (`--debug` or ALIGN_DISTILL_DEBUG=1 shows it)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable

DEBUG_ENV = "ALIGN_DISTILL_DEBUG"


class UserError(Exception):
    """A mistake in what the user gave (config, data, command line); the message names where and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration is malformed: unknown key, wrong type, missing value, bad combination.

    A `ValueError` too, so that code raising it from a dataclass's `__post_init__` keeps working with callers that
    catch `ValueError`."""


def debug_enabled() -> bool:
    """Whether to show tracebacks of user errors: `align-distill --debug` (which sets it) or ALIGN_DISTILL_DEBUG=1."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def did_you_mean(name: object, choices: Iterable[object]) -> str:
    """` (did you mean `x`?)` for the closest of `choices` to a mistyped `name`, or "" when none is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean `{match[0]}`?)" if match else ""
