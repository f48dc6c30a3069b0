//! The native CPU engine for BERT-family encoders (sentence embeddings): the same network as
//! candle's `BertModel`, computed on plain buffers with the batch's real tokens packed
//! together (no padding computed), query/key/value in one matrix product, exact GELU through
//! a vectorised erf, and mean pooling + L2 normalisation fused at the end.

use std::collections::HashMap;

use candle_core::Tensor;
use rayon::prelude::*;

use super::kernels;

#[derive(Debug)]
struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
}

#[derive(Debug)]
struct Layer {
    /// Query, key and value weights side by side (`dim x 3 dim`: every weight matrix is
    /// kept transposed, `in x out`), and their biases.
    qkv_w: Vec<f32>,
    qkv_b: Vec<f32>,
    o_w: Vec<f32>,
    o_b: Vec<f32>,
    ln1: Norm,
    i_w: Vec<f32>,
    i_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
    ln2: Norm,
}

/// The shape of a BERT encoder, from `config.json`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) dim: usize,
    pub(crate) heads: usize,
    pub(crate) layers: usize,
    pub(crate) ffn: usize,
    pub(crate) eps: f32,
}

/// A BERT encoder's weights.
#[derive(Debug)]
pub(crate) struct Encoder {
    word: Vec<f32>,
    pos: Vec<f32>,
    /// The token-type-0 embedding (sentence embeddings use one segment).
    segment: Vec<f32>,
    ln: Norm,
    layers: Vec<Layer>,
    shape: Shape,
    vocab: usize,
    max_pos: usize,
}

/// The buffers of one forward pass.
#[derive(Debug, Default)]
struct Buffers {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    o: Vec<f32>,
    h: Vec<f32>,
}

/// `x <- layer_norm(x + add)` row by row (`add` may be empty), rows split across threads.
fn add_norm(x: &mut [f32], add: &[f32], n: &Norm, eps: f32) {
    let d = n.w.len();
    x.par_chunks_mut(d * 32).enumerate().for_each(|(c, rows)| {
        if !add.is_empty() {
            let add = &add[c * d * 32..c * d * 32 + rows.len()];
            for (v, a) in rows.iter_mut().zip(add) {
                *v += a;
            }
        }
        layer_norm(rows, n, eps);
    });
}

fn layer_norm(x: &mut [f32], n: &Norm, eps: f32) {
    let d = n.w.len();
    for row in x.chunks_exact_mut(d) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&n.w).zip(&n.b) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

