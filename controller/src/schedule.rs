//! Scheduled snapshots and snapshot expiry.
//!
//! The pure part works on unix seconds in UTC: when a cron schedule
//! ([`berth_proto::api::config::CronSchedule`]) is next due ([`next_after`]) or was last due
//! ([`last_at_or_before`]), when a snapshot taken at a time expires ([`add_expiry`]), and the
//! next free name of a `snapshots.pattern` ([`snapshot_name`]).
//!
//! The leader's part ([`tick`], called from the reconciler loop) looks at every instance every
//! few seconds. An instance at rest (no pending action, node online) whose effective config has
//! `snapshots.schedule`, and that runs (or has `snapshots.schedule.stopped=true`), gets a
//! scheduled [`Action::Snapshot`] when its schedule was due after `last_scheduled_snapshot`
//! (or after its creation): one snapshot for the latest due time, however many were missed
//! while the controller was down or the instance stopped. A snapshot whose `expires_at` has
//! passed gets an [`Action::DeleteSnapshot`] (one per instance per pass). Those actions run
//! like any other (operations of the instance's project, requested by the system).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::api::InstanceStatusCode;
use berth_proto::api::config::{self, ConfigError, CronSchedule, DEFAULT_SNAPSHOT_PATTERN, Expiry};
use tracing::{debug, info};

use crate::api::AppState;
use crate::api::operations::{instance_resources_in, new_operation_in};
use crate::clock::{self, civil_from_days, days_from_civil};
use crate::state::{Action, Command, NodeStatus, PendingAction, Snapshot, split_scoped_name};

/// How often the leader looks at the schedules and expiry times.
pub const PASS_EVERY: Duration = Duration::from_secs(5);

/// Days searched for a matching date: a February 29 that must also be a given weekday comes
/// back after at most 28 years, but schedules are ANDed only with an unrestricted weekday
/// (see [`CronSchedule::day_matches`]), so 8 years (2096 to 2104) is the longest gap.
const SEARCH_DAYS: i64 = 366 * 9;

/// Day of the week of a day since 1970-01-01, Sunday = 0 (1970-01-01 was a Thursday).
fn weekday(days: i64) -> u32 {
    (days + 4).rem_euclid(7) as u32
}

/// Parses an RFC 3339 time (`2026-11-30T02:00:00Z`, fractions and `±HH:MM` offsets allowed)
/// into unix seconds (a fraction is dropped); `None` when malformed.
pub fn unix_secs(s: &str) -> Option<i64> {
    crate::state::Rfc3339::parse(s).map(crate::state::Rfc3339::unix_secs)
}

/// The first minute of the day at or after minute-of-day `from` that matches the schedule's
/// hours and minutes.
fn first_minute(c: &CronSchedule, from: u32) -> Option<u32> {
    (from / 60..24)
        .filter(|h| c.hours & (1 << h) != 0)
        .find_map(|h| {
            let m0 = if h == from / 60 { from % 60 } else { 0 };
            (m0..60)
                .find(|m| c.minutes & (1 << m) != 0)
                .map(|m| h * 60 + m)
        })
}

/// The last minute of the day at or before minute-of-day `to` that matches the schedule's
/// hours and minutes.
fn last_minute(c: &CronSchedule, to: u32) -> Option<u32> {
    (0..=to / 60)
        .rev()
        .filter(|h| c.hours & (1 << h) != 0)
        .find_map(|h| {
            let m1 = if h == to / 60 { to % 60 } else { 59 };
            (0..=m1)
                .rev()
                .find(|m| c.minutes & (1 << m) != 0)
                .map(|m| h * 60 + m)
        })
}

fn day_matches(c: &CronSchedule, day: i64) -> bool {
    let (_, m, d) = civil_from_days(day);
    c.day_matches(m, d, weekday(day))
}

