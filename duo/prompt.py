"""Prompts in and text out: chat-template encoding and the incremental detokenizer.

    encode_chat(tokenizer, messages)   the chat template rendered, message contents tokenized as plain text
    encode_plain(tokenizer, text)      text as the target sees it (BOS if the tokenizer adds one)
    encode_prompt(tokenizer, ...)      text / messages / token ids -> the ids the target sees (checked)
    TextStream(tokenizer, stop)        committed token ids -> complete UTF-8 text, holding back a stop string
"""
from __future__ import annotations

from typing import Sequence

from .errors import UsageError

Messages = Sequence[dict]


def _sentinel(i: int) -> str:
    return f"\x00duo{i}\x00"


def encode_chat(tokenizer, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
    """Chat template → token ids, with message contents tokenized as plain text.

    Special-token strings typed by the user (e.g. "<|im_end|>") must stay text, so the template is
    rendered with sentinels in place of the contents, its own parts are tokenized with special tokens,
    and each content separately with special tokens split.
    """
    masked = [dict(m, content=_sentinel(i)) for i, m in enumerate(messages)]
    skeleton = tokenizer.apply_chat_template(masked, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    rest = skeleton
    for i, m in enumerate(messages):
        before, _, rest = rest.partition(_sentinel(i))
        ids += tokenizer.encode(before, add_special_tokens=False)
        ids += tokenizer.encode(m["content"], add_special_tokens=False, split_special_tokens=True)
    ids += tokenizer.encode(rest, add_special_tokens=False)
    return ids


def encode_plain(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


class TextStream:
    """Incremental detokenizer: yields only complete UTF-8 text, and never text that may start a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""          # decoded so far (complete characters only)
        self.emitted = 0        # chars of text already handed out
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):     # a multi-byte character is still incomplete
            return ""
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = text[:at], True
        hold = 0 if self.stopped else max((k for s in self.stop for k in range(1, len(s))
                                           if self.text.endswith(s[:k])), default=0)
        out = self.text[self.emitted:len(self.text) - hold]
        self.emitted += len(out)
        return out

    def finish(self) -> str:
        out = self.text[self.emitted:] if self.stopped else self.tokenizer.decode(self.ids, skip_special_tokens=True)[self.emitted:]
        self.emitted += len(out)
        return out


def check_text(text: str, what: str) -> None:
    """A UsageError for text the tokenizer cannot take: lone surrogates (e.g. bytes decoded with
    errors="surrogateescape") are not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid Unicode text (a lone surrogate at character {e.start}, e.g. from "
                         f"undecodable bytes): decode the input as UTF-8 first") from None


def encode_prompt(tok, vocab_size: int, name: str, prompt, system: str | None = None, chat: bool | None = None) -> list[int]:
    """A prompt's token ids, as the target sees them: text (in the chat template when the tokenizer has one,
    unless chat=False), a list of chat messages, or token ids (checked against the vocabulary). UsageError
    for anything else."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise UsageError(f"token ids must be in [0, {vocab_size}): the target's vocabulary")
        return list(prompt)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UsageError("the prompt is empty: give some text")
        check_text(prompt, "the prompt")
        use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
        if not use_chat:
            return encode_plain(tok, prompt)
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, (list, tuple)):
        raise UsageError(f"the prompt must be text, a list of messages or token ids, not {type(prompt).__name__}")
    if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                             and isinstance(m.get("content"), str) for m in prompt):
        raise UsageError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    if system and not any(m.get("role") == "system" for m in prompt):
        prompt = [{"role": "system", "content": system}] + list(prompt)
    if not getattr(tok, "chat_template", None):
        raise UsageError(f"target {name} has no chat template: pass plain text instead of messages")
    for m in prompt:
        check_text(m["content"], f"the content of a {m['role']!r} message")
    return encode_chat(tok, prompt)
