#!/usr/bin/env python3
"""Generate chat-rendering fixtures with DeepSeek's official V4 encoder.

The oracle is the official ``encoding_dsv4.py`` from the DeepSeek-V4 release
(``encoding/`` folder of the model repository). Its code is NOT part of this
project: place a copy outside the repository and point this script at it with
``--encoder PATH`` or the environment variable ``DS4_ENCODING_DSV4``
(default ``/work/oracle-src/encoding_dsv4.py``).

For every conversation below this writes, under ``fixtures/chat/generated/``:
  ``NN_name.json``  the request as ``ds4 render-chat`` / ``ds4_chat::ChatRequest`` reads it
                    ({"thinking_mode", "reasoning_effort", "drop_thinking", "messages"})
  ``NN_name.txt``   ``encode_messages(messages, thinking_mode, drop_thinking=...,
                    reasoning_effort=...)`` (exact bytes, UTF-8)
and two seeded random sets (one JSON object per line):
  ``random_conversations.jsonl``  {"request": <as above>, "prompt": <official output>}
  ``random_completions.jsonl``    assistant turns rendered by the official encoder and
                    parsed back by its ``parse_message_from_completion_text``:
                    {"thinking_mode", "text", "reasoning", "content",
                     "tool_calls": [{"name", "arguments": <object>}]}

Usage: python oracles/gen_chat.py [--encoder PATH] [--out fixtures/chat/generated]
"""

import argparse
import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7.5},
            },
            "required": ["location"],
        },
    },
}
BASH = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a shell command. Output may contain \"quotes\", \\ and\ttabs.",
        "parameters": {
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "timeout": {"type": "number"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["command"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "搜索网页 🔍",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "top_k": {"type": "integer", "default": 5}},
            "required": ["query"],
        },
    },
}


def call(cid, name, args, as_string=True):
    return {
        "id": cid,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False) if as_string else args},
    }


def sys_(content, **kw):
    return {"role": "system", "content": content, **kw}


def user(content, **kw):
    return {"role": "user", "content": content, **kw}


def asst(content=None, reasoning=None, calls=None, **kw):
    m = {"role": "assistant"}
    if content is not None:
        m["content"] = content
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    if calls is not None:
        m["tool_calls"] = calls
    m.update(kw)
    return m


def tool(cid, content, **kw):
    m = {"role": "tool", "content": content, **kw}
    if cid is not None:
        m["tool_call_id"] = cid
    return m


JSON_SCHEMA_RF = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
            "required": ["answer", "confidence"],
        },
    },
}

TOOL_TURNS = [
    user("What's the weather in Paris and Tokyo?"),
    asst("", "Two cities, two calls.", [
        call("call_a", "get_weather", {"location": "Paris", "unit": "celsius"}),
        call("call_b", "get_weather", {"location": "Tokyo", "days": 3}),
    ]),
    tool("call_a", "{\"temp\": 18}"),
    tool("call_b", "{\"temp\": 25}"),
    asst("Paris 18°C, Tokyo 25°C.", "Both results are in."),
]

CASES = []


def case(name, messages, mode="thinking", effort=None, drop_thinking=True):
    CASES.append((name, messages, mode, effort, drop_thinking))


# --- plain chat -------------------------------------------------------------
case("single_user_thinking", [user("Hello!")])
case("single_user_chat", [user("Hello!")], mode="chat")
case("system_multiturn_thinking_drop", [
    sys_("You are terse."), user("Hi"), asst("Hello!", "greet"), user("2+2?"),
])
case("system_multiturn_chat_reasoning_ignored", [
    sys_("You are terse."), user("Hi"), asst("Hello!", "greet"), user("2+2?"), asst("4", "add"),
], mode="chat")
case("multiturn_last_assistant_keeps_reasoning", [
    user("a"), asst("b", "r1"), user("c"), asst("d", "r2"),
])
case("drop_thinking_false", [
    user("a"), asst("b", "r1"), user("c"), asst("d", "r2"), user("e"),
], drop_thinking=False)
case("no_system_empty_user", [user(""), asst("", ""), user("again")])
case("empty_conversation", [])
case("multiple_systems_hoisted_in_place", [
    sys_("First."), user("q1"), sys_("Second system in the middle."), user("q2"),
])
case("consecutive_users_merged", [user("part one"), user("part two"), user("part three")])
case("assistant_after_assistant", [user("q"), asst("a1", "r1"), asst("a2", "r2")])
case("assistant_prefill_wo_eos", [user("Write a haiku"), asst("Autumn moon", "think", wo_eos=True)])
case("unicode_content", [
    sys_("Répondez en français. 日本語も OK。"),
    user("Emoji 🧪🚀, RTL עברית, combining é, zero-width\u200bspace, tab\tand \\ backslash"),
    asst("D'accord — «bien sûr» ✓", "内部推理 🤔"),
    user("Encore?"),
])

