"""Benchmark: one training step of DCKD and ADPA in cache mode vs a TRL `SFTTrainer` step, same student, same tokens.

Setup: the tiny tokenizer/teacher/student of `align_distill.models.tiny` (`--size small`: a wider, deeper student of
the same family), `pairs` synthetic preference pairs, a greedy student rollout and the teacher-signal caches
(`signals` job, k = 50): the DPO teacher on chosen/rejected (DCKD), the DPO teacher + reference gathered at its ids
on the rollout (ADPA). Each method trains on `batch` pairs per step = 2·batch sequences (chosen + rejected, or
chosen + student response); its SFT baseline trains on exactly those token ids (pre-tokenized rows, loss on the
response tokens).

A step = fetching the batch from the trainer's dataloader (collation, incl. reading the cache) + forward + backward
+ optimizer step, timed with `time.perf_counter`. The methods run round-robin, one step each per round, so that a
slow moment of a shared machine hits all of them; the median over `rounds` (after `warmup`) is reported, with
`ratio_vs_sft` = median / median of its SFT baseline (goal ≤ 1.15): `sft` (chosen + rejected) for DCKD,
`sft_rollout` (chosen + the student's rollout) for ADPA.

Run: `python -m bench.distill_step [--quick] [--size small]`; `run(quick)` returns the rows for `bench/run_all.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUICK = {"pairs": 64, "batch": 8, "rounds": 6, "warmup": 2}
FULL = {"pairs": 256, "batch": 16, "rounds": 20, "warmup": 3}
# each method's SFT baseline: the same sequences (ADPA: dataset chosen + the student's own responses)
BASELINE = {"adpa": "sft_rollout"}
SMALL_STUDENT = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 768}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def _student(paths: dict[str, Path], size: str, root: Path) -> Path:
    """The tiny student, or (`small`) a randomly initialised wider one saved next to it with the same tokenizer."""
    if size == "tiny":
        return paths["student"]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(paths["student"])
    for key, value in SMALL_STUDENT.items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    if getattr(config, "layer_types", None):  # one attention type per layer: resize to the new depth
        config.layer_types = [config.layer_types[0]] * config.num_hidden_layers
    out = root / "student_small"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(paths["tokenizer"]).save_pretrained(out)
    return out


def prepare(root: Path, pairs: int, size: str) -> dict[str, Any]:
    """Models, pairs, rollout and both signal caches under `root`."""
    from align_distill import synthetic
    from align_distill.data_gen import run_job
    from align_distill.models.tiny import make_tiny_models

    paths = make_tiny_models(root / "models")
    student = _student(paths, size, root)
    data = _write_jsonl(root / "pairs.jsonl", synthetic.preference_rows(pairs, seed=1))
    rollout = run_job(
        "rollout",
        {
            "input": str(data),
            "output_dir": str(root / "rollout"),
            "model": str(student),
            "max_completion_length": 24,
            "progress": False,
        },
    )
    dpo = {"name": "dpo", "model": str(paths["teacher"])}
    dckd_signals = run_job(
        "signals", {"input": str(data), "output_dir": str(root / "sig_dckd"), "teachers": [dpo], "progress": False}
    )
    adpa_signals = run_job(
        "signals",
        {
            "input": str(rollout),
            "output_dir": str(root / "sig_adpa"),
            "responses": ["completion"],
            "teachers": [dpo, {"name": "ref", "model": str(student), "gather_at": "dpo"}],
            "progress": False,
        },
    )
    return {"student": student, "pairs": data, "rollout": rollout, "dckd": dckd_signals, "adpa": adpa_signals}


def _common(out: Path, batch: int) -> dict[str, Any]:
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=10_000,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        learning_rate=1e-5,
        max_length=128,
        bf16=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=0,
    )


def build_trainers(inputs: dict[str, Any], batch: int, root: Path) -> dict[str, Any]:
    """`{"sft": ..., "dckd": ..., "adpa": ...}` trainers on the same student; SFT rows = the methods' sequences."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from align_distill.data import load_dataset_for
    from align_distill.data_gen import load_store
    from align_distill.models import load_model, load_tokenizer
    from align_distill.trainers.adpa import ADPAConfig, ADPATrainer
    from align_distill.trainers.dckd import DCKDConfig, DCKDTrainer

    tokenizer = load_tokenizer(str(inputs["student"]))
    pairs = load_dataset_for(str(inputs["pairs"]), "preference")
    student = lambda: load_model(str(inputs["student"]), dtype="float32")  # noqa: E731
    dckd = DCKDTrainer(
        model=student(),
        args=DCKDConfig(**_common(root / "dckd", batch), signals_path=str(inputs["dckd"])),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    adpa = ADPATrainer(
        model=student(),
        args=ADPAConfig(**_common(root / "adpa", batch), signals_path=str(inputs["adpa"])),
        train_dataset=load_store(inputs["adpa"]),
        processing_class=tokenizer,
    )

    def sft(name: str, rows: Any, first: tuple[str, str], second: tuple[str, str]) -> SFTTrainer:
        """SFT on exactly the method's token ids: step b sees the 2·B sequences of the method's batch b."""
        sequences = []
        for start in range(0, len(rows), batch):
            chunk = [rows[i] for i in range(start, min(start + batch, len(rows)))]
            for prompt, response in (first, second):
                sequences += [
                    {
                        "input_ids": r[prompt] + r[response],
                        "completion_mask": [0] * len(r[prompt]) + [1] * len(r[response]),
                    }
                    for r in chunk
                ]
        config = SFTConfig(**_common(root / name, 2 * batch), packing=False, completion_only_loss=True)
        return SFTTrainer(
            model=student(), args=config, train_dataset=Dataset.from_list(sequences), processing_class=tokenizer
        )

    return {
        "sft": sft("sft", dckd.train_dataset, ("prompt_ids", "chosen_ids"), ("prompt_ids", "rejected_ids")),
        "sft_rollout": sft(
            "sft_rollout", adpa.train_dataset, ("prompt_ids", "chosen_ids"), ("rollout_prompt_ids", "rollout_ids")
        ),
        "dckd": dckd,
        "adpa": adpa,
    }


def _stepper(trainer: Any) -> Callable[[], tuple[float, int]]:
    """One timed step: next batch (collation) + forward/backward + optimizer step; sequential, unshuffled data."""
    from torch.utils.data import DataLoader

    dataset = trainer._remove_unused_columns(trainer.train_dataset, description="training")
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_train_batch_size, collate_fn=trainer.data_collator)
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
    state = {"iterator": iter(loader)}

    def step() -> tuple[float, int]:
        started = time.perf_counter()
        try:
            batch = next(state["iterator"])
        except StopIteration:
            state["iterator"] = iter(loader)
            batch = next(state["iterator"])
        loss = trainer.training_step(trainer.model, trainer._prepare_inputs(batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        elapsed = time.perf_counter() - started
        assert loss.isfinite()
        return elapsed, int(batch["attention_mask"].sum())

    return step


def measure(trainers: dict[str, Any], rounds: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Step times per method (after `warmup` rounds) and the tokens (attention mask) each method's timed steps saw."""
    steppers = {name: _stepper(trainer) for name, trainer in trainers.items()}
    times: dict[str, list[float]] = {name: [] for name in steppers}
    tokens = dict.fromkeys(steppers, 0)
    for round_index in range(warmup + rounds):
        for name, step in steppers.items():
            elapsed, count = step()
            if round_index >= warmup:
                times[name].append(elapsed)
                tokens[name] += count
    return times, tokens


def run(quick: bool = True, size: str | None = None) -> list[dict]:
    """Rows for `bench/run_all.py`: the tiny student (quick), or both students (full) unless `size` names one."""
    if size is None:
        return [row for s in (["tiny"] if quick else ["tiny", "small"]) for row in run(quick, s)]
    settings = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="distill_step_") as tmp:
        root = Path(tmp)
        inputs = prepare(root, settings["pairs"], size)
        trainers = build_trainers(inputs, settings["batch"], root)
        times, tokens = measure(trainers, settings["rounds"], settings["warmup"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        base = statistics.median(times[BASELINE.get(name, "sft")])
        rows.append(
            {
                "bench": "distill_step",
                "method": name,
                "student": size,
                "sequences_per_step": 2 * settings["batch"],
                "tokens_timed": tokens[name],
                "median_s": round(median, 4),
                "min_s": round(min(values), 4),
                "max_s": round(max(values), 4),
                "baseline": BASELINE.get(name, "sft"),
                "ratio_vs_sft": round(median / base, 3),
                "rounds": settings["rounds"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and rounds")
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny", help="student size")
    options = parser.parse_args()
    rows = run(quick=options.quick, size=options.size)
    print(f"{'method':8s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'× SFT':>7s} {'tokens':>7s}")
    for row in rows:
        print(
            f"{row['method']:8s} {row['median_s']:9.4f} {row['min_s']:8.4f} {row['max_s']:8.4f} "
            f"{row['ratio_vs_sft']:7.3f} {row['tokens_timed']:7d}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
