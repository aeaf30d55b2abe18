"""The CycleAlign loop (docs/methods/cyclealign.md): a white-box model learns from a black-box ranker over cycles.

One cycle (§2), each step writing into `output_dir/cycle_<k>/`:

    prompts.jsonl       this cycle's chunk of the training prompts
    samples/            data_gen `rollout` store: N·oversample samples per prompt from the current white box
    candidates.jsonl    the first N distinct samples per prompt (prompts with fewer than 2 are dropped, counted)
    demonstrations.json the demonstration pool the black box is shown in this cycle (static + dynamic, §3, §6)
    black_box/          data_gen `rank` store: the black box's ranking ρ_B (null + reason where it failed, §2.2)
    white_box/          data_gen `rank` store: ranking ρ_W by length-normalised log-likelihood (§4)
    rankings.jsonl      per prompt: ρ_B, ρ_W, the agreement α = LCS (§5), Kendall τ, the training target
    pool.json           the demonstration pool after adding this cycle's agreement rankings (§6)
    checkpoints/        HF Trainer checkpoints of this cycle's PRO training (§7)
    model/              the white box after the cycle; `metrics.json` marks the cycle done

A rerun with the same `output_dir` skips finished cycles, resumes the stores where they stopped (exactly once)
and training from the cycle's last checkpoint.

Several processes (`torchrun`, `accelerate launch`, `deepspeed`) all run the loop: sampling and both rankings are
split into one store part per process, the main process writes the files, and PRO training is the Trainer's (DDP,
ZeRO-2, ZeRO-3). A LoRA white box (`peft_config`) samples and ranks with its adapter applied, and each cycle's
`model/` holds the adapter.

`CycleAlignTrainer` (`trainer.py`) is the training step alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch.distributed as dist
from accelerate.state import AcceleratorState
from accelerate.utils import is_peft_model
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint

from align_distill.data_gen import load_store, run_rank, run_rollout
from align_distill.data_gen.backends.transformers_backend import TransformersGenerator
from align_distill.data_gen.judges import LikelihoodJudge, import_function
from align_distill.models import load_model
from align_distill.models.loading import check_adapter_weights
from align_distill.trainers.common import gathered, student_weights, without_zero3_init

from .agreement import mean_or_none, rank_agreement
from .config import DATASET_RESPONSES, CycleAlignConfig
from .judges import (
    DemonstrationPool,
    ICLRanker,
    judge_spec,
    make_black_box,
    static_demonstrations,
)
from .trainer import CycleAlignTrainer

logger = logging.getLogger(__name__)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _distinct(texts: list[Any], n: int) -> list[Any]:
    seen, kept = set(), []
    for text in texts:
        key = json.dumps(text, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(text)
    return kept[:n]


# -- several processes ------------------------------------------------------------------------------------------


def _process() -> tuple[int, int]:
    """(rank, world size) of the launched process group; (0, 1) in a single process."""

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    """Wait for every process: a file the main process wrote (or a store part another wrote) is then complete."""

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _zero3() -> bool:
    """DeepSpeed ZeRO-3 is active (the training arguments name a stage-3 config): models load partitioned."""

    return bool(is_deepspeed_zero3_enabled())


def _whole_models():
    """Build models whole even under ZeRO-3 (the black-box judge, the white box's sampling copy): a partitioned
    model cannot run outside a DeepSpeed engine. aligndistil's rollout copy needs the same."""

    return without_zero3_init() if _zero3() else contextlib.nullcontext()


def _is_peft(model: Any) -> bool:

    return is_peft_model(model)


def cycle_prompts(prompts: datasets.Dataset, cycle: int, cycles: int, per_cycle: int | None) -> list[dict]:
    """Cycle k's chunk (1-based): contiguous slices of `per_cycle` rows (default len / C), wrapping around."""
    total = len(prompts)
    per_cycle = per_cycle or max(1, total // cycles)
    start = (cycle - 1) * per_cycle
    indices = [(start + i) % total for i in range(min(per_cycle, total))]
    return [{"id": prompts[i]["id"], "prompt": prompts[i]["prompt"]} for i in indices]


class CycleAlign:
    """The CycleAlign loop (docs/methods/cyclealign.md §2) over `prompts` (a dataset with `id` and `prompt`).

    `model` is a loaded white box or a model folder; `black_box` a data_gen `Judge` (default: built from
    `args.black_box`). `callbacks` go to each cycle's `CycleAlignTrainer`. `peft_config` (a `peft.PeftConfig`,
    e.g. `methods.common.peft_config_from(model_args)`) trains a LoRA adapter instead of the full weights.
    `run()` returns the metrics of every cycle (also in `output_dir/cycle_metrics.json`) and leaves the final white
    box in `self.model`; `save(folder)` copies it (full weights, or the adapter) there.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        tokenizer: Any,
        args: CycleAlignConfig,
        prompts: datasets.Dataset,
        black_box: Any = None,
        callbacks: list | None = None,
        model_loader: Callable[[str], PreTrainedModel] | None = None,
        peft_config: Any = None,
    ):

        if not args.black_box and black_box is None:
            raise ValueError("CycleAlign needs a black box: set `black_box` in the config (kind: llm | noisy_oracle)")
        missing = [c for c in ("id", "prompt") if c not in prompts.column_names]
        if missing:
            raise ValueError(f"CycleAlign prompts need columns id and prompt; missing {missing}")
        self.args, self.tokenizer, self.prompts, self.callbacks = args, tokenizer, prompts, callbacks
        self.model_loader = model_loader or _default_loader
        self.peft_config = peft_config
        self.model: Any = None if isinstance(model, str) else model
        self.model_source = str(model) if isinstance(model, str) else getattr(model, "name_or_path", "") or "in-memory"
        self.initial_source = self.model_source
        self.final_source: str | None = None  # the last cycle's model folder, once run() has finished
        self.owns_black_box = black_box is None
        if black_box is None:
            with _whole_models():  # an LLM judge on every process must be whole, also under ZeRO-3
                black_box = make_black_box(args.black_box)
        self.black_box = black_box
        # what the black-box store's fingerprint records; a judge object given without settings by its class
        judge_class = f"{type(self.black_box).__module__}:{type(self.black_box).__qualname__}"
        self.black_box_settings = args.black_box or {"kind": "callable", "function": judge_class}
        self.static = static_demonstrations(args.static_demonstrations)
        self.pool = DemonstrationPool(self.static, args.demonstration_pool_size, args.min_agreement)
        self.run_dir = Path(args.output_dir)

    # -- helpers ---------------------------------------------------------------------------------------------
    def cycle_dir(self, cycle: int) -> Path:
        return self.run_dir / f"cycle_{cycle}"

    def _check_run(self) -> None:
        """A run folder belongs to one setting: refuse to continue another run's cycles."""
        identity = {
            "model": self.initial_source,
            "cycles": self.args.cycles,
            "num_responses": self.args.num_responses,
            "training_target": self.args.training_target,
            "black_box": self.args.black_box,
            "prompts": len(self.prompts),
            "prompts_per_cycle": self.args.prompts_per_cycle,
            "seed": self.args.seed,
        }
        if self.peft_config is not None:  # an adapter run and a full-weight run do not continue each other
            peft = self.peft_config.to_dict()
            identity["peft"] = {k: sorted(v) if isinstance(v, set) else v for k, v in peft.items()}  # sets: no order
        path = self.run_dir / "cyclealign_run.json"
        stored = json.loads(path.read_text()) if path.exists() else None
        _barrier()  # every process has read it before the main process writes it
        if stored is not None:
            differ = {k: (stored.get(k), v) for k, v in json.loads(json.dumps(identity, default=str)).items()}
            differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
            if differ:
                lines = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in differ.items())
                raise ValueError(f"{self.run_dir} holds another CycleAlign run ({lines}); use a new output_dir")
        elif _process()[0] == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(identity, indent=2, default=str))

    def _dataset_responses(self, prompts: list[dict]) -> dict[str, list]:
        """With `dataset_responses`, each prompt's own responses in the data (cyclealign §9.7), by prompt id."""
        columns = [c for c in DATASET_RESPONSES if c in self.prompts.column_names]
        if not self.args.dataset_responses or not columns:
            return {}
        wanted = {row["id"] for row in prompts}
        found: dict[str, list] = {}
        for row in self.prompts.select_columns(["id", *columns]):
            if row["id"] in wanted:
                found[row["id"]] = [row[c] for c in columns if row[c] is not None]
        return found

    def _ensure_model(self, source: str) -> Any:
        """The white box at `source` (a model folder, or a cycle's adapter folder on the initial model); with
        `peft_config` a trainable LoRA model."""
        if self.model is None or self.model_source != source:
            logger.info("cyclealign: loading the white box from %s", source)
            if (Path(source) / "adapter_config.json").exists():
                base = self.model_loader(self.initial_source)
                check_adapter_weights(source)  # the loading policy: safetensors only
                self.model = PeftModel.from_pretrained(base, source, is_trainable=True, use_safetensors=True)
            else:
                self.model = self.model_loader(source)
            self.model_source = source
        if self.peft_config is not None and not _is_peft(self.model):
            # as TRL's trainers: under ZeRO-3 the adapter keeps the base dtype (mixed dtypes break its all-gather)
            self.model = get_peft_model(self.model, self.peft_config, autocast_adapter_dtype=not _zero3())
        return self.model

    def _sampler(self, model: Any) -> Any:
        """The white box as a `TransformersGenerator` for sampling and likelihood ranking. A LoRA model samples
        through its base model, whose layers carry the adapter. Under ZeRO-3 the parameters are shards: every
        process takes part in gathering them into a whole local copy (LoRA merged), which samples its own part."""

        base = model.get_base_model() if _is_peft(model) else model
        if not _zero3():
            base.to(self.args.device)
            return TransformersGenerator(base, self.tokenizer, batch_size=self.args.generation_batch_size)

        with _whole_models():
            whole = AutoModelForCausalLM.from_config(
                base.config, dtype=base.dtype, trust_remote_code=self.args.trust_remote_code
            )
        whole.generation_config = base.generation_config
        whole.to(self.args.device)
        sampler = TransformersGenerator(whole, self.tokenizer, batch_size=self.args.generation_batch_size)
        sampler.load_weights(student_weights(model, zero3=True))
        return sampler

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:

        self._check_run()
        main = _process()[0] == 0
        history: list[dict[str, Any]] = []
        source = self.initial_source
        try:
            for cycle in range(1, self.args.cycles + 1):
                folder = self.cycle_dir(cycle)
                done = folder / "metrics.json"
                if done.exists():
                    history.append(json.loads(done.read_text()))
                    self.pool = DemonstrationPool.load(folder / "pool.json", self.static)
                    source = str(folder / "model")
                    if main:
                        print(f"cyclealign: cycle {cycle}/{self.args.cycles} done, skipped", flush=True)
                    continue
                metrics = self.run_cycle(cycle, source)
                history.append(metrics)
                source = str(folder / "model")
                if main:
                    (self.run_dir / "cycle_metrics.json").write_text(json.dumps(history, indent=2))
            self._ensure_model(source)
            self.final_source = source
        finally:
            if self.owns_black_box:
                self.black_box.close()
        if main:
            (self.run_dir / "cycle_metrics.json").write_text(json.dumps(history, indent=2))
        _barrier()
        return history

    def save(self, target: str | os.PathLike) -> None:
        """Put the final white box (its folder as the last cycle saved it: weights or adapter, and tokenizer) in
        `target`. A copy, not `save_pretrained`: under ZeRO-3 `self.model` holds only this process's shards."""
        if _process()[0] == 0:
            if self.final_source is None:
                raise ValueError("CycleAlign.save: the loop has not finished; call run() first")
            shutil.copytree(self.final_source, target, dirs_exist_ok=True)
        _barrier()

    def run_cycle(self, cycle: int, source: str) -> dict[str, Any]:
        """One cycle from the white box at `source`; every step resumes from what `cycle_<k>/` already holds.
        Each process samples and ranks its part of the prompts; all read the merged stores."""

        args, folder = self.args, self.cycle_dir(cycle)
        rank, world = _process()
        main, parts = rank == 0, {"part": rank, "num_parts": world}
        folder.mkdir(parents=True, exist_ok=True)
        model = self._ensure_model(source)
        metrics: dict[str, Any] = {"cycle": cycle}

        # 1. sample N distinct responses per prompt from the current white box
        prompts = cycle_prompts(self.prompts, cycle, args.cycles, args.prompts_per_cycle)
        if main:
            _write_jsonl(folder / "prompts.jsonl", prompts)
        _barrier()
        generator = self._sampler(model)
        rollout = {
            "input": str(folder / "prompts.jsonl"),
            "output_dir": str(folder / "samples"),
            "model": source,
            "n": args.num_responses * args.oversample,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_completion_length": args.max_completion_length,
            "seed": args.seed + cycle,
            "progress": False,
            **parts,
        }
        run_rollout(rollout, generator=generator)
        _barrier()
        samples = load_store(folder / "samples").to_list()
        extra = self._dataset_responses(prompts)
        candidates = []
        for row in samples:
            distinct = _distinct(row["completions"], args.num_responses)
            distinct += [r for r in _distinct(extra.get(row["id"], []), len(DATASET_RESPONSES)) if r not in distinct]
            if len(distinct) >= 2:
                candidates.append({"id": row["id"], "prompt": row["prompt"], "completions": distinct})
        metrics["prompts"] = len(prompts)
        metrics["dropped_too_few_distinct"] = len(prompts) - len(candidates)
        if not candidates:
            raise RuntimeError(
                f"cycle {cycle}: no prompt got 2 distinct responses out of {rollout['n']} samples; raise "
                "temperature or oversample"
            )
        metrics["candidates_per_prompt"] = mean_or_none([len(c["completions"]) for c in candidates])
        if main:
            _write_jsonl(folder / "candidates.jsonl", candidates)

        # 2. the black box ranks, shown static + dynamic demonstrations from the pool as it was at the cycle start

        if main:
            self.pool.save(folder / "demonstrations.json")
        _barrier()
        ranker = ICLRanker(
            self.black_box,
            self.pool,
            args.dynamic_demonstrations,
            args.demonstration_selection,
            args.shuffle_candidates,
            seed=args.seed + cycle,
            max_prompt_chars=args.max_judge_prompt_chars,
        )
        rank_common = {"input": str(folder / "candidates.jsonl"), "progress": False, **parts}
        black_spec = vars(judge_spec(self.black_box_settings))
        run_rank({**rank_common, "output_dir": str(folder / "black_box"), "judge": black_spec}, judge=ranker)

        # 3. the white box ranks by its own length-normalised likelihood (§4), before this cycle's update
        white_spec = {"kind": "likelihood", "model": source, "length_normalize": args.length_normalize}
        run_rank(
            {**rank_common, "output_dir": str(folder / "white_box"), "judge": white_spec},
            judge=LikelihoodJudge(generator, normalize=args.length_normalize),
        )
        del generator  # under ZeRO-3 a whole copy of the white box: free it before training
        _barrier()
        black = load_store(folder / "black_box").to_list()
        white = load_store(folder / "white_box").to_list()

        # 4.-5. agreement, demonstration pool update, training target (the same on every process)
        reward = import_function(args.reward_function) if args.reward_function else None
        rows, agreement = rank_agreement(candidates, black, white, args.training_target, self.pool, cycle, reward)
        if main:
            _write_jsonl(folder / "rankings.jsonl", rows)
            self.pool.save(folder / "pool.json")
        metrics.update(agreement)

        # 6. train the white box on this cycle's rankings
        train_rows = [
            {"id": r["id"], "prompt": r["prompt"], "completions": r["completions"], "ranking": r["target"]}
            for r in rows
            if r["target"] is not None and len(r["target"]) >= 2
        ]
        metrics["training_prompts"] = len(train_rows)
        trainer = None
        if train_rows:
            trainer, trained = self._train(cycle, model, train_rows, metrics)
            metrics.update(trained)
        else:
            logger.warning("cyclealign: cycle %d has no ranked prompt to train on; the white box is unchanged", cycle)
        self._save_model(model, folder / "model", trainer)
        # The next cycle loads this folder afresh: a trainer's DDP reducer / DeepSpeed engine stays hooked to the
        # module it wrapped, and a second trainer must not wrap the same module again.
        self.model = None
        metrics["demonstration_pool"] = len(self.pool.entries)
        if main:
            done = folder / "metrics.json"
            done.with_suffix(".tmp").write_text(json.dumps(metrics, indent=2))
            done.with_suffix(".tmp").replace(done)
            print(_summary(metrics, args.cycles), flush=True)
        _barrier()
        return metrics

    def _train(
        self, cycle: int, model: Any, rows: list[dict], cycle_metrics: dict
    ) -> tuple[CycleAlignTrainer, dict[str, Any]]:
        """PRO training on the cycle's ranked rows; the cycle's metrics go to the trainer's loggers too."""

        args = copy.copy(self.args)
        args.output_dir = str(self.cycle_dir(cycle) / "checkpoints")
        # accelerate refuses a second Accelerator that brings a DeepSpeed plugin into an existing state (the last
        # cycle's trainer): start this cycle's from a fresh state, as new training arguments would
        AcceleratorState._reset_state()
        trainer = CycleAlignTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=self.tokenizer,
            callbacks=self.callbacks,
        )
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last and _process()[0] == 0:
            print(f"cyclealign: cycle {cycle}: resuming training from {last}", flush=True)
        result = trainer.train(resume_from_checkpoint=last)
        metrics = {"train_loss": result.training_loss, "train_steps": result.global_step}
        history = [h for h in trainer.state.log_history if "rank_loss" in h]
        if history:
            metrics.update({k: history[-1][k] for k in ("rank_loss", "sft_nll", "top1_accuracy") if k in history[-1]})
        numbers = {**cycle_metrics, **metrics}
        trainer.log({f"cyclealign/{k}": float(v) for k, v in numbers.items() if isinstance(v, (int, float))})
        return trainer, metrics

    def _save_model(self, model: Any, target: Path, trainer: CycleAlignTrainer | None) -> None:
        """Write the cycle's white box (full weights, or a LoRA model's adapter) and the tokenizer to `target`.
        Every process calls it: under ZeRO-3 saving gathers the shards; the main process writes."""

        main = _process()[0] == 0
        tmp = target.with_name(f".{target.name}.tmp")
        if main and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        if trainer is not None:
            trainer.save_model(str(tmp))  # the Trainer's own save: ZeRO-3 16-bit gather, PEFT adapter only
        else:
            with gathered(list(model.parameters()), _zero3()):
                if main:
                    model.save_pretrained(tmp)
        if main:
            self.tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        _barrier()


def _default_loader(source: str) -> PreTrainedModel:

    return load_model(source, dtype="auto")


def _summary(metrics: dict[str, Any], cycles: int) -> str:
    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    parts = [
        f"cyclealign: cycle {metrics['cycle']}/{cycles}",
        f"prompts {metrics['prompts']} (trained {metrics.get('training_prompts', 0)})",
        f"black-box failures {metrics['black_box_failures']}",
        f"agreement tau {fmt('agreement_tau')} length {fmt('agreement_length')}",
        f"loss {fmt('train_loss')}",
    ]
    if "sample_reward" in metrics:
        parts.append(f"sample reward {fmt('sample_reward')}")
    return " | ".join(parts)
