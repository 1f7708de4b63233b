//! `berth file push|pull|delete|edit`, with lxc's NAME/PATH arguments. Recursive transfers walk
//! the tree on the client and issue one request per file, directory or symlink; each keeps its
//! mode, its owner (sent when run as root or given with `--uid/--gid`, restored on pull when run
//! as root) and symlinks stay symlinks, both ways.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_proto::api::file_headers;
use clap::{Args, Subcommand};
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;

use super::check_instance_name;
use crate::Ctx;
use crate::client::{Client, ClientError, empty_body, encode_query, full_body, parse_envelope};
use crate::commands::image::files_body;
use crate::commands::instance::instance_path;

/// File subcommands.
#[derive(Debug, Subcommand)]
pub enum FileCommand {
    /// Push files into instances
    Push(PushArgs),
    /// Pull files from instances
    Pull(PullArgs),
    /// Delete files in instances
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    /// Edit a file in an instance with $EDITOR (or replace it with stdin when piped)
    Edit(EditArgs),
}

/// `file push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// Push directories recursively
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Create any directories that are missing
    #[arg(short = 'p', long = "create-dirs")]
    pub create_dirs: bool,
    /// File mode (octal, e.g. 0644) of pushed files
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// Owner UID of pushed files (default: the local owner when run as root, else 0)
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Owner GID of pushed files (default: the local group when run as root, else 0)
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// Local files (directories with -r)
    #[arg(required = true, value_name = "SOURCE")]
    pub sources: Vec<String>,
    /// Target NAME/PATH in the instance (a trailing / makes it a directory)
    #[arg(value_name = "TARGET")]
    pub target: String,
}

/// `file pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Pull directories recursively
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Create any local directories that are missing
    #[arg(short = 'p', long = "create-dirs")]
    pub create_dirs: bool,
    /// Files in instances, NAME/PATH
    #[arg(required = true, value_name = "SOURCE")]
    pub sources: Vec<String>,
    /// Local target: a directory, a file, or - for stdout
    #[arg(value_name = "TARGET")]
    pub target: String,
}

/// `file delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Delete directories with everything in them
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Files to delete, NAME/PATH
    #[arg(required = true)]
    pub paths: Vec<String>,
}

/// `file edit`.
#[derive(Debug, Args)]
pub struct EditArgs {
    /// The file to edit, NAME/PATH
    #[arg(value_name = "FILE")]
    pub path: String,
}

/// An instance path argument: `[REMOTE:]NAME/PATH`.
#[derive(Debug, Clone, PartialEq)]
pub struct InstancePath {
    pub remote: Option<String>,
    pub instance: String,
    /// Absolute, as given (a trailing `/` is kept).
    pub path: String,
}

impl InstancePath {
    /// Whether the path names a directory (ends with `/`).
    pub fn is_dir(&self) -> bool {
        self.path.ends_with('/')
    }
}

/// Parses `[REMOTE:]NAME/PATH`.
pub fn parse_instance_path(arg: &str) -> anyhow::Result<InstancePath> {
    let (remote, rest) = crate::config::split_remote(arg);
    let Some((instance, path)) = rest.split_once('/') else {
        anyhow::bail!("invalid path \"{arg}\": expected INSTANCE/PATH");
    };
    check_instance_name(instance)?;
    Ok(InstancePath {
        remote: remote.map(str::to_string),
        instance: instance.to_string(),
        path: format!("/{path}"),
    })
}

