//! Instance config keys: which exist, what values they take, and how the values are read.
//!
//! The controller validates every key with [`validate`] before anything is stored; the agent reads
//! the same values with the parse functions here, so the two can never disagree on a meaning.

use std::collections::BTreeMap;

/// Why a config key or value was refused. The message is one sentence for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// A memory limit: an absolute byte count or a share of the host's memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryLimit {
    Bytes(u64),
    Percent(f64),
}

impl MemoryLimit {
    /// The limit in bytes for a host with `host_bytes` of memory.
    pub fn bytes(self, host_bytes: u64) -> u64 {
        match self {
            MemoryLimit::Bytes(b) => b,
            MemoryLimit::Percent(p) => ((host_bytes as f64) * p / 100.0) as u64,
        }
    }
}

/// The smallest memory limit accepted: below it not even init fits.
pub const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;

/// The largest size `limits.memory`, `limits.disk` and the project quotas accept (1 PiB):
/// sums of many of them stay far from overflowing.
pub const MAX_SIZE_BYTES: u64 = 1 << 50;

/// The smallest `limits.disk` accepted.
pub const MIN_DISK_BYTES: u64 = 16 * 1024 * 1024;

/// Parses a byte size: a plain number of bytes, or a number with a suffix
/// (kB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; `B` alone is bytes).
pub fn parse_bytes(value: &str) -> Result<u64, ConfigError> {
    let v = value.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    if num.is_empty() {
        return Err(err(format!(
            "\"{value}\" is not a size (expected a number such as 512MiB)"
        )));
    }
    let n: f64 = num.parse().map_err(|_| {
        err(format!(
            "\"{value}\" is not a size (expected a number such as 512MiB)"
        ))
    })?;
    let mult: f64 = match suffix.trim() {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(err(format!(
                "\"{value}\" has an unknown unit \"{other}\" (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            )));
        }
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(err(format!("\"{value}\" is out of range")));
    }
    if suffix.trim().is_empty() && num.contains('.') {
        return Err(err(format!("\"{value}\" is not a whole number of bytes")));
    }
    Ok(bytes as u64)
}

/// Parses `limits.memory`: a size (see [`parse_bytes`]) or a percentage of host memory ("50%").
pub fn parse_memory(value: &str) -> Result<MemoryLimit, ConfigError> {
    let v = value.trim();
    if let Some(p) = v.strip_suffix('%') {
        let pct: f64 = p
            .trim()
            .parse()
            .map_err(|_| err(format!("limits.memory \"{value}\" is not a percentage")))?;
        if !(pct > 0.0 && pct <= 100.0) {
            return Err(err(format!(
                "limits.memory \"{value}\" must be above 0% and at most 100%"
            )));
        }
        return Ok(MemoryLimit::Percent(pct));
    }
    let bytes = parse_bytes(v).map_err(|e| err(format!("limits.memory: {e}")))?;
    if bytes < MIN_MEMORY_BYTES {
        return Err(err(format!(
            "limits.memory \"{value}\" is below the minimum of 4MiB"
        )));
    }
    if bytes > MAX_SIZE_BYTES {
        return Err(err(format!(
            "limits.memory \"{value}\" is above the maximum of 1PiB"
        )));
    }
    Ok(MemoryLimit::Bytes(bytes))
}

/// A CPU limit: a count of CPUs (the instance is pinned to that many) or an explicit set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuLimit {
    Count(u32),
    /// Explicit CPU ids, as in "0-1,3".
    Set(Vec<u32>),
}

/// Parses `limits.cpu`: "2" (a count) or "0-1,3" (a set of CPU ids).
pub fn parse_cpu(value: &str) -> Result<CpuLimit, ConfigError> {
    let v = value.trim();
    if v.chars().all(|c| c.is_ascii_digit()) && !v.is_empty() {
        let n: u32 = v
            .parse()
            .map_err(|_| err(format!("limits.cpu \"{value}\" is out of range")))?;
        if n == 0 || n > 4096 {
            return Err(err(format!(
                "limits.cpu \"{value}\" must be between 1 and 4096"
            )));
        }
        return Ok(CpuLimit::Count(n));
    }
    parse_cpu_set(v).map(CpuLimit::Set).map_err(|_| {
        err(format!(
            "limits.cpu \"{value}\" is neither a count nor a CPU set such as 0-1,3"
        ))
    })
}

/// Parses a kernel CPU list ("0-3,5").
pub fn parse_cpu_set(value: &str) -> Result<Vec<u32>, ConfigError> {
    // A bitmap, so that repeated ranges cost nothing however long the value is.
    let mut set = vec![false; 4096];
    let bad = || err(format!("\"{}\" is not a CPU list", shorten(value)));
    for part in value.trim().split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a.trim().parse().map_err(|_| bad())?;
        let b: usize = b.trim().parse().map_err(|_| bad())?;
        if a > b || b > 4095 {
            return Err(bad());
        }
        set[a..=b].iter_mut().for_each(|c| *c = true);
    }
    let cpus: Vec<u32> = (0u32..)
        .zip(set)
        .filter(|(_, on)| *on)
        .map(|(i, _)| i)
        .collect();
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

/// A value as quoted in an error: at most 64 characters of it.
fn shorten(value: &str) -> String {
    if value.chars().count() <= 64 {
        value.to_string()
    } else {
        format!("{}...", value.chars().take(64).collect::<String>())
    }
}

/// Formats CPU ids as a kernel CPU list ("0-3,5").
pub fn format_cpu_set(cpus: &[u32]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// Parses `limits.cpu.allowance`: a percentage of one CPU's time per CPU allowed ("50%"),
/// or LXD's "25ms/100ms" quota form. Returns (quota_us, period_us).
pub fn parse_cpu_allowance(value: &str) -> Result<CpuAllowance, ConfigError> {
    let v = value.trim();
    if let Some(p) = v.strip_suffix('%') {
        let pct: u32 = p.trim().parse().map_err(|_| {
            err(format!(
                "limits.cpu.allowance \"{value}\" is not a whole percentage"
            ))
        })?;
        if pct == 0 || pct > 100 {
            return Err(err(format!(
                "limits.cpu.allowance \"{value}\" must be between 1% and 100%"
            )));
        }
        return Ok(CpuAllowance::Percent(pct));
    }
    if let Some((q, p)) = v.split_once('/') {
        let ms = |s: &str| -> Option<u64> { s.trim().strip_suffix("ms")?.trim().parse().ok() };
        // The quota may exceed the period (several CPUs' worth) but not absurdly: at most
        // 4096 CPUs' worth of one period.
        if let (Some(q), Some(p)) = (ms(q), ms(p))
            && (1..=1000).contains(&p)
            && (1..=p * 4096).contains(&q)
        {
            return Ok(CpuAllowance::Quota {
                quota_us: q * 1000,
                period_us: p * 1000,
            });
        }
    }
    Err(err(format!(
        "limits.cpu.allowance \"{value}\" must be a percentage (50%) or a quota (25ms/100ms)"
    )))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuAllowance {
    /// Share of the instance's CPUs' time, as a hard cap.
    Percent(u32),
    Quota {
        quota_us: u64,
        period_us: u64,
    },
}

/// Parses `limits.processes`: a positive count.
pub fn parse_processes(value: &str) -> Result<u64, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(n) if (1..=4_194_304).contains(&n) => Ok(n),
        _ => Err(err(format!(
            "limits.processes \"{value}\" must be a whole number between 1 and 4194304"
        ))),
    }
}

/// Parses a boolean config value the way LXD does (true/false, 1/0, yes/no, on/off).
pub fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(err(format!("{key} \"{value}\" must be true or false"))),
    }
}

