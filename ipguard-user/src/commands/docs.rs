//! `ipguard completions SHELL` and `ipguard manpage`: generated from the
//! clap definitions (clap_complete, clap_mangen), so they never lag behind
//! the options; `cargo xtask dist` writes them into the package.
use std::{io::Write, process::ExitCode};

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs, ManpageArgs};

pub fn completions(args: &CompletionsArgs) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cmd, "ipguard", &mut out);
    out.flush().context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

pub fn manpage(args: &ManpageArgs) -> Result<ExitCode> {
    let cmd = Cli::command().name("ipguard");
    match &args.dir {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("cannot write to stdout")?;
            out.flush().context("cannot write to stdout")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            // ipguard.1 and ipguard-SUBCOMMAND.1 for each subcommand.
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the pages into {}", dir.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
