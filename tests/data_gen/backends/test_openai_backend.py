"""The OpenAI-compatible backend: retries, auth, timeouts, concurrency and secrecy against a scripted local HTTP
server (127.0.0.1 only), then for real against `vllm serve` on the tiny teacher (`vllm_server` fixture)."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from align_distill.data.tokens import encode_prompt
from align_distill.data_gen.backends import openai_backend
from align_distill.data_gen.backends.base import SamplingParams
from align_distill.data_gen.backends.openai_backend import (
    OpenAIGenerator,
    ServerAuthError,
    ServerError,
    ServerUnreachableError,
)
from align_distill.data_gen.backends.vllm_backend import request_seed

SECRET = "sk-test-DO-NOT-LEAK-0123456789"
KEY_ENV = "ALIGN_DISTILL_TEST_OPENAI_KEY"

Reply = tuple[int, Any, dict[str, str], float]  # status, JSON payload (or str), headers, delay before answering


def ok_reply(path: str, body: dict[str, Any]) -> Reply:
    """A well-formed answer: the prompt echoed as text, n choices, vLLM's token_ids."""
    prompt = body.get("prompt", body.get("messages"))
    choices = []
    for i in range(body.get("n", 1)):
        text = f"echo {json.dumps(prompt)} #{i}"
        content = (
            {"text": text}
            if path.endswith("/completions") and "messages" not in body
            else {"message": {"role": "assistant", "content": text}}
        )
        choices.append({"index": i, "finish_reason": "length", "token_ids": [4, 5, i], **content})
    return 200, {"choices": choices[::-1]}, {}, 0.0  # out of order on purpose: the client sorts by index


class FakeServer:
    """A scripted OpenAI-compatible server: answers come from `script` (then `default`), requests are recorded."""

    def __init__(self) -> None:
        self.script: deque[Reply | Callable[[str, dict], Reply]] = deque()
        self.default: Callable[[str, dict], Reply] = ok_reply
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.trickle = 0.0  # > 0: send the body one byte at a time, this many seconds apart
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    item = server.script.popleft() if server.script else server.default
                try:
                    status, payload, headers, delay = item(self.path, body) if callable(item) else item
                    time.sleep(delay)
                finally:  # before answering: once the client has its answer it may send the next request
                    with server.lock:
                        server.in_flight -= 1
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if server.trickle:
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(server.trickle)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


@pytest.fixture
def delays(monkeypatch) -> list[float]:
    """Backoff delays the client asked for, without waiting them out."""
    asked: list[float] = []

    async def record(delay: float) -> None:
        asked.append(delay)

    monkeypatch.setattr(openai_backend, "_sleep", record)
    return asked


def make(server: FakeServer, **kwargs) -> OpenAIGenerator:
    kwargs = {"api_key_env": KEY_ENV, "backoff_base": 0.1, "backoff_max": 5.0, "timeout": 5.0, **kwargs}
    return OpenAIGenerator(server.url, "fake-model", **kwargs)


CHAT = [{"role": "user", "content": "hi"}]
GREEDY = SamplingParams(max_new_tokens=3)


# -- retries, backoff, errors ---------------------------------------------------------------------------------


def test_retries_429_and_5xx_with_growing_jittered_backoff(server, delays):
    server.script.extend([(429, {"error": {"message": "slow down"}}, {}, 0.0), (500, "oops", {}, 0.0),
                          (503, "busy", {}, 0.0)])  # fmt: skip
    with make(server, max_retries=5) as gen:
        (out,) = gen.generate([CHAT], GREEDY)
    assert out[0].text.startswith("echo") and out[0].token_ids == [4, 5, 0]
    assert len(server.requests) == 4
    assert len(delays) == 3
    for attempt, delay in enumerate(delays):  # equal jitter: in [d/2, d] for d = base * 2^attempt
        assert 0.1 * 2**attempt / 2 <= delay <= 0.1 * 2**attempt


def test_retry_after_header_is_honoured(server, delays):
    server.script.append((429, "rate limited", {"Retry-After": "2"}, 0.0))
    with make(server) as gen:
        gen.generate(["x"], GREEDY)
    assert delays and delays[0] >= 2.0


