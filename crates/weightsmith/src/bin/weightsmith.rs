//! The `weightsmith` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weightsmith",
    version,
    about = "Model weights from disk to GPUs and back"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a checkpoint's files, tensors, dtypes, placement units, config facts and problems.
    Inspect {
        /// A .safetensors file or a Hugging Face model folder.
        model: PathBuf,
        /// Print one JSON document (schema in the README) instead of text.
        #[arg(long)]
        json: bool,
        /// List every tensor.
        #[arg(long)]
        tensors: bool,
    },
    /// Decide where each layer and its KV cache go, before loading anything.
    Plan(Box<PlanArgs>),
}

#[derive(clap::Args)]
struct PlanArgs {
    /// A .safetensors file or a Hugging Face model folder.
    model: PathBuf,
    /// GPUs: `auto` (this machine's) or simulated capacities, e.g. 24GiB,24GiB.
    #[arg(long, default_value = "auto")]
    devices: String,
    /// Memory each device must keep free beyond what the plan counts: one size, or one per device.
    #[arg(long, default_value = "0")]
    reserve: String,
    /// Per-device overhead (CUDA context, scratch) instead of the estimate.
    #[arg(long)]
    overhead: Option<String>,
    /// KV-cache tokens per sequence, or `max` for the most that fits.
    #[arg(long, default_value = "4096")]
    cache_seq_len: String,
    /// Sequences held in the KV cache at once.
    #[arg(long, default_value_t = 1)]
    cache_batch: u64,
    /// f16, bf16, fp8, q8, q6 or q4.
    #[arg(long, default_value = "f16")]
    cache_dtype: String,
    /// greedy (fill in order, as exllamav2), balanced (even load), or manual (with --split or --split-layers).
    #[arg(long)]
    strategy: Option<String>,
    /// Manual split: GiB (or sizes with units) of weights + cache per device, e.g. 20,24.
    #[arg(long, conflicts_with = "split_layers")]
    split: Option<String>,
    /// Manual split: decoder layers per device, e.g. 10,22.
    #[arg(long)]
    split_layers: Option<String>,
    /// Keep the embedding in host memory.
    #[arg(long)]
    embedding_on_host: bool,
    /// Print one JSON document (schema in the README).
    #[arg(long)]
    json: bool,
    /// Print the plan for another engine: vllm (VLLM_PP_LAYER_PARTITION) or accelerate (device_map).
    #[arg(long, value_parser = ["vllm", "accelerate"])]
    export: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Inspect {
            model,
            json,
            tensors,
        } => {
            let report = weightsmith::inspect(&model, &weightsmith::InspectOptions { tensors })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::Plan(args) => {
            let report = weightsmith::plan_checkpoint(&args.model, &plan_options(&args)?)?;
            match args.export.as_deref() {
                Some("vllm") => print!("{}", report.export_vllm()?),
                Some(_) => print!("{}", report.export_accelerate()),
                None if args.json => println!("{}", serde_json::to_string_pretty(&report)?),
                None => print!("{}", report.to_text()),
            }
        }
    }
    Ok(())
}

fn usage(message: String) -> Box<dyn std::error::Error> {
    Box::new(weightsmith::Error::Usage(message))
}

fn plan_options(args: &PlanArgs) -> Result<weightsmith::PlanOptions, Box<dyn std::error::Error>> {
    use weightsmith::plan::{parse_gpu_split, parse_size_list, DeviceChoice, SeqLen, SplitChoice};
    let devices = match args.devices.as_str() {
        "auto" => DeviceChoice::Auto,
        list => DeviceChoice::Simulated(parse_size_list(list)?),
    };
    let seq_len = match args.cache_seq_len.as_str() {
        "max" => SeqLen::Max,
        n => SeqLen::Tokens(n.parse().map_err(|_| {
            usage(format!(
                "--cache-seq-len must be a number of tokens or max, not \"{n}\""
            ))
        })?),
    };
    let cache_dtype =
        weightsmith::planner::CacheDtype::from_name(&args.cache_dtype).ok_or_else(|| {
            usage(format!(
                "--cache-dtype must be one of f16, bf16, fp8, q8, q6, q4, not \"{}\"",
                args.cache_dtype
            ))
        })?;
    let manual = match (&args.split, &args.split_layers) {
        (Some(s), _) => Some(SplitChoice::Bytes(parse_gpu_split(s)?)),
        (_, Some(l)) => Some(SplitChoice::Layers(
            l.split(',')
                .map(|n| n.trim().parse::<u64>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    usage(format!(
                        "--split-layers must be layer counts like 10,22, not \"{l}\""
                    ))
                })?,
        )),
        _ => None,
    };
    let split = match (args.strategy.as_deref(), manual) {
        (None | Some("greedy"), None) => SplitChoice::Greedy,
        (Some("balanced"), None) => SplitChoice::Balanced,
        (None | Some("manual"), Some(m)) => m,
        (Some("manual"), None) => {
            return Err(usage(
                "--strategy manual needs --split or --split-layers".into(),
            ))
        }
        (Some(s @ ("greedy" | "balanced")), Some(_)) => {
            return Err(usage(format!(
                "--split and --split-layers are for --strategy manual, not {s}"
            )))
        }
        (Some(other), _) => {
            return Err(usage(format!(
                "--strategy must be greedy, balanced or manual, not \"{other}\""
            )))
        }
    };
    Ok(weightsmith::PlanOptions {
        devices,
        reserve_bytes: parse_size_list(&args.reserve)?,
        overhead_bytes: args
            .overhead
            .as_deref()
            .map(weightsmith::st_io::parse_size)
            .transpose()?,
        seq_len,
        batch: args.cache_batch,
        cache_dtype,
        split,
        embedding_on_host: args.embedding_on_host,
    })
}
