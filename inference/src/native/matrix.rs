//! Weight matrices of the native engine: GGUF tensors unpacked once at load into rows the
//! kernels read directly (quants and f16 scales in separate runs, Q4_0 as Q4_1 with
//! `m = -8 d`), packed into one huge-page mapping per model, and `y = W x`.
//!
//! Decoding reads every weight once per token, so it runs at the speed memory streams: with
//! 4 KiB pages a core streamed about 10 GB/s here, with 2 MiB pages about 20 GB/s (the
//! hardware prefetcher stops at page boundaries, and TLB misses add up).

use std::ops::Range;
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use super::kernels::{self, BLOCK, Isa, Q4Row, Q4Tile, Q8Row, QuantActs, TILE};

/// Output rows handed to one rayon task at least (keeps the split cheap for small layers).
const MIN_ROWS_PER_TASK: usize = 64;

/// A `rows x cols` weight matrix, row `r` producing output `r`.
#[derive(Debug)]
pub(crate) struct Matrix {
    rows: usize,
    cols: usize,
    data: Data,
    /// The quantized bytes `data`'s ranges point into (shared by a model's matrices once
    /// packed).
    bytes: Arc<Bytes>,
}

#[derive(Debug)]
enum Data {
    /// 4-bit rows: `qs` 16 bytes a block; `d`, `m` one f16 per block.
    Q4 {
        qs: Range<usize>,
        d: Range<usize>,
        m: Range<usize>,
    },
    /// 4-bit rows sixteen at a time ([`Q4Tile`]), for the AVX-512 kernel.
    Q4Tiled {
        qs: Range<usize>,
        d: Range<usize>,
        m: Range<usize>,
    },
    /// 8-bit rows: `qs` 32 a block; `d` one f16 per block.
    Q8 { qs: Range<usize>, d: Range<usize> },
    /// Plain f32 rows.
    F32(Vec<f32>),
}

#[derive(Debug)]
enum Bytes {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m,
        }
    }
}

/// Moves the quantized bytes of `mats` into one anonymous mapping advised to use huge pages
/// (on Linux; elsewhere, or when the kernel declines, ordinary pages).
pub(crate) fn pack(mats: &mut [&mut Matrix]) -> std::io::Result<()> {
    const ALIGN: usize = 64;
    let total: usize = mats
        .iter()
        .map(|m| m.bytes.len().next_multiple_of(ALIGN))
        .sum();
    let mut map = memmap2::MmapOptions::new().len(total.max(1)).map_anon()?;
    #[cfg(target_os = "linux")]
    if let Err(e) = map.advise(memmap2::Advice::HugePage) {
        tracing::debug!(error = %e, "huge pages declined for model weights");
    }
    let mut at = 0;
    let mut offsets = Vec::with_capacity(mats.len());
    for m in mats.iter() {
        map[at..at + m.bytes.len()].copy_from_slice(&m.bytes);
        offsets.push(at);
        at += m.bytes.len().next_multiple_of(ALIGN);
    }
    let shared = Arc::new(Bytes::Mapped(map.make_read_only()?));
    for (m, by) in mats.iter_mut().zip(offsets) {
        match &mut m.data {
            Data::Q4 { qs, d, m } | Data::Q4Tiled { qs, d, m } => {
                for r in [qs, d, m] {
                    *r = r.start + by..r.end + by;
                }
            }
            Data::Q8 { qs, d } => {
                for r in [qs, d] {
                    *r = r.start + by..r.end + by;
                }
            }
            Data::F32(_) => {}
        }
        m.bytes = shared.clone();
    }
    Ok(())
}

fn f16_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

