//! Episodic memory: the contract on the sled backend, and what only a disk can show.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use soma_adapters::{Entry, EpisodicMemory, Scope, SledEpisodic, episodic_contract};

#[tokio::test]
async fn sled_episodic_passes_the_contract() {
    let dirs = std::sync::Mutex::new(Vec::new());
    episodic_contract::run(|| {
        let dir = tempfile::tempdir().unwrap();
        let m = SledEpisodic::open(dir.path().join("episodic")).unwrap();
        dirs.lock().unwrap().push(dir);
        async move { Arc::new(m) as Arc<dyn EpisodicMemory> }
    })
    .await;
}

#[tokio::test]
async fn history_and_erasure_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("episodic");
    let keep = Scope::new("acme", "keep").unwrap();
    let gone = Scope::new("acme", "gone").unwrap();
    {
        let m = SledEpisodic::open(&path).unwrap();
        for (s, c) in [(&keep, "kept"), (&gone, "erased")] {
            m.append(
                s,
                Entry {
                    at_ms: 1,
                    role: "user".into(),
                    content: c.into(),
                    metadata: serde_json::Value::Null,
                },
            )
            .await
            .unwrap();
        }
        m.erase_session(&gone).await.unwrap();
    }
    let m = SledEpisodic::open(&path).unwrap();
    assert_eq!(m.last(&keep, 10).await.unwrap()[0].entry.content, "kept");
    assert!(m.last(&gone, 10).await.unwrap().is_empty());
}

#[test]
fn a_damaged_store_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("episodic");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("conf"), b"garbage that is not a sled config").unwrap();
    std::fs::write(path.join("db"), vec![0xa5u8; 4096]).unwrap();
    match SledEpisodic::open(&path) {
        Ok(_) => panic!("a damaged store opened"),
        Err(e) => assert!(e.to_string().contains(&path.display().to_string()), "{e}"),
    }
}
