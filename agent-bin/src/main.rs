//! `defenra-agent`: the edge node binary. Reads flags and env vars, sets up logging, binds
//! every listener, wires the config pipeline to the services, and handles signals.
//!
//! This is the only place that reads the environment, handles signals, picks the runtime
//! and prints to stdout. The services themselves live in the `defenra-*` library crates.
//! Start reading at [`run::run`].

mod alloc;
mod check;
mod cli;
#[cfg(test)]
mod docsync;
mod health;
mod l4_workers;
mod notify;
mod run;
mod waf_geo;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Version) => {
            println!("defenra-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(Command::CheckConfig { file }) => check::check_config(&file),
        None => {
            let source = match cli.run.source() {
                Ok(source) => source,
                Err(message) => {
                    use clap::CommandFactory;
                    Cli::command()
                        .error(clap::error::ErrorKind::MissingRequiredArgument, message)
                        .exit();
                }
            };
            if let Err(error) = run::init_logging(&cli.run) {
                eprintln!("defenra-agent: {error:#}");
                return ExitCode::from(2);
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("defenra-agent: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run::run(cli.run, source)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("defenra-agent: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
