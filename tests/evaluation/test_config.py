"""The evaluate config: every shipped evaluate recipe builds, and mistakes are one line naming the key."""

from pathlib import Path

import pytest
import yaml

from align_distill import configuration
from align_distill.evaluation.config import EvaluateConfig, load_evaluate_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "align_distill" / "configs" / "evaluate").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_evaluate_recipe_builds(path):
    """Built as `align-distill evaluate --config` builds it (its quickstart inputs need not exist here)."""
    values = yaml.safe_load(path.read_text())
    (config,) = configuration.build_dataclasses((EvaluateConfig,), values, str(path), "evaluate")
    config.check()
    assert config.baseline in config.models and config.pairwise_judge.backend == "openai"
    assert path.read_text().startswith("# align-distill evaluate --config align_distill/configs/evaluate/")


def test_config_mistakes_are_one_line_naming_the_key(tmp_path):
    base = {"prompts": "p.jsonl", "output_dir": str(tmp_path), "models": {"a": "m"}, "checkers": {"c": "x:y"}}
    with pytest.raises(Exception, match="baseline: 'b' is not one of the models"):
        load_evaluate_config(None, {**base, "baseline": "b"})
    with pytest.raises(Exception, match="pairwise_judge needs `baseline`"):
        load_evaluate_config(None, {**base, "models": {"a": "m", "b": "n"}, "pairwise_judge": {"model": "j"}})
    with pytest.raises(Exception, match="no scorer"):
        load_evaluate_config(None, {**base, "checkers": {}})
    with pytest.raises(Exception, match="unknown key `judge`"):
        load_evaluate_config(None, {**base, "judge": {}})