/// Joins an instance directory path and a name.
pub fn join_remote(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The last component of a path (`/a/b/` gives `b`).
pub fn base_name(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("/")
}

/// Parses an octal mode such as `0644` or `755`.
pub fn parse_mode(s: &str) -> anyhow::Result<u32> {
    let t = s.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    match u32::from_str_radix(t, 8) {
        Ok(m) if m <= 0o7777 && !t.is_empty() => Ok(m),
        _ => anyhow::bail!("invalid mode \"{s}\": expected octal such as 0644"),
    }
}

/// Where each push source goes: with several sources or a target ending in `/` the target is
/// a directory and each source keeps its base name.
pub fn push_destinations(sources: &[String], target: &str) -> Vec<(String, String)> {
    let into_dir = sources.len() > 1 || target.ends_with('/');
    sources
        .iter()
        .map(|s| {
            let dest = if into_dir {
                join_remote(target, base_name(s))
            } else {
                target.to_string()
            };
            (s.clone(), dest)
        })
        .collect()
}

/// The local destination of a pulled file or directory.
pub fn pull_destination(source: &str, dest: &Path, many: bool, recursive_dir: bool) -> PathBuf {
    let dest_is_dir = dest.is_dir() || dest.as_os_str().to_string_lossy().ends_with('/');
    if many || dest_is_dir || (recursive_dir && dest.exists()) {
        dest.join(base_name(source))
    } else {
        dest.to_path_buf()
    }
}

/// Runs a file subcommand.
pub async fn run(ctx: &Ctx, command: FileCommand) -> anyhow::Result<i32> {
    match command {
        FileCommand::Push(a) => push(ctx, a).await,
        FileCommand::Pull(a) => pull(ctx, a).await,
        FileCommand::Delete(a) => {
            let targets: Vec<InstancePath> = a
                .paths
                .iter()
                .map(|p| parse_instance_path(p))
                .collect::<anyhow::Result<_>>()?;
            for t in targets {
                let client = ctx.client(t.remote.as_deref())?;
                if a.force {
                    delete_tree(&client, &t.instance, &t.path).await?;
                } else if let Err(e) = delete_one(&client, &t.instance, &t.path).await {
                    if e.to_string().contains("directory not empty") {
                        anyhow::bail!("{e} (use -f to delete it with everything in it)");
                    }
                    return Err(e);
                }
            }
            Ok(0)
        }
        FileCommand::Edit(a) => edit(ctx, a).await,
    }
}

async fn delete_one(client: &Client, instance: &str, path: &str) -> anyhow::Result<()> {
    client
        .sync::<()>(Method::DELETE, &files_url(instance, path), None)
        .await?;
    Ok(())
}

/// Deletes `path` and, when it is a directory, everything below it (children first). Symlinks
/// are deleted, never followed.
async fn delete_tree(client: &Client, instance: &str, path: &str) -> anyhow::Result<()> {
    let mut order = Vec::new();
    let mut stack = vec![path.trim_end_matches('/').to_string()];
    while let Some(p) = stack.pop() {
        let p = if p.is_empty() { "/".to_string() } else { p };
        let resp = get_file(client, instance, &p).await?;
        if kind_of(&resp) == "directory" {
            let status = resp.status();
            let body = client.read_body(resp).await?;
            for name in directory_entries(parse_envelope(status, &body)?.metadata)? {
                if is_plain_name(&name) {
                    stack.push(join_remote(&p, &name));
                }
            }
        }
        order.push(p);
    }
    for p in order.iter().rev() {
        if p == "/" {
            anyhow::bail!("refusing to delete the root directory of {instance}");
        }
        delete_one(client, instance, p).await?;
    }
    Ok(())
}

/// Whether a directory entry is a single path component.
fn is_plain_name(name: &str) -> bool {
    !(name.is_empty() || name == "." || name == ".." || name.contains('/'))
}

/// Whether this process runs as root (owners are then sent on push and restored on pull).
fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn files_url(instance: &str, path: &str) -> String {
    format!(
        "{}/files?path={}",
        instance_path(instance),
        encode_query(path)
    )
}

/// What a push sends with each object: explicit values from the command line, and whether
/// to send each local file's owner when none is given.
#[derive(Debug, Clone, Copy)]
struct Owner {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    keep_local_owner: bool,
}

impl Owner {
    /// The uid and gid sent for a local object with metadata `md`.
    fn ids(&self, md: &std::fs::Metadata) -> (u32, u32) {
        let (local_uid, local_gid) = if self.keep_local_owner {
            (md.uid(), md.gid())
        } else {
            (0, 0)
        };
        (self.uid.unwrap_or(local_uid), self.gid.unwrap_or(local_gid))
    }

    /// The uid and gid of directories the push creates itself (`--create-dirs`).
    fn created_dir_ids(&self) -> (u32, u32) {
        (self.uid.unwrap_or(0), self.gid.unwrap_or(0))
    }
}

fn meta_headers(kind: &str, mode: u32, uid: u32, gid: u32) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        file_headers::TYPE,
        HeaderValue::from_static(static_kind(kind)),
    );
    h.insert(file_headers::UID, HeaderValue::from(uid));
    h.insert(file_headers::GID, HeaderValue::from(gid));
    if let Ok(v) = HeaderValue::from_str(&format!("{:04o}", mode & 0o7777)) {
        h.insert(file_headers::MODE, v);
    }
    h.insert(file_headers::WRITE, HeaderValue::from_static("overwrite"));
    h
}

