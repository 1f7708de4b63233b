//! Declarative stacks for `berth apply`: the file format, its validation, and the plan (what
//! to create, update in place, replace or delete to make the cluster match the file).
//!
//! Everything here is pure: [`plan`] compares a [`Stack`] with an [`Actual`] snapshot read
//! from the API. Objects a stack creates carry `user.berth.stack=<stack>` in their config
//! (image aliases: a `[berth-stack:<stack>]` mark in their description), so a later apply
//! deletes only what it made and leaves everything else alone.

use std::collections::BTreeMap;
use std::fmt;

use berth_proto::api::{config, names};
use serde::Deserialize;

/// The config key that marks what a stack manages.
pub const STACK_KEY: &str = "user.berth.stack";
/// The config key recording the image reference an instance was made from.
pub const IMAGE_KEY: &str = "user.berth.stack.image";
/// The default project.
pub const DEFAULT_PROJECT: &str = "default";

/// A stack file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stack {
    /// The stack's name: what marks the objects it manages.
    pub stack: String,
    #[serde(default)]
    pub projects: Vec<ProjectSpec>,
    #[serde(default)]
    pub profiles: Vec<ProfileSpec>,
    #[serde(default)]
    pub image_aliases: Vec<AliasSpec>,
    #[serde(default)]
    pub instances: Vec<InstanceSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, deserialize_with = "scalar_map")]
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    pub name: String,
    #[serde(default = "default_project")]
    pub project: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, deserialize_with = "scalar_map")]
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasSpec {
    pub name: String,
    #[serde(default = "default_project")]
    pub project: String,
    /// An image alias or fingerprint the alias points at.
    pub image: String,
    #[serde(default)]
    pub description: String,
}

/// What an instance should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    #[default]
    Running,
    Stopped,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub name: String,
    #[serde(default = "default_project")]
    pub project: String,
    /// Image alias or fingerprint.
    pub image: String,
    #[serde(default)]
    pub description: String,
    /// Profiles in order (default: `[default]`).
    #[serde(default = "default_profiles")]
    pub profiles: Vec<String>,
    #[serde(default, deserialize_with = "scalar_map")]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub state: DesiredState,
    /// The node to place it on (empty: the scheduler chooses).
    #[serde(default)]
    pub target: String,
}

fn default_project() -> String {
    DEFAULT_PROJECT.to_string()
}

fn default_profiles() -> Vec<String> {
    vec!["default".to_string()]
}

/// Config values may be written as YAML numbers or booleans; they are strings to the API.
fn scalar_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, serde_yaml::Value> = BTreeMap::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let s = match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(serde::de::Error::custom(format!(
                        "config value of {k} must be a string, a number or a boolean"
                    )));
                }
            };
            Ok((k, s))
        })
        .collect()
}

/// Parses and validates a stack file; errors are one sentence (with line and column for
/// YAML that is not a stack).
pub fn parse(text: &str) -> Result<Stack, String> {
    let stack: Stack = serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(" at line {} column {}", l.line(), l.column()))
            .unwrap_or_default();
        let msg = e.to_string();
        // serde_yaml appends its own " at line X column Y"; keep one.
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        format!("the stack file is not valid{at}: {msg}")
    })?;
    stack.validate()?;
    Ok(stack)
}

impl Stack {
    fn validate(&self) -> Result<(), String> {
        names::validate_instance_name(&self.stack)
            .map_err(|e| e.replacen("instance name", "stack name", 1))?;
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.projects {
            names::validate_project_name(&p.name)?;
            config::validate_project(&p.config).map_err(|e| format!("project {}: {e}", p.name))?;
            no_reserved(&p.config, &format!("project {}", p.name))?;
            if !seen.insert(("project", String::new(), p.name.clone())) {
                return Err(format!("project {} is listed twice", p.name));
            }
        }
        for p in &self.profiles {
            names::validate_project_name(&p.project)?;
            names::validate_profile_name(&p.name)?;
            config::validate(&p.config).map_err(|e| format!("profile {}: {e}", p.name))?;
            no_reserved(&p.config, &format!("profile {}", p.name))?;
            if !seen.insert(("profile", p.project.clone(), p.name.clone())) {
                return Err(format!("profile {}/{} is listed twice", p.project, p.name));
            }
        }
        for a in &self.image_aliases {
            names::validate_project_name(&a.project)?;
            names::validate_image_alias(&a.name)?;
            if a.image.trim().is_empty() {
                return Err(format!("image alias {} names no image", a.name));
            }
            if !seen.insert(("alias", a.project.clone(), a.name.clone())) {
                return Err(format!(
                    "image alias {}/{} is listed twice",
                    a.project, a.name
                ));
            }
        }
        for i in &self.instances {
            names::validate_project_name(&i.project)?;
            names::validate_instance_name(&i.name)?;
            if i.image.trim().is_empty() {
                return Err(format!("instance {} names no image", i.name));
            }
            for p in &i.profiles {
                names::validate_profile_name(p)?;
            }
            config::validate(&i.config).map_err(|e| format!("instance {}: {e}", i.name))?;
            no_reserved(&i.config, &format!("instance {}", i.name))?;
            if !seen.insert(("instance", i.project.clone(), i.name.clone())) {
                return Err(format!("instance {}/{} is listed twice", i.project, i.name));
            }
        }
        Ok(())
    }
}