impl Matrix {
    /// Unpacks a 2-D tensor (`[rows, cols]`). Q4_0, Q4_1 and Q8_0 keep their bits; F32, F16
    /// and BF16 become f32; other quantizations are re-quantized to Q8_0 (or widened to f32
    /// when a row is not a whole number of blocks).
    pub(crate) fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        let (rows, cols) = t.shape().dims2()?;
        let nb = cols / BLOCK;
        let whole_blocks = cols % BLOCK == 0;
        let n = rows * nb;
        let mut bytes = Vec::new();
        let data = match t.dtype() {
            GgmlDType::Q4_1 | GgmlDType::Q4_0 if whole_blocks => {
                let raw = t.data()?;
                let stride = if t.dtype() == GgmlDType::Q4_1 { 20 } else { 18 };
                if raw.len() < n * stride {
                    candle_core::bail!("tensor data is shorter than its {rows}x{cols} shape");
                }
                bytes.reserve(n * 20);
                for blk in raw.chunks_exact(stride).take(n) {
                    bytes.extend_from_slice(&blk[stride - 16..]);
                }
                for blk in raw.chunks_exact(stride).take(n) {
                    bytes.extend_from_slice(&blk[..2]);
                }
                for blk in raw.chunks_exact(stride).take(n) {
                    let m = match stride {
                        20 => f16_at(blk, 2),
                        _ => f16::from_f32(-8.0 * f16_at(blk, 0).to_f32()),
                    };
                    bytes.extend_from_slice(&m.to_le_bytes());
                }
                let (qs, d, m) = (0..n * 16, n * 16..n * 18, n * 18..n * 20);
                if kernels::isa() == Isa::Avx512Vnni && rows.is_multiple_of(TILE) {
                    bytes = tile(&bytes, rows, nb);
                    Data::Q4Tiled { qs, d, m }
                } else {
                    Data::Q4 { qs, d, m }
                }
            }
            GgmlDType::Q8_0 if whole_blocks => q8_from_raw(&t.data()?, n, &mut bytes)?,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Data::F32(f32_of(t)?),
            _ if whole_blocks => {
                let w = t.dequantize(&Device::Cpu)?;
                let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
                q8_from_raw(&q.data()?, n, &mut bytes)?
            }
            _ => Data::F32(f32_of(t)?),
        };
        // The lengths hold by construction: the raw data was checked against the shape.
        Ok(Self {
            rows,
            cols,
            data,
            bytes: Arc::new(Bytes::Owned(bytes)),
        })
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Whether inputs are quantized before the product.
    fn quantized(&self) -> bool {
        !matches!(self.data, Data::F32(_))
    }

    fn f16s(&self, r: &Range<usize>) -> &[f16] {
        bytemuck::cast_slice(&self.bytes[r.clone()])
    }

