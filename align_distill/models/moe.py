"""Dense → sparse MoE upcycling for LLaVA-MoD's D2S stage (docs/methods/llava_mod.md §3).

`upcycle_to_moe` turns a dense Llama / Qwen2 causal LM into a **Qwen2-MoE** (`Qwen2MoeForCausalLM`) whose MoE
layers (every `every`-th decoder layer from layer 0) hold `num_experts` copies of that layer's dense FFN behind a
bias-free router; the other layers keep their dense FFN. Why Qwen2-MoE (transformers 5.19, vLLM 0.32):

- it is a standard architecture that mixes dense and sparse layers (`mlp_only_layers`), so the result saves and
  reloads with `AutoModelForCausalLM` and no custom code, and vLLM serves it (`Qwen2MoeForCausalLM` in its
  registry; its loader honours `mlp_only_layers` and `norm_topk_prob`);
- its attention is Llama's (RoPE, GQA, no q/k norms; q/k/v biases, which a Llama gets as zeros) — Qwen3-MoE's
  q/k RMSNorms rescale every head and cannot be made the identity, and Mixtral has no dense layers;
- `norm_topk_prob=True` renormalises the top-k gate weights to sum to 1, so identical experts give exactly the
  dense FFN (docs/methods/llava_mod.md §3.1 step 6): logits equal the dense model's right after upcycling;
- its shared expert cannot be switched off in a way vLLM loads (a 0-wide one leaves 0-size tensors in the
  checkpoint that vLLM rejects), so it is 1 unit wide with all-zero weights: its output is exactly 0 and all its
  gradients are 0, so training leaves it at 0 (cost: 4·d parameters per MoE layer).

Differences from the official DeepSpeed gate (llava_mod §3.1), by design of the transformers architecture: the second
expert is the deterministic top-2 (no Gumbel sampling) and there is no capacity limit or token dropping. The model's
own `aux_loss` follows transformers' convention; `align_distill.losses.moe_balancing_loss` gives the method page's.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2MoeConfig
from transformers.initialization import no_init_weights

SUPPORTED_DENSE_TYPES = ("llama", "qwen2")
SHARED_EXPERT_WIDTH = 1  # the zeroed placeholder shared expert (see module docstring)
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector")


def moe_layer_indices(num_hidden_layers: int, every: int = 2) -> list[int]:
    """Decoder layers that become MoE layers: 0, every, 2·every, … (LLaVA-MoD's `sparse` mode for every=2)."""
    if every < 1:
        raise ValueError(f"every must be ≥ 1 (1 = every layer is MoE); got {every}")
    return list(range(0, num_hidden_layers, every))


def _check_dense(model: PreTrainedModel) -> None:
    config = getattr(model.config, "text_config", None) or model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_DENSE_TYPES:
        raise ValueError(
            f"upcycle_to_moe expects a dense language model of type {SUPPORTED_DENSE_TYPES} (alone or as the "
            f"text_config of a vision-language model); found {model_type!r} in {type(model).__name__}. "
            "Merge LoRA adapters first."
        )
    problems = []
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True (Qwen2-MoE experts have no biases)")
    if model_type == "llama" and getattr(config, "attention_bias", False):
        problems.append("attention_bias=True (Qwen2-MoE's o_proj has no bias)")
    if getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim != config.hidden_size // config.num_attention_heads:
        problems.append(
            f"head_dim={head_dim} != hidden_size/num_attention_heads="
            f"{config.hidden_size // config.num_attention_heads} (Qwen2-MoE and vLLM derive head_dim)"
        )
    if problems:
        raise ValueError(f"cannot upcycle this {model_type} model exactly into Qwen2-MoE: " + "; ".join(problems))


def moe_config_from_dense(
    dense_config,
    num_experts: int = 4,
    top_k: int = 2,
    every: int = 2,
    router_aux_loss_coef: float = 0.01,
) -> Qwen2MoeConfig:
    """The Qwen2-MoE config of the upcycled model: the dense model's sizes, experts as wide as its FFN."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}]; got {top_k}")
    moe_layers = set(moe_layer_indices(dense_config.num_hidden_layers, every))
    return Qwen2MoeConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        initializer_range=dense_config.initializer_range,
        rms_norm_eps=dense_config.rms_norm_eps,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        rope_parameters=dict(dense_config.rope_parameters),
        attention_dropout=dense_config.attention_dropout,
        use_sliding_window=False,
        # MoE part: every layer is sparse unless listed dense
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(dense_config.num_hidden_layers) if i not in moe_layers],
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=dense_config.intermediate_size,
        shared_expert_intermediate_size=SHARED_EXPERT_WIDTH,
        norm_topk_prob=True,
        router_aux_loss_coef=router_aux_loss_coef,
        output_router_logits=False,
        qkv_bias=True,
        pad_token_id=dense_config.pad_token_id,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
    )


def _router_init(num_experts: int, hidden_size: int, generator: torch.Generator) -> torch.Tensor:
    """PyTorch's default nn.Linear init, as DeepSpeed's fresh `wg`: uniform in ±1/√d (llava_mod §3 router row)."""
    bound = 1.0 / math.sqrt(hidden_size)
    return (torch.rand(num_experts, hidden_size, generator=generator, dtype=torch.float64) * 2 - 1) * bound


@torch.no_grad()
def upcycle_to_moe(
    model: PreTrainedModel,
    num_experts: int = 4,
    top_k: int = 2,
    every: int = 2,
    router_aux_loss_coef: float = 0.01,
    seed: int = 0,
) -> PreTrainedModel:
    """A new model computing exactly what the dense `model` computes (the input is not changed).

    A causal LM becomes a `Qwen2MoeForCausalLM`; a vision-language model with a `text_config` (e.g. LLaVA) stays
    its own class with a Qwen2-MoE language model, vision tower and projector copied. MoE layers are 0, every,
    2·every, …; each has `num_experts` copies of the layer's dense FFN, top-`top_k` routing and a bias-free
    router initialised uniform in ±1/√d from `seed`. Other layers, attention, norms, embeddings and LM head are
    copied; Llama's missing q/k/v biases become zeros.
    """
    _check_dense(model)
    dtype = next(model.parameters()).dtype
    text_config = getattr(model.config, "text_config", None)
    dense_config = text_config or model.config
    config = moe_config_from_dense(dense_config, num_experts, top_k, every, router_aux_loss_coef)
    with no_init_weights():
        if text_config is None:
            moe = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=dense_config._attn_implementation
            )
        else:
            composite = copy.deepcopy(model.config)
            composite.text_config = config
            moe = type(model)._from_config(composite, dtype=dtype)

    source = model.state_dict()
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return source[name]

    generator = torch.Generator().manual_seed(seed)
    new: dict[str, torch.Tensor] = {}
    for name, tensor in moe.state_dict().items():
        if ".mlp.shared_expert" in name:
            new[name] = torch.zeros_like(tensor)
        elif name.endswith(".mlp.gate.weight"):
            new[name] = _router_init(num_experts, config.hidden_size, generator)
        elif name.endswith(".mlp.experts.gate_up_proj"):
            # fused [E, 2·I, d]: the first half of each expert's output is the gate projection
            prefix = name.removesuffix("experts.gate_up_proj")
            gate_up = torch.cat([take(prefix + "gate_proj.weight"), take(prefix + "up_proj.weight")], dim=0)
            new[name] = gate_up.unsqueeze(0).expand(num_experts, -1, -1)
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix("experts.down_proj")
            new[name] = take(prefix + "down_proj.weight").unsqueeze(0).expand(num_experts, -1, -1)
        elif name in source:
            new[name] = take(name)
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            new[name] = torch.zeros_like(tensor)  # Llama has no attention biases
        else:
            raise KeyError(f"upcycle_to_moe cannot fill {name!r} from the dense {dense_config.model_type} model")
    left_over = sorted(set(source) - used)
    if left_over:
        raise KeyError(f"upcycle_to_moe would drop dense weights it does not map: {left_over[:5]}")
    # strict: every parameter and persistent buffer of the new model is set, none is left uninitialised
    moe.load_state_dict(new, strict=True)

    if dense_config.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = model.generation_config
    moe.train(model.training)
    return moe


def parameter_numel(parameter: torch.Tensor) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def moe_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters and those activated per token: a token uses `top_k` of the `num_experts` experts.

    Tied weights count once. Experts are the fused `*Experts` modules of transformers MoE models (3-D weights with
    the expert index first); a dense model gives total == activated.
    """
    total = sum(parameter_numel(p) for p in model.parameters())
    inactive = 0
    config = getattr(model, "config", None)
    top_k = getattr(getattr(config, "text_config", config), "num_experts_per_tok", None)
    for module in model.modules():
        if type(module).__name__.endswith("Experts") and hasattr(module, "num_experts"):
            if top_k is None:
                raise ValueError(f"{type(model).__name__} has MoE experts but its config has no num_experts_per_tok")
            per_expert = sum(parameter_numel(p) for p in module.parameters(recurse=False)) // module.num_experts
            inactive += (module.num_experts - top_k) * per_expert
    return {"total": total, "activated": total - inactive}


def d2s_parameter_names(model: nn.Module) -> list[str]:
    """Parameters LLaVA-MoD trains in the dense→sparse (D2S) and preference stages (docs/methods/llava_mod.md §3.3).

    Every decoder layer's FFN of the language model — dense FFNs, experts and routers — plus, in a
    vision-language model, the multimodal projector (`multi_modal_projector` / `mm_projector`). Attention,
    norms, embeddings, LM head and the vision tower (whose layers also have an `mlp`) are left out.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected get_decoder().layers)")
    selected = {id(p) for layer in layers for p in layer.mlp.parameters()}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTOR_NAMES:
            selected.update(id(p) for p in module.parameters())
    return [name for name, p in model.named_parameters() if id(p) in selected]


def set_d2s_trainable(model: nn.Module) -> list[str]:
    """Make exactly `d2s_parameter_names(model)` trainable (requires_grad) and freeze the rest; returns them."""
    names = d2s_parameter_names(model)
    selected = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in selected)
    return names