fn static_kind(kind: &str) -> &'static str {
    match kind {
        "directory" => "directory",
        "symlink" => "symlink",
        _ => "file",
    }
}

async fn push_one(
    client: &Client,
    instance: &str,
    local: &Path,
    remote: &str,
    owner: Owner,
) -> anyhow::Result<()> {
    let md = std::fs::symlink_metadata(local)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", local.display()))?;
    let url = files_url(instance, remote);
    let (uid, gid) = owner.ids(&md);
    if md.file_type().is_symlink() {
        let target = std::fs::read_link(local)
            .map_err(|e| anyhow::anyhow!("cannot read link {}: {e}", local.display()))?;
        let headers = meta_headers("symlink", 0o777, uid, gid);
        let body = full_body(target.as_os_str().as_encoded_bytes().to_vec());
        client.envelope(Method::POST, &url, headers, body).await?;
    } else if md.is_dir() {
        let mode = md.permissions().mode();
        let headers = meta_headers("directory", mode, uid, gid);
        client
            .envelope(Method::POST, &url, headers, empty_body())
            .await?;
    } else if md.is_file() {
        let mode = owner.mode.unwrap_or(md.permissions().mode());
        let mut headers = meta_headers("file", mode, uid, gid);
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(md.len()));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        client
            .envelope(
                Method::POST,
                &url,
                headers,
                files_body(vec![local.to_path_buf()]),
            )
            .await?;
    } else {
        anyhow::bail!("{} is not a file, directory or symlink", local.display());
    }
    Ok(())
}

/// The `X-LXD-type` of an answer (file when absent).
fn kind_of(resp: &http::Response<Incoming>) -> String {
    resp.headers()
        .get(file_headers::TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("file")
        .to_string()
}

/// Creates `path` and its missing parents in the instance (like `mkdir -p`).
async fn mkdir_p(client: &Client, instance: &str, path: &str, owner: Owner) -> anyhow::Result<()> {
    let mut current = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        current.push('/');
        current.push_str(part);
        let resp = client
            .raw(
                Method::GET,
                &files_url(instance, &current),
                HeaderMap::new(),
                empty_body(),
            )
            .await?;
        let status = resp.status();
        if status.is_success() {
            let kind = kind_of(&resp);
            drop(resp);
            if kind != "directory" {
                anyhow::bail!("{current} exists in {instance} and is not a directory");
            }
            continue;
        }
        if status.as_u16() != 404 {
            let body = client.read_body(resp).await?;
            parse_envelope(status, &body)?;
            anyhow::bail!("cannot check {current} in {instance}: server answered {status}");
        }
        drop(resp);
        let (uid, gid) = owner.created_dir_ids();
        let headers = meta_headers("directory", 0o755, uid, gid);
        client
            .envelope(
                Method::POST,
                &files_url(instance, &current),
                headers,
                empty_body(),
            )
            .await?;
    }
    Ok(())
}

fn parent_of(path: &str) -> &str {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((p, _)) => p,
    }
}

