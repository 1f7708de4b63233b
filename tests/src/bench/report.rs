//! The pure part of the suite: statistics over samples, targets and whether they are met, and
//! the table printed at the end.

use std::fmt::Write as _;

/// The median of `samples` (the mean of the middle two for an even count); none when empty.
pub fn median(samples: &[f64]) -> Option<f64> {
    percentile(samples, 0.5)
}

/// The `p` quantile (0.0..=1.0) of `samples` by linear interpolation between the closest ranks
/// (p = 0.5 gives the usual median); none when empty.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let rank = p.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(s[lo] + (s[hi] - s[lo]) * (rank - lo as f64))
}

/// Smallest and largest sample; none when empty.
pub fn min_max(samples: &[f64]) -> Option<(f64, f64)> {
    let mut it = samples.iter().copied().filter(|x| x.is_finite());
    let first = it.next()?;
    Some(it.fold((first, first), |(lo, hi), x| (lo.min(x), hi.max(x))))
}

/// Berth's figure over LXD's; none when either is missing or LXD's is zero.
pub fn ratio(berth: Option<f64>, lxd: Option<f64>) -> Option<f64> {
    match (berth, lxd) {
        (Some(b), Some(l)) if l != 0.0 => Some(b / l),
        _ => None,
    }
}

/// The unit a row's figures are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Milliseconds of wall-clock time.
    Ms,
    /// MiB (memory per instance).
    MiB,
    /// Instances launched per second.
    PerSecond,
    /// sysbench CPU events per second.
    EventsPerSecond,
    /// A count (instances).
    Count,
    /// A plain ratio.
    Ratio,
    /// Writes per second.
    WritesPerSecond,
}

impl Unit {
    /// The short name shown in the table.
    pub fn label(self) -> &'static str {
        match self {
            Unit::Ms => "ms",
            Unit::MiB => "MiB",
            Unit::PerSecond => "/s",
            Unit::EventsPerSecond => "ev/s",
            Unit::Count => "",
            Unit::Ratio => "x",
            Unit::WritesPerSecond => "w/s",
        }
    }

    /// The label as a suffix of a figure (" ms"; nothing for counts and ratios).
    fn suffix(self) -> String {
        match self {
            Unit::Count | Unit::Ratio => String::new(),
            u => format!(" {}", u.label()),
        }
    }

    /// Formats one figure in this unit (no unit label).
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Ms if v < 10.0 => format!("{v:.1}"),
            Unit::Ms => format!("{v:.0}"),
            Unit::MiB | Unit::PerSecond => format!("{v:.1}"),
            Unit::EventsPerSecond | Unit::Count | Unit::WritesPerSecond => format!("{v:.0}"),
            Unit::Ratio => format!("{v:.2}"),
        }
    }
}

/// A target from the issue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// None set.
    None,
    /// Berth's median over LXD's median at most this.
    RatioAtMost(f64),
    /// Berth's median at most this (in the row's unit).
    BerthAtMost(f64),
    /// Berth's median at least this (in the row's unit).
    BerthAtLeast(f64),
}

impl Target {
    /// How the target reads in the table.
    pub fn describe(self, unit: Unit) -> String {
        match self {
            Target::None => "—".into(),
            Target::RatioAtMost(r) => format!("ratio ≤ {r}"),
            Target::BerthAtMost(v) => format!("≤ {}{}", unit.format(v), unit.suffix()),
            Target::BerthAtLeast(v) => format!("≥ {}{}", unit.format(v), unit.suffix()),
        }
    }

    /// Whether the target is met: none when there is no target or a figure it needs is missing.
    pub fn met(self, berth: Option<f64>, lxd: Option<f64>) -> Option<bool> {
        match self {
            Target::None => None,
            Target::RatioAtMost(r) => ratio(berth, lxd).map(|x| x <= r),
            Target::BerthAtMost(v) => berth.map(|b| b <= v),
            Target::BerthAtLeast(v) => berth.map(|b| b >= v),
        }
    }
}

