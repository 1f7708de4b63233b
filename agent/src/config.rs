//! `berth-agent` configuration: a TOML file read into [`RawConfig`] (unknown keys refused),
//! validated once into [`Config`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] berth_proto::config_file::ConfigFileError),
    #[error("config value {key} is not valid: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This node's name (default: the host name).
    pub name: Option<String>,
    /// Where instance state, TLS material and image metadata live (default /var/lib/berth/agent).
    pub state_dir: Option<PathBuf>,
    /// The gRPC listen address (default 127.0.0.1:8445).
    pub listen: Option<String>,
    /// The address controllers reach this agent at (default: `listen`).
    pub advertise: Option<String>,
    /// Host-wide runtime files of this agent, e.g. the pid file of the lxcfs it starts
    /// (default /run/berth).
    pub run_dir: Option<PathBuf>,
    /// Controllers' peer addresses (host:port) to send heartbeats to until the cluster has
    /// told the agent its controllers (at join, then in every heartbeat reply).
    #[serde(default)]
    pub controllers: Vec<String>,
    /// Labels the scheduler matches placement constraints against (e.g. rack = "r1").
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub network: RawNetwork,
    #[serde(default)]
    pub images: RawImages,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// Where the agent mounts lxcfs when none runs (default /var/lib/berth/lxcfs; a system
    /// lxcfs at /var/lib/lxcfs is always preferred).
    pub lxcfs_dir: Option<PathBuf>,
    /// First host uid/gid handed to unprivileged instances (default 1000000).
    pub idmap_start: Option<u32>,
    /// How many host ids from `idmap_start` this agent may hand out (default: up to the top
    /// of the id space). Agents sharing a host need ranges that do not overlap.
    pub idmap_size: Option<u32>,
    /// Tags this agent's cgroup names (`berth-<tag>.payload.<instance>`) so several agents on
    /// one host never share a cgroup; 1 to 32 of `a-z`, `0-9`, `-`. Default empty: the
    /// untagged `berth.payload.<instance>` of the one agent of a normal host.
    pub cgroup_tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// "btrfs" (default) or "dir".
    pub driver: Option<String>,
    /// btrfs: a block device or a directory on a mounted btrfs; empty means a loop file.
    /// dir: the directory to keep volumes in.
    pub source: Option<PathBuf>,
    /// btrfs without `source`: the sparse loop file (default /var/lib/berth/disks/default.img).
    pub loop_file: Option<PathBuf>,
    /// Size of a new loop file (default 30GiB).
    pub loop_size: Option<String>,
    /// Where the pool is mounted (default /var/lib/berth/storage/default).
    pub mount: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    /// The host bridge (default berthbr0).
    pub bridge: Option<String>,
    /// The bridge's address and prefix, e.g. "10.87.3.1/24"; default: a free /24 in 10.0.0.0/8.
    pub ipv4_cidr: Option<String>,
    /// Masquerade instance traffic leaving the host (default true).
    pub nat: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImages {
    /// Where built image tarballs are cached (default /var/cache/berth/images).
    pub cache_dir: Option<PathBuf>,
    /// Debian mirror for `debian/12` builds (default: the host's).
    pub debian_mirror: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageDriverKind {
    Btrfs,
    Dir,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub driver: StorageDriverKind,
    pub source: Option<PathBuf>,
    pub loop_file: PathBuf,
    pub loop_size: u64,
    pub mount: PathBuf,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    /// Peer addresses to heartbeat to before the cluster has named its controllers.
    pub controllers: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub lxcfs_dir: PathBuf,
    pub idmap_range: crate::runtime::IdRange,
    /// `[runtime] cgroup_tag`, validated ("" = no tag).
    pub cgroup_tag: String,
    pub storage: StorageConfig,
    pub bridge: String,
    pub bridge_ipv4_cidr: Option<String>,
    pub nat: bool,
    pub image_cache: PathBuf,
    pub debian_mirror: Option<String>,
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::validate(berth_proto::config_file::read_toml(path)?)
    }

    pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let name = raw
            .name
            .unwrap_or_else(|| berth_proto::api::names::node_name_from_host(&host_name()));
        berth_proto::api::names::validate_instance_name(&name).map_err(|e| {
            ConfigError::Invalid {
                key: "name",
                message: e.replace("instance name", "node name"),
            }
        })?;
        let addr = |key: &'static str, v: &str| {
            v.parse::<SocketAddr>().map_err(|_| ConfigError::Invalid {
                key,
                message: format!("\"{v}\" is not an address:port"),
            })
        };
        let listen = addr("listen", raw.listen.as_deref().unwrap_or("127.0.0.1:8445"))?;
        let advertise = match raw.advertise.as_deref() {
            Some(a) => addr("advertise", a)?,
            None => advertised(listen, host_address())?,
        };
        let driver = match raw.storage.driver.as_deref().unwrap_or("btrfs") {
            "btrfs" => StorageDriverKind::Btrfs,
            "dir" => StorageDriverKind::Dir,
            other => {
                return Err(ConfigError::Invalid {
                    key: "storage.driver",
                    message: format!("\"{other}\" is not btrfs or dir"),
                });
            }
        };
        let loop_size = match raw.storage.loop_size.as_deref() {
            None => 30 << 30,
            Some(s) => {
                berth_proto::api::config::parse_bytes(s).map_err(|e| ConfigError::Invalid {
                    key: "storage.loop_size",
                    message: e.0,
                })?
            }
        };
        if loop_size < (1 << 30) {
            return Err(ConfigError::Invalid {
                key: "storage.loop_size",
                message: "must be at least 1GiB".into(),
            });
        }
        let bridge = raw.network.bridge.unwrap_or_else(|| "berthbr0".into());
        if bridge.is_empty()
            || bridge.len() > 15
            || !bridge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::Invalid {
                key: "network.bridge",
                message: format!("\"{bridge}\" must be 1 to 15 letters, digits, - or _"),
            });
        }
        for c in &raw.controllers {
            check_host_port(c).map_err(|message| ConfigError::Invalid {
                key: "controllers",
                message,
            })?;
        }
        for (k, v) in &raw.labels {
            check_label(k, v).map_err(|message| ConfigError::Invalid {
                key: "labels",
                message,
            })?;
        }
        let idmap_range = idmap_range(raw.runtime.idmap_start, raw.runtime.idmap_size)?;
        let cgroup_tag = raw.runtime.cgroup_tag.unwrap_or_default();
        if !cgroup_tag.is_empty() {
            crate::cgroup::validate_tag(&cgroup_tag).map_err(|message| ConfigError::Invalid {
                key: "runtime.cgroup_tag",
                message,
            })?;
        }
        Ok(Config {
            name,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/berth/agent")),
            run_dir: raw.run_dir.unwrap_or_else(|| PathBuf::from("/run/berth")),
            listen,
            advertise,
            controllers: raw.controllers,
            labels: raw.labels,
            lxcfs_dir: raw
                .runtime
                .lxcfs_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/berth/lxcfs")),
            idmap_range,
            cgroup_tag,
            storage: StorageConfig {
                driver,
                source: raw.storage.source,
                loop_file: raw
                    .storage
                    .loop_file
                    .unwrap_or_else(|| PathBuf::from("/var/lib/berth/disks/default.img")),
                loop_size,
                mount: raw
                    .storage
                    .mount
                    .unwrap_or_else(|| PathBuf::from("/var/lib/berth/storage/default")),
            },
            bridge,
            bridge_ipv4_cidr: raw.network.ipv4_cidr.filter(|s| !s.is_empty()),
            nat: raw.network.nat.unwrap_or(true),
            image_cache: raw
                .images
                .cache_dir
                .unwrap_or_else(|| PathBuf::from("/var/cache/berth/images")),
            debian_mirror: raw.images.debian_mirror.filter(|s| !s.is_empty()),
        })
    }
}

