"""Token-length checks (error / drop / truncate) with a tiny whitespace tokenizer, and `validate_command`.

The tokenizer maps every whitespace-separated piece to one token, so counts are easy to do by hand; its chat
template renders `<|role|> content <|end|> ` per message (+ `<|assistant|> ` as the generation prompt).
"""

import json
import logging

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from align_distill.data import DataValidationError, load_dataset_for, validate, validate_command
from align_distill.data.lengths import CHARS_PER_TOKEN, TokenBudget

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def whitespace_tokenizer(chat_template=TEMPLATE):
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return whitespace_tokenizer()


def user(text):
    return [{"role": "user", "content": text}]


def say(text):
    return [{"role": "assistant", "content": text}]


FITS = {"prompt": "a b c", "chosen": " d e", "rejected": " f"}  # 5 and 4 tokens
LONG = {"prompt": "a b c", "chosen": " d e f g", "rejected": " h i j"}  # 7 and 6 tokens
LONG_PROMPT = {"prompt": "a b c d e f", "chosen": " g", "rejected": " h"}  # prompt alone 6 tokens


def write_jsonl(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_counts_by_hand(tokenizer):
    budget = TokenBudget(tokenizer, max_length=100)
    assert budget.count("a b c", " d e f g") == 7
    # <|user|> a b <|end|> <|assistant|> c d e <|end|>
    assert budget.count(user("a b"), say("c d e")) == 9
    # prompt alone gets the generation prompt: <|user|> a b <|end|> <|assistant|>
    assert budget.count(user("a b")) == 5
    no_template = TokenBudget(whitespace_tokenizer(chat_template=None), max_length=100)
    assert no_template.count(user("a b"), say("c d e")) == 5  # "a b\nc d e": contents joined by newlines


def test_error_policy_names_row_column_and_lengths(tmp_path, tokenizer):
    source = write_jsonl(tmp_path, [FITS, LONG, LONG_PROMPT])
    with pytest.raises(DataValidationError) as caught:
        load_dataset_for(source, "preference", tokenizer=tokenizer, max_length=5)
    assert [str(p) for p in caught.value.problems] == [
        f"{source}:row 2:column chosen: prompt + chosen is 7 tokens, longer than max_length 5",
        f"{source}:row 3:column chosen: prompt + chosen is 7 tokens, longer than max_length 5",
    ]


def test_drop_policy_counts_and_logs(tmp_path, tokenizer, caplog):
    source = write_jsonl(tmp_path, [FITS, LONG, LONG_PROMPT])
    report = validate([FITS, LONG, LONG_PROMPT], "preference", tokenizer=tokenizer, max_length=5, length_policy="drop")
    assert (report.ok, report.dropped, report.truncated, len(report.rows)) == (True, 2, 0, 1)
    with caplog.at_level(logging.WARNING, logger="align_distill.data"):
        loaded = load_dataset_for(source, "preference", tokenizer=tokenizer, max_length=5, length_policy="drop")
    assert loaded["chosen"] == [" d e"]
    assert f"{source}: dropped 2 of 3 rows longer than max_length 5" in caplog.text


def test_truncate_policy_cuts_responses_and_keeps_prompt_and_id(tmp_path, tokenizer, caplog):
    source = write_jsonl(tmp_path, [FITS, LONG])
    report = validate([FITS, LONG], "preference", tokenizer=tokenizer, max_length=5, length_policy="truncate")
    assert (report.ok, report.dropped, report.truncated) == (True, 0, 1)
    assert report.rows[1]["prompt"] == "a b c"
    assert (report.rows[1]["chosen"], report.rows[1]["rejected"]) == (" d e", " h i")
    assert report.rows[0] == {**FITS, "id": report.rows[0]["id"]}  # a row that fits is untouched
    untruncated = load_dataset_for(source, "preference")
    with caplog.at_level(logging.WARNING, logger="align_distill.data"):
        loaded = load_dataset_for(source, "preference", tokenizer=tokenizer, max_length=5, length_policy="truncate")
    assert loaded["id"] == untruncated["id"]  # ids hash the content before truncation
    assert f"{source}: truncated the responses of 1 of 2 rows to fit max_length 5" in caplog.text


def test_truncate_conversational_with_chat_template(tokenizer):
    row = {"prompt": user("a b"), "chosen": say("c d e"), "rejected": say("f")}  # 9 and 7 tokens
    report = validate([row], "preference", tokenizer=tokenizer, max_length=8, length_policy="truncate")
    assert report.ok and report.truncated == 1
    assert report.rows[0]["chosen"] == say("c d") and report.rows[0]["rejected"] == say("f")


def test_truncate_each_ranking_completion(tokenizer):
    row = {"prompt": "a", "completions": [" b c d", " e"], "ranking": [1, 0]}
    report = validate([row], "ranking", tokenizer=tokenizer, max_length=3, length_policy="truncate")
    assert report.ok and report.truncated == 1 and report.rows[0]["completions"] == [" b c", " e"]


def test_truncate_cannot_make_room_for_a_long_prompt(tmp_path, tokenizer):
    source = write_jsonl(tmp_path, [FITS, LONG_PROMPT])
    with pytest.raises(DataValidationError) as caught:
        load_dataset_for(source, "preference", tokenizer=tokenizer, max_length=5, length_policy="truncate")
    assert [str(p) for p in caught.value.problems] == [
        f"{source}:row 2:column prompt: prompt is 6 tokens and leaves no room for a response within max_length 5; "
        "use length_policy='drop' or a larger max_length"
    ]


def test_truncation_that_makes_chosen_equal_rejected(tmp_path, tokenizer):
    source = write_jsonl(tmp_path, [{"prompt": "a b c", "chosen": " d e x", "rejected": " d e y"}])
    with pytest.raises(
        DataValidationError,
        match=rf"{source}:row 1:column rejected: is identical to chosen after "
        "truncation to max_length 5",
    ):
        load_dataset_for(source, "preference", tokenizer=tokenizer, max_length=5, length_policy="truncate")


def test_prompt_format_length_and_all_rows_dropped(tokenizer):
    rows = [{"prompt": "a b c d"}]
    report = validate(rows, "prompt", tokenizer=tokenizer, max_length=3, length_policy="truncate")
    assert [str(p) for p in report.problems] == [
        "<memory>:row 1:column prompt: prompt is 4 tokens, longer than max_length 3"
    ]
    report = validate(rows, "prompt", tokenizer=tokenizer, max_length=3, length_policy="drop")
    assert report.dropped == 1
    assert [str(p) for p in report.problems] == [
        "<memory>: all 1 rows are longer than max_length 3 and were dropped; nothing is left"
    ]


def test_validate_command_ok_and_problems(tmp_path, capsys):
    source = write_jsonl(tmp_path, [FITS, LONG])
    assert validate_command(source, "preference") == 0
    assert capsys.readouterr().out == "OK: 2 rows (preference, plain text)\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**FITS, "chosen": 1}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    assert validate_command(str(bad), "preference") == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # problems go to stderr, so stdout stays for the "OK" summary
    assert captured.err.splitlines() == [
        f"{bad}:row 1:column chosen: is a number (1), expected a string (plain text) or a list of {{role, content}} "
        "messages (conversational)",
        f"{bad}:row 2:column chosen: missing column",
        f"{bad}:row 2:column rejected: missing column",
        f"3 problems in {bad}",
    ]


def test_validate_command_with_saved_tokenizer(tmp_path, tokenizer, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    source = write_jsonl(tmp_path, [{"prompt": user("a b"), "chosen": say("c d e"), "rejected": say("f")}])
    assert validate_command(source, "preference", tokenizer_path=str(tmp_path / "tok"), max_length=8) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"{source}:row 1:column chosen: prompt + chosen is 9 tokens, longer than max_length 8"
    )
    assert validate_command(source, "preference", tokenizer_path=str(tmp_path / "tok"), max_length=9) == 0


def test_validate_command_usage_and_read_errors(tmp_path, capsys):
    source = write_jsonl(tmp_path, [FITS])
    assert validate_command(source, "preference", max_length=8) == 1
    assert capsys.readouterr().err.startswith("error: max_length needs a tokenizer")
    assert validate_command(source, "pairs") == 1
    assert "unknown dataset format 'pairs'" in capsys.readouterr().err
    missing = str(tmp_path / "missing.jsonl")
    assert validate_command(missing, "preference") == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err.splitlines()) == (
        "",
        [f"{missing}: no such file or folder", f"1 problem in {missing}"],
    )


