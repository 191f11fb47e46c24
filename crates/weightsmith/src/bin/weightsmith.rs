//! The `weightsmith` command line: see [`weightsmith::cli`].

fn main() -> std::process::ExitCode {
    weightsmith::cli::main_with_args(std::env::args_os())
}
