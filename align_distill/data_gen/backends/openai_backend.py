"""OpenAI-compatible server backend: a `vllm serve` fleet (or any compatible endpoint) for teachers too large to
co-locate with training.

Talks plain HTTP (httpx, asyncio on one event-loop thread per generator) so that retries, timeouts and what goes
into errors and logs are ours to control: bounded concurrency (a semaphore), a total deadline per attempt (connect,
send and the whole answer: a server trickling bytes cannot hang a job, which httpx's and the `openai` package's
per-read timeouts allow), retries with exponential backoff and jitter on 408/429/5xx, deadline misses and connection
errors, no retry on 401/403, answers checked for shape, and the API key (read from the environment) never written
to a log, an exception or a repr.

Conversations go to `/chat/completions` (`mode="chat"`: the server applies its chat template) or are rendered
with the local tokenizer and sent as token ids to `/completions` (`mode="completions"`: exactly the prompt ids the
offline backends use). Plain-text prompts always go to `/completions`. vLLM's extra request fields
(`return_token_ids`, `top_k`, `prompt_logprobs`) are sent when `server_extensions=True`; `score` needs them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
from typing import Any

import httpx
from transformers import AutoTokenizer

from align_distill.data.tokens import encode_prompt
from align_distill.data_gen.backends.base import Completion, Generator, Prompt, SamplingParams, TokenScores
from align_distill.data_gen.backends.vllm_backend import request_seed, scores_from_prompt_logprobs

logger = logging.getLogger(__name__)

#: statuses worth retrying: timeouts, conflicts of a busy server, rate limits and server errors
RETRY_STATUSES = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
_sleep = asyncio.sleep  # module-level so tests can record backoff delays without waiting them out


class ServerError(RuntimeError):
    """The server answered with an error that retrying did not (or would not) fix."""


class ServerAuthError(ServerError):
    """401/403: the API key is missing or wrong. Never retried."""


class ServerUnreachableError(ServerError):
    """No HTTP answer at all (connection refused, DNS, timeouts) after every retry."""


#: failures that are the server's, not one prompt's: never recorded per prompt, they stop the job
_NOT_PER_PROMPT = (ServerAuthError, ServerUnreachableError)


class _Secret:
    """Holds the API key so that no repr, str or `vars()` dump of a generator can show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value or None

    def reveal(self) -> str | None:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, "***") if self._value else text

    def __repr__(self) -> str:
        return "<secret>" if self._value else "<no key>"

    __str__ = __repr__


