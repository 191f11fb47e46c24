//! The CPU merge: f32 accumulation, one rounding, multi-threaded over rows.

use rayon::prelude::*;
use st_io::Dtype;

use crate::{decode_f32, encode_half, Error, Result};

/// One LoRA term `scale · B · A` of a weight whose logical shape is `[out, in]`.
#[derive(Debug, Clone)]
pub struct LoraTerm<'a> {
    /// `A`, `[rank, in]`, row-major f32.
    pub a: &'a [f32],
    /// `B`, `[out, rank]`, row-major f32.
    pub b: &'a [f32],
    pub rank: usize,
    /// LoRA scaling times the adapter's weight.
    pub scale: f32,
}

/// `Σ scale·B·A` of a weight, arranged so each *stored* row of the delta is
/// `Σⱼ left[row][j] · right[j]` (an axpy over `right`'s rows).
#[derive(Debug, Clone)]
pub struct LoraProduct {
    /// `[stored_rows, rank_total]`.
    left: Vec<f32>,
    /// `[rank_total, stored_cols]`.
    right: Vec<f32>,
    rank: usize,
    pub stored_rows: usize,
    pub stored_cols: usize,
}

impl LoraProduct {
    /// `out, inp` is the logical shape `[out, in]`; `transposed` says the weight is stored
    /// `[in, out]` (GPT-2's Conv1D with `fan_in_fan_out`, and the embedding LoRA convention).
    pub fn new(
        out: usize,
        inp: usize,
        transposed: bool,
        terms: &[LoraTerm],
    ) -> Result<LoraProduct> {
        let rank: usize = terms.iter().map(|t| t.rank).sum();
        for t in terms {
            if t.a.len() != t.rank * inp || t.b.len() != out * t.rank {
                return Err(Error::Shape {
                    message: format!(
                        "A has {} values and B {}, but rank {} of a [{out}, {inp}] weight needs {} and {}",
                        t.a.len(),
                        t.b.len(),
                        t.rank,
                        t.rank * inp,
                        out * t.rank
                    ),
                });
            }
        }
        let (stored_rows, stored_cols) = if transposed { (inp, out) } else { (out, inp) };
        let mut left = vec![0f32; stored_rows * rank];
        let mut right = vec![0f32; rank * stored_cols];
        let mut offset = 0;
        for t in terms {
            for j in 0..t.rank {
                let col = offset + j;
                if transposed {
                    // stored row i = Σⱼ A[j][i] · (s·B[:, j])
                    for i in 0..inp {
                        left[i * rank + col] = t.a[j * inp + i];
                    }
                    for o in 0..out {
                        right[col * stored_cols + o] = t.scale * t.b[o * t.rank + j];
                    }
                } else {
                    // stored row o = Σⱼ (s·B[o][j]) · A[j]
                    for o in 0..out {
                        left[o * rank + col] = t.scale * t.b[o * t.rank + j];
                    }
                    right[col * stored_cols..(col + 1) * stored_cols]
                        .copy_from_slice(&t.a[j * inp..(j + 1) * inp]);
                }
            }
            offset += t.rank;
        }
        Ok(LoraProduct {
            left,
            right,
            rank,
            stored_rows,
            stored_cols,
        })
    }

    /// `[stored_rows, rank]` coefficients, row-major.
    pub fn left(&self) -> &[f32] {
        &self.left
    }

