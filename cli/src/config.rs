//! The client configuration: remotes (`~/.config/berth/config.toml`) and how a command's
//! `remote:name` argument picks one.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading, writing or resolving the client configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the configuration: {0}")]
    Encode(String),
    #[error("remote \"{0}\" does not exist")]
    NoSuchRemote(String),
    #[error("remote \"{0}\" already exists")]
    RemoteExists(String),
    #[error("remote name \"{0}\" is not valid: use letters, digits, '-', '_' and '.'")]
    BadRemoteName(String),
    #[error("remote \"{0}\" is the default remote; switch to another one first")]
    RemoveDefault(String),
    #[error("remote \"{0}\" has neither key nor key-file")]
    NoKey(String),
    #[error("cannot read the key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key file {0} is empty")]
    EmptyKey(PathBuf),
    #[error("neither $HOME nor $BERTH_CONF is set; cannot find the configuration directory")]
    NoHome,
}

/// The configuration file as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The remote used when a name has no `remote:` prefix.
    #[serde(default = "default_remote_name")]
    pub default_remote: String,
    /// Known remotes by name.
    #[serde(default)]
    pub remotes: BTreeMap<String, Remote>,
}

fn default_remote_name() -> String {
    "local".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_remote: default_remote_name(),
            remotes: BTreeMap::new(),
        }
    }
}

/// One remote: a Berth API endpoint and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Remote {
    /// `https://host:port`: the first address tried.
    pub url: String,
    /// More addresses of the same cluster (its other controllers), tried in order when the
    /// ones before cannot be reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// A file holding the API key (preferred over `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The API key itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The cluster CA (PEM) the server certificate is verified against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// sha256 (hex) of the server certificate, pinned when no CA is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The current project on this remote (`berth project switch`); none: the key's own
    /// project, or `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

impl Remote {
    /// Every address of the remote: `url` first, then `addresses`, without repeats.
    pub fn urls(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for u in std::iter::once(&self.url).chain(&self.addresses) {
            let u = u.trim_end_matches('/').to_string();
            if !u.is_empty() && !out.contains(&u) {
                out.push(u);
            }
        }
        out
    }

    /// Sets the addresses from a list (the first becomes `url`).
    pub fn set_urls(&mut self, urls: &[String]) {
        let mut urls = urls.iter();
        self.url = urls.next().cloned().unwrap_or_default();
        self.addresses = urls.cloned().collect();
        let all = self.urls();
        self.addresses = all.into_iter().skip(1).collect();
    }

    /// Reads the API key (from `key-file` or `key`), trimmed.
    pub fn api_key(&self, name: &str) -> Result<String, ConfigError> {
        if let Some(path) = &self.key_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::KeyFile {
                path: path.clone(),
                source,
            })?;
            let key = text.trim();
            if key.is_empty() {
                return Err(ConfigError::EmptyKey(path.clone()));
            }
            return Ok(key.to_string());
        }
        match &self.key {
            Some(k) if !k.trim().is_empty() => Ok(k.trim().to_string()),
            _ => Err(ConfigError::NoKey(name.to_string())),
        }
    }
}

/// The configuration directory: `$BERTH_CONF` or `~/.config/berth`.
pub fn config_dir() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = std::env::var_os("BERTH_CONF").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".config").join("berth")),
        None => Err(ConfigError::NoHome),
    }
}

/// The configuration file's path.
pub fn config_path() -> Result<PathBuf, ConfigError> {
    Ok(config_dir()?.join("config.toml"))
}

