//! Projects, profiles and API keys: the REST types through which an operator hands a slice of
//! the fleet to a tenant.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The project every cluster has; objects made without `?project=` live there.
pub const DEFAULT_PROJECT: &str = "default";

/// The profile every project has; new instances get it when they name no profile.
pub const DEFAULT_PROFILE: &str = "default";

/// A project (`/1.0/projects/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Project {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `limits.instances`, `limits.cpu`, `limits.memory`, `limits.disk`, `limits.processes`,
    /// `restricted`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// URLs of the objects in the project (instances, profiles, image aliases).
    #[serde(default)]
    pub used_by: Vec<String>,
    #[serde(default)]
    pub created_at: String,
}

/// `POST /1.0/projects`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ProjectsPost {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// `PUT /1.0/projects/{name}`: the whole writable part.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ProjectPut {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// `PATCH /1.0/projects/{name}`: only what is present changes; a config key set to `null` is
/// removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ProjectPatch {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub config: Option<BTreeMap<String, Option<String>>>,
}

/// One resource of `GET /1.0/projects/{name}/state`: the quota (`limit`, -1 when unlimited)
/// and what the project's instances use (`usage`), in the resource's unit (a count, CPUs,
/// bytes).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ProjectResource {
    pub limit: i64,
    pub usage: i64,
}

/// `GET /1.0/projects/{name}/state`: use against quota, by resource (`instances`, `cpu`,
/// `memory`, `disk`, `processes`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProjectState {
    pub resources: BTreeMap<String, ProjectResource>,
}

/// A profile (`/1.0/profiles/{name}?project=P`): config applied to the instances that name it,
/// in order, before their own config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Kept for LXD clients; Berth profiles carry no devices yet.
    #[serde(default)]
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub project: String,
    /// URLs of the instances using it.
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// `POST /1.0/profiles`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ProfilesPost {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
}

/// `PUT /1.0/profiles/{name}`: the whole writable part.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ProfilePut {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
}

/// `PATCH /1.0/profiles/{name}`: only what is present changes; a config key set to `null` is
/// removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub config: Option<BTreeMap<String, Option<String>>>,
}

/// `POST /1.0/profiles/{name}` (rename) and `POST /1.0/projects/{name}` (rename).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RenamePost {
    pub name: String,
}

/// An API key as `GET /1.0/keys` shows it: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ApiKey {
    pub name: String,
    /// Public id: the middle part of the secret (`berth_<id>_<secret>`).
    pub id: String,
    /// `admin`, `operator`, `member` or `viewer`.
    pub role: String,
    pub project: String,
    pub created_at: String,
    /// RFC 3339; empty when the key never expires.
    #[serde(default)]
    pub expires_at: String,
    /// True once `expires_at` has passed (the key no longer works).
    #[serde(default)]
    pub expired: bool,
}

/// `POST /1.0/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct KeysPost {
    pub name: String,
    /// `admin`, `operator`, `member` or `viewer`.
    pub role: String,
    /// The project of a `member` or `viewer` key (default: `default`).
    #[serde(default)]
    pub project: String,
    /// How long the key works: a number with a unit, `90m`, `12h`, `30d`, `2w`; empty: forever.
    #[serde(default)]
    pub expires_in: String,
}

/// The answer to `POST /1.0/keys` and `POST /1.0/keys/{name}/rotate`: the only time the
/// secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct KeyCreated {
    pub key: ApiKey,
    /// `berth_<id>_<64 hex>`: what goes into `Authorization: Bearer`.
    pub secret: String,
}

/// `POST /1.0/keys/{name}/rotate`: a new secret for the same key; the old one stops working.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyRotatePost {
    /// A new validity from now (`30d`); empty keeps the current expiry.
    #[serde(default)]
    pub expires_in: String,
}

/// Who made a change, as lifecycle events name it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Requestor {
    /// The API key's name (`""` for the system itself: reconciler, heartbeats).
    pub key: String,
    pub key_id: String,
    pub role: String,
}

/// An event on `/1.0/events` (LXD's shape): `type` is `operation` or `lifecycle`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: String,
    pub timestamp: String,
    /// The controller that emitted it.
    pub location: String,
    pub project: String,
    /// For `operation`, the [`super::Operation`]; for `lifecycle`, a [`LifecycleEvent`].
    pub metadata: serde_json::Value,
}

/// The metadata of a `lifecycle` event: what changed, where, and who asked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LifecycleEvent {
    /// e.g. `instance-created`, `instance-started`, `profile-updated`, `api-key-revoked`.
    pub action: String,
    /// The object's URL, e.g. `/1.0/instances/web1?project=p`.
    pub source: String,
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    #[serde(default)]
    pub requestor: Option<Requestor>,
}

/// Parses a duration such as `90s`, `30m`, `12h`, `30d`, `2w` into seconds; the error is one
/// sentence.
pub fn parse_duration(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let bad = || {
        format!(
            "\"{value}\" is not a duration (expected a number with s, m, h, d or w, such as 30d)"
        )
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(format!("duration \"{value}\" must be more than zero"));
    }
    n.checked_mul(mult)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .ok_or_else(|| format!("duration \"{value}\" is longer than 100 years"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("2w"), Ok(14 * 86_400));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert!(parse_duration("0d").is_err());
        assert!(parse_duration("-1d").is_err());
        assert!(parse_duration("3y").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("99999999999999w").is_err());
    }
}
