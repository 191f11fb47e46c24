//! Shared set-up of the criterion benchmarks: model-shaped checkpoints made as sparse files,
//! so a 16 GB checkpoint costs no disk space and no time to create.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use st_io::header::{encode_header, HeaderTensor};
use st_io::{Dtype, TensorSpec};

/// The 291 tensors of a Llama-3-8B-shaped bf16 checkpoint (16.06 GB), in transformers' order.
pub fn llama3_8b_specs() -> Vec<TensorSpec> {
    llama_specs(32, 4096, 14336, 32, 8, 128256)
}

/// The tensors of a Llama-architecture bf16 checkpoint.
pub fn llama_specs(
    layers: u64,
    hidden: u64,
    intermediate: u64,
    heads: u64,
    kv_heads: u64,
    vocab: u64,
) -> Vec<TensorSpec> {
    let head_dim = hidden / heads;
    let mut specs = vec![TensorSpec::new(
        "model.embed_tokens.weight",
        Dtype::BF16,
        vec![vocab, hidden],
    )];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        specs.extend([
            TensorSpec::new(
                format!("{p}.input_layernorm.weight"),
                Dtype::BF16,
                vec![hidden],
            ),
            TensorSpec::new(
                format!("{p}.mlp.down_proj.weight"),
                Dtype::BF16,
                vec![hidden, intermediate],
            ),
            TensorSpec::new(
                format!("{p}.mlp.gate_proj.weight"),
                Dtype::BF16,
                vec![intermediate, hidden],
            ),
            TensorSpec::new(
                format!("{p}.mlp.up_proj.weight"),
                Dtype::BF16,
                vec![intermediate, hidden],
            ),
            TensorSpec::new(
                format!("{p}.post_attention_layernorm.weight"),
                Dtype::BF16,
                vec![hidden],
            ),
            TensorSpec::new(
                format!("{p}.self_attn.k_proj.weight"),
                Dtype::BF16,
                vec![kv_heads * head_dim, hidden],
            ),
            TensorSpec::new(
                format!("{p}.self_attn.o_proj.weight"),
                Dtype::BF16,
                vec![hidden, hidden],
            ),
            TensorSpec::new(
                format!("{p}.self_attn.q_proj.weight"),
                Dtype::BF16,
                vec![hidden, hidden],
            ),
            TensorSpec::new(
                format!("{p}.self_attn.v_proj.weight"),
                Dtype::BF16,
                vec![kv_heads * head_dim, hidden],
            ),
        ]);
    }
    specs.push(TensorSpec::new(
        "model.norm.weight",
        Dtype::BF16,
        vec![hidden],
    ));
    specs.push(TensorSpec::new(
        "lm_head.weight",
        Dtype::BF16,
        vec![vocab, hidden],
    ));
    specs
}

/// Writes `specs` as one sparse safetensors file (a real header, holes for the data).
pub fn write_sparse_safetensors(path: &Path, specs: &[TensorSpec]) -> u64 {
    let mut offset = 0;
    let entries: Vec<HeaderTensor> = specs
        .iter()
        .map(|s| {
            let begin = offset;
            offset += s.bytes().expect("valid spec");
            HeaderTensor {
                name: s.name.clone(),
                dtype: s.dtype,
                shape: s.shape.clone(),
                begin,
                end: offset,
            }
        })
        .collect();
    let header = encode_header(&[("format".into(), "pt".into())], &entries);
    let mut file = File::create(path).expect("create sparse file");
    file.write_all(&header).expect("write header");
    file.set_len(header.len() as u64 + offset)
        .expect("extend sparse file");
    offset
}

/// A Llama-3-8B-shaped model folder (config.json + one sparse 16 GB model.safetensors).
pub fn write_sparse_llama3_8b(dir: &Path) -> u64 {
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","num_hidden_layers":32,"hidden_size":4096,"intermediate_size":14336,"num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,"tie_word_embeddings":false,"torch_dtype":"bfloat16"}"#,
    )
    .expect("write config");
    write_sparse_safetensors(&dir.join("model.safetensors"), &llama3_8b_specs())
}

/// A Llama-3-70B-shaped model folder (config.json + one sparse 141 GB model.safetensors).
pub fn write_sparse_llama3_70b(dir: &Path) -> u64 {
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","num_hidden_layers":80,"hidden_size":8192,"intermediate_size":28672,"num_attention_heads":64,"num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":131072,"tie_word_embeddings":false,"torch_dtype":"bfloat16"}"#,
    )
    .expect("write config");
    write_sparse_safetensors(
        &dir.join("model.safetensors"),
        &llama_specs(80, 8192, 28672, 64, 8, 128256),
    )
}
