//! Instance commands: launch, init, list, info, start, stop, restart, delete, console.

use berth_proto::api::{Instance, InstanceSource, InstanceState, InstanceStatePut, InstancesPost};
use clap::Args;
use http::Method;

use super::{check_instance_name, parse_config_pairs};
use crate::client::{Client, ClientError, empty_body, parse_envelope};
use crate::config::split_remote;
use crate::output::{self, Format, human_bytes};
use crate::{Ctx, print, say};

/// `launch` / `init`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image alias or fingerprint (e.g. debian/12, busybox)
    pub image: String,
    /// Instance name, optionally REMOTE:NAME
    pub name: String,
    /// Config key/value to apply to the new instance (KEY=VALUE, repeatable)
    #[arg(short = 'c', long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    /// Profile to apply to the new instance (repeatable, in order; default: "default")
    #[arg(short = 'p', long = "profile", value_name = "PROFILE")]
    pub profiles: Vec<String>,
    /// Create the instance without any profile
    #[arg(long, conflicts_with = "profiles")]
    pub no_profiles: bool,
    /// Cluster member to place the instance on
    #[arg(long, value_name = "NODE")]
    pub target: Option<String>,
    /// Instance description
    #[arg(long, default_value = "")]
    pub description: String,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Filters: REMOTE:, a name prefix, or KEY=VALUE (status=running, location=node1, limits.cpu=2)
    pub filters: Vec<String>,
    /// Format (table, compact, csv, json, yaml)
    #[arg(short = 'f', long, default_value = "table")]
    pub format: Format,
    /// Columns: n name, s state, 4 IPv4, 6 IPv6, t type, S snapshots, L location, l last used,
    /// c created, d description, a architecture, p PID, N processes, m memory, u CPU time,
    /// P profiles, f base image, e project; or a comma list that may include config keys
    #[arg(short = 'c', long, default_value = "ns4tS")]
    pub columns: String,
    /// Instances of every project (with a PROJECT column first)
    #[arg(long)]
    pub all_projects: bool,
    /// A server-side filter such as 'status eq running and not name eq web1' (see
    /// docs/filtering.md); combines with the other filters
    #[arg(long, value_name = "EXPR", allow_hyphen_values = true)]
    pub filter: Option<String>,
}

/// `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Instance name, optionally REMOTE:NAME
    pub name: String,
    /// Also show the instance's console log
    #[arg(long)]
    pub show_log: bool,
}

/// `start`.
#[derive(Debug, Args)]
pub struct NamesArgs {
    /// Instance names, optionally REMOTE:NAME
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `stop` / `restart`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Instance names, optionally REMOTE:NAME
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Force the instance to stop (kill it)
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Seconds to wait for a clean shutdown before killing
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<i64>,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Instances or snapshots: [REMOTE:]NAME or NAME/SNAP
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Stop running instances first
    #[arg(short = 'f', long)]
    pub force: bool,
}

/// `console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Instance name, optionally REMOTE:NAME
    pub name: String,
    /// Show the console log (attaching to the console is not supported yet)
    #[arg(long)]
    pub show_log: bool,
}

/// The path of an instance.
pub fn instance_path(name: &str) -> String {
    format!("/1.0/instances/{name}")
}

fn instance_arg<'a>(ctx: &Ctx, arg: &'a str) -> anyhow::Result<(Client, &'a str)> {
    let (client, name) = ctx.resolve(arg)?;
    check_instance_name(name)?;
    Ok((client, name))
}

/// Finds the image source for `image`: an alias if one has that name, else a fingerprint.
async fn image_source(client: &Client, image: &str) -> anyhow::Result<InstanceSource> {
    let aliases = super::image::list_aliases(client).await?;
    if aliases.iter().any(|a| a.name == image) {
        return Ok(InstanceSource {
            kind: "image".into(),
            alias: image.into(),
            fingerprint: String::new(),
            ..Default::default()
        });
    }
    Ok(InstanceSource {
        kind: "image".into(),
        alias: String::new(),
        fingerprint: image.into(),
        ..Default::default()
    })
}

