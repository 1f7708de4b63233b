//! The only module of the workspace with `unsafe` code: raw syscalls and process-level operations
//! (clone into new namespaces, mounts, idmapped mounts, seccomp, capabilities, pty and fd passing).
//! Each `unsafe` block carries a `// SAFETY:` comment.
//!
//! Code here runs either in the single-threaded monitor/helper processes (which may fork and
//! clone freely) or is a plain syscall wrapper safe to call from any thread.

pub mod btrfs;
pub mod caps;
pub mod container;
pub mod exec;
pub mod files;
pub mod mount;
pub mod netlink;
pub mod process;
pub mod seccomp;