/// The first time (unix seconds, on a whole minute) strictly after `t` at which one of the
/// schedules is due; `None` for no schedule (or one that never comes).
pub fn next_after(schedules: &[CronSchedule], t: i64) -> Option<i64> {
    schedules
        .iter()
        .filter_map(|c| {
            let start = t.div_euclid(60) * 60 + 60;
            let first_day = start.div_euclid(86_400);
            let mut from = (start.rem_euclid(86_400) / 60) as u32;
            for day in first_day..first_day + SEARCH_DAYS {
                if day_matches(c, day)
                    && let Some(m) = first_minute(c, from)
                {
                    return Some(day * 86_400 + i64::from(m) * 60);
                }
                from = 0;
            }
            None
        })
        .min()
}

/// The last time (unix seconds, on a whole minute) at or before `t` at which one of the
/// schedules was due; `None` for no schedule (or none within the searched years).
pub fn last_at_or_before(schedules: &[CronSchedule], t: i64) -> Option<i64> {
    schedules
        .iter()
        .filter_map(|c| {
            let end = t.div_euclid(60) * 60;
            let last_day = end.div_euclid(86_400);
            let mut to = (end.rem_euclid(86_400) / 60) as u32;
            for day in (last_day - SEARCH_DAYS..=last_day).rev() {
                if day_matches(c, day)
                    && let Some(m) = last_minute(c, to)
                {
                    return Some(day * 86_400 + i64::from(m) * 60);
                }
                to = 24 * 60 - 1;
            }
            None
        })
        .max()
}

fn signed(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX / 4)
}

/// `t` plus the period, as a calendar adds it (Go's `AddDate`, as LXD does): years and months
/// first (a day that does not exist in the month rolls over: January 31 plus a month is March
/// 3, or 2 in leap years), then weeks and days, then hours and minutes.
pub fn add_expiry(t: i64, e: &Expiry) -> i64 {
    let days = t.div_euclid(86_400);
    let secs_of_day = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let months = (i64::from(m) - 1)
        .saturating_add(signed(e.months))
        .saturating_add(signed(e.years).saturating_mul(12));
    let (y, m) = (
        y.saturating_add(months.div_euclid(12)),
        months.rem_euclid(12) + 1,
    );
    let days = days_from_civil(y, m, 1)
        .saturating_add(i64::from(d) - 1)
        .saturating_add(signed(e.days))
        .saturating_add(signed(e.weeks).saturating_mul(7));
    days.saturating_mul(86_400)
        .saturating_add(secs_of_day)
        .saturating_add(signed(e.hours).saturating_mul(3600))
        .saturating_add(signed(e.minutes).saturating_mul(60))
}

/// When a snapshot taken at `now` (unix seconds) expires under the effective `config`:
/// RFC 3339, or `""` without `snapshots.expiry`.
pub fn expiry_for(config: &BTreeMap<String, String>, now: i64) -> Result<String, ConfigError> {
    let e = config::parse_expiry(config.get("snapshots.expiry").map_or("", String::as_str))?;
    if e.is_zero() {
        return Ok(String::new());
    }
    Ok(clock::format_unix(add_expiry(now, &e)))
}

/// The name a new snapshot gets from `pattern` (`snapshots.pattern`, `""` for `snap%d`):
/// `%d` becomes the lowest number whose name is not `taken`. A pattern without `%d` is used
/// as it is while free, then as `pattern-%d` (as LXD does).
pub fn snapshot_name(pattern: &str, taken: impl Fn(&str) -> bool) -> String {
    let pattern = match pattern.trim() {
        "" => DEFAULT_SNAPSHOT_PATTERN,
        p => p,
    };
    let with_number = if pattern.contains("%d") {
        pattern.to_string()
    } else if !taken(pattern) {
        return pattern.to_string();
    } else {
        format!("{pattern}-%d")
    };
    // Fewer names are taken than there are numbers: this ends.
    (0u64..)
        .map(|n| with_number.replacen("%d", &n.to_string(), 1))
        .find(|name| !taken(name))
        .unwrap_or_default()
}

