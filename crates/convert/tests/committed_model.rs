//! `fixtures/models/tiny-b-q8_0.gguf` (the model the README serves) must be exactly what
//! `ds4 convert --from-hf fixtures/tiny-model/tiny-b/hf --type q8_0` writes today.

use std::path::Path;

use ds4_convert::{ConvertOptions, OutType, convert_hf_to_bytes};

#[test]
fn committed_tiny_model_is_a_fresh_conversion() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let committed =
        std::fs::read(root.join("models/tiny-b-q8_0.gguf")).expect("read committed model");
    let opts = ConvertOptions {
        out_type: OutType::Q8_0,
        name: Some("hf".into()),
    };
    let (fresh, _) =
        convert_hf_to_bytes(&root.join("tiny-model/tiny-b/hf"), &opts).expect("convert tiny-b");
    assert!(
        committed == fresh,
        "fixtures/models/tiny-b-q8_0.gguf is stale: regenerate it with \
         `ds4 convert --from-hf fixtures/tiny-model/tiny-b/hf --type q8_0 -o fixtures/models/tiny-b-q8_0.gguf`"
    );
}
