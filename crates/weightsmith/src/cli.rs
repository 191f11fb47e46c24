//! The `weightsmith` command line (feature `cli`): argument parsing, progress bars and printing
//! over the library's verbs. The `weightsmith` binary and the Python package's `weightsmith`
//! command both run [`main_with_args`].

use std::path::{Path, PathBuf};
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
        /// A .safetensors file, a Hugging Face model folder, or a Hub id OWNER/NAME[@REVISION]
        /// (read header-only: config, index and each shard's header by HTTP Range). A local
        /// path of that name always wins.
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
    /// Merge LoRA adapters into their base: a standalone 16-bit checkpoint, no PEFT needed.
    Merge(Box<MergeArgs>),
    /// Load a checkpoint onto this machine's GPUs (or host memory without one), per the plan.
    Load(Box<LoadArgs>),
    /// Publish a checkpoint folder to a Hugging Face Hub repository (one commit; a re-run
    /// uploads only what changed).
    Publish(Box<PublishArgs>),
}

#[derive(clap::Args)]
struct HubArgs {
    /// Create the repository as private (when it does not exist yet).
    #[arg(long)]
    private: bool,
    /// Branch to commit to (created from main when missing).
    #[arg(long)]
    revision: Option<String>,
    /// Commit summary.
    #[arg(long)]
    commit_message: Option<String>,
    /// Commit description.
    #[arg(long)]
    commit_description: Option<String>,
    /// Open a pull request instead of committing to the branch.
    #[arg(long)]
    create_pr: bool,
    /// Hugging Face token (default: HF_TOKEN, then the token file). Never printed.
    #[arg(long)]
    token: Option<String>,
    /// Hub endpoint (default: HF_ENDPOINT, then https://huggingface.co).
    #[arg(long)]
    endpoint: Option<String>,
    /// Tries per request on transient failures (connection errors, 429, 5xx).
    #[arg(long, default_value_t = 5)]
    retries: u32,
}

#[derive(clap::Args)]
struct PublishArgs {
    /// The checkpoint folder (config.json, safetensors weights, tokenizer, README.md).
    dir: PathBuf,
    /// The repository: owner/name.
    #[arg(long)]
    repo: String,
    #[command(flatten)]
    hub: HubArgs,
    /// Check, hash and show what would be uploaded and the card; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Write a new model card even if the folder has a README.md (the folder is not changed).
    #[arg(long)]
    card: bool,
    /// base_model for a generated card (a Hub id).
    #[arg(long)]
    base_model: Option<String>,
    /// license for a generated card.
    #[arg(long)]
    license: Option<String>,
    /// Print the result as one JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LoadArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Read every tensor back from the device and compare it with the file.
    #[arg(long)]
    verify: bool,
    /// Do not register page-cached files with the driver (measure the pinned path).
    #[arg(long)]
    no_register: bool,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// The base model folder (or .safetensors file), or a Hub id OWNER/NAME[@REVISION],
    /// downloaded into the Hugging Face cache (HF_HUB_CACHE) when no local path of that name
    /// exists.
    #[arg(long)]
    base: PathBuf,
    /// A PEFT LoRA adapter folder or Hub id, optionally with a weight: DIR or DIR:0.5. Repeat to
    /// merge several. A local path always wins over a Hub id.
    #[arg(long = "adapter", required = true)]
    adapters: Vec<String>,
    /// The output folder (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Output dtype: bf16 or f16 (default: the base's 16-bit dtype, else bf16).
    #[arg(long)]
    dtype: Option<String>,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Largest shard, decimal units as the Hub counts (5GB, 500MB) or binary (4GiB).
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Self-check: re-read the output and recompute sample rows in f64 from the same parsed
    /// terms (catches arithmetic and writing faults, not a misread adapter config).
    #[arg(long)]
    verify: bool,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
    /// Print the merge report as one JSON document.
    #[arg(long)]
    json: bool,
    /// The base's Hub id for the model card (base_model), when the base is a local folder.
    #[arg(long)]
    base_model: Option<String>,
    /// After the merge, publish the output folder to this Hub repository (owner/name).
    #[arg(long)]
    push_to: Option<String>,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// A .safetensors file, a Hugging Face model folder, or a Hub id OWNER/NAME[@REVISION]
    /// (`plan` reads its headers only; `load` downloads it into the Hugging Face cache). A local
    /// path of that name always wins.
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
    /// Place each unit where a device map says: a plan (`plan --json`, perhaps edited) or an
    /// accelerate device_map (`plan --export accelerate`), as a JSON file or inline JSON.
    #[arg(long, value_name = "FILE|JSON", conflicts_with_all = ["strategy", "split", "split_layers", "embedding_on_host"])]
    device_map: Option<String>,
    /// Print one JSON document (schema in the README).
    #[arg(long)]
    json: bool,
    /// Print the plan for another engine: vllm (VLLM_PP_LAYER_PARTITION) or accelerate (device_map).
    #[arg(long, value_parser = ["vllm", "accelerate"])]
    export: Option<String>,
}

