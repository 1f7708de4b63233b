//! `berth`: the command line client for Berth, modelled on LXD's `lxc`.
//!
//! [`run`] parses arguments and runs one command; it returns the process exit code.
//! Errors are printed by the caller as `Error: <sentence>`.

pub mod client;
pub mod commands;
pub mod config;
pub mod output;
pub mod stack;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::client::Client;
use crate::commands::{
    cluster, config as config_cmd, exec, file, image, instance, key, monitor, operation, profile,
    project, remote, snapshot, transfer,
};
use crate::config::{Config, EnvOverrides, split_remote};

/// Command line client for Berth machine containers.
#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version = berth_proto::VERSION,
    about = "Command line client for Berth",
    long_about = "Command line client for Berth: manage machine containers and images on a Berth cluster.\n\nInstances and remotes are named like lxc's: NAME or REMOTE:NAME."
)]
pub struct Cli {
    /// Project to work in (default: the remote's current project, see `berth project switch`)
    #[arg(long, global = true, env = "BERTH_PROJECT", value_name = "PROJECT")]
    pub project: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and start instances from images
    Launch(instance::CreateArgs),
    /// Create instances from images
    Init(instance::CreateArgs),
    /// List instances
    #[command(visible_alias = "ls")]
    List(instance::ListArgs),
    /// Show instance information
    Info(instance::InfoArgs),
    /// Start instances
    Start(instance::NamesArgs),
    /// Stop instances
    Stop(instance::StopArgs),
    /// Restart instances
    Restart(instance::StopArgs),
    /// Delete instances and snapshots (NAME/SNAP)
    #[command(visible_alias = "rm")]
    Delete(instance::DeleteArgs),
    /// Rename instances and snapshots
    Rename(transfer::MoveArgs),
    /// Move instances to another node, or rename instances and snapshots
    #[command(visible_alias = "mv")]
    Move(transfer::MoveArgs),
    /// Copy instances and snapshots to new instances
    #[command(visible_alias = "cp")]
    Copy(transfer::CopyArgs),
    /// Take a snapshot of an instance
    Snapshot(snapshot::SnapshotArgs),
    /// Restore an instance from one of its snapshots
    Restore(snapshot::RestoreArgs),
    /// Make an image from an instance or a snapshot
    Publish(image::PublishArgs),
    /// Execute commands in instances
    Exec(exec::ExecArgs),
    /// Manage files in instances
    File {
        #[command(subcommand)]
        command: file::FileCommand,
    },
    /// Manage instance configuration
    Config {
        #[command(subcommand)]
        command: config_cmd::ConfigCommand,
    },
    /// Show the console log of an instance
    Console(instance::ConsoleArgs),
    /// Manage images
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Manage projects (tenants: instances, profiles and image aliases, with quotas)
    Project {
        #[command(subcommand)]
        command: project::ProjectCommand,
    },
    /// Manage profiles (config shared by instances)
    Profile {
        #[command(subcommand)]
        command: profile::ProfileCommand,
    },
    /// Manage API keys
    Key {
        #[command(subcommand)]
        command: key::KeyCommand,
    },
    /// Print lifecycle and operation events as they happen
    Monitor(monitor::MonitorArgs),
    /// List, show, wait for and cancel background operations
    Operation {
        #[command(subcommand)]
        command: operation::OperationCommand,
    },
    /// Manage cluster members
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Manage the list of remote servers
    Remote {
        #[command(subcommand)]
        command: remote::RemoteCommand,
    },
    /// Make the cluster match a stack file (projects, profiles, image aliases, instances)
    Apply(commands::apply::ApplyArgs),
    /// Delete what a stack file's `berth apply` created
    Destroy(commands::apply::DestroyArgs),
    /// Show local and remote versions
    Version,
}

/// What every command gets: the client configuration and the environment overrides.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub config: Config,
    pub config_path: PathBuf,
    pub env: EnvOverrides,
    /// `--project` (or `BERTH_PROJECT`): overrides every remote's current project.
    pub project: Option<String>,
}

impl Ctx {
    /// Loads the configuration file and the environment overrides; `project` is `--project`.
    pub fn load(project: Option<String>) -> anyhow::Result<Ctx> {
        let config_path = config::config_path()?;
        let config = Config::load(&config_path)?;
        Ok(Ctx {
            config,
            config_path,
            env: EnvOverrides::from_env(),
            project,
        })
    }

