"""CycleAlign's black box: the ranking prompt with static + dynamic demonstrations, and the noisy oracle.

docs/methods/cyclealign.md §3 and §6. The LLM judge itself (prompt rendering, the strict `Ranking: [i] > [j]` parser,
retries, failure records) is data_gen's `LLMJudge`; this module only adds what is CycleAlign's own:

- `DemonstrationPool`: the hand-written static demonstrations (always shown first) plus a FIFO pool of the latest
  agreement rankings (§6: deduplicated by prompt, capped, entries need |α| ≥ m_min); `select` picks k_d of them per
  query, the most recent or the most similar by a bag-of-words cosine of the prompts.
- `ICLRanker`: a `Judge` that asks an inner judge with the demonstrations selected for each prompt, so data_gen's
  `rank` job (sharded, resumable store) can run it unchanged.
- `NoisyOracleJudge`: a Python scoring function (e.g. the synthetic task's ground-truth reward) plus Gaussian noise
  and an optional rate of failed answers — an imperfect "LLM" that runs on a CPU, used by the quickstart.
- `make_black_box`: a judge from the `black_box` mapping of `CycleAlignConfig`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_distill.data.tokens import Response, prompt_text, render_conversation, response_text
from align_distill.data_gen.backends import SamplingParams, make_generator
from align_distill.data_gen.config import JudgeSpec, build_config
from align_distill.data_gen.judges import (
    Judge,
    Judgement,
    LLMJudge,
    import_function,
    judge_messages,
    load_demonstrations,
    make_judge,
    ranking_from_scores,
)
from align_distill.vocabulary import canonical_job_keys

# Hand-written static demonstrations (§3.2): one harmlessness and one helpfulness case, rankings 0-based best first.
DEFAULT_STATIC_DEMONSTRATIONS: list[dict[str, Any]] = [
    {
        "prompt": [{"role": "user", "content": "How do I pick the lock on my neighbour's front door?"}],
        "completions": [
            "Get a tension wrench and a pick, insert the wrench and rake the pins until the cylinder turns.",
            "I can't help with getting into someone else's home. If you are locked out of your own, a licensed "
            "locksmith or your landlord can let you in.",
            "Locks are interesting. Locks locks locks.",
        ],
        "ranking": [1, 2, 0],
    },
    {
        "prompt": [{"role": "user", "content": "What is the capital of Australia?"}],
        "completions": [
            "Sydney.",
            "The capital of Australia is Canberra.",
            "Canberra, although many people guess Sydney because it is the largest city.",
        ],
        "ranking": [2, 1, 0],
    },
]

SELECTIONS = ("recent", "similar")


def prompt_key(prompt: Any) -> str:
    """The text that identifies a prompt in the pool (a newer entry for the same prompt replaces the older)."""
    return render_conversation(prompt)


def agreement_demonstration(prompt: Any, completions: Sequence[Response], agreement: Sequence[int]) -> dict:
    """A dynamic demonstration from an agreement ranking α (0-based ids into `completions`, best first).

    Only the responses in α are shown, in their original listing order and renumbered 1..|α|; the ranking line
    follows α. (Listing them in α's order would make every demonstration read `[1] > [2] > ...`, teaching the
    judge a position bias instead of a preference.)
    """
    shown = sorted(agreement)
    new_id = {old: new for new, old in enumerate(shown)}
    return {
        "prompt": prompt,
        "completions": [completions[i] for i in shown],
        "ranking": [new_id[i] for i in agreement],
    }


def _words(prompt: Any) -> Counter:
    return Counter(re.findall(r"\w+", prompt_text(prompt).lower()))


def _cosine(a: Counter, b: Counter) -> float:
    dot = sum(count * b[word] for word, count in a.items())
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


@dataclass
class DemonstrationPool:
    """Static demonstrations plus a FIFO pool of agreement demonstrations (docs/methods/cyclealign.md §6).

    `entries` are oldest first; each is a demonstration (`prompt`, `completions`, `ranking`) plus `cycle`.
    """

    static: list[dict[str, Any]] = field(default_factory=list)
    capacity: int = 500
    min_agreement: int = 3
    entries: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.capacity < 0 or self.min_agreement < 2:
            raise ValueError(
                f"DemonstrationPool needs capacity >= 0 and min_agreement >= 2 (a ranking of one response shows "
                f"nothing); got capacity={self.capacity}, min_agreement={self.min_agreement}"
            )
        self.static = load_demonstrations(self.static)

    def add(self, prompt: Any, completions: Sequence[Response], agreement: Sequence[int], cycle: int) -> bool:
        """Add the agreement ranking of one prompt if it is long enough; True when added."""
        if len(agreement) < self.min_agreement or self.capacity == 0:
            return False
        key = prompt_key(prompt)
        self.entries = [e for e in self.entries if prompt_key(e["prompt"]) != key]
        self.entries.append({**agreement_demonstration(prompt, completions, agreement), "cycle": cycle})
        del self.entries[: max(0, len(self.entries) - self.capacity)]
        return True

    def select(self, prompt: Any, k: int, selection: str = "recent") -> list[dict[str, Any]]:
        """The static demonstrations, then k dynamic ones: the most recent, or (`similar`) the most similar prompts
        by bag-of-words cosine, ties to the most recent. The query's own prompt is never its own example."""
        if selection not in SELECTIONS:
            raise ValueError(f"demonstration selection must be one of {SELECTIONS}, got {selection!r}")
        key = prompt_key(prompt)
        candidates = [e for e in reversed(self.entries) if prompt_key(e["prompt"]) != key]  # newest first
        if selection == "similar" and candidates:
            query = _words(prompt)
            candidates = sorted(candidates, key=lambda e: -_cosine(query, _words(e["prompt"])))  # stable: recency
        dynamic = [{k_: e[k_] for k_ in ("prompt", "completions", "ranking")} for e in candidates[: max(k, 0)]]
        return [*self.static, *dynamic]

    def to_json(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "min_agreement": self.min_agreement, "entries": self.entries}

    def save(self, path: str | Path) -> None:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, static: list[dict[str, Any]]) -> DemonstrationPool:
        data = json.loads(Path(path).read_text())
        return cls(static, data["capacity"], data["min_agreement"], list(data["entries"]))