# -- a huge response costs about max_length tokens of work, not its whole size ---------------------------------------
class RecordingTokenizer:
    """Passes calls to `tokenizer` and records how many characters each call got and how many ids it returned."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chat_template = tokenizer, tokenizer.chat_template
        self.characters: list[int] = []
        self.ids: list[int] = []

    def __call__(self, text, **kwargs):
        self.characters.append(len(text))
        encoded = self.tokenizer(text, **kwargs)
        self.ids.append(len(encoded["input_ids"]))
        return encoded

    def apply_chat_template(self, messages, **kwargs):
        encoded = self.tokenizer.apply_chat_template(messages, **kwargs)
        if kwargs.get("tokenize", True):
            self.characters.append(sum(len(message["content"]) for message in messages))
            self.ids.append(len(encoded))
        return encoded


HUGE = "lorem ipsum dolor " * 300_000  # 5.4 MB on one line, 900,000 tokens


@pytest.mark.parametrize("conversational", [False, True])
def test_huge_response_is_measured_on_a_bounded_prefix(tokenizer, conversational):
    recording = RecordingTokenizer(tokenizer)
    row = {"prompt": "a b", "chosen": HUGE, "rejected": " c"}
    if conversational:
        row = {"prompt": user("a b"), "chosen": say(HUGE), "rejected": say("c")}
    report = validate([row], "preference", tokenizer=recording, max_length=64)
    assert [(p.row, p.column) for p in report.problems] == [(1, "chosen")]
    assert " is at least " in report.problems[0].message
    assert report.problems[0].message.endswith("tokens (counted on its start only), longer than max_length 64")
    assert max(recording.characters) <= 65 * CHARS_PER_TOKEN  # never the 5 MB text itself
    assert max(recording.ids) <= 65 * CHARS_PER_TOKEN


def test_huge_response_is_truncated_with_bounded_work(tokenizer):
    recording = RecordingTokenizer(tokenizer)
    row = {"prompt": "a b", "chosen": HUGE, "rejected": " c"}
    report = validate([row], "preference", tokenizer=recording, max_length=64, length_policy="truncate")
    assert report.ok and report.truncated == 1
    assert TokenBudget(tokenizer, 64).count("a b", report.rows[0]["chosen"]) == 64
    assert max(recording.characters) <= 65 * CHARS_PER_TOKEN
