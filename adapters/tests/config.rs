//! The adapters' options read from configuration: unknown keys and bad values are errors
//! naming them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use soma_adapters::OutboxOptions;

#[test]
fn outbox_options_read_milliseconds_and_refuse_unknown_keys_and_bad_values() {
    let o: OutboxOptions =
        serde_json::from_str(r#"{"batch": 10, "min_backoff_ms": 20, "max_backoff_ms": 1000}"#)
            .unwrap();
    assert_eq!(o.batch, 10);
    assert_eq!(o.min_backoff, std::time::Duration::from_millis(20));
    o.validate().unwrap();
    let e = serde_json::from_str::<OutboxOptions>(r#"{"min_backoff": 20}"#).unwrap_err();
    assert!(e.to_string().contains("min_backoff"), "{e}");
    let bad: OutboxOptions =
        serde_json::from_str(r#"{"min_backoff_ms": 50, "max_backoff_ms": 10}"#).unwrap();
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("outbox.max_backoff_ms"), "{e}");
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_config_has_defaults_and_refuses_unknown_keys() {
    let c: soma_adapters::KafkaConfig =
        serde_json::from_str(r#"{"bootstrap": "127.0.0.1:9092"}"#).unwrap();
    assert_eq!(c.partitions, 3);
    assert_eq!(c.delivery_timeout, std::time::Duration::from_secs(30));
    assert!(
        serde_json::from_str::<soma_adapters::KafkaConfig>(r#"{"bootstrap": "x", "partition": 2}"#)
            .is_err()
    );
}

#[cfg(feature = "qdrant")]
#[test]
fn qdrant_config_refuses_unknown_keys() {
    let c: soma_adapters::QdrantConfig = serde_json::from_str(
        r#"{"url": "http://127.0.0.1:6334", "collection": "m", "dimension": 384}"#,
    )
    .unwrap();
    assert!(c.api_key.is_none());
    assert!(
        serde_json::from_str::<soma_adapters::QdrantConfig>(
            r#"{"url": "x", "collection": "m", "dimension": 3, "apikey": "s"}"#
        )
        .is_err()
    );
}
