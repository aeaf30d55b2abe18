"""Both orders of one prompt make its preference: agreement decides, disagreement ties, unparsable is left out."""

import pytest

from align_distill.evaluation.pairwise import combine, judgement_rows


def judged(winner):
    return {"ranking": None, "judge_error": "garbage"} if winner is None else {"ranking": [winner, 1 - winner]}


@pytest.mark.parametrize(
    "model_first, baseline_first, preference",
    [(0, 1, 1.0), (1, 0, 0.0), (0, 0, 0.5), (1, 1, 0.5), (None, 1, None), (0, None, None)],
)
def test_combining_the_two_orders(model_first, baseline_first, preference):
    verdict = combine(judged(model_first), judged(baseline_first))
    assert verdict.preference == preference
    assert (verdict.error == "garbage") == (preference is None)


def test_judgement_rows_swap_the_positions_and_skip_unanswered_prompts():
    prompts = [{"id": "a", "prompt": "P"}, {"id": "b", "prompt": "Q"}]
    rows = judgement_rows(prompts, {"a": "mine", "b": "mine b"}, {"a": "theirs"})
    assert rows == [
        {"id": "a/model_first", "prompt": "P", "completions": ["mine", "theirs"]},
        {"id": "a/baseline_first", "prompt": "P", "completions": ["theirs", "mine"]},
    ]