async fn push(ctx: &Ctx, args: PushArgs) -> anyhow::Result<i32> {
    let sources = args.sources;
    let target = parse_instance_path(&args.target)?;
    let mode = args.mode.as_deref().map(parse_mode).transpose()?;
    let owner = Owner {
        mode,
        uid: args.uid,
        gid: args.gid,
        keep_local_owner: running_as_root(),
    };
    for s in &sources {
        let md =
            std::fs::symlink_metadata(s).map_err(|e| anyhow::anyhow!("cannot read {s}: {e}"))?;
        if md.is_dir() && !args.recursive {
            anyhow::bail!("{s} is a directory: use --recursive to push it");
        }
    }
    let client = ctx.client(target.remote.as_deref())?;
    let instance = target.instance.as_str();
    if args.recursive {
        // Like lxc: each source lands inside the target directory under its own name.
        if args.create_dirs {
            mkdir_p(&client, instance, &target.path, owner).await?;
        }
        for s in &sources {
            let dest = join_remote(&target.path, base_name(s));
            push_tree(&client, instance, Path::new(s), &dest, owner).await?;
        }
        return Ok(0);
    }
    for (src, dest) in push_destinations(&sources, &target.path) {
        if args.create_dirs {
            mkdir_p(&client, instance, parent_of(&dest), owner).await?;
        }
        push_one(&client, instance, Path::new(&src), &dest, owner).await?;
    }
    Ok(0)
}

async fn push_tree(
    client: &Client,
    instance: &str,
    local: &Path,
    remote: &str,
    owner: Owner,
) -> anyhow::Result<()> {
    // An explicit stack instead of recursion keeps the future small.
    let mut stack = vec![(local.to_path_buf(), remote.to_string())];
    while let Some((local, remote)) = stack.pop() {
        push_one(client, instance, &local, &remote, owner).await?;
        let md = std::fs::symlink_metadata(&local)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", local.display()))?;
        if md.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(&local)
                .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", local.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", local.display()))?;
            entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
            for e in entries {
                let name = e.file_name().to_string_lossy().into_owned();
                stack.push((e.path(), join_remote(&remote, &name)));
            }
        }
    }
    Ok(())
}

/// The entry names of a directory answer: a list of names, or `{"entries": [...]}`.
pub fn directory_entries(metadata: serde_json::Value) -> anyhow::Result<Vec<String>> {
    match metadata {
        serde_json::Value::Array(_) => Ok(serde_json::from_value(metadata)?),
        serde_json::Value::Object(mut o) => match o.remove("entries") {
            Some(v) => Ok(serde_json::from_value(v)?),
            None => anyhow::bail!("the directory listing has no entries"),
        },
        serde_json::Value::Null => Ok(Vec::new()),
        _ => anyhow::bail!("the directory listing is not a list"),
    }
}

fn header_num(resp: &http::Response<Incoming>, name: &str, radix: u32) -> Option<u32> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| u32::from_str_radix(s.trim(), radix).ok())
}

async fn get_file(
    client: &Client,
    instance: &str,
    path: &str,
) -> anyhow::Result<http::Response<Incoming>> {
    let resp = client
        .raw(
            Method::GET,
            &files_url(instance, path),
            HeaderMap::new(),
            empty_body(),
        )
        .await?;
    let status = resp.status();
    if !status.is_success() {
        let body = client.read_body(resp).await?;
        parse_envelope(status, &body)?;
        return Err(ClientError::Api {
            status: status.as_u16(),
            message: format!("server answered {status}"),
        }
        .into());
    }
    Ok(resp)
}

async fn write_body(
    resp: http::Response<Incoming>,
    out: &mut (impl AsyncWriteExt + Unpin),
) -> anyhow::Result<()> {
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow::anyhow!("download failed: {e}"))?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data).await?;
        }
    }
    out.flush().await?;
    Ok(())
}

