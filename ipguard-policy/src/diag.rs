//! Diagnostics: every error and warning names the file, the line and column
//! of the offending value, and the value itself, so an operator fixing a
//! policy on one of hundreds of servers never has to guess.

use std::fmt;

/// Where a value sits in the policy file (1-based, columns in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One error or warning. `pos` is None for a problem that belongs to no
/// line, such as a missing required key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    pub pos: Option<Pos>,
    pub message: String,
}

impl Diagnostic {
    pub fn line(&self) -> Option<u32> {
        self.pos.map(|p| p.line)
    }
    pub fn column(&self) -> Option<u32> {
        self.pos.map(|p| p.column)
    }
}

/// `FILE:LINE:COL: error: MESSAGE`, or `FILE: error: MESSAGE` without a line.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file,
                p.line,
                p.column,
                self.severity.as_str(),
                self.message
            ),
            None => write!(
                f,
                "{}: {}: {}",
                self.file,
                self.severity.as_str(),
                self.message
            ),
        }
    }
}

/// Why a policy was refused: every error found (not just the first), and the
/// warnings found alongside them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

/// The errors, one `FILE:LINE:COL: error: MSG` line each (warnings are not
/// part of the refusal; they are in `warnings`).
impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects diagnostics while a policy is checked.
#[derive(Debug)]
pub(crate) struct Sink {
    file: String,
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Sink {
    pub fn new(file: &str) -> Self {
        Self {
            file: file.to_string(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub fn error(&mut self, pos: Option<Pos>, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            severity: Severity::Error,
            file: self.file.clone(),
            pos,
            message: message.into(),
        });
    }

    /// An error in another file than the policy (a list file it names).
    pub fn error_in(&mut self, file: &str, pos: Option<Pos>, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            pos,
            message: message.into(),
        });
    }

    pub fn warning_in(&mut self, file: &str, pos: Option<Pos>, message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            severity: Severity::Warning,
            file: file.to_string(),
            pos,
            message: message.into(),
        });
    }

    pub fn warning(&mut self, pos: Option<Pos>, message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            severity: Severity::Warning,
            file: self.file.clone(),
            pos,
            message: message.into(),
        });
    }

    /// Sorted by position so that the output reads top to bottom; problems
    /// without a line come first. The policy's come before those of the
    /// list files it names, each file's together (stable: in the order the
    /// policy names them).
    pub fn into_parts(mut self) -> (Vec<Diagnostic>, Vec<Diagnostic>) {
        let file = std::mem::take(&mut self.file);
        let mut order: Vec<String> = vec![file];
        for d in self.errors.iter().chain(&self.warnings) {
            if !order.contains(&d.file) {
                order.push(d.file.clone());
            }
        }
        let rank = |d: &Diagnostic| (order.iter().position(|f| *f == d.file), d.pos);
        self.errors.sort_by_key(rank);
        self.warnings.sort_by_key(rank);
        (self.errors, self.warnings)
    }
}
