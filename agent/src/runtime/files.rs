//! File push, pull and delete inside an instance's root filesystem, never outside it.
//!
//! - Running instance: a `berth-agent __file` helper ([`helper_main`]) joins the user and mount
//!   namespaces of the instance's init, so `/` is the instance root and ids are container ids;
//!   content streams over the helper's stdin/stdout.
//! - Stopped instance: the agent works on the rootfs path directly (on-disk ids are container
//!   ids because the rootfs is attached through an idmapped mount).
//!
//! In both cases every path is resolved with openat2 RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
//! relative to a directory fd of the root, so `..` and absolute symlinks stay inside.
//!
//! Helper protocol: `__file <push|pull|delete> --pid <init pid> --path <path> [--kind
//! file|directory|symlink --mode <octal> --uid <n> --gid <n> --target <t>]`. The helper writes
//! one JSON line ([`HelperReply`]) to stdout; a successful pull of a regular file is followed
//! by its bytes. A push of a regular file reads the content from stdin.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, ReadBuf};

use crate::sys::exec::{FILE_NAMESPACES, NamespaceFds, become_namespace_root};
use crate::sys::files::{open_in_root, open_root, same_inode};

/// Longest accepted path, in bytes (PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// Size of the chunks content is copied in.
const CHUNK: usize = 64 * 1024;

/// Kind of a file in an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
}

impl FileKind {
    fn as_str(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symlink",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "file" => Some(FileKind::File),
            "directory" => Some(FileKind::Directory),
            "symlink" => Some(FileKind::Symlink),
            _ => None,
        }
    }
}

/// Metadata of a file in an instance (ids are container ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// File, directory or symlink.
    pub kind: FileKind,
    /// Permission bits (`0o7777` mask).
    pub mode: u32,
    /// Owner (container uid).
    pub uid: u32,
    /// Group (container gid).
    pub gid: u32,
    /// Size in bytes (for a regular file: the number of bytes a pull streams).
    pub size: u64,
    /// For a directory: its entry names, sorted, without `.` and `..`.
    pub entries: Vec<String>,
    /// For a symlink: its target.
    pub target: String,
}

/// Where an instance's files are.
#[derive(Debug, Clone)]
pub enum FileRoot {
    /// A running instance: work inside the namespaces of its init (host pid), through the
    /// `__file` helper started from `helper_exe` (normally `/proc/self/exe`).
    Running { init_pid: i32, helper_exe: PathBuf },
    /// A stopped instance: its root filesystem on the host, with container ids on disk (it is
    /// attached through an idmapped mount when running).
    Stopped { rootfs: PathBuf },
    /// A stopped instance whose rootfs owners were shifted on disk by `id_base` (no idmapped
    /// mounts): container id N is host id `id_base + N` for N < [`crate::runtime::IDMAP_SIZE`].
    StoppedShifted { rootfs: PathBuf, id_base: u32 },
}

/// Translation between container ids and on-disk ids of a stopped instance's rootfs.
#[derive(Debug, Clone, Copy)]
struct IdShift {
    base: u32,
}

impl IdShift {
    fn disk_id(self, id: u32) -> Result<u32, FileError> {
        if self.base == 0 {
            return Ok(id);
        }
        if id >= crate::runtime::IDMAP_SIZE {
            return Err(FileError::InvalidId(format!(
                "{id} is outside the instance's id range 0-{}",
                crate::runtime::IDMAP_SIZE - 1
            )));
        }
        self.base
            .checked_add(id)
            .ok_or_else(|| FileError::InvalidId(id.to_string()))
    }

    /// On-disk id to container id; ids outside the range show as the overflow id 65534.
    fn container_id(self, id: u32) -> u32 {
        if self.base == 0 {
            return id;
        }
        match id.checked_sub(self.base) {
            Some(n) if n < crate::runtime::IDMAP_SIZE => n,
            _ => OVERFLOW_ID,
        }
    }

    fn meta_from_disk(self, mut meta: FileMeta) -> FileMeta {
        meta.uid = self.container_id(meta.uid);
        meta.gid = self.container_id(meta.gid);
        meta
    }
}

/// The id unmapped owners show as inside a user namespace (`nobody`).
const OVERFLOW_ID: u32 = 65534;

/// Where an operation runs: on the host on a stopped instance's rootfs (with its id
/// translation), or through the helper in a running instance.
enum Where<'a> {
    Local(PathBuf, IdShift),
    Helper(i32, &'a Path),
}

fn where_is(root: &FileRoot) -> Where<'_> {
    match root {
        FileRoot::Stopped { rootfs } => Where::Local(rootfs.clone(), IdShift { base: 0 }),
        FileRoot::StoppedShifted { rootfs, id_base } => {
            Where::Local(rootfs.clone(), IdShift { base: *id_base })
        }
        FileRoot::Running {
            init_pid,
            helper_exe,
        } => Where::Helper(*init_pid, helper_exe),
    }
}

