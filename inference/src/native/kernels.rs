//! The native engine's numeric kernels: dot products of quantized weight rows (and 16-row
//! tiles) with quantized activations, f32 dot/axpy, the f32 matrix product (`gemm`) and
//! erf/GELU. A portable reference and x86-64 SIMD versions (AVX2 + FMA, AVX-512 VNNI),
//! chosen at run time, checked against each other by the tests below.
//!
//! Layouts (blocks of 32 values, as in GGUF):
//! - 4-bit rows: per block 16 bytes, the low nibble of byte `j` is value `j`, the high nibble
//!   value `j + 16`; value = `d * q + m` (Q4_1; Q4_0 is stored as `m = -8 d`).
//! - 8-bit rows and activations: per block 32 `i8`; value = `d * q`.
//! - Activations also carry `s = d * sum(q)` per block, which turns the 4-bit offset `m` into
//!   one multiply per block.

// This is the one place in the workspace that needs `unsafe`: SIMD loads take raw pointers,
// and calling a `#[target_feature]` function needs the feature checked first. Each block
// states why it is sound; the portable versions give the same results (tests).
#![allow(unsafe_code)]

use half::f16;

/// Values per quantization block.
pub(crate) const BLOCK: usize = 32;

/// A row of activations quantized to 8 bits in blocks of 32.
#[derive(Debug, Default, Clone)]
pub(crate) struct QuantActs {
    pub(crate) qs: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    /// For the AVX-512 4-bit kernel: units of four blocks (then two, then one) holding the
    /// first halves of their blocks, then the second halves (how 4-bit rows unpack).
    qs4: Vec<i8>,
}

impl QuantActs {
    /// Quantizes `x` (length a multiple of 32) into `self`, reusing its buffers.
    pub(crate) fn quantize(&mut self, isa: Isa, x: &[f32]) {
        let nb = x.len() / BLOCK;
        self.qs.resize(nb * BLOCK, 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        for (b, chunk) in x.chunks_exact(BLOCK).enumerate() {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in self.qs[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(chunk) {
                let r = round_half_away(v * inv);
                *q = r;
                sum += i32::from(r);
            }
            self.d[b] = d;
            self.s[b] = d * sum as f32;
        }
        self.qs4.clear();
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Vnni {
            // Units of four blocks, then two, then one: each unit holds the first halves of
            // its blocks, then their second halves.
            self.qs4.resize(nb * 32, 0);
            let mut b = 0;
            while b < nb {
                let unit = match nb - b {
                    r if r >= 4 => 4,
                    r if r >= 2 => 2,
                    _ => 1,
                };
                let dst = &mut self.qs4[b * 32..(b + unit) * 32];
                for k in 0..unit {
                    let src = &self.qs[(b + k) * 32..(b + k + 1) * 32];
                    dst[k * 16..k * 16 + 16].copy_from_slice(&src[..16]);
                    dst[unit * 16 + k * 16..unit * 16 + k * 16 + 16].copy_from_slice(&src[16..]);
                }
                b += unit;
            }
        }
        let _ = isa;
    }
}

/// `x` rounded half away from zero (what `f32::round`, and ggml's `roundf`, give) for
/// `|x| <= 127.5`, as an `i8`: truncation and an exact remainder, which vectorise, where
/// `f32::round` is a call into libm per value.
#[inline]
fn round_half_away(x: f32) -> i8 {
    let t = x as i32; // toward zero; NaN gives 0, as `round() as i8` did
    // Exact: `x` and its truncation are less than 1 apart.
    let frac = x - t as f32;
    let r = t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5);
    r.clamp(-127, 127) as i8
}

/// Which instruction set the dot products use, decided once per process. Ordered: the
/// safe wrappers never run a set above what [`isa`] detected, whatever they are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

/// The best instruction set of this CPU; `SOMA_INFERENCE_ISA=portable|avx2` caps it.
pub(crate) fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = std::env::var("SOMA_INFERENCE_ISA").unwrap_or_default();
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let vnni = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c");
            match cap.as_str() {
                "portable" => Isa::Portable,
                "avx2" if avx2 => Isa::Avx2,
                _ if vnni => Isa::Avx512Vnni,
                _ if avx2 => Isa::Avx2,
                _ => Isa::Portable,
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Isa::Portable
}

/// A 4-bit row: `qs` 16 bytes a block, `d` and `m` one per block (f16, as in the file:
/// decoding is memory-bound, so every byte counts).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q4Row<'a> {
    pub(crate) qs: &'a [u8],
    pub(crate) d: &'a [f16],
    pub(crate) m: &'a [f16],
}

