//! `berth image ...`: build, import, list, info, show, edit, properties, export, copy between
//! remotes, delete and aliases; and `berth publish`.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use berth_proto::api::{Image, ImageAlias, ImageAliasesPost, ImagePut, ImageSource, ImagesPost};
use bytes::BytesMut;
use clap::{Args, Subcommand};
use http::{HeaderMap, HeaderValue, Method, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::client::{Body, Client, ClientError, encode_query};
use crate::output::{self, Format, human_bytes};
use crate::{Ctx, print, say};

/// Image subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an image from a recipe (busybox, debian/12) on a cluster member
    Build(BuildArgs),
    /// Import an image tarball (unified, or metadata + rootfs)
    Import(ImportArgs),
    /// List images
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show useful information about an image
    Info(OneArg),
    /// Delete images
    #[command(visible_alias = "rm")]
    Delete(ManyArgs),
    /// Show an image's properties as YAML (public, last use, ...)
    Show(OneArg),
    /// Edit an image's properties and public flag as YAML
    Edit(OneArg),
    /// Show one property of an image
    GetProperty {
        /// Image alias or fingerprint, optionally REMOTE:IMAGE
        image: String,
        key: String,
    },
    /// Set a property of an image (os, release, description, ...)
    SetProperty {
        /// Image alias or fingerprint, optionally REMOTE:IMAGE
        image: String,
        key: String,
        value: String,
    },
    /// Remove a property of an image
    UnsetProperty {
        /// Image alias or fingerprint, optionally REMOTE:IMAGE
        image: String,
        key: String,
    },
    /// Write an image as a unified tarball (LXD's format) to a file or a directory
    Export(ExportArgs),
    /// Copy an image to another remote
    #[command(visible_alias = "cp")]
    Copy(CopyArgs),
    /// Manage image aliases
    Alias {
        #[command(subcommand)]
        command: AliasCommand,
    },
}

/// `image export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Image alias or fingerprint, optionally REMOTE:IMAGE
    pub image: String,
    /// A directory (the file is named FINGERPRINT.tar.gz) or a file name; default: the
    /// current directory
    pub target: Option<PathBuf>,
    /// Do not show progress
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// `image copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Image alias or fingerprint, optionally REMOTE:IMAGE
    pub image: String,
    /// The remote to copy to (REMOTE:)
    pub remote: String,
    /// Alias for the copy on the target remote (repeatable)
    #[arg(long = "alias", value_name = "ALIAS")]
    pub aliases: Vec<String>,
    /// Make the copy visible to every project of the target remote
    #[arg(long)]
    pub public: bool,
    /// Do not show progress
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The instance (stopped) or snapshot to publish: [REMOTE:]NAME[/SNAP]
    pub source: String,
    /// The remote to publish to (REMOTE:, the source's), then properties as KEY=VALUE
    #[arg(value_name = "[REMOTE:] [KEY=VALUE]")]
    pub rest: Vec<String>,
    /// Alias for the new image (repeatable)
    #[arg(long = "alias", value_name = "ALIAS")]
    pub aliases: Vec<String>,
    /// Make the image visible to every project
    #[arg(long)]
    pub public: bool,
}

/// `image build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Recipe: busybox or debian/12 (optionally REMOTE:RECIPE)
    pub recipe: String,
    /// Alias for the new image (repeatable; default: the recipe's name)
    #[arg(long = "alias", value_name = "ALIAS")]
    pub aliases: Vec<String>,
    /// Debian mirror to build from
    #[arg(long)]
    pub mirror: Option<String>,
    /// Build on this cluster member only (default: on every online node); not allowed to the
    /// keys of a restricted project
    #[arg(long, value_name = "NODE")]
    pub target: Option<String>,
}

/// `image import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Image tarball (unified), or the metadata tarball when ROOTFS is given
    pub file: PathBuf,
    /// Root filesystem file of a split image
    pub rootfs: Option<PathBuf>,
    /// Alias for the new image (repeatable)
    #[arg(long = "alias", value_name = "ALIAS")]
    pub aliases: Vec<String>,
    /// Remote to import to
    #[arg(long)]
    pub remote: Option<String>,
}

/// `image list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// REMOTE: and/or filters (alias or fingerprint prefix)
    pub filters: Vec<String>,
    /// Format (table, compact, csv, json, yaml)
    #[arg(short = 'f', long, default_value = "table")]
    pub format: Format,
}

