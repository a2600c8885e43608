"""OpenAI request parsing, validation and response bodies, without a web framework or an engine."""
import json
import subprocess
import sys

import pytest

from dsmoe.infer.openai_api import APIError, OpenAIParser, Reply, decode_body
from dsmoe.infer.requests import Request
from dsmoe.infer.sampling import SamplingParams

NAME = "tiny"
VOCAB, MAX_LEN = 512, 64


@pytest.fixture
def parser(tokenizer):
    return OpenAIParser(tokenizer, NAME, max_len=MAX_LEN, vocab_size=VOCAB, api_key="k")


def error(parser, body, chat=False) -> APIError:
    with pytest.raises(APIError) as info:
        parser.parse(body, chat)
    return info.value


def test_the_module_needs_no_web_framework():
    code = "import sys, dsmoe.infer.openai_api; print(sorted(m for m in ('fastapi', 'starlette') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_completion_with_defaults(parser, tokenizer):
    parsed = parser.parse({"model": NAME, "prompt": "Hi"}, chat=False)
    assert parsed.prompts == [[tokenizer.bos_id, ord("H"), ord("i")]]  # text prompts get the BOS
    sp = parsed.params[0]
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (16, 1.0, 1.0, 0, None)
    assert sp.stop == [] and sp.stop_token_ids == [] and not sp.ignore_eos
    assert not parsed.stream and not parsed.include_usage


def test_completion_prompt_forms_and_fields(parser):
    body = {"model": NAME, "prompt": [[1, 2], [3]], "max_tokens": 5, "temperature": 0, "top_p": 0.5,
            "top_k": -1, "seed": 7, "stop": "\n", "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    parsed = parser.parse(body, chat=False)
    assert parsed.prompts == [[1, 2], [3]] and len(parsed.params) == 2
    sp = parsed.params[0]
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (5, 0.0, 0.5, 0, 7)
    assert sp.stop == ["\n"] and sp.ignore_eos and parsed.stream and parsed.include_usage
    assert parser.parse({"model": NAME, "prompt": [4, 5, 6]}, chat=False).prompts == [[4, 5, 6]]
    assert len(parser.parse({"model": NAME, "prompt": ["a", "b"]}, chat=False).prompts) == 2


def test_chat_renders_the_template_and_fills_the_context(parser, tokenizer):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "He"}, {"type": "text", "text": "y"}]}]
    parsed = parser.parse({"model": NAME, "messages": messages}, chat=True)
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hey"}])
    assert parsed.prompts == [tokenizer.encode(text)]  # no extra BOS: the template brings its own
    assert parsed.params[0].max_tokens == MAX_LEN - len(parsed.prompts[0])  # chat default: the rest
    with_cap = parser.parse({"model": NAME, "messages": messages, "max_completion_tokens": 3}, chat=True)
    assert with_cap.params[0].max_tokens == 3


@pytest.mark.parametrize("body, chat, status, param, code", [
    ({"prompt": "x"}, False, 400, "model", None),
    ({"model": "other", "prompt": "x"}, False, 404, "model", "model_not_found"),
    ({"model": NAME, "prompt": "x", "n": 2}, False, 400, "n", None),
    ({"model": NAME, "prompt": "x", "logprobs": 3}, False, 400, "logprobs", None),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, False, 400, "max_tokens", None),
    ({"model": NAME, "prompt": "x", "max_tokens": 70}, False, 400, "max_tokens", "context_length_exceeded"),
    ({"model": NAME, "prompt": [1] * 64}, False, 400, "prompt", "context_length_exceeded"),
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, False, 400, "temperature", None),
    ({"model": NAME, "prompt": "x", "temperature": 2.5}, False, 400, "temperature", None),
    ({"model": NAME, "prompt": "x", "top_p": 0}, False, 400, "top_p", None),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, False, 400, "stop", None),
    ({"model": NAME, "prompt": "x", "stop": [""]}, False, 400, "stop", None),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, False, 400, "stream", None),
    ({"model": NAME, "prompt": []}, False, 400, "prompt", None),
    ({"model": NAME, "prompt": [1, 512]}, False, 400, "prompt", None),
    ({"model": NAME, "prompt": [[1], []]}, False, 400, "prompt", None),
    ({"model": NAME, "messages": []}, True, 400, "messages", None),
    ({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, True, 400, "messages[0]", None),
    ({"model": NAME, "messages": [{"role": "user", "content": 3}]}, True, 400, "messages[0].content", None),
])
def test_bad_requests_name_the_field(parser, body, chat, status, param, code):
    err = error(parser, body, chat)
    assert (err.status, err.param, err.code) == (status, param, code)
    assert err.body()["error"]["type"] == "invalid_request_error" and err.body()["error"]["message"]


def test_body_must_be_an_object_and_the_key_must_match(parser):
    assert error(parser, ["not", "an", "object"]).status == 400
    parser.check_key("Bearer k")
    with pytest.raises(APIError) as info:
        parser.check_key("Bearer wrong")
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    OpenAIParser(parser.tokenizer, NAME, MAX_LEN, VOCAB).check_key(None)  # no key: open