def test_gives_up_after_max_retries_and_names_the_url(server, delays):
    server.default = lambda path, body: (502, {"error": {"message": "bad gateway"}}, {}, 0.0)
    with make(server, max_retries=2) as gen, pytest.raises(ServerError) as info:
        gen.generate(["x"], GREEDY)
    assert len(server.requests) == 3 and len(delays) == 2
    assert f"{server.url}/completions" in str(info.value) and "3 attempts" in str(info.value)
    assert "HTTP 502: bad gateway" in str(info.value)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_is_not_retried(server, delays, monkeypatch, status):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.script.append((status, {"error": {"message": "invalid key"}}, {}, 0.0))
    with make(server) as gen, pytest.raises(ServerAuthError, match=f"HTTP {status}: invalid key.*\\${KEY_ENV}"):
        gen.generate([CHAT], GREEDY)
    assert len(server.requests) == 1 and delays == []


def test_auth_error_says_when_the_key_is_not_set(server, delays, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server.script.append((401, "no key", {}, 0.0))
    with make(server) as gen, pytest.raises(ServerAuthError, match=f"\\${KEY_ENV} \\(not set\\)"):
        gen.generate(["x"], GREEDY)
    assert "authorization" not in {k.lower() for k in server.requests[0][1]}


def test_client_errors_are_not_retried_and_carry_the_server_message(server, delays):
    server.script.append((400, {"error": {"message": "top_k must be >= -1"}}, {}, 0.0))
    with make(server) as gen, pytest.raises(ServerError, match="HTTP 400: top_k must be >= -1"):
        gen.generate(["x"], GREEDY)
    assert len(server.requests) == 1 and delays == []


def test_unreachable_server_names_the_url_after_retries(delays):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with OpenAIGenerator(url, "m", api_key_env=KEY_ENV, max_retries=2, backoff_base=0.01) as gen:
        with pytest.raises(ServerUnreachableError, match=f"could not reach the server at {url}/completions after 3"):
            gen.generate(["x"], GREEDY)
    assert len(delays) == 2


def test_timeouts_are_retried(server, delays):
    slow = ok_reply("/v1/completions", {"prompt": "x"})
    server.script.append((*slow[:3], 1.5))  # longer than the client's timeout
    with make(server, timeout=0.3) as gen:
        (out,) = gen.generate(["x"], GREEDY)
    assert out[0].text.startswith("echo") and len(server.requests) == 2 and len(delays) == 1


def test_timeout_bounds_the_whole_request_not_each_read(server, delays):
    """A server trickling its answer a byte at a time never lets a single read time out; the deadline still holds."""
    server.trickle = 0.05  # ~200 bytes: ~10 s in all, each read well inside the timeout
    started = time.monotonic()
    with make(server, timeout=0.5, max_retries=1) as gen, pytest.raises(ServerError) as info:
        gen.generate(["x"], GREEDY)
    assert time.monotonic() - started < 3.0
    assert len(server.requests) == 2 and len(delays) == 1  # a deadline miss is retried like a timeout
    assert f"{server.url}/completions" in str(info.value) and "0.5 s" in str(info.value)


@pytest.mark.parametrize(
    "payload, expected",
    [
        ([], "expected a JSON object with a 'choices' list, got list"),
        ({"choices": "x"}, "expected a JSON object with a 'choices' list"),
        ({"choices": ["x"]}, "choice 0: expected an object, got str"),
        ({"choices": [{"index": 0, "finish_reason": "stop", "message": None}]},
         "choice 0: expected 'message' to be an object with a string 'content', got None"),
        ({"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None}}]},
         "choice 0: expected 'message' to be an object with a string 'content'"),
        ({"choices": [{"index": 0, "finish_reason": "stop", "text": None}]},
         "choice 0: expected a string 'text', got None"),
    ],
)  # fmt: skip
def test_malformed_answers_name_the_server_and_what_was_expected(server, payload, expected):
    server.default = lambda path, body: (200, payload, {}, 0.0)
    prompt = "x" if "text" in json.dumps(payload) else CHAT
    with make(server) as gen, pytest.raises(ServerError) as info:
        gen.generate([prompt], GREEDY)
    assert expected in str(info.value) and server.url in str(info.value)


def test_permanent_failures_can_be_recorded_per_prompt(server, delays):
    """With record_failures, a prompt that fails for good comes back as finish_reason 'error' with the reason and
    the other prompts go on; auth and unreachable servers still stop everything (they fail every prompt)."""

    def reply(path, body):
        if body["prompt"] == "bad":
            return 400, {"error": {"message": "prompt too long"}}, {}, 0.0
        if body["prompt"] == "null":
            return 200, {"choices": [{"index": i, "finish_reason": "stop", "text": None} for i in range(2)]}, {}, 0.0
        return ok_reply(path, body)

    server.default = reply
    with make(server, record_failures=True) as gen:
        ok, bad, null = gen.generate(["fine", "bad", "null"], SamplingParams(n=2, temperature=1.0))
    assert [c.finish_reason for c in ok] == ["length", "length"] and ok[0].error is None
    assert [c.finish_reason for c in bad] == ["error", "error"] and "HTTP 400: prompt too long" in bad[0].error
    assert bad[0].text == "" and bad[0].token_ids == []
    assert null[0].finish_reason == "error" and "expected a string 'text'" in null[0].error
    server.default = lambda path, body: (401, "no", {}, 0.0)
    with make(server, record_failures=True) as gen, pytest.raises(ServerAuthError):
        gen.generate(["x"], GREEDY)


def test_concurrency_is_bounded_and_order_kept(server):
    def slow_echo(path, body):
        return (*ok_reply(path, body)[:3], 0.05)

    server.default = slow_echo
    prompts = [f"prompt {i}" for i in range(12)]
    with make(server, max_concurrency=3) as gen:
        outputs = gen.generate(prompts, GREEDY)
    assert [o[0].text for o in outputs] == [f"echo {json.dumps(p)} #0" for p in prompts]
    assert 2 <= server.max_in_flight <= 3


# -- the API key stays secret ---------------------------------------------------------------------------------


def test_api_key_is_sent_but_never_logged_raised_or_shown(server, delays, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)  # httpx / httpcore debug logs included

    def echo_auth(status):  # a careless server that echoes the Authorization header in its error body
        return lambda path, body: (status, {"error": {"message": f"bad request from {server.requests[-1][1]}"}},
                                   {}, 0.0)  # fmt: skip

    server.script.extend([echo_auth(500), echo_auth(503), echo_auth(401)])
    gen = make(server, max_retries=5)
    with pytest.raises(ServerAuthError) as auth:
        gen.generate([CHAT], GREEDY)
    assert server.requests[0][1]["Authorization"] == f"Bearer {SECRET}"
    server.default = echo_auth(500)
    with pytest.raises(ServerError) as exhausted:
        make(server, max_retries=1).generate(["x"], GREEDY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ServerUnreachableError) as unreachable:
        OpenAIGenerator(dead, "m", api_key_env=KEY_ENV, max_retries=1).generate(["x"], GREEDY)

    shown = [caplog.text, repr(gen), str(gen), str(vars(gen))]
    for info in (auth, exhausted, unreachable):
        shown += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
    assert "***" in str(exhausted.value)  # the echoed header was redacted, not dropped
    assert "retry 1/5" in caplog.text  # retries were logged...
    for text in shown:
        assert SECRET not in text  # ...and nothing shown anywhere holds the key
    gen.close()


# -- request bodies and parsing -------------------------------------------------------------------------------


def test_chat_request_body_and_parsing(server):
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5, stop=("\n",), seed=3)
    with make(server) as gen:
        (out,) = gen.generate([CHAT], params, seeds=[42])
    path, _, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body == {
        "model": "fake-model", "messages": CHAT, "n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
        "max_tokens": 5, "stop": ["\n"], "seed": 42, "return_token_ids": True,
    }  # fmt: skip
    assert [c.token_ids for c in out] == [[4, 5, 0], [4, 5, 1]]  # sorted by choice index
    assert all(c.finish_reason == "length" and c.text.startswith("echo") for c in out)


def test_completions_mode_sends_the_prompt_ids_of_the_offline_backends(server, tiny_tokenizer):
    params = SamplingParams(max_new_tokens=4, seed=9)
    with make(server, mode="completions", tokenizer=tiny_tokenizer) as gen:
        gen.generate([CHAT, "plain text"], params)
        gen.generate(["other", CHAT], params)  # another batch: same prompt, same seed
    chat_ids = encode_prompt(tiny_tokenizer, CHAT)
    assert [r[0] for r in server.requests] == ["/v1/completions"] * 4
    prompts = sorted((json.dumps(body["prompt"]), body["seed"]) for _, _, body in server.requests)
    # requests arrive concurrently: compare as a sorted list
    assert prompts == sorted([(json.dumps(chat_ids), request_seed(9, chat_ids))] * 2 + [
        (json.dumps("plain text"), request_seed(9, tiny_tokenizer("plain text")["input_ids"])),
        (json.dumps("other"), request_seed(9, tiny_tokenizer("other")["input_ids"])),
    ])  # fmt: skip
    with make(server, mode="completions") as gen, pytest.raises(ValueError, match="pass tokenizer="):
        gen.generate([CHAT], params)


def test_without_server_extensions(server, tiny_tokenizer):
    server.default = lambda path, body: (200, {"choices": [{"index": 0, "text": "ab", "finish_reason": "stop"}]},
                                         {}, 0.0)  # fmt: skip
    with make(server, server_extensions=False, tokenizer=tiny_tokenizer) as gen:
        (out,) = gen.generate(["x"], GREEDY)
        assert out[0].token_ids == tiny_tokenizer("ab", add_special_tokens=False)["input_ids"]  # re-tokenized
        assert "return_token_ids" not in server.requests[0][2]
        with pytest.raises(ValueError, match="top_k=5 is not part of the OpenAI API"):
            gen.generate(["x"], SamplingParams(top_k=5))
        with pytest.raises(NotImplementedError, match="prompt_logprobs extension"):
            gen.score([[1]], [[2]], top_k=2)


def test_unexpected_answers_are_clear_errors(server):
    server.script.append((200, {"choices": [{"index": 0, "text": "", "finish_reason": "content_filter"}]}, {}, 0.0))
    server.script.append((200, "not json", {}, 0.0))
    server.script.append((200, {"choices": []}, {}, 0.0))
    with make(server) as gen:
        with pytest.raises(ServerError, match="finished with 'content_filter'"):
            gen.generate(["x"], GREEDY)
        with pytest.raises(ServerError, match="expected a JSON body, got 'not json'"):
            gen.generate(["x"], GREEDY)
        with pytest.raises(ServerError, match="asked for n=1, got 0"):
            gen.generate(["x"], GREEDY)
    with pytest.raises(ValueError, match="mode must be 'chat' or 'completions'"):
        OpenAIGenerator(server.url, "m", mode="responses")


def test_score_reads_vllm_prompt_logprobs(server):
    def prompt_logprobs(path, body):
        # positions 0..3 for prompt [1, 2] + response [3, 4]; JSON keys are strings, as a vLLM server sends them
        table = [None] + [
            {str(tok): {"logprob": math.log(0.1), "rank": 7}, "8": {"logprob": math.log(0.5), "rank": 1},
             "9": {"logprob": math.log(0.2), "rank": 2}}
            for tok in body["prompt"][1:]
        ]  # fmt: skip
        return 200, {"choices": [{"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": table}]}, {}, 0

    server.default = prompt_logprobs
    with make(server) as gen:
        (scores,) = gen.score([[1, 2]], [[3, 4]], top_k=2)
        assert server.requests[0][2] == {"model": "fake-model", "prompt": [1, 2, 3, 4], "max_tokens": 1,
                                         "temperature": 0.0, "prompt_logprobs": 2}  # fmt: skip
        assert scores.token_logprobs.tolist() == [pytest.approx(math.log(0.1))] * 2
        assert scores.topk_ids.tolist() == [[8, 9], [8, 9]]
        assert scores.rest_logmass.tolist() == [pytest.approx(math.log(0.3))] * 2
        with pytest.raises(NotImplementedError, match="gather mode"):
            gen.score([[1]], [[2]], top_k=2, gather_ids=[[[2]]])
        server.default = ok_reply  # a server without the extension
        with pytest.raises(NotImplementedError, match="returned no prompt_logprobs"):
            gen.score([[1]], [[2]], top_k=2)


# -- for real: vllm serve on the tiny teacher -----------------------------------------------------------------

PROMPTS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+3?"}],
    [{"role": "user", "content": "sort: c a b"}],
]


