"""Reading datasets from every supported source, and the errors for missing, unreadable or corrupt ones."""

import csv
import json
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_distill.data import DataProblem, DataValidationError, load_dataset_for, load_rows

USER = {"role": "user", "content": "What colour is the sky?"}
SYSTEM = {"role": "system", "content": "Answer briefly."}


def say(text):
    return [{"role": "assistant", "content": text}]


SAMPLES = {
    ("preference", "plain"): [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Grass is", "chosen": " green.", "rejected": " purple."},
    ],
    ("preference", "conversational"): [
        {"prompt": [SYSTEM, USER], "chosen": say("Blue."), "rejected": say("Green.")},
        {"prompt": [USER], "chosen": say("Blue, mostly."), "rejected": say("I will not say.")},
    ],
    ("prompt", "plain"): [{"prompt": "The sky is"}, {"prompt": "Grass is"}],
    ("prompt", "conversational"): [{"prompt": [SYSTEM, USER]}, {"prompt": [USER]}],
    ("ranking", "plain"): [
        {"prompt": "The sky is", "completions": [" green.", " blue.", " loud."], "ranking": [1, 0, 2]},
        {"prompt": "Grass is", "completions": [" green.", " red."], "ranking": [0, 1]},
    ],
    ("ranking", "conversational"): [
        {"prompt": [USER], "completions": [say("Green."), say("Blue."), say("Loud.")], "ranking": [1, 0, 2]},
        {"prompt": [SYSTEM, USER], "completions": [say("Blue."), say("Red.")], "ranking": [0, 1]},
    ],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_source(tmp_path, kind, rows):
    """Write `rows` as `kind` (jsonl, json, parquet, csv, save_to_disk) and return the path as a string."""
    if kind == "jsonl":
        return str(write_jsonl(tmp_path / "data.jsonl", rows))
    if kind == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        path = tmp_path / "data.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:  # lists (conversations, rankings) travel as JSON cells
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def where(source, row, column):
    return f"{source}:row {row}:column {column}:"


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
@pytest.mark.parametrize("form", ["plain", "conversational"])
@pytest.mark.parametrize("format", ["preference", "prompt", "ranking"])
def test_every_format_and_form_loads_from_every_source(tmp_path, kind, form, format):
    rows = SAMPLES[(format, form)]
    source = write_source(tmp_path, kind, rows)
    loaded = load_dataset_for(source, format)
    assert len(loaded) == len(rows)
    for got, expected in zip(loaded, rows):
        for column, value in expected.items():
            assert got[column] == value, (column, got[column], value)
        assert isinstance(got["id"], str) and len(got["id"]) == 16
    assert len(set(loaded["id"])) == len(rows)


def test_ids_are_content_hashes_independent_of_source_and_order(tmp_path):
    rows = SAMPLES[("preference", "plain")]
    first = load_dataset_for(write_source(tmp_path, "jsonl", rows), "preference")["id"]
    reordered = load_dataset_for(write_source(tmp_path, "parquet", rows[::-1]), "preference")["id"]
    assert reordered == first[::-1]


def test_identical_rows_get_suffixed_ids(tmp_path):
    row = SAMPLES[("prompt", "plain")][0]
    ids = load_dataset_for(write_source(tmp_path, "jsonl", [row, row, row]), "prompt")["id"]
    assert ids[1] == ids[0] + "-2" and ids[2] == ids[0] + "-3"


def test_given_ids_are_kept_as_strings(tmp_path):
    rows = [{"id": 7, **SAMPLES[("prompt", "plain")][0]}, {"id": 8, **SAMPLES[("prompt", "plain")][1]}]
    loaded = load_dataset_for(write_source(tmp_path, "parquet", rows), "prompt")
    assert loaded["id"] == ["7", "8"]


def test_implicit_prompt_is_split_from_shared_turns(tmp_path):
    rows = [{"chosen": [USER, *say("Blue.")], "rejected": [USER, *say("Green.")], "source": "web"}]
    loaded = load_dataset_for(write_source(tmp_path, "jsonl", rows), "preference")
    assert loaded[0]["prompt"] == [USER]
    assert loaded[0]["chosen"] == say("Blue.") and loaded[0]["rejected"] == say("Green.")
    assert loaded[0]["source"] == "web"  # extra columns are kept


def test_ranking_is_derived_from_scores_best_first_ties_by_lower_index(tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b", "c", "d"], "scores": [0.5, 2.0, 0.5, -1]}]
    loaded = load_dataset_for(write_source(tmp_path, "jsonl", rows), "ranking")
    assert loaded[0]["ranking"] == [1, 0, 2, 3]
    assert loaded[0]["scores"] == [0.5, 2.0, 0.5, -1.0]


def test_dataset_dict_folder_gives_the_split_and_names_missing_ones(tmp_path):
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(SAMPLES[("prompt", "plain")]),
        test=datasets.Dataset.from_list(SAMPLES[("prompt", "plain")][:1]),
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    assert len(load_rows(str(tmp_path / "splits"), split="test")) == 1
    with pytest.raises(DataValidationError, match="has no split 'validation'; splits: train, test"):
        load_rows(str(tmp_path / "splits"), split="validation")


def test_missing_path_is_named(tmp_path):
    source = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataValidationError) as caught:
        load_rows(source)
    assert caught.value.problems == [DataProblem(source, None, None, "no such file or folder")]
    assert f"{source}: no such file or folder" in str(caught.value)


def test_bad_json_line_names_row_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(SAMPLES[("prompt", "plain")][0])
    path.write_text(f'{good}\n\n{good}\n{{"prompt": "cut off\n{good}\n[1, 2]\n')
    with pytest.raises(DataValidationError) as caught:
        load_rows(str(path))
    message = str(caught.value)
    # a blank line is not a row: line 4 is data row 3; line 6 (row 5) is JSON but not an object
    assert f"{path}:row 3: line 4 is not valid JSON" in message
    assert f"{path}:row 5: line 6 holds a list, expected a JSON object" in message
    assert len(caught.value.problems) == 2


def test_corrupt_json_array_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b"\n]\n')
    with pytest.raises(DataValidationError, match=r"bad\.json: not valid JSON: .* at line 4"):
        load_rows(str(path))


def test_truncated_parquet_is_named(tmp_path):
    source = write_source(tmp_path, "parquet", SAMPLES[("preference", "plain")])
    data = open(source, "rb").read()
    with open(source, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(DataValidationError, match=rf"{source}: not a readable parquet file"):
        load_rows(source)


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\na,b\n")
    with pytest.raises(DataValidationError, match=rf"{path}:row 2: has 2 fields, the header has 3 \(line 3\)"):
        load_rows(str(path))


def test_unsupported_suffix_and_plain_folder(tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataValidationError, match=r"data\.txt: unsupported file type '\.txt'"):
        load_rows(str(tmp_path / "data.txt"))
    with pytest.raises(DataValidationError, match="is not a datasets.save_to_disk folder"):
        load_rows(str(tmp_path))


def test_hub_name_offline_is_a_clear_error_not_a_hang(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataValidationError, match=r"owner/prefs: no such file or folder, .* offline mode"):
        load_rows("owner/prefs")


def test_hub_name_with_unreachable_endpoint_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(DataValidationError, match=r"owner/prefs: .* http://127\.0\.0\.1:9 is unreachable"):
        load_rows("owner/prefs")
    assert time.monotonic() - start < 10


def test_mixed_types_in_a_column_name_the_rows(tmp_path):
    rows = [{"prompt": "a", "extra": 1}, {"prompt": "b", "extra": "two"}, {"prompt": "c", "extra": 3}]
    source = write_source(tmp_path, "jsonl", rows)
    with pytest.raises(DataValidationError) as caught:
        load_rows(source)
    assert str(caught.value.problems[0]).startswith(where(source, 2, "extra") + " holds a string, but row 1")
    assert len(caught.value.problems) == 1


def test_json_file_with_a_train_key_or_json_lines(tmp_path):
    rows = SAMPLES[("prompt", "plain")]
    (tmp_path / "split.json").write_text(json.dumps({"train": rows}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(row) for row in rows))
    assert load_rows(str(tmp_path / "split.json"))["prompt"] == ["The sky is", "Grass is"]
    assert load_rows(str(tmp_path / "lines.json"))["prompt"] == ["The sky is", "Grass is"]
    with pytest.raises(DataValidationError, match="a single file holds one split"):
        load_rows(str(tmp_path / "split.json"), split="test")


# -- encoding errors name the file, the line and the fix -----------------------------------------------------------
def test_invalid_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "The sky is"}).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9"}\n' + good + b"\n")
    with pytest.raises(DataValidationError) as caught:
        load_rows(str(path))
    assert [(p.file, p.row) for p in caught.value.problems] == [(str(path), 2)]
    message = caught.value.problems[0].message
    assert message.startswith("line 2 is not valid UTF-8 at byte 16 of the line (byte 41 of the file)")
    assert "save the file as UTF-8" in message