    /// Row `r` as f32 (the token embedding lookup).
    pub(crate) fn row_f32(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols / BLOCK;
        match &self.data {
            Data::Q4 { qs, d, m } => {
                let (qs, d, m) = (&self.bytes[qs.clone()], self.f16s(d), self.f16s(m));
                for b in 0..nb {
                    let i = r * nb + b;
                    let q = &qs[i * 16..i * 16 + 16];
                    let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
                    let (d, m) = (d[i].to_f32(), m[i].to_f32());
                    for j in 0..16 {
                        o[j] = d * f32::from(q[j] & 15) + m;
                        o[j + 16] = d * f32::from(q[j] >> 4) + m;
                    }
                }
            }
            Data::Q4Tiled { qs, d, m } => {
                let (qs, d, m) = (&self.bytes[qs.clone()], self.f16s(d), self.f16s(m));
                let (t, l) = (r / TILE, r % TILE);
                for b in 0..nb {
                    let at = (t * nb + b) * TILE;
                    let (d, m) = (d[at + l].to_f32(), m[at + l].to_f32());
                    let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
                    for i in 0..4 {
                        for e in 0..4 {
                            let byte = qs[at * 16 + i * 64 + l * 4 + e];
                            o[4 * i + e] = d * f32::from(byte & 15) + m;
                            o[16 + 4 * i + e] = d * f32::from(byte >> 4) + m;
                        }
                    }
                }
            }
            Data::Q8 { qs, d } => {
                let (qs, d): (&[i8], _) =
                    (bytemuck::cast_slice(&self.bytes[qs.clone()]), self.f16s(d));
                for b in 0..nb {
                    let i = r * nb + b;
                    for j in 0..BLOCK {
                        out[b * BLOCK + j] = d[i].to_f32() * f32::from(qs[i * BLOCK + j]);
                    }
                }
            }
            Data::F32(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
        }
    }

    fn dot(&self, isa: Isa, r: usize, x: &[f32], a: &QuantActs) -> f32 {
        let nb = self.cols / BLOCK;
        let blocks = r * nb..(r + 1) * nb;
        match &self.data {
            Data::Q4 { qs, d, m } => kernels::dot_q4(
                isa,
                Q4Row {
                    qs: &self.bytes[qs.start + blocks.start * 16..qs.start + blocks.end * 16],
                    d: &self.f16s(d)[blocks.clone()],
                    m: &self.f16s(m)[blocks],
                },
                a,
            ),
            Data::Q8 { qs, d } => kernels::dot_q8(
                isa,
                Q8Row {
                    qs: bytemuck::cast_slice(
                        &self.bytes[qs.start + blocks.start * 32..qs.start + blocks.end * 32],
                    ),
                    d: &self.f16s(d)[blocks],
                },
                a,
            ),
            Data::Q4Tiled { .. } => self.tile_dots(isa, r / TILE, a)[r % TILE],
            Data::F32(w) => kernels::dot_f32(&w[r * self.cols..(r + 1) * self.cols], x),
        }
    }

    /// The 16 dot products of tile `t` of a tiled matrix (zeros for another layout).
    fn tile_dots(&self, isa: Isa, t: usize, a: &QuantActs) -> [f32; TILE] {
        let Data::Q4Tiled { qs, d, m } = &self.data else {
            return [0.0; TILE];
        };
        let nb = self.cols / BLOCK;
        let blocks = t * nb * TILE..(t + 1) * nb * TILE;
        kernels::dot_q4_tile(
            isa,
            Q4Tile {
                qs: &self.bytes[qs.start + blocks.start * 16..qs.start + blocks.end * 16],
                d: &self.f16s(d)[blocks.clone()],
                m: &self.f16s(m)[blocks],
            },
            a,
        )
    }

    /// Output rows `first..first + out.len() / n` against every input: `out` is weight-row
    /// major (`out[i * n + t]` is row `first + i` for input `t`).
    fn rows_into(&self, isa: Isa, first: usize, x: &[f32], acts: &[QuantActs], out: &mut [f32]) {
        let n = acts.len();
        if matches!(self.data, Data::Q4Tiled { .. }) && first.is_multiple_of(TILE) {
            for (i, tile_out) in out.chunks_mut(n * TILE).enumerate() {
                for (t, a) in acts.iter().enumerate() {
                    let dots = self.tile_dots(isa, first / TILE + i, a);
                    for (l, v) in dots.iter().enumerate().take(tile_out.len() / n) {
                        tile_out[l * n + t] = *v;
                    }
                }
            }
            return;
        }
        for (i, row_out) in out.chunks_exact_mut(n).enumerate() {
            for (t, (o, a)) in row_out.iter_mut().zip(acts).enumerate() {
                *o = self.dot(isa, first + i, &x[t * self.cols..(t + 1) * self.cols], a);
            }
        }
    }
}

/// `outs[j][t] = mats[j] x[t]` for the `n` input rows of `x` (`n * cols`), every matrix
/// reading the same input (`q`, `k`, `v`; `gate`, `up`): the input is quantized once, each
/// weight row is read once for all inputs, and the rows of all the matrices are split across
/// the current rayon pool's threads in one parallel step.
pub(crate) fn matmul(
    mats: &[&Matrix],
    x: &[f32],
    n: usize,
    outs: &mut [&mut Vec<f32>],
    scratch: &mut Scratch,
) {
    let Some(cols) = mats.first().map(|m| m.cols) else {
        return;
    };
    debug_assert!(mats.iter().all(|m| m.cols == cols) && x.len() == n * cols);
    let isa = kernels::isa();
    scratch.acts.resize_with(n, QuantActs::default);
    if mats.iter().any(|m| m.quantized()) {
        let acts = &mut scratch.acts[..n];
        if n > 1 && rayon::current_num_threads() > 1 {
            acts.par_iter_mut()
                .enumerate()
                .for_each(|(t, a)| a.quantize(isa, &x[t * cols..(t + 1) * cols]));
        } else {
            for (t, a) in acts.iter_mut().enumerate() {
                a.quantize(isa, &x[t * cols..(t + 1) * cols]);
            }
        }
    }
    let acts = &scratch.acts[..n];
    for (m, out) in mats.iter().zip(outs.iter_mut()) {
        out.resize(n * m.rows, 0.0);
    }
    // One input: rows land in place. Several: weight-row-major, transposed after.
    scratch.transposed.resize_with(mats.len(), Vec::new);
    let mut targets: Vec<&mut [f32]> = if n == 1 {
        outs.iter_mut().map(|o| o.as_mut_slice()).collect()
    } else {
        scratch
            .transposed
            .iter_mut()
            .zip(mats)
            .map(|(t, m)| {
                t.resize(n * m.rows, 0.0);
                t.as_mut_slice()
            })
            .collect()
    };
    let threads = rayon::current_num_threads();
    let mut jobs: Vec<(&Matrix, usize, &mut [f32])> = Vec::new();
    for (m, target) in mats.iter().zip(targets.iter_mut()) {
        if m.rows == 0 {
            continue;
        }
        let per = if threads > 1 {
            // Whole tiles to each task.
            m.rows
                .div_ceil(threads)
                .max(MIN_ROWS_PER_TASK)
                .next_multiple_of(TILE)
        } else {
            m.rows
        };
        for (c, chunk) in target.chunks_mut(per * n).enumerate() {
            jobs.push((m, c * per, chunk));
        }
    }
    if threads > 1 && jobs.len() > 1 {
        jobs.into_par_iter()
            .for_each(|(m, first, chunk)| m.rows_into(isa, first, x, acts, chunk));
    } else {
        for (m, first, chunk) in jobs {
            m.rows_into(isa, first, x, acts, chunk);
        }
    }
    drop(targets);
    if n > 1 {
        for ((m, out), tmp) in mats.iter().zip(outs.iter_mut()).zip(&scratch.transposed) {
            for r in 0..m.rows {
                for t in 0..n {
                    out[t * m.rows + r] = tmp[r * n + t];
                }
            }
        }
    }
}

/// Reusable buffers of [`matmul`].
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    acts: Vec<QuantActs>,
    transposed: Vec<Vec<f32>>,
}