    /// `[rank, stored_cols]` rows, row-major.
    pub fn right(&self) -> &[f32] {
        &self.right
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Writes this product's stored row `row` of the delta into `delta`:
    /// `delta = Σⱼ left[row][j] · right[j]`, summed from +0 in j order with one fused
    /// multiply-add per term (IEEE `fma`, so every machine and the GPU kernels get the same
    /// bits). A term whose coefficient is 0 is added like any other, as PEFT's `W + B·A` does.
    /// The merged row is `W + delta`, one more rounded add ([`LoraProduct::add_row`]).
    #[inline]
    pub fn delta_row(&self, row: usize, delta: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement
            // of a `#[target_feature(enable = "avx2,fma")]` function; the body is safe code.
            unsafe { self.delta_row_fma(row, delta) };
            return;
        }
        // Elsewhere `mul_add` is the hardware's fused multiply-add where it has one (every
        // aarch64 machine), else libm's exact software `fmaf`: slower, the same bits.
        self.delta_row_portable(row, delta);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn delta_row_fma(&self, row: usize, delta: &mut [f32]) {
        self.delta_row_portable(row, delta);
    }

    /// An axpy per term over the whole row (`right`'s rows are read in order, which the
    /// hardware prefetches; strips of columns kept in registers across the terms read them 32
    /// values at a time from every row, and were 2.5-4× slower on a 2-core Xeon).
    #[inline(always)]
    fn delta_row_portable(&self, row: usize, delta: &mut [f32]) {
        let coefs = &self.left[row * self.rank..(row + 1) * self.rank];
        let cols = self.stored_cols;
        delta.fill(0.0);
        for (j, &c) in coefs.iter().enumerate() {
            let r = &self.right[j * cols..(j + 1) * cols];
            for (d, &x) in delta.iter_mut().zip(r) {
                *d = c.mul_add(x, *d);
            }
        }
    }

    /// `acc = acc + delta_row(row)`: stored row `row` of the merged weight from the base row
    /// in `acc` (`delta` is scratch of the same length).
    #[inline]
    pub fn add_row(&self, row: usize, acc: &mut [f32], delta: &mut [f32]) {
        self.delta_row(row, delta);
        for (a, d) in acc.iter_mut().zip(delta.iter()) {
            *a += *d;
        }
    }
}

/// DoRA's per-output-row factor `m / ‖W + ΔW‖`, computed once per tensor.
#[derive(Debug, Clone)]
pub struct DoraScale {
    factors: Vec<f32>,
    transposed: bool,
}

impl DoraScale {
    /// One factor per output row (per stored column when `transposed`).
    pub fn factors(&self) -> &[f32] {
        &self.factors
    }

    pub fn transposed(&self) -> bool {
        self.transposed
    }

    /// Computes the factors from the base weight (stored rows of `base`), the product, and the
    /// magnitude vector (one value per logical output row).
    pub fn new(
        base: &[u8],
        dtype: Dtype,
        product: &LoraProduct,
        transposed: bool,
        magnitude: &[f32],
    ) -> Result<DoraScale> {
        let (rows, cols) = (product.stored_rows, product.stored_cols);
        let outputs = if transposed { cols } else { rows };
        if magnitude.len() != outputs {
            return Err(Error::Shape {
                message: format!(
                    "the DoRA magnitude has {} values for {outputs} output rows",
                    magnitude.len()
                ),
            });
        }
        let size = dtype_size(dtype)?;
        let row_sums: Vec<Vec<f64>> = (0..rows)
            .into_par_iter()
            .map_init(
                || vec![0f32; cols],
                |delta, r| {
                    let mut acc = vec![0f32; cols];
                    decode_f32(
                        dtype,
                        &base[r * cols * size..(r + 1) * cols * size],
                        &mut acc,
                    )?;
                    product.add_row(r, &mut acc, delta);
                    Ok(if transposed {
                        acc.iter().map(|&v| (v as f64) * (v as f64)).collect()
                    } else {
                        vec![acc.iter().map(|&v| (v as f64) * (v as f64)).sum()]
                    })
                },
            )
            .collect::<Result<_>>()?;
        let mut sq = vec![0f64; outputs];
        for (r, sums) in row_sums.iter().enumerate() {
            if transposed {
                for (s, v) in sq.iter_mut().zip(sums) {
                    *s += v;
                }
            } else {
                sq[r] = sums[0];
            }
        }
        let factors = sq
            .iter()
            .zip(magnitude)
            .map(|(s, &m)| (m as f64 / s.sqrt()) as f32)
            .collect();
        Ok(DoraScale {
            factors,
            transposed,
        })
    }
}

fn dtype_size(dtype: Dtype) -> Result<usize> {
    match dtype {
        Dtype::F32 => Ok(4),
        Dtype::F16 | Dtype::BF16 => Ok(2),
        other => Err(Error::Dtype { dtype: other }),
    }
}

/// Sums for the merge report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MergeStats {
    /// Σ W² of the base.
    pub base_sq: f64,
    /// Σ (W' − W)² in f32 before rounding.
    pub delta_sq: f64,
}

