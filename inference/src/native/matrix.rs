//! Weight matrices of the native engine: GGUF tensors unpacked once at load into rows the
//! kernels read directly (scales as f32, Q4_0 as Q4_1 with `m = -8 d`), and `y = W x`.

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use super::kernels::{self, BLOCK, Isa, Q4Row, Q8Row, QuantActs};

/// Output rows handed to one rayon task at least (keeps the split cheap for small layers).
const MIN_ROWS_PER_TASK: usize = 64;

/// A `rows x cols` weight matrix, row `r` producing output `r`.
#[derive(Debug)]
pub(crate) struct Matrix {
    rows: usize,
    cols: usize,
    data: Data,
}

#[derive(Debug)]
enum Data {
    /// 4-bit rows: `qs` 16 bytes a block; `d`, `m` one per block.
    Q4 {
        qs: Vec<u8>,
        d: Vec<f16>,
        m: Vec<f16>,
    },
    /// 8-bit rows: `qs` 32 a block; `d` one per block.
    Q8 { qs: Vec<i8>, d: Vec<f16> },
    /// Plain f32 rows.
    F32(Vec<f32>),
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
        let data = match t.dtype() {
            GgmlDType::Q4_1 | GgmlDType::Q4_0 if whole_blocks => {
                let raw = t.data()?;
                let stride = if t.dtype() == GgmlDType::Q4_1 { 20 } else { 18 };
                let n = rows * nb;
                let (mut qs, mut d, mut m) = (
                    Vec::with_capacity(n * 16),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                );
                for blk in raw.chunks_exact(stride).take(n) {
                    let scale = f16_at(blk, 0);
                    d.push(scale);
                    if stride == 20 {
                        m.push(f16_at(blk, 2));
                    } else {
                        m.push(f16::from_f32(-8.0 * scale.to_f32()));
                    }
                    qs.extend_from_slice(&blk[stride - 16..]);
                }
                Data::Q4 { qs, d, m }
            }
            GgmlDType::Q8_0 if whole_blocks => q8_from_raw(&t.data()?, rows * nb),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Data::F32(f32_of(t)?),
            _ if whole_blocks => {
                let w = t.dequantize(&Device::Cpu)?;
                let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
                q8_from_raw(&q.data()?, rows * nb)
            }
            _ => Data::F32(f32_of(t)?),
        };
        let m = Self { rows, cols, data };
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> candle_core::Result<()> {
        let nb = self.rows * (self.cols / BLOCK);
        let ok = match &self.data {
            Data::Q4 { qs, d, m } => qs.len() == nb * 16 && d.len() == nb && m.len() == nb,
            Data::Q8 { qs, d } => qs.len() == nb * 32 && d.len() == nb,
            Data::F32(w) => w.len() == self.rows * self.cols,
        };
        if ok {
            Ok(())
        } else {
            candle_core::bail!(
                "tensor data is shorter than its {}x{} shape",
                self.rows,
                self.cols
            )
        }
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

    /// Row `r` as f32 (the token embedding lookup).
    pub(crate) fn row_f32(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols / BLOCK;
        match &self.data {
            Data::Q4 { qs, d, m } => {
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
            Data::Q8 { qs, d } => {
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
                    qs: &qs[blocks.start * 16..blocks.end * 16],
                    d: &d[blocks.clone()],
                    m: &m[blocks],
                },
                a,
            ),
            Data::Q8 { qs, d } => kernels::dot_q8(
                isa,
                Q8Row {
                    qs: &qs[blocks.start * 32..blocks.end * 32],
                    d: &d[blocks],
                },
                a,
            ),
            Data::F32(w) => kernels::dot_f32(&w[r * self.cols..(r + 1) * self.cols], x),
        }
    }

    /// `out[t] = W x[t]` for each of the `n` input rows in `x` (`n * cols`), into `out`
    /// (`n * rows`). Each weight row is read once for all inputs; rows are split across the
    /// current rayon pool's threads. `scratch` holds the quantized inputs between calls.
    pub(crate) fn matmul(&self, x: &[f32], n: usize, out: &mut [f32], scratch: &mut Scratch) {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        let isa = kernels::isa();
        scratch.acts.resize_with(n, QuantActs::default);
        if self.quantized() {
            for (t, a) in scratch.acts.iter_mut().enumerate().take(n) {
                a.quantize(isa, &x[t * self.cols..(t + 1) * self.cols]);
            }
        }
        let acts = &scratch.acts[..n];
        let threads = rayon::current_num_threads();
        let compute = |first_row: usize, rows_out: &mut [f32]| {
            // `rows_out` holds rows first_row.. of the output for input 0 only when n == 1;
            // for n > 1 it is a transposed block (row-major by weight row).
            let count = rows_out.len() / n;
            for i in 0..count {
                let r = first_row + i;
                for (t, a) in acts.iter().enumerate() {
                    rows_out[i * n + t] =
                        self.dot(isa, r, &x[t * self.cols..(t + 1) * self.cols], a);
                }
            }
        };
        if n == 1 {
            if threads > 1 && self.rows >= 2 * MIN_ROWS_PER_TASK {
                let per = self.rows.div_ceil(threads).max(MIN_ROWS_PER_TASK);
                out.par_chunks_mut(per)
                    .enumerate()
                    .for_each(|(c, chunk)| compute(c * per, chunk));
            } else {
                compute(0, out);
            }
            return;
        }
        // Several inputs: compute weight-row-major into scratch, then transpose.
        let tmp = &mut scratch.transposed;
        tmp.resize(n * self.rows, 0.0);
        if threads > 1 && self.rows >= 2 * MIN_ROWS_PER_TASK {
            let per = self.rows.div_ceil(threads).max(MIN_ROWS_PER_TASK);
            tmp.par_chunks_mut(per * n)
                .enumerate()
                .for_each(|(c, chunk)| compute(c * per, chunk));
        } else {
            compute(0, tmp);
        }
        for r in 0..self.rows {
            for t in 0..n {
                out[t * self.rows + r] = tmp[r * n + t];
            }
        }
    }
}

/// Reusable buffers of [`Matrix::matmul`].
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    acts: Vec<QuantActs>,
    transposed: Vec<f32>,
}

fn q8_from_raw(raw: &[u8], n: usize) -> Data {
    let (mut qs, mut d) = (Vec::with_capacity(n * 32), Vec::with_capacity(n));
    for blk in raw.chunks_exact(34).take(n) {
        d.push(f16_at(blk, 0));
        qs.extend(blk[2..].iter().map(|&b| b as i8));
    }
    Data::Q8 { qs, d }
}

fn f32_of(t: &QTensor) -> candle_core::Result<Vec<f32>> {
    t.dequantize(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}
