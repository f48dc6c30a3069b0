//! P10: SmolLM2-135M GGUF generation, CPU, greedy, against llama.cpp (llama-cpp-python) on the
//! same file, prompt and thread count. Decode tokens/s after the first token, and time to
//! first token, for each engine and load-time quantization (`P10_ONLY=native` for just ours).
//!
//! `CANDLE_NUM_THREADS=2 RAYON_NUM_THREADS=2 cargo bench -p soma-inference --bench p10_generation`
//! (peer: `bash benches/peers/install.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Instant;

use soma_inference::Engine;
use soma_inference::{
    GenerateRequest, GenerationEvent, GenerationModel, GeneratorConfig, GeneratorOptions,
    GeneratorPool, Prompt, Quantization, SamplingParams,
};

const PROMPT: &str = "The history of the Roman Empire begins";
const TOKENS: usize = 128;
const RUNS: usize = 3;

fn main() {
    let threads = soma_inference::cpu_threads();
    let gguf = common::models().join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "P10 generation: {} ({TOKENS} tokens greedy, {threads} thread(s))",
        gguf.display()
    );
    // P10_ONLY=native (or a longer prefix of a name below) runs only those.
    let only: Option<String> = std::env::var("P10_ONLY").ok();
    let mut best_rate: f64 = 0.0;
    let mut best_name = "";
    let configs = [
        (
            "native Q4_1 (as stored)",
            Engine::Native,
            Quantization::AsStored,
        ),
        (
            "native Q8_0 (re-quantized)",
            Engine::Native,
            Quantization::Q8_0,
        ),
        (
            "candle Q8_0 (re-quantized)",
            Engine::Candle,
            Quantization::Q8_0,
        ),
    ];
    let measure = |name: &str, engine: Engine, quant: Quantization| {
        let t = Instant::now();
        let options = GeneratorOptions {
            engine,
            quantization: quant,
            ..GeneratorOptions::default()
        };
        let model = GenerationModel::load(&gguf, &candle_core::Device::Cpu, &options).unwrap();
        let load = t.elapsed();
        let (ttft, rate, tokens) = rt.block_on(async {
            let pool = GeneratorPool::start(model, GeneratorConfig::default())
                .await
                .unwrap();
            let mut results = Vec::new();
            for _ in 0..=RUNS {
                let req = GenerateRequest {
                    prompt: Prompt::Text(PROMPT.into()),
                    params: SamplingParams::greedy(TOKENS),
                    schema: None,
                    tenant: None,
                };
                let start = Instant::now();
                let mut stream = pool.generate(req).await.unwrap();
                let mut first = None;
                let mut n = 0;
                while let Some(ev) = stream.next().await {
                    if let GenerationEvent::Token { .. } = ev.unwrap() {
                        first.get_or_insert_with(Instant::now);
                        n += 1;
                    }
                }
                let first = first.unwrap();
                results.push((
                    (first - start).as_secs_f64(),
                    (n - 1) as f64 / first.elapsed().as_secs_f64(),
                    n,
                ));
            }
            results.remove(0); // warm-up
            results
                .into_iter()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap()
        });
        println!(
            "  soma-inference {name:<27} {rate:>7.1} tokens/s decode, first token {:>6.1} ms, {tokens} tokens, load {:.1} s",
            ttft * 1e3,
            load.as_secs_f64()
        );
        rate
    };
    for (name, engine, quant) in configs {
        if only.as_deref().is_some_and(|o| !name.starts_with(o)) {
            continue;
        }
        let rate = measure(name, engine, quant);
        if rate > best_rate {
            best_rate = rate;
            best_name = name;
        }
    }
    let peer = common::run_peer(
        "p10_llama_cpp.py",
        &[
            gguf.display().to_string(),
            PROMPT.to_string(),
            threads.to_string(),
            TOKENS.to_string(),
            RUNS.to_string(),
        ],
    );
    match peer {
        Ok(p) => {
            let rate = p["decode_per_s"].as_f64().unwrap();
            println!(
                "  {:<42} {rate:>7.1} tokens/s decode, first token {:>6.1} ms, {} tokens",
                p["peer"].as_str().unwrap_or("peer"),
                p["ttft"].as_f64().unwrap() * 1e3,
                p["tokens"]
            );
            // The best configuration again after the peer, so that ours bracket its run.
            if let Some(&(name, engine, quant)) = configs.iter().find(|c| c.0 == best_name) {
                best_rate = best_rate.max(measure(name, engine, quant));
            }
            println!(
                "ratio (soma-inference {best_name} / llama.cpp Q4_1): {:.2}x (target >= 0.8x)",
                best_rate / rate
            );
        }
        Err(why) => println!("peer not run: {why}\nratio: unavailable"),
    }
}
