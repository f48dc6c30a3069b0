//! Damage after a crash: a child process appends (and commits some) with small segments and
//! is SIGKILLed mid-work; then each kind of damage is applied to a copy of what it left, and
//! opening the copy must fail naming the damaged file. The undamaged copy opens and holds
//! every acknowledged message: the checks fire on damage, not on crashes. `check` reports
//! the same damage and `salvage` copies out what is readable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use soma_supervision::{
    Append, Bytes, Commit, Error, Journal, KeyRange, SledJournal, SledOptions, check, salvage,
};

const CHILD_DIR: &str = "SOMA_JOURNAL_CHILD_DIR";
const KEYS: u64 = 5;

fn options(path: &Path) -> SledOptions {
    let mut o = SledOptions::new(path);
    o.ranges = 4;
    o.segment_bytes = 16 * 1024;
    o
}

/// The child: appends batches of ten messages over five keys, printing `ack KEY SEQ` for
/// each once durable, and commits key k0 now and then. Killed by its parent.
#[tokio::test]
#[ignore = "child process of the damage tests; run by them"]
async fn child_appender() {
    let dir = std::env::var_os(CHILD_DIR)
        .unwrap_or_else(|| panic!("{CHILD_DIR} is not set: run the damage tests instead"));
    let j = SledJournal::open(options(Path::new(&dir))).unwrap();
    let mut epochs = BTreeMap::new();
    for r in 0..j.ranges() {
        epochs.insert(r, j.acquire(KeyRange(r)).await.unwrap());
    }
    let keys: Vec<Arc<str>> = (0..KEYS).map(|k| Arc::from(format!("k{k}"))).collect();
    let mut out = std::io::stdout().lock();
    let mut committed = 0;
    for round in 0u64.. {
        let batch: Vec<Append> = (0..10u64)
            .map(|i| {
                let key = keys[(i % KEYS) as usize].clone();
                Append {
                    epoch: epochs[&j.range_of(&key).0],
                    key,
                    payload: Bytes::from(vec![(round % 251) as u8; 100]),
                }
            })
            .collect();
        let seqs = j.append(&batch).await.unwrap();
        for (a, seq) in batch.iter().zip(&seqs) {
            writeln!(out, "ack {} {seq}", a.key).unwrap();
        }
        out.flush().unwrap();
        if round % 7 == 6 {
            let upto = seqs[0];
            j.commit(Commit {
                key: keys[0].clone(),
                from: committed + 1,
                seq: upto,
                state: upto.to_le_bytes().to_vec(),
                timers: Vec::new(),
                epoch: epochs[&j.range_of(&keys[0]).0],
            })
            .await
            .unwrap();
            committed = upto;
        }
        if round == 600 {
            // Pause with the marker current, still unclean: the parent kills us here.
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            writeln!(out, "idle").unwrap();
            out.flush().unwrap();
        }
    }
}