impl Config {
    /// Reads the file at `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses the TOML text of a configuration.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }

    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(|e| ConfigError::Encode(e.to_string()))
    }

    /// Writes the configuration atomically (temporary file, fsync, rename) with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = self.to_toml()?;
        let werr = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(werr)?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let tmp = dir.join(format!(".config.toml.{}.tmp", std::process::id()));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(werr)
    }

    /// Adds a remote; refuses a name that exists or is not valid.
    pub fn add_remote(&mut self, name: &str, remote: Remote) -> Result<(), ConfigError> {
        validate_remote_name(name)?;
        if self.remotes.contains_key(name) {
            return Err(ConfigError::RemoteExists(name.into()));
        }
        self.remotes.insert(name.into(), remote);
        Ok(())
    }

    /// Removes a remote; the default one cannot be removed.
    pub fn remove_remote(&mut self, name: &str) -> Result<Remote, ConfigError> {
        if !self.remotes.contains_key(name) {
            return Err(ConfigError::NoSuchRemote(name.into()));
        }
        if self.default_remote == name {
            return Err(ConfigError::RemoveDefault(name.into()));
        }
        self.remotes
            .remove(name)
            .ok_or_else(|| ConfigError::NoSuchRemote(name.into()))
    }

    /// Renames a remote (and the default remote's name with it).
    pub fn rename_remote(&mut self, old: &str, new: &str) -> Result<(), ConfigError> {
        validate_remote_name(new)?;
        if !self.remotes.contains_key(old) {
            return Err(ConfigError::NoSuchRemote(old.into()));
        }
        if self.remotes.contains_key(new) {
            return Err(ConfigError::RemoteExists(new.into()));
        }
        if let Some(r) = self.remotes.remove(old) {
            self.remotes.insert(new.into(), r);
        }
        if self.default_remote == old {
            self.default_remote = new.into();
        }
        Ok(())
    }

    /// Makes `name` the default remote.
    pub fn switch_remote(&mut self, name: &str) -> Result<(), ConfigError> {
        if !self.remotes.contains_key(name) {
            return Err(ConfigError::NoSuchRemote(name.into()));
        }
        self.default_remote = name.into();
        Ok(())
    }
}

/// Writes an API key to `dir/NAME.key` with mode 0600 (the directory 0700), replacing any
/// earlier one atomically; returns the file's path.
pub fn store_key(dir: &Path, name: &str, key: &str) -> Result<PathBuf, ConfigError> {
    validate_remote_name(name)?;
    let path = dir.join(format!("{name}.key"));
    let werr = |source| ConfigError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(werr)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(werr)?;
    let tmp = dir.join(format!(".{name}.key.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(key.trim().as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(werr)?;
    Ok(path)
}

/// Remote names: letters, digits, `-`, `_`, `.`; 1 to 64 characters.
pub fn validate_remote_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadRemoteName(name.into()))
    }
}

/// Splits `remote:name` into its remote (if any) and the rest, like lxc.
/// `name` alone has no remote; `remote:` gives an empty rest.
pub fn split_remote(arg: &str) -> (Option<&str>, &str) {
    match arg.split_once(':') {
        Some((remote, rest)) if !remote.is_empty() && !remote.contains('/') => (Some(remote), rest),
        _ => (None, arg),
    }
}

/// Splits a comma-separated list of URLs (`https://a:8443,https://b:8443`), dropping empty
/// items and trailing slashes.
pub fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Where requests go: URLs (tried in order), a key, and how the server certificate is trusted.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The remote's name (for messages), or "env" when it comes from `BERTH_URL`.
    pub name: String,
    /// The first address.
    pub url: String,
    /// Further addresses of the same cluster, tried when the ones before cannot be reached.
    pub more_urls: Vec<String>,
    pub key: String,
    pub ca_file: Option<PathBuf>,
    pub fingerprint: Option<String>,
    /// The remote's current project (none for `BERTH_URL`).
    pub project: Option<String>,
}

/// The environment overrides that matter for resolving a remote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvOverrides {
    /// `BERTH_REMOTE`: the default remote for this run.
    pub remote: Option<String>,
    /// `BERTH_URL`: talk to this URL (or comma-separated URLs) instead of a configured remote.
    pub url: Option<String>,
    /// `BERTH_KEY_FILE` (or `BERTH_KEY`): path of the key file for `BERTH_URL`.
    pub key_file: Option<PathBuf>,
    /// `BERTH_CA`: path of the CA file for `BERTH_URL`.
    pub ca_file: Option<PathBuf>,
}

