//! KV-cache sizes and the default per-device overhead estimate, from the model's dimensions.

use serde::Serialize;

/// The element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDtype {
    F16,
    Bf16,
    /// 8-bit float, no scales (vLLM's `fp8`).
    Fp8,
    /// exllamav2's Q8 cache: 8-bit values plus one f16 scale per group of 32.
    Q8,
    /// exllamav2's Q6 cache: 6-bit values plus one f16 scale per group of 32.
    Q6,
    /// exllamav2's Q4 cache: 4-bit values plus one f16 scale per group of 32.
    Q4,
}

/// Elements that share one scale in the quantised caches.
pub const QUANT_GROUP: u64 = 32;

impl CacheDtype {
    pub const ALL: [CacheDtype; 6] = [
        CacheDtype::F16,
        CacheDtype::Bf16,
        CacheDtype::Fp8,
        CacheDtype::Q8,
        CacheDtype::Q6,
        CacheDtype::Q4,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CacheDtype::F16 => "f16",
            CacheDtype::Bf16 => "bf16",
            CacheDtype::Fp8 => "fp8",
            CacheDtype::Q8 => "q8",
            CacheDtype::Q6 => "q6",
            CacheDtype::Q4 => "q4",
        }
    }

    pub fn from_name(name: &str) -> Option<CacheDtype> {
        CacheDtype::ALL
            .into_iter()
            .find(|d| d.name() == name.to_ascii_lowercase())
    }

    /// Bytes for `elements` cache elements, scales included (rounded up to whole bytes).
    pub fn bytes_for(self, elements: u64) -> u64 {
        let value_bits = match self {
            CacheDtype::F16 | CacheDtype::Bf16 => 16,
            CacheDtype::Fp8 | CacheDtype::Q8 => 8,
            CacheDtype::Q6 => 6,
            CacheDtype::Q4 => 4,
        };
        let scales = match self {
            CacheDtype::Q8 | CacheDtype::Q6 | CacheDtype::Q4 => {
                elements.div_ceil(QUANT_GROUP).saturating_mul(2)
            }
            _ => 0,
        };
        // Sizes past u64 saturate: no device holds them, so the plan says it does not fit
        // (never a wrapped, small number).
        u64::try_from((elements as u128 * value_bits as u128).div_ceil(8))
            .unwrap_or(u64::MAX)
            .saturating_add(scales)
    }
}

/// What the KV cache must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CacheSpec {
    /// Maximum sequence length per sequence (0: plan weights only).
    pub seq_len: u64,
    /// Sequences held at once.
    pub batch: u64,
    pub dtype: CacheDtype,
}

/// The model dimensions that size the cache and the overhead estimate.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ModelDims {
    pub kv_heads: u64,
    pub head_dim: u64,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub vocab_size: u64,
    /// Attention window of sliding-window layers.
    pub sliding_window: Option<u64>,
    /// Which decoder layers use the sliding window, by layer index (`None`: every layer does
    /// when `sliding_window` is set, as in Mistral).
    pub sliding_layers: Option<Vec<bool>>,
}

impl ModelDims {
    /// Whether decoder layer `index` attends through the sliding window.
    pub fn is_sliding(&self, index: u64) -> bool {
        self.sliding_window.is_some()
            && match &self.sliding_layers {
                Some(flags) => flags.get(index as usize).copied().unwrap_or(false),
                None => true,
            }
    }

    /// KV-cache bytes of decoder layer `index`:
    /// 2 (K and V) × kv_heads × head_dim × positions × batch, in the cache dtype with its
    /// scales, where positions is the sequence length, capped at the window for sliding layers.
    pub fn cache_bytes(&self, index: u64, cache: &CacheSpec) -> u64 {
        let mut positions = cache.seq_len;
        if self.is_sliding(index) {
            if let Some(w) = self.sliding_window {
                positions = positions.min(w);
            }
        }
        let elements = 2u128
            .saturating_mul(self.kv_heads as u128)
            .saturating_mul(self.head_dim as u128)
            .saturating_mul(positions as u128)
            .saturating_mul(cache.batch as u128);
        cache.dtype.bytes_for(elements.min(u64::MAX as u128) as u64)
    }
}

