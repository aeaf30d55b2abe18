"""The transformers backend: `model.generate` and one forward pass per scoring batch — the CPU default, and the
reference the other backends are checked against.

Sampling with per-prompt seeds inside one batch: `generate` runs in greedy mode and a logits processor adds
exponential-race noise (argmax(log p − log E) with E ~ Exp(1) samples from p), E drawn by a counter-based hash of
(the sequence's seed, the step, the token id). Temperature, top-k and top-p are applied first with transformers'
own warpers. So a prompt's samples depend on its seed only, not on which prompts share its batch — which is what
lets a resumed job reproduce an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from align_distill.data.tokens import encode_prompt
from align_distill.data_gen.backends.base import Completion, Generator, Prompt, SamplingParams, TokenScores
from align_distill.models.loading import check_weights, loading_kwargs


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a prompt whose seed is `seed` (independent streams per sample)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # odd 64-bit constants as signed int64 (tensor arithmetic wraps)
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _int64(value: int) -> int:
    """A Python int wrapped to the signed 64-bit range, as tensor arithmetic would wrap it."""
    return (value + 2**63) % 2**64 - 2**63


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)  # logical shift on int64


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors: neighbouring inputs give independent-looking outputs."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


class ExponentialRaceSampler(LogitsProcessor):
    """Turns greedy decoding into sampling, each row with its own seed (see the module docstring).

    The noise of row r at decoding step t for token v is a counter-based hash of (seed_r, t, v), computed for the
    whole batch at once: no per-row random generator state, and nothing depends on the other rows.
    """

    def __init__(self, seeds: list[int], device: torch.device):
        self.row_keys = _splitmix64(torch.tensor(seeds, dtype=torch.long, device=device))
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        keys = _splitmix64(self.row_keys ^ _int64(step * _GOLDEN))  # [B]
        tokens = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.long) * _GOLDEN
        bits = _shift_right(_splitmix64(keys[:, None] + tokens[None, :]), 11)  # 53 random bits
        uniform = (bits.double() + 0.5) * 2.0**-53  # in (0, 1)
        exponential = -torch.log(uniform)
        return torch.log_softmax(scores.float(), dim=-1) - exponential.log().float()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}") from None


class TransformersGenerator(Generator):
    """A causal LM loaded with transformers.

    Args:
        model: a local folder / hub id, or an already loaded model (not freed by `close`).
        tokenizer: folder / id or tokenizer object; defaults to the model's.
        dtype: "auto" (bf16/fp16 on GPU, fp32 on CPU), "float32", "bfloat16" or "float16".
        device: "auto", "cpu", "cuda", "cuda:1", ...
        batch_size: sequences per `generate` call / per scoring forward pass.
        max_batch_tokens: cap on (rows × padded length) per scoring forward pass, bounding activation memory.
        logprob_budget_bytes: cap on the float32 log-prob tensor [rows, response length, vocabulary] built at once.
    """

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
        tokenizer: str | Path | Any | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 16,
        max_batch_tokens: int = 32768,
        logprob_budget_bytes: int = 2**30,
        revision: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ):
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size}, {max_batch_tokens}")
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.logprob_budget_bytes = logprob_budget_bytes
        self._owns_model = not isinstance(model, PreTrainedModel)
        if isinstance(model, PreTrainedModel):
            self.model = model
        else:
            target = _resolve_device(device)
            source = check_weights(model, revision)
            kwargs: dict[str, Any] = {
                "dtype": _resolve_dtype(dtype, target),
                **loading_kwargs(trust_remote_code, revision),
            }
            if attn_implementation:
                kwargs["attn_implementation"] = attn_implementation
            self.model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            self.model.to(target)
        self.model.eval()
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            source = str(tokenizer) if tokenizer is not None else self.model.name_or_path
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = sorted({*eos_ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
        self.vocab_size: int = self.model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy the tensors in place into this generator's model (names must match its parameters; a tied weight may
        come under each of its names)."""
        target = dict(self.model.named_parameters(remove_duplicate=False))
        count = 0
        for name, tensor in weights:
            if name not in target:
                raise KeyError(f"rollout model has no parameter {name!r} (the student and the rollout model differ)")
            target[name].copy_(tensor.to(target[name].device, target[name].dtype))
            count += 1
        return count

    # -- generation ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, prompts: list[Prompt], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions per prompt. `seeds[i]` (default: `sample_seed(params.seed, i)`) fixes prompt i's
        samples independently of the batch it is in; greedy decoding ignores seeds."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        encoded = [encode_prompt(self.tokenizer, prompt) for prompt in prompts]
        jobs = [
            (i, j, sample_seed(seeds[i] if seeds is not None else sample_seed(params.seed, i), j))
            for i in range(len(prompts))
            for j in range(params.n)
        ]
        results: list[list[Completion]] = [[] for _ in prompts]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            outputs = self._generate_batch([encoded[i] for i, _, _ in chunk], params, [s for _, _, s in chunk])
            for (i, _, _), completion in zip(chunk, outputs):
                results[i].append(completion)
        return results

    def _generate_batch(
        self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[Completion]:
        length = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompt_ids), length), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
            if not ids:
                raise ValueError(f"prompt {row} of the batch encodes to no tokens")
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            attention[row, length - len(ids) :] = 1
        processors = LogitsProcessorList()
        if not params.greedy:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1:
                processors.append(TopPLogitsWarper(params.top_p))
            processors.append(ExponentialRaceSampler(seeds, self.device))
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
            stop_strings=list(params.stop) or None,
        )
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=config,
            logits_processor=processors,
            tokenizer=self.tokenizer if params.stop else None,
        )
        return [self._completion(row[length:].tolist(), params) for row in output.cpu()]

    def _completion(self, ids: list[int], params: SamplingParams) -> Completion:
        """Cut a generated row after its EOS or after the token that completes a stop string (later tokens are
        padding); the text leaves out special tokens and the stop string."""
        end, reason = len(ids), "length"
        eos = set(self.eos_ids)
        for t, token in enumerate(ids):
            if token in eos:
                end, reason = t + 1, "stop"
                break
        if params.stop:
            stop_end = self._stop_end(ids[:end], params.stop)
            if stop_end is not None:
                end, reason = stop_end, "stop"
        ids = ids[:end]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if params.stop:
            cut = min((text.find(s) for s in params.stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
        return Completion(text=text, token_ids=ids, finish_reason=reason)

    def _stop_end(self, ids: list[int], stops: tuple[str, ...]) -> int | None:
        """Smallest t such that the first t ids decode to text containing a stop string (binary search)."""

        def has_stop(t: int) -> bool:
            text = self.tokenizer.decode(ids[:t], skip_special_tokens=True)
            return any(s in text for s in stops)

        if not has_stop(len(ids)):
            return None
        low, high = 1, len(ids)
        while low < high:
            middle = (low + high) // 2
            if has_stop(middle):
                high = middle
            else:
                low = middle + 1
        return low

    # -- scoring ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        top_k: int,
        gather_ids: list[list[list[int]]] | None = None,
    ) -> list[TokenScores]:
        """Per response token: its log-prob, the top-k (or `gather_ids`) ids and log-probs, and the log of the rest
        mass, all at temperature 1 in float32, from one forward pass over prompt + response."""
        if len(prompt_ids) != len(response_ids) or (gather_ids is not None and len(gather_ids) != len(prompt_ids)):
            raise ValueError("prompt_ids, response_ids (and gather_ids) must have one entry per row")
        if gather_ids is None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
            if not prompt:
                raise ValueError(f"row {row}: empty prompt ids; the first response token needs a context")
            if gather_ids is not None and len(gather_ids[row]) != len(response):
                raise ValueError(f"row {row}: {len(gather_ids[row])} gather rows for {len(response)} response tokens")
        results: list[TokenScores | None] = [None] * len(prompt_ids)
        order = sorted(range(len(prompt_ids)), key=lambda r: -(len(prompt_ids[r]) + len(response_ids[r])))
        batch: list[int] = []
        for row in order:  # longest first: a batch's padded width is its first row's length
            if batch:
                width = len(prompt_ids[batch[0]]) + len(response_ids[batch[0]])
                if len(batch) == self.batch_size or width * (len(batch) + 1) > self.max_batch_tokens:
                    self._score_batch(batch, prompt_ids, response_ids, top_k, gather_ids, results)
                    batch = []
            batch.append(row)
        if batch:
            self._score_batch(batch, prompt_ids, response_ids, top_k, gather_ids, results)
        return results  # type: ignore[return-value]

    def _score_batch(
        self,
        rows: list[int],
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        top_k: int,
        gather_ids: list[list[list[int]]] | None,
        results: list[TokenScores | None],
    ) -> None:
        sequences = [prompt_ids[r] + response_ids[r] for r in rows]
        length = max(len(s) for s in sequences)
        longest_response = max(len(response_ids[r]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, sequence in enumerate(sequences):  # left padding: all responses end at the last position
            input_ids[i, length - len(sequence) :] = torch.tensor(sequence)
            attention[i, length - len(sequence) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        if longest_response == 0:
            for r in rows:
                results[r] = TokenScores([], [], [], [])
            return
        # Only the last R+1 positions' logits are needed: position p predicts token p+1.
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            position_ids=positions.to(self.device),
            logits_to_keep=longest_response + 1,
            use_cache=False,
        ).logits[:, :-1]
        width = longest_response
        chunk = max(1, self.logprob_budget_bytes // (width * logits.shape[-1] * 4))
        for first in range(0, len(rows), chunk):  # float32 log-probs of a few rows at a time: bounded memory
            self._signals(
                rows[first : first + chunk], logits[first : first + chunk], response_ids, top_k, gather_ids, results
            )

    def _signals(
        self,
        rows: list[int],
        logits: torch.Tensor,
        response_ids: list[list[int]],
        top_k: int,
        gather_ids: list[list[list[int]]] | None,
        results: list[TokenScores | None],
    ) -> None:
        """Top-k (or gathered) log-probs of rows whose responses are right-aligned in `logits` [B, R, V].

        Only the response positions are scored: a batch is sorted by prompt + response length, so its responses
        differ in length, and the padding rows of `[B, R]` (often a third of them) would cost top-k work for
        nothing. The positions go flat, row after row, and each row's `TokenScores` holds views of its segment."""
        width = logits.shape[1]
        lengths = [len(response_ids[r]) for r in rows]
        if not sum(lengths):
            for r in rows:
                results[r] = TokenScores([], [], [], [])
            return
        starts = width - torch.tensor(lengths)
        counted = (torch.arange(width) >= starts[:, None]).to(logits.device)
        logprobs = torch.log_softmax(logits[counted].float(), dim=-1)  # [n, V], the rows' positions in order
        targets = torch.tensor([t for r in rows for t in response_ids[r]], dtype=torch.long)
        token_logprobs = logprobs.gather(-1, targets.to(logprobs.device)[:, None])[:, 0]
        if gather_ids is not None:
            asked = [np.asarray(gather_ids[r], dtype=np.int64) for r in rows]  # [T, K] arrays or nested lists
            ids = torch.from_numpy(np.concatenate([a for a in asked if len(a)])).to(logprobs.device)
            values = logprobs.gather(-1, ids)
        else:
            values, ids = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
        # log of the mass outside `ids`; in place: the log-probs are not read again (no second [n, V] tensor)
        rest = logprobs.scatter_(-1, ids, float("-inf")).logsumexp(-1)
        # one conversion for the chunk; each row's TokenScores holds views of these arrays
        ids_np = ids.cpu().numpy()
        token_np, values_np, rest_np = (t.cpu().double().numpy() for t in (token_logprobs, values, rest))
        end = 0
        for r, length in zip(rows, lengths):
            part = slice(end, end + length)
            end += length
            results[r] = TokenScores(
                token_logprobs=token_np[part],
                topk_ids=ids_np[part],
                topk_logprobs=values_np[part],
                rest_logmass=rest_np[part],
            )

    def close(self) -> None:
        if self._owns_model:
            del self.model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
