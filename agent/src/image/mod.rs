//! Images on this node: built locally (`busybox` from the host's busybox-static, `debian/12` by
//! debootstrap), or imported from LXD/Incus image tarballs.
//!
//! An image is an image volume `images/<fingerprint>/` of the storage pool (`rootfs/` and an
//! LXD-format `metadata.yaml`), sealed read-only, plus a record
//! `<state_dir>/images/<fingerprint>.json` holding its [`berth_proto::v1::Image`] fields. The
//! record is written last: an image without one does not exist (a leftover of a crash).
//! Fingerprints are lowercase hex sha256.

mod busybox;
mod debian;
mod import;
mod publish;
mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_proto::v1::Image;
use serde::{Deserialize, Serialize};

use crate::storage::{StorageDriver, StorageError};

pub use import::ImportFormat;

/// Errors from image builds, imports and bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image recipe {0:?} (known: busybox, debian/12)")]
    UnknownRecipe(String),
    #[error("image {0} not found")]
    NotFound(String),
    #[error("image {0} is in use: a build or import is running; retry when it has finished")]
    InUse(String),
    #[error("invalid image fingerprint {0:?}: expected 64 lowercase hex digits")]
    InvalidFingerprint(String),
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error("unknown image import format {0:?} (expected unified or split)")]
    UnknownFormat(String),
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("host prerequisite missing: {0}")]
    HostTool(String),
    #[error("{op} failed: {detail}")]
    Command { op: String, detail: String },
    #[error("image i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image record {path}: {detail}")]
    Record { path: PathBuf, detail: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Name prefix of image volumes being built (renamed to the fingerprint when done).
const BUILD_PREFIX: &str = "build-";

/// Built-in build recipes.
pub const RECIPES: &[&str] = &["busybox", "debian/12"];

/// The agent's image store on one storage pool.
pub struct ImageStore {
    storage: Arc<dyn StorageDriver>,
    records_dir: PathBuf,
    cache_dir: PathBuf,
    /// Serializes builds, imports and deletions (they are rare and heavy).
    lock: Mutex<()>,
}

/// What the agent remembers about an image (`<state_dir>/images/<fingerprint>.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageRecord {
    pub fingerprint: String,
    pub aliases: Vec<String>,
    pub os: String,
    pub release: String,
    pub architecture: String,
    pub description: String,
    pub size_bytes: u64,
    pub created_at: i64,
    pub properties: BTreeMap<String, String>,
}

impl From<ImageRecord> for Image {
    fn from(r: ImageRecord) -> Image {
        Image {
            fingerprint: r.fingerprint,
            aliases: r.aliases,
            os: r.os,
            release: r.release,
            architecture: r.architecture,
            description: r.description,
            size_bytes: r.size_bytes,
            created_at: r.created_at,
            properties: r.properties.into_iter().collect(),
        }
    }
}

impl ImageStore {
    /// `state_dir` is the agent's state directory (records go to `<state_dir>/images/`);
    /// `cache_dir` keeps build caches (e.g. `/var/cache/berth/images`).
    pub fn new(
        storage: Arc<dyn StorageDriver>,
        state_dir: PathBuf,
        cache_dir: PathBuf,
    ) -> Result<Self, ImageError> {
        let records_dir = state_dir.join("images");
        let spool = cache_dir.join("spool");
        for d in [&records_dir, &cache_dir, &spool] {
            std::fs::create_dir_all(d).map_err(util::io_err(d))?;
        }
        // Uploads may be private images: root only.
        std::fs::set_permissions(&spool, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(util::io_err(&spool))?;
        // Leftovers of builds interrupted by a crash.
        for name in storage.list_image_volumes()? {
            if name.starts_with(BUILD_PREFIX) {
                tracing::info!(volume = %name, "removing an interrupted image build");
                storage.delete_image_volume(&name)?;
            }
        }
        Ok(ImageStore {
            storage,
            records_dir,
            cache_dir,
            lock: Mutex::new(()),
        })
    }

    /// A directory for spooling uploads before [`ImageStore::import`] (`<cache_dir>/spool`);
    /// callers make their own private subdirectory in it and remove it afterwards.
    pub fn spool_dir(&self) -> PathBuf {
        self.cache_dir.join("spool")
    }

    /// The storage driver images live on.
    pub fn storage(&self) -> &Arc<dyn StorageDriver> {
        &self.storage
    }

    /// Builds an image from a built-in recipe (`busybox`, `debian/12`). Blocking: seconds for
    /// busybox, minutes for a first debian build (then seconds, from the cached tarball).
    /// Building an image that exists already returns the existing one (with `recipe` added to
    /// its aliases). `mirror` is a Debian mirror URL; `None` for the host's. A cached debian
    /// tarball is used whatever the mirror; delete it from the cache directory to rebuild.
    pub fn build(&self, recipe: &str, mirror: Option<&str>) -> Result<Image, ImageError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let rec = match recipe {
            "busybox" => busybox::build(self)?,
            "debian/12" | "debian/bookworm" => debian::build(self, mirror)?,
            other => return Err(ImageError::UnknownRecipe(other.to_string())),
        };
        let rec = self.add_aliases(rec, &[recipe.to_string()])?;
        tracing::info!(recipe, fingerprint = %rec.fingerprint, elapsed_ms = started.elapsed().as_millis() as u64, "image built");
        Ok(rec.into())
    }