/// Rearranges 4-bit rows (`rows * nb` blocks of 16 quant bytes, then the `d` and `m` runs)
/// into tiles of 16 rows ([`Q4Tile`]): per tile and block, four runs of 16 lanes x 4 bytes,
/// then the 16 `d`, then the 16 `m`, each run in its own region as before.
fn tile(bytes: &[u8], rows: usize, nb: usize) -> Vec<u8> {
    let n = rows * nb;
    let mut out = vec![0u8; bytes.len()];
    let (qs, scales) = bytes.split_at(n * 16);
    let (d, m) = scales.split_at(n * 2);
    let (out_qs, out_scales) = out.split_at_mut(n * 16);
    let (out_d, out_m) = out_scales.split_at_mut(n * 2);
    for t in 0..rows / TILE {
        for b in 0..nb {
            let at = (t * nb + b) * TILE;
            for l in 0..TILE {
                let src = ((t * TILE + l) * nb + b) * 16;
                for i in 0..4 {
                    let dst = at * 16 + i * 64 + l * 4;
                    out_qs[dst..dst + 4].copy_from_slice(&qs[src + 4 * i..src + 4 * i + 4]);
                }
                let s = ((t * TILE + l) * nb + b) * 2;
                out_d[(at + l) * 2..(at + l) * 2 + 2].copy_from_slice(&d[s..s + 2]);
                out_m[(at + l) * 2..(at + l) * 2 + 2].copy_from_slice(&m[s..s + 2]);
            }
        }
    }
    out
}

fn q8_from_raw(raw: &[u8], n: usize, bytes: &mut Vec<u8>) -> candle_core::Result<Data> {
    if raw.len() < n * 34 {
        candle_core::bail!("tensor data is shorter than its shape");
    }
    bytes.reserve(n * 34);
    for blk in raw.chunks_exact(34).take(n) {
        bytes.extend_from_slice(&blk[2..]);
    }
    for blk in raw.chunks_exact(34).take(n) {
        bytes.extend_from_slice(&blk[..2]);
    }
    Ok(Data::Q8 {
        qs: 0..n * 32,
        d: n * 32..n * 34,
    })
}

/// A tensor's values as f32, row-major.
pub(crate) fn f32_of(t: &QTensor) -> candle_core::Result<Vec<f32>> {
    t.dequantize(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;

    /// Every layout (4-bit rows or tiles, 8-bit, f32) gives back the rows candle dequantizes
    /// and the products of those rows, to quantization accuracy.
    #[test]
    fn layouts_agree_with_candle_dequantization() -> candle_core::Result<()> {
        let (rows, cols) = (48, 256);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let w = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
        let x: Vec<f32> = (0..2 * cols)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
            .collect();
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
            GgmlDType::F32,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype)?;
            let want = q.dequantize(&Device::Cpu)?.to_vec2::<f32>()?;
            let m = Matrix::from_qtensor(&q)?;
            let mut row = vec![0f32; cols];
            for (r, want_row) in want.iter().enumerate() {
                m.row_f32(r, &mut row);
                let diff = row
                    .iter()
                    .zip(want_row)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Q6K is re-quantized to Q8_0: its rows move by a quantization step.
                let tolerance = if dtype == GgmlDType::Q6K { 0.01 } else { 1e-6 };
                assert!(diff <= tolerance, "{dtype:?} row {r} differs by {diff}");
            }
            let mut out = Vec::new();
            matmul(&[&m], &x, 2, &mut [&mut out], &mut Scratch::default());
            for t in 0..2 {
                for (r, want_row) in want.iter().enumerate() {
                    let exact: f32 = want_row
                        .iter()
                        .zip(&x[t * cols..(t + 1) * cols])
                        .map(|(a, b)| a * b)
                        .sum();
                    let got = out[t * rows + r];
                    assert!(
                        (got - exact).abs() < 0.05,
                        "{dtype:?} ({t}, {r}): {got} vs {exact}"
                    );
                }
            }
        }
        Ok(())
    }
}
