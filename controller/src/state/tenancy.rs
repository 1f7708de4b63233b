//! Projects, profiles and quotas in the pure core: layered config, use against quota, the
//! restrictions of a project, ETags, and the apply arms of the project and profile commands.

use std::borrow::Cow;
use std::collections::BTreeMap;

use berth_proto::api::config::{self, MemoryLimit};
use sha2::{Digest, Sha256};

use super::command::{ApplyError, ApplyOk, ApplyResult};
use super::keys::ObjectKey;
use super::model::{
    DEFAULT_PROFILE, DEFAULT_PROJECT, Instance, Profile, Project, State, scoped_name,
    split_scoped_name,
};
use crate::scheduler::view::{CpuClaim, human_bytes};

/// What a project's instances use, per quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub instances: u64,
    pub cpu: u64,
    pub memory: u64,
    pub disk: u64,
    pub processes: u64,
}

/// The quotas, in the order messages and `project info` list them.
pub const QUOTAS: [&str; 5] = [
    "limits.instances",
    "limits.cpu",
    "limits.memory",
    "limits.disk",
    "limits.processes",
];

impl Usage {
    /// The use of one quota key.
    pub fn get(&self, key: &str) -> u64 {
        match key {
            "limits.instances" => self.instances,
            "limits.cpu" => self.cpu,
            "limits.memory" => self.memory,
            "limits.disk" => self.disk,
            "limits.processes" => self.processes,
            _ => 0,
        }
    }

    /// Adds one instance's config. Saturating: sizes are bounded by validation, but a sum
    /// must never wrap (a wrapped sum would pass any quota).
    fn add(&mut self, config: &BTreeMap<String, String>) {
        self.instances = self.instances.saturating_add(1);
        self.cpu = self
            .cpu
            .saturating_add(CpuClaim::from_config(config).map_or(0, |c| c.count()));
        self.memory = self.memory.saturating_add(
            match config.get("limits.memory").map(|v| config::parse_memory(v)) {
                Some(Ok(MemoryLimit::Bytes(b))) => b,
                _ => 0,
            },
        );
        self.disk = self.disk.saturating_add(
            config
                .get("limits.disk")
                .and_then(|v| config::parse_bytes(v).ok())
                .unwrap_or(0),
        );
        self.processes = self.processes.saturating_add(
            config
                .get("limits.processes")
                .and_then(|v| config::parse_processes(v).ok())
                .unwrap_or(0),
        );
    }
}

/// A figure of one quota for a message: bytes for memory and disk, a count otherwise.
fn figure(key: &str, n: u64) -> String {
    match key {
        "limits.memory" | "limits.disk" => human_bytes(n),
        "limits.cpu" => format!("{n} CPU{}", if n == 1 { "" } else { "s" }),
        "limits.instances" => format!("{n} instance{}", if n == 1 { "" } else { "s" }),
        _ => n.to_string(),
    }
}

/// "is" or "are" for `figure(key, n)` in use: an amount of bytes, or one of anything, is.
fn in_use_verb(key: &str, n: u64) -> &'static str {
    if n == 1 || matches!(key, "limits.memory" | "limits.disk") {
        "is"
    } else {
        "are"
    }
}

/// The description of the `default` profile made with a project.
pub fn default_profile_description(project: &str) -> String {
    format!("Default profile of project {project}")
}

/// The quotas of a project (`None`: unlimited), read from its config.
pub fn project_limit(project: Option<&Project>, key: &str) -> Option<u64> {
    project
        .and_then(|p| p.config.get(key))
        .and_then(|v| config::parse_project_limit(key, v).ok())
}

/// Whether a project is `restricted=true`.
pub fn project_restricted(project: Option<&Project>) -> bool {
    project
        .and_then(|p| p.config.get("restricted"))
        .is_some_and(|v| config::parse_bool("restricted", v).unwrap_or(false))
}

