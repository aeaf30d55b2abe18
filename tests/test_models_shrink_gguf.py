"""Layer-dropping students (shrink) and GGUF import."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from align_distill.models.loading import load_model
from align_distill.models.shrink import parse_layer_spec, shrink_command, shrink_model, validate_keep_layers

IDS = torch.tensor([[3, 17, 42, 99, 7, 120, 64, 5]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- shrink


def test_parse_layer_spec():
    assert parse_layer_spec("0,1,5") == [0, 1, 5]
    assert parse_layer_spec("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_layer_spec(" 2 ") == [2]
    assert parse_layer_spec("5,1") == [5, 1]  # order kept, so validation can name it
    for bad in ("", "a", "3-1", "1,,2", "1-"):
        with pytest.raises(ValueError, match="expected comma-separated indices or ranges"):
            parse_layer_spec(bad)


@pytest.mark.parametrize(
    "keep,message",
    [([], "empty"), ([0, 4], r"\[4\] out of range.*0\.\.3"), ([-1, 2], "out of range"),
     ([1, 1, 2], r"\[1\] appear more than once"), ([2, 0], r"increasing order, e\.g\. \[0, 2\]")],
)  # fmt: skip
def test_invalid_keep_layers(keep, message):
    with pytest.raises(ValueError, match=message):
        validate_keep_layers(keep, 4)


def test_keeping_all_layers_changes_nothing(tiny_models):
    teacher = load_model(tiny_models["teacher"])
    shrunk = shrink_model(teacher, [0, 1, 2, 3])
    assert shrunk is not teacher
    torch.testing.assert_close(_logits(shrunk), _logits(teacher), rtol=0, atol=0)


def test_subset_equals_hand_built_model(tiny_models):
    teacher = load_model(tiny_models["teacher"])
    before = _logits(teacher)
    keep = [0, 2, 3]
    shrunk = shrink_model(teacher, keep)

    # The input model is untouched: all layers, same outputs.
    assert len(teacher.model.layers) == teacher.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(teacher), before, rtol=0, atol=0)

    config = AutoConfig.from_pretrained(tiny_models["teacher"])
    config.num_hidden_layers = len(keep)
    config.layer_types = None  # rebuilt for 3 layers, as a fresh config would
    config = type(config).from_dict(config.to_dict())
    hand = AutoModelForCausalLM.from_config(config)
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("model.layers."):
            old = int(name.split(".")[2])
            if old not in keep:
                continue
            name = name.replace(f"model.layers.{old}.", f"model.layers.{keep.index(old)}.", 1)
        state[name] = tensor
    hand.load_state_dict(state, strict=True)

    assert shrunk.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in shrunk.model.layers] == [0, 1, 2]
    torch.testing.assert_close(_logits(shrunk), _logits(hand), rtol=0, atol=0)
    assert not torch.equal(_logits(shrunk), before)
    # Tied head stays tied to the (copied) embedding.
    assert shrunk.lm_head.weight.data_ptr() == shrunk.model.embed_tokens.weight.data_ptr()
    assert shrunk.lm_head.weight.data_ptr() != teacher.lm_head.weight.data_ptr()


def test_shrunk_model_generates_with_kv_cache(tiny_models):
    """The KV cache is indexed by layer_idx: renumbered layers must give the same tokens with and without it."""
    shrunk = shrink_model(load_model(tiny_models["teacher"]), [1, 3])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = shrunk.generate(IDS, use_cache=True, **kwargs)
    uncached = shrunk.generate(IDS, use_cache=False, **kwargs)
    assert cached.shape[1] == IDS.shape[1] + 6
    torch.testing.assert_close(cached, uncached)


def test_shrink_from_path_saves_a_loadable_folder(tiny_models, tmp_path):
    out = tmp_path / "student-from-teacher"
    shrunk = shrink_model(tiny_models["teacher"], [0, 3], out_dir=out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2 and len(reloaded.model.layers) == 2
    torch.testing.assert_close(_logits(reloaded), _logits(shrunk), rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_models["teacher"]).get_vocab()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"


def test_sliding_window_layer_types_follow_the_kept_layers(tiny_tokenizer, tmp_path):
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=1,
        num_key_value_heads=1, intermediate_size=64, use_sliding_window=True, sliding_window=4, max_window_layers=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    shrunk = shrink_model(model, [0, 2, 3], out_dir=tmp_path / "out", tokenizer=tiny_tokenizer)
    assert shrunk.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert shrunk.config.max_window_layers == 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.layer_types == shrunk.config.layer_types
    assert [layer.self_attn.sliding_window for layer in reloaded.model.layers] == [None, 4, 4]
    torch.testing.assert_close(_logits(reloaded), _logits(shrunk), rtol=0, atol=0)


def test_unsupported_architecture(tiny_tokenizer):
    config = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=1, n_positions=32)
    with pytest.raises(TypeError, match="GPT2LMHeadModel has none"):
        shrink_model(AutoModelForCausalLM.from_config(config), [0])


def test_shrink_command(tiny_models, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert shrink_command(str(tiny_models["teacher"]), str(out), "0-1,3") == 0
    assert "kept layers [0, 1, 3]" in capsys.readouterr().out
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 3
    # An existing, non-empty output folder is never overwritten.
    assert shrink_command(str(tiny_models["teacher"]), str(out), "0") == 1
    assert "already exists" in capsys.readouterr().err
    assert shrink_command(str(tiny_models["teacher"]), str(tmp_path / "x"), "0,9") == 1
    assert "[9] out of range" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