/// One image argument.
#[derive(Debug, Args)]
pub struct OneArg {
    /// Image alias or fingerprint, optionally REMOTE:IMAGE
    pub image: String,
}

/// Several image arguments.
#[derive(Debug, Args)]
pub struct ManyArgs {
    /// Image aliases or fingerprints, optionally REMOTE:IMAGE
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// `image alias ...`.
#[derive(Debug, Subcommand)]
pub enum AliasCommand {
    /// Create an alias for an image
    Create {
        /// Alias name, optionally REMOTE:ALIAS
        alias: String,
        /// Fingerprint (or unique prefix) of the image
        fingerprint: String,
        /// Alias description
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete an alias
    #[command(visible_alias = "rm")]
    Delete {
        /// Alias name, optionally REMOTE:ALIAS
        alias: String,
    },
    /// List aliases
    #[command(visible_alias = "ls")]
    List {
        /// REMOTE: to list
        remote: Option<String>,
        /// Format (table, compact, csv, json, yaml)
        #[arg(short = 'f', long, default_value = "table")]
        format: Format,
    },
}

/// An entry of `GET /1.0/images/aliases?recursion=1`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AliasEntry {
    pub name: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub description: String,
}

/// Lists the aliases of a remote.
pub async fn list_aliases(client: &Client) -> Result<Vec<AliasEntry>, ClientError> {
    client.get("/1.0/images/aliases?recursion=1").await
}

/// Resolves an alias or fingerprint prefix to a full fingerprint.
pub async fn resolve_image(client: &Client, image: &str) -> anyhow::Result<String> {
    if let Some(a) = list_aliases(client)
        .await?
        .into_iter()
        .find(|a| a.name == image)
    {
        return Ok(a.target);
    }
    if image.is_empty() || !image.chars().all(|c| c.is_ascii_hexdigit()) {
        anyhow::bail!("image \"{image}\" not found");
    }
    let img: Image = client.get(&format!("/1.0/images/{image}")).await?;
    Ok(img.fingerprint)
}

fn check_aliases(aliases: &[String]) -> anyhow::Result<()> {
    for a in aliases {
        berth_proto::api::names::validate_image_alias(a).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// Runs an image subcommand.
pub async fn run(ctx: &Ctx, command: ImageCommand) -> anyhow::Result<i32> {
    match command {
        ImageCommand::Build(a) => build(ctx, a).await,
        ImageCommand::Import(a) => import(ctx, a).await,
        ImageCommand::List(a) => list(ctx, a).await,
        ImageCommand::Info(a) => info(ctx, a).await,
        ImageCommand::Delete(a) => delete(ctx, a).await,
        ImageCommand::Show(a) => show(ctx, a).await,
        ImageCommand::Edit(a) => edit(ctx, a).await,
        ImageCommand::GetProperty { image, key } => get_property(ctx, &image, &key).await,
        ImageCommand::SetProperty { image, key, value } => {
            change_property(ctx, &image, &key, Some(value)).await
        }
        ImageCommand::UnsetProperty { image, key } => {
            change_property(ctx, &image, &key, None).await
        }
        ImageCommand::Export(a) => export(ctx, a).await,
        ImageCommand::Copy(a) => copy(ctx, a).await,
        ImageCommand::Alias { command } => alias(ctx, command).await,
    }
}

fn fingerprint_of(op: &berth_proto::api::Operation) -> anyhow::Result<String> {
    op.metadata
        .get("fingerprint")
        .and_then(|f| f.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("the server did not say which image it made"))
}

/// The request path of `image build`: `?target=NODE` when a node is named.
pub fn build_path(target: Option<&str>) -> String {
    match target.map(str::trim) {
        Some(t) if !t.is_empty() => {
            format!("/1.0/images?target={}", crate::client::encode_query(t))
        }
        _ => "/1.0/images".to_string(),
    }
}

async fn build(ctx: &Ctx, args: BuildArgs) -> anyhow::Result<i32> {
    let (client, recipe) = ctx.resolve_lenient(&args.recipe)?;
    let aliases = if args.aliases.is_empty() {
        vec![recipe.to_string()]
    } else {
        args.aliases
    };
    check_aliases(&aliases)?;
    let req = ImagesPost {
        source: ImageSource {
            kind: "build".into(),
            recipe: recipe.into(),
            mirror: args.mirror.unwrap_or_default(),
            ..Default::default()
        },
        aliases: aliases
            .into_iter()
            .map(|name| ImageAlias {
                name,
                description: String::new(),
            })
            .collect(),
        ..Default::default()
    };
    let path = build_path(args.target.as_deref());
    say(&format!("Building image {recipe}"));
    let op = client.run(Method::POST, &path, Some(&req)).await?;
    say(&format!(
        "Image built with fingerprint: {}",
        fingerprint_of(&op)?
    ));
    Ok(0)
}

/// Called with the number of bytes sent so far.
pub type Progress = Box<dyn FnMut(u64) + Send>;

/// A body streamed from files in order, read in 1 MiB chunks.
pub fn files_body(paths: Vec<PathBuf>) -> Body {
    files_body_with_progress(paths, None)
}

/// Like [`files_body`], reporting the bytes sent so far to `progress`.
pub fn files_body_with_progress(paths: Vec<PathBuf>, progress: Option<Progress>) -> Body {
    struct State {
        files: std::vec::IntoIter<PathBuf>,
        current: Option<tokio::fs::File>,
        sent: u64,
        progress: Option<Progress>,
    }
    let state = State {
        files: paths.into_iter(),
        current: None,
        sent: 0,
        progress,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.current.is_none() {
                let path = st.files.next()?;
                match tokio::fs::File::open(&path).await {
                    Ok(f) => st.current = Some(f),
                    Err(e) => return Some((Err(e), st)),
                }
            }
            let file = st.current.as_mut()?;
            let mut buf = BytesMut::with_capacity(1 << 20);
            match file.read_buf(&mut buf).await {
                Ok(0) => st.current = None,
                Ok(n) => {
                    st.sent += n as u64;
                    if let Some(p) = st.progress.as_mut() {
                        p(st.sent);
                    }
                    return Some((Ok(Frame::data(buf.freeze())), st));
                }
                Err(e) => return Some((Err(e), st)),
            }
        }
    });
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

/// A progress line on stderr (only when stderr is a terminal), like lxc's transfer progress.
fn terminal_progress(total: u64) -> Option<Progress> {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return None;
    }
    if total == 0 {
        // A stream of unknown length (an export): the bytes so far, redrawn each MiB; the
        // caller clears the line at the end (`clear_progress`).
        let mut last_mib = u64::MAX;
        return Some(Box::new(move |sent: u64| {
            if sent >> 20 != last_mib {
                last_mib = sent >> 20;
                let _ = write!(
                    std::io::stderr(),
                    "\rTransferring image: {}\x1b[K",
                    human_bytes(sent)
                );
            }
        }));
    }
    let mut last_pct = u64::MAX;
    Some(Box::new(move |sent: u64| {
        let pct = sent.saturating_mul(100) / total;
        if pct != last_pct {
            last_pct = pct;
            let _ = write!(
                std::io::stderr(),
                "\rTransferring image: {pct}% ({}/{})\x1b[K",
                human_bytes(sent),
                human_bytes(total)
            );
            if sent >= total {
                let _ = writeln!(std::io::stderr());
            }
        }
    }))
}

/// Clears the progress line of a transfer of unknown length (when one was drawn).
fn clear_progress(shown: bool, total: u64) {
    use std::io::Write;
    if shown && total == 0 {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
}

fn file_len(path: &Path) -> anyhow::Result<u64> {
    let md = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    if !md.is_file() {
        anyhow::bail!("{} is not a regular file", path.display());
    }
    Ok(md.len())
}

async fn import(ctx: &Ctx, args: ImportArgs) -> anyhow::Result<i32> {
    check_aliases(&args.aliases)?;
    let client = ctx.client(args.remote.as_deref())?;
    let meta_len = file_len(&args.file)?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let mut files = vec![args.file.clone()];
    let total = match &args.rootfs {
        Some(rootfs) => {
            let rootfs_len = file_len(rootfs)?;
            headers.insert("X-Berth-Image-Format", HeaderValue::from_static("split"));
            headers.insert("X-Berth-Metadata-Size", HeaderValue::from(meta_len));
            files.push(rootfs.clone());
            meta_len + rootfs_len
        }
        None => {
            headers.insert("X-Berth-Image-Format", HeaderValue::from_static("unified"));
            meta_len
        }
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    if !args.aliases.is_empty() {
        headers.insert(
            "X-Berth-Aliases",
            HeaderValue::from_str(&args.aliases.join(","))?,
        );
    }
    let resp = client
        .envelope(
            Method::POST,
            "/1.0/images",
            headers,
            files_body_with_progress(files, terminal_progress(total)),
        )
        .await?;
    let op = client.finish(resp).await?;
    say(&format!(
        "Image imported with fingerprint: {}",
        fingerprint_of(&op)?
    ));
    Ok(0)
}

fn image_description(i: &Image) -> String {
    i.properties.get("description").cloned().unwrap_or_default()
}

/// The table rows of `image list`.
pub fn image_rows(images: &[Image]) -> Vec<Vec<String>> {
    images
        .iter()
        .map(|i| {
            vec![
                i.aliases
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
                i.fingerprint.chars().take(12).collect(),
                if i.public { "yes" } else { "no" }.into(),
                image_description(i),
                i.architecture.clone(),
                "CONTAINER".into(),
                human_bytes(i.size),
                i.uploaded_at.clone(),
            ]
        })
        .collect()
}

async fn list(ctx: &Ctx, args: ListArgs) -> anyhow::Result<i32> {
    let mut remote = None;
    let mut filters = Vec::new();
    for (n, f) in args.filters.iter().enumerate() {
        match crate::config::split_remote(f) {
            (Some(r), rest) if n == 0 && ctx.config.remotes.contains_key(r) => {
                remote = Some(r);
                if !rest.is_empty() {
                    filters.push(rest.to_string());
                }
            }
            _ => filters.push(f.clone()),
        }
    }
    let client = ctx.client(remote)?;
    let mut images: Vec<Image> = client.get("/1.0/images?recursion=1").await?;
    images.retain(|i| {
        filters.iter().all(|f| {
            i.fingerprint.starts_with(f.as_str()) || i.aliases.iter().any(|a| a.name.contains(f))
        })
    });
    images.sort_by(|a, b| {
        let an = a.aliases.first().map(|x| x.name.as_str()).unwrap_or("");
        let bn = b.aliases.first().map(|x| x.name.as_str()).unwrap_or("");
        (an.is_empty(), an, &a.fingerprint).cmp(&(bn.is_empty(), bn, &b.fingerprint))
    });
    let header = [
        "ALIAS",
        "FINGERPRINT",
        "PUBLIC",
        "DESCRIPTION",
        "ARCHITECTURE",
        "TYPE",
        "SIZE",
        "UPLOAD DATE",
    ];
    print(&output::render(
        args.format,
        &header,
        &image_rows(&images),
        &images,
    )?);
    Ok(0)
}

/// The text of `image info`.
pub fn render_image_info(i: &Image) -> String {
    let mut o = format!(
        "Fingerprint: {}\nSize: {}\nArchitecture: {}\nType: container\nPublic: {}\nTimestamps:\n    Created: {}\n    Uploaded: {}\n    Last used: {}\n",
        i.fingerprint,
        human_bytes(i.size),
        i.architecture,
        if i.public { "yes" } else { "no" },
        i.created_at,
        i.uploaded_at,
        if i.last_used_at.is_empty() {
            "never"
        } else {
            &i.last_used_at
        }
    );
    o.push_str("Properties:\n");
    for (k, v) in &i.properties {
        o.push_str(&format!("    {k}: {v}\n"));
    }
    o.push_str("Aliases:\n");
    for a in &i.aliases {
        if a.description.is_empty() {
            o.push_str(&format!("    - {}\n", a.name));
        } else {
            o.push_str(&format!("    - {} ({})\n", a.name, a.description));
        }
    }
    if !i.locations.is_empty() {
        o.push_str("Locations:\n");
        for l in &i.locations {
            o.push_str(&format!("    - {l}\n"));
        }
    }
    o
}

async fn info(ctx: &Ctx, args: OneArg) -> anyhow::Result<i32> {
    let (client, image) = ctx.resolve_lenient(&args.image)?;
    let fp = resolve_image(&client, image).await?;
    let img: Image = client.get(&format!("/1.0/images/{fp}")).await?;
    print(&render_image_info(&img));
    Ok(0)
}

async fn delete(ctx: &Ctx, args: ManyArgs) -> anyhow::Result<i32> {
    for arg in &args.images {
        let (client, image) = ctx.resolve_lenient(arg)?;
        let fp = resolve_image(&client, image).await?;
        client
            .run::<()>(Method::DELETE, &format!("/1.0/images/{fp}"), None)
            .await?;
    }
    Ok(0)
}

async fn alias(ctx: &Ctx, command: AliasCommand) -> anyhow::Result<i32> {
    match command {
        AliasCommand::Create {
            alias,
            fingerprint,
            description,
        } => {
            let (client, name) = ctx.resolve_lenient(&alias)?;
            check_aliases(&[name.to_string()])?;
            if fingerprint.is_empty() || !fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
                anyhow::bail!("\"{fingerprint}\" is not an image fingerprint");
            }
            let img: Image = client.get(&format!("/1.0/images/{fingerprint}")).await?;
            let req = ImageAliasesPost {
                name: name.into(),
                description,
                target: img.fingerprint,
            };
            client
                .sync(Method::POST, "/1.0/images/aliases", Some(&req))
                .await?;
        }
        AliasCommand::Delete { alias } => {
            let (client, name) = ctx.resolve_lenient(&alias)?;
            check_aliases(&[name.to_string()])?;
            client
                .sync::<()>(
                    Method::DELETE,
                    &format!("/1.0/images/aliases/{}", encode_alias(name)),
                    None,
                )
                .await?;
        }
        AliasCommand::List { remote, format } => {
            let remote = remote.as_deref().map(|r| r.trim_end_matches(':'));
            let client = ctx.client(remote)?;
            let mut aliases = list_aliases(&client).await?;
            aliases.sort_by(|a, b| a.name.cmp(&b.name));
            let rows: Vec<Vec<String>> = aliases
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        a.target.chars().take(12).collect(),
                        a.description.clone(),
                    ]
                })
                .collect();
            print(&output::render(
                format,
                &["ALIAS", "FINGERPRINT", "DESCRIPTION"],
                &rows,
                &aliases,
            )?);
        }
    }
    Ok(0)
}