/// Errors of file operations. The first variants are the caller's fault (4xx).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("invalid path: {0}")]
    InvalidPath(String),
    #[error("no such file or directory: {0}")]
    NotFound(String),
    #[error("not a directory: {0}")]
    NotADirectory(String),
    #[error("is a directory: {0}")]
    IsADirectory(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("directory not empty: {0}")]
    NotEmpty(String),
    #[error("path escapes the instance root: {0}")]
    Escape(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("unsupported file type: {0}")]
    Unsupported(String),
    #[error("invalid owner: {0}")]
    InvalidId(String),
    #[error("file helper failed: {0}")]
    Helper(String),
    #[error("file operation failed: {0}")]
    Io(String),
}

impl FileError {
    /// A stable code naming the variant (`not_found`, `escape`, ...), for API error codes.
    pub fn code(&self) -> &'static str {
        match self {
            FileError::InvalidPath(_) => "invalid_path",
            FileError::NotFound(_) => "not_found",
            FileError::NotADirectory(_) => "not_a_directory",
            FileError::IsADirectory(_) => "is_a_directory",
            FileError::AlreadyExists(_) => "already_exists",
            FileError::NotEmpty(_) => "not_empty",
            FileError::Escape(_) => "escape",
            FileError::PermissionDenied(_) => "permission_denied",
            FileError::Unsupported(_) => "unsupported",
            FileError::InvalidId(_) => "invalid_id",
            FileError::Helper(_) => "helper",
            FileError::Io(_) => "io",
        }
    }

    fn detail(&self) -> &str {
        match self {
            FileError::InvalidPath(s)
            | FileError::NotFound(s)
            | FileError::NotADirectory(s)
            | FileError::IsADirectory(s)
            | FileError::AlreadyExists(s)
            | FileError::NotEmpty(s)
            | FileError::Escape(s)
            | FileError::PermissionDenied(s)
            | FileError::Unsupported(s)
            | FileError::InvalidId(s)
            | FileError::Helper(s)
            | FileError::Io(s) => s,
        }
    }

    fn from_code(code: &str, detail: String) -> Self {
        match code {
            "invalid_path" => FileError::InvalidPath(detail),
            "not_found" => FileError::NotFound(detail),
            "not_a_directory" => FileError::NotADirectory(detail),
            "is_a_directory" => FileError::IsADirectory(detail),
            "already_exists" => FileError::AlreadyExists(detail),
            "not_empty" => FileError::NotEmpty(detail),
            "escape" => FileError::Escape(detail),
            "permission_denied" => FileError::PermissionDenied(detail),
            "unsupported" => FileError::Unsupported(detail),
            "invalid_id" => FileError::InvalidId(detail),
            "io" => FileError::Io(detail),
            _ => FileError::Helper(detail),
        }
    }

    /// Maps an errno of an operation on `path` to the matching variant.
    fn from_errno(e: Errno, op: &str, path: &str) -> Self {
        match e {
            Errno::NOENT => FileError::NotFound(path.to_string()),
            Errno::NOTDIR => FileError::NotADirectory(path.to_string()),
            Errno::ISDIR => FileError::IsADirectory(path.to_string()),
            Errno::EXIST => FileError::AlreadyExists(path.to_string()),
            Errno::NOTEMPTY => FileError::NotEmpty(path.to_string()),
            Errno::XDEV => FileError::Escape(path.to_string()),
            Errno::LOOP => FileError::InvalidPath(format!(
                "{path}: too many levels of symbolic links or a link into /proc"
            )),
            Errno::NAMETOOLONG => FileError::InvalidPath(format!("{path}: name too long")),
            Errno::ACCESS | Errno::PERM => FileError::PermissionDenied(path.to_string()),
            other => FileError::Io(format!("{op} {path}: {other}")),
        }
    }

    fn from_io(e: std::io::Error, op: &str, path: &str) -> Self {
        match e.raw_os_error() {
            Some(n) => Self::from_errno(Errno::from_raw_os_error(n), op, path),
            None => FileError::Io(format!("{op} {path}: {e}")),
        }
    }
}

/// Checks that `path` is absolute, has no NUL byte and is at most [`MAX_PATH_LEN`] bytes.
pub fn validate_path(path: &str) -> Result<(), FileError> {
    if path.is_empty() {
        return Err(FileError::InvalidPath("empty path".to_string()));
    }
    if !path.starts_with('/') {
        return Err(FileError::InvalidPath(format!("{path}: not absolute")));
    }
    if path.contains('\0') {
        return Err(FileError::InvalidPath(
            "path contains a NUL byte".to_string(),
        ));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(FileError::InvalidPath(format!(
            "path is longer than {MAX_PATH_LEN} bytes"
        )));
    }
    Ok(())
}

