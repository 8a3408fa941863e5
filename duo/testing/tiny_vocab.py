"""The tiny pair's vocabulary: a byte-level BPE learned deterministically from a small built-in text, with
Qwen2.5's tokenizer conventions (Qwen2's pre-tokenizer split, its control tokens and chat template).

``build_vocab(vocab_size)`` returns ``(tokens, merges)`` as GGUF stores them; duo.testing.tiny_weights
writes them into the tiny pair's GGUF files, and duo.testing.tiny_pair builds the pair.
"""

from __future__ import annotations

from collections import Counter

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_VOCAB_SIZE = 512  # including the 3 special tokens

# Qwen2's pre-tokenizer split (llama.cpp's "qwen2" pre-tokenizer uses the same regex).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Verbatim from Qwen2.5(-Coder)-Instruct's GGUF (tokenizer.chat_template).
QWEN2_CHAT_TEMPLATE = (
'{%- if tools %}\n    {{- \'<|im_start|>system\\n\' }}\n    {%- if messages[0][\'role\'] == \'system\' %}\n        {{- messages[0][\'content\'] }}\n    {%- else %}\n        {{- \'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\' }}\n    {%- endif %}\n    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n    {%- if messages[0][\'role\'] == \'system\' %}\n        {{- \'<|im_start|>system\\n\' + messages[0][\'content\'] + \'<|im_end|>\\n\' }}\n    {%- else %}\n        {{- \'<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n\' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n        {{- \'<|im_start|>\' + message.role + \'\\n\' + message.content + \'<|im_end|>\' + \'\\n\' }}\n    {%- elif message.role == "assistant" %}\n        {{- \'<|im_start|>\' + message.role }}\n        {%- if message.content %}\n            {{- \'\\n\' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n            {{- \'}\\n</tool_call>\' }}\n        {%- endfor %}\n        {{- \'<|im_end|>\\n\' }}\n    {%- elif message.role == "tool" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n            {{- \'<|im_start|>user\' }}\n        {%- endif %}\n        {{- \'\\n<tool_response>\\n\' }}\n        {{- message.content }}\n        {{- \'\\n</tool_response>\' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n            {{- \'<|im_end|>\\n\' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- \'<|im_start|>assistant\\n\' }}\n{%- endif %}\n'
)

# Small built-in corpus (English prose + Python) the BPE merges are learned from.
_TRAIN_TEXT = r'''
The quick brown fox jumps over the lazy dog. A speculative decoder guesses several
tokens with a small draft model and then asks the large target model to check all of
them in one forward pass. When the draft is right, the target accepts the whole run of
tokens and the text is produced faster; when the draft is wrong, the target rejects the
rest of the guess, keeps its own token, and the draft starts again from there.
The output must be exactly what the target would have written on its own.
It was the best of times, it was the worst of times, it was the age of wisdom, it was
the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.
In the beginning there was the word, and the word was a token, and the token was a
number between zero and the size of the vocabulary. There are many ways to write a
program, and most of them are wrong; the right one is usually the simplest one that
still works. Please answer the question below in one short sentence, and then explain
your reasoning step by step. The user asked for a list of the three largest cities in
the country, their population, and the year in which each of them was founded.
Thank you for your help! I would like to know how this works, and why it is faster
than the normal way of generating text with a language model on a single machine.
Memory is the main limit: the weights must be read once for every step, so reading
them once for many tokens at the same time is nearly free. This is why it works.

def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()

    def __len__(self):
        return len(self.items)


def read_config(path: str) -> dict:
    import json
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Run the model on a prompt.")
    parser.add_argument("--model", type=str, required=True, help="path to the model")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    config = read_config(args.model)
    for key, value in sorted(config.items()):
        print(f"{key} = {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

import numpy as np
import torch

def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)

def accept_tokens(draft_tokens, target_logits):
    accepted = []
    for i, token in enumerate(draft_tokens):
        best = int(torch.argmax(target_logits[i]))
        if best != token:
            accepted.append(best)
            break
        accepted.append(token)
    return accepted

result = {"status": "ok", "count": 42, "values": [1, 2, 3, 4, 5], "name": "test"}
numbers = [x * x for x in range(10) if x % 2 == 0]
total = sum(numbers) + len(result["values"])
print("The total is", total, "and the result is", result)
'''


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (in GPT-2's vocab order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab(vocab_size: int = DEFAULT_VOCAB_SIZE, text: str = _TRAIN_TEXT) -> tuple[list[str], list[str]]:
    """Deterministically learn a byte-level BPE vocabulary.

    Returns ``(tokens, merges)``: ``tokens`` are the 256 byte symbols (GPT-2 order), then one
    token per merge in merge order, then ``SPECIAL_TOKENS``; ``merges`` are ``"left right"``
    strings in rank order, as GGUF stores them. The trainer is a plain greedy BPE (most frequent
    adjacent pair; ties broken by the pair's text) over words split with Qwen2's pre-tokenizer
    regex, so llama.cpp and transformers tokenize with these merges identically.
    """
    import regex

    byte_map = bytes_to_unicode()
    tokens = list(byte_map.values())
    n_target = vocab_size - len(SPECIAL_TOKENS)
    if n_target < len(tokens):
        raise ValueError(f"vocab_size must be at least {len(tokens) + len(SPECIAL_TOKENS)}")

    words = Counter("".join(byte_map[b] for b in w.encode("utf-8")) for w in regex.findall(_QWEN2_SPLIT, text))
    corpus = [(list(w), c) for w, c in sorted(words.items())]
    known = set(tokens)
    merges: list[str] = []
    while len(tokens) < n_target:
        pairs: Counter = Counter()
        for syms, c in corpus:
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append(f"{a} {b}")
        new = a + b
        if new not in known:
            known.add(new)
            tokens.append(new)
        for syms, _ in corpus:
            i = 0
            while i < len(syms) - 1:
                if syms[i] == a and syms[i + 1] == b:
                    syms[i : i + 2] = [new]
                i += 1
    if len(tokens) < n_target:
        raise ValueError(f"training text too small for vocab_size={vocab_size} (got {len(tokens)} tokens)")
    return tokens + list(SPECIAL_TOKENS), merges
