//! Hand-built malformed files: each must give its specific error, never a panic.

#![allow(clippy::unwrap_used)]

use ds4_gguf::{Error, GgmlType, GgufFile, GgufWriter, Value, ValueType};

/// Raw little-endian byte builder for GGUF files (independent of the crate's writer).
#[derive(Default, Clone)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(n_tensors: u64, n_kv: u64) -> Raw {
        Raw::default()
            .u32(0x4655_4747)
            .u32(3)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn u8(mut self, v: u8) -> Raw {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(self, s: &str) -> Raw {
        self.bytes_str(s.as_bytes())
    }
    fn bytes_str(mut self, s: &[u8]) -> Raw {
        self.0.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.0.extend_from_slice(s);
        self
    }
    fn kv_u32(self, key: &str, v: u32) -> Raw {
        self.str(key).u32(4).u32(v)
    }
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.str(name).u32(dims.len() as u32);
        for d in dims {
            r = r.u64(*d);
        }
        r.u32(ty).u64(offset)
    }
    fn pad_to(mut self, align: usize) -> Raw {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    fn zeros(mut self, n: usize) -> Raw {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn parse(self) -> ds4_gguf::Result<GgufFile> {
        GgufFile::from_bytes(self.0)
    }
}

fn err(raw: Raw) -> Error {
    let e = raw.parse().expect_err("hostile file accepted");
    // Every message is one readable line.
    let msg = e.to_string();
    assert!(!msg.contains('\n') && !msg.is_empty(), "{msg:?}");
    e
}

#[test]
fn minimal_valid_file() {
    let f = Raw::header(1, 1)
        .kv_u32("a.b", 7)
        .tensor("t", &[4], GgmlType::F32.id(), 0)
        .pad_to(32)
        .zeros(16)
        .parse()
        .unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.get_u32("a.b").unwrap(), 7);
    let t = f.tensor("t").unwrap();
    assert_eq!(t.offset, f.data_offset());
    assert_eq!(t.n_bytes, 16);
    assert_eq!(f.tensor_data(t).len(), 16);
}

#[test]
fn empty_and_short_files_are_truncated() {
    for n in 0..24 {
        let bytes = Raw::header(0, 0).0[..n].to_vec();
        match GgufFile::from_bytes(bytes) {
            Err(Error::Truncated { offset, .. }) => assert!(offset <= n as u64),
            other => panic!("{n} bytes: {other:?}"),
        }
    }
    assert!(Raw::header(0, 0).parse().is_ok());
}

#[test]
fn truncation_names_the_field() {
    let e = err(Raw::header(0, 1).str("key").u32(4).u8(1));
    let msg = e.to_string();
    assert!(matches!(e, Error::Truncated { .. }));
    assert!(
        msg.contains("u32 value") && msg.contains("\"key\"") && msg.contains("offset 39"),
        "{msg}"
    );
}

#[test]
fn bad_magic() {
    let e = err(Raw::default().u32(0x4655_4746).u32(3).u64(0).u64(0));
    assert!(matches!(e, Error::BadMagic { found: 0x4655_4746 }), "{e}");
}

#[test]
fn wrong_version() {
    for v in [1, 2, 4, u32::MAX] {
        let e = err(Raw::default().u32(0x4655_4747).u32(v).u64(0).u64(0));
        assert!(matches!(e, Error::Version(x) if x == v), "{e}");
    }
}

