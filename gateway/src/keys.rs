//! API keys: a file of hashed keys that `soma keys` edits while the node runs.
//!
//! A key is `sk-soma-` and 256 random bits (base64url); the store keeps only its sha256 (a
//! 256-bit random secret needs no slow hash), its id, tenant, expiry and whether it is
//! revoked. Writers take an exclusive lock on `keys.lock`, read, change and replace
//! `keys.json` by rename; the server notices a replaced file (inode, length, mtime) on the
//! next request and reloads it, so a revocation takes effect at once.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const PREFIX: &str = "sk-soma-";
const FORMAT: u32 = 1;

/// One API key as stored (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Public id (shown by `soma keys list`, used to revoke and rotate).
    pub id: String,
    /// The tenant every request made with the key is attributed to.
    pub tenant: String,
    /// Hex sha256 of the key.
    hash: String,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
    /// Expires, ms since the Unix epoch.
    pub expires_ms: Option<u64>,
    /// Revoked keys stay listed and are refused.
    pub revoked: bool,
}

impl KeyRecord {
    /// Whether the key is refused at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|e| now_ms >= e)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: u32,
    keys: Vec<KeyRecord>,
}

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's tenant.
    pub tenant: String,
    /// The key's id.
    pub key_id: String,
}

/// Why a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key like it.
    Unknown,
    /// Revoked.
    Revoked,
    /// Past its expiry.
    Expired,
}

#[derive(Debug, Default)]
struct Loaded {
    /// (inode, length, mtime) of the file read.
    stamp: Option<(u64, u64, SystemTime)>,
    by_hash: HashMap<String, KeyRecord>,
}

