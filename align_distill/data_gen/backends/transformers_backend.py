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


_MASK_ELEMENTS = 2**28
"""Cap on (sequences × width²) of a shared-prompt batch: its [G, 1, W, W] attention mask (256 MiB as booleans)."""


def prompt_groups(prompt_ids: list[list[int]]) -> list[list[int]]:
    """Indices of the entries with equal prompt ids, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for entry, prompt in enumerate(prompt_ids):
        groups.setdefault(tuple(prompt), []).append(entry)
    return list(groups.values())


def packed_or_apart(group: list[int], prompt: int, lengths: list[int], hidden: int | None) -> list[list[int]]:
    """`group` as one packed sequence, or each entry alone when packing would cost more. Per layer, a sequence of w
    tokens costs about 12H² multiply-adds per token in its projections and 2H per query-key pair in attention (sdpa
    computes every pair, masked or not), so cost(w) = w + w²/(6H) in units of one token's projections: packing saves
    the repeated prompt's tokens and pays in the quadratic term, which wins for long prompts and wide models and loses
    for many long responses to a short prompt."""
    if len(group) == 1:
        return [group]

    def cost(width: int) -> float:
        return width + (width * width / (6 * hidden) if hidden else 0.0)

    packed = cost(prompt + sum(lengths[e] for e in group))
    apart = sum(cost(prompt + lengths[e]) for e in group)
    return [group] if packed < apart else [[e] for e in group]


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
        logprob_budget_bytes: cap on the float32 log-prob tensor [response tokens, vocabulary] built at once.
        share_prompts: score the responses of one prompt (a preference row's chosen and rejected) in one sequence
            that holds the prompt once, each response masked from the others (`shares_prompts` says when the model
            allows it; otherwise one sequence per response).
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
        share_prompts: bool = True,
    ):
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size}, {max_batch_tokens}")
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.logprob_budget_bytes = logprob_budget_bytes
        self.share_prompts = share_prompts
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
        mass, all at temperature 1 in float32, from one forward pass over prompt + response.

        Entries with equal prompt ids (a preference row's chosen and rejected) are scored in one sequence, the prompt
        once (`share_prompts`, see `shares_prompts`)."""
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
        groups = [[e] for e in range(len(prompt_ids))]
        if self.shares_prompts:
            hidden = getattr(self.model.config.get_text_config(), "hidden_size", None)
            lengths = [len(r) for r in response_ids]
            groups = [
                part
                for group in prompt_groups(prompt_ids)
                for part in packed_or_apart(group, len(prompt_ids[group[0]]), lengths, hidden)
            ]
        shared = any(len(group) > 1 for group in groups)

        def width(group: list[int]) -> int:
            return len(prompt_ids[group[0]]) + sum(len(response_ids[e]) for e in group)

        batch: list[list[int]] = []
        entries = 0
        for group in sorted(groups, key=lambda g: -width(g)):  # longest first: a batch's width is its first row's
            if batch:
                rows, padded = len(batch) + 1, width(batch[0])
                if (
                    entries + len(group) > self.batch_size
                    or padded * rows > self.max_batch_tokens
                    or (shared and padded * padded * rows > _MASK_ELEMENTS)
                ):
                    self._score_batch(batch, prompt_ids, response_ids, top_k, gather_ids, results)
                    batch, entries = [], 0
            batch.append(group)
            entries += len(group)
        if batch:
            self._score_batch(batch, prompt_ids, response_ids, top_k, gather_ids, results)
        return results  # type: ignore[return-value]

    @property
    def shares_prompts(self) -> bool:
        """Whether entries with one prompt may share a sequence: asked for (`share_prompts`), and the model is one of
        transformers' own with full causal attention in every layer under sdpa or eager attention, which take the
        4D mask that keeps each response from seeing the others (a sliding window or flash attention would not)."""
        config = self.model.config
        layer_types = getattr(config, "layer_types", None)
        full = (
            all(kind == "full_attention" for kind in layer_types)
            if layer_types is not None
            else getattr(config, "sliding_window", None) is None
        )
        return (
            self.share_prompts
            and full
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and type(self.model).__module__.startswith("transformers.models.")
        )

    def _score_batch(
        self,
        groups: list[list[int]],
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        top_k: int,
        gather_ids: list[list[list[int]]] | None,
        results: list[TokenScores | None],
    ) -> None:
        """One forward pass over `groups`, each a sequence [prompt, response, response, ...] of the entries that share
        its prompt, left-padded so that every sequence ends at the last position. Position p predicts token p+1: a
        response's first token is predicted at the prompt's last position, the others at the response's own."""
        entries = [e for group in groups for e in group]
        for e in entries:
            if not response_ids[e]:
                results[e] = TokenScores([], [], [], [])
        scored = [e for e in entries if response_ids[e]]
        if not scored:
            return
        sequences, segments, positions = [], [], []
        rows: list[np.ndarray] = []  # where each scored token is predicted: batch row and column of the kept window,
        columns: list[np.ndarray] = []  # flat in entry order
        keep = max(1 + sum(len(response_ids[e]) for e in group) for group in groups)  # last prompt token onwards
        for g, group in enumerate(groups):
            prompt = prompt_ids[group[0]]
            shift = keep - len(prompt) - sum(len(response_ids[e]) for e in group)  # position q: column q + shift
            sequence, segment, position = list(prompt), [0] * len(prompt), list(range(len(prompt)))
            for j, e in enumerate(group):
                response = response_ids[e]
                start = shift + len(sequence)
                if response:
                    predicting = np.arange(start - 1, start + len(response) - 1)
                    predicting[0] = shift + len(prompt) - 1
                    columns.append(predicting)
                    rows.append(np.full(len(response), g))
                sequence += response
                segment += [j + 1] * len(response)
                position += range(len(prompt), len(prompt) + len(response))
            sequences.append(sequence)
            segments.append(segment)
            positions.append(position)
        padded = len(sequences[0])
        input_ids = np.full((len(groups), padded), self.pad_id, dtype=np.int64)
        segment_ids = np.full((len(groups), padded), -1, dtype=np.int64)
        position_ids = np.zeros((len(groups), padded), dtype=np.int64)
        for g, (sequence, segment, position) in enumerate(zip(sequences, segments, positions)):
            input_ids[g, padded - len(sequence) :] = sequence
            segment_ids[g, padded - len(sequence) :] = segment
            position_ids[g, padded - len(sequence) :] = position
        segment_tensor = torch.from_numpy(segment_ids).to(self.device)  # the mask is built where it is used
        if any(len(group) > 1 for group in groups):
            attention = self._shared_prompt_mask(segment_tensor)
        else:
            attention = (segment_tensor >= 0).long()
        logits = self.model(
            input_ids=torch.from_numpy(input_ids).to(self.device),
            attention_mask=attention,
            position_ids=torch.from_numpy(position_ids).to(self.device),
            logits_to_keep=keep,
            use_cache=False,
        ).logits
        row_index = torch.from_numpy(np.concatenate(rows)).to(logits.device)
        column_index = torch.from_numpy(np.concatenate(columns)).to(logits.device)
        budget = max(1, self.logprob_budget_bytes // (logits.shape[-1] * 4))  # float32 log-prob rows at once
        first = token = 0
        while first < len(scored):  # a few entries at a time: bounded memory, results independent of the split
            last, count = first + 1, len(response_ids[scored[first]])
            while last < len(scored) and count + len(response_ids[scored[last]]) <= budget:
                count += len(response_ids[scored[last]])
                last += 1
            part = slice(token, token + count)
            flat = logits[row_index[part], column_index[part]]
            self._signals(scored[first:last], flat, response_ids, top_k, gather_ids, results)
            first, token = last, token + count

    def _shared_prompt_mask(self, segments: torch.Tensor) -> torch.Tensor:
        """[G, 1, W, W] attention of packed sequences (`segments`: -1 padding, 0 prompt, j+1 response j): causal,
        each response sees the prompt and itself only, a padding position itself only (no empty row, no NaN).
        Boolean for sdpa, additive for eager attention."""
        keys, queries = segments[:, None, :], segments[:, :, None]
        width = segments.shape[-1]
        allowed = (keys >= 0) & ((keys == 0) | (keys == queries))
        allowed &= torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
        allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
        if self.model.config._attn_implementation == "eager":
            dtype = self.model.dtype
            additive = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
            return additive.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        return allowed[:, None]

    def _signals(
        self,
        entries: list[int],
        logits: torch.Tensor,
        response_ids: list[list[int]],
        top_k: int,
        gather_ids: list[list[list[int]]] | None,
        results: list[TokenScores | None],
    ) -> None:
        """Top-k (or gathered) log-probs of `entries` from `logits` [n, V]: the positions predicting their response
        tokens, entry after entry; each entry's `TokenScores` holds views of its segment of one conversion."""
        lengths = [len(response_ids[e]) for e in entries]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor([t for e in entries for t in response_ids[e]], dtype=torch.long)
        token_logprobs = logprobs.gather(-1, targets.to(logprobs.device)[:, None])[:, 0]
        if gather_ids is not None:
            asked = [np.asarray(gather_ids[e], dtype=np.int64) for e in entries]  # [T, K] arrays or nested lists
            ids = torch.from_numpy(np.concatenate(asked)).to(logprobs.device)
            values = logprobs.gather(-1, ids)
        else:
            values, ids = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
        # log of the mass outside `ids`; in place: the log-probs are not read again (no second [n, V] tensor)
        rest = logprobs.scatter_(-1, ids, float("-inf")).logsumexp(-1)
        ids_np = ids.cpu().numpy()
        token_np, values_np, rest_np = (t.cpu().double().numpy() for t in (token_logprobs, values, rest))
        end = 0
        for e, length in zip(entries, lengths):
            part = slice(end, end + length)
            end += length
            results[e] = TokenScores(
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