/// The path of an image.
fn image_path(fp: &str) -> String {
    format!("/1.0/images/{fp}")
}

/// The writable part of an image (what `image edit` shows and `PUT` takes).
pub fn image_put(img: &Image) -> ImagePut {
    ImagePut {
        properties: img.properties.clone(),
        public: img.public,
    }
}

/// Splits publish's trailing arguments: an optional `REMOTE:` first, then `KEY=VALUE`
/// properties.
pub fn publish_rest(rest: &[String]) -> anyhow::Result<(Option<&str>, BTreeMap<String, String>)> {
    let mut remote = None;
    let mut props = BTreeMap::new();
    for (n, arg) in rest.iter().enumerate() {
        if n == 0 && !arg.contains('=') && arg.ends_with(':') {
            remote = super::remote_arg(Some(arg));
            continue;
        }
        if !arg.contains('=') {
            anyhow::bail!(
                "\"{arg}\" is neither a remote (REMOTE:, first) nor a property (KEY=VALUE)"
            );
        }
        let (k, v) = super::parse_key_value(arg)?;
        props.insert(k, v);
    }
    Ok((remote, props))
}

/// The body of `publish`.
pub fn publish_request(
    source: &str,
    aliases: &[String],
    public: bool,
    properties: BTreeMap<String, String>,
) -> ImagesPost {
    let kind = if source.contains('/') {
        "snapshot"
    } else {
        "instance"
    };
    ImagesPost {
        source: ImageSource {
            kind: kind.into(),
            name: source.into(),
            ..Default::default()
        },
        aliases: aliases
            .iter()
            .map(|name| ImageAlias {
                name: name.clone(),
                description: String::new(),
            })
            .collect(),
        public,
        properties,
    }
}