@pytest.fixture(scope="module")
def served(vllm_server, tiny_tokenizer):
    """Chat-mode and completions-mode clients of the shared `vllm serve`."""
    chat = OpenAIGenerator(vllm_server.base_url, vllm_server.model, api_key_env=vllm_server.api_key_env,
                           tokenizer=tiny_tokenizer, timeout=120)  # fmt: skip
    completions = OpenAIGenerator(vllm_server.base_url, vllm_server.model, api_key_env=vllm_server.api_key_env,
                                  tokenizer=tiny_tokenizer, mode="completions", timeout=120)  # fmt: skip
    yield chat, completions
    chat.close()
    completions.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_server_greedy_equals_the_offline_engine(served, vllm_generator):
    chat, completions = served
    params = SamplingParams(max_new_tokens=16)
    offline = vllm_generator.generate(PROMPTS + ["plain text prompt"], params)
    for client in (chat, completions):
        online = client.generate(PROMPTS + ["plain text prompt"], params)
        assert [[c.token_ids for c in o] for o in online] == [[c.token_ids for c in o] for o in offline]
        assert [o[0].finish_reason for o in online] == [o[0].finish_reason for o in offline]


@pytest.mark.vllm
@pytest.mark.slow
def test_server_seeded_sampling_equals_the_offline_engine(served, vllm_generator):
    chat, completions = served
    params = SamplingParams(n=2, temperature=1.0, top_k=40, max_new_tokens=12, seed=4, stop=("e",))
    offline = vllm_generator.generate(PROMPTS, params)

    def text(completion):
        # A sample cut off mid-character (max_new_tokens) ends in an incomplete UTF-8 byte sequence: the offline
        # engine decodes it as U+FFFD, the server's streaming detokenizer holds it back. The tokens are the contract.
        return completion.text.rstrip("\ufffd")

    for client in (chat, completions):
        online = client.generate(PROMPTS, params)
        assert [[c.token_ids for c in o] for o in online] == [[c.token_ids for c in o] for o in offline]
        assert [[text(c) for c in o] for o in online] == [[text(c) for c in o] for o in offline]


