//! `berth remote add|list|rename|remove|switch|get-default|set-url`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde::Serialize;

use crate::client::{fetch_fingerprint, parse_url};
use crate::config::{Config, Remote};
use crate::output::{self, Format};
use crate::{Ctx, print, say};

/// Remote subcommands.
#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Add a new remote server
    Add {
        /// Name of the remote
        name: String,
        /// URL of the remote, https://HOST[:PORT]; a cluster's controllers as a comma-separated
        /// list (each is tried in turn when one cannot be reached)
        #[arg(value_name = "URL[,URL...]")]
        url: String,
        /// File holding the API key
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "key",
            conflicts_with = "key"
        )]
        key_file: Option<PathBuf>,
        /// "-": read the API key from stdin (stored in a file of mode 0600 next to the config)
        #[arg(long, value_name = "-", allow_hyphen_values = true)]
        key: Option<String>,
        /// Cluster CA certificate (PEM) to verify the server with
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Without --ca-file: trust the server's certificate without asking
        #[arg(long)]
        accept_certificate: bool,
    },
    /// List the available remotes
    #[command(visible_alias = "ls")]
    List {
        /// Format (table, compact, csv, json, yaml)
        #[arg(short = 'f', long, default_value = "table")]
        format: Format,
    },
    /// Set the URL(s) of a remote
    SetUrl {
        /// Name of the remote
        name: String,
        /// https://HOST[:PORT], or several comma-separated
        #[arg(value_name = "URL[,URL...]")]
        url: String,
    },
    /// Rename a remote
    #[command(visible_alias = "mv")]
    Rename {
        /// Current name
        old: String,
        /// New name
        new: String,
    },
    /// Remove remotes
    #[command(visible_alias = "rm")]
    Remove {
        /// Name of the remote
        name: String,
    },
    /// Set the default remote
    Switch {
        /// Name of the remote
        name: String,
    },
    /// Show the default remote
    GetDefault,
}

/// A remote as `remote list --format json|yaml` shows it (never the key itself).
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct RemoteEntry {
    pub name: String,
    pub url: String,
    /// Further addresses (the cluster's other controllers).
    pub addresses: Vec<String>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub fingerprint: Option<String>,
    /// The remote's current project (`berth project switch`).
    pub project: Option<String>,
    pub current: bool,
}

/// The entries of `remote list`, sorted by name.
pub fn remote_entries(config: &Config, current: &str) -> Vec<RemoteEntry> {
    config
        .remotes
        .iter()
        .map(|(name, r)| RemoteEntry {
            name: name.clone(),
            url: r.url.clone(),
            addresses: r.urls().into_iter().skip(1).collect(),
            key_file: r.key_file.clone(),
            ca_file: r.ca_file.clone(),
            fingerprint: r.fingerprint.clone(),
            project: r.project.clone(),
            current: name == current,
        })
        .collect()
}

/// How long `remote add` waits for the cluster to tell its controllers' addresses.
const LEARN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Parses `URL[,URL...]`, checking each.
pub fn parse_urls(list: &str) -> anyhow::Result<Vec<String>> {
    let urls = crate::config::split_urls(list);
    if urls.is_empty() {
        anyhow::bail!("no URL given");
    }
    for u in &urls {
        parse_url(u)?;
    }
    Ok(urls)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| anyhow::anyhow!("cannot use {}: {e}", path.display()))
}

