//! Journal keys: the one place that builds and parses them. A journal key is the registry
//! name, the unit separator (U+001F), then the actor key; registry names and actor keys
//! never contain control characters, so the split is unambiguous.

use std::sync::Arc;

use crate::error::{Error, Result};

const SEPARATOR: char = '\u{1f}';
/// The longest actor key accepted.
pub(crate) const MAX_KEY_LEN: usize = 1024;

/// The journal key of `key` in registry `registry`.
pub(crate) fn journal_key(registry: &str, key: &str) -> Arc<str> {
    Arc::from(format!("{registry}{SEPARATOR}{key}"))
}

/// The prefix every journal key of `registry` starts with.
pub(crate) fn namespace(registry: &str) -> String {
    format!("{registry}{SEPARATOR}")
}

/// The registry name and actor key of a journal key.
pub(crate) fn parse(jkey: &str) -> Option<(&str, &str)> {
    jkey.split_once(SEPARATOR)
}

/// Checks an actor key as given by a caller.
pub(crate) fn check_key(key: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidKey {
            key: key.chars().take(64).collect(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("is longer than 1024 bytes");
    }
    if key.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    Ok(())
}

/// Checks a registry name.
pub(crate) fn check_registry(name: &str) -> Result<()> {
    if name.is_empty() || name.chars().any(|c| c.is_control()) {
        return Err(Error::InvalidOption {
            key: "registry.name",
            reason: "must be non-empty without control characters".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn journal_keys_round_trip(registry in "[a-z][a-z0-9_-]{0,20}", key in "[^\\p{Cc}]{1,64}") {
            let jkey = journal_key(&registry, &key);
            prop_assert!(jkey.starts_with(&namespace(&registry)));
            prop_assert_eq!(parse(&jkey), Some((registry.as_str(), key.as_str())));
            prop_assert!(check_key(&key).is_ok());
        }
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        assert!(check_key("").is_err());
        assert!(check_key("a\u{1f}b").is_err());
        assert!(check_key(&"x".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(check_registry("").is_err());
    }
}
