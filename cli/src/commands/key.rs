//! `berth key ...`: API keys (a role, a project for member and viewer keys, an expiry). The
//! secret is printed once, when the key is made or rotated; listings never show it.

use std::io::Write;

use berth_proto::api::names::validate_key_name;
use berth_proto::api::tenancy::{
    ApiKey, DEFAULT_PROJECT, KeyCreated, KeyRotatePost, KeysPost, parse_duration,
};
use clap::Subcommand;
use http::Method;

use super::{check_name, list_objects, remote_arg};
use crate::client::{Client, encode_query};
use crate::output::{self, Format};
use crate::{Ctx, print, say};

/// The roles a key can have.
pub const ROLES: [&str; 4] = ["admin", "operator", "member", "viewer"];

/// Key subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key and print its secret (shown only this once)
    Create {
        /// Key name, optionally REMOTE:NAME
        name: String,
        /// admin (everything), operator (the fleet, every project, no keys), member
        /// (read/write in its project) or viewer (read-only in its project)
        #[arg(long)]
        role: String,
        /// How long the key works (30d, 12h, 2w; default: no expiry)
        #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
        expires: Option<String>,
    },
    /// List API keys (never their secrets)
    #[command(visible_alias = "ls")]
    List {
        /// REMOTE: to list
        remote: Option<String>,
        /// Format (table, compact, csv, json, yaml)
        #[arg(short = 'f', long, default_value = "table")]
        format: Format,
    },
    /// Show an API key (YAML, without its secret)
    Show {
        /// Key name, optionally REMOTE:NAME
        name: String,
    },
    /// Revoke (delete) an API key: it stops working at once
    #[command(visible_aliases = ["delete", "rm"])]
    Revoke {
        /// Key name, optionally REMOTE:NAME
        name: String,
    },
    /// Give a key a new secret (the old one stops working) and print it
    Rotate {
        /// Key name, optionally REMOTE:NAME
        name: String,
        /// A new validity from now (30d); default: keep the current expiry
        #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
        expires: Option<String>,
    },
}

/// The path of a key.
pub fn key_path(name: &str) -> String {
    format!("/1.0/keys/{}", encode_query(name))
}

/// Checks a role name; the error is one sentence.
pub fn check_role(role: &str) -> anyhow::Result<()> {
    if ROLES.contains(&role) {
        Ok(())
    } else {
        anyhow::bail!(
            "role \"{}\" is not valid: use admin, operator, member or viewer",
            role.escape_default()
        )
    }
}

/// Checks an `--expires` duration; returns it as the API takes it (empty: none).
pub fn check_expires(expires: Option<&str>) -> anyhow::Result<String> {
    match expires {
        None => Ok(String::new()),
        Some(d) => {
            parse_duration(d).map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
            Ok(d.trim().to_string())
        }
    }
}

/// Whether keys of `role` are confined to one project.
pub fn is_project_role(role: &str) -> bool {
    matches!(role, "member" | "viewer")
}

/// The body of `key create`: member and viewer keys get `project`, the command's project
/// (none: `default`, as the server would choose; an empty one is refused); admin and operator
/// keys get none.
pub fn create_body(
    name: &str,
    role: &str,
    project: Option<&str>,
    expires: Option<&str>,
) -> anyhow::Result<KeysPost> {
    check_name(validate_key_name, name)?;
    check_role(role)?;
    let project = if is_project_role(role) {
        match project.map(str::trim) {
            None => DEFAULT_PROJECT.to_string(),
            Some("") => anyhow::bail!(
                "a {role} key belongs to a project and the current project is empty: give --project PROJECT"
            ),
            Some(p) => p.to_string(),
        }
    } else {
        String::new()
    };
    Ok(KeysPost {
        name: name.into(),
        role: role.into(),
        project,
        expires_in: check_expires(expires)?,
    })
}

/// The EXPIRES cell: "never", the time, or the time with "(expired)".
pub fn expires_cell(k: &ApiKey) -> String {
    match (k.expires_at.as_str(), k.expired) {
        ("", _) => "never".into(),
        (t, true) => format!("{t} (expired)"),
        (t, false) => t.into(),
    }
}

/// Table rows of `key list`: NAME, ROLE, PROJECT, CREATED, EXPIRES.
pub fn key_rows(keys: &[ApiKey]) -> Vec<Vec<String>> {
    keys.iter()
        .map(|k| {
            vec![
                k.name.clone(),
                k.role.clone(),
                if is_project_role(&k.role) {
                    k.project.clone()
                } else {
                    String::new()
                },
                k.created_at.clone(),
                expires_cell(k),
            ]
        })
        .collect()
}

/// The one-line warning that goes with a printed secret.
pub fn secret_warning(created: &KeyCreated, verb: &str) -> String {
    let k = &created.key;
    let scope = if is_project_role(&k.role) {
        format!("{} of project \"{}\"", k.role, k.project)
    } else {
        k.role.clone()
    };
    let expiry = if k.expires_at.is_empty() {
        "no expiry".to_string()
    } else {
        format!("expires {}", k.expires_at)
    };
    format!(
        "Key \"{}\" {verb} ({scope}, {expiry}): store its secret now, it is not shown again",
        k.name
    )
}

