//! Small random-weight models written by the tests themselves: shape and edge cases, and the
//! structured-output guarantee under arbitrary logits. Plus files that are not models.
//! (The real models are tested in embed.rs, generate.rs and structured.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;
use soma_inference::{
    EmbeddingModel, Engine, Error, FinishReason, GenerateRequest, GenerationModel, GeneratorConfig,
    GeneratorOptions, GeneratorPool, Prompt, Quantization, SamplingParams,
};

const EMB: usize = 64;
const FF: usize = 128;
const HEADS: u32 = 2;
const KV_HEADS: u32 = 1;
const HEAD_DIM: usize = EMB / HEADS as usize;

/// GPT-2's byte-level alphabet (what token strings are written in).
fn byte_char(b: u8) -> char {
    let mut n = 0u32;
    for x in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
        if !printable {
            n += 1;
        }
        if x == b {
            return if printable {
                char::from(x)
            } else {
                char::from_u32(255 + n).unwrap()
            };
        }
    }
    unreachable!()
}

fn random(rng: &mut fastrand::Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

struct TinyLlama {
    arch: &'static str,
    with_tokenizer: bool,
    embd_rows: Option<usize>,
    /// What `llama.block_count` claims (the file holds 2 blocks).
    claimed_blocks: u32,
}

impl Default for TinyLlama {
    fn default() -> Self {
        Self {
            arch: "llama",
            with_tokenizer: true,
            embd_rows: None,
            claimed_blocks: 2,
        }
    }
}

/// Writes a 2-block llama with random weights (attention in Q4_1, the rest F32) and a
/// byte-level tokenizer: 256 byte tokens, "Ġt", and three control tokens.
fn write_tiny_llama(path: &Path, spec: TinyLlama) {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    tokens.push(format!("{}t", byte_char(b' ')));
    let first_control = tokens.len() as u32;
    tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    let vocab = tokens.len();
    let types: Vec<Value> = (0..vocab)
        .map(|i| Value::I32(if i as u32 >= first_control { 3 } else { 1 }))
        .collect();
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(spec.arch.into())),
        ("llama.block_count", Value::U32(spec.claimed_blocks)),
        ("llama.context_length", Value::U32(512)),
        ("llama.embedding_length", Value::U32(EMB as u32)),
        ("llama.feed_forward_length", Value::U32(FF as u32)),
        ("llama.attention.head_count", Value::U32(HEADS)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS)),
        ("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.chat_template", Value::String(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
        )),
    ];
    if spec.with_tokenizer {
        md.extend([
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            (
                "tokenizer.ggml.merges",
                Value::Array(vec![Value::String(format!("{} t", byte_char(b' ')))]),
            ),
            ("tokenizer.ggml.eos_token_id", Value::U32(first_control + 2)),
            ("tokenizer.ggml.bos_token_id", Value::U32(first_control + 1)),
        ]);
    }
    let mut rng = fastrand::Rng::with_seed(7);
    let f32q = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let q41 = |t: Tensor| QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    let kv = KV_HEADS as usize * HEAD_DIM;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            f32q(random(
                &mut rng,
                &[spec.embd_rows.unwrap_or(vocab), EMB],
                1.0,
            )),
        ),
        ("output_norm.weight".into(), f32q(ones(EMB))),
    ];
    for b in 0..2 {
        let p = |n: &str| format!("blk.{b}.{n}.weight");
        tensors.extend([
            (p("attn_q"), q41(random(&mut rng, &[EMB, EMB], 0.3))),
            (p("attn_k"), q41(random(&mut rng, &[kv, EMB], 0.3))),
            (p("attn_v"), q41(random(&mut rng, &[kv, EMB], 0.3))),
            (p("attn_output"), q41(random(&mut rng, &[EMB, EMB], 0.3))),
            (p("attn_norm"), f32q(ones(EMB))),
            (p("ffn_gate"), f32q(random(&mut rng, &[FF, EMB], 0.3))),
            (p("ffn_up"), f32q(random(&mut rng, &[FF, EMB], 0.3))),
            (p("ffn_down"), f32q(random(&mut rng, &[EMB, FF], 0.3))),
            (p("ffn_norm"), f32q(ones(EMB))),
        ]);
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn load(path: &Path, quantization: Quantization) -> soma_inference::Result<GenerationModel> {
    load_on(path, quantization, Engine::Auto)
}

fn load_on(
    path: &Path,
    quantization: Quantization,
    engine: Engine,
) -> soma_inference::Result<GenerationModel> {
    GenerationModel::load(
        path,
        &Device::Cpu,
        &GeneratorOptions {
            engine,
            quantization,
            ..GeneratorOptions::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_weights_generate_with_every_quantization() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, TinyLlama::default());
    let cases = [Engine::Native, Engine::Candle].into_iter().flat_map(|e| {
        [
            Quantization::AsStored,
            Quantization::Q8_0,
            Quantization::Q4_0,
        ]
        .map(|q| (e, q))
    });
    for (engine, q) in cases {
        let model = load_on(&path, q, engine).unwrap();
        assert_eq!(model.engine(), engine);
        let pool = GeneratorPool::start(model, GeneratorConfig::default())
            .await
            .unwrap();
        let c = pool
            .complete(GenerateRequest {
                prompt: Prompt::Text("the tiny model".into()),
                params: SamplingParams::greedy(12),
                schema: None,
                tenant: None,
            })
            .await
            .unwrap();
        assert!(c.usage.completion_tokens >= 1 && c.usage.completion_tokens <= 12);
        assert_eq!(
            c.usage.prompt_tokens,
            "the tiny model".len() - 1,
            "' t' is one token (the merge)"
        );
        if c.finish == FinishReason::Length {
            assert_eq!(c.usage.completion_tokens, 12);
        }
        // max_tokens = 1 is one token.
        let one = pool
            .complete(GenerateRequest {
                prompt: Prompt::Text("x".into()),
                params: SamplingParams::greedy(1),
                schema: None,
                tenant: None,
            })
            .await
            .unwrap();
        assert_eq!(one.usage.completion_tokens, 1);
    }
}

/// Arbitrary logits cannot break structured output: with random weights and hot sampling,
/// every completed output parses and validates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_holds_under_random_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, TinyLlama::default());
    let pool = GeneratorPool::start(
        load(&path, Quantization::Q8_0).unwrap(),
        GeneratorConfig::default(),
    )
    .await
    .unwrap();
    let schemas = [
        json!({"type":"object","properties":{
            "a":{"type":"string","maxLength":6},
            "b":{"type":"array","maxItems":3,"items":{"type":"integer"}},
            "c":{"enum":["x","yz",3,null]},
            "d":{"type":"boolean"}},"required":["a","d"]}),
        json!({"type":"array","minItems":1,"maxItems":4,"items":{"type":"number"}}),
        json!({"type":"object","properties":{"n":{"type":"object","properties":{
            "k":{"type":"string","minLength":2,"maxLength":3}},"required":["k"]}},"required":["n"]}),
    ];
    let mut completed = 0;
    for (i, schema) in schemas.iter().enumerate() {
        let validator = jsonschema::validator_for(schema).unwrap();
        for seed in 0..8u64 {
            let req = GenerateRequest {
                prompt: Prompt::Text(format!("schema {i} seed {seed}")),
                params: SamplingParams {
                    temperature: 1.5,
                    seed,
                    max_tokens: 200,
                    ..SamplingParams::default()
                },
                schema: Some(schema.clone()),
                tenant: None,
            };
            match pool.complete(req).await {
                Ok(c) => {
                    let v: serde_json::Value = serde_json::from_str(&c.text)
                        .unwrap_or_else(|e| panic!("{:?} does not parse: {e}", c.text));
                    assert!(validator.is_valid(&v), "{} violates schema {i}", c.text);
                    completed += 1;
                }
                // Unbounded numbers can run long under random logits; anything else is a bug.
                Err(Error::IncompleteStructured(n)) => assert_eq!(n, 200),
                Err(e) => panic!("schema {i} seed {seed}: {e}"),
            }
        }
    }
    assert!(completed >= 16, "only {completed} of 24 completed");
}

#[test]
fn files_that_are_not_models_are_named_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "hello, not a model").unwrap();
    let e = load(&text, Quantization::Q8_0).unwrap_err().to_string();
    assert!(e.contains("notes.gguf") && e.contains("not a GGUF"), "{e}");

    let missing = dir.path().join("missing.gguf");
    let e = load(&missing, Quantization::Q8_0).unwrap_err().to_string();
    assert!(e.contains("missing.gguf"), "{e}");

    let bert = dir.path().join("bert.gguf");
    write_tiny_llama(
        &bert,
        TinyLlama {
            arch: "bert",
            ..TinyLlama::default()
        },
    );
    let e = load(&bert, Quantization::Q8_0).unwrap_err().to_string();
    assert!(
        e.contains("bert.gguf") && e.contains("architecture `bert`"),
        "{e}"
    );

    let no_tok = dir.path().join("no_tokenizer.gguf");
    write_tiny_llama(
        &no_tok,
        TinyLlama {
            with_tokenizer: false,
            ..TinyLlama::default()
        },
    );
    let e = load(&no_tok, Quantization::Q8_0).unwrap_err().to_string();
    assert!(
        e.contains("no_tokenizer.gguf") && e.contains("tokenizer.ggml.model"),
        "{e}"
    );

    let wrong = dir.path().join("wrong_shape.gguf");
    write_tiny_llama(
        &wrong,
        TinyLlama {
            embd_rows: Some(100),
            ..TinyLlama::default()
        },
    );
    let e = load(&wrong, Quantization::Q8_0).unwrap_err().to_string();
    assert!(
        e.contains("wrong_shape.gguf") && e.contains("100 rows"),
        "{e}"
    );

    // A file cut short: the tensor whose data is missing is named, as stored or re-quantized.
    let cut = dir.path().join("cut.gguf");
    write_tiny_llama(&cut, TinyLlama::default());
    let whole = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &whole[..whole.len() - 100]).unwrap();
    for q in [Quantization::AsStored, Quantization::Q8_0] {
        let e = load(&cut, q).unwrap_err().to_string();
        assert!(
            e.contains("cut.gguf") && e.contains("tensor `"),
            "{q:?}: {e}"
        );
    }

    // A block count the tensors do not back (here 4 billion): an error naming the key and
    // the missing tensor, on both engines, not an allocation of billions of layers.
    let lying = dir.path().join("lying_blocks.gguf");
    write_tiny_llama(
        &lying,
        TinyLlama {
            claimed_blocks: 4_000_000_000,
            ..TinyLlama::default()
        },
    );
    for engine in [Engine::Native, Engine::Candle] {
        let e = load_on(&lying, Quantization::AsStored, engine)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lying_blocks.gguf") && e.contains("block_count says 4000000000"),
            "{engine:?}: {e}"
        );
    }
}

#[test]
fn embedding_folders_that_are_wrong_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = EmbeddingModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");

    let config = json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "max_position_embeddings": 16, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "classifier_dropout": null, "model_type": "bert"});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = EmbeddingModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );

    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let e = EmbeddingModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not a safetensors"),
        "{e}"
    );

    // Real safetensors, wrong shape: a word embedding of width 4 where config says 8.
    let mut rng = fastrand::Rng::with_seed(1);
    let tensors = std::collections::HashMap::from([(
        "embeddings.word_embeddings.weight".to_string(),
        random(&mut rng, &[10, 4], 1.0),
    )]);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let e = EmbeddingModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("does not fit"),
        "{e}"
    );
}
