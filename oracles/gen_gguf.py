"""Writes fixtures/gguf/gguf_py.gguf with gguf-py (the reference GGUF writer) and
fixtures/gguf/gguf_py.json describing what it holds, so the Rust reader can be checked
against an independent writer: every value type, nested arrays, a non-default alignment
and tensors of several ggml types (raw pre-quantised Q8_0 / Q4_K bytes).

Run: /opt/oracle-venv/bin/python oracles/gen_gguf.py   (gguf==0.19.0, numpy)
"""
import json
import os

import gguf
import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "gguf")
os.makedirs(OUT, exist_ok=True)
path = os.path.join(OUT, "gguf_py.gguf")
rng = np.random.default_rng(20261125)

w = gguf.GGUFWriter(path, "deepseek4")  # writes general.architecture first
w.add_custom_alignment(64)
expect_kv = [("general.architecture", "string", "deepseek4"), ("general.alignment", "u32", 64)]


def kv(key, vtype, value, add):
    add(key, value)
    expect_kv.append((key, vtype, value))


kv("t.u8", "u8", 200, w.add_uint8)
kv("t.i8", "i8", -100, w.add_int8)
kv("t.u16", "u16", 60000, w.add_uint16)
kv("t.i16", "i16", -30000, w.add_int16)
kv("t.u32", "u32", 4000000000, w.add_uint32)
kv("t.i32", "i32", -2000000000, w.add_int32)
kv("t.f32", "f32", 0.15625, w.add_float32)
kv("t.bool", "bool", True, w.add_bool)
kv("t.string", "string", "h\u00e9llo \uff5c\u2581 world", w.add_string)
kv("t.u64", "u64", 2**63 + 5, w.add_uint64)
kv("t.i64", "i64", -(2**62), w.add_int64)
kv("t.f64", "f64", -2.5e-300, w.add_float64)
w.add_key_value("t.arr_i32", [0, 0, 4, 128, -1], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
expect_kv.append(("t.arr_i32", "array[i32]", [0, 0, 4, 128, -1]))
w.add_key_value("t.arr_f32", [10.0, 0.5], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
expect_kv.append(("t.arr_f32", "array[f32]", [10.0, 0.5]))
kv("t.arr_str", "array[string]", ["a", "", "b c", "\u2581x"], w.add_array)
kv("t.arr_nested", "array[array]", [[1, 2], [3]], w.add_array)

tensors = []


def tensor(name, arr, raw_dtype=None):
    w.add_tensor(name, arr, raw_dtype=raw_dtype)
    data = np.ascontiguousarray(arr).tobytes()
    tensors.append({"name": name, "bytes_hex_prefix": data[:16].hex(), "n_bytes": len(data),
                    "fnv1a64": fnv(data)})


def fnv(b):
    h = 0xCBF29CE484222325
    for x in b:
        h ^= x
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


tensor("f32.vec", rng.standard_normal(7).astype(np.float32))
tensor("f16.mat", rng.standard_normal((3, 64)).astype(np.float16))
tensor("i32.ids", rng.integers(0, 16, (2, 5), dtype=np.int32))
# Raw quantised bytes: gguf-py takes the byte shape [rows, row_bytes].
tensor("q8_0.mat", rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8), gguf.GGMLQuantizationType.Q8_0)
tensor("q4_k.exps", rng.integers(0, 256, (2, 3, 144), dtype=np.uint8), gguf.GGMLQuantizationType.Q4_K)

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

# What gguf-py's own reader sees (dims in ggml order, types, absolute offsets).
r = gguf.GGUFReader(path)
for t, info in zip(tensors, r.tensors):
    assert t["name"] == info.name
    t["dims"] = [int(d) for d in info.shape]
    t["type"] = info.tensor_type.name
    t["offset"] = int(info.data_offset)
meta = {
    "made_by": f"oracles/gen_gguf.py, gguf {gguf.__version__ if hasattr(gguf, '__version__') else '0.19.0'}, numpy {np.__version__}",
    "file_bytes": os.path.getsize(path),
    "kv": [{"key": k, "type": t, "value": v} for k, t, v in expect_kv],
    "tensors": tensors,
}
with open(os.path.join(OUT, "gguf_py.json"), "w") as f:
    json.dump(meta, f, indent=1, ensure_ascii=False)
print("wrote", path, os.path.getsize(path), "bytes")