/// `launch` (start = true) and `init`.
pub async fn create(ctx: &Ctx, args: CreateArgs, start: bool) -> anyhow::Result<i32> {
    let (client, name) = instance_arg(ctx, &args.name)?;
    let config = parse_config_pairs(&args.config)?;
    for p in &args.profiles {
        super::check_name(berth_proto::api::names::validate_profile_name, p)?;
    }
    let image = match split_remote(&args.image) {
        (Some(r), rest) if ctx.config.remotes.contains_key(r) => {
            if Some(r) != split_remote(&args.name).0 {
                anyhow::bail!("images from another remote (\"{r}\") are not supported yet");
            }
            rest
        }
        _ => args.image.as_str(),
    };
    if image.is_empty() {
        anyhow::bail!("no image given");
    }
    let source = image_source(&client, image).await?;
    let target = args.target.unwrap_or_default();
    let path = if target.is_empty() {
        "/1.0/instances".to_string()
    } else {
        format!(
            "/1.0/instances?target={}",
            crate::client::encode_query(&target)
        )
    };
    let req = InstancesPost {
        name: name.to_string(),
        description: args.description,
        source,
        config,
        profiles: args.profiles,
        start,
        target,
        kind: "container".into(),
    };
    let body = create_body(&req, args.no_profiles)?;
    say(&format!("Creating {name}"));
    let resp = client.call(Method::POST, &path, Some(&body)).await?;
    if start {
        say(&format!("Starting {name}"));
    }
    client.finish(resp).await?;
    Ok(0)
}

/// The JSON of a create: without `profiles` when none is named (the server then applies the
/// `default` profile), with `"profiles": []` for `--no-profiles`.
pub fn create_body(req: &InstancesPost, no_profiles: bool) -> anyhow::Result<serde_json::Value> {
    let mut body = serde_json::to_value(req)?;
    if req.profiles.is_empty()
        && !no_profiles
        && let Some(map) = body.as_object_mut()
    {
        map.remove("profiles");
    }
    Ok(body)
}

/// Addresses of one family ("inet" or "inet6"), global scope, as `addr (iface)` lines.
pub fn addresses(state: Option<&InstanceState>, family: &str) -> String {
    let Some(state) = state else {
        return String::new();
    };
    let mut out = Vec::new();
    for (iface, net) in &state.network {
        if iface == "lo" {
            continue;
        }
        for a in &net.addresses {
            if a.family == family && a.scope != "link" && a.scope != "local" {
                out.push(format!("{} ({iface})", a.address));
            }
        }
    }
    out.join("\n")
}

fn short(fp: &str) -> String {
    fp.chars().take(12).collect()
}

/// One column of `berth list`.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    Name,
    State,
    Ipv4,
    Ipv6,
    Type,
    Snapshots,
    Location,
    LastUsed,
    Created,
    Description,
    Architecture,
    Pid,
    Processes,
    Memory,
    Cpu,
    Profiles,
    BaseImage,
    /// The instance's project (`e`; added first by `--all-projects`).
    Project,
    /// A config key (`user.role`, `limits.cpu`).
    Config(String),
}

impl Column {
    fn from_char(c: char) -> Option<Column> {
        Some(match c {
            'n' => Column::Name,
            's' => Column::State,
            '4' => Column::Ipv4,
            '6' => Column::Ipv6,
            't' => Column::Type,
            'S' => Column::Snapshots,
            'L' => Column::Location,
            'l' => Column::LastUsed,
            'c' => Column::Created,
            'd' => Column::Description,
            'a' => Column::Architecture,
            'p' => Column::Pid,
            'N' => Column::Processes,
            'm' => Column::Memory,
            'u' => Column::Cpu,
            'P' => Column::Profiles,
            'f' => Column::BaseImage,
            'e' => Column::Project,
            _ => return None,
        })
    }

