"""`align-distill evaluate speculative --config eval.yaml [--key value ...]`: how good one or more drafts are for a
target under speculative decoding (docs/methods/speculative.md, "Evaluation").

Writes `<output_dir>/speculative.json` and `speculative.md`: per draft, α on target- and draft-generated text
(exact, from both models' distributions), the block efficiency for γ = 1…`max_gamma`, and the reference sampler's
measured acceptance, tokens per target call and wall-clock speed-up over plain target sampling.
Exit codes: 0 done, 2 a mistake in the command line, config or prompt file (one line; `--debug` shows the
traceback), 1 a failure while running.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from align_distill.configuration import describe_dataclass, load_dataclasses, one_line, split_config_argument
from align_distill.data import read_records
from align_distill.errors import ConfigError, UserError, debug_enabled

USAGE = "usage: align-distill evaluate speculative --config eval.yaml [--key value ...]"


@dataclass
class SpeculativeEvalConfig:
    r"""Configuration of `align-distill evaluate speculative`.

    > Parameters that control the models

        target, drafts, dtype: the target model and the draft models (local folders or hub ids sharing the target's
        tokenizer), loaded in `dtype`.

    > Parameters that control the prompts and the sampling

        prompts, n, max_new_tokens, temperature, seed: a JSONL file whose rows have `prompt` (a string, wrapped
        as one user turn when the tokenizer has a chat template, or chat messages); its first `n` rows; samples of
        at most `max_new_tokens` at `temperature`, seeded.

    > Parameters that control the measurements

        max_gamma, gamma, timing_prompts, output_dir: block efficiency for γ = 1…max_gamma; the reference sampler
        runs with `gamma` drafted tokens per target call on the first `timing_prompts` prompts (0: skip it).
    """

    target: str = field(default="", metadata={"help": "Target model (folder or hub id)."})
    drafts: list[str] = field(default_factory=list, metadata={"help": "Draft models, same tokenizer as the target."})
    prompts: str = field(default="", metadata={"help": "Data file of prompts (`prompt`: string or chat messages)."})
    n: int | None = field(default=64, metadata={"help": "Number of prompts (the file's first n; null: all)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest sample, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of target and drafts."})
    max_gamma: int = field(default=8, metadata={"help": "Block efficiency is reported for γ = 1…max_gamma."})
    gamma: int = field(default=4, metadata={"help": "Drafted tokens per target call in the timed sampler runs."})
    timing_prompts: int = field(default=8, metadata={"help": "Prompts the reference sampler is timed on (0: none)."})
    seed: int = field(default=0, metadata={"help": "Seed of every sample."})
    dtype: str = field(default="float32", metadata={"help": "dtype the models are loaded in."})
    output_dir: str = field(default="runs/speculative_eval", metadata={"help": "Where the JSON and markdown go."})

    def __post_init__(self) -> None:
        if not self.target:
            raise ConfigError("`target`: missing; set the target model, e.g. --target runs/quickstart/teacher_dpo")
        if not self.drafts:
            raise ConfigError("`drafts`: missing; set one or more draft models, e.g. --drafts a,b")
        if not self.prompts:
            raise ConfigError("`prompts`: missing; set a JSONL file whose rows have `prompt`")
        if self.temperature <= 0:
            raise ConfigError(f"`temperature`: must be > 0 (speculative sampling), found {self.temperature}")
        for name in ("max_gamma", "gamma", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}`: must be at least 1, found {getattr(self, name)}")
        if self.n is not None and self.n < 1:
            raise ConfigError(f"`n`: must be at least 1 prompt (or null for all), found {self.n}")


def read_prompts(path: str, n: int | None) -> list[str | list[dict]]:
    """The `prompt` of the first `n` rows of a data file (JSONL, JSON, parquet, CSV; `align_distill.data`'s reader,
    which names a bad row); a row without a usable `prompt` is a UserError naming file and row."""
    if not Path(path).is_file():
        raise UserError(f"`prompts`: no such file {path}; give a JSONL file whose rows have `prompt`")
    rows = list(read_records(path))[:n]
    for number, row in enumerate(rows, start=1):
        prompt = row.get("prompt")
        if not (isinstance(prompt, (str, list)) and prompt):
            raise UserError(f"{path}, row {number}: expected `prompt`, a string or a list of chat messages")
    if not rows:
        raise UserError(f"{path}: no prompts; give a JSONL file whose rows have `prompt`")
    return [row["prompt"] for row in rows]


def run(config: SpeculativeEvalConfig) -> dict:
    """Measure every draft against the target; write the JSON and markdown; return the JSON record."""
    from .evaluate import evaluate_drafts  # torch and transformers load here: `--help` and config errors stay fast

    texts = read_prompts(config.prompts, config.n)
    drafts = evaluate_drafts(
        config.target,
        {path: path for path in config.drafts},
        texts,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
        max_gamma=config.max_gamma,
        timing_prompts=config.timing_prompts,
        gamma=config.gamma,
        dtype=config.dtype,
    )
    record = {"config": asdict(config), "prompts": len(texts), "drafts": drafts}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "speculative.json", json.dumps(record, indent=2) + "\n")
    _write(out / "speculative.md", markdown(record))
    return record


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def markdown(record: dict) -> str:
    """The report: one row per draft, α on both texts, block efficiency per γ, the sampler's numbers."""
    gammas = list(next(iter(record["drafts"].values()))["block_efficiency"])
    lines = [
        f"# Speculative decoding: drafts for {record['config']['target']}",
        "",
        f"{record['prompts']} prompts, temperature {record['config']['temperature']}, "
        f"at most {record['config']['max_new_tokens']} new tokens. α = Σ min(p, q) averaged over the tokens of the "
        "target's samples (target text) and of the draft's own samples (draft text); block efficiency = "
        "(1 − α^(γ+1)) / (1 − α) from α on target text.",
        "",
        "| draft | α target text | α draft text | " + " | ".join(f"γ={g}" for g in gammas) + " |",
        "|---|---|---|" + "---|" * len(gammas),
    ]
    for name, result in record["drafts"].items():
        efficiency = " | ".join(f"{result['block_efficiency'][g]:.2f}" for g in gammas)
        lines.append(
            f"| {name} | {result['alpha_target_text']:.3f} | {result['alpha_draft_text']:.3f} | {efficiency} |"
        )
    timed = {name: r["sampler"] for name, r in record["drafts"].items() if "sampler" in r}
    if timed:
        lines += [
            "",
            "Reference sampler (no KV cache; plain target sampling with the same forward is the baseline):",
            "",
            "| draft | γ | measured α | tokens per target call (predicted) | speed-up |",
            "|---|---|---|---|---|",
        ]
        for name, s in timed.items():
            lines.append(
                f"| {name} | {s['gamma']} | {s['acceptance']:.3f} | {s['block_efficiency']:.2f} "
                f"({s['predicted_block_efficiency']:.2f}) | {s['speedup']:.2f}× |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """`align-distill evaluate speculative ...`; returns the exit code."""
    if "-h" in argv or "--help" in argv:
        print(describe_dataclass(SpeculativeEvalConfig, USAGE))
        return 0
    try:
        path, rest = split_config_argument(argv)
        (config,) = load_dataclasses((SpeculativeEvalConfig,), path, rest, "evaluate speculative")
        record = run(config)
    except (UserError, FileNotFoundError) as error:
        if debug_enabled():
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"evaluate speculative: {len(record['drafts'])} drafts, report in {config.output_dir}/speculative.md")
    return 0
