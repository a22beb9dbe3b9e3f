//! Command-line interface: parse arguments, call the core or the daemon, print results; never decides.

use std::process::ExitCode;

/// Runs the command named on the command line.
pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
