"""The two entry points users meet: load a dataset ready for a method, and `align-distill data validate`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoTokenizer

from .loading import hub_unavailable, read_records, records_to_dataset
from .problems import DataValidationError
from .validation import FORM_NAMES, validate

logger = logging.getLogger(__name__)


def load_dataset_for(
    source: str,
    format: str,
    split: str = "train",
    tokenizer: Any = None,
    max_length: int | None = None,
    length_policy: str = "error",
    config: str | None = None,
) -> datasets.Dataset:
    """Load `source`, validate it as `format`, and return the normalised rows (with an `id` column).

    Raises DataValidationError listing every problem before any row is returned. With `max_length`, rows longer
    than it are a problem (`length_policy="error"`), dropped (`"drop"`) or have their responses cut (`"truncate"`);
    the counts are logged. See `validate` for the normalisation.
    """
    records = read_records(source, split, config)
    report = validate(
        records, format, source=source, tokenizer=tokenizer, max_length=max_length, length_policy=length_policy
    )
    if report.problems:
        raise DataValidationError(report.problems)
    if report.dropped:
        logger.warning(
            "%s: dropped %d of %d rows longer than max_length %d", source, report.dropped, len(records), max_length
        )
    if report.truncated:
        logger.warning(
            "%s: truncated the responses of %d of %d rows to fit max_length %d",
            source,
            report.truncated,
            len(records),
            max_length,
        )
    logger.info("%s: %d %s rows in %s form", source, len(report.rows), format, FORM_NAMES[report.form])
    return records_to_dataset(report.rows, source)


def validate_command(path: str, format: str, tokenizer_path: str | None = None, max_length: int | None = None) -> int:
    """Print each problem of the dataset at `path` on stderr, or "OK: N rows" on stdout; return the exit code, 0 or 1.

    Long rows are reported, never dropped: this command checks, it does not fix.
    """
    try:
        if max_length is not None and tokenizer_path is None:
            raise ValueError("max_length needs a tokenizer to count tokens; give tokenizer_path")
        tokenizer = _load_tokenizer(tokenizer_path) if tokenizer_path else None
        report = validate(
            read_records(path),
            format,
            source=path,
            tokenizer=tokenizer,
            max_length=max_length,
            length_policy="error",
        )
        problems = report.problems
    except DataValidationError as error:
        problems = error.problems
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {path}", file=sys.stderr)
        return 1
    print(f"OK: {len(report.rows)} rows ({format}, {FORM_NAMES[report.form]})")
    return 0


def _load_tokenizer(name_or_path: str) -> Any:
    """A tokenizer from a local folder, or from the hub only when it is reachable (offline must not hang)."""

    if not Path(name_or_path).expanduser().exists():
        reason = hub_unavailable()
        if reason:
            raise ValueError(f"tokenizer {name_or_path!r}: no such folder, and the hub cannot be used: {reason}")
    return AutoTokenizer.from_pretrained(name_or_path)
