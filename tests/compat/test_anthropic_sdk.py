"""The official `anthropic` SDK against `ds4 serve --scripted tests/compat/script.json`."""
import anthropic
import pytest
from anthropic import Anthropic

TOOLS = [{"name": "list_files", "description": "List files",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}, "depth": {"type": "array"}},
                           "required": ["path"]}}]


@pytest.fixture(scope="module")
def client(base, key):
    return Anthropic(base_url=base, api_key=key, max_retries=0)


def test_message_thinking(client):
    m = client.messages.create(model="deepseek-v4-flash", max_tokens=200,
                               messages=[{"role": "user", "content": "hi"}])
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "Let me think."
    assert m.content[1].text == "Hello there!"
    assert m.stop_reason == "end_turn"
    assert m.usage.output_tokens == len("Let me think.</think>Hello there!".encode())


def test_message_no_thinking_with_system(client):
    m = client.messages.create(model="deepseek-v4-flash", max_tokens=200, system="Be brief.",
                               thinking={"type": "disabled"}, messages=[{"role": "user", "content": "hi"}])
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == "Hello there!"


def test_tool_use_and_result_round_trip(client):
    m = client.messages.create(model="deepseek-v4-flash", max_tokens=500, tools=TOOLS,
                               messages=[{"role": "user", "content": "please list files"}])
    assert m.stop_reason == "tool_use"
    tool = [b for b in m.content if b.type == "tool_use"][0]
    assert tool.id.startswith("toolu_")
    assert tool.name == "list_files"
    assert tool.input == {"path": "src & docs", "depth": [1, 2]}
    m2 = client.messages.create(model="deepseek-v4-flash", max_tokens=500, tools=TOOLS, messages=[
        {"role": "user", "content": "please list files"},
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "a.txt"}]}])
    assert m2.content[-1].text == "Hello there!"
    previous = m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) + m.usage.output_tokens
    assert m2.usage.cache_read_input_tokens == previous


def test_stream_accumulates_like_the_sdk_expects(client):
    with client.messages.stream(model="deepseek-v4-flash", max_tokens=500, tools=TOOLS,
                                messages=[{"role": "user", "content": "please list files"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "I will list them."
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "The user wants files."
    assert final.content[2].input == {"path": "src & docs", "depth": [1, 2]}
    assert final.stop_reason == "tool_use"


def test_stream_unicode_and_stop_sequences(client):
    with client.messages.stream(model="deepseek-v4-flash", max_tokens=100,
                                messages=[{"role": "user", "content": "unicode"}]) as stream:
        final = stream.get_final_message()
    assert final.content[-1].text == "héllo ✓ 中文 🎉"
    m = client.messages.create(model="deepseek-v4-flash", max_tokens=100, stop_sequences=["STOP"],
                               thinking={"type": "disabled"}, messages=[{"role": "user", "content": "stop test"}])
    assert m.stop_reason == "stop_sequence"
    assert m.stop_sequence == "STOP"
    assert m.content[0].text == "alpha beta "


def test_count_tokens(client):
    n = client.messages.count_tokens(model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}])
    m = client.messages.create(model="deepseek-v4-flash", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert n.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    assert n.input_tokens > 0


def test_errors(client, base):
    with pytest.raises(anthropic.AuthenticationError):
        Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
            model="deepseek-v4-flash", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-nope", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="deepseek-v4-flash", max_tokens=10, messages=[])
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="deepseek-v4-flash", max_tokens=10,
                               messages=[{"role": "user", "content": "word " * 3000}])
    assert "8192" in str(e.value)