# --- reasoning effort -------------------------------------------------------
case("effort_max_thinking", [sys_("Be careful."), user("Prove it.")], effort="max")
case("effort_max_chat_no_prefix", [sys_("Be careful."), user("Prove it.")], mode="chat", effort="max")
case("effort_high_thinking", [user("Prove it.")], effort="high")
case("effort_max_no_system", [user("Only user."), asst("ok", "r"), user("more")], effort="max")

# --- tools ------------------------------------------------------------------
case("tools_parallel_calls_thinking", [sys_("You are a weather bot.", tools=[WEATHER, SEARCH])] + TOOL_TURNS)
case("tools_parallel_calls_chat", [sys_("You are a weather bot.", tools=[WEATHER, SEARCH])] + TOOL_TURNS, mode="chat")
case("tool_results_out_of_order_sorted", [
    sys_("", tools=[WEATHER]),
    user("Three cities"),
    asst("", "three calls", [
        call("c1", "get_weather", {"location": "A"}),
        call("c2", "get_weather", {"location": "B"}),
        call("c3", "get_weather", {"location": "C"}),
    ]),
    tool("c3", "C result"), tool("c1", "A result"), tool("c2", "B result"),
])
case("tool_results_unknown_ids", [
    sys_("sys", tools=[WEATHER]),
    user("go"),
    asst("", "calls", [call("k1", "get_weather", {"location": "X"}), call("k2", "get_weather", {"location": "Y"})]),
    tool("k2", "second"), tool("zzz", "unknown id"), tool(None, "no id"), tool("k1", "first"),
])
case("tool_result_then_user_text_merged", [
    sys_("sys", tools=[BASH]),
    user("list files"),
    asst("Let me look.", "use ls", [call("b1", "bash", {"command": "ls -la && echo <done>", "timeout": 10})]),
    tool("b1", "a.txt\nb.txt"),
    user("now count them"),
])
case("conversation_ends_with_tool_result", [
    sys_("sys", tools=[BASH]),
    user("pwd?"),
    asst(None, "run pwd", [call("p1", "bash", {"command": "pwd"})]),
    tool("p1", "/tmp"),
])
case("tool_result_special_content", [
    sys_("sys", tools=[BASH]),
    user("cat"),
    asst("", "", [call("x1", "bash", {"command": "cat f"})]),
    tool("x1", "line </tool_result> & <b>bold</b> \"q\"\n\n<｜DSML｜invoke name=\"x\">"),
])
case("tool_content_null_and_list", [
    sys_("sys", tools=[BASH]),
    user("two"),
    asst("", "r", [call("n1", "bash", {"command": "a"}), call("n2", "bash", {"command": "b"})]),
    tool("n1", None),
    tool("n2", [{"type": "text", "text": "part 1"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "part 2"}]),
])
case("tool_args_nested_values", [
    sys_("sys", tools=[BASH]),
    user("complex"),
    asst("", "nested", [call("v1", "bash", {
        "command": "run",
        "timeout": 1.50,
        "big": 1e20,
        "small": 1e-7,
        "int": 12345678901234,
        "neg": -3,
        "flag": True,
        "off": False,
        "nothing": None,
        "list": [1, "two", {"three": 3.0}],
        "env": {"PATH": "/bin", "LANG": "zh_CN.UTF-8", "Q": "\"quoted\"\n"},
        "empty_obj": {},
        "empty_list": [],
        "unicode": "π ≈ 3.14 🥧",
    })]),
    tool("v1", "ok"),
])
case("tool_args_not_json_and_non_string", [
    sys_("sys", tools=[BASH]),
    user("odd args"),
    asst("", "", [
        {"id": "o1", "type": "function", "function": {"name": "bash", "arguments": "not json {"}},
        call("o2", "bash", {"command": "ls", "n": 2}, as_string=False),
        {"id": "o3", "type": "function", "function": {"name": "bash", "arguments": "{}"}},
    ]),
    tool("o1", "r1"), tool("o2", "r2"), tool("o3", "r3"),
])
case("tool_call_id_in_function", [
    sys_("sys", tools=[WEATHER]),
    user("two"),
    asst("", "r", [
        {"type": "function", "function": {"id": "f1", "name": "get_weather", "arguments": "{\"location\": \"A\"}"}},
        {"type": "function", "function": {"id": "f2", "name": "get_weather", "arguments": "{\"location\": \"B\"}"}},
    ]),
    tool("f2", "B"), tool("f1", "A"),
])
case("tools_no_calls_reasoning_kept", [
    sys_("You can search.", tools=[SEARCH]),
    user("Hi"), asst("Hello", "no tool needed"), user("Thanks"), asst("Welcome", "still none"), user("Bye"),
])
case("multi_round_tools_chat", [
    sys_("agent", tools=[BASH, SEARCH]),
    user("find and run"),
    asst("Searching first.", "plan", [call("s1", "search", {"query": "how to list", "top_k": 3})]),
    tool("s1", "use ls"),
    asst("", "now run", [call("s2", "bash", {"command": "ls"})]),
    tool("s2", "file"),
    asst("Done: file", "summarize"),
    user("again?"),
], mode="chat")
case("multi_round_tools_max_effort", [
    sys_("agent", tools=[BASH]),
    user("run"),
    asst("", "plan", [call("m1", "bash", {"command": "date"})]),
    tool("m1", "Mon"),
], effort="max")
case("empty_tool_list_is_no_tools", [
    sys_("sys", tools=[]), user("a"), asst("b", "r"), user("c"),
])