impl Encoder {
    /// Takes the weights out of a safetensors map (names as in Hugging Face's `BertModel`,
    /// with or without a `bert.` prefix).
    pub(crate) fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        shape: Shape,
    ) -> candle_core::Result<Self> {
        let find = |name: &str| {
            tensors
                .get(name)
                .or_else(|| tensors.get(&format!("bert.{name}")))
        };
        let get = |name: &str, want: &[usize]| -> candle_core::Result<Vec<f32>> {
            let t = find(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{name}` is missing")))?;
            if t.dims() != want {
                candle_core::bail!("tensor `{name}` is {:?}, expected {want:?}", t.dims());
            }
            t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let Shape {
            dim, layers, ffn, ..
        } = shape;
        if dim == 0 || ffn == 0 {
            candle_core::bail!("width {dim} and intermediate size {ffn} must not be zero");
        }
        if shape.heads == 0 || dim % shape.heads != 0 {
            candle_core::bail!("{} heads do not divide the width {dim}", shape.heads);
        }
        let norm = |prefix: &str| -> candle_core::Result<Norm> {
            Ok(Norm {
                w: get(&format!("{prefix}.weight"), &[dim])?,
                b: get(&format!("{prefix}.bias"), &[dim])?,
            })
        };
        // Vocabulary, positions and segments are as many as the tables have rows.
        let rows_of = |name: &str| find(name).map(|t| t.dims2().map(|(n, _)| n)).transpose();
        let vocab = rows_of("embeddings.word_embeddings.weight")?.unwrap_or(0);
        let max_pos = rows_of("embeddings.position_embeddings.weight")?.unwrap_or(0);
        let types = rows_of("embeddings.token_type_embeddings.weight")?.unwrap_or(0);
        let word = get("embeddings.word_embeddings.weight", &[vocab, dim])?;
        let pos = get("embeddings.position_embeddings.weight", &[max_pos, dim])?;
        let segment = if types > 0 {
            let all = get("embeddings.token_type_embeddings.weight", &[types, dim])?;
            all[..dim].to_vec()
        } else {
            vec![0.0; dim]
        };
        // The products read weights as `k x n` rows (transposed once here).
        let t = |w: Vec<f32>, n: usize, k: usize| -> Vec<f32> {
            let mut out = vec![0f32; n * k];
            for r in 0..n {
                for c in 0..k {
                    out[c * n + r] = w[r * k + c];
                }
            }
            out
        };
        // `layers` comes from config.json: nothing allocated by it before the tensors are seen.
        let mut out = Vec::new();
        for i in 0..layers {
            let p = format!("encoder.layer.{i}");
            let mut qkv_w = get(&format!("{p}.attention.self.query.weight"), &[dim, dim])?;
            qkv_w.extend(get(&format!("{p}.attention.self.key.weight"), &[dim, dim])?);
            qkv_w.extend(get(
                &format!("{p}.attention.self.value.weight"),
                &[dim, dim],
            )?);
            let mut qkv_b = get(&format!("{p}.attention.self.query.bias"), &[dim])?;
            qkv_b.extend(get(&format!("{p}.attention.self.key.bias"), &[dim])?);
            qkv_b.extend(get(&format!("{p}.attention.self.value.bias"), &[dim])?);
            out.push(Layer {
                qkv_w: t(qkv_w, 3 * dim, dim),
                qkv_b,
                o_w: t(
                    get(&format!("{p}.attention.output.dense.weight"), &[dim, dim])?,
                    dim,
                    dim,
                ),
                o_b: get(&format!("{p}.attention.output.dense.bias"), &[dim])?,
                ln1: norm(&format!("{p}.attention.output.LayerNorm"))?,
                i_w: t(
                    get(&format!("{p}.intermediate.dense.weight"), &[ffn, dim])?,
                    ffn,
                    dim,
                ),
                i_b: get(&format!("{p}.intermediate.dense.bias"), &[ffn])?,
                out_w: t(
                    get(&format!("{p}.output.dense.weight"), &[dim, ffn])?,
                    dim,
                    ffn,
                ),
                out_b: get(&format!("{p}.output.dense.bias"), &[dim])?,
                ln2: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Self {
            word,
            pos,
            segment,
            ln: norm("embeddings.LayerNorm")?,
            layers: out,
            shape,
            vocab,
            max_pos,
        })
    }

    /// Unit-length mean-pooled vectors of the token sequences `seqs` (special tokens
    /// included, no padding), computed on the current rayon pool's threads.
    pub(crate) fn embed(&self, seqs: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let Shape {
            dim, heads, ffn, ..
        } = self.shape;
        for s in seqs {
            if s.is_empty() || s.len() > self.max_pos {
                candle_core::bail!(
                    "a sequence of {} tokens (1..={} fit)",
                    s.len(),
                    self.max_pos
                );
            }
            if let Some(&t) = s.iter().find(|&&t| t as usize >= self.vocab) {
                candle_core::bail!("token {t} is outside the vocabulary of {}", self.vocab);
            }
        }
        let starts: Vec<usize> = seqs
            .iter()
            .scan(0, |at, s| {
                let here = *at;
                *at += s.len();
                Some(here)
            })
            .collect();
        let rows: usize = seqs.iter().map(|s| s.len()).sum();
        let mut b = Buffers::default();
        b.x.resize(rows * dim, 0.0);
        for (s, &start) in seqs.iter().zip(&starts) {
            for (p, &tok) in s.iter().enumerate() {
                let row = &mut b.x[(start + p) * dim..(start + p + 1) * dim];
                let w = &self.word[tok as usize * dim..(tok as usize + 1) * dim];
                let pe = &self.pos[p * dim..(p + 1) * dim];
                for (((r, w), pe), se) in row.iter_mut().zip(w).zip(pe).zip(&self.segment) {
                    *r = w + pe + se;
                }
            }
        }
        add_norm(&mut b.x, &[], &self.ln, self.shape.eps);
        let hd = dim / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        b.qkv.resize(rows * 3 * dim, 0.0);
        b.ctx.resize(rows * dim, 0.0);
        b.o.resize(rows * dim, 0.0);
        b.h.resize(rows * ffn, 0.0);
        for l in &self.layers {
            kernels::matmul(
                &b.x,
                rows,
                dim,
                &l.qkv_w,
                3 * dim,
                Some(&l.qkv_b),
                &mut b.qkv,
            );
            // Attention within each sequence, sequences in parallel.
            let qkv = &b.qkv;
            let mut ctx_parts: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(seqs.len());
            let mut rest = b.ctx.as_mut_slice();
            for (s, &start) in seqs.iter().zip(&starts) {
                let (part, tail) = rest.split_at_mut(s.len() * dim);
                ctx_parts.push((start, s.len(), part));
                rest = tail;
            }
            ctx_parts.into_par_iter().for_each(|(start, len, ctx)| {
                let mut scores = vec![0f32; len];
                let row = |p: usize| &qkv[(start + p) * 3 * dim..(start + p + 1) * 3 * dim];
                for h in 0..heads {
                    // Query, key and value of head h at position p: thirds of row p.
                    let part = |third: usize, p: usize| {
                        let at = third * dim + h * hd;
                        &row(p)[at..at + hd]
                    };
                    for a in 0..len {
                        super::attend(
                            part(0, a),
                            |p| part(1, p),
                            |p| part(2, p),
                            scale,
                            &mut scores,
                            &mut ctx[a * dim + h * hd..a * dim + (h + 1) * hd],
                        );
                    }
                }
            });
            kernels::matmul(&b.ctx, rows, dim, &l.o_w, dim, Some(&l.o_b), &mut b.o);
            add_norm(&mut b.x, &b.o, &l.ln1, self.shape.eps);
            kernels::matmul(&b.x, rows, dim, &l.i_w, ffn, Some(&l.i_b), &mut b.h);
            b.h.par_chunks_mut(ffn * 16).for_each(kernels::gelu);
            kernels::matmul(&b.h, rows, ffn, &l.out_w, dim, Some(&l.out_b), &mut b.o);
            add_norm(&mut b.x, &b.o, &l.ln2, self.shape.eps);
        }
        Ok(seqs
            .iter()
            .zip(&starts)
            .map(|(s, &start)| {
                let mut v = vec![0f32; dim];
                for p in 0..s.len() {
                    for (acc, x) in v
                        .iter_mut()
                        .zip(&b.x[(start + p) * dim..(start + p + 1) * dim])
                    {
                        *acc += x;
                    }
                }
                let inv_len = 1.0 / s.len() as f32;
                let norm = v
                    .iter()
                    .map(|x| x * x * inv_len * inv_len)
                    .sum::<f32>()
                    .sqrt();
                let scale = inv_len / norm.max(1e-12);
                v.iter_mut().for_each(|x| *x *= scale);
                v
            })
            .collect())
    }
}
