//! Unit tests of the inbox log: recovery, acknowledgement, and every kind of damage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::record::{Origin, encode_record, scan_segment, segment_path};
use super::recover::Recovered;
use super::*;

fn entry(key: &str, seq: Seq, payload: &[u8]) -> NewEntry {
    (
        Arc::from(key),
        seq,
        Origin::Send,
        Bytes::copy_from_slice(payload),
    )
}

fn fresh(dir: &Path) -> Inbox {
    Inbox::open(dir, &LogMarks::default(), SEGMENT_BYTES, |_| Ok(0))
        .unwrap()
        .0
}

fn open_with(dir: &Path, marks: &LogMarks, applied: Seq) -> Result<(Inbox, Recovered)> {
    Inbox::open(dir, marks, SEGMENT_BYTES, |_| Ok(applied))
}

/// Closes the inbox as a crash would (no further writes) and returns what the marker holds.
fn crash(inbox: Inbox) -> LogMarks {
    let marks = inbox.marks();
    drop(inbox);
    marks
}

fn err_text(r: Result<(Inbox, Recovered)>) -> String {
    match r {
        Ok(_) => panic!("damage went unnoticed"),
        Err(e) => {
            assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn appended_messages_are_recovered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox
        .append(
            &[
                entry("a", 1, b"x"),
                entry("b", 1, b"y"),
                entry("a", 2, b"z"),
            ],
            true,
        )
        .unwrap();
    let marks = crash(inbox);
    let (inbox, recovered) = open_with(dir.path(), &marks, 0).unwrap();
    assert!(recovered.unfinished.is_empty());
    assert_eq!(recovered.pending, 3);
    let a = inbox.pending("a", 1, 10).unwrap();
    assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(&*a[1].payload, b"z");
    assert_eq!(inbox.last_seq("b"), Some(1));
}

#[test]
fn acknowledged_messages_are_skipped_and_empty_segments_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox
        .append(&[entry("a", 1, b"x"), entry("a", 2, b"y")], true)
        .unwrap();
    let marks = crash(inbox);
    // The state store says a is applied up to 2: nothing is pending, the segment goes.
    let (inbox, _) = open_with(dir.path(), &marks, 2).unwrap();
    assert_eq!(inbox.len(), 0);
    let emptied = inbox.take_emptied();
    inbox.delete(&emptied).unwrap();
    assert_eq!(inbox.segments(), 1, "only the new active segment remains");
}

#[test]
fn emptied_segments_wait_for_delete() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox.append(&[entry("a", 1, b"x")], true).unwrap();
    {
        let mut st = inbox.state();
        inbox.roll(&mut st).unwrap();
    }
    assert_eq!(inbox.segments(), 2);
    inbox.ack("a", 1);
    let emptied = inbox.take_emptied();
    assert_eq!(emptied.len(), 1);
    assert_eq!(
        inbox.segments(),
        2,
        "not deleted before the acks are durable"
    );
    inbox.delete(&emptied).unwrap();
    assert_eq!(inbox.segments(), 1);
}

#[test]
fn payloads_dropped_from_memory_are_read_back_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox
        .append(&[entry("a", 1, b"first"), entry("b", 1, b"other")], true)
        .unwrap();
    {
        let mut st = inbox.state();
        inbox.roll(&mut st).unwrap();
    }
    inbox.append(&[entry("a", 2, b"second")], true).unwrap();
    let before = inbox.memory_bytes();
    assert_eq!(inbox.forget_payloads(|k| k == "a"), 11);
    assert_eq!(inbox.memory_bytes(), before - 11);
    let a = inbox.pending("a", 1, 10).unwrap();
    assert_eq!(&*a[0].payload, b"first");
    assert_eq!(&*a[1].payload, b"second");
}