/// Prints a new secret on stdout (alone, so `> file` keeps it) and the warning on stderr.
fn show_secret(created: &KeyCreated, verb: &str) {
    let _ = writeln!(std::io::stderr(), "{}", secret_warning(created, verb));
    say(&created.secret);
}

fn key_arg<'a>(ctx: &Ctx, arg: &'a str) -> anyhow::Result<(Client, &'a str)> {
    let (client, name) = ctx.resolve(arg)?;
    check_name(validate_key_name, name)?;
    Ok((client, name))
}

/// Runs a key subcommand.
pub async fn run(ctx: &Ctx, command: KeyCommand) -> anyhow::Result<i32> {
    match command {
        KeyCommand::Create {
            name,
            role,
            expires,
        } => {
            check_expires(expires.as_deref())?;
            let (client, key_name) = ctx.resolve(&name)?;
            let body = create_body(key_name, &role, client.project(), expires.as_deref())?;
            let created: KeyCreated = crate::client::decode_metadata(
                client.sync(Method::POST, "/1.0/keys", Some(&body)).await?,
            )?;
            show_secret(&created, "created");
        }
        KeyCommand::List { remote, format } => {
            let client = ctx.client(remote_arg(remote.as_deref()))?;
            let mut keys: Vec<ApiKey> = list_objects(&client, "/1.0/keys").await?;
            keys.sort_by(|a, b| a.name.cmp(&b.name));
            print(&output::render(
                format,
                &["NAME", "ROLE", "PROJECT", "CREATED", "EXPIRES"],
                &key_rows(&keys),
                &keys,
            )?);
        }
        KeyCommand::Show { name } => {
            let (client, name) = key_arg(ctx, &name)?;
            let k: ApiKey = client.get(&key_path(name)).await?;
            print(&output::yaml(&k)?);
        }
        KeyCommand::Revoke { name } => {
            let (client, name) = key_arg(ctx, &name)?;
            client
                .sync::<()>(Method::DELETE, &key_path(name), None)
                .await?;
            say(&format!("Key {name} revoked"));
        }
        KeyCommand::Rotate { name, expires } => {
            let body = KeyRotatePost {
                expires_in: check_expires(expires.as_deref())?,
            };
            let (client, name) = key_arg(ctx, &name)?;
            let created: KeyCreated = crate::client::decode_metadata(
                client
                    .sync(
                        Method::POST,
                        &format!("{}/rotate", key_path(name)),
                        Some(&body),
                    )
                    .await?,
            )?;
            show_secret(&created, "rotated");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked_before_sending() {
        let b = create_body("ci", "member", Some("team-a"), Some("30d")).unwrap();
        assert_eq!(
            (b.project.as_str(), b.expires_in.as_str()),
            ("team-a", "30d")
        );
        let b = create_body("ci", "viewer", None, None).unwrap();
        assert_eq!(
            b.project, "default",
            "no project: the default one, as the server does"
        );
        assert_eq!(
            create_body("ci", "member", Some(" "), None)
                .unwrap_err()
                .to_string(),
            "a member key belongs to a project and the current project is empty: give --project PROJECT"
        );
        assert_eq!(
            create_body("ops", "admin", Some(""), None).unwrap().project,
            ""
        );
        let b = create_body("ops", "operator", Some("team-a"), None).unwrap();
        assert_eq!((b.project.as_str(), b.expires_in.as_str()), ("", ""));
        assert_eq!(
            create_body("ci", "root", None, None)
                .unwrap_err()
                .to_string(),
            "role \"root\" is not valid: use admin, operator, member or viewer"
        );
        let e = create_body("ci", "viewer", None, Some("3y")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--expires: \"3y\" is not a duration"),
            "{e}"
        );
        assert!(create_body("bad_name", "viewer", None, None).is_err());
    }

    #[test]
    fn rows_never_hold_secrets() {
        let keys = vec![
            ApiKey {
                name: "ci".into(),
                id: "abcd".into(),
                role: "member".into(),
                project: "team-a".into(),
                created_at: "2026-11-29T00:00:00Z".into(),
                expires_at: "2026-12-29T00:00:00Z".into(),
                expired: false,
            },
            ApiKey {
                name: "old".into(),
                role: "admin".into(),
                project: "default".into(),
                expires_at: "2026-01-01T00:00:00Z".into(),
                expired: true,
                ..Default::default()
            },
            ApiKey {
                name: "root".into(),
                role: "admin".into(),
                ..Default::default()
            },
        ];
        let rows = key_rows(&keys);
        assert_eq!(
            rows[0],
            [
                "ci",
                "member",
                "team-a",
                "2026-11-29T00:00:00Z",
                "2026-12-29T00:00:00Z"
            ]
        );
        assert_eq!(rows[1][2], "");
        assert_eq!(rows[1][4], "2026-01-01T00:00:00Z (expired)");
        assert_eq!(rows[2][4], "never");
        let created = KeyCreated {
            key: keys[0].clone(),
            secret: "berth_abcd_ffff".into(),
        };
        let w = secret_warning(&created, "created");
        assert_eq!(
            w,
            "Key \"ci\" created (member of project \"team-a\", expires 2026-12-29T00:00:00Z): store its secret now, it is not shown again"
        );
        assert!(!w.contains("berth_abcd"));
    }
}
