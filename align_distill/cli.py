"""`align-distill <command>`: train a method, generate data, evaluate models, run a pipeline or the quickstart,
validate data.

`train`, `generate`, `evaluate`, `pipeline` and `quickstart` read their settings through one machinery
(`align_distill.configuration`): a YAML file or shipped recipe name via `--config`, then `--key value` overrides.

Commands are registered by name as "module:function" strings and imported only when they run, so `--help` and
`--version` answer without loading torch or transformers. A user's mistake (a config key, a file, a data row) is
printed as `error: <one line>` with exit code 2; `--debug` (or ALIGN_DISTILL_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

import align_distill
from align_distill.callables import load_callable
from align_distill.errors import DEBUG_ENV, UserError, debug_enabled

# commands that parse their own arguments: name → ("module:function" taking argv and returning the exit code, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("align_distill.commands:train", "train a method: train METHOD --config FILE|RECIPE [--key value]"),
    "generate": ("align_distill.data_gen.command:main", "data generation: generate JOB --config FILE|RECIPE"),
    "evaluate": (
        "align_distill.commands:evaluate",
        "score models: judge win-rates, reward models, checkers: evaluate --config FILE|RECIPE",
    ),
    "pipeline": ("align_distill.pipeline:pipeline_command", "run a multi-stage recipe; finished stages are skipped"),
    "quickstart": ("align_distill.quickstart.run:quickstart_command", "the whole story on a CPU in minutes"),
    "recipes": ("align_distill.recipes:main", "the shipped recipes: list | show NAME | copy NAME DIR"),
}

# argparse commands: the function each (sub)command calls with its parsed options as keyword arguments
TOOLS: dict[str, str] = {
    "data validate": "align_distill.data:validate_command",
    "push": "align_distill.hub:push_command",
    "models import-gguf": "align_distill.models.gguf_import:import_gguf_command",
    "models shrink": "align_distill.models:shrink_command",
    "models merge": "align_distill.models.merge:merge_command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align-distill",
        description="Distil an aligned teacher into an aligned student "
        "(DCKD, ADPA, AlignDistil, LLaVA-MoD, CycleAlign).",
        epilog="`align-distill COMMAND --help` shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"align-distill {align_distill.__version__}")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    v = data_sub.add_parser("validate", help="check a dataset before a (cluster) job; exits 1 listing every problem")
    v.add_argument("path")
    v.add_argument("--format", required=True, choices=["preference", "completion", "prompt", "ranking"])
    v.add_argument(
        "--tokenizer", dest="tokenizer_path", default=None, help="tokenizer folder, for the max-length check"
    )
    v.add_argument("--max-length", type=int, default=None)
    v.set_defaults(tool="data validate")

    p = sub.add_parser("push", help="upload a trained student (adapter or model) with its model card to the Hub")
    p.add_argument("run_dir", help="pipeline run folder, one stage folder, or a training output_dir")
    p.add_argument("--repo-id", required=True, help="ORG/NAME of the model repository")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to push to (created from main when missing)")
    p.add_argument(
        "--stage", default=None, help="pipeline stage to publish (default: the last finished training stage)"
    )
    p.add_argument("--base-model", default=None, help="hub id to record as an adapter's base model")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--license", default=None, help="the card's license, a hub license id (e.g. apache-2.0)")
    p.add_argument("--dry-run", action="store_true", help="write what would be uploaded, card included, locally")
    p.add_argument("--out", default=None, help="with --dry-run: a new or empty folder (default: a temporary one)")
    p.set_defaults(tool="push")

    p = sub.add_parser("models", help="model tools: import a GGUF checkpoint, drop layers to make a student")
    models_sub = p.add_subparsers(dest="models_command", required=True)
    g = models_sub.add_parser("import-gguf", help="dequantise a GGUF file once into safetensors + tokenizer")
    g.add_argument("path")
    g.add_argument("out_dir")
    g.set_defaults(tool="models import-gguf")
    s = models_sub.add_parser("shrink", help="a compressed student sharing the tokenizer: keep some decoder layers")
    s.add_argument("path")
    s.add_argument("out_dir")
    s.add_argument("--keep-layers", required=True, help='e.g. "0,1,5" or "0-3,7"')
    s.set_defaults(tool="models shrink")
    m = models_sub.add_parser("merge", help="fold a LoRA adapter into its base model: full safetensors weights")
    m.add_argument("adapter")
    m.add_argument("out", metavar="out_dir")
    m.add_argument(
        "--base", default=None, help="base model folder or id (default: the adapter's base_model_name_or_path)"
    )
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    m.set_defaults(tool="models merge")
    return parser


def _run(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        return load_callable(COMMANDS[argv[0]][0], f"`{argv[0]}` command")(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "tool", None):
        parser.print_help()
        return 0
    options = {
        k: v for k, v in vars(args).items() if k not in ("command", "tool", "debug", "data_command", "models_command")
    }
    return load_callable(TOOLS[args.tool], f"`{args.tool}` command")(**options)


def _is_user_error(error: BaseException) -> bool:
    """Data, config, pipeline, push and provenance errors all derive from `UserError`."""
    return isinstance(error, (UserError, FileNotFoundError))


def _message(error: BaseException) -> str:
    if type(error).__name__ == "DataValidationError":
        return str(error)  # a header and one problem per line
    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return f"no such file or folder: {error.filename}"
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled()
    while argv and argv[0] in ("--debug", "--version"):
        if argv[0] == "--version":
            print(f"align-distill {align_distill.__version__}")
            return 0
        argv.pop(0)
        debug = True
    if debug and not debug_enabled():
        os.environ[DEBUG_ENV] = "1"  # commands that report their own errors (generate) raise instead
        try:
            return _main(argv, debug)
        finally:
            del os.environ[DEBUG_ENV]
    return _main(argv, debug)


def _main(argv: list[str], debug: bool) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:  # `align-distill ... --help | head`: the reader left; no traceback, as other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except SystemExit as stop:
        if debug or not isinstance(stop.code, str):
            raise
        print(f"error: {stop.code}", file=sys.stderr)
        return 2
    except Exception as error:
        if debug or not _is_user_error(error):
            raise
        print(f"error: {_message(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
