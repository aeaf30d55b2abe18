"""Secrets never reach a file or a message align-distill writes: values under keys that name a credential, and
anything shaped like a Hugging Face token, are replaced by "<redacted>"."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"token|secret|passw|api[_-]?key|authorization|credential|cookie", re.IGNORECASE)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def redact(value: Any, key: str = "") -> Any:
    """`value` with credentials replaced: values under secret-sounding keys, and HF-token-shaped strings."""
    if key and _SECRET_KEY.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _HF_TOKEN.sub(REDACTED, value)
    return value


def scrub(text: str, secrets: Sequence[str | None]) -> str:
    """`text` with every known secret (and anything shaped like an HF token) replaced by "<redacted>"."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return redact(text)