/// Runs a remote subcommand.
pub async fn run(ctx: &Ctx, command: RemoteCommand) -> anyhow::Result<i32> {
    let mut config = ctx.config.clone();
    match command {
        RemoteCommand::Add {
            name,
            url,
            key_file,
            key,
            ca_file,
            accept_certificate,
        } => {
            crate::config::validate_remote_name(&name)?;
            if config.remotes.contains_key(&name) {
                anyhow::bail!("remote \"{name}\" already exists");
            }
            let urls = parse_urls(&url)?;
            if ca_file.is_none() && urls.len() > 1 {
                anyhow::bail!(
                    "several addresses need --ca-file: each controller has its own certificate, so one pinned fingerprint cannot trust them all"
                );
            }
            let secret = match (&key_file, key.as_deref()) {
                (Some(f), _) => {
                    warn_if_readable(f);
                    None
                }
                (None, Some("-")) => Some(read_key_from_stdin()?),
                (None, Some(_)) => anyhow::bail!(
                    "--key only takes \"-\" (read the key from stdin); keep a key in a file of mode 0600 and pass --key-file"
                ),
                (None, None) => anyhow::bail!("give the API key with --key-file FILE or --key -"),
            };
            let mut remote = Remote {
                key_file: key_file.as_deref().map(absolute).transpose()?,
                key: secret.clone(),
                ca_file: ca_file.as_deref().map(absolute).transpose()?,
                ..Remote::default()
            };
            remote.set_urls(&urls);
            let api_key = remote.api_key(&name)?;
            if remote.ca_file.is_none() {
                let fp = fetch_fingerprint(&remote.url).await?;
                say(&format!("Certificate fingerprint: {fp}"));
                if !accept_certificate && !confirm("Trust this certificate? (y/N) ")? {
                    anyhow::bail!("server certificate not accepted");
                }
                remote.fingerprint = Some(fp);
            }
            let client = crate::client::Client::new(&crate::config::Target {
                name: name.clone(),
                url: remote.url.clone(),
                more_urls: remote.addresses.clone(),
                key: api_key,
                ca_file: remote.ca_file.clone(),
                fingerprint: remote.fingerprint.clone(),
                project: None,
            })?;
            check_key(&client).await?;
            if remote.ca_file.is_some() {
                // Best effort: a cluster tells its other controllers' addresses.
                if let Ok(Ok(learned)) =
                    tokio::time::timeout(LEARN_TIMEOUT, super::cluster::learn_urls(&client)).await
                {
                    let mut all = remote.urls();
                    all.extend(learned);
                    remote.set_urls(&all);
                }
            }
            if let Some(secret) = &secret {
                remote.key = None;
                remote.key_file = Some(crate::config::store_key(&ctx.keys_dir(), &name, secret)?);
            }
            config.add_remote(&name, remote)?;
            config.save(&ctx.config_path)?;
        }
        RemoteCommand::Rename { old, new } => {
            config.rename_remote(&old, &new)?;
            // A key this command stored follows the remote's name.
            let keys_dir = ctx.keys_dir();
            if let Some(r) = config.remotes.get_mut(&new)
                && r.key_file.as_deref() == Some(keys_dir.join(format!("{old}.key")).as_path())
            {
                let to = keys_dir.join(format!("{new}.key"));
                std::fs::rename(keys_dir.join(format!("{old}.key")), &to).map_err(|e| {
                    anyhow::anyhow!("cannot rename the key file of remote \"{old}\": {e}")
                })?;
                r.key_file = Some(to);
            }
            config.save(&ctx.config_path)?;
        }
        RemoteCommand::List { format } => {
            let current = ctx
                .env
                .remote
                .clone()
                .unwrap_or_else(|| config.default_remote.clone());
            let entries = remote_entries(&config, &current);
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    let shown = |p: &Option<PathBuf>| {
                        p.as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    };
                    vec![
                        if e.current && format == Format::Table {
                            format!("{} (current)", e.name)
                        } else {
                            e.name.clone()
                        },
                        std::iter::once(&e.url)
                            .chain(&e.addresses)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("\n"),
                        shown(&e.key_file),
                        match (&e.ca_file, &e.fingerprint) {
                            (Some(ca), _) => ca.display().to_string(),
                            (None, Some(fp)) => {
                                format!("pinned {}", fp.chars().take(12).collect::<String>())
                            }
                            (None, None) => String::new(),
                        },
                        e.project.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print(&output::render(
                format,
                &["NAME", "URL", "KEY FILE", "TRUST", "PROJECT"],
                &rows,
                &entries,
            )?);
        }
        RemoteCommand::SetUrl { name, url } => {
            let urls = parse_urls(&url)?;
            let remote = config
                .remotes
                .get_mut(&name)
                .ok_or_else(|| crate::config::ConfigError::NoSuchRemote(name.clone()))?;
            if urls.len() > 1 && remote.ca_file.is_none() {
                anyhow::bail!(
                    "several addresses need a CA file: remote \"{name}\" trusts one pinned certificate"
                );
            }
            if remote.ca_file.is_none() && remote.fingerprint.is_some() && remote.url != urls[0] {
                anyhow::bail!(
                    "remote \"{name}\" trusts one pinned certificate: remove it and add it again to change its address"
                );
            }
            remote.set_urls(&urls);
            config.save(&ctx.config_path)?;
        }
        RemoteCommand::Remove { name } => {
            let removed = config.remove_remote(&name)?;
            config.save(&ctx.config_path)?;
            // A key this command stored goes with its remote.
            let stored = ctx.keys_dir().join(format!("{name}.key"));
            if removed.key_file.as_deref() == Some(stored.as_path()) {
                let _ = std::fs::remove_file(stored);
            }
        }
        RemoteCommand::Switch { name } => {
            config.switch_remote(&name)?;
            config.save(&ctx.config_path)?;
        }
        RemoteCommand::GetDefault => {
            say(ctx.env.remote.as_deref().unwrap_or(&config.default_remote));
        }
    }
    Ok(0)
}

/// Checks that the server takes the key (`GET /1.0`): a refused key is an error; a server that
/// cannot answer right now is only a warning (the remote is still added).
async fn check_key(client: &crate::client::Client) -> anyhow::Result<()> {
    match client.get::<berth_proto::api::Server>("/1.0").await {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.status(), Some(401 | 403)) => {
            anyhow::bail!("the server refused the API key: {e}")
        }
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "Warning: cannot check the API key now: {e}"
            );
            Ok(())
        }
    }
}

