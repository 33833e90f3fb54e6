"""The official `openai` SDK against `ds4 serve --scripted tests/compat/script.json`."""
import json

import openai
import pytest
from openai import OpenAI

TOOLS = [{"type": "function", "function": {"name": "list_files", "description": "List files",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "depth": {"type": "array"}},
                         "required": ["path"]}}}]


@pytest.fixture(scope="module")
def client(base, key):
    return OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert "deepseek-v4-flash" in ids
    assert client.models.retrieve("deepseek-chat").id == "deepseek-chat"


def test_chat_thinking_and_usage(client):
    r = client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}])
    msg = r.choices[0].message
    assert msg.content == "Hello there!"
    assert extra(msg, "reasoning_content") == "Let me think."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len("Let me think.</think>Hello there!".encode())
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_thinking_off(client):
    for kwargs in ({"model": "deepseek-chat"},
                   {"model": "deepseek-v4-flash", "extra_body": {"thinking": {"type": "disabled"}}}):
        r = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kwargs)
        assert r.choices[0].message.content == "Hello there!"
        assert extra(r.choices[0].message, "reasoning_content") is None


def test_chat_stream(client):
    stream = client.chat.completions.create(model="deepseek-v4-flash", stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "unicode"}])
    content, reasoning, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            content += ch.delta.content or ""
            reasoning += extra(ch.delta, "reasoning_content") or ""
            finish = ch.finish_reason or finish
    assert content == "héllo ✓ 中文 🎉"
    assert reasoning == "Ok."
    assert finish == "stop"
    assert usage and usage.completion_tokens > 0


def test_chat_tools(client):
    r = client.chat.completions.create(model="deepseek-v4-flash", tools=TOOLS,
                                       messages=[{"role": "user", "content": "please list files"}])
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    call = ch.message.tool_calls[0]
    assert call.id.startswith("call_")
    assert call.function.name == "list_files"
    assert json.loads(call.function.arguments) == {"path": "src & docs", "depth": [1, 2]}
    # Send the call back with its result: the request must be accepted and answered.
    r2 = client.chat.completions.create(model="deepseek-v4-flash", tools=TOOLS, messages=[
        {"role": "user", "content": "please list files"},
        {"role": "assistant", "content": ch.message.content, "tool_calls": [call.model_dump()],
         "reasoning_content": extra(ch.message, "reasoning_content")},
        {"role": "tool", "tool_call_id": call.id, "content": "a.txt\nb.txt"}])
    assert r2.choices[0].message.content == "Hello there!"
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached == r.usage.total_tokens, "exact replay should reuse the whole previous turn"


def test_chat_tools_stream(client):
    stream = client.chat.completions.create(model="deepseek-v4-flash", tools=TOOLS, stream=True,
                                            messages=[{"role": "user", "content": "please list files"}])
    calls, finish = {}, None
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
                if tc.id:
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["args"] += tc.function.arguments
    assert finish == "tool_calls"
    assert calls[0]["name"] == "list_files" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["args"]) == {"path": "src & docs", "depth": [1, 2]}


def test_completions_stop(client):
    r = client.completions.create(model="deepseek-chat", prompt="stop test", stop=["STOP"])
    assert r.choices[0].text == "alpha beta "
    assert r.choices[0].finish_reason == "stop"


def test_chat_max_tokens(client):
    r = client.chat.completions.create(model="deepseek-v4-flash", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_responses(client):
    r = client.responses.create(model="deepseek-v4-flash", input="hi", reasoning={"effort": "none"})
    assert r.status == "completed"
    assert r.output_text == "Hello there!"
    tools = [{"type": "function", "name": "list_files", "parameters": TOOLS[0]["function"]["parameters"]}]
    r = client.responses.create(model="deepseek-v4-flash", tools=tools, input="please list files")
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "list_files"
    assert json.loads(calls[0].arguments)["path"] == "src & docs"


def test_responses_stream(client):
    events = list(client.responses.create(model="deepseek-v4-flash", input="unicode", stream=True,
                                          reasoning={"effort": "high", "summary": "auto"}))
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "héllo ✓ 中文 🎉"
    assert events[-1].response.output_text == "héllo ✓ 中文 🎉"


def test_errors(client, base):
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="deepseek-v4-flash", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"temperature": "hot"})
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="deepseek-v4-flash",
                                       messages=[{"role": "user", "content": "word " * 3000}])
    assert e.value.code == "context_length_exceeded"
    assert "8192" in str(e.value)