@pytest.mark.vllm
@pytest.mark.slow
def test_server_logprobs_equal_the_offline_engine(served, vllm_generator, tiny_tokenizer):
    chat, _ = served
    prompt_ids = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS]
    responses = [o[0].token_ids for o in vllm_generator.generate(PROMPTS, SamplingParams(max_new_tokens=8))]
    online = chat.score(prompt_ids, responses, top_k=5)
    offline = vllm_generator.score(prompt_ids, responses, top_k=5)
    for a, b in zip(online, offline):
        assert np.array_equal(a.topk_ids, b.topk_ids)
        for x, y in ((a.token_logprobs, b.token_logprobs), (a.rest_logmass, b.rest_logmass)):
            assert x == pytest.approx(y, abs=1e-5)
        assert [v for row in a.topk_logprobs for v in row] == pytest.approx(
            [v for row in b.topk_logprobs for v in row], abs=1e-5
        )


@pytest.mark.vllm
@pytest.mark.slow
def test_server_rejects_a_wrong_key_without_retrying(vllm_server, monkeypatch):
    monkeypatch.setenv(vllm_server.api_key_env, SECRET)
    gen = OpenAIGenerator(vllm_server.base_url, vllm_server.model, api_key_env=vllm_server.api_key_env)
    with pytest.raises(ServerAuthError, match="HTTP 401") as info:
        gen.generate(["x"], GREEDY)
    assert SECRET not in str(info.value)
    gen.close()


def test_a_remote_server_cannot_take_weights(server):
    """On-policy syncing needs a local engine: the OpenAI backend refuses with a message naming the alternatives."""
    with pytest.raises(NotImplementedError, match="transformers or vllm backend"):
        make(server).load_weights([("w", None)])