/// Splits a validated path into its parent directory and final name. The root itself, and
/// paths whose final component is `.` or `..`, have no name and are refused.
fn split_path(path: &str) -> Result<(&str, &str), FileError> {
    let trimmed = path.trim_end_matches('/');
    let (parent, name) = match trimmed.rfind('/') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => ("", trimmed),
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(FileError::InvalidPath(format!(
            "{path}: does not name an entry of a directory"
        )));
    }
    Ok((if parent.is_empty() { "/" } else { parent }, name))
}

fn kind_of(ft: FileType) -> Option<FileKind> {
    match ft {
        FileType::RegularFile => Some(FileKind::File),
        FileType::Directory => Some(FileKind::Directory),
        FileType::Symlink => Some(FileKind::Symlink),
        _ => None,
    }
}

fn meta_of_stat(st: &rustix::fs::Stat, path: &str) -> Result<FileMeta, FileError> {
    let ft = FileType::from_raw_mode(st.st_mode);
    let kind = kind_of(ft).ok_or_else(|| FileError::Unsupported(format!("{path}: {ft:?}")))?;
    Ok(FileMeta {
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: u64::try_from(st.st_size).unwrap_or(0),
        entries: Vec::new(),
        target: String::new(),
    })
}

/// Opens the parent directory of `path` inside `root`; returns it with the final name.
fn open_parent<'a>(root: BorrowedFd<'_>, path: &'a str) -> Result<(OwnedFd, &'a str), FileError> {
    let (parent, name) = split_path(path)?;
    let dir = open_in_root(
        root,
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .map_err(|e| FileError::from_errno(e, "open parent of", path))?;
    Ok((dir, name))
}

/// A regular file being pushed: content goes to a temporary file in the target's directory,
/// which [`PendingFile::finish`] renames over the target. Dropping it unfinished removes the
/// temporary file.
struct PendingFile {
    dir: OwnedFd,
    tmp: String,
    name: String,
    path: String,
    file: Option<std::fs::File>,
}

impl PendingFile {
    fn create(root: BorrowedFd<'_>, path: &str) -> Result<Self, FileError> {
        let (dir, name) = open_parent(root, path)?;
        // Refuse early when the target is a directory (rename would fail after the upload).
        if let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
            && FileType::from_raw_mode(st.st_mode) == FileType::Directory
        {
            return Err(FileError::IsADirectory(path.to_string()));
        }
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|e| FileError::Io(format!("random name: {e}")))?;
        let tmp = format!(".berth-push.{}", hex::encode(rnd));
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| FileError::from_errno(e, "create temporary file for", path))?;
        Ok(PendingFile {
            dir,
            tmp,
            name: name.to_string(),
            path: path.to_string(),
            file: Some(std::fs::File::from(fd)),
        })
    }

    /// Sets owner and mode, syncs, and renames the file into place.
    fn finish(mut self, mode: u32, uid: u32, gid: u32) -> Result<FileMeta, FileError> {
        let Some(file) = self.file.take() else {
            return Err(FileError::Io(format!(
                "{}: push already finished",
                self.path
            )));
        };
        let path = self.path.clone();
        let fail = |e| FileError::from_errno(e, "set attributes of", &path);
        rustix::fs::fchown(
            &file,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(fail)?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & 0o7777)).map_err(fail)?;
        file.sync_all()
            .map_err(|e| FileError::from_io(e, "sync", &self.path))?;
        let st = rustix::fs::fstat(&file).map_err(fail)?;
        rustix::fs::renameat(&self.dir, self.tmp.as_str(), &self.dir, self.name.as_str())
            .map_err(|e| FileError::from_errno(e, "rename into", &self.path))?;
        self.tmp.clear();
        meta_of_stat(&st, &self.path)
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            let _ = rustix::fs::unlinkat(&self.dir, self.tmp.as_str(), AtFlags::empty());
        }
    }
}

/// Creates (or updates the attributes of) a directory.
fn push_directory(
    root: BorrowedFd<'_>,
    path: &str,
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<FileMeta, FileError> {
    let (dir, name) = open_parent(root, path)?;
    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode & 0o7777)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(FileError::from_errno(e, "create directory", path)),
    }
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOTDIR | Errno::LOOP => {
            FileError::AlreadyExists(format!("{path} exists and is not a directory"))
        }
        e => FileError::from_errno(e, "open directory", path),
    })?;
    let fail = |e| FileError::from_errno(e, "set attributes of", path);
    rustix::fs::fchown(
        &fd,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )
    .map_err(fail)?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777)).map_err(fail)?;
    let st = rustix::fs::fstat(&fd).map_err(fail)?;
    meta_of_stat(&st, path)
}