impl MergeStats {
    pub fn add(&mut self, other: MergeStats) {
        self.base_sq += other.base_sq;
        self.delta_sq += other.delta_sq;
    }

    /// ‖ΔW‖ / ‖W‖.
    pub fn relative_delta(&self) -> f64 {
        if self.base_sq == 0.0 {
            if self.delta_sq == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (self.delta_sq / self.base_sq).sqrt()
        }
    }
}

/// The report sums of a merged block, from its base rows and its 16-bit output (the GPU path
/// computes the merge on the device and these on the host). With `product` (a LoRA product
/// was added), a non-finite output row from a finite base row is the error
/// [`merge_rows`] gives for it; `first_row` is the block's first stored row.
pub fn stats_of(
    base: &[u8],
    base_dtype: Dtype,
    out: &[u8],
    out_dtype: Dtype,
    cols: usize,
    first_row: usize,
    product: bool,
) -> Result<MergeStats> {
    let size = dtype_size(base_dtype)?;
    if cols == 0 {
        return Ok(MergeStats::default());
    }
    base.par_chunks(cols * size)
        .zip(out.par_chunks(cols * 2))
        .enumerate()
        .map_init(
            || (vec![0f32; cols], vec![0f32; cols]),
            |(w, m), (i, (b, o))| -> Result<MergeStats> {
                decode_f32(base_dtype, b, w)?;
                if product
                    && crate::has_non_finite_half(out_dtype, o)
                    && w.iter().all(|v| v.is_finite())
                {
                    return Err(Error::NonFinite { row: first_row + i });
                }
                decode_f32(out_dtype, o, m)?;
                let mut s = MergeStats::default();
                for (x, y) in w.iter().zip(m.iter()) {
                    s.base_sq += (*x as f64) * (*x as f64);
                    s.delta_sq += ((*y - *x) as f64).powi(2);
                }
                Ok(s)
            },
        )
        .try_reduce(MergeStats::default, |mut a, b| {
            a.add(b);
            Ok(a)
        })
}

/// Merges stored rows `first_row ..` of a weight into `out` (16-bit, whole rows), in
/// parallel. `base` is the whole stored tensor (`stored_rows × stored_cols` of `base_dtype`).
/// Without a product (a plain conversion) the rows are only converted.
#[allow(clippy::too_many_arguments)]
pub fn merge_rows(
    base: &[u8],
    base_dtype: Dtype,
    stored_cols: usize,
    product: Option<&LoraProduct>,
    dora: Option<&DoraScale>,
    first_row: usize,
    out_dtype: Dtype,
    out: &mut [u8],
) -> Result<MergeStats> {
    let size = dtype_size(base_dtype)?;
    if !out_dtype.is_half() {
        return Err(Error::Dtype { dtype: out_dtype });
    }
    let out_row_bytes = stored_cols * 2;
    if stored_cols == 0 {
        return Ok(MergeStats::default());
    }
    let row_job = RowJob {
        base,
        base_dtype,
        size,
        stored_cols,
        product,
        dora,
        out_dtype,
    };
    let stats = out
        .par_chunks_mut(out_row_bytes)
        .enumerate()
        .map_init(
            || (vec![0f32; stored_cols], vec![0f32; stored_cols]),
            |(acc, orig), (i, dst)| row_job.merge_row(first_row + i, acc, orig, dst),
        )
        .try_reduce(MergeStats::default, |mut a, b| {
            a.add(b);
            Ok(a)
        })?;
    Ok(stats)
}

/// What every row of a [`merge_rows`] call shares.
struct RowJob<'a> {
    base: &'a [u8],
    base_dtype: Dtype,
    size: usize,
    stored_cols: usize,
    product: Option<&'a LoraProduct>,
    dora: Option<&'a DoraScale>,
    out_dtype: Dtype,
}

