"""`run_evaluation` end to end against a scripted local OpenAI-compatible server (127.0.0.1 only) that serves both
the evaluated models (fixed answers) and the judge (fixed verdicts), so every win-rate is known in advance; then
checkers, a reward model, bad inputs and resumption, and ONE run with the real `vllm serve` as the judge."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from align_distill.evaluation import EvaluationError, run_evaluation
from align_distill.models.loading import ModelNotFoundError
from tests.data_gen.backends.test_openai_backend import FakeServer

PROMPTS = ["What is 1 + 1?", "Name a colour.", "Say hi.", "Spell cat."]
# the candidate's answers: polite ("sure, ...") on the first three prompts, the baseline's own answer on the fourth
CANDIDATE = {p: (f"sure, answer to {p}" if i < 3 else "plain answer") for i, p in enumerate(PROMPTS)}
BLOCK = re.compile(r"<response (\d)>\n(.*?)\n</response \1>", re.S)


def _reply(text: str) -> tuple[int, dict, dict, float]:
    choice = {
        "index": 0,
        "finish_reason": "stop",
        "token_ids": [5, 6],
        "message": {"role": "assistant", "content": text},
    }
    return 200, {"choices": [choice]}, {}, 0.0


class Scripted(FakeServer):
    """Models `candidate` and `baseline` answer from fixed tables; model `judge` ranks by `self.verdict`."""

    def __init__(self) -> None:
        super().__init__()
        self.verdict = "polite"  # polite: prefer the answer starting with "sure" (position 1 on a tie); first; garbage
        self.generated: list[str] = []
        self.default = self.answer

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict, dict, float]:
        content = body["messages"][-1]["content"]
        if body["model"] != "judge":
            self.generated.append(body["model"])
            return _reply(CANDIDATE[content] if body["model"] == "candidate" else "plain answer")
        if self.verdict == "garbage":
            return _reply("Both answers are lovely.")
        if self.verdict == "first":
            return _reply("Ranking: [1] > [2]")
        blocks = dict(BLOCK.findall(content))
        second_better = blocks["2"].startswith("sure") and not blocks["1"].startswith("sure")
        return _reply("Reasoning.\nRanking: [2] > [1]" if second_better else "Ranking: [1] > [2]")


@pytest.fixture
def server():
    fake = Scripted()
    yield fake
    fake.close()


def served(server: Scripted, name: str, tokenizer: Path) -> dict[str, Any]:
    kwargs = {"base_url": server.url, "max_retries": 0, "timeout": 10.0}
    return {"model": name, "backend": "openai", "tokenizer": str(tokenizer), "backend_kwargs": kwargs}


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS))
    return path


def config(server: Scripted, prompts: Path, out: Path, tokenizer: Path, **extra: Any) -> dict[str, Any]:
    return {
        "prompts": str(prompts),
        "output_dir": str(out),
        "models": {
            "baseline": served(server, "baseline", tokenizer),
            "candidate": served(server, "candidate", tokenizer),
        },
        "baseline": "baseline",
        "generation": {"progress": False, "max_completion_length": 8},
        "pairwise_judge": {**served(server, "judge", tokenizer), "kind": "llm", "max_retries": 0},
        "bootstrap_resamples": 500,
        **extra,
    }


def test_a_scripted_judge_gives_the_known_win_rate(server, prompts, tmp_path, tiny_models):
    """3 polite answers win in both orders; the fourth is the baseline's own answer, so the judge's choice follows
    the position and the two orders disagree: a tie. Win-rate = (3 + 0.5) / 4."""
    results = run_evaluation(config(server, prompts, tmp_path / "out", tiny_models["tokenizer"]))
    judge = results["models"]["candidate"]["judge"]
    assert (judge["wins"], judge["ties"], judge["losses"], judge["unparsable"]) == (3, 1, 0, 0)
    assert judge["win_rate"]["mean"] == pytest.approx(3.5 / 4)
    assert judge["win_rate"]["low"] <= 3.5 / 4 <= judge["win_rate"]["high"]
    rows = {r["prompt"][0]["content"]: r for r in results["rows"]}
    assert rows["Spell cat."]["judge"]["candidate"]["preference"] == 0.5
    eval_json = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert eval_json["candidate"]["win_rate"] == pytest.approx(0.875) and eval_json["candidate"]["n"] == 4
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| candidate | 0.875 [" in report and "3 / 1 / 0" in report
    assert (tmp_path / "out" / "win_rate.png").read_bytes()[:4] == b"\x89PNG"


def test_order_swapping_cancels_a_judge_that_always_prefers_position_one(server, prompts, tmp_path, tiny_models):
    server.verdict = "first"
    results = run_evaluation(config(server, prompts, tmp_path / "out", tiny_models["tokenizer"]))
    judge = results["models"]["candidate"]["judge"]
    assert judge["ties"] == 4 and judge["win_rate"]["mean"] == 0.5
    assert judge["lc_win_rate"]["win_rate"] == pytest.approx(0.5, abs=1e-6)


def test_a_garbage_judge_is_a_clear_error_and_a_fixed_rerun_reuses_the_answers(server, prompts, tmp_path, tiny_models):
    server.verdict = "garbage"
    settings = config(server, prompts, tmp_path / "out", tiny_models["tokenizer"])
    with pytest.raises(EvaluationError, match=r"none of the 4 verdicts .*Ranking: \[i\] > \[j\]"):
        run_evaluation(settings)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["models"]["candidate"]["judge"]["unparsable"] == 4  # counted and reported
    assert sorted(server.generated) == ["baseline"] * 4 + ["candidate"] * 4
    server.verdict = "polite"
    settings["pairwise_judge"]["instruction"] = "Rank the two answers. End with: Ranking: [i] > [j]"  # a new judge
    results = run_evaluation(settings)
    assert results["models"]["candidate"]["judge"]["win_rate"]["mean"] == pytest.approx(0.875)
    assert len(server.generated) == 8  # no model answered again


def test_a_missing_model_names_itself_and_keeps_the_finished_answers(server, prompts, tmp_path, tiny_models):
    settings = config(server, prompts, tmp_path / "out", tiny_models["tokenizer"])
    settings["models"]["student"] = {"model": str(tmp_path / "no_such_model")}
    with pytest.raises(EvaluationError, match=r"models\.student .*no_such_model.* kept .*a rerun resumes") as caught:
        run_evaluation(settings)
    assert isinstance(caught.value.__cause__, ModelNotFoundError)
    assert len(server.generated) == 8
    del settings["models"]["student"]
    run_evaluation(settings)
    assert len(server.generated) == 8  # both stores were complete: nothing generated twice


def test_an_unreachable_judge_is_one_clear_error(server, prompts, tmp_path, tiny_models):
    settings = config(server, prompts, tmp_path / "out", tiny_models["tokenizer"])
    settings["pairwise_judge"]["backend_kwargs"]["base_url"] = "http://127.0.0.1:9/v1"  # nothing listens there
    with pytest.raises(EvaluationError, match=r"^pairwise_judge: cannot reach the OpenAI-compatible server at"):
        run_evaluation(settings)
    assert sorted(server.generated) == ["baseline"] * 4 + ["candidate"] * 4  # the answers are kept for the rerun


def test_checkers_take_the_row_and_differences_are_paired_by_prompt(server, prompts, tmp_path, tiny_models):
    checker = tmp_path / "checks.py"
    checker.write_text(
        "def polite(prompt, response):\n    return float(response.startswith('sure'))\n\n"
        "def echo(prompt, response, row):\n"
        "    return {'mentions_prompt': float(row['prompt'][0]['content'] in response)}\n"
    )
    settings = config(server, prompts, tmp_path / "out", tiny_models["tokenizer"])
    del settings["pairwise_judge"]
    settings["checkers"] = {"polite": f"{checker}:polite", "echo": f"{checker}:echo"}
    results = run_evaluation(settings)
    candidate = results["models"]["candidate"]
    assert candidate["metrics"]["polite"]["mean"] == 0.75 and candidate["metrics"]["mentions_prompt"]["mean"] == 0.75
    assert results["models"]["baseline"]["metrics"]["polite"]["mean"] == 0.0
    difference = candidate["versus_baseline"]["polite"]
    assert difference["mean"] == 0.75 and difference["positive"] == 3 and difference["seeds"] == 4
    assert (tmp_path / "out" / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_a_reward_model_scores_every_answer(server, prompts, tmp_path, tiny_models):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    reward_dir = tmp_path / "reward"
    model_config = AutoConfig.from_pretrained(tiny_models["student"], num_labels=1)
    AutoModelForSequenceClassification.from_config(model_config).save_pretrained(reward_dir)
    for name in Path(tiny_models["student"]).glob("tokenizer*"):
        (reward_dir / name.name).write_bytes(name.read_bytes())
    settings = config(server, prompts, tmp_path / "out", tiny_models["tokenizer"])
    del settings["pairwise_judge"]
    settings["reward_model"] = {"model": str(reward_dir), "dtype": "float32", "device": "cpu"}
    results = run_evaluation(settings)
    scores = [r["scores"]["candidate"]["reward_model"] for r in results["rows"]]
    assert len(scores) == 4 and len(set(scores)) > 1  # the answers differ, so do their scores
    assert results["models"]["candidate"]["metrics"]["reward_model"]["mean"] == pytest.approx(sum(scores) / 4)
    baseline = {r["scores"]["baseline"]["reward_model"] for r in results["rows"]}
    cached = json.loads((tmp_path / "out" / "scores" / "reward_model" / "baseline.json").read_text())
    assert set(cached["scores"].values()) == baseline


@pytest.mark.vllm
@pytest.mark.slow
def test_the_real_vllm_server_as_judge(vllm_server, prompts, tmp_path, tiny_models):
    """`vllm serve` on the tiny (random) teacher judges: its answers go through the strict parser, so each prompt is
    a readable verdict or counted as unparsable, never guessed; raw answers are kept in the rank store."""
    settings = {
        "prompts": str(prompts),
        "output_dir": str(tmp_path / "out"),
        "models": {"teacher": str(tiny_models["teacher"]), "student": str(tiny_models["student"])},
        "baseline": "teacher",
        "generation": {"progress": False, "max_completion_length": 6},
        "pairwise_judge": {
            "kind": "llm",
            "backend": "openai",
            "model": vllm_server.model,
            "backend_kwargs": {"base_url": vllm_server.base_url, "api_key_env": vllm_server.api_key_env},
            "instruction": "Rank. Last line: Ranking: [1] > [2]",
            "max_completion_length": 12,
            "max_retries": 0,
        },
        "bootstrap_resamples": 200,
    }
    try:
        results = run_evaluation(settings)
    except EvaluationError as error:  # the random judge never wrote a valid line: reported, answers kept
        assert "none of the 4 verdicts" in str(error)
        results = json.loads((tmp_path / "out" / "results.json").read_text())
    judge = results["models"]["student"]["judge"]
    assert judge["judged"] + judge["unparsable"] == 4
    from align_distill.data_gen import load_store

    raw = load_store(tmp_path / "out" / "judgements" / "student_vs_teacher").to_list()
    assert len(raw) == 8 and all(r["judge_raw"] for r in raw)  # both orders of every prompt, answers kept
