import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_distill import synthetic
from align_distill.synthetic import task


def test_tokenizer_round_trips_and_has_chatml(tiny_tokenizer):
    text = "reverse: c a d b\nsure, b d a c"
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<|endoftext|>"
    chat = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "sort: b a"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nsort: b a<|im_end|>\n<|im_start|>assistant\n"


def test_teacher_is_bigger_and_models_reload(tiny_models, tiny_tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert n_teacher > 3 * n_student
    assert teacher.config.vocab_size == student.config.vocab_size == len(tiny_tokenizer)
    assert (tiny_models["student"] / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(tiny_models["student"]).get_vocab() == tiny_tokenizer.get_vocab()


def test_answers_and_reward_parts():
    assert task.answer("reverse: c a d b") == "b d a c"
    assert task.answer("sort: c a d b") == "a b c d"
    r = task.reward("sort: c a d b", "sure, a b c d")
    assert (r.capability, r.preference, r.total) == (1.0, 1.0, 1.0)
    r = task.reward("sort: c a d b", "fine, a b c d")
    assert (r.capability, r.preference, r.total) == (1.0, 0.0, 0.5)
    r = task.reward("sort: c a d b", "sure, a b d c")
    assert (r.capability, r.preference) == (0.0, 1.0)
    assert task.reward("sort: c a d b", "").total == 0.0
    with pytest.raises(ValueError, match="not a synthetic-task prompt"):
        task.answer("hello")


def test_sft_data_is_near_half_polite_and_preferences_always_polite():
    rows = synthetic.sft_rows(2000, seed=0)
    polite = sum(r["completion"][0]["content"].startswith(task.POLITE) for r in rows) / len(rows)
    assert 0.4 < polite < 0.6
    assert all(task.reward(r["prompt"][0]["content"], r["completion"][0]["content"]).capability == 1 for r in rows)
    pairs = synthetic.preference_rows(500, seed=1)
    for r in pairs:
        p = r["prompt"][0]["content"]
        chosen, rejected = task.reward(p, r["chosen"][0]["content"]), task.reward(p, r["rejected"][0]["content"])
        assert chosen.total == 1.0 and rejected.preference == 0.0 and chosen.total > rejected.total
    wrong = sum(task.reward(r["prompt"][0]["content"], r["rejected"][0]["content"]).capability == 0 for r in pairs)
    assert 0.15 < wrong / len(pairs) < 0.35


def test_evaluate_scores_a_model_that_answers_by_rule(tiny_tokenizer):
    """evaluate() must report exactly the rates of what the model generates: patch generation with an oracle."""

    class Oracle(torch.nn.Module):
        def generate_for(self, prompt_texts):
            rng = random.Random(0)
            return [
                task.respond(p, polite=i % 4 != 0, correct=i % 2 == 0, rng=rng) for i, p in enumerate(prompt_texts)
            ]

    oracle = Oracle()
    original = synthetic.evaluate.__globals__["generate_responses"]
    synthetic.evaluate.__globals__["generate_responses"] = lambda model, tok, texts, **kw: model.generate_for(texts)
    try:
        result = synthetic.evaluate(oracle, tiny_tokenizer, n=100)
    finally:
        synthetic.evaluate.__globals__["generate_responses"] = original
    assert result.capability == pytest.approx(0.5)
    assert result.preference == pytest.approx(0.75)
    assert result.reward == pytest.approx(0.625)


def test_generate_responses_runs_greedy_on_tiny_model(tiny_models, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    a = synthetic.generate_responses(model, tiny_tokenizer, ["sort: a b c", "reverse: d e f g h"], max_new_tokens=5)
    b = synthetic.generate_responses(model, tiny_tokenizer, ["sort: a b c", "reverse: d e f g h"], max_new_tokens=5)
    assert a == b and len(a) == 2 and tiny_tokenizer.padding_side == "right"