/// Creates a symlink (replacing an existing non-directory entry atomically).
fn push_symlink(
    root: BorrowedFd<'_>,
    path: &str,
    target: &str,
    uid: u32,
    gid: u32,
) -> Result<FileMeta, FileError> {
    if target.is_empty() || target.contains('\0') || target.len() > MAX_PATH_LEN {
        return Err(FileError::InvalidPath(format!(
            "{path}: invalid symlink target"
        )));
    }
    let (dir, name) = open_parent(root, path)?;
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).map_err(|e| FileError::Io(format!("random name: {e}")))?;
    let tmp = format!(".berth-push.{}", hex::encode(rnd));
    rustix::fs::symlinkat(target, &dir, tmp.as_str())
        .map_err(|e| FileError::from_errno(e, "create symlink", path))?;
    let result = (|| {
        rustix::fs::chownat(
            &dir,
            tmp.as_str(),
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| FileError::from_errno(e, "set owner of", path))?;
        if let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
            && FileType::from_raw_mode(st.st_mode) == FileType::Directory
        {
            return Err(FileError::IsADirectory(path.to_string()));
        }
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)
            .map_err(|e| FileError::from_errno(e, "rename into", path))
    })();
    if let Err(e) = result {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        return Err(e);
    }
    let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| FileError::from_errno(e, "stat", path))?;
    let mut meta = meta_of_stat(&st, path)?;
    meta.target = target.to_string();
    Ok(meta)
}

/// What a pull found: metadata, plus the open file for a regular file.
struct Pulled {
    meta: FileMeta,
    file: Option<std::fs::File>,
}

fn pull_blocking(root: BorrowedFd<'_>, path: &str) -> Result<Pulled, FileError> {
    let fail = |e| FileError::from_errno(e, "open", path);
    let handle =
        open_in_root(root, path, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty()).map_err(fail)?;
    let st = rustix::fs::fstat(&handle).map_err(fail)?;
    let mut meta = meta_of_stat(&st, path)?;
    match meta.kind {
        FileKind::Symlink => {
            let target = rustix::fs::readlinkat(&handle, "", Vec::new())
                .map_err(|e| FileError::from_errno(e, "read symlink", path))?;
            meta.target = target.to_string_lossy().into_owned();
            Ok(Pulled { meta, file: None })
        }
        FileKind::Directory => {
            let fd = open_in_root(
                root,
                path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                Mode::empty(),
            )
            .map_err(fail)?;
            if !same_inode(&fd, &handle).map_err(fail)? {
                return Err(FileError::Io(format!("{path}: changed while being read")));
            }
            let mut entries = Vec::new();
            let dir = rustix::fs::Dir::read_from(&fd)
                .map_err(|e| FileError::from_errno(e, "list", path))?;
            for entry in dir {
                let entry = entry.map_err(|e| FileError::from_errno(e, "list", path))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name != "." && name != ".." {
                    entries.push(name);
                }
            }
            entries.sort();
            meta.entries = entries;
            Ok(Pulled { meta, file: None })
        }
        FileKind::File => {
            let fd = open_in_root(
                root,
                path,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK,
                Mode::empty(),
            )
            .map_err(fail)?;
            if !same_inode(&fd, &handle).map_err(fail)? {
                return Err(FileError::Io(format!("{path}: changed while being read")));
            }
            Ok(Pulled {
                meta,
                file: Some(std::fs::File::from(fd)),
            })
        }
    }
}

fn delete_blocking(root: BorrowedFd<'_>, path: &str) -> Result<(), FileError> {
    let (dir, name) = open_parent(root, path)?;
    match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::ISDIR) => rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)
            .map_err(|e| FileError::from_errno(e, "remove directory", path)),
        Err(e) => Err(FileError::from_errno(e, "remove", path)),
    }
}

fn open_stopped_root(rootfs: &Path) -> Result<OwnedFd, FileError> {
    open_root(rootfs)
        .map_err(|e| FileError::Io(format!("open instance root {}: {e}", rootfs.display())))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, FileError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FileError::Io(format!("blocking task failed: {e}")))?
}

