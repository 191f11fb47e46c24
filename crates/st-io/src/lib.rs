//! `st-io`: safetensors checkpoints on disk, with no GPU in sight.
//!
//! What it does:
//! - opens a `.safetensors` file or a Hugging Face model folder (one file, or shards with
//!   `model.safetensors.index.json`) memory-mapped, with zero-copy tensor views
//!   ([`Checkpoint`]);
//! - validates strictly: every malformed header, offset, index or config is a distinct
//!   [`Error`] naming the file and the tensor or field, never a panic ([`Header::parse`]);
//! - reads the `config.json` facts placement and merging need ([`ModelConfig`]);
//! - groups tensors into placement units in model order ([`layout::group`]);
//! - writes sharded checkpoints in a single streaming pass, atomically ([`ShardWriter`]);
//! - converts F32/F16/BF16 to F16/BF16 with one rounding ([`convert()`]);
//! - recognises quantised linear layers (GPTQ, EXL2, AWQ) and checks their tensors against
//!   each other and config.json ([`quant::quantized_linears`]);
//! - knows, per architecture family, the tensors a checkpoint must have and how transformers
//!   converts on-disk tensors to in-memory parameters, as data made by transformers itself
//!   ([`arch`]);
//! - reads only regular files, and keeps outputs apart from inputs ([`paths`]);
//! - survives a file that shrinks while it is mapped: no SIGBUS, an error naming the file
//!   ([`mapguard`], [`Checkpoint::check_intact`]);
//! - reads PEFT LoRA adapters: config, patterns, LoRA/DoRA/embedding tensors ([`LoraAdapter`]).
//!
//! What it deliberately does not do: talk to GPUs, decide placement, merge adapters, or read
//! PyTorch pickle files (they can run code when loaded).
//!
//! ```
//! use st_io::{Checkpoint, Dtype, ShardWriter, TensorSpec, WriterOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/models/tiny-llama");
//! // Open a checkpoint (a file, a folder, or a sharded folder with its index), validated.
//! let ckpt = Checkpoint::open(model)?;
//! let embed = ckpt.tensor("model.embed_tokens.weight").expect("a llama has one");
//! assert_eq!((embed.dtype, embed.shape.as_slice()), (Dtype::BF16, &[256, 64][..]));
//! let bytes: &[u8] = ckpt.tensor_bytes(embed); // zero-copy
//! // Placement units, in model order.
//! let units: Vec<String> = ckpt.layout().units.iter().map(|u| u.name.clone()).collect();
//! assert_eq!(units, ["embedding", "layers.0", "layers.1", "layers.2", "norm", "head"]);
//!
//! // Write it again as one shard: headers known before the first byte, renamed into place
//! // only when complete.
//! let out = tempfile::tempdir()?;
//! let specs = vec![TensorSpec::new(&embed.name, embed.dtype, embed.shape.clone())];
//! let mut writer = ShardWriter::create(out.path().join("copy"), specs, WriterOptions::default())?;
//! writer.write_tensor(&embed.name, bytes)?;
//! writer.finish()?;
//! assert_eq!(Checkpoint::open(out.path().join("copy"))?.tensors().len(), 1);
//! # Ok(()) }
//! ```

pub mod adapter;
pub mod arch;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod header;
pub mod layout;
pub mod mapguard;
pub mod paths;
pub mod quant;
pub mod readahead;
pub mod size;
pub mod writer;

pub use adapter::{AdapterConfig, LoraAdapter, LoraKind, LoraModule, ParamLora};
pub use checkpoint::{Checkpoint, LayoutKind, Problem, ShardFile, ShardIndex, TensorInfo};
pub use config::{ModelConfig, QuantKind, QuantizationConfig};
pub use convert::convert;
pub use dtype::Dtype;
pub use error::{Error, Result};
pub use header::{Header, HeaderTensor};
pub use layout::{ModelLayout, PlacementUnit, UnitKind};
pub use quant::{Exl2Group, GptqParams, QuantScheme, QuantizedLinear};
pub use readahead::ReadAhead;
pub use size::{format_binary, format_decimal, parse_size};
pub use writer::{ShardWriter, TensorSpec, WriteSummary, WriterOptions};
