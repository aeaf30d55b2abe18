"""Teacher sources beyond one teacher: specs, `live` → `model`, routing by a column, and a KD step on a mixture."""

from __future__ import annotations

import json

import pytest
import torch

from align_distill import synthetic
from align_distill.data import load_dataset_for
from align_distill.errors import ConfigError, UserError
from align_distill.models import load_model
from align_distill.teachers.mixture import mix_topk
from align_distill.teachers.signals import BatchSignals
from align_distill.teachers.sources import RoutedTeacher, SignalsRequest, canonical_kind, teacher_specs
from align_distill.trainers.kd import KDConfig, KDTrainer


class Constant:
    """A source whose signals are fixed tensors (one teacher's answer for any row)."""

    def __init__(self, name: str, value: float, k: int):
        self.name, self.kind, self.value, self.k = name, "test", value, k

    def signals(self, request: SignalsRequest) -> BatchSignals:
        n, t = request.input_ids.shape[0], request.input_ids.shape[1] - 1
        ids = torch.arange(self.k).expand(n, t, self.k)
        return BatchSignals(ids, torch.full((n, t, self.k), self.value), torch.full((n, t), self.value))


def test_routing_gives_each_row_its_teachers_signals():
    routed = RoutedTeacher({"a": Constant("a", -1.0, 2), "b": Constant("b", -2.0, 3)}, "teacher")
    keys = [("0", "c"), ("1", "c"), ("2", "c")]
    request = SignalsRequest(keys, torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4), routes=["b", "a", "b"])
    out = routed.signals(request)
    assert out.ids.shape == (3, 3, 3)
    assert (out.token_logprobs[[0, 2]] == -2.0).all() and (out.token_logprobs[1] == -1.0).all()
    assert torch.isneginf(out.logprobs[1, :, 2]).all()  # teacher a's k = 2, padded to 3 with no mass
    with pytest.raises(UserError, match=r"row 2 \(id 'y'\): column `teacher` is 'c'; it must name one of"):
        routed.check_routes([{"id": "x", "teacher": "a"}, {"id": "y", "teacher": "c"}])


def test_specs_and_kinds_are_checked(tmp_path, caplog):
    assert canonical_kind("live", "here") == "model"
    with caplog.at_level("WARNING"):
        config = KDConfig(output_dir=str(tmp_path), teacher_mode="live", teacher_model_name_or_path="t")
    assert config.teacher_mode == "model"  # the deprecated value, read for one release
    assert "teacher_mode `live` is deprecated, use `model`" in caplog.text
    with pytest.raises(ConfigError, match="teacher kind must be one of model, cache, server, found 'gpu'"):
        canonical_kind("gpu", "here")
    with pytest.raises(ConfigError, match=r"teachers\[1\]: teacher 'b' of kind server needs `server_url`"):
        teacher_specs([{"name": "a", "signals_path": "p"}, {"name": "b", "kind": "server"}], "teachers")
    with pytest.raises(ConfigError, match="teacher names must be unique"):
        teacher_specs([{"name": "a", "signals_path": "p"}, {"name": "a", "signals_path": "q"}], "teachers")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['url'\]"):
        teacher_specs([{"name": "a", "url": "p"}], "teachers")


