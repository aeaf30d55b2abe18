"""Response rows (token ids of student responses, ADPA's training rows): each kind of bad row is named by row and
column before training."""

from __future__ import annotations

import pytest

from align_distill.data import DataValidationError
from align_distill.data.responses import check_response_rows, response_row_problems

GOOD = {"id": "a", "prompt": "2 + 3?", "chosen": "5.", "completion_ids": [5, 6, 2]}


def problems(rows, vocab_size=10):
    return [(p.row, p.column, p.message) for p in response_row_problems(rows, "r.jsonl", "completion_ids", vocab_size)]


def test_good_rows_pass():
    check_response_rows([GOOD, {**GOOD, "id": "b"}], "r.jsonl", "completion_ids", 10)


@pytest.mark.parametrize(
    ("bad", "column", "message"),
    [
        ({"id": ""}, "id", "empty id"),
        ({"id": "a"}, "id", "id 'a' repeats row 1"),
        ({"chosen": ""}, "chosen", "empty"),
        ({"completion_ids": []}, "completion_ids", "non-empty list of token ids"),
        ({"completion_ids": "5 6 2"}, "completion_ids", "non-empty list of token ids, found str"),
        ({"completion_ids": ["5", "6"]}, "completion_ids", "must be integers, found str"),
        ({"completion_ids": [5, 10]}, "completion_ids", "token id 10 is outside the tokenizer's vocabulary (0..9)"),
        ({"completion_ids": [-1]}, "completion_ids", "token id -1 is outside"),
    ],
)
def test_each_bad_row_is_named(bad, column, message):
    rows = [GOOD, {**GOOD, "id": "b", **bad}]
    (found,) = problems(rows)
    assert found[:2] == (2, column) and message in found[2]


def test_missing_columns_are_reported_once_each_and_raise():
    rows = [{"id": "a", "prompt": "p"}]
    assert [(p[1], p[2].split(" (")[0]) for p in problems(rows)] == [
        ("chosen", "missing column"),
        ("completion_ids", "missing column"),
    ]
    with pytest.raises(DataValidationError, match="r.jsonl:column chosen: missing column"):
        check_response_rows(rows, "r.jsonl", "completion_ids", 10)
