"""Tokenizer compatibility (first differing token / special token / template) and padded output heads."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from align_distill.models.tiny import build_tiny_causal_lm
from align_distill.models.vocab import (
    TokenizerMismatchError,
    check_model_vocab,
    check_tokenizer_compatibility,
    shared_vocab_size,
    slice_logits_to_vocab,
)


def _word_tokenizer(words: list[str], **specials) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose id -> token map is exactly `words` (id = position)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", **specials)


BASE = ["<unk>", "<eos>"] + [f"w{i}" for i in range(15)] + ["ab", "cd"]


def test_identical_tokenizers_pass(tiny_tokenizer):
    check_tokenizer_compatibility(tiny_tokenizer, copy.deepcopy(tiny_tokenizer))


def test_first_differing_token_is_named():
    student_words = list(BASE)
    student_words[17] = "ac"
    student_words[18] = "ce"  # a later difference must not be the one reported
    with pytest.raises(TokenizerMismatchError, match=r"id 17: teacher has 'ab', student has 'ac'"):
        check_tokenizer_compatibility(_word_tokenizer(BASE), _word_tokenizer(student_words))


def test_longer_vocabulary_names_the_extra_id():
    with pytest.raises(TokenizerMismatchError, match=r"id 19: big has 'zz', small has no token"):
        check_tokenizer_compatibility(_word_tokenizer(BASE + ["zz"]), _word_tokenizer(BASE), names=("big", "small"))


def test_differing_special_token(tiny_tokenizer):
    other = copy.deepcopy(tiny_tokenizer)
    other.pad_token = other.eos_token
    with pytest.raises(
        TokenizerMismatchError, match=r"pad_token: teacher has '<\|endoftext\|>', student has '<\|im_end\|>'"
    ):
        check_tokenizer_compatibility(tiny_tokenizer, other)


def test_differing_additional_special_tokens():
    plain = _word_tokenizer(BASE)
    extra = _word_tokenizer(BASE, additional_special_tokens=["ab"])
    with pytest.raises(TokenizerMismatchError, match=r"only student has \['ab'\]"):
        check_tokenizer_compatibility(plain, extra)


def test_differing_chat_template_shows_where(tiny_tokenizer):
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = tiny_tokenizer.chat_template.replace("'<|im_end|>' + '\n'", "'<|im_end|>'")
    with pytest.raises(TokenizerMismatchError, match="chat templates differ: first difference at character") as info:
        check_tokenizer_compatibility(tiny_tokenizer, other)
    assert "im_end" in str(info.value)
    other.chat_template = None
    with pytest.raises(TokenizerMismatchError, match="teacher has one, student has none"):
        check_tokenizer_compatibility(tiny_tokenizer, other)


def test_shared_vocab_size_counts_added_tokens(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    before = shared_vocab_size(tokenizer)
    tokenizer.add_tokens(["<new_token>"])
    assert shared_vocab_size(tokenizer) == before + 1 == len(tokenizer)


def test_slice_logits():
    logits = torch.randn(2, 3, 10)
    assert slice_logits_to_vocab(logits, 10) is logits
    torch.testing.assert_close(slice_logits_to_vocab(logits, 7), logits[..., :7])
    with pytest.raises(TokenizerMismatchError, match="10 entries .* vocabulary has 11"):
        slice_logits_to_vocab(logits, 11)


def test_padded_head_gives_the_same_sliced_logits(tiny_tokenizer):
    """A head padded to a multiple of 64 (as Qwen2.5-7B's) adds rows no token uses; sliced logits are unchanged."""
    model = build_tiny_causal_lm(tiny_tokenizer, "micro", seed=3).eval()
    padded = copy.deepcopy(model)
    padded.resize_token_embeddings(len(tiny_tokenizer) + 1, pad_to_multiple_of=64)
    vocab = check_model_vocab(padded, tiny_tokenizer, "teacher")
    assert vocab == len(tiny_tokenizer)
    head_rows = padded.get_output_embeddings().weight.shape[0]
    assert head_rows % 64 == 0 and head_rows > len(tiny_tokenizer)
    ids = torch.tensor([tiny_tokenizer("the quick answer is 42")["input_ids"]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        sliced = slice_logits_to_vocab(padded(input_ids=ids).logits, vocab)
    assert sliced.shape == reference.shape
    torch.testing.assert_close(sliced, reference)


def test_head_smaller_than_tokenizer_is_an_error(tiny_tokenizer):
    model = build_tiny_causal_lm(tiny_tokenizer, "micro")
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens(["<tool_call>", "<tool_result>"])
    with pytest.raises(TokenizerMismatchError, match=r"student's output head has \d+ rows but its tokenizer has"):
        check_model_vocab(model, tokenizer, "student")
