"""Benchmark: the transformers backend and the `signals` job against raw transformers, and the signal cache's cost.

Rows (each on the same prompts / token ids, same batch size, greedy, one intra-op thread unless `--threads`):
- `generate`: `TransformersGenerator.generate` vs raw `model.generate` on the same left-padded batches; generated
  tokens/s and the ratio (goal >= 0.9). `sample` is the same for sampling with per-row seeds (our exponential-race
  processor) vs `model.generate(do_sample=True)`.
- `signals`: the whole `signals` job (input validation, tokenization, fingerprint, one teacher forward per batch,
  top-k, fp16 encoding, parquet shards, manifest; models already loaded) vs a raw teacher forward over the same
  sequences in the same batches (`raw_forward`), and vs forward + log_softmax + top-k (`raw_forward_topk`, the
  least work that yields the signals); response tokens/s and ratios.
- `cache`: measured arrow bytes per response token at k = 50 (teacher with own top-k; a second teacher gathered at
  its ids), the formula's value, parquet bytes on disk per token, and two distances between the cached and the
  exact next-token distribution, averaged over tokens:
  `kl_topk_rest_bins`: KL over the (k+1) bins (top-k + rest) between exact and cached (fp16 rounding only), and
  `kl_full_vocab`: KL(exact ‖ cached over the vocabulary, the rest mass spread evenly over the other ids) — this
  one depends on the model: random tiny models are close to uniform, so it is large for them.

Models: `tiny` = the tiny teacher (hidden 128, 4 layers, vocabulary 320); with `--full` also `small` (hidden 512,
8 layers) with the same tokenizer, where the forward pass dominates as it does for real models.
Run: `python -m bench.generation` (quick) or `python -m bench.generation --full`; `run(quick)` returns the rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.common import generation_models

REPEATS = 5


def _race(*fns, repeats: int = REPEATS) -> list[float]:
    """Best (minimum) wall time of each function; runs are interleaved so that load from other processes on a
    shared machine hits every variant alike. One warm-up run each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [min(t) for t in times]


def _left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def bench_generate(name: str, path: Path, prompts: list[Any], batch_size: int, new_tokens: int) -> list[dict]:
    from align_distill.data.tokens import encode_prompt
    from align_distill.data_gen.backends import SamplingParams
    from align_distill.data_gen.backends.transformers_backend import TransformersGenerator

    generator = TransformersGenerator(str(path), batch_size=batch_size, dtype="float32", device="cpu")
    encoded = [encode_prompt(generator.tokenizer, p) for p in prompts]
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    rows = []
    for mode, params in (
        ("generate", SamplingParams(max_new_tokens=new_tokens)),
        ("sample", SamplingParams(max_new_tokens=new_tokens, temperature=1.0)),
    ):
        ours_tokens, raw_tokens, ours_s, raw_s = _generate_pair(generator, prompts, batches, params)
        ours_tps, raw_tps = ours_tokens / ours_s, raw_tokens / raw_s
        rows.append(
            {
                "bench": mode,
                "model": name,
                "prompts": len(prompts),
                "batch_size": batch_size,
                "new_tokens": new_tokens,
                "ours_tokens_per_s": round(ours_tps, 1),
                "raw_tokens_per_s": round(raw_tps, 1),
                "ratio": round(ours_tps / raw_tps, 3),
            }
        )
    return rows


def _generate_pair(generator: Any, prompts: list[Any], batches: list[list[list[int]]], params: Any) -> tuple:
    """(our generated tokens, raw generated tokens, our best time, raw best time)."""
    counted: dict[str, int] = {}

    def ours() -> None:
        out = generator.generate(prompts, params, seeds=list(range(len(prompts))))
        counted["ours"] = sum(len(c[0].token_ids) for c in out)

    def raw() -> None:
        total = 0
        for batch in batches:
            ids, mask = _left_pad(batch, generator.pad_id)
            out = generator.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=params.max_new_tokens,
                do_sample=not params.greedy,
                temperature=params.temperature or None,
                top_k=None,
                top_p=None,
                pad_token_id=generator.pad_id,
                eos_token_id=generator.eos_ids,
            )
            for row in out[:, ids.shape[1] :].tolist():
                eos = [t for t, token in enumerate(row) if token in generator.eos_ids]
                total += eos[0] + 1 if eos else len(row)
        counted["raw"] = total

    ours_s, raw_s = _race(ours, raw)
    return counted["ours"], counted["raw"], ours_s, raw_s