/// `publish`: an image from a stopped instance or a snapshot.
pub async fn publish(ctx: &Ctx, args: PublishArgs) -> anyhow::Result<i32> {
    let (client, source) = ctx.resolve(&args.source)?;
    super::snapshot::split_snapshot(source)?;
    let (remote, properties) = publish_rest(&args.rest)?;
    if let Some(r) = remote {
        let target = ctx.client(Some(r))?;
        if target.name() != client.name() {
            anyhow::bail!(
                "publishing to another remote (\"{}\" to \"{}\") is not supported: publish on \"{}\", then use `berth image copy`",
                client.name(),
                target.name(),
                client.name()
            );
        }
    }
    check_aliases(&args.aliases)?;
    let req = publish_request(source, &args.aliases, args.public, properties);
    let op = client.run(Method::POST, "/1.0/images", Some(&req)).await?;
    say(&format!(
        "Instance published with fingerprint: {}",
        fingerprint_of(&op)?
    ));
    Ok(0)
}

async fn show(ctx: &Ctx, args: OneArg) -> anyhow::Result<i32> {
    let (client, image) = ctx.resolve_lenient(&args.image)?;
    let fp = resolve_image(&client, image).await?;
    let img: Image = client.get(&image_path(&fp)).await?;
    print(&output::yaml(&img)?);
    Ok(0)
}