/// An 8-bit row: `qs` 32 a block, `d` one per block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8Row<'a> {
    pub(crate) qs: &'a [i8],
    pub(crate) d: &'a [f16],
}

/// Sixteen 4-bit rows interleaved ("tiled", for the AVX-512 kernel): per block, four runs
/// of 64 bytes; in run `i`, lane `l` (4 bytes) holds bytes `4i..4i+4` of row `l`'s block (low
/// nibbles: values `4i..4i+4`, high nibbles: values `16+4i..16+4i+4`). `d` and `m`: per
/// block, the 16 rows' scales.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q4Tile<'a> {
    pub(crate) qs: &'a [u8],
    pub(crate) d: &'a [f16],
    pub(crate) m: &'a [f16],
}

/// Rows per tile.
pub(crate) const TILE: usize = 16;

/// The sixteen dot products of a tile with `a`.
pub(crate) fn dot_q4_tile(isa: Isa, w: Q4Tile<'_>, a: &QuantActs) -> [f32; TILE] {
    let isa = isa.min(self::isa());
    let nb = w.d.len() / TILE;
    assert!(
        w.qs.len() == nb * 256
            && w.d.len() == nb * TILE
            && w.m.len() == nb * TILE
            && a.d.len() == nb
            && a.s.len() == nb
            && a.qs.len() == nb * 32
    );
    match isa {
        // SAFETY: AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C detected; lengths checked.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { avx512::dot_q4_tile(w, a) },
        _ => dot_q4_tile_portable(w, a),
    }
}

fn dot_q4_tile_portable(w: Q4Tile<'_>, a: &QuantActs) -> [f32; TILE] {
    let mut out = [0f32; TILE];
    for b in 0..w.d.len() / TILE {
        for (l, o) in out.iter_mut().enumerate() {
            let mut isum = 0i32;
            for i in 0..4 {
                for e in 0..4 {
                    let byte = w.qs[b * 256 + i * 64 + l * 4 + e];
                    isum += i32::from(byte & 15) * i32::from(a.qs[b * 32 + 4 * i + e]);
                    isum += i32::from(byte >> 4) * i32::from(a.qs[b * 32 + 16 + 4 * i + e]);
                }
            }
            *o += w.d[b * TILE + l].to_f32() * a.d[b] * isum as f32
                + w.m[b * TILE + l].to_f32() * a.s[b];
        }
    }
    out
}

/// `sum_i w_i * a_i` for a 4-bit row.
pub(crate) fn dot_q4(isa: Isa, w: Q4Row<'_>, a: &QuantActs) -> f32 {
    let isa = isa.min(self::isa());
    let nb = w.d.len();
    assert!(
        w.qs.len() == nb * 16
            && w.m.len() == nb
            && a.d.len() == nb
            && a.s.len() == nb
            && a.qs.len() == nb * 32
    );
    match isa {
        Isa::Portable => dot_q4_portable(w, &a.qs, &a.d) + offsets(w.m, &a.s),
        // SAFETY: `Isa::Avx2` is only chosen after detecting AVX2 and FMA; lengths checked.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (unsafe { avx2::dot_q4(w, &a.qs, &a.d) }) + offsets(w.m, &a.s),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            assert!(a.qs4.len() == nb * 32);
            // SAFETY: AVX-512 F/BW/VNNI, AVX2 and FMA detected; lengths checked.
            unsafe { avx512::dot_q4(w, a) }
        }
    }
}

