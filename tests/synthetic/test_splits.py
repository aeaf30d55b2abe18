"""The synthetic task's train / validation / test prompts are disjoint by construction, for every seed."""

import json

import pytest

from align_distill import synthetic
from align_distill.quickstart import write_data
from align_distill.synthetic import task

# The seeds the reproductions use (bench/reproduce.py: SEEDS) and a few more.
SEEDS = range(12)


@pytest.mark.parametrize("seed", SEEDS)
def test_no_validation_or_test_prompt_is_used_for_training(seed):
    splits = synthetic.task_splits(seed)
    train = set(splits["train"])
    validation, test = set(splits["validation"]), set(splits["test"])
    assert len(validation) == synthetic.EVAL_SIZES["validation"] == len(splits["validation"])
    assert len(test) == synthetic.EVAL_SIZES["test"] == len(splits["test"])
    assert not validation & train and not test & train and not validation & test
    # "train" is every prompt that the seed's training files hold: recompute them independently of task_splits
    used = {
        row["prompt"][0]["content"]
        for rows in synthetic.task_data(seed, **synthetic.DATA_SIZES).values()
        for row in rows
    }
    assert used == train


def test_the_quickstart_data_files_hold_only_train_prompts(tmp_path):
    write_data(tmp_path, seed=3, n_sft=300, n_pairs=100, n_prompts=50)
    held_out = set(synthetic.evaluation_prompts("validation", 3)) | set(synthetic.evaluation_prompts("test", 3))
    for name in ("sft.jsonl", "pairs.jsonl", "prompts.jsonl"):
        prompts = [json.loads(line)["prompt"][0]["content"] for line in (tmp_path / name).read_text().splitlines()]
        assert prompts and all(task.split_of(p) == "train" for p in prompts)
        assert not held_out & set(prompts)


def test_split_is_a_function_of_the_prompt_string_with_the_intended_shares():
    every = [
        f"{op}: {a} {b} {c}"
        for op in task.OPERATIONS
        for a in task.ALPHABET
        for b in task.ALPHABET
        for c in task.ALPHABET
    ]
    shares = {name: sum(task.split_of(p) == name for p in every) / len(every) for name in task.SPLITS}
    assert shares["test"] == pytest.approx(0.1, abs=0.03) and shares["validation"] == pytest.approx(0.1, abs=0.03)
    assert all(task.split_of(p) == task.split_of(p) for p in every[:50])


def test_evaluation_prompts_are_distinct_seeded_and_prefix_stable():
    test = synthetic.evaluation_prompts("test", 0)
    assert len(set(test)) == len(test) and all(task.split_of(p) == "test" for p in test)
    assert synthetic.evaluation_prompts("test", 0, n=20) == test[:20]
    assert synthetic.evaluation_prompts("test", 1) != test
    with pytest.raises(ValueError, match="validation or test"):
        synthetic.evaluation_prompts("train", 0)
    with pytest.raises(ValueError, match="split must be one of"):
        task.prompts(3, 0, split="dev")


def test_evaluate_reports_on_the_requested_split(tiny_tokenizer, monkeypatch):
    seen = []

    def fake_generate(model, tokenizer, texts, **kwargs):
        seen.append(list(texts))
        return ["sure, " + task.answer(p) for p in texts]

    monkeypatch.setitem(synthetic.evaluate.__globals__, "generate_responses", fake_generate)
    result = synthetic.evaluate(None, tiny_tokenizer, n=10, seed=2, split="validation")
    assert result.reward == 1.0 and result.n == 10
    assert seen[0] == synthetic.evaluation_prompts("validation", 2, n=10)
