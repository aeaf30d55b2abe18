"""Tokenizer compatibility for same-tokenizer methods, and padded output heads.

Token-level distillation compares teacher and student distributions position by position over one vocabulary,
so the two tokenizers must agree exactly: same id for every token, same special tokens, same chat template (the
prompt the teacher scored must be the prompt the student sees). Output heads are often padded beyond the
tokenizer (Qwen2.5-7B: 152064 rows, 0.5B: 151936, tokenizer: 151665); the rows past the tokenizer are never
produced by it, so logits are sliced to the tokenizer vocabulary before any softmax.
"""

from __future__ import annotations

import difflib

import torch
from transformers import PreTrainedTokenizerBase

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerMismatchError(ValueError):
    """Two tokenizers (or a model and a tokenizer) that a same-tokenizer method needs to agree, do not."""


def check_tokenizer_compatibility(
    tok_a: PreTrainedTokenizerBase,
    tok_b: PreTrainedTokenizerBase,
    names: tuple[str, str] = ("teacher", "student"),
) -> None:
    """Raise TokenizerMismatchError at the first difference: vocabulary map, special tokens, chat template."""
    a, b = names
    _check_vocab(tok_a.get_vocab(), tok_b.get_vocab(), a, b)
    for attr in SPECIAL_TOKEN_NAMES:
        tok_x, tok_y = getattr(tok_a, attr, None), getattr(tok_b, attr, None)
        if tok_x != tok_y:
            raise TokenizerMismatchError(f"special token {attr}: {a} has {tok_x!r}, {b} has {tok_y!r}")
    extra_a, extra_b = _extra_special_tokens(tok_a), _extra_special_tokens(tok_b)
    if extra_a != extra_b:
        only_a, only_b = sorted(extra_a - extra_b), sorted(extra_b - extra_a)
        raise TokenizerMismatchError(f"additional special tokens differ: only {a} has {only_a}, only {b} has {only_b}")
    template_a, template_b = tok_a.chat_template, tok_b.chat_template
    if template_a != template_b:
        raise TokenizerMismatchError(f"chat templates differ: {_template_diff_hint(template_a, template_b, a, b)}")


def _check_vocab(vocab_a: dict[str, int], vocab_b: dict[str, int], a: str, b: str) -> None:
    if vocab_a == vocab_b:
        return
    by_id_a = {i: t for t, i in vocab_a.items()}
    by_id_b = {i: t for t, i in vocab_b.items()}
    for token_id in sorted(by_id_a.keys() | by_id_b.keys()):
        tok_x, tok_y = by_id_a.get(token_id), by_id_b.get(token_id)
        if tok_x != tok_y:
            show_x = "no token" if tok_x is None else repr(tok_x)
            show_y = "no token" if tok_y is None else repr(tok_y)
            raise TokenizerMismatchError(
                f"vocabularies differ (sizes {a} {len(vocab_a)}, {b} {len(vocab_b)}); "
                f"first difference at id {token_id}: {a} has {show_x}, {b} has {show_y}"
            )
    # Same id->token pairs but different maps: two tokens share an id in one of them.
    raise TokenizerMismatchError(f"vocabularies differ: {a} and {b} map several tokens to the same id differently")


def _extra_special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """transformers 5 calls them `extra_special_tokens`, 4.x `additional_special_tokens`."""
    for attr in ("extra_special_tokens", "additional_special_tokens"):
        tokens = getattr(tokenizer, attr, None)
        if tokens:
            return {str(t) for t in (tokens.values() if isinstance(tokens, dict) else tokens)}
    return set()


def _template_diff_hint(template_a, template_b, a: str, b: str, context: int = 30) -> str:
    if template_a is None or template_b is None:
        return f"{a} has {'none' if template_a is None else 'one'}, {b} has {'none' if template_b is None else 'one'}"
    text_a, text_b = str(template_a), str(template_b)
    opcodes = difflib.SequenceMatcher(None, text_a, text_b, autojunk=False).get_opcodes()
    tag, i1, i2, j1, j2 = next(op for op in opcodes if op[0] != "equal")
    start = max(0, i1 - context)
    return (
        f"first difference at character {i1}: {a} has {text_a[start : i2 + context]!r}, "
        f"{b} has {text_b[max(0, j1 - context) : j2 + context]!r}"
    )


def shared_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """The vocabulary both models are compared over: every id the tokenizer can produce, added tokens included."""
    return len(tokenizer)


def slice_logits_to_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`logits[..., :vocab_size]`; a padded head (larger last dim) is fine, a smaller one means a wrong pairing.

    Shapes: logits (..., V_head) -> (..., vocab_size). A view, no copy, when nothing is sliced.
    """
    head = logits.shape[-1]
    if head < vocab_size:
        raise TokenizerMismatchError(
            f"logits have {head} entries in the last dimension but the tokenizer vocabulary has {vocab_size}; "
            "an output head must cover every token id"
        )
    return logits if head == vocab_size else logits[..., :vocab_size]


def model_head_size(model: torch.nn.Module) -> int:
    """Rows of the output head (what the logits' last dimension will be), falling back to config.vocab_size.

    Under DeepSpeed ZeRO-3 the local weight is an empty placeholder; its full shape is `ds_shape`.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(getattr(head.weight, "ds_shape", head.weight.shape)[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def check_model_vocab(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str = "model") -> int:
    """Check that `model`'s head covers `tokenizer` (padding allowed); return the shared vocabulary size."""
    vocab_size = shared_vocab_size(tokenizer)
    head = model_head_size(model)
    if head < vocab_size:
        raise TokenizerMismatchError(
            f"{name}'s output head has {head} rows but its tokenizer has {vocab_size} tokens; token ids "
            f"{head}..{vocab_size - 1} would have no logit (was the embedding resized after adding tokens?)"
        )
    return vocab_size