#[test]
fn absurd_counts() {
    let e = err(Raw::header(0, u64::MAX));
    assert!(
        matches!(
            e,
            Error::AbsurdCount {
                what: "metadata",
                ..
            }
        ),
        "{e}"
    );
    let e = err(Raw::header(0, 1_000_000).kv_u32("x", 1));
    assert!(
        matches!(
            e,
            Error::AbsurdCount {
                what: "metadata",
                ..
            }
        ),
        "{e}"
    );
    let e = err(Raw::header(u64::MAX / 2, 0).zeros(64));
    assert!(
        matches!(e, Error::AbsurdCount { what: "tensor", .. }),
        "{e}"
    );
    // Array length that cannot fit.
    let e = err(Raw::header(0, 1)
        .str("arr")
        .u32(9)
        .u32(4)
        .u64(1 << 40)
        .zeros(16));
    assert!(
        matches!(
            e,
            Error::AbsurdCount {
                what: "array item",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn absurd_string_lengths() {
    let e = err(Raw::header(0, 1).u64(u64::MAX).zeros(8));
    assert!(
        matches!(e, Error::AbsurdString { len: u64::MAX, .. }),
        "{e}"
    );
    let e = err(Raw::header(0, 1).str("k").u32(8).u64(1 << 50).zeros(8));
    assert!(matches!(e, Error::AbsurdString { .. }), "{e}");
    assert!(e.to_string().contains("\"k\""), "{e}");
    let e = err(Raw::header(1, 0).u64(100).zeros(40));
    assert!(
        matches!(
            e,
            Error::AbsurdString {
                what: "tensor name",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn invalid_utf8() {
    let e = err(Raw::header(0, 1).bytes_str(&[0xff, 0xfe]).u32(4).u32(0));
    assert!(matches!(e, Error::InvalidUtf8 { .. }), "{e}");
}

#[test]
fn nesting_limit() {
    let nested = |depth: usize| {
        let mut r = Raw::header(0, 1).str("n");
        r = r.u32(9); // value type: array
        for _ in 1..depth {
            r = r.u32(9).u64(1); // array of one array
        }
        r.u32(4).u64(1).u32(42) // innermost: one u32
    };
    let f = nested(8).parse().unwrap();
    let mut v = f.get("n").unwrap();
    for _ in 1..8 {
        v = &v.as_array().unwrap().1[0];
    }
    assert_eq!(v.as_array().unwrap().1, &[Value::U32(42)]);
    let e = err(nested(9));
    assert!(matches!(e, Error::NestingTooDeep { max: 8, .. }), "{e}");
}

#[test]
fn unknown_value_type() {
    let e = err(Raw::header(0, 1).str("k").u32(13).u32(0));
    assert!(
        matches!(e, Error::UnknownValueType { type_id: 13, .. }),
        "{e}"
    );
    let e = err(Raw::header(0, 1).str("k").u32(9).u32(77).u64(0));
    assert!(
        matches!(e, Error::UnknownValueType { type_id: 77, .. }),
        "{e}"
    );
}

#[test]
fn invalid_bool() {
    let e = err(Raw::header(0, 1).str("b").u32(7).u8(2));
    assert!(matches!(e, Error::InvalidBool { byte: 2, .. }), "{e}");
}

#[test]
fn duplicate_keys() {
    let e = err(Raw::header(0, 2).kv_u32("k", 1).kv_u32("k", 2));
    assert!(matches!(e, Error::DuplicateKey(ref k) if k == "k"), "{e}");
}

#[test]
fn alignment_key() {
    let f = Raw::header(1, 1)
        .kv_u32("general.alignment", 64)
        .tensor("t", &[1], 0, 0)
        .pad_to(64)
        .zeros(64)
        .parse()
        .unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    let e = err(Raw::header(0, 1).kv_u32("general.alignment", 0));
    assert!(matches!(e, Error::BadAlignment(_)), "{e}");
    let e = err(Raw::header(0, 1).str("general.alignment").u32(10).u64(32));
    assert!(matches!(e, Error::BadAlignment(_)), "{e}");
}

#[test]
fn dim_count_out_of_range() {
    for n in [0u32, 9, u32::MAX] {
        let e = err(Raw::header(1, 0).str("t").u32(n).zeros(128));
        assert!(
            matches!(e, Error::BadDimCount { n_dims, .. } if n_dims == n),
            "{e}"
        );
    }
}

#[test]
fn dims_overflow() {
    let e = err(Raw::header(1, 0)
        .tensor("t", &[1 << 32, 1 << 32], 0, 0)
        .zeros(32));
    assert!(matches!(e, Error::DimsOverflow { .. }), "{e}");
    // Element count fits but the byte count does not.
    let e = err(Raw::header(1, 0)
        .tensor("t", &[1 << 31, 1 << 31], 0, 0)
        .zeros(32));
    assert!(matches!(e, Error::DimsOverflow { .. }), "{e}");
}

#[test]
fn unknown_tensor_type() {
    let e = err(Raw::header(1, 0).tensor("t", &[32], 4, 0).zeros(64));
    assert!(
        matches!(e, Error::UnknownTensorType { type_id: 4, .. }),
        "{e}"
    );
}

#[test]
fn row_not_whole_blocks() {
    let e = err(Raw::header(1, 0)
        .tensor("t", &[33], GgmlType::Q8_0.id(), 0)
        .zeros(64));
    assert!(matches!(e, Error::NotBlockMultiple { ne0: 33, .. }), "{e}");
}

#[test]
fn tensor_past_eof() {
    let e = err(Raw::header(1, 0)
        .tensor("t", &[16], 0, 0)
        .pad_to(32)
        .zeros(63));
    assert!(matches!(e, Error::TensorPastEof { .. }), "{e}");
    let e = err(Raw::header(1, 0)
        .tensor("t", &[16], 0, u64::MAX - 31)
        .pad_to(32)
        .zeros(64));
    assert!(matches!(e, Error::TensorPastEof { .. }), "{e}");
}

#[test]
fn overlapping_tensors() {
    let e = err(Raw::header(2, 0)
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[16], 0, 32)
        .pad_to(32)
        .zeros(128));
    assert!(matches!(e, Error::OverlappingTensors { .. }), "{e}");
    // Adjacent is fine.
    Raw::header(2, 0)
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[16], 0, 64)
        .pad_to(32)
        .zeros(128)
        .parse()
        .unwrap();
}

#[test]
fn misaligned_offset() {
    let e = err(Raw::header(1, 0)
        .tensor("t", &[1], 0, 4)
        .pad_to(32)
        .zeros(64));
    assert!(
        matches!(
            e,
            Error::MisalignedTensor {
                offset: 4,
                alignment: 32,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn duplicate_tensor_names() {
    let e = err(Raw::header(2, 0)
        .tensor("a", &[8], 0, 0)
        .tensor("a", &[8], 0, 32)
        .pad_to(32)
        .zeros(64));
    assert!(
        matches!(e, Error::DuplicateTensor(ref n) if n == "a"),
        "{e}"
    );
}

#[test]
fn strict_getters() {
    let mut w = GgufWriter::new();
    w.add_kv("u32", Value::U32(5));
    w.add_kv("i32", Value::I32(-5));
    w.add_kv("u64", Value::U64(1 << 40));
    w.add_kv("f64", Value::F64(0.5));
    w.add_kv("bool", Value::Bool(true));
    w.add_kv("u8", Value::U8(1));
    w.add_kv("s", Value::String("x".into()));
    w.add_kv(
        "ss",
        Value::array(
            ValueType::String,
            vec![Value::String("a".into()), Value::String("b c".into())],
        ),
    );
    w.add_kv(
        "neg",
        Value::array(ValueType::I32, vec![Value::I32(4), Value::I32(-1)]),
    );
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let f = GgufFile::from_bytes(bytes).unwrap();

    assert_eq!(f.get_u32("u32").unwrap(), 5);
    assert!(matches!(f.get_u32("i32"), Err(Error::KeyType { .. })));
    assert!(matches!(f.get_u32("u64"), Err(Error::KeyType { .. })));
    assert!(matches!(f.get_u32("missing"), Err(Error::MissingKey(_))));
    assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
    assert_eq!(f.get_u64("u32").unwrap(), 5);
    assert!(f.get_u64("i32").is_err());
    assert_eq!(f.get_f32("f64").unwrap(), 0.5);
    assert_eq!(f.get_f32("u32").unwrap(), 5.0);
    assert_eq!(f.get_f32("i32").unwrap(), -5.0);
    assert!(f.get_f32("u64").is_err());
    assert!(f.get_f32("bool").is_err());
    assert!(f.get_bool("bool").unwrap());
    assert!(f.get_bool("u8").is_err());
    assert_eq!(f.get_str("s").unwrap(), "x");
    assert_eq!(f.get_str_array("ss").unwrap(), vec!["a", "b c"]);
    assert!(f.get_str_array("s").is_err());
    let e = f.get_u32_array("neg").unwrap_err();
    assert!(
        matches!(
            e,
            Error::NegativeItem {
                index: 1,
                value: -1,
                ..
            }
        ),
        "{e}"
    );
    let e = f.get_u32("i32").unwrap_err().to_string();
    assert!(e.contains("\"i32\"") && e.contains("expected u32"), "{e}");
}
