//! Exit codes of docs/cli.md and the one-line error that goes with them.
use std::process::ExitCode;

/// 0 success, 1 input refused, 2 usage error, 3 daemon or kernel unreachable
/// or refusing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Refused = 1,
    Usage = 2,
    System = 3,
}

/// An error that carries its exit code. Anything else that reaches `main`
/// is treated as [`Exit::System`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

/// Diagnostics already formatted as `FILE:LINE:COL: error: MSG` lines:
/// printed as they are, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Diagnostics(pub String);

impl CliError {
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Refused,
            message: message.into(),
        }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Usage,
            message: message.into(),
        }
    }
    pub fn system(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::System,
            message: message.into(),
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// The exit code for an error chain: the first `CliError` in it decides;
/// diagnostics mean the input was refused.
pub fn exit_code_of(err: &anyhow::Error) -> Exit {
    err.chain()
        .find_map(|e| {
            e.downcast_ref::<CliError>()
                .map(|c| c.exit)
                .or_else(|| e.downcast_ref::<Diagnostics>().map(|_| Exit::Refused))
        })
        .unwrap_or(Exit::System)
}

/// Prints an error the way every subcommand does: diagnostics as they
/// are, anything else as one `ipguard: error: ...` line.
pub fn report(err: &anyhow::Error) {
    if let Some(d) = err.downcast_ref::<Diagnostics>() {
        eprintln!("{}", d.0.trim_end());
    } else {
        // The context chain on one line, outermost first, no backtrace.
        eprintln!("ipguard: error: {err:#}");
    }
}