/// One term of `placement.constraints`: a node label that must (or must not) have a value.
/// A node without the label never equals the value, so it fails `key=value` and passes
/// `key!=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// The label's key, e.g. `rack`.
    pub key: String,
    /// The value compared with the node's label.
    pub value: String,
    /// True for `key!=value`.
    pub negated: bool,
}

impl Constraint {
    /// Whether a node whose label `key` is `label` (`None` when it has none) satisfies the term.
    pub fn matches(&self, label: Option<&str>) -> bool {
        let equal = label == Some(self.value.as_str());
        equal != self.negated
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = if self.negated { "!=" } else { "=" };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

/// The most terms one `placement.constraints` value may have.
pub const MAX_CONSTRAINTS: usize = 32;

fn is_label_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

fn is_label_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'))
}

/// Checks a node label (from the agent's config or `berth cluster set`): the key is letters,
/// digits, '.', '_', '-' or '/'; the value also allows ':' and '@'; neither is empty.
pub fn validate_label(key: &str, value: &str) -> Result<(), ConfigError> {
    if !is_label_key(key) {
        return Err(err(format!(
            "label key \"{}\" must be 1 to 128 letters, digits, '.', '_', '-' or '/'",
            shorten(key)
        )));
    }
    if !is_label_value(value) {
        return Err(err(format!(
            "label {key} value \"{}\" must be 1 to 256 letters, digits, '.', '_', '-', '/', ':' or '@'",
            shorten(value)
        )));
    }
    Ok(())
}

/// Parses `placement.constraints`: terms `key=value` or `key!=value` joined by commas, all of
/// which must hold ("rack!=r1,ssd=true"). An empty value means no constraint.
pub fn parse_constraints(value: &str) -> Result<Vec<Constraint>, ConfigError> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for term in v.split(',') {
        let term = term.trim();
        if term.is_empty() {
            return Err(err(format!(
                "placement.constraints \"{}\" has an empty term (terms are key=value or key!=value joined by commas)",
                shorten(value)
            )));
        }
        let (key, val, negated) = match term.split_once("!=") {
            Some((k, v)) => (k, v, true),
            None => match term.split_once('=') {
                Some((k, v)) => (k, v, false),
                None => {
                    return Err(err(format!(
                        "placement.constraints term \"{}\" is neither key=value nor key!=value",
                        shorten(term)
                    )));
                }
            },
        };
        let (key, val) = (key.trim(), val.trim());
        if !is_label_key(key) {
            return Err(err(format!(
                "placement.constraints term \"{}\" needs a label key of letters, digits, '.', '_', '-' or '/'",
                shorten(term)
            )));
        }
        if !is_label_value(val) {
            return Err(err(format!(
                "placement.constraints term \"{}\" needs a value of letters, digits, '.', '_', '-', '/', ':' or '@'",
                shorten(term)
            )));
        }
        out.push(Constraint {
            key: key.to_string(),
            value: val.to_string(),
            negated,
        });
    }
    if out.len() > MAX_CONSTRAINTS {
        return Err(err(format!(
            "placement.constraints has {} terms, more than the {MAX_CONSTRAINTS} allowed",
            out.len()
        )));
    }
    Ok(out)
}

