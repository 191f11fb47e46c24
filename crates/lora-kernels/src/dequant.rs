//! GPTQ dequantisation on the CPU: `W[o][i] = scales[g][o] · (q[i][o] − z[g][o])`, `g =
//! g_idx[i]`, in f32 (exact for F16 and BF16 scales: an 11-bit significand times an integer
//! of at most 9 bits fits f32's 24), written in the `[out, in]` layout of a torch Linear weight.
//! The layout of the packed tensors is documented in `st_io::quant`. The GPU twin is
//! `gptq_dequant` in `kernels/dequant.cu` ([`crate::gpu::GpuMerger::dequantize_gptq`]).

use rayon::prelude::*;
use st_io::{Checkpoint, Dtype, GptqParams, QuantScheme, QuantizedLinear};

use crate::{Error, Result};

/// One GPTQ layer's tensors, borrowed from the checkpoint's map.
#[derive(Debug, Clone)]
pub struct GptqLayer<'a> {
    pub module: &'a str,
    pub params: &'a GptqParams,
    pub in_features: usize,
    pub out_features: usize,
    pub qweight: &'a [u8],
    pub qzeros: &'a [u8],
    pub scales: &'a [u8],
    pub scales_dtype: Dtype,
    /// The group of every input row, checked (each below `groups`).
    pub g_idx: Vec<u32>,
}

/// The `bits`-bit code number `k` of a little-endian bit stream whose `w`-th word is `word(w)`.
#[inline(always)]
pub fn unpack_code(word: impl Fn(usize) -> u32, bits: u32, k: usize) -> u32 {
    let bit = k * bits as usize;
    let (w, shift) = (bit / 32, (bit % 32) as u32);
    let mut v = word(w) >> shift;
    if shift + bits > 32 {
        v |= word(w + 1) << (32 - shift);
    }
    v & ((1u32 << bits) - 1)
}

