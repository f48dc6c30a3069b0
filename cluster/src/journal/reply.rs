//! Reading the scripts' replies into the journal's types. Every unexpected shape is an error
//! string naming what was found; the caller makes it [`Error::Corrupt`] naming the operation.

use std::collections::BTreeMap;
use std::sync::Arc;

use redis::Value;
use soma_supervision::{DeadLetter, Error, Fence, KeyRange, Seq, Timer};

/// A writing script's answer.
#[derive(Debug)]
pub(super) enum Reply {
    /// Done; what follows the status.
    Ok(Vec<Value>),
    /// Refused: the writer's epoch is not the range's current one.
    Stale {
        range: u32,
        epoch: u64,
        current: Option<u64>,
        key: Option<String>,
    },
    /// Refused: the range's holder is a node whose lease expired.
    LeaseExpired { range: u32, key: Option<String> },
    /// Refused: the write does not continue the key's applied seq.
    NotNext { applied: Seq },
    /// The message to dead-letter is not in the inbox.
    Missing,
    /// A commit beyond the key's last appended seq.
    Beyond { last: Seq },
    /// No such dead letter, or a timer that already fired.
    Gone,
}

pub(super) fn items(v: Value) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(format!("expected an array, got {other:?}")),
    }
}

pub(super) fn int(v: &Value) -> Result<i64, String> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("expected a number, got {:?}", String::from_utf8_lossy(b))),
        other => Err(format!("expected a number, got {other:?}")),
    }
}

pub(super) fn ints(v: &[Value]) -> Result<Vec<i64>, String> {
    v.iter().map(int).collect()
}

pub(super) fn bulk(v: &Value) -> Result<Vec<u8>, String> {
    match v {
        Value::BulkString(b) => Ok(b.clone()),
        Value::SimpleString(s) => Ok(s.as_bytes().to_vec()),
        other => Err(format!("expected a string, got {other:?}")),
    }
}

fn text(v: &Value) -> Result<String, String> {
    String::from_utf8(bulk(v)?).map_err(|_| "a string that is not UTF-8".to_string())
}

impl Reply {
    pub(super) fn parse(v: Value) -> Result<Self, String> {
        let mut v = items(v)?;
        if v.is_empty() {
            return Err("an empty reply".into());
        }
        let status = text(&v[0])?;
        fn at<'v>(v: &'v [Value], i: usize, status: &str) -> Result<&'v Value, String> {
            v.get(i).ok_or_else(|| format!("{status} reply too short"))
        }
        Ok(match status.as_str() {
            "ok" => Self::Ok(v.split_off(1)),
            "stale" => Self::Stale {
                range: int(at(&v, 1, &status)?)? as u32,
                epoch: int(at(&v, 2, &status)?)? as u64,
                current: match v.get(3) {
                    None | Some(Value::Nil) => None,
                    Some(c) => Some(int(c)? as u64),
                },
                key: v.get(4).map(text).transpose()?,
            },
            "lease" => Self::LeaseExpired {
                range: int(at(&v, 1, &status)?)? as u32,
                key: v.get(4).map(text).transpose()?,
            },
            "notnext" => Self::NotNext {
                applied: int(at(&v, 1, &status)?)? as Seq,
            },
            "missing" => Self::Missing,
            "beyond" => Self::Beyond {
                last: int(at(&v, 1, &status)?)? as Seq,
            },
            "nosuch" | "gone" => Self::Gone,
            other => return Err(format!("unknown status {other:?}")),
        })
    }

    /// `Ok(Some(rest))` when done, `Ok(None)` for [`Reply::Gone`], the typed refusal
    /// otherwise; `from` is the first seq the write covers (for `NotNext`).
    pub(super) fn into_result(
        self,
        key: &str,
        from: Seq,
        corrupt: impl Fn(String) -> Error,
    ) -> Result<Option<Vec<Value>>, Error> {
        match self {
            Self::Ok(rest) => Ok(Some(rest)),
            Self::Gone => Ok(None),
            Self::Stale {
                range,
                epoch,
                current,
                key: named,
            } => Err(Error::Fenced {
                key: named.unwrap_or_else(|| key.to_string()),
                reason: Fence::StaleEpoch {
                    range: KeyRange(range),
                    epoch,
                    current,
                },
            }),
            Self::LeaseExpired { range, key: named } => Err(Error::Fenced {
                key: named.unwrap_or_else(|| key.to_string()),
                reason: Fence::LeaseExpired {
                    range: KeyRange(range),
                },
            }),
            Self::NotNext { applied } => Err(Error::Fenced {
                key: key.to_string(),
                reason: Fence::NotNext { from, applied },
            }),
            Self::Missing => Err(corrupt(format!(
                "seq {from} is not in the inbox though it is the next to handle"
            ))),
            Self::Beyond { last } => Err(corrupt(format!(
                "a commit whose seqs are not within its from and the last appended one ({last})"
            ))),
        }
    }
}

/// `{key, {field, value...}}...` into dead letters, in key and then seq order.
pub(super) fn dead_letters(v: Value) -> Result<Vec<DeadLetter>, String> {
    let v = items(v)?;
    let mut out = Vec::new();
    for pair in v.chunks(2) {
        let [key, fields] = pair else {
            return Err("an odd reply".into());
        };
        let key = text(key)?;
        let fields = items(fields.clone())?;
        // seq -> (payload, error, attempts, at)
        let mut by_seq: BTreeMap<Seq, (Vec<u8>, String, u32, u64)> = BTreeMap::new();
        for fv in fields.chunks(2) {
            let [field, value] = fv else {
                return Err(format!("dead letters of {key}: an odd field list"));
            };
            let field = text(field)?;
            let (seq, part) = field
                .split_once(':')
                .and_then(|(s, p)| Some((s.parse::<Seq>().ok()?, p)))
                .ok_or_else(|| format!("dead letters of {key}: field {field:?}"))?;
            let slot = by_seq.entry(seq).or_default();
            match part {
                "p" => slot.0 = bulk(value)?,
                "e" => slot.1 = text(value)?,
                "a" => slot.2 = int(value)? as u32,
                "t" => slot.3 = int(value)? as u64,
                _ => return Err(format!("dead letters of {key}: field {field:?}")),
            }
        }
        for (seq, (payload, error, attempts, at_ms)) in by_seq {
            out.push(DeadLetter {
                key: key.clone(),
                seq,
                payload,
                error,
                attempts,
                at_ms,
            });
        }
    }
    Ok(out)
}

/// `{member, score, payload}...` into timers; a member is `<id>:<key>`.
pub(super) fn timers(v: Value) -> Result<Vec<Timer>, String> {
    let v = items(v)?;
    let mut out = Vec::with_capacity(v.len() / 3);
    for t in v.chunks(3) {
        let [member, score, payload] = t else {
            return Err("a reply not in threes".into());
        };
        let member = text(member)?;
        let (id, key) = member
            .split_once(':')
            .and_then(|(id, key)| Some((id.parse::<u64>().ok()?, key)))
            .ok_or_else(|| format!("timer member {member:?}"))?;
        let score = text(score)?;
        let fire_at_ms = score
            .parse::<f64>()
            .map_err(|_| format!("timer score {score:?}"))? as u64;
        out.push(Timer {
            key: Arc::from(key),
            fire_at_ms,
            id,
            payload: bulk(payload)?,
        });
    }
    Ok(out)
}
