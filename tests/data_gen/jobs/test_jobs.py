"""The sample / rollout / rank / pairs jobs, their configs and the `generate` command."""

from __future__ import annotations

import json

import pytest

from align_distill.data import DataValidationError, validate
from align_distill.data.tokens import encode_prompt
from align_distill.data_gen import FingerprintMismatch, load_store, run_job
from align_distill.data_gen.backends import SamplingParams, make_generator
from align_distill.data_gen.command import main
from align_distill.data_gen.config import ConfigError, load_config, parse_overrides
from align_distill.data_gen.jobs import preference_pairs
from align_distill.synthetic import preference_rows, prompt_rows, respond


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture()
def prompts_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(7, 1))


def sample_config(prompts_file, tiny_models, out, **extra) -> dict:
    return {
        "input": prompts_file,
        "output_dir": str(out),
        "model": str(tiny_models["teacher"]),
        "max_completion_length": 6,
        "progress": False,
        **extra,
    }


def test_sample_writes_trl_prompt_completion_rows_with_exact_ids(prompts_file, tiny_models, tmp_path):
    out = run_job("sample", sample_config(prompts_file, tiny_models, tmp_path / "s", temperature=0.0, shard_size=3))
    rows = load_store(out).to_list()
    assert [r["id"] for r in rows] == [f"prompt-1-{i}" for i in range(7)]
    assert validate(rows, "completion").ok  # TRL's conversational prompt-completion format
    generator = make_generator("transformers", str(tiny_models["teacher"]))
    direct = generator.generate([r["prompt"] for r in rows], SamplingParams(max_new_tokens=6))
    for row, (completion,) in zip(rows, direct):
        assert row["prompt_ids"] == encode_prompt(generator.tokenizer, row["prompt"])
        assert row["completion_ids"] == completion.token_ids
        assert row["completion"] == [{"role": "assistant", "content": completion.text}]
        assert row["finish_reason"] == completion.finish_reason


def test_samples_do_not_depend_on_sharding_or_parts(prompts_file, tiny_models, tmp_path):
    settings = {"n": 2, "temperature": 1.0, "seed": 5}
    one = load_store(
        run_job("sample", sample_config(prompts_file, tiny_models, tmp_path / "a", shard_size=7, **settings))
    )
    for part in (1, 0):
        run_job(
            "sample",
            sample_config(prompts_file, tiny_models, tmp_path / "b", shard_size=2, part=part, num_parts=2, **settings),
        )
    two = load_store(tmp_path / "b")
    assert one.to_list() == two.to_list()
    assert len(one[0]["completions_ids"]) == 2 and one[0]["completion_ids"] == one[0]["completions_ids"][0]


def test_rerun_is_a_no_op_and_other_settings_are_refused(prompts_file, tiny_models, tmp_path):
    config = sample_config(prompts_file, tiny_models, tmp_path / "s", temperature=0.0)
    out = run_job("sample", config)
    manifest = (out / "manifest.json").read_text()
    run_job("sample", config)
    assert (out / "manifest.json").read_text() == manifest
    with pytest.raises(FingerprintMismatch, match="max_new_tokens: stored 6, now 7"):
        run_job("sample", {**config, "max_completion_length": 7})
    run_job("sample", {**config, "max_completion_length": 7, "overwrite": True})
    assert json.loads((out / "manifest.json").read_text())["fingerprint"]["sampling"]["max_new_tokens"] == 7


def test_rollout_is_greedy_and_keeps_preference_columns(tiny_models, tmp_path):
    source = write_jsonl(tmp_path / "pref.jsonl", preference_rows(3, 2))
    out = run_job(
        "rollout",
        {
            "input": source,
            "output_dir": str(tmp_path / "r"),
            "model": str(tiny_models["student"]),
            "max_completion_length": 5,
            "progress": False,
        },
    )
    rows = load_store(out).to_list()
    assert load_config("rollout", None, {"input": "x", "output_dir": "y", "model": "m"}).temperature == 0.0
    assert [r["chosen"] for r in rows] == [r["chosen"] for r in preference_rows(3, 2)]
    assert all(r["completion_ids"] and r["prompt_ids"] for r in rows)


def ranking_rows() -> list[dict]:
    rows = []
    for i, row in enumerate(prompt_rows(4, 9)):
        text = row["prompt"][0]["content"]
        rows.append(
            {
                "id": f"q{i}",
                "prompt": row["prompt"],
                "completions": [
                    [{"role": "assistant", "content": respond(text, polite=False, correct=False)}],
                    [{"role": "assistant", "content": respond(text, polite=True)}],
                    [{"role": "assistant", "content": respond(text, polite=False)}],
                ],
            }
        )
    return rows


def test_rank_with_the_synthetic_ground_truth(tmp_path):
    source = write_jsonl(tmp_path / "cands.jsonl", ranking_rows())
    out = run_job(
        "rank",
        {
            "input": source,
            "output_dir": str(tmp_path / "rank"),
            "progress": False,
            "judge": {"kind": "callable", "function": "align_distill.synthetic:reward"},
        },
    )
    rows = load_store(out).to_list()
    assert [r["scores"] for r in rows] == [[0.0, 1.0, 0.5]] * 4
    assert [r["ranking"] for r in rows] == [[1, 2, 0]] * 4
    assert all(r["judge_error"] is None for r in rows)
    assert validate(rows, "ranking").ok


