"""Checkers: the synthetic task's ground truth as one, and what a checker may return."""

import pytest

from align_distill import synthetic
from align_distill.evaluation.checkers import Checker, CheckerError, synthetic_task


def test_the_synthetic_checker_is_the_task_reward():
    prompt = synthetic.evaluation_prompts("test", 0, 1)[0]
    good = f"{synthetic.task.POLITE} {synthetic.answer(prompt)}"
    assert synthetic_task(prompt, good) == {"reward": 1.0, "capability": 1.0, "preference": 1.0}
    assert synthetic_task(prompt, "no")["reward"] == synthetic.reward(prompt, "no").total == 0.0


def test_numbers_totals_and_mappings_are_scores_anything_else_names_the_row(tmp_path):
    module = tmp_path / "checks.py"
    module.write_text(
        "class Total:\n    total = 0.25\n\n"
        "def number(p, r):\n    return 1\n\ndef total(p, r):\n    return Total()\n\n"
        "def flag(p, r):\n    return True\n\ndef text(p, r):\n    return 'yes'\n"
    )
    prompt = [{"role": "user", "content": "hi"}]
    assert Checker("n", f"{module}:number")(prompt, "a", {}, "row 1") == {"n": 1.0}
    assert Checker("t", f"{module}:total")(prompt, "a", {}, "row 1") == {"t": 0.25}
    assert Checker("f", f"{module}:flag")(prompt, "a", {}, "row 1") == {"f": 1.0}
    with pytest.raises(CheckerError, match=r"checker `x` .* returned 'yes' for `x` at prompt id 7"):
        Checker("x", f"{module}:text")(prompt, "a", {}, "prompt id 7")
    with pytest.raises(Exception, match="checkers.y: .*has no function 'missing'"):
        Checker("y", f"{module}:missing")


def test_a_checker_that_raises_names_itself_and_the_row(tmp_path):
    module = tmp_path / "broken.py"
    module.write_text("def check(p, r):\n    raise KeyError('answer')\n")
    with pytest.raises(CheckerError, match=r"checker `b` .* failed at model `m`, prompt id 3: 'answer'"):
        Checker("b", f"{module}:check")("hi", "a", {}, "model `m`, prompt id 3")
