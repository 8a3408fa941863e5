"""The OpenAI response objects: chat completions and their chunks, text completions, logprobs, usage.

duo's own statistics ride along as an extension field, "duo": {acceptance_rate, mean_accepted_len, mode,
fallback, tokens_per_s, ...}; logprobs are the target's own (log-softmax of its logits at each emitted
token, from the verification pass that accepted it), never a draft's or a placeholder.
"""
from __future__ import annotations

import time
import uuid

DUO_STATS = ("mode", "acceptance_rate", "mean_accepted_len", "drafted", "accepted", "rounds", "fallback",
             "tokens_per_s", "ttft_s", "wall_s", "engine_s", "free_rounds", "plain_steps")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(stats: dict) -> str:
    return "length" if stats.get("stop_reason") == "length" else "stop"


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def duo_stats(stats: dict) -> dict:
    out = {k: stats.get(k) for k in DUO_STATS}
    out["accepted_from"] = {k: v.get("accepted", 0) for k, v in stats.get("sources", {}).items()}
    return out


def _piece(tokenizer, tok: int) -> str:
    return tokenizer.decode([tok])


def chat_logprobs(tokenizer, ids: list[int], lps: list) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}"""
    def entry(tok, lp):
        s = _piece(tokenizer, tok)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                        for t, (lp, top) in zip(ids, lps)]}


def completion_logprobs(tokenizer, ids: list[int], lps: list, offset: int = 0) -> dict:
    """The legacy shape: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}."""
    tokens = [_piece(tokenizer, t) for t in ids]
    offsets, at = [], offset
    for s in tokens:
        offsets.append(at)
        at += len(s)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps],
            "top_logprobs": [{_piece(tokenizer, a): b for a, b in top} for _, top in lps], "text_offset": offsets}


def chat_completion(rid: str, model: str, text: str, reason: str, n_prompt: int, n_completion: int,
                    logprobs: dict | None, stats: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": reason}],
            "usage": usage(n_prompt, n_completion), "duo": duo_stats(stats)}


def text_completion(rid: str, model: str, text: str, reason: str, n_prompt: int, n_completion: int,
                    logprobs: dict | None, stats: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}],
            "usage": usage(n_prompt, n_completion), "duo": duo_stats(stats)}


def chunk(rid: str, model: str, chat: bool, created: int, *, text: str | None = None, role: bool = False,
          logprobs: dict | None = None, reason: str | None = None) -> dict:
    """One streamed chunk (chat: a delta; completions: a text piece)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, created: int, n_prompt: int, n_completion: int,
                stats: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(n_prompt, n_completion), "duo": duo_stats(stats)}