/// Checks a `host:port` address (a name or an IP; IPv6 in brackets).
pub fn check_host_port(addr: &str) -> Result<(), String> {
    let bad = || format!("\"{addr}\" is not a host:port");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || host.contains(['/', ' '])
        || port.parse::<u16>().ok().filter(|p| *p != 0).is_none()
    {
        return Err(bad());
    }
    Ok(())
}

/// Checks a label: the key is 1 to 63 letters, digits, `.`, `_`, `-` or `/`; the value up to
/// 63 letters, digits, `.`, `_` or `-` (so `key=value,key!=value` constraints stay unambiguous).
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    let ok_key = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
    let ok_value = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if key.is_empty() || key.len() > 63 || !key.chars().all(ok_key) {
        return Err(format!(
            "label key \"{key}\" must be 1 to 63 letters, digits, '.', '_', '-' or '/'"
        ));
    }
    if value.len() > 63 || !value.chars().all(ok_value) {
        return Err(format!(
            "label {key} value \"{value}\" must be up to 63 letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

fn idmap_range(
    start: Option<u32>,
    size: Option<u32>,
) -> Result<crate::runtime::IdRange, ConfigError> {
    use crate::runtime::{IDMAP_SIZE, IdRange};
    let start = start.unwrap_or(IdRange::default().start);
    if start < IDMAP_SIZE {
        return Err(ConfigError::Invalid {
            key: "runtime.idmap_start",
            message: format!("must be at least {IDMAP_SIZE} (ids below are the host's own)"),
        });
    }
    let room = u32::MAX - start;
    let count = size.unwrap_or(room);
    if count < IDMAP_SIZE {
        return Err(ConfigError::Invalid {
            key: "runtime.idmap_size",
            message: format!("must be at least {IDMAP_SIZE} (one instance's range)"),
        });
    }
    if count > room {
        return Err(ConfigError::Invalid {
            key: "runtime.idmap_size",
            message: format!(
                "idmap_start + idmap_size passes the top of the id space ({})",
                u32::MAX
            ),
        });
    }
    Ok(IdRange { start, count })
}

/// The host's name, or "localhost" when it cannot be read.
pub fn host_name() -> String {
    berth_proto::host::host_name()
}

/// The address controllers dial when `advertise` is not set: `listen` itself, or, when it is
/// a wildcard (`0.0.0.0`, `[::]`), `host` (this host's main address) with its port; a
/// wildcard without a host address is refused (registering 127.0.0.1 would make controllers
/// on other hosts dial themselves).
pub fn advertised(listen: SocketAddr, host: Option<IpAddr>) -> Result<SocketAddr, ConfigError> {
    if !listen.ip().is_unspecified() {
        return Ok(listen);
    }
    match host {
        Some(ip) => Ok(SocketAddr::new(ip, listen.port())),
        None => Err(ConfigError::Invalid {
            key: "advertise",
            message: format!(
                "listen is {listen} and this host has no default route to take its address from: set advertise to the address controllers should dial"
            ),
        }),
    }
}

/// This host's main address: the source address of its default route (no packet is sent),
/// like berthd's; `None` when there is no default route.
pub fn host_address() -> Option<IpAddr> {
    berth_proto::host::default_route_address()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let raw: RawConfig = toml::from_str("name = \"node1\"").unwrap();
        let c = Config::validate(raw).unwrap();
        assert_eq!(c.bridge, "berthbr0");
        assert_eq!(c.storage.driver, StorageDriverKind::Btrfs);
        assert_eq!(c.storage.loop_size, 30 << 30);
        assert_eq!(c.advertise, c.listen);
        let any: SocketAddr = "0.0.0.0:8445".parse().unwrap();
        let host: IpAddr = "10.0.0.21".parse().unwrap();
        assert_eq!(
            advertised(any, Some(host)).unwrap(),
            "10.0.0.21:8445".parse::<SocketAddr>().unwrap()
        );
        let err = advertised(any, None).unwrap_err().to_string();
        assert!(err.contains("set advertise"), "{err}");
        let own: SocketAddr = "10.0.0.5:9000".parse().unwrap();
        assert_eq!(advertised(own, Some(host)).unwrap(), own);
        assert_eq!(c.run_dir, PathBuf::from("/run/berth"));
        assert_eq!(c.idmap_range, crate::runtime::IdRange::default());
        assert!(c.labels.is_empty() && c.controllers.is_empty());
        assert_eq!(c.cgroup_tag, "");
        let raw: RawConfig = toml::from_str(
            "name = \"n1\"\ncontrollers = [\"10.99.0.11:8444\", \"ctl.example:8444\"]\n\
             [labels]\nrack = \"r1\"\nssd = \"true\"\n\
             [runtime]\nidmap_start = 200000000\nidmap_size = 6553600\nlxcfs_dir = \"/x/lxcfs\"\n\
             cgroup_tag = \"dev-n1\"",
        )
        .unwrap();
        let c = Config::validate(raw).unwrap();
        assert_eq!(c.labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(c.controllers.len(), 2);
        assert_eq!(
            c.idmap_range,
            crate::runtime::IdRange {
                start: 200_000_000,
                count: 6_553_600
            }
        );
        assert_eq!(c.lxcfs_dir, PathBuf::from("/x/lxcfs"));
        assert_eq!(c.cgroup_tag, "dev-n1");
        for bad in [
            "name = \"node1\"\nbogus = 1",
            "name = \"node1\"\n[storage]\ndriver = \"zfs\"",
            "name = \"node1\"\n[storage]\nloop_size = \"10MiB\"",
            "name = \"node1\"\n[network]\nbridge = \"this-name-is-too-long\"",
            "name = \"1node\"",
            "name = \"node1\"\nlisten = \"nowhere\"",
            "name = \"node1\"\ncontrollers = [\"10.0.0.1\"]",
            "name = \"node1\"\ncontrollers = [\"10.0.0.1:0\"]",
            "name = \"node1\"\n[labels]\nrack = \"r1,ssd=true\"",
            "name = \"node1\"\n[labels]\n\"\" = \"x\"",
            "name = \"node1\"\n[runtime]\nidmap_start = 1000",
            "name = \"node1\"\n[runtime]\nidmap_size = 100",
            "name = \"node1\"\n[runtime]\nidmap_start = 4294960000\nidmap_size = 65536",
            "name = \"node1\"\n[runtime]\ncgroup_tag = \"Dev\"",
            "name = \"node1\"\n[runtime]\ncgroup_tag = \"a.b\"",
            "name = \"node1\"\n[runtime]\ncgroup_tag = \"a_b\"",
            "name = \"node1\"\n[runtime]\ncgroup_tag = \"123456789012345678901234567890123\"",
        ] {
            let parsed: Result<RawConfig, _> = toml::from_str(bad);
            assert!(
                parsed
                    .map(Config::validate)
                    .map(|r| r.is_err())
                    .unwrap_or(true),
                "{bad}"
            );
        }
    }
}
