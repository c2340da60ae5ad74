//! `defenra-agent`: the edge node binary. Reads flags and env vars, sets up logging, binds
//! every listener, wires the config pipeline to the services, and handles signals.
//!
//! This is the only place that reads the environment, handles signals, picks the runtime
//! and prints to stdout. The services themselves live in the `defenra-*` library crates.
//! Start reading at [`run::run`].

mod alloc;
mod check;
mod cli;
mod connect;
mod control;
#[cfg(test)]
mod docsync;
mod fleet;
mod geoip;
mod health;
mod l4_workers;
mod notify;
mod report;
mod run;
mod shield_key;
mod waf_geo;
mod watchdog;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, SourceChoice};

/// After `--shutdown-grace`, how long the runtime may take to stop its tasks and blocking
/// threads before the process exits anyway.
const SHUTDOWN_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Version) => {
            println!("defenra-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(Command::CheckConfig { file }) => check::check_config(&file),
        Some(Command::Ban {
            address,
            duration,
            reason,
            control,
        }) => control_command(
            &control.state_dir,
            &control::Request::Ban {
                address,
                seconds: duration.map(|duration| duration.as_secs().max(1)),
                reason,
            },
            false,
        ),
        Some(Command::Unban { address, control }) => control_command(
            &control.state_dir,
            &control::Request::Unban { address },
            false,
        ),
        Some(Command::Bans { json, control }) => {
            control_command(&control.state_dir, &control::Request::Bans, json)
        }
        Some(Command::Connect { url, env_file }) => connect::connect_command(&url, &env_file),
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
            // Before the runtime: one blocking request, and nothing runs without credentials.
            let source = match source {
                SourceChoice::Enrol { connect_url } => {
                    match connect::enrol_at_start(&connect_url, cli.run.state_dir.as_deref()) {
                        Ok(credentials) => SourceChoice::Core {
                            url: credentials.core_url,
                            agent_id: credentials.agent_id,
                            agent_key: credentials.agent_key,
                        },
                        Err(error) => {
                            tracing::error!("{error:#}");
                            eprintln!("defenra-agent: {error:#}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                other => other,
            };
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
            let result = runtime.block_on(run::run(cli.run, source));
            // `run` returns once the grace period is over; what still runs then (a config
            // reload on the blocking pool, a connection that did not drain) gets a moment
            // and is abandoned, so SIGTERM always ends the process in time.
            runtime.shutdown_timeout(SHUTDOWN_MARGIN);
            match result {
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

/// Runs one control-socket command and prints its outcome: a line for `ban` and `unban`,
/// a table (or the JSON with `json`) for `bans`. Exit 1 when the agent refused or could not
/// be reached.
fn control_command(
    state_dir: &std::path::Path,
    request: &control::Request,
    json: bool,
) -> ExitCode {
    let answer = match control::call(state_dir, request) {
        Ok(answer) => answer,
        Err(error) => {
            eprintln!("defenra-agent: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    if answer["ok"] != serde_json::Value::Bool(true) {
        let error = answer["error"].as_str().unwrap_or("the agent refused");
        eprintln!("defenra-agent: {error}");
        return ExitCode::FAILURE;
    }
    if let Some(message) = answer["message"].as_str() {
        println!("{message}");
        return ExitCode::SUCCESS;
    }
    if json {
        println!("{}", serde_json::json!({ "bans": answer["bans"] }));
        return ExitCode::SUCCESS;
    }
    let bans = answer["bans"].as_array().cloned().unwrap_or_default();
    if bans.is_empty() {
        println!("no bans in force");
        return ExitCode::SUCCESS;
    }
    println!("{:<43} {:<10} {:>10}  REASON", "ADDRESS", "SOURCE", "LEFT");
    for ban in bans {
        let address = format!(
            "{}/{}",
            ban["address"].as_str().unwrap_or("?"),
            ban["prefix"].as_u64().unwrap_or(0)
        );
        let left = ban["remainingSeconds"]
            .as_u64()
            .map_or_else(|| "forever".to_owned(), |seconds| format!("{seconds}s"));
        println!(
            "{address:<43} {:<10} {left:>10}  {}",
            ban["source"].as_str().unwrap_or("?"),
            ban["reason"].as_str().unwrap_or("")
        );
    }
    ExitCode::SUCCESS
}
