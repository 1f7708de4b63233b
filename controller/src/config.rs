//! `berthd` configuration: a TOML file read into [`RawConfig`] (unknown keys refused), validated
//! once into [`Config`], which everything else uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
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
    /// The Raft peer listen address (default 127.0.0.1:8444).
    pub peer_listen: Option<String>,
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
    pub api_names: Vec<String>,
    pub cluster_name: String,
}

impl Config {
    /// Reads and validates a config file; `None` means built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let raw = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                toml::from_str::<RawConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: p.to_path_buf(),
                    message: e.message().to_string(),
                })?
            }
            None => RawConfig::default(),
        };
        Config::validate(raw)
    }

    pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let name = raw.name.unwrap_or_else(host_name);
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
        Ok(Config {
            name,
            node_id,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/berth/controller")),
            api_listen: addr("api_listen", raw.api_listen, "0.0.0.0:8443")?,
            peer_listen: addr("peer_listen", raw.peer_listen, "127.0.0.1:8444")?,
            api_names: raw.api_names,
            cluster_name: raw.cluster_name.unwrap_or_else(|| "berth".into()),
        })
    }
}

/// The host's name, or "localhost" when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = Config::validate(RawConfig::default()).unwrap();
        assert_eq!(c.api_listen.port(), 8443);
        assert_eq!(c.node_id, 1);
        let bad: Result<RawConfig, _> = toml::from_str("bogus = 1");
        assert!(bad.is_err());
        let raw: RawConfig = toml::from_str("api_listen = \"nope\"").unwrap();
        assert!(Config::validate(raw).is_err());
        let raw: RawConfig = toml::from_str("name = \"a b\"").unwrap();
        assert!(Config::validate(raw).is_err());
    }
}