#[test]
fn torn_tail_after_the_durable_position_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox.append(&[entry("a", 1, b"x")], true).unwrap();
    let marks = inbox.marks();
    inbox.append(&[entry("a", 2, b"y")], true).unwrap();
    drop(inbox);
    let (seg, _) = marks.active.unwrap();
    let path = segment_path(dir.path(), seg);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 3).unwrap();
    let (inbox, recovered) = open_with(dir.path(), &marks, 0).unwrap();
    assert_eq!(inbox.pending("a", 1, 10).unwrap().len(), 1);
    assert!(recovered.torn.is_some());
}

#[test]
fn damage_before_the_durable_position_is_an_error_naming_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox
        .append(&[entry("a", 1, b"xxxxxxxx"), entry("a", 2, b"y")], true)
        .unwrap();
    let marks = crash(inbox);
    let path = segment_path(dir.path(), marks.active.unwrap().0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[14] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let e = err_text(open_with(dir.path(), &marks, 0));
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(e.contains("offset 0"), "{e}");
}

#[test]
fn damage_followed_by_a_valid_record_is_corruption_even_after_the_durable_position() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox.append(&[entry("a", 1, b"x")], true).unwrap();
    let marks = inbox.marks(); // durable position: after the first record
    inbox
        .append(&[entry("a", 2, b"yyyyyyyy"), entry("a", 3, b"z")], true)
        .unwrap();
    drop(inbox);
    let path = segment_path(dir.path(), marks.active.unwrap().0);
    let first_end = marks.active.unwrap().1 as usize;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[first_end + 20] ^= 0xff; // inside record 2, record 3 intact after it
    std::fs::write(&path, &bytes).unwrap();
    let e = err_text(open_with(dir.path(), &marks, 0));
    assert!(e.contains("followed by a valid record"), "{e}");
    assert!(e.contains(&format!("offset {first_end}")), "{e}");
}

#[test]
fn a_segment_shorter_than_recorded_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox.append(&[entry("a", 1, &[7; 100])], true).unwrap();
    {
        let mut st = inbox.state();
        inbox.roll(&mut st).unwrap();
    }
    inbox.append(&[entry("a", 2, b"y")], true).unwrap();
    let marks = crash(inbox);
    let (&closed, &len) = marks.closed.iter().next().unwrap();
    let path = segment_path(dir.path(), closed);
    // Cut at a record boundary too: the recorded length still tells.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = err_text(open_with(dir.path(), &marks, 0));
    assert!(e.contains("truncated"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
}

#[test]
fn a_missing_segment_is_corruption() {
    for which in ["closed", "active", "every"] {
        let dir = tempfile::tempdir().unwrap();
        let inbox = fresh(dir.path());
        inbox.append(&[entry("a", 1, b"x")], true).unwrap();
        {
            let mut st = inbox.state();
            inbox.roll(&mut st).unwrap();
        }
        inbox.append(&[entry("a", 2, b"y")], true).unwrap();
        let marks = crash(inbox);
        let closed = *marks.closed.keys().next().unwrap();
        let active = marks.active.unwrap().0;
        match which {
            "closed" => std::fs::remove_file(segment_path(dir.path(), closed)).unwrap(),
            "active" => std::fs::remove_file(segment_path(dir.path(), active)).unwrap(),
            _ => {
                for id in [closed, active] {
                    std::fs::remove_file(segment_path(dir.path(), id)).unwrap();
                }
            }
        }
        let e = err_text(open_with(dir.path(), &marks, 0));
        assert!(e.contains("missing"), "{which}: {e}");
    }
}

#[test]
fn a_hole_in_newer_segments_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    let marks = inbox.marks(); // written before the rolls below
    for seq in 1..=3 {
        inbox.append(&[entry("a", seq, b"x")], true).unwrap();
        let mut st = inbox.state();
        inbox.roll(&mut st).unwrap();
    }
    drop(inbox);
    let middle = marks.active.unwrap().0 + 1;
    std::fs::remove_file(segment_path(dir.path(), middle)).unwrap();
    let e = err_text(open_with(dir.path(), &marks, 0));
    assert!(e.contains("hole"), "{e}");
}

