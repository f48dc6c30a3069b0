//! The native CPU engine. For llama-family GGUF models: the same transformer as candle's
//! `quantized_llama`, computed on plain buffers with quantized dot products that read the
//! file's 4-bit weights as stored (no re-quantization), fused per layer, no allocation per
//! token. For BERT encoders: see [`bert`]. The models use it on the CPU; candle's serve CUDA
//! and are the reference the tests compare against.

pub(crate) mod bert;
mod kernels;
mod matrix;

use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::gguf_file;

use self::matrix::{Matrix, Scratch, matmul, pack};

/// Largest number of prompt tokens run through the layers at once.
const PREFILL_CHUNK: usize = 64;

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

/// The weights and shape of a model, shared by every replica.
#[derive(Debug)]
pub(crate) struct Weights {
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Option<Matrix>,
    dim: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    rope_dim: usize,
    eps: f32,
    /// Inverse frequencies of the rotary embedding, one per pair.
    inv_freq: Vec<f32>,
    vocab: usize,
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> candle_core::Result<usize> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v.to_u32()? as usize),
        None => candle_core::bail!("metadata key `{key}` is missing"),
    }
}

impl Weights {
    /// Reads a llama GGUF (already checked by `gguf::load`).
    pub(crate) fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
    ) -> candle_core::Result<Self> {
        let cpu = Device::Cpu;
        let mut tensor = |name: &str| ct.tensor(reader, name, &cpu);
        let n_head = meta_u32(ct, "llama.attention.head_count")?;
        let n_kv_head = meta_u32(ct, "llama.attention.head_count_kv")?;
        let blocks = meta_u32(ct, "llama.block_count")?;
        let dim = meta_u32(ct, "llama.embedding_length")?;
        let rope_dim = meta_u32(ct, "llama.rope.dimension_count")?;
        if ct.metadata.contains_key("llama.expert_count") && meta_u32(ct, "llama.expert_count")? > 1
        {
            candle_core::bail!("mixture-of-experts models are not supported by the native engine");
        }
        let eps = match ct.metadata.get("llama.attention.layer_norm_rms_epsilon") {
            Some(v) => v.to_f32()?,
            None => candle_core::bail!(
                "metadata key `llama.attention.layer_norm_rms_epsilon` is missing"
            ),
        };
        let base = ct
            .metadata
            .get("llama.rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        if dim == 0 || n_head == 0 || n_kv_head == 0 || dim % n_head != 0 || n_head % n_kv_head != 0
        {
            candle_core::bail!(
                "{n_head} heads, {n_kv_head} key-value heads and width {dim} do not fit"
            );
        }
        let head_dim = dim / n_head;
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            candle_core::bail!("rotary dimension {rope_dim} does not fit heads of {head_dim}");
        }
        let inv_freq = (0..rope_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / rope_dim as f32))
            .collect();
        let vector = |t: candle_core::quantized::QTensor, want: usize, name: &str| {
            let v = matrix::f32_of(&t)?;
            if v.len() != want {
                candle_core::bail!("`{name}` has {} values, expected {want}", v.len());
            }
            Ok(v)
        };
        let kv_dim = n_kv_head * head_dim;
        let matrix = |t: candle_core::quantized::QTensor, rows: usize, cols: usize, name: &str| {
            let m = Matrix::from_qtensor(&t)?;
            if m.rows() != rows || m.cols() != cols {
                candle_core::bail!(
                    "`{name}` is {}x{}, expected {rows}x{cols}",
                    m.rows(),
                    m.cols()
                );
            }
            Ok(m)
        };
        let mut embed = Matrix::from_qtensor(&tensor("token_embd.weight")?)?;
        if embed.cols() != dim {
            candle_core::bail!(
                "`token_embd.weight` rows have {} values, expected {dim}",
                embed.cols()
            );
        }
        let vocab = embed.rows();
        if vocab == 0 {
            candle_core::bail!("`token_embd.weight` has no rows");
        }
        // `blocks` comes from the file: no allocation sized by it before its tensors are seen.
        let mut layers = Vec::new();
        for i in 0..blocks {
            let name = |s: &str| format!("blk.{i}.{s}.weight");
            let gate = tensor(&name("ffn_gate"))?;
            let ffn = gate.shape().dims().first().copied().unwrap_or(0);
            if ffn == 0 {
                candle_core::bail!("`{}` has no rows", name("ffn_gate"));
            }
            layers.push(Layer {
                attn_norm: vector(tensor(&name("attn_norm"))?, dim, &name("attn_norm"))?,
                wq: matrix(tensor(&name("attn_q"))?, dim, dim, &name("attn_q"))?,
                wk: matrix(tensor(&name("attn_k"))?, kv_dim, dim, &name("attn_k"))?,
                wv: matrix(tensor(&name("attn_v"))?, kv_dim, dim, &name("attn_v"))?,
                wo: matrix(
                    tensor(&name("attn_output"))?,
                    dim,
                    dim,
                    &name("attn_output"),
                )?,
                ffn_norm: vector(tensor(&name("ffn_norm"))?, dim, &name("ffn_norm"))?,
                gate: matrix(gate, ffn, dim, &name("ffn_gate"))?,
                up: matrix(tensor(&name("ffn_up"))?, ffn, dim, &name("ffn_up"))?,
                down: matrix(tensor(&name("ffn_down"))?, dim, ffn, &name("ffn_down"))?,
            });
        }
        let norm = vector(tensor("output_norm.weight")?, dim, "output_norm.weight")?;
        let mut output = if ct.tensor_infos.contains_key("output.weight") {
            Some(matrix(
                tensor("output.weight")?,
                vocab,
                dim,
                "output.weight",
            )?)
        } else {
            None
        };
        let mut all: Vec<&mut Matrix> = vec![&mut embed];
        all.extend(output.iter_mut());
        for l in &mut layers {
            all.extend([
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ]);
        }
        pack(&mut all).map_err(|e| candle_core::Error::Msg(format!("weights mapping: {e}")))?;
        Ok(Self {
            embed,
            layers,
            norm,
            output,
            dim,
            n_head,
            n_kv_head,
            head_dim,
            rope_dim,
            eps,
            inv_freq,
            vocab,
        })
    }
}