/// Reads an API key from stdin (its first line); asks for it on a terminal.
fn read_key_from_stdin() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let _ = write!(std::io::stderr(), "API key: ");
        let _ = std::io::stderr().flush();
    }
    let mut text = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut text)
        .map_err(|e| anyhow::anyhow!("cannot read the key from stdin: {e}"))?;
    let key = text.trim();
    if key.is_empty() {
        anyhow::bail!("no API key on stdin");
    }
    Ok(key.to_string())
}

/// Warns when a key file can be read by other users.
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            let _ = writeln!(
                std::io::stderr(),
                "Warning: the key file {} can be read by other users (mode {mode:04o}): chmod 600 it",
                path.display()
            );
        }
    }
}

/// Asks a yes/no question on the terminal; without a terminal the answer is no.
fn confirm(question: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "cannot ask to accept the server certificate without a terminal: pass --ca-file or --accept-certificate"
        );
    }
    let mut out = std::io::stdout();
    let _ = out.write_all(question.as_bytes());
    let _ = out.flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_hide_keys_and_mark_current() {
        let mut c = Config::default();
        c.add_remote(
            "local",
            Remote {
                url: "https://127.0.0.1:8443".into(),
                key: Some("secret".into()),
                ..Remote::default()
            },
        )
        .unwrap();
        let e = remote_entries(&c, "local");
        assert_eq!(e.len(), 1);
        assert!(e[0].current);
        let json = output::json(&e).unwrap();
        assert!(!json.contains("secret"));
        assert!(json.contains("\"key-file\": null"));
    }

    #[test]
    fn url_lists() {
        assert_eq!(
            parse_urls("https://a:1, https://b:2/").unwrap(),
            ["https://a:1", "https://b:2"]
        );
        assert!(parse_urls("https://a:1,http://b:2").is_err());
        assert!(parse_urls(" , ").is_err());
    }
}
