//! The journal contract on the sled backend, plus what only a disk can show: reopening and
//! damage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use soma_supervision::{Append, Durability, Error, Journal, SledJournal, SledOptions, contract};

/// Journals of one contract run: each fresh one in its own directory, and the crash hook.
struct Harness {
    options: fn(&std::path::Path) -> SledOptions,
    dirs: Mutex<Vec<tempfile::TempDir>>,
    /// Each open journal, by the handle the contract holds (a freed handle's address may be
    /// reused: compare live handles, never addresses).
    open: Mutex<Vec<(std::sync::Weak<dyn Journal>, SledJournal)>>,
}

impl Harness {
    fn new(options: fn(&std::path::Path) -> SledOptions) -> Self {
        Self {
            options,
            dirs: Mutex::new(Vec::new()),
            open: Mutex::new(Vec::new()),
        }
    }

    fn open(&self, path: &std::path::Path) -> Arc<dyn Journal> {
        let j = SledJournal::open((self.options)(path)).unwrap();
        let shared: Arc<dyn Journal> = Arc::new(j.clone());
        self.open.lock().unwrap().push((Arc::downgrade(&shared), j));
        shared
    }

    async fn fresh(&self) -> Arc<dyn Journal> {
        let dir = tempfile::tempdir().unwrap();
        let j = self.open(&dir.path().join("j"));
        self.dirs.lock().unwrap().push(dir);
        j
    }

    /// Crashes the journal (nothing flushed or marked on the way out) and reopens it.
    async fn crash(&self, j: Arc<dyn Journal>) -> Arc<dyn Journal> {
        let sled = {
            let mut open = self.open.lock().unwrap();
            let i = open
                .iter()
                .position(|(w, _)| w.upgrade().is_some_and(|live| Arc::ptr_eq(&live, &j)))
                .unwrap();
            open.remove(i).1
        };
        sled.crash();
        let path = sled.path().to_path_buf();
        drop(j);
        drop(sled);
        self.open(&path)
    }
}

#[tokio::test]
async fn sled_journal_passes_the_contract() {
    let h = Harness::new(|path| SledOptions::new(path));
    contract::run(|| h.fresh(), |j| h.crash(j)).await;
}

#[tokio::test]
async fn sled_journal_in_periodic_mode_passes_the_contract() {
    let h = Harness::new(|path| {
        let mut options = SledOptions::new(path);
        options.durability = Durability::Periodic { interval_ms: 5 };
        options
    });
    contract::run(|| h.fresh(), |j| h.crash(j)).await;
}

#[tokio::test]
async fn sled_journal_with_one_range_and_small_segments_passes_the_contract() {
    let h = Harness::new(|path| {
        let mut options = SledOptions::new(path);
        options.ranges = 1;
        options.segment_bytes = 4096;
        options
    });
    contract::run(|| h.fresh(), |j| h.crash(j)).await;
}

#[tokio::test]
async fn periodic_mode_keeps_appends_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let mut options = SledOptions::new(&path);
    options.durability = Durability::Periodic { interval_ms: 5 };
    {
        let j = SledJournal::open(options.clone()).unwrap();
        append(&j, &[("k", b"1"), ("k", b"2")]).await;
    }
    let j = SledJournal::open(options).unwrap();
    assert_eq!(j.pending("k", 1, 10).await.unwrap().len(), 2);
}

#[test]
fn zero_periodic_interval_is_refused_naming_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = SledOptions::new(dir.path().join("j"));
    options.durability = Durability::Periodic { interval_ms: 0 };
    let e = SledJournal::open(options).unwrap_err();
    assert!(
        e.to_string().contains("journal.durability.interval_ms"),
        "{e}"
    );
}

/// Appends `(key, payload)`s, holding their ranges first.
async fn append(j: &SledJournal, items: &[(&str, &[u8])]) -> Vec<u64> {
    let keys: Vec<&str> = items.iter().map(|(k, _)| *k).collect();
    let held = contract::hold(j, &keys).await;
    let batch: Vec<Append> = items
        .iter()
        .map(|(k, p)| contract::app(j, &held, k, p))
        .collect();
    j.append(&batch).await.unwrap()
}

#[tokio::test]
async fn appends_survive_reopen_and_sequences_continue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let j = SledJournal::open(SledOptions::new(&path)).unwrap();
        append(&j, &[("k", b"1"), ("k", b"2")]).await;
    }
    let j = SledJournal::open(SledOptions::new(&path)).unwrap();
    assert_eq!(j.pending("k", 1, 10).await.unwrap().len(), 2);
    assert_eq!(append(&j, &[("k", b"3")]).await, vec![3]);
}