#[test]
fn a_gap_in_a_keys_sequence_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox
        .append(&[entry("a", 1, b"x"), entry("a", 3, b"z")], true)
        .unwrap();
    let marks = crash(inbox);
    let e = err_text(open_with(dir.path(), &marks, 0));
    assert!(e.contains("messages 2..=2 are missing"), "{e}");
    // The committed state must be continued by the first pending message, too.
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox.append(&[entry("a", 5, b"x")], true).unwrap();
    let marks = crash(inbox);
    let e = err_text(open_with(dir.path(), &marks, 2));
    assert!(e.contains("messages 3..=4 are missing"), "{e}");
}

#[test]
fn leftovers_of_an_interrupted_deletion_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox.append(&[entry("a", 1, b"x")], true).unwrap();
    {
        let mut st = inbox.state();
        inbox.roll(&mut st).unwrap();
    }
    inbox.ack("a", 1);
    let emptied = inbox.take_emptied();
    // The marker stopped listing the segment, then the process died before unlinking it.
    let marks = inbox.marks_without(&emptied);
    drop(inbox);
    let (inbox, _) = open_with(dir.path(), &marks, 1).unwrap();
    assert_eq!(
        inbox.segments(),
        1 + 1,
        "the scanned active one and the new one"
    );
    assert!(!segment_path(dir.path(), emptied[0]).exists());
}

#[test]
fn a_first_open_cut_short_leaves_only_empty_segments_and_opens_again() {
    let dir = tempfile::tempdir().unwrap();
    drop(fresh(dir.path()));
    let (inbox, _) = open_with(dir.path(), &LogMarks::default(), 0).unwrap();
    inbox.append(&[entry("a", 1, b"x")], true).unwrap();
    drop(inbox);
    // Data but no log in the marker: not a crash of a first open.
    let e = err_text(open_with(dir.path(), &LogMarks::default(), 0));
    assert!(e.contains("marker records no log"), "{e}");
}

#[test]
fn origins_of_unacknowledged_messages_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox
        .append(
            &[(
                Arc::from("a"),
                1,
                Origin::Timer {
                    fire_at_ms: 5,
                    id: 9,
                },
                Bytes::from_static(b"t"),
            )],
            true,
        )
        .unwrap();
    let marks = crash(inbox);
    let (_, recovered) = open_with(dir.path(), &marks, 0).unwrap();
    assert_eq!(
        recovered.unfinished,
        vec![(
            Arc::from("a"),
            Origin::Timer {
                fire_at_ms: 5,
                id: 9
            }
        )]
    );
}

#[test]
fn scanning_handles_records_across_and_beyond_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let mut bytes = Vec::new();
    let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; i as usize * 7]).collect();
    for (i, p) in payloads.iter().enumerate() {
        encode_record(&mut bytes, "key", i as u64 + 1, Origin::Send, p);
    }
    std::fs::write(&path, &bytes).unwrap();
    let file = File::open(&path).unwrap();
    // A buffer smaller than most records: every record crosses a refill.
    let mut buf = vec![0u8; 16];
    let mut seen = Vec::new();
    let end = scan_segment(&file, &mut buf, |_, payload_offset, r| {
        let mut read = vec![0u8; r.payload.len()];
        file.read_exact_at(&mut read, payload_offset).unwrap();
        assert_eq!(read, r.payload, "payload offset points at the payload");
        seen.push((r.seq, r.payload.to_vec()));
        Ok(())
    });
    assert!(matches!(end, Ok(None)));
    let expected: Vec<(u64, Vec<u8>)> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| (i as u64 + 1, p))
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn a_gap_early_in_a_long_log_fails_the_open_without_waiting_for_the_reader() {
    // More records after the gap than the reader can hand over before blocking: the open
    // must end (with the error) rather than wait for a reader stuck on a full channel.
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox
        .append(&[entry("a", 1, b"x"), entry("a", 3, b"z")], true)
        .unwrap();
    let many: Vec<NewEntry> = (1..=40_000).map(|s| entry("b", s, b"p")).collect();
    inbox.append(&many, true).unwrap();
    let marks = crash(inbox);
    let e = err_text(open_with(dir.path(), &marks, 0));
    assert!(e.contains("messages 2..=2 are missing"), "{e}");
}

