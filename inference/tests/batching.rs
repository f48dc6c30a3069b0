//! Continuous batching with the real SmolLM2-135M-Instruct GGUF on the native engine: many
//! generations share each step, and each one's output is what it is alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use soma_inference::{
    BatchStats, ChatMessage, Completion, Error, GenerateRequest, GenerationEvent, GeneratorConfig,
    GeneratorPool, Prompt, SamplingParams,
};

fn chat(text: &str, tokens: usize, tenant: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(vec![ChatMessage::new("user", text)]),
        params: SamplingParams::greedy(tokens),
        schema: None,
        tenant: Some(tenant.to_string()),
    }
}

const PROMPTS: [&str; 16] = [
    "Name three colours.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Count from one to ten.",
    "What is two plus two?",
    "Say hello in Spanish.",
    "Name a large animal.",
    "What colour is the sky?",
    "Give me a word that rhymes with cat.",
    "What do bees make?",
    "Name a planet.",
    "What is the opposite of hot?",
    "Tell me a fruit that is yellow.",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "Name a musical instrument.",
];

async fn pool(config: GeneratorConfig) -> GeneratorPool {
    GeneratorPool::start(common::generator(), config)
        .await
        .expect("pool")
}

fn stats(pool: &GeneratorPool) -> tokio::sync::watch::Receiver<BatchStats> {
    pool.batch_stats().expect("the native engine batches")
}

