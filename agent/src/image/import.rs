//! Imports of LXD/Incus images: unified tarballs (`metadata.yaml`, `rootfs/`, `templates/`) and
//! split images (a metadata tarball plus a rootfs tarball or squashfs).
//!
//! Extraction uses GNU tar, which strips leading `/` from member names, refuses members with
//! `..`, and defers symlinks pointing outside (absolute or with `..`) until the end, so later
//! members cannot be written through them. Device nodes are removed after extraction.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;

use super::{ImageError, ImageRecord, ImageStore, now_unix, util};

/// How an uploaded image is packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    /// One tarball with `metadata.yaml` and `rootfs/`.
    Unified,
    /// A metadata tarball and a separate rootfs (tarball or squashfs).
    Split,
}

impl FromStr for ImportFormat {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, ImageError> {
        match s {
            "unified" | "" => Ok(ImportFormat::Unified),
            "split" => Ok(ImportFormat::Split),
            other => Err(ImageError::UnknownFormat(other.to_string())),
        }
    }
}

/// The parts of LXD's metadata.yaml Berth uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct LxdMetadata {
    pub architecture: String,
    pub creation_date: i64,
    pub properties: BTreeMap<String, String>,
}

/// Parses LXD's metadata.yaml leniently (unknown keys ignored, scalar property values
/// stringified).
pub(super) fn parse_metadata(text: &str) -> Result<LxdMetadata, ImageError> {
    let v: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| ImageError::InvalidImage(format!("metadata.yaml does not parse: {e}")))?;
    let map = v
        .as_mapping()
        .ok_or_else(|| ImageError::InvalidImage("metadata.yaml is not a mapping".into()))?;
    let scalar = |v: &serde_yaml::Value| -> Option<String> {
        match v {
            serde_yaml::Value::String(s) => Some(s.clone()),
            serde_yaml::Value::Number(n) => Some(n.to_string()),
            serde_yaml::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let architecture = map
        .get("architecture")
        .and_then(scalar)
        .ok_or_else(|| ImageError::InvalidImage("metadata.yaml has no architecture".into()))?;
    let creation_date = map
        .get("creation_date")
        .and_then(serde_yaml::Value::as_i64)
        .unwrap_or(0);
    let mut properties = BTreeMap::new();
    if let Some(props) = map
        .get("properties")
        .and_then(serde_yaml::Value::as_mapping)
    {
        for (k, v) in props {
            if let (Some(k), Some(v)) = (scalar(k), scalar(v)) {
                properties.insert(k, v);
            }
        }
    }
    Ok(LxdMetadata {
        architecture,
        creation_date,
        properties,
    })
}

pub(super) fn import(
    store: &ImageStore,
    format: ImportFormat,
    metadata: Option<&Path>,
    rootfs: &Path,
) -> Result<ImageRecord, ImageError> {
    let files: Vec<&Path> = match (format, metadata) {
        (ImportFormat::Unified, None) => vec![rootfs],
        (ImportFormat::Split, Some(m)) => vec![m, rootfs],
        (ImportFormat::Unified, Some(_)) => {
            return Err(ImageError::InvalidImage(
                "a unified image comes as one file, but a metadata file was given too".into(),
            ));
        }
        (ImportFormat::Split, None) => {
            return Err(ImageError::InvalidImage(
                "a split image needs a metadata tarball".into(),
            ));
        }
    };
    let (fp, size) = util::sha256_files(&files)?;
    if let Some(existing) = store.read_record(&fp)? {
        return Ok(existing);
    }
    let vol = store.storage.create_image_volume(&fp)?;
    let res = (|| {
        match format {
            ImportFormat::Unified => extract_tar(rootfs, &vol)?,
            ImportFormat::Split => {
                // The metadata tarball is unpacked aside and only its metadata.yaml (a regular
                // file) is kept: unpacked into the volume, a `rootfs` symlink in it would
                // send the rootfs archive, extracted next, anywhere on the host.
                let scratch = vol.join(".metadata");
                std::fs::create_dir(&scratch).map_err(|e| {
                    ImageError::InvalidImage(format!("cannot unpack the metadata: {e}"))
                })?;
                let unpacked = extract_tar(files[0], &scratch)
                    .and_then(|()| read_regular_file(&scratch.join("metadata.yaml"), 1 << 20));
                let _ = std::fs::remove_dir_all(&scratch);
                std::fs::write(vol.join("metadata.yaml"), unpacked?).map_err(|e| {
                    ImageError::InvalidImage(format!("cannot write metadata.yaml: {e}"))
                })?;
                let root = vol.join("rootfs");
                if is_squashfs(rootfs)? {
                    unsquash(rootfs, &root)?;
                } else {
                    extract_tar(rootfs, &root)?;
                }
            }
        }
        let removed = util::remove_device_nodes(&vol)?;
        if removed > 0 {
            tracing::info!(fingerprint = %fp, removed, "removed device nodes from imported image");
        }
        let root_meta = std::fs::symlink_metadata(vol.join("rootfs"));
        if !root_meta.is_ok_and(|m| m.is_dir()) {
            return Err(ImageError::InvalidImage(
                "the image has no rootfs/ directory".into(),
            ));
        }
        let meta = parse_metadata(&read_regular_file(&vol.join("metadata.yaml"), 1 << 20)?)?;
        let prop = |k: &str| meta.properties.get(k).cloned().unwrap_or_default();
        Ok(ImageRecord {
            fingerprint: fp.clone(),
            aliases: Vec::new(),
            os: prop("os"),
            release: prop("release"),
            architecture: meta.architecture.clone(),
            description: prop("description"),
            size_bytes: size,
            created_at: if meta.creation_date > 0 {
                meta.creation_date
            } else {
                now_unix()
            },
            properties: meta.properties.clone(),
        })
    })();
    match res {
        Ok(rec) => store.finish(rec, None),
        Err(e) => {
            let _ = store.storage.delete_image_volume(&fp);
            Err(e)
        }
    }
}

/// Extracts a tarball (compression auto-detected) into `dir`, keeping numeric owners and
/// xattrs.
fn extract_tar(file: &Path, dir: &Path) -> Result<(), ImageError> {
    util::run(
        Command::new("tar")
            .arg("-xf")
            .arg(file)
            .args([
                "--numeric-owner",
                "--same-owner",
                "--same-permissions",
                "--xattrs",
                "--xattrs-include=*",
                "--no-overwrite-dir",
                "-C",
            ])
            .arg(dir),
    )
    .map(|_| ())
    .map_err(|e| match e {
        ImageError::Command { detail, .. } => {
            ImageError::InvalidImage(format!("cannot extract {}: {detail}", file.display()))
        }
        other => other,
    })
}

fn is_squashfs(file: &Path) -> Result<bool, ImageError> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(file).map_err(util::io_err(file))?;
    let n = f.read(&mut magic).map_err(util::io_err(file))?;
    Ok(n == 4 && &magic == b"hsqs")
}

