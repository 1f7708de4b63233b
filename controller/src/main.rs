//! berthd: parse flags, load config, start tracing, run.

use std::path::PathBuf;

use clap::Parser;

/// Berth's controller: keeps the cluster's state (Raft) and serves the REST API.
#[derive(Parser, Debug)]
#[command(name = "berthd", version, about)]
struct Args {
    /// Config file (TOML); without it, built-in defaults.
    #[arg(long, short, env = "BERTHD_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "berth_controller=debug".
    #[arg(long, env = "BERTH_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let _telemetry = {
        let _in_runtime = rt.enter();
        berth_proto::telemetry::init("berthd", &args.log)
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = berth_controller::config::Config::load(args.config.as_deref())?;
    rt.block_on(berth_controller::daemon::run(cfg))?;
    Ok(())
}