fn no_reserved(config: &BTreeMap<String, String>, what: &str) -> Result<(), String> {
    match config.keys().find(|k| k.starts_with(STACK_KEY)) {
        Some(k) => Err(format!("{what}: {k} is set by berth apply itself")),
        None => Ok(()),
    }
}

/// The alias description with the stack's mark.
pub fn alias_description(stack: &str, description: &str) -> String {
    let mark = format!("[berth-stack:{stack}]");
    if description.is_empty() {
        mark
    } else {
        format!("{description} {mark}")
    }
}

/// The stack an alias description marks, and the description without the mark.
pub fn alias_mark(description: &str) -> (Option<&str>, &str) {
    if let Some(start) = description.rfind("[berth-stack:")
        && description.ends_with(']')
    {
        let stack = &description[start + 13..description.len() - 1];
        return (Some(stack), description[..start].trim_end());
    }
    (None, description)
}

/// What exists, as read from the API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Actual {
    /// Node names, when the key may list them.
    pub nodes: Option<Vec<String>>,
    pub projects: Vec<ActualObject>,
    pub profiles: Vec<ActualObject>,
    pub aliases: Vec<ActualAlias>,
    pub instances: Vec<ActualInstance>,
}

/// A project or a profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActualObject {
    pub project: String,
    pub name: String,
    pub description: String,
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActualAlias {
    pub project: String,
    pub name: String,
    pub target: String,
    pub description: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActualInstance {
    pub project: String,
    pub name: String,
    pub description: String,
    /// The instance's own config.
    pub config: BTreeMap<String, String>,
    pub profiles: Vec<String>,
    /// Image fingerprint.
    pub image: String,
    /// `Running`, `Stopped`, ...
    pub status: String,
    pub location: String,
}

/// The kind of a planned object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Project,
    Profile,
    Alias,
    Instance,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Project => "project",
            Kind::Profile => "profile",
            Kind::Alias => "image alias",
            Kind::Instance => "instance",
        })
    }
}

/// What to do with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Create,
    /// Change in place; the list says what changes.
    Update(Vec<String>),
    /// Delete and create again; the string says why.
    Replace(String),
    Delete,
    Nothing,
}

/// One line of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    pub project: String,
    pub name: String,
    pub action: Action,
}

