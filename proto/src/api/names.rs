//! Name rules for instances and other objects.

/// Checks an instance name against LXD's rule: 1 to 63 characters, ASCII letters, digits and
/// hyphens, not starting with a digit or hyphen, not ending with a hyphen.
/// Returns one sentence saying what is wrong.
pub fn validate_instance_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("instance name is empty".into());
    }
    if name.len() > 63 {
        let start: String = name.chars().take(20).collect();
        return Err(format!(
            "instance name \"{}...\" is longer than 63 characters",
            start.escape_default()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "instance name \"{}\" contains {:?}; only letters, digits and hyphens are allowed",
            name.escape_default(),
            c
        ));
    }
    let first = name.as_bytes()[0];
    if first.is_ascii_digit() || first == b'-' {
        return Err(format!(
            "instance name \"{name}\" must not start with a digit or hyphen"
        ));
    }
    if name.ends_with('-') {
        return Err(format!(
            "instance name \"{name}\" must not end with a hyphen"
        ));
    }
    Ok(())
}

/// Checks a snapshot name: 1 to 63 characters, ASCII letters, digits, `-`, `_` and `.`,
/// starting with a letter or digit (so never `.` or a hidden name), without `..`; never a `/`,
/// since `instance/snapshot` names a snapshot. Returns one sentence saying what is wrong.
pub fn validate_snapshot_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("snapshot name is empty".into());
    }
    if name.len() > 63 {
        let start: String = name.chars().take(20).collect();
        return Err(format!(
            "snapshot name \"{}...\" is longer than 63 characters",
            start.escape_default()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "snapshot name \"{}\" contains {:?}; only letters, digits, '-', '_' and '.' are allowed",
            name.escape_default(),
            c
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!(
            "snapshot name \"{name}\" must start with a letter or digit"
        ));
    }
    if name.contains("..") {
        return Err(format!("snapshot name \"{name}\" must not contain \"..\""));
    }
    Ok(())
}

/// Project names follow the instance name rule (so that `project_instance`, the name an
/// instance of a project has on its node, is unambiguous).
pub fn validate_project_name(name: &str) -> Result<(), String> {
    validate_instance_name(name).map_err(|e| e.replacen("instance name", "project name", 1))
}

/// Profile names follow the instance name rule.
pub fn validate_profile_name(name: &str) -> Result<(), String> {
    validate_instance_name(name).map_err(|e| e.replacen("instance name", "profile name", 1))
}

/// API key names follow the instance name rule.
pub fn validate_key_name(name: &str) -> Result<(), String> {
    validate_instance_name(name).map_err(|e| e.replacen("instance name", "key name", 1))
}

/// The name an instance (or profile) of `project` has on its node and in the replicated state:
/// its own name in the default project, `project_name` in any other. Neither part may contain
/// `_`, so the two never collide.
pub fn scoped_name(project: &str, name: &str) -> String {
    if project == crate::api::tenancy::DEFAULT_PROJECT || project.is_empty() {
        name.to_string()
    } else {
        format!("{project}_{name}")
    }
}

/// Splits a name made by [`scoped_name`] into its project and its own name.
pub fn split_scoped_name(scoped: &str) -> (&str, &str) {
    match scoped.split_once('_') {
        Some((project, name)) => (project, name),
        None => (crate::api::tenancy::DEFAULT_PROJECT, scoped),
    }
}

/// Checks a node-local instance name: an instance name, optionally prefixed by `project_`.
pub fn validate_scoped_name(scoped: &str) -> Result<(), String> {
    let (project, name) = split_scoped_name(scoped);
    if scoped.contains('_') {
        validate_project_name(project)?;
    }
    validate_instance_name(name)
}

/// A node name made from a host name: its first label, lowercased, with characters outside the
/// name rule turned into hyphens (`ip-10-0-0-1.ec2.internal` gives `ip-10-0-0-1`, `42box` gives
/// `node-42box`). Controllers and agents derive the first node's name the same way.
pub fn node_name_from_host(host: &str) -> String {
    let label = host
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut name: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name = name.trim_matches('-').to_string();
    if name.is_empty() {
        name = "node".into();
    }
    if name.as_bytes()[0].is_ascii_digit() {
        name = format!("node-{name}");
    }
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// Image aliases: 1 to 128 characters of letters, digits and `-_./:`, no `..`, not starting with `/`.
pub fn validate_image_alias(alias: &str) -> Result<(), String> {
    if alias.is_empty() || alias.len() > 128 {
        return Err("image alias must be 1 to 128 characters long".into());
    }
    if !alias
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
        || alias.contains("..")
        || alias.starts_with('/')
    {
        return Err(format!(
            "image alias \"{}\" may only contain letters, digits and -_./:",
            alias.escape_default()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names() {
        for ok in ["a", "web1", "a-b-c", "A1", &"x".repeat(63)] {
            assert!(validate_instance_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "-a",
            "a-",
            "a_b",
            "a.b",
            "a b",
            "é",
            &"x".repeat(64),
            "a/b",
            &"€".repeat(30),
        ] {
            assert!(validate_instance_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_names() {
        for ok in ["snap0", "0", "daily-2026-11-30", "a_b.c", &"x".repeat(63)] {
            assert!(validate_snapshot_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            ".",
            "..",
            "a..b",
            ".hidden",
            "-a",
            "_a",
            "a b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(validate_snapshot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_names() {
        assert_eq!(
            node_name_from_host("ip-10-0-0-1.ec2.internal"),
            "ip-10-0-0-1"
        );
        assert_eq!(node_name_from_host("42box"), "node-42box");
        assert_eq!(node_name_from_host("My_Host"), "my-host");
        assert_eq!(node_name_from_host(""), "node");
        assert_eq!(node_name_from_host("--"), "node");
        for h in ["a.b", "_x_", "9", &"y".repeat(80)] {
            assert!(
                validate_instance_name(&node_name_from_host(h)).is_ok(),
                "{h}"
            );
        }
    }

    #[test]
    fn aliases() {
        assert!(validate_image_alias("debian/12").is_ok());
        assert!(validate_image_alias("busybox").is_ok());
        assert!(validate_image_alias("../x").is_err());
        assert!(validate_image_alias("/x").is_err());
        assert!(validate_image_alias("a b").is_err());
    }
}
