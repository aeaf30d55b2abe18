"""One test per kind of bad row: each checks that the error names the file, the 1-based row and the column."""

import itertools
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from align_distill.data import DataValidationError, load_dataset_for, validate, validate_command

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


# -- every row is used or reported: never a silent drop ------------------------------------------------------------
ANSWER = {"role": "assistant", "content": "Blue."}
WRONG = {"role": "assistant", "content": "Green."}
PROMPTS = {"plain prompt": "The sky is", "messages prompt": [USER], "implicit prompt": None}


def preference_row(prompt_kind, chosen_kind, rejected_kind):
    """One row of the combination; an implicit prompt is the user turn that both message lists start with."""
    prompt = PROMPTS[prompt_kind]
    lead = [USER] if prompt is None else []
    chosen = [*lead, ANSWER] if chosen_kind == "list" else " blue."
    rejected = [*lead, WRONG] if rejected_kind == "list" else " green."
    row = {"chosen": chosen, "rejected": rejected}
    return row if prompt is None else {"prompt": prompt, **row}


@pytest.mark.parametrize(
    ("prompt_kind", "chosen_kind", "rejected_kind"),
    list(itertools.product(PROMPTS, ["list", "text"], ["list", "text"])),
)
def test_every_preference_row_is_kept_or_reported(tmp_path, prompt_kind, chosen_kind, rejected_kind):
    row = preference_row(prompt_kind, chosen_kind, rejected_kind)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    report = validate([row, row], "preference", source=str(path))
    if report.ok:
        assert len(report.rows) == 2
        assert len(load_dataset_for(str(path), "preference")) == 2
        return
    assert len(report.rows) + len({p.row for p in report.problems}) >= 2, report.problems
    for row_number in (1, 2):
        named = [p for p in report.problems if p.row == row_number and p.column in ("prompt", "chosen", "rejected")]
        assert named, f"row {row_number} dropped without a problem naming it: {report.problems}"
    with pytest.raises(DataValidationError):
        load_dataset_for(str(path), "preference")


def test_implicit_prompt_with_plain_rejected_is_reported(tmp_path):
    rows = [{"chosen": [USER, ANSWER], "rejected": [USER, WRONG]}, {"chosen": [USER, ANSWER], "rejected": " green."}]
    assert_problem(tmp_path, rows, 2, "rejected", "is plain text, but chosen is a message list")


def test_validate_command_counts_every_row(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = [{"chosen": [USER, ANSWER], "rejected": [USER, WRONG]}, {"chosen": [USER, ANSWER], "rejected": " green."}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert validate_command(str(path), "preference") == 1
    captured = capsys.readouterr()
    assert "OK" not in captured.out
    assert f"{path}:row 2:column rejected:" in captured.err


# -- structural checks come before the length policy ----------------------------------------------------------------
def one_token_per_word():
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.mark.parametrize(
    ("format", "rows", "column"),
    [
        ("preference", [{"prompt": "a", "chosen_text": " b", "rejected": " c"}], "chosen"),
        ("preference", [{"prompt": "a", "chosen": " b", "reject": " c"}], "rejected"),
        ("completion", [{"prompt": "a", "answer": " b"}], "completion"),
        ("ranking", [{"prompt": "a", "responses": [" b", " c"], "scores": [1.0, 0.0]}], "completions"),
        ("ranking", [{"prompt": "a", "responses": [" b", " c"], "ranking": [1, 0]}], "completions"),
    ],
)
def test_missing_column_is_reported_with_a_tokenizer(tmp_path, capsys, format, rows, column):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = one_token_per_word()
    with pytest.raises(DataValidationError) as caught:
        load_dataset_for(str(path), format, tokenizer=tokenizer, max_length=8)
    assert f"{path}:column {column}: missing column (columns found: " in str(caught.value)
    report = validate(rows, format, tokenizer=tokenizer, max_length=8)
    assert not report.rows and [p.column for p in report.problems] == [column]
    tokenizer.save_pretrained(tmp_path / "tok")
    assert validate_command(str(path), format, tokenizer_path=str(tmp_path / "tok"), max_length=8) == 1
    assert f"{path}:column {column}: missing column" in capsys.readouterr().err
