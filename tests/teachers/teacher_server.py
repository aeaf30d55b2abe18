"""A stand-in teacher server for the CPU tests: vLLM's OpenAI-compatible endpoints that a `ServerTeacher` uses
(`/v1/models`, `/tokenize`, `/detokenize`, `/v1/completions` with `prompt_logprobs`), answered by a transformers
model in float32, in threads, so that a test can stop it mid-run (a dying server) and start it again."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class TeacherServer:
    """Serves `model` (with `tokenizer`) on 127.0.0.1:`port` (0: a free one); counts requests and answer bytes."""

    def __init__(self, model: Any, tokenizer: Any, port: int = 0, name: str = "tiny-teacher"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.completions = 0
        self.answer_bytes = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                owner.answer_bytes += len(data)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._send(200, {"data": [{"id": owner.name}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = owner.answer(self.path, body)
                self._send(status, payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        tokenizer = self.tokenizer
        if path == "/tokenize":
            ids = tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            return 200, {"count": len(ids), "max_model_len": 256, "tokens": ids}
        if path == "/detokenize":
            if any(t >= len(tokenizer) for t in body["tokens"]):
                return 400, {"error": {"message": "token id out of vocabulary"}}
            return 200, {"prompt": tokenizer.decode(body["tokens"])}
        if path != "/v1/completions":
            return 404, {"detail": "Not Found"}
        self.completions += 1
        ids = torch.tensor([body["prompt"]])
        with self._lock, torch.no_grad():
            logprobs = self.model(input_ids=ids).logits[0, :, : len(tokenizer)].float().log_softmax(-1)
        k = body["prompt_logprobs"] if body["prompt_logprobs"] != -1 else logprobs.shape[-1]
        positions: list[Any] = [None]
        for t in range(1, ids.shape[1]):
            row, token = logprobs[t - 1], int(ids[0, t])
            top = row.topk(k).indices.tolist()
            entry = {}
            for i in dict.fromkeys([*top, token]):
                rank = int((row > row[i]).sum()) + 1
                entry[str(i)] = {"logprob": float(row[i]), "rank": rank, "decoded_token": tokenizer.decode([i])}
            positions.append(entry)
        choice = {"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": positions}
        return 200, {"choices": [choice]}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