/// `sum_i w_i * a_i` for an 8-bit row.
pub(crate) fn dot_q8(isa: Isa, w: Q8Row<'_>, a: &QuantActs) -> f32 {
    let isa = isa.min(self::isa());
    let nb = w.d.len();
    assert!(w.qs.len() == nb * 32 && a.d.len() == nb && a.qs.len() == nb * 32);
    match isa {
        Isa::Portable => dot_q8_portable(w.qs, w.d, &a.qs, &a.d),
        // SAFETY: as in `dot_q4`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::dot_q8(w.qs, w.d, &a.qs, &a.d) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_q4`.
        Isa::Avx512Vnni => unsafe { avx512::dot_q8(w, a) },
    }
}

/// `sum_i w_i * x_i` in f32.
pub(crate) fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { avx2::dot_f32(w, x) };
    }
    dot_f32_portable(w, x)
}

/// `out += c * x` in f32.
pub(crate) fn axpy(c: f32, x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { avx2::axpy(c, x, out) };
    }
    for (o, v) in out.iter_mut().zip(x) {
        *o += c * v;
    }
}

/// `sum_b m_b * s_b`: the 4-bit offsets against the activation block sums.
fn offsets(m: &[f16], s: &[f32]) -> f32 {
    m.iter().zip(s).map(|(m, s)| m.to_f32() * s).sum()
}

/// `out[m x n] = x[m x k] * w[k x n] (+ bias[n] on every row)`, with the `gemm` crate's
/// kernels (AVX-512 or AVX2 as the CPU has), on the current rayon pool's threads.
pub(crate) fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
    if m == 0 || n == 0 {
        return;
    }
    match bias {
        Some(b) => {
            assert_eq!(b.len(), n);
            for row in out.chunks_exact_mut(n) {
                row.copy_from_slice(b);
            }
        }
        None if k == 0 => out.fill(0.0),
        None => {}
    }
    if k == 0 {
        return;
    }
    // Rows split across threads, each block a single-threaded product: for the few hundred
    // rows of an embedding batch this balances better than the crate's own split.
    const MIN_ROWS: usize = 64;
    let threads = rayon::current_num_threads();
    if threads > 1 && m >= 2 * MIN_ROWS {
        use rayon::prelude::*;
        let per = m.div_ceil(threads).max(MIN_ROWS);
        out.par_chunks_mut(per * n)
            .zip(x.par_chunks(per * k))
            .for_each(|(o, xs)| gemm_rows(xs, xs.len() / k, k, w, n, bias.is_some(), o));
    } else {
        gemm_rows(x, m, k, w, n, bias.is_some(), out);
    }
}

fn gemm_rows(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, add: bool, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
    // SAFETY: the lengths are checked above; `out` (m x n, row stride n), `x` (m x k, row
    // stride k) and `w` (k x n, row stride n) lie within their slices, and `out` does not
    // alias the inputs (a `&mut` next to `&`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            add,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The Gauss error function in f32, branch-free so that loops over it vectorise: a
/// rational approximation on [-4, 4] (outside, erf is +-1 in f32), within a few ulp of
/// the exact value (at most 4e-7 off; test below).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_4e-5);
    p = p.mul_add(x2, -7.349_906_3e-4);
    p = p.mul_add(x2, -2.954_600_3e-3);
    p = p.mul_add(x2, -1.609_603_3e-2);
    let mut q = -1.456_607_2e-5_f32;
    q = q.mul_add(x2, -2.133_740_6e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329e-3);
    q = q.mul_add(x2, -1.426_474e-2);
    x * p / q
}

/// `x <- gelu(x) = x/2 (1 + erf(x / sqrt 2))` (exact GELU, as BERT uses).
pub(crate) fn gelu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { avx2::gelu(x) };
    }
    gelu_portable(x);
}