impl Change {
    /// `project/name` (projects: their name).
    pub fn label(&self) -> String {
        if self.kind == Kind::Project {
            self.name.clone()
        } else {
            format!("{}/{}", self.project, self.name)
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (word, detail) = match &self.action {
            Action::Create => ("create", String::new()),
            Action::Update(what) => ("update", format!(" (in place: {})", what.join(", "))),
            Action::Replace(why) => ("replace", format!(" ({why})")),
            Action::Delete => ("delete", String::new()),
            Action::Nothing => ("ok", " (nothing to do)".to_string()),
        };
        write!(f, "{word:<8} {} {}{detail}", self.kind, self.label())
    }
}

/// Counts of a plan, for its last line.
pub fn summary(changes: &[Change]) -> String {
    let count = |f: fn(&Action) -> bool| changes.iter().filter(|c| f(&c.action)).count();
    let (c, u, r, d) = (
        count(|a| matches!(a, Action::Create)),
        count(|a| matches!(a, Action::Update(_))),
        count(|a| matches!(a, Action::Replace(_))),
        count(|a| matches!(a, Action::Delete)),
    );
    if c + u + r + d == 0 {
        "No changes: the cluster matches the stack.".to_string()
    } else {
        format!("Plan: {c} to create, {u} to update in place, {r} to replace, {d} to delete.")
    }
}

/// Whether a plan changes anything.
pub fn has_changes(changes: &[Change]) -> bool {
    changes.iter().any(|c| c.action != Action::Nothing)
}

/// The config a stack object should have: its own plus the stack mark.
pub fn managed_config(stack: &str, config: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut c = config.clone();
    c.insert(STACK_KEY.to_string(), stack.to_string());
    c
}

/// Keys that differ between `want` and `have` (added, changed or removed), ignoring the
/// server's own `image.*` and `volatile.*` keys.
fn config_diff(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> Vec<String> {
    let server = |k: &str| k.starts_with("image.") || k.starts_with("volatile.");
    let mut keys: Vec<String> = want
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    keys.extend(
        have.keys()
            .filter(|k| !server(k) && !want.contains_key(*k))
            .cloned(),
    );
    keys.sort();
    keys
}

fn describe_keys(keys: &[String]) -> String {
    format!("config {}", keys.join(" "))
}

/// Checks, before anything is planned or changed, what would make the apply fail half-way:
/// objects in a project that neither exists (for this key) nor is declared, images that do not
/// resolve, and target nodes that do not exist (when the key may list nodes). The error names
/// the object.
pub fn check(
    stack: &Stack,
    actual: &Actual,
    fingerprint: &dyn Fn(&str, &str) -> Option<String>,
) -> Result<(), String> {
    let project_known = |p: &str| {
        actual.projects.iter().any(|a| a.name == p) || stack.projects.iter().any(|s| s.name == p)
    };
    let missing_project = |kind: &str, project: &str, name: &str| {
        format!(
            "{kind} {project}/{name}: project {project} does not exist (or this key cannot see it) and the stack does not declare it"
        )
    };
    // An image is found when the server resolves it, or when the stack itself makes an alias
    // of that name (in the project, or in the default project every project falls back to).
    let image_known = |project: &str, image: &str| {
        fingerprint(project, image).is_some()
            || stack.image_aliases.iter().any(|a| {
                a.name == image
                    && (a.project == project || a.project == DEFAULT_PROJECT)
                    && fingerprint(&a.project, &a.image).is_some()
            })
    };
    for p in &stack.profiles {
        if !project_known(&p.project) {
            return Err(missing_project("profile", &p.project, &p.name));
        }
    }
    for a in &stack.image_aliases {
        if !project_known(&a.project) {
            return Err(missing_project("image alias", &a.project, &a.name));
        }
        if fingerprint(&a.project, &a.image).is_none() {
            return Err(format!(
                "image alias {}/{}: image {} not found",
                a.project, a.name, a.image
            ));
        }
    }
    for i in &stack.instances {
        if !project_known(&i.project) {
            return Err(missing_project("instance", &i.project, &i.name));
        }
        if !image_known(&i.project, &i.image) {
            return Err(format!(
                "instance {}/{}: image {} not found",
                i.project, i.name, i.image
            ));
        }
        if let Some(nodes) = &actual.nodes
            && !i.target.is_empty()
            && !nodes.contains(&i.target)
        {
            return Err(format!(
                "instance {}/{}: node {} does not exist",
                i.project, i.name, i.target
            ));
        }
    }
    Ok(())
}

/// Computes the plan: per object of the stack, create, update in place, replace or nothing;
/// then a delete for every object marked with this stack that the file no longer lists.
/// `fingerprint(project, image)` resolves an image reference when it can (for replace
/// decisions when an alias now points elsewhere).
pub fn plan(
    stack: &Stack,
    actual: &Actual,
    fingerprint: &dyn Fn(&str, &str) -> Option<String>,
) -> Vec<Change> {
    let mut out = Vec::new();
    let change = |kind, project: &str, name: &str, action| Change {
        kind,
        project: project.to_string(),
        name: name.to_string(),
        action,
    };
    for p in &stack.projects {
        let want = if p.name == DEFAULT_PROJECT {
            p.config.clone()
        } else {
            managed_config(&stack.stack, &p.config)
        };
        let action = match actual.projects.iter().find(|a| a.name == p.name) {
            None => Action::Create,
            Some(a) => update_action(&want, &a.config, &p.description, &a.description, &[]),
        };
        out.push(change(Kind::Project, &p.name, &p.name, action));
    }
    for p in &stack.profiles {
        let want = managed_config(&stack.stack, &p.config);
        let action = match actual
            .profiles
            .iter()
            .find(|a| a.project == p.project && a.name == p.name)
        {
            // Every project has its default profile from its creation: the stack sets it.
            None if p.name == "default" => {
                update_action(&p.config, &BTreeMap::new(), &p.description, "", &[])
            }
            None => Action::Create,
            Some(a) => {
                // The default profile exists in every project: the stack may manage its config.
                let want = if p.name == "default" {
                    p.config.clone()
                } else {
                    want
                };
                update_action(&want, &a.config, &p.description, &a.description, &[])
            }
        };
        out.push(change(Kind::Profile, &p.project, &p.name, action));
    }
    for a in &stack.image_aliases {
        let action = match actual
            .aliases
            .iter()
            .find(|x| x.project == a.project && x.name == a.name)
        {
            None => Action::Create,
            Some(x) => {
                let mut what = Vec::new();
                match fingerprint(&a.project, &a.image) {
                    Some(fp) if fp != x.target => what.push(format!("target {}", short(&fp))),
                    _ => {}
                }
                let (_, desc) = alias_mark(&x.description);
                if desc != a.description {
                    what.push("description".into());
                }
                if what.is_empty() {
                    Action::Nothing
                } else {
                    Action::Update(what)
                }
            }
        };
        out.push(change(Kind::Alias, &a.project, &a.name, action));
    }
    for i in &stack.instances {
        let mut want = managed_config(&stack.stack, &i.config);
        want.insert(IMAGE_KEY.to_string(), i.image.clone());
        let action = match actual
            .instances
            .iter()
            .find(|x| x.project == i.project && x.name == i.name)
        {
            None => Action::Create,
            Some(x) => instance_action(i, &want, x, fingerprint),
        };
        out.push(change(Kind::Instance, &i.project, &i.name, action));
    }
    // Deletes: marked objects the file no longer lists, instances first.
    let marked = |c: &BTreeMap<String, String>| c.get(STACK_KEY) == Some(&stack.stack);
    for x in &actual.instances {
        if marked(&x.config)
            && !stack
                .instances
                .iter()
                .any(|i| i.project == x.project && i.name == x.name)
        {
            out.push(change(Kind::Instance, &x.project, &x.name, Action::Delete));
        }
    }
    for x in &actual.aliases {
        if alias_mark(&x.description).0 == Some(stack.stack.as_str())
            && !stack
                .image_aliases
                .iter()
                .any(|a| a.project == x.project && a.name == x.name)
        {
            out.push(change(Kind::Alias, &x.project, &x.name, Action::Delete));
        }
    }
    for x in &actual.profiles {
        if marked(&x.config)
            && x.name != "default"
            && !stack
                .profiles
                .iter()
                .any(|p| p.project == x.project && p.name == x.name)
        {
            out.push(change(Kind::Profile, &x.project, &x.name, Action::Delete));
        }
    }
    for x in &actual.projects {
        if marked(&x.config)
            && x.name != DEFAULT_PROJECT
            && !stack.projects.iter().any(|p| p.name == x.name)
        {
            out.push(change(Kind::Project, &x.name, &x.name, Action::Delete));
        }
    }
    out
}

fn update_action(
    want: &BTreeMap<String, String>,
    have: &BTreeMap<String, String>,
    want_desc: &str,
    have_desc: &str,
    extra: &[String],
) -> Action {
    let mut what = Vec::new();
    let keys = config_diff(want, have);
    if !keys.is_empty() {
        what.push(describe_keys(&keys));
    }
    if want_desc != have_desc {
        what.push("description".into());
    }
    what.extend(extra.iter().cloned());
    if what.is_empty() {
        Action::Nothing
    } else {
        Action::Update(what)
    }
}

/// The first 12 characters of a fingerprint (it comes from the server: never slice a byte
/// offset that might fall inside a character).
fn short(fp: &str) -> &str {
    fp.get(..12).unwrap_or(fp)
}

fn instance_action(
    i: &InstanceSpec,
    want: &BTreeMap<String, String>,
    x: &ActualInstance,
    fingerprint: &dyn Fn(&str, &str) -> Option<String>,
) -> Action {
    let had_image = x.config.get(IMAGE_KEY).map(String::as_str);
    let now_fp = fingerprint(&i.project, &i.image);
    // Another reference to the same image (an alias of it) only updates the recorded one.
    let same_image = now_fp.as_deref() == Some(x.image.as_str()) && !x.image.is_empty();
    if let Some(had) = had_image
        && had != i.image
        && !same_image
    {
        return Action::Replace(format!("image changed from {had} to {}", i.image));
    }
    if let Some(fp) = now_fp
        && !x.image.is_empty()
        && fp != x.image
    {
        return Action::Replace(format!(
            "image {} is now {}, the instance was made from {}",
            i.image,
            short(&fp),
            short(&x.image)
        ));
    }
    if !i.target.is_empty() && !x.location.is_empty() && i.target != x.location {
        return Action::Replace(format!(
            "it runs on {}, the stack places it on {}",
            x.location, i.target
        ));
    }
    let mut extra = Vec::new();
    if i.profiles != x.profiles {
        extra.push(format!("profiles {}", i.profiles.join(",")));
    }
    let status = x.status.to_ascii_lowercase();
    if status != i.state.as_str() {
        extra.push(format!("state {status} -> {}", i.state.as_str()));
    }
    update_action(want, &x.config, &i.description, &x.description, &extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STACK: &str = r#"
stack: shop
projects:
  - name: shop
    config:
      limits.instances: 5
      limits.memory: 2GiB
profiles:
  - name: small
    project: shop
    config: {limits.cpu: 1, limits.memory: 256MiB}
image_aliases:
  - name: base
    project: shop
    image: busybox
instances:
  - name: web1
    project: shop
    image: busybox
    profiles: [default, small]
    config: {user.role: web}
  - name: batch
    project: shop
    image: busybox
    state: stopped
"#;

    fn stack() -> Stack {
        parse(STACK).unwrap()
    }

    fn converged(s: &Stack) -> Actual {
        let mut a = Actual::default();
        for p in &s.projects {
            a.projects.push(ActualObject {
                project: p.name.clone(),
                name: p.name.clone(),
                description: p.description.clone(),
                config: managed_config(&s.stack, &p.config),
            });
        }
        for p in &s.profiles {
            a.profiles.push(ActualObject {
                project: p.project.clone(),
                name: p.name.clone(),
                description: p.description.clone(),
                config: managed_config(&s.stack, &p.config),
            });
        }
        for al in &s.image_aliases {
            a.aliases.push(ActualAlias {
                project: al.project.clone(),
                name: al.name.clone(),
                target: "f".repeat(64),
                description: alias_description(&s.stack, &al.description),
            });
        }
        for i in &s.instances {
            let mut config = managed_config(&s.stack, &i.config);
            config.insert(IMAGE_KEY.into(), i.image.clone());
            config.insert("image.os".into(), "busybox".into());
            a.instances.push(ActualInstance {
                project: i.project.clone(),
                name: i.name.clone(),
                description: i.description.clone(),
                config,
                profiles: i.profiles.clone(),
                image: "f".repeat(64),
                status: if i.state == DesiredState::Running {
                    "Running".into()
                } else {
                    "Stopped".into()
                },
                location: "n1".into(),
            });
        }
        a
    }

    fn fp(_: &str, _: &str) -> Option<String> {
        Some("f".repeat(64))
    }

    #[test]
    fn parses_numbers_as_strings_and_defaults() {
        let s = stack();
        assert_eq!(s.projects[0].config["limits.instances"], "5");
        assert_eq!(s.instances[1].state, DesiredState::Stopped);
        assert_eq!(s.instances[1].profiles, ["default"]);
    }

    #[test]
    fn bad_stacks_are_refused_with_a_position() {
        let e = parse("stack: x\ninstances:\n  - name: a\n    imag: busybox\n").unwrap_err();
        assert!(e.contains("line 4") && e.contains("unknown field"), "{e}");
        let e = parse("- just\n- a list\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e =
            parse("stack: x\nprojects:\n  - name: p\n    config: {limits.cpu: -1}\n").unwrap_err();
        assert!(e.contains("limits.cpu"), "{e}");
        let e =
            parse("stack: x\ninstances:\n  - {name: a, image: b, config: {user.berth.stack: y}}\n")
                .unwrap_err();
        assert!(e.contains("set by berth apply"), "{e}");
        let e =
            parse("stack: x\ninstances:\n  - {name: a, image: b, state: paused}\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn everything_is_created_on_an_empty_cluster() {
        let changes = plan(&stack(), &Actual::default(), &fp);
        assert_eq!(changes.len(), 5);
        assert!(changes.iter().all(|c| c.action == Action::Create));
        assert_eq!(
            summary(&changes),
            "Plan: 5 to create, 0 to update in place, 0 to replace, 0 to delete."
        );
    }

    #[test]
    fn a_converged_cluster_has_nothing_to_do() {
        let s = stack();
        let changes = plan(&s, &converged(&s), &fp);
        assert!(!has_changes(&changes), "{changes:?}");
        assert_eq!(
            summary(&changes),
            "No changes: the cluster matches the stack."
        );
    }

    #[test]
    fn drift_in_place_replace_and_delete() {
        let s = stack();
        let mut a = converged(&s);
        // Stopped by hand, and a key changed by hand.
        a.instances[0].status = "Stopped".into();
        a.instances[0]
            .config
            .insert("user.role".into(), "db".into());
        // Made from another image.
        a.instances[1]
            .config
            .insert(IMAGE_KEY.into(), "debian/12".into());
        a.instances[1].image = "e".repeat(64);
        // A marked instance the file no longer lists, and an unmarked one.
        let mut old = a.instances[0].clone();
        old.name = "old".into();
        a.instances.push(old);
        let mut foreign = a.instances[0].clone();
        foreign.name = "foreign".into();
        foreign.config.remove(STACK_KEY);
        a.instances.push(foreign);
        let changes = plan(&s, &a, &fp);
        let line = |n: &str| {
            changes
                .iter()
                .find(|c| c.name == n)
                .map(|c| c.to_string())
                .unwrap()
        };
        assert_eq!(
            line("web1"),
            "update   instance shop/web1 (in place: config user.role, state stopped -> running)"
        );
        assert_eq!(
            line("batch"),
            "replace  instance shop/batch (image changed from debian/12 to busybox)"
        );
        assert_eq!(line("old"), "delete   instance shop/old");
        assert!(changes.iter().all(|c| c.name != "foreign"));
    }

    #[test]
    fn checks_fail_before_anything_changes() {
        let s = stack();
        let a = converged(&s);
        assert_eq!(check(&s, &a, &fp), Ok(()));
        // Nothing resolves: the alias (and so the instances using it) cannot be made.
        let none = |_: &str, _: &str| None;
        let e = check(&s, &a, &none).unwrap_err();
        assert!(
            e.starts_with("image alias shop/base: image busybox not found"),
            "{e}"
        );
        let mut bad = s.clone();
        bad.instances[0].image = "nosuchimage".into();
        let only_busybox = |_: &str, i: &str| (i == "busybox").then(|| "f".repeat(64));
        let e = check(&bad, &a, &only_busybox).unwrap_err();
        assert_eq!(e, "instance shop/web1: image nosuchimage not found");
        // An alias the stack makes counts.
        bad.instances[0].image = "base".into();
        assert_eq!(check(&bad, &a, &only_busybox), Ok(()));
        let mut far = s.clone();
        far.instances[0].target = "n9".into();
        let mut known = a.clone();
        known.nodes = Some(vec!["n1".into()]);
        assert_eq!(
            check(&far, &known, &fp).unwrap_err(),
            "instance shop/web1: node n9 does not exist"
        );
        let mut lost = s.clone();
        lost.projects.clear();
        let e = check(&lost, &Actual::default(), &fp).unwrap_err();
        assert!(e.contains("project shop does not exist"), "{e}");
    }

    #[test]
    fn short_fingerprints_never_split_a_character() {
        assert_eq!(short(&"f".repeat(64)), "ffffffffffff");
        // Byte 12 falls inside "é": whatever the server sends, no panic.
        assert_eq!(short("abcdefghijkéz"), "abcdefghijkéz");
        assert_eq!(short("abc"), "abc");
    }

    #[test]
    fn alias_marks_round_trip() {
        let d = alias_description("shop", "base image");
        assert_eq!(alias_mark(&d), (Some("shop"), "base image"));
        assert_eq!(alias_mark("[berth-stack:x]"), (Some("x"), ""));
        assert_eq!(alias_mark("plain"), (None, "plain"));
    }
}