/// CUDA context, cuBLAS workspace and allocator slack per GPU in the default overhead.
pub const CONTEXT_BYTES: u64 = 512 << 20;
/// Tokens of one prefill chunk in the default activation scratch.
pub const PREFILL_CHUNK: u64 = 2048;

/// The default overhead of a GPU that holds part of the model: the CUDA context and slack
/// ([`CONTEXT_BYTES`]) plus activation scratch for one prefill chunk,
/// batch × min(seq_len, 2048) × (4·hidden + 2·intermediate) × 2 bytes.
pub fn default_overhead_bytes(dims: &ModelDims, cache: &CacheSpec) -> u64 {
    let tokens = cache.batch.max(1) as u128 * cache.seq_len.clamp(1, PREFILL_CHUNK) as u128;
    let per_token = 4 * dims.hidden_size as u128 + 2 * dims.intermediate_size as u128;
    let scratch = tokens.saturating_mul(per_token).saturating_mul(2);
    u64::try_from(scratch.saturating_add(CONTEXT_BYTES as u128)).unwrap_or(u64::MAX)
}

/// The extra scratch of the GPU that holds the head: f32 logits of the last position of each
/// sequence, batch × vocab × 4 bytes.
pub fn head_scratch_bytes(dims: &ModelDims, cache: &CacheSpec) -> u64 {
    let bytes = (cache.batch.max(1) as u128)
        .saturating_mul(dims.vocab_size as u128)
        .saturating_mul(4);
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3_8b() -> ModelDims {
        ModelDims {
            kv_heads: 8,
            head_dim: 128,
            hidden_size: 4096,
            intermediate_size: 14336,
            vocab_size: 128256,
            ..ModelDims::default()
        }
    }

    #[test]
    fn llama3_8b_f16_cache_is_128_kib_per_token_per_model() {
        let c = CacheSpec {
            seq_len: 8192,
            batch: 1,
            dtype: CacheDtype::F16,
        };
        // 2 × 8 × 128 × 2 bytes = 4 KiB per token per layer.
        assert_eq!(llama3_8b().cache_bytes(0, &c), 8192 * 4096);
    }

    #[test]
    fn quantised_caches_count_their_scales() {
        assert_eq!(CacheDtype::Q4.bytes_for(64), 32 + 4);
        assert_eq!(CacheDtype::Q6.bytes_for(64), 48 + 4);
        assert_eq!(CacheDtype::Q8.bytes_for(64), 64 + 4);
        assert_eq!(CacheDtype::Fp8.bytes_for(64), 64);
        assert_eq!(CacheDtype::Bf16.bytes_for(64), 128);
        assert_eq!(CacheDtype::Q4.bytes_for(33), 17 + 4);
    }

    #[test]
    fn sliding_layers_are_capped_at_the_window() {
        let mut d = llama3_8b();
        d.sliding_window = Some(1024);
        let c = CacheSpec {
            seq_len: 8192,
            batch: 2,
            dtype: CacheDtype::Bf16,
        };
        assert_eq!(d.cache_bytes(3, &c), 1024 * 4096 * 2);
        d.sliding_layers = Some(vec![true, false]);
        assert_eq!(d.cache_bytes(0, &c), 1024 * 4096 * 2);
        assert_eq!(d.cache_bytes(1, &c), 8192 * 4096 * 2);
        assert_eq!(
            d.cache_bytes(7, &c),
            8192 * 4096 * 2,
            "layers past the list are full attention"
        );
    }

    #[test]
    fn parses_cache_dtype_names() {
        for d in CacheDtype::ALL {
            assert_eq!(CacheDtype::from_name(d.name()), Some(d));
        }
        assert_eq!(CacheDtype::from_name("Q4"), Some(CacheDtype::Q4));
        assert_eq!(CacheDtype::from_name("int4"), None);
    }
}