    /// The column's header.
    pub fn header(&self) -> String {
        match self {
            Column::Name => "NAME".into(),
            Column::State => "STATE".into(),
            Column::Ipv4 => "IPV4".into(),
            Column::Ipv6 => "IPV6".into(),
            Column::Type => "TYPE".into(),
            Column::Snapshots => "SNAPSHOTS".into(),
            Column::Location => "LOCATION".into(),
            Column::LastUsed => "LAST USED AT".into(),
            Column::Created => "CREATED AT".into(),
            Column::Description => "DESCRIPTION".into(),
            Column::Architecture => "ARCHITECTURE".into(),
            Column::Pid => "PID".into(),
            Column::Processes => "PROCESSES".into(),
            Column::Memory => "MEMORY USAGE".into(),
            Column::Cpu => "CPU USAGE".into(),
            Column::Profiles => "PROFILES".into(),
            Column::BaseImage => "BASE IMAGE".into(),
            Column::Project => "PROJECT".into(),
            Column::Config(k) => k.to_uppercase(),
        }
    }

    /// The column's cell for one instance.
    pub fn cell(&self, i: &Instance) -> String {
        let running = i.status_code == 103 || i.status.eq_ignore_ascii_case("running");
        let st = i.state.as_ref();
        match self {
            Column::Name => i.name.clone(),
            Column::State => i.status.to_uppercase(),
            Column::Ipv4 => addresses(st, "inet"),
            Column::Ipv6 => addresses(st, "inet6"),
            Column::Type => {
                let t = if i.kind.is_empty() {
                    "CONTAINER".to_string()
                } else {
                    i.kind.to_uppercase()
                };
                if i.ephemeral {
                    format!("{t} (EPHEMERAL)")
                } else {
                    t
                }
            }
            Column::Snapshots => i.snapshots.len().to_string(),
            Column::Location => i.location.clone(),
            Column::LastUsed => i.last_used_at.clone(),
            Column::Created => i.created_at.clone(),
            Column::Description => i.description.clone(),
            Column::Architecture => i.architecture.clone(),
            Column::Pid => match st {
                Some(s) if running && s.pid > 0 => s.pid.to_string(),
                _ => String::new(),
            },
            Column::Processes => match st {
                Some(s) if running => s.processes.to_string(),
                _ => String::new(),
            },
            Column::Memory => match st {
                Some(s) if running => human_bytes(s.memory.usage),
                _ => String::new(),
            },
            Column::Cpu => match st {
                Some(s) if running => format!("{}s", s.cpu.usage / 1_000_000_000),
                _ => String::new(),
            },
            Column::Profiles => i.profiles.join("\n"),
            Column::BaseImage => short(&i.image),
            Column::Project => i.project.clone(),
            Column::Config(k) => i.config.get(k).cloned().unwrap_or_default(),
        }
    }
}

/// Parses `-c`: single-letter codes ("ns4tS"), or a comma list of codes and config keys.
pub fn parse_columns(spec: &str) -> anyhow::Result<Vec<Column>> {
    let mut cols = Vec::new();
    let bad = |c: &str| anyhow::anyhow!("unknown column \"{c}\"");
    if spec.contains(',') || spec.contains('.') {
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut chars = part.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => cols.push(Column::from_char(c).ok_or_else(|| bad(part))?),
                _ => {
                    let key = part.strip_prefix("config:").unwrap_or(part);
                    if !key.contains('.') {
                        return Err(bad(part));
                    }
                    cols.push(Column::Config(key.to_string()));
                }
            }
        }
    } else {
        for c in spec.chars() {
            cols.push(Column::from_char(c).ok_or_else(|| bad(&c.to_string()))?);
        }
    }
    if cols.is_empty() {
        anyhow::bail!("no columns given");
    }
    Ok(cols)
}

