"""The model card of a published student (README.md of the hub repository), rendered from its provenance record
(`align_distill.provenance.collect_provenance`) with `huggingface_hub.ModelCard` / `ModelCardData`.

The YAML metadata: `base_model` (a hub id; `base_model_relation: adapter` for a LoRA adapter), `library_name`
(`peft` / `transformers`), `pipeline_tag` (`text-generation`, `image-text-to-text` for a vision student), `license`
(when given), `datasets` (hub ids), `tags` (the method, `align-distill`, ...), `teachers`, and a `model-index` built
from the evaluation numbers. The body: how to load it, the models and teachers, the key settings of the method and
of each data-generation job (short tables; the full record is `align_distill.json`), data, evaluation, framework
versions and the method's citation. The record holds no absolute path of the training machine
(`provenance.publicize`); every table cell goes through `_value`, never a JSON dump.
"""

from __future__ import annotations

import numbers
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from align_distill.provenance import _HUB_ID, FRAMEWORKS_SHOWN, chain, is_hyperparameter

# -- citations ---------------------------------------------------------------------------------------------------
TRL_BIBTEX = """@misc{vonwerra2022trl,
  title        = {{TRL: Transformer Reinforcement Learning}},
  author       = {Leandro von Werra and Younes Belkada and Lewis Tunstall and Edward Beeching and Tristan Thrush and
                  Nathan Lambert and Shengyi Huang and Kashif Rasul and Quentin Gallou{\\'e}dec},
  year         = 2020,
  journal      = {GitHub repository},
  publisher    = {GitHub},
  howpublished = {\\url{https://github.com/huggingface/trl}}
}"""
DPO_BIBTEX = """@inproceedings{rafailov2023direct,
  title     = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
  author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and
               Chelsea Finn},
  booktitle = {Advances in Neural Information Processing Systems 36 (NeurIPS 2023)},
  year      = 2023
}"""
ADPA_BIBTEX = """@inproceedings{gao2025advantage,
  title     = {{Advantage-Guided Distillation for Preference Alignment in Small Language Models}},
  author    = {Shiping Gao and Fanqi Wan and Jiajian Guo and Xiaojun Quan and Qifan Wang},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR 2025)},
  year      = 2025
}"""
ALIGNDISTIL_BIBTEX = """@inproceedings{zhang2025aligndistil,
  title     = {{AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation}},
  author    = {Songming Zhang and Xue Zhang and Tong Zhang and Bojie Hu and Yufeng Chen and Jinan Xu},
  booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics (ACL 2025)},
  year      = 2025
}"""
LLAVA_MOD_BIBTEX = """@inproceedings{shu2025llavamod,
  title     = {{LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation}},
  author    = {Fangxun Shu and Yue Liao and Le Zhuo and Chenning Xu and Lei Zhang and Guanghao Zhang and Haonan Shi and
               Long Chen and Tao Zhong and Wanggui He and Siming Fu and others},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR 2025)},
  year      = 2025
}"""
CYCLEALIGN_BIBTEX = """@inproceedings{hong2024cyclealign,
  title     = {{CycleAlign: Iterative Distillation from Black-box LLM to White-box Models for Better Human Alignment}},
  author    = {Jixiang Hong and Quan Tu and Changyu Chen and Xing Gao and Ji Zhang and Rui Yan},
  booktitle = {Findings of the Association for Computational Linguistics: ACL 2024},
  year      = 2024
}"""
GKD_BIBTEX = """@inproceedings{agarwal2024onpolicy,
  title     = {{On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes}},
  author    = {Rishabh Agarwal and Nino Vieillard and Yongchao Zhou and Piotr Stanczyk and Sabela Ramos Garea and
               Matthieu Geist and Olivier Bachem},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR 2024)},
  year      = 2024
}"""
CITATIONS: dict[str, tuple[str, ...]] = {
    "sft": (TRL_BIBTEX,),
    "dpo": (DPO_BIBTEX, TRL_BIBTEX),
    "dckd": (ADPA_BIBTEX,),
    "adpa": (ADPA_BIBTEX,),
    "aligndistil": (ALIGNDISTIL_BIBTEX,),
    "mod": (LLAVA_MOD_BIBTEX,),
    "cyclealign": (CYCLEALIGN_BIBTEX,),
    "kd": (GKD_BIBTEX, TRL_BIBTEX),
}
# Training-result entries that are timing bookkeeping, not results.
NOT_RESULTS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")