/// Per-sequence state: the key-value cache and reusable buffers.
#[derive(Debug, Default)]
struct State {
    /// Per layer: keys and values, `[position][kv head][head_dim]`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    scores: Vec<f32>,
    rot: Vec<(f32, f32)>,
    scratch: Scratch,
}

/// A model with its own cache. Cloning shares the weights and starts an empty cache.
#[derive(Debug)]
pub(crate) struct Model {
    w: Arc<Weights>,
    s: State,
}

impl Clone for Model {
    fn clone(&self) -> Self {
        Self::new(self.w.clone())
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// Rotates interleaved pairs `(2i, 2i+1)` of each head by the angles whose sines and
/// cosines are `rot[i]`.
fn rope(x: &mut [f32], head_dim: usize, rot: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(sin, cos)) in rot.iter().enumerate() {
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * cos - b * sin;
            head[2 * i + 1] = a * sin + b * cos;
        }
    }
}

/// One head of scaled dot-product attention for one query: `out = softmax(q . k_p * scale)
/// weighted sum of v_p` over the positions `0..scores.len()` (`key(p)`, `value(p)`).
pub(crate) fn attend<'a>(
    q: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let mut max = f32::NEG_INFINITY;
    for (p, sc) in scores.iter_mut().enumerate() {
        *sc = kernels::dot_f32(q, key(p)) * scale;
        max = max.max(*sc);
    }
    let mut sum = 0.0;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    out.fill(0.0);
    for (p, sc) in scores.iter().enumerate() {
        kernels::axpy(sc / sum, value(p), out);
    }
}