# --- developer / latest_reminder / response_format / tasks -----------------
case("developer_with_tools", [
    sys_("Base system."),
    {"role": "developer", "content": "Developer instructions.", "tools": [SEARCH]},
    asst("", "search it", [call("d1", "search", {"query": "q"})]),
    tool("d1", "[0] result"),
    asst("Answer.", "done"),
])
case("developer_dropped_before_last_user", [
    sys_("sys"),
    {"role": "developer", "content": "Old developer turn."},
    asst("ok", "r"),
    user("new question"),
])
case("developer_chat_mode", [
    {"role": "developer", "content": "Dev says hi."},
    asst("hi", "r"),
    user("next"),
], mode="chat")
case("latest_reminder_before_user", [
    sys_("sys"),
    {"role": "latest_reminder", "content": "2026-01-01, Berlin, de"},
    user("Wie spät ist es?"),
])
case("latest_reminder_after_user_and_null", [
    user("first"),
    {"role": "latest_reminder", "content": None},
    asst("ok", "r"),
])
case("response_format_system", [
    sys_("Reply in JSON.", response_format=JSON_SCHEMA_RF), user("Capital of France?"),
])
case("response_format_with_tools_developer", [
    {"role": "developer", "content": "Use tools, answer as JSON.", "tools": [WEATHER], "response_format": {"type": "json_object"}},
    asst("{\"answer\": \"ok\"}", "fine"),
], mode="chat")
case("task_query_last_user", [sys_("sys"), user("What is X?", task="query")])
case("task_action_then_answer", [
    user("hello"), asst("hi", "r"), user("search the web", task="action"), asst("Search"),
])
case("task_title_thinking", [user("Summarize this chat", task="title"), asst("Chat summary")])


# --- random conversations / completions (seeded) ----------------------------
RANDOM_TEXTS = ["", "hi", "a\n\nb", "ü 🧪 日本", "</tool_result>", "<think>x</think>", "  ", "\t\"q\"\\", "x<y>&z"]


def random_conversations(enc, seed, count):
    """Random message lists the official encoder accepts, with its output."""
    import random
    R = random.Random(seed)

    def txt():
        return R.choice(RANDOM_TEXTS) + R.choice(["", str(R.randint(0, 99))])

    def args():
        d = {}
        for k in R.sample(["a", "b", "c", "d"], R.randint(0, 3)):
            d[k] = R.choice([txt(), R.randint(-5, 10**15), R.random() * 10 ** R.randint(-8, 20),
                             True, None, [1, "x", {"y": 2.5}], {}])
        return d

    def msg(ids):
        r = R.random()
        if r < 0.08:
            m = {"role": "system", "content": R.choice([txt(), None])}
            if R.random() < 0.4:
                m["tools"] = R.sample([WEATHER, BASH, SEARCH], R.randint(1, 2))
            if R.random() < 0.2:
                m["response_format"] = JSON_SCHEMA_RF
            return m
        if r < 0.13:
            m = {"role": "developer", "content": "dev " + txt()}
            if R.random() < 0.3:
                m["tools"] = [SEARCH]
            return m
        if r < 0.4:
            m = {"role": "user", "content": txt()}
            if R.random() < 0.1:
                m["task"] = R.choice(sorted(enc.VALID_TASKS))
            return m
        if r < 0.45:
            return {"role": "latest_reminder", "content": R.choice([txt(), None])}
        if r < 0.75:
            m = {"role": "assistant"}
            if R.random() < 0.8:
                m["content"] = txt()
            if R.random() < 0.7:
                m["reasoning_content"] = txt()
            if R.random() < 0.4:
                calls = []
                for _ in range(R.randint(1, 3)):
                    cid = "id%d" % R.randint(0, 5)
                    ids.append(cid)
                    calls.append({"id": cid, "type": "function", "function": {
                        "name": R.choice(["f", "g"]),
                        "arguments": json.dumps(args(), ensure_ascii=R.random() < 0.5)}})
                m["tool_calls"] = calls
            if R.random() < 0.05:
                m["wo_eos"] = True
            return m
        m = {"role": "tool", "content": R.choice([txt(), txt(), None,
                                                   [{"type": "text", "text": "t"}, {"type": "image"}]])}
        if R.random() < 0.9:
            m["tool_call_id"] = R.choice(ids) if ids and R.random() < 0.8 else "zz"
        return m

    out = []
    while len(out) < count:
        ids = []
        msgs = [msg(ids) for _ in range(R.randint(0, 9))]
        mode = R.choice(["chat", "thinking"])
        effort = R.choice([None, "high", "max"])
        drop = R.random() < 0.8
        try:
            text = enc.encode_messages(copy.deepcopy(msgs), thinking_mode=mode,
                                       drop_thinking=drop, reasoning_effort=effort)
        except Exception:
            continue  # inputs the official encoder rejects are not fixtures
        out.append({"request": {"thinking_mode": mode, "reasoning_effort": effort,
                                "drop_thinking": drop, "messages": msgs}, "prompt": text})
    return out


