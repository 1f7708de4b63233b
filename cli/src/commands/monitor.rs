//! `berth monitor`: prints the events of `/1.0/events` (lifecycle changes and operations) as
//! they come. It does not reconnect: when the stream ends it exits with an error, so a script
//! never misses events silently.

use berth_proto::api::tenancy::{Event, LifecycleEvent};
use berth_proto::api::{Operation, OperationStatus};
use clap::Args;
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::remote_arg;
use crate::{Ctx, print};

/// The event types `--type` takes.
pub const EVENT_TYPES: [&str; 2] = ["lifecycle", "operation"];

/// `monitor`.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// REMOTE: to watch
    pub remote: Option<String>,
    /// Event types to show: lifecycle, operation (repeatable or comma-separated; default both)
    #[arg(long = "type", value_name = "TYPE", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Events of every project (admin and operator keys)
    #[arg(long)]
    pub all_projects: bool,
    /// Format: pretty (one line per event), json (one object per line) or yaml
    #[arg(short = 'f', long, default_value = "pretty")]
    pub format: String,
}

/// How `monitor` prints events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFormat {
    Pretty,
    Json,
    Yaml,
}

/// Parses `--format`; the error is one sentence.
pub fn parse_format(s: &str) -> anyhow::Result<EventFormat> {
    match s {
        "pretty" => Ok(EventFormat::Pretty),
        "json" => Ok(EventFormat::Json),
        "yaml" => Ok(EventFormat::Yaml),
        other => anyhow::bail!(
            "invalid format \"{}\": use pretty, json or yaml",
            other.escape_default()
        ),
    }
}

/// Checks `--type` values; returns them without repeats.
pub fn check_types(types: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for t in types.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        if !EVENT_TYPES.contains(&t) {
            anyhow::bail!(
                "event type \"{}\" is not valid: use lifecycle or operation",
                t.escape_default()
            );
        }
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    Ok(out)
}

/// The websocket path for these types.
pub fn events_path(types: &[String], all_projects: bool) -> String {
    let mut query = Vec::new();
    if !types.is_empty() {
        query.push(format!("type={}", types.join(",")));
    }
    if all_projects {
        query.push("all-projects=true".to_string());
    }
    if query.is_empty() {
        "/1.0/events".into()
    } else {
        format!("/1.0/events?{}", query.join("&"))
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// One line for an event: time, project, action, source, and who asked (`key=NAME`) for a
/// lifecycle event or the description for an operation.
pub fn pretty(e: &Event) -> String {
    let (action, source, who) = match e.kind.as_str() {
        "lifecycle" => match serde_json::from_value::<LifecycleEvent>(e.metadata.clone()) {
            Ok(l) => {
                let who = match &l.requestor {
                    Some(r) if !r.key.is_empty() => format!("key={}", r.key),
                    _ => "system".into(),
                };
                (l.action, l.source, who)
            }
            Err(_) => ("lifecycle".into(), String::new(), e.metadata.to_string()),
        },
        "operation" => match serde_json::from_value::<Operation>(e.metadata.clone()) {
            Ok(op) => (
                format!("operation-{}", status_word(op.status)),
                format!("/1.0/operations/{}", op.id),
                format!("\"{}\"", op.description),
            ),
            Err(_) => ("operation".into(), String::new(), e.metadata.to_string()),
        },
        other => (other.to_string(), String::new(), e.metadata.to_string()),
    };
    format!(
        "{} {} {} {} {}",
        or_dash(&e.timestamp),
        or_dash(&e.project),
        or_dash(&action),
        or_dash(&source),
        who
    )
}

fn status_word(s: OperationStatus) -> String {
    format!("{s:?}").to_lowercase()
}

/// The text printed for one event in `format`.
pub fn render(e: &Event, format: EventFormat) -> anyhow::Result<String> {
    Ok(match format {
        EventFormat::Pretty => pretty(e) + "\n",
        EventFormat::Json => serde_json::to_string(e)? + "\n",
        EventFormat::Yaml => format!("---\n{}", serde_yaml::to_string(e)?),
    })
}

/// `monitor`.
pub async fn monitor(ctx: &Ctx, args: MonitorArgs) -> anyhow::Result<i32> {
    let format = parse_format(&args.format)?;
    let types = check_types(&args.types)?;
    let client = ctx.client(remote_arg(args.remote.as_deref()))?;
    let mut ws = client
        .websocket(&events_path(&types, args.all_projects))
        .await?;
    let remote = client.name().to_string();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Event>(t.as_str()) {
                Ok(e) => {
                    if types.is_empty() || types.contains(&e.kind) {
                        print(&render(&e, format)?);
                    }
                }
                Err(err) => {
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        format!("Warning: skipped an event that does not parse: {err}\n")
                            .as_bytes(),
                    );
                }
            },
            Some(Ok(Message::Close(frame))) => {
                let why = frame
                    .map(|f| f.reason.to_string())
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                anyhow::bail!("the server of remote \"{remote}\" closed the event stream{why}");
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                anyhow::bail!("the event stream of remote \"{remote}\" broke off: {e}")
            }
            None => anyhow::bail!("the event stream of remote \"{remote}\" ended"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::api::tenancy::Requestor;

    fn lifecycle() -> Event {
        Event {
            kind: "lifecycle".into(),
            timestamp: "2026-11-29T23:00:00Z".into(),
            location: "c1".into(),
            project: "team-a".into(),
            metadata: serde_json::to_value(LifecycleEvent {
                action: "instance-created".into(),
                source: "/1.0/instances/web1?project=team-a".into(),
                context: Default::default(),
                requestor: Some(Requestor {
                    key: "ci".into(),
                    key_id: "abcd".into(),
                    role: "member".into(),
                }),
            })
            .unwrap(),
        }
    }

    #[test]
    fn pretty_lines() {
        assert_eq!(
            pretty(&lifecycle()),
            "2026-11-29T23:00:00Z team-a instance-created /1.0/instances/web1?project=team-a key=ci"
        );
        let op = Event {
            kind: "operation".into(),
            timestamp: "t".into(),
            project: "default".into(),
            metadata: serde_json::to_value(Operation {
                id: "01J".into(),
                description: "Creating instance".into(),
                status: OperationStatus::Success,
                ..Default::default()
            })
            .unwrap(),
            ..Default::default()
        };
        assert_eq!(
            pretty(&op),
            "t default operation-success /1.0/operations/01J \"Creating instance\""
        );
    }

    #[test]
    fn formats_and_paths() {
        let json = render(&lifecycle(), EventFormat::Json).unwrap();
        assert!(json.ends_with("}\n") && json.lines().count() == 1, "{json}");
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, lifecycle());
        let yaml = render(&lifecycle(), EventFormat::Yaml).unwrap();
        assert!(yaml.starts_with("---\ntype: lifecycle\n"), "{yaml}");
        assert!(parse_format("xml").is_err());
        assert_eq!(
            check_types(&["operation".into(), "lifecycle".into(), "operation".into()]).unwrap(),
            ["operation", "lifecycle"]
        );
        assert!(check_types(&["logging".into()]).is_err());
        assert_eq!(events_path(&[], false), "/1.0/events");
        assert_eq!(
            events_path(&["lifecycle".into()], true),
            "/1.0/events?type=lifecycle&all-projects=true"
        );
    }
}
