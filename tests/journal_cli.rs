//! `soma journal check` and `soma journal salvage` on a real journal: healthy, then damaged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use soma::supervision::{Journal, SledJournal, SledOptions};
use soma_supervision::contract;

fn soma(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_soma"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

async fn fill(path: &Path) {
    let j = SledJournal::open(SledOptions::new(path)).unwrap();
    let keys: Vec<String> = (0..4).map(|k| format!("reg\u{1f}k{k}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let held = contract::hold(&j, &refs).await;
    for i in 0..100u32 {
        let key = &keys[(i % 4) as usize];
        let payload = vec![i as u8; 200];
        j.append(&[contract::app(&j, &held, key, &payload)])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn check_reports_a_healthy_journal_then_names_the_damage_and_salvage_recovers_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    fill(&path).await;
    let p = path.to_str().unwrap();
    let (code, out) = soma(&["journal", "check", p]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pending: 100 messages for 4 keys"), "{out}");
    assert!(out.contains("ok: no damage found"), "{out}");

    let segment = std::fs::read_dir(path.join("inbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&segment, bytes).unwrap();

    let (code, out) = soma(&["journal", "check", p]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&segment.display().to_string()), "{out}");
    assert!(out.contains("damaged bytes at offsets"), "{out}");

    let new = dir.path().join("new");
    let (code, out) = soma(&["journal", "salvage", p, "--out", new.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("copied: 0 states, 99 pending messages"),
        "{out}"
    );
    assert!(new.join("SALVAGE_REPORT").exists());
    let (code, out) = soma(&["journal", "check", new.to_str().unwrap()]);
    assert_eq!(code, 0, "the salvaged journal is healthy: {out}");

    let (code, out) = soma(&["journal", "salvage", p, "--out", new.to_str().unwrap()]);
    assert_ne!(code, 0, "salvage never writes into a journal: {out}");
    assert!(out.contains("not empty"), "{out}");
}