@pytest.mark.slow
def test_kd_trains_on_a_weighted_mixture_and_on_routed_rows(tiny_models, tiny_tokenizer, tmp_path):
    """Two in-process teachers (the teacher and the student's initial weights): the mixed batch signals are
    `mix_topk` of each teacher's own, and a routing column gives each row its named teacher."""
    rows = synthetic.sft_rows(4, seed=3)
    for n, row in enumerate(rows):
        row["teacher"] = "big" if n % 2 else "small"
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teachers = [
        {"name": "big", "kind": "model", "model_name_or_path": str(tiny_models["teacher"]), "weight": 3.0},
        {"name": "small", "kind": "model", "model_name_or_path": str(tiny_models["student"]), "weight": 1.0},
    ]

    def trainer(**overrides) -> KDTrainer:
        args = KDConfig(
            output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
            save_strategy="no", gradient_checkpointing=False, max_length=64, dataloader_pin_memory=False,
            signals_top_k=4, teachers=teachers, logging_steps=1, **overrides,
        )  # fmt: skip
        dataset = load_dataset_for(str(path), "completion")
        model = load_model(tiny_models["student"], dtype="float32")
        return KDTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)

    mixed = trainer()
    examples = [mixed.train_dataset[i] for i in range(4)]
    batch = mixed.data_collator(examples)
    members = mixed.teacher_source.sources
    request = SignalsRequest(
        [(str(e["id"]), "completion") for e in examples],
        batch["input_ids"], batch["completion_mask"], batch["attention_mask"],
    )  # fmt: skip
    expected = mix_topk([m.signals(request) for m in members], [3.0, 1.0])
    assert torch.equal(batch["teacher_ids"], expected.ids)
    assert torch.allclose(batch["teacher_logprobs"], expected.logprobs)
    mixed.train()
    assert mixed.state.log_history[0]["kd/loss"] > 0

    routed = trainer(teacher_routing_column="teacher")
    examples = [routed.train_dataset[i] for i in range(4)]
    batch = routed.data_collator(examples)
    for n, example in enumerate(examples):
        own = routed.teacher_source.sources[example["teacher"]].signals(request.select([n]))
        assert torch.equal(batch["teacher_ids"][n : n + 1], own.ids)


@pytest.mark.slow
def test_dckd_mixes_and_routes_two_cached_teachers(tiny_models, tiny_tokenizer, tmp_path):
    """DCKD with `teachers:` of kind cache: the batch holds `mix_topk` of the two caches' signals, or with a routing
    column each row's own teacher's; a row naming no teacher is refused before training."""
    from align_distill.data_gen import run_job
    from align_distill.teachers.sources import CacheTeacher
    from align_distill.trainers.dckd import DCKDConfig, DCKDTrainer

    rows = synthetic.preference_rows(4, seed=5)
    for n, row in enumerate(rows):
        row["teacher"] = "dpo" if n % 2 else "ref"
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    signals = run_job("signals", {
        "input": str(path), "output_dir": str(tmp_path / "signals"), "signals_top_k": 4, "progress": False,
        "teachers": [{"name": "dpo", "model": str(tiny_models["teacher"])},
                     {"name": "ref", "model": str(tiny_models["student"])}],
    })  # fmt: skip
    teachers = [
        {"name": "dpo", "kind": "cache", "signals_path": str(signals), "weight": 0.25},
        {"name": "ref", "kind": "cache", "signals_path": str(signals), "weight": 0.75},
    ]

    def trainer(data_path, **overrides) -> DCKDTrainer:
        args = DCKDConfig(
            output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
            save_strategy="no", gradient_checkpointing=False, max_length=64, dataloader_pin_memory=False,
            teachers=teachers, **overrides,
        )  # fmt: skip
        return DCKDTrainer(
            model=load_model(tiny_models["student"], dtype="float32"),
            args=args,
            train_dataset=load_dataset_for(str(data_path), "preference"),
            processing_class=tiny_tokenizer,
        )

    mixed = trainer(path)
    examples = [mixed.train_dataset[i] for i in range(4)]
    batch = mixed.data_collator(examples)
    keys = [(str(e["id"]), r) for r in ("chosen", "rejected") for e in examples]
    request = SignalsRequest(keys, batch["input_ids"], batch["completion_mask"])
    reader = mixed.teacher_source.sources[0].reader
    own = {name: CacheTeacher(reader, name).signals(request) for name in ("dpo", "ref")}
    expected = mix_topk([own["dpo"], own["ref"]], [0.25, 0.75])
    assert torch.equal(batch["teacher_ids"], expected.ids)
    assert torch.allclose(batch["teacher_logprobs"], expected.logprobs)

    routed = trainer(path, teacher_routing_column="teacher")
    batch = routed.data_collator([routed.train_dataset[i] for i in range(4)])
    for n, (row_id, _) in enumerate(keys):
        name = next(r["teacher"] for r in rows if str(r["id"]) == row_id)
        assert torch.equal(batch["teacher_ids"][n], own[name].ids[n])
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({**r, "teacher": "big"}) + "\n" for r in rows))
    with pytest.raises(UserError, match="column `teacher` is 'big'; it must name one of the teachers"):
        trainer(wrong, teacher_routing_column="teacher")
