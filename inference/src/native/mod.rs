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

/// One sequence's key-value cache: per layer, keys and values `[position][kv head][head_dim]`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Cache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl Cache {
    /// Positions held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Keeps the first `len` positions (a shared prefix), drops the rest.
    pub(crate) fn truncate(&mut self, len: usize, kv_dim: usize) {
        if len >= self.len {
            return;
        }
        for k in &mut self.keys {
            k.truncate(len * kv_dim);
        }
        for v in &mut self.values {
            v.truncate(len * kv_dim);
        }
        self.len = len;
    }

    /// Forgets every position (the memory is kept for reuse).
    pub(crate) fn clear(&mut self) {
        self.truncate(0, 0);
    }
}

/// Buffers reused by every step of a model, whatever sequences it runs.
#[derive(Debug, Default)]
pub(crate) struct Work {
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
    /// Per input row: its sequence and position.
    rows: Vec<(usize, usize)>,
    scratch: Scratch,
}

/// A model with its own cache. Cloning shares the weights and starts an empty cache.
#[derive(Debug)]
pub(crate) struct Model {
    w: Arc<Weights>,
    cache: Cache,
    work: Work,
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

impl Weights {
    /// Floats of one position's keys (or values) in one layer.
    pub(crate) fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Bytes one position takes in a [`Cache`] (keys and values of every layer).
    pub(crate) fn cache_bytes_per_token(&self) -> usize {
        self.layers.len() * self.kv_dim() * 2 * std::mem::size_of::<f32>()
    }

    /// An empty cache for this model.
    pub(crate) fn cache(&self) -> Cache {
        Cache {
            keys: vec![Vec::new(); self.layers.len()],
            values: vec![Vec::new(); self.layers.len()],
            len: 0,
        }
    }

    /// Runs one step for several sequences at once: each `(cache, tokens)` runs `tokens` at
    /// the positions after its cache. Every weight row is read once for all the rows of the
    /// step; a row's result does not depend on the others (each is computed as it would be
    /// alone). Returns the logits after each sequence's last token, in order. Call it inside
    /// the compute pool (see [`with_warm_pool`]).
    pub(crate) fn step(
        &self,
        work: &mut Work,
        seqs: &mut [(&mut Cache, &[u32])],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        for (cache, tokens) in seqs.iter() {
            if tokens.is_empty() {
                candle_core::bail!("no tokens to run");
            }
            if cache.keys.len() != self.layers.len() {
                candle_core::bail!("the cache is not this model's");
            }
            if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
                candle_core::bail!("token {t} is outside the vocabulary of {}", self.vocab);
            }
        }
        // Prompt chunks of at most PREFILL_CHUNK rows in all: longer inputs run in several
        // passes, each sequence's logits kept from the pass that ran its last token.
        let mut logits: Vec<Option<Vec<f32>>> = vec![None; seqs.len()];
        let mut done = vec![0usize; seqs.len()];
        loop {
            let mut pass: Vec<(usize, usize)> = Vec::new();
            let mut rows = 0;
            for (i, (_, tokens)) in seqs.iter().enumerate() {
                let left = tokens.len() - done[i];
                if left == 0 {
                    continue;
                }
                // Every sequence gets a row; the chunk limit bounds the long ones.
                let take = left.min(PREFILL_CHUNK.saturating_sub(rows).max(1));
                pass.push((i, take));
                rows += take;
            }
            if pass.is_empty() {
                break;
            }
            let last_rows = self.layers_of(work, seqs, &pass, &done);
            let finished: Vec<(usize, usize)> = pass
                .iter()
                .zip(&last_rows)
                .filter(|((i, take), _)| done[*i] + take == seqs[*i].1.len())
                .map(|((i, _), &row)| (*i, row))
                .collect();
            for (out, (i, _)) in self.logits_of(work, &finished).into_iter().zip(&finished) {
                logits[*i] = Some(out);
            }
            for (i, take) in pass {
                done[i] += take;
            }
        }
        logits
            .into_iter()
            .map(|l| l.ok_or_else(|| candle_core::Error::Msg("a sequence ran no token".into())))
            .collect()
    }

