//! Writer → reader round trips of random files, and random corruption never panics.

#![allow(clippy::unwrap_used)]

use ds4_gguf::{GgmlType, GgufFile, GgufWriter, Value, ValueType};
use proptest::prelude::*;

fn scalar(ty: ValueType) -> BoxedStrategy<Value> {
    match ty {
        ValueType::U8 => any::<u8>().prop_map(Value::U8).boxed(),
        ValueType::I8 => any::<i8>().prop_map(Value::I8).boxed(),
        ValueType::U16 => any::<u16>().prop_map(Value::U16).boxed(),
        ValueType::I16 => any::<i16>().prop_map(Value::I16).boxed(),
        ValueType::U32 => any::<u32>().prop_map(Value::U32).boxed(),
        ValueType::I32 => any::<i32>().prop_map(Value::I32).boxed(),
        // Finite floats so PartialEq compares them (NaN != NaN).
        ValueType::F32 => (-1e30f32..1e30).prop_map(Value::F32).boxed(),
        ValueType::F64 => (-1e300f64..1e300).prop_map(Value::F64).boxed(),
        ValueType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ValueType::String => ".{0,12}".prop_map(Value::String).boxed(),
        ValueType::U64 => any::<u64>().prop_map(Value::U64).boxed(),
        ValueType::I64 => any::<i64>().prop_map(Value::I64).boxed(),
        ValueType::Array => Just(Value::array(ValueType::U8, vec![])).boxed(),
    }
}

const SCALARS: [ValueType; 12] = [
    ValueType::U8,
    ValueType::I8,
    ValueType::U16,
    ValueType::I16,
    ValueType::U32,
    ValueType::I32,
    ValueType::F32,
    ValueType::Bool,
    ValueType::String,
    ValueType::U64,
    ValueType::I64,
    ValueType::F64,
];

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop::sample::select(SCALARS.to_vec()).prop_flat_map(scalar);
    let flat_array = prop::sample::select(SCALARS.to_vec()).prop_flat_map(|ty| {
        prop::collection::vec(scalar(ty), 0..6).prop_map(move |items| Value::array(ty, items))
    });
    // Arrays of arrays (of one item type each) exercise nesting.
    let nested = prop::collection::vec(flat_array.clone(), 0..3)
        .prop_map(|items| Value::array(ValueType::Array, items));
    prop_oneof![leaf, flat_array, nested]
}

const TYPES: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
    GgmlType::I32,
    GgmlType::I8,
];

#[derive(Debug, Clone)]
struct Spec {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    seed: u8,
}

fn tensor() -> impl Strategy<Value = Spec> {
    (
        "[a-z.]{1,10}",
        prop::sample::select(TYPES.to_vec()),
        1u64..3,
        prop::collection::vec(1u64..4, 0..3),
        any::<u8>(),
    )
        .prop_map(|(name, ty, blocks, rest, seed)| {
            let mut dims = vec![blocks * ty.block_elems()];
            dims.extend(rest);
            Spec {
                name,
                dims,
                ty,
                seed,
            }
        })
}

fn bytes_of(spec: &Spec) -> Vec<u8> {
    let mut n = spec.ty.row_bytes(spec.dims[0]).unwrap();
    for d in &spec.dims[1..] {
        n *= d;
    }
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(spec.seed))
        .collect()
}

