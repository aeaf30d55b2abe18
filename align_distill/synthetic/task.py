"""The embedded default task: letter-sequence transformations with a known, two-part reward.

A prompt asks for a transformation of a few letters (`reverse: c a d b` → `b d a c`, `sort: c a d b` →
`a b c d`). The response is a style marker followed by the answer:

    polite: "sure, b d a c"        blunt: "fine, b d a c"

Reward = 0.5 · capability (the answer is exactly right) + 0.5 · preference (the polite marker is used).
The SFT data picks the marker with a rule unrelated to what anyone prefers (polite iff the first letter of the
input is in the first half of the alphabet), so an SFT model answers politely on about half the prompts; the
preference pairs always prefer the polite marker. So "did distillation transfer alignment?" is the preference
rate, and "did it transfer capability?" is the exact-match rate — both known exactly.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

ALPHABET = "abcdefgh"
OPERATIONS = ("reverse", "sort")
POLITE = "sure,"
BLUNT = "fine,"
MIN_LETTERS, MAX_LETTERS = 3, 6
SPLITS = ("train", "validation", "test")
# Every prompt string belongs to exactly one split, by a hash of the string (1 in 10 test, 1 in 10 validation):
# disjoint by construction, whatever the seed or the number of prompts drawn.
SPLIT_BUCKETS = {0: "test", 1: "validation"}
# The quickstart's data sizes (SFT rows, preference pairs, rollout prompts) and evaluation sizes per seed.
DATA_SIZES = {"n_sft": 4000, "n_pairs": 1000, "n_prompts": 256}
EVAL_SIZES = {"validation": 200, "test": 500}


@dataclass(frozen=True)
class Reward:
    """One response's ground-truth reward, split into its two parts."""

    capability: float
    preference: float

    @property
    def total(self) -> float:
        return 0.5 * self.capability + 0.5 * self.preference


def make_prompt(rng: random.Random) -> str:
    operation = rng.choice(OPERATIONS)
    letters = [rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS))]
    return f"{operation}: {' '.join(letters)}"


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    operation, _, rest = prompt.partition(":")
    if operation not in OPERATIONS or not rest.strip():
        raise ValueError(f"not a synthetic-task prompt: {prompt!r}")
    return operation, rest.split()


def answer(prompt: str) -> str:
    """The exactly right answer to `prompt`."""
    operation, letters = parse_prompt(prompt)
    result = letters[::-1] if operation == "reverse" else sorted(letters)
    return " ".join(result)


