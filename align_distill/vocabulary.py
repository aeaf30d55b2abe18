"""One vocabulary across methods: deprecated config keys and config fields that have no effect.

Every method names the same concept the same way (TRL's name where TRL has one). A config dataclass that renamed a
field declares the old names in a class variable

    deprecated_aliases: ClassVar[dict[str, str]] = {"dpo_model_path": "teacher_model_name_or_path"}

and `canonical_keys` turns a plain dict of keys (a YAML recipe merged with `--key value` overrides) into one with the
new names, warning once per old key; giving both the old and the new name is a `ConfigError`. Python callers that
build a config directly use the new names only.

A config that inherits fields from TRL's `DPOConfig` / `SFTConfig` which its trainer never reads declares them in

    ignored_fields: ClassVar[dict[str, str]] = {"loss_type": "the DPO loss is replaced by the distillation loss"}

and calls `reject_ignored_fields(self)` from `__post_init__`: such a field set to anything but its default is a
`ConfigError` naming it, instead of a setting that silently does nothing. `ignored_fields(cls)` merges the class
variables over the MRO (for `--help`).
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from align_distill.errors import ConfigError

logger = logging.getLogger("align_distill")

__all__ = [
    "canonical_job_keys",
    "canonical_keys",
    "deprecated_aliases",
    "ignored_fields",
    "reject_ignored_fields",
]


def _merged_class_dict(cls: type, name: str) -> dict[str, str]:
    """`name` class-variable dicts over the MRO of `cls`, subclasses last (they win)."""
    merged: dict[str, str] = {}
    for klass in reversed(getattr(cls, "__mro__", (cls,))):
        merged.update(vars(klass).get(name) or {})
    return merged


def deprecated_aliases(cls: type) -> dict[str, str]:
    """Old key → new key of config dataclass `cls` (its `deprecated_aliases`, merged over the MRO)."""
    return _merged_class_dict(cls, "deprecated_aliases")


def ignored_fields(cls: type) -> dict[str, str]:
    """Field → why it has no effect, for config dataclass `cls` (its `ignored_fields`, merged over the MRO)."""
    return _merged_class_dict(cls, "ignored_fields")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _nested_dataclass(hint: Any) -> tuple[type | None, bool]:
    """(the dataclass inside a field's type hint, whether it is a list of them): `Spec`, `Spec | None`,
    `list[Spec]`; `(None, False)` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _nested_dataclass(inner[0]) if len(inner) == 1 else (None, False)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint, False
    return None, False


def _nested_fields(cls: type) -> dict[str, tuple[type, bool]]:
    """Fields of `cls` whose values are dataclass specs (or lists of them), to canonicalize recursively."""
    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a TRL/transformers annotation this Python cannot resolve: such classes nest no specs
        return {}
    nested = {}
    for f in dataclasses.fields(cls):
        inner, is_list = _nested_dataclass(hints.get(f.name))
        if inner is not None:
            nested[f.name] = (inner, is_list)
    return nested


def canonical_keys(
    dataclass_types: type | Iterable[type], values: Mapping[str, Any], source: str, *, _seen: set | None = None
) -> dict[str, Any]:
    """A copy of `values` with every deprecated key of `dataclass_types` renamed to its new name.

    Each old key found logs one warning naming the new key (`source` says where: a file, `--overrides`, a stage).
    An old key that is a real field of one of the types is left alone (e.g. AlignDistil's sampling `top_k`). Fields
    typed as a dataclass spec or a list of them (data_gen's `judge`, `teachers`) are canonicalized recursively.
    Old and new key both given: `ConfigError`.
    """
    types_ = (dataclass_types,) if isinstance(dataclass_types, type) else tuple(dataclass_types)
    seen: set = set() if _seen is None else _seen
    fields = set().union(*(_field_names(t) for t in types_)) if types_ else set()
    aliases: dict[str, str] = {}
    for cls in types_:
        aliases.update(deprecated_aliases(cls))
    result = dict(values)
    for old, new in aliases.items():
        if old not in result or old in fields:
            continue
        if new in result:
            raise ConfigError(
                f"{source}: `{old}` and `{new}` are both set; `{old}` is the deprecated name of `{new}`, keep only "
                f"`{new}`"
            )
        # keep the key's position, so that the parsed config and the run record read in the recipe's order
        result = {(new if key == old else key): value for key, value in result.items()}
        if (old, new) not in seen:
            seen.add((old, new))
            logger.warning(
                "%s: `%s` is deprecated, use `%s` (the old name stops working in the next release)", source, old, new
            )
    for cls in types_:
        for name, (inner, is_list) in _nested_fields(cls).items():
            value = result.get(name)
            if is_list and isinstance(value, list):
                result[name] = [
                    canonical_keys(inner, item, f"{source}.{name}[{i}]", _seen=seen)
                    if isinstance(item, Mapping)
                    else item
                    for i, item in enumerate(value)
                ]
            elif not is_list and isinstance(value, Mapping):
                result[name] = canonical_keys(inner, value, f"{source}.{name}", _seen=seen)
            elif is_list and isinstance(value, Mapping) and all(str(k).isdigit() for k in value):
                # `--teachers.0.max_new_tokens 64` overrides: a mapping of list indices
                result[name] = {
                    k: canonical_keys(inner, v, f"{source}.{name}[{k}]", _seen=seen) if isinstance(v, Mapping) else v
                    for k, v in value.items()
                }
    return result


def canonical_job_keys(config_class: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`canonical_keys` for one data_gen job config (its nested judge / teacher specs included)."""
    return canonical_keys((config_class,), values, source)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _same(value: Any, default: Any) -> bool:
    value, default = getattr(value, "value", value), getattr(default, "value", default)  # enums
    if value == default:
        return True
    # TRL turns a `loss_type` string into a one-element list in `__post_init__`
    if isinstance(value, list) and len(value) == 1 and value[0] == default:
        return True
    return isinstance(default, list) and len(default) == 1 and value == default[0]


def reject_ignored_fields(config: Any, method: str | None = None) -> None:
    """`ConfigError` when a field listed in `ignored_fields(type(config))` differs from its dataclass default."""
    cls = type(config)
    ignored = ignored_fields(cls)
    if not ignored:
        return
    method = method or getattr(cls, "method_label", None) or cls.__name__
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    for name, reason in ignored.items():
        if name not in defaults or not hasattr(config, name):
            continue
        default = defaults[name]
        if default is dataclasses.MISSING or _same(getattr(config, name), default):
            continue
        raise ConfigError(f"{cls.__name__}: `{name}` has no effect in {method} ({reason}); remove it")
