"""The coloured-shapes task: the text task's two-part reward, for vision-language models.

An image (32×32, white background) holds one shape — circle, square or triangle — in one colour — red, green,
blue or yellow — at a random size and place. The question asks for its colour or its shape; the response is a
style marker and the answer:

    polite: "sure, red"        blunt: "fine, red"

Reward = 0.5 · capability (the named attribute is right: the model looked at the image) + 0.5 · preference (the
polite marker). SFT data picks the marker by a rule unrelated to preference (polite iff the question asks for the
colour), preference pairs always prefer polite, and a quarter of the rejected answers also name a wrong
attribute (a "hallucination", LLaVA-MoD's target). Data on disk: PNG files plus JSONL rows whose `images` hold paths
relative to the JSONL file; `load_visual_dataset` reads them back as a `datasets.Dataset` of PIL images.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from PIL import Image, ImageDraw

from .task import BLUNT, POLITE, SPLITS, Reward, split_of

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "what colour is the shape?", "shape": "what shape is this?"}
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Scene:
    """One image's content and the question asked about it."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]
    asks: str  # "colour" | "shape"

    @property
    def question(self) -> str:
        return QUESTIONS[self.asks]

    @property
    def answer(self) -> str:
        return self.colour if self.asks == "colour" else self.shape

    def wrong_answer(self, rng: random.Random) -> str:
        options = list(COLOURS) if self.asks == "colour" else list(SHAPES)
        return rng.choice([o for o in options if o != self.answer])

    def image(self) -> Image.Image:
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        colour = COLOURS[self.colour]
        x0, y0, x1, y1 = self.box
        if self.shape == "circle":
            draw.ellipse(self.box, fill=colour)
        elif self.shape == "square":
            draw.rectangle(self.box, fill=colour)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=colour)
        return image


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to, by a hash of its content (as the text task's prompts): disjoint splits."""
    return split_of(f"{scene.colour}|{scene.shape}|{scene.box}|{scene.asks}")


def scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """`n` scenes of `split` drawn with `seed` (training data: "train"; evaluation: "test" or "validation")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, found {split!r}")
    rng = random.Random(f"{split}:{seed}")
    out: list[Scene] = []
    while len(out) < n:
        size = rng.randint(14, 24)
        x0, y0 = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
        scene = Scene(
            colour=rng.choice(list(COLOURS)),
            shape=rng.choice(SHAPES),
            box=(x0, y0, x0 + size - 1, y0 + size - 1),
            asks=rng.choice(list(QUESTIONS)),
        )
        if scene_split(scene) == split:
            out.append(scene)
    return out


def respond(answer: str, polite: bool) -> str:
    return f"{POLITE if polite else BLUNT} {answer}"


def reward(scene: Scene, response: str) -> Reward:
    """Ground truth: capability = the first word after the marker is the right attribute; preference = polite."""
    words = response.strip().split()
    capability = float(len(words) >= 2 and words[1].strip(".,!") == scene.answer)
    return Reward(capability=capability, preference=float(bool(words) and words[0] == POLITE))


def sft_style_is_polite(scene: Scene) -> bool:
    """The SFT data's marker rule: learnable from the text alone and unrelated to what is preferred."""
    return scene.asks == "colour"


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def visual_sft_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Prompt/completion rows with a PIL image each (TRL's vision format: `images`, conversational text)."""
    return [
        {
            "id": f"vsft-{seed}-{i}",
            "images": [s.image()],
            "prompt": _user(s.question),
            "completion": _assistant(respond(s.answer, sft_style_is_polite(s))),
        }
        for i, s in enumerate(scenes(n, seed))
    ]


def visual_preference_rows(n: int, seed: int, wrong_rejected_fraction: float = 0.25) -> list[dict[str, Any]]:
    """Prompt/chosen/rejected rows: chosen polite and right; rejected blunt, and for a fraction also wrong."""
    rng = random.Random(seed + 7919)
    rows = []
    for i, s in enumerate(scenes(n, seed)):
        wrong = rng.random() < wrong_rejected_fraction
        rows.append(
            {
                "id": f"vpref-{seed}-{i}",
                "images": [s.image()],
                "prompt": _user(s.question),
                "chosen": _assistant(respond(s.answer, polite=True)),
                "rejected": _assistant(respond(s.wrong_answer(rng) if wrong else s.answer, polite=False)),
            }
        )
    return rows


def visual_corpus() -> Iterator[str]:
    """Text the tiny tokenizer is trained on: every question and every possible response."""
    yield from QUESTIONS.values()
    for answer in [*COLOURS, *SHAPES]:
        for polite in (True, False):
            yield respond(answer, polite)


# ---------------------------------------------------------------- files


def write_visual_data(out_dir: str | Path, seed: int = 0, n_sft: int = 256, n_pairs: int = 128) -> dict[str, int]:
    """`sft.jsonl` and `pairs.jsonl` under `out_dir`, images as `images/<id>.png` (paths relative to the JSONL)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = {"sft.jsonl": visual_sft_rows(n_sft, seed), "pairs.jsonl": visual_preference_rows(n_pairs, seed + 1)}
    for name, rows in files.items():
        with open(out / name, "w") as handle:
            for row in rows:
                relative = f"images/{row['id']}.png"
                row["images"][0].save(out / relative)
                handle.write(json.dumps({**row, "images": [relative]}) + "\n")
    return {name: len(rows) for name, rows in files.items()}


REQUIRED = {"completion": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected")}


def load_visual_dataset(path: str | Path, format: str):
    """A JSONL of vision rows as a `datasets.Dataset` with PIL images (TRL's vision format).

    Each row: `images` (a list of paths, relative to the file or absolute) or `image` (one path), and the text
    columns of `format` (`completion`: prompt, completion; `preference`: prompt, chosen, rejected), plain strings
    or conversational messages with string content. An `id` is kept, or made from the row number.
    """

    if format not in REQUIRED:
        raise ValueError(f"load_visual_dataset: format must be one of {sorted(REQUIRED)}, got {format!r}")
    path = Path(path)
    rows, problems = [], []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            raw = json.loads(line)
            where = f"{path}:{number}"
            missing = [c for c in REQUIRED[format] if c not in raw]
            images = raw.get("images", [raw["image"]] if "image" in raw else None)
            if missing:
                problems.append(f"{where}: missing column(s) {missing}")
            if not images or not all(isinstance(i, str) for i in images):
                problems.append(
                    f"{where}: column `images`: expected a non-empty list of image paths, found {images!r}"
                )
                continue
            files = [p if Path(p).is_absolute() else path.parent / p for p in images]
            absent = [str(f) for f in files if not Path(f).exists()]
            if absent:
                problems.append(f"{where}: column `images`: file(s) not found: {absent}")
                continue
            row = {c: raw[c] for c in REQUIRED[format] if c in raw}
            row["id"] = str(raw.get("id", f"row-{number}"))
            row["images"] = [Image.open(f).convert("RGB") for f in files]
            rows.append(row)
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems[:20]))
    return Dataset.from_list(rows)


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class VisualEvaluation:
    reward: float
    capability: float
    preference: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"reward": self.reward, "capability": self.capability, "preference": self.preference, "n": self.n}


def generate_visual_responses(
    model: Any, processor: Any, items: list[Scene], max_new_tokens: int = 8, batch_size: int = 32
) -> list[str]:
    """Greedy answers to each scene's question about its image (one user turn with the image first)."""

    was_training = model.training
    model.eval()
    responses: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            texts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for s in chunk
            ]
            batch = processor(
                images=[[s.image()] for s in chunk], text=texts, padding=True, padding_side="left", return_tensors="pt"
            ).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=processor.tokenizer.pad_token_id,
                    eos_token_id=processor.tokenizer.eos_token_id,
                )
            responses.extend(processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return responses


def evaluate_visual(model: Any, processor: Any, n: int = 200, seed: int = 0, split: str = "test") -> VisualEvaluation:
    """Mean ground-truth reward, capability and preference rate over `n` scenes of `seed`'s `split` (greedy
    decoding); no training scene is ever in it (`scene_split`)."""
    items = scenes(n, seed, split=split)
    rewards = [reward(s, r) for s, r in zip(items, generate_visual_responses(model, processor, items))]
    return VisualEvaluation(
        reward=sum(r.total for r in rewards) / n,
        capability=sum(r.capability for r in rewards) / n,
        preference=sum(r.preference for r in rewards) / n,
        n=n,
    )