/// The key store in a data directory.
#[derive(Debug)]
pub struct KeyStore {
    path: PathBuf,
    lock: PathBuf,
    loaded: Mutex<Loaded>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hash_of(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a tenant name: 1-64 of `a-z 0-9 - _` (the domain's ids).
pub fn check_tenant(tenant: &str) -> Result<()> {
    soma_actors::check_id(tenant).map_err(|e| Error::Config {
        key: "tenant".into(),
        reason: e.to_string(),
    })
}

impl KeyStore {
    /// The store in `dir` (created if absent; the file appears with the first key).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let store = Self {
            path: dir.join("keys.json"),
            lock: dir.join("keys.lock"),
            loaded: Mutex::new(Loaded::default()),
        };
        store.refresh()?;
        Ok(store)
    }

    /// The file the keys are in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read_file(&self) -> Result<KeyFile> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let file: KeyFile =
                    serde_json::from_slice(&bytes).map_err(|e| Error::KeyStore {
                        path: self.path.clone(),
                        detail: e.to_string(),
                    })?;
                if file.format != FORMAT {
                    return Err(Error::KeyStore {
                        path: self.path.clone(),
                        detail: format!("unsupported format {}", file.format),
                    });
                }
                Ok(file)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyFile {
                format: FORMAT,
                keys: Vec::new(),
            }),
            Err(e) => Err(Error::io(&self.path, e)),
        }
    }

    fn stamp(&self) -> Result<Option<(u64, u64, SystemTime)>> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(Some((
                m.ino(),
                m.len(),
                m.modified().map_err(|e| Error::io(&self.path, e))?,
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&self.path, e)),
        }
    }

    /// Reloads the file if it was replaced since it was last read.
    fn refresh(&self) -> Result<()> {
        let stamp = self.stamp()?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.stamp.is_some() && loaded.stamp == stamp {
            return Ok(());
        }
        let file = self.read_file()?;
        loaded.by_hash = file.keys.into_iter().map(|k| (k.hash.clone(), k)).collect();
        loaded.stamp = stamp;
        tracing::debug!(keys = loaded.by_hash.len(), "api keys loaded");
        Ok(())
    }

    /// Read, change and replace the file under the writers' lock.
    fn edit<T>(&self, change: impl FnOnce(&mut KeyFile) -> Result<T>) -> Result<T> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)
            .map_err(|e| Error::io(&self.lock, e))?;
        lock.lock().map_err(|e| Error::io(&self.lock, e))?;
        let mut file = self.read_file()?;
        let out = change(&mut file)?;
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| Error::KeyStore {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(dir, e))?;
        }
        drop(lock);
        self.refresh()?;
        Ok(out)
    }

    /// Creates a key for `tenant`; returns its record and the key, which is shown once and
    /// never stored.
    pub fn create(
        &self,
        tenant: &str,
        expires_in: Option<Duration>,
    ) -> Result<(KeyRecord, String)> {
        check_tenant(tenant)?;
        const MAX_LIFETIME: Duration = Duration::from_secs(100 * 366 * 86_400);
        if expires_in.is_some_and(|d| d > MAX_LIFETIME) {
            return Err(Error::Config {
                key: "expires".into(),
                reason: "a key lives at most 100 years".into(),
            });
        }
        let created = now_ms();
        let expires_ms = expires_in.map(|d| created.saturating_add(d.as_millis() as u64));
        self.create_until(tenant, created, expires_ms)
    }

    /// A new key of `tenant` made at `created`, valid until `expires_ms`.
    fn create_until(
        &self,
        tenant: &str,
        created: u64,
        expires_ms: Option<u64>,
    ) -> Result<(KeyRecord, String)> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| Error::KeyStore {
            path: self.path.clone(),
            detail: format!("no randomness: {e}"),
        })?;
        let secret = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let hash = hash_of(&secret);
        let record = KeyRecord {
            id: format!("key_{}", &hash[..16]),
            tenant: tenant.to_string(),
            hash,
            created_ms: created,
            expires_ms,
            revoked: false,
        };
        let r = record.clone();
        self.edit(move |file| {
            file.keys.push(r);
            Ok(())
        })?;
        tracing::info!(key_id = %record.id, tenant = %record.tenant, "api key created");
        Ok((record, secret))
    }

    /// Every key, revoked and expired ones included.
    pub fn list(&self) -> Result<Vec<KeyRecord>> {
        Ok(self.read_file()?.keys)
    }

    /// Revokes the key `id`: it is refused from the next request on.
    pub fn revoke(&self, id: &str) -> Result<KeyRecord> {
        let record = self.edit(|file| {
            let k = file
                .keys
                .iter_mut()
                .find(|k| k.id == id)
                .ok_or_else(|| Error::NoSuchKey(id.to_string()))?;
            k.revoked = true;
            Ok(k.clone())
        })?;
        tracing::info!(key_id = %id, tenant = %record.tenant, "api key revoked");
        Ok(record)
    }

    /// Replaces the key `id` by a new one of the same tenant and remaining lifetime; the
    /// old one is revoked.
    pub fn rotate(&self, id: &str) -> Result<(KeyRecord, String)> {
        let old = self
            .list()?
            .into_iter()
            .find(|k| k.id == id)
            .ok_or_else(|| Error::NoSuchKey(id.to_string()))?;
        if old.revoked || old.expired(now_ms()) {
            return Err(Error::KeyStore {
                path: self.path.clone(),
                detail: format!("key {id} is revoked or expired: create a new one instead"),
            });
        }
        // The new key keeps the old one's deadline exactly (a rotation never extends a key).
        let new = self.create_until(&old.tenant, now_ms(), old.expires_ms)?;
        self.revoke(id)?;
        Ok(new)
    }

    /// Who `secret` belongs to, if it is a valid key.
    pub fn verify(&self, secret: &str) -> Result<Result<Principal, Refusal>> {
        if !secret.starts_with(PREFIX) {
            return Ok(Err(Refusal::Unknown));
        }
        self.refresh()?;
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        Ok(match loaded.by_hash.get(&hash_of(secret)) {
            None => Err(Refusal::Unknown),
            Some(k) if k.revoked => Err(Refusal::Revoked),
            Some(k) if k.expired(now_ms()) => Err(Refusal::Expired),
            Some(k) => Ok(Principal {
                tenant: k.tenant.clone(),
                key_id: k.id.clone(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_verify_until_revoked_and_only_their_hash_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path()).unwrap();
        let (rec, secret) = store.create("acme", None).unwrap();
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(&secret), "the key itself is not stored");
        assert_eq!(
            store.verify(&secret).unwrap(),
            Ok(Principal {
                tenant: "acme".into(),
                key_id: rec.id.clone()
            })
        );
        assert_eq!(store.verify("sk-soma-nope").unwrap(), Err(Refusal::Unknown));
        // A second handle (another process, `soma keys revoke`) revokes it; the first sees it.
        let other = KeyStore::open(dir.path()).unwrap();
        other.revoke(&rec.id).unwrap();
        assert_eq!(store.verify(&secret).unwrap(), Err(Refusal::Revoked));
    }

    #[test]
    fn rotation_revokes_the_old_key_and_expiry_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path()).unwrap();
        let (rec, old) = store
            .create("acme", Some(Duration::from_secs(3600)))
            .unwrap();
        let (new_rec, new) = store.rotate(&rec.id).unwrap();
        assert_eq!(store.verify(&old).unwrap(), Err(Refusal::Revoked));
        assert_eq!(store.verify(&new).unwrap().unwrap().tenant, "acme");
        assert_eq!(new_rec.expires_ms, rec.expires_ms);
        let (gone_rec, gone) = store.create("acme", Some(Duration::ZERO)).unwrap();
        assert_eq!(store.verify(&gone).unwrap(), Err(Refusal::Expired));
        assert!(
            store.rotate(&gone_rec.id).is_err(),
            "an expired key is not rotated"
        );
        assert!(store.rotate(&rec.id).is_err(), "nor a revoked one");
        assert!(
            store
                .create("acme", Some(Duration::from_secs(8000 * 366 * 86_400)))
                .is_err()
        );
        assert!(matches!(
            store.revoke("key_missing"),
            Err(Error::NoSuchKey(_))
        ));
        assert!(store.create("Bad Tenant", None).is_err());
    }
}
