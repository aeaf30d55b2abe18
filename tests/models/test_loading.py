"""load_model / load_tokenizer: dtype, frozen teachers, LoRA, safetensors-only, clear path errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from align_distill.models.loading import (
    LoraSettings,
    SafetensorsRequiredError,
    load_model,
    load_tokenizer,
    resolve_source,
    write_model_folder,
)


class _MustNotLoad:
    """A model_class whose loading fails the test: proves that errors come before transformers is called."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise AssertionError(f"from_pretrained was called with {args}")


def test_tokenizer_keeps_its_pad_token(tiny_models):
    tokenizer = load_tokenizer(tiny_models["student"])
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token != tokenizer.eos_token


def test_tokenizer_without_pad_gets_eos(tiny_models, tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_models["tokenizer"], folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_load_model_dtype(tiny_models, dtype, expected):
    model = load_model(tiny_models["student"], dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_load_model_auto_dtype_uses_checkpoint_dtype(tiny_models):
    model = load_model(tiny_models["student"], dtype="auto")
    assert next(model.parameters()).dtype == torch.float32


def test_unknown_dtype_is_rejected(tiny_models):
    with pytest.raises(ValueError, match="dtype must be one of .*'fp8'"):
        load_model(tiny_models["student"], dtype="fp8")


def test_frozen_model_is_eval_and_gradient_free(tiny_models):
    model = load_model(tiny_models["teacher"], frozen=True)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_unfrozen_model_is_trainable(tiny_models):
    model = load_model(tiny_models["student"], device_map="cpu")
    assert all(p.requires_grad for p in model.parameters())


def test_lora_settings_give_an_adapter(tiny_models):
    from peft import PeftModel

    model = load_model(tiny_models["student"], peft_config=LoraSettings(r=4, alpha=8, target_modules=["q_proj"]))
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "q_proj" in n for n in trainable)
    # LoRA B starts at zero, so the adapted model equals the base model at step 0.
    base = load_model(tiny_models["student"])
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_lora_settings_from_trl_model_config():
    from trl import ModelConfig

    settings = LoraSettings.from_model_config(
        ModelConfig(use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    )
    assert settings is not None
    assert (settings.r, settings.alpha, settings.dropout) == (8, 16, 0.0)
    peft_config = settings.to_peft_config()
    assert peft_config.r == 8 and set(peft_config.target_modules) == {"q_proj", "v_proj"}
    assert LoraSettings.from_model_config(ModelConfig(use_peft=False)) is None


def test_frozen_with_adapter_is_an_error(tiny_models):
    with pytest.raises(ValueError, match="frozen=True and a peft_config"):
        load_model(tiny_models["student"], frozen=True, peft_config=LoraSettings())


def test_pickle_only_folder_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_models["student"] / "config.json", folder / "config.json")
    model = load_model(tiny_models["student"])
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(SafetensorsRequiredError) as info:
        load_model(folder, model_class=_MustNotLoad)
    message = str(info.value)
    assert str(folder) in message and "pytorch_model.bin" in message and "safetensors only" in message


def test_missing_local_path_fails_before_transformers(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_model(missing, model_class=_MustNotLoad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("./not-here/tokenizer")


def test_offline_hub_id_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'Qwen/Qwen2\.5-0\.5B' is not a local folder.*HF_HUB_OFFLINE=1"):
        load_model("Qwen/Qwen2.5-0.5B", model_class=_MustNotLoad)


def test_offline_hub_id_in_cache_passes_through(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/config.json}.
    repo = tmp_path / "cache" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert resolve_source("org/tiny") == "org/tiny"


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_source(file)


def test_remote_code_stays_off_unless_asked(tiny_models, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_models["student"], folder)
    (folder / "modeling_evil.py").write_text("raise RuntimeError('remote code ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    # The module would raise on import; without trust_remote_code the built-in Qwen2 class loads instead.
    model = load_model(folder)
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_write_model_folder_is_all_or_nothing(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        with write_model_folder(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []

    with write_model_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "config.json").exists()

    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with write_model_folder(out):
            pass
    with write_model_folder(out, overwrite=True) as tmp:
        (tmp / "weights.safetensors").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["weights.safetensors"]


# -- one loading policy for every loader ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickle_only(tiny_models, tmp_path_factory):
    """A model folder (config, tokenizer) whose weights are only `pytorch_model.bin` (transformers 5 saves
    safetensors even with `safe_serialization=False`, so the pickle is written by hand)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("pickle_only")
    model = load_model(tiny_models["student"])
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_models["student"]).save_pretrained(folder)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    return folder


def _refused(info, folder) -> None:
    message = str(info.value)
    assert str(folder) in message and "pytorch_model.bin" in message and "safetensors only" in message


def test_the_policy_helpers():
    from align_distill.models.loading import loading_kwargs, vllm_loading_kwargs

    assert loading_kwargs() == {"use_safetensors": True, "trust_remote_code": False}
    assert loading_kwargs(trust_remote_code=True, revision="v1") == {
        "use_safetensors": True, "trust_remote_code": True, "revision": "v1"
    }  # fmt: skip
    assert vllm_loading_kwargs() == {"load_format": "safetensors", "trust_remote_code": False}
    assert vllm_loading_kwargs({"load_format": "auto"}, revision="v1") == {
        "load_format": "safetensors", "trust_remote_code": False, "revision": "v1"
    }  # fmt: skip
    for bad in ("pt", "gguf", "dummy"):
        with pytest.raises(ValueError, match=f"load_format={bad!r}.*safetensors only"):
            vllm_loading_kwargs({"load_format": bad})


def test_transformers_backend_refuses_pickle_weights(pickle_only):
    from align_distill.data_gen.backends.transformers_backend import TransformersGenerator

    with pytest.raises(SafetensorsRequiredError) as info:
        TransformersGenerator(str(pickle_only), device="cpu")
    _refused(info, pickle_only)


def test_reward_model_judge_refuses_pickle_weights(pickle_only):
    from align_distill.data_gen.judges import RewardModelJudge

    with pytest.raises(SafetensorsRequiredError) as info:
        RewardModelJudge(str(pickle_only), device="cpu")
    _refused(info, pickle_only)


def test_vllm_backend_refuses_pickle_weights_and_asks_for_safetensors(pickle_only, tiny_models, monkeypatch):
    """Before vLLM is even imported; and the engine is always built with load_format='safetensors'."""
    import sys
    import types

    from align_distill.data_gen.backends.vllm_backend import VLLMGenerator

    built: list[dict] = []

    class FakeLLM:
        def __init__(self, **kwargs):
            built.append(kwargs)
            raise RuntimeError("engine built")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setitem(
        sys.modules,
        "vllm.platforms",
        types.SimpleNamespace(current_platform=types.SimpleNamespace(is_cpu=lambda: True)),
    )
    with pytest.raises(SafetensorsRequiredError) as info:
        VLLMGenerator(str(pickle_only))
    _refused(info, pickle_only)
    assert built == []
    with pytest.raises(RuntimeError, match="engine built"):
        VLLMGenerator(str(tiny_models["student"]), load_format="auto")
    assert built[0]["load_format"] == "safetensors" and built[0]["trust_remote_code"] is False
    with pytest.raises(ValueError, match="load_format='pt'"):
        VLLMGenerator(str(tiny_models["student"]), load_format="pt")


def test_merge_refuses_pickle_weights(pickle_only, tiny_models, tmp_path):
    from peft import get_peft_model

    from align_distill.models.merge import merge_adapter

    adapter = tmp_path / "adapter"
    lora = LoraSettings(r=2, alpha=4, target_modules=["q_proj"]).to_peft_config()
    get_peft_model(load_model(tiny_models["student"]), lora).save_pretrained(adapter)
    with pytest.raises(SafetensorsRequiredError) as info:  # a pickled base
        merge_adapter(adapter, tmp_path / "out", base=str(pickle_only))
    _refused(info, pickle_only)
    pickled = tmp_path / "pickled_adapter"
    shutil.copytree(adapter, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(SafetensorsRequiredError) as info:  # a pickled adapter
        merge_adapter(pickled, tmp_path / "out", base=str(tiny_models["student"]))
    assert "adapter_model.bin" in str(info.value) and str(pickled) in str(info.value)
    assert not (tmp_path / "out").exists()
