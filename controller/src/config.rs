//! `berthd` configuration: a TOML file read into [`RawConfig`] (unknown keys refused), validated
//! once into [`Config`], which everything else uses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] berth_proto::config_file::ConfigFileError),
    #[error("config value {key} is not valid: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The file as written by the operator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This controller's name (default: the host name).
    pub name: Option<String>,
    /// Raft node id of this controller (default 1).
    pub node_id: Option<u64>,
    /// Where the Raft log, state and TLS material live (default /var/lib/berth/controller).
    pub state_dir: Option<PathBuf>,
    /// The REST API's listen address (default 0.0.0.0:8443).
    pub api_listen: Option<String>,
    /// The peer listen address: Raft between controllers, agent heartbeats (default
    /// 0.0.0.0:8444). Always mutual TLS.
    pub peer_listen: Option<String>,
    /// host:port other controllers and agents use to reach the peer listener (default: the
    /// listen address, or this host's address when listening on 0.0.0.0).
    pub peer_advertise: Option<String>,
    /// host:port clients and join tokens use to reach the REST API (default as above).
    pub api_advertise: Option<String>,
    /// A running controller's API address to join through (first start only).
    pub join: Option<String>,
    /// The controller join token (first start only).
    pub join_token: Option<String>,
    /// Seconds without a heartbeat after which a node is offline (default 10).
    pub offline_threshold: Option<u64>,
    /// Extra names and addresses for the API certificate.
    #[serde(default)]
    pub api_names: Vec<String>,
    /// Name of the cluster, shown in the CA (default "berth").
    pub cluster_name: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub node_id: u64,
    pub state_dir: PathBuf,
    pub api_listen: SocketAddr,
    pub peer_listen: SocketAddr,
    /// host:port of the peer listener as others reach it.
    pub peer_advertise: String,
    /// host:port of the REST API as others reach it.
    pub api_advertise: String,
    /// Join through this controller API address on first start.
    pub join: Option<String>,
    /// The controller join token for `join`.
    pub join_token: Option<String>,
    /// Time without a heartbeat after which a node is offline.
    pub offline_threshold: Duration,
    pub api_names: Vec<String>,
    pub cluster_name: String,
}

/// The shortest `offline_threshold` accepted, in seconds: a few heartbeat intervals
/// ([`crate::liveness::HEARTBEAT_INTERVAL`]), so that one late heartbeat does not take a node
/// for offline.
pub const MIN_OFFLINE_THRESHOLD: u64 = 5;

impl Config {
    /// Reads and validates a config file; `None` means built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::validate(Config::read_raw(path)?)
    }

    /// Reads a config file without validating it (flags may still override keys); `None`
    /// means built-in defaults.
    pub fn read_raw(path: Option<&Path>) -> Result<RawConfig, ConfigError> {
        Ok(berth_proto::config_file::read_toml(path)?)
    }

    /// Checks `raw` and fills in the defaults.
    pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let name = raw.name.unwrap_or_else(default_name);
        if name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(ConfigError::Invalid {
                key: "name",
                message: format!("\"{name}\" must be 1 to 63 letters, digits, dots or hyphens"),
            });
        }
        let addr = |key: &'static str, v: Option<String>, default: &str| {
            let v = v.unwrap_or_else(|| default.to_string());
            v.parse::<SocketAddr>().map_err(|_| ConfigError::Invalid {
                key,
                message: format!("\"{v}\" is not an address:port"),
            })
        };
        let node_id = raw.node_id.unwrap_or(1);
        if node_id == 0 {
            return Err(ConfigError::Invalid {
                key: "node_id",
                message: "must be 1 or more".into(),
            });
        }
        let api_listen = addr("api_listen", raw.api_listen, "0.0.0.0:8443")?;
        let peer_listen = addr("peer_listen", raw.peer_listen, "0.0.0.0:8444")?;
        let advertise = |key: &'static str, v: Option<String>, listen: SocketAddr| match v {
            Some(v) => validate_host_port(key, &v).map(|()| v),
            None => Ok(advertised(listen)),
        };
        // Agents beat every `liveness::HEARTBEAT_INTERVAL` (2 s): a threshold under
        // MIN_OFFLINE_THRESHOLD would take a node for offline after one late heartbeat.
        let offline_threshold = match raw.offline_threshold {
            None => 10,
            Some(s) if (MIN_OFFLINE_THRESHOLD..=3600).contains(&s) => s,
            Some(s) => {
                return Err(ConfigError::Invalid {
                    key: "offline_threshold",
                    message: format!(
                        "{s} must be from {MIN_OFFLINE_THRESHOLD} to 3600 seconds (agents send a heartbeat every {} s; the threshold must allow a few to be late)",
                        crate::liveness::HEARTBEAT_INTERVAL.as_secs()
                    ),
                });
            }
        };
        let join = match raw.join {
            Some(j) => {
                validate_host_port("join", &j)?;
                Some(j)
            }
            None => None,
        };
        if raw
            .join_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(ConfigError::Invalid {
                key: "join_token",
                message: "is empty".into(),
            });
        }
        Ok(Config {
            name,
            node_id,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/berth/controller")),
            peer_advertise: advertise("peer_advertise", raw.peer_advertise, peer_listen)?,
            api_advertise: advertise("api_advertise", raw.api_advertise, api_listen)?,
            api_listen,
            peer_listen,
            join,
            join_token: raw.join_token.map(|t| t.trim().to_string()),
            offline_threshold: Duration::from_secs(offline_threshold),
            api_names: raw.api_names,
            cluster_name: raw.cluster_name.unwrap_or_else(|| "berth".into()),
        })
    }
}

