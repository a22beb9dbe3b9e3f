//! Entry point: parse the command line, run one command, report its error chain once.

fn main() -> std::process::ExitCode {
    vmkeeper::cli::main()
}