/// Runs the command line on `args` (the first is the program name) and returns its exit code.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    trace_from_env();
    download_bar();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            // The library's words ("allow replacing it") in the command line's terms.
            if let Some(crate::Error::Checkpoint(st_io::Error::DestinationExists { .. })) =
                e.downcast_ref::<crate::Error>()
            {
                eprintln!("       (--force replaces it; never an input of this run)");
            }
            // 130, the shell's code for a command ended by Ctrl-C, when it was one.
            match e.downcast_ref::<crate::Error>() {
                Some(crate::Error::Interrupted(_)) => ExitCode::from(130),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// A progress bar (bytes, rate, ETA) for downloads from the Hub, on a terminal.
/// `--no-register`, or `WEIGHTSMITH_NO_REGISTER` set (the CLI maps its environment to
/// options; the libraries read none).
fn no_register(flag: bool) -> bool {
    flag || std::env::var_os("WEIGHTSMITH_NO_REGISTER").is_some()
}

/// The staged path's shape from `WEIGHTSMITH_STAGE_WORKERS`, `WEIGHTSMITH_STAGE_MB` and
/// `WEIGHTSMITH_WARM_STAGED_PERCENT`.
fn staging_from_env() -> gpu_mem::upload::StagingConfig {
    gpu_mem::upload::StagingConfig::from_vars(|k| std::env::var(k).ok())
}

/// `WEIGHTSMITH_TRACE=1`: the libraries' `tracing` events at debug level (stage timings,
/// read-ahead, per-file copy paths) on stderr.
fn trace_from_env() {
    if std::env::var_os("WEIGHTSMITH_TRACE").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::DEBUG)
            .without_time()
            .with_target(false)
            .with_ansi(false)
            .try_init();
    }
}

fn download_bar() {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    crate::source::set_download_progress(Some(Box::new(move |repo, p| {
        bar.set_length(p.total_bytes);
        bar.set_position(p.done_bytes);
        bar.set_message(format!("{repo}: {}/{} files", p.files_done, p.files_total));
        if p.files_done == p.files_total {
            bar.finish_and_clear();
        }
    })));
}