/// Checks a `host:port` (host a DNS name or an IP address, IPv6 in brackets).
fn validate_host_port(key: &'static str, v: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::Invalid {
        key,
        message: format!("\"{v}\" is not host:port"),
    };
    if v.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = v.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let ok_host = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok_host { Ok(()) } else { Err(bad()) }
}

/// What others use to reach a listener: the listen address, or this host's address with the
/// same port when it listens on every address.
pub fn advertised(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        SocketAddr::new(host_address(), listen.port()).to_string()
    } else {
        listen.to_string()
    }
}

/// This host's main address: the source address of its default route (no packet is sent),
/// or 127.0.0.1 when it has none.
pub fn host_address() -> IpAddr {
    berth_proto::host::default_route_address().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// The host's name, or "localhost" when it cannot be read.
pub fn host_name() -> String {
    berth_proto::host::host_name()
}

/// A controller's name when the config gives none: the node name the host would get, with
/// `-ctl` (`vm` gives `vm-ctl`). Controllers and nodes share one namespace of member names,
/// and the host's agent is called after the host, so the controller on the same host must be
/// called something else.
pub fn default_name() -> String {
    let mut label = berth_proto::api::names::node_name_from_host(&host_name());
    label.truncate(59);
    format!("{}-ctl", label.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = Config::validate(RawConfig::default()).unwrap();
        assert!(c.name.ends_with("-ctl"), "{}", c.name);
        assert_ne!(
            c.name,
            berth_proto::api::names::node_name_from_host(&host_name()),
            "the controller and the host's node must not share a name"
        );
        assert_eq!(c.api_listen.port(), 8443);
        assert_eq!(c.node_id, 1);
        let bad: Result<RawConfig, _> = toml::from_str("bogus = 1");
        assert!(bad.is_err());
        let raw: RawConfig = toml::from_str("api_listen = \"nope\"").unwrap();
        assert!(Config::validate(raw).is_err());
        let raw: RawConfig = toml::from_str("name = \"a b\"").unwrap();
        assert!(Config::validate(raw).is_err());
    }

    #[test]
    fn peer_plane_keys() {
        let c = Config::validate(RawConfig::default()).unwrap();
        assert_eq!(c.peer_listen.to_string(), "0.0.0.0:8444");
        assert!(c.peer_advertise.ends_with(":8444"), "{}", c.peer_advertise);
        assert!(!c.peer_advertise.starts_with("0.0.0.0"));
        assert_eq!(c.offline_threshold, Duration::from_secs(10));
        assert!(c.join.is_none());
        let raw: RawConfig = toml::from_str(
            "peer_listen = \"10.1.0.2:9444\"\napi_advertise = \"ctl1.example:8443\"\noffline_threshold = 30\njoin = \"10.1.0.1:8443\"\njoin_token = \"abc\"",
        )
        .unwrap();
        let c = Config::validate(raw).unwrap();
        assert_eq!(c.peer_advertise, "10.1.0.2:9444");
        assert_eq!(c.api_advertise, "ctl1.example:8443");
        assert_eq!(c.offline_threshold, Duration::from_secs(30));
        assert_eq!(c.join.as_deref(), Some("10.1.0.1:8443"));
        assert_eq!(c.join_token.as_deref(), Some("abc"));
        let raw: RawConfig = toml::from_str("offline_threshold = 5").unwrap();
        assert_eq!(
            Config::validate(raw).unwrap().offline_threshold,
            Duration::from_secs(5)
        );
        for short in ["offline_threshold = 1", "offline_threshold = 4"] {
            let raw: RawConfig = toml::from_str(short).unwrap();
            let e = Config::validate(raw).unwrap_err().to_string();
            assert!(e.contains("from 5 to 3600 seconds"), "{e}");
            assert!(e.contains("every 2 s"), "{e}");
        }
        for bad in [
            "offline_threshold = 0",
            "offline_threshold = 3601",
            "peer_advertise = \"nohost\"",
            "api_advertise = \"a b:1\"",
            "join = \"x:99999\"",
            "join_token = \" \"",
        ] {
            let raw: RawConfig = toml::from_str(bad).unwrap();
            assert!(Config::validate(raw).is_err(), "{bad} accepted");
        }
    }
}
