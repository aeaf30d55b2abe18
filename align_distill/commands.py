"""`align-distill train METHOD --config FILE|RECIPE [--key value ...]`: one method's training run; and
`align-distill evaluate [SUBCOMMAND] ...`, which dispatches its subcommands (`EVALUATE_SUBCOMMANDS`).

The method's dataclasses (`DATACLASSES`: data arguments, the training config, TRL's `ModelConfig`) are filled from
the YAML file (or shipped recipe) and the `--key value` overrides by `align_distill.configuration`, so an unknown
key, a wrong type or a bad combination is one line naming the file and line. A top-level `env:` mapping in the
YAML sets environment variables first (as TRL's parser does).
"""

from __future__ import annotations

import os
from typing import Any

from align_distill import configuration
from align_distill.callables import load_callable
from align_distill.distributed import init_cpu_process_group
from align_distill.errors import ConfigError, did_you_mean
from align_distill.evaluation.command import main as evaluate_models
from align_distill.hub import push_run
from align_distill.methods import METHODS, method_module
from align_distill.methods.run import run_method

USAGE = "usage: align-distill train METHOD --config FILE|RECIPE [--key value ...]"


def _method(name: str) -> Any:
    if name not in METHODS:
        hint = did_you_mean(name, METHODS)
        raise ConfigError(f"unknown method `{name}`{hint}; methods: {', '.join(sorted(METHODS))}")
    return method_module(name)


def _set_environment(env: Any, source: configuration.Source) -> None:
    if env is None:
        return
    if not isinstance(env, dict):
        raise ConfigError(f"{source.where(('env',))}: `env` must be a mapping of environment variables")
    for key, value in env.items():
        os.environ[str(key)] = str(value)


def train_arguments(name: str, arguments: list[str]) -> tuple[Any, tuple[Any, ...]]:
    """(the method's module, its dataclasses) from `--config X` and `--key value` arguments."""
    module = _method(name)
    config, rest = configuration.split_config_argument(arguments)
    values, source = configuration.load_values(config, rest, label=f"train {name}")
    _set_environment(values.pop("env", None), source)
    hint = f"`align-distill train {name} --help` lists its keys"
    kwargs = configuration.prepare(module.DATACLASSES, values, source, name, hint)
    init_cpu_process_group()  # before the training arguments: a CPU-only launch needs an explicit gloo group
    return module, configuration.construct(module.DATACLASSES, kwargs, source)


def train(argv: list[str]) -> int:
    """`align-distill train ...`; returns the exit code."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n`--config` takes a YAML file or a recipe name (`align-distill recipes list`).\n\nmethods:")
        for name in sorted(METHODS):
            print(f"  {name:12s} {method_module(name).HELP}")
        print("\n`align-distill train METHOD --help` lists a method's keys.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if "-h" in rest or "--help" in rest:
        module = _method(name)
        usage = USAGE.replace("METHOD", name)
        print(configuration.describe_dataclasses(module.DATACLASSES, usage, module.HELP))
        return 0
    module, parsed = train_arguments(name, rest)
    run_method(name, module, parsed, publish=push_run)
    return 0


# `align-distill evaluate SUB ...`: "module:function" taking the remaining arguments and returning the exit code,
# imported only when it runs; any other first argument is an `EvaluateConfig` run.
EVALUATE_SUBCOMMANDS: dict[str, str] = {"speculative": "align_distill.speculative.command:main"}


def evaluate(argv: list[str]) -> int:
    """`align-distill evaluate ...`; returns the exit code."""
    if argv and argv[0] in EVALUATE_SUBCOMMANDS:
        return load_callable(EVALUATE_SUBCOMMANDS[argv[0]], f"`evaluate {argv[0]}` command")(argv[1:])
    return evaluate_models(argv, tuple(EVALUATE_SUBCOMMANDS))