# -- cells and tables ------------------------------------------------------------------------------------------------
def _value(value: Any) -> str:
    """A short, readable cell: scalars as text, lists joined, mappings as `key=value` pairs (scalars only)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value if not isinstance(v, (dict, list, tuple)))
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items() if not isinstance(v, (dict, list, tuple)))
    return str(value)


def _cell(value: Any) -> str:
    return _value(value).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _identity(model: dict[str, Any]) -> str:
    if "hub_id" in model:
        return f"revision {model['revision']}"
    return f"sha256:{model['sha256'][:16]}" if model.get("sha256") else ""


def _hub_base(p: dict[str, Any]) -> str | None:
    published = p.get("published_base_model")
    if isinstance(published, str) and _HUB_ID.match(published):
        return published
    return (p["student"].get("base") or {}).get("hub_id")


# -- the card --------------------------------------------------------------------------------------------------------
def card_data(provenance: dict[str, Any], repo_id: str, license: str | None = None) -> ModelCardData:
    """The card's YAML metadata (see the module docstring)."""
    p = provenance
    adapter = p["format"] == "adapter"
    base = _hub_base(p)
    extra: dict[str, Any] = {}
    if base and adapter:
        extra["base_model_relation"] = "adapter"
    if p["teachers"]:
        extra["teachers"] = [t["chain"] for t in p["teachers"]]
    eval_results = _eval_results(p)
    return ModelCardData(
        base_model=base,
        library_name="peft" if adapter else "transformers",
        pipeline_tag=p.get("pipeline_tag") or "text-generation",
        license=license,
        datasets=sorted({d["hub_id"] for d in p["datasets"] if "hub_id" in d}) or None,
        tags=["align-distill", "distillation", p["method"], "trl", *(["lora"] if adapter else [])],
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results or None,
        **extra,
    )


def _eval_results(p: dict[str, Any]) -> list[EvalResult]:
    """The numbers of this model in the evaluation (a flat `metric: number` eval.json, or this model's row)."""
    evaluation = p.get("evaluation")
    if not evaluation or not isinstance(evaluation.get("results"), dict):
        return []
    results, mine = evaluation["results"], evaluation.get("this_model")
    metrics = results.get(mine) if mine else results
    if not isinstance(metrics, dict):
        return []
    dataset = next(
        (d for d in (evaluation.get("dataset"), results.get("dataset")) if isinstance(d, str) and d),
        "align-distill-evaluation",
    )
    return [
        EvalResult(
            task_type=p.get("pipeline_tag") or "text-generation",
            dataset_type=dataset,
            dataset_name=f"{dataset} ({evaluation['source']})",
            metric_type=name,
            metric_value=value,
        )
        for name, value in metrics.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    ]