def test_pairs_modes_and_margins(tmp_path):
    assert preference_pairs([1, 2, 0], None, "best_vs_worst") == [(1, 0)]
    assert preference_pairs([1, 2, 0], None, "all_pairs") == [(1, 2), (1, 0), (2, 0)]
    assert preference_pairs([1, 2, 0], [0.0, 1.0, 0.5], "all_pairs", min_margin=0.6) == [(1, 0)]
    assert preference_pairs([0, 1], [1.0, 1.0], "best_vs_worst") == []  # equal scores: no preference
    with pytest.raises(ValueError, match="needs scores"):
        preference_pairs([0, 1], None, min_margin=0.5)

    rows = ranking_rows()
    for row in rows:
        row.update(ranking=[1, 2, 0], scores=[0.0, 1.0, 0.5])
    rows[1].update(ranking=None, scores=None, judge_error="no valid ranking")  # a failed judgement is skipped
    source = write_jsonl(tmp_path / "ranked.jsonl", rows)
    common = {"input": source, "progress": False}
    best = load_store(run_job("pairs", {**common, "output_dir": str(tmp_path / "p1")})).to_list()
    assert [r["id"] for r in best] == ["q0:1>0", "q2:1>0", "q3:1>0"]
    assert best[0]["chosen"] == rows[0]["completions"][1] and best[0]["rejected"] == rows[0]["completions"][0]
    assert validate(best, "preference").ok
    every = load_store(
        run_job("pairs", {**common, "output_dir": str(tmp_path / "p2"), "mode": "all_pairs", "shard_size": 2})
    ).to_list()
    assert [r["id"] for r in every][:3] == ["q0:1>2", "q0:1>0", "q0:2>0"] and len(every) == 9
    assert [r["margin"] for r in every][:3] == [0.5, 1.0, 0.5]
    margin = load_store(
        run_job("pairs", {**common, "output_dir": str(tmp_path / "p3"), "mode": "all_pairs", "min_margin": 0.75})
    ).to_list()
    assert [r["id"] for r in margin] == ["q0:1>0", "q2:1>0", "q3:1>0"]


def test_pairs_skip_and_count_identical_chosen_and_rejected(tmp_path, caplog):
    rows = ranking_rows()
    for row in rows:
        row["ranking"] = [1, 2, 0]
    rows[0]["completions"][2] = rows[0]["completions"][0]  # two samples came out the same, no scores
    rows[3]["completions"][1] = rows[3]["completions"][2] = rows[3]["completions"][0]  # all three the same
    source = write_jsonl(tmp_path / "ranked.jsonl", rows)
    with caplog.at_level("WARNING", logger="align_distill.data_gen"):
        pairs = load_store(
            run_job(
                "pairs", {"input": source, "output_dir": str(tmp_path / "p"), "mode": "all_pairs", "progress": False}
            )
        ).to_list()
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert [p["id"] for p in pairs if p["id"].startswith(("q0:", "q3:"))] == ["q0:1>2", "q0:1>0"]
    assert [p["pair_index"] for p in pairs if p["id"].startswith("q0:")] == [0, 1]
    assert len(pairs) == 2 + 3 + 3 + 0
    assert "skipped 4 pairs whose chosen and rejected responses are identical" in caplog.text
    assert validate(pairs, "preference").ok


def test_malformed_inputs_are_named(tmp_path, tiny_models):
    model = str(tiny_models["student"])
    missing = write_jsonl(tmp_path / "noprompt.jsonl", [{"id": "a", "question": "hi"}])
    with pytest.raises(DataValidationError, match=r"noprompt\.jsonl:column prompt: missing column"):
        run_job("sample", {"input": missing, "output_dir": str(tmp_path / "o1"), "model": model})
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "fine"}, {"prompt": ""}])
    with pytest.raises(DataValidationError, match=r"empty\.jsonl:row 2:column prompt"):
        run_job("sample", {"input": empty, "output_dir": str(tmp_path / "o2"), "model": model})
    with pytest.raises(ConfigError, match="identical greedy copies"):
        run_job(
            "sample", {"input": empty, "output_dir": str(tmp_path / "o3"), "model": model, "n": 2, "temperature": 0.0}
        )
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        run_job("sample", {"input": empty, "output_dir": str(tmp_path / "o3"), "model": model, "top_p": 0})
    with pytest.raises(ConfigError, match=r"unknown key `temprature` for sample \(did you mean `temperature`\?\)"):
        run_job("sample", {"input": empty, "output_dir": "o", "model": model, "temprature": 1})
    with pytest.raises(ConfigError, match=r"sample config: `n`: expected an integer, found str 'two'"):
        run_job("sample", {"input": empty, "output_dir": "o", "model": model, "n": "two"})
    with pytest.raises(ConfigError, match="`model` is required"):
        run_job("sample", {"input": empty, "output_dir": "o"})
    no_list = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "completions": ["only one"]}])
    with pytest.raises(DataValidationError, match=r"one\.jsonl:row 1:column completions"):
        run_job(
            "rank",
            {
                "input": no_list,
                "output_dir": str(tmp_path / "o4"),
                "judge": {"kind": "callable", "function": "align_distill.synthetic:reward"},
            },
        )
    with pytest.raises(ConfigError, match="gather_at='ref' must name an earlier teacher"):
        load_config(
            "signals",
            None,
            {
                "input": "x",
                "output_dir": "y",
                "teachers": [{"name": "dpo", "model": model, "gather_at": "ref"}, {"name": "ref", "model": model}],
            },
        )