/// Whether an instance passes every filter: a name prefix or KEY=VALUE.
pub fn matches_filters(i: &Instance, filters: &[String]) -> bool {
    filters.iter().all(|f| match f.split_once('=') {
        None => i.name.starts_with(f.as_str()),
        Some((k, v)) => match k {
            "name" | "n" => i.name == v,
            "status" | "state" | "s" => i.status.eq_ignore_ascii_case(v),
            "location" | "L" => i.location == v,
            "type" | "t" => i.kind.eq_ignore_ascii_case(v),
            "architecture" | "a" => i.architecture == v,
            "project" | "e" => i.project == v,
            key => i.config.get(key).map(String::as_str) == Some(v),
        },
    })
}

/// Whether a listing in `format` with `columns` needs no usage figure from the nodes (pid,
/// processes, memory, CPU): a table or CSV of such columns can take the status and address
/// the cluster recorded. JSON and YAML show whole objects, so they ask for everything.
pub fn recorded_state_suffices(columns: &[Column], format: Format) -> bool {
    matches!(format, Format::Table | Format::Csv | Format::Compact)
        && !columns.iter().any(|c| {
            matches!(
                c,
                Column::Pid | Column::Processes | Column::Memory | Column::Cpu
            )
        })
}

/// The server-side filter for `--filter` and the KEY=VALUE filters the server matches the
/// same way (name, status, location, type, architecture, project), so that the server sends
/// only what is listed; the client still applies every filter.
pub fn server_filter(filter: Option<&str>, filters: &[String]) -> Option<String> {
    let given = filter.map(str::trim).filter(|f| !f.is_empty());
    let mut parts: Vec<String> = Vec::new();
    for f in filters {
        let Some((k, v)) = f.split_once('=') else {
            continue;
        };
        let field = match k {
            "name" | "n" => "name",
            "status" | "state" | "s" => "status",
            "location" | "L" => "location",
            "type" | "t" => continue, // the client ignores case here; the server does not
            "architecture" | "a" => "architecture",
            "project" | "e" => "project",
            _ => continue,
        };
        let quoted = v.replace('\\', "\\\\").replace('"', "\\\"");
        parts.push(format!("{field} eq \"{quoted}\""));
    }
    match (given, parts.is_empty()) {
        (None, true) => None,
        // Alone, the filter goes as it was given.
        (Some(f), true) => Some(f.to_string()),
        (None, false) => Some(parts.join(" and ")),
        (Some(f), false) => Some(format!("({f}) and {}", parts.join(" and "))),
    }
}

/// Renders instances in `format` with `columns`.
pub fn render_list(
    instances: &[Instance],
    columns: &[Column],
    format: Format,
) -> anyhow::Result<String> {
    let headers: Vec<String> = columns.iter().map(Column::header).collect();
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|i| columns.iter().map(|c| c.cell(i)).collect())
        .collect();
    output::render(format, &header_refs, &rows, instances)
}

/// `list`.
pub async fn list(ctx: &Ctx, args: ListArgs) -> anyhow::Result<i32> {
    let columns = parse_columns(&args.columns)?;
    let mut remote = None;
    let mut filters = Vec::new();
    for (n, f) in args.filters.iter().enumerate() {
        match split_remote(f) {
            (Some(r), rest) if n == 0 && !f.contains('=') => {
                remote = Some(r);
                if !rest.is_empty() {
                    filters.push(rest.to_string());
                }
            }
            _ => filters.push(f.clone()),
        }
    }
    let client = ctx.client(remote)?;
    let mut columns = columns;
    let base = if args.all_projects {
        if !columns.contains(&Column::Project) {
            columns.insert(0, Column::Project);
        }
        "/1.0/instances?recursion=2&all-projects=true"
    } else {
        "/1.0/instances?recursion=2"
    };
    let mut path = super::with_filter(
        base,
        server_filter(args.filter.as_deref(), &filters).as_deref(),
    );
    if recorded_state_suffices(&columns, args.format) {
        // The controller answers status and address from its records, without asking the
        // nodes for every instance's usage figures.
        path.push_str("&fields=state.network,state.status");
    }
    let mut instances: Vec<Instance> = client.get(&path).await?;
    instances.retain(|i| matches_filters(i, &filters));
    instances.sort_by(|a, b| a.project.cmp(&b.project).then(a.name.cmp(&b.name)));
    print(&render_list(&instances, &columns, args.format)?);
    Ok(0)
}