/// Replaces an image's writable part, guarded by the ETag it was read with.
async fn put_image(
    client: &Client,
    fp: &str,
    put: &ImagePut,
    etag: Option<&str>,
) -> anyhow::Result<()> {
    let what = format!("image {}", fp.chars().take(12).collect::<String>());
    let (resp, _) = client
        .call_with(
            Method::PUT,
            &image_path(fp),
            Some(put),
            crate::client::if_match(etag),
        )
        .await
        .map_err(|e| super::edit::stale(&what, e))?;
    client.finish(resp).await?;
    Ok(())
}

async fn edit(ctx: &Ctx, args: OneArg) -> anyhow::Result<i32> {
    let (client, image) = ctx.resolve_lenient(&args.image)?;
    let fp = resolve_image(&client, image).await?;
    let (img, etag) = client.get_tagged::<Image>(&image_path(&fp)).await?;
    let read_only = [
        "fingerprint",
        "aliases",
        "architecture",
        "size",
        "created_at",
        "uploaded_at",
        "locations",
        "last_used_at",
        "project",
        "type",
        "filename",
    ];
    let put: ImagePut = super::edit::edit_ignoring(&image_put(&img), &read_only)?;
    if put != image_put(&img) {
        put_image(&client, &fp, &put, etag.as_deref()).await?;
    }
    Ok(0)
}