#[test]
fn recovery_across_many_batches_and_segments_keeps_every_key_in_order() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the log rolls many times, and recovery hands over many batches.
    let inbox = Inbox::open(dir.path(), &LogMarks::default(), 64 * 1024, |_| Ok(0))
        .unwrap()
        .0;
    let keys = 7u64;
    let per_key = 3_000u64;
    for round in 0..per_key / 100 {
        let batch: Vec<NewEntry> = (0..100 * keys)
            .map(|i| {
                let seq = round * 100 + i / keys + 1;
                entry(&format!("k{}", i % keys), seq, &seq.to_le_bytes())
            })
            .collect();
        inbox.append(&batch, true).unwrap();
    }
    let marks = crash(inbox);
    let (inbox, report) = Inbox::open(dir.path(), &marks, 64 * 1024, |_| Ok(0)).unwrap();
    assert_eq!(report.pending, keys * per_key);
    for k in 0..keys {
        let got = inbox.pending(&format!("k{k}"), 1, usize::MAX).unwrap();
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=per_key).collect::<Vec<_>>(), "key k{k}");
        for e in &got {
            assert_eq!(
                e.payload.as_ref(),
                e.seq.to_le_bytes(),
                "payload of k{k} seq {}",
                e.seq
            );
        }
    }
}

/// An inbox with 64-byte segments holding keys a, b, c with 20 messages each, interleaved,
/// crashed after the journal thread's work (sidecars written); returns the marks.
fn with_sidecars(dir: &Path) -> LogMarks {
    let inbox = Inbox::open(dir, &LogMarks::default(), 64, |_| Ok(0))
        .unwrap()
        .0;
    for seq in 1..=20 {
        for key in ["a", "b", "c"] {
            let payload = format!("{key}{seq}");
            inbox
                .append(&[entry(key, seq, payload.as_bytes())], true)
                .unwrap();
        }
    }
    inbox.write_sidecars(usize::MAX);
    crash(inbox)
}

fn sidecars(dir: &Path) -> Vec<u64> {
    let mut ids = super::sidecar::list_sidecars(dir).unwrap();
    ids.sort_unstable();
    ids
}

/// Every key's pending (seq, payload) after opening with `applied`.
fn everything(dir: &Path, marks: &LogMarks, applied: Seq) -> Vec<(String, Seq, Vec<u8>)> {
    let (inbox, _) = Inbox::open(dir, marks, 64, |_| Ok(applied)).unwrap();
    let mut out = Vec::new();
    for key in ["a", "b", "c"] {
        for e in inbox.pending(key, 1, 100).unwrap() {
            out.push((key.to_string(), e.seq, e.payload.to_vec()));
        }
    }
    out
}

#[test]
fn recovery_from_sidecars_finds_what_reading_every_record_finds() {
    let dir = tempfile::tempdir().unwrap();
    let marks = with_sidecars(dir.path());
    let indexed = sidecars(dir.path());
    assert!(
        indexed.len() > 5,
        "closed segments have sidecars: {indexed:?}"
    );
    for applied in [0, 7] {
        let from_sidecars = everything(dir.path(), &marks, applied);
        if applied == 0 {
            assert_eq!(
                sidecars(dir.path()),
                indexed,
                "kept while their segments live"
            );
        }
        assert_eq!(from_sidecars.len(), 3 * (20 - applied as usize));
        assert!(
            from_sidecars
                .iter()
                .all(|(k, seq, p)| *p == format!("{k}{seq}").into_bytes())
        );
        let copy = tempfile::tempdir().unwrap();
        for id in list_segments(dir.path()).unwrap() {
            std::fs::copy(segment_path(dir.path(), id), segment_path(copy.path(), id)).unwrap();
        }
        assert_eq!(everything(copy.path(), &marks, applied), from_sidecars);
    }
}