/// The text of `berth info`.
pub fn render_info(i: &Instance, state: Option<&InstanceState>) -> String {
    let mut o = String::new();
    let mut line = |s: String| {
        o.push_str(&s);
        o.push('\n');
    };
    line(format!("Name: {}", i.name));
    if !i.description.is_empty() {
        line(format!("Description: {}", i.description));
    }
    // The status as the server spells it ("Running"): scripts grep for it.
    line(format!("Status: {}", i.status));
    line(format!(
        "Type: {}{}",
        if i.kind.is_empty() {
            "container"
        } else {
            &i.kind
        },
        if i.ephemeral { " (ephemeral)" } else { "" }
    ));
    line(format!("Architecture: {}", i.architecture));
    line(format!("Location: {}", i.location));
    if !i.project.is_empty() {
        line(format!("Project: {}", i.project));
    }
    line(format!("Profiles: {}", i.profiles.join(", ")));
    if let Some(s) = state
        && s.pid > 0
    {
        line(format!("PID: {}", s.pid));
    }
    line(format!("Created: {}", i.created_at));
    line(format!("Last Used: {}", i.last_used_at));
    line(format!("Image: {}", i.image));
    if let Some(s) = state {
        let running = s.status_code == 103 || s.status.eq_ignore_ascii_case("running");
        if running {
            line(String::new());
            line("Resources:".into());
            line(format!("  Processes: {}", s.processes));
            line("  CPU usage:".into());
            line(format!(
                "    CPU usage (in seconds): {}",
                s.cpu.usage / 1_000_000_000
            ));
            line("  Memory usage:".into());
            line(format!(
                "    Memory (current): {}",
                human_bytes(s.memory.usage)
            ));
            if s.memory.usage_peak > 0 {
                line(format!(
                    "    Memory (peak): {}",
                    human_bytes(s.memory.usage_peak)
                ));
            }
            if s.memory.total > 0 {
                line(format!(
                    "    Memory (limit): {}",
                    human_bytes(s.memory.total)
                ));
            }
            if !s.disk.is_empty() {
                // LXD's wording: "Disk usage:" then one line per device.
                line("  Disk usage:".into());
                for (dev, d) in &s.disk {
                    if d.total > 0 {
                        line(format!(
                            "    {dev}: {} (limit {})",
                            human_bytes(d.usage),
                            human_bytes(d.total)
                        ));
                    } else {
                        line(format!("    {dev}: {}", human_bytes(d.usage)));
                    }
                }
            }
            if !s.limits.is_empty() {
                line("  Limits:".into());
                for (k, v) in &s.limits {
                    line(format!("    {k}: {v}"));
                }
            }
            let ifaces: Vec<_> = s.network.iter().filter(|(n, _)| *n != "lo").collect();
            if !ifaces.is_empty() {
                line("  Network usage:".into());
                for (name, net) in ifaces {
                    line(format!("    {name}:"));
                    if !net.kind.is_empty() {
                        line(format!("      Type: {}", net.kind));
                    }
                    if !net.state.is_empty() {
                        line(format!("      State: {}", net.state.to_uppercase()));
                    }
                    if !net.host_name.is_empty() {
                        line(format!("      Host interface: {}", net.host_name));
                    }
                    if !net.hwaddr.is_empty() {
                        line(format!("      MAC address: {}", net.hwaddr));
                    }
                    if !net.addresses.is_empty() {
                        line("      IP addresses:".into());
                        for a in &net.addresses {
                            line(format!(
                                "        {}:  {}/{} ({})",
                                a.family, a.address, a.netmask, a.scope
                            ));
                        }
                    }
                }
            }
        }
    }
    o
}