/// Runs the child until it is idle after 6,000 acknowledged messages, SIGKILLs it, returns
/// the journal it left and the highest acknowledged seq per key.
fn crashed_journal(root: &Path) -> (PathBuf, BTreeMap<String, u64>) {
    let path = root.join("crashed");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_appender",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, &path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked = BTreeMap::new();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines {
        let line = line.unwrap();
        if line == "idle" {
            break;
        }
        let mut w = line.split_whitespace();
        if w.next() == Some("ack") {
            let key = w.next().unwrap().to_string();
            let seq: u64 = w.next().unwrap().parse().unwrap();
            acked.insert(key, seq);
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child exited by itself before its SIGKILL"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(acked.values().sum::<u64>() >= 6_000, "{acked:?}");
    (path, acked)
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn segments(journal: &Path) -> Vec<PathBuf> {
    // Segments only: their index files (`.idx`) are accelerators, damaged in tests of their own.
    let mut s: Vec<PathBuf> = std::fs::read_dir(journal.join("inbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    s.sort();
    s
}

/// The live segment files holding data, oldest first.
fn data_segments(journal: &Path) -> Vec<PathBuf> {
    segments(journal)
        .into_iter()
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .collect()
}

fn flip_middle(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(file, bytes).unwrap();
}

fn truncate_half(file: &Path) {
    let len = std::fs::metadata(file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

fn assert_corrupt_naming(result: Result<SledJournal, Error>, file: &Path, case: &str) {
    match result {
        Ok(_) => panic!("{case}: damage went unnoticed"),
        Err(e) => {
            assert!(matches!(e, Error::Corrupt { .. }), "{case}: {e:?}");
            let text = e.to_string();
            assert!(
                text.contains(&file.display().to_string()),
                "{case}: the error does not name {}: {text}",
                file.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_after_a_crash_is_an_error_naming_the_file_never_a_silent_cut() {
    let root = tempfile::tempdir().unwrap();
    let (crashed, acked) = crashed_journal(root.path());
    assert!(
        data_segments(&crashed).len() >= 3,
        "small segments roll: {:?}",
        segments(&crashed)
    );

    // Undamaged: opens, says it crashed, holds every acknowledged message.
    let intact = root.path().join("intact");
    copy(&crashed, &intact);
    let j = SledJournal::open(options(&intact)).unwrap();
    assert!(j.recovered_from_crash());
    for (key, &last) in &acked {
        let applied = j.load(key).await.unwrap().applied;
        let pending = j.pending(key, 1, usize::MAX).await.unwrap();
        let seqs: Vec<u64> = pending.iter().map(|e| e.seq).collect();
        assert_eq!(seqs.first().copied(), Some(applied + 1), "{key}");
        assert!(
            seqs.last().copied().unwrap() >= last,
            "{key}: acked {last}, {seqs:?}"
        );
    }
    drop(j);
    let report = check(&crashed).unwrap();
    assert!(report.is_healthy(), "{report}");

    type Damage = fn(&Path) -> PathBuf;
    let cases: [(&str, Damage); 5] = [
        ("a flipped byte in a closed segment", |j| {
            let s = data_segments(j)[0].clone();
            flip_middle(&s);
            s
        }),
        ("a flipped byte in the newest segment", |j| {
            let s = data_segments(j).last().unwrap().clone();
            flip_middle(&s);
            s
        }),
        ("a closed segment truncated at half", |j| {
            let s = data_segments(j)[0].clone();
            truncate_half(&s);
            s
        }),
        ("the newest segment truncated at half", |j| {
            let s = data_segments(j).last().unwrap().clone();
            truncate_half(&s);
            s
        }),
        ("a closed segment deleted", |j| {
            let s = data_segments(j)[1].clone();
            std::fs::remove_file(&s).unwrap();
            s
        }),
    ];
    for (i, (case, damage)) in cases.iter().enumerate() {
        let copy_path = root.path().join(format!("case{i}"));
        copy(&crashed, &copy_path);
        let file = damage(&copy_path);
        assert_corrupt_naming(SledJournal::open(options(&copy_path)), &file, case);
        let report = check(&copy_path).unwrap();
        assert!(!report.is_healthy(), "{case}: check saw nothing\n{report}");
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains(&file.display().to_string())),
            "{case}: check does not name {}\n{report}",
            file.display()
        );
    }

    // Every segment deleted: the marker's active segment is missing.
    let all = root.path().join("all");
    copy(&crashed, &all);
    for s in segments(&all) {
        std::fs::remove_file(s).unwrap();
    }
    match SledJournal::open(options(&all)) {
        Ok(_) => panic!("every segment deleted went unnoticed"),
        Err(e) => assert!(e.to_string().contains("missing"), "{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salvage_copies_what_is_readable_and_reports_what_was_lost() {
    let root = tempfile::tempdir().unwrap();
    let (crashed, acked) = crashed_journal(root.path());
    let damaged = root.path().join("damaged");
    copy(&crashed, &damaged);
    // Bytes flipped across the oldest segment: some records of keys never committed die.
    let victim = data_segments(&damaged)[0].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    for i in 1..10 {
        let at = bytes.len() * i / 10;
        bytes[at] ^= 0x01;
    }
    std::fs::write(&victim, bytes).unwrap();
    assert!(SledJournal::open(options(&damaged)).is_err());
    let out = root.path().join("salvaged");
    let report = salvage(&damaged, &out).unwrap();
    assert!(!report.lost.is_empty(), "{report}");
    assert!(out.join("SALVAGE_REPORT").exists());
    // The salvaged journal opens, has no gaps, and holds all but what was reported lost.
    let mut o = options(&out);
    o.ranges = 4;
    let j = SledJournal::open(o).unwrap();
    let mut held = 0;
    for key in acked.keys() {
        let applied = j.load(key).await.unwrap().applied;
        let pending = j.pending(key, 1, usize::MAX).await.unwrap();
        if let Some(first) = pending.first() {
            assert_eq!(first.seq, applied + 1);
        }
        held += pending.len() as u64;
    }
    assert_eq!(held, report.messages);
    assert!(report.messages > 0);
    // The undamaged journal salvages to the same content, nothing lost.
    let clean_out = root.path().join("clean");
    let clean = salvage(&crashed, &clean_out).unwrap();
    assert!(clean.lost.is_empty(), "{clean}");
    assert!(clean.renumbered.is_empty(), "{clean}");
    assert!(clean.messages > report.messages);
}

/// The child of the first-open test: creates a journal (nothing else) and exits.
#[test]
#[ignore = "child process of a_first_open_killed_at_any_moment_opens_again; run by it"]
fn child_first_open() {
    let dir = std::env::var_os(CHILD_DIR).unwrap_or_else(|| panic!("{CHILD_DIR} is not set"));
    let j = SledJournal::open(options(Path::new(&dir))).unwrap();
    drop(j);
    std::thread::sleep(std::time::Duration::from_secs(5));
}

#[test]
fn a_first_open_killed_at_any_moment_opens_again() {
    let root = tempfile::tempdir().unwrap();
    // What a kill can leave, made by hand: only the temporary marker; a fresh marker and no
    // state store; a fresh marker with a state store that is not one.
    let tmp_only = root.path().join("tmp-only");
    std::fs::create_dir_all(&tmp_only).unwrap();
    std::fs::write(
        tmp_only.join("SOMA_JOURNAL.tmp"),
        b"soma-journal format 3\n",
    )
    .unwrap();
    let half_state = root.path().join("half-state");
    std::fs::create_dir_all(half_state.join("state")).unwrap();
    std::fs::write(
        half_state.join("SOMA_JOURNAL"),
        b"soma-journal format 3\nepoch 0\n",
    )
    .unwrap();
    std::fs::write(half_state.join("state").join("db"), b"half a sled").unwrap();
    std::fs::create_dir_all(half_state.join("inbox")).unwrap();
    std::fs::write(
        half_state.join("inbox").join("00000000000000000001.log"),
        b"",
    )
    .unwrap();
    for dir in [&tmp_only, &half_state] {
        let j =
            SledJournal::open(options(dir)).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(!j.recovered_from_crash(), "nothing was ever acknowledged");
    }
    // And real kills at moments spread over the first open.
    for i in 0..16u64 {
        let dir = root.path().join(format!("killed{i}"));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_first_open",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, &dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(i * 1_500));
        let _ = child.kill();
        child.wait().unwrap();
        if let Err(e) = SledJournal::open(options(&dir)) {
            panic!(
                "a first open killed after {} us left {}: {e}",
                i * 1_500,
                dir.display()
            );
        }
    }
}