/// Ctrl-C (SIGINT), SIGTERM and SIGHUP during a merge: the first sets the merge's cancel flag,
/// so it stops and removes its partial output; a second ends the process at once. During the
/// upload of `merge --push-to` (after [`uploading`]) the first one ends the process with 130:
/// the merged folder is complete, and publishing it again resumes the upload.
mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};

    static CANCEL: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    static UPLOADING: AtomicBool = AtomicBool::new(false);

    /// From now on a signal ends the process (the merged output is in place).
    pub fn uploading() {
        UPLOADING.store(true, Ordering::SeqCst);
    }

    extern "C" fn on_signal(_: libc::c_int) {
        // Only async-signal-safe work here: atomics, write(2) and _exit(2).
        if UPLOADING.load(Ordering::SeqCst) {
            let msg = b"\nweightsmith: interrupted during the upload; the merged folder is complete: `weightsmith publish` it to resume\n";
            // SAFETY: write(2) from a static buffer and _exit(2) are async-signal-safe.
            unsafe {
                libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
                libc::_exit(130);
            }
        }
        let Some(cancel) = CANCEL.get() else {
            // SAFETY: _exit is async-signal-safe and ends the process.
            unsafe { libc::_exit(130) };
        };
        if cancel.swap(true, Ordering::SeqCst) {
            // SAFETY: as above.
            unsafe { libc::_exit(130) };
        }
        let msg =
            b"\nweightsmith: interrupted; removing the partial output (again to quit at once)\n";
        // SAFETY: write(2) to stderr from a static buffer is async-signal-safe; its result
        // does not matter.
        unsafe { libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len()) };
    }

    /// The flag the handler sets, installed for SIGINT, SIGTERM and SIGHUP.
    pub fn install() -> Arc<AtomicBool> {
        let cancel = CANCEL
            .get_or_init(|| Arc::new(AtomicBool::new(false)))
            .clone();
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: `on_signal` is an `extern "C" fn(c_int)` that does only async-signal-safe
            // work; replacing the default disposition of these signals has no other effect.
            unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
        }
        cancel
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Inspect {
            model,
            json,
            tensors,
        } => {
            let report = crate::inspect(&model, &crate::InspectOptions { tensors })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::Merge(args) => {
            let mut options = merge_options(&args)?;
            options.cancel = Some(interrupt::install());
            // Check the repository id and the token before hours of merging, not after.
            let push = match &args.push_to {
                Some(repo) => {
                    crate::hub_publish::validate_repo_id(repo)?;
                    let opts = publish_options(repo, &args.hub)?;
                    if opts.hub.token.is_none() {
                        return Err(crate::hub_publish::Error::NoToken.into());
                    }
                    Some(opts)
                }
                None => None,
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {pos_msg}",
                )
                .map(|s| s.tick_chars("|/-\\ "))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let report = crate::merge(&args.base, &options, &mut |p| {
                bar.set_length(p.bytes_total);
                bar.set_position(p.bytes_done);
                bar.set_message(format!(
                    "{}/{} {}",
                    p.tensors_done, p.tensors_total, p.tensor
                ));
            });
            bar.finish_and_clear();
            let report = report?;
            if args.json && push.is_none() {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if !args.json {
                print!("{}", merge_text(&report));
            }
            if let Some(mut opts) = push {
                // A Ctrl-C that came as the output was put in place stops here, before any
                // byte is uploaded; one during the upload ends the process (see `interrupt`).
                interrupt::uploading();
                if options
                    .cancel
                    .as_ref()
                    .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
                {
                    return Err(Box::new(crate::Error::Interrupted(format!(
                        "interrupted before the upload; {} is complete: `weightsmith publish` it",
                        args.out.display()
                    ))));
                }
                if opts.hub.commit_message.is_none() {
                    opts.hub.commit_message = Some(format!(
                        "Merge {} LoRA adapter(s) into the base with weightsmith {}",
                        report.adapters.len(),
                        env!("CARGO_PKG_VERSION")
                    ));
                }
                let summary = run_publish(&args.out, &opts, args.json)?;
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "schema_version": 1,
                            "merge": report,
                            "publish": summary,
                        }))?
                    );
                }
            }
        }
        Command::Publish(args) => {
            let opts = publish_command_options(&args)?;
            let summary = run_publish(&args.dir, &opts, args.json)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            }
        }
        Command::Load(args) => {
            if args.plan.export.is_some() {
                return Err(usage("--export is for `weightsmith plan`".into()));
            }
            if args.plan.devices != "auto" {
                return Err(usage("load uses this machine's devices: leave --devices at auto (simulated sizes are for `weightsmith plan`)".into()));
            }
            let options = crate::LoadOptions {
                plan: plan_options(&args.plan)?,
                verify: args.verify,
                no_register: no_register(args.no_register),
                host_only: false,
                staging: staging_from_env(),
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let loaded = crate::load(&args.plan.model, &options, &mut |p| {
                bar.set_length(p.bytes_total);
                bar.set_position(p.bytes_done);
                bar.set_message(match p.stage {
                    crate::LoadStage::Allocating => format!("allocating: {}", p.units),
                    _ => format!("{}: {}", p.file, p.units),
                });
            });
            bar.finish_and_clear();
            let loaded = loaded?;
            let r = &loaded.report;
            if args.plan.json {
                println!("{}", serde_json::to_string_pretty(r)?);
            } else {
                print!("{}", load_text(r));
            }
        }
        Command::Plan(args) => {
            let report = crate::plan_checkpoint(&args.model, &plan_options(&args)?)?;
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

fn publish_options(
    repo: &str,
    hub: &HubArgs,
) -> Result<crate::PublishOptions, Box<dyn std::error::Error>> {
    let mut opts = crate::PublishOptions::new(repo, hub.token.as_deref(), hub.endpoint.as_deref());
    if hub.retries == 0 {
        return Err(usage("--retries must be at least 1".into()));
    }
    opts.hub.private = hub.private;
    opts.hub.revision = hub.revision.clone();
    opts.hub.commit_message = hub.commit_message.clone();
    opts.hub.commit_description = hub.commit_description.clone();
    opts.hub.create_pr = hub.create_pr;
    opts.hub.retry.max_attempts = hub.retries;
    if let Ok(ms) = std::env::var("WEIGHTSMITH_RETRY_BASE_MS") {
        // For tests that exercise retries without waiting seconds.
        if let Ok(ms) = ms.parse() {
            opts.hub.retry.base_delay = std::time::Duration::from_millis(ms);
        }
    }
    Ok(opts)
}

/// `publish`'s options from its flags: the Hub's, the dry run and the card.
fn publish_command_options(
    args: &PublishArgs,
) -> Result<crate::PublishOptions, Box<dyn std::error::Error>> {
    let mut opts = publish_options(&args.repo, &args.hub)?;
    opts.dry_run = args.dry_run;
    if args.card {
        opts.card = crate::publish::CardPolicy::Generate;
    }
    opts.card_overrides = crate::publish::CardOverrides {
        base_model: args.base_model.clone(),
        license: args.license.clone(),
    };
    Ok(opts)
}

/// Publishes with a progress bar (hashing, then uploading) and prints the text summary
/// unless `json`.
fn run_publish(
    dir: &std::path::Path,
    opts: &crate::PublishOptions,
    json: bool,
) -> Result<crate::PublishSummary, Box<dyn std::error::Error>> {
    use crate::publish::PublishEvent;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = crate::publish(dir, opts, &|e| match e {
        PublishEvent::Hashing {
            done_bytes,
            total_bytes,
        } => {
            bar.set_message("hashing");
            bar.set_length(total_bytes);
            bar.set_position(done_bytes);
        }
        PublishEvent::Connecting { endpoint } => {
            bar.set_message(format!("connecting to {endpoint}"));
        }
        PublishEvent::Uploading {
            sent_bytes,
            total_bytes,
        } => {
            bar.set_message("uploading");
            bar.set_length(total_bytes);
            bar.set_position(sent_bytes);
        }
        PublishEvent::Committing => bar.set_message("committing"),
    });
    bar.finish_and_clear();
    let summary = summary?;
    if !json {
        print!("{}", summary.to_text());
    }
    Ok(summary)
}

fn merge_options(args: &MergeArgs) -> Result<crate::MergeOptions, Box<dyn std::error::Error>> {
    let adapters = args
        .adapters
        .iter()
        .map(|a| match a.rsplit_once(':') {
            // `DIR:W` is a weight only when `DIR:W` itself is not a path (a folder named
            // `run:2` is an adapter, not `run` weighted 2).
            Some((path, w)) if w.parse::<f64>().is_ok() && !Path::new(a).exists() => {
                let weight: f64 = w.parse().unwrap_or(1.0);
                if weight.is_finite() {
                    Ok((PathBuf::from(path), weight))
                } else {
                    Err(usage(format!(
                        "--adapter {a}: the weight must be a finite number"
                    )))
                }
            }
            _ => Ok((PathBuf::from(a), 1.0)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = crate::MergeOptions::new(adapters, &args.out);
    if let Some(b) = &args.base_model {
        crate::hub_publish::validate_repo_id(b).map_err(|_| {
            usage(format!(
                "--base-model must be a Hub id (owner/name), not \"{b}\""
            ))
        })?;
        options.base_model = Some(b.clone());
    }
    options.dtype = match args.dtype.as_deref() {
        None => None,
        Some("bf16" | "bfloat16") => Some(crate::st_io::Dtype::BF16),
        Some("f16" | "fp16" | "float16") => Some(crate::st_io::Dtype::F16),
        Some(other) => {
            return Err(usage(format!(
                "--dtype must be bf16 or f16, not \"{other}\""
            )))
        }
    };
    options.device = match args.device.as_str() {
        "auto" => crate::MergeDevice::Auto,
        "cpu" => crate::MergeDevice::Cpu,
        d => match d.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => crate::MergeDevice::Cuda(n),
            None => {
                return Err(usage(format!(
                    "--device must be auto, cpu or cuda:N, not \"{d}\""
                )))
            }
        },
    };
    options.max_shard_bytes = crate::st_io::parse_size(&args.max_shard_size)?;
    options.verify = args.verify;
    options.force = args.force;
    Ok(options)
}

fn merge_text(r: &crate::MergeReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "merged {} adapter(s) into {} -> {}\n  {} tensors, {} in {:.2} s ({:.2} GB/s), {} on {}",
        r.adapters.len(),
        r.base,
        r.out,
        r.tensors_written,
        crate::st_io::format_decimal(r.tensor_bytes),
        r.seconds,
        r.tensor_bytes as f64 / r.seconds.max(1e-9) / 1e9,
        r.dtype,
        r.device
    );
    for l in &r.removed_leftovers {
        let _ = writeln!(s, "  removed the leftovers of an earlier, killed run: {l}");
    }
    for a in &r.adapters {
        let _ = writeln!(
            s,
            "  adapter {} (weight {}, r {}, alpha {}{}{}): {} module(s)",
            a.path,
            a.weight,
            a.r,
            a.lora_alpha,
            if a.use_rslora { ", rsLoRA" } else { "" },
            if a.use_dora { ", DoRA" } else { "" },
            a.modules
        );
        for t in &a.replaced_tensors {
            let _ = writeln!(s, "    replaces {t}");
        }
    }
    let _ = writeln!(
        s,
        "  files: {}",
        r.files
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(s, "\n  {:<60} {:>14}", "changed tensor", "|dW| / |W|");
    for m in &r.modules {
        let _ = writeln!(s, "  {:<60} {:>14.3e}", m.tensor, m.relative_delta);
    }
    if let Some(v) = &r.verify {
        let _ = writeln!(
            s,
            "\n  verify: {} rows recomputed in f64, largest error {} ulp{}",
            v.rows_checked,
            v.max_ulps,
            v.worst_tensor
                .as_ref()
                .map(|t| format!(" ({t})"))
                .unwrap_or_default()
        );
    }
    s
}

fn load_text(r: &crate::LoadReport) -> String {
    use crate::st_io::{format_binary, format_decimal};
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "loaded {} onto {} in {:.2} s: {} of weights at {:.2} GB/s, {} of KV cache",
        r.model,
        r.backend,
        r.seconds,
        format_decimal(r.weight_bytes),
        r.gb_per_s,
        format_binary(r.cache_bytes)
    );
    let _ = writeln!(
        s,
        "\n  {:<8} {:<24} {:>11} {:>11} {:>13} {:>8}",
        "device", "name", "planned", "allocated", "cuMemGetInfo", "GB/s"
    );
    for d in &r.devices {
        let _ = writeln!(
            s,
            "  {:<8} {:<24} {:>11} {:>11} {:>13} {:>8.2}",
            d.device,
            d.name,
            format_binary(d.planned_bytes),
            format_binary(d.allocated_bytes),
            d.mem_info_delta_bytes
                .map(format_binary)
                .unwrap_or_else(|| "-".into()),
            d.gb_per_s
        );
    }
    let _ = writeln!(
        s,
        "\n  files: {}",
        r.files
            .iter()
            .map(|(f, p)| format!("{f} ({p})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(n) = r.verified_tensors {
        let _ = writeln!(s, "  verify: {n} tensors read back, identical to the files");
    }
    s
}

fn usage(message: String) -> Box<dyn std::error::Error> {
    Box::new(crate::Error::Usage(message))
}

/// `--device-map`: inline JSON, or the file that holds it.
fn device_map(value: &str) -> Result<crate::DeviceMap, Box<dyn std::error::Error>> {
    if value.trim_start().starts_with('{') {
        return Ok(crate::DeviceMap::from_json(value)?);
    }
    let bytes = st_io::paths::read_regular(std::path::Path::new(value))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| usage(format!("--device-map {value}: the file is not UTF-8 text")))?;
    crate::DeviceMap::from_json(&text).map_err(|e| usage(format!("{value}: {e}")))
}

fn plan_options(args: &PlanArgs) -> Result<crate::PlanOptions, Box<dyn std::error::Error>> {
    use crate::plan::{parse_gpu_split, parse_size_list, DeviceChoice, SeqLen, SplitChoice};
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
        crate::planner::CacheDtype::from_name(&args.cache_dtype).ok_or_else(|| {
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
        _ if args.device_map.is_some() => {
            SplitChoice::Map(device_map(args.device_map.as_deref().unwrap_or_default())?)
        }
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
    Ok(crate::PlanOptions {
        devices,
        reserve_bytes: parse_size_list(&args.reserve)?,
        overhead_bytes: args
            .overhead
            .as_deref()
            .map(crate::st_io::parse_size)
            .transpose()?,
        seq_len,
        batch: args.cache_batch,
        cache_dtype,
        split,
        embedding_on_host: args.embedding_on_host,
    })
}

/// A verb's flags, as the command line takes them (`["merge", "--base", …]`), parsed and run by
/// the same code as the command line, returning the `--json` document instead of printing.
/// The Python package calls it, so its keyword arguments mean exactly what the flags mean.
/// `progress` gets (bytes done, bytes total, what); `cancel` stops a merge cleanly.
pub fn report_json(
    argv: &[String],
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<String, CallError> {
    let mut run = || -> Result<String, Box<dyn std::error::Error>> {
        let cli = Cli::try_parse_from(
            std::iter::once("weightsmith".to_string()).chain(argv.iter().cloned()),
        )?;
        let json = match cli.command {
            Command::Inspect { model, tensors, .. } => {
                serde_json::to_string(&crate::inspect(&model, &crate::InspectOptions { tensors })?)?
            }
            Command::Plan(args) => {
                serde_json::to_string(&crate::plan_checkpoint(&args.model, &plan_options(&args)?)?)?
            }
            Command::Merge(args) => {
                if args.push_to.is_some() {
                    return Err(usage("push_to: call publish() on the merged folder".into()));
                }
                let mut options = merge_options(&args)?;
                options.cancel = cancel.clone();
                let report = crate::merge(&args.base, &options, &mut |p| {
                    progress(p.bytes_done, p.bytes_total, p.tensor)
                })?;
                serde_json::to_string(&report)?
            }
            Command::Publish(args) => {
                let opts = publish_command_options(&args)?;
                serde_json::to_string(&crate::publish(&args.dir, &opts, &|_| {})?)?
            }
            Command::Load(_) => {
                return Err(usage("load returns tensors: use load_from_args".into()))
            }
        };
        Ok(json)
    };
    run().map_err(CallError::from)
}

/// What kind of failure a [`report_json`] or [`load_from_args`] call had, for a binding to map
/// onto its own exceptions; the message is the command line's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallErrorKind {
    /// A path that does not exist.
    NotFound,
    /// Cancelled; nothing was left behind.
    Interrupted,
    /// Arguments that do not parse or do not go together.
    Usage,
    /// Anything else: the input, the device, the network.
    Failed,
}

/// A failed call: its kind and the command line's message.
#[derive(Debug, Clone)]
pub struct CallError {
    pub kind: CallErrorKind,
    pub message: String,
}

impl From<Box<dyn std::error::Error>> for CallError {
    fn from(e: Box<dyn std::error::Error>) -> CallError {
        let kind = if let Some(w) = e.downcast_ref::<crate::Error>() {
            match w {
                crate::Error::Checkpoint(st_io::Error::NotFound { .. }) => CallErrorKind::NotFound,
                crate::Error::Interrupted(_) => CallErrorKind::Interrupted,
                crate::Error::Usage(_) => CallErrorKind::Usage,
                _ => CallErrorKind::Failed,
            }
        } else if let Some(c) = e.downcast_ref::<clap::Error>() {
            let _ = c;
            CallErrorKind::Usage
        } else if let Some(st_io::Error::NotFound { .. }) = e.downcast_ref::<st_io::Error>() {
            CallErrorKind::NotFound
        } else {
            CallErrorKind::Failed
        };
        CallError {
            kind,
            message: e.to_string(),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// `load`'s flags (`["load", MODEL, …]`) parsed and run as the command line does; the model
/// stays loaded for the caller.
pub fn load_from_args(
    argv: &[String],
    host_only: bool,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<crate::LoadedModel, CallError> {
    load_inner(argv, host_only, progress).map_err(CallError::from)
}

fn load_inner(
    argv: &[String],
    host_only: bool,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<crate::LoadedModel, Box<dyn std::error::Error>> {
    let cli = Cli::try_parse_from(
        std::iter::once("weightsmith".to_string()).chain(argv.iter().cloned()),
    )?;
    let Command::Load(args) = cli.command else {
        return Err(usage("load_from_args takes load's flags".into()));
    };
    let options = crate::LoadOptions {
        plan: plan_options(&args.plan)?,
        verify: args.verify,
        no_register: no_register(args.no_register),
        host_only,
        staging: staging_from_env(),
    };
    Ok(crate::load(&args.plan.model, &options, &mut |p| {
        progress(p.bytes_done, p.bytes_total, p.file)
    })?)
}
