//! Shared by the inference benchmarks: model paths, the peer virtual environment, threads.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub(crate) fn models() -> PathBuf {
    std::env::var_os("SOMA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models"))
}

/// Runs a peer script with the peers' Python; `None` (and why) when it is not installed.
pub(crate) fn run_peer(script: &str, args: &[String]) -> Result<serde_json::Value, String> {
    let python = root().join("benches/peers/.venv/bin/python");
    if !python.exists() {
        return Err(format!(
            "{} is missing: run `bash benches/peers/install.sh`",
            python.display()
        ));
    }
    let out = Command::new(python)
        .arg(root().join("benches/peers").join(script))
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("{e}: {stdout}"))
}