def test_reply_bodies(tokenizer):
    r = Request("r0", [1, 2, 3], SamplingParams(max_tokens=2), output_ids=[65, 66], text="AB",
                finish_reason="length")
    chat, plain = Reply(True, NAME, [r]), Reply(False, NAME, [r])
    assert chat.full()["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "AB"},
                                       "logprobs": None, "finish_reason": "length"}]
    assert plain.full()["choices"][0]["text"] == "AB" and plain.full()["object"] == "text_completion"
    assert chat.full()["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                    "prompt_tokens_details": {"cached_tokens": 0},
                                    "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": 3}
    event = chat.chunk(0, "A", None)
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = json.loads(event[len("data: "):])
    assert body["object"] == "chat.completion.chunk" and body["choices"][0]["delta"] == {"content": "A"}
    assert json.loads(chat.usage_chunk()[6:])["usage"]["total_tokens"] == 5


# ------------------------------------------------------------------ hostile values, field by field
@pytest.mark.parametrize("field, value", [
    ("top_k", 2 ** 63), ("top_k", VOCAB + 1), ("top_k", -2), ("top_k", 1.5),
    ("seed", 2 ** 70), ("seed", -(2 ** 63) - 1), ("seed", "7"),
    ("temperature", float("inf")), ("temperature", float("nan")), ("temperature", -1e-9), ("temperature", 10 ** 400),
    ("top_p", float("nan")), ("top_p", 1.0000001), ("top_p", 10 ** 400), ("top_p", True),
    ("max_tokens", 10 ** 4000), ("max_tokens", 2.0),
    ("stop", ["s" * 257]), ("stop", [["nested"]]), ("stop", {"a": 1}),
])
def test_hostile_sampling_values_get_a_400_naming_the_field(parser, field, value):
    err = error(parser, {"model": NAME, "prompt": "x", field: value})
    assert (err.status, err.param) == (400, field) and field in err.message


@pytest.mark.parametrize("field, value", [("temperature", 1e-40), ("temperature", 1e-4), ("top_p", 1e-50),
                                          ("top_p", 1e-7)])
def test_underflowing_temperature_or_top_p_is_greedy(parser, field, value):
    sp = parser.parse({"model": NAME, "prompt": "x", "temperature": 1.0, field: value}, chat=False).params[0]
    assert sp.greedy and sp.top_p == 1.0 and sp.validate()
    # at the thresholds, sampling stays sampling
    sp = parser.parse({"model": NAME, "prompt": "x", "temperature": 1e-3, "top_p": 1e-6}, chat=False).params[0]
    assert (sp.temperature, sp.top_p) == (1e-3, 1e-6)


def test_limits_on_prompts_stops_and_seeds(parser):
    assert len(parser.parse({"model": NAME, "prompt": ["a"] * 16}, chat=False).prompts) == 16
    assert error(parser, {"model": NAME, "prompt": ["a"] * 17}).param == "prompt"
    assert error(parser, {"model": NAME, "prompt": [[1]] * 17}).param == "prompt"
    sp = parser.parse({"model": NAME, "prompt": "x", "stop": ["s" * 256] * 4, "seed": 2 ** 64 - 1,
                       "top_k": VOCAB}, chat=False).params[0]
    assert len(sp.stop) == 4 and sp.seed == 2 ** 64 - 1 and sp.top_k == VOCAB
    assert sp.generator("cpu").initial_seed() == 2 ** 64 - 1


@pytest.mark.parametrize("messages, param", [
    ([{"role": ["user"], "content": "x"}], "messages[0]"),
    ([{"role": {"a": 1}, "content": "x"}], "messages[0]"),
    ([{"role": None, "content": "x"}], "messages[0]"),
    ([{"role": "user", "content": "x\ud800"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content"),
])
def test_hostile_messages(parser, messages, param):
    err = error(parser, {"model": NAME, "messages": messages}, chat=True)
    assert (err.status, err.param) == (400, param)


def test_a_lone_surrogate_in_a_prompt_is_a_400(parser):
    assert error(parser, {"model": NAME, "prompt": "x\ud800"}).param == "prompt"


@pytest.mark.parametrize("raw, says", [
    (b'{"model": "tiny", "prompt": ', "not valid JSON"),
    (b'{"model": "tiny", "temperature": NaN}', "NaN is not JSON"),
    (b'{"model": "tiny", "temperature": -Infinity}', "-Infinity is not JSON"),
    (b'{"model": "tiny", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"\xff\xfe\xfd", "not valid JSON"),
])
def test_undecodable_bodies_are_a_400(raw, says):
    with pytest.raises(APIError) as info:
        decode_body(raw)
    assert info.value.status == 400 and says in info.value.message


def test_a_body_nested_just_under_the_limit_still_gets_a_400_with_a_preview(parser):
    deep = json.loads("[" * 500 + "]" * 500)
    err = error(parser, {"model": NAME, "prompt": "x", "temperature": deep})
    assert err.param == "temperature" and len(err.message) < 200


def test_the_key_needs_the_bearer_scheme(parser):
    for header in ("k", "bearer k", "Basic k", "Bearerk", "", None):
        with pytest.raises(APIError) as info:
            parser.check_key(header)
        assert info.value.status == 401
    parser.check_key("Bearer k")
