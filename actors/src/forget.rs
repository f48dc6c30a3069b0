//! Forgetting every key of a tenant in one registry (its erasure).

use futures_util::{StreamExt, TryStreamExt};
use soma_supervision::{DurableActor, Registry};

use crate::error::{Error, Result};

/// Keys erased at once.
const PARALLELISM: usize = 16;

/// Sends `erase` to every key of `registry` under `prefix` (committed or pending), each
/// handled after whatever the key was running or had queued, then forgets the key's timers
/// and the dead letters under `prefix`. Returns how many keys held something by `held`.
pub(crate) async fn forget_keys<A: DurableActor>(
    registry: &Registry<A>,
    prefix: &str,
    erase: &A::Msg,
    held: impl Fn(&A::State) -> bool,
) -> Result<u64> {
    let keys = registry.keys(prefix).await?;
    let held = &held;
    let n = futures_util::stream::iter(keys)
        .map(|key: String| async move {
            let had = held(&registry.state(&key).await?);
            let seq = registry.send(&key, erase).await?;
            registry.wait_handled(&key, seq).await?;
            // A timer would wake it again.
            registry.discard_timers(&key).await?;
            Ok::<_, Error>(u64::from(had))
        })
        .buffer_unordered(PARALLELISM)
        .try_fold(0, |n, had| async move { Ok(n + had) })
        .await?;
    registry.discard_dead_letters_under(prefix).await?;
    Ok(n)
}
