//! Output formats for listings: lxc-style ASCII tables, CSV, JSON and YAML.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// `--format` of the listing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Table,
    Csv,
    Json,
    Yaml,
    /// Table without borders, one row per line, columns separated by spaces (lxc's "compact").
    Compact,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "yaml" => Ok(Format::Yaml),
            "compact" => Ok(Format::Compact),
            other => Err(format!(
                "invalid format \"{other}\": use table, compact, csv, json or yaml"
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Table => "table",
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Yaml => "yaml",
            Format::Compact => "compact",
        })
    }
}

/// Renders rows as an lxc-style ASCII table: `+`, `-` and `|` borders, a line between rows,
/// headers centred (extra space on the right, as lxc does), cells left-aligned; a cell may hold
/// several lines.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let ncols = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().take(ncols).enumerate() {
            for line in cell.split('\n') {
                widths[i] = widths[i].max(line.chars().count());
            }
        }
    }
    let border = {
        let mut b = String::from("+");
        for w in &widths {
            b.push_str(&"-".repeat(w + 2));
            b.push('+');
        }
        b.push('\n');
        b
    };
    let mut out = border.clone();
    out.push('|');
    for (h, w) in header.iter().zip(&widths) {
        let gap = w - h.chars().count();
        let left = gap / 2;
        out.push_str(&format!(
            " {}{}{} |",
            " ".repeat(left),
            h,
            " ".repeat(gap - left)
        ));
    }
    out.push('\n');
    out.push_str(&border);
    for row in rows {
        let cells: Vec<Vec<&str>> = (0..ncols)
            .map(|i| {
                row.get(i)
                    .map(|c| c.split('\n').collect())
                    .unwrap_or_default()
            })
            .collect();
        let height = cells.iter().map(Vec::len).max().unwrap_or(1).max(1);
        for line in 0..height {
            out.push('|');
            for (i, w) in widths.iter().enumerate() {
                let text = cells[i].get(line).copied().unwrap_or("");
                let pad = w - text.chars().count();
                out.push_str(&format!(" {}{} |", text, " ".repeat(pad)));
            }
            out.push('\n');
        }
        out.push_str(&border);
    }
    out
}

fn compact(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    let flat: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| c.replace('\n', ", ")).collect())
        .collect();
    for row in &flat {
        for (i, c) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            let pad = widths
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(c.chars().count());
            l.push_str(&" ".repeat(pad));
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &flat {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// One CSV field, quoted when needed (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Renders rows as CSV without a header line (as lxc does).
pub fn csv(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for row in rows {
        let fields: Vec<String> = row.iter().map(|c| csv_field(c)).collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// Renders a value as pretty JSON with a final newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    Ok(s)
}

/// Renders a value as YAML.
pub fn yaml<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(value)
}

/// Renders a listing in `format`: `rows` for table/compact/csv, `objects` for json/yaml.
pub fn render<T: Serialize + ?Sized>(
    format: Format,
    header: &[&str],
    rows: &[Vec<String>],
    objects: &T,
) -> anyhow::Result<String> {
    Ok(match format {
        Format::Table => table(header, rows),
        Format::Compact => compact(header, rows),
        Format::Csv => csv(rows),
        Format::Json => json(objects)?,
        Format::Yaml => yaml(objects)?,
    })
}

/// Bytes in lxc's style: `1.50MiB`, `512B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.2}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Vec<String>> {
        vec![
            vec!["web1".into(), "RUNNING".into(), "10.0.0.5 (eth0)".into()],
            vec!["db, 2".into(), "STOPPED".into(), String::new()],
        ]
    }

    #[test]
    fn lxc_table() {
        let t = table(&["NAME", "STATE", "IPV4"], &rows());
        let expected = "\
+-------+---------+-----------------+
| NAME  |  STATE  |      IPV4       |
+-------+---------+-----------------+
| web1  | RUNNING | 10.0.0.5 (eth0) |
+-------+---------+-----------------+
| db, 2 | STOPPED |                 |
+-------+---------+-----------------+
";
        assert_eq!(t, expected);
    }

    #[test]
    fn empty_table_has_header() {
        let t = table(&["NAME", "STATE"], &[]);
        assert_eq!(t, "+------+-------+\n| NAME | STATE |\n+------+-------+\n");
    }

    #[test]
    fn multi_line_cells() {
        let t = table(
            &["NAME", "IPV4"],
            &[vec!["a".into(), "10.0.0.1 (eth0)\n10.0.1.1 (eth1)".into()]],
        );
        assert_eq!(
            t,
            "+------+-----------------+\n| NAME |      IPV4       |\n+------+-----------------+\n\
             | a    | 10.0.0.1 (eth0) |\n|      | 10.0.1.1 (eth1) |\n+------+-----------------+\n"
        );
    }

    #[test]
    fn csv_quotes() {
        assert_eq!(
            csv(&rows()),
            "web1,RUNNING,10.0.0.5 (eth0)\n\"db, 2\",STOPPED,\n"
        );
        assert_eq!(csv(&[vec!["a\"b".into()]]), "\"a\"\"b\"\n");
    }

    #[test]
    fn compact_columns() {
        let c = compact(&["NAME", "STATE"], &[vec!["a".into(), "RUNNING".into()]]);
        assert_eq!(c, "NAME  STATE\na     RUNNING\n");
    }

    #[test]
    fn json_and_yaml() {
        #[derive(Serialize)]
        struct Item {
            name: String,
            n: u32,
        }
        let items = vec![Item {
            name: "a".into(),
            n: 1,
        }];
        assert_eq!(
            json(&items).unwrap(),
            "[\n  {\n    \"name\": \"a\",\n    \"n\": 1\n  }\n]\n"
        );
        assert_eq!(yaml(&items).unwrap(), "- name: a\n  n: 1\n");
        let empty: Vec<Item> = vec![];
        assert_eq!(json(&empty).unwrap(), "[]\n");
    }

    #[test]
    fn formats_parse() {
        assert_eq!("json".parse::<Format>().unwrap(), Format::Json);
        assert!("xml".parse::<Format>().is_err());
    }

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536 * 1024), "1.50MiB");
        assert_eq!(human_bytes(3 << 30), "3.00GiB");
    }
}
