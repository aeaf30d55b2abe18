"""Token lengths of prompt + response, and cutting a response so that the pair fits `max_length`.

Counting follows what a trainer will feed the model: the chat template for conversational rows when the tokenizer
has one (a response rendered after its prompt), otherwise the plain concatenation prompt + response (conversational
rows without a template: message contents joined by newlines).
"""

from __future__ import annotations

from typing import Any

Text = str | list[dict[str, Any]]
"""A plain string or a list of {role, content} messages."""


CHARS_PER_TOKEN = 32
"""Characters per token assumed when choosing how much of a long text to tokenize first (generous: ~4 is usual)."""
CUT_TOKENS = 8
"""Tokens that cutting a text inside a word may add; a prefix proves the whole text too long only beyond this."""


def _prefix(text: str, length: int) -> str:
    """`text[:length]`, ending at the last whitespace of its second half when there is one (a cut between words)."""
    cut = max(text.rfind(" ", length // 2, length), text.rfind("\n", length // 2, length))
    return text[: cut if cut > 0 else length]


class TokenBudget:
    """Counts tokens with one tokenizer and truncates responses to fit `max_length` tokens."""

    def __init__(self, tokenizer: Any, max_length: int):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def count(self, prompt: Text, response: Text | None = None) -> int:
        """Tokens of the prompt followed by `response`; a prompt alone is counted with its generation prompt.

        Exact up to `max_length`; a text too long by far gives a lower bound that already exceeds it (see `_tokens`).
        """
        return self.measure(prompt, response)[0]

    def measure(self, prompt: Text, response: Text | None = None) -> tuple[int, bool]:
        """(tokens, exact): `count`, and whether the count is exact rather than a lower bound above `max_length`."""
        text, special_tokens = self._render(prompt, response)
        return self._tokens(text, special_tokens)

    def _render(self, prompt: Text, response: Text | None) -> tuple[str, bool]:
        """The text the model reads, and whether the tokenizer should add its special tokens (not after a template)."""
        if isinstance(prompt, list):
            messages = prompt + (response if isinstance(response, list) else [])
            if self.use_chat_template:
                rendered = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=response is None
                )
                return rendered, False  # what `apply_chat_template(tokenize=True)` tokenizes, the same way
            return "\n".join(message["content"] for message in messages), True
        return prompt + ("" if response is None else str(response)), True

    def _tokens(self, text: str, special_tokens: bool) -> tuple[int, bool]:
        """Tokenize at most about `(max_length + 1) * CHARS_PER_TOKEN` characters before deciding, whatever the size.

        A longer text is measured on growing prefixes (cut at whitespace where possible) until one is longer than
        `max_length` by more than a cut word can add; only a text that packs more characters per token is read whole.
        """
        window = (self.max_length + 1) * CHARS_PER_TOKEN
        while window < len(text):
            length = self._encode_length(_prefix(text, window), special_tokens)
            if length > self.max_length + CUT_TOKENS:
                return length, False
            window *= 2
        return self._encode_length(text, special_tokens), True

    def _encode_length(self, text: str, special_tokens: bool) -> int:
        return len(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

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