/// Each prompt alone, one after the other.
async fn alone(pool: &GeneratorPool, tokens: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    for p in PROMPTS {
        out.push(
            pool.complete(chat(p, tokens, "alone"))
                .await
                .expect("alone"),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_generations_each_give_what_they_give_alone() {
    let pool = Arc::new(
        pool(GeneratorConfig {
            max_batch: 16,
            ..GeneratorConfig::default()
        })
        .await,
    );
    let expected = alone(&pool, 24).await;
    assert_eq!(stats(&pool).borrow().max_batch_seen, 1, "alone ran alone");
    let runs: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let pool = pool.clone();
            let req = chat(p, 24, if i % 2 == 0 { "acme" } else { "globex" });
            tokio::spawn(async move { pool.complete(req).await })
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let got = run.await.unwrap().expect("batched");
        assert_eq!(got.text, expected[i].text, "prompt {i}: {:?}", PROMPTS[i]);
        assert_eq!(got.finish, expected[i].finish);
        assert_eq!(got.usage, expected[i].usage);
    }
    let seen = stats(&pool).borrow().max_batch_seen;
    assert!(
        seen >= 8,
        "sixteen generations shared steps: at most {seen} in one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_sequences_finish_with_the_same_text() {
    // Room for about five of the sixteen sequences (about 90 tokens each): the others wait,
    // and as the running ones grow some are preempted and recomputed.
    let per_token: usize = 30 * 192 * 2 * 4; // SmolLM2-135M: 30 layers, 3 kv heads of 64, f32
    let mib = (5 * 96 * per_token).div_ceil(1 << 20);
    let reps = 4;
    let pool = Arc::new(
        pool(GeneratorConfig {
            max_batch: 16,
            kv_cache_mib: mib,
            prefix_cache_entries: 0,
            ..GeneratorConfig::default()
        })
        .await,
    );
    let long = |p: &str| format!("{p} {}", "Answer in detail, with many words. ".repeat(reps));
    let mut expected = Vec::new();
    for p in PROMPTS {
        expected.push(pool.complete(chat(&long(p), 48, "t")).await.expect("alone"));
    }
    let runs: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let pool = pool.clone();
            let req = chat(&long(p), 48, "t");
            tokio::spawn(async move { pool.complete(req).await })
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let got = run.await.unwrap().expect("batched");
        assert_eq!(got.text, expected[i].text, "prompt {i}");
    }
    let s = stats(&pool).borrow().clone();
    assert!(
        s.preemptions > 0,
        "memory ran out and sequences were preempted: {s:?}"
    );
    assert!(s.kv_blocks_used <= s.kv_blocks, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_turn_of_a_conversation_reuses_the_cached_prefix() {
    let warm = pool(GeneratorConfig::default()).await;
    let first = chat("Tell me about the moon.", 32, "t");
    let answer = warm.complete(first.clone()).await.expect("first turn");
    let next = GenerateRequest {
        prompt: Prompt::Chat(vec![
            ChatMessage::new("user", "Tell me about the moon."),
            ChatMessage::new("assistant", &answer.text),
            ChatMessage::new("user", "And the sun?"),
        ]),
        ..first
    };
    let reused_before = stats(&warm).borrow().prefix_tokens_reused;
    let warm_answer = warm.complete(next.clone()).await.expect("second turn");
    let reused = stats(&warm).borrow().prefix_tokens_reused - reused_before;
    assert!(
        reused >= answer.usage.prompt_tokens as u64 - 1,
        "the first turn's prompt was not recomputed: {reused} tokens reused"
    );
    // The same answer as from a pool that never saw the first turn.
    let cold = pool(GeneratorConfig {
        prefix_cache_entries: 0,
        ..GeneratorConfig::default()
    })
    .await;
    let cold_answer = cold.complete(next).await.expect("cold");
    assert_eq!(warm_answer.text, cold_answer.text);
    assert_eq!(stats(&cold).borrow().prefix_tokens_reused, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_does_not_read_pauses_only_its_own_sequence() {
    let pool = Arc::new(pool(GeneratorConfig::default()).await);
    let mut slow = pool
        .generate(chat("Once upon a time", 300, "slow"))
        .await
        .expect("slow");
    // The slow reader takes one event and then nothing: its buffer fills and it is paused.
    slow.next().await.expect("event").expect("token");
    let mut watch = stats(&pool);
    tokio::time::timeout(Duration::from_secs(60), watch.wait_for(|s| s.paused == 1))
        .await
        .expect("the slow sequence is paused within 60 s")
        .expect("stats");
    // Meanwhile others are served to the end.
    for p in &PROMPTS[..3] {
        let c = pool.complete(chat(p, 16, "fast")).await.expect("fast");
        assert!(c.usage.completion_tokens > 0);
    }
    assert_eq!(
        watch.borrow().paused,
        1,
        "still paused, still holding its place"
    );
    // Reading again resumes it, and it ends normally.
    let mut tokens = 1;
    let done = loop {
        match slow.next().await.expect("event").expect("ok") {
            GenerationEvent::Done(c) => break c,
            GenerationEvent::Token { .. } => tokens += 1,
            GenerationEvent::Text { .. } => {}
        }
    };
    assert_eq!(done.usage.completion_tokens, tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_its_sequence_at_the_next_step() {
    let pool = pool(GeneratorConfig::default()).await;
    let mut stream = pool
        .generate(chat("Once upon a time", 1000, "t"))
        .await
        .expect("stream");
    stream.next().await.expect("event").expect("token");
    let mut watch = stats(&pool);
    tokio::time::timeout(Duration::from_secs(60), watch.wait_for(|s| s.running == 1))
        .await
        .expect("running within 60 s")
        .expect("stats");
    drop(stream);
    tokio::time::timeout(Duration::from_secs(60), watch.wait_for(|s| s.running == 0))
        .await
        .expect("freed within 60 s")
        .expect("stats");
    let s = watch.borrow().clone();
    assert!(s.steps < 200, "freed long before 1000 tokens: {s:?}");
    assert_eq!(pool.stats().in_flight, vec![0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_take_turns_when_the_batch_is_full() {
    // One sequence at a time: acme queues four, then globex one; globex goes second, not
    // fifth.
    let pool = Arc::new(
        pool(GeneratorConfig {
            max_batch: 1,
            ..GeneratorConfig::default()
        })
        .await,
    );
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut streams = Vec::new();
    for (i, p) in PROMPTS.iter().take(4).enumerate() {
        streams.push((
            format!("acme{i}"),
            pool.generate(chat(p, 8, "acme")).await.unwrap(),
        ));
    }
    streams.push((
        "globex".into(),
        pool.generate(chat(PROMPTS[9], 8, "globex")).await.unwrap(),
    ));
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|(name, s)| {
            let order = order.clone();
            tokio::spawn(async move {
                s.complete().await.expect("complete");
                order.lock().unwrap().push(name);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order[0], "acme0", "{order:?}");
    assert_eq!(order[1], "globex", "{order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_start_in_time_fails_with_a_queue_timeout() {
    let pool = pool(GeneratorConfig {
        max_batch: 1,
        queue_timeout_ms: 300,
        ..GeneratorConfig::default()
    })
    .await;
    let mut busy = pool
        .generate(chat("Once upon a time", 1000, "t"))
        .await
        .expect("busy");
    busy.next().await.expect("event").expect("token");
    let late = pool.complete(chat("Hello", 4, "t")).await;
    assert!(
        matches!(late, Err(Error::QueueTimeout(d)) if d == Duration::from_millis(300)),
        "{late:?}"
    );
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_needing_more_cache_than_the_pool_holds_is_refused_naming_the_key() {
    let pool = pool(GeneratorConfig {
        kv_cache_mib: 1,
        ..GeneratorConfig::default()
    })
    .await;
    // 1 MiB holds 16 tokens of this model's cache.
    let err = pool
        .complete(chat("Hello there, how are you?", 64, "t"))
        .await
        .expect_err("too long for the cache");
    assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("generator.kv_cache_mib"), "{msg}");
    let err = GeneratorPool::start(
        common::generator(),
        GeneratorConfig {
            kv_cache_mib: 0,
            ..GeneratorConfig::default()
        },
    )
    .await
    .expect_err("no memory at all");
    assert!(err.to_string().contains("generator.kv_cache_mib"), "{err}");
}