/// The changes a quota check weighs: instances replaced (or added, or removed with `None`)
/// and a profile given a new config.
#[derive(Default)]
pub struct Change<'a> {
    pub instances: Vec<(&'a str, Option<&'a Instance>)>,
    pub profile: Option<&'a Profile>,
}

impl State {
    /// The config an instance runs with: its profiles' config in the order it lists them, then
    /// its own config on top (LXD's layering). Borrowed when no profile adds anything.
    pub fn effective_config<'a>(&'a self, i: &'a Instance) -> Cow<'a, BTreeMap<String, String>> {
        self.effective_config_with(i, None)
    }

    fn effective_config_with<'a>(
        &'a self,
        i: &'a Instance,
        profile_override: Option<&Profile>,
    ) -> Cow<'a, BTreeMap<String, String>> {
        let mut out: Option<BTreeMap<String, String>> = None;
        for p in &i.profiles {
            let key = scoped_name(&i.project, p);
            let config = match profile_override {
                Some(o) if o.name == key => &o.config,
                _ => match self.profiles.get(&key) {
                    Some(profile) => &profile.config,
                    None => continue,
                },
            };
            if config.is_empty() {
                continue;
            }
            let merged = out.get_or_insert_with(BTreeMap::new);
            for (k, v) in config {
                merged.insert(k.clone(), v.clone());
            }
        }
        match out {
            None => Cow::Borrowed(&i.config),
            Some(mut merged) => {
                for (k, v) in &i.config {
                    merged.insert(k.clone(), v.clone());
                }
                Cow::Owned(merged)
            }
        }
    }

    /// What the instances of `project` use.
    pub fn project_usage(&self, project: &str) -> Usage {
        self.usage_with(project, &Change::default())
    }

    fn usage_with(&self, project: &str, change: &Change<'_>) -> Usage {
        let mut usage = Usage::default();
        for i in self.instances.values().filter(|i| i.project == project) {
            if change.instances.iter().any(|(k, _)| *k == i.name) {
                continue;
            }
            usage.add(&self.effective_config_with(i, change.profile));
        }
        for i in change.instances.iter().filter_map(|(_, i)| *i) {
            usage.add(&self.effective_config_with(i, change.profile));
        }
        usage
    }

    /// Checks `change` against the quotas and restrictions of `project`: the instances it
    /// touches must set every limited resource (memory as a size, not a share of the host)
    /// and must not be privileged in a restricted project, and no quota may end up exceeded
    /// by a change that adds to its use.
    pub fn check_project_change(
        &self,
        project: &str,
        change: &Change<'_>,
    ) -> Result<(), ApplyError> {
        let p = self.projects.get(project);
        let touched: Vec<&Instance> = match change.profile {
            Some(profile) => {
                let short = profile.short_name();
                self.instances
                    .values()
                    .filter(|i| i.project == project && i.profiles.iter().any(|n| n == short))
                    .collect()
            }
            None => change.instances.iter().filter_map(|(_, i)| *i).collect(),
        };
        for i in &touched {
            let config = self.effective_config_with(i, change.profile);
            check_instance_in_project(project, p, short(&i.name), &config)?;
        }
        // Use is summed over the project's instances only when a quota needs it.
        if QUOTAS.iter().all(|key| project_limit(p, key).is_none()) {
            return Ok(());
        }
        let before = self.project_usage(project);
        let after = self.usage_with(project, change);
        for key in QUOTAS {
            let Some(limit) = project_limit(p, key) else {
                continue;
            };
            let (was, will) = (before.get(key), after.get(key));
            if will > limit && will > was {
                return Err(ApplyError::forbidden(format!(
                    "project {project:?} has a {key} quota of {}: {} {} in use and this needs {} more",
                    figure(key, limit),
                    figure(key, was),
                    in_use_verb(key, was),
                    figure(key, will.saturating_sub(was)),
                )));
            }
        }
        Ok(())
    }

    /// Checks a new project config against what the project already holds: every instance
    /// must set each resource now limited, and no quota may be below its use.
    fn check_project_config(&self, name: &str, candidate: &Project) -> Result<(), ApplyError> {
        for i in self.instances.values().filter(|i| i.project == name) {
            let config = self.effective_config(i);
            check_instance_in_project(name, Some(candidate), short(&i.name), &config)?;
        }
        let usage = self.project_usage(name);
        for key in QUOTAS {
            if let Some(limit) = project_limit(Some(candidate), key) {
                let used = usage.get(key);
                if used > limit {
                    return Err(ApplyError::forbidden(format!(
                        "{key} of project {name:?} cannot be {}: its instances already use {}",
                        figure(key, limit),
                        figure(key, used)
                    )));
                }
            }
        }
        Ok(())
    }

    /// The ETag of an object's writable part (what PUT replaces), `None` if it does not exist.
    /// Pure, so `IfMatch` can compare it inside apply.
    pub fn etag(&self, key: &ObjectKey) -> Option<String> {
        let value =
            match key {
                ObjectKey::Instance(n) => self.instances.get(n).map(|i| {
                    serde_json::json!({
                        "description": i.description,
                        "config": i.config,
                        "profiles": i.profiles,
                    })
                }),
                ObjectKey::Profile(n) => self.profiles.get(n).map(
                    |p| serde_json::json!({ "description": p.description, "config": p.config }),
                ),
                ObjectKey::Project(n) => self.projects.get(n).map(
                    |p| serde_json::json!({ "description": p.description, "config": p.config }),
                ),
                ObjectKey::Alias(n) => self.aliases.get(n).map(
                    |a| serde_json::json!({ "description": a.description, "target": a.target }),
                ),
                ObjectKey::Image(n) => self
                    .images
                    .get(n)
                    .map(|i| serde_json::json!({ "properties": i.properties })),
                ObjectKey::Node(n) => self
                    .nodes
                    .get(n)
                    .map(|n| serde_json::json!({ "config": n.config })),
                ObjectKey::Cluster => Some(serde_json::json!({ "config": self.cluster.config })),
                _ => None,
            }?;
        let bytes = serde_json::to_vec(&value).ok()?;
        Some(hex::encode(Sha256::digest(&bytes)))
    }

    /// Whether objects of `project` may use `image`: public images and those of the default
    /// project (or of no project) are shared; others only by the projects that hold them.
    pub fn image_visible(&self, image: &super::model::Image, project: &str) -> bool {
        image.public
            || image.projects.is_empty()
            || image.projects.contains(DEFAULT_PROJECT)
            || image.projects.contains(project)
    }

    /// Finds an image for `project`: an alias of the project, then one of the default
    /// project, then a fingerprint (or unique prefix) of an image the project may use.
    pub fn resolve_image_in(&self, project: &str, key: &str) -> Option<&super::model::Image> {
        // `@` is the separator of other projects' alias keys: never part of a name asked for.
        if key.contains('@') {
            return None;
        }
        for p in [project, DEFAULT_PROJECT] {
            if let Some(alias) = self.aliases.get(&super::model::alias_key(p, key)) {
                return self
                    .images
                    .get(&alias.target)
                    .filter(|i| self.image_visible(i, project));
            }
        }
        if let Some(image) = self.images.get(key) {
            return Some(image).filter(|i| self.image_visible(i, project));
        }
        // A unique prefix among the images this project may use (others cannot make it
        // ambiguous, and are never found).
        if key.len() < super::model::MIN_FINGERPRINT_PREFIX
            || !key.chars().all(|c| c.is_ascii_hexdigit())
        {
            return None;
        }
        let mut matches = self
            .images
            .range(key.to_string()..)
            .take_while(|(fp, _)| fp.starts_with(key))
            .map(|(_, image)| image)
            .filter(|i| self.image_visible(i, project));
        let first = matches.next()?;
        match matches.next() {
            Some(_) => None,
            None => Some(first),
        }
    }

    pub(super) fn apply_tenancy(&mut self, cmd: super::Command) -> ApplyResult {
        use super::Command;
        match cmd {
            Command::CreateProject { project } => {
                if self.projects.contains_key(&project.name) {
                    return Err(ApplyError::conflict(format!(
                        "project {:?} already exists",
                        project.name
                    )));
                }
                let profile = Profile {
                    name: scoped_name(&project.name, DEFAULT_PROFILE),
                    project: project.name.clone(),
                    description: default_profile_description(&project.name),
                    config: BTreeMap::new(),
                };
                self.profiles.insert(profile.name.clone(), profile);
                self.projects.insert(project.name.clone(), project);
                Ok(ApplyOk::Done)
            }
            Command::UpdateProject {
                name,
                description,
                config,
            } => {
                let mut candidate = self
                    .projects
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| project_not_found(&name))?;
                candidate.description = description;
                candidate.config = config;
                self.check_project_config(&name, &candidate)?;
                self.projects.insert(name, candidate);
                Ok(ApplyOk::Done)
            }
            Command::RenameProject { from, to } => {
                if from == DEFAULT_PROJECT {
                    return Err(ApplyError::invalid("the default project cannot be renamed"));
                }
                if self.projects.contains_key(&to) {
                    return Err(ApplyError::conflict(format!(
                        "project {to:?} already exists"
                    )));
                }
                self.check_project_empty(&from, "renamed")?;
                self.forget_project_operations(&from);
                let mut p = self
                    .projects
                    .remove(&from)
                    .ok_or_else(|| project_not_found(&from))?;
                p.name = to.clone();
                self.projects.insert(to.clone(), p);
                if let Some(mut profile) =
                    self.profiles.remove(&scoped_name(&from, DEFAULT_PROFILE))
                {
                    profile.name = scoped_name(&to, DEFAULT_PROFILE);
                    // The generated description names the project: it follows the rename.
                    if profile.description == default_profile_description(&from) {
                        profile.description = default_profile_description(&to);
                    }
                    profile.project = to;
                    self.profiles.insert(profile.name.clone(), profile);
                }
                Ok(ApplyOk::Done)
            }
            Command::DeleteProject { name } => {
                if name == DEFAULT_PROJECT {
                    return Err(ApplyError::invalid("the default project cannot be deleted"));
                }
                if !self.projects.contains_key(&name) {
                    return Err(project_not_found(&name));
                }
                self.check_project_empty(&name, "deleted")?;
                self.forget_project_operations(&name);
                self.projects.remove(&name);
                self.profiles.remove(&scoped_name(&name, DEFAULT_PROFILE));
                Ok(ApplyOk::Done)
            }
            Command::CreateProfile { profile } => {
                if !self.project_exists(&profile.project) {
                    return Err(project_not_found(&profile.project));
                }
                if self.profiles.contains_key(&profile.name) {
                    return Err(ApplyError::conflict(format!(
                        "profile {:?} already exists",
                        profile.short_name()
                    )));
                }
                self.profiles.insert(profile.name.clone(), profile);
                Ok(ApplyOk::Done)
            }
            Command::UpdateProfile {
                name,
                description,
                config,
            } => {
                let mut candidate = self
                    .profiles
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| profile_not_found(&name))?;
                candidate.description = description;
                candidate.config = config;
                let change = Change {
                    instances: Vec::new(),
                    profile: Some(&candidate),
                };
                self.check_project_change(&candidate.project, &change)?;
                self.profiles.insert(name, candidate);
                Ok(ApplyOk::Done)
            }
            Command::RenameProfile { from, to } => {
                let profile = self
                    .profiles
                    .get(&from)
                    .ok_or_else(|| profile_not_found(&from))?;
                if profile.short_name() == DEFAULT_PROFILE {
                    return Err(ApplyError::invalid("the default profile cannot be renamed"));
                }
                let (to_project, to_short) = split_scoped_name(&to);
                if to_project != profile.project {
                    return Err(ApplyError::invalid(
                        "a profile cannot be renamed into another project",
                    ));
                }
                if self.profiles.contains_key(&to) {
                    return Err(ApplyError::conflict(format!(
                        "profile {to_short:?} already exists"
                    )));
                }
                let (project, old_short, new_short) = (
                    profile.project.clone(),
                    profile.short_name().to_string(),
                    to_short.to_string(),
                );
                if let Some(mut p) = self.profiles.remove(&from) {
                    p.name = to.clone();
                    self.profiles.insert(to, p);
                }
                for i in self.instances.values_mut().filter(|i| i.project == project) {
                    for p in i.profiles.iter_mut().filter(|p| **p == old_short) {
                        *p = new_short.clone();
                    }
                }
                Ok(ApplyOk::Done)
            }
            Command::DeleteProfile { name } => {
                let profile = self
                    .profiles
                    .get(&name)
                    .ok_or_else(|| profile_not_found(&name))?;
                if profile.short_name() == DEFAULT_PROFILE {
                    return Err(ApplyError::invalid("the default profile cannot be deleted"));
                }
                let short = profile.short_name();
                if let Some(user) = self
                    .instances
                    .values()
                    .find(|i| i.project == profile.project && i.profiles.iter().any(|p| p == short))
                {
                    return Err(ApplyError::conflict(format!(
                        "profile {short:?} is used by instance {:?}",
                        self::short(&user.name)
                    )));
                }
                self.profiles.remove(&name);
                Ok(ApplyOk::Done)
            }
            other => Err(ApplyError::invalid(format!(
                "not a project or profile command: {other:?}"
            ))),
        }
    }

    /// Whether a project exists (`default` always does).
    pub fn project_exists(&self, name: &str) -> bool {
        name == DEFAULT_PROJECT || self.projects.contains_key(name)
    }

    /// Checks that an instance may have `profiles` in `project`: each exists there, none twice.
    pub fn check_profiles(&self, project: &str, profiles: &[String]) -> Result<(), ApplyError> {
        for (n, p) in profiles.iter().enumerate() {
            if profiles[..n].contains(p) {
                return Err(ApplyError::invalid(format!(
                    "profile {p:?} is listed twice"
                )));
            }
            let implicit_default = project == DEFAULT_PROJECT && p == DEFAULT_PROFILE;
            if !implicit_default && !self.profiles.contains_key(&scoped_name(project, p)) {
                return Err(ApplyError::not_found(format!("profile {p:?} not found")));
            }
        }
        Ok(())
    }

    /// Drops the (finished) operations of a project that goes away or changes its name, so
    /// that a new project of the same name never sees them.
    fn forget_project_operations(&mut self, name: &str) {
        self.operations.retain(|_, op| op.project != name);
    }

    fn check_project_empty(&self, name: &str, what: &str) -> Result<(), ApplyError> {
        let running = self
            .operations
            .values()
            .filter(|op| op.project == name && !op.status.is_final())
            .count();
        if running > 0 {
            return Err(ApplyError::conflict(format!(
                "project {name:?} cannot be {what}: it still has {running} running operation{}",
                if running == 1 { "" } else { "s" }
            )));
        }
        let busy = |kind: &str, n: usize| {
            ApplyError::conflict(format!(
                "project {name:?} cannot be {what}: it still has {n} {kind}"
            ))
        };
        let n = self
            .instances
            .values()
            .filter(|i| i.project == name)
            .count();
        if n > 0 {
            return Err(busy(if n == 1 { "instance" } else { "instances" }, n));
        }
        let n = self
            .profiles
            .values()
            .filter(|p| p.project == name && p.short_name() != DEFAULT_PROFILE)
            .count();
        if n > 0 {
            return Err(busy(if n == 1 { "profile" } else { "profiles" }, n));
        }
        let n = self.aliases.values().filter(|a| a.project == name).count();
        if n > 0 {
            return Err(busy(
                if n == 1 {
                    "image alias"
                } else {
                    "image aliases"
                },
                n,
            ));
        }
        let n = self
            .images
            .values()
            .filter(|i| i.projects.contains(name))
            .count();
        if n > 0 {
            return Err(busy(if n == 1 { "image" } else { "images" }, n));
        }
        let n = self
            .api_keys
            .values()
            .filter(|k| k.role.is_project_scoped() && k.project == name)
            .count();
        if n > 0 {
            return Err(busy(if n == 1 { "API key" } else { "API keys" }, n));
        }
        Ok(())
    }
}

