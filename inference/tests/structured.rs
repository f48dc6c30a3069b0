//! Schema-constrained output from the real SmolLM2: every output parses and validates
//! against its schema (checked by the independent `jsonschema` crate).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::{Value, json};
use soma_inference::{
    ChatMessage, FinishReason, GenerateRequest, GeneratorConfig, GeneratorPool, Prompt,
    SamplingParams,
};

fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "person",
            json!({"type":"object","properties":{
                "name":{"type":"string","maxLength":40},
                "age":{"type":"integer"},
                "email":{"type":"string","maxLength":60}},
                "required":["name","age"],"additionalProperties":false}),
        ),
        (
            "task plan",
            json!({"type":"object","properties":{
                "goal":{"type":"string","maxLength":80},
                "tasks":{"type":"array","minItems":1,"maxItems":4,"items":{
                    "type":"object","properties":{
                        "title":{"type":"string","maxLength":50},
                        "priority":{"enum":["low","medium","high"]},
                        "depends_on":{"type":"array","maxItems":3,"items":{"type":"integer"}}},
                    "required":["title","priority"]}}},
                "required":["goal","tasks"]}),
        ),
        (
            "sentiment",
            json!({"type":"object","properties":{
                "sentiment":{"enum":["positive","negative","neutral"]},
                "confidence":{"type":"number"}},
                "required":["sentiment","confidence"]}),
        ),
        (
            "keywords",
            json!({"type":"array","minItems":2,"maxItems":5,
                "items":{"type":"string","minLength":1,"maxLength":20}}),
        ),
        (
            "product",
            json!({"type":"object","properties":{
                "name":{"type":"string","maxLength":40},
                "price":{"type":"number"},
                "in_stock":{"type":"boolean"},
                "tags":{"type":"array","maxItems":3,"items":{"type":"string","maxLength":15}},
                "discontinued":{"type":"null"}},
                "required":["name","price","in_stock"]}),
        ),
    ]
}

const PROMPTS: [&str; 20] = [
    "Describe Ada Lovelace.",
    "Plan a birthday party.",
    "I love this phone, the battery lasts forever!",
    "List keywords for an article about volcanoes.",
    "Describe a cheap wireless mouse.",
    "Describe a software engineer called Bob who is 31.",
    "Plan the migration of a database to a new server.",
    "The service was slow and the food was cold.",
    "List keywords for a recipe of tomato soup.",
    "Describe a premium espresso machine.",
    "Describe the fictional detective Sherlock Holmes.",
    "Plan a three-day trip to Rome.",
    "The package arrived on Tuesday.",
    "List keywords for a tutorial about Rust ownership.",
    "Describe a pair of running shoes on sale.",
    "Describe a retired teacher who loves gardening.",
    "Plan writing a research paper on bees.",
    "Absolutely terrible customer support, never again.",
    "List keywords for a news story about an election.",
    "Describe a second-hand bicycle.",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_prompts_give_valid_json_for_their_schema() {
    let pool = GeneratorPool::start(
        common::generator(),
        GeneratorConfig {
            replicas: 2,
            ..GeneratorConfig::default()
        },
    )
    .await
    .expect("pool");
    let schemas = schemas();
    let mut tasks = Vec::new();
    let pool = std::sync::Arc::new(pool);
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let (kind, schema) = schemas[i % schemas.len()].clone();
        let pool = pool.clone();
        let messages = vec![
            ChatMessage::new(
                "system",
                format!(
                    "You answer with a {kind} as JSON only, matching this JSON schema: {schema}"
                ),
            ),
            ChatMessage::new("user", *prompt),
        ];
        let params = SamplingParams {
            // Half greedy, half sampled: both must stay inside the schema.
            temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
            seed: i as u64,
            max_tokens: 300,
            ..SamplingParams::default()
        };
        tasks.push(tokio::spawn(async move {
            let req = GenerateRequest {
                prompt: Prompt::Chat(messages),
                params,
                schema: Some(schema.clone()),
                tenant: None,
            };
            (i, schema, pool.complete(req).await)
        }));
    }
    for t in tasks {
        let (i, schema, result) = t.await.expect("task");
        let c = result.unwrap_or_else(|e| panic!("prompt {i}: {e}"));
        println!("{i}: {}", c.text);
        let parsed: Value = serde_json::from_str(&c.text)
            .unwrap_or_else(|e| panic!("prompt {i}: output {:?} does not parse: {e}", c.text));
        assert_eq!(c.json.as_ref(), Some(&parsed));
        assert_eq!(c.finish, FinishReason::Stop);
        let validator = jsonschema::validator_for(&schema).expect("schema compiles");
        let errors: Vec<String> = validator
            .iter_errors(&parsed)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "prompt {i}: {} violates the schema: {errors:?}",
            c.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_schemas_are_refused_before_generation() {
    let pool = GeneratorPool::start(common::generator(), GeneratorConfig::default())
        .await
        .expect("pool");
    let req = GenerateRequest {
        prompt: Prompt::Text("x".into()),
        params: SamplingParams::greedy(10),
        schema: Some(json!({"type":"string","format":"email"})),
        tenant: None,
    };
    let err = pool.generate(req).await.expect_err("refused").to_string();
    assert!(err.contains("/format"), "{err}");
}
