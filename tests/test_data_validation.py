"""One test per kind of bad row: each checks that the error names the file, the 1-based row and the column."""

import json

import pytest

from align_distill.data import DataValidationError, load_dataset_for, validate

USER = {"role": "user", "content": "What colour is the sky?"}
GOOD = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
GOOD_CHAT = {
    "prompt": [USER],
    "chosen": [{"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "assistant", "content": "Green."}],
}
GOOD_RANKING = {"prompt": "The sky is", "completions": [" blue.", " green.", " loud."], "ranking": [0, 1, 2]}


def problems_of(tmp_path, rows, format="preference"):
    """Write `rows` as JSONL, load them, and return (source, error message, problems)."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataValidationError) as caught:
        load_dataset_for(str(path), format)
    return str(path), str(caught.value), caught.value.problems


def assert_problem(tmp_path, rows, row, column, text, format="preference"):
    source, message, problems = problems_of(tmp_path, rows, format)
    expected = f"{source}:row {row}:column {column}: {text}"
    assert any(str(problem).startswith(expected) for problem in problems), message
    assert expected in message
    return problems


def test_missing_column_in_one_row(tmp_path):
    rows = [GOOD, {"prompt": "Grass is", "chosen": " green."}]
    problems = assert_problem(tmp_path, rows, 2, "rejected", "missing column")
    assert len(problems) == 1


def test_column_missing_from_every_row_is_reported_once(tmp_path):
    rows = [{"prompt": "a", "chosen": "b"}, {"prompt": "c", "chosen": "d"}]
    source, message, problems = problems_of(tmp_path, rows)
    assert [str(p) for p in problems] == [f"{source}:column rejected: missing column (columns found: chosen, prompt)"]


def test_null_value_is_missing(tmp_path):
    assert_problem(tmp_path, [GOOD, {**GOOD, "chosen": None}], 2, "chosen", "missing value (null)")


def test_wrong_type_chosen_is_an_int(tmp_path):
    assert_problem(tmp_path, [{**GOOD, "chosen": 3}], 1, "chosen", "is a number (3), expected a string")


def test_wrong_type_messages_not_a_list(tmp_path):
    rows = [GOOD_CHAT, {**GOOD_CHAT, "prompt": USER}]
    assert_problem(tmp_path, rows, 2, "prompt", "is an object, expected a string (plain text) or a list")


def test_whitespace_only_text(tmp_path):
    assert_problem(tmp_path, [GOOD, {**GOOD, "chosen": " \n\t"}], 2, "chosen", "is empty or whitespace-only")


def test_empty_message_content(tmp_path):
    rows = [{**GOOD_CHAT, "prompt": [{"role": "user", "content": ""}]}]
    assert_problem(tmp_path, rows, 1, "prompt", "message 1 (user) content is empty or whitespace-only")


def test_chosen_identical_to_rejected(tmp_path):
    assert_problem(tmp_path, [GOOD, {**GOOD, "rejected": GOOD["chosen"]}], 2, "rejected", "is identical to chosen")


def test_unknown_role(tmp_path):
    rows = [{**GOOD_CHAT, "chosen": [{"role": "bot", "content": "Blue."}]}]
    assert_problem(tmp_path, rows, 1, "chosen", "message 1 has unknown role 'bot'; expected one of system, user")


def test_missing_content(tmp_path):
    rows = [{**GOOD_CHAT, "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user"}]}]
    assert_problem(tmp_path, rows, 1, "prompt", "message 2 (user) has no content")


def test_content_not_a_string(tmp_path):
    rows = [GOOD_CHAT, {**GOOD_CHAT, "rejected": [{"role": "assistant", "content": ["Green."]}]}]
    assert_problem(tmp_path, rows, 2, "rejected", "message 1 (assistant) content is a list, expected a string")


def test_no_final_assistant_turn_in_chosen(tmp_path):
    rows = [{**GOOD_CHAT, "chosen": [{"role": "assistant", "content": "Blue."}, USER]}]
    assert_problem(tmp_path, rows, 1, "chosen", "ends with a user turn; a response must end with an assistant turn")


def test_prompt_ending_in_an_assistant_turn(tmp_path):
    rows = [{**GOOD_CHAT, "prompt": [USER, {"role": "assistant", "content": "Let me think."}]}]
    assert_problem(tmp_path, rows, 1, "prompt", "ends with an assistant turn; a prompt must end with the turn")


def test_implicit_prompt_whose_shared_turns_end_with_the_assistant(tmp_path):
    shared = [USER, {"role": "assistant", "content": "Blue."}]
    rows = [
        {
            "chosen": [*shared, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}],
            "rejected": [*shared, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Air."}],
        }
    ]
    assert_problem(tmp_path, rows, 1, "prompt", "ends with an assistant turn")


def test_plain_rows_without_prompt_are_rejected(tmp_path):
    rows = [{"chosen": "a b", "rejected": "a c"}]
    assert_problem(tmp_path, rows, 1, "prompt", "missing column; only conversational rows may leave the prompt")


def test_row_mixing_plain_and_conversational(tmp_path):
    rows = [{**GOOD_CHAT, "chosen": "Blue."}]
    assert_problem(tmp_path, rows, 1, "rejected", "mixes plain text and conversational values")


def test_dataset_mixing_plain_and_conversational_rows(tmp_path):
    assert_problem(tmp_path, [GOOD, GOOD_CHAT], 2, "prompt", "is conversational, but row 1 is plain text")


def test_duplicate_ids(tmp_path):
    rows = [{"id": "a", **GOOD}, {"id": "b", **GOOD}, {"id": "a", **GOOD}]
    problems = assert_problem(tmp_path, rows, 3, "id", "duplicate id 'a' (first used in row 1)")
    assert len(problems) == 1


def test_ranking_not_a_permutation(tmp_path):
    rows = [GOOD_RANKING, {**GOOD_RANKING, "ranking": [0, 0, 1]}]
    assert_problem(
        tmp_path,
        rows,
        2,
        "ranking",
        "[0, 0, 1] is not a permutation of 0..2 (repeated: [0]; missing: [2])",
        format="ranking",
    )


def test_ranking_length_differs_from_completions(tmp_path):
    rows = [{**GOOD_RANKING, "ranking": [1, 0]}]
    assert_problem(tmp_path, rows, 1, "ranking", "has 2 entries, but completions has 3", format="ranking")


def test_scores_length_differs_from_completions(tmp_path):
    rows = [{**{k: v for k, v in GOOD_RANKING.items() if k != "ranking"}, "scores": [1.0, 0.5, 0.2, 0.1]}]
    assert_problem(tmp_path, rows, 1, "scores", "has 4 entries, but completions has 3", format="ranking")


def test_fewer_than_two_completions(tmp_path):
    rows = [GOOD_RANKING, {"prompt": "p", "completions": [" only one."], "ranking": [0]}]
    assert_problem(tmp_path, rows, 2, "completions", "has 1 response(s), expected at least 2", format="ranking")


def test_ranking_that_disagrees_with_scores(tmp_path):
    rows = [{**GOOD_RANKING, "ranking": [0, 1, 2], "scores": [0.1, 0.9, 0.0]}]
    assert_problem(tmp_path, rows, 1, "ranking", "[0, 1, 2] disagrees with scores", format="ranking")


def test_ranking_without_ranking_or_scores(tmp_path):
    rows = [GOOD_RANKING, {"prompt": "p", "completions": ["a", "b"]}]
    assert_problem(tmp_path, rows, 2, "ranking", "missing: give ranking", format="ranking")


def test_every_problem_is_listed_in_one_error(tmp_path):
    rows = [GOOD, {**GOOD, "chosen": 1}, {**GOOD, "prompt": " "}, {**GOOD, "rejected": GOOD["chosen"]}]
    source, message, problems = problems_of(tmp_path, rows)
    assert [(p.row, p.column) for p in problems] == [(2, "chosen"), (3, "prompt"), (4, "rejected")]
    assert message.splitlines()[0] == f"3 data problems in {source}:"
    assert all(str(problem) in message for problem in problems)


def test_validate_accepts_plain_lists_and_rejects_unknown_format():
    report = validate([GOOD], "preference")
    assert report.ok and report.form == "plain" and report.rows[0]["prompt"] == "The sky is"
    with pytest.raises(
        ValueError, match="unknown dataset format 'pairs'; expected one of preference, completion, prompt, ranking"
    ):
        validate([GOOD], "pairs")
    with pytest.raises(ValueError, match="max_length needs a tokenizer"):
        validate([GOOD], "preference", max_length=8)
