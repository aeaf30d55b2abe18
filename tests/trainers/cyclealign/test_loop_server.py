"""CycleAlign with its black box behind a real OpenAI-compatible server (`vllm serve` on the tiny teacher).

The random tiny teacher cannot rank, so almost every answer is garbage: this exercises the HTTP path and the failure
path end to end — each unparsable answer is asked again once, then the prompt is dropped for the cycle and counted,
never guessed. The judge prompt is kept short (no static demonstrations, a one-line instruction) because the
server's context is 256 tokens and the tiny byte-level tokenizer spends about one token per English character.
"""

from __future__ import annotations

import json

import datasets
import pytest

from align_distill.data_gen.judges import parse_ranking
from align_distill.trainers.cyclealign import CycleAlign, CycleAlignConfig

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

INSTRUCTION = "Rank. Last line: Ranking: [1] > [2]"


def test_one_cycle_with_the_judge_behind_vllm_serve(vllm_server, tiny_models, tmp_path):
    from align_distill import synthetic
    from align_distill.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_models["student"])
    prompts = datasets.Dataset.from_list(synthetic.prompt_rows(4, seed=3))
    black_box = {
        "kind": "llm",
        "backend": "openai",
        "model": vllm_server.model,
        "backend_kwargs": {"base_url": vllm_server.base_url, "api_key_env": vllm_server.api_key_env},
        "instruction": INSTRUCTION,
        "max_completion_length": 16,
        "max_retries": 1,
    }
    args = CycleAlignConfig(
        output_dir=str(tmp_path / "run"), cycles=1, num_responses=2, max_completion_length=6,
        static_demonstrations="none", black_box=black_box, per_device_train_batch_size=2, max_steps=1,
        report_to="none", save_strategy="no", gradient_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    model = load_model(tiny_models["student"], dtype="float32")
    [metrics] = CycleAlign(model, tokenizer, args, prompts).run()

    rows = [json.loads(x) for x in (tmp_path / "run" / "cycle_1" / "rankings.jsonl").read_text().splitlines()]
    from align_distill.data_gen import load_store

    judged = {r["id"]: r for r in load_store(tmp_path / "run" / "cycle_1" / "black_box").to_list()}
    assert len(rows) == 4 - metrics["dropped_too_few_distinct"] and rows
    for row in rows:
        verdict = judged[row["id"]]
        assert verdict["judge_raw"] and all(isinstance(a, str) for a in verdict["judge_raw"])  # answers came back
        if row["black_box"] is None:  # garbage: asked twice, then dropped and not trained on
            assert len(verdict["judge_raw"]) == 2 and "no valid ranking" in verdict["judge_error"]
            assert row["target"] is None
        else:  # a (lucky) valid answer is exactly what the strict parser reads from the last attempt
            assert row["black_box"] == parse_ranking(verdict["judge_raw"][-1], len(row["completions"]))
    failed = sum(r["black_box"] is None for r in rows)
    assert metrics["black_box_failures"] == failed and metrics["training_prompts"] == len(rows) - failed
    assert (tmp_path / "run" / "cycle_1" / "model" / "config.json").exists()