fn word_at(bytes: &[u8], index: usize) -> u32 {
    let b = &bytes[index * 4..index * 4 + 4];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl<'a> GptqLayer<'a> {
    /// The tensors of `linear` (a GPTQ layer found by `st_io::quant::quantized_linears`), with
    /// `g_idx` read and checked; without a `g_idx` the groups are `row / group_size`.
    pub fn from_checkpoint(c: &'a Checkpoint, linear: &'a QuantizedLinear) -> Result<Self> {
        let QuantScheme::Gptq(params) = &linear.scheme else {
            return Err(Error::Quantized {
                tensor: linear.module.clone(),
                message: format!("is {}, not GPTQ", linear.scheme.format()),
            });
        };
        let part = |role: &str| {
            linear
                .part(role)
                .map(|i| &c.tensors()[i])
                .ok_or_else(|| Error::Quantized {
                    tensor: format!("{}.{role}", linear.module),
                    message: "is missing".into(),
                })
        };
        let (qweight, qzeros, scales) = (part("qweight")?, part("qzeros")?, part("scales")?);
        let inp = linear.in_features as usize;
        let g_idx: Vec<u32> = match linear.part("g_idx").map(|i| &c.tensors()[i]) {
            Some(t) => {
                let values = st_io::quant::integer_values(c, t).map_err(|e| Error::Quantized {
                    tensor: t.name.clone(),
                    message: e.to_string(),
                })?;
                values
                    .iter()
                    .enumerate()
                    .map(|(i, &g)| {
                        if g < 0 || g as u64 >= params.groups {
                            Err(Error::Quantized {
                                tensor: t.name.clone(),
                                message: format!(
                                    "gives input row {i} group {g}, but the layer has {} groups",
                                    params.groups
                                ),
                            })
                        } else {
                            Ok(g as u32)
                        }
                    })
                    .collect::<Result<_>>()?
            }
            None => (0..inp)
                .map(|i| (i as u64 / params.group_size.max(1)) as u32)
                .collect(),
        };
        Ok(GptqLayer {
            module: &linear.module,
            params,
            in_features: inp,
            out_features: linear.out_features as usize,
            qweight: c.tensor_bytes(qweight),
            qzeros: c.tensor_bytes(qzeros),
            scales: c.tensor_bytes(scales),
            scales_dtype: scales.dtype,
            g_idx,
        })
    }

    /// The sizes every dequantisation indexes by, checked against the buffers: the fields are
    /// public, so a layer built by hand must not make a kernel read past them.
    pub fn check_sizes(&self) -> Result<()> {
        let bad = |message: String| Error::Quantized {
            tensor: format!("{}.qweight", self.module),
            message,
        };
        let bits = self.params.bits as usize;
        if ![2, 3, 4, 8].contains(&bits) {
            return Err(bad(format!("{bits}-bit codes are not GPTQ's 2, 3, 4 or 8")));
        }
        let (inp, out, groups) = (
            self.in_features,
            self.out_features,
            self.params.groups as usize,
        );
        let word_rows = inp
            .checked_mul(bits)
            .map(|b| b.div_ceil(32))
            .ok_or_else(|| bad(format!("{inp} input rows overflow")))?;
        let need = |what: &str, have: usize, need: Option<usize>| {
            match need {
            Some(n) if have >= n => Ok(()),
            Some(n) => Err(bad(format!("{what} has {have} bytes; {inp} × {out} at {bits} bits in {groups} groups needs {n}"))),
            None => Err(bad(format!("the sizes of {what} overflow"))),
        }
        };
        need(
            "qweight",
            self.qweight.len(),
            word_rows.checked_mul(out).and_then(|w| w.checked_mul(4)),
        )?;
        let zero_words = out.checked_mul(bits).map(|b| b.div_ceil(32));
        need(
            "qzeros",
            self.qzeros.len(),
            zero_words
                .and_then(|w| w.checked_mul(groups))
                .and_then(|w| w.checked_mul(4)),
        )?;
        let scale_size = match self.scales_dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => return Err(Error::Dtype { dtype: other }),
        };
        need(
            "scales",
            self.scales.len(),
            groups
                .checked_mul(out)
                .and_then(|n| n.checked_mul(scale_size)),
        )?;
        if self.g_idx.len() != inp {
            return Err(bad(format!(
                "g_idx has {} entries for {inp} input rows",
                self.g_idx.len()
            )));
        }
        if let Some((i, g)) = self
            .g_idx
            .iter()
            .enumerate()
            .find(|(_, &g)| g as usize >= groups)
        {
            return Err(bad(format!(
                "g_idx gives input row {i} group {g}, but the layer has {groups} groups"
            )));
        }
        Ok(())
    }

    /// Zero points `[groups][out]` with the format's offset added.
    pub fn zeros(&self) -> Vec<i32> {
        let (groups, out) = (self.params.groups as usize, self.out_features);
        let bits = self.params.bits;
        let words_per_row = out * bits as usize / 32;
        let mut zeros = vec![0i32; groups * out];
        for (g, row) in zeros.chunks_exact_mut(out).enumerate() {
            let base = g * words_per_row;
            for (o, z) in row.iter_mut().enumerate() {
                let block = o / 32;
                let code = unpack_code(
                    |w| word_at(self.qzeros, base + block * bits as usize + w),
                    bits,
                    o % 32,
                );
                *z = code as i32 + self.params.zero_offset as i32;
            }
        }
        zeros
    }

    /// Scales `[groups][out]` as f32.
    pub fn scales_f32(&self) -> Result<Vec<f32>> {
        crate::to_f32_vec(self.scales_dtype, self.scales)
    }

    /// Dequantises into `out` (`out_features × in_features` f32, row-major: the Linear
    /// weight), on all cores.
    pub fn dequantize(&self, out: &mut [f32]) -> Result<()> {
        self.check_sizes()?;
        let (inp, outf) = (self.in_features, self.out_features);
        if out.len() != inp * outf {
            return Err(Error::Shape {
                message: format!(
                    "{}: {} values for a {outf}×{inp} weight",
                    self.module,
                    out.len()
                ),
            });
        }
        let zeros = self.zeros();
        let scales = self.scales_f32()?;
        let bits = self.params.bits as usize;
        // 16 output rows per task: each reads a 64-byte run of every packed row it touches.
        const ROWS: usize = 16;
        out.par_chunks_mut(inp * ROWS)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first = task * ROWS;
                let mut codes = [0u32; 32];
                for block in 0..inp / 32 {
                    for (r, row) in chunk.chunks_exact_mut(inp).enumerate() {
                        let o = first + r;
                        let words = |w: usize| word_at(self.qweight, (block * bits + w) * outf + o);
                        for (k, c) in codes.iter_mut().enumerate() {
                            *c = unpack_code(words, bits as u32, k);
                        }
                        for (k, &q) in codes.iter().enumerate() {
                            let i = block * 32 + k;
                            let g = self.g_idx[i] as usize;
                            let zs = g * outf + o;
                            row[i] = scales[zs] * (q as i32 - zeros[zs]) as f32;
                        }
                    }
                }
            });
        Ok(())
    }

    /// The dequantised weight as a new vector.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.in_features * self.out_features];
        self.dequantize(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer built by hand with buffers shorter than its sizes: an error naming what is
    /// short, never a read past the end (the GPU kernel takes the same check).
    #[test]
    fn a_layer_whose_buffers_do_not_match_its_sizes_is_refused() {
        let params = GptqParams {
            bits: 4,
            group_size: 32,
            groups: 2,
            act_order: false,
            sym: Some(true),
            zero_offset: 1,
        };
        let (qweight, qzeros, scales) = (
            vec![0u8; 64 * 32 * 4 / 8],
            vec![0u8; 2 * 4 * 4],
            vec![0u8; 2 * 32 * 2],
        );
        let layer = |qweight: &'static [u8], g_idx: Vec<u32>| GptqLayer {
            module: "m",
            params: Box::leak(Box::new(params.clone())),
            in_features: 64,
            out_features: 32,
            qweight,
            qzeros: Box::leak(qzeros.clone().into_boxed_slice()),
            scales: Box::leak(scales.clone().into_boxed_slice()),
            scales_dtype: Dtype::F16,
            g_idx,
        };
        let whole: &'static [u8] = Box::leak(qweight.into_boxed_slice());
        let groups: Vec<u32> = (0..64).map(|i| i / 32).collect();
        assert!(layer(whole, groups.clone()).to_f32().is_ok());
        let short = &whole[..whole.len() - 4];
        let e = layer(short, groups.clone())
            .to_f32()
            .unwrap_err()
            .to_string();
        assert!(e.contains("qweight has") && e.contains("needs 1024"), "{e}");
        let mut bad = groups.clone();
        bad[5] = 2;
        let e = layer(whole, bad).to_f32().unwrap_err().to_string();
        assert!(e.contains("input row 5 group 2"), "{e}");
        let e = layer(whole, groups[..10].to_vec())
            .to_f32()
            .unwrap_err()
            .to_string();
        assert!(e.contains("g_idx has 10 entries"), "{e}");
    }

    /// Packs codes as GPTQ does (independent of `unpack_code`: bit by bit).
    fn pack_bits(codes: &[u32], bits: u32) -> Vec<u32> {
        let mut words = vec![0u32; codes.len() * bits as usize / 32];
        for (k, &c) in codes.iter().enumerate() {
            for b in 0..bits as usize {
                if c >> b & 1 == 1 {
                    let bit = k * bits as usize + b;
                    words[bit / 32] |= 1 << (bit % 32);
                }
            }
        }
        words
    }

    #[test]
    fn unpacks_every_bit_width_including_straddling_three_bit_codes() {
        for bits in [2u32, 3, 4, 8] {
            let codes: Vec<u32> = (0..32u32).map(|k| (k * 7 + 3) % (1 << bits)).collect();
            let words = pack_bits(&codes, bits);
            assert_eq!(words.len(), bits as usize);
            for (k, &c) in codes.iter().enumerate() {
                assert_eq!(
                    unpack_code(|w| words[w], bits, k),
                    c,
                    "bits {bits} code {k}"
                );
            }
        }
        // Code 10 of a 3-bit block: bits 30, 31 of word 0 and bit 0 of word 1.
        let words = [0b11u32 << 30, 1];
        assert_eq!(unpack_code(|w| words[w], 3, 10), 0b111);
    }
}
