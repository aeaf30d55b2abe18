"""align_distill.configuration: YAML + `--key value` overrides → typed dataclasses, errors naming file and line."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from align_distill.configuration import (
    Source,
    as_source,
    build_dataclasses,
    describe_dataclasses,
    load_dataclasses,
    load_values,
    load_yaml,
    parse_overrides,
    prepare,
    split_config_argument,
)
from align_distill.errors import ConfigError


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class Inner:
    kind: str = "a"
    weight: float = 1.0


@dataclass
class Training:
    learning_rate: float = 1e-5
    max_steps: int = -1
    use_peft: bool = False
    gradient_checkpointing: bool = True
    modules: list[str] | None = None
    mode: Mode = Mode.FAST
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_steps == 0:
            raise ValueError("Training: max_steps must not be 0,\nuse -1 for epochs")


@dataclass
class Data:
    dataset_name: str | None = None
    revision: str | None = None


TYPES = (Data, Training)


def write(tmp_path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bad_yaml_is_one_line_with_file_line_and_column(tmp_path):
    path = write(tmp_path, "learning_rate: 1e-3\nmax_steps: 3\nmodules: [a, b\n", "bad.yaml")
    with pytest.raises(ConfigError) as caught:
        load_yaml(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML: ") and "line 4, column 1" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top level, found list"):
        load_yaml(write(tmp_path, "- a\n- b\n"))


def test_yaml_values_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "learning_rate: 1e-3\nmax_steps: '8'\nrevision: 1234\ninner: {kind: b}\n")
    arguments = ["--config", path, "--use_peft", "--modules", "q_proj,v_proj", "--inner.weight=0.5", "--mode", "slow"]
    config, rest = split_config_argument(arguments)
    data, training = load_dataclasses(TYPES, config, rest, "demo")
    assert training.learning_rate == 1e-3 and isinstance(training.learning_rate, float)  # PyYAML reads "1e-3" as str
    assert training.max_steps == 8 and training.use_peft is True
    assert training.modules == ["q_proj", "v_proj"] and training.mode is Mode.SLOW
    assert training.inner == Inner(kind="b", weight=0.5)
    assert data.revision == "1234"
    _, training = load_dataclasses(TYPES, None, ["--modules", "a", "b", "--no_gradient_checkpointing"], "demo")
    assert training.modules == ["a", "b"] and training.gradient_checkpointing is False


def test_overrides_nest_and_index_lists():
    assert parse_overrides(["--judge.kind", "llm", "--teachers.0.model", "m", "--run-dir=r", "--flag"]) == {
        "judge": {"kind": "llm"},
        "teachers": {"0": {"model": "m"}},
        "run_dir": "r",
        "flag": True,
    }
    values, _ = load_values(None, ["--items", "[{kind: x}, {kind: y}]", "--items.1.weight", "2"])
    (training,) = build_dataclasses((Training,), values, None, "demo")
    assert training.items == [Inner("x"), Inner("y", 2.0)]
    with pytest.raises(ConfigError, match="expected --key value, found 'stray'"):
        parse_overrides(["stray"])


def test_unknown_keys_name_the_line_or_the_command_line_and_the_closest_key(tmp_path):
    path = write(tmp_path, "dataset_name: d\n\nlerning_rate: 3\n")
    with pytest.raises(ConfigError) as caught:
        load_dataclasses(TYPES, path, [], "dckd")
    assert str(caught.value) == f"{path}: line 3: unknown key `lerning_rate` for dckd (did you mean `learning_rate`?)"
    with pytest.raises(
        ConfigError, match=r"^command line: unknown key `max_step` for dckd \(did you mean `max_steps`"
    ):
        load_dataclasses(TYPES, None, ["--max_step", "3"], "dckd")
    with pytest.raises(ConfigError, match=r"^command line: unknown key `knd` for Inner \(did you mean `kind`\?\)"):
        load_dataclasses(TYPES, None, ["--inner.knd", "x"], "dckd")
    nested = write(tmp_path, "inner:\n  kind: a\n  wieght: 2\n", "nested.yaml")
    with pytest.raises(ConfigError, match=r"nested.yaml: line 3: unknown key `wieght` for Inner \(did you mean"):
        load_dataclasses(TYPES, nested, [], "dckd")


def test_wrong_types_name_key_and_place(tmp_path):
    path = write(tmp_path, "max_steps: two\n")
    with pytest.raises(ConfigError, match=r"line 1: `max_steps`: expected an integer, found str 'two'"):
        load_dataclasses(TYPES, path, [], "dckd")
    with pytest.raises(ConfigError, match=r"^command line: `learning_rate`: expected a number, found str 'fast'"):
        load_dataclasses(TYPES, None, ["--learning_rate", "fast"], "dckd")


def test_post_init_errors_become_one_line_config_errors_naming_the_file(tmp_path):
    path = write(tmp_path, "max_steps: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_dataclasses(TYPES, path, [], "dckd")
    assert str(caught.value) == f"{path}: Training: max_steps must not be 0, use -1 for epochs"


def test_source_says_where_a_key_came_from():
    source = Source(file="r.yaml", lines={("stages", 1, "config", "lr"): 9}, overridden={("stages", 1, "config", "x")})
    stage = source.within("stages", 1, "config", context="stage `b`")
    assert stage.where(("lr",)) == "r.yaml: line 9: stage `b`"
    assert stage.where(("x",)) == "command line: stage `b`"
    assert Source(label="sample config").where(("n",)) == "sample config"


def test_a_recipe_name_is_accepted_as_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/quickstart here
    # a shipped recipe: resolved by name, then its needs are checked (this one needs the quickstart's outputs)
    with pytest.raises(ConfigError, match=r"`dckd/cache.yaml` needs the quickstart's outputs.*quickstart` first"):
        load_values("dckd/cache", [])
    with pytest.raises(ConfigError, match=r"`dckd/cahce`: no such file, and not a recipe name"):
        load_values("dckd/cahce", [])


def test_describe_names_every_field():
    text = describe_dataclasses(TYPES, "usage: demo")
    assert text.startswith("usage: demo") and "learning_rate, max_steps" in text and "dataset_name" in text


def test_shipped_deepspeed_config_resolves_from_any_directory(tmp_path, monkeypatch):
    """A recipe's `deepspeed: align_distill/configs/deepspeed/zero3.json` names the packaged file, also when the
    command runs outside a checkout; an unknown file is left for TrainingArguments to report."""
    from transformers import TrainingArguments

    import align_distill

    monkeypatch.chdir(tmp_path)
    shipped = Path(align_distill.__file__).parent / "configs" / "deepspeed" / "zero3.json"
    for value in ("align_distill/configs/deepspeed/zero3.json", "deepspeed/zero3.json"):
        (kwargs,) = prepare((TrainingArguments,), {"deepspeed": value}, as_source("recipe.yaml"), "train")
        assert Path(kwargs["deepspeed"]) == shipped
    (kwargs,) = prepare((TrainingArguments,), {"deepspeed": "mine.json"}, as_source("recipe.yaml"), "train")
    assert kwargs["deepspeed"] == "mine.json"