    /// The project requests to `target` work in: `--project`, else the remote's current one.
    pub fn project_for(&self, target: &config::Target) -> Option<String> {
        self.project.clone().or_else(|| target.project.clone())
    }

    /// A client for `remote` (or the default remote), working in its project.
    pub fn client(&self, remote: Option<&str>) -> anyhow::Result<Client> {
        let target = self.config.target(remote, &self.env)?;
        Ok(Client::new(&target)?.with_project(self.project_for(&target)))
    }

    /// The directory where keys given on stdin are stored (`keys/` next to the config file).
    pub fn keys_dir(&self) -> PathBuf {
        self.config_path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("keys")
    }

    /// Splits `remote:rest`, checking that the remote exists; returns the client and the rest.
    pub fn resolve<'a>(&self, arg: &'a str) -> anyhow::Result<(Client, &'a str)> {
        let (remote, rest) = split_remote(arg);
        Ok((self.client(remote)?, rest))
    }

    /// Like [`Ctx::resolve`], but a prefix that is not a configured remote stays part of the
    /// name (image aliases may contain `:`).
    pub fn resolve_lenient<'a>(&self, arg: &'a str) -> anyhow::Result<(Client, &'a str)> {
        match split_remote(arg) {
            (Some(r), rest) if self.config.remotes.contains_key(r) => {
                Ok((self.client(Some(r))?, rest))
            }
            _ => Ok((self.client(None)?, arg)),
        }
    }
}

/// Writes text to stdout (a closed pipe is not an error worth reporting).
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Writes one line to stdout.
pub fn say(line: &str) {
    print(&format!("{line}\n"));
}

/// Runs the command line `args` (with the program name first); returns the exit code.
pub async fn run<I, T>(args: I) -> anyhow::Result<i32>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return Ok(code);
        }
    };
    if let Some(p) = &cli.project {
        berth_proto::api::names::validate_project_name(p).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let ctx = Ctx::load(cli.project)?;
    dispatch(&ctx, cli.command).await
}

