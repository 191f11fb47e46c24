//! `lora-kernels`: the arithmetic of merging LoRA adapters into a weight,
//! `W' = round16(W + Σₖ wₖ·sₖ·Bₖ·Aₖ)`, accumulated in f32 with one rounding at the end, plus
//! DoRA (`W' = m / ‖W + ΔW‖_row · (W + ΔW)`), embedding LoRA (ΔW transposed) and
//! `fan_in_fan_out` weights (stored transposed).
//!
//! Both devices compute a row of `ΔW` as `Σⱼ left[j] · right[j]` from +0 in j order with one
//! fused multiply-add per term (IEEE `fma`: the same bits on every machine), then `W + ΔW` and
//! DoRA's factor, each rounded once in f32, then the rounding to 16 bits.
//!
//! The CPU path ([`cpu`]) is multi-threaded over rows, streams a tensor block by block so no
//! f32 copy of a whole tensor is ever made, and its inner loop keeps a strip of columns in
//! vector registers over all the terms (AVX2 + FMA where the CPU has them). An f64 twin ([`reference`](mod@reference)) recomputes sample rows to verify a merge. The CUDA
//! path ([`gpu`], PTX built by `cargo xtask build-kernels` and embedded) does the same
//! arithmetic in the same order, so it gives the same bits.
//! It deliberately does not read files or choose devices.
//!
//! ```
//! use lora_kernels::cpu::merge_rows;
//! use lora_kernels::{LoraProduct, LoraTerm};
//! use st_io::Dtype;
//! // W = I (2×2, BF16), A = [1, 1] (rank 1), B = [1, 2]ᵀ, scale 0.5: W' = W + 0.5·B·A.
//! let one = half::bf16::from_f32(1.0).to_le_bytes();
//! let zero = half::bf16::from_f32(0.0).to_le_bytes();
//! let base: Vec<u8> = [one, zero, zero, one].concat();
//! let term = LoraTerm { a: &[1.0, 1.0], b: &[1.0, 2.0], rank: 1, scale: 0.5 };
//! let product = LoraProduct::new(2, 2, false, &[term])?;
//! let mut out = vec![0u8; base.len()];
//! merge_rows(&base, Dtype::BF16, 2, Some(&product), None, 0, Dtype::BF16, &mut out)?;
//! let merged: Vec<f32> = out.chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
//! assert_eq!(merged, [1.5, 0.5, 1.0, 2.0]);
//! # Ok::<(), lora_kernels::Error>(())
//! ```

pub mod cpu;
pub mod dequant;
pub mod gpu;
pub mod reference;

pub use cpu::{DoraScale, LoraProduct, LoraTerm, MergeStats};

use st_io::Dtype;

/// The errors of `lora-kernels`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("shape mismatch: {message}")]
    Shape { message: String },
    #[error("{dtype} is not a dtype the merge reads or writes (F32, F16, BF16 in; F16, BF16 out)")]
    Dtype { dtype: Dtype },
    #[error("GPU merge: {message}")]
    Gpu { message: String },
    #[error("\"{tensor}\" {message}")]
    Quantized { tensor: String, message: String },
    #[error("the merge produced a non-finite value in row {row}: the adapter looks broken")]
    NonFinite { row: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Decodes little-endian F32/F16/BF16 bytes into f32 (exact).
#[inline]
pub fn decode_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = st_io::convert::bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        other => return Err(Error::Dtype { dtype: other }),
    }
    Ok(())
}

/// Decodes a whole tensor to f32.
pub fn to_f32_vec(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let size = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => return Err(Error::Dtype { dtype: other }),
    };
    let mut out = vec![0f32; bytes.len() / size];
    decode_f32(dtype, bytes, &mut out)?;
    Ok(out)
}

/// Rounds f32 values to F16 or BF16 bytes (nearest, ties to even).
#[inline]
pub fn encode_half(dtype: Dtype, values: &[f32], out: &mut [u8]) -> Result<()> {
    match dtype {
        Dtype::BF16 => {
            for (b, v) in out.chunks_exact_mut(2).zip(values) {
                b.copy_from_slice(&st_io::convert::f32_to_bf16_bits(*v).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (b, v) in out.chunks_exact_mut(2).zip(values) {
                b.copy_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        other => return Err(Error::Dtype { dtype: other }),
    }
    Ok(())
}

/// Whether 16-bit output bytes (F16 or BF16, little-endian) hold an infinity or a NaN. The
/// merge's check on both devices: a merged row with one, from a base row with none, is an
/// adapter (or a scale) that overflowed.
#[inline]
pub fn has_non_finite_half(dtype: Dtype, bytes: &[u8]) -> bool {
    let exponent: u16 = if dtype == Dtype::F16 { 0x7c00 } else { 0x7f80 };
    bytes.chunks_exact(2).fold(false, |seen, b| {
        seen | (u16::from_le_bytes([b[0], b[1]]) & exponent == exponent)
    })
}

/// Distance in units in the last place between two 16-bit floats of the same format
/// (NaN vs NaN is 0; across signs it counts through zero).
pub fn ulp_distance(a: u16, b: u16) -> u32 {
    let key = |x: u16| -> i32 {
        if x & 0x8000 != 0 {
            -((x & 0x7fff) as i32)
        } else {
            x as i32
        }
    };
    (key(a) - key(b)).unsigned_abs()
}
