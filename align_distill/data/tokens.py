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

Messages = list[dict[str, str]]
# A prompt is either plain text (used verbatim) or a conversation (the chat template is applied with
# add_generation_prompt=True).
Prompt = str | Messages

Response = str | Messages
"""A response: plain text, or the assistant message(s) that continue a conversational prompt."""


def is_conversational(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of `prompt` as a model sees it before its response."""
    return encode_prompts(tokenizer, [prompt])[0]


def encode_prompts(tokenizer: Any, prompts: list[Prompt]) -> list[list[int]]:
    """`encode_prompt` for many prompts, with one (batched) tokenizer call per form."""
    result: list[list[int]] = [[] for _ in prompts]
    plain = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    chats = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if plain:
        for i, ids in zip(plain, tokenizer([prompts[i] for i in plain])["input_ids"]):
            result[i] = list(ids)
    if chats:
        _require_template(tokenizer)
        conversations = [list(prompts[i]) for i in chats]
        encoded = tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for i, ids in zip(chats, encoded):
            result[i] = list(ids)
    return result


def _require_template(tokenizer: Any) -> None:
    if tokenizer.chat_template is None:
        raise ValueError(
            f"the prompt is a conversation but tokenizer {tokenizer.name_or_path!r} has no chat template; "
            "give plain-text prompts or a tokenizer with a template"
        )


def as_messages(response: Response) -> Messages:
    """A conversational response as a message list (plain text becomes one assistant message)."""
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def encode_full(tokenizer: Any, prompts: list[Prompt], responses: list[Response]) -> list[list[int]]:
    """Token ids of each prompt followed by its response given as text (conversational: the whole conversation
    through the template; plain: prompt + response + EOS, as TRL's DPO tokenizes them)."""
    result: list[list[int]] = [[] for _ in prompts]
    plain = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    chats = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if plain:
        eos = tokenizer.eos_token or ""
        texts = []
        for i in plain:
            if not isinstance(responses[i], str):
                raise ValueError("a plain-text prompt needs a plain-text response, found a message list")
            text = str(responses[i])
            texts.append(prompts[i] + (text if text.endswith(eos) else text + eos))
        for i, ids in zip(plain, tokenizer(texts)["input_ids"]):
            result[i] = list(ids)
    if chats:
        _require_template(tokenizer)
        conversations = [list(prompts[i]) + as_messages(responses[i]) for i in chats]
        encoded = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)["input_ids"]
        for i, ids in zip(chats, encoded):
            result[i] = list(ids)
    return result


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_prompt_response(tokenizer: Any, prompt: Prompt, response: Response) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a prompt and a response given as text, by TRL's DPO rule: the response starts
    where the tokenized prompt and the tokenized prompt + response diverge."""
    return encode_prompt_responses(tokenizer, [prompt], [response])[0]


def encode_prompt_responses(
    tokenizer: Any, prompts: list[Prompt], responses: list[Response]
) -> list[tuple[list[int], list[int]]]:
    """`encode_prompt_response` for many pairs, batched."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    fulls = encode_full(tokenizer, prompts, responses)
    pairs = []
    for ids, full in zip(prompt_ids, fulls):
        cut = common_prefix(ids, full)
        pairs.append((ids[:cut], full[cut:]))
    return pairs


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
