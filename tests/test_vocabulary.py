"""One vocabulary across methods (`align_distill.vocabulary`): deprecated keys still parse with one warning naming the
new key, old + new together is an error, fields a method ignores are rejected, and no two configs name the same
concept differently."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from transformers import HfArgumentParser

from align_distill.data_gen.config import CONFIGS, JudgeSpec, RankConfig, SampleConfig, SignalsConfig, build_config
from align_distill.data_gen.config import load_config as load_job_config
from align_distill.errors import ConfigError
from align_distill.methods import METHODS, method_module
from align_distill.methods.mod import MoDTrainingConfig
from align_distill.trainers.adpa import ADPAConfig
from align_distill.trainers.aligndistil import AlignDistilConfig
from align_distill.trainers.cyclealign import CycleAlignConfig
from align_distill.trainers.dckd import DCKDConfig
from align_distill.trainers.mod_mimic import MoDMimicConfig
from align_distill.trainers.mod_preference import MoDPreferenceConfig
from align_distill.vocabulary import canonical_job_keys, canonical_keys, deprecated_aliases, ignored_fields

# what each method's parse needs besides the key under test
BASE = {
    "sft": {},
    "dpo": {},
    "dckd": {"signals_path": "signals"},
    "adpa": {"signals_path": "signals"},
    "aligndistil": {},
    "mod": {},
    "cyclealign": {},
}

# (method, old key, new key, value)
TRAIN_ALIASES = [
    ("sft", "dataset_path", "dataset_name", "data/sft.jsonl"),
    ("dpo", "dataset_split", "dataset_train_split", "validation"),
    ("dckd", "dataset_path", "dataset_name", "data/pairs.jsonl"),
    ("dckd", "top_k", "signals_top_k", 7),
    ("adpa", "top_k", "signals_top_k", 7),
    ("adpa", "rollout_temperature", "temperature", 0.5),
    ("adpa", "rollout_max_new_tokens", "max_completion_length", 9),
    ("aligndistil", "dpo_model_path", "teacher_model_name_or_path", "runs/dpo"),
    ("aligndistil", "rev_dpo_model_path", "reference_model_name_or_path", "runs/rev"),
    ("aligndistil", "max_new_tokens", "max_completion_length", 9),
    ("mod", "teacher_signals_path", "signals_path", "runs/signals"),
    ("mod", "signals_teacher", "teacher_name", "dpo"),
    ("mod", "top_k", "num_experts_per_tok", 1),
    ("mod", "kd_coef", "kd_weight", 0.5),
    ("mod", "ce_coef", "sft_weight", 0.5),
    ("mod", "aux_loss_coef", "aux_loss_weight", 0.02),
    ("mod", "kd_chunk_size", "loss_chunk_size", 64),
    ("mod", "topk_mode", "loss_mode", "official"),
    ("cyclealign", "max_new_tokens", "max_completion_length", 9),
    ("cyclealign", "sft_beta", "sft_weight", 0.1),
    ("cyclealign", "length_normalise", "length_normalize", False),
]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "align_distill" and r.levelno == logging.WARNING]


def _parse(types, values):
    return HfArgumentParser(types).parse_dict(values, allow_extra_keys=False)


def _value(parsed, name):
    (owner,) = [p for p in parsed if hasattr(p, name) and name in {f.name for f in dataclasses.fields(p)}]
    return getattr(owner, name)


@pytest.mark.parametrize(("method", "old", "new", "value"), TRAIN_ALIASES)
def test_deprecated_train_key_parses_with_one_warning(method, old, new, value, tmp_path, caplog):
    types = method_module(method).DATACLASSES
    values = {"output_dir": str(tmp_path), **BASE[method], old: value}
    with caplog.at_level(logging.WARNING, logger="align_distill"):
        canonical = canonical_keys(types, values, "recipe.yaml")
    assert old not in canonical and canonical[new] == value
    (message,) = _warnings(caplog)
    assert f"`{old}`" in message and f"`{new}`" in message and "recipe.yaml" in message
    assert _value(_parse(types, canonical), new) == value


@pytest.mark.parametrize(("method", "old", "new", "value"), TRAIN_ALIASES)
def test_old_and_new_key_together_is_an_error(method, old, new, value, tmp_path):
    values = {"output_dir": str(tmp_path), **BASE[method], old: value, new: value}
    with pytest.raises(ConfigError, match=f"`{old}`.*`{new}`"):
        canonical_keys(method_module(method).DATACLASSES, values, "recipe.yaml")


@pytest.mark.parametrize(
    ("config_class", "old", "new", "value"),
    [
        (MoDMimicConfig, "kd_coef", "kd_weight", 0.5),
        (MoDMimicConfig, "signals_teacher", "teacher_name", "dpo"),
        (MoDPreferenceConfig, "aux_loss_coef", "aux_loss_weight", 0.02),
    ],
)
def test_trainer_configs_have_the_aliases_too(config_class, old, new, value, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="align_distill"):
        values = canonical_keys(config_class, {"output_dir": str(tmp_path), old: value}, "args")
    assert len(_warnings(caplog)) == 1
    (config,) = _parse((config_class,), values)
    assert getattr(config, new) == value


def test_a_real_field_with_an_aliased_name_is_left_alone(tmp_path, caplog):
    """AlignDistil's `top_k` is sampling top-k (a field), not DCKD's deprecated signals top-k."""
    with caplog.at_level(logging.WARNING, logger="align_distill"):
        values = canonical_keys((AlignDistilConfig,), {"output_dir": str(tmp_path), "top_k": 5}, "args")
    assert values["top_k"] == 5 and not _warnings(caplog)


def test_pipeline_stage_parse_canonicalizes(tmp_path, caplog):
    """`pipeline._run_train` canonicalizes before `parse_dict`: an old recipe key reaches the new field."""
    types = method_module("dckd").DATACLASSES
    with caplog.at_level(logging.WARNING, logger="align_distill"):
        values = canonical_keys(types, {"output_dir": str(tmp_path), "signals_path": "s", "top_k": 3}, "stage dckd")
    assert _value(_parse(types, values), "signals_top_k") == 3


# -- data_gen jobs ---------------------------------------------------------------------------------------------
JOB_ALIASES = [
    (SampleConfig, {"max_new_tokens": 9}, lambda c: c.max_completion_length, 9, "max_completion_length"),
    (CONFIGS["rollout"], {"max_new_tokens": 9}, lambda c: c.max_completion_length, 9, "max_completion_length"),
    (SignalsConfig, {"top_k": 7}, lambda c: c.signals_top_k, 7, "signals_top_k"),
    (
        RankConfig,
        {"judge": {"kind": "likelihood", "model": "m", "normalize": False}},
        lambda c: c.judge.length_normalize,
        False,
        "length_normalize",
    ),
    (
        RankConfig,
        {"judge": {"kind": "llm", "model": "m", "max_new_tokens": 9}},
        lambda c: c.judge.max_completion_length,
        9,
        "max_completion_length",
    ),
]


@pytest.mark.parametrize(("config_class", "values", "read", "expected", "new"), JOB_ALIASES)
def test_deprecated_job_key_parses_with_one_warning(config_class, values, read, expected, new, caplog):
    with caplog.at_level(logging.WARNING, logger="align_distill"):
        canonical = canonical_job_keys(config_class, {"input": "x", "output_dir": "y", **values}, "job.yaml")
    (message,) = _warnings(caplog)
    assert f"`{new}`" in message
    assert read(build_config(config_class, canonical, "job.yaml")) == expected


def test_load_config_canonicalizes_job_keys(tmp_path, caplog):
    path = tmp_path / "job.yaml"
    path.write_text("input: x\noutput_dir: y\nmodel: m\nmax_new_tokens: 5\n")
    with caplog.at_level(logging.WARNING, logger="align_distill"):
        config = load_job_config("sample", path, {"n": 2})
    assert config.max_completion_length == 5 and len(_warnings(caplog)) == 1


def test_judge_spec_old_and_new_together_is_an_error():
    values = {"input": "x", "output_dir": "y", "judge": {"normalize": True, "length_normalize": True}}
    with pytest.raises(ConfigError, match="`normalize`.*`length_normalize`"):
        canonical_job_keys(RankConfig, values, "job.yaml")
    assert deprecated_aliases(JudgeSpec) == {
        "max_new_tokens": "max_completion_length",
        "normalize": "length_normalize",
    }


# -- fields with no effect -------------------------------------------------------------------------------------
IGNORING = {
    DCKDConfig: {"signals_path": "signals"},
    ADPAConfig: {"signals_path": "signals"},
    AlignDistilConfig: {},
    MoDMimicConfig: {},
    MoDPreferenceConfig: {},
    CycleAlignConfig: {},
    MoDTrainingConfig: {},
}
NON_DEFAULT = {
    "loss_type": "ipo",
    "f_divergence_type": "js_divergence",
    "truncation_mode": "keep_end",
    "loss_weights": [1.0],
    "pad_to_multiple_of": 8,
}


def _non_default(config_class, name):
    if name in NON_DEFAULT:
        return (
            "dft"
            if (name == "loss_type" and config_class in (AlignDistilConfig, MoDMimicConfig))
            else NON_DEFAULT[name]
        )
    (f,) = [f for f in dataclasses.fields(config_class) if f.name == name]
    default = f.default
    if isinstance(default, bool):
        return not default
    if default is None:
        return 2
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default + 0.5
    raise AssertionError(f"no non-default value for {config_class.__name__}.{name} (default {default!r})")


@pytest.mark.parametrize(
    ("config_class", "name"),
    [(c, n) for c in IGNORING for n in ignored_fields(c)],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_an_ignored_field_set_is_rejected(config_class, name, tmp_path):
    with pytest.raises(ConfigError, match=f"`{name}` has no effect"):
        config_class(output_dir=str(tmp_path), **IGNORING[config_class], **{name: _non_default(config_class, name)})


@pytest.mark.parametrize("config_class", list(IGNORING), ids=lambda c: c.__name__)
def test_defaults_are_accepted(config_class, tmp_path):
    config_class(output_dir=str(tmp_path), **IGNORING[config_class])


def test_ignored_fields_are_merged_over_the_mro():
    assert "loss_type" in ignored_fields(DCKDConfig) and "beta" in ignored_fields(DCKDConfig)
    assert "beta" not in ignored_fields(ADPAConfig)  # ADPA's advantage has β
    assert "truncation_mode" in ignored_fields(ADPAConfig) and "truncation_mode" not in ignored_fields(DCKDConfig)
    assert not ignored_fields(method_module("sft").DATACLASSES[1]) and not ignored_fields(
        method_module("dpo").DATACLASSES[1]
    )


def test_mod_stage_fields_of_the_other_stage_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="`beta`.*stage d2d"):
        MoDTrainingConfig(output_dir=str(tmp_path), beta=0.3).stage_config("d2d")
    with pytest.raises(ConfigError, match="`kd_weight`.*stage pd"):
        MoDTrainingConfig(output_dir=str(tmp_path), kd_weight=0.3).stage_config("pd")
    assert MoDTrainingConfig(output_dir=str(tmp_path), beta=0.3).stage_config("pd").beta == 0.3


# -- one name per concept --------------------------------------------------------------------------------------
RETIRED = {
    "dataset_path",
    "dataset_split",
    "dpo_model_path",
    "rev_dpo_model_path",
    "teacher_signals_path",
    "signals_teacher",
    "rollout_max_new_tokens",
    "rollout_temperature",
    "max_new_tokens",
    "kd_coef",
    "ce_coef",
    "aux_loss_coef",
    "kd_chunk_size",
    "topk_mode",
    "sft_beta",
    "length_normalise",
    "normalize",
}
# `top_k` means sampling top-k only; signals top-k is `signals_top_k`, experts per token `num_experts_per_tok`
SAMPLING_TOP_K = {"AlignDistilConfig", "SampleConfig", "RolloutConfig"}
CONCEPTS = {
    "training data": "dataset_name",
    "aligned teacher": "teacher_model_name_or_path",
    "signal cache": "signals_path",
    "teacher name in cache": "teacher_name",
    "signals top-k": "signals_top_k",
    "rollout length": "max_completion_length",
    "loss chunking": "loss_chunk_size",
    "length normalisation": "length_normalize",
}


def _all_config_classes() -> list[type]:
    classes = {t for name in METHODS for t in method_module(name).DATACLASSES if dataclasses.is_dataclass(t)}
    classes |= {MoDMimicConfig, MoDPreferenceConfig, JudgeSpec, *CONFIGS.values()}
    return sorted(classes, key=lambda c: c.__name__)


@pytest.mark.parametrize("config_class", _all_config_classes(), ids=lambda c: c.__name__)
def test_no_config_uses_a_retired_name(config_class):
    names = {f.name for f in dataclasses.fields(config_class)}
    assert not names & RETIRED
    if "top_k" in names:
        assert config_class.__name__ in SAMPLING_TOP_K, f"{config_class.__name__}.top_k: use signals_top_k"


@pytest.mark.parametrize("config_class", _all_config_classes(), ids=lambda c: c.__name__)
def test_every_alias_points_at_a_field(config_class):
    fields = {f.name for f in dataclasses.fields(config_class)}
    for old, new in deprecated_aliases(config_class).items():
        assert new in fields, f"{config_class.__name__}: alias {old} → {new}, which is not a field"
        assert old not in fields or old == "top_k"  # AlignDistil keeps sampling `top_k`; it declares no alias


def test_each_concept_has_one_name_across_methods():
    """For every alias, the new name is the concept's name in the table; the old names appear nowhere."""
    known = set(CONCEPTS.values()) | {
        "dataset_train_split",
        "reference_model_name_or_path",
        "num_experts_per_tok",
        "temperature",
        "kd_weight",
        "sft_weight",
        "aux_loss_weight",
        "loss_mode",
    }
    for config_class in _all_config_classes():
        for old, new in deprecated_aliases(config_class).items():
            assert new in known, f"{config_class.__name__}: {old} → {new} is not a shared name"
            assert old in RETIRED | {"top_k"}