#[inline(always)]
fn gelu_portable(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// Eight partial sums, so that it vectorises.
#[inline(always)]
fn dot_f32_portable(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (w, x) = (&w[..n], &x[..n]);
    let mut acc = [0f32; 8];
    let wc = w.chunks_exact(8);
    let xc = x.chunks_exact(8);
    let tail: f32 = wc
        .remainder()
        .iter()
        .zip(xc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (wv, xv) in wc.zip(xc) {
        for i in 0..8 {
            acc[i] += wv[i] * xv[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn dot_q4_portable(w: Q4Row<'_>, qs: &[i8], d: &[f32]) -> f32 {
    let mut sum = 0f32;
    for b in 0..w.d.len() {
        let q = &w.qs[b * 16..b * 16 + 16];
        let x = &qs[b * 32..b * 32 + 32];
        let mut isum = 0i32;
        for j in 0..16 {
            isum += i32::from(q[j] & 0x0F) * i32::from(x[j]);
            isum += i32::from(q[j] >> 4) * i32::from(x[j + 16]);
        }
        sum += w.d[b].to_f32() * d[b] * isum as f32;
    }
    sum
}

fn dot_q8_portable(w: &[i8], wd: &[f16], x: &[i8], xd: &[f32]) -> f32 {
    let mut sum = 0f32;
    for b in 0..wd.len() {
        let isum: i32 = w[b * 32..b * 32 + 32]
            .iter()
            .zip(&x[b * 32..b * 32 + 32])
            .map(|(&w, &x)| i32::from(w) * i32::from(x))
            .sum();
        sum += wd[b].to_f32() * xd[b] * isum as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::Q4Row;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The f32 dot product compiled for AVX2 + FMA (the portable loop, vectorised wider).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        super::dot_f32_portable(w, x)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu(x: &mut [f32]) {
        super::gelu_portable(x);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn axpy(c: f32, x: &[f32], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(x) {
            *o = c.mul_add(*v, *o);
        }
    }

    /// The block products of a 4-bit row (without the `m` offsets).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `w.qs.len() == 16 * n`, `x.len() >= 32 * n` and
    /// `xd.len() >= n` where `n = w.d.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q4(w: Q4Row<'_>, x: &[i8], xd: &[f32]) -> f32 {
        let nb = w.d.len();
        let low = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let block = |b: usize| -> __m256 {
            // SAFETY: b < nb, so bytes b*16..b*16+16 of `w.qs` and b*32..b*32+32 of `x`
            // are in bounds (lengths checked by the caller).
            let (q, x) = unsafe {
                (
                    _mm_loadu_si128(w.qs.as_ptr().add(b * 16).cast()),
                    _mm256_loadu_si256(x.as_ptr().add(b * 32).cast()),
                )
            };
            let lo = _mm_and_si128(q, low);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
            let wv = _mm256_set_m128i(hi, lo);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x), ones);
            _mm256_cvtepi32_ps(p)
        };
        let mut b = 0;
        while b + 2 <= nb {
            acc0 = _mm256_fmadd_ps(block(b), _mm256_set1_ps(w.d[b].to_f32() * xd[b]), acc0);
            let s1 = w.d[b + 1].to_f32() * xd[b + 1];
            acc1 = _mm256_fmadd_ps(block(b + 1), _mm256_set1_ps(s1), acc1);
            b += 2;
        }
        if b < nb {
            acc0 = _mm256_fmadd_ps(block(b), _mm256_set1_ps(w.d[b].to_f32() * xd[b]), acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// # Safety
    /// AVX2 and FMA must be available; `w.len() == 32 * n`, `x.len() >= 32 * n`,
    /// `xd.len() >= n` where `n = wd.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q8(w: &[i8], wd: &[f16], x: &[i8], xd: &[f32]) -> f32 {
        let nb = wd.len();
        let ones = _mm256_set1_epi16(1);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let block = |b: usize| -> __m256 {
            // SAFETY: b < nb, so 32 bytes from b*32 are in bounds of both rows.
            let (wv, xv) = unsafe {
                (
                    _mm256_loadu_si256(w.as_ptr().add(b * 32).cast()),
                    _mm256_loadu_si256(x.as_ptr().add(b * 32).cast()),
                )
            };
            // |w| * (x * sign(w)): maddubs needs its first operand unsigned.
            let aw = _mm256_sign_epi8(wv, wv);
            let sx = _mm256_sign_epi8(xv, wv);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
            _mm256_cvtepi32_ps(p)
        };
        let mut b = 0;
        while b + 2 <= nb {
            acc0 = _mm256_fmadd_ps(block(b), _mm256_set1_ps(wd[b].to_f32() * xd[b]), acc0);
            let s1 = wd[b + 1].to_f32() * xd[b + 1];
            acc1 = _mm256_fmadd_ps(block(b + 1), _mm256_set1_ps(s1), acc1);
            b += 2;
        }
        if b < nb {
            acc0 = _mm256_fmadd_ps(block(b), _mm256_set1_ps(wd[b].to_f32() * xd[b]), acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Q4Row, Q4Tile, Q8Row, QuantActs, TILE, avx2};

    /// How far ahead of the bytes in use to prefetch.
    const PREFETCH: usize = 8192;

    /// `acc + m_i * s_i` lane-wise over all of `m` (f16) and `s`, 16 at a time, the last
    /// load masked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn offsets(m: &[f16], s: &[f32], mut acc: __m512) -> __m512 {
        let n = m.len().min(s.len());
        let mut i = 0;
        while i < n {
            let left = n - i;
            let mask: __mmask16 = if left >= 16 {
                0xFFFF
            } else {
                (1u16 << left) - 1
            };
            // SAFETY: the mask enables only elements i..n, within both slices.
            let (mv, sv) = unsafe {
                (
                    _mm256_maskz_loadu_epi16(mask, m.as_ptr().add(i).cast()),
                    _mm512_maskz_loadu_ps(mask, s.as_ptr().add(i)),
                )
            };
            acc = _mm512_fmadd_ps(_mm512_cvtph_ps(mv), sv, acc);
            i += 16;
        }
        acc
    }

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C must be available; the lengths
    /// `super::dot_q4` checks, and `a.qs4.len() == a.qs.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4(w: Q4Row<'_>, a: &QuantActs) -> f32 {
        let nb = w.d.len();
        let mask = _mm512_set1_epi8(0x0F);
        let mask256 = _mm256_set1_epi8(0x0F);
        // Lanes 4k..4k+4 hold block k's sums: spread its scale over them.
        let idx4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let idx2 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
        // Four blocks from block b: 64 bytes of nibbles against 128 activation bytes.
        let four = |b: usize, acc: __m512| -> __m512 {
            // SAFETY: b + 4 <= nb: bytes b*16..b*16+64 of `w.qs`, b*32..b*32+128 of
            // `a.qs4`, scales b..b+4 of `w.d` and `a.d` are in bounds.
            let (q, alo, ahi, wd, ad) = unsafe {
                (
                    _mm512_loadu_si512(w.qs.as_ptr().add(b * 16).cast()),
                    _mm512_loadu_si512(a.qs4.as_ptr().add(b * 32).cast()),
                    _mm512_loadu_si512(a.qs4.as_ptr().add(b * 32 + 64).cast()),
                    _mm_loadl_epi64(w.d.as_ptr().add(b).cast()),
                    _mm_loadu_ps(a.d.as_ptr().add(b)),
                )
            };
            let lo = _mm512_and_si512(q, mask);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), mask);
            let i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, alo);
            let i = _mm512_dpbusd_epi32(i, hi, ahi);
            let scale = _mm_mul_ps(_mm_cvtph_ps(wd), ad);
            let scale = _mm512_permutexvar_ps(idx4, _mm512_castps128_ps512(scale));
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), scale, acc)
        };
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        // A model's rows lie one after another: ask for the bytes a few rows ahead, so that
        // more loads are in flight than the row at hand issues (its loads stall otherwise).
        let ahead = |p: *const u8| _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH).cast());
        ahead(w.d.as_ptr().cast());
        ahead(w.m.as_ptr().cast());
        let mut b = 0;
        while b + 8 <= nb {
            ahead(w.qs.as_ptr().wrapping_add(b * 16));
            ahead(w.qs.as_ptr().wrapping_add(b * 16 + 64));
            acc0 = four(b, acc0);
            acc1 = four(b + 4, acc1);
            b += 8;
        }
        if b + 4 <= nb {
            acc0 = four(b, acc0);
            b += 4;
        }
        if b + 2 <= nb {
            // Two blocks: 32 bytes of nibbles, unpacked to [lo A, lo B, hi A, hi B].
            // SAFETY: b + 2 <= nb, as above for two blocks.
            let (q, x, wd, ad) = unsafe {
                (
                    _mm256_loadu_si256(w.qs.as_ptr().add(b * 16).cast()),
                    _mm512_loadu_si512(a.qs4.as_ptr().add(b * 32).cast()),
                    _mm_loadu_si32(w.d.as_ptr().add(b).cast()),
                    _mm_castsi128_ps(_mm_loadl_epi64(a.d.as_ptr().add(b).cast())),
                )
            };
            let lo = _mm256_and_si256(q, mask256);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask256);
            let wv = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, x);
            let scale = _mm_mul_ps(_mm_cvtph_ps(wd), ad);
            let scale = _mm512_permutexvar_ps(idx2, _mm512_castps128_ps512(scale));
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), scale, acc1);
            b += 2;
        }
        let acc = offsets(w.m, &a.s, _mm512_add_ps(acc0, acc1));
        let mut sum = _mm512_reduce_add_ps(acc);
        if b < nb {
            let tail = Q4Row {
                qs: &w.qs[b * 16..],
                d: &w.d[b..],
                m: &[],
            };
            // SAFETY: one whole block is left in every slice (a lone block's layout is the
            // plain one); AVX2 and FMA are available.
            sum += unsafe { avx2::dot_q4(tail, &a.qs[b * 32..], &a.d[b..]) };
        }
        sum
    }

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C must be available; the lengths
    /// `super::dot_q4_tile` checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_tile(w: Q4Tile<'_>, a: &QuantActs) -> [f32; TILE] {
        let nb = w.d.len() / TILE;
        let mask = _mm512_set1_epi8(0x0F);
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        for b in 0..nb {
            let base = w.qs.as_ptr().wrapping_add(b * 256);
            for line in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH + line * 64).cast());
            }
            let act = &a.qs[b * 32..b * 32 + 32];
            let four = |at: usize| {
                _mm512_set1_epi32(i32::from_le_bytes([
                    act[at] as u8,
                    act[at + 1] as u8,
                    act[at + 2] as u8,
                    act[at + 3] as u8,
                ]))
            };
            let mut lo_sum = _mm512_setzero_si512();
            let mut hi_sum = _mm512_setzero_si512();
            for i in 0..4 {
                // SAFETY: b < nb: the 256 bytes of block b's runs are within `w.qs`.
                let v = unsafe { _mm512_loadu_si512(base.add(i * 64).cast()) };
                let lo = _mm512_and_si512(v, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
                lo_sum = _mm512_dpbusd_epi32(lo_sum, lo, four(4 * i));
                hi_sum = _mm512_dpbusd_epi32(hi_sum, hi, four(16 + 4 * i));
            }
            // SAFETY: b < nb: 16 scales from b * 16 are within `w.d` and `w.m`.
            let (dw, mw) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(b * TILE).cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.m.as_ptr().add(b * TILE).cast())),
                )
            };
            let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_sum, hi_sum));
            acc0 = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, _mm512_set1_ps(a.d[b])), acc0);
            acc1 = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s[b]), acc1);
        }
        let mut out = [0f32; TILE];
        // SAFETY: `out` holds 16 f32.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(acc0, acc1)) };
        out
    }

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C must be available; the lengths
    /// `super::dot_q8` checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8(w: Q8Row<'_>, a: &QuantActs) -> f32 {
        let nb = w.d.len();
        let pairs = nb / 2;
        let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let zero = _mm512_setzero_si512();
        let pair = |p: usize, acc: __m512| -> __m512 {
            // SAFETY: p < pairs: 64 bytes from p*64 of `w.qs` and `a.qs`, two scales from
            // 2p of `w.d` and `a.d` are in bounds.
            let (wv, xv, wd, ad) = unsafe {
                (
                    _mm512_loadu_si512(w.qs.as_ptr().add(p * 64).cast()),
                    _mm512_loadu_si512(a.qs.as_ptr().add(p * 64).cast()),
                    _mm_loadu_si32(w.d.as_ptr().add(2 * p).cast()),
                    _mm_castsi128_ps(_mm_loadl_epi64(a.d.as_ptr().add(2 * p).cast())),
                )
            };
            // |w| * (x * sign(w)): the unsigned operand must be the first.
            let negative = _mm512_movepi8_mask(wv);
            let sx = _mm512_mask_sub_epi8(xv, negative, zero, xv);
            let i = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), sx);
            let scale = _mm_mul_ps(_mm_cvtph_ps(wd), ad);
            let scale = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(scale));
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), scale, acc)
        };
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let ahead = |p: *const u8| _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH).cast());
        ahead(w.d.as_ptr().cast());
        let mut p = 0;
        while p + 2 <= pairs {
            ahead(w.qs.as_ptr().wrapping_add(p * 64).cast());
            ahead(w.qs.as_ptr().wrapping_add(p * 64 + 64).cast());
            acc0 = pair(p, acc0);
            acc1 = pair(p + 1, acc1);
            p += 2;
        }
        if p < pairs {
            acc0 = pair(p, acc0);
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        let done = pairs * 2;
        if done < nb {
            // SAFETY: one whole block is left in every slice; AVX2 and FMA are available.
            sum += unsafe {
                avx2::dot_q8(
                    &w.qs[done * 32..],
                    &w.d[done..],
                    &a.qs[done * 32..],
                    &a.d[done..],
                )
            };
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Every instruction set this CPU has, portable first.
    fn isas() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if isa() != Isa::Portable {
                all.push(Isa::Avx2);
            }
            if isa() == Isa::Avx512Vnni {
                all.push(Isa::Avx512Vnni);
            }
        }
        all
    }

    fn acts(isa: Isa, x: &[f32]) -> QuantActs {
        let mut a = QuantActs::default();
        a.quantize(isa, x);
        a
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-4 * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn rounding_is_f32_round_at_the_ties_and_next_to_them() {
        for whole in -127i32..=127 {
            for x in [whole as f32 - 0.5, whole as f32, whole as f32 + 0.5] {
                for y in [
                    x,
                    f32::from_bits(x.to_bits() + 1),
                    f32::from_bits(x.to_bits().saturating_sub(1)),
                ] {
                    if y.abs() <= 127.0 {
                        assert_eq!(round_half_away(y), y.round() as i8, "{y}");
                    }
                }
            }
        }
        assert_eq!(round_half_away(f32::NAN), 0);
    }

    proptest! {
        #[test]
        fn rounding_is_f32_round(x in -127.0f32..=127.0) {
            prop_assert_eq!(round_half_away(x), x.round() as i8);
        }

        #[test]
        fn every_isa_computes_the_same_q4_dot(nb in 1usize..40, seed in any::<u64>()) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let qs: Vec<u8> = (0..nb * 16).map(|_| rng.u8(..)).collect();
            let d: Vec<f16> = (0..nb).map(|_| f16::from_f32(rng.f32() * 0.1)).collect();
            let m: Vec<f16> = (0..nb).map(|_| f16::from_f32(rng.f32() * 0.2 - 0.1)).collect();
            let x: Vec<f32> = (0..nb * 32).map(|_| rng.f32() * 4.0 - 2.0).collect();
            let row = Q4Row { qs: &qs, d: &d, m: &m };
            let want = dot_q4(Isa::Portable, row, &acts(Isa::Portable, &x));
            for isa in isas() {
                let got = dot_q4(isa, row, &acts(isa, &x));
                prop_assert!(close(got, want), "{isa:?}: {got} vs {want}");
            }
            // And the quantized product is near the exact one.
            let exact: f32 = (0..nb * 32)
                .map(|i| {
                    let (b, j) = (i / 32, i % 32);
                    let q = if j < 16 { qs[b * 16 + j] & 15 } else { qs[b * 16 + j - 16] >> 4 };
                    (d[b].to_f32() * f32::from(q) + m[b].to_f32()) * x[i]
                })
                .sum();
            // Activation rounding: at most half a step (2/127) an element, summed at random.
            prop_assert!((want - exact).abs() <= 0.12 * (nb as f32).sqrt(), "{want} vs {exact}");
        }

        #[test]
        fn tiled_rows_give_the_dots_of_the_plain_rows(nb in 1usize..20, seed in any::<u64>()) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let rows: Vec<Vec<u8>> = (0..TILE).map(|_| (0..nb * 16).map(|_| rng.u8(..)).collect()).collect();
            let d: Vec<Vec<f16>> = (0..TILE).map(|_| (0..nb).map(|_| f16::from_f32(rng.f32() * 0.1)).collect()).collect();
            let m: Vec<Vec<f16>> = (0..TILE).map(|_| (0..nb).map(|_| f16::from_f32(rng.f32() * 0.2 - 0.1)).collect()).collect();
            let x: Vec<f32> = (0..nb * 32).map(|_| rng.f32() * 4.0 - 2.0).collect();
            let (mut tq, mut td, mut tm) = (Vec::new(), Vec::new(), Vec::new());
            for b in 0..nb {
                for i in 0..4 {
                    for row in &rows {
                        tq.extend_from_slice(&row[b * 16 + 4 * i..b * 16 + 4 * i + 4]);
                    }
                }
                td.extend(d.iter().map(|r| r[b]));
                tm.extend(m.iter().map(|r| r[b]));
            }
            let tile = Q4Tile { qs: &tq, d: &td, m: &tm };
            for isa in isas() {
                let a = acts(isa, &x);
                let got = dot_q4_tile(isa, tile, &a);
                for l in 0..TILE {
                    let want = dot_q4(Isa::Portable, Q4Row { qs: &rows[l], d: &d[l], m: &m[l] }, &a);
                    prop_assert!(close(got[l], want), "{isa:?} row {l}: {} vs {want}", got[l]);
                }
            }
        }

        #[test]
        fn every_isa_computes_the_same_q8_dot(nb in 1usize..40, seed in any::<u64>()) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let qs: Vec<i8> = (0..nb * 32).map(|_| rng.i8(..)).collect();
            let d: Vec<f16> = (0..nb).map(|_| f16::from_f32(rng.f32() * 0.01)).collect();
            let x: Vec<f32> = (0..nb * 32).map(|_| rng.f32() * 4.0 - 2.0).collect();
            let row = Q8Row { qs: &qs, d: &d };
            let want = dot_q8(Isa::Portable, row, &acts(Isa::Portable, &x));
            for isa in isas() {
                let got = dot_q8(isa, row, &acts(isa, &x));
                prop_assert!(close(got, want), "{isa:?}: {got} vs {want}");
            }
        }

        #[test]
        fn f32_dot_and_axpy_match_the_plain_loops(n in 0usize..100, seed in any::<u64>()) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let w: Vec<f32> = (0..n).map(|_| rng.f32() - 0.5).collect();
            let x: Vec<f32> = (0..n).map(|_| rng.f32() - 0.5).collect();
            let want: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
            prop_assert!(close(dot_f32(&w, &x), want));
            let mut out = x.clone();
            axpy(0.5, &w, &mut out);
            for i in 0..n {
                prop_assert!(close(out[i], x[i] + 0.5 * w[i]));
            }
        }
    }

    #[test]
    fn erf_is_within_5e7_of_the_exact_function() {
        // libm's erff (correctly rounded to about 1 ulp) as the reference.
        let mut worst = 0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((erf(x) - libm_erf(x)).abs());
        }
        assert!(worst < 5e-7, "largest error {worst}");
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    fn libm_erf(x: f32) -> f32 {
        // erf from its Maclaurin series in f64 for |x| <= 3, else from the continued
        // fraction of erfc: an independent, slow, exact-enough reference.
        let x = f64::from(x);
        let v = if x.abs() <= 3.0 {
            let mut term = x;
            let mut sum = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let z = x.abs();
            let mut f = 0.0;
            for n in (1..60).rev() {
                f = n as f64 / 2.0 / (z + f);
            }
            let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f);
            (1.0 - erfc).copysign(x)
        };
        v as f32
    }

    #[test]
    fn zero_activations_quantize_to_zero() {
        let a = acts(isa(), &[0.0; 64]);
        assert!(a.qs.iter().all(|&q| q == 0));
        assert_eq!(a.d, vec![0.0, 0.0]);
    }
}