/// Checks a placement group name (`placement.group`): 1 to 63 letters, digits, '-', '_' or '.'.
pub fn parse_placement_group(value: &str) -> Result<&str, ConfigError> {
    let v = value.trim();
    if !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(v)
    } else {
        Err(err(format!(
            "placement.group \"{}\" must be 1 to 63 letters, digits, '-', '_' or '.'",
            shorten(value)
        )))
    }
}

/// How the members of a placement group are placed relative to each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GroupPolicy {
    /// Apart: on different nodes (anti-affinity).
    #[default]
    Spread,
    /// Together: on the nodes the group already uses (affinity).
    Compact,
}

/// Parses `placement.group.policy`: `spread` or `compact`.
pub fn parse_group_policy(value: &str) -> Result<GroupPolicy, ConfigError> {
    match value.trim() {
        "spread" => Ok(GroupPolicy::Spread),
        "compact" => Ok(GroupPolicy::Compact),
        _ => Err(err(format!(
            "placement.group.policy \"{}\" must be spread or compact",
            shorten(value)
        ))),
    }
}

/// Whether a placement group's policy is a rule or a preference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GroupEnforce {
    /// A rule: placement fails rather than break it.
    #[default]
    Strict,
    /// A preference: broken when nothing else fits.
    Permissive,
}

/// Parses `placement.group.enforce`: `strict` or `permissive`.
pub fn parse_group_enforce(value: &str) -> Result<GroupEnforce, ConfigError> {
    match value.trim() {
        "strict" => Ok(GroupEnforce::Strict),
        "permissive" => Ok(GroupEnforce::Permissive),
        _ => Err(err(format!(
            "placement.group.enforce \"{}\" must be strict or permissive",
            shorten(value)
        ))),
    }
}

/// One 5-field cron schedule (`minute hour day-of-month month day-of-week`, in UTC), as a set
/// of allowed values per field. Bit `n` of a field is set when value `n` is allowed; days of
/// the week count from Sunday = 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CronSchedule {
    /// Bits 0..=59.
    pub minutes: u64,
    /// Bits 0..=23.
    pub hours: u32,
    /// Bits 1..=31.
    pub days: u32,
    /// Bits 1..=12.
    pub months: u16,
    /// Bits 0..=6 (Sunday = 0).
    pub weekdays: u8,
    /// The day-of-month field is not `*`.
    pub days_restricted: bool,
    /// The day-of-week field is not `*`.
    pub weekdays_restricted: bool,
}