/// Pushes a file, directory or symlink to `path` and returns its metadata. A file's content is
/// read from `data` in chunks, written to a temporary file next to the target and renamed over
/// it; mode, uid and gid (container ids) are set before the rename. The parent directory must
/// exist. A directory that already exists gets the given mode and owner. `target` is required
/// for a symlink.
#[allow(clippy::too_many_arguments)]
pub async fn push(
    root: &FileRoot,
    path: &str,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    target: Option<&str>,
    data: impl AsyncRead + Unpin + Send,
) -> Result<FileMeta, FileError> {
    validate_path(path)?;
    split_path(path)?;
    let target = match (kind, target) {
        (FileKind::Symlink, Some(t)) => Some(t.to_string()),
        (FileKind::Symlink, None) => {
            return Err(FileError::InvalidPath(format!(
                "{path}: a symlink needs a target"
            )));
        }
        _ => None,
    };
    match where_is(root) {
        Where::Local(rootfs, shift) => {
            let (disk_uid, disk_gid) = (shift.disk_id(uid)?, shift.disk_id(gid)?);
            let meta =
                push_local(rootfs, path, kind, mode, disk_uid, disk_gid, target, data).await?;
            Ok(shift.meta_from_disk(meta))
        }
        Where::Helper(init_pid, helper_exe) => {
            push_helper(
                init_pid, helper_exe, path, kind, mode, uid, gid, target, data,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn push_local(
    rootfs: PathBuf,
    path: &str,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    target: Option<String>,
    mut data: impl AsyncRead + Unpin + Send,
) -> Result<FileMeta, FileError> {
    let path = path.to_string();
    match kind {
        FileKind::Directory => {
            blocking(move || {
                push_directory(open_stopped_root(&rootfs)?.as_fd(), &path, mode, uid, gid)
            })
            .await
        }
        FileKind::Symlink => {
            let target = target.unwrap_or_default();
            blocking(move || {
                push_symlink(
                    open_stopped_root(&rootfs)?.as_fd(),
                    &path,
                    &target,
                    uid,
                    gid,
                )
            })
            .await
        }
        FileKind::File => {
            let p = path.clone();
            let mut pending =
                blocking(move || PendingFile::create(open_stopped_root(&rootfs)?.as_fd(), &p))
                    .await?;
            let std_file = pending
                .file
                .take()
                .ok_or_else(|| FileError::Io(format!("{path}: no temporary file")))?;
            let mut out = tokio::fs::File::from_std(std_file);
            tokio::io::copy(&mut data, &mut out)
                .await
                .map_err(|e| FileError::from_io(e, "write", &path))?;
            out.flush()
                .await
                .map_err(|e| FileError::from_io(e, "write", &path))?;
            pending.file = Some(out.into_std().await);
            blocking(move || pending.finish(mode, uid, gid)).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn push_helper(
    init_pid: i32,
    helper_exe: &Path,
    path: &str,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    target: Option<String>,
    mut data: impl AsyncRead + Unpin + Send,
) -> Result<FileMeta, FileError> {
    let mut args = vec![
        "push".to_string(),
        "--kind".to_string(),
        kind.as_str().to_string(),
        "--mode".to_string(),
        format!("{:o}", mode & 0o7777),
        "--uid".to_string(),
        uid.to_string(),
        "--gid".to_string(),
        gid.to_string(),
    ];
    if let Some(t) = target {
        args.push("--target".to_string());
        args.push(t);
    }
    let mut child = spawn_helper(helper_exe, init_pid, path, &args)?;
    let stdin = child.stdin.take();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| FileError::Helper("no stdout".to_string()))?;
    let mut reader = BufReader::new(stdout);
    let helper = &mut child;
    let copy = async move {
        let mut stdin = stdin.filter(|_| kind == FileKind::File)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match data.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // The upload broke off: the helper must not see an end of file and
                    // commit a short file, so it dies before its stdin closes.
                    let _ = helper.start_kill();
                    return Some(e);
                }
            };
            // A helper that refuses early stops reading: its reply says why, so a broken
            // pipe here is not the error to report.
            if stdin.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = stdin.shutdown().await;
        None
    };
    let (upload_error, reply) = tokio::join!(copy, read_reply(&mut reader));
    let status = child
        .wait()
        .await
        .map_err(|e| FileError::Helper(format!("wait: {e}")))?;
    if let Some(e) = upload_error {
        return Err(FileError::Io(format!("{path}: the upload failed: {e}")));
    }
    let meta = reply?;
    if !status.success() {
        return Err(FileError::Helper(format!("helper exited with {status}")));
    }
    meta.ok_or_else(|| FileError::Helper("no metadata in reply".to_string()))
}

/// Pulls `path`: its metadata, plus a stream of its bytes when it is a regular file
/// (directories list their entries in `FileMeta::entries`, symlinks give `target`).
pub async fn pull(
    root: &FileRoot,
    path: &str,
) -> Result<(FileMeta, Option<Pin<Box<dyn AsyncRead + Send>>>), FileError> {
    validate_path(path)?;
    let (init_pid, helper_exe) = match where_is(root) {
        Where::Local(rootfs, shift) => {
            let p = path.to_string();
            let pulled =
                blocking(move || pull_blocking(open_stopped_root(&rootfs)?.as_fd(), &p)).await?;
            let meta = shift.meta_from_disk(pulled.meta);
            let stream = pulled.file.map(|f| {
                Box::pin(tokio::fs::File::from_std(f).take(meta.size))
                    as Pin<Box<dyn AsyncRead + Send>>
            });
            return Ok((meta, stream));
        }
        Where::Helper(init_pid, helper_exe) => (init_pid, helper_exe),
    };
    let mut child = spawn_helper(helper_exe, init_pid, path, &["pull".to_string()])?;
    drop(child.stdin.take());
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| FileError::Helper("no stdout".to_string()))?;
    let mut reader = BufReader::new(stdout);
    let meta = match read_reply(&mut reader).await {
        Ok(Some(meta)) => meta,
        Ok(None) => {
            let _ = child.wait().await;
            return Err(FileError::Helper("no metadata in reply".to_string()));
        }
        Err(e) => {
            let _ = child.wait().await;
            return Err(e);
        }
    };
    if meta.kind != FileKind::File {
        let status = child
            .wait()
            .await
            .map_err(|e| FileError::Helper(format!("wait: {e}")))?;
        if !status.success() {
            return Err(FileError::Helper(format!("helper exited with {status}")));
        }
        return Ok((meta, None));
    }
    let stream = HelperStream {
        inner: reader.take(meta.size),
        wait: Some(Box::pin(async move { child.wait().await })),
    };
    Ok((meta, Some(Box::pin(stream))))
}

/// Deletes a file, symlink or empty directory.
pub async fn delete(root: &FileRoot, path: &str) -> Result<(), FileError> {
    validate_path(path)?;
    split_path(path)?;
    let (init_pid, helper_exe) = match where_is(root) {
        Where::Local(rootfs, _) => {
            let p = path.to_string();
            return blocking(move || delete_blocking(open_stopped_root(&rootfs)?.as_fd(), &p))
                .await;
        }
        Where::Helper(init_pid, helper_exe) => (init_pid, helper_exe),
    };
    let mut child = spawn_helper(helper_exe, init_pid, path, &["delete".to_string()])?;
    drop(child.stdin.take());
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| FileError::Helper("no stdout".to_string()))?;
    let mut reader = BufReader::new(stdout);
    let reply = read_reply(&mut reader).await;
    let status = child
        .wait()
        .await
        .map_err(|e| FileError::Helper(format!("wait: {e}")))?;
    reply?;
    if !status.success() {
        return Err(FileError::Helper(format!("helper exited with {status}")));
    }
    Ok(())
}

type WaitFuture =
    Pin<Box<dyn std::future::Future<Output = std::io::Result<std::process::ExitStatus>> + Send>>;

/// A pulled file's bytes from the helper; at the end it checks that the helper succeeded, so
/// a failure half-way surfaces as a read error rather than a silently short file.
struct HelperStream {
    inner: tokio::io::Take<BufReader<tokio::process::ChildStdout>>,
    wait: Option<WaitFuture>,
}

impl AsyncRead for HelperStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before => {}
            other => return other,
        }
        // End of the content: the helper must have exited successfully.
        let Some(wait) = self.wait.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match wait.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(res) => {
                self.wait = None;
                let short = self.inner.limit() > 0;
                match res {
                    Ok(status) if status.success() && !short => Poll::Ready(Ok(())),
                    Ok(status) => Poll::Ready(Err(std::io::Error::other(format!(
                        "file helper ended early ({status})"
                    )))),
                    Err(e) => Poll::Ready(Err(e)),
                }
            }
        }
    }
}