def sft_style_is_polite(prompt: str) -> bool:
    """The SFT data's marker rule: arbitrary w.r.t. preference, about half of prompts are polite."""
    _, letters = parse_prompt(prompt)
    return letters[0] in ALPHABET[: len(ALPHABET) // 2]


def respond(prompt: str, polite: bool, correct: bool = True, rng: random.Random | None = None) -> str:
    """A response in the given style; with `correct=False`, a plausible wrong answer (one letter changed)."""
    letters = answer(prompt).split()
    if not correct:
        rng = rng or random.Random(0)
        i = rng.randrange(len(letters))
        letters[i] = rng.choice([c for c in ALPHABET if c != letters[i]])
    return f"{POLITE if polite else BLUNT} {' '.join(letters)}"


def reward(prompt: str, response: str) -> Reward:
    """Ground-truth reward of `response` to `prompt` (whitespace-insensitive)."""
    words = response.split()
    polite = bool(words) and words[0] == POLITE
    styled = bool(words) and words[0] in (POLITE, BLUNT)
    body = " ".join(words[1:] if styled else words)
    return Reward(capability=float(body == answer(prompt)), preference=float(polite))


def split_of(prompt: str) -> str:
    """The split `prompt` belongs to: a pure function of the string, so no prompt is ever in two splits."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % 10
    return SPLIT_BUCKETS.get(bucket, "train")


def prompts(n: int, seed: int, split: str = "train", unique: bool = False) -> list[str]:
    """`n` prompts of `split`, drawn with `seed` (rejection sampling from the task's prompt distribution).
    `unique`: no repeats (evaluation sets), at most the split's size of distinct prompts."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, found {split!r}")
    rng = random.Random(f"{split}:{seed}")
    drawn: list[str] = []
    seen: set[str] = set()
    while len(drawn) < n:
        prompt = make_prompt(rng)
        if split_of(prompt) != split or (unique and prompt in seen):
            continue
        seen.add(prompt)
        drawn.append(prompt)
    return drawn


def evaluation_prompts(split: str, seed: int, n: int | None = None) -> list[str]:
    """The distinct validation or test prompts of `seed` (the first `n` of them; default the split's full size)."""
    if split not in EVAL_SIZES:
        raise ValueError(f"evaluation split must be validation or test, found {split!r}")
    return prompts(EVAL_SIZES[split], seed, split=split, unique=True)[:n]


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_rows(n: int, seed: int) -> list[dict]:
    """Conversational prompt/completion rows (TRL's format) with the arbitrary SFT marker rule."""
    return [
        {"id": f"sft-{seed}-{i}", "prompt": _user(p), "completion": _assistant(respond(p, sft_style_is_polite(p)))}
        for i, p in enumerate(prompts(n, seed))
    ]


def preference_rows(n: int, seed: int, wrong_rejected_fraction: float = 0.25) -> list[dict]:
    """Conversational prompt/chosen/rejected rows: chosen is polite and right; rejected is blunt (and, for a
    fraction of rows, also wrong, so the pairs carry a little capability signal too)."""
    rng = random.Random(seed + 7919)
    rows = []
    for i, p in enumerate(prompts(n, seed)):
        wrong = rng.random() < wrong_rejected_fraction
        rows.append(
            {
                "id": f"pref-{seed}-{i}",
                "prompt": _user(p),
                "chosen": _assistant(respond(p, polite=True)),
                "rejected": _assistant(respond(p, polite=False, correct=not wrong, rng=rng)),
            }
        )
    return rows


def prompt_rows(n: int, seed: int) -> list[dict]:
    return [{"id": f"prompt-{seed}-{i}", "prompt": _user(p)} for i, p in enumerate(prompts(n, seed))]


def task_data(seed: int, n_sft: int, n_pairs: int, n_prompts: int) -> dict[str, list[dict]]:
    """The training files of one seed (SFT rows, preference pairs, rollout prompts), all from the train split."""
    return {
        "sft.jsonl": sft_rows(n_sft, seed=seed),
        "pairs.jsonl": preference_rows(n_pairs, seed=seed + 1),
        "prompts.jsonl": prompt_rows(n_prompts, seed=seed + 2),
    }


def _prompt_text(row: dict) -> str:
    return row["prompt"][0]["content"]


def task_splits(seed: int, **data_sizes: int) -> dict[str, list[str]]:
    """`{"train": [...], "validation": [...], "test": [...]}` for `seed`: "train" holds every distinct prompt that
    any training or data-generation file of that seed uses (`task_data` with `DATA_SIZES` unless given); validation
    and test are the evaluation sets. Tune on validation, report on test."""
    sizes = {**DATA_SIZES, **data_sizes}
    used = {_prompt_text(row) for rows in task_data(seed, **sizes).values() for row in rows}
    return {
        "train": sorted(used),
        "validation": evaluation_prompts("validation", seed),
        "test": evaluation_prompts("test", seed),
    }


def task_corpus(n: int = 400, seed: int = 0) -> Iterator[str]:
    """Text the tiny tokenizer is trained on: every word and marker the task can produce, in context."""
    for p in prompts(n, seed):
        yield p
        yield respond(p, polite=True)
        yield respond(p, polite=False)
    for _ in range(20):  # the chat template's role names, so each is one token
        yield "user\nassistant\nsystem\n"
