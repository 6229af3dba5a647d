"""Task prompts that keep their parts apart, and fitting them into a token budget.

A task prompt is a `Prompt`: a `str` that also knows its parts, `head + text + tail`
(instruction and options before the input text, the `Answer:` cue after it), built
from a template by `render`. `fit_prompt` cuts only the input text, from its end; a
plain `str` prompt is cut from the left instead (a leading BOS kept). The encoding
that puts answers after prompts is `ncft.data.examples`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Fitted", "Prompt", "fit_prompt", "fixed_length", "prompt_ids", "render",
           "token_ids"]


class Prompt(str):
    """A prompt string that knows which of its parts is the task's input text.

    Equal to (and hashed as) the plain string `head + text + tail`, so code that only
    reads prompts needs nothing new; `fit_prompt` reads the parts to cut `text` alone.
    Built by `render` from a task template.

    Attributes:
        head: The fixed part before the input text (instruction, options).
        text: The input text, the only part truncation may shorten.
        tail: The fixed part after it (the `Answer:` cue).
    """

    head: str
    text: str
    tail: str

    def __new__(cls, head: str, text: str, tail: str) -> Prompt:  # noqa: D102
        obj = super().__new__(cls, head + text + tail)
        obj.head, obj.text, obj.tail = head, text, tail
        return obj

    def __reduce__(self):  # pickled with its parts (ranks receive examples by pickle)
        return (Prompt, (self.head, self.text, self.tail))

    def with_text(self, text: str) -> Prompt:
        """The same head and tail around another input text."""
        return Prompt(self.head, text, self.tail)


TEXT_MARK = "\x00ncft-text\x00"  # stands in for {text} while the template is formatted


def render(template: str, text: str, **fields: str) -> Prompt:
    """Fill a `str.format` template in which `{text}` appears once; keep the parts apart.

    Raises:
        ValueError: If `{text}` does not appear exactly once.
    """
    filled = template.format(text=TEXT_MARK, **fields)
    if filled.count(TEXT_MARK) != 1:
        raise ValueError(f"template {template!r} must contain {{text}} exactly once")
    head, tail = filled.split(TEXT_MARK)
    return Prompt(head, text, tail)


@dataclass(frozen=True)
class Fitted:
    """A prompt's token ids after `fit_prompt`, and how much of its input text survived.

    Attributes:
        ids: The prompt's token ids (with the tokenizer's special prefix).
        text_tokens: Tokens of the input text alone (of the whole prompt, BOS
            excepted, for a plain `str` prompt).
        kept_tokens: How many of them the fitted prompt keeps (approximately, for a
            `Prompt`: its cut text is re-tokenized with its neighbours).
    """

    ids: list[int]
    text_tokens: int
    kept_tokens: int

    @property
    def truncated(self) -> bool:
        """Whether the input text was cut."""
        return self.kept_tokens < self.text_tokens


def token_ids(tokenizer, text: str, special: bool) -> list[int]:
    """`text`'s token ids, with the tokenizer's special prefix if `special`."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def fixed_length(tokenizer, prompt: Prompt) -> int:
    """Tokens of a `Prompt`'s fixed parts (head and tail, with the special prefix)."""
    return len(token_ids(tokenizer, prompt.head + prompt.tail, True))


def fit_prompt(tokenizer, prompt: str, room: int | None) -> Fitted:
    """Tokenize `prompt` into at most `room` tokens, cutting only its input text.

    A `Prompt` keeps its head and tail whole: the input text is cut from its end (its
    first n tokens are decoded and the prompt re-assembled, n as large as fits). A
    plain `str` is cut from the left, keeping a leading BOS token.

    Args:
        tokenizer: A HF tokenizer.
        prompt: The prompt.
        room: Token limit of the prompt (None: no limit).

    Raises:
        ValueError: If a `Prompt`'s fixed parts alone take more than `room` tokens.
    """
    ids = token_ids(tokenizer, prompt, True)
    plain = not isinstance(prompt, Prompt)
    text_ids = ids[1:] if plain and ids and ids[0] == tokenizer.bos_token_id else ids
    if not plain:
        text_ids = token_ids(tokenizer, prompt.text, False)
    if room is None or len(ids) <= room:
        return Fitted(ids, len(text_ids), len(text_ids))
    if plain:
        head = ids[: len(ids) - len(text_ids)]
        kept = max(0, room - len(head))
        return Fitted((head + ids[len(ids) - kept :] if kept else head)[:room],
                      len(text_ids), kept)
    fixed = fixed_length(tokenizer, prompt)
    if fixed > room:
        raise ValueError(f"the prompt's fixed parts (instruction, options, cue) take {fixed} "
                         f"tokens, more than the {room} left for it; raise max_length")
    # Start from the exact overflow, then shrink by what still does not fit: the
    # cut text re-tokenized with its neighbours may take a token more or less.
    keep = max(0, len(text_ids) - (len(ids) - room))
    while True:
        cut = tokenizer.decode(text_ids[:keep], skip_special_tokens=True,
                               clean_up_tokenization_spaces=False).rstrip("\ufffd")
        ids = token_ids(tokenizer, prompt.with_text(cut), True)
        if len(ids) <= room or keep == 0:
            return Fitted(ids, len(text_ids), keep)
        keep = max(0, keep - (len(ids) - room))


def prompt_ids(tokenizer, prompt: str, limit: int | None) -> list[int]:
    """Prompt tokens as `encode` makes them, fitted to `limit` (`fit_prompt`).

    Generation and task vectors feed prompts without answers; they are cut the way
    `encode` cuts a training prompt: a `Prompt` loses input text only, a plain string
    its left end (BOS kept).
    """
    return fit_prompt(tokenizer, prompt, limit).ids
