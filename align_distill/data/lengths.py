"""Token lengths of prompt + response, and cutting a response so that the pair fits `max_length`.

Counting follows what a trainer will feed the model: the chat template for conversational rows when the tokenizer
has one (a response rendered after its prompt), otherwise the plain concatenation prompt + response (conversational
rows without a template: message contents joined by newlines).
"""

from __future__ import annotations

from typing import Any

Text = str | list[dict[str, Any]]
"""A plain string or a list of {role, content} messages."""


class TokenBudget:
    """Counts tokens with one tokenizer and truncates responses to fit `max_length` tokens."""

    def __init__(self, tokenizer: Any, max_length: int):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def count(self, prompt: Text, response: Text | None = None) -> int:
        """Tokens of the prompt followed by `response`; a prompt alone is counted with its generation prompt."""
        if isinstance(prompt, list):
            messages = prompt + (response if isinstance(response, list) else [])
            if self.use_chat_template:
                ids = self.tokenizer.apply_chat_template(
                    messages, tokenize=True, return_dict=False, add_generation_prompt=response is None
                )
                return len(ids)
            text = "\n".join(message["content"] for message in messages)
        else:
            text = prompt + ("" if response is None else str(response))
        return len(self.tokenizer(text)["input_ids"])

    def truncate(self, prompt: Text, response: Text) -> Text | None:
        """`response` with its final text cut so that prompt + response fits, or None when no text fits.

        The cut is the longest character prefix that fits (binary search over the count above), so it is exact for
        any tokenizer and template; the prompt is never cut.
        """
        if self.count(prompt, response) <= self.max_length:
            return response
        text = response if isinstance(response, str) else response[-1]["content"]

        def with_text(cut: str) -> Text:
            if isinstance(response, str):
                return cut
            return [*response[:-1], {**response[-1], "content": cut}]

        def fits(length: int) -> bool:
            return self.count(prompt, with_text(text[:length])) <= self.max_length

        low, high = 0, len(text) - 1  # invariant: fits(low) once checked; text[:len(text)] is known not to fit
        if not fits(low):
            return None
        while low < high:
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        cut = text[:low].rstrip()  # a cut between words leaves trailing whitespace that no model should learn
        if not cut:
            return None
        return with_text(cut) if fits(len(cut)) else with_text(text[:low])
