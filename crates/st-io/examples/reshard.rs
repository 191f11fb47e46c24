//! Rewrites a checkpoint through the streaming sharded writer: the same tensors, optionally
//! converted to a 16-bit dtype, split at a new maximum shard size; config.json and
//! generation_config.json are copied.
//!
//! `cargo run --release -p st-io --example reshard -- SRC DEST [--max-shard-size 5GB]
//! [--dtype bf16|f16] [--force]`
//!
//! Used by the device script that checks our output with Python `safetensors` and
//! `transformers`, and by the writer benchmark.

use std::process::ExitCode;
use std::time::Instant;

use st_io::{convert, parse_size, Checkpoint, Dtype, ShardWriter, TensorSpec, WriterOptions};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut options = WriterOptions::default();
    let mut dtype: Option<Dtype> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--max-shard-size" => {
                options.max_shard_bytes =
                    parse_size(&args.next().ok_or("--max-shard-size needs a value")?)?
            }
            "--dtype" => {
                dtype = Some(match args.next().as_deref() {
                    Some("bf16") => Dtype::BF16,
                    Some("f16") => Dtype::F16,
                    other => {
                        return Err(format!("--dtype must be bf16 or f16, not {other:?}").into())
                    }
                })
            }
            "--force" => options.replace_existing = true,
            _ => positional.push(a),
        }
    }
    let [src, dest] = positional.as_slice() else {
        return Err(
            "usage: reshard SRC DEST [--max-shard-size 5GB] [--dtype bf16|f16] [--force]".into(),
        );
    };
    let started = Instant::now();
    let checkpoint = Checkpoint::open(src)?;
    let target = |d: Dtype| match dtype {
        Some(t) if convert::can_convert(d, t) => t,
        _ => d,
    };
    let specs = checkpoint
        .tensors()
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), target(t.dtype), t.shape.clone()))
        .collect();
    let mut writer = ShardWriter::create(dest, specs, options)?;
    for t in checkpoint.tensors() {
        let bytes = checkpoint.tensor_bytes(t);
        let to = target(t.dtype);
        if to == t.dtype {
            writer.write_tensor(&t.name, bytes)?;
        } else {
            writer.write_tensor(&t.name, &convert::convert_to_vec(t.dtype, to, bytes)?)?;
        }
    }
    let root = checkpoint.root();
    let folder = if root.is_dir() {
        root.to_path_buf()
    } else {
        root.parent().unwrap_or(root).to_path_buf()
    };
    for name in ["config.json", "generation_config.json"] {
        if let Ok(bytes) = std::fs::read(folder.join(name)) {
            writer.add_file(name, &bytes)?;
        }
    }
    let summary = writer.finish()?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {} file(s), {} bytes of tensors in {:.3} s ({:.2} GB/s)",
        summary.files.len(),
        summary.tensor_bytes,
        secs,
        summary.tensor_bytes as f64 / secs / 1e9
    );
    Ok(())
}