def test_overrides_parse_as_yaml_and_nest():
    assert parse_overrides(
        ["--n", "4", "--stop", "[a, b]", "--overwrite", "--judge.kind=llm", "--teachers.0.model", "m"]
    ) == {"n": 4, "stop": ["a", "b"], "overwrite": True, "judge": {"kind": "llm"}, "teachers": {"0": {"model": "m"}}}


def test_generate_command(tmp_path, prompts_file, tiny_models, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: {prompts_file}\noutput_dir: {tmp_path / 'out'}\nmodel: {tiny_models['student']}\n"
        "max_completion_length: 4\nprogress: false\n"
    )
    assert main(["sample", "--config", str(config), "--n", "2", "--temperature", "0.8"]) == 0
    rows = load_store(tmp_path / "out")
    assert len(rows) == 7 and len(rows[0]["completions"]) == 2
    assert main(["sample", "--config", str(config), "--n", "3", "--temperature", "0.8"]) == 1
    assert "different sample job" in capsys.readouterr().err
    assert main(["sample", "--config", str(config), "--n", "3", "--temperature", "0.8", "--overwrite"]) == 0
    assert main(["sample", "--help"]) == 0 and "max_completion_length (int, default 256)" in capsys.readouterr().out
    assert main(["sampel"]) == 2
    assert main(["sample", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml`: no such file" in capsys.readouterr().err
    code = main(
        [
            "sample",
            "--config",
            str(config),
            "--backend",
            "openai",
            "--backend_kwargs",
            "{base_url: 'http://127.0.0.1:9/v1'}",
            "--output_dir",
            str(tmp_path / "o2"),
        ]
    )
    assert (
        code == 2 and "cannot reach the OpenAI-compatible server at http://127.0.0.1:9/v1" in capsys.readouterr().err
    )


def test_progress_bar_defers_to_tqdm_off_a_terminal_and_lock_kind_is_a_job_key():
    """`progress: true` (the default) leaves the decision to tqdm, which turns the bar off when its output is not a
    terminal; `progress: false` or nothing to do turns it off. `lock_kind` is a job key."""
    from align_distill.data_gen.config import SampleConfig, build_config
    from align_distill.data_gen.jobs.runner import progress_disabled

    assert progress_disabled(True, [1]) is None
    assert progress_disabled(False, [1]) is True and progress_disabled(True, []) is True
    config = build_config(SampleConfig, {"input": "x", "output_dir": "y", "model": "m", "lock_kind": "soft"}, "job")
    assert config.lock_kind == "soft"


def test_runner_prepares_one_shard_ahead_and_a_failed_prepare_commits_nothing_after(tmp_path):
    """`run_store_job(prepare=...)` (the signals job's tokenization): `process` gets each shard's prepared rows in
    input order; a `prepare` that fails on shard 3 stops the job after shards 1-2 are committed, and the rerun
    resumes at shard 3 exactly once."""
    import datasets

    from align_distill.data_gen.config import JobConfig
    from align_distill.data_gen.jobs.runner import run_store_job

    inputs = datasets.Dataset.from_list([{"id": f"r{i}", "x": i} for i in range(10)])
    config = JobConfig(input="memory", output_dir=str(tmp_path / "store"), shard_size=3, progress=False)
    seen: list[list[int]] = []
    fail_at = {6}

    def prepare(positions, rows):
        if fail_at & set(positions):
            raise ValueError(f"bad row {sorted(fail_at & set(positions))}")
        return [{**row, "doubled": 2 * row["x"]} for row in rows]

    def process(positions, prepared):
        seen.append(positions)
        return [{"id": r["id"], "input_index": p, "y": r["doubled"]} for p, r in zip(positions, prepared)]

    with pytest.raises(ValueError, match=r"bad row \[6\]"):
        run_store_job("test", config, inputs, {}, process, prepare=prepare)
    assert seen == [[0, 1, 2], [3, 4, 5]]
    fail_at.clear()
    run_store_job("test", config, inputs, {}, process, prepare=prepare)
    assert seen[2:] == [[6, 7, 8], [9]]
    stored = load_store(tmp_path / "store")
    assert sorted(stored["input_index"]) == list(range(10)) and stored["y"] == [2 * i for i in stored["input_index"]]
