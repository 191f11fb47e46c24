//! The merge recomputed in f64 for single rows: what `--verify` compares the output with.

use st_io::Dtype;

use crate::{decode_f32, Result};

/// A LoRA term in f64 terms: logical `[out, in]`, `a` `[rank, in]`, `b` `[out, rank]`.
pub struct TermRef<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub scale: f64,
}

/// Stored row `row` of the merged weight, in f64 (before DoRA).
pub fn merged_row(
    base: &[u8],
    dtype: Dtype,
    out: usize,
    inp: usize,
    transposed: bool,
    terms: &[TermRef],
    row: usize,
) -> Result<Vec<f64>> {
    let cols = if transposed { out } else { inp };
    let size = if dtype == Dtype::F32 { 4 } else { 2 };
    let mut w = vec![0f32; cols];
    decode_f32(
        dtype,
        &base[row * cols * size..(row + 1) * cols * size],
        &mut w,
    )?;
    let mut acc: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    for t in terms {
        for (c, a) in acc.iter_mut().enumerate() {
            // Logical element (o, i) of the delta.
            let (o, i) = if transposed { (c, row) } else { (row, c) };
            let mut s = 0f64;
            for j in 0..t.rank {
                s += t.b[o * t.rank + j] as f64 * t.a[j * inp + i] as f64;
            }
            *a += t.scale * s;
        }
    }
    Ok(acc)
}
