//! Berth's wire contracts, shared by `berthd`, `berth-agent` and `berth`:
//! the gRPC services between controllers and agents ([`v1`]) and the REST API's JSON types ([`api`]).

pub mod api;
#[cfg(feature = "config-file")]
pub mod config_file;
pub mod host;
#[cfg(feature = "https")]
pub mod https;
#[cfg(feature = "telemetry")]
pub mod telemetry;
#[cfg(feature = "tls")]
pub mod tls;

/// Generated gRPC types and services (`proto/berth/v1/*.proto`).
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("berth.v1");
}

/// The DNS name every controller certificate carries and only controller certificates carry.
/// Clients (the CLI, joining agents) verify the API's certificate against this name, and agents
/// accept gRPC calls only from certificates with it: a certificate the cluster CA gave an agent
/// can never pass for a controller.
pub const CONTROLLER_TLS_NAME: &str = "controller.berth";

/// The version every Berth binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