#[test]
fn a_damaged_sidecar_is_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let marks = with_sidecars(dir.path());
    let expected = everything(dir.path(), &marks, 0);
    let id = sidecars(dir.path())[1];
    let path = super::sidecar::sidecar_path(dir.path(), id);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(everything(dir.path(), &marks, 0), expected);
    assert!(!path.exists(), "the damaged sidecar is removed");
}

#[test]
fn a_sidecar_that_lies_about_its_segment_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let marks = with_sidecars(dir.path());
    let expected = everything(dir.path(), &marks, 0);
    // The segment's first two records swapped (both whole, the same length): its sidecar
    // is whole and of the right length, but no longer describes it.
    let id = sidecars(dir.path())[0];
    let path = segment_path(dir.path(), id);
    let bytes = std::fs::read(&path).unwrap();
    let mut offsets = Vec::new();
    let mut buf = vec![0u8; 4096];
    let _ = scan_segment(&File::open(&path).unwrap(), &mut buf, |offset, _, _| {
        offsets.push(offset as usize);
        Ok(())
    });
    let (a, b) = (offsets[0], offsets[1]);
    let len = b - a;
    assert_eq!(offsets.get(2).copied().unwrap_or(bytes.len()) - b, len);
    let mut swapped = bytes[..a].to_vec();
    swapped.extend_from_slice(&bytes[b..b + len]);
    swapped.extend_from_slice(&bytes[a..b]);
    swapped.extend_from_slice(&bytes[b + len..]);
    std::fs::write(&path, swapped).unwrap();
    assert_eq!(everything(dir.path(), &marks, 0), expected);
    assert!(
        sidecars(dir.path()).is_empty(),
        "sidecars are dropped, then rebuilt later"
    );
}

#[test]
fn damage_in_a_closed_segment_with_a_sidecar_is_corruption_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let marks = with_sidecars(dir.path());
    let id = sidecars(dir.path())[2];
    let path = segment_path(dir.path(), id);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let text = err_text(Inbox::open(dir.path(), &marks, 64, |_| Ok(0)));
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("closed segment"), "{text}");
}

#[test]
fn a_sidecar_built_while_writing_equals_one_built_by_reading() {
    let dir = tempfile::tempdir().unwrap();
    let _marks = with_sidecars(dir.path());
    let ids = sidecars(dir.path());
    assert!(!ids.is_empty());
    for id in ids {
        let len = std::fs::metadata(segment_path(dir.path(), id))
            .unwrap()
            .len();
        let written = super::sidecar::Sidecar::load(dir.path(), id, len).unwrap();
        let read = super::sidecar::Sidecar::build(dir.path(), id)
            .unwrap()
            .unwrap();
        assert_eq!(written, read, "segment {id}");
    }
}

#[test]
fn damage_at_the_end_of_a_segment_the_marker_lists_as_closed_is_never_cut() {
    // A roll with nothing appended after it (an erasure's `roll`): the newest segment
    // holding data is closed, synced when it rolled. Damage at its end is not a torn write.
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox
        .append(&[entry("a", 1, b"x"), entry("a", 2, b"acknowledged")], true)
        .unwrap();
    assert!(inbox.roll_now().unwrap());
    let marks = crash(inbox);
    let path = segment_path(dir.path(), 1);
    assert!(marks.closed.contains_key(&1));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let text = err_text(open_with(dir.path(), &marks, 0));
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len() as usize,
        last + 1,
        "nothing was cut"
    );
}

#[test]
fn a_batch_lands_where_the_index_says_even_past_leftover_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = fresh(dir.path());
    inbox.append(&[entry("a", 1, b"one")], true).unwrap();
    // What a failed write whose cut-back failed too leaves past the indexed end.
    let path = segment_path(dir.path(), 1);
    {
        use std::io::Write;
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"garbage").unwrap();
    }
    inbox
        .append(&[entry("a", 2, b"two, written over it")], true)
        .unwrap();
    let marks = crash(inbox);
    let (inbox, _) = open_with(dir.path(), &marks, 0).unwrap();
    let a = inbox.pending("a", 1, 10).unwrap();
    assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(&*a[1].payload, b"two, written over it");
}
