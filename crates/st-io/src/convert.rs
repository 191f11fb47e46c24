//! Conversion of F32, F16 and BF16 data to F16 or BF16: round to nearest, ties to even; NaN
//! stays NaN (quiet, sign kept) and ±Inf stays ±Inf; values past F16's range become ±Inf.
//!
//! Works on little-endian byte slices of any alignment (tensors inside a mapped file need not
//! be aligned), in blocks through an aligned f32 buffer so the inner loops vectorise.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

const BLOCK: usize = 2048;

/// Rounds an f32 to the nearest bf16 (ties to even); NaN is kept and made quiet.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        ((bits >> 16) | 0x0040) as u16
    } else {
        let rounding = 0x7fff + ((bits >> 16) & 1);
        (bits.wrapping_add(rounding) >> 16) as u16
    }
}

/// The f32 value of bf16 bits (exact).
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Whether `convert` supports `from` → `to`.
pub fn can_convert(from: Dtype, to: Dtype) -> bool {
    matches!(from, Dtype::F32 | Dtype::F16 | Dtype::BF16) && to.is_half()
}

/// Converts `input` (elements of `from`) into `output` (elements of `to`, already sized).
pub fn convert(from: Dtype, to: Dtype, input: &[u8], output: &mut [u8]) -> Result<()> {
    if !can_convert(from, to) {
        return Err(Error::UnsupportedConversion {
            from: from.to_string(),
            to: to.to_string(),
        });
    }
    let in_size = (from.bits() / 8) as usize;
    let out_size = (to.bits() / 8) as usize;
    let elements = input.len() / in_size;
    if input.len() % in_size != 0 || output.len() != elements * out_size {
        return Err(Error::ConversionLength {
            from: from.to_string(),
            to: to.to_string(),
            input_bytes: input.len(),
            output_bytes: output.len(),
        });
    }
    if from == to {
        output.copy_from_slice(input);
        return Ok(());
    }
    let mut wide = [0f32; BLOCK];
    let mut narrow = [0u16; BLOCK];
    for (src, dst) in input
        .chunks(BLOCK * in_size)
        .zip(output.chunks_mut(BLOCK * out_size))
    {
        let n = src.len() / in_size;
        let wide = &mut wide[..n];
        let narrow = &mut narrow[..n];
        // Decode to f32.
        match from {
            Dtype::F32 => {
                for (w, b) in wide.iter_mut().zip(src.chunks_exact(4)) {
                    *w = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::BF16 => {
                for (w, b) in wide.iter_mut().zip(src.chunks_exact(2)) {
                    *w = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            _ => {
                for (h, b) in narrow.iter_mut().zip(src.chunks_exact(2)) {
                    *h = u16::from_le_bytes([b[0], b[1]]);
                }
                let halves: &[f16] = bytemuck::cast_slice(narrow);
                halves.convert_to_f32_slice(wide);
            }
        }
        // Encode.
        if to == Dtype::BF16 {
            for (h, w) in narrow.iter_mut().zip(wide.iter()) {
                *h = f32_to_bf16_bits(*w);
            }
        } else {
            let halves: &mut [f16] = bytemuck::cast_slice_mut(narrow);
            halves.convert_from_f32_slice(wide);
        }
        for (b, h) in dst.chunks_exact_mut(2).zip(narrow.iter()) {
            b.copy_from_slice(&h.to_le_bytes());
        }
    }
    Ok(())
}

/// Converts into a new vector.
pub fn convert_to_vec(from: Dtype, to: Dtype, input: &[u8]) -> Result<Vec<u8>> {
    let in_size = (from.bits() / 8).max(1) as usize;
    let mut out = vec![0u8; input.len() / in_size * (to.bits() / 8) as usize];
    convert(from, to, input, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use proptest::prelude::*;

    fn reference_bf16(x: f32) -> u16 {
        bf16::from_f32(x).to_bits()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn u16s(bytes: &[u8]) -> Vec<u16> {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    #[test]
    fn rounds_ties_to_even() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: rounds to the even 1.0.
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1.0078125 (odd) and 1.015625 (even).
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        // Past halfway rounds up.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        // The largest finite f32 rounds to Inf in bf16.
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80);
    }

    #[test]
    fn keeps_nan_and_infinity() {
        let input = f32_bytes(&[f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e6]);
        let bf = u16s(&convert_to_vec(Dtype::F32, Dtype::BF16, &input).unwrap());
        assert!(bf16::from_bits(bf[0]).is_nan() && bf[0] & 0x8000 == 0);
        assert!(bf16::from_bits(bf[1]).is_nan() && bf[1] & 0x8000 != 0);
        assert_eq!(&bf[2..4], &[0x7f80, 0xff80]);
        let h = u16s(&convert_to_vec(Dtype::F32, Dtype::F16, &input).unwrap());
        assert!(f16::from_bits(h[0]).is_nan());
        assert_eq!(
            &h[2..5],
            &[0x7c00, 0xfc00, 0x7c00],
            "1e6 overflows f16 to +Inf"
        );
        // A signalling NaN payload that lives only in the low bits stays a NaN in bf16.
        let snan = f32_bytes(&[f32::from_bits(0x7f80_0001)]);
        let bf = u16s(&convert_to_vec(Dtype::F32, Dtype::BF16, &snan).unwrap());
        assert!(bf16::from_bits(bf[0]).is_nan());
    }

    #[test]
    fn rejects_unsupported_pairs_and_bad_lengths() {
        let e = convert(Dtype::F32, Dtype::F32, &[0; 4], &mut [0; 4]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot convert F32 to F32: only F32, F16 and BF16 convert to F16 or BF16"
        );
        assert!(convert(Dtype::I32, Dtype::F16, &[0; 4], &mut [0; 2]).is_err());
        assert!(convert(Dtype::F32, Dtype::F16, &[0; 6], &mut [0; 3]).is_err());
        assert!(convert(Dtype::F32, Dtype::F16, &[0; 8], &mut [0; 2]).is_err());
    }

    proptest! {
        #[test]
        fn f32_to_bf16_matches_half(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            let ours = f32_to_bf16_bits(x);
            let reference = reference_bf16(x);
            if x.is_nan() {
                prop_assert!(bf16::from_bits(ours).is_nan());
            } else {
                prop_assert_eq!(ours, reference);
            }
        }

        #[test]
        fn block_conversion_equals_elementwise(values in prop::collection::vec(any::<u32>(), 0..5000), unaligned in any::<bool>()) {
            let values: Vec<f32> = values.into_iter().map(f32::from_bits).collect();
            let mut input = f32_bytes(&values);
            if unaligned { input.insert(0, 0xaa); }
            let input = if unaligned { &input[1..] } else { &input[..] };
            let bf = u16s(&convert_to_vec(Dtype::F32, Dtype::BF16, input).unwrap());
            let h = u16s(&convert_to_vec(Dtype::F32, Dtype::F16, input).unwrap());
            for (i, v) in values.iter().enumerate() {
                if v.is_nan() {
                    prop_assert!(bf16::from_bits(bf[i]).is_nan() && f16::from_bits(h[i]).is_nan());
                } else {
                    prop_assert_eq!(bf[i], reference_bf16(*v));
                    prop_assert_eq!(h[i], f16::from_f32(*v).to_bits());
                }
            }
            // Half → half goes through f32 exactly: bf16 → f16 equals f16::from_f32(bf16 value).
            let bf_bytes: Vec<u8> = bf.iter().flat_map(|b| b.to_le_bytes()).collect();
            let h2 = u16s(&convert_to_vec(Dtype::BF16, Dtype::F16, &bf_bytes).unwrap());
            for (i, b) in bf.iter().enumerate() {
                let expect = f16::from_f32(bf16::from_bits(*b).to_f32());
                if expect.is_nan() { prop_assert!(f16::from_bits(h2[i]).is_nan()); }
                else { prop_assert_eq!(h2[i], expect.to_bits()); }
            }
        }
    }
}