impl RowJob<'_> {
    /// Merges stored row `row` into `dst`, with AVX2 where the CPU has it: the decoding, the
    /// report's sums and the rounding then run eight lanes wide too, not only the product
    /// (the same operations in the same order, so the same bits).
    fn merge_row(
        &self,
        row: usize,
        acc: &mut [f32],
        orig: &mut [f32],
        dst: &mut [u8],
    ) -> Result<MergeStats> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of a
            // `#[target_feature(enable = "avx2")]` function; the body is safe code.
            return unsafe { self.merge_row_avx2(row, acc, orig, dst) };
        }
        self.merge_row_portable(row, acc, orig, dst)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn merge_row_avx2(
        &self,
        row: usize,
        acc: &mut [f32],
        orig: &mut [f32],
        dst: &mut [u8],
    ) -> Result<MergeStats> {
        self.merge_row_portable(row, acc, orig, dst)
    }

    #[inline(always)]
    fn merge_row_portable(
        &self,
        row: usize,
        acc: &mut [f32],
        orig: &mut [f32],
        dst: &mut [u8],
    ) -> Result<MergeStats> {
        let (cols, size) = (self.stored_cols, self.size);
        let src = &self.base[row * cols * size..(row + 1) * cols * size];
        decode_f32(self.base_dtype, src, orig)?;
        let mut stats = MergeStats::default();
        if let Some(p) = self.product {
            p.delta_row(row, acc);
            for (a, o) in acc.iter_mut().zip(orig.iter()) {
                *a += *o;
            }
        } else {
            acc.copy_from_slice(orig);
        }
        if let Some(d) = self.dora {
            if d.transposed {
                for (a, f) in acc.iter_mut().zip(&d.factors) {
                    *a *= f;
                }
            } else {
                let f = d.factors[row];
                for a in acc.iter_mut() {
                    *a *= f;
                }
            }
        }
        if self.product.is_some() {
            // Per-row sums in f32 lanes (vectorised), accumulated in f64 per row.
            let (mut dsq, mut bsq) = ([0f32; 8], [0f32; 8]);
            let mut lanes = |ac: &[f32], oc: &[f32]| {
                for k in 0..ac.len() {
                    let d = ac[k] - oc[k];
                    dsq[k] += d * d;
                    bsq[k] += oc[k] * oc[k];
                }
            };
            let (a8, o8) = (acc.chunks_exact(8), orig.chunks_exact(8));
            let (a_rest, o_rest) = (a8.remainder(), o8.remainder());
            for (ac, oc) in a8.zip(o8) {
                lanes(ac, oc);
            }
            lanes(a_rest, o_rest);
            stats.delta_sq += dsq.iter().map(|&v| v as f64).sum::<f64>();
            stats.base_sq += bsq.iter().map(|&v| v as f64).sum::<f64>();
        }
        encode_half(self.out_dtype, acc, dst)?;
        // The GPU path makes the same check on the same bytes (`stats_of`).
        if self.product.is_some()
            && crate::has_non_finite_half(self.out_dtype, dst)
            && orig.iter().all(|v| v.is_finite())
        {
            return Err(Error::NonFinite { row });
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_values(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks(2)
            .map(|c| st_io::convert::bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect()
    }

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| st_io::convert::f32_to_bf16_bits(*x).to_le_bytes())
            .collect()
    }

    /// `scale · b·aᵀ` for a weight stored plain: b a column (its rows), a a row (its columns).
    fn rank_one(b: &[f32], a: &[f32], scale: f32) -> LoraProduct {
        let term = LoraTerm {
            a,
            b,
            rank: 1,
            scale,
        };
        LoraProduct::new(b.len(), a.len(), false, &[term]).unwrap()
    }

    #[test]
    fn plain_lora_adds_scaled_b_times_a() {
        // W = 0 (2×3), A = [[1,2,3]], B = [[1],[2]], s = 0.5 → ΔW = 0.5·[[1,2,3],[2,4,6]].
        let a = [1.0, 2.0, 3.0];
        let b = [1.0, 2.0];
        // W = 0 (2×3) with one rank-1 term, merged as stored plain or transposed.
        let merged = |transposed: bool| {
            let term = LoraTerm {
                a: &a,
                b: &b,
                rank: 1,
                scale: 0.5,
            };
            let p = LoraProduct::new(2, 3, transposed, &[term]).unwrap();
            let cols = if transposed { 2 } else { 3 };
            let mut out = vec![0u8; 12];
            merge_rows(
                &bf16_bytes(&[0.0; 6]),
                Dtype::BF16,
                cols,
                Some(&p),
                None,
                0,
                Dtype::BF16,
                &mut out,
            )
            .unwrap();
            bf16_values(&out)
        };
        assert_eq!(merged(false), [0.5, 1.0, 1.5, 1.0, 2.0, 3.0]);
        // Transposed storage gives the transpose.
        assert_eq!(merged(true), [0.5, 1.0, 1.0, 2.0, 1.5, 3.0]);
    }

    #[test]
    fn an_overflowing_row_is_an_error_on_both_paths() {
        // W = 1 (3×2); B·A is 0 in rows 0 and 2 and 2^127·2^2 (past f32 and bf16) in row 1
        // (or, for F16 output, 70000: finite in f32, infinite once rounded to F16).
        let base = bf16_bytes(&[1.0; 6]);
        for (b1, out_dtype) in [(2f32.powi(127), Dtype::BF16), (70000.0, Dtype::F16)] {
            let p = rank_one(&[0.0, b1, 0.0], &[1.0, 1.0], 4.0);
            // All rows, and rows 1.. as one block: either way the error names stored row 1.
            for first_row in [0, 1] {
                let mut out = vec![0u8; (3 - first_row) * 4];
                let err = merge_rows(
                    &base,
                    Dtype::BF16,
                    2,
                    Some(&p),
                    None,
                    first_row,
                    out_dtype,
                    &mut out,
                )
                .unwrap_err();
                assert!(matches!(err, Error::NonFinite { row: 1 }), "{err}");
            }
            // The GPU path's check, on the bytes the kernel writes (the same as the CPU's).
            let inf: u16 = if out_dtype == Dtype::F16 {
                0x7c00
            } else {
                0x7f80
            };
            let one: u16 = if out_dtype == Dtype::F16 {
                0x3c00
            } else {
                0x3f80
            };
            let gpu_out: Vec<u8> = [one, one, inf, one]
                .iter()
                .flat_map(|h| h.to_le_bytes())
                .collect();
            let err =
                stats_of(&base[4..], Dtype::BF16, &gpu_out, out_dtype, 2, 1, true).unwrap_err();
            assert!(matches!(err, Error::NonFinite { row: 2 }), "{err}");
            // Without a product (a plain conversion) it is not the adapter's doing.
            assert!(stats_of(&base[4..], Dtype::BF16, &gpu_out, out_dtype, 2, 1, false).is_ok());
        }
        // A base row that already holds an infinity passes it through.
        let base = bf16_bytes(&[f32::INFINITY, 1.0]);
        let p = rank_one(&[1.0], &[1.0, 1.0], 1.0);
        let mut out = vec![0u8; 4];
        merge_rows(
            &base,
            Dtype::BF16,
            2,
            Some(&p),
            None,
            0,
            Dtype::BF16,
            &mut out,
        )
        .unwrap();
        assert!(crate::has_non_finite_half(Dtype::BF16, &out));
    }

    #[test]
    fn dora_rescales_rows_to_the_magnitude() {
        let p = rank_one(&[0.0, 0.0], &[0.0, 0.0], 1.0);
        let base = bf16_bytes(&[3.0, 4.0, 0.0, 2.0]);
        let d = DoraScale::new(&base, Dtype::BF16, &p, false, &[10.0, 1.0]).unwrap();
        let mut out = vec![0u8; 8];
        merge_rows(
            &base,
            Dtype::BF16,
            2,
            Some(&p),
            Some(&d),
            0,
            Dtype::BF16,
            &mut out,
        )
        .unwrap();
        let got = bf16_values(&out);
        assert_eq!(got, [6.0, 8.0, 0.0, 1.0]);
    }

    #[test]
    fn rejects_shapes_that_do_not_agree() {
        let e = LoraProduct::new(
            2,
            3,
            false,
            &[LoraTerm {
                a: &[0.0; 3],
                b: &[0.0; 3],
                rank: 1,
                scale: 1.0,
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("rank 1 of a [2, 3] weight"), "{e}");
    }
}
