"""`align-distill <command>`: train a method, generate data, run a pipeline or the quickstart, validate data.

`train` and `generate` hand everything after the method/job name to a TRL-style parser (YAML via `--config`,
then `--key value` overrides), so the CLI and the Python API share one path.
"""

from __future__ import annotations

import argparse
import sys


def _train(argv: list[str]) -> int:
    from align_distill.methods import METHODS, method_module

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: align-distill train METHOD --config recipe.yaml [--key value ...]\n\nmethods:")
        for name in sorted(METHODS):
            print(f"  {name:12s} {method_module(name).HELP}")
        return 0
    from trl import TrlParser

    from align_distill.distributed import init_cpu_process_group

    init_cpu_process_group()  # before the training arguments: a CPU-only box needs an explicit gloo group
    module = method_module(argv[0])
    parser = TrlParser(module.DATACLASSES, prog=f"align-distill train {argv[0]}")
    parsed = parser.parse_args_and_config(args=argv[1:])
    from align_distill.hub import train_and_publish

    train_and_publish(argv[0], module, parsed)
    return 0


def _generate(argv: list[str]) -> int:
    from align_distill.data_gen.command import main as generate_main

    return generate_main(argv)


def _pipeline(args: argparse.Namespace) -> int:
    from align_distill.pipeline import run_pipeline_file

    run_pipeline_file(args.recipe, run_dir=args.run_dir, from_stage=args.from_stage, only=args.only)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from align_distill.quickstart import run_quickstart

    run_quickstart(
        run_dir=args.run_dir, methods=args.methods, seed=args.seed, from_stage=args.from_stage, smoke=args.smoke
    )
    return 0


def _data(args: argparse.Namespace) -> int:
    from align_distill.data import validate_command

    return validate_command(args.path, args.format, tokenizer_path=args.tokenizer, max_length=args.max_length)


def _push(args: argparse.Namespace) -> int:
    from align_distill.hub import push_command

    return push_command(
        args.run_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        stage=args.stage,
        commit_message=args.commit_message,
        base_model=args.base_model,
    )


def _models(args: argparse.Namespace) -> int:
    if args.models_command == "merge":
        from align_distill.hub import merge_command

        return merge_command(args.adapter, args.out_dir, base=args.base, dtype=args.dtype)
    if args.models_command == "shrink":
        from align_distill.models import shrink_command

        return shrink_command(args.path, args.out_dir, args.keep_layers)
    from align_distill.models.gguf_import import import_gguf_command

    return import_gguf_command(args.path, args.out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align-distill",
        description="Distil an aligned teacher into an aligned student "
        "(DCKD, ADPA, AlignDistil, LLaVA-MoD, CycleAlign).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "train", help="train with a method: align-distill train METHOD --config recipe.yaml", add_help=False
    )
    sub.add_parser(
        "generate", help="run a data-generation job: align-distill generate JOB --config job.yaml", add_help=False
    )

    p = sub.add_parser("pipeline", help="run a multi-stage recipe; finished stages are skipped")
    p.add_argument("recipe", help="pipeline YAML")
    p.add_argument("--run-dir", default=None, help="overrides the recipe's run_dir")
    p.add_argument("--from", dest="from_stage", default=None, help="rerun this stage and every later one")
    p.add_argument("--only", nargs="+", default=None, help="run only these stages (their inputs must be complete)")
    p.set_defaults(handler=_pipeline)

    p = sub.add_parser("quickstart", help="the whole story on a CPU in minutes: tiny teacher/student, synthetic task")
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods to run (default: all available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from", dest="from_stage", default=None, help="rerun this stage and every later one")
    p.add_argument("--smoke", action="store_true", help="toy sizes (2 steps per stage): checks the wiring in ~1 min")
    p.set_defaults(handler=_quickstart)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    v = data_sub.add_parser("validate", help="check a dataset before a (cluster) job; exits 1 listing every problem")
    v.add_argument("path")
    v.add_argument("--format", required=True, choices=["preference", "completion", "prompt", "ranking"])
    v.add_argument("--tokenizer", default=None, help="tokenizer folder, for the max-length check")
    v.add_argument("--max-length", type=int, default=None)
    p.set_defaults(handler=_data)

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
    p.set_defaults(handler=_push)

    p = sub.add_parser("models", help="model tools: import a GGUF checkpoint, drop layers to make a student")
    models_sub = p.add_subparsers(dest="models_command", required=True)
    g = models_sub.add_parser("import-gguf", help="dequantise a GGUF file once into safetensors + tokenizer")
    g.add_argument("path")
    g.add_argument("out_dir")
    s = models_sub.add_parser("shrink", help="a compressed student sharing the tokenizer: keep some decoder layers")
    s.add_argument("path")
    s.add_argument("out_dir")
    s.add_argument("--keep-layers", required=True, help='e.g. "0,1,5" or "0-3,7"')
    m = models_sub.add_parser("merge", help="fold a LoRA adapter into its base model: full safetensors weights")
    m.add_argument("adapter")
    m.add_argument("out_dir")
    m.add_argument(
        "--base", default=None, help="base model folder or id (default: the adapter's base_model_name_or_path)"
    )
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(handler=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _train(argv[1:])
    if argv and argv[0] == "generate":
        return _generate(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