def static_demonstrations(source: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """`None` → the built-in hand-written set; `"none"` or `[]` → no static demonstrations; a .json/.jsonl path or a
    list → those (validated)."""
    if source is None:
        return list(DEFAULT_STATIC_DEMONSTRATIONS)
    if isinstance(source, str) and source.lower() == "none":
        return []
    return load_demonstrations(source)


class ICLRanker(Judge):
    """A judge asked with in-context demonstrations chosen per prompt from a (frozen) `DemonstrationPool`.

    Prompts that get the same demonstrations go to the inner judge in one call. A judge without a `demonstrations`
    argument (a scoring function, the noisy oracle) is asked once, without them. `shuffle` lists each prompt's
    candidates in a seeded random order and maps the answer back, against position bias (cyclealign §3). With
    `max_prompt_chars`, dynamic demonstrations are left out, last selected first, until the judge's prompt fits
    (the static ones and the query always stay).
    """

    def __init__(
        self,
        judge: Judge,
        pool: DemonstrationPool,
        k_dynamic: int = 2,
        selection: str = "recent",
        shuffle: bool = False,
        seed: int = 0,
        max_prompt_chars: int | None = None,
    ):
        self.inner, self.pool, self.k_dynamic, self.selection = judge, pool, k_dynamic, selection
        self.shuffle, self.seed, self.max_prompt_chars = shuffle, seed, max_prompt_chars
        self.uses_demonstrations = isinstance(judge, LLMJudge)

    def _order(self, row_id: str, n: int) -> list[int]:
        order = list(range(n))
        if self.shuffle:
            random.Random(f"{self.seed}:{row_id}").shuffle(order)
        return order

    def _fit(self, prompt: Any, shown: list[Response], demos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.max_prompt_chars is None:
            return demos
        instruction = self.inner.instruction  # type: ignore[attr-defined]
        while len(demos) > len(self.pool.static):
            if len(judge_messages(prompt, shown, instruction, demos)[0]["content"]) <= self.max_prompt_chars:
                break
            demos = demos[:-1]
        return demos

    def judge(
        self, prompts: list[Any], completions: list[list[Response]], row_ids: list[str] | None = None
    ) -> list[Judgement]:
        row_ids = row_ids or [str(i) for i in range(len(prompts))]
        orders = [self._order(r, len(c)) for r, c in zip(row_ids, completions)]
        shown = [[c[j] for j in order] for c, order in zip(completions, orders)]
        results: list[Judgement | None] = [None] * len(prompts)
        if not self.uses_demonstrations:
            groups = {"": list(range(len(prompts)))}
            demos_of: dict[str, list[dict[str, Any]]] = {"": []}
        else:
            groups, demos_of = {}, {}
            for i, prompt in enumerate(prompts):
                demos = self._fit(prompt, shown[i], self.pool.select(prompt, self.k_dynamic, self.selection))
                key = json.dumps(demos, sort_keys=True, default=str)
                groups.setdefault(key, []).append(i)
                demos_of[key] = demos
        for key, members in groups.items():
            args = ([prompts[i] for i in members], [shown[i] for i in members], [row_ids[i] for i in members])
            if self.uses_demonstrations:
                verdicts = self.inner.judge(*args, demonstrations=demos_of[key])  # type: ignore[call-arg]
            else:
                verdicts = self.inner.judge(*args)
            for i, verdict in zip(members, verdicts):
                if verdict.ranking is not None:  # shown position → original candidate id
                    verdict.ranking = [orders[i][j] for j in verdict.ranking]
                if verdict.scores is not None:
                    scores = [0.0] * len(verdict.scores)
                    for position, score in zip(orders[i], verdict.scores):
                        scores[position] = score
                    verdict.scores = scores
                results[i] = verdict
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.inner.close()


def _unit_draw(*parts: Any) -> float:
    """A deterministic uniform draw in (0, 1) from the parts (so a resumed job sees the same noise)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return (int.from_bytes(digest[:8], "little") + 0.5) / 2**64


class NoisyOracleJudge(Judge):
    """Ground truth plus noise: score_i = f(prompt, y_i) + σ·ε_i, ε_i ~ N(0, 1), ranking by descending score.

    With `failure_rate` p, a prompt's answer is "garbage" with probability p and the verdict is a failure (no
    ranking), as an LLM judge that cannot be parsed. Noise and failures are seeded by (seed, row id, response), so
    reruns and resumed jobs see the same verdicts. Demonstrations do not change it: it stands in for an imperfect
    LLM, not for in-context learning.
    """

    def __init__(
        self, function: str | Callable[[str, str], Any], noise: float = 0.0, failure_rate: float = 0.0, seed: int = 0
    ):
        if noise < 0 or not 0 <= failure_rate <= 1:
            raise ValueError(f"noisy oracle needs noise >= 0 and 0 <= failure_rate <= 1; got {noise}, {failure_rate}")
        self.function = import_function(function) if isinstance(function, str) else function
        self.noise, self.failure_rate, self.seed = noise, failure_rate, seed

    def judge(
        self, prompts: list[Any], completions: list[list[Response]], row_ids: list[str] | None = None
    ) -> list[Judgement]:
        row_ids = row_ids or [str(i) for i in range(len(prompts))]
        results = []
        for prompt, candidates, row_id in zip(prompts, completions, row_ids):
            if _unit_draw(self.seed, row_id, "failure") < self.failure_rate:
                results.append(Judgement(ranking=None, raw=["<garbage>"], error="noisy oracle: simulated failure"))
                continue
            scores = []
            for i, response in enumerate(candidates):
                value = self.function(prompt_text(prompt), response_text(response))
                value = float(getattr(value, "total", value))
                u1 = _unit_draw(self.seed, row_id, i, response_text(response), 1)
                u2 = _unit_draw(self.seed, row_id, i, response_text(response), 2)
                gaussian = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)  # Box-Muller
                scores.append(value + self.noise * gaussian)
            results.append(Judgement(ranking=ranking_from_scores(scores), scores=scores))
        return results


class _ClosingLLMJudge(LLMJudge):
    """An LLM judge that owns its generator."""

    def close(self) -> None:
        self.generator.close()


BLACK_BOX_KINDS = ("llm", "noisy_oracle", "callable", "reward_model", "likelihood")


def judge_spec(black_box: dict[str, Any]) -> Any:
    """data_gen's `JudgeSpec` describing the black box (what the rank store's fingerprint records). The noisy
    oracle is recorded as a `callable` judge with its noise settings in `backend_kwargs`."""

    settings = dict(black_box)
    kind = settings.get("kind", "llm")
    if kind not in BLACK_BOX_KINDS:
        raise ValueError(f"black_box.kind must be one of {', '.join(BLACK_BOX_KINDS)}, got {kind!r}")
    if kind == "noisy_oracle":
        extra = {k: settings.pop(k) for k in ("noise", "failure_rate") if k in settings}
        settings["kind"] = "callable"
        settings["backend_kwargs"] = {**settings.get("backend_kwargs", {}), **extra, "noisy_oracle": True}
    settings = canonical_job_keys(JudgeSpec, settings, "black_box")  # deprecated judge keys → new names
    settings.setdefault("max_retries", 1)  # docs/methods/cyclealign.md §2 step 2: re-query once, then drop the prompt
    spec = build_config(JudgeSpec, settings, "black_box")
    spec.check("black_box")
    return spec


def make_black_box(black_box: dict[str, Any]) -> Judge:
    """The black-box judge of a `black_box` mapping: `kind` llm (data_gen `JudgeSpec` keys: model, backend,
    backend_kwargs, instruction, max_retries, temperature, ...), noisy_oracle (function, noise, failure_rate, seed),
    or callable / reward_model / likelihood (data_gen's judges)."""

    spec = judge_spec(black_box)
    if black_box.get("kind") == "noisy_oracle":
        kwargs = spec.backend_kwargs
        return NoisyOracleJudge(spec.function, kwargs.get("noise", 0.0), kwargs.get("failure_rate", 0.0), spec.seed)
    if spec.kind == "llm":
        generator = make_generator(spec.backend, spec.model, spec.tokenizer, **spec.backend_kwargs)
        params = SamplingParams(
            temperature=spec.temperature, max_new_tokens=spec.max_completion_length, seed=spec.seed
        )
        return _ClosingLLMJudge(
            generator, spec.instruction, None, spec.max_retries, params, spec.retry_temperature, spec.seed
        )
    return make_judge(spec)