/// What one side measured for one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Samples taken, and the errors of the attempts that failed (if some did).
    Measured {
        samples: Vec<f64>,
        errors: Vec<String>,
    },
    /// The side was not measured, with the reason shown in the cell ("not installed", "—").
    NotRun(String),
}

impl Outcome {
    /// An outcome with no samples and no errors yet.
    pub fn empty() -> Outcome {
        Outcome::Measured {
            samples: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The samples (empty when not run).
    pub fn samples(&self) -> &[f64] {
        match self {
            Outcome::Measured { samples, .. } => samples,
            Outcome::NotRun(_) => &[],
        }
    }

    /// The errors (empty when not run).
    pub fn errors(&self) -> &[String] {
        match self {
            Outcome::Measured { errors, .. } => errors,
            Outcome::NotRun(_) => &[],
        }
    }

    /// The median of the samples.
    pub fn median(&self) -> Option<f64> {
        median(self.samples())
    }

    /// The median cell: the figure, "failed: ..." when every attempt failed, or the reason it
    /// was not run; "(k failed)" is appended when some attempts failed.
    fn median_cell(&self, unit: Unit) -> String {
        match self {
            Outcome::NotRun(why) => why.clone(),
            Outcome::Measured { samples, errors } => match median(samples) {
                Some(m) if errors.is_empty() => unit.format(m),
                Some(m) => format!("{} ({} failed)", unit.format(m), errors.len()),
                None => match errors.first() {
                    Some(e) => format!("failed: {}", shorten(e, 40)),
                    None => "—".into(),
                },
            },
        }
    }

    fn range_cell(&self, unit: Unit) -> String {
        match min_max(self.samples()) {
            Some((lo, hi)) => format!("{}–{}", unit.format(lo), unit.format(hi)),
            None => "—".into(),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The scenario id (with a population or size suffix such as `list@100`).
    pub id: String,
    /// The unit of both sides' figures.
    pub unit: Unit,
    /// Berth's figures.
    pub berth: Outcome,
    /// LXD's figures.
    pub lxd: Outcome,
    /// The target for this row.
    pub target: Target,
}

impl Row {
    /// The cells of the row, in [`HEADER`] order.
    pub fn cells(&self) -> Vec<String> {
        let (b, l) = (self.berth.median(), self.lxd.median());
        let met = match self.target.met(b, l) {
            Some(true) => "✓",
            Some(false) => "✗",
            None if self.target == Target::None => "",
            None => "?",
        };
        vec![
            self.id.clone(),
            self.unit.label().to_string(),
            self.berth.median_cell(self.unit),
            self.lxd.median_cell(self.unit),
            ratio(b, l).map_or("—".into(), |r| format!("{r:.2}")),
            self.berth.range_cell(self.unit),
            self.lxd.range_cell(self.unit),
            self.target.describe(self.unit),
            met.to_string(),
        ]
    }
}

/// The table's column titles.
pub const HEADER: [&str; 9] = [
    "scenario",
    "unit",
    "Berth median",
    "LXD median",
    "Berth/LXD",
    "Berth min–max",
    "LXD min–max",
    "target",
    "met",
];

/// The rows as an aligned text table (a title line, a rule, one line per row).
pub fn format_table(rows: &[Row]) -> String {
    let mut lines: Vec<Vec<String>> = vec![HEADER.iter().map(|s| s.to_string()).collect()];
    lines.extend(rows.iter().map(Row::cells));
    let cols = HEADER.len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in l.iter().enumerate() {
            let pad = widths[c].saturating_sub(cell.chars().count());
            // Names left-aligned, figures right-aligned.
            if c == 0 || c >= 7 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
            if c + 1 < cols {
                line.push_str("  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (cols - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    out
}

/// `s` cut to at most `n` characters (with "…" when cut), on one line.
pub fn shorten(s: &str, n: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= n {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(n.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[7.0]), Some(7.0));
    }

    #[test]
    fn percentiles_interpolate() {
        let s: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&s, 0.99), Some(100.0));
        assert_eq!(percentile(&s, 1.0), Some(101.0));
        assert_eq!(percentile(&[1.0, 2.0], 0.25), Some(1.25));
        assert_eq!(percentile(&[f64::NAN, 5.0], 0.5), Some(5.0));
    }

    #[test]
    fn min_max_and_ratio() {
        assert_eq!(min_max(&[2.0, 9.0, 4.0]), Some((2.0, 9.0)));
        assert_eq!(min_max(&[]), None);
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(4.0)), None);
    }

    #[test]
    fn targets() {
        assert_eq!(
            Target::RatioAtMost(0.2).met(Some(100.0), Some(650.0)),
            Some(true)
        );
        assert_eq!(
            Target::RatioAtMost(0.2).met(Some(200.0), Some(650.0)),
            Some(false)
        );
        assert_eq!(Target::RatioAtMost(0.2).met(Some(200.0), None), None);
        assert_eq!(Target::BerthAtMost(50.0).met(Some(50.0), None), Some(true));
        assert_eq!(
            Target::BerthAtLeast(0.98).met(Some(0.97), None),
            Some(false)
        );
        assert_eq!(Target::None.met(Some(1.0), Some(1.0)), None);
        assert_eq!(Target::RatioAtMost(0.25).describe(Unit::Ms), "ratio ≤ 0.25");
        assert_eq!(Target::BerthAtMost(50.0).describe(Unit::Ms), "≤ 50 ms");
        assert_eq!(Target::BerthAtLeast(1000.0).describe(Unit::Count), "≥ 1000");
        assert_eq!(Target::BerthAtLeast(0.98).describe(Unit::Ratio), "≥ 0.98");
    }

    #[test]
    fn units_format() {
        assert_eq!(Unit::Ms.format(6.26), "6.3");
        assert_eq!(Unit::Ms.format(651.4), "651");
        assert_eq!(Unit::MiB.format(2.345), "2.3");
        assert_eq!(Unit::Ratio.format(0.987), "0.99");
    }

    #[test]
    fn table_cells_and_alignment() {
        let rows = vec![
            Row {
                id: "launch-busybox".into(),
                unit: Unit::Ms,
                berth: Outcome::Measured {
                    samples: vec![100.0, 120.0, 110.0],
                    errors: vec![],
                },
                lxd: Outcome::Measured {
                    samples: vec![650.0, 700.0],
                    errors: vec!["timed out".into()],
                },
                target: Target::RatioAtMost(0.2),
            },
            Row {
                id: "copy".into(),
                unit: Unit::Ms,
                berth: Outcome::Measured {
                    samples: vec![],
                    errors: vec!["berth copy failed: no space\nleft".into()],
                },
                lxd: Outcome::NotRun("not installed".into()),
                target: Target::RatioAtMost(0.2),
            },
        ];
        let cells = rows[0].cells();
        assert_eq!(cells[2], "110");
        assert_eq!(cells[3], "675 (1 failed)");
        assert_eq!(cells[4], "0.16");
        assert_eq!(cells[5], "100–120");
        assert_eq!(cells[8], "✓");
        let cells = rows[1].cells();
        assert_eq!(cells[2], "failed: berth copy failed: no space left");
        assert_eq!(cells[3], "not installed");
        assert_eq!(cells[4], "—");
        assert_eq!(cells[8], "?");
        let table = format_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("scenario"));
        assert!(lines[1].chars().all(|c| c == '-'));
        // Every figure column ends at the same character position on every line.
        let end_of = |line: &str, needle: &str| {
            line.find(needle)
                .map(|i| line[..i].chars().count() + needle.chars().count())
        };
        assert_eq!(end_of(lines[0], "Berth median"), end_of(lines[2], "110"));
    }

    #[test]
    fn shorten_cuts_on_one_line() {
        assert_eq!(shorten("a\nb", 10), "a b");
        assert_eq!(shorten("abcdefghij", 5), "abcd…");
    }
}
