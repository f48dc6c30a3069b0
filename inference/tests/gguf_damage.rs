//! Untrusted GGUF files: the real model with damage in its header loads or fails with an
//! error, never a panic or an abort.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use proptest::prelude::*;
use soma_inference::{DeviceChoice, GenerationModel, GeneratorOptions};

/// Where the tensor infos and metadata of the real file are: its first bytes.
const HEADER: usize = 8 * 1024;

fn load(bytes: &[u8]) -> Result<GenerationModel, soma_inference::Error> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, bytes).unwrap();
    GenerationModel::load(
        &path,
        &DeviceChoice::Cpu.device().unwrap(),
        &GeneratorOptions::default(),
    )
}

fn original() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(common::smollm_path()).unwrap())
}

#[test]
fn a_truncated_model_is_an_error_naming_the_file() {
    let bytes = original();
    for cut in [0, 3, 24, 100, HEADER, bytes.len() / 2, bytes.len() - 1] {
        let e = load(&bytes[..cut])
            .err()
            .unwrap_or_else(|| panic!("cut at {cut} loaded"));
        assert!(e.to_string().contains("m.gguf"), "cut at {cut}: {e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn damage_in_the_header_is_an_answer_not_a_panic(
        flips in proptest::collection::vec((0usize..HEADER, any::<u8>()), 1..6),
    ) {
        let mut bytes = original().to_vec();
        for (at, v) in flips {
            bytes[at] = v;
        }
        let _ = load(&bytes);
    }
}
