"""`align-distill generate <job> --config job.yaml [--key value ...] [--overwrite]`.

`--config` takes a YAML file or a shipped recipe name (`align-distill recipes list`). The top-level CLI passes the
arguments after "generate" to `main`. Keys of the YAML can be overridden on the command line (`--n 4`,
`--judge.kind llm`, `--teachers.0.model path`); values are read as YAML (see `align_distill.configuration`).
Exit codes: 0 done, 2 bad command line / config / input data, 1 the job failed while running (store, model,
server). `align-distill --debug generate ...` (or ALIGN_DISTILL_DEBUG=1) raises instead, showing the traceback.
"""

from __future__ import annotations

import logging
import sys

from align_distill.configuration import split_config_argument
from align_distill.data import DataValidationError
from align_distill.data_gen.config import CONFIGS, ConfigError, describe, load_config
from align_distill.data_gen.jobs import run_job
from align_distill.data_gen.store import StoreError
from align_distill.errors import UserError, debug_enabled, did_you_mean

USAGE = (
    "usage: align-distill generate <job> --config job.yaml [--key value ...] [--overwrite]\n"
    f"jobs: {', '.join(CONFIGS)}; `align-distill generate <job> --help` lists a job's keys"
)


def main(argv: list[str]) -> int:
    """Run one job from the command line; returns the exit code."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    kind, rest = argv[0], argv[1:]
    if kind not in CONFIGS:
        hint = did_you_mean(kind, CONFIGS)
        print(f"error: unknown job `{kind}`{hint}; jobs: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(describe(kind))
        return 0
    try:
        path, rest = split_config_argument(rest)
        config = load_config(kind, path, rest)
    except ConfigError as error:
        if debug_enabled():
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        output = run_job(kind, config)
    except (DataValidationError, UserError, ConnectionError) as error:
        if debug_enabled():
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (StoreError, OSError, ValueError, TypeError, ImportError, RuntimeError) as error:
        if debug_enabled():
            raise
        print(f"error: {kind} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"{kind}: done, rows in {output}")
    _say_failed(kind, output)
    return 0


def _say_failed(kind: str, output: object) -> None:
    """One stderr line when the store holds rows that failed for good (the stdout line stays the store's path)."""
    from align_distill.data_gen.store import store_summary

    try:
        failed = store_summary(str(output)).get("failed", 0)
    except (OSError, ValueError, KeyError):
        return
    if failed:
        print(f"{kind}: {failed} rows failed for good; rerun with --retry_failed true", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
