"""OpenAI's completions and chat completions protocol, without a web framework: request
bodies in (parsed and validated field by field), response bodies out.

`OpenAIParser.parse(body, chat)` turns a decoded JSON body into what the engine runs
(prompt ids per choice, sampling params, streaming options) or raises `APIError`, which
carries OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) and the
HTTP status: 400 (wrong types, unsupported values, max_tokens <= 0 or past the context, a
prompt longer than the context), 401 (wrong API key), 404 (unknown model). `Reply` builds
the response bodies and stream chunks for the engine requests of one HTTP request.

Notable: bad input never reaches the engine: every check the engine would make
(`requests.check_prompt`, `SamplingParams.validate`) runs here first, as a 400 naming the
field. `decode_body` turns any undecodable body into a 400 too (broken JSON, NaN or
Infinity, an integer of thousands of digits, nesting deeper than Python can parse).
Limits (a 400 past them): `temperature` in [0, 2], `top_p` in (0, 1]; a temperature below
`MIN_TEMPERATURE` or a top_p below `MIN_TOP_P` (1e-3, 1e-6: fp32 sampling breaks down there)
is greedy decoding; `top_k` in [-1, vocabulary size]; `seed` in torch's range
[-2**63, 2**64 - 1]; at most 4 stop strings of at most `MAX_STOP_LENGTH` characters; at most
`max_prompts` prompts per request (16 unless the parser is given another); `max_tokens` within
the context left after the prompt.
Deliberately not here: n > 1, logprobs, echo, penalties, tools, multiple models; HTTP
itself (`server.py`).
"""
from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass

from dsmoe.data.tokenizer import end_of_turn_ids
from dsmoe.errors import DsmoeError
from dsmoe.infer.requests import Request, check_prompt, tokenize_prompt
from dsmoe.infer.sampling import MIN_TEMPERATURE, MIN_TOP_P, SEED_RANGE, SamplingParams, is_int, is_number

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256  # characters per stop string (the text held back while one may complete)
MAX_PROMPTS = 16  # prompts in one /v1/completions request, unless the parser is told otherwise
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields accepted only at their default value.
UNSUPPORTED = (("n", (1,)), ("best_of", (1,)), ("echo", (False,)), ("logprobs", (False, 0)),
               ("top_logprobs", (0,)), ("suffix", ("",)), ("presence_penalty", (0,)),
               ("frequency_penalty", (0,)), ("logit_bias", ({},)), ("tools", ([],)))


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}  # e.g. Retry-After with a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def decode_body(raw: bytes):
    """A request body as JSON, or a 400 saying why not (never another exception)."""
    def no_constants(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN, ints past 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {str(err)[:200]}") from None


def preview(value) -> str:
    """A short rendering of a bad value for an error message (safe on any decoded JSON)."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def check_text(text: str, param: str) -> str:
    """Text a tokenizer can take: JSON may carry a lone surrogate ("\\ud800"), which no UTF-8 has."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' is not valid Unicode (it holds a lone surrogate such as \\ud800)",
                       param=param) from None
    return text


