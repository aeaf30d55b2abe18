"""CycleAlign: agreement / target wiring, demonstrations, judge failures, the PRO step, the resumable cycle loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from transformers import TrainerCallback

from align_distill.data_gen import load_store, run_rank
from align_distill.data_gen.backends.base import Completion, Generator
from align_distill.data_gen.judges import LLMJudge
from align_distill.losses import pro_loss
from align_distill.trainers.cyclealign import (
    CycleAlign,
    CycleAlignConfig,
    CycleAlignTrainer,
    cycle_prompts,
    rank_agreement,
)
from align_distill.trainers.cyclealign.judges import (
    DemonstrationPool,
    ICLRanker,
    NoisyOracleJudge,
    agreement_demonstration,
    make_black_box,
)

A, B, C, D = 0, 1, 2, 3
ORACLE = {"kind": "noisy_oracle", "function": "align_distill.synthetic:reward"}


def candidate(i: int, n: int = 4) -> dict:
    prompt = [{"role": "user", "content": f"reverse: a b c {i}"}]
    return {"id": f"p{i}", "prompt": prompt, "completions": list("wxyz")[:n]}


def store_row(i: int, ranking, raw=None, error=None) -> dict:
    return {"id": f"p{i}", "ranking": ranking, "judge_raw": raw or [], "judge_error": error}


# -- agreement and training-target wiring (cyclealign §5, §6, U6) -----------------------------------------------------


def test_rank_agreement_targets_follow_spec_u6():
    candidates = [candidate(0), candidate(1)]
    black = [store_row(0, [A, B, C, D]), store_row(1, [A, B, C, D])]
    white = [store_row(0, [B, A, C, D]), store_row(1, [D, C, B, A])]

    pool = DemonstrationPool([], capacity=10, min_agreement=3)
    rows, metrics = rank_agreement(candidates, black, white, "agreement", pool, cycle=1)
    assert rows[0]["agreement"] == [A, C, D] and rows[0]["target"] == [A, C, D]  # B is not trained on
    assert rows[1]["agreement"] == [A] and rows[1]["target"] == [A]  # n = 1: the loop skips it
    assert rows[0]["kendall_tau"] == pytest.approx(2 / 3) and rows[1]["kendall_tau"] == pytest.approx(-1.0)
    assert metrics["agreement_tau"] == pytest.approx((2 / 3 - 1) / 2)
    assert metrics["agreement_length"] == pytest.approx(2.0)
    # only |α| >= m_min enters the pool: prompt 0, shown without B
    assert len(pool.entries) == 1 and metrics["demonstrations_added"] == 1
    assert pool.entries[0]["completions"] == ["w", "y", "z"] and pool.entries[0]["ranking"] == [0, 1, 2]

    rows, _ = rank_agreement(candidates, black, white, "black_box", DemonstrationPool([]), cycle=1)
    assert [r["target"] for r in rows] == [[A, B, C, D], [A, B, C, D]]  # default: the full black-box ranking
    with pytest.raises(ValueError, match="training target"):
        rank_agreement(candidates, black, white, "white_box", DemonstrationPool([]), cycle=1)


def test_rank_agreement_drops_and_counts_black_box_failures():
    candidates = [candidate(0), candidate(1), candidate(2)]
    black = [
        store_row(0, None, raw=["no idea", "still no"], error="no valid ranking after 2 attempts"),
        store_row(1, [C, A, B, D], raw=["junk", "Ranking: [3] > [1] > [2] > [4]"]),
        store_row(2, [A, B, C, D], raw=["Ranking: [1] > [2] > [3] > [4]"]),
    ]
    white = [store_row(i, [A, B, C, D]) for i in range(3)]
    rows, metrics = rank_agreement(candidates, black, white, "black_box", DemonstrationPool([]), cycle=2)
    assert rows[0]["target"] is None and "no valid ranking" in rows[0]["judge_error"]  # never guessed
    assert rows[1]["target"] == [C, A, B, D]
    assert metrics["black_box_failures"] == 1 and metrics["black_box_failure_rate"] == pytest.approx(1 / 3)
    assert metrics["black_box_retried"] == 2  # rows whose answer needed a second attempt (failed or not)


def test_rank_agreement_logs_ground_truth_reward_of_samples_and_top_choice():
    prompt = [{"role": "user", "content": "reverse: a b c"}]
    row = {"id": "p0", "prompt": prompt, "completions": ["sure, c b a", "fine, c b a", "sure, a a a"]}
    from align_distill.synthetic import reward

    rows, metrics = rank_agreement(
        [row], [store_row(0, [1, 0, 2])], [store_row(0, [0, 1, 2])], "black_box", DemonstrationPool([]), 1, reward
    )
    assert metrics["sample_reward"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert metrics["black_box_top_reward"] == pytest.approx(0.5)  # the black box preferred the blunt answer


# -- demonstrations (cyclealign §3, §6) ------------------------------------------------------------------------------


def test_agreement_demonstration_keeps_listing_order_and_renumbers():
    demo = agreement_demonstration("q", ["r0", "r1", "r2", "r3"], [3, 0, 2])
    assert demo == {"prompt": "q", "completions": ["r0", "r2", "r3"], "ranking": [2, 0, 1]}


def test_demonstration_pool_refresh_fifo_dedup_and_selection():
    static = [{"prompt": "static", "completions": ["a", "b"], "ranking": [1, 0]}]
    pool = DemonstrationPool(static, capacity=3, min_agreement=2)
    assert not pool.add("too short", ["a", "b"], [0], cycle=1)
    for text in ["sort: a b", "reverse: c d", "sort: e f", "reverse: g h"]:
        assert pool.add(text, ["x", "y", "z"], [2, 0], cycle=1)
    assert [e["prompt"] for e in pool.entries] == ["reverse: c d", "sort: e f", "reverse: g h"]  # capacity 3, FIFO
    pool.add("reverse: c d", ["p", "q"], [1, 0], cycle=2)  # a newer entry for a prompt replaces the older
    assert [e["prompt"] for e in pool.entries] == ["sort: e f", "reverse: g h", "reverse: c d"]
    assert pool.entries[-1]["completions"] == ["p", "q"]

    recent = pool.select("sort: q r", k=2)
    assert recent[0] == static[0]  # static demonstrations first, always
    assert [d["prompt"] for d in recent[1:]] == ["reverse: c d", "reverse: g h"]
    similar = pool.select("sort: q r", k=1, selection="similar")
    assert [d["prompt"] for d in similar[1:]] == ["sort: e f"]
    assert all(d["prompt"] != "sort: e f" for d in pool.select("sort: e f", k=3))  # never its own example


def test_demonstration_pool_round_trips(tmp_path):
    pool = DemonstrationPool([], capacity=5, min_agreement=2)
    pool.add("p", ["a", "b", "c"], [1, 2], cycle=1)
    pool.save(tmp_path / "pool.json")
    again = DemonstrationPool.load(tmp_path / "pool.json", [])
    assert again.entries == pool.entries and again.capacity == 5


# -- judges ------------------------------------------------------------------------------------------------------


class ScriptedJudgeModel(Generator):
    """A stand-in LLM: answers garbage when the query's last prompt contains 'garbage', else a fixed ranking.
    Records every query it was sent."""

    tokenizer = None

    def __init__(self, answer: str = "Let me think.\nRanking: [2] > [1] > [3]"):
        self.answer, self.queries = answer, []

    def generate(self, prompts, params, seeds=None):
        self.queries.extend(p[-1]["content"] for p in prompts)
        out = []
        for p in prompts:
            query = p[-1]["content"].split("Now rank these:")[-1]
            text = "I like them all equally!" if "garbage" in query else self.answer
            out.append([Completion(text=text, token_ids=[], finish_reason="stop")] * params.n)
        return out

    def score(self, *args, **kwargs):
        raise NotImplementedError


def test_llm_black_box_garbage_is_retried_then_dropped_and_demonstrations_are_shown(tmp_path):
    rows = [
        {"id": "ok-1", "prompt": [{"role": "user", "content": "reverse: a b c"}], "completions": ["x", "y", "z"]},
        {"id": "bad", "prompt": [{"role": "user", "content": "garbage please"}], "completions": ["x", "y", "z"]},
        {"id": "ok-2", "prompt": [{"role": "user", "content": "sort: c b a"}], "completions": ["u", "v", "w"]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = ScriptedJudgeModel()
    pool = DemonstrationPool([{"prompt": "STATIC-DEMO", "completions": ["s1", "s2"], "ranking": [1, 0]}], 10, 2)
    pool.add("DYNAMIC-DEMO", ["d1", "d2", "d3"], [2, 0], cycle=1)
    ranker = ICLRanker(LLMJudge(model, max_retries=1), pool, k_dynamic=2)
    store = run_rank(
        {
            "input": str(tmp_path / "in.jsonl"),
            "output_dir": str(tmp_path / "rank"),
            "progress": False,
            "judge": {"kind": "callable", "function": "tests:scripted"},
        },  # fmt: skip
        judge=ranker,
    )
    ranked = {r["id"]: r for r in load_store(store).to_list()}
    assert ranked["ok-1"]["ranking"] == [1, 0, 2] and ranked["ok-2"]["ranking"] == [1, 0, 2]
    assert ranked["bad"]["ranking"] is None and len(ranked["bad"]["judge_raw"]) == 2  # asked twice, then dropped
    assert "no valid ranking after 2 attempts" in ranked["bad"]["judge_error"]
    first = model.queries[0]
    assert first.index("STATIC-DEMO") < first.index("DYNAMIC-DEMO") < first.index("Now rank these:")
    assert "Ranking: [2] > [1]" in first  # the dynamic demo's answer line: d3 (new id 2) over d1 (new id 1)

    _, metrics = rank_agreement(
        [{k: r[k] for k in ("id", "prompt", "completions")} for r in rows],
        list(ranked.values()),
        [{"id": r["id"], "ranking": [0, 1, 2]} for r in rows],
        "black_box",
        DemonstrationPool([]),
        cycle=1,
    )
    assert metrics["black_box_failures"] == 1


def test_icl_ranker_shuffle_maps_answers_back_to_candidate_ids():
    model = ScriptedJudgeModel(answer="Ranking: [1] > [2] > [3] > [4]")
    ranker = ICLRanker(LLMJudge(model, max_retries=0), DemonstrationPool([]), shuffle=True, seed=3)
    prompts = [f"prompt {i}" for i in range(6)]
    completions = [[f"c{i}-{j}" for j in range(4)] for i in range(6)]
    verdicts = ranker.judge(prompts, completions, [f"r{i}" for i in range(6)])
    for i, (verdict, query) in enumerate(zip(verdicts, model.queries)):
        shown = [query.index(f"c{i}-{j}") for j in range(4)]
        assert verdict.ranking == sorted(range(4), key=lambda j: shown[j])  # "[1]" = the first candidate shown
    assert any(v.ranking != [0, 1, 2, 3] for v in verdicts)


def test_icl_ranker_drops_dynamic_demonstrations_to_fit_the_prompt_cap():
    static = [{"prompt": "STATIC", "completions": ["s1", "s2"], "ranking": [0, 1]}]
    pool = DemonstrationPool(static, capacity=10, min_agreement=2)
    for k in range(3):
        pool.add(f"DYN{k} " + "x" * 200, ["a", "b"], [1, 0], cycle=1)

    def ask(cap):
        model = ScriptedJudgeModel(answer="Ranking: [1] > [2]")
        ICLRanker(LLMJudge(model, max_retries=0), pool, k_dynamic=3, max_prompt_chars=cap).judge(["q"], [["u", "v"]])
        return model.queries[0]

    full = ask(None)
    assert full.count("DYN") == 3 and "STATIC" in full
    fitted = ask(len(full) - 50)  # one dynamic demonstration too many: the last selected (the oldest) goes
    assert len(fitted) <= len(full) - 50 and "DYN2" in fitted and "DYN1" in fitted and "DYN0" not in fitted
    lengths = {10: (ask(10).count("DYN"), "STATIC" in ask(10))}
    assert lengths[10][:2] == (0, True)  # static demonstrations and the query always stay


def test_noisy_oracle_is_ground_truth_without_noise_and_seeded_with_it():
    prompt = "reverse: a b c"
    responses = ["fine, c b a", "sure, c b a", "sure, a b c", "blah"]
    exact = NoisyOracleJudge("align_distill.synthetic:reward").judge([prompt], [responses], ["r"])[0]
    assert exact.ranking == [1, 0, 2, 3] and exact.scores == [0.5, 1.0, 0.5, 0.0]  # ties keep the lower id

    noisy = NoisyOracleJudge("align_distill.synthetic:reward", noise=1.0, seed=1)
    first = noisy.judge([prompt] * 20, [responses] * 20, [f"r{i}" for i in range(20)])
    again = noisy.judge([prompt] * 20, [responses] * 20, [f"r{i}" for i in range(20)])
    assert [v.ranking for v in first] == [v.ranking for v in again]  # resumable: same verdicts
    assert len({tuple(v.ranking) for v in first}) > 1  # the noise does reorder

    flaky = make_black_box({**ORACLE, "failure_rate": 0.5, "seed": 0})
    verdicts = flaky.judge([prompt] * 200, [responses] * 200, [f"r{i}" for i in range(200)])
    failed = sum(v.ranking is None for v in verdicts)
    assert 70 < failed < 130 and all(v.error for v in verdicts if v.ranking is None)


def test_config_checks_and_black_box_from_json_string(tmp_path):
    config = CycleAlignConfig(output_dir=str(tmp_path), black_box=json.dumps({**ORACLE, "noise": 0.2}))
    assert config.black_box["noise"] == 0.2 and config.training_target == "black_box" and config.sft_weight == 0.05
    assert (config.cycles, config.num_responses, config.dynamic_demonstrations) == (3, 4, 2)  # spec defaults
    with pytest.raises(ValueError, match="training_target"):
        CycleAlignConfig(output_dir=str(tmp_path), training_target="white_box")
    with pytest.raises(ValueError, match="num_responses"):
        CycleAlignConfig(output_dir=str(tmp_path), num_responses=1)


def test_cycle_prompts_are_contiguous_chunks_that_wrap():
    prompts = datasets.Dataset.from_list([{"id": str(i), "prompt": f"p{i}"} for i in range(10)])
    assert [r["id"] for r in cycle_prompts(prompts, 1, 3, None)] == ["0", "1", "2"]
    assert [r["id"] for r in cycle_prompts(prompts, 2, 3, None)] == ["3", "4", "5"]
    assert [r["id"] for r in cycle_prompts(prompts, 3, 3, 4)] == ["8", "9", "0", "1"]


# -- the PRO training step ---------------------------------------------------------------------------------------


def summed_logp(model, tokenizer, prompt, response) -> torch.Tensor:
    from align_distill.data.tokens import encode_prompt_response

    prompt_ids, response_ids = encode_prompt_response(tokenizer, prompt, response)
    ids = torch.tensor([prompt_ids + response_ids])
    logps = model(ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1 :].sum(), len(response_ids)


def test_trainer_loss_is_pro_loss_of_each_ranked_list_and_training_updates(tiny_models, tiny_tokenizer, tmp_path):
    from align_distill.models import load_model

    model = load_model(tiny_models["student"], dtype="float32")
    rows = [
        {"prompt": [{"role": "user", "content": "reverse: a b c"}],
         "completions": ["fine, c b a", "sure, c b a", "sure, a"], "ranking": [1, 0, 2]},
        {"prompt": [{"role": "user", "content": "sort: b a"}],
         "completions": ["sure, a b", "fine, b a", "sure, b a", "x"], "ranking": [0, 2]},  # an agreement list
    ]  # fmt: skip
    args = CycleAlignConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
        logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=False,
    )  # fmt: skip
    trainer = CycleAlignTrainer(model, args, datasets.Dataset.from_list(rows), tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        expected = []
        for row in rows:
            pairs = [summed_logp(model, tiny_tokenizer, row["prompt"], row["completions"][i]) for i in row["ranking"]]
            logps = torch.stack([p[0] for p in pairs])[None]
            lengths = torch.tensor([[p[1] for p in pairs]])
            expected.append(pro_loss(logps, lengths, torch.arange(len(pairs))[None])[0])
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)

    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    logged = [h for h in trainer.state.log_history if "rank_loss" in h]
    assert logged and all(math.isfinite(h["rank_loss"]) and 0 <= h["top1_accuracy"] <= 1 for h in logged)


# -- the cycle loop: end to end, interrupted and resumed ---------------------------------------------------------


class Interrupt(TrainerCallback):
    """Raises once in cycle `cycle` when training reaches `step` (after the checkpoint of step − 1 was saved)."""

    def __init__(self, cycle: int, step: int):
        self.cycle, self.step, self.fired = cycle, step, False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.fired and f"cycle_{self.cycle}" in args.output_dir and state.global_step == self.step:
            self.fired = True
            raise KeyboardInterrupt("simulated crash")


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps: list[tuple[str, int]] = []
        self.logged: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs or {}))

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((Path(args.output_dir).parent.name, state.global_step))


def loop_config(out: Path, **overrides) -> CycleAlignConfig:
    settings = dict(
        output_dir=str(out), cycles=2, prompts_per_cycle=6, num_responses=3, max_completion_length=8,
        per_device_train_batch_size=2, max_steps=3, save_steps=1, learning_rate=1e-3, logging_steps=1,
        report_to="none", gradient_checkpointing=False, disable_tqdm=True, min_agreement=2,
        black_box={**ORACLE, "noise": 0.3, "failure_rate": 0.2},
        reward_function="align_distill.synthetic:reward",
    )  # fmt: skip
    settings.update(overrides)
    return CycleAlignConfig(**settings)


@pytest.mark.slow
def test_cycle_loop_writes_every_cycle_and_resumes_at_the_interrupted_cycle_and_step(tiny_models, tmp_path, capsys):
    from align_distill import synthetic
    from align_distill.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_models["student"])
    prompts = datasets.Dataset.from_list(synthetic.prompt_rows(12, seed=0))
    run = tmp_path / "run"

    def loop(callbacks):
        model = load_model(tiny_models["student"], dtype="float32")
        return CycleAlign(model, tokenizer, loop_config(run), prompts, callbacks=callbacks)

    with pytest.raises(KeyboardInterrupt):
        loop([Interrupt(cycle=2, step=3)]).run()
    assert (run / "cycle_1" / "metrics.json").exists() and not (run / "cycle_2" / "metrics.json").exists()
    assert sorted(p.name for p in (run / "cycle_2" / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    cycle_1_files = {p: p.stat().st_mtime_ns for p in (run / "cycle_1").rglob("*") if p.is_file()}
    samples_2 = {p: p.stat().st_mtime_ns for p in (run / "cycle_2" / "samples" / "data").iterdir()}
    capsys.readouterr()

    recorder = StepRecorder()
    resumed = loop([recorder])
    history = resumed.run()
    printed = capsys.readouterr().out
    assert "cycle 1/2 done, skipped" in printed and "resuming training from" in printed
    assert recorder.steps == [("cycle_2", 3)]  # cycle 1 not retrained; cycle 2 went on from checkpoint-2
    cycle_log = [log for log in recorder.logged if "cyclealign/agreement_tau" in log]  # to the trainer's loggers
    assert len(cycle_log) == 1 and "cyclealign/black_box_failures" in cycle_log[0]
    assert {p: p.stat().st_mtime_ns for p in cycle_1_files} == cycle_1_files  # cycle 1 untouched
    assert {p: p.stat().st_mtime_ns for p in samples_2} == samples_2  # cycle 2's samples not regenerated

    assert [h["cycle"] for h in history] == [1, 2]
    for h in history:
        assert h["prompts"] == 6 and h["training_prompts"] >= 1 and h["train_steps"] == 3
        assert -1 <= h["agreement_tau"] <= 1 and 0 <= h["black_box_failures"] <= 6
        assert "sample_reward" in h and "black_box_top_reward" in h
    for name in ("prompts.jsonl", "candidates.jsonl", "demonstrations.json", "rankings.jsonl", "pool.json"):
        assert (run / "cycle_2" / name).exists()
    rankings = [json.loads(x) for x in (run / "cycle_2" / "rankings.jsonl").read_text().splitlines()]
    failed = [r for r in rankings if r["black_box"] is None]
    assert len(failed) == history[1]["black_box_failures"] and all(r["target"] is None for r in failed)
    for r in rankings:
        if r["black_box"] is not None:
            assert r["target"] == r["black_box"] and len(r["completions"]) == 3
            assert sorted(r["white_box"]) == [0, 1, 2]
    # the dynamic demonstrations of cycle 2 are the agreement rankings of cycle 1
    pool_1 = json.loads((run / "cycle_1" / "pool.json").read_text())["entries"]
    assert json.loads((run / "cycle_2" / "demonstrations.json").read_text())["entries"] == pool_1
    assert json.loads((run / "cycle_metrics.json").read_text()) == history
    state = json.loads((run / "cycle_2" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert any("rank_loss" in h and "top1_accuracy" in h for h in state["log_history"])
    # the final white box is cycle 2's model
    final = load_model(run / "cycle_2" / "model", dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(final.parameters(), resumed.model.parameters()))

    with pytest.raises(ValueError, match="another CycleAlign run"):  # a rerun with other settings refuses the folder
        CycleAlign(str(tiny_models["student"]), tokenizer, loop_config(run, cycles=3), prompts)._check_run()


@pytest.mark.slow
def test_cli_trains_one_cycle_from_the_yaml_recipe(tiny_models, tmp_path):
    from align_distill import synthetic
    from align_distill.cli import main

    data = tmp_path / "pairs.jsonl"
    pairs = synthetic.preference_rows(4, seed=5)
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = tmp_path / "out"
    overrides = {
        "model_name_or_path": tiny_models["student"], "dataset_name": data, "output_dir": out, "cycles": 1,
        "prompts_per_cycle": 4, "num_responses": 2, "max_completion_length": 6, "max_steps": 1, "save_strategy": "no",
        "disable_tqdm": "true", "training_target": "agreement", "dataset_responses": "true",
    }  # fmt: skip
    argv = ["train", "cyclealign", "--config", "align_distill/configs/cyclealign/quickstart.yaml"]
    argv += [part for key, value in overrides.items() for part in (f"--{key}", str(value))]
    argv += ["--black_box", json.dumps({**ORACLE, "noise": 0.0})]  # a JSON override of the YAML mapping
    assert main(argv) == 0
    [metrics] = json.loads((out / "cycle_metrics.json").read_text())
    assert metrics["prompts"] == 4 and metrics["black_box_failures"] == 0  # noise-free, no failure rate
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()  # the final white box
    rows = {r["id"]: r for r in map(json.loads, (out / "cycle_1" / "rankings.jsonl").read_text().splitlines())}
    for pair in pairs:  # the data's own responses are ranked next to the (up to 2) samples
        row = rows[pair["id"]]
        assert row["target"] == row["agreement"]
        assert pair["chosen"] in row["completions"] and pair["rejected"] in row["completions"]
        assert len(row["completions"]) <= 4


@pytest.mark.slow
def test_cli_lora_trains_only_the_adapter_samples_with_it_and_saves_it(tiny_models, tmp_path, monkeypatch):
    """`use_peft` through the CLI: each cycle trains a LoRA adapter on the frozen student, cycle 2 samples and ranks
    with cycle 1's adapter applied (not the bare base model), and the run folder holds an adapter that loads."""
    import yaml
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import Trainer

    from align_distill import synthetic
    from align_distill.cli import main
    from align_distill.data_gen.backends.transformers_backend import TransformersGenerator
    from align_distill.data_gen.judges import LikelihoodJudge
    from align_distill.models import load_model

    trainers = []
    original_train = Trainer.train

    def train(self, *args, **kwargs):
        trainers.append(self)
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic.prompt_rows(8, seed=6)))
    out = tmp_path / "out"
    recipe = tmp_path / "cyclealign_lora.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"model_name_or_path": str(tiny_models["student"]), "dataset_name": str(data), "output_dir": str(out),
             "cycles": 2, "prompts_per_cycle": 4, "num_responses": 3, "max_completion_length": 8, "max_steps": 3,
             "per_device_train_batch_size": 2, "learning_rate": 5e-2, "save_strategy": "no", "logging_steps": 1,
             "report_to": "none", "disable_tqdm": True, "gradient_checkpointing": False, "min_agreement": 2,
             "black_box": {**ORACLE, "noise": 0.3}, "use_peft": True, "lora_r": 4, "lora_alpha": 8,
             "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj"]}
        )
    )  # fmt: skip
    assert main(["train", "cyclealign", "--config", str(recipe)]) == 0

    base = dict(load_model(tiny_models["student"], dtype="float32").named_parameters())
    assert len(trainers) == 2
    for trainer in trainers:  # only the adapter trained; the base weights are the student's, bit for bit
        model = trainer.model
        assert isinstance(model, PeftModel)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in name for name in trainable)
        for name, param in model.named_parameters():
            if "lora_" not in name:
                plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
                assert torch.equal(param, base[plain]), name
        assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # initialised at 0

    # cycle 2 ranked with cycle 1's adapter applied: its white-box scores are the adapter model's, not the base's
    def scores(model) -> list[float]:
        generator = TransformersGenerator(model, trainers[0].processing_class)
        return LikelihoodJudge(generator).score([row["prompt"]] * len(row["completions"]), row["completions"])

    row = load_store(out / "cycle_2" / "white_box")[0]
    adapted = PeftModel.from_pretrained(load_model(tiny_models["student"], dtype="float32"), out / "cycle_1" / "model")
    with_adapter = scores(adapted.merge_and_unload())
    without = scores(load_model(tiny_models["student"], dtype="float32"))
    assert row["scores"] == pytest.approx(with_adapter, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(with_adapter, without)) > 1e-3

    # the run folder holds the final adapter (no full weights), equal to cycle 2's, and it loads onto the student
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)
    loaded = PeftModel.from_pretrained(load_model(tiny_models["student"], dtype="float32"), out)
    final = {n: p for n, p in trainers[-1].model.named_parameters() if "lora_" in n}
    loaded_lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert loaded_lora.keys() == final.keys()
    for name, param in final.items():
        torch.testing.assert_close(loaded_lora[name], param.detach(), msg=name)

    # a rerun resumes the adapter run (same LoRA settings in the run's identity): both cycles done, nothing trains
    assert main(["train", "cyclealign", "--config", str(recipe)]) == 0 and len(trainers) == 2
