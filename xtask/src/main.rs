//! `cargo xtask <task>`: developer chores of the weightsmith workspace, in plain Rust.
//!
//! `build-kernels`: compiles `kernels/*.cu` to PTX in `crates/lora-kernels/ptx/` with NVRTC
//! (libnvrtc from a CUDA toolkit, or from the `nvidia-cuda-nvrtc-cu12==12.4.127` Python wheel:
//! `pip install nvidia-cuda-nvrtc-cu12==12.4.127` and point LD_LIBRARY_PATH at its
//! `nvidia/cuda_nvrtc/lib`). NVRTC 12.4 targeting `compute_75` writes PTX ISA 8.4, which the
//! driver JITs from CUDA 12.4 on, for Turing and every later GPU. `--check` compares with the
//! committed PTX instead of writing (CI runs it when libnvrtc can be loaded).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const TASKS: &[(&str, &str)] = &[(
    "build-kernels [--check]",
    "compile kernels/*.cu to the PTX lora-kernels embeds",
)];
const ARCH: &str = "compute_75";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn build_kernels(check: bool) -> Result<(), String> {
    // SAFETY-free: cudarc's loader returns an error rather than panicking only after this check.
    if !nvrtc_present() {
        return Err("libnvrtc not found: install a CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12==12.4.127` and set LD_LIBRARY_PATH to its nvidia/cuda_nvrtc/lib".into());
    }
    let kernels = root().join("kernels");
    let out_dir = root().join("crates/lora-kernels/ptx");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .map_err(|e| format!("{}: {e}", kernels.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let mut stale = Vec::new();
    for src in sources {
        let text = std::fs::read_to_string(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("kernel")
            .to_string();
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(ARCH),
            fmad: Some(false),
            name: Some(format!("{name}.cu")),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(&text, opts)
            .map_err(|e| format!("{}: {e:?}", src.display()))?;
        let ptx = ptx.to_src();
        let dest = out_dir.join(format!("{name}.ptx"));
        if check {
            let committed = std::fs::read_to_string(&dest).unwrap_or_default();
            if committed != ptx {
                stale.push(dest.display().to_string());
            }
        } else {
            std::fs::write(&dest, &ptx).map_err(|e| format!("{}: {e}", dest.display()))?;
            println!("wrote {} ({} bytes, {ARCH})", dest.display(), ptx.len());
        }
    }
    if !stale.is_empty() {
        return Err(format!("committed PTX differs from what kernels/ compiles to: {}; run `cargo xtask build-kernels`", stale.join(", ")));
    }
    Ok(())
}

fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help") | Some("--help") => {
            println!("usage: cargo xtask <task>\n\ntasks:");
            for (name, about) in TASKS {
                println!("  {name:<24} {about}");
            }
            ExitCode::SUCCESS
        }
        Some("build-kernels") => match build_kernels(args.iter().any(|a| a == "--check")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Some(other) => {
            eprintln!("error: unknown task \"{other}\"; run `cargo xtask help`");
            ExitCode::from(2)
        }
    }
}