impl EnvOverrides {
    /// Reads the overrides from the process environment (empty values are ignored).
    pub fn from_env() -> EnvOverrides {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        EnvOverrides {
            remote: get("BERTH_REMOTE"),
            url: get("BERTH_URL"),
            key_file: get("BERTH_KEY_FILE")
                .or_else(|| get("BERTH_KEY"))
                .map(PathBuf::from),
            ca_file: get("BERTH_CA").map(PathBuf::from),
        }
    }
}

impl Config {
    /// Resolves which endpoint a command talks to. An explicit `remote:` prefix wins; then
    /// `BERTH_URL` (with `BERTH_KEY_FILE`/`BERTH_CA`); then `BERTH_REMOTE`; then the default.
    pub fn target(
        &self,
        explicit: Option<&str>,
        env: &EnvOverrides,
    ) -> Result<Target, ConfigError> {
        if explicit.is_none()
            && let Some(url) = &env.url
        {
            let mut remote = Remote {
                key_file: env.key_file.clone(),
                ..Remote::default()
            };
            remote.set_urls(&split_urls(url));
            return Ok(Target {
                name: "env".into(),
                url: remote.url.clone(),
                more_urls: remote.addresses.clone(),
                key: remote.api_key("BERTH_URL")?,
                ca_file: env.ca_file.clone(),
                fingerprint: None,
                project: None,
            });
        }
        let name = explicit
            .map(str::to_string)
            .or_else(|| env.remote.clone())
            .unwrap_or_else(|| self.default_remote.clone());
        let remote = self
            .remotes
            .get(&name)
            .ok_or_else(|| ConfigError::NoSuchRemote(name.clone()))?;
        Ok(Target {
            key: remote.api_key(&name)?,
            url: remote.url.clone(),
            more_urls: remote.urls().into_iter().skip(1).collect(),
            ca_file: remote.ca_file.clone(),
            fingerprint: remote.fingerprint.clone(),
            project: remote.project.clone(),
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Config {
        let mut c = Config::default();
        c.add_remote(
            "local",
            Remote {
                url: "https://127.0.0.1:8443".into(),
                key_file: Some("/root/.config/berth/local.key".into()),
                ca_file: Some("/root/.config/berth/local-ca.pem".into()),
                ..Remote::default()
            },
        )
        .unwrap();
        c.add_remote(
            "other",
            Remote {
                url: "https://10.0.0.2:8443".into(),
                key: Some("secret".into()),
                fingerprint: Some("ab".repeat(32)),
                ..Remote::default()
            },
        )
        .unwrap();
        c
    }

    #[test]
    fn round_trip_text() {
        let c = sample();
        let text = c.to_toml().unwrap();
        assert!(text.contains("default-remote = \"local\""), "{text}");
        assert!(text.contains("[remotes.local]"), "{text}");
        assert!(text.contains("key-file = "), "{text}");
        assert_eq!(Config::parse(&text).unwrap(), c);
    }

    #[test]
    fn parses_the_documented_example() {
        let text = r#"
default-remote = "local"
[remotes.local]
url = "https://127.0.0.1:8443"
key-file = "/root/.config/berth/local.key"
ca-file = "/root/.config/berth/local-ca.pem"
"#;
        let c = Config::parse(text).unwrap();
        assert_eq!(c.remotes["local"].url, "https://127.0.0.1:8443");
        assert!(Config::parse("bogus = 1").is_err());
    }

    #[test]
    fn save_is_private_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        let c = sample();
        c.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Config::load(&path).unwrap(), c);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn remote_edits() {
        let mut c = sample();
        assert!(matches!(
            c.add_remote("local", Remote::default()),
            Err(ConfigError::RemoteExists(_))
        ));
        assert!(matches!(
            c.add_remote("a b", Remote::default()),
            Err(ConfigError::BadRemoteName(_))
        ));
        assert!(matches!(
            c.remove_remote("local"),
            Err(ConfigError::RemoveDefault(_))
        ));
        c.switch_remote("other").unwrap();
        assert_eq!(c.default_remote, "other");
        assert!(matches!(
            c.rename_remote("other", "local"),
            Err(ConfigError::RemoteExists(_))
        ));
        assert!(matches!(
            c.rename_remote("other", "a:b"),
            Err(ConfigError::BadRemoteName(_))
        ));
        c.rename_remote("other", "prod").unwrap();
        assert_eq!(c.default_remote, "prod");
        assert_eq!(c.remotes["prod"].key.as_deref(), Some("secret"));
        c.rename_remote("prod", "other").unwrap();
        c.remove_remote("local").unwrap();
        assert!(matches!(
            c.switch_remote("local"),
            Err(ConfigError::NoSuchRemote(_))
        ));
    }

    #[test]
    fn stored_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let path = store_key(&keys, "prod", "  berth_abc_def \n").unwrap();
        assert_eq!(path, keys.join("prod.key"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "berth_abc_def\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&keys), 0o700);
        store_key(&keys, "prod", "second").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
        assert!(store_key(&keys, "../x", "k").is_err());
        assert_eq!(std::fs::read_dir(&keys).unwrap().count(), 1);
    }

    #[test]
    fn several_addresses() {
        let text = r#"
[remotes.c]
url = "https://10.0.0.1:8443"
addresses = ["https://10.0.0.2:8443", "https://10.0.0.1:8443/", "https://10.0.0.3:8443"]
key = "k"
"#;
        let c = Config::parse(text).unwrap();
        let r = &c.remotes["c"];
        assert_eq!(
            r.urls(),
            [
                "https://10.0.0.1:8443",
                "https://10.0.0.2:8443",
                "https://10.0.0.3:8443"
            ]
        );
        let t = c.target(Some("c"), &EnvOverrides::default()).unwrap();
        assert_eq!(t.url, "https://10.0.0.1:8443");
        assert_eq!(
            t.more_urls,
            ["https://10.0.0.2:8443", "https://10.0.0.3:8443"]
        );
        // A remote with one address writes no `addresses` line (old configs stay as they were).
        let mut one = Remote::default();
        one.set_urls(&split_urls("https://a:1/, ,https://a:1"));
        assert_eq!((one.url.as_str(), one.addresses.len()), ("https://a:1", 0));
        let mut cfg = Config::default();
        cfg.add_remote("one", one).unwrap();
        assert!(!cfg.to_toml().unwrap().contains("addresses"));
        assert_eq!(
            split_urls("https://a:1,https://b:2/"),
            ["https://a:1", "https://b:2"]
        );
    }

    #[test]
    fn remote_prefix() {
        assert_eq!(split_remote("web1"), (None, "web1"));
        assert_eq!(split_remote("prod:web1"), (Some("prod"), "web1"));
        assert_eq!(split_remote("prod:"), (Some("prod"), ""));
        assert_eq!(split_remote(":web1"), (None, ":web1"));
        assert_eq!(split_remote("web1/etc/a:b"), (None, "web1/etc/a:b"));
        assert_eq!(
            split_remote("prod:web1/etc/a:b"),
            (Some("prod"), "web1/etc/a:b")
        );
    }

    #[test]
    fn target_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "  the-key\n").unwrap();
        let mut c = sample();
        c.remotes.get_mut("local").unwrap().key_file = Some(key.clone());
        let none = EnvOverrides::default();
        let t = c.target(None, &none).unwrap();
        assert_eq!((t.name.as_str(), t.key.as_str()), ("local", "the-key"));
        let t = c.target(Some("other"), &none).unwrap();
        assert_eq!((t.name.as_str(), t.key.as_str()), ("other", "secret"));
        let env = EnvOverrides {
            remote: Some("other".into()),
            ..Default::default()
        };
        assert_eq!(c.target(None, &env).unwrap().name, "other");
        let env = EnvOverrides {
            url: Some("https://h:1,https://h:2".into()),
            key_file: Some(key),
            ca_file: Some("/ca".into()),
            ..Default::default()
        };
        let t = c.target(None, &env).unwrap();
        assert_eq!(t.url, "https://h:1");
        assert_eq!(t.more_urls, ["https://h:2"]);
        assert_eq!(t.ca_file, Some(PathBuf::from("/ca")));
        // An explicit prefix beats BERTH_URL.
        assert_eq!(c.target(Some("other"), &env).unwrap().name, "other");
        assert!(matches!(
            c.target(Some("nope"), &none),
            Err(ConfigError::NoSuchRemote(_))
        ));
    }
}