async fn get_property(ctx: &Ctx, image: &str, key: &str) -> anyhow::Result<i32> {
    let (client, image) = ctx.resolve_lenient(image)?;
    let fp = resolve_image(&client, image).await?;
    let img: Image = client.get(&image_path(&fp)).await?;
    // As lxc: an unset property prints an empty line.
    say(img.properties.get(key).map(String::as_str).unwrap_or(""));
    Ok(0)
}

async fn change_property(
    ctx: &Ctx,
    image: &str,
    key: &str,
    value: Option<String>,
) -> anyhow::Result<i32> {
    if key.trim().is_empty() {
        anyhow::bail!("no property name given");
    }
    let (client, image) = ctx.resolve_lenient(image)?;
    let fp = resolve_image(&client, image).await?;
    let (img, etag) = client.get_tagged::<Image>(&image_path(&fp)).await?;
    let mut put = image_put(&img);
    match value {
        Some(v) => {
            put.properties.insert(key.to_string(), v);
        }
        None => {
            if put.properties.remove(key).is_none() {
                anyhow::bail!("image {} has no property \"{key}\"", short_fp(&fp));
            }
        }
    }
    put_image(&client, &fp, &put, etag.as_deref()).await?;
    Ok(0)
}

fn short_fp(fp: &str) -> String {
    fp.chars().take(12).collect()
}

/// Starts `GET /1.0/images/FP/export`; an error answer becomes its sentence.
async fn export_stream(client: &Client, fp: &str) -> anyhow::Result<http::Response<Incoming>> {
    let resp = client
        .raw(
            Method::GET,
            &format!("{}/export", image_path(fp)),
            HeaderMap::new(),
            crate::client::empty_body(),
        )
        .await?;
    let status = resp.status();
    if !status.is_success() {
        let body = client.read_body(resp).await?;
        crate::client::parse_envelope(status, &body)?;
        anyhow::bail!(
            "server answered {status} to the export of image {}",
            short_fp(fp)
        );
    }
    Ok(resp)
}

/// The file name a `Content-Disposition` header gives, if it is a plain name.
pub fn disposition_name(value: &str) -> Option<String> {
    let (_, rest) = value.split_once("filename=")?;
    let name = rest.split(';').next()?.trim().trim_matches('"');
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\\')
        && !name.chars().any(char::is_control);
    plain.then(|| name.to_string())
}