def signals_throughput(
    name: str, path: Path, folder: Path, source_rows: list[dict], batch_size: int, k: int, teacher: Any = None
) -> tuple[dict, dict]:
    """The `signals` job on `source_rows` raced against raw forwards of the teacher: over one sequence per response
    in the job's batches (`raw_forward`, `raw_forward_topk`), and the job's own forward calls replayed
    (`own_forward`: the same packed inputs, so `ratio_vs_own_forward` is the job's work around its forwards). Returns
    the row and what the cache measurements reuse (`config`, `generators`, `out`, `cache`)."""
    from align_distill.data_gen.backends.transformers_backend import TransformersGenerator
    from align_distill.data_gen.jobs import load_signals, run_signals

    folder = Path(tempfile.mkdtemp(dir=folder))  # this call's input and stores
    source = folder / f"signals-{name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in source_rows))
    if teacher is None:
        teacher = TransformersGenerator(str(path), batch_size=batch_size, dtype="float32", device="cpu")
    generators = {"teacher": teacher}
    runs = iter(range(10**6))
    config = {
        "input": str(source),
        "signals_top_k": k,
        "shard_size": 64,
        "progress": False,
        "teachers": [{"name": "teacher", "model": str(path), "backend_kwargs": {"batch_size": batch_size}}],
    }

    def job() -> Path:
        return run_signals(
            {**config, "output_dir": str(folder / f"{source.stem}-{next(runs)}")}, generators=generators
        )

    model = teacher.model
    calls: list[dict] = []
    forward = model.forward
    model.forward = lambda *args, **kwargs: calls.append(kwargs) or forward(*args, **kwargs)
    try:
        out = job()
    finally:
        model.forward = forward
    cache = load_signals(out)  # also gives the exact sequences the raw baselines run
    sequences, responses = [], []
    for row_id in cache:
        row = cache[row_id]
        for response in cache.responses:
            sequences.append(row.prompt_ids.tolist() + row.responses[response].response_ids.tolist())
            responses.append(len(row.responses[response].response_ids))
    tokens = sum(responses)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # the job's batching: longest first
    batches = [[sequences[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]

    @torch.inference_mode()
    def raw_forward(topk: bool) -> None:
        for batch in batches:
            ids, mask = _left_pad(batch, teacher.pad_id)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            if topk:
                torch.topk(torch.log_softmax(logits.float(), -1), k, dim=-1)

    @torch.inference_mode()
    def own_forward() -> None:
        for kwargs in calls:
            model(**kwargs)

    job_s, forward_s, topk_s, own_s = _race(job, lambda: raw_forward(False), lambda: raw_forward(True), own_forward)
    row = {
        "bench": "signals",
        "model": name,
        "rows": len(source_rows),
        "responses_per_row": len(cache.responses),
        "response_tokens": tokens,
        "top_k": k,
        "share_prompts": teacher.shares_prompts,
        "raw_forward_model_tokens": sum(len(b) * len(b[0]) for b in batches),
        "job_model_tokens": sum(int(c["input_ids"].numel()) for c in calls),
        "job_tokens_per_s": round(tokens / job_s, 1),
        "raw_forward_tokens_per_s": round(tokens / forward_s, 1),
        "raw_forward_topk_tokens_per_s": round(tokens / topk_s, 1),
        "own_forward_tokens_per_s": round(tokens / own_s, 1),
        "ratio_vs_forward": round(forward_s / job_s, 3),
        "ratio_vs_forward_topk": round(topk_s / job_s, 3),
        "ratio_vs_own_forward": round(own_s / job_s, 3),
    }
    return row, {"config": config, "generators": generators, "out": out, "cache": cache}


def bench_signals(name: str, path: Path, folder: Path, rows_n: int, batch_size: int, k: int) -> list[dict]:
    from align_distill.data_gen.jobs import load_signals, measured_bytes_per_token, run_signals
    from align_distill.data_gen.store import store_metadata
    from align_distill.synthetic import preference_rows

    first, made = signals_throughput(name, path, folder, preference_rows(rows_n, 11), batch_size, k)
    rows = [first]
    config, generators, out, cache = made["config"], made["generators"], made["out"], made["cache"]
    teacher = generators["teacher"]
    tokens, model = first["response_tokens"], teacher.model

    # cache size and fidelity, with a second teacher gathered at the first one's ids
    two = run_signals(
        {
            **config,
            "output_dir": str(folder / f"sig2-{name}"),
            "teachers": [*config["teachers"], {"name": "ref", "model": str(path), "gather_at": "teacher"}],
        },
        generators={**generators, "ref": teacher},
    )
    measured = measured_bytes_per_token(load_signals(two).dataset, store_metadata(two))
    disk = sum(f.stat().st_size for f in (Path(out) / "data").glob("*.parquet")) / tokens
    kl_bins, kl_full = _fidelity(cache, model, k)
    rows.append(
        {
            "bench": "cache",
            "model": name,
            "top_k": k,
            "id_encoding": cache.encoding.id_encoding,
            "bytes_per_token_teacher": round(measured["teacher"], 2),
            "bytes_per_token_gathered_teacher": round(measured["ref"], 2),
            "bytes_per_token_response_ids": round(measured["response_ids"], 2),
            "formula_teacher": cache.encoding.bytes_per_token(),
            "formula_gathered": cache.encoding.bytes_per_token(gathered=True),
            "parquet_bytes_per_token_one_teacher_all_columns": round(disk, 1),
            "kl_topk_rest_bins": kl_bins,
            "kl_full_vocab": kl_full,
        }
    )
    return rows


@torch.inference_mode()
def _fidelity(cache: Any, model: Any, k: int) -> tuple[float, float]:
    bins, full, count = 0.0, 0.0, 0
    for row_id in cache:
        row = cache[row_id]
        for signals in row.responses.values():
            ids = torch.cat([row.prompt_ids, signals.response_ids])[None]
            exact = torch.log_softmax(model(ids).logits[0, len(row.prompt_ids) - 1 : -1].double(), -1)
            cached = signals.teachers["teacher"]
            p_top = exact.gather(-1, cached.topk_ids).exp()
            p_rest = (1 - p_top.sum(-1)).clamp(min=0)
            q_top = cached.topk_logprobs.double().exp()
            q_rest = cached.rest_logmass.double().exp()
            p_bins = torch.cat([p_top, p_rest[:, None]], -1)
            q_bins = torch.cat([q_top, q_rest[:, None]], -1)
            q_bins = q_bins / q_bins.sum(-1, keepdim=True)  # fp16 rounding leaves sums slightly off 1
            bins += torch.where(p_bins > 0, p_bins * (p_bins.log() - q_bins.log()), 0.0).sum().item()
            vocab = exact.shape[-1]
            q_full = torch.full_like(exact, 0.0) + (q_bins[:, -1:] / max(vocab - k, 1))
            q_full.scatter_(-1, cached.topk_ids, q_bins[:, :-1])
            p_full = exact.exp()
            full += (p_full * (exact - q_full.log())).sum().item()
            count += len(signals.response_ids)
    return float(f"{bins / count:.3g}"), float(f"{full / count:.3g}")


def rows(quick: bool = True, threads: int = 1) -> Iterator[dict]:
    """The benchmark rows, each as soon as it is measured."""
    torch.set_num_threads(threads)
    from align_distill.synthetic import prompt_rows

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, path in generation_models(folder, full=not quick).items():
            n_prompts, n_rows = (32, 64) if quick else (64, 128)
            prompts = [r["prompt"] for r in prompt_rows(n_prompts, 7)]
            measured = bench_generate(name, path, prompts, batch_size=16, new_tokens=32)
            measured += bench_signals(name, path, folder, n_rows, batch_size=16, k=50)
            for row in measured:
                yield {**row, "threads": threads}


def run(quick: bool = True, threads: int = 1) -> list[dict]:
    return list(rows(quick, threads))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more prompts, and the `small` model too")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines")
    opts = parser.parse_args(argv)
    for row in rows(quick=not opts.full, threads=opts.threads):
        print(json.dumps(row) if opts.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
