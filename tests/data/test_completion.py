"""The `completion` format (TRL prompt-completion rows): SFT data, teacher samples, rollouts."""

import json

import pytest

from align_distill.data import DataValidationError, load_dataset_for


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_plain_and_conversational_completion_rows_load(tmp_path):
    plain = write(tmp_path / "plain.jsonl", [{"prompt": "sort: b a", "completion": "sure, a b"}])
    assert load_dataset_for(plain, "completion")[0]["completion"] == "sure, a b"
    conv = write(
        tmp_path / "conv.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "sort: b a"}],
                "completion": [{"role": "assistant", "content": "x"}],
            }
        ],
    )
    dataset = load_dataset_for(conv, "completion")
    assert dataset[0]["completion"][0]["role"] == "assistant" and "id" in dataset.column_names


def test_completion_problems_name_file_row_column(tmp_path):
    path = write(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "p", "completion": ""},
            {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "user", "content": "q"}]},
            {"prompt": "p"},
        ],
    )
    with pytest.raises(DataValidationError) as error:
        load_dataset_for(path, "completion")
    text = str(error.value)
    assert "bad.jsonl:row 1:column completion: is empty" in text
    assert "bad.jsonl:row 2:column completion: ends with a user turn" in text
    assert "bad.jsonl:row 3:column completion: missing" in text


@pytest.mark.parametrize(
    "fmt, row",
    [
        ("prompt", {"text": "sort: b a"}),
        ("completion", {"completion": "sure, a b"}),
        ("ranking", {"completions": ["a", "b"], "ranking": [0, 1]}),
    ],
)
def test_missing_prompt_column_is_reported_once_for_the_column(tmp_path, fmt, row):
    path = write(tmp_path / "rows.jsonl", [row, row])
    with pytest.raises(DataValidationError) as error:
        load_dataset_for(path, fmt)
    assert [str(p) for p in error.value.problems] == [
        f"{path}:column prompt: missing column (columns found: {', '.join(sorted(row))})"
    ]