/// Where `image export` writes: into TARGET when it is a directory (or ends with `/`), else
/// TARGET itself; the current directory when none is given.
pub fn export_destination(target: Option<&Path>, file_name: &str) -> PathBuf {
    match target {
        None => PathBuf::from(".").join(file_name),
        Some(t) if t.is_dir() || t.as_os_str().to_string_lossy().ends_with('/') => {
            t.join(file_name)
        }
        Some(t) => t.to_path_buf(),
    }
}

fn content_length(resp: &http::Response<Incoming>) -> Option<u64> {
    resp.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

async fn export(ctx: &Ctx, args: ExportArgs) -> anyhow::Result<i32> {
    use tokio::io::AsyncWriteExt;
    let (client, image) = ctx.resolve_lenient(&args.image)?;
    let fp = resolve_image(&client, image).await?;
    let resp = export_stream(&client, &fp).await?;
    let name = resp
        .headers()
        .get(header::CONTENT_DISPOSITION)
        .and_then(|v| v.to_str().ok())
        .and_then(disposition_name)
        .unwrap_or_else(|| format!("{fp}.tar.gz"));
    let dest = export_destination(args.target.as_deref(), &name);
    let total = content_length(&resp).unwrap_or(0);
    let mut progress = if args.quiet {
        None
    } else {
        terminal_progress(total)
    };
    // Written beside the destination, then renamed: a failed export leaves no half file.
    let mut partial = dest.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let result = async {
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", partial.display()))?;
        let mut body = resp.into_body();
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| anyhow::anyhow!("the export broke off: {e}"))?;
            if let Ok(data) = frame.into_data() {
                file.write_all(&data)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", partial.display()))?;
                written += data.len() as u64;
                if let Some(p) = progress.as_mut() {
                    p(written);
                }
            }
        }
        if total > 0 && written != total {
            anyhow::bail!("the export broke off after {written} of {total} bytes");
        }
        file.sync_all()
            .await
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", partial.display()))?;
        tokio::fs::rename(&partial, &dest).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot rename {} to {}: {e}",
                partial.display(),
                dest.display()
            )
        })?;
        Ok(())
    }
    .await;
    clear_progress(
        !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        total,
    );
    if result.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result?;
    say(&format!(
        "Image exported successfully to {}",
        dest.display()
    ));
    Ok(0)
}

async fn copy(ctx: &Ctx, args: CopyArgs) -> anyhow::Result<i32> {
    check_aliases(&args.aliases)?;
    let (source, image) = ctx.resolve_lenient(&args.image)?;
    let Some(remote) = super::remote_arg(Some(&args.remote)) else {
        anyhow::bail!("no target remote given (REMOTE:)");
    };
    let target = ctx.client(Some(remote))?;
    if target.name() == source.name() {
        anyhow::bail!(
            "the image is already on remote \"{}\": copy it to another remote",
            source.name()
        );
    }
    let fp = resolve_image(&source, image).await?;
    let resp = export_stream(&source, &fp).await?;
    let total = content_length(&resp);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("X-Berth-Image-Format", HeaderValue::from_static("unified"));
    if let Some(n) = total {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    if !args.aliases.is_empty() {
        headers.insert(
            "X-Berth-Aliases",
            HeaderValue::from_str(&args.aliases.join(","))?,
        );
    }
    // Streamed from one remote to the other, a chunk at a time.
    let mut progress = if args.quiet {
        None
    } else {
        terminal_progress(total.unwrap_or(0))
    };
    let mut sent = 0u64;
    let body = resp
        .into_body()
        .map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                sent += d.len() as u64;
                if let Some(p) = progress.as_mut() {
                    p(sent);
                }
            }
            f
        })
        .map_err(std::io::Error::other)
        .boxed_unsync();
    let sent = target
        .envelope(Method::POST, "/1.0/images", headers, body)
        .await;
    clear_progress(
        !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        total.unwrap_or(0),
    );
    let resp = sent?;
    let op = target.finish(resp).await?;
    let new_fp = fingerprint_of(&op)?;
    if args.public {
        let (img, etag) = target.get_tagged::<Image>(&image_path(&new_fp)).await?;
        let mut put = image_put(&img);
        put.public = true;
        put_image(&target, &new_fp, &put, etag.as_deref()).await?;
    }
    say(&format!(
        "Image copied successfully with fingerprint: {new_fp}"
    ));
    Ok(0)
}

/// An alias in a path: kept as-is (with its `/`), only characters unsafe in a URI escaped.
fn encode_alias(name: &str) -> String {
    encode_query(name).replace("%3A", ":")
}