impl CronSchedule {
    /// Whether a day matches the two day fields. As in cron (and LXD): when both are
    /// restricted, a day matching either one is due; otherwise both must match.
    pub fn day_matches(&self, month: u32, day: u32, weekday: u32) -> bool {
        if self.months & (1 << month) == 0 {
            return false;
        }
        let dom = self.days & (1 << day) != 0;
        let dow = self.weekdays & (1 << weekday) != 0;
        if self.days_restricted && self.weekdays_restricted {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// Whether any date can ever match (`0 0 31 2 *` never does).
    fn possible(&self) -> bool {
        if self.days_restricted && self.weekdays_restricted {
            return true;
        }
        // With the day of the week unrestricted or ANDed, some date in the allowed months must
        // have an allowed day number (every weekday falls on every day number some year).
        const LONGEST: [u32; 13] = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        (1..=12).any(|m| {
            self.months & (1 << m) != 0 && (1..=LONGEST[m]).any(|d| self.days & (1 << d) != 0)
        })
    }
}

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Parses one value of a cron field: a number or (for months and days of the week) a
/// three-letter English name.
fn cron_value(text: &str, names: &[&str], first_named: u32) -> Option<u32> {
    if let Ok(n) = text.parse::<u32>() {
        return Some(n);
    }
    let lower = text.to_ascii_lowercase();
    names
        .iter()
        .position(|n| *n == lower)
        .map(|i| i as u32 + first_named)
}

/// Parses one cron field (`*`, `a`, `a-b`, `*/n`, `a-b/n`, `a/n`, comma lists of them) into a
/// bit set of `min..=max`; the error names the field.
fn cron_field(
    text: &str,
    what: &str,
    min: u32,
    max: u32,
    names: &[&str],
    first_named: u32,
) -> Result<u64, String> {
    let bad = |why: &str| format!("{what} field \"{}\" {why}", shorten(text));
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| bad("has a step that is not a number"))?;
                if step == 0 || step > max {
                    return Err(bad(&format!("has a step outside 1-{max}")));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let a = cron_value(a, names, first_named).ok_or_else(|| bad("is not a number"))?;
            let b = cron_value(b, names, first_named).ok_or_else(|| bad("is not a number"))?;
            (a, b)
        } else {
            let a = cron_value(range, names, first_named).ok_or_else(|| bad("is not a number"))?;
            // `a/n` means from a to the end, every n.
            (a, if part.contains('/') { max } else { a })
        };
        if lo < min || hi > max {
            return Err(bad(&format!("has a value outside {min}-{max}")));
        }
        if lo > hi {
            return Err(bad("has a range that ends before it starts"));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

/// Parses one schedule: a 5-field cron expression or one of `@hourly`, `@daily`,
/// `@midnight`, `@weekly`, `@monthly`, `@annually`, `@yearly`.
pub fn parse_cron(value: &str) -> Result<CronSchedule, ConfigError> {
    let v = value.trim();
    let key = "snapshots.schedule";
    let expr = match v {
        "@hourly" => "0 * * * *",
        "@daily" | "@midnight" => "0 0 * * *",
        "@weekly" => "0 0 * * 0",
        "@monthly" => "0 0 1 * *",
        "@annually" | "@yearly" => "0 0 1 1 *",
        other if other.starts_with('@') => {
            return Err(err(format!(
                "{key} \"{}\" is not one of @hourly, @daily, @midnight, @weekly, @monthly, @annually, @yearly",
                shorten(value)
            )));
        }
        other => other,
    };
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(err(format!(
            "{key} \"{}\" must have 5 fields (minute hour day-of-month month day-of-week) or be @hourly, @daily, @weekly, @monthly or @yearly",
            shorten(value)
        )));
    }
    let field = |i: usize, what: &str, min: u32, max: u32, names: &[&str], first: u32| {
        cron_field(fields[i], what, min, max, names, first)
            .map_err(|e| err(format!("{key} \"{}\": {e}", shorten(value))))
    };
    let minutes = field(0, "minute", 0, 59, &[], 0)?;
    let hours = field(1, "hour", 0, 23, &[], 0)? as u32;
    let days = field(2, "day-of-month", 1, 31, &[], 0)? as u32;
    let months = field(3, "month", 1, 12, &MONTH_NAMES, 1)? as u16;
    let mut weekdays = field(4, "day-of-week", 0, 7, &WEEKDAY_NAMES, 0)?;
    // 7 is Sunday too.
    if weekdays & (1 << 7) != 0 {
        weekdays = (weekdays | 1) & 0x7f;
    }
    let unrestricted = |f: &str| f == "*" || f == "*/1";
    let schedule = CronSchedule {
        minutes,
        hours,
        days,
        months,
        weekdays: weekdays as u8,
        days_restricted: !unrestricted(fields[2]),
        weekdays_restricted: !unrestricted(fields[4]),
    };
    if !schedule.possible() {
        return Err(err(format!(
            "{key} \"{}\" names a day that never comes (such as February 30)",
            shorten(value)
        )));
    }
    Ok(schedule)
}

/// Parses `snapshots.schedule`: one or more schedules ([`parse_cron`]) separated by `, `
/// (a comma and a space, as LXD has it; a comma without a space is a list inside a field).
/// An empty value means no schedule.
pub fn parse_schedule(value: &str) -> Result<Vec<CronSchedule>, ConfigError> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    value.split(", ").map(parse_cron).collect()
}

/// A period of `snapshots.expiry`: added to a snapshot's creation time as a calendar would
/// (months and years keep the day of the month where it exists).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expiry {
    pub minutes: u64,
    pub hours: u64,
    pub days: u64,
    pub weeks: u64,
    pub months: u64,
    pub years: u64,
}

impl Expiry {
    /// Whether the period is zero (no expiry).
    pub fn is_zero(&self) -> bool {
        *self == Expiry::default()
    }
}