def test_lone_surrogate_escape_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n\n{"prompt": "half a pair \\ud800 here"}\n')
    with pytest.raises(DataValidationError) as caught:
        load_dataset_for(str(path), "prompt")
    assert [(p.file, p.row, p.column) for p in caught.value.problems] == [(str(path), 2, "prompt")]
    assert caught.value.problems[0].message.startswith(
        "line 3: lone surrogate \\ud800 in a JSON string (half of a UTF-16 pair)"
    )


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_invalid_utf8_in_json_and_csv_names_line(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    content = b'[\n{"prompt": "a"},\n{"prompt": "\xff"}\n]\n' if suffix == ".json" else b"prompt\na\n\xff\n"
    path.write_bytes(content)
    with pytest.raises(DataValidationError, match=r"line 3 is not valid UTF-8 at byte \d+ of the line"):
        load_rows(str(path))


def test_lone_surrogate_in_json_array_is_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"prompt": "a"}, {"prompt": "b \\udfff"}]')
    with pytest.raises(DataValidationError) as caught:
        load_rows(str(path))
    assert [(p.row, p.column) for p in caught.value.problems] == [(2, "prompt")]
    assert "lone surrogate \\udfff" in caught.value.problems[0].message


def test_dataset_config_reaches_the_hub_loader_and_is_refused_for_local_data(tmp_path, monkeypatch):
    """TRL's `dataset_config` is the hub dataset's configuration name: passed to `datasets.load_dataset`; a local
    file has no configurations, so naming one there is a mistake reported against the file."""
    from align_distill.data import loading

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])

    monkeypatch.setattr(loading, "hub_unavailable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("org/name", "train", config="tiny")
    assert calls == [("org/name", "tiny", "train")] and rows.num_rows == 1

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(DataValidationError, match="names a hub dataset's configuration"):
        load_rows(str(path), config="tiny")