/// Bytes of a small body (for tests of [`files_body`]).
#[cfg(test)]
async fn collect(body: Body) -> bytes::Bytes {
    body.collect().await.unwrap().to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_names_the_target_node() {
        assert_eq!(build_path(None), "/1.0/images");
        assert_eq!(build_path(Some("")), "/1.0/images");
        assert_eq!(build_path(Some("node 2")), "/1.0/images?target=node%202");
    }

    #[tokio::test]
    async fn files_are_streamed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, vec![1u8; 3 << 20]).unwrap();
        std::fs::write(&b, b"tail").unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let progress: Progress = Box::new(move |n| s2.lock().unwrap().push(n));
        let bytes = collect(files_body_with_progress(vec![a, b], Some(progress))).await;
        assert_eq!(bytes.len(), (3 << 20) + 4);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.last(), Some(&((3 << 20) + 4)));
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(&bytes[bytes.len() - 4..], b"tail");
        let missing = dir.path().join("missing");
        assert!(files_body(vec![missing]).collect().await.is_err());
    }

    #[test]
    fn publish_arguments() {
        let rest = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let args = rest(&["prod:", "os=Debian", "release=12"]);
        let (remote, props) = publish_rest(&args).unwrap();
        assert_eq!(remote, Some("prod"));
        assert_eq!(props["os"], "Debian");
        assert_eq!(props["release"], "12");
        let args = rest(&["description=a b"]);
        let (remote, props) = publish_rest(&args).unwrap();
        assert_eq!((remote, props["description"].as_str()), (None, "a b"));
        assert!(publish_rest(&rest(&["os=x", "prod:"])).is_err());
        assert!(publish_rest(&rest(&["=x"])).is_err());
        let req = publish_request("web1/snap0", &["web-img".into()], true, BTreeMap::new());
        assert_eq!(req.source.kind, "snapshot");
        assert_eq!(req.source.name, "web1/snap0");
        assert!(req.public);
        assert_eq!(req.aliases[0].name, "web-img");
        assert_eq!(
            publish_request("web1", &[], false, BTreeMap::new())
                .source
                .kind,
            "instance"
        );
    }

    #[test]
    fn export_names() {
        assert_eq!(
            disposition_name("attachment; filename=abc.tar.gz").as_deref(),
            Some("abc.tar.gz")
        );
        assert_eq!(
            disposition_name("attachment; filename=\"abc.tar.gz\"").as_deref(),
            Some("abc.tar.gz")
        );
        assert_eq!(disposition_name("attachment; filename=../../etc/x"), None);
        assert_eq!(disposition_name("attachment; filename=.hidden"), None);
        assert_eq!(disposition_name("attachment"), None);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            export_destination(Some(dir.path()), "f.tar.gz"),
            dir.path().join("f.tar.gz")
        );
        assert_eq!(
            export_destination(Some(&dir.path().join("out.tar.gz")), "f.tar.gz"),
            dir.path().join("out.tar.gz")
        );
        assert_eq!(
            export_destination(Some(Path::new("newdir/")), "f.tar.gz"),
            Path::new("newdir/f.tar.gz")
        );
        assert_eq!(
            export_destination(None, "f.tar.gz"),
            Path::new("./f.tar.gz")
        );
    }

    #[test]
    fn alias_paths_keep_slashes() {
        assert_eq!(encode_alias("debian/12"), "debian/12");
        assert_eq!(encode_alias("a:b"), "a:b");
    }

    #[test]
    fn image_table() {
        let img = Image {
            fingerprint: "0123456789abcdef".into(),
            aliases: vec![ImageAlias {
                name: "busybox".into(),
                description: String::new(),
            }],
            architecture: "x86_64".into(),
            size: 2 << 20,
            uploaded_at: "2026-11-29T19:00:00Z".into(),
            ..Default::default()
        };
        assert_eq!(
            image_rows(std::slice::from_ref(&img)),
            vec![vec![
                "busybox".to_string(),
                "0123456789ab".into(),
                "no".into(),
                String::new(),
                "x86_64".into(),
                "CONTAINER".into(),
                "2.00MiB".into(),
                "2026-11-29T19:00:00Z".into(),
            ]]
        );
        let info = render_image_info(&img);
        assert!(info.starts_with("Fingerprint: 0123456789abcdef\nSize: 2.00MiB\n"));
        assert!(info.contains("Aliases:\n    - busybox\n"));
    }
}