fn unsquash(file: &Path, dir: &Path) -> Result<(), ImageError> {
    if !util::have_tool("unsquashfs") {
        return Err(ImageError::Unsupported(
            "the rootfs is a squashfs and unsquashfs is not installed (install squashfs-tools)"
                .into(),
        ));
    }
    util::run(
        Command::new("unsquashfs")
            .args(["-f", "-n", "-d"])
            .arg(dir)
            .arg(file),
    )
    .map(|_| ())
}

/// Reads a regular file (never through a symlink) of at most `max` bytes.
fn read_regular_file(path: &Path, max: u64) -> Result<String, ImageError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            ImageError::InvalidImage(format!(
                "{} is missing or not a regular file ({e})",
                path.display()
            ))
        })?;
    let meta = f.metadata().map_err(util::io_err(path))?;
    if !meta.is_file() {
        return Err(ImageError::InvalidImage(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut s = String::new();
    f.take(max)
        .read_to_string(&mut s)
        .map_err(|e| ImageError::InvalidImage(format!("{}: {e}", path.display())))?;
    Ok(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(
            "unified".parse::<ImportFormat>().unwrap(),
            ImportFormat::Unified
        );
        assert_eq!(
            "split".parse::<ImportFormat>().unwrap(),
            ImportFormat::Split
        );
        assert!("zip".parse::<ImportFormat>().is_err());
    }

    #[test]
    fn lxd_metadata() {
        let y = "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  os: Debian\n  release: bookworm\n  serial: 20240101\ntemplates:\n  /etc/hostname:\n    when: [create]\n    template: hostname.tpl\n";
        let m = parse_metadata(y).unwrap();
        assert_eq!(m.architecture, "x86_64");
        assert_eq!(m.creation_date, 1_700_000_000);
        assert_eq!(m.properties["serial"], "20240101");
        assert!(parse_metadata("- a\n- b\n").is_err());
        assert!(parse_metadata("properties: {}\n").is_err());
        assert!(parse_metadata(": : :").is_err());
    }
}
