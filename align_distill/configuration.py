"""One configuration machinery for `train`, `generate`, `pipeline` and `quickstart`.

A config is a YAML file (a path or a shipped recipe name, see `align_distill.recipes`) with `--key value`
command-line overrides on top. Override values are read as YAML; dotted keys reach into nested mappings and lists
(`--judge.kind llm`, `--teachers.0.model path`), `--key=value` works too, a bare `--flag` means true and
`--key a b` gives a list. The merged values are converted to the types of the target dataclasses' fields (`1e-3`
for a float, `a,b` for a list) and the dataclasses are built; every mistake is a `ConfigError` of one line that
names the file and line (or "command line") and, for an unknown key, the closest known one:

    recipe.yaml: line 3: unknown key `lerning_rate` for dckd (did you mean `learning_rate`?)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from align_distill.errors import ConfigError, did_you_mean
from align_distill.recipes import check_requirements, resolve_config
from align_distill.vocabulary import canonical_keys, ignored_fields

KeyPath = tuple[str | int, ...]

SHORTHANDS: dict[type, str] = {}
"""Dataclass → the key a plain string stands for (data_gen: `teacher: path/to/model` means `{model: ...}`)."""


# -- where a value came from --------------------------------------------------------------------------------------
@dataclass
class Source:
    """Where a config's values came from, to name it in errors: the YAML file with the line of each key, and the
    keys given on the command line. `prefix` places this config inside the file (a pipeline stage's `config`),
    `context` is said after the place (``stage `dckd_student` ``), `label` names a config without a file."""

    file: str | None = None
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overridden: set[KeyPath] = field(default_factory=set)
    prefix: KeyPath = ()
    context: str = ""
    label: str | None = None

    def within(self, *path: str | int, context: str | None = None) -> Source:
        """The source of the sub-config at `path`."""
        return dataclasses.replace(
            self, prefix=self.prefix + tuple(path), context=self.context if context is None else context
        )

    def from_command_line(self, path: KeyPath = ()) -> bool:
        full = self.prefix + tuple(path)
        return any(full[:i] in self.overridden for i in range(len(self.prefix) + 1, len(full) + 1))

    def line(self, path: KeyPath = ()) -> int | None:
        """The line of `path` in the file, or of its closest enclosing key."""
        full = self.prefix + tuple(path)
        for i in range(len(full), 0, -1):
            if full[:i] in self.lines:
                return self.lines[full[:i]]
        return None

    def where(self, path: KeyPath = ()) -> str:
        """`FILE: line N`, `command line` or the label, then the context."""
        parts = []
        if path and self.from_command_line(path):
            parts.append("command line")
        elif self.file is not None:
            parts.append(self.file)
            line = self.line(path)
            if line is not None:
                parts.append(f"line {line}")
        elif self.label:
            parts.append(self.label)
        if self.context:
            parts.append(self.context)
        return ": ".join(parts) or "config"


def as_source(where: str | Source | None) -> Source:
    if isinstance(where, Source):
        return where
    return Source(label=where)


def _dotted(path: KeyPath) -> str:
    return ".".join(str(part) for part in path)


def one_line(error: BaseException | str) -> str:
    """An error message as one line."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


# -- YAML -----------------------------------------------------------------------------------------------------------
def _key_lines(node: yaml.Node, path: KeyPath, out: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            out.setdefault(path + (key,), key_node.start_mark.line + 1)
            _key_lines(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out.setdefault(path + (index,), item.start_mark.line + 1)
            _key_lines(item, path + (index,), out)


def load_yaml(path: str | os.PathLike[str], name: str | None = None) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """The mapping in a YAML file and the line of every key in it; errors are one line naming the file (as `name`,
    default the path), the line and the column."""
    name = name or os.fspath(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such config file") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {name}: {error.strerror}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        problem = getattr(error, "problem", None) or one_line(error)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{name}: not valid YAML: {problem}{at}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of keys at the top level, found {type(data).__name__}")
    lines: dict[KeyPath, int] = {}
    _key_lines(node, (), lines)
    return data, lines


# -- command-line overrides -----------------------------------------------------------------------------------------
def split_config_argument(arguments: list[str]) -> tuple[str | None, list[str]]:
    """(the value of `--config X` / `--config=X`, the other arguments)."""
    rest, config, i = [], None, 0
    while i < len(arguments):
        argument = arguments[i]
        if argument == "--config":
            if i + 1 >= len(arguments) or arguments[i + 1].startswith("--"):
                raise ConfigError("command line: --config needs a YAML file or a recipe name")
            config, i = arguments[i + 1], i + 2
            continue
        if argument.startswith("--config="):
            config = argument.partition("=")[2]
        else:
            rest.append(argument)
        i += 1
    return config, rest


def _parse_value(raw: str) -> Any:
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value`, bare `--flag` (true) and `--key a b` (a list) into a nested dict; dotted keys
    nest (`--judge.kind llm`), a numeric part indexes a list (`--teachers.0.model x`), dashes in keys are
    underscores (`--run-dir`). Values are read as YAML."""
    result: dict[str, Any] = {}
    i = 0
    while i < len(arguments):
        argument = arguments[i]
        if not argument.startswith("--") or argument == "--":
            raise ConfigError(f"command line: expected --key value, found {argument!r}")
        key, eq, raw = argument[2:].partition("=")
        if eq:
            value = _parse_value(raw)
        else:
            values = []
            while i + 1 < len(arguments) and not arguments[i + 1].startswith("--"):
                values.append(arguments[i + 1])
                i += 1
            value = (
                True
                if not values
                else _parse_value(values[0])
                if len(values) == 1
                else list(map(_parse_value, values))
            )
        if not key:
            raise ConfigError(f"command line: expected --key value, found {argument!r}")
        _set_path(result, key.replace("-", "_").split("."), value)
        i += 1
    return result


def _set_path(target: Any, path: list[str], value: Any) -> None:
    for depth, part in enumerate(path):
        if isinstance(target, list) and part.isdigit() and int(part) < len(target):
            key: Any = int(part)  # `--teachers "[a, b]" --teachers.1.model c`
        elif isinstance(target, dict):
            key = part
        else:
            raise ConfigError(f"command line: `--{'.'.join(path)}`: `{'.'.join(path[:depth])}` is not a mapping")
        if depth == len(path) - 1:
            target[key] = value
            return
        if not isinstance(target[key] if isinstance(target, list) else target.get(key), (dict, list)):
            target[key] = {}
        target = target[key]


def leaf_paths(values: Mapping[str, Any], prefix: KeyPath = ()) -> set[KeyPath]:
    """Every key path in nested mappings (numeric keys as list indices)."""
    paths: set[KeyPath] = set()
    for key, value in values.items():
        path = prefix + (int(key) if isinstance(key, str) and key.isdigit() else key,)
        paths.add(path)
        if isinstance(value, Mapping):
            paths |= leaf_paths(value, path)
    return paths


def merge(base: Any, override: Any, where: str = "command line") -> Any:
    """`override` into `base`; a mapping with integer keys ({"0": {...}}) updates list items by index."""
    if isinstance(base, list) and isinstance(override, dict) and all(str(k).isdigit() for k in override):
        merged = list(base)
        for key, value in override.items():
            index = int(key)
            if index >= len(merged):
                raise ConfigError(f"{where}: index {index} is past the end of a list of {len(merged)}")
            merged[index] = merge(merged[index], value, where)
        return merged
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value, where) if key in base else value
        return merged
    return override


def _display_name(value: str | os.PathLike[str], path: Path) -> str:
    """The config's name in messages: what the user typed when it is the file, else the resolved file."""
    text = os.fspath(value)
    return text if Path(text).expanduser() == path else os.fspath(path)


def load_values(
    config: str | os.PathLike[str] | None,
    overrides: list[str] | Mapping[str, Any] | None = None,
    label: str | None = None,
    from_command_line: bool | None = None,
) -> tuple[dict[str, Any], Source]:
    """The values of a YAML file or recipe name (`config`, optional) with `overrides` merged on top, and where each
    came from. `overrides` are command-line arguments (`--key value`) or a mapping; errors about them say "command
    line" when they came from it (default: when `overrides` is a list of arguments). A shipped recipe that needs
    the quickstart's outputs fails here when they are missing."""
    if from_command_line is None:
        from_command_line = isinstance(overrides, list)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = dict(overrides or {})
    data: dict[str, Any] = {}
    source = Source(label=label)
    path = None
    if config is not None:
        path = resolve_config(config)
        name = _display_name(config, path)
        data, lines = load_yaml(path, name)
        source = Source(file=name, lines=lines, label=label)
    if from_command_line:
        source.overridden = leaf_paths(overrides)
    values = merge(data, overrides)
    if path is not None:
        check_requirements(path, values)
    return values, source


# -- types ----------------------------------------------------------------------------------------------------------
@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of dataclass `cls` (`Any` where an annotation cannot be resolved)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation this Python cannot resolve: fall back field by field
        return {f.name: f.type if not isinstance(f.type, str) else Any for f in dataclasses.fields(cls)}


def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin is not None and args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` already has type `hint` (no conversion needed)."""
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return True
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(origin, type) and isinstance(value, origin)


def convert(value: Any, hint: Any, source: Source, path: KeyPath) -> Any:
    """`value` as the field type `hint`: numbers from strings (`1e-3`), a list from `a,b` or one item, enums from
    their values, nested dataclasses from mappings. A value that cannot be converted is a ConfigError naming the
    key and where it was set; a type this does not know is passed on for the dataclass to check."""

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(
            f"{source.where(path)}: `{_dotted(path)}`: expected {expected}, found {type(value).__name__} {value!r}"
        )

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if _is_union(hint):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            if _matches(value, option):
                return convert(value, option, source, path)
        errors = []
        for option in options:
            try:
                return convert(value, option, source, path)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        fail(type_name(hint))
    if origin is Literal:
        if value in args:
            return value
        fail(f"one of {', '.join(map(repr, args))}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        if isinstance(value, bool) and not value and any(m.value == "no" for m in hint):
            value = "no"  # YAML 1.1 reads an unquoted `no` (`save_strategy: no`, `--save_strategy no`) as false
        try:
            return hint(value)
        except ValueError:
            fail(f"one of {', '.join(repr(m.value) for m in hint)}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        shorthand = next((key for cls, key in SHORTHANDS.items() if issubclass(hint, cls)), None)
        if isinstance(value, str) and shorthand:
            value = {shorthand: value}
        if not isinstance(value, Mapping):
            fail(f"a mapping of {hint.__name__} keys")
        return build_one(hint, dict(value), source.within(*path, context=source.context), hint.__name__)
    if origin in (list, tuple) or hint in (list, tuple):
        items = value
        if isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, tuple):
            items = list(value)
        elif not isinstance(value, list):
            if isinstance(value, Mapping) or value is None:
                fail("a list")
            items = [value]
        item_hint = args[0] if args and args[-1] is not Ellipsis else Any
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:
            return tuple(convert(v, a, source, path + (i,)) for i, (v, a) in enumerate(zip(items, args)))
        converted = [convert(item, item_hint, source, path + (i,)) for i, item in enumerate(items)]
        return tuple(converted) if (origin or hint) is tuple else converted
    if origin is dict or hint is dict:
        if isinstance(value, str):
            parsed = _parse_value(value)
            value = parsed if isinstance(parsed, dict) else value
        if not isinstance(value, Mapping):
            fail("a mapping")
        value_hint = args[1] if len(args) == 2 else Any
        return {key: convert(item, value_hint, source, path + (key,)) for key, item in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        fail("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            number = _number(value)
            if number is not None and float(number).is_integer():
                return int(number)
        fail("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _number(value) is not None:
            return float(_number(value))
        fail("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `revision: 1234` reads as an integer
        fail("a string")
    if hint in (Path, os.PathLike):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        fail("a path")
    return value  # a type this machinery does not know: the dataclass checks it


def _number(text: str) -> int | float | None:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


# -- building dataclasses -------------------------------------------------------------------------------------------
def unknown_key_error(
    key: str, known: Iterable[str], source: Source, path: KeyPath, name: str, hint: str | None = None
) -> ConfigError:
    """`FILE: line N: unknown key `x` for NAME (did you mean `y`?)`."""
    tail = did_you_mean(key, known) or (f" ({hint})" if hint else "")
    return ConfigError(f"{source.where(path + (key,))}: unknown key `{key}` for {name}{tail}")


def _check_keys(values: Mapping[str, Any], known: Iterable[str], source: Source, name: str, hint: str | None) -> None:
    known = list(known)
    unknown = [key for key in values if key not in known]
    if unknown:
        raise unknown_key_error(unknown[0], known, source, (), name, hint)


def _flip_negated_flags(values: dict[str, Any], types_: Iterable[type]) -> dict[str, Any]:
    """`--no_flag` (HfArgumentParser's spelling) for a bool field `flag` means `flag: false`."""
    bools = {name for cls in types_ for name, hint in field_types(cls).items() if hint in (bool, bool | None)}
    result = {}
    for key, value in values.items():
        if isinstance(key, str) and key.startswith("no_") and key[3:] in bools and value is True:
            result[key[3:]] = False
        else:
            result[key] = value
    return result


def _shipped_launcher_config(values: dict[str, Any]) -> dict[str, Any]:
    """`deepspeed: align_distill/configs/deepspeed/zero3.json` (or `deepspeed/zero3.json`) names the shipped file
    wherever the package is installed, not only from a checkout's root."""
    value = values.get("deepspeed")
    if isinstance(value, str) and value.endswith(".json") and not Path(value).expanduser().is_file():
        try:
            values = {**values, "deepspeed": str(resolve_config(value))}
        except ConfigError:
            pass  # not a shipped name either: TrainingArguments reports the missing file
    return values


def prepare(
    dataclass_types: Iterable[type],
    values: Mapping[str, Any],
    source: Source,
    name: str,
    hint: str | None = None,
) -> list[dict[str, Any]]:
    """The keyword arguments of each dataclass in `dataclass_types`: deprecated keys renamed, keys split among the
    dataclasses by field name (a key goes to every class with that field), values converted to the field types.
    An unknown key is a ConfigError with the closest known key."""
    types_ = tuple(dataclass_types)
    values = canonical_keys(types_, dict(values), source.where())
    values = _flip_negated_flags(values, types_)
    values = _shipped_launcher_config(values)
    fields = [init_fields(cls) for cls in types_]
    _check_keys(values, [n for f in fields for n in f], source, name, hint)
    kwargs = []
    for cls, names in zip(types_, fields):
        hints = field_types(cls)
        kwargs.append(
            {key: convert(value, hints.get(key, Any), source, (key,)) for key, value in values.items() if key in names}
        )
    return kwargs


def construct(dataclass_types: Iterable[type], kwargs: list[dict[str, Any]], source: Source) -> tuple[Any, ...]:
    """Each dataclass built from its keyword arguments; a ValueError / TypeError of a `__post_init__` becomes a
    one-line ConfigError naming the config."""
    built = []
    for cls, arguments in zip(dataclass_types, kwargs):
        try:
            built.append(cls(**arguments))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{source.where()}: {one_line(error)}") from error
    return tuple(built)


def build_dataclasses(
    dataclass_types: Iterable[type],
    values: Mapping[str, Any],
    source: Source | str | None,
    name: str,
    hint: str | None = None,
) -> tuple[Any, ...]:
    """One instance of each of `dataclass_types` from one flat mapping of keys (see `prepare`)."""
    types_ = tuple(dataclass_types)
    source = as_source(source)
    return construct(types_, prepare(types_, values, source, name, hint), source)


def build_one(cls: type, values: Mapping[str, Any], source: Source | str | None, name: str | None = None) -> Any:
    """An instance of dataclass `cls` from `values` (nested dataclass fields from nested mappings)."""
    source = as_source(source)
    (instance,) = build_dataclasses((cls,), values, source, name or cls.__name__)
    return instance


def build_config(cls: type, data: Mapping[str, Any], where: str | Source) -> Any:
    """An instance of dataclass `cls` from `data`, type-checked; `where` names the config in errors."""
    return build_one(cls, data, where)


def load_dataclasses(
    dataclass_types: Iterable[type],
    config: str | os.PathLike[str] | None,
    overrides: list[str] | Mapping[str, Any] | None,
    name: str,
    hint: str | None = None,
) -> tuple[Any, ...]:
    """`load_values` + `build_dataclasses`: a YAML file or recipe name with overrides into the dataclasses."""
    values, source = load_values(config, overrides, label=name)
    return build_dataclasses(dataclass_types, values, source, name, hint)


# -- help -----------------------------------------------------------------------------------------------------------
def _declared_in(cls: type, name: str) -> type:
    """The class of `cls`'s MRO that (re)declares field `name` last."""
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return klass
    return cls


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return "required"
    return f"default {getattr(default, 'value', default)!r}"


def _first_sentence(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    cut = text.find(". ")
    text = text[: cut + 1] if 0 < cut else text
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def field_lines(cls: type, full: bool = True) -> list[str]:
    """One line per field of `cls`: `name (type, default): help`; fields that `cls` ignores are left out."""
    hints, ignored = field_types(cls), ignored_fields(cls)
    lines = []
    for f in init_fields(cls).values():
        if f.name in ignored:
            continue
        help_text = f.metadata.get("help", "")
        help_text = help_text if full else _first_sentence(help_text)
        lines.append(f"  {f.name} ({type_name(hints.get(f.name, Any))}, {_default_text(f)}): {help_text}".rstrip())
    return lines


def _wrapped(names: list[str], width: int = 117) -> list[str]:
    lines, line = [], " "
    for name in names:
        if len(line) + len(name) + 2 > width:
            lines.append(line.rstrip(","))
            line = " "
        line += f" {name},"
    if line.strip():
        lines.append(line.rstrip(","))
    return lines


def describe_dataclasses(dataclass_types: Iterable[type], usage: str, about: str = "") -> str:
    """Help of a command configured by `dataclass_types`: every field align-distill declares with type, default and
    help, then the names of the fields inherited from TRL / transformers (documented there). Fields a method
    ignores (`vocabulary.ignored_fields`) are not shown."""
    out = [usage, ""]
    if about:
        out += [about.strip(), ""]
    out.append("Keys go in the YAML file (--config FILE or a recipe name) or on the command line (--key value).")
    for cls in dataclass_types:
        ignored = ignored_fields(cls)
        own = [
            f for f in init_fields(cls).values() if _declared_in(cls, f.name).__module__.startswith("align_distill")
        ]
        inherited = [f.name for f in init_fields(cls).values() if f not in own and f.name not in ignored]
        if own:
            out += ["", f"{cls.__name__}:"]
            hints = field_types(cls)
            for f in own:
                if f.name in ignored:
                    continue
                help_text = _first_sentence(f.metadata.get("help", ""))
                out.append(
                    f"  {f.name} ({type_name(hints.get(f.name, Any))}, {_default_text(f)}): {help_text}".rstrip()
                )
        if inherited:
            base = next(
                (
                    k
                    for k in cls.__mro__
                    if not k.__module__.startswith("align_distill") and dataclasses.is_dataclass(k)
                ),
                cls,
            )
            out += ["", f"{cls.__name__}, from {base.__module__.split('.')[0]}.{base.__name__} (same meaning there):"]
            out += _wrapped(inherited)
        if ignored:
            out.append(f"{cls.__name__}, fields this method ignores (not shown above; setting one is an error):")
            out += _wrapped(sorted(ignored))
    return "\n".join(out)


def describe_dataclass(cls: type, usage: str) -> str:
    """Help of one config dataclass: its docstring and every key with type, default and full help."""
    doc = [line.strip() for line in (cls.__doc__ or "").strip().splitlines()]
    return "\n".join([usage, "", *doc, "", "keys:", *field_lines(cls)])
