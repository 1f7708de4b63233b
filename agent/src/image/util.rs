//! Helpers shared by image builds and imports: commands, hashing, safe tree cleanup.

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::ImageError;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command; returns stdout or an error carrying the end of its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let op = describe(cmd);
    tracing::debug!(command = %op, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::Command {
            op: op.clone(),
            detail: format!("cannot spawn: {e}"),
        })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            op,
            detail: format!("{} ({})", tail(&out.stderr, 2000), out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `max` bytes of a command's output, as text.
pub(crate) fn tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// Lowercase hex sha256 and length of everything `reader` yields.
pub(crate) fn sha256_reader(mut reader: impl Read) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n_total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((hex::encode(h.finalize()), n_total))
}

/// sha256 of the concatenation of files.
pub(crate) fn sha256_files(files: &[&Path]) -> Result<(String, u64), ImageError> {
    let mut h = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    for f in files {
        let mut file = std::fs::File::open(f).map_err(io_err(f))?;
        loop {
            let n = file.read(&mut buf).map_err(io_err(f))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
    }
    Ok((hex::encode(h.finalize()), total))
}

/// Fingerprint of a directory tree: sha256 of a deterministic tar stream of it (sorted names,
/// mtime 0, numeric owner 0:0) and the stream's length.
pub(crate) fn tree_fingerprint(dir: &Path) -> Result<(String, u64), ImageError> {
    let mut cmd = Command::new("tar");
    cmd.args([
        "--sort=name",
        "--mtime=@0",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--format=gnu",
        "-C",
    ])
    .arg(dir)
    .args(["-cf", "-", "."]);
    let op = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Command {
            op: op.clone(),
            detail: format!("cannot spawn: {e}"),
        })?;
    let hashed = match child.stdout.take() {
        Some(out) => sha256_reader(out),
        None => Err(std::io::Error::other("no stdout pipe")),
    };
    let out = child.wait_with_output().map_err(|e| ImageError::Command {
        op: op.clone(),
        detail: format!("cannot wait: {e}"),
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            op,
            detail: format!("{} ({})", tail(&out.stderr, 2000), out.status),
        });
    }
    hashed.map_err(|e| ImageError::Command {
        op,
        detail: format!("reading the stream: {e}"),
    })
}

/// Writes a file through a temporary sibling and a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, data).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Removes block and character device nodes anywhere below `dir` (an image must not carry
/// host device access; the runtime provides /dev). Never follows symlinks. Returns how many.
pub(crate) fn remove_device_nodes(dir: &Path) -> Result<usize, ImageError> {
    let mut removed = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            let ft = entry.file_type().map_err(io_err(&d))?;
            let p = entry.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_block_device() || ft.is_char_device() {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Mount points at or below `dir` (deepest first), from /proc/self/mountinfo.
pub(crate) fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = crate::storage::btrfs::mount_points(&info)
        .into_iter()
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Removes a directory tree left by an interrupted build: unmounts whatever is still mounted
/// inside it first (debootstrap mounts /proc and /sys in its target), so removal never reaches
/// into a mounted filesystem.
pub(crate) fn remove_build_dir(dir: &Path) -> Result<(), ImageError> {
    if std::fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    for m in mounts_below(dir) {
        run(Command::new("umount").arg("-l").arg(&m))?;
    }
    if !mounts_below(dir).is_empty() {
        return Err(ImageError::InvalidImage(format!(
            "{} still has mounts inside; not removing it",
            dir.display()
        )));
    }
    std::fs::remove_dir_all(dir).map_err(io_err(dir))
}

/// Whether an executable named `tool` is on PATH.
pub(crate) fn have_tool(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file())
}

/// A random lowercase hex string of `n` bytes.
pub(crate) fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return format!("{t:x}{:x}", std::process::id());
    }
    hex::encode(b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hashes() {
        let (h, n) = sha256_reader(&b"abc"[..]).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn tree_fingerprint_is_deterministic() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::create_dir(d.join("etc")).unwrap();
            std::fs::write(d.join("etc/x"), "1").unwrap();
            std::os::unix::fs::symlink("/bin/busybox", d.join("sh")).unwrap();
        }
        assert_eq!(
            tree_fingerprint(a.path()).unwrap(),
            tree_fingerprint(b.path()).unwrap()
        );
        std::fs::write(b.path().join("etc/x"), "2").unwrap();
        assert_ne!(
            tree_fingerprint(a.path()).unwrap().0,
            tree_fingerprint(b.path()).unwrap().0
        );
    }
}
