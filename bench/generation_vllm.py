"""Benchmark: the vllm backend (`VLLMGenerator`) against raw `vllm.LLM.generate` on the same engine and prompts.

Rows (one engine per model; ours and raw alternate call by call, `repeats` times after one warm-up call each, so a
slow moment of a shared machine hits both):
- `generate`: greedy. Ours = `VLLMGenerator.generate(prompts)` (chat template, per-request seeds, our decoding of
  the text); raw = `LLM.generate` on the already tokenized prompts with one plain `SamplingParams` (vLLM's own
  detokenization). Generated tokens/s, min / median / max over the repeats, and `ratio` = our median / raw median
  (goal >= 0.95).
- `sample`: the same at temperature 1 (ours: a seed per request; raw: unseeded).
- `score`: `VLLMGenerator.score(top_k)` (building `TokenScores`) vs raw `LLM.generate` with `prompt_logprobs=top_k`
  and `detokenize=False` over the same prompt + response ids (no parsing: the least work that yields the
  signals; with vLLM's default detokenization raw is ~2x slower, as it decodes every top-k token); response
  tokens/s.
On a shared, busy machine the medians are noisy; two steadier ratios come with them: `ratio_best` = our best /
raw best, and `ratio_paired` = the median over repeats of ours / raw measured back to back. `*_client_cpu_s` is
the CPU time a call spends in this process (tokenization, request building, decoding, parsing; the engine runs
in its own process): what our layer adds, unaffected by other load. The client heap is frozen (`gc.freeze()`)
after start-up, as vLLM's engine core does for its own: otherwise a full collection of the start-up heap (~0.5 s
on this CPU) lands on whichever call crosses the threshold — mostly the ones that allocate more (ours, `score`).

Models: `tiny` = the tiny teacher (float32); with `--full` also `small` (hidden 512, 8 layers, same tokenizer).
Run: `python -m bench.generation_vllm` (quick) or `--full`; `run(quick)` returns the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import generation_models

QUICK = {"prompts": 64, "new_tokens": 32, "repeats": 7, "top_k": 20}
FULL = {"prompts": 256, "new_tokens": 64, "repeats": 7, "top_k": 20}


def _race(ours: Callable[[], int], raw: Callable[[], int], repeats: int) -> dict[str, list[float]]:
    """Tokens/s of each callable (it returns the tokens it produced), alternating, after one warm-up call each;
    also the CPU seconds each call spent in this (client) process, which a busy machine does not inflate."""
    ours(), raw()
    rates: dict[str, list[float]] = {"ours": [], "raw": [], "ours_cpu": [], "raw_cpu": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("raw", raw)):
            start, cpu = time.perf_counter(), time.process_time()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - start))
            rates[f"{name}_cpu"].append(time.process_time() - cpu)
    return rates


def _row(bench: str, model: str, rates: dict[str, list[float]], **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"bench": bench, "model": model, **extra}
    for name in ("ours", "raw"):
        values = rates[name]
        row[f"{name}_tokens_per_s_min"] = round(min(values), 1)
        row[f"{name}_tokens_per_s_median"] = round(statistics.median(values), 1)
        row[f"{name}_tokens_per_s_max"] = round(max(values), 1)
    row["ratio"] = round(statistics.median(rates["ours"]) / statistics.median(rates["raw"]), 3)
    row["ratio_best"] = round(max(rates["ours"]) / max(rates["raw"]), 3)
    # calls i of ours and raw ran back to back, under about the same load: the median of their ratios
    row["ratio_paired"] = round(statistics.median(o / r for o, r in zip(rates["ours"], rates["raw"])), 3)
    row["ours_client_cpu_s"] = round(statistics.median(rates["ours_cpu"]), 4)
    row["raw_client_cpu_s"] = round(statistics.median(rates["raw_cpu"]), 4)
    return row


def bench_model(name: str, path: Path, settings: dict[str, int]) -> list[dict[str, Any]]:
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from align_distill.data.tokens import encode_prompt
    from align_distill.data_gen.backends import SamplingParams
    from align_distill.data_gen.backends.vllm_backend import VLLMGenerator
    from align_distill.synthetic import prompt_rows

    prompts = [r["prompt"] for r in prompt_rows(settings["prompts"], 7)]
    new_tokens, repeats, top_k = settings["new_tokens"], settings["repeats"], settings["top_k"]
    generator = VLLMGenerator(str(path), dtype="float32", seed=0)
    gc.collect()
    gc.freeze()  # as vLLM's engine core does: else full collections of the startup heap (~0.5 s) hit random calls
    try:
        llm = generator.llm
        encoded = [encode_prompt(generator.tokenizer, p) for p in prompts]
        token_prompts = [TokensPrompt(prompt_token_ids=ids) for ids in encoded]
        rows = []
        for bench, ours_params, raw_params in (
            (
                "generate",
                SamplingParams(max_new_tokens=new_tokens),
                VSamplingParams(temperature=0, max_tokens=new_tokens),
            ),
            (
                "sample",
                SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=1),
                VSamplingParams(temperature=1.0, max_tokens=new_tokens),
            ),
        ):

            def ours(params: SamplingParams = ours_params) -> int:
                return sum(len(c.token_ids) for out in generator.generate(prompts, params) for c in out)

            def raw(params: Any = raw_params) -> int:
                outs = llm.generate(token_prompts, params, use_tqdm=False)
                return sum(len(o.token_ids) for out in outs for o in out.outputs)

            rates = _race(ours, raw, repeats)
            rows.append(_row(bench, name, rates, prompts=len(prompts), new_tokens=new_tokens, repeats=repeats))

        responses = [c[0].token_ids for c in generator.generate(prompts, SamplingParams(max_new_tokens=new_tokens))]
        scored = sum(map(len, responses))
        full = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(encoded, responses)]
        logprob_params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False)

        def ours_score() -> int:
            generator.score(encoded, responses, top_k=top_k)
            return scored

        def raw_score() -> int:
            llm.generate(full, logprob_params, use_tqdm=False)
            return scored

        rates = _race(ours_score, raw_score, repeats)
        rows.append(_row("score", name, rates, prompts=len(prompts), response_tokens=scored, top_k=top_k,
                         repeats=repeats))  # fmt: skip
        return rows
    finally:
        gc.unfreeze()
        generator.close()


def run(quick: bool = True) -> list[dict[str, Any]]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU build: plenty for this
    settings = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in generation_models(Path(tmp), full=not quick).items():
            rows += bench_model(name, path, settings)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more prompts and tokens, and the `small` model too")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines")
    opts = parser.parse_args(argv)
    for row in run(quick=not opts.full):
        print(json.dumps(row) if opts.json else "  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":  # vLLM's engine processes are spawned: the guard keeps them from re-running the bench
    main()