/// Fetches the console log text of an instance.
async fn console_log(client: &Client, name: &str) -> anyhow::Result<String> {
    let resp = client
        .raw(
            Method::GET,
            &format!("{}/console", instance_path(name)),
            http::HeaderMap::new(),
            empty_body(),
        )
        .await?;
    let status = resp.status();
    let body = client.read_body(resp).await?;
    if !status.is_success() {
        parse_envelope(status, &body)?;
        anyhow::bail!("server answered {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `info`.
pub async fn info(ctx: &Ctx, args: InfoArgs) -> anyhow::Result<i32> {
    let (client, name) = instance_arg(ctx, &args.name)?;
    let inst: Instance = client.get(&instance_path(name)).await?;
    let state: Option<InstanceState> =
        match client.get(&format!("{}/state", instance_path(name))).await {
            Ok(s) => Some(s),
            Err(ClientError::Api { status: 404, .. }) => None,
            Err(e) => return Err(e.into()),
        };
    let mut text = render_info(&inst, state.as_ref());
    if !inst.snapshots.is_empty() {
        // The list endpoint has the sizes; the instance's own list is the fallback.
        let snaps = match super::snapshot::list_snapshots(&client, name).await {
            Ok(s) => s,
            Err(_) => inst.snapshots.clone(),
        };
        text.push_str(&super::snapshot::render_snapshots(&snaps)?);
    }
    if args.show_log {
        text.push_str("\nLog:\n\n");
        text.push_str(&console_log(&client, name).await?);
        if !text.ends_with('\n') {
            text.push('\n');
        }
    }
    print(&text);
    Ok(0)
}

/// Runs `f` for each name; with several names, failures are reported one by one and the
/// exit code is 1 if any failed.
async fn for_each<F, Fut>(names: &[String], mut f: F) -> anyhow::Result<i32>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    if let [one] = names {
        f(one.clone()).await?;
        return Ok(0);
    }
    let mut code = 0;
    for name in names {
        if let Err(e) = f(name.clone()).await {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("Error: {name}: {e}\n").as_bytes(),
            );
            code = 1;
        }
    }
    Ok(code)
}

async fn change_state(
    client: &Client,
    name: &str,
    action: &str,
    force: bool,
    timeout: i64,
) -> anyhow::Result<()> {
    let body = InstanceStatePut {
        action: action.into(),
        timeout,
        force,
        stateful: false,
    };
    client
        .run(
            Method::PUT,
            &format!("{}/state", instance_path(name)),
            Some(&body),
        )
        .await?;
    Ok(())
}

/// `start`.
pub async fn start(ctx: &Ctx, args: NamesArgs) -> anyhow::Result<i32> {
    for n in &args.names {
        instance_arg(ctx, n)?;
    }
    for_each(&args.names, |arg| async move {
        let (client, name) = instance_arg(ctx, &arg)?;
        change_state(&client, name, "start", false, 0).await
    })
    .await
}

/// `stop` and `restart`.
pub async fn stop(ctx: &Ctx, args: StopArgs, action: &str) -> anyhow::Result<i32> {
    for n in &args.names {
        instance_arg(ctx, n)?;
    }
    let timeout = args.timeout.unwrap_or(-1);
    let force = args.force;
    for_each(&args.names, |arg| async move {
        let (client, name) = instance_arg(ctx, &arg)?;
        change_state(&client, name, action, force, timeout).await
    })
    .await
}

/// `delete`: instances and snapshots (`NAME/SNAP`), mixed.
pub async fn delete(ctx: &Ctx, args: DeleteArgs) -> anyhow::Result<i32> {
    for n in &args.names {
        let (_, rest) = ctx.resolve(n)?;
        super::snapshot::split_snapshot(rest)?;
    }
    let force = args.force;
    for_each(&args.names, |arg| async move {
        let (client, rest) = ctx.resolve(&arg)?;
        let (name, snap) = super::snapshot::split_snapshot(rest)?;
        if let Some(snap) = snap {
            return super::snapshot::delete_snapshot(&client, name, snap).await;
        }
        if force {
            let inst: Instance = client.get(&instance_path(name)).await?;
            if !inst.status.eq_ignore_ascii_case("stopped") {
                change_state(&client, name, "stop", true, -1).await?;
            }
        }
        client
            .run::<()>(Method::DELETE, &instance_path(name), None)
            .await?;
        Ok(())
    })
    .await
}

/// `console`.
pub async fn console(ctx: &Ctx, args: ConsoleArgs) -> anyhow::Result<i32> {
    if !args.show_log {
        anyhow::bail!("attaching to the console is not supported yet; use --show-log");
    }
    let (client, name) = instance_arg(ctx, &args.name)?;
    print(&console_log(&client, name).await?);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::api::{InstanceStateNetwork, InstanceStateNetworkAddress};
    use std::collections::BTreeMap;

    pub(crate) fn fixture() -> Vec<Instance> {
        let mut network = BTreeMap::new();
        network.insert(
            "eth0".to_string(),
            InstanceStateNetwork {
                addresses: vec![
                    InstanceStateNetworkAddress {
                        family: "inet".into(),
                        address: "10.87.0.5".into(),
                        netmask: "24".into(),
                        scope: "global".into(),
                    },
                    InstanceStateNetworkAddress {
                        family: "inet6".into(),
                        address: "fe80::1".into(),
                        netmask: "64".into(),
                        scope: "link".into(),
                    },
                ],
                ..Default::default()
            },
        );
        network.insert(
            "lo".to_string(),
            InstanceStateNetwork {
                addresses: vec![InstanceStateNetworkAddress {
                    family: "inet".into(),
                    address: "127.0.0.1".into(),
                    netmask: "8".into(),
                    scope: "local".into(),
                }],
                ..Default::default()
            },
        );
        let web = Instance {
            name: "web1".into(),
            status: "Running".into(),
            status_code: 103,
            location: "node1".into(),
            kind: "container".into(),
            architecture: "x86_64".into(),
            config: [("user.role".to_string(), "web".to_string())].into(),
            profiles: vec!["default".into()],
            image: "0123456789abcdef".into(),
            state: Some(InstanceState {
                status: "Running".into(),
                status_code: 103,
                pid: 4242,
                processes: 7,
                network,
                limits: [("limits.memory".to_string(), "64MiB".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let db = Instance {
            name: "db".into(),
            status: "Stopped".into(),
            status_code: 102,
            location: "node2".into(),
            kind: "container".into(),
            state: Some(InstanceState {
                status: "Stopped".into(),
                status_code: 102,
                ..Default::default()
            }),
            ..Default::default()
        };
        vec![db, web]
    }

    #[test]
    fn default_columns_table() {
        let cols = parse_columns("ns4tS").unwrap();
        let t = render_list(&fixture(), &cols, Format::Table).unwrap();
        let expected = "\
+------+---------+------------------+-----------+-----------+
| NAME |  STATE  |       IPV4       |   TYPE    | SNAPSHOTS |
+------+---------+------------------+-----------+-----------+
| db   | STOPPED |                  | CONTAINER | 0         |
+------+---------+------------------+-----------+-----------+
| web1 | RUNNING | 10.87.0.5 (eth0) | CONTAINER | 0         |
+------+---------+------------------+-----------+-----------+
";
        assert_eq!(t, expected);
    }

    #[test]
    fn csv_json_yaml() {
        let cols = parse_columns("nsL").unwrap();
        assert_eq!(
            render_list(&fixture(), &cols, Format::Csv).unwrap(),
            "db,STOPPED,node2\nweb1,RUNNING,node1\n"
        );
        let json = render_list(&fixture(), &cols, Format::Json).unwrap();
        let back: Vec<Instance> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, fixture());
        let yaml = render_list(&fixture(), &cols, Format::Yaml).unwrap();
        let back: Vec<Instance> = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(back, fixture());
        assert_eq!(render_list(&[], &cols, Format::Json).unwrap(), "[]\n");
    }

    #[test]
    fn columns() {
        assert_eq!(
            parse_columns("n,user.role").unwrap(),
            vec![Column::Name, Column::Config("user.role".into())]
        );
        assert!(parse_columns("nx").is_err());
        assert!(parse_columns("n,bogus").is_err());
        assert!(parse_columns("").is_err());
        let i = &fixture()[1];
        assert_eq!(Column::Pid.cell(i), "4242");
        assert_eq!(Column::BaseImage.cell(i), "0123456789ab");
        assert_eq!(Column::Config("user.role".into()).cell(i), "web");
        assert_eq!(Column::Pid.cell(&fixture()[0]), "");
    }

    #[test]
    fn filters() {
        let all = fixture();
        let names = |f: &[&str]| -> Vec<String> {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            all.iter()
                .filter(|i| matches_filters(i, &f))
                .map(|i| i.name.clone())
                .collect()
        };
        assert_eq!(names(&["we"]), ["web1"]);
        assert_eq!(names(&["status=stopped"]), ["db"]);
        assert_eq!(names(&["user.role=web"]), ["web1"]);
        assert_eq!(names(&["location=node1", "d"]), Vec::<String>::new());
        assert_eq!(names(&[]), ["db", "web1"]);
    }

    #[test]
    fn list_asks_the_server_for_what_it_shows() {
        let cols = parse_columns("ns4tS").unwrap();
        assert!(recorded_state_suffices(&cols, Format::Table));
        assert!(recorded_state_suffices(&cols, Format::Csv));
        assert!(!recorded_state_suffices(&cols, Format::Json));
        assert!(!recorded_state_suffices(
            &parse_columns("nsm").unwrap(),
            Format::Table
        ));
        assert!(!recorded_state_suffices(
            &parse_columns("np").unwrap(),
            Format::Table
        ));

        assert_eq!(server_filter(None, &[]), None);
        assert_eq!(
            server_filter(Some("status eq running"), &["we".into()]).as_deref(),
            Some("status eq running")
        );
        assert_eq!(
            server_filter(Some("a eq 1 or b eq 2"), &["L=n1".into()]).as_deref(),
            Some("(a eq 1 or b eq 2) and location eq \"n1\"")
        );
        assert_eq!(
            server_filter(
                None,
                &[
                    "status=stopped".into(),
                    "L=n1".into(),
                    "user.role=web".into(),
                    "t=container".into(),
                    "name=a\"b".into()
                ]
            )
            .as_deref(),
            Some("status eq \"stopped\" and location eq \"n1\" and name eq \"a\\\"b\"")
        );
    }

    #[test]
    fn create_bodies_name_profiles_only_when_asked() {
        let mut req = InstancesPost {
            name: "w1".into(),
            ..Default::default()
        };
        assert!(create_body(&req, false).unwrap().get("profiles").is_none());
        assert_eq!(
            create_body(&req, true).unwrap()["profiles"],
            serde_json::json!([])
        );
        req.profiles = vec!["web".into(), "small".into()];
        assert_eq!(
            create_body(&req, false).unwrap()["profiles"],
            serde_json::json!(["web", "small"])
        );
    }

    #[test]
    fn info_text() {
        let i = &fixture()[1];
        let text = render_info(i, i.state.as_ref());
        assert!(text.starts_with("Name: web1\nStatus: Running\nType: container\n"));
        assert!(text.contains("PID: 4242\n"));
        assert!(
            text.contains("Location: node1\nProfiles: default\n"),
            "{text}"
        );
        assert!(text.contains("  Processes: 7\n"));
        assert!(text.contains("  Limits:\n    limits.memory: 64MiB\n"));
        assert!(text.contains("        inet:  10.87.0.5/24 (global)\n"));
        assert!(!text.contains("lo:"));
        assert!(
            !text.contains("Disk usage"),
            "no disk figure without quotas: {text}"
        );
        let mut s = i.state.clone().unwrap();
        s.disk.insert(
            "root".into(),
            berth_proto::api::InstanceStateDisk {
                usage: 3 << 20,
                total: 64 << 20,
            },
        );
        let text = render_info(i, Some(&s));
        assert!(
            text.contains("  Disk usage:\n    root: 3.00MiB (limit 64.00MiB)\n"),
            "{text}"
        );
    }
}