fn spawn_helper(
    helper_exe: &Path,
    init_pid: i32,
    path: &str,
    args: &[String],
) -> Result<tokio::process::Child, FileError> {
    let mut cmd = tokio::process::Command::new(helper_exe);
    cmd.arg("__file").arg(&args[0]);
    if let Some(start) = crate::runtime::proc_start_time(init_pid) {
        cmd.arg("--start").arg(start.to_string());
    }
    cmd.arg("--pid")
        .arg(init_pid.to_string())
        .arg("--path")
        .arg(path)
        .args(&args[1..])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd.spawn()
        .map_err(|e| FileError::Helper(format!("spawn {}: {e}", helper_exe.display())))
}

/// One line of the helper's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct HelperReply {
    /// The error code ([`FileError`] variant) when the operation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The error detail.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Metadata of the file (push and pull).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<FileMeta>,
}

async fn read_reply(
    reader: &mut BufReader<tokio::process::ChildStdout>,
) -> Result<Option<FileMeta>, FileError> {
    let mut line = String::new();
    let mut limited = (&mut *reader).take(1 << 20);
    limited
        .read_line(&mut line)
        .await
        .map_err(|e| FileError::Helper(format!("read reply: {e}")))?;
    if line.is_empty() {
        return Err(FileError::Helper(
            "helper exited without a reply".to_string(),
        ));
    }
    let reply: HelperReply = serde_json::from_str(line.trim_end())
        .map_err(|e| FileError::Helper(format!("bad reply: {e}")))?;
    match reply.error {
        Some(code) => Err(FileError::from_code(&code, reply.detail)),
        None => Ok(reply.meta),
    }
}

