//! Reading a daemon's TOML config file into its raw (not yet validated) form.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a config file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Reads and parses `path` (the raw type should refuse unknown keys); `None` gives the raw
/// type's defaults.
pub fn read_toml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigFileError> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(p).map_err(|source| ConfigFileError::Read {
        path: p.to_path_buf(),
        source,
    })?;
    toml::from_str::<T>(&text).map_err(|e| ConfigFileError::Parse {
        path: p.to_path_buf(),
        message: e.message().to_string(),
    })
}
