"""Benchmark: one whole DCKD training step at V = 151936 — fused LM-head path vs logits path vs a TRL SFT step.

One step = `trainer.training_step` (forward, loss, backward) + the AdamW step, on the same tokens in each variant,
one fresh process per variant, side by side in one run:
- `dckd_fused`: `DCKDTrainer` with a live teacher (paper mode: full-vocabulary KL on chosen and rejected + the SFT
  NLL on chosen), `fused_lm_head: true` (the default): hidden states + heads, no `[B, T, V]` logits;
- `dckd_logits`: the same trainer with `fused_lm_head: false` (student and teacher logits, chunked losses);
- `trl_sft`: TRL's `SFTTrainer` step on the same rows (NLL of the responses only, no teacher; TRL's own fused
  cross-entropy): the cost of plain fine-tuning on these tokens, for scale.

Models: random Qwen2 students/teachers with Qwen's vocabulary size (151936, tied embeddings) and few layers
(`--hidden`, `--layers`; the teacher has the same shape, another seed), float32, CPU. The tokens are random ids of
the tiny tokenizer's range; the trainers' vocabulary is set to the head's 151936 rows (as a real Qwen tokenizer
would give). Batch: `--pairs` preference pairs (chosen + rejected rows) of `--seq` tokens, the last
`--response` tokens of each row the response.

Memory: peak RSS of the fresh process during the first step minus the RSS before it (`extra_mb`: activations,
logits or tiles, gradients, the optimizer's state created at its first step), and the whole process's peak
(`peak_rss_mb`). Time: the median of `--repeats` steps after the first.

Run: `flock /tmp/align-distill-bench.lock python -m bench.fused_step --json bench/fused_step.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import peak_rss_mb, rss_mb, run_worker
from bench.fused_losses import _versions

VARIANTS = ("dckd_fused", "dckd_logits", "trl_sft")
VOCAB = 151936


# ---- worker side (runs in the subprocess) -------------------------------------------------------------------------


def _model(opts: argparse.Namespace, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    heads = max(1, opts.hidden // 64)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=opts.hidden,
        num_hidden_layers=opts.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=opts.hidden * 4,
        tie_word_embeddings=True,
        max_position_embeddings=max(2048, opts.seq),
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _batch(opts: argparse.Namespace, high: int) -> dict:
    """`[2 · pairs, seq]` rows (chosen rows, then rejected), the last `response` tokens of each the response."""
    import torch

    g = torch.Generator().manual_seed(0)
    rows = 2 * opts.pairs
    ids = torch.randint(3, high, (rows, opts.seq), generator=g)
    completion = torch.zeros(rows, opts.seq, dtype=torch.long)
    completion[:, -opts.response :] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}


def _trainer(opts: argparse.Namespace, folder: str):
    from datasets import Dataset

    from align_distill import synthetic
    from align_distill.models.tiny import task_corpus, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(task_corpus())
    common = dict(
        output_dir=folder,
        per_device_train_batch_size=opts.pairs,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        learning_rate=1e-5,
        dataloader_pin_memory=False,
        bf16=False,
    )
    student = _model(opts, seed=1)
    if opts.worker == "trl_sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list(synthetic.sft_rows(8, seed=0))
        trainer = SFTTrainer(student, SFTConfig(**common), train_dataset=data, processing_class=tokenizer)
        return trainer, tokenizer
    from align_distill.trainers.dckd import DCKDConfig, DCKDTrainer

    fused = opts.worker == "dckd_fused"
    # the teacher is passed in memory; the config only needs to name one
    args = DCKDConfig(**common, teacher_mode="model", teacher_model_name_or_path="random", fused_lm_head=fused)
    data = Dataset.from_list(synthetic.preference_rows(8, seed=1))
    trainer = DCKDTrainer(student, args, data, tokenizer, teacher_model=_model(opts, seed=2))
    trainer.vocab_size = VOCAB  # a Qwen tokenizer's vocabulary: every head row is a token
    return trainer, tokenizer


def _worker(opts: argparse.Namespace) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as folder:
        trainer, tokenizer = _trainer(opts, folder)
        batch = _batch(opts, len(tokenizer))
        if opts.worker == "trl_sft":  # the same rows, the response tokens as labels
            labels = batch["input_ids"].masked_fill(batch.pop("completion_mask") == 0, -100)
            batch = {**batch, "labels": labels}
        model = trainer.model
        model.train()
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by `Trainer.train`'s loop, which is not run here
        optimizer = trainer.optimizer

        def one_step() -> float:
            loss = trainer.training_step(model, dict(batch))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss)

        rss_before = rss_mb()
        started = time.perf_counter()
        loss = one_step()
        first = time.perf_counter() - started
        peak = peak_rss_mb()
        times = []
        for _ in range(opts.repeats):
            started = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - started)
    return {
        "name": opts.worker,
        "loss": loss,
        "first_s": first,
        "times_s": times or [first],
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "extra_mb": peak - rss_before,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
    }


# ---- driver side --------------------------------------------------------------------------------------------------


def _rows(opts: argparse.Namespace) -> list[dict]:
    shape = {"vocab": VOCAB, "hidden": opts.hidden, "layers": opts.layers, "seq": opts.seq}
    shape |= {"pairs": opts.pairs, "response": opts.response}
    results = {}
    for name in opts.variants.split(","):
        args = ["--worker", name, "--repeats", str(opts.repeats)]
        args += [f"--{key}={value}" for key, value in shape.items() if key != "vocab"]
        results[name] = run_worker("bench.fused_step", args, opts.timeout)
        r = results[name]
        print(name, f"{statistics.median(r['times_s']):.2f} s", f"{r['extra_mb']:.0f} MiB extra", flush=True)
    sft = results.get("trl_sft")
    rows = []
    for name, r in results.items():
        time_s = statistics.median(r["times_s"])
        row = {
            "bench": "fused_step",
            "variant": name,
            **shape,
            "tokens": 2 * opts.pairs * opts.seq,
            "dtype": "float32",
            "loss": r["loss"],
            "time_s_median": time_s,
            "first_s": r["first_s"],
            "extra_mb": r["extra_mb"],
            "peak_rss_mb": r["peak_rss_mb"],
            "params_m": r["params_m"],
            "threads": r["threads"],
        }
        if sft is not None:
            row["time_ratio_vs_trl_sft"] = time_s / statistics.median(sft["times_s"])
            row["mem_ratio_vs_trl_sft"] = r["extra_mb"] / max(sft["extra_mb"], 1e-9)
        rows.append(row)
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size (Qwen2-0.5B: 896)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--response", type=int, default=384, help="response tokens per row (the loss's positions)")
    p.add_argument("--pairs", type=int, default=1, help="preference pairs per step (2 rows each)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps after the first")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant subprocess")
    p.add_argument("--json", default=None, help="write {config, versions, rows} to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    opts = _parser().parse_args(argv)
    if opts.worker:
        print(json.dumps(_worker(opts)))
        return
    keys = ("hidden", "layers", "seq", "response", "pairs", "repeats", "variants")
    config = {k: getattr(opts, k) for k in keys}
    rows = _rows(opts)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    if opts.json:
        out = Path(opts.json)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"config": config, "versions": _versions(), "rows": rows}, indent=2) + "\n")
        tmp.replace(out)  # atomic


if __name__ == "__main__":
    main()