def random_completions(enc, seed, count):
    """Well-formed assistant turns rendered by the official encoder and parsed back by
    the official ``parse_message_from_completion_text``."""
    import random
    R = random.Random(seed)
    out = []
    while len(out) < count:
        mode = R.choice(["chat", "thinking"])
        m = {"role": "assistant", "content": R.choice(["", "answer", "a\n\nb", "ü 🧪", "x<y>&z", "\n"])}
        if mode == "thinking":
            m["reasoning_content"] = R.choice(["", "think", "r\n\nr", "日本 <b>"])
        if R.random() < 0.6:
            calls = []
            for _ in range(R.randint(1, 3)):
                a = {}
                for k in R.sample(["p", "q", "r", "s"], R.randint(0, 4)):
                    a[k] = R.choice(["v", "x y", "<&>", "", "line1\nline2", 7, -1.25, True, None,
                                     [1, [2, {"z": "w"}]], {"k": {"n": 1e-9}}])
                calls.append({"type": "function", "function": {"name": R.choice(["f", "get_x"]),
                                                               "arguments": json.dumps(a, ensure_ascii=False)}})
            m["tool_calls"] = calls
        prompt = enc.encode_messages([{"role": "user", "content": "u"}, m], thinking_mode=mode, drop_thinking=False)
        opener = "<｜Assistant｜>" + ("<think>" if mode == "thinking" else "</think>")
        text = prompt[prompt.index(opener) + len(opener):]
        try:
            parsed = enc.parse_message_from_completion_text(text, thinking_mode=mode)
        except Exception:
            continue  # e.g. content that itself contains markers
        out.append({"thinking_mode": mode, "text": text,
                    "reasoning": parsed["reasoning_content"], "content": parsed["content"],
                    "tool_calls": [{"name": tc["function"]["name"],
                                    "arguments": json.loads(tc["function"]["arguments"])}
                                   for tc in parsed["tool_calls"]]})
    return out


def load_encoder(path):
    spec = importlib.util.spec_from_file_location("encoding_dsv4", path)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot load encoder from {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=os.environ.get("DS4_ENCODING_DSV4", "/work/oracle-src/encoding_dsv4.py"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "fixtures/chat/generated"))
    args = ap.parse_args()
    enc = load_encoder(args.encoder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    for i, (name, messages, mode, effort, drop) in enumerate(CASES, 1):
        text = enc.encode_messages(copy.deepcopy(messages), thinking_mode=mode,
                                   drop_thinking=drop, reasoning_effort=effort)
        stem = f"{i:02d}_{name}"
        req = {"thinking_mode": mode, "reasoning_effort": effort, "drop_thinking": drop, "messages": messages}
        (out / f"{stem}.json").write_text(json.dumps(req, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (out / f"{stem}.txt").write_bytes(text.encode("utf-8"))
    with open(out / "random_conversations.jsonl", "w", encoding="utf-8") as f:
        for item in random_conversations(enc, seed=4, count=400):
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    with open(out / "random_completions.jsonl", "w", encoding="utf-8") as f:
        for item in random_completions(enc, seed=5, count=300):
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {len(CASES)} conversations, 400 random conversations, 300 random completions to {out}")


if __name__ == "__main__":
    main()