fn open_error(path: &std::path::Path) -> Error {
    match SledJournal::open(SledOptions::new(path)) {
        Ok(_) => panic!("opening {} should fail", path.display()),
        Err(e) => e,
    }
}

fn assert_corrupt_names_path(e: &Error, path: &std::path::Path) {
    let text = e.to_string();
    assert!(
        matches!(e, Error::Corrupt { .. }),
        "expected Corrupt, got {e:?}"
    );
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn a_file_instead_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    std::fs::write(&path, b"hello").unwrap();
    let e = open_error(&path);
    assert_corrupt_names_path(&e, &path);
    assert!(e.to_string().contains("not a directory"), "{e}");
}

#[test]
fn a_foreign_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("db"), b"not sled").unwrap();
    let e = open_error(&path);
    assert_corrupt_names_path(&e, &path);
    assert!(e.to_string().contains("SOMA_JOURNAL is missing"), "{e}");
}

async fn filled_journal(path: &std::path::Path) {
    let j = SledJournal::open(SledOptions::new(path)).unwrap();
    for i in 0..200u32 {
        let payload = vec![i as u8; 512];
        append(&j, &[(&format!("k{}", i % 7), &payload)]).await;
    }
}

/// The inbox segment holding the filled journal's messages.
fn segment(path: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(path.join("inbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .expect("a non-empty segment")
}

fn garble(file: &std::path::Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len / 8..] {
        *b ^= 0x5a;
    }
    std::fs::write(file, &bytes).unwrap();
}

fn truncate(file: &std::path::Path) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.set_len(64).unwrap();
}

#[tokio::test]
async fn a_garbled_inbox_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    filled_journal(&path).await;
    garble(&segment(&path));
    let e = open_and_read(&path).await;
    assert_corrupt_names_path(&e, &path);
}

#[tokio::test]
async fn a_truncated_inbox_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    filled_journal(&path).await;
    truncate(&segment(&path));
    let e = open_and_read(&path).await;
    assert_corrupt_names_path(&e, &path);
}

#[tokio::test]
async fn a_garbled_state_store_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    filled_journal(&path).await;
    garble(&path.join("state").join("db"));
    let e = open_and_read(&path).await;
    assert_corrupt_names_path(&e, &path);
}

#[tokio::test]
async fn a_truncated_state_store_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    filled_journal(&path).await;
    truncate(&path.join("state").join("db"));
    let e = open_and_read(&path).await;
    assert_corrupt_names_path(&e, &path);
}

/// Opens and reads everything back; the first error found.
async fn open_and_read(path: &std::path::Path) -> Error {
    let j = match SledJournal::open(SledOptions::new(path)) {
        Ok(j) => j,
        Err(e) => return e,
    };
    for k in 0..7 {
        let key = format!("k{k}");
        match j.pending(&key, 1, 1000).await {
            Err(e) => return e,
            Ok(entries) if entries.len() < 200 / 7 => {
                panic!("damage went unnoticed: {key} has {} entries", entries.len())
            }
            Ok(_) => {}
        }
    }
    panic!("damage went unnoticed")
}

/// The inbox segment files of the journal at `path`.
fn segments(path: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(path.join("inbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_rolled_segment_leaves_the_disk_once_its_messages_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let j = SledJournal::open(SledOptions::new(&path)).unwrap();
    append(&j, &[("k", b"secret-1"), ("k", b"secret-2")]).await;
    let first = segments(&path);
    assert_eq!(first.len(), 1, "{first:?}");
    let held = contract::hold(&j, &["k"]).await;
    for seq in 1..=2 {
        j.commit(contract::commit(&j, &held, "k", seq, b"s"))
            .await
            .unwrap();
    }
    j.flush().await.unwrap();
    assert_eq!(
        segments(&path),
        first,
        "the active segment stays until it rolls"
    );
    j.roll().await.unwrap();
    j.flush().await.unwrap();
    let after = segments(&path);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, first, "the handled segment is deleted");
    // Rolling an empty segment does nothing; the journal reopens and goes on.
    j.roll().await.unwrap();
    assert_eq!(segments(&path), after);
    drop(j);
    let j = SledJournal::open(SledOptions::new(&path)).unwrap();
    assert_eq!(append(&j, &[("k", b"3")]).await, vec![3]);
}