/// Entry of the `berth-agent __file` helper. `args` are the arguments after `__file` (a
/// leading program name and `__file` are skipped when present). Returns the exit code.
pub fn helper_main(args: &[String]) -> i32 {
    let args = match args.iter().position(|a| a == "__file") {
        Some(i) if i <= 1 => &args[i + 1..],
        _ => args,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match run_helper(args, &mut out) {
        Ok(()) => 0,
        Err(HelperFailure::Reply(e)) => {
            let reply = HelperReply {
                error: Some(e.code().to_string()),
                detail: e.detail().to_string(),
                meta: None,
            };
            let line = serde_json::to_string(&reply).unwrap_or_default();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            0
        }
        Err(HelperFailure::Stream(msg)) => {
            eprintln!("berth-agent __file: {msg}");
            1
        }
    }
}

enum HelperFailure {
    /// Failed before anything was sent: answer with an error reply.
    Reply(FileError),
    /// Failed while streaming content: the reply was already sent.
    Stream(String),
}

impl From<FileError> for HelperFailure {
    fn from(e: FileError) -> Self {
        HelperFailure::Reply(e)
    }
}

struct HelperArgs {
    op: String,
    pid: i32,
    /// Start time of `pid` when the engine chose it (see the exec helper).
    start: Option<u64>,
    path: String,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    target: Option<String>,
}

fn parse_helper_args(args: &[String]) -> Result<HelperArgs, FileError> {
    let bad = |m: String| FileError::Helper(format!("bad arguments: {m}"));
    let mut it = args.iter();
    let op = it
        .next()
        .ok_or_else(|| bad("missing operation".into()))?
        .clone();
    let mut parsed = HelperArgs {
        op,
        pid: 0,
        start: None,
        path: String::new(),
        kind: FileKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        target: None,
    };
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| bad(format!("{flag} needs a value")))?;
        let num = |v: &str| v.parse::<u32>().map_err(|_| bad(format!("{flag} {v}")));
        match flag.as_str() {
            "--pid" => parsed.pid = value.parse().map_err(|_| bad(format!("--pid {value}")))?,
            "--start" => {
                parsed.start = Some(value.parse().map_err(|_| bad(format!("--start {value}")))?)
            }
            "--path" => parsed.path = value.clone(),
            "--kind" => {
                parsed.kind =
                    FileKind::parse(value).ok_or_else(|| bad(format!("--kind {value}")))?
            }
            "--mode" => {
                parsed.mode =
                    u32::from_str_radix(value, 8).map_err(|_| bad(format!("--mode {value}")))?
            }
            "--uid" => parsed.uid = num(value)?,
            "--gid" => parsed.gid = num(value)?,
            "--target" => parsed.target = Some(value.clone()),
            other => return Err(bad(format!("unknown flag {other}"))),
        }
    }
    if parsed.pid <= 0 {
        return Err(bad("--pid is required".into()));
    }
    validate_path(&parsed.path)?;
    Ok(parsed)
}

