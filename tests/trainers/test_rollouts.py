"""`trainers.rollouts.RolloutEngine` (shared by AlignDistil and KD): the sync rule, seeded samples as token ids, and
who closes the generator — on a fake generator and a tiny model, no engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from align_distill.data_gen.backends import SamplingParams
from align_distill.data_gen.backends.base import Completion
from align_distill.trainers.rollouts import RolloutEngine


class FakeGenerator:
    """Records the weights it is given and the seeds it samples with; answers each prompt with its seed."""

    def __init__(self):
        self.loads: list[dict[str, torch.Tensor]] = []
        self.seeds: list[list[int]] = []
        self.closed = False

    def load_weights(self, weights):
        self.loads.append({name: tensor.clone() for name, tensor in weights})
        return len(self.loads[-1])

    def generate(self, prompts, params, seeds=None):
        self.seeds.append(list(seeds))
        return [[Completion(text="", token_ids=[seed % 7, 1], finish_reason="stop")] for seed in seeds]

    def close(self):
        self.closed = True


ACCELERATOR = SimpleNamespace(unwrap_model=lambda model: model, device=torch.device("cpu"))


def engine(generator=None, **settings) -> RolloutEngine:
    args = SimpleNamespace(**{"rollout_backend": "vllm", "rollout_backend_kwargs": None, "rollout_sync_steps": 1,
                              **settings})  # fmt: skip
    return RolloutEngine(args, tokenizer=None, accelerator=ACCELERATOR, generator=generator)


def test_syncs_on_first_use_then_every_sync_steps():
    model = torch.nn.Linear(2, 2)
    fake = FakeGenerator()
    rollouts = engine(fake, rollout_sync_steps=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=4)
    assert rollouts.sample(["a", "b"], params, [10, 11], model=model, step=0, zero3=False) == [[3, 1], [4, 1]]
    assert rollouts.syncs == 1 and rollouts.synced_step == 0 and fake.seeds == [[10, 11]]
    assert set(fake.loads[0]) == {"weight", "bias"} and torch.equal(fake.loads[0]["weight"], model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    rollouts.sample(["a"], params, [5], model=model, step=1, zero3=False)
    assert rollouts.syncs == 1  # one step since the last sync: not due with rollout_sync_steps=2
    rollouts.sample(["a"], params, [5], model=model, step=2, zero3=False)
    assert rollouts.syncs == 2 and rollouts.synced_step == 2 and torch.equal(fake.loads[1]["weight"], model.weight)
    rollouts.args.rollout_sync_steps = 1  # read at each call
    rollouts.sample(["a"], params, [5], model=model, step=3, zero3=False)
    assert rollouts.syncs == 3
    rollouts.close()  # a generator it was given is the caller's to close
    assert not fake.closed and rollouts.generator is fake


def test_builds_its_own_generator_and_closes_it(monkeypatch):
    built = FakeGenerator()
    rollouts = engine()
    monkeypatch.setattr(rollouts, "build", lambda model: built)
    rollouts.sample(
        ["a"], SamplingParams(temperature=1.0, max_new_tokens=2), [1], model=torch.nn.Linear(1, 1), step=0, zero3=False
    )
    assert rollouts.generator is built and rollouts.syncs == 1
    rollouts.close()
    assert built.closed and rollouts.generator is None and rollouts.synced_step is None


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="rollout engine backend must be one of"):
        engine(rollout_backend="student").build(torch.nn.Linear(1, 1))