    /// Runs `take` tokens of each sequence `i` of `pass` (from `done[i]` on) through the
    /// layers; returns the row of each one's last token in `work.x`.
    fn layers_of(
        &self,
        work: &mut Work,
        seqs: &mut [(&mut Cache, &[u32])],
        pass: &[(usize, usize)],
        done: &[usize],
    ) -> Vec<usize> {
        let w = self;
        let s = work;
        let (dim, hd, nh, nkv) = (w.dim, w.head_dim, w.n_head, w.n_kv_head);
        let kv_dim = nkv * hd;
        s.rows.clear();
        for &(i, take) in pass {
            let start = seqs[i].0.len;
            s.rows.extend((0..take).map(|t| (i, start + t)));
        }
        let n = s.rows.len();
        s.x.resize(n * dim, 0.0);
        let mut r = 0;
        for &(i, take) in pass {
            for &tok in &seqs[i].1[done[i]..done[i] + take] {
                w.embed
                    .row_f32(tok as usize, &mut s.x[r * dim..(r + 1) * dim]);
                r += 1;
            }
        }
        // (`matmul` sizes its outputs: q, k, v, o, g, u.)
        s.h.resize(n * dim, 0.0);
        s.att.resize(n * dim, 0.0);
        let pairs = w.rope_dim / 2;
        s.rot.clear();
        for &(_, pos) in &s.rows {
            let pos = pos as f32;
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
            let mut first = 0;
            for &(i, take) in pass {
                let rows = first * kv_dim..(first + take) * kv_dim;
                let cache = &mut *seqs[i].0;
                cache.keys[li].extend_from_slice(&s.k[rows.clone()]);
                cache.values[li].extend_from_slice(&s.v[rows]);
                first += take;
            }
            // Each row attends over its own sequence's cache: rows in parallel when there
            // are several (each computed as it would be alone).
            let row = |t: usize, att: &mut [f32], scores: &mut Vec<f32>| {
                let (i, pos) = s.rows[t];
                let (keys, values) = (&seqs[i].0.keys[li], &seqs[i].0.values[li]);
                scores.resize(pos + 1, 0.0);
                for h in 0..nh {
                    let kvh = h / group;
                    let at = |p: usize| p * kv_dim + kvh * hd;
                    attend(
                        &s.q[t * dim + h * hd..t * dim + (h + 1) * hd],
                        |p| &keys[at(p)..at(p) + hd],
                        |p| &values[at(p)..at(p) + hd],
                        scale,
                        scores,
                        &mut att[h * hd..(h + 1) * hd],
                    );
                }
            };
            if n > 1 && rayon::current_num_threads() > 1 {
                use rayon::prelude::*;
                s.att[..n * dim]
                    .par_chunks_mut(dim)
                    .enumerate()
                    .for_each_init(Vec::new, |scores, (t, att)| row(t, att, scores));
            } else {
                let mut scores = std::mem::take(&mut s.scores);
                for (t, att) in s.att[..n * dim].chunks_mut(dim).enumerate() {
                    row(t, att, &mut scores);
                }
                s.scores = scores;
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
        let mut last = Vec::with_capacity(pass.len());
        let mut first = 0;
        for &(i, take) in pass {
            seqs[i].0.len += take;
            first += take;
            last.push(first - 1);
        }
        last
    }

    /// The logits after each `(sequence, row)` of `work.x`, in order, in one pass over the
    /// output matrix.
    fn logits_of(&self, work: &mut Work, rows: &[(usize, usize)]) -> Vec<Vec<f32>> {
        if rows.is_empty() {
            return Vec::new();
        }
        let (dim, n) = (self.dim, rows.len());
        work.h.resize(n * dim, 0.0);
        for (j, &(_, row)) in rows.iter().enumerate() {
            rms_norm(
                &work.x[row * dim..(row + 1) * dim],
                &self.norm,
                self.eps,
                &mut work.h[j * dim..(j + 1) * dim],
            );
        }
        let out = self.output.as_ref().unwrap_or(&self.embed);
        let mut all = Vec::new();
        matmul(
            &[out],
            &work.h[..n * dim],
            n,
            &mut [&mut all],
            &mut work.scratch,
        );
        all.chunks_exact(self.vocab).map(<[f32]>::to_vec).collect()
    }
}

impl Model {
    pub(crate) fn new(w: Arc<Weights>) -> Self {
        Self {
            cache: w.cache(),
            w,
            work: Work::default(),
        }
    }

    /// The weights, shared.
    pub(crate) fn weights(&self) -> &Arc<Weights> {
        &self.w
    }

    /// Forgets the cached sequence.
    pub(crate) fn clear(&mut self) {
        self.cache.clear();
    }

    /// Runs `tokens` at positions `pos..` (which must continue the cache) and returns the
    /// logits of the last one.
    pub(crate) fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        if pos != self.cache.len {
            candle_core::bail!(
                "position {pos} does not continue a cache of {}",
                self.cache.len
            );
        }
        let Self { w, cache, work } = self;
        let mut logits = with_warm_pool(|| w.step(work, &mut [(cache, tokens)]))?;
        logits
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("no logits".into()))
    }
}
