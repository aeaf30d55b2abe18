"""The one interface every generation backend implements (vLLM engine, OpenAI-compatible server, transformers).

Jobs (`sample`, `rollout`, `signals`, `rank`) only talk to a `Generator`, so a user switches backend with one
config key and gets the same rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from align_distill.data.tokens import Prompt


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings shared by every backend. temperature == 0 means greedy."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n > 1 and self.temperature == 0:
            problems.append(f"n={self.n} samples with temperature 0 would be {self.n} identical greedy copies")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated response. `token_ids` are the response tokens exactly as generated (EOS included when the
    model stopped on it), so that signals can later be computed on exactly these ids."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error" (a prompt that failed for good, see `error`)
    error: str | None = None  # why, when finish_reason == "error" (a backend's `record_failures`)


@dataclass(eq=False)
class TokenScores:
    """Teacher signals for one response of T tokens, as numpy arrays: per response token t,
    `token_logprobs[t]` = log p(response token t | prefix), `topk_ids[t]` / `topk_logprobs[t]` the K most likely
    ids (or the ids asked for in `gather_ids`) and their log-probs, `rest_logmass[t]` = log(1 − Σ_k p_k).

    Shapes and dtypes: `token_logprobs` / `rest_logmass` `[T]` float64, `topk_ids` `[T, K]` int64,
    `topk_logprobs` `[T, K]` float64. Arrays, not Python lists: a backend converts a whole batch once (a list per
    token was the largest cost of the `signals` job around a small teacher's forward). float64 holds each engine's
    values exactly (the float32 of a local model, the numbers a server sent), as the Python floats did before.
    Nested lists given to the constructor are converted (the vLLM and OpenAI backends build them per position)."""

    token_logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    rest_logmass: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.token_logprobs = np.asarray(self.token_logprobs, dtype=np.float64)
        self.topk_ids = _per_token(self.topk_ids, np.int64)
        self.topk_logprobs = _per_token(self.topk_logprobs, np.float64)
        self.rest_logmass = np.asarray(self.rest_logmass, dtype=np.float64)

    def __eq__(self, other: object) -> bool:
        """Exactly equal arrays, field by field (the dataclass `==` cannot compare arrays)."""
        if not isinstance(other, TokenScores):
            return NotImplemented
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


def _per_token(values: Any, dtype: type) -> np.ndarray:
    """`[T, K]` array of `values`; an empty response (no tokens) gives `[0, 0]`."""
    array = np.asarray(values, dtype=dtype)
    return array.reshape(0, 0) if array.size == 0 and array.ndim < 2 else array


class Generator(ABC):
    """A text generator and scorer. Backends load their model in `__init__` and free it in `close()`."""

    #: the tokenizer that defines prompt/response token ids (same one the student uses)
    tokenizer: object

    @abstractmethod
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions per prompt, in prompt order."""

    @abstractmethod
    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        top_k: int,
        gather_ids: list[list[list[int]]] | None = None,
    ) -> list[TokenScores]:
        """Log-probs of each response token given its prompt + previous response tokens. With `gather_ids`
        (per row, per response token, K ids: a `[T, K]` array such as another `TokenScores.topk_ids`, or nested
        lists), log-probs are taken at exactly those ids instead of this model's own top-k (e.g. the reference
        model at the DPO teacher's top-k ids)."""

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> int:
        """Replace the model's weights by `(name, tensor)` pairs (names of the plain transformers model) and return
        how many tensors were loaded: how on-policy trainers keep a rollout engine in step with the student.
        Only local engines can; a remote server cannot receive weights."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot load weights: on-policy rollouts need a local engine "
            "(the transformers or vllm backend)"
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model / engine / connections."""

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
