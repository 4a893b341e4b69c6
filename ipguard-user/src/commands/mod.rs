//! One module per subcommand; each `run` returns the process exit code or
//! an error whose chain carries it (see `error`).
pub mod check;
pub mod client;
pub mod diff;
pub mod docs;
pub mod explain;
pub mod run;
pub mod status;
pub mod unload;

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

use crate::cli::LogFormat;

/// Logs go to stderr (stdout carries events and command output), human
/// readable on a terminal, JSON lines with `--log-format json`.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("IPGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
