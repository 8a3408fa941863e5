"""Request bodies of /v1/chat/completions and /v1/completions, checked field by field.

Every problem is an APIError: the HTTP status and the OpenAI error object {message, type, param, code}.
Fields clients send that change nothing here (user, presence/frequency penalty at 0, ...) are accepted;
those duo cannot honour (n > 1, a penalty, best_of > 1) are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    prompt: object                    # chat messages (list of dicts), text, or token ids
    chat: bool                        # a chat completion (messages) or a text completion
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None       # None: off; K: each token's logprob and its K likeliest


MAX_TOP_LOGPROBS = 20
ROLES = ("system", "user", "assistant", "developer", "tool")


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad(name, f"'{name}' must be {kind}, got {type(v).__name__}", "invalid_type")
    if not lo <= v <= hi:
        raise _bad(name, f"'{name}' must be between {lo} and {hi}, got {v}")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be true or false, got {type(v).__name__}", "invalid_type")
    return v


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "'model' must be a string", "invalid_type")
    if model and model != served:
        raise APIError(404, f"the model '{model}' does not exist here: this server serves '{served}' "
                            f"(GET /v1/models)", param="model", code="model_not_found")


def _common(body: dict, served: str, default_max: int) -> dict:
    """The sampling and output fields shared by both endpoints."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    check_model(body, served)
    if _number(body, "n", 1, 1, 128, integer=True) != 1:
        raise _bad("n", "only n = 1 is supported (one answer per request): send n requests instead", "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise _bad(name, f"'{name}' is not supported (it would change the target's distribution): leave it at 0",
                       "unsupported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = default_max if max_tokens is None else _number({param: max_tokens}, param, None, 1, 1 << 20, True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise _bad("stop", "'stop' must be a non-empty string or a list of up to 16 non-empty strings")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options", "'stream_options' must be an object", "invalid_type")
    stream = _bool(body, "stream")
    if opts is not None and not stream:
        raise _bad("stream_options", "'stream_options' needs \"stream\": true")
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("top_p", "'top_p' must be greater than 0 (and at most 1)")
    return dict(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=top_p, top_k=_number(body, "top_k", 0, 0, 1 << 20, True),
                seed=seed, stop=stop, stream=stream, include_usage=_bool(opts or {}, "include_usage"))


def _content(message: dict, k: int) -> str:
    c = message.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in c):
            raise _bad(f"messages[{k}].content", "only text content parts ({\"type\": \"text\", \"text\": ...}) "
                                                 "are supported", "unsupported")
        return "".join(p["text"] for p in c)
    raise _bad(f"messages[{k}].content", "'content' must be a string or a list of text parts", "invalid_type")


def parse_chat(body: dict, served: str, default_max: int) -> GenRequest:
    common = _common(body, served, default_max)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{k}]", f"messages[{k}] must be an object with a 'role' in {', '.join(ROLES)}")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, k)})
    if not any(m["content"].strip() for m in out):
        raise _bad("messages", "every message is empty: give some content")
    top = None
    if _bool(body, "logprobs"):
        top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    elif body.get("top_logprobs") is not None:
        raise _bad("top_logprobs", "'top_logprobs' needs \"logprobs\": true")
    return GenRequest(out, True, logprobs=top, **common)


def parse_completion(body: dict, served: str, default_max: int) -> GenRequest:
    common = _common(body, served, default_max)
    if _number(body, "best_of", 1, 1, 128, integer=True) != 1:
        raise _bad("best_of", "only best_of = 1 is supported", "unsupported")
    if body.get("echo") or body.get("suffix"):
        raise _bad("echo" if body.get("echo") else "suffix", "'echo' and 'suffix' are not supported", "unsupported")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                                    # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass                                                  # token ids
    elif not isinstance(prompt, str) or not prompt.strip():
        raise _bad("prompt", "'prompt' must be a non-empty string (or one list of token ids); batches of several "
                             "prompts are not supported: send one request each")
    top = body.get("logprobs")
    top = None if top is None else _number(body, "logprobs", None, 0, 5, integer=True)
    return GenRequest(prompt, False, logprobs=top, **common)
