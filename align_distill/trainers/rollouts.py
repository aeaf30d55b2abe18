"""A rollout engine shared by the trainers that sample from a separate copy of the student.

`RolloutEngine` owns one `data_gen` generator — `transformers` (a whole copy of the student in this process) or
`vllm` (a colocated vLLM engine started from the student's folder) — and keeps it in step with the student: the
student's weights (`trainers.common.student_weights`: a LoRA student merged, ZeRO-3 parameters gathered) are
copied into it through the generator's `load_weights` whenever `sync_steps` optimizer steps have passed since the
last copy (1 = every step, fully on-policy). Samples are drawn with one seed per prompt (`generate_with_seeds`).

Used by `AlignDistilTrainer` (`rollout_backend: transformers | vllm`) and `KDTrainer` (`rollout_backend: vllm`).
The trainer hands in its accelerator, and at each call its model, step and whether ZeRO-3 is on; the settings are
read from its config (`rollout_backend`, `rollout_backend_kwargs`, `rollout_sync_steps`) at each call.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM

from align_distill.data_gen.backends import SamplingParams, generate_with_seeds, make_generator
from align_distill.data_gen.backends.transformers_backend import TransformersGenerator

from .common import student_weights, without_zero3_init

ENGINE_BACKENDS = ("transformers", "vllm")


def zero3_enabled(accelerator: Any, is_deepspeed_enabled: bool) -> bool:
    """Whether the trainer runs DeepSpeed ZeRO stage 3 (weights must then be gathered on every rank to sync)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return bool(is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)


def rollout_seeds(seed: int, call: int, process_index: int, count: int) -> list[int]:
    """One sampling seed per prompt of the `call`-th sampling call on this process: reruns draw the same samples,
    and no two calls, processes or prompts share a seed."""
    base = (seed * 1_000_003 + call) * 1_009 + process_index
    return [base * 65_537 + i for i in range(count)]


def base_model(model: Any) -> Any:
    """A PEFT model's base model (the layers that carry the adapters); any other model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class RolloutEngine:
    """A rollout generator for a trainer's student, the step of its last weight sync, and the sync rule.

    Args:
        args: the trainer's config; `rollout_backend` (`transformers` or `vllm`), `rollout_backend_kwargs` and
            `rollout_sync_steps` are read when used (so a test may change them between calls).
        tokenizer: the student's tokenizer (prompts are encoded with it).
        accelerator: the trainer's accelerator (unwraps the model; the device of a transformers copy).
        generator: an existing `Generator` to use instead of building one (then not closed by `close`).

    Attributes: `generator` (None until the first `sample`, and after `close`), `synced_step` (the optimizer step of
    the last sync, None before the first), `syncs` (how many syncs so far).
    """

    def __init__(self, args: Any, tokenizer: Any, accelerator: Any, generator: Any = None):
        self.args = args
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.generator = generator
        self.owns_generator = generator is None
        self.synced_step: int | None = None
        self.syncs = 0

    def build(self, model: Any) -> Any:
        """A new generator for the student `model` (wrapped or not) by `args.rollout_backend`."""
        base = base_model(self.accelerator.unwrap_model(model))
        kwargs = dict(self.args.rollout_backend_kwargs or {})
        backend = self.args.rollout_backend
        if backend == "transformers":
            # Its own copy of the student (weights arrive through `sync`), so that rollouts see exactly the weights
            # of the last sync, as with a vLLM engine.
            dtype = kwargs.pop("dtype", None)
            with without_zero3_init():  # a whole local copy, not a ZeRO-3 partitioned one
                copy = AutoModelForCausalLM.from_config(base.config, dtype=dtype or base.dtype)
            copy.generation_config = base.generation_config
            copy.to(self.accelerator.device)
            return TransformersGenerator(model=copy, tokenizer=self.tokenizer, **kwargs)
        if backend == "vllm":
            return make_generator("vllm", model=base.name_or_path, tokenizer=self.tokenizer, **kwargs)
        raise ValueError(f"rollout engine backend must be one of {ENGINE_BACKENDS}, found {backend!r}")

    def sync(self, model: Any, step: int, zero3: bool) -> int:
        """Copy the student's current weights into the generator (every process takes part under ZeRO-3); the
        number of tensors copied."""
        student = self.accelerator.unwrap_model(model)
        count = self.generator.load_weights(student_weights(student, zero3))
        self.synced_step = step
        self.syncs += 1
        return count

    def maybe_sync(self, model: Any, step: int, zero3: bool) -> None:
        """Build the generator if needed; sync it on first use and once `rollout_sync_steps` steps have passed."""
        if self.generator is None:
            self.generator = self.build(model)
        if self.synced_step is None or step - self.synced_step >= self.args.rollout_sync_steps:
            self.sync(model, step, zero3)

    def sample(
        self, prompts: list[Any], params: SamplingParams, seeds: list[int], *, model: Any, step: int, zero3: bool
    ) -> list[list[int]]:
        """One sampled response per prompt (token ids as sampled, EOS included), after syncing if it is due."""
        self.maybe_sync(model, step, zero3)
        completions = generate_with_seeds(self.generator, prompts, params, seeds)
        return [list(samples[0].token_ids) for samples in completions]

    def close(self) -> None:
        """Close a generator this engine built (an engine must go before another can start); forget the sync."""
        if self.generator is not None and self.owns_generator:
            self.generator.close()
            self.generator = None
            self.synced_step = None
