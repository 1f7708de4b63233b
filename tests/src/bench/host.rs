//! What the suite reads from the host: available memory, process memory (RSS and PSS), the
//! daemons of each system, and machine facts.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// A `/proc/meminfo`-style field (`MemAvailable:  123456 kB`) in KiB.
pub fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != field {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The host's MemAvailable in MiB.
pub fn mem_available_mib() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    kib_field(&text, "MemAvailable")
        .map(|k| k as f64 / 1024.0)
        .context("/proc/meminfo has no MemAvailable line")
}

/// The host's MemTotal in MiB.
pub fn mem_total_mib() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    kib_field(&text, "MemTotal")
        .map(|k| k as f64 / 1024.0)
        .context("/proc/meminfo has no MemTotal line")
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`: the same clean slate before every memory reading.
pub fn drop_caches() -> Result<()> {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("cannot write /proc/sys/vm/drop_caches")
}

/// MemAvailable after dropping caches (MiB).
pub fn clean_mem_available_mib() -> Result<f64> {
    drop_caches()?;
    mem_available_mib()
}

/// Resident and proportional memory of a set of processes, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Mem {
    /// Processes counted.
    pub processes: u64,
    /// Summed VmRSS.
    pub rss_kib: u64,
    /// Summed Pss (from smaps_rollup; shared pages divided among their users).
    pub pss_kib: u64,
}

impl Mem {
    /// Adds one process's figures.
    pub fn add(&mut self, rss_kib: u64, pss_kib: u64) {
        self.processes += 1;
        self.rss_kib += rss_kib;
        self.pss_kib += pss_kib;
    }

    /// As JSON (MiB).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "processes": self.processes,
            "rss_mib": self.rss_kib as f64 / 1024.0,
            "pss_mib": self.pss_kib as f64 / 1024.0,
        })
    }

    /// "RSS 12.3 MiB, PSS 10.1 MiB" (with the process count when more than one).
    pub fn describe(&self) -> String {
        let n = if self.processes == 1 {
            String::new()
        } else {
            format!("{} processes, ", self.processes)
        };
        format!(
            "{n}RSS {:.1} MiB, PSS {:.1} MiB",
            self.rss_kib as f64 / 1024.0,
            self.pss_kib as f64 / 1024.0
        )
    }
}

/// A process on the host.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub comm: String,
    /// The command line's arguments.
    pub args: Vec<String>,
}

/// Every process whose `/proc` entries can be read.
pub fn processes() -> Vec<Proc> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some(Proc {
                pid,
                comm: comm.trim().to_string(),
                args,
            })
        })
        .collect()
}

/// RSS and PSS of one process in KiB (zero for what cannot be read: it may just have exited).
pub fn proc_mem(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| kib_field(&s, "VmRSS"))
        .unwrap_or(0);
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| kib_field(&s, "Pss"))
        .unwrap_or(0);
    (rss, pss)
}

/// Sums [`proc_mem`] over `procs`.
pub fn sum_mem<'a>(procs: impl IntoIterator<Item = &'a Proc>) -> Mem {
    let mut m = Mem::default();
    for p in procs {
        let (rss, pss) = proc_mem(p.pid);
        m.add(rss, pss);
    }
    m
}

/// The pid in a pid file, when that process still runs.
pub fn pid_file(path: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The "events per second:" figure of `sysbench cpu ... run` output.
pub fn sysbench_events_per_second(out: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "events per second").then(|| v.trim().parse().ok())?
    })
}

/// One line of a file, trimmed (empty when it cannot be read).
pub fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The load averages (`/proc/loadavg`'s first three fields).
pub fn loadavg() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The current UTC time as `date -u` formats it with `fmt` (falls back to Unix seconds).
pub fn utc_now(fmt: &str) -> String {
    Command::new("date")
        .arg("-u")
        .arg(format!("+{fmt}"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().to_string())
                .unwrap_or_default()
        })
}

/// The libraries `ldd BINARY` resolves (absolute paths), the dynamic loader included.
pub fn ldd_paths(ldd_output: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in ldd_output.lines() {
        let l = l.trim();
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
        let path = match l.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => l.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            out.push(p.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields() {
        let text =
            "MemTotal:       24559012 kB\nMemFree:         1234 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(kib_field(text, "MemAvailable"), Some(20_000_000));
        assert_eq!(kib_field(text, "MemTotal"), Some(24_559_012));
        assert_eq!(kib_field(text, "Mem"), None);
        assert_eq!(kib_field("MemAvailable: x kB", "MemAvailable"), None);
    }

    #[test]
    fn smaps_rollup_pss() {
        let text = "55d4c5a00000-7ffd8a5f1000 ---p 00000000 00:00 0                          [rollup]\n\
                    Rss:                4476 kB\nPss:                1021 kB\nPss_Dirty:           520 kB\n\
                    Pss_Anon:            508 kB\nShared_Clean:       3444 kB\n";
        assert_eq!(kib_field(text, "Pss"), Some(1021));
        assert_eq!(kib_field(text, "Rss"), Some(4476));
        assert_eq!(kib_field(text, "Pss_Anon"), Some(508));
    }

    #[test]
    fn mem_sums_and_text() {
        let mut m = Mem::default();
        m.add(2048, 1024);
        m.add(1024, 512);
        assert_eq!(m.processes, 2);
        assert_eq!(m.describe(), "2 processes, RSS 3.0 MiB, PSS 1.5 MiB");
    }

    #[test]
    fn sysbench_output() {
        let out = "CPU speed:\n    events per second:  1234.56\n\nGeneral statistics:\n";
        assert_eq!(sysbench_events_per_second(out), Some(1234.56));
        assert_eq!(sysbench_events_per_second("nothing"), None);
    }

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                   \tlibmissing.so => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(out),
            vec![
                "/lib/x86_64-linux-gnu/libz.so.1".to_string(),
                "/lib64/ld-linux-x86-64.so.2".to_string()
            ]
        );
    }
}
