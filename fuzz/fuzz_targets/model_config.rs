//! Model-metadata fuzz target: whatever parses as GGUF goes through `Config::from_gguf`
//! and, when that succeeds, `validate_layout`; neither may panic.
//!
//! Run: `cargo +nightly fuzz run model_config` from the repository root.

#![no_main]

use ds4_gguf::GgufFile;
use ds4_model::config::Config;
use ds4_model::layout::validate_layout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    match Config::from_gguf(&file) {
        Ok(cfg) => {
            let _ = cfg.flash_mismatches();
            for issue in validate_layout(&file, &cfg) {
                let _ = issue.to_string();
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
