//! `cargo xtask <task>`: developer chores of the weightsmith workspace, in plain Rust.
//!
//! Tasks land with the issues that need them (`build-kernels` comes with the merge issue).

use std::process::ExitCode;

const TASKS: &[(&str, &str)] = &[];

fn main() -> ExitCode {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        None | Some("help") | Some("--help") => {
            println!("usage: cargo xtask <task>\n\ntasks:");
            if TASKS.is_empty() {
                println!("  (none yet)");
            }
            for (name, about) in TASKS {
                println!("  {name:<16} {about}");
            }
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("error: unknown task \"{other}\"; run `cargo xtask help`");
            ExitCode::from(2)
        }
    }
}
