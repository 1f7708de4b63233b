//! The host side of instance networking: one bridge per host (default `berthbr0`), a veth pair
//! per instance, outbound NAT with nftables, and the configuration of `eth0` inside an
//! instance's network namespace.
//!
//! Addresses come from the controller's allocation; this module only configures what it is given.