/// An instance's own name (without its project prefix).
fn short(scoped: &str) -> &str {
    split_scoped_name(scoped).1
}

fn project_not_found(name: &str) -> ApplyError {
    ApplyError::not_found(format!("project {name:?} not found"))
}

fn profile_not_found(scoped: &str) -> ApplyError {
    ApplyError::not_found(format!("profile {:?} not found", short(scoped)))
}

/// One instance's config against its project: limited resources must be set (memory as a
/// size), and a restricted project allows no privileged instance.
fn check_instance_in_project(
    project: &str,
    p: Option<&Project>,
    instance: &str,
    config: &BTreeMap<String, String>,
) -> Result<(), ApplyError> {
    if project_restricted(p) {
        if config.contains_key("placement.constraints") {
            return Err(ApplyError::forbidden(format!(
                "project {project:?} is restricted: instance {instance:?} cannot choose nodes with placement.constraints"
            )));
        }
        for key in ["security.privileged", "security.nesting"] {
            if config
                .get(key)
                .is_some_and(|v| config::parse_bool(key, v).unwrap_or(false))
            {
                return Err(ApplyError::forbidden(format!(
                    "project {project:?} is restricted: instance {instance:?} cannot set {key}=true"
                )));
            }
        }
    }
    for key in [
        "limits.cpu",
        "limits.memory",
        "limits.disk",
        "limits.processes",
    ] {
        if project_limit(p, key).is_none() {
            continue;
        }
        match config.get(key) {
            None => {
                return Err(ApplyError::forbidden(format!(
                    "project {project:?} has a {key} quota, so instance {instance:?} must set {key} (itself or through a profile)"
                )));
            }
            Some(v) if key == "limits.memory" && v.trim().ends_with('%') => {
                return Err(ApplyError::forbidden(format!(
                    "project {project:?} has a limits.memory quota, so instance {instance:?} must set limits.memory as a size, not {v:?}"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod wording_tests {
    use super::super::command::Command;
    use super::*;

    #[test]
    fn one_of_anything_and_bytes_are_singular() {
        let sentence =
            |key: &str, n: u64| format!("{} {} in use", figure(key, n), in_use_verb(key, n));
        assert_eq!(sentence("limits.cpu", 1), "1 CPU is in use");
        assert_eq!(sentence("limits.cpu", 4), "4 CPUs are in use");
        assert_eq!(sentence("limits.instances", 1), "1 instance is in use");
        assert_eq!(sentence("limits.instances", 0), "0 instances are in use");
        assert_eq!(in_use_verb("limits.memory", 2 << 30), "is");
        assert_eq!(in_use_verb("limits.processes", 1), "is");
    }

    #[test]
    fn a_renamed_projects_default_profile_names_the_new_name() {
        let mut s = State::default();
        for cmd in [
            Command::CreateProject {
                project: Project {
                    name: "p".into(),
                    ..Default::default()
                },
            },
            Command::RenameProject {
                from: "p".into(),
                to: "q".into(),
            },
        ] {
            s.apply(cmd).unwrap();
        }
        let profile = &s.profiles[&scoped_name("q", DEFAULT_PROFILE)];
        assert_eq!(profile.description, "Default profile of project q");
        // A description the user wrote stays.
        s.apply(Command::UpdateProfile {
            name: scoped_name("q", DEFAULT_PROFILE),
            description: "ours".into(),
            config: Default::default(),
        })
        .unwrap();
        s.apply(Command::RenameProject {
            from: "q".into(),
            to: "r".into(),
        })
        .unwrap();
        assert_eq!(
            s.profiles[&scoped_name("r", DEFAULT_PROFILE)].description,
            "ours"
        );
    }
}