fn run_helper(args: &[String], out: &mut impl Write) -> Result<(), HelperFailure> {
    let a = parse_helper_args(args)?;
    let ns =
        NamespaceFds::open(a.pid, FILE_NAMESPACES).map_err(|e| FileError::Helper(e.to_string()))?;
    if a.start.is_some() && crate::runtime::proc_start_time(a.pid) != a.start {
        return Err(FileError::Helper("the instance stopped".to_string()).into());
    }
    ns.join().map_err(|e| FileError::Helper(e.to_string()))?;
    if ns.has_user_namespace() {
        become_namespace_root().map_err(|e| FileError::Helper(e.to_string()))?;
    }
    let root = open_root(Path::new("/"))
        .map_err(|e| FileError::Helper(format!("open instance root: {e}")))?;
    let send = |out: &mut dyn Write, meta: Option<FileMeta>| -> Result<(), HelperFailure> {
        let reply = HelperReply {
            error: None,
            detail: String::new(),
            meta,
        };
        let line = serde_json::to_string(&reply)
            .map_err(|e| HelperFailure::Stream(format!("encode reply: {e}")))?;
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .map_err(|e| HelperFailure::Stream(format!("write reply: {e}")))
    };
    match a.op.as_str() {
        "push" => {
            let meta = match a.kind {
                FileKind::Directory => push_directory(root.as_fd(), &a.path, a.mode, a.uid, a.gid)?,
                FileKind::Symlink => {
                    let target = a.target.as_deref().ok_or_else(|| {
                        FileError::InvalidPath(format!("{}: a symlink needs a target", a.path))
                    })?;
                    push_symlink(root.as_fd(), &a.path, target, a.uid, a.gid)?
                }
                FileKind::File => {
                    let mut pending = PendingFile::create(root.as_fd(), &a.path)?;
                    if let Some(file) = pending.file.as_mut() {
                        copy_chunked(&mut std::io::stdin().lock(), file)
                            .map_err(|e| FileError::from_io(e, "write", &a.path))?;
                    }
                    pending.finish(a.mode, a.uid, a.gid)?
                }
            };
            send(out, Some(meta))
        }
        "pull" => {
            let pulled = pull_blocking(root.as_fd(), &a.path)?;
            send(out, Some(pulled.meta.clone()))?;
            if let Some(file) = pulled.file {
                let copied = copy_chunked(&mut file.take(pulled.meta.size), out)
                    .map_err(|e| HelperFailure::Stream(format!("read {}: {e}", a.path)))?;
                out.flush()
                    .map_err(|e| HelperFailure::Stream(format!("write: {e}")))?;
                if copied != pulled.meta.size {
                    return Err(HelperFailure::Stream(format!(
                        "{} shrank while being read",
                        a.path
                    )));
                }
            }
            Ok(())
        }
        "delete" => {
            delete_blocking(root.as_fd(), &a.path)?;
            send(out, None)
        }
        other => Err(FileError::Helper(format!("unknown operation {other}")).into()),
    }
}

fn copy_chunked(from: &mut impl Read, to: &mut (impl Write + ?Sized)) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_validation() {
        assert!(validate_path("/etc/hostname").is_ok());
        assert!(matches!(validate_path(""), Err(FileError::InvalidPath(_))));
        assert!(matches!(
            validate_path("etc/x"),
            Err(FileError::InvalidPath(_))
        ));
        assert!(matches!(
            validate_path("/a\0b"),
            Err(FileError::InvalidPath(_))
        ));
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert!(matches!(
            validate_path(&long),
            Err(FileError::InvalidPath(_))
        ));
        let max = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
        assert!(validate_path(&max).is_ok());
    }

    #[test]
    fn splitting() {
        assert_eq!(split_path("/a/b").unwrap(), ("/a", "b"));
        assert_eq!(split_path("/a").unwrap(), ("/", "a"));
        assert_eq!(split_path("/a/b/").unwrap(), ("/a", "b"));
        assert_eq!(
            split_path("/../../etc/shadow").unwrap(),
            ("/../../etc", "shadow")
        );
        assert!(split_path("/").is_err());
        assert!(split_path("/a/..").is_err());
        assert!(split_path("/a/.").is_err());
    }

    #[test]
    fn error_codes_round_trip() {
        for e in [
            FileError::InvalidPath("x".into()),
            FileError::NotFound("x".into()),
            FileError::NotADirectory("x".into()),
            FileError::IsADirectory("x".into()),
            FileError::AlreadyExists("x".into()),
            FileError::NotEmpty("x".into()),
            FileError::Escape("x".into()),
            FileError::PermissionDenied("x".into()),
            FileError::Unsupported("x".into()),
            FileError::InvalidId("x".into()),
            FileError::Helper("x".into()),
            FileError::Io("x".into()),
        ] {
            let back = FileError::from_code(e.code(), e.detail().to_string());
            assert_eq!(back.code(), e.code());
        }
    }

    #[test]
    fn id_shift() {
        let none = IdShift { base: 0 };
        assert_eq!((none.disk_id(5).unwrap(), none.container_id(5)), (5, 5));
        let s = IdShift { base: 1_000_000 };
        assert_eq!(s.disk_id(0).unwrap(), 1_000_000);
        assert_eq!(s.disk_id(65535).unwrap(), 1_065_535);
        assert!(matches!(s.disk_id(65536), Err(FileError::InvalidId(_))));
        assert_eq!(s.container_id(1_000_033), 33);
        assert_eq!(s.container_id(0), OVERFLOW_ID);
        assert_eq!(s.container_id(1_065_536), OVERFLOW_ID);
    }

    #[test]
    fn helper_args() {
        let args: Vec<String> = [
            "push", "--pid", "12", "--path", "/x", "--kind", "symlink", "--mode", "755", "--uid",
            "5", "--gid", "6", "--target", "/y",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let a = parse_helper_args(&args).unwrap();
        assert_eq!((a.pid, a.mode, a.uid, a.gid), (12, 0o755, 5, 6));
        assert_eq!(a.kind, FileKind::Symlink);
        assert_eq!(a.target.as_deref(), Some("/y"));
        assert!(parse_helper_args(&["pull".to_string()]).is_err());
    }
}