def render_card(provenance: dict[str, Any], repo_id: str, license: str | None = None) -> str:
    """README.md for the hub repository (YAML metadata + markdown), from `collect_provenance`'s record."""
    sections = (
        _card_summary,
        _card_models,
        _card_training,
        _card_data,
        _card_data_gen,
        _card_evaluation,
        _card_result,
        _card_stages,
        _card_frameworks,
        _card_citation,
    )
    body = [line for section in sections for line in section(provenance, repo_id)]
    body += ["The full record is `align_distill.json` in this repository.", ""]
    data = card_data(provenance, repo_id, license)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def _card_summary(p: dict[str, Any], repo_id: str) -> list[str]:
    adapter = p["format"] == "adapter"
    where = f" (stage `{p['stage']}` of a pipeline run)" if p["stage"] else ""
    vision = p.get("pipeline_tag") == "image-text-to-text"
    if adapter:
        loader = "peft import AutoPeftModelForCausalLM"
    else:
        loader = "transformers import " + ("AutoModelForImageTextToText" if vision else "AutoModelForCausalLM")
    cls = loader.rsplit(" ", 1)[-1]
    published = p.get("published_base_model")
    return [
        f"# {repo_id}",
        "",
        f"A student model distilled with align-distill {p['align_distill_version']}, method **{p['method']}**{where}. "
        f"This repository holds {'a LoRA adapter' if adapter else 'the full model weights'} and the "
        f"{'processor' if vision else 'tokenizer'}.",
        "",
        "```python",
        f"from {loader}",
        f'model = {cls}.from_pretrained("{repo_id}")',
        "```",
        "",
        *(
            [
                f"The adapter's `base_model_name_or_path` is `{published}`, a folder of the training machine: load "
                "the base model yourself and attach the adapter with `PeftModel.from_pretrained(base, repo_id)`.",
                "",
            ]
            if adapter and not (isinstance(published, str) and _HUB_ID.match(published))
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
    lines = ["## Models", ""]
    if p["teachers"]:
        lines += [f"Distilled from {len(p['teachers'])} teacher/reference/judge model(s), listed below.", ""]
    return lines + [*_table(("role", "model", "identity"), rows), ""]


def _card_training(p: dict[str, Any], repo_id: str) -> list[str]:
    rows = [(k, v) for k, v in p["hyperparameters"].items() if is_hyperparameter(k)]
    return [
        f"## Training: {p['method']}",
        "",
        *(_table(("setting", "value"), rows) if rows else ["All settings are the defaults."]),
        "",
        f"Settings not listed are the defaults of align-distill {p['align_distill_version']}; the recipe's full "
        "settings are in `align_distill.json`.",
        "",
    ]


def _card_data(p: dict[str, Any], repo_id: str) -> list[str]:
    if not p["datasets"]:
        return []
    rows = [(d["role"], d.get("hub_id") or d.get("path"), d.get("fingerprint", "")) for d in p["datasets"]]
    return ["## Data", "", *_table(("role", "dataset", "fingerprint"), rows), ""]


def _model_summary(spec: dict[str, Any]) -> str:
    """A data-generation model: `model@revision (key=value, ...)` with its scalar settings."""
    model = str(spec.get("model", ""))
    if spec.get("revision"):
        model += f"@{spec['revision']}"
    settings = {k: v for k, v in spec.items() if k not in ("model", "revision", "name")}
    summary = _value(settings)
    return f"{model} ({summary})" if summary else model


def _card_data_gen(p: dict[str, Any], repo_id: str) -> list[str]:
    lines = []
    for job in p["data_gen"]:
        rows = [
            *job["settings"].items(),
            *((role, _model_summary(spec)) for role, spec in job["models"].items()),
            ("store fingerprint", job["store_fingerprint"] or ""),
        ]
        title = f"## Data generation: `{job['job']}` (stage `{job['stage']}`)"
        lines += [title, "", *_table(("setting", "value"), rows), ""]
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
    if isinstance(results, dict) and results:
        return lines + _table(("metric", "value"), list(results.items())) + [""]
    return lines + ["The numbers are in `align_distill.json` (`evaluation`).", ""]


def _card_result(p: dict[str, Any], repo_id: str) -> list[str]:
    result = p["training_result"]
    if not isinstance(result, dict) or not result:
        return []
    rows = [(k, v) for k, v in result.items() if k not in NOT_RESULTS]
    return ["## Training result", "", *_table(("metric", "value"), rows), ""]


def _card_stages(p: dict[str, Any], repo_id: str) -> list[str]:
    if not p["stages"]:
        return []
    rows = [(n, s["kind"], s["target"], (s["fingerprint"] or "")[:16]) for n, s in p["stages"].items()]
    return ["## Pipeline stages", "", *_table(("stage", "kind", "target", "fingerprint"), rows), ""]


def _card_frameworks(p: dict[str, Any], repo_id: str) -> list[str]:
    versions = p.get("framework_versions") or {}
    shown = [(name, versions[name]) for name in FRAMEWORKS_SHOWN if name in versions]
    if not shown:
        return []
    return ["## Framework versions", "", *[f"- {name}: {version}" for name, version in shown], ""]


def _card_citation(p: dict[str, Any], repo_id: str) -> list[str]:
    entries = CITATIONS.get(p["method"], (TRL_BIBTEX,))
    return ["## Citation", "", "```bibtex", "\n\n".join(entries), "```", ""]