fn build(meta: &[(String, Value)], tensors: &[Spec], alignment: Option<u32>) -> Vec<u8> {
    let mut w = GgufWriter::new();
    if let Some(a) = alignment {
        w.add_kv("general.alignment", Value::U32(a));
    }
    for (k, v) in meta {
        w.add_kv(k, v.clone());
    }
    for t in tensors {
        w.add_tensor(&t.name, &t.dims, t.ty, bytes_of(t)).unwrap();
    }
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

fn unique_by_name<T: Clone>(items: Vec<(String, T)>) -> Vec<(String, T)> {
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn write_then_read(
        meta in prop::collection::vec(("[a-z.]{1,12}", value()), 0..8),
        tensors in prop::collection::vec(tensor(), 0..6),
        alignment in prop::option::of(prop::sample::select(vec![1u32, 8, 32, 64, 100])),
    ) {
        let meta: Vec<(String, Value)> = unique_by_name(meta)
            .into_iter()
            .filter(|(k, _)| k != "general.alignment")
            .collect();
        let tensors: Vec<Spec> = unique_by_name(tensors.into_iter().map(|t| (t.name.clone(), t)).collect())
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let bytes = build(&meta, &tensors, alignment);
        let f = GgufFile::from_bytes(bytes).unwrap();
        let align = u64::from(alignment.unwrap_or(32));
        prop_assert_eq!(f.alignment(), align);
        prop_assert_eq!(f.data_offset() % align, 0);
        let got: Vec<&(String, Value)> = f.metadata().iter().filter(|(k, _)| k != "general.alignment").collect();
        prop_assert_eq!(got.len(), meta.len());
        for ((gk, gv), (k, v)) in got.into_iter().zip(&meta) {
            prop_assert_eq!(gk, k);
            prop_assert_eq!(gv, v);
            prop_assert_eq!(f.get(k), Some(v));
        }
        prop_assert_eq!(f.tensors().len(), tensors.len());
        for (info, spec) in f.tensors().iter().zip(&tensors) {
            prop_assert_eq!(&info.name, &spec.name);
            prop_assert_eq!(&info.dims, &spec.dims);
            prop_assert_eq!(info.ggml_type, spec.ty);
            prop_assert_eq!(info.n_elements, spec.dims.iter().product::<u64>());
            prop_assert_eq!(info.offset % align, 0);
            prop_assert_eq!(f.tensor_data(info), &bytes_of(spec)[..]);
            prop_assert_eq!(f.tensor(&spec.name), Some(info));
        }
    }

    #[test]
    fn corrupted_files_never_panic(
        meta in prop::collection::vec(("[a-z.]{1,12}", value()), 0..5),
        tensors in prop::collection::vec(tensor(), 1..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let meta = unique_by_name(meta);
        let tensors: Vec<Spec> = unique_by_name(tensors.into_iter().map(|t| (t.name.clone(), t)).collect())
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let mut bytes = build(&meta, &tensors, None);
        for (at, b) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *b;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let len = bytes.len() as u64;
        if let Ok(f) = GgufFile::from_bytes(bytes) {
            // Whatever was accepted is internally consistent.
            for t in f.tensors() {
                prop_assert!(t.offset + t.n_bytes <= len);
                prop_assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error(
        meta in prop::collection::vec(("[a-z.]{1,12}", value()), 0..4),
        tensors in prop::collection::vec(tensor(), 1..3),
    ) {
        let meta = unique_by_name(meta);
        let tensors: Vec<Spec> = unique_by_name(tensors.into_iter().map(|t| (t.name.clone(), t)).collect())
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let bytes = build(&meta, &tensors, None);
        let last_end = tensors.iter().map(bytes_of).map(|b| b.len()).sum::<usize>();
        prop_assert!(GgufFile::from_bytes(bytes.clone()).is_ok());
        // Cutting anywhere before the end of the last tensor's data must fail.
        let must_fail = bytes.len() - (bytes.len() - last_end).min(bytes.len());
        for n in (0..bytes.len()).step_by(7) {
            let r = GgufFile::from_bytes(bytes[..n].to_vec());
            if n < must_fail.min(24) {
                prop_assert!(r.is_err());
            }
            if let Err(e) = r {
                prop_assert!(!e.to_string().contains('\n'));
            }
        }
    }
}

#[test]
fn write_file_is_atomic_and_readable() {
    let dir = std::env::temp_dir().join(format!("ds4-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("x.gguf");
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::String("deepseek4".into()));
    w.add_tensor("a", &[32, 2], GgmlType::Q8_0, vec![7; 68])
        .unwrap();
    w.add_tensor("b", &[3], GgmlType::F32, vec![1; 12]).unwrap();
    w.write_file(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "deepseek4");
    assert_eq!(f.tensor_data(f.tensor("a").unwrap()), &[7u8; 68][..]);
    assert_eq!(f.tensor_data(f.tensor("b").unwrap()), &[1u8; 12][..]);
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new();
    assert!(
        w.add_tensor("a", &[32], GgmlType::Q8_0, vec![0; 33])
            .is_err()
    );
    assert!(
        w.add_tensor("a", &[33], GgmlType::Q8_0, vec![0; 34])
            .is_err()
    );
    assert!(w.add_tensor("a", &[], GgmlType::F32, vec![]).is_err());
    w.add_tensor("a", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    assert!(w.add_tensor("a", &[1], GgmlType::F32, vec![0; 4]).is_err());
    w.add_kv("bad", Value::array(ValueType::U32, vec![Value::I32(1)]));
    assert!(w.write_to(Vec::new()).is_err());
}