def get_field(body: dict, name: str, check, rule: str, default=None):
    """body[name] if present and not null, after `check`; a 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise APIError(400, f"'{name}': {rule}; got {preview(value)}", param=name)
    return value


def refuse_unsupported(body: dict) -> None:
    for name, allowed in UNSUPPORTED:
        value = body.get(name)
        if value is not None and value not in allowed:
            raise APIError(400, f"'{name}'={preview(value)} is not supported by this server", param=name)


@dataclass
class ParsedRequest:
    prompts: list[list[int]]  # one per choice
    params: list[SamplingParams]  # one per prompt
    stream: bool
    include_usage: bool  # streaming: a last chunk with the usage counts


class OpenAIParser:
    """Request bodies to engine requests, for one model with a context of `max_len` tokens."""

    def __init__(self, tokenizer, model_name: str, max_len: int, vocab_size: int, api_key: str | None = None,
                 max_prompts: int = MAX_PROMPTS):
        if tokenizer is None:
            raise DsmoeError("serving needs a tokenizer: the model directory has no tokenizer.json "
                             "(save the model with its tokenizer)")
        self.tokenizer, self.model_name, self.api_key = tokenizer, model_name, api_key
        self.max_len, self.vocab_size, self.max_prompts = max_len, vocab_size, max_prompts
        # A chat turn ends at EOS (always a stop) or at our default template's end-of-turn token.
        self.chat_stop_ids = end_of_turn_ids(tokenizer)

    def check_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme != "Bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: give it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(self, body: dict) -> None:
        model = get_field(body, "model", lambda v: isinstance(v, str), "must be a string")
        if model is None:
            raise APIError(400, "'model' is required", param="model")
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")

    def parse(self, body, chat: bool) -> ParsedRequest:
        """A decoded JSON body of /v1/chat/completions (`chat`) or /v1/completions."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.check_model(body)
        stream = get_field(body, "stream", lambda v: isinstance(v, bool), "must be a boolean", default=False)
        options = get_field(body, "stream_options", lambda v: isinstance(v, dict), "must be an object", default={})
        include_usage = get_field(options, "include_usage", lambda v: isinstance(v, bool), "must be a boolean",
                              default=False)
        prompts = [self.chat_prompt(body)] if chat else self.completion_prompts(body)
        params = [self.sampling_params(body, len(p), chat) for p in prompts]
        try:
            for p, sp in zip(prompts, params):
                sp.validate()
                check_prompt(p, sp.max_tokens, self.vocab_size, self.max_len)
        except DsmoeError as err:
            raise APIError(400, str(err)) from None
        return ParsedRequest(prompts, params, stream, include_usage)

    def sampling_params(self, body: dict, n_prompt: int, chat: bool) -> SamplingParams:
        refuse_unsupported(body)
        room = self.max_len - n_prompt
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens, "
                                f"and the prompt has {n_prompt}: shorten it", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = get_field(body, name, lambda v: is_int(v) and v >= 1, "must be a positive integer",
                           default=room if chat else min(16, room))
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens. "
                                f"However, you requested {n_prompt + max_tokens} tokens ({n_prompt} in the "
                                f"prompt, {max_tokens} for the completion): reduce {name} or the prompt",
                           param=name, code="context_length_exceeded")
        stop = get_field(body, "stop", lambda v: isinstance(v, str) or (
            isinstance(v, list) and len(v) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in v)),
            f"must be a string or a list of at most {MAX_STOP_STRINGS} strings", default=[])
        stop = [stop] if isinstance(stop, str) else stop
        if any(s == "" for s in stop):
            raise APIError(400, "'stop': stop strings must not be empty", param="stop")
        if any(len(s) > MAX_STOP_LENGTH for s in stop):
            raise APIError(400, f"'stop': each stop string may have at most {MAX_STOP_LENGTH} characters",
                           param="stop")
        temperature = float(get_field(body, "temperature", lambda v: is_number(v) and 0 <= v <= 2,
                                      "must be a number between 0 and 2", default=1.0))
        top_p = float(get_field(body, "top_p", lambda v: is_number(v) and 0 < v <= 1,
                                "must be a number in (0, 1]", default=1.0))
        if temperature < MIN_TEMPERATURE:  # as good as greedy, and safe
            temperature = 0.0
        if top_p < MIN_TOP_P:  # only the most likely token is left: greedy
            temperature, top_p = 0.0, 1.0
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=get_field(body, "top_k", lambda v: is_int(v) and -1 <= v <= self.vocab_size,
                            f"must be an integer in [0, {self.vocab_size}] (0 or -1: no limit)", default=0),
            seed=get_field(body, "seed", lambda v: is_int(v) and SEED_RANGE[0] <= v <= SEED_RANGE[1],
                           f"must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
            stop=stop,
            stop_token_ids=self.chat_stop_ids if chat else [],
            ignore_eos=bool(get_field(body, "ignore_eos", lambda v: isinstance(v, bool), "must be a boolean",
                                  default=False)))
        params.top_k = max(params.top_k, 0)
        return params

    def completion_prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        rule = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(
                isinstance(p, list) and all(is_int(t) for t in p) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, f"'prompt' is required and {rule}", param="prompt")
        if len(prompts) > self.max_prompts:
            raise APIError(400, f"'prompt': at most {self.max_prompts} prompts per request; got {len(prompts)}",
                           param="prompt")
        ids = [tokenize_prompt(self.tokenizer, check_text(p, "prompt")) if isinstance(p, str) else list(p)
               for p in prompts]
        for p in ids:
            if not p:
                raise APIError(400, "'prompt' is empty: give at least one token", param="prompt")
            if not all(0 <= t < self.vocab_size for t in p):
                raise APIError(400, f"'prompt': token ids must be in [0, {self.vocab_size})", param="prompt")
        return ids

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' is required and must be a non-empty list", param="messages")
        rendered = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in CHAT_ROLES:
                raise APIError(400, f"'messages[{i}]' must be an object with a role in {sorted(CHAT_ROLES)}",
                               param=f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in content):
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(400, f"'messages[{i}].content' must be a string or a list of text parts",
                               param=f"messages[{i}].content")
            rendered.append({"role": CHAT_ROLES[m["role"]], "content": check_text(content, f"messages[{i}].content")})
        try:
            text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
        except DsmoeError as err:
            raise APIError(400, str(err), param="messages") from None
        return self.tokenizer.encode(text, add_bos=False)  # a rendered chat carries its own BOS


class Reply:
    """OpenAI response bodies for a set of engine requests (one per choice)."""

    def __init__(self, chat: bool, model_name: str, reqs: list[Request]):
        self.chat, self.model, self.reqs = chat, model_name, reqs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.reqs)
        completion = sum(len(r.output_ids) for r in self.reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                **cache_usage(prompt, sum(r.cached_tokens for r in self.reqs))}

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def full(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                        "logprobs": None, "finish_reason": finish_reason(r)} for i, r in enumerate(self.reqs)]
        else:
            choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": finish_reason(r)}
                       for i, r in enumerate(self.reqs)]
        return {**self._head(self.object), "choices": choices, "usage": self.usage()}

    def chunk(self, index: int, text: str | None, reason: str | None, first: bool = False) -> str:
        """One server-sent event of a stream: a choice's new text, or its end (`reason`)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
            body = {**self._head("text_completion"), "choices": [choice]}
        return sse(body)

    def usage_chunk(self) -> str:
        return sse({**self._head(self.object + ".chunk" if self.chat else self.object),
                    "choices": [], "usage": self.usage()})


def cache_usage(prompt_tokens: int, cached_tokens: int) -> dict:
    """Prompt tokens served from the prefix cache, as OpenAI and DeepSeek report them."""
    return {"prompt_tokens_details": {"cached_tokens": cached_tokens},
            "prompt_cache_hit_tokens": cached_tokens, "prompt_cache_miss_tokens": prompt_tokens - cached_tokens}


def finish_reason(r: Request) -> str:
    return "length" if r.finish_reason == "length" else "stop"


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