/// Parses `snapshots.expiry` (LXD's syntax): space-separated terms of a whole number and a unit,
/// `M` minutes, `H` hours, `d` days, `w` weeks, `m` months, `y` years (`1M 2H 3d 4w 5m 6y`;
/// a unit given twice adds up). An empty value means no expiry.
pub fn parse_expiry(value: &str) -> Result<Expiry, ConfigError> {
    let mut e = Expiry::default();
    for term in value.split_whitespace() {
        let split = term
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(term.len());
        let (num, unit) = term.split_at(split);
        let bad = || {
            err(format!(
                "snapshots.expiry \"{}\" has a term \"{}\" that is not a number with M (minutes), H (hours), d, w, m (months) or y, such as 2w",
                shorten(value),
                shorten(term)
            ))
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        // At most about 1000 years in any unit, so that adding never overflows.
        if n > 1_000 * 366 * 24 * 60 {
            return Err(err(format!(
                "snapshots.expiry \"{}\" is too long",
                shorten(value)
            )));
        }
        let slot = match unit {
            "M" => &mut e.minutes,
            "H" => &mut e.hours,
            "d" => &mut e.days,
            "w" => &mut e.weeks,
            "m" => &mut e.months,
            "y" => &mut e.years,
            _ => return Err(bad()),
        };
        *slot = slot.saturating_add(n);
    }
    let days = e
        .days
        .saturating_add(e.weeks.saturating_mul(7))
        .saturating_add(e.months.saturating_mul(31))
        .saturating_add(e.years.saturating_mul(366));
    let minutes = e
        .minutes
        .saturating_add(e.hours.saturating_mul(60))
        .saturating_add(days.saturating_mul(24 * 60));
    if minutes > 1_000 * 366 * 24 * 60 {
        return Err(err(format!(
            "snapshots.expiry \"{}\" is longer than 1000 years",
            shorten(value)
        )));
    }
    Ok(e)
}

/// The default `snapshots.pattern`.
pub const DEFAULT_SNAPSHOT_PATTERN: &str = "snap%d";

/// Checks `snapshots.pattern`: a snapshot name that may hold `%d` once (replaced by the lowest
/// number not taken). Templates such as LXD's `{{ creation_date|date:... }}` are not supported.
pub fn parse_snapshot_pattern(value: &str) -> Result<&str, ConfigError> {
    let v = value.trim();
    if v.contains("{{") || v.contains("{%") {
        return Err(err(format!(
            "snapshots.pattern \"{}\" is a template; only a name with %d (such as snap%d) is supported",
            shorten(value)
        )));
    }
    if v.matches("%d").count() > 1 {
        return Err(err(format!(
            "snapshots.pattern \"{}\" may contain %d only once",
            shorten(value)
        )));
    }
    crate::api::names::validate_snapshot_name(&v.replace("%d", "0"))
        .map_err(|e| err(format!("snapshots.pattern \"{}\": {e}", shorten(value))))?;
    Ok(v)
}

/// Keys that take effect on a running instance without a restart.
pub const LIVE_KEYS: &[&str] = &[
    "limits.cpu",
    "limits.cpu.allowance",
    "limits.memory",
    "limits.processes",
    "limits.disk",
];

/// Whether a user may set `key` (volatile.* keys are the server's own).
pub fn validate_key_value(key: &str, value: &str) -> Result<(), ConfigError> {
    if key.len() > 256 || value.len() > 64 * 1024 {
        return Err(err(format!("config key {key} or its value is too long")));
    }
    if value.contains('\0') {
        return Err(err(format!("config value of {key} contains a NUL byte")));
    }
    match key {
        "limits.cpu" => parse_cpu(value).map(drop),
        "limits.cpu.allowance" => parse_cpu_allowance(value).map(drop),
        "limits.memory" => parse_memory(value).map(drop),
        "limits.processes" => parse_processes(value).map(drop),
        "limits.disk" => match parse_bytes(value) {
            Ok(b) if (MIN_DISK_BYTES..=MAX_SIZE_BYTES).contains(&b) => Ok(()),
            Ok(b) if b > MAX_SIZE_BYTES => Err(err(format!(
                "limits.disk \"{value}\" is above the maximum of 1PiB"
            ))),
            Ok(_) => Err(err(format!(
                "limits.disk \"{value}\" is below the minimum of 16MiB"
            ))),
            Err(e) => Err(err(format!("limits.disk: {e}"))),
        },
        "security.privileged" | "boot.autostart" | "security.nesting" => {
            parse_bool(key, value).map(drop)
        }
        "snapshots.schedule" => parse_schedule(value).map(drop),
        "snapshots.schedule.stopped" => parse_bool(key, value).map(drop),
        "snapshots.expiry" => parse_expiry(value).map(drop),
        "snapshots.pattern" => parse_snapshot_pattern(value).map(drop),
        "placement.constraints" => parse_constraints(value).map(drop),
        "placement.group" => parse_placement_group(value).map(drop),
        "placement.group.policy" => parse_group_policy(value).map(drop),
        "placement.group.enforce" => parse_group_enforce(value).map(drop),
        "migration.stop" => match value.trim() {
            "force" | "clean" => Ok(()),
            _ => Err(err(format!(
                "migration.stop \"{value}\" must be \"force\" (the default: a live move stops the instance at once, \
                 like a power cut, for the shortest downtime) or \"clean\" (a clean shutdown first)"
            ))),
        },
        "boot.stop.timeout" => match value.trim().parse::<u32>() {
            Ok(n) if n <= 3600 => Ok(()),
            _ => Err(err(format!(
                "boot.stop.timeout \"{value}\" must be seconds from 0 to 3600"
            ))),
        },
        k if k.starts_with("user.") && k.len() > 5 => Ok(()),
        k if k.starts_with("image.") && k.len() > 6 => Ok(()),
        k if k.starts_with("environment.") && k.len() > 12 => {
            let name = &k[12..];
            if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                Ok(())
            } else {
                Err(err(format!("{k} is not a valid environment variable name")))
            }
        }
        k if k.starts_with("volatile.") => Err(err(format!(
            "config key {k} is set by the server and cannot be changed"
        ))),
        k => Err(err(format!("unknown config key {k}"))),
    }
}