/// Runs `f` while the other threads of the current rayon pool wait for work spinning
/// rather than asleep. A token takes some 120 parallel steps of tens of microseconds each
/// (a BERT batch some 30 of a few milliseconds); waking a sleeping thread for each cost more
/// than the step saved. The spinning stops when `f` returns (the price: the replica's
/// threads stay busy while it computes).
pub(crate) fn with_warm_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 || rayon::current_thread_index().is_none() {
        return f();
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let caller = rayon::current_thread_index();
    /// Ends the spinning however `f` ends (a panic included: the scope waits for the
    /// spinning jobs before it unwinds).
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Release);
        }
    }
    rayon::scope(|scope| {
        let _stop = Stop(&done);
        for _ in 0..helpers {
            scope.spawn(|_| {
                // The caller may run this job itself while it waits inside `f`: it must not
                // spin then (it is the one that ends the spinning).
                if rayon::current_thread_index() == caller {
                    return;
                }
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        f()
    })
}

impl Model {
    pub(crate) fn new(w: Arc<Weights>) -> Self {
        let layers = w.layers.len();
        Self {
            w,
            s: State {
                keys: vec![Vec::new(); layers],
                values: vec![Vec::new(); layers],
                ..State::default()
            },
        }
    }

    /// Forgets the cached sequence.
    pub(crate) fn clear(&mut self) {
        for k in &mut self.s.keys {
            k.clear();
        }
        for v in &mut self.s.values {
            v.clear();
        }
        self.s.len = 0;
    }

    /// Runs `tokens` at positions `pos..` (which must continue the cache) and returns the
    /// logits of the last one.
    pub(crate) fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        if tokens.is_empty() {
            candle_core::bail!("no tokens to run");
        }
        if pos != self.s.len {
            candle_core::bail!("position {pos} does not continue a cache of {}", self.s.len);
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.w.vocab) {
            candle_core::bail!("token {t} is outside the vocabulary of {}", self.w.vocab);
        }
        let run = |model: &mut Self| {
            let mut done = 0;
            while done < tokens.len() {
                let n = (tokens.len() - done).min(PREFILL_CHUNK);
                model.layers(&tokens[done..done + n]);
                done += n;
            }
            model.logits()
        };
        Ok(with_warm_pool(|| run(self)))
    }

    fn layers(&mut self, tokens: &[u32]) {
        let w = &*self.w;
        let s = &mut self.s;
        let n = tokens.len();
        let (dim, hd, nh, nkv) = (w.dim, w.head_dim, w.n_head, w.n_kv_head);
        let kv_dim = nkv * hd;
        let start = s.len;
        s.x.resize(n * dim, 0.0);
        for (t, &tok) in tokens.iter().enumerate() {
            w.embed
                .row_f32(tok as usize, &mut s.x[t * dim..(t + 1) * dim]);
        }
        // (`matmul` sizes its outputs: q, k, v, o, g, u.)
        s.h.resize(n * dim, 0.0);
        s.att.resize(n * dim, 0.0);
        let pairs = w.rope_dim / 2;
        s.rot.clear();
        for t in 0..n {
            let pos = (start + t) as f32;
            s.rot.extend(w.inv_freq.iter().map(|f| (pos * f).sin_cos()));
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        for (li, layer) in w.layers.iter().enumerate() {
            for t in 0..n {
                let r = t * dim..(t + 1) * dim;
                rms_norm(&s.x[r.clone()], &layer.attn_norm, w.eps, &mut s.h[r]);
            }
            matmul(
                &[&layer.wq, &layer.wk, &layer.wv],
                &s.h,
                n,
                &mut [&mut s.q, &mut s.k, &mut s.v],
                &mut s.scratch,
            );
            for t in 0..n {
                let rot = &s.rot[t * pairs..(t + 1) * pairs];
                rope(&mut s.q[t * dim..(t + 1) * dim], hd, rot);
                rope(&mut s.k[t * kv_dim..(t + 1) * kv_dim], hd, rot);
            }
            s.keys[li].extend_from_slice(&s.k);
            s.values[li].extend_from_slice(&s.v);
            let (keys, values) = (&s.keys[li], &s.values[li]);
            for t in 0..n {
                let seen = start + t + 1;
                s.scores.resize(seen, 0.0);
                for h in 0..nh {
                    let kvh = h / group;
                    let at = |p: usize| p * kv_dim + kvh * hd;
                    attend(
                        &s.q[t * dim + h * hd..t * dim + (h + 1) * hd],
                        |p| &keys[at(p)..at(p) + hd],
                        |p| &values[at(p)..at(p) + hd],
                        scale,
                        &mut s.scores,
                        &mut s.att[t * dim + h * hd..t * dim + (h + 1) * hd],
                    );
                }
            }
            matmul(&[&layer.wo], &s.att, n, &mut [&mut s.o], &mut s.scratch);
            for (x, o) in s.x.iter_mut().zip(&s.o) {
                *x += o;
            }
            for t in 0..n {
                let r = t * dim..(t + 1) * dim;
                rms_norm(&s.x[r.clone()], &layer.ffn_norm, w.eps, &mut s.h[r]);
            }
            matmul(
                &[&layer.gate, &layer.up],
                &s.h,
                n,
                &mut [&mut s.g, &mut s.u],
                &mut s.scratch,
            );
            for (g, u) in s.g.iter_mut().zip(&s.u) {
                // silu(g) * u
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            matmul(&[&layer.down], &s.g, n, &mut [&mut s.o], &mut s.scratch);
            for (x, o) in s.x.iter_mut().zip(&s.o) {
                *x += o;
            }
        }
        s.len += n;
        // Keep only the last input's hidden state for the logits.
        let last = (n - 1) * dim;
        s.x.copy_within(last..last + dim, 0);
        s.x.truncate(dim);
    }

    fn logits(&mut self) -> Vec<f32> {
        let w = &*self.w;
        let s = &mut self.s;
        s.h.resize(w.dim, 0.0);
        rms_norm(&s.x[..w.dim], &w.norm, w.eps, &mut s.h[..w.dim]);
        let out = w.output.as_ref().unwrap_or(&w.embed);
        let mut logits = Vec::with_capacity(w.vocab);
        matmul(&[out], &s.h[..w.dim], 1, &mut [&mut logits], &mut s.scratch);
        logits
    }
}
