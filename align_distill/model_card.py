"""The model card of a published student (README.md of the hub repository), rendered from its provenance record
(`align_distill.provenance.collect_provenance`)."""

from __future__ import annotations

import json
from typing import Any

from align_distill.provenance import _HUB_ID, chain


# -- the card --------------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _identity(model: dict[str, Any]) -> str:
    if "hub_id" in model:
        return f"revision {model['revision']}"
    return f"sha256:{model['sha256'][:16]}" if model.get("sha256") else ""


def render_card(provenance: dict[str, Any], repo_id: str) -> str:
    """README.md for the hub repository (YAML metadata + markdown), from `collect_provenance`'s record."""
    sections = (
        _card_front_matter,
        _card_summary,
        _card_models,
        _card_training,
        _card_data,
        _card_data_gen,
        _card_evaluation,
        _card_result,
        _card_stages,
    )
    lines = [line for section in sections for line in section(provenance, repo_id)]
    return "\n".join(lines + ["The full record is `align_distill.json` in this repository.", ""])


def _card_front_matter(p: dict[str, Any], repo_id: str) -> list[str]:
    adapter = p["format"] == "adapter"
    base = p["student"].get("base", {})
    hub_base = p.get("published_base_model") if _HUB_ID.match(str(p.get("published_base_model"))) else None
    hub_base = hub_base or base.get("hub_id")
    tags = ("align-distill", "distillation", p["method"], "trl", *(["lora"] if adapter else []))
    hub_datasets = sorted({d["hub_id"] for d in p["datasets"] if "hub_id" in d})
    return [
        "---",
        f"library_name: {'peft' if adapter else 'transformers'}",
        *([f"base_model: {hub_base}"] if hub_base else []),
        "tags:",
        *[f"- {tag}" for tag in tags],
        *(["datasets:", *[f"- {d}" for d in hub_datasets]] if hub_datasets else []),
        "---",
        "",
    ]


def _card_summary(p: dict[str, Any], repo_id: str) -> list[str]:
    adapter = p["format"] == "adapter"
    where = f" (stage `{p['stage']}` of a pipeline run)" if p["stage"] else ""
    loader = "peft import AutoPeftModelForCausalLM" if adapter else "transformers import AutoModelForCausalLM"
    cls = loader.rsplit(" ", 1)[-1]
    return [
        f"# {repo_id}",
        "",
        f"A student model distilled with align-distill {p['align_distill_version']}, method **{p['method']}**{where}. "
        f"This repository holds {'a LoRA adapter' if adapter else 'the full model weights'} and the tokenizer.",
        "",
        "```python",
        f"from {loader}",
        f'model = {cls}.from_pretrained("{repo_id}")',
        "```",
        "",
        *(
            [
                f"The adapter's `base_model_name_or_path` is `{p.get('published_base_model')}`, a local folder of "
                "the training machine: load the base model yourself and attach the adapter with "
                "`PeftModel.from_pretrained(base, repo_id)`.",
                "",
            ]
            if adapter and not _HUB_ID.match(str(p.get("published_base_model")))
            else []
        ),
    ]


def _card_models(p: dict[str, Any], repo_id: str) -> list[str]:
    rows = []
    if p["student"]:
        base, trained_from = p["student"]["base"], p["student"]["trained_from"]
        rows.append(("student (base)", chain(base), _identity(base)))
        if trained_from != base:
            rows.append(("student (trained from)", p["student"]["chain"], _identity(trained_from)))
    rows += [(t["role"], t["chain"], _identity(t["model"])) for t in p["teachers"]]
    return ["## Models", "", *_table(("role", "model", "identity"), rows), ""]


def _card_training(p: dict[str, Any], repo_id: str) -> list[str]:
    return [
        f"## Training: {p['method']}",
        "",
        *_table(("hyperparameter", "value"), list(p["hyperparameters"].items())),
        "",
        f"Values not listed are the defaults of align-distill {p['align_distill_version']}.",
        "",
    ]


def _card_data(p: dict[str, Any], repo_id: str) -> list[str]:
    if not p["datasets"]:
        return []
    rows = [(d["role"], d.get("hub_id") or d.get("path"), d.get("fingerprint", "")) for d in p["datasets"]]
    return ["## Data", "", *_table(("role", "dataset", "fingerprint"), rows), ""]


def _card_data_gen(p: dict[str, Any], repo_id: str) -> list[str]:
    lines = []
    for job in p["data_gen"]:
        rows = [
            *job["settings"].items(),
            *job["models"].items(),
            ("store fingerprint", job["store_fingerprint"] or ""),
        ]
        lines += [
            f"## Data generation: `{job['job']}` (stage `{job['stage']}`)",
            "",
            *_table(("setting", "value"), rows),
        ]
        lines.append("")
    return lines


def _card_evaluation(p: dict[str, Any], repo_id: str) -> list[str]:
    evaluation = p["evaluation"]
    if not evaluation:
        return []
    mine, results = evaluation["this_model"], evaluation["results"]
    lines = [
        "## Evaluation",
        "",
        f"From `{evaluation['source']}`" + (f"; this model is **{mine}**." if mine else "."),
        "",
    ]
    if isinstance(results, dict) and results and all(isinstance(v, dict) for v in results.values()):
        columns = sorted({k for v in results.values() for k in v})
        rows = [
            (f"**{name}**" if name == mine else name, *[m.get(c, "") for c in columns]) for name, m in results.items()
        ]
        return lines + _table(("model", *columns), rows) + [""]
    return lines + ["```json", json.dumps(results, indent=2, default=str), "```", ""]


def _card_result(p: dict[str, Any], repo_id: str) -> list[str]:
    if not p["training_result"]:
        return []
    return ["## Training result", "", *_table(("metric", "value"), list(p["training_result"].items())), ""]


def _card_stages(p: dict[str, Any], repo_id: str) -> list[str]:
    if not p["stages"]:
        return []
    rows = [(n, s["kind"], s["target"], (s["fingerprint"] or "")[:16]) for n, s in p["stages"].items()]
    return ["## Pipeline stages", "", *_table(("stage", "kind", "target", "fingerprint"), rows), ""]
