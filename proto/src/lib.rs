//! Berth's wire contracts, shared by `berthd`, `berth-agent` and `berth`:
//! the gRPC services between controllers and agents ([`v1`]) and the REST API's JSON types ([`api`]).

pub mod api;
#[cfg(feature = "telemetry")]
pub mod telemetry;

/// Generated gRPC types and services (`proto/berth/v1/*.proto`).
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("berth.v1");
}

/// The version every Berth binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