async fn pull(ctx: &Ctx, args: PullArgs) -> anyhow::Result<i32> {
    let dest = args.target;
    let sources: Vec<InstancePath> = args
        .sources
        .iter()
        .map(|s| parse_instance_path(s))
        .collect::<anyhow::Result<_>>()?;
    let many = sources.len() > 1;
    let dest_path = PathBuf::from(&dest);
    if many && dest != "-" && !dest_path.is_dir() {
        if args.create_dirs {
            std::fs::create_dir_all(&dest_path)
                .map_err(|e| anyhow::anyhow!("cannot create {dest}: {e}"))?;
        } else {
            anyhow::bail!("target {dest} is not a directory");
        }
    }
    for src in sources {
        let client = ctx.client(src.remote.as_deref())?;
        let resp = get_file(&client, &src.instance, &src.path).await?;
        let kind = kind_of(&resp);
        if dest == "-" {
            if kind != "file" {
                anyhow::bail!(
                    "{} is a {kind}; only files can be pulled to stdout",
                    src.path
                );
            }
            write_body(resp, &mut tokio::io::stdout()).await?;
            continue;
        }
        if kind == "directory" && !args.recursive {
            anyhow::bail!("{} is a directory: use --recursive to pull it", src.path);
        }
        let local = pull_destination(&src.path, &dest_path, many, kind == "directory");
        if args.create_dirs
            && let Some(parent) = local.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
        }
        pull_tree(&client, &src.instance, &src.path, &local, resp).await?;
    }
    Ok(0)
}

/// `O_NOFOLLOW`: opening a symlink fails instead of following it.
fn libc_o_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// The metadata a pulled object carries in its headers.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Meta {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
}

impl Meta {
    fn of(resp: &http::Response<Incoming>) -> Meta {
        Meta {
            mode: header_num(resp, file_headers::MODE, 8),
            uid: header_num(resp, file_headers::UID, 10),
            gid: header_num(resp, file_headers::GID, 10),
        }
    }

    /// Gives `path` (not following a symlink) this owner, when run as root and known.
    fn chown(&self, path: &Path, as_root: bool) -> std::io::Result<()> {
        if as_root && (self.uid.is_some() || self.gid.is_some()) {
            std::os::unix::fs::lchown(path, self.uid, self.gid)?;
        }
        Ok(())
    }
}

/// Saves one answer (file, symlink or directory) at `local`, walking directories. Files and
/// symlinks get their owner (when run as root) and mode at once; directories get theirs after
/// everything inside was written, deepest first, so a read-only directory can still be filled.
async fn pull_tree(
    client: &Client,
    instance: &str,
    path: &str,
    local: &Path,
    first: http::Response<Incoming>,
) -> anyhow::Result<()> {
    let as_root = running_as_root();
    let mut directories: Vec<(PathBuf, Meta)> = Vec::new();
    let mut stack = vec![(path.to_string(), local.to_path_buf(), Some(first))];
    while let Some((path, local, resp)) = stack.pop() {
        let resp = match resp {
            Some(r) => r,
            None => get_file(client, instance, &path).await?,
        };
        let kind = kind_of(&resp);
        let meta = Meta::of(&resp);
        let fail = |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", local.display());
        match kind.as_str() {
            "directory" => {
                let status = resp.status();
                let body = client.read_body(resp).await?;
                let entries = directory_entries(parse_envelope(status, &body)?.metadata)?;
                // An existing directory is reused only when it is a real one: never through a
                // symlink the same pull (or the instance) put there.
                match std::fs::create_dir(&local) {
                    Ok(()) => {}
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AlreadyExists
                            && std::fs::symlink_metadata(&local).is_ok_and(|m| m.is_dir()) => {}
                    Err(e) => return Err(fail(e)),
                }
                let mut seen = std::collections::HashSet::new();
                for name in entries.into_iter().rev() {
                    if !is_plain_name(&name) || !seen.insert(name.clone()) {
                        continue;
                    }
                    stack.push((join_remote(&path, &name), local.join(&name), None));
                }
                directories.push((local, meta));
            }
            "symlink" => {
                let body = client.read_body(resp).await?;
                let target = String::from_utf8_lossy(&body).into_owned();
                if std::fs::symlink_metadata(&local).is_ok() {
                    std::fs::remove_file(&local).map_err(fail)?;
                }
                std::os::unix::fs::symlink(target.trim_end_matches('\n'), &local).map_err(fail)?;
                meta.chown(&local, as_root).map_err(fail)?;
            }
            _ => {
                // Never write through a symlink at the destination.
                let mut f = tokio::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(libc_o_nofollow())
                    .open(&local)
                    .await
                    .map_err(fail)?;
                write_body(resp, &mut f).await?;
                // The owner first: chown clears set-id bits the mode may hold.
                meta.chown(&local, as_root).map_err(fail)?;
                if let Some(m) = meta.mode {
                    f.set_permissions(std::fs::Permissions::from_mode(m))
                        .await
                        .map_err(fail)?;
                }
            }
        }
    }
    for (dir, meta) in directories.iter().rev() {
        let fail = |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", dir.display());
        meta.chown(dir, as_root).map_err(fail)?;
        if let Some(m) = meta.mode {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(m)).map_err(fail)?;
        }
    }
    Ok(())
}

