"""How prompts and responses become token ids — one place, so generation, teacher signals and the student's
trainer condition on exactly the same ids.

The rules are TRL's (`trl.data_utils._tokenize` and `DPOTrainer`'s tokenization), so that a response tokenized here
gets the same ids TRL would give it:
- a conversational prompt (a list of messages) goes through the chat template with the generation prompt; a plain
  prompt is tokenized as text (with the tokenizer's usual special tokens, e.g. a BOS);
- a response given as text is tokenized together with its prompt (conversational: the full conversation through
  the template; plain: prompt + response + EOS) and the response ids are what follows the common prefix.
"""

from __future__ import annotations

from typing import Any

from align_distill.data_gen.backends.base import Messages, Prompt

Response = str | Messages
"""A response: plain text, or the assistant message(s) that continue a conversational prompt."""


def is_conversational(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of `prompt` as a model sees it before its response."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if tokenizer.chat_template is None:
        raise ValueError(
            f"the prompt is a conversation but tokenizer {tokenizer.name_or_path!r} has no chat template; "
            "give plain-text prompts or a tokenizer with a template"
        )
    encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def as_messages(response: Response) -> Messages:
    """A conversational response as a message list (plain text becomes one assistant message)."""
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def encode_prompt_response(tokenizer: Any, prompt: Prompt, response: Response) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a prompt and a response given as text, by TRL's DPO rule: the response starts
    where the tokenized prompt and the tokenized prompt + response diverge."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise ValueError("a plain-text prompt needs a plain-text response, found a message list")
        eos = tokenizer.eos_token or ""
        text = response if response.endswith(eos) else response + eos
        full = list(tokenizer(prompt + text)["input_ids"])
    else:
        conversation = list(prompt) + as_messages(response)
        full = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
    common = 0
    for a, b in zip(prompt_ids, full):
        if a != b:
            break
        common += 1
    return prompt_ids[:common], full[common:]


def prompt_text(prompt: Prompt) -> str:
    """The user's request as text: the prompt itself, or the content of the last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    return str((users or prompt)[-1].get("content", ""))


def response_text(response: Response) -> str:
    """A response as text: itself, or the content of its last message."""
    if isinstance(response, str):
        return response
    return str(response[-1].get("content", "")) if response else ""


def render_conversation(prompt: Prompt) -> str:
    """A prompt as readable text for a judge: plain text as is, a conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
