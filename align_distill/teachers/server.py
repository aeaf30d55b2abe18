"""A served teacher: a running vLLM OpenAI-compatible server asked, at train time, for the top-k log-probs of the
training sequences (docs/teachers.md, "server").

Each batch row's prompt + response token ids go to `/v1/completions` as a token-id prompt with `max_tokens: 1` and
`prompt_logprobs: k` (vLLM's extension: per prompt position the top-k ids by rank plus the actual token); the
response positions become the same `BatchSignals` tensors the cache reader returns, in float32 (the cache rounds to
float16). Requests, concurrency (`max_concurrency` rows in flight; vLLM batches them), the per-attempt deadline and
retries with backoff are `data_gen`'s `OpenAIGenerator` (`score`), shared with the `signals` job's server backend.

Gather mode (ADPA's reference at the DPO teacher's ids) has no server API of its own: the full vocabulary is asked
for (`prompt_logprobs: V`, the server needs `--max-logprobs -1`) and gathered here — V log-probs per token on the
wire, so prefer `loss_mode: official` or a cache for a large-vocabulary reference.

Vocabulary check, before training: the server must tokenize a probe text exactly as the student's tokenizer does
(`/tokenize`), and decode the student's last token id (`/detokenize`) to the same text while knowing no id past it;
otherwise the served log-probs would belong to other tokens. A server without those endpoints is used with a
warning. A server that stops answering mid-run is a `TeacherServerError` after the retries: the run stops, and a
rerun with `--resume_from_checkpoint` continues from the last checkpoint once the server is back.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import httpx
import torch

from align_distill.data_gen.backends.openai_backend import OpenAIGenerator, ServerError
from align_distill.errors import UserError

from .signals import BatchSignals, batch_sequences, scatter_rows

logger = logging.getLogger(__name__)

# tokenizes into many kinds of pieces: words, digits, punctuation, non-ASCII letters, whitespace runs
PROBE = "The quick brown fox, 1234 jumps! naïve café — 你好\n\t  end."
CLIENT_KEYS = ("api_key_env", "max_concurrency", "timeout", "max_retries", "backoff_base", "backoff_max")


class TeacherServerError(UserError):
    """The teacher server is unreachable, answers errors, or serves another vocabulary than the student's."""


