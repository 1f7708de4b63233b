//! berth-agent: the node agent. It runs Berth's container engine on one host and serves the
//! `Agent` gRPC service to the controllers.
//!
//! Layout:
//! - [`engine`]: the instance lifecycle on this node (create, start, stop, exec, files), built on
//! - [`runtime`]: the container runtime (per-instance monitor process, namespaces, mounts, console),
//! - [`cgroup`]: cgroup v1 (hybrid) and v2 handling, limits,
//! - [`storage`]: storage drivers (btrfs, dir) behind one trait,
//! - [`image`]: image builds and imports,
//! - [`network`]: the host bridge, veth pairs and NAT,
//! - [`sys`]: the only module with `unsafe`: raw syscalls, each with a `// SAFETY:` comment.
//! - [`service`]: the gRPC service that maps requests onto the engine,
//! - [`heartbeat`]: capacity and instance reports to the leading controller,
//! - [`agent_lock`]: one running agent per cgroup tag on a host.

pub mod agent_lock;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod heartbeat;
pub mod image;
pub mod network;
pub mod runtime;
pub mod service;
pub mod storage;
#[allow(unsafe_code)]
pub mod sys;
pub mod tls;
pub mod transfer;
pub mod volumes;