/// Keys of a project's config.
pub const PROJECT_KEYS: &[&str] = &[
    "limits.instances",
    "limits.cpu",
    "limits.memory",
    "limits.disk",
    "limits.processes",
    "restricted",
];

/// Parses a project quota: `limits.instances`, `limits.cpu` and `limits.processes` are whole
/// numbers (0 allowed: nothing), `limits.memory` and `limits.disk` are sizes.
pub fn parse_project_limit(key: &str, value: &str) -> Result<u64, ConfigError> {
    match key {
        "limits.memory" | "limits.disk" => {
            if value.trim().starts_with('-') {
                return Err(err(format!("{key} \"{value}\" must not be negative")));
            }
            let b = parse_bytes(value).map_err(|e| err(format!("{key}: {e}")))?;
            if b > MAX_SIZE_BYTES {
                return Err(err(format!(
                    "{key} \"{value}\" is above the maximum of 1PiB"
                )));
            }
            Ok(b)
        }
        "limits.instances" | "limits.cpu" | "limits.processes" => {
            value.trim().parse::<u64>().map_err(|_| {
                err(format!(
                    "{key} \"{value}\" must be a whole number of 0 or more"
                ))
            })
        }
        k => Err(err(format!("{k} is not a project quota"))),
    }
}

/// Whether `key=value` may be set on a project.
pub fn validate_project_key_value(key: &str, value: &str) -> Result<(), ConfigError> {
    if key.len() > 256 || value.len() > 1024 {
        return Err(err(format!("project key {key} or its value is too long")));
    }
    match key {
        "restricted" => parse_bool(key, value).map(drop),
        k if k.starts_with("limits.") && PROJECT_KEYS.contains(&k) => {
            parse_project_limit(k, value).map(drop)
        }
        k if k.starts_with("user.") && k.len() > 5 => Ok(()),
        k => Err(err(format!(
            "unknown project config key {k} (known: {}, user.*)",
            PROJECT_KEYS.join(", ")
        ))),
    }
}

/// Validates a whole project config map.
pub fn validate_project(config: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (k, v) in config {
        validate_project_key_value(k, v)?;
    }
    Ok(())
}