/// The name and expiry time of a new snapshot of an instance with effective `config` and
/// `snapshots`, taken at `now` (unix seconds). Errors are one sentence about the config.
pub fn new_snapshot(
    config: &BTreeMap<String, String>,
    snapshots: &BTreeMap<String, Snapshot>,
    now: i64,
) -> Result<(String, String), ConfigError> {
    let pattern = config.get("snapshots.pattern").map_or("", String::as_str);
    if !pattern.trim().is_empty() {
        config::parse_snapshot_pattern(pattern)?;
    }
    let name = snapshot_name(pattern, |n| snapshots.contains_key(n));
    berth_proto::api::names::validate_snapshot_name(&name).map_err(|e| {
        ConfigError(format!(
            "snapshots.pattern {pattern:?} gives the name {name:?}, which is not usable: {e}"
        ))
    })?;
    Ok((name, expiry_for(config, now)?))
}

/// What the leader does for one instance in a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Delete this expired snapshot.
    Expire(String),
    /// Take a scheduled snapshot for this due time (unix seconds).
    Snapshot(i64),
}

/// Everything [`due`] needs to know of an instance.
pub struct Candidate<'a> {
    /// The effective config.
    pub config: &'a BTreeMap<String, String>,
    pub snapshots: &'a BTreeMap<String, Snapshot>,
    /// `last_scheduled_snapshot`, or `""`.
    pub last_scheduled: &'a str,
    pub created_at: &'a str,
    pub running: bool,
}

/// What an instance at rest needs at `now` (unix seconds): an expired snapshot to delete
/// (the one that expired first), else a scheduled snapshot when the schedule was due after the
/// last scheduled one (or after the creation) and the instance runs or
/// `snapshots.schedule.stopped` is true. Unparsable settings give `Err` (one sentence).
pub fn due(c: &Candidate<'_>, now: i64) -> Result<Option<Due>, ConfigError> {
    let expired = c
        .snapshots
        .values()
        .filter_map(|s| Some((unix_secs(&s.expires_at)?, &s.name)))
        .filter(|(at, _)| *at <= now)
        .min();
    if let Some((_, name)) = expired {
        return Ok(Some(Due::Expire(name.clone())));
    }
    let schedule = c
        .config
        .get("snapshots.schedule")
        .map_or("", String::as_str);
    let schedules = config::parse_schedule(schedule)?;
    if schedules.is_empty() {
        return Ok(None);
    }
    let stopped_too = config::parse_bool(
        "snapshots.schedule.stopped",
        c.config
            .get("snapshots.schedule.stopped")
            .map_or("", String::as_str),
    )?;
    if !c.running && !stopped_too {
        return Ok(None);
    }
    let since = if c.last_scheduled.is_empty() {
        c.created_at
    } else {
        c.last_scheduled
    };
    // A record without a readable time counts from now: nothing is owed for the past.
    let since = unix_secs(since).unwrap_or(now);
    Ok(last_at_or_before(&schedules, now)
        .filter(|at| *at > since)
        .map(Due::Snapshot))
}

/// Calls [`pass`] at most every [`PASS_EVERY`] (the reconciler calls this on every tick).
pub async fn tick(state: &Arc<AppState>) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < PASS_EVERY) {
            return;
        }
        *last = Some(Instant::now());
    }
    pass(state).await;
}

/// The action [`due`] asks for an instance at `now`, or why none can be requested.
fn action_for(
    due: Due,
    config: &BTreeMap<String, String>,
    snapshots: &BTreeMap<String, Snapshot>,
    now: i64,
) -> Result<Action, ConfigError> {
    Ok(match due {
        Due::Expire(name) => Action::DeleteSnapshot { name },
        Due::Snapshot(at) => {
            let (name, expires_at) = new_snapshot(config, snapshots, now)?;
            Action::Snapshot {
                name,
                expires_at,
                scheduled: true,
                due: clock::format_unix(at),
            }
        }
    })
}

