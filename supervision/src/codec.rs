//! Encoding of messages and states (bincode with serde) and of checksummed journal records.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The largest message or state accepted; a length prefix beyond it is an error, not an
/// allocation (a damaged or hostile record must never abort the process).
pub(crate) const MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;

/// The largest encoded message accepted by a send or a timer (well under what the inbox log
/// accepts when reading, so that every accepted message can be read back).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Encodes a message, refusing one larger than [`MAX_MESSAGE_BYTES`].
pub(crate) fn encode_message<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    encode_within("message", value, MAX_MESSAGE_BYTES)
}

/// Encodes a state, refusing one that could not be decoded again.
pub(crate) fn encode_state<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    encode_within("state", value, MAX_RECORD_BYTES)
}

fn encode_within<T: Serialize>(what: &'static str, value: &T, limit: usize) -> Result<Vec<u8>> {
    let bytes = encode(what, value)?;
    if bytes.len() > limit {
        return Err(Error::Encode {
            what,
            detail: format!("{} bytes exceed the limit of {limit} bytes", bytes.len()),
        });
    }
    Ok(bytes)
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_RECORD_BYTES>()
}

/// Encodes a value with bincode (standard configuration).
pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| Error::Encode {
        what,
        detail: e.to_string(),
    })
}

/// Decodes a value written by [`encode`]; trailing bytes are an error.
pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    let (value, read) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| Error::Decode {
            what,
            detail: e.to_string(),
        })?;
    if read != bytes.len() {
        return Err(Error::Decode {
            what,
            detail: format!("{} trailing bytes", bytes.len() - read),
        });
    }
    Ok(value)
}

/// Prefixes `body` with its CRC32 so that damage is detected on read.
pub(crate) fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Checks and strips the CRC32 written by [`seal`]; `None` when the record is damaged.
pub(crate) fn unseal(record: &[u8]) -> Option<&[u8]> {
    let (crc, body) = record.split_at_checked(4)?;
    let crc = u32::from_be_bytes(crc.try_into().ok()?);
    (crc32fast::hash(body) == crc).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sealed_records_round_trip(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sealed = seal(&body);
            prop_assert_eq!(unseal(&sealed), Some(body.as_slice()));
        }

        #[test]
        fn any_flipped_byte_is_detected(
            body in proptest::collection::vec(any::<u8>(), 1..256),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut sealed = seal(&body);
            let i = at.index(sealed.len());
            sealed[i] ^= 1 << bit;
            prop_assert_eq!(unseal(&sealed), None);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode::<(u64, String, Vec<u32>)>("message", &bytes);
        }
    }

    #[test]
    fn huge_length_prefix_is_an_error_not_an_allocation() {
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        let e = decode::<Vec<u8>>("message", &bytes).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e}");
    }

    #[test]
    fn short_record_is_damaged() {
        assert_eq!(unseal(&[1, 2, 3]), None);
    }
}
