//! One module per command family, plus small helpers they share.

pub mod apply;
pub mod cluster;
pub mod config;
pub mod edit;
pub mod exec;
pub mod file;
pub mod image;
pub mod instance;
pub mod key;
pub mod monitor;
pub mod operation;
pub mod profile;
pub mod project;
pub mod remote;
pub mod snapshot;
pub mod transfer;

use std::collections::BTreeMap;

use berth_proto::api::Server;
use serde::de::DeserializeOwned;

use crate::client::Client;
use crate::{Ctx, say};

/// Lists the objects under `base` (`/1.0/projects`, `/1.0/keys`): asks for them with
/// `recursion=1`; when the server answers with URLs only, reads each one.
pub async fn list_objects<T: DeserializeOwned>(
    client: &Client,
    base: &str,
) -> anyhow::Result<Vec<T>> {
    let sep = if base.contains('?') { '&' } else { '?' };
    let v: serde_json::Value = client.get(&format!("{base}{sep}recursion=1")).await?;
    match v {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Array(items) if items.iter().all(serde_json::Value::is_string) => {
            let mut out = Vec::with_capacity(items.len());
            for url in items.iter().filter_map(serde_json::Value::as_str) {
                out.push(client.get(url).await?);
            }
            Ok(out)
        }
        other => Ok(crate::client::decode_metadata(other)?),
    }
}

/// `base` with `filter=EXPR` added to its query (URL-encoded; `base` itself without a
/// filter). The server parses the expression and answers 400 with its sentence when it does
/// not parse.
pub fn with_filter(base: &str, filter: Option<&str>) -> String {
    match filter {
        Some(f) if !f.trim().is_empty() => {
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}filter={}", crate::client::encode_query(f))
        }
        _ => base.to_string(),
    }
}

/// Checks a name with one of the `names::validate_*` rules, as a one-sentence error.
pub fn check_name(rule: fn(&str) -> Result<(), String>, name: &str) -> anyhow::Result<()> {
    rule(name).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Turns `set` arguments into pairs: `KEY VALUE`, or `KEY=VALUE...`.
pub fn set_arguments(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    match args {
        [k, v] if !k.contains('=') => Ok(vec![(k.clone(), v.clone())]),
        _ => args.iter().map(|a| parse_key_value(a)).collect(),
    }
}

/// A remote argument (`REMOTE:` or `REMOTE`) without its colon; none when not given.
pub fn remote_arg(arg: Option<&str>) -> Option<&str> {
    arg.map(|r| r.trim_end_matches(':'))
        .filter(|r| !r.is_empty())
}

/// Splits `KEY=VALUE`; the key must not be empty.
pub fn parse_key_value(arg: &str) -> anyhow::Result<(String, String)> {
    match arg.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => anyhow::bail!("bad key=value pair \"{arg}\""),
    }
}

/// Parses `KEY=VALUE` config pairs and checks each against the server's rules before any request.
pub fn parse_config_pairs(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for arg in args {
        let (k, v) = parse_key_value(arg)?;
        berth_proto::api::config::validate_key_value(&k, &v)
            .map_err(|e| anyhow::anyhow!("{}", e.0))?;
        map.insert(k, v);
    }
    Ok(map)
}

/// Checks an instance name before sending it.
pub fn check_instance_name(name: &str) -> anyhow::Result<()> {
    // Checked here first: the shared validator slices long names at a byte offset.
    if name.len() > 63 {
        let head: String = name.chars().take(20).collect();
        anyhow::bail!(
            "instance name \"{}...\" is longer than 63 characters",
            head.escape_default()
        );
    }
    berth_proto::api::names::validate_instance_name(name).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `berth version`: the client's version, and the server's when it answers.
pub async fn version(ctx: &Ctx) -> anyhow::Result<i32> {
    say(&format!("Client version: {}", berth_proto::VERSION));
    let server = match ctx.client(None) {
        Ok(c) => c
            .get::<Server>("/1.0")
            .await
            .ok()
            .map(|s| s.environment.server_version),
        Err(_) => None,
    };
    match server {
        Some(v) if !v.is_empty() => say(&format!("Server version: {v}")),
        _ => say("Server version: unreachable"),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_non_ascii_names_do_not_panic() {
        assert!(check_instance_name(&"€".repeat(30)).is_err());
        assert!(check_instance_name("web1").is_ok());
    }

    #[test]
    fn key_values() {
        assert_eq!(
            parse_key_value("a=b=c").unwrap(),
            ("a".to_string(), "b=c".to_string())
        );
        assert_eq!(
            parse_key_value("a=").unwrap(),
            ("a".to_string(), String::new())
        );
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
    }

    #[test]
    fn filters_are_url_encoded() {
        assert_eq!(
            with_filter(
                "/1.0/instances?recursion=2",
                Some("status eq running and not (name eq \"web 1\")")
            ),
            "/1.0/instances?recursion=2&filter=status%20eq%20running%20and%20not%20%28name%20eq%20%22web%201%22%29"
        );
        assert_eq!(
            with_filter("/1.0/profiles", Some("config.limits.cpu eq 2&x=y")),
            "/1.0/profiles?filter=config.limits.cpu%20eq%202%26x%3Dy"
        );
        assert_eq!(with_filter("/1.0/profiles", None), "/1.0/profiles");
        assert_eq!(with_filter("/1.0/profiles", Some(" ")), "/1.0/profiles");
    }

    #[test]
    fn config_pairs_are_checked_locally() {
        let m = parse_config_pairs(&["limits.memory=512MiB".into(), "user.x=1".into()]).unwrap();
        assert_eq!(m["limits.memory"], "512MiB");
        assert!(parse_config_pairs(&["limits.memory=lots".into()]).is_err());
        assert!(parse_config_pairs(&["nonsense.key=1".into()]).is_err());
        assert!(parse_config_pairs(&["novalue".into()]).is_err());
    }
}
