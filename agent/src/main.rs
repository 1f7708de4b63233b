//! berth-agent: parse flags, load config, start tracing, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Read when present and no --config is given.
const DEFAULT_CONFIG: &str = "/etc/berth/agent.toml";

/// Berth's node agent: runs machine containers on this host for the controllers.
#[derive(Parser, Debug)]
#[command(name = "berth-agent", version, about)]
struct Args {
    /// Config file (TOML); default: /etc/berth/agent.toml when it exists, else built-in defaults.
    #[arg(long, short, env = "BERTH_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// A file holding a join token, used when this agent has not joined a cluster yet.
    #[arg(long, global = true)]
    join_token_file: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "BERTH_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve (the default).
    Run,
    /// Join a cluster with --join-token-file, then exit.
    Join,
}

fn main() -> ExitCode {
    // --- hidden helper subcommands (task R): must run before any tokio runtime starts ---
    let args: Vec<String> = std::env::args().collect();
    if let Some(code) = berth_agent::runtime::dispatch_hidden(&args) {
        std::process::exit(code);
    }
    // --- end of hidden helper subcommands ---
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _telemetry = {
        let _in_runtime = rt.enter();
        berth_proto::telemetry::init("berth-agent", &args.log)
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = run(args, &rt);
    // The telemetry guard flushes traces when dropped: it goes first, while the runtime it
    // exports on still exists.
    drop(_telemetry);
    drop(rt);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    // Without --config, the conventional file is read when it exists.
    let default = std::path::Path::new(DEFAULT_CONFIG);
    let config = args
        .config
        .as_deref()
        .or_else(|| default.exists().then_some(default));
    let cfg = berth_agent::config::Config::load(config)?;
    let token = match &args.join_token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read join token file {}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    match args.command.unwrap_or(Cmd::Run) {
        Cmd::Run => rt.block_on(berth_agent::daemon::run(cfg, token))?,
        Cmd::Join => rt.block_on(async {
            let node =
                tokio::task::spawn_blocking(move || berth_agent::daemon::prepare(cfg)).await??;
            berth_agent::daemon::ensure_joined(&node, token.as_deref()).await?;
            anyhow::Ok(())
        })?,
    }
    Ok(())
}
