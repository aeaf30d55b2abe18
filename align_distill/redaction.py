"""Secrets never reach a file or a message align-distill writes. `redact` replaces, with "<redacted>":

1. the value of a **secret field**, found by its exact name (case-insensitive, `-` read as `_`): one of
   `SECRET_FIELDS` (`hub_token`, `token`, `api_key`, `password`, `secret`, `authorization`, ...), or a name ending
   in one of `SECRET_SUFFIXES` (`_api_key`, `_secret`, `_password`, `_access_token`, ...). Any value but None, a
   boolean and "" is redacted (`token: true` means "use the stored login" and stays).
2. the value of a field whose name ends in `_token` **when the value looks like a credential**: a string of 16 or more
   characters without spaces made only of `A-Za-z0-9._~+/=-`. Tokenizer fields (`pad_token: "<|endoftext|>"`,
   `eos_token: "</s>"`) stay.
3. anywhere, in any string, whatever its key: text shaped like a known credential (`SECRET_VALUES`: Hugging Face
   `hf_...`, OpenAI/Anthropic `sk-...`, `Bearer ...`, GitHub `ghp_...`/`github_pat_...`, AWS `AKIA...`, Slack
   `xox.-...`).

Nothing else: names are matched exactly, never by substring, so metric and setting names that contain a word like
"token" (`max_new_tokens`, `num_tokens`, `mean_token_accuracy`, `adpa/token_advantage`) and the *name* of an
environment variable holding a key (`api_key_env: MY_KEY`) are kept. Dictionary keys themselves are never changed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

REDACTED = "<redacted>"

SECRET_FIELDS = frozenset(
    {
        *("token", "hub_token", "hf_token", "huggingface_token", "push_to_hub_token", "hub_private_token"),
        *("access_token", "refresh_token", "id_token", "auth_token", "bearer_token", "session_token"),
        *("api_key", "apikey", "openai_api_key", "anthropic_api_key", "wandb_api_key", "api_secret"),
        *("secret", "secret_key", "client_secret", "private_key", "password", "passwd", "passphrase"),
        *("authorization", "proxy_authorization", "cookie", "credentials", "aws_secret_access_key"),
    }
)
SECRET_SUFFIXES = ("_api_key", "_apikey", "_secret", "_secret_key", "_password", "_access_token", "_auth_token")
_CREDENTIAL_LIKE = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")
SECRET_VALUES = (
    re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}"),
    re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"(?<![A-Za-z0-9])github_pat_[A-Za-z0-9_]{30,}"),
    re.compile(r"(?<![A-Za-z0-9])AKIA[0-9A-Z]{16}(?![0-9A-Z])"),
    re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}"),
)
_BEARER = re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)


def is_secret_field(key: str, value: Any) -> bool:
    """Whether `value`, found under `key`, is a credential by rule 1 or 2 of the module docstring."""
    if value is None or isinstance(value, bool) or value == "":
        return False
    name = key.strip().lower().replace("-", "_")
    if name in SECRET_FIELDS or name.endswith(SECRET_SUFFIXES):
        return True
    return name.endswith("_token") and isinstance(value, str) and _CREDENTIAL_LIKE.fullmatch(value) is not None


def redact_text(text: str) -> str:
    """`text` with every credential-shaped substring (rule 3) replaced."""
    for pattern in SECRET_VALUES:
        text = pattern.sub(REDACTED, text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def redact(value: Any, key: str = "") -> Any:
    """`value` with credentials replaced (see the module docstring); dicts, lists and tuples are walked."""
    if key and is_secret_field(key, value):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def scrub(text: str, secrets: Sequence[str | None]) -> str:
    """`text` with every known secret (and anything shaped like a credential) replaced by "<redacted>"."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return redact_text(text)
