"""`align-distill generate <job> --config job.yaml [--key value ...] [--overwrite]`.

The top-level CLI passes the arguments after "generate" to `main`. Keys of the YAML can be overridden on the
command line (`--n 4`, `--judge.kind llm`, `--teachers.0.model path`); values are read as YAML. Exit codes:
0 done, 2 bad command line / config / input data, 1 the job failed while running (store, model, server).
"""

from __future__ import annotations

import logging
import sys

from align_distill.data import DataValidationError
from align_distill.data_gen.config import CONFIGS, ConfigError, describe, load_config, parse_overrides
from align_distill.data_gen.store import StoreError

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
        print(f"error: unknown job {kind!r}\n{USAGE}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(describe(kind))
        return 0
    path = None
    if "--config" in rest:
        index = rest.index("--config")
        if index + 1 >= len(rest):
            print("error: --config needs a YAML file", file=sys.stderr)
            return 2
        path = rest[index + 1]
        rest = rest[:index] + rest[index + 2 :]
    try:
        config = load_config(kind, path, parse_overrides(rest))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from align_distill.data_gen.jobs import run_job  # heavy imports only once the command line is valid

    try:
        output = run_job(kind, config)
    except (DataValidationError, ConfigError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (StoreError, OSError, ValueError, TypeError, ImportError, RuntimeError) as error:
        print(f"error: {kind} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"{kind}: done, rows in {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