/// The file `berth file edit` works on: its content and what to keep when writing it back.
struct Edited {
    content: Vec<u8>,
    meta: Meta,
}

async fn pull_for_edit(client: &Client, target: &InstancePath) -> anyhow::Result<Edited> {
    let resp = get_file(client, &target.instance, &target.path).await?;
    let kind = kind_of(&resp);
    if kind != "file" {
        anyhow::bail!("{} is a {kind}; only files can be edited", target.path);
    }
    let meta = Meta::of(&resp);
    let mut content = Vec::new();
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow::anyhow!("download failed: {e}"))?;
        if let Ok(data) = frame.into_data() {
            content.extend_from_slice(&data);
        }
    }
    Ok(Edited { content, meta })
}

/// The headers that write an edited file back with its mode and owner.
fn edit_headers(meta: Meta, len: usize) -> HeaderMap {
    let mut headers = meta_headers(
        "file",
        meta.mode.unwrap_or(0o644),
        meta.uid.unwrap_or(0),
        meta.gid.unwrap_or(0),
    );
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers
}

/// Runs `$VISUAL`/`$EDITOR` (default vi) on a private copy of `content`; returns the result.
fn run_editor(name: &str, content: &[u8]) -> anyhow::Result<Vec<u8>> {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = std::env::temp_dir().join(format!("berth_file_{}_{safe}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    let result = (|| {
        f.write_all(content)?;
        drop(f);
        let editor = std::env::var("VISUAL")
            .or_else(|_| std::env::var("EDITOR"))
            .unwrap_or_else(|_| "vi".into());
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(&path)
            .status()
            .map_err(|e| anyhow::anyhow!("cannot run the editor {editor}: {e}"))?;
        if !status.success() {
            anyhow::bail!("the editor {editor} failed ({status}); nothing was changed");
        }
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
    })();
    let _ = std::fs::remove_file(&path);
    result
}

