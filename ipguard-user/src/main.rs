use std::process::ExitCode;

use clap::Parser;
use ipguard::{
    cli::{Cli, Command},
    commands,
    error::{exit_code_of, report},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    commands::init_logging(cli.log_format);
    let result = match &cli.command {
        Command::Check(a) => commands::check::run(a),
        Command::Explain(a) => commands::explain::run(a),
        Command::Diff(a) => commands::diff::run(a),
        Command::Run(a) => commands::run::run(a),
        Command::Apply(a) => commands::client::apply(a),
        Command::Confirm(a) => commands::client::confirm(a),
        Command::Events(a) => commands::client::events(a),
        Command::Allow(a) => commands::client::allow(a),
        Command::Revoke(a) => commands::client::revoke(a),
        Command::Deny(a) => commands::client::deny(a),
        Command::Undeny(a) => commands::client::undeny(a),
        Command::Reject(a) => commands::client::reject(a),
        Command::Blocked(a) => commands::client::blocked(a),
        Command::History(a) => commands::client::history(a),
        Command::Rollback(a) => commands::client::rollback(a),
        Command::Status(a) => commands::status::run(a),
        Command::Unload(a) => commands::unload::run(a),
        Command::Completions(a) => commands::docs::completions(a),
        Command::Manpage(a) => commands::docs::manpage(a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            report(&err);
            exit_code_of(&err).into()
        }
    }
}