async fn dispatch(ctx: &Ctx, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Launch(a) => instance::create(ctx, a, true).await,
        Command::Init(a) => instance::create(ctx, a, false).await,
        Command::List(a) => instance::list(ctx, a).await,
        Command::Info(a) => instance::info(ctx, a).await,
        Command::Start(a) => instance::start(ctx, a).await,
        Command::Stop(a) => instance::stop(ctx, a, "stop").await,
        Command::Restart(a) => instance::stop(ctx, a, "restart").await,
        Command::Delete(a) => instance::delete(ctx, a).await,
        Command::Rename(a) | Command::Move(a) => transfer::move_instance(ctx, a).await,
        Command::Copy(a) => transfer::copy(ctx, a).await,
        Command::Snapshot(a) => snapshot::snapshot(ctx, a).await,
        Command::Restore(a) => snapshot::restore(ctx, a).await,
        Command::Publish(a) => image::publish(ctx, a).await,
        Command::Console(a) => instance::console(ctx, a).await,
        Command::Exec(a) => exec::exec(ctx, a).await,
        Command::File { command } => file::run(ctx, command).await,
        Command::Config { command } => config_cmd::run(ctx, command).await,
        Command::Image { command } => image::run(ctx, command).await,
        Command::Operation { command } => operation::run(ctx, command).await,
        Command::Project { command } => project::run(ctx, command).await,
        Command::Profile { command } => profile::run(ctx, command).await,
        Command::Key { command } => key::run(ctx, command).await,
        Command::Monitor(a) => monitor::monitor(ctx, a).await,
        Command::Cluster { command } => cluster::run(ctx, command).await,
        Command::Remote { command } => remote::run(ctx, command).await,
        Command::Apply(a) => commands::apply::apply(ctx, a).await,
        Command::Destroy(a) => commands::apply::destroy(ctx, a).await,
        Command::Version => commands::version(ctx).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Command {
        let mut full = vec!["berth"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full) {
            Ok(c) => c.command,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn launch_flags() {
        match parse(&[
            "launch",
            "debian/12",
            "web1",
            "-c",
            "limits.memory=512MiB",
            "--config",
            "limits.cpu=1",
            "--profile",
            "default",
            "-p",
            "web",
            "--target",
            "node2",
        ]) {
            Command::Launch(a) => {
                assert_eq!(a.image, "debian/12");
                assert_eq!(a.name, "web1");
                assert_eq!(a.config, ["limits.memory=512MiB", "limits.cpu=1"]);
                assert_eq!(a.profiles, ["default", "web"]);
                assert_eq!(a.target.as_deref(), Some("node2"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_flags() {
        match parse(&[
            "exec", "web1", "-T", "--env", "A=b", "--cwd", "/tmp", "--user", "1000", "--", "ls",
            "-la",
        ]) {
            Command::Exec(a) => {
                assert!(a.no_tty && !a.force_tty);
                assert_eq!(a.env, ["A=b"]);
                assert_eq!(a.cwd.as_deref(), Some("/tmp"));
                assert_eq!(a.user, Some(1000));
                assert_eq!(a.command, ["ls", "-la"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["berth", "exec", "web1", "-t", "-T", "--", "sh"]).is_err());
        assert!(Cli::try_parse_from(["berth", "exec", "web1"]).is_err());
    }

    #[test]
    fn list_and_stop_flags() {
        match parse(&["list", "--format", "json", "-c", "ns"]) {
            Command::List(a) => {
                assert_eq!(a.format, output::Format::Json);
                assert_eq!(a.columns, "ns");
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["berth", "list", "--format", "xml"]).is_err());
        match parse(&["stop", "a", "b", "--force", "--timeout", "5"]) {
            Command::Stop(a) => {
                assert_eq!(a.names, ["a", "b"]);
                assert!(a.force);
                assert_eq!(a.timeout, Some(5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tenancy_commands() {
        let cli = Cli::try_parse_from(["berth", "list", "--project", "team-a"]).unwrap();
        assert_eq!(cli.project.as_deref(), Some("team-a"));
        let cli = Cli::try_parse_from([
            "berth",
            "key",
            "create",
            "ci",
            "--role",
            "member",
            "--project",
            "p1",
            "--expires",
            "30d",
        ])
        .unwrap();
        assert_eq!(cli.project.as_deref(), Some("p1"));
        match cli.command {
            Command::Key {
                command:
                    key::KeyCommand::Create {
                        name,
                        role,
                        expires,
                    },
            } => {
                assert_eq!((name.as_str(), role.as_str()), ("ci", "member"));
                assert_eq!(expires.as_deref(), Some("30d"));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["berth", "key", "create", "ci"]).is_err());
        match parse(&["launch", "busybox", "b1", "--no-profiles"]) {
            Command::Launch(a) => assert!(a.no_profiles && a.profiles.is_empty()),
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["berth", "launch", "i", "n", "-p", "x", "--no-profiles"]).is_err()
        );
        match parse(&["monitor", "--type", "lifecycle,operation", "--all-projects"]) {
            Command::Monitor(a) => {
                assert_eq!(a.types, ["lifecycle", "operation"]);
                assert!(a.all_projects);
                assert_eq!(a.format, "pretty");
            }
            other => panic!("{other:?}"),
        }
        for args in [
            &[
                "project",
                "create",
                "p1",
                "-c",
                "limits.instances=3",
                "--description",
                "d",
            ][..],
            &["project", "info", "p1", "-f", "json"],
            &["project", "switch", "prod:p1"],
            &["profile", "assign", "web1", "web,small"],
            &[
                "profile",
                "copy",
                "web",
                "prod:web",
                "--target-project",
                "p2",
            ],
            &["operation", "list", "--all-projects"],
            &["operation", "wait", "abc", "--timeout", "5"],
            &["operation", "cancel", "abc"],
            &["remote", "add", "r", "https://h:8443", "--key", "-"],
            &["remote", "rename", "r", "s"],
            &["config", "show", "web1", "--expanded"],
            &["list", "--all-projects"],
        ] {
            let mut full = vec!["berth"];
            full.extend_from_slice(args);
            assert!(Cli::try_parse_from(full).is_ok(), "{args:?}");
        }
        assert!(
            Cli::try_parse_from(["berth", "remote", "add", "r", "https://h:8443"]).is_err(),
            "a key is required"
        );
    }

    #[test]
    fn nested_commands() {
        assert!(matches!(
            parse(&["file", "push", "-r", "-p", "a", "b", "web1/root/"]),
            Command::File { .. }
        ));
        assert!(matches!(
            parse(&["config", "set", "web1", "limits.cpu", "2"]),
            Command::Config { .. }
        ));
        assert!(matches!(
            parse(&["image", "alias", "create", "x", "abc"]),
            Command::Image { .. }
        ));
        assert!(matches!(
            parse(&["remote", "add", "r", "https://h:8443", "--key-file", "k"]),
            Command::Remote { .. }
        ));
        assert!(matches!(parse(&["version"]), Command::Version));
        assert!(Cli::try_parse_from(["berth", "file", "push", "only-one"]).is_err());
    }

    #[test]
    fn snapshot_copy_move_commands() {
        match parse(&["move", "web1", "--target", "node2"]) {
            Command::Move(a) => {
                assert_eq!(a.source, "web1");
                assert_eq!(a.destination, None);
                assert_eq!(a.target.as_deref(), Some("node2"));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["berth", "move", "web1"]).is_err());
        match parse(&[
            "copy",
            "web1/snap0",
            "web2",
            "--target",
            "n2",
            "--instance-only",
            "--refresh",
            "-c",
            "user.a=b",
            "-p",
            "web",
            "--start",
            "-q",
        ]) {
            Command::Copy(a) => {
                assert_eq!(
                    (a.source.as_str(), a.destination.as_str()),
                    ("web1/snap0", "web2")
                );
                assert!(a.instance_only && a.refresh && a.start && a.quiet);
                assert_eq!(a.config, ["user.a=b"]);
                assert_eq!(a.profiles, ["web"]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&[
            "publish",
            "web1/snap0",
            "prod:",
            "os=Debian",
            "--alias",
            "img",
            "--public",
        ]) {
            Command::Publish(a) => {
                assert_eq!(a.rest, ["prod:", "os=Debian"]);
                assert_eq!(a.aliases, ["img"]);
                assert!(a.public);
            }
            other => panic!("{other:?}"),
        }
        for args in [
            &["snapshot", "web1"][..],
            &["snapshot", "web1", "before"],
            &["restore", "web1", "snap0"],
            &["rename", "web1/snap0", "web1/snap1"],
            &["delete", "web1/snap0", "web2"],
            &[
                "cluster", "evacuate", "node1", "--action", "stop", "--force",
            ],
            &["cluster", "restore", "node1"],
            &["image", "export", "busybox", "/tmp"],
            &[
                "image", "copy", "busybox", "prod:", "--alias", "bb", "--public",
            ],
            &["image", "set-property", "busybox", "os", "Busybox"],
            &["image", "get-property", "busybox", "os"],
            &["image", "unset-property", "busybox", "os"],
            &["image", "edit", "busybox"],
            &["image", "show", "busybox"],
        ] {
            let mut full = vec!["berth"];
            full.extend_from_slice(args);
            assert!(Cli::try_parse_from(full).is_ok(), "{args:?}");
        }
        assert!(
            Cli::try_parse_from(["berth", "cluster", "evacuate", "n1", "--action", "drop"])
                .is_err()
        );
    }

    #[test]
    fn values_may_start_with_a_hyphen() {
        // Negative numbers reach the validators (which say what is wrong with them), and
        // options after KEY VALUE still count as options.
        for args in [
            &["project", "set", "auda", "limits.cpu", "-1"][..],
            &["project", "set", "auda", "limits.cpu=-1", "--project", "p"],
            &[
                "profile",
                "set",
                "web",
                "limits.cpu",
                "-1",
                "--project",
                "p",
            ],
            &["config", "set", "web1", "limits.cpu", "-1.5"],
            &["key", "create", "k", "--role", "member", "--expires", "-1d"],
            &["key", "rotate", "k", "--expires", "-1d"],
        ] {
            let mut full = vec!["berth"];
            full.extend_from_slice(args);
            let cli = Cli::try_parse_from(&full).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            if args.contains(&"--project") {
                assert_eq!(cli.project.as_deref(), Some("p"), "{args:?}");
            }
        }
        match parse(&["key", "create", "k", "--role", "member", "--expires", "-1d"]) {
            Command::Key {
                command: key::KeyCommand::Create { expires, .. },
            } => assert_eq!(expires.as_deref(), Some("-1d")),
            other => panic!("{other:?}"),
        }
    }
}
