//! The runtime's metrics, rendered by a real Prometheus exporter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Counter, Msg, options};
use metrics_exporter_prometheus::PrometheusBuilder;
use soma_supervision::{Runtime, RuntimeOptions, metrics};

fn value(text: &str, name: &str, registry: &str) -> f64 {
    let prefix = format!("{name}{{registry=\"{registry}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{prefix} missing from\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn counters_gauges_and_flush_latency_are_exported() {
    let handle = PrometheusBuilder::new().install_recorder().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::open(RuntimeOptions::new(dir.path().join("j")))
        .await
        .unwrap();
    let mut opts = options("m");
    opts.max_attempts = 2;
    let reg = rt.registry(Counter::new(), opts).await.unwrap();
    for id in 0..5 {
        reg.send("a", &Msg::Add(id)).await.unwrap();
    }
    reg.send("b", &Msg::Poison).await.unwrap();
    let last = reg.send("b", &Msg::Add(9)).await.unwrap();
    reg.wait_handled("b", last).await.unwrap();
    reg.wait_handled("a", 5).await.unwrap();
    let text = handle.render();
    assert_eq!(value(&text, metrics::ENQUEUED, "m"), 7.0);
    assert_eq!(value(&text, metrics::HANDLED, "m"), 6.0);
    assert_eq!(value(&text, metrics::DEAD_LETTERED, "m"), 1.0);
    assert_eq!(
        value(&text, metrics::RESTARTS, "m"),
        1.0,
        "one restart before the dead letter"
    );
    assert_eq!(value(&text, metrics::ACTIVE, "m"), 2.0);
    assert!(
        value(&text, metrics::REPLAYED, "m") >= 1.0,
        "the poison was replayed after the restart"
    );
    assert!(
        text.contains(&format!("{}_count", metrics::FLUSH_SECONDS))
            || text.contains(&format!("{}{{quantile", metrics::FLUSH_SECONDS)),
        "flush latency missing:\n{text}"
    );
}