class OpenAIGenerator(Generator):
    """Generation (chat or completions) and prompt log-prob scoring against an OpenAI-compatible server.

    `base_url` includes the API prefix, e.g. `http://127.0.0.1:8000/v1`. The key is read from the environment
    variable `api_key_env` (unset: no Authorization header, as a local `vllm serve` without `--api-key` expects).
    `tokenizer` (a path or tokenizer object) is needed for conversations in `completions` mode and gives the
    per-request seeds the same prompt ids as the offline backends.

    `timeout` is a total deadline in seconds for one attempt (connect, send, the whole answer), not a per-read
    timeout; with retries a request takes at most about `(max_retries + 1) * timeout` plus the backoff delays.
    With `record_failures`, a prompt that fails for good (an error status that is not retried, retries exhausted,
    a malformed answer) comes back as `finish_reason="error"` completions carrying the reason in `error`, and the
    other prompts go on; auth failures and an unreachable server still raise.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        mode: str = "chat",
        tokenizer: str | os.PathLike | Any | None = None,
        server_extensions: bool = True,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        record_failures: bool = False,
    ) -> None:
        if mode not in ("chat", "completions"):
            raise ValueError(f"OpenAIGenerator mode must be 'chat' or 'completions', got {mode!r}")
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(
                "OpenAIGenerator needs max_concurrency >= 1, max_retries >= 0 and timeout > 0; got "
                f"max_concurrency={max_concurrency}, max_retries={max_retries}, timeout={timeout}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mode = mode
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.server_extensions = server_extensions
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.record_failures = record_failures
        self._key = _Secret(os.environ.get(api_key_env))
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self._random = random.Random()
        # requests run as asyncio tasks on one loop thread, so a deadline can cancel a request mid-answer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-backend", daemon=True)
        self._thread.start()
        self._client, self._slots = self._call(self._open_client())

    async def _open_client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        limits = httpx.Limits(max_connections=self.max_concurrency)
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), limits=limits), asyncio.Semaphore(
            self.max_concurrency
        )

    def _call(self, coroutine) -> Any:
        """Run `coroutine` on the loop thread and wait for it; an interrupt cancels it."""
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError(f"{self!r} is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def __repr__(self) -> str:
        return (
            f"OpenAIGenerator(base_url={self.base_url!r}, model={self.model!r}, mode={self.mode!r}, "
            f"api_key_env={self.api_key_env!r})"
        )

    # -- HTTP -----------------------------------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with equal jitter (half fixed, half random), at least the server's Retry-After."""
        delay = min(self.backoff_max, self.backoff_base * 2**attempt)
        delay = delay / 2 + self._random.uniform(0, delay / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        """POST with retries; the parsed JSON answer or a `ServerError` naming the URL."""
        url = self.base_url + path
        headers = {"Authorization": f"Bearer {self._key.reveal()}"} if self._key.reveal() else {}
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                async with self._slots:  # at most max_concurrency in flight; backoff waits outside
                    response = await asyncio.wait_for(self._client.post(url, json=body, headers=headers), self.timeout)
            except httpx.TransportError as exc:  # refused, reset, DNS, timeouts: no HTTP answer
                problem, unreachable = self._key.redact(f"{type(exc).__name__}: {exc}"), True
            except asyncio.TimeoutError:  # the server answers, but not completely within the deadline
                # not unreachable: it answered (perhaps only for this prompt's long generation)
                problem, unreachable = f"no complete answer within the {self.timeout} s deadline", False
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise ServerError(
                            f"POST {url}: expected a JSON body, got {self._body_excerpt(response)!r}"
                        ) from None
                problem, unreachable = f"HTTP {response.status_code}: {self._body_excerpt(response)}", False
                if response.status_code in (401, 403):
                    where = f"${self.api_key_env}" + ("" if self._key.reveal() else " (not set)")
                    raise ServerAuthError(
                        f"POST {url} was refused ({problem}); check the API key in {where}"
                    ) from None
                if response.status_code not in RETRY_STATUSES:
                    raise ServerError(f"POST {url} failed with {problem}") from None
                retry_after = _retry_after(response)
            if attempt + 1 < attempts:
                delay = self._backoff(attempt, retry_after)
                logger.warning(
                    "POST %s failed (%s); retry %d/%d in %.2fs", url, problem, attempt + 1, self.max_retries, delay
                )
                await _sleep(delay)
        if unreachable:
            raise ServerUnreachableError(f"could not reach the server at {url} after {attempts} attempts: {problem}")
        raise ServerError(f"POST {url} still failing after {attempts} attempts: {problem}")

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """One POST to `base_url + path` with this generator's retries, deadline and key: the parsed JSON answer
        (for endpoints beyond generation and scoring, e.g. a teacher source's `/tokenize` probe)."""
        return self._call(self._post(path, body))

    def _body_excerpt(self, response: httpx.Response, limit: int = 500) -> str:
        """The server's error message (JSON `error.message` / `message` / `detail` when present), redacted."""
        text = response.text
        try:
            data = json.loads(text)
            if isinstance(data, dict):
                err = data.get("error", data)
                text = str(err.get("message") or err.get("detail") or err) if isinstance(err, dict) else str(err)
        except ValueError:
            pass
        return self._key.redact(text[:limit])

    def _map(self, fn, items: list) -> list:
        """`fn` over `items` with at most `max_concurrency` requests in flight, results in order."""

        async def run_all() -> list:
            tasks = [asyncio.ensure_future(fn(i, item)) for i, item in enumerate(items)]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        return self._call(run_all())

    def _malformed(self, path: str, index: int, expected: str, got: str) -> ServerError:
        """`got` is a short description (a type name) or `_shown(value)`."""
        return ServerError(
            f"{self.base_url}{path}: prompt {index}: malformed answer from the server: {expected}, got "
            f"{self._key.redact(got[:200])}"
        )

    # -- generation -----------------------------------------------------------------------------------------

    def _request(self, prompt: Prompt, params: SamplingParams, seed: int | None) -> tuple[str, dict[str, Any]]:
        """(endpoint path, JSON body) for one prompt."""
        ids = encode_prompt(self.tokenizer, prompt) if self.tokenizer is not None else None
        if seed is None:
            seed = request_seed(params.seed, ids if ids is not None else json.dumps(prompt))
        body: dict[str, Any] = {
            "model": self.model,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": seed,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k:
            if not self.server_extensions:
                raise ValueError(
                    f"top_k={params.top_k} is not part of the OpenAI API; enable server_extensions for a vLLM "
                    f"server at {self.base_url} or use top_k=0"
                )
            body["top_k"] = params.top_k
        if self.server_extensions:
            body["return_token_ids"] = True
        if isinstance(prompt, str):
            return "/completions", {**body, "prompt": prompt}
        if self.mode == "chat":
            return "/chat/completions", {**body, "messages": prompt}
        if ids is None:
            raise ValueError(
                "mode='completions' renders conversations with the chat template locally: pass tokenizer= to "
                "OpenAIGenerator (or use mode='chat' to let the server apply its template)"
            )
        return "/completions", {**body, "prompt": ids}

    async def _completions(self, index: int, request: tuple[str, dict[str, Any]]) -> list[Completion]:
        try:
            return await self._completions_or_raise(index, request)
        except ServerError as error:
            if not self.record_failures or isinstance(error, _NOT_PER_PROMPT):
                raise
            logger.warning("prompt %d failed for good, recorded as failed: %s", index, error)
            return [Completion(text="", token_ids=[], finish_reason="error", error=str(error))] * request[1]["n"]

    def _choices(self, path: str, index: int, data: Any) -> list[dict[str, Any]]:
        """The answer's choices in index order, or a `ServerError` saying what shape was expected."""
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            what = type(data).__name__ if not isinstance(data, dict) else f"choices={data.get('choices')!r}"
            raise self._malformed(path, index, "expected a JSON object with a 'choices' list", what)
        for k, choice in enumerate(data["choices"]):
            if not isinstance(choice, dict):
                raise self._malformed(path, index, f"choice {k}: expected an object", type(choice).__name__)
        return sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)

    async def _completions_or_raise(self, index: int, request: tuple[str, dict[str, Any]]) -> list[Completion]:
        path, body = request
        data = await self._post(path, body)
        choices = self._choices(path, index, data)
        if len(choices) != body["n"]:
            raise ServerError(f"{self.base_url}{path}: prompt {index} asked for n={body['n']}, got {len(choices)}")
        completions = []
        for k, choice in enumerate(choices):
            if path == "/completions":
                text = choice.get("text")
                if not isinstance(text, str):
                    raise self._malformed(path, index, f"choice {k}: expected a string 'text'", _shown(text))
            else:
                message = choice.get("message")
                if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                    raise self._malformed(
                        path,
                        index,
                        f"choice {k}: expected 'message' to be an object with a string 'content'",
                        _shown(message),
                    )
                text = message["content"]
            reason = choice.get("finish_reason")
            if reason not in ("stop", "length"):
                raise ServerError(
                    f"{self.base_url}{path}: prompt {index} finished with {reason!r}; expected 'stop' or 'length'"
                )
            token_ids = choice.get("token_ids")
            if token_ids is None:  # a server without return_token_ids: re-tokenize (approximate) when we can
                token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if self.tokenizer else []
            completions.append(Completion(text=text, token_ids=list(token_ids), finish_reason=reason))
        return completions

    def generate(
        self, prompts: list[Prompt], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions per prompt, one request per prompt, up to `max_concurrency` in flight.

        `seeds[i]` is prompt i's request seed (default: from `params.seed` and the prompt, as in the vllm backend,
        so a vLLM server samples what the offline engine samples). Response `token_ids` are the server's own
        (vLLM's `return_token_ids`); without them they are the text re-tokenized with `tokenizer` (may differ from
        what was sampled) or empty when there is no tokenizer."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        requests = [self._request(p, params, s) for p, s in zip(prompts, seeds)]
        return self._map(self._completions, requests)

    # -- scoring --------------------------------------------------------------------------------------------

    async def _score_one(self, index: int, row: tuple[list[int], list[int], int]) -> TokenScores:
        prompt_ids, response_ids, top_k = row
        body = {
            "model": self.model,
            "prompt": list(prompt_ids) + list(response_ids),
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": top_k,
        }
        data = await self._post("/completions", body)
        choices = self._choices("/completions", index, data) or [{}]
        positions = choices[0].get("prompt_logprobs")
        if positions is None:
            raise NotImplementedError(
                f"the server at {self.base_url} returned no prompt_logprobs; scoring needs a vLLM-compatible server "
                "(or the vllm / transformers backends)"
            )
        window = positions[len(prompt_ids) : len(prompt_ids) + len(response_ids)]
        return scores_from_prompt_logprobs(window, response_ids, top_k, where=f"{self.base_url} score row {index}")

    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        top_k: int,
        gather_ids: list[list[list[int]]] | None = None,
    ) -> list[TokenScores]:
        """Top-k prompt log-probs over prompt + response ids through vLLM's `prompt_logprobs` extension of
        `/completions` (raw model log-probs). Gather mode has no server API: use the vllm or transformers backend."""
        if gather_ids is not None:
            raise NotImplementedError(
                "gather mode (log-probs at given ids) has no OpenAI-compatible API; use the vllm backend (V2 model "
                "runner) or the transformers backend for it"
            )
        if not self.server_extensions:
            raise NotImplementedError(
                f"scoring needs vLLM's prompt_logprobs extension, disabled by server_extensions=False for "
                f"{self.base_url}; use the vllm or transformers backend"
            )
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"score: {len(prompt_ids)} prompts but {len(response_ids)} responses")
        for row, p in enumerate(prompt_ids):
            if not p:
                raise ValueError(f"score: row {row} has an empty prompt; the first response token needs a prefix")
        rows = [(list(p), list(r), top_k) for p, r in zip(prompt_ids, response_ids)]
        return self._map(self._score_one, rows)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _shown(value: Any) -> str:
    """A value of a JSON answer as Python shows it (None, not null), shortened."""
    return repr(value)[:200]


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a numeric Retry-After header (HTTP-date forms are ignored: backoff applies)."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
