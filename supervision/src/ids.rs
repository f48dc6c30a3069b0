//! The runtime's identifiers: sequence numbers, key ranges and owner epochs (the unit of
//! ownership a node acquires, and the fence that refuses a former owner's writes). A leaf:
//! it imports nothing of the crate.

use serde::{Deserialize, Serialize};

/// A per-key sequence number: the first message of a key is 1, then 2, 3, ... without gaps.
pub type Seq = u64;

/// An owner epoch of a key range: bumped by every
/// [`acquire`](crate::Journal::acquire).
pub type Epoch = u64;

/// One of a journal's key ranges (`0..ranges`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyRange(pub u32);

impl std::fmt::Display for KeyRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "range {}", self.0)
    }
}

/// The range of `key` among `ranges` (at least 1): a stable hash (CRC-32, IEEE, of the key's
/// bytes), the same in every process and version, so that every node agrees.
pub fn range_of(key: &str, ranges: u32) -> KeyRange {
    KeyRange(crc32fast::hash(key.as_bytes()) % ranges.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_are_stable_across_processes() {
        // Fixed values: a change here moves keys between nodes of a running cluster.
        // (Python: zlib.crc32(b"session\x1facme/42") % 64 == 11.)
        assert_eq!(range_of("session\u{1f}acme/42", 64), KeyRange(11));
        assert_eq!(range_of("counter\u{1f}k1", 64), KeyRange(26));
        assert_eq!(range_of("anything", 1), KeyRange(0));
        assert_eq!(range_of("anything", 0), KeyRange(0));
    }

    proptest! {
        #[test]
        fn every_key_falls_in_a_range(key in ".{0,64}", ranges in 1u32..1024) {
            prop_assert!(range_of(&key, ranges).0 < ranges);
        }
    }
}
