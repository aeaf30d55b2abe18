"""One prepared GPU check (issue #9): distill-step throughput, chunked-loss memory, and generation throughput.

Written to run once, unattended, on a single H100/H200 with only a stock CUDA PyTorch image (torch, transformers,
accelerate, peft; no trl, datasets, pyarrow, deepspeed or vllm) and this working tree on PYTHONPATH; every
model is built from a config with random weights, so nothing is downloaded. `scripts/gpu_check.sh` wraps it.

Sections:
  (a) `distill_step`: one optimizer step of a Qwen2.5-0.5B-shaped student (bf16 weights, torch AdamW, sdpa) on
      B x T random tokens, the first `prompt` tokens of each row being the prompt and the rest the response, in
      three modes: `sft` (CE on the response only, the baseline), `live` (a Qwen2.5-1.5B-shaped teacher forward
      under no_grad every step + full-vocabulary forward KL `align_distill.losses.kd_loss` + CE) and `cache`
      (teacher top-k ids/log-probs computed once, k = 50, `align_distill.losses.topk_kd_loss` + CE).
      Reported: median step time, tokens/s = B*T / step time, and
          MFU = 6 * N * tokens/s / peak,
      N = every student parameter (the tied embedding / LM head counted once; 6N per token = the matmuls of
      forward + backward, attention scores not counted), peak = the card's dense bf16 peak (H100 SXM and H200:
      989 TFLOP/s; `--peak-tflops` overrides). `mfu_with_teacher` adds the live teacher's forward, 2 * N_teacher
      per token. `vs_sft` = tokens/s of the mode / tokens/s of `sft`.
  (b) `loss_memory`: forward + backward of `kd_loss` (default chunk, and 64-row chunks) vs a naive full
      log_softmax KL on bf16 [B, T, V] logits: extra peak memory over the inputs (CUDA: max_memory_allocated,
      reset before each; CPU dry run: peak RSS of a fresh subprocess) and median time.
  (c) `generation`: greedy `model.generate` of the student, batch of prompts, fixed new tokens (no EOS), raw and
      through align-distill's `TransformersGenerator`; new tokens/s and their ratio. The backend's package
      `align_distill.data_gen` imports pyarrow/datasets at import time, so when that fails the backend module is
      loaded without running that `__init__` (see `import_isolated`); `backend_import` says which happened.

  (d) `fused_losses`: JSD (β = 0.5) from hidden states `[T, H]` and LM heads `[V, H]` (student trained, teacher
      frozen; H = the student's hidden size, bf16), forward + backward: `naive` (both heads projected, full
      log_softmax), `logits_path` (both projected, then `kd_loss`), `fused` (`fused_kd_loss`, default tiles, and
      `fused_gpu_tiles`: 4096 rows x 8192 vocabulary entries per tile), and, where they
      are importable, TRL's `_chunked_divergence_loss` and Liger's `LigerFusedLinearJSD` (otherwise the row says
      why it was skipped). Extra peak memory over the inputs (as in (b)), the inputs' gradient size, median time,
      and the ratios against TRL's row.

Run: `python -m bench.gpu_check` (real sizes, needs CUDA), `python -m bench.gpu_check --dry-run` (the same code
paths on CPU with tiny models, well under a minute). Prints one table per section and writes JSON to
`--json PATH`, or to `$OUT/gpu_check.json` when `$OUT` is set (rewritten after each section, so a timeout keeps
what finished). Exit status 1 if any section failed (its error is in the table and the JSON).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import peak_rss_mb, rss_mb
from bench.loss_kernels import naive_kd

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 peak (no sparsity) in TFLOP/s, matched in order against the device name: the first substring wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
]
CPU_NOMINAL_TFLOPS = 1.0  # no meaningful CPU peak: the dry run uses this so MFU is a finite (meaningless) number


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Sizes:
    """Every size of one run; `FULL` is the real check, `TINY` the CPU dry run of the same code."""

    student: ModelSize
    teacher: ModelSize
    batch: int
    seq: int
    prompt: int  # prompt tokens per row (no loss on them); the response is the rest
    top_k: int
    warmup: int
    steps: int
    loss_batch: int
    loss_seq: int
    loss_vocab: int
    loss_repeats: int
    gen_batch: int
    gen_prompt: int
    gen_new: int
    gen_repeats: int


FULL = Sizes(
    student=ModelSize(896, 24, 14, 2, 4864, 151936),  # Qwen2.5-0.5B
    teacher=ModelSize(1536, 28, 12, 2, 8960, 151936),  # Qwen2.5-1.5B
    batch=4,
    seq=1024,
    prompt=256,
    top_k=50,
    warmup=3,
    steps=10,
    loss_batch=1,
    loss_seq=4096,
    loss_vocab=152064,
    loss_repeats=3,
    gen_batch=32,
    gen_prompt=64,
    gen_new=128,
    gen_repeats=2,
)
TINY = Sizes(
    student=ModelSize(64, 2, 4, 2, 128, 1024),
    teacher=ModelSize(128, 2, 4, 2, 256, 1024),
    batch=2,
    seq=64,
    prompt=16,
    top_k=50,
    warmup=1,
    steps=2,
    loss_batch=1,
    loss_seq=64,
    loss_vocab=1024,
    loss_repeats=2,
    gen_batch=4,
    gen_prompt=8,
    gen_new=8,
    gen_repeats=1,
)
LOSS_VARIANTS = ["naive_log_softmax_kl", "kd_loss", "kd_loss_chunk64"]
FUSED_VARIANTS = ["naive", "logits_path", "fused", "fused_gpu_tiles", "trl_chunked", "liger_fused_jsd"]
GPU_TILES = {"row_chunk": 4096, "vocab_tile": 8192}  # the defaults suit a CPU's caches; a GPU wants bigger tiles
FUSED_BETA = 0.5  # JSD: the one divergence TRL's, Liger's and ours all have


# ---- imports that must work without trl / datasets -----------------------------------------------------------------


def _stub_package(package: str) -> None:
    """Register `package` as a bare namespace (its `__init__` not run), so its submodules import by path."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{package} is not a package")
    stub = types.ModuleType(package)
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__package__ = package
    stub.__file__ = spec.origin
    sys.modules[package] = stub
    parent, _, child = package.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, stub)


