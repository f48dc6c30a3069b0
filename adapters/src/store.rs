//! Opening the embedded sled stores.

use std::path::Path;

use crate::error::{Error, Result};

/// Opens (or creates) a sled database at `path`. A damaged store is an error naming the
/// path, never a panic (the engine's panics on damaged files are caught).
pub(crate) fn open_sled(path: &Path) -> Result<sled::Db> {
    let config = sled::Config::new().path(path);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Corruption { at, .. })) => Err(Error::Corrupt {
            path: path.to_path_buf(),
            detail: format!("storage engine reports corruption at {at:?}"),
        }),
        Ok(Err(e)) => Err(Error::Store {
            path: path.to_path_buf(),
            source: Box::new(e),
        }),
        Err(_) => Err(Error::Corrupt {
            path: path.to_path_buf(),
            detail: "storage engine failed to open it".into(),
        }),
    }
}

/// Makes everything written to `db` so far durable, off the async workers.
///
/// Not sled's `flush_async`: in sled 0.34 concurrent `flush_async` calls can deadlock
/// (spacejam/sled#1308, fixed only on its unreleased main branch); a blocking `flush` on
/// the blocking pool does not.
pub(crate) async fn flush_sled(db: &sled::Db) -> sled::Result<()> {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || db.flush()).await {
        Ok(r) => r.map(|_| ()),
        Err(e) => Err(sled::Error::ReportableBug(format!(
            "flush task failed: {e}"
        ))),
    }
}
