//! `ipguard unload`: the only way protection goes away.
use std::process::ExitCode;

use anyhow::Result;

use crate::{cli::UnloadArgs, datapath, error::CliError};

pub fn run(args: &UnloadArgs) -> Result<ExitCode> {
    // A running daemon would keep believing it protects the host.
    if std::os::unix::net::UnixStream::connect(&args.sock.socket).is_ok() {
        return Err(CliError::system(format!(
            "the ipguard daemon is running (it answers on {}): stop it first (systemctl stop ipguard), then unload",
            args.sock.socket.display()
        ))
        .into());
    }
    let detached = datapath::unload(&args.loc.pin_dir, &args.ifaces)
        .map_err(|e| CliError::system(e.to_string()))?;
    if detached.is_empty() {
        println!(
            "nothing was attached; pinned objects removed from {}",
            args.loc.pin_dir.display()
        );
    } else {
        println!("detached from {}", detached.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