/// One look at every instance: requests the expiry deletions and scheduled snapshots that are
/// due (see [`due`]). Only the leader calls this.
pub async fn pass(state: &Arc<AppState>) {
    let now_str = clock::now();
    let Some(now) = unix_secs(&now_str) else {
        return;
    };
    // (state key, project, what to do or why it cannot be done)
    type Wanted = (String, String, Result<Action, ConfigError>);
    let wanted: Vec<Wanted> = state.cp.read_local(|s| {
        s.instances
            .values()
            .filter(|i| i.pending.is_none())
            .filter(|i| {
                s.nodes
                    .get(&i.node)
                    .is_some_and(|n| n.status == NodeStatus::Online)
            })
            .filter_map(|i| {
                let config = s.effective_config(i);
                let c = Candidate {
                    config: &config,
                    snapshots: &i.snapshots,
                    last_scheduled: &i.last_scheduled_snapshot,
                    created_at: &i.created_at,
                    running: i.observed.status == InstanceStatusCode::Running,
                };
                let action = match due(&c, now) {
                    Ok(None) => return None,
                    Ok(Some(d)) => action_for(d, &config, &i.snapshots, now),
                    Err(e) => Err(e),
                };
                Some((i.name.clone(), i.project.clone(), action))
            })
            .collect()
    });
    for (key, project, action) in wanted {
        let action = match action {
            Ok(a) => a,
            Err(e) => {
                // Settings stored before they were validated, or a pattern whose next name is
                // too long: said once per pass, at debug level, not guessed around.
                debug!(instance = %key, error = %e, "snapshot settings cannot be used");
                continue;
            }
        };
        let description = match action {
            Action::DeleteSnapshot { .. } => "Deleting an expired snapshot",
            _ => "Taking a scheduled snapshot",
        };
        let own = split_scoped_name(&key).1;
        let op = new_operation_in(
            state,
            &project,
            "task",
            description,
            instance_resources_in(&project, own),
        );
        let command = Command::SetInstanceAction {
            name: key.clone(),
            pending: PendingAction {
                op: op.id.clone(),
                action: action.clone(),
                since: op.created_at.clone(),
            },
            desired: None,
            operation: op,
            now: now_str.clone(),
        };
        match state.cp.write(command).await {
            Ok(_) => info!(instance = %key, action = %action.describe(), "snapshot work requested"),
            // Busy since it was read (a user's action came first): the next pass sees it.
            Err(e) => debug!(instance = %key, error = %e, "could not request snapshot work"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use berth_proto::api::config::parse_schedule;

    fn t(s: &str) -> i64 {
        unix_secs(s).unwrap()
    }

    fn next(schedule: &str, after: &str) -> String {
        clock::format_unix(next_after(&parse_schedule(schedule).unwrap(), t(after)).unwrap())
    }

    fn last(schedule: &str, at: &str) -> String {
        clock::format_unix(last_at_or_before(&parse_schedule(schedule).unwrap(), t(at)).unwrap())
    }

    #[test]
    fn times_parse() {
        assert_eq!(unix_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_secs("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(
            unix_secs("2026-11-30T03:00:00+01:00"),
            unix_secs("2026-11-30T02:00:00Z")
        );
        assert_eq!(
            unix_secs("2026-11-30T02:00:00.75Z"),
            unix_secs("2026-11-30T02:00:00Z")
        );
        assert_eq!(unix_secs("yesterday"), None);
        assert_eq!(unix_secs(""), None);
        for d in [0, 59, 60, 86_399, 951_868_800, 1_795_978_884] {
            assert_eq!(unix_secs(&clock::format_unix(d)), Some(d));
        }
        assert_eq!(weekday(t("2026-11-29T00:00:00Z").div_euclid(86_400)), 0);
    }

    #[test]
    fn next_due_times() {
        assert_eq!(
            next("@hourly", "2026-11-30T02:00:00Z"),
            "2026-11-30T03:00:00Z"
        );
        assert_eq!(
            next("@hourly", "2026-11-30T02:59:59Z"),
            "2026-11-30T03:00:00Z"
        );
        assert_eq!(
            next("* * * * *", "2026-11-30T02:00:30Z"),
            "2026-11-30T02:01:00Z"
        );
        assert_eq!(
            next("@daily", "2026-12-31T23:59:00Z"),
            "2027-01-01T00:00:00Z"
        );
        // Steps: every 20 minutes from 5.
        assert_eq!(
            next("5/20 * * * *", "2026-11-30T02:46:00Z"),
            "2026-11-30T03:05:00Z"
        );
        assert_eq!(
            next("*/15 * * * *", "2026-11-30T02:15:00Z"),
            "2026-11-30T02:30:00Z"
        );
        assert_eq!(
            next("0 8-18/5 * * *", "2026-11-30T13:00:00Z"),
            "2026-11-30T18:00:00Z"
        );
        // Month ends: the 31st skips months without one.
        assert_eq!(
            next("0 0 31 * *", "2026-04-01T00:00:00Z"),
            "2026-05-31T00:00:00Z"
        );
        assert_eq!(
            next("@monthly", "2026-01-31T12:00:00Z"),
            "2026-02-01T00:00:00Z"
        );
        // February 29 comes only in leap years (2100 is not one).
        assert_eq!(
            next("0 0 29 2 *", "2026-03-01T00:00:00Z"),
            "2028-02-29T00:00:00Z"
        );
        assert_eq!(
            next("0 0 29 2 *", "2096-03-01T00:00:00Z"),
            "2104-02-29T00:00:00Z"
        );
        assert_eq!(
            next("@yearly", "2026-06-01T00:00:00Z"),
            "2027-01-01T00:00:00Z"
        );
        // Day of week: 0 and 7 are Sunday (2026-11-29 is a Sunday).
        assert_eq!(
            next("0 12 * * 0", "2026-11-25T00:00:00Z"),
            "2026-11-29T12:00:00Z"
        );
        assert_eq!(
            next("0 12 * * 7", "2026-11-25T00:00:00Z"),
            "2026-11-29T12:00:00Z"
        );
        assert_eq!(
            next("@weekly", "2026-11-29T00:00:00Z"),
            "2026-12-06T00:00:00Z"
        );
        assert_eq!(
            next("0 9 * * mon-fri", "2026-11-27T10:00:00Z"),
            "2026-11-30T09:00:00Z"
        );
        // Both day fields restricted: either matches (the 1st, or a Friday).
        assert_eq!(
            next("0 0 1 * 5", "2026-11-28T00:00:00Z"),
            "2026-12-01T00:00:00Z"
        );
        assert_eq!(
            next("0 0 1 * 5", "2026-12-01T00:00:00Z"),
            "2026-12-04T00:00:00Z"
        );
        // One restricted: both must match (a Friday in... any day, so only Fridays).
        assert_eq!(
            next("0 0 * * 5", "2026-12-01T00:00:00Z"),
            "2026-12-04T00:00:00Z"
        );
        // A day-of-month step is a restriction: with a weekday, either matches.
        assert_eq!(
            next("0 0 */10 * 3", "2026-12-01T00:00:00Z"),
            "2026-12-02T00:00:00Z"
        );
        // Several schedules: the earliest.
        assert_eq!(
            next("0 12 * * *, 30 6 * * *", "2026-11-30T07:00:00Z"),
            "2026-11-30T12:00:00Z"
        );
        assert_eq!(
            next("0 12 * * *, 30 6 * * *", "2026-11-30T00:00:00Z"),
            "2026-11-30T06:30:00Z"
        );
        assert_eq!(next_after(&[], 0), None);
    }

    #[test]
    fn last_due_times() {
        assert_eq!(
            last("@hourly", "2026-11-30T02:00:00Z"),
            "2026-11-30T02:00:00Z"
        );
        assert_eq!(
            last("@hourly", "2026-11-30T02:59:59Z"),
            "2026-11-30T02:00:00Z"
        );
        assert_eq!(
            last("@daily", "2027-01-01T00:00:59Z"),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(
            last("@daily", "2026-12-31T23:59:00Z"),
            "2026-12-31T00:00:00Z"
        );
        assert_eq!(
            last("0 0 31 * *", "2026-05-30T00:00:00Z"),
            "2026-03-31T00:00:00Z"
        );
        assert_eq!(
            last("0 0 29 2 *", "2027-06-01T00:00:00Z"),
            "2024-02-29T00:00:00Z"
        );
        assert_eq!(
            last("0 12 * * 7", "2026-12-05T00:00:00Z"),
            "2026-11-29T12:00:00Z"
        );
        assert_eq!(
            last("*/15 * * * *", "2026-11-30T02:44:00Z"),
            "2026-11-30T02:30:00Z"
        );
        assert_eq!(
            last("0 12 * * *, 30 6 * * *", "2026-11-30T11:00:00Z"),
            "2026-11-30T06:30:00Z"
        );
        // The next due time after the last one is never before the time asked about.
        for (s, at) in [
            ("@weekly", "2026-11-30T02:00:00Z"),
            ("7 3 */3 * *", "2026-02-28T23:00:00Z"),
            ("0 0 1 * 5", "2026-12-03T00:00:00Z"),
        ] {
            let c = parse_schedule(s).unwrap();
            let l = last_at_or_before(&c, t(at)).unwrap();
            assert!(next_after(&c, l).unwrap() > t(at), "{s}");
        }
    }

    #[test]
    fn expiry_adds_like_a_calendar() {
        let add = |at: &str, e: &str| {
            clock::format_unix(add_expiry(t(at), &config::parse_expiry(e).unwrap()))
        };
        assert_eq!(add("2026-11-30T02:00:00Z", "2w"), "2026-12-14T02:00:00Z");
        assert_eq!(add("2026-11-30T02:00:00Z", "1M 2H"), "2026-11-30T04:01:00Z");
        assert_eq!(add("2026-12-31T23:30:00Z", "1H"), "2027-01-01T00:30:00Z");
        // November 30 plus 3 months is "February 30": March 2.
        assert_eq!(add("2026-11-30T02:00:00Z", "3m"), "2027-03-02T02:00:00Z");
        assert_eq!(add("2026-11-15T02:00:00Z", "3m"), "2027-02-15T02:00:00Z");
        // Days that do not exist roll over, as Go's AddDate does.
        assert_eq!(add("2027-01-31T00:00:00Z", "1m"), "2027-03-03T00:00:00Z");
        assert_eq!(add("2028-01-31T00:00:00Z", "1m"), "2028-03-02T00:00:00Z");
        assert_eq!(add("2028-02-29T00:00:00Z", "1y"), "2029-03-01T00:00:00Z");
        assert_eq!(
            add("2026-11-30T00:00:00Z", "1y 1m 1d"),
            "2027-12-31T00:00:00Z"
        );
        assert_eq!(add("2026-11-30T00:00:00Z", "14m"), "2028-01-30T00:00:00Z");
        let none = BTreeMap::new();
        assert_eq!(expiry_for(&none, 0).unwrap(), "");
        let two_days = BTreeMap::from([("snapshots.expiry".to_string(), "2d".to_string())]);
        assert_eq!(expiry_for(&two_days, 0).unwrap(), "1970-01-03T00:00:00Z");
    }

    #[test]
    fn pattern_names() {
        let taken = |names: &[&str]| {
            let set: std::collections::BTreeSet<String> =
                names.iter().map(|s| s.to_string()).collect();
            move |n: &str| set.contains(n)
        };
        assert_eq!(snapshot_name("", taken(&[])), "snap0");
        assert_eq!(snapshot_name("", taken(&["snap0", "snap1"])), "snap2");
        // The lowest free number, not one past the highest.
        assert_eq!(snapshot_name("snap%d", taken(&["snap0", "snap2"])), "snap1");
        assert_eq!(snapshot_name("auto-%d-x", taken(&["auto-0-x"])), "auto-1-x");
        assert_eq!(snapshot_name("backup", taken(&[])), "backup");
        assert_eq!(snapshot_name("backup", taken(&["backup"])), "backup-0");
        assert_eq!(
            snapshot_name("backup", taken(&["backup", "backup-0"])),
            "backup-1"
        );
        let config = BTreeMap::from([
            ("snapshots.pattern".to_string(), "daily%d".to_string()),
            ("snapshots.expiry".to_string(), "1d".to_string()),
        ]);
        let snaps = BTreeMap::from([("daily0".to_string(), Snapshot::default())]);
        assert_eq!(
            new_snapshot(&config, &snaps, 0).unwrap(),
            ("daily1".to_string(), "1970-01-02T00:00:00Z".to_string())
        );
        let long = BTreeMap::from([("snapshots.pattern".to_string(), "x".repeat(63))]);
        let snaps = BTreeMap::from([("x".repeat(63), Snapshot::default())]);
        assert!(new_snapshot(&long, &snaps, 0).is_err());
    }

    fn snap(name: &str, expires_at: &str) -> (String, Snapshot) {
        (
            name.to_string(),
            Snapshot {
                name: name.into(),
                created_at: "2026-11-01T00:00:00Z".into(),
                expires_at: expires_at.into(),
                scheduled: true,
            },
        )
    }

    #[test]
    fn what_is_due() {
        let hourly = BTreeMap::from([("snapshots.schedule".to_string(), "@hourly".to_string())]);
        let none = BTreeMap::new();
        let c = |config, snapshots, last, running| Candidate {
            config,
            snapshots,
            last_scheduled: last,
            created_at: "2026-11-30T00:30:00Z",
            running,
        };
        let now = t("2026-11-30T02:10:00Z");
        let empty = none_snaps();
        // Never taken: due since the creation; the latest due time only (no burst).
        assert_eq!(
            due(&c(&hourly, &empty, "", true), now).unwrap(),
            Some(Due::Snapshot(t("2026-11-30T02:00:00Z")))
        );
        // Taken for 02:00 already: nothing until 03:00.
        assert_eq!(
            due(&c(&hourly, &empty, "2026-11-30T02:00:00Z", true), now).unwrap(),
            None
        );
        assert_eq!(
            due(
                &c(&hourly, &empty, "2026-11-30T02:00:00Z", true),
                t("2026-11-30T03:00:00Z")
            )
            .unwrap(),
            Some(Due::Snapshot(t("2026-11-30T03:00:00Z")))
        );
        // Created after the last due time: nothing yet.
        assert_eq!(
            due(&c(&hourly, &empty, "", true), t("2026-11-30T00:59:00Z")).unwrap(),
            None
        );
        // Stopped: only with snapshots.schedule.stopped.
        assert_eq!(due(&c(&hourly, &empty, "", false), now).unwrap(), None);
        let mut stopped = hourly.clone();
        stopped.insert("snapshots.schedule.stopped".into(), "true".into());
        assert!(matches!(
            due(&c(&stopped, &empty, "", false), now).unwrap(),
            Some(Due::Snapshot(_))
        ));
        // No schedule: nothing.
        assert_eq!(due(&c(&none, &empty, "", true), now).unwrap(), None);
        // Expired snapshots go first, the earliest first, one at a time; unexpired stay.
        let snaps = BTreeMap::from([
            snap("a", "2026-11-30T02:05:00Z"),
            snap("b", "2026-11-30T01:00:00Z"),
            snap("c", "2026-11-30T03:00:00Z"),
            snap("d", ""),
        ]);
        assert_eq!(
            due(&c(&none, &snaps, "", true), now).unwrap(),
            Some(Due::Expire("b".into()))
        );
        let later: BTreeMap<_, _> = snaps
            .clone()
            .into_iter()
            .filter(|(n, _)| n != "a" && n != "b")
            .collect();
        assert_eq!(due(&c(&none, &later, "", true), now).unwrap(), None);
        // Unreadable settings are reported, not guessed.
        let bad = BTreeMap::from([("snapshots.schedule".to_string(), "nope".to_string())]);
        assert!(due(&c(&bad, &empty, "", true), now).is_err());
    }

    fn none_snaps() -> BTreeMap<String, Snapshot> {
        BTreeMap::new()
    }
}