/// Validates a whole user-supplied config map.
pub fn validate(config: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (k, v) in config {
        validate_key_value(k, v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_fields_and_macros() {
        let every = parse_cron("* * * * *").unwrap();
        assert_eq!(every.minutes, (1u64 << 60) - 1);
        assert_eq!(every.hours, (1u32 << 24) - 1);
        assert_eq!(every.days, !1u32);
        assert_eq!(every.weekdays, 0x7f);
        assert!(!every.days_restricted && !every.weekdays_restricted);
        let s = parse_cron("*/15 9-17/4 1,15 jan-mar mon-fri").unwrap();
        assert_eq!(s.minutes, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(s.hours, 1 << 9 | 1 << 13 | 1 << 17);
        assert_eq!(s.days, 1 << 1 | 1 << 15);
        assert_eq!(s.months, 0b1110);
        assert_eq!(s.weekdays, 0b0111110);
        assert!(s.days_restricted && s.weekdays_restricted);
        assert_eq!(
            parse_cron("5/20 * * * *").unwrap().minutes,
            1 << 5 | 1 << 25 | 1 << 45
        );
        assert_eq!(
            parse_cron("@hourly").unwrap(),
            parse_cron("0 * * * *").unwrap()
        );
        assert_eq!(
            parse_cron("@midnight").unwrap(),
            parse_cron("@daily").unwrap()
        );
        assert_eq!(
            parse_cron("@yearly").unwrap(),
            parse_cron("0 0 1 1 *").unwrap()
        );
        assert_eq!(parse_cron("@weekly").unwrap().weekdays, 1);
        // 0 and 7 are both Sunday.
        assert_eq!(parse_cron("0 0 * * 7").unwrap().weekdays, 1);
        assert_eq!(
            parse_cron("0 0 * * 5-7").unwrap().weekdays,
            1 | 1 << 5 | 1 << 6
        );
        assert_eq!(parse_cron("0 0 * * SUN").unwrap().weekdays, 1);
        // A step of 1 over everything is still unrestricted.
        assert!(!parse_cron("0 0 */1 * *").unwrap().days_restricted);
        assert!(parse_cron("0 0 */2 * *").unwrap().days_restricted);
    }

    #[test]
    fn bad_cron_is_refused_with_the_field_named() {
        for (bad, says) in [
            ("", "5 fields"),
            ("* * * *", "5 fields"),
            ("* * * * * *", "5 fields"),
            ("60 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day-of-month"),
            ("* * 32 * *", "day-of-month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "day-of-week"),
            ("*/0 * * * *", "step"),
            ("5-1 * * * *", "ends before"),
            ("a * * * *", "minute"),
            ("1,,2 * * * *", "minute"),
            ("@reboot", "@hourly"),
            ("0 0 30 2 *", "never"),
            ("0 0 31 4,6 *", "never"),
        ] {
            let e = parse_cron(bad).unwrap_err().0;
            assert!(e.contains("snapshots.schedule"), "{bad}: {e}");
            assert!(e.contains(says), "{bad}: {e}");
        }
        // February 29 comes every few years; day 31 or a Monday comes always.
        assert!(parse_cron("0 0 29 2 *").is_ok());
        assert!(parse_cron("0 0 30 2 1").is_ok());
    }

    #[test]
    fn several_schedules() {
        assert_eq!(parse_schedule("").unwrap(), vec![]);
        assert_eq!(parse_schedule("@daily, 0 12 * * *").unwrap().len(), 2);
        // A comma without a space is a list in a field.
        assert_eq!(parse_schedule("0 1,2 * * *").unwrap().len(), 1);
        assert!(parse_schedule("@daily, nope").is_err());
        assert!(validate_key_value("snapshots.schedule", "@hourly").is_ok());
        assert!(validate_key_value("snapshots.schedule", "* * *").is_err());
        assert!(validate_key_value("snapshots.schedule.stopped", "true").is_ok());
        assert!(validate_key_value("snapshots.schedule.stopped", "maybe").is_err());
        assert!(validate_key_value("migration.stop", "clean").is_ok());
        assert!(validate_key_value("migration.stop", "force").is_ok());
        assert!(validate_key_value("migration.stop", "gentle").is_err());
    }

    #[test]
    fn expiry_terms() {
        assert_eq!(parse_expiry("").unwrap(), Expiry::default());
        assert!(parse_expiry("  ").unwrap().is_zero());
        assert_eq!(
            parse_expiry("1M 2H 3d 4w 5m 6y").unwrap(),
            Expiry {
                minutes: 1,
                hours: 2,
                days: 3,
                weeks: 4,
                months: 5,
                years: 6
            }
        );
        assert_eq!(parse_expiry("2w").unwrap().weeks, 2);
        assert_eq!(parse_expiry("1d 1d").unwrap().days, 2);
        for bad in ["2", "w", "2x", "2 w", "-1d", "1.5d", "2W", "99999999999y"] {
            let e = parse_expiry(bad).unwrap_err().0;
            assert!(e.contains("snapshots.expiry"), "{bad}: {e}");
        }
        assert!(validate_key_value("snapshots.expiry", "2w").is_ok());
        assert!(validate_key_value("snapshots.expiry", "2 weeks").is_err());
    }

    #[test]
    fn snapshot_patterns() {
        assert_eq!(parse_snapshot_pattern("snap%d"), Ok("snap%d"));
        assert_eq!(parse_snapshot_pattern("backup"), Ok("backup"));
        assert_eq!(parse_snapshot_pattern("%d"), Ok("%d"));
        for bad in [
            "a%db%d",
            "a/b%d",
            "{{ creation_date|date:'2006-01-02' }}",
            "",
            "-%d",
        ] {
            let e = parse_snapshot_pattern(bad).unwrap_err().0;
            assert!(e.contains("snapshots.pattern"), "{bad}: {e}");
        }
        assert!(validate_key_value("snapshots.pattern", "auto-%d").is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("10 KiB"), Ok(10240));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("12XB").is_err());
        assert!(parse_bytes("1.5").is_err());
        assert!(parse_bytes("99999999999999999999TiB").is_err());
        assert!(parse_bytes("-1").is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("128MiB"), Ok(MemoryLimit::Bytes(128 << 20)));
        assert_eq!(parse_memory("50%"), Ok(MemoryLimit::Percent(50.0)));
        assert_eq!(MemoryLimit::Percent(50.0).bytes(1000), 500);
        assert!(parse_memory("0%").is_err());
        assert!(parse_memory("101%").is_err());
        assert!(parse_memory("1MiB").is_err());
        assert!(parse_memory("lots").is_err());
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu("2"), Ok(CpuLimit::Count(2)));
        assert_eq!(parse_cpu("0-1,3"), Ok(CpuLimit::Set(vec![0, 1, 3])));
        assert!(parse_cpu("0").is_err());
        assert!(parse_cpu("3-1").is_err());
        assert!(parse_cpu("x").is_err());
        assert!(parse_cpu("").is_err());
        assert_eq!(format_cpu_set(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(parse_cpu_allowance("50%"), Ok(CpuAllowance::Percent(50)));
        assert_eq!(
            parse_cpu_allowance("25ms/100ms"),
            Ok(CpuAllowance::Quota {
                quota_us: 25000,
                period_us: 100000
            })
        );
        assert!(parse_cpu_allowance("150%").is_err());
        assert!(parse_cpu_allowance("25ms/0ms").is_err());
        assert!(parse_cpu_allowance("18446744073709552ms/100ms").is_err());
        // Long values are cheap and quoted short.
        let long = "0-4095,".repeat(9000) + "1";
        assert_eq!(parse_cpu_set(&long).map(|v| v.len()), Ok(4096));
        let e = parse_cpu_set(&"x".repeat(5000)).unwrap_err();
        assert!(e.0.len() < 120, "{}", e.0);
    }

    #[test]
    fn constraints() {
        let c = parse_constraints("rack!=r1, ssd=true").unwrap();
        assert_eq!(
            c,
            vec![
                Constraint {
                    key: "rack".into(),
                    value: "r1".into(),
                    negated: true
                },
                Constraint {
                    key: "ssd".into(),
                    value: "true".into(),
                    negated: false
                }
            ]
        );
        assert_eq!(c[0].to_string(), "rack!=r1");
        assert!(c[0].matches(None));
        assert!(c[0].matches(Some("r2")));
        assert!(!c[0].matches(Some("r1")));
        assert!(!c[1].matches(None));
        assert!(c[1].matches(Some("true")));
        assert_eq!(parse_constraints(""), Ok(vec![]));
        let e = parse_constraints("rack").unwrap_err();
        assert_eq!(
            e.0,
            "placement.constraints term \"rack\" is neither key=value nor key!=value"
        );
        assert!(
            parse_constraints("a=b,")
                .unwrap_err()
                .0
                .contains("empty term")
        );
        assert!(parse_constraints("=b").unwrap_err().0.contains("label key"));
        assert!(parse_constraints("a=").unwrap_err().0.contains("value"));
        assert!(parse_constraints("a==b").unwrap_err().0.contains("value"));
        assert!(parse_constraints("a b=c").is_err());
        assert!(validate_label("rack", "r1").is_ok());
        assert!(validate_label("rack", "").is_err());
        assert!(validate_label("ra ck", "r1").is_err());
        let many = vec!["a=b"; MAX_CONSTRAINTS + 1].join(",");
        assert!(
            parse_constraints(&many)
                .unwrap_err()
                .0
                .contains("more than")
        );
    }

    #[test]
    fn groups() {
        assert_eq!(parse_placement_group("web-1"), Ok("web-1"));
        assert!(parse_placement_group("").is_err());
        assert!(parse_placement_group("a b").is_err());
        assert!(parse_placement_group(&"x".repeat(64)).is_err());
        assert_eq!(parse_group_policy("compact"), Ok(GroupPolicy::Compact));
        assert!(parse_group_policy("pack").is_err());
        assert_eq!(
            parse_group_enforce("permissive"),
            Ok(GroupEnforce::Permissive)
        );
        assert!(parse_group_enforce("soft").is_err());
        assert!(validate_key_value("placement.group", "web").is_ok());
        assert!(validate_key_value("placement.group.policy", "spread").is_ok());
        assert!(validate_key_value("placement.group.enforce", "strict").is_ok());
        assert!(validate_key_value("placement.constraints", "rack!=r1,ssd=true").is_ok());
        assert!(validate_key_value("placement.constraints", "rack").is_err());
    }

    #[test]
    fn keys() {
        assert!(validate_key_value("limits.processes", "100").is_ok());
        assert!(validate_key_value("limits.processes", "0").is_err());
        assert!(validate_key_value("user.anything", "x").is_ok());
        assert!(validate_key_value("environment.HTTP_PROXY", "x").is_ok());
        assert!(validate_key_value("environment.A-B", "x").is_err());
        assert!(validate_key_value("volatile.idmap.base", "1").is_err());
        let e = validate_key_value("limits.bogus", "1").unwrap_err();
        assert_eq!(e.0, "unknown config key limits.bogus");
        assert!(validate_key_value("security.privileged", "maybe").is_err());
    }
}