def import_isolated(name: str) -> tuple[types.ModuleType, str]:
    """Import `name`; if a parent package's `__init__` fails (e.g. `align_distill.data_gen` needs pyarrow), register
    that parent as a bare package (its folder on `__path__`, its `__init__` not run) and import `name` again.

    Why: on a stock CUDA image the modules measured here only need torch/transformers, but their packages' eager
    re-exports pull in datasets/pyarrow. Returns (module, how it was imported).
    """
    try:
        return importlib.import_module(name), "package import"
    except ImportError as error:
        first_error = f"{type(error).__name__}: {error}"
    parts = name.split(".")
    skipped = []
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent in sys.modules:
            continue
        try:
            importlib.import_module(parent)
        except ImportError:
            _stub_package(parent)
            skipped.append(parent)
    root = Path(importlib.util.find_spec(parts[0]).origin).parent
    for init in sorted(root.rglob("__init__.py")):
        package = ".".join(init.parent.relative_to(root.parent).parts)
        if package in sys.modules:
            continue
        try:  # packages the target imports from (e.g. `align_distill.data` for the tokenization contract)
            importlib.import_module(package)
        except ImportError:
            _stub_package(package)
            skipped.append(package)
    module = importlib.import_module(name)
    return module, f"by path, skipping __init__ of {', '.join(skipped) or '(none)'} ({first_error})"


# ---- helpers -------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where it came from) for MFU."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return CPU_NOMINAL_TFLOPS, "nominal CPU value (MFU not meaningful)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"table entry {key!r} for {name!r}"
    return None, f"unknown card {name!r}: pass --peak-tflops"


