//! berthd: parse flags, load config, start tracing, run.

use std::path::PathBuf;

use clap::Parser;

/// Read when present and no --config is given.
const DEFAULT_CONFIG: &str = "/etc/berth/berthd.toml";

/// Berth's controller: keeps the cluster's state (Raft) and serves the REST API.
#[derive(Parser, Debug)]
#[command(name = "berthd", version, about)]
struct Args {
    /// Config file (TOML); default: /etc/berth/berthd.toml when it exists, else built-in defaults.
    #[arg(long, short, env = "BERTHD_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "berth_controller=debug".
    #[arg(long, env = "BERTH_LOG", default_value = "info")]
    log: String,
    /// Join an existing cluster through this controller's API address (host:port), on the
    /// first start only; needs --token.
    #[arg(long, value_name = "ADDRESS", requires = "token")]
    join: Option<String>,
    /// The controller join token (`berth cluster add-controller` prints it).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "BERTHD_JOIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let _telemetry = {
        let _in_runtime = rt.enter();
        berth_proto::telemetry::init("berthd", &args.log)
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Without --config, the conventional file is read when it exists.
    let default = std::path::Path::new(DEFAULT_CONFIG);
    let config = args
        .config
        .as_deref()
        .or_else(|| default.exists().then_some(default));
    let mut raw = berth_controller::config::Config::read_raw(config)?;
    if args.join.is_some() {
        raw.join = args.join;
    }
    // An empty token (`BERTHD_JOIN_TOKEN=` in an env file) is no token.
    if let Some(token) = args.token.filter(|t| !t.trim().is_empty()) {
        raw.join_token = Some(token);
    }
    let cfg = berth_controller::config::Config::validate(raw)?;
    rt.block_on(berth_controller::daemon::run(cfg))?;
    Ok(())
}