class ServerTeacher:
    """Top-k teacher signals from a vLLM OpenAI-compatible server at `url` (e.g. `http://host:8000/v1`).

    Args:
        url: the server's OpenAI base URL.
        tokenizer: the student's tokenizer (the served model must share it; checked unless `check_vocabulary=False`).
        top_k: ids per position.
        name: the teacher's name in errors, metrics and routing.
        model: the served model name (default: the server's first model, from `/v1/models`).
        client_kwargs: `OpenAIGenerator` settings: `api_key_env` (default `OPENAI_API_KEY`), `max_concurrency`
            (rows in flight, default 8), `timeout` (s per attempt), `max_retries`, `backoff_base`, `backoff_max`.
    """

    kind = "server"

    def __init__(
        self,
        url: str,
        tokenizer: Any,
        top_k: int,
        name: str = "teacher",
        model: str | None = None,
        client_kwargs: dict[str, Any] | None = None,
        check_vocabulary: bool = True,
    ):
        unknown = sorted(set(client_kwargs or {}) - set(CLIENT_KEYS))
        if unknown:
            raise TeacherServerError(
                f"teacher {name!r}: unknown server setting(s) {unknown}; known: {', '.join(CLIENT_KEYS)}"
            )
        self.url, self.name, self.top_k = url.rstrip("/"), name, top_k
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.client_kwargs = dict(client_kwargs or {})
        self._client: OpenAIGenerator | None = None
        self._pid: int | None = None
        self.model = model or self._served_model()
        if check_vocabulary:
            self.check_vocabulary()

    def __repr__(self) -> str:
        return f"ServerTeacher(name={self.name!r}, url={self.url!r}, model={self.model!r}, top_k={self.top_k})"

    # -- HTTP ------------------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.client_kwargs.get("api_key_env", "OPENAI_API_KEY"))
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _served_model(self) -> str:
        try:
            answer = httpx.get(f"{self.url}/models", headers=self._headers(), timeout=30.0)
            answer.raise_for_status()
            return str(answer.json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
            raise TeacherServerError(
                f"teacher {self.name!r}: could not list the models served at {self.url}/models "
                f"({type(error).__name__}: {error}); is the server running? (or set the served model name)"
            ) from None

    def client(self, base_url: str | None = None) -> OpenAIGenerator:
        """The HTTP client of this process (made again after a fork: a data-loader worker gets its own)."""
        if base_url is not None:
            return OpenAIGenerator(base_url, self.model, mode="completions", **self.client_kwargs)
        if self._client is None or self._pid != os.getpid():
            self._client = OpenAIGenerator(self.url, self.model, mode="completions", **self.client_kwargs)
            self._pid = os.getpid()
        return self._client

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None

    # -- vocabulary --------------------------------------------------------------------------------------------------
    def check_vocabulary(self) -> None:
        """`TeacherServerError` unless the server tokenizes like the student (see the module docstring)."""
        root = self.url.removesuffix("/v1")
        probe = self.client(root)
        where = f"teacher {self.name!r} served at {self.url} (model {self.model!r})"
        try:
            try:
                body = {"model": self.model, "prompt": PROBE, "add_special_tokens": False}
                served = probe.post_json("/tokenize", body)
            except ServerError as error:
                if "HTTP 404" not in str(error):
                    raise
                logger.warning("%s has no /tokenize endpoint: its vocabulary cannot be checked", where)
                return
            ours = self.tokenizer(PROBE, add_special_tokens=False)["input_ids"]
            if list(served.get("tokens", [])) != list(ours):
                theirs = list(served.get("tokens", []))
                at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
                raise TeacherServerError(
                    f"{where} tokenizes differently from the student (probe token {at}: server "
                    f"{theirs[at:at + 3]}, student {ours[at:at + 3]}); serve a teacher that shares the student's "
                    "tokenizer"
                )
            last = self.vocab_size - 1
            text = probe.post_json("/detokenize", {"model": self.model, "tokens": [last]}).get("prompt")
            if text != self.tokenizer.decode([last]):
                raise TeacherServerError(
                    f"{where}: token {last} (the student's last) decodes to {text!r} on the server and to "
                    f"{self.tokenizer.decode([last])!r} for the student; the vocabularies differ"
                )
            try:
                beyond = probe.post_json("/detokenize", {"model": self.model, "tokens": [last + 1]}).get("prompt")
            except ServerError:
                beyond = ""
            if beyond:
                raise TeacherServerError(
                    f"{where}: the server knows token {last + 1} ({beyond!r}) but the student's vocabulary ends at "
                    f"{last}; the vocabularies differ"
                )
        except ServerError as error:
            raise TeacherServerError(f"{where}: the vocabulary check failed: {error}") from None
        finally:
            probe.close()

    # -- signals -----------------------------------------------------------------------------------------------------
    def signals(self, request: Any) -> BatchSignals:
        """`BatchSignals` `[N, L-1, K]` of the request's rows (see `sources.SignalsRequest`)."""
        sequences = batch_sequences(request.input_ids, request.completion_mask)
        rows = [n for n, (_, response) in enumerate(sequences) if response]
        gather = request.gather_ids
        top_k = self.vocab_size if gather is not None else self.top_k
        prompts, responses = [sequences[n][0] for n in rows], [sequences[n][1] for n in rows]
        try:
            scores = self.client().score(prompts, responses, top_k) if rows else []
        except ServerError as error:
            raise TeacherServerError(
                f"teacher {self.name!r} at {self.url} failed: {error}. The run stops here; once the server answers "
                "again, rerun with --resume_from_checkpoint to continue from the last checkpoint"
            ) from None
        mask = request.completion_mask[:, 1:].bool()
        width = top_k if gather is None else gather.shape[-1]
        ids = [torch.zeros(0, width, dtype=torch.long)] * len(sequences)  # rows without a response: nothing
        logprobs = [torch.zeros(0, width)] * len(sequences)
        tokens = [torch.zeros(0)] * len(sequences)
        for n, score in zip(rows, scores):
            row_ids = torch.tensor(score.topk_ids, dtype=torch.long)
            row_logprobs = torch.tensor(score.topk_logprobs, dtype=torch.float32)
            if gather is not None:
                full = torch.full((row_ids.shape[0], max(self.vocab_size, int(row_ids.max()) + 1)), float("-inf"))
                full.scatter_(-1, row_ids, row_logprobs)
                row_ids = gather[n][mask[n]].long().cpu()
                known = row_ids < full.shape[-1]  # ids past every served id have no mass
                row_logprobs = torch.where(known, full.gather(-1, row_ids.clamp(max=full.shape[-1] - 1)), -math.inf)
            elif row_ids.shape[-1] < top_k:  # the server returned fewer ids than asked (a tiny vocabulary)
                raise TeacherServerError(
                    f"teacher {self.name!r} at {self.url} returned {row_ids.shape[-1]} ids per position for "
                    f"prompt_logprobs={top_k}; lower signals_top_k or raise the server's --max-logprobs"
                )
            ids[n], logprobs[n] = row_ids, row_logprobs
            tokens[n] = torch.tensor(score.token_logprobs, dtype=torch.float32)
        return BatchSignals(
            ids=scatter_rows(mask, ids, fill=0).long(),
            logprobs=scatter_rows(mask, logprobs, fill=0.0).float(),
            token_logprobs=scatter_rows(mask, tokens, fill=0.0).float(),
        )