async fn edit(ctx: &Ctx, args: EditArgs) -> anyhow::Result<i32> {
    let target = parse_instance_path(&args.path)?;
    if target.is_dir() {
        anyhow::bail!("{} is a directory; only files can be edited", target.path);
    }
    let client = ctx.client(target.remote.as_deref())?;
    let current = pull_for_edit(&client, &target).await?;
    let edited = if std::io::stdin().is_terminal() {
        let name = base_name(&target.path).to_string();
        let content = current.content.clone();
        tokio::task::spawn_blocking(move || run_editor(&name, &content))
            .await
            .map_err(|e| anyhow::anyhow!("the editor task failed: {e}"))??
    } else {
        let mut new = Vec::new();
        std::io::stdin()
            .read_to_end(&mut new)
            .map_err(|e| anyhow::anyhow!("cannot read stdin: {e}"))?;
        new
    };
    if edited == current.content {
        return Ok(0);
    }
    let headers = edit_headers(current.meta, edited.len());
    client
        .envelope(
            Method::POST,
            &files_url(&target.instance, &target.path),
            headers,
            full_body(edited),
        )
        .await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_paths() {
        let p = parse_instance_path("web1/etc/hosts").unwrap();
        assert_eq!(
            (p.instance.as_str(), p.path.as_str()),
            ("web1", "/etc/hosts")
        );
        assert_eq!(p.remote, None);
        let p = parse_instance_path("prod:web1/root/").unwrap();
        assert_eq!(p.remote.as_deref(), Some("prod"));
        assert!(p.is_dir());
        assert_eq!(parse_instance_path("web1/").unwrap().path, "/");
        assert!(parse_instance_path("web1").is_err());
        assert!(parse_instance_path("/etc/hosts").is_err());
        assert!(parse_instance_path("bad_name/x").is_err());
    }

    #[test]
    fn push_targets() {
        let one = vec!["dir/a.txt".to_string()];
        assert_eq!(
            push_destinations(&one, "/root/b.txt"),
            vec![("dir/a.txt".into(), "/root/b.txt".into())]
        );
        assert_eq!(
            push_destinations(&one, "/root/"),
            vec![("dir/a.txt".into(), "/root/a.txt".into())]
        );
        let two = vec!["a".to_string(), "x/b".to_string()];
        assert_eq!(
            push_destinations(&two, "/tmp"),
            vec![
                ("a".into(), "/tmp/a".into()),
                ("x/b".into(), "/tmp/b".into())
            ]
        );
    }

    #[test]
    fn names_and_modes() {
        assert_eq!(base_name("/etc/hosts"), "hosts");
        assert_eq!(base_name("/etc/"), "etc");
        assert_eq!(base_name("/"), "/");
        assert_eq!(join_remote("/", "a"), "/a");
        assert_eq!(join_remote("/etc", "a"), "/etc/a");
        assert_eq!(parent_of("/a/b/c"), "/a/b");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("755").unwrap(), 0o755);
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("17777").is_err());
        let h = meta_headers("file", 0o100644, 0, 0);
        assert_eq!(h[file_headers::MODE], "0644");
        assert_eq!(h[file_headers::TYPE], "file");
    }

    #[test]
    fn pull_targets() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Existing directory: the file keeps its name.
        assert_eq!(
            pull_destination("/etc/hosts", d, false, false),
            d.join("hosts")
        );
        // New file name.
        let f = d.join("copy");
        assert_eq!(pull_destination("/etc/hosts", &f, false, false), f);
        // A new directory for a recursive pull is the copy itself.
        assert_eq!(pull_destination("/etc", &f, false, true), f);
        // Several sources always go inside.
        assert_eq!(
            pull_destination("/etc/hosts", &f, true, false),
            f.join("hosts")
        );
    }

    #[test]
    fn owners_sent_on_push() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let md = std::fs::metadata(&f).unwrap();
        let plain = Owner {
            mode: None,
            uid: None,
            gid: None,
            keep_local_owner: false,
        };
        assert_eq!(plain.ids(&md), (0, 0));
        let local = Owner {
            keep_local_owner: true,
            ..plain
        };
        assert_eq!(local.ids(&md), (md.uid(), md.gid()));
        let given = Owner {
            uid: Some(7),
            ..local
        };
        assert_eq!(given.ids(&md), (7, md.gid()));
        assert_eq!(given.created_dir_ids(), (7, 0));
    }

    #[test]
    fn edits_keep_mode_and_owner() {
        let h = edit_headers(
            Meta {
                mode: Some(0o600),
                uid: Some(1000),
                gid: Some(5),
            },
            3,
        );
        assert_eq!(h[file_headers::MODE], "0600");
        assert_eq!(h[file_headers::UID], "1000");
        assert_eq!(h[file_headers::GID], "5");
        assert_eq!(h[http::header::CONTENT_LENGTH], "3");
        assert!(is_plain_name("a.b"));
        for bad in ["", ".", "..", "a/b"] {
            assert!(!is_plain_name(bad), "{bad}");
        }
    }

    #[test]
    fn listings() {
        assert_eq!(
            directory_entries(serde_json::json!(["a", "b"])).unwrap(),
            ["a", "b"]
        );
        assert_eq!(
            directory_entries(serde_json::json!({"entries": ["c"]})).unwrap(),
            ["c"]
        );
        assert!(directory_entries(serde_json::json!(3)).is_err());
    }
}