    /// Imports an LXD/Incus image from files the caller wrote: `rootfs` is the unified tarball
    /// (then `metadata` is `None`) or, for [`ImportFormat::Split`], the rootfs tarball or
    /// squashfs with `metadata` the metadata tarball. The fingerprint is LXD's: sha256 of the
    /// unified file, or of metadata followed by rootfs.
    pub fn import(
        &self,
        format: ImportFormat,
        metadata: Option<&Path>,
        rootfs: &Path,
        aliases: Vec<String>,
    ) -> Result<Image, ImageError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let rec = import::import(self, format, metadata, rootfs)?;
        let rec = self.add_aliases(rec, &aliases)?;
        tracing::info!(fingerprint = %rec.fingerprint, "image imported");
        Ok(rec.into())
    }

    /// Publishes an image made from `source`: a stopped instance's volume or a snapshot (a
    /// directory holding `rootfs/`, and the metadata.yaml of the image it came from, whose
    /// properties `properties` override). The fingerprint is the sha256 of the unified tarball
    /// [`ImageStore::export`] produces for it. Publishing identical content again returns the
    /// existing image.
    pub fn publish(
        &self,
        source: &Path,
        properties: &BTreeMap<String, String>,
    ) -> Result<Image, ImageError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let rec = publish::publish(self, source, properties)?;
        tracing::info!(fingerprint = %rec.fingerprint, source = %source.display(), "image published");
        Ok(rec.into())
    }

    /// Streams the image as an LXD/Incus unified tarball (gzip; `metadata.yaml`, `rootfs/`,
    /// `templates/` when present; owners are the container's ids) to `sink`, chunk by chunk;
    /// returns its length. The tarball is the same on every export of the same volume.
    pub fn export(
        &self,
        fingerprint: &str,
        sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, ImageError> {
        let vol = self
            .volume_path(fingerprint)?
            .ok_or_else(|| ImageError::NotFound(fingerprint.to_string()))?;
        publish::write_tarball(&vol, sink)
    }

    /// All images on this node, sorted by fingerprint.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.records_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(util::io_err(&self.records_dir)(e)),
        };
        for entry in rd {
            let entry = entry.map_err(util::io_err(&self.records_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(fp) = name.strip_suffix(".json") else {
                continue;
            };
            if check_fingerprint(fp).is_err() {
                continue;
            }
            match self.read_record(fp) {
                Ok(Some(r)) => out.push(Image::from(r)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(fingerprint = fp, error = %e, "skipping unreadable image record")
                }
            }
        }
        out.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        Ok(out)
    }

    /// The image with this fingerprint, if it is on this node.
    pub fn get(&self, fingerprint: &str) -> Result<Option<Image>, ImageError> {
        check_fingerprint(fingerprint)?;
        Ok(self.read_record(fingerprint)?.map(Image::from))
    }

    /// The directory of an image's volume (`rootfs/` and `metadata.yaml` inside), if present.
    pub fn volume_path(&self, fingerprint: &str) -> Result<Option<PathBuf>, ImageError> {
        check_fingerprint(fingerprint)?;
        if self.read_record(fingerprint)?.is_none() {
            return Ok(None);
        }
        Ok(self.storage.image_volume(fingerprint))
    }

    /// Deletes an image (volume and record). Instances made from it are not affected (their
    /// volumes are snapshots or copies). Refused with [`ImageError::InUse`] while a build or
    /// import runs.
    pub fn delete(&self, fingerprint: &str) -> Result<(), ImageError> {
        check_fingerprint(fingerprint)?;
        let _guard = match self.lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(ImageError::InUse(fingerprint.to_string()));
            }
        };
        if self.read_record(fingerprint)?.is_none()
            && self.storage.image_volume(fingerprint).is_none()
        {
            return Err(ImageError::NotFound(fingerprint.to_string()));
        }
        // Record first: a crash in between leaves an orphan volume, never a record without one.
        let path = self.record_path(fingerprint);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(util::io_err(&path)(e)),
        }
        self.storage.delete_image_volume(fingerprint)?;
        tracing::info!(fingerprint, "image deleted");
        Ok(())
    }

    fn record_path(&self, fingerprint: &str) -> PathBuf {
        self.records_dir.join(format!("{fingerprint}.json"))
    }

    fn read_record(&self, fingerprint: &str) -> Result<Option<ImageRecord>, ImageError> {
        let path = self.record_path(fingerprint);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(util::io_err(&path)(e)),
        };
        let rec: ImageRecord = serde_json::from_str(&text).map_err(|e| ImageError::Record {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        Ok(Some(rec))
    }

    fn write_record(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let path = self.record_path(&rec.fingerprint);
        let text = serde_json::to_string_pretty(rec).map_err(|e| ImageError::Record {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        util::write_atomic(&path, text.as_bytes())
    }

    fn add_aliases(
        &self,
        mut rec: ImageRecord,
        aliases: &[String],
    ) -> Result<ImageRecord, ImageError> {
        let mut changed = false;
        for a in aliases {
            if !a.is_empty() && !rec.aliases.contains(a) {
                rec.aliases.push(a.clone());
                changed = true;
            }
        }
        if changed {
            self.write_record(&rec)?;
        }
        Ok(rec)
    }

    /// Seals a filled volume, writes its metadata.yaml and record. On error the volume is
    /// deleted.
    fn finish(
        &self,
        rec: ImageRecord,
        metadata_yaml: Option<String>,
    ) -> Result<ImageRecord, ImageError> {
        let fp = rec.fingerprint.clone();
        let res = (|| {
            let vol = self
                .storage
                .image_volume(&fp)
                .ok_or_else(|| ImageError::NotFound(fp.clone()))?;
            if let Some(yaml) = metadata_yaml {
                util::write_atomic(&vol.join("metadata.yaml"), yaml.as_bytes())?;
            }
            self.storage.finish_image_volume(&fp)?;
            self.write_record(&rec)
        })();
        if let Err(e) = res {
            let _ = self.storage.delete_image_volume(&fp);
            return Err(e);
        }
        Ok(rec)
    }
}

/// Refuses anything but 64 lowercase hex digits.
pub fn check_fingerprint(fp: &str) -> Result<(), ImageError> {
    if fp.len() == 64
        && fp
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        Ok(())
    } else {
        Err(ImageError::InvalidFingerprint(fp.to_string()))
    }
}

/// LXD's architecture name for this host (`x86_64`, `aarch64`, ...).
pub fn host_architecture() -> &'static str {
    std::env::consts::ARCH
}

/// LXD-format `metadata.yaml`.
fn metadata_yaml(
    architecture: &str,
    creation_date: i64,
    properties: &BTreeMap<String, String>,
) -> String {
    #[derive(Serialize)]
    struct Meta<'a> {
        architecture: &'a str,
        creation_date: i64,
        properties: &'a BTreeMap<String, String>,
    }
    serde_yaml::to_string(&Meta {
        architecture,
        creation_date,
        properties,
    })
    .unwrap_or_default()
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        assert!(check_fingerprint(&"a".repeat(64)).is_ok());
        assert!(check_fingerprint(&"A".repeat(64)).is_err());
        assert!(check_fingerprint("../etc").is_err());
        assert!(check_fingerprint(&"a".repeat(63)).is_err());
    }

    #[test]
    fn metadata_round_trip() {
        let mut p = BTreeMap::new();
        p.insert("os".to_string(), "busybox".to_string());
        let y = metadata_yaml("x86_64", 5, &p);
        let m = import::parse_metadata(&y).unwrap();
        assert_eq!(m.architecture, "x86_64");
        assert_eq!(m.creation_date, 5);
        assert_eq!(m.properties.get("os").map(String::as_str), Some("busybox"));
    }
}
