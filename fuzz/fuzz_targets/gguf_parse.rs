//! Parser fuzz target: any bytes must parse or fail cleanly; whatever parses must have
//! in-bounds tensors and survive a writer → reader round trip unchanged.
//!
//! Run: `cargo +nightly fuzz run gguf_parse` from the repository root.

#![no_main]

use ds4_gguf::{GgufFile, GgufWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let mut writer = GgufWriter::new();
    for (key, value) in file.metadata() {
        let _ = value.to_string();
        writer.add_kv(key, value.clone());
    }
    for t in file.tensors() {
        assert!(t.offset.checked_add(t.n_bytes).is_some_and(|end| end <= len));
        assert_eq!(t.offset % file.alignment(), file.data_offset() % file.alignment());
        let bytes = file.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.n_bytes);
        writer
            .add_tensor(&t.name, &t.dims, t.ggml_type, bytes.to_vec())
            .expect("accepted tensor rejected by writer");
    }
    let mut out = Vec::new();
    writer.write_to(&mut out).expect("accepted file cannot be rewritten");
    let again = GgufFile::from_bytes(out).expect("rewritten file does not parse");
    assert_eq!(format!("{:?}", file.metadata()), format!("{:?}", again.metadata()));
    assert_eq!(file.tensors().len(), again.tensors().len());
    for (a, b) in file.tensors().iter().zip(again.tensors()) {
        assert_eq!((&a.name, &a.dims, a.ggml_type), (&b.name, &b.dims, b.ggml_type));
        assert_eq!(file.tensor_data(a), again.tensor_data(b));
    }
});