def build_lm(size: ModelSize, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A Qwen2-architecture causal LM with random weights (no download), tied embeddings like Qwen2.5-0.5B/1.5B."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(dtype)
    model.generation_config.eos_token_id = None  # fixed-length generation: never stop early
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _median_step(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> tuple[float, Any]:
    """Median seconds of `fn` over `steps` calls after `warmup` calls, synchronizing the device around each."""
    result = None
    for _ in range(warmup):
        result = fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


# ---- (a) distill step ----------------------------------------------------------------------------------------------


def distill_step(sizes: Sizes, device: torch.device, peak: float | None, grad_ckpt: bool) -> dict[str, Any]:
    """Step time / tokens/s / MFU of sft, live and cache on the same tokens, same student and optimizer."""
    losses, losses_import = import_isolated("align_distill.losses")
    dtype = torch.bfloat16
    student = build_lm(sizes.student, device, dtype).train()
    teacher = build_lm(sizes.teacher, device, dtype).eval().requires_grad_(False)
    if grad_ckpt:
        student.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, sizes.student.vocab, (sizes.batch, sizes.seq), generator=g).to(device)
    targets = torch.roll(ids, -1, dims=1)  # logits at position t predict token t + 1
    mask = torch.zeros(sizes.batch, sizes.seq, dtype=torch.bool, device=device)
    mask[:, sizes.prompt : sizes.seq - 1] = True  # response positions; the last has no next token
    b_idx, t_idx = mask.nonzero(as_tuple=True)

    t0 = time.perf_counter()
    with torch.no_grad():
        logprobs = teacher(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        cache_logprobs, cache_ids = logprobs.topk(sizes.top_k, dim=-1)
        del logprobs
    _sync(device)
    cache_build_s = time.perf_counter() - t0

    def step(mode: str) -> torch.Tensor:
        logits = student(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[b_idx, t_idx].float(), targets[b_idx, t_idx])
        if mode == "live":
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            loss = loss + losses.kd_loss(logits, teacher_logits, mask)
        elif mode == "cache":
            loss = loss + losses.topk_kd_loss(logits, cache_ids, cache_logprobs, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    n_student, n_teacher = n_params(student), n_params(teacher)
    tokens = sizes.batch * sizes.seq
    rows: list[dict[str, Any]] = []
    for mode in ["sft", "live", "cache"]:
        row: dict[str, Any] = {"mode": mode, "grad_ckpt": grad_ckpt}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds, loss = _median_step(lambda m=mode: step(m), sizes.warmup, sizes.steps, device)
        except torch.cuda.OutOfMemoryError:
            if row["grad_ckpt"]:
                raise
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            student.gradient_checkpointing_enable()
            row["grad_ckpt"] = True
            seconds, loss = _median_step(lambda m=mode: step(m), sizes.warmup, sizes.steps, device)
        tok_s = tokens / seconds
        flops_student = 6 * n_student * tok_s
        flops_teacher = 2 * n_teacher * tok_s if mode == "live" else 0.0
        row.update(
            step_s=seconds,
            tokens_per_s=tok_s,
            mfu=flops_student / (peak * 1e12) if peak else None,
            mfu_with_teacher=(flops_student + flops_teacher) / (peak * 1e12) if peak else None,
            loss=float(loss),
            peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        )
        rows.append(row)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_sft"] = row["tokens_per_s"] / base
    result = {
        "rows": rows,
        "batch": sizes.batch,
        "seq": sizes.seq,
        "prompt_tokens": sizes.prompt,
        "response_tokens_per_row": sizes.seq - 1 - sizes.prompt,
        "top_k": sizes.top_k,
        "student_params": n_student,
        "teacher_params": n_teacher,
        "cache_build_s": cache_build_s,
        "warmup_steps": sizes.warmup,
        "timed_steps": sizes.steps,
        "mfu_formula": "6 * student_params * tokens_per_s / peak; with teacher: + 2 * teacher_params (live)",
        "optimizer": "torch.optim.AdamW (fused on CUDA), state in the parameters' dtype (bf16)",
        "losses_import": losses_import,
    }
    return result  # the models and optimizer go with this frame; main() empties the CUDA cache


# ---- (b) loss memory -----------------------------------------------------------------------------------------------


def _loss_fn(variant: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    losses, _ = import_isolated("align_distill.losses")
    if variant == "naive_log_softmax_kl":
        return naive_kd
    if variant == "kd_loss":
        return lambda s, t, m: losses.kd_loss(s, t, m)
    if variant == "kd_loss_chunk64":
        return lambda s, t, m: losses.kd_loss(s, t, m, chunk_size=64)
    raise ValueError(f"unknown loss variant {variant!r}")


def loss_variant(variant: str, batch: int, seq: int, vocab: int, repeats: int, device: torch.device) -> dict:
    """Extra peak memory (MiB over the inputs) and median time of one forward + backward of `variant`."""
    fn = _loss_fn(variant)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, seq, vocab)
    student = (2 * torch.randn(shape, generator=g, device=device)).to(torch.bfloat16).requires_grad_(True)
    teacher = (2 * torch.randn(shape, generator=g, device=device)).to(torch.bfloat16)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=device)
    extra, value, meter = _first_backward(lambda: fn(student, teacher, mask), device)

    def again() -> None:
        student.grad = None
        fn(student, teacher, mask).backward()

    seconds, _ = _median_step(again, 0, repeats, device)
    return {
        "variant": variant,
        "extra_peak_mb": extra,
        "inputs_mb": 2 * student.numel() * student.element_size() / 2**20,
        "time_s": seconds,
        "loss": value,
        "meter": meter,
    }


def _first_backward(loss_fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float, str]:
    """One forward + backward: (extra peak MiB over the memory in use before it, loss value, the meter used)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = rss_mb()
    loss = loss_fn()
    loss.backward()
    _sync(device)
    if device.type == "cuda":
        peak, meter = torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    else:
        peak, meter = peak_rss_mb(), "peak RSS of a fresh process"
    return peak - before, float(loss.detach()), meter


def _cpu_worker(flag: str, args: tuple, timeout: float) -> dict[str, Any]:
    """One variant in a fresh process (`python -m bench.gpu_check FLAG ARGS`), so its peak RSS is its own."""
    command = [sys.executable, "-m", "bench.gpu_check", flag, json.dumps(args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{flag} {args[0]} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def loss_memory(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Every variant on the same inputs; on CPU each in its own process so peak RSS belongs to that variant."""
    rows = []
    for variant in LOSS_VARIANTS:
        args = (variant, sizes.loss_batch, sizes.loss_seq, sizes.loss_vocab, sizes.loss_repeats)
        if device.type == "cuda":
            rows.append(loss_variant(*args, device))
            continue
        rows.append(_cpu_worker("--loss-worker", args, 120))
    naive = rows[0]
    for row in rows:
        row["mem_vs_naive"] = row["extra_peak_mb"] / naive["extra_peak_mb"] if naive["extra_peak_mb"] > 0 else None
        row["time_vs_naive"] = row["time_s"] / naive["time_s"]
        row["loss_abs_diff_vs_naive"] = abs(row["loss"] - naive["loss"])
    return {"rows": rows, "batch": sizes.loss_batch, "seq": sizes.loss_seq, "vocab": sizes.loss_vocab}


# ---- (d) fused losses from hidden states ---------------------------------------------------------------------------


def _fused_fn(variant: str) -> Callable[..., torch.Tensor]:
    """The JSD of `variant` from (student hidden [T, H], student weight [V, H], teacher hidden, teacher weight).
    Raises ImportError when the variant's package is not installed (the row is then skipped)."""
    if variant == "trl_chunked":
        try:
            from trl.trainer.distillation_trainer import _chunked_divergence_loss
        except ImportError:  # the trainer module needs datasets: the kernel alone is enough
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            def _chunked_divergence_loss(hs, ht, ws, wt, mask, beta):
                values, _ = ChunkedDivergenceFunction.apply(hs[0], ws, None, ht[0], wt, None, beta)
                return values.sum() / hs.shape[1], None, None

        return lambda hs, ws, ht, wt: _chunked_divergence_loss(hs, ht, ws, wt, _ones(hs), FUSED_BETA)[0]
    if variant == "liger_fused_jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=FUSED_BETA)
        return lambda hs, ws, ht, wt: liger(hs[0], ws, ht[0], wt)
    losses, _ = import_isolated("align_distill.losses")
    if variant in ("fused", "fused_gpu_tiles"):
        tiles = GPU_TILES if variant == "fused_gpu_tiles" else {}
        return lambda hs, ws, ht, wt: losses.fused_kd_loss(hs, ws, ht, wt, _ones(hs), "jsd", beta=FUSED_BETA, **tiles)

    def logits_loss(hs, ws, ht, wt):
        with torch.no_grad():
            teacher = ht @ wt.T
        student = hs @ ws.T
        if variant == "logits_path":
            return losses.kd_loss(student, teacher, _ones(hs), "jsd", beta=FUSED_BETA)
        return losses.token_divergence(student.float(), teacher.float(), "jsd", beta=FUSED_BETA).mean()

    if variant != "naive" and variant != "logits_path":
        raise ValueError(f"unknown fused-loss variant {variant!r}")
    return logits_loss


def _importable(package: str) -> bool:
    """Whether `package` can be imported here, without importing it (a None entry in sys.modules blocks it)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def _ones(hidden: torch.Tensor) -> torch.Tensor:
    return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)


def fused_variant(variant: str, seq: int, hidden: int, vocab: int, repeats: int, device: torch.device) -> dict:
    """Extra peak memory (MiB over the inputs), gradient size and median time of one forward + backward."""
    try:
        fn = _fused_fn(variant)
    except ImportError as error:
        return {"variant": variant, "skipped": f"not importable: {error}"}
    g = torch.Generator(device=device).manual_seed(0)

    def tensor(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(shape, generator=g, device=device)).to(torch.bfloat16)

    hs, ht = tensor(1, seq, hidden).requires_grad_(True), tensor(1, seq, hidden)
    scale = 4 * hidden**-0.5  # logits of std ~4: peaked distributions like a trained head's
    ws, wt = tensor(vocab, hidden, scale=scale).requires_grad_(True), tensor(vocab, hidden, scale=scale)
    extra, value, meter = _first_backward(lambda: fn(hs, ws, ht, wt), device)

    def again() -> None:
        hs.grad = ws.grad = None
        fn(hs, ws, ht, wt).backward()

    seconds, _ = _median_step(again, 0, repeats, device)
    return {
        "variant": variant,
        "extra_peak_mb": extra,
        "input_grads_mb": (hs.numel() + ws.numel()) * hs.element_size() / 2**20,
        "time_s": seconds,
        "loss": value,
        "meter": meter,
    }


def fused_losses(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Every variant on the same inputs (on CPU each in its own process, as `loss_memory`); ratios vs TRL's row."""
    rows = []
    packages = {"trl_chunked": "trl", "liger_fused_jsd": "liger_kernel"}
    for variant in FUSED_VARIANTS:
        if variant in packages and not _importable(packages[variant]):
            rows.append({"variant": variant, "skipped": f"{packages[variant]} is not installed"})
            continue
        args = (variant, sizes.loss_seq, sizes.student.hidden, sizes.loss_vocab, sizes.loss_repeats)
        if device.type == "cuda":
            rows.append(fused_variant(*args, device))
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rows.append(_cpu_worker("--fused-worker", args, 300))
    trl = next((r for r in rows if r["variant"] == "trl_chunked" and "skipped" not in r), None)
    for row in rows:
        if "skipped" in row:
            continue
        row["mem_vs_input_grads"] = row["extra_peak_mb"] / row["input_grads_mb"]
        if trl is not None:
            row["mem_vs_trl"] = row["extra_peak_mb"] / trl["extra_peak_mb"] if trl["extra_peak_mb"] > 0 else None
            row["time_vs_trl"] = row["time_s"] / trl["time_s"]
    return {"rows": rows, "seq": sizes.loss_seq, "hidden": sizes.student.hidden, "vocab": sizes.loss_vocab}


# ---- (c) generation ------------------------------------------------------------------------------------------------


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer whose id i is the word `w{i}` (0 = <pad>, 1 = <unk>, no EOS): text prompts map to
    exactly the ids we choose, with no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def generation(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Greedy new tokens/s, raw `model.generate` vs `TransformersGenerator.generate`, same prompts and batch."""
    from transformers import GenerationConfig

    model = build_lm(sizes.student, device, torch.bfloat16).eval()
    g = torch.Generator().manual_seed(2)
    prompt_ids = torch.randint(2, sizes.student.vocab, (sizes.gen_batch, sizes.gen_prompt), generator=g)
    config = GenerationConfig(
        max_new_tokens=sizes.gen_new, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0
    )
    raw_out: list[torch.Tensor] = []

    @torch.inference_mode()
    def raw() -> int:
        ids = prompt_ids.to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        raw_out[:] = [out[:, sizes.gen_prompt :].cpu()]
        return raw_out[0].numel()

    result: dict[str, Any] = {
        "batch": sizes.gen_batch,
        "prompt_tokens": sizes.gen_prompt,
        "new_tokens": sizes.gen_new,
        "decoding": "greedy, no EOS (fixed length)",
    }
    runners: dict[str, Callable[[], int]] = {"raw_generate": raw}
    backend_out: list[list[int]] = []
    try:
        module, how = import_isolated("align_distill.data_gen.backends.transformers_backend")
        base, _ = import_isolated("align_distill.data_gen.backends.base")
        result["backend_import"] = how
        generator = module.TransformersGenerator(
            model, word_tokenizer(sizes.student.vocab), batch_size=sizes.gen_batch
        )
        prompts = [" ".join(f"w{i}" for i in row) for row in prompt_ids.tolist()]
        params = base.SamplingParams(n=1, temperature=0.0, max_new_tokens=sizes.gen_new)

        def backend() -> int:
            completions = generator.generate(prompts, params)
            backend_out[:] = [c[0].token_ids for c in completions]
            return sum(len(ids) for ids in backend_out)

        runners["backend_generate"] = backend
    except Exception as error:  # the raw number is still worth having
        result["backend_import"] = f"failed: {type(error).__name__}: {error}"
    for run in runners.values():  # warm-up (kernels, cuBLAS handles, allocator)
        run()
    best: dict[str, tuple[float, int]] = {}
    for _ in range(sizes.gen_repeats):  # interleaved, best of n: background load hits both alike
        for name, run in runners.items():
            _sync(device)
            t0 = time.perf_counter()
            count = run()
            _sync(device)
            seconds = time.perf_counter() - t0
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, count)
    rows = [{"path": name, "seconds": s, "new_tokens": n, "tokens_per_s": n / s} for name, (s, n) in best.items()]
    for row in rows:
        row["vs_raw"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    result["rows"] = rows
    if backend_out:
        same = [list(r) == b for r, b in zip(raw_out[0].tolist(), backend_out)]
        result["backend_same_tokens_fraction"] = sum(same) / len(same)
    return result


# ---- report --------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:.3e}"
    return str(value)


def table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [columns] + [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(cells[0], widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells[1:]]
    return "\n".join(line.rstrip() for line in lines)


def render(report: dict[str, Any]) -> str:
    env = report["env"]
    out = [
        f"== gpu_check ({report['mode']}) on {env['device_name']}: torch {env['torch']}, transformers "
        f"{env['transformers']}, peak bf16 {_fmt(env['peak_tflops'])} TFLOP/s ({env['peak_source']})"
    ]
    a = report.get("distill_step")
    if a and "rows" in a:
        out.append(
            table(
                f"\n(a) distill step: B={a['batch']} T={a['seq']} (prompt {a['prompt_tokens']}), student "
                f"{a['student_params'] / 1e6:.1f}M, teacher {a['teacher_params'] / 1e6:.1f}M, bf16, top-k "
                f"{a['top_k']}, {a['warmup_steps']} warmup + {a['timed_steps']} timed steps (median)",
                a["rows"],
                ["mode", "step_s", "tokens_per_s", "vs_sft", "mfu", "mfu_with_teacher", "peak_mem_gb", "loss"],
            )
        )
        out.append(
            f"    MFU = 6 * N_student * tokens/s / peak; mfu_with_teacher adds 2 * N_teacher (live only); "
            f"cache build {a['cache_build_s']:.3g} s"
        )
    b = report.get("loss_memory")
    if b and "rows" in b:
        out.append(
            table(
                f"\n(b) loss forward+backward, bf16 logits B={b['batch']} T={b['seq']} V={b['vocab']} "
                f"(meter: {b['rows'][0]['meter']})",
                b["rows"],
                ["variant", "extra_peak_mb", "mem_vs_naive", "time_s", "time_vs_naive", "loss_abs_diff_vs_naive"],
            )
        )
    c = report.get("generation")
    if c and "rows" in c:
        out.append(
            table(
                f"\n(c) generation: batch {c['batch']}, prompt {c['prompt_tokens']}, {c['new_tokens']} new tokens, "
                f"{c['decoding']}",
                c["rows"],
                ["path", "seconds", "new_tokens", "tokens_per_s", "vs_raw"],
            )
        )
        out.append(f"    backend import: {c['backend_import']}")
        if "backend_same_tokens_fraction" in c:
            out.append(f"    rows where backend tokens == raw tokens: {c['backend_same_tokens_fraction']:.0%}")
    d = report.get("fused_losses")
    if d and "rows" in d:
        out.append(
            table(
                f"\n(d) fused losses: JSD β={FUSED_BETA} from bf16 hidden states T={d['seq']} H={d['hidden']}, "
                f"V={d['vocab']}, forward+backward",
                [r for r in d["rows"] if "skipped" not in r],
                ["variant", "extra_peak_mb", "input_grads_mb", "mem_vs_input_grads", "mem_vs_trl", "time_s",
                 "time_vs_trl", "loss"],
            )
        )
        for row in d["rows"]:
            if "skipped" in row:
                out.append(f"    {row['variant']}: skipped ({row['skipped']})")
    for name, error in report.get("errors", {}).items():
        out.append(f"\n!! {name} FAILED: {error.strip().splitlines()[-1]}")
    return "\n".join(out)


def _environment(device: torch.device, peak: float | None, source: str) -> dict[str, Any]:
    import transformers

    return {
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "peak_tflops": peak,
        "peak_source": source,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "attention": "sdpa",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny: the code paths, on CPU")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and shapes (hidden 64, 2 layers, V 1024)")
    parser.add_argument("--batch", type=int, help="distill-step batch size (default 4)")
    parser.add_argument("--seq", type=int, help="distill-step sequence length (default 1024)")
    parser.add_argument("--grad-ckpt", action="store_true", help="student gradient checkpointing from the start")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: from the card name)")
    parser.add_argument("--sections", default="distill_step,loss_memory,generation,fused_losses")
    parser.add_argument("--json", type=Path, help="JSON output (default: $OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--loss-worker", help=argparse.SUPPRESS)
    parser.add_argument("--fused-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.fused_worker:  # CPU memory measurement in a fresh process (see fused_losses)
        print(json.dumps(fused_variant(*json.loads(args.fused_worker), torch.device("cpu"))))
        return 0

    if args.loss_worker:  # CPU memory measurement in a fresh process (see loss_memory)
        print(json.dumps(loss_variant(*json.loads(args.loss_worker), torch.device("cpu"))))
        return 0
    device = torch.device("cpu" if args.dry_run else args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.dry_run or args.tiny
    sizes = TINY if tiny else FULL
    overrides: dict[str, int] = {}
    if args.batch:
        overrides["batch"] = args.batch
    if args.seq:
        overrides.update(seq=args.seq, prompt=args.seq // 4)
    sizes = Sizes(**{**asdict(sizes), **overrides, "student": sizes.student, "teacher": sizes.teacher})
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak, source = peak_tflops(device, args.peak_tflops)
    json_path = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    report: dict[str, Any] = {
        "mode": f"{'tiny' if tiny else 'full'} sizes on {device.type}",
        "env": _environment(device, peak, source),
        "sizes": asdict(sizes),
        "errors": {},
    }
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "distill_step": lambda: distill_step(sizes, device, peak, args.grad_ckpt),
        "loss_memory": lambda: loss_memory(sizes, device),
        "generation": lambda: generation(sizes, device),
        "fused_losses": lambda: fused_losses(sizes, device),
    }
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            report[name] = sections[name]()
            report[name]["section_s"] = time.perf_counter() - t0
        except Exception:
            report["errors"][name] = traceback.format_exc()
            print(report["errors"][name], file=sys.stderr, flush=True)
        gc.collect()  # a section's models (and reference cycles through closures) go before the next starts
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2, default=str))
    print(render(report), flush=True)
    if json_path:
        print(f"\nJSON: {json_path}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
