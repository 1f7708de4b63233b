//! btrfs send/receive helpers for transfers between agents: subvolume facts (`btrfs subvolume
//! show`), read-only and writable snapshots, deletion, the `btrfs send` / `btrfs receive`
//! commands, and [`SubvolRenamer`], which gives a received subvolume the name the receiver
//! chooses (a send stream carries the sender's name for it; a read-only received subvolume
//! cannot be moved to another directory afterwards, only renamed in place).
//!
//! Everything here is blocking except the command builders (the caller spawns them).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bytes::{Bytes, BytesMut};

use super::{StorageError, run};

/// What a transfer needs to know about a subvolume.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubvolInfo {
    /// The subvolume's own uuid.
    pub uuid: String,
    /// The uuid of the subvolume it was received from ("" when it was not received).
    pub received_uuid: String,
    /// Creation time, unix seconds (0 when unknown).
    pub created_at: i64,
    pub readonly: bool,
}

impl SubvolInfo {
    /// The uuid a send stream of this subvolume carries, which a receiver records as its
    /// `received_uuid`: the received uuid when the subvolume was itself received, else its own.
    pub fn stream_uuid(&self) -> &str {
        if self.received_uuid.is_empty() {
            &self.uuid
        } else {
            &self.received_uuid
        }
    }
}

/// Reads a subvolume's uuids, creation time and read-only flag.
pub fn subvol_info(path: &Path) -> Result<SubvolInfo, StorageError> {
    let out = run(Command::new("btrfs").args(["subvolume", "show"]).arg(path))?;
    parse_subvol_show(&out).ok_or_else(|| StorageError::Command {
        op: format!("btrfs subvolume show {}", path.display()),
        detail: "the output names no UUID".into(),
    })
}

/// Parses `btrfs subvolume show` output (btrfs-progs 5.x/6.x layout).
pub fn parse_subvol_show(out: &str) -> Option<SubvolInfo> {
    let mut info = SubvolInfo::default();
    for line in out.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let value = value.trim();
        let uuid = |v: &str| {
            if v == "-" {
                String::new()
            } else {
                v.to_string()
            }
        };
        match key.trim() {
            "UUID" => info.uuid = uuid(value),
            "Received UUID" => info.received_uuid = uuid(value),
            "Creation time" => info.created_at = parse_btrfs_time(value).unwrap_or(0),
            "Flags" => info.readonly = value.split_whitespace().any(|f| f == "readonly"),
            _ => {}
        }
    }
    (!info.uuid.is_empty()).then_some(info)
}

/// Parses "2026-11-30 02:06:20 +0000" into unix seconds.
fn parse_btrfs_time(s: &str) -> Option<i64> {
    let mut parts = s.split_whitespace();
    let date = parts.next()?;
    let time = parts.next()?;
    let zone = parts.next().unwrap_or("+0000");
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    if zone.len() != 5 {
        return None;
    }
    let sign = match zone.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let zh: i64 = zone.get(1..3)?.parse().ok()?;
    let zm: i64 = zone.get(3..5)?.parse().ok()?;
    Some(
        days_from_civil(y, m, day) * 86400 + h * 3600 + mi * 60 + sec
            - sign * (zh * 3600 + zm * 60),
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Makes a read-only snapshot of `src` at `dst`.
pub fn snapshot_readonly(src: &Path, dst: &Path) -> Result<(), StorageError> {
    run(Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(src)
        .arg(dst))
    .map(drop)
}

/// Makes a writable snapshot of `src` at `dst`.
pub fn snapshot_writable(src: &Path, dst: &Path) -> Result<(), StorageError> {
    run(Command::new("btrfs")
        .args(["subvolume", "snapshot"])
        .arg(src)
        .arg(dst))
    .map(drop)
}

/// Deletes one subvolume (read-only or not, no nested subvolumes); succeeds when it is gone.
pub fn delete_subvol(path: &Path) -> Result<(), StorageError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    run(Command::new("btrfs")
        .args(["subvolume", "delete"])
        .arg(path))
    .map(drop)
}

/// `btrfs send` of `path`, incremental against `parent` when given, writing the stream to its
/// stdout (piped). Spawn it with `tokio::process::Command::from`.
pub fn send_command(path: &Path, parent: Option<&Path>) -> Command {
    let mut cmd = Command::new("btrfs");
    cmd.args(["send", "-q"]);
    if let Some(p) = parent {
        cmd.arg("-p").arg(p);
    }
    cmd.arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `btrfs receive` into the directory `dir`, reading the stream from its stdin (piped).
/// `--chroot` confines what the stream does to `dir` (a stream's paths cannot climb out through
/// `..` or symlinks); parents of incremental streams are still found anywhere in the
/// filesystem.
pub fn receive_command(dir: &Path) -> Command {
    let mut cmd = Command::new("btrfs");
    // -e: stop at the end command (no second stream after it).
    cmd.args(["receive", "-q", "-e", "--chroot"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Size the pipes to and from `btrfs send` / `btrfs receive` are grown to (from 64 KiB), so
/// that a chunk crosses in one go instead of sixteen context switches.
pub const PIPE_SIZE: i32 = 1 << 20;

/// Grows a pipe's buffer to [`PIPE_SIZE`]; best effort (an unprivileged process may be limited
/// by /proc/sys/fs/pipe-max-size).
pub fn grow_pipe(fd: impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
}

/// Names of the entries of `dir` that are subvolumes' directories (any non-symlink directory),
/// with their paths; an absent directory has none.
pub fn list_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, StorageError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(super::io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(super::io_err(dir))?;
        let ft = e.file_type().map_err(super::io_err(dir))?;
        if ft.is_dir() {
            out.push((e.file_name().to_string_lossy().into_owned(), e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Errors in a send stream's framing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("not a btrfs send stream (bad magic)")]
    BadMagic,
    #[error("unsupported btrfs send stream version {0}")]
    Version(u32),
    #[error("the stream's first command is {0}, not a subvolume or snapshot")]
    FirstCommand(u16),
    #[error("the stream's first command is malformed: {0}")]
    Malformed(&'static str),
    #[error("the stream creates a second subvolume (command {0}): one volume per stream")]
    SecondSubvolume(u16),
    #[error("data after the stream's end command (a second stream)")]
    AfterEnd,
}

const MAGIC: &[u8; 13] = b"btrfs-stream\0";
const STREAM_HEADER: usize = 17;
const CMD_HEADER: usize = 10;
const CMD_SUBVOL: u16 = 1;
const CMD_SNAPSHOT: u16 = 2;
const CMD_END: u16 = 21;
const ATTR_PATH: u16 = 15;
/// A first command longer than this is refused (it holds a name, two uuids and transids).
const MAX_FIRST_COMMAND: usize = 64 * 1024;

/// Rewrites the name in the first command of a btrfs send stream (the subvolume `btrfs
/// receive` creates) and passes the rest through untouched. Feed it the stream's chunks in
/// order; it holds back bytes only until the first command is complete.
///
/// After the first command it walks the command headers of the rest: a stream that creates
/// another subvolume (a later subvolume or snapshot command, which `btrfs receive` would
/// create under the sender's name beside the staged one) or carries bytes after its end
/// command (a second stream) is refused before those bytes are passed on.
pub struct SubvolRenamer {
    name: Vec<u8>,
    pending: BytesMut,
    done: bool,
    /// Bytes of the current command's body still to pass.
    rest: usize,
    /// A command header seen in part.
    header: Vec<u8>,
    /// The end command was seen.
    ended: bool,
}

impl SubvolRenamer {
    /// `name` must be a plain file name (the caller validates it).
    pub fn new(name: &str) -> Self {
        SubvolRenamer {
            name: name.as_bytes().to_vec(),
            pending: BytesMut::new(),
            done: false,
            rest: 0,
            header: Vec::with_capacity(CMD_HEADER),
            ended: false,
        }
    }

    /// Takes the next chunk; returns the bytes to pass on (possibly none yet).
    pub fn feed(&mut self, chunk: Bytes) -> Result<Option<Bytes>, StreamError> {
        if self.done {
            self.walk(&chunk)?;
            return Ok(Some(chunk));
        }
        self.pending.extend_from_slice(&chunk);
        let buf = &self.pending[..];
        if buf.len() >= MAGIC.len() && &buf[..MAGIC.len()] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        if buf.len() < STREAM_HEADER + CMD_HEADER {
            return Ok(None);
        }
        let version = u32::from_le_bytes([buf[13], buf[14], buf[15], buf[16]]);
        if !(1..=3).contains(&version) {
            return Err(StreamError::Version(version));
        }
        let c = STREAM_HEADER;
        let len = u32::from_le_bytes([buf[c], buf[c + 1], buf[c + 2], buf[c + 3]]) as usize;
        let cmd = u16::from_le_bytes([buf[c + 4], buf[c + 5]]);
        if cmd != CMD_SUBVOL && cmd != CMD_SNAPSHOT {
            return Err(StreamError::FirstCommand(cmd));
        }
        if len > MAX_FIRST_COMMAND {
            return Err(StreamError::Malformed("too long"));
        }
        if buf.len() < c + CMD_HEADER + len {
            return Ok(None);
        }
        let body = &buf[c + CMD_HEADER..c + CMD_HEADER + len];
        let mut new_body = Vec::with_capacity(len + self.name.len());
        let mut i = 0;
        let mut renamed = false;
        while i < body.len() {
            if body.len() - i < 4 {
                return Err(StreamError::Malformed("truncated attribute"));
            }
            let ty = u16::from_le_bytes([body[i], body[i + 1]]);
            let alen = u16::from_le_bytes([body[i + 2], body[i + 3]]) as usize;
            if body.len() < i + 4 + alen {
                return Err(StreamError::Malformed("attribute past the command"));
            }
            if ty == ATTR_PATH && !renamed {
                let n = u16::try_from(self.name.len())
                    .map_err(|_| StreamError::Malformed("name too long"))?;
                new_body.extend_from_slice(&ty.to_le_bytes());
                new_body.extend_from_slice(&n.to_le_bytes());
                new_body.extend_from_slice(&self.name);
                renamed = true;
            } else {
                new_body.extend_from_slice(&body[i..i + 4 + alen]);
            }
            i += 4 + alen;
        }
        if !renamed {
            return Err(StreamError::Malformed("no path"));
        }
        let mut out = BytesMut::with_capacity(self.pending.len() + self.name.len());
        out.extend_from_slice(&buf[..STREAM_HEADER]);
        let mut header = [0u8; CMD_HEADER];
        header[..4].copy_from_slice(&(new_body.len() as u32).to_le_bytes());
        header[4..6].copy_from_slice(&cmd.to_le_bytes());
        let crc = crc32c(crc32c(0, &header), &new_body);
        header[6..].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&new_body);
        let tail = Bytes::copy_from_slice(&buf[c + CMD_HEADER + len..]);
        self.pending = BytesMut::new();
        self.done = true;
        self.walk(&tail)?;
        out.extend_from_slice(&tail);
        Ok(Some(out.freeze()))
    }

    /// Follows the command headers in `data` (the bytes after the first command).
    fn walk(&mut self, mut data: &[u8]) -> Result<(), StreamError> {
        while !data.is_empty() {
            if self.ended && self.rest == 0 {
                return Err(StreamError::AfterEnd);
            }
            if self.rest > 0 {
                let n = self.rest.min(data.len());
                self.rest -= n;
                data = &data[n..];
                continue;
            }
            let n = (CMD_HEADER - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == CMD_HEADER {
                let h = &self.header;
                let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let cmd = u16::from_le_bytes([h[4], h[5]]);
                self.header.clear();
                match cmd {
                    CMD_SUBVOL | CMD_SNAPSHOT => return Err(StreamError::SecondSubvolume(cmd)),
                    CMD_END => self.ended = true,
                    _ => {}
                }
                self.rest = len;
            }
        }
        Ok(())
    }

    /// Whether the first command was seen and rewritten.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether the whole stream was seen: the first command rewritten and the end command
    /// passed completely.
    pub fn is_complete(&self) -> bool {
        self.done && self.ended && self.rest == 0 && self.header.is_empty()
    }
}

/// CRC-32C (Castagnoli) update without pre- or post-inversion, as btrfs send streams use
/// (seed 0 over the command with its crc field zeroed).
pub fn crc32c(seed: u32, data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (n, slot) in t.iter_mut().enumerate() {
            let mut c = n as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut c = seed;
    for &b in data {
        c = table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    c
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_vectors() {
        // The standard check value is with inversion on both ends.
        assert_eq!(crc32c(!0, b"123456789") ^ !0, 0xE306_9283);
    }

    #[test]
    fn subvol_show() {
        let out = "r/s1\n\tName: \t\t\ts1\n\tUUID: \t\t\tcec21810-ce93-5b4c-92b7-ece34c880b01\n\tParent UUID: \t\t-\n\tReceived UUID: \t\t2be0a4ae-2352-bd42-a2ee-65f9c7f38e3c\n\tCreation time: \t\t2026-11-30 02:06:20 +0000\n\tFlags: \t\t\treadonly\n";
        let i = parse_subvol_show(out).unwrap();
        assert_eq!(i.uuid, "cec21810-ce93-5b4c-92b7-ece34c880b01");
        assert_eq!(i.received_uuid, "2be0a4ae-2352-bd42-a2ee-65f9c7f38e3c");
        assert_eq!(i.stream_uuid(), "2be0a4ae-2352-bd42-a2ee-65f9c7f38e3c");
        assert_eq!(i.created_at, 1_796_004_380);
        assert!(i.readonly);
        let own = "x\n\tUUID: \t\tabc\n\tReceived UUID: \t-\n\tCreation time: 1970-01-01 01:00:00 +0100\n\tFlags: \t-\n";
        let i = parse_subvol_show(own).unwrap();
        assert_eq!(i.stream_uuid(), "abc");
        assert_eq!(i.created_at, 0);
        assert!(!i.readonly);
        assert!(parse_subvol_show("garbage").is_none());
    }

    /// A stream header and a SUBVOL command naming `name`, as btrfs send writes them.
    fn stream(name: &str, rest: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&ATTR_PATH.to_le_bytes());
        body.extend_from_slice(&(name.len() as u16).to_le_bytes());
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&16u16.to_le_bytes());
        body.extend_from_slice(&[7u8; 16]);
        let mut header = [0u8; CMD_HEADER];
        header[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        header[4..6].copy_from_slice(&CMD_SUBVOL.to_le_bytes());
        let crc = crc32c(crc32c(0, &header), &body);
        header[6..].copy_from_slice(&crc.to_le_bytes());
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&1u32.to_le_bytes());
        s.extend_from_slice(&header);
        s.extend_from_slice(&body);
        s.extend_from_slice(rest);
        s
    }

    #[test]
    fn renames_the_first_command_in_pieces() {
        let input = stream("s1", b"REST");
        let want = stream(".in-t-x", b"REST");
        for split in [1, 5, 20, 30, input.len()] {
            let mut r = SubvolRenamer::new(".in-t-x");
            let mut out = Vec::new();
            for piece in input.chunks(split) {
                if let Some(b) = r.feed(Bytes::copy_from_slice(piece)).unwrap() {
                    out.extend_from_slice(&b);
                }
            }
            assert!(r.is_done());
            assert_eq!(out, want, "split {split}");
        }
    }

    /// A command header and body.
    fn command(cmd: u16, body: &[u8]) -> Vec<u8> {
        let mut c = (body.len() as u32).to_le_bytes().to_vec();
        c.extend_from_slice(&cmd.to_le_bytes());
        c.extend_from_slice(&[0u8; 4]);
        c.extend_from_slice(body);
        c
    }

    /// Feeds `input` in pieces of `split`; the first error, else the output and completeness.
    fn run_pieces(input: &[u8], split: usize) -> Result<(Vec<u8>, bool), StreamError> {
        let mut r = SubvolRenamer::new(".in-t-x");
        let mut out = Vec::new();
        for piece in input.chunks(split) {
            if let Some(b) = r.feed(Bytes::copy_from_slice(piece))? {
                out.extend_from_slice(&b);
            }
        }
        Ok((out, r.is_complete()))
    }

    #[test]
    fn walks_the_commands_to_the_end() {
        let mut rest = command(15, &[1u8; 300]);
        rest.extend(command(CMD_END, b""));
        let input = stream("s1", &rest);
        let want = stream(".in-t-x", &rest);
        for split in [1, 3, 10, 64, input.len()] {
            assert_eq!(run_pieces(&input, split).unwrap(), (want.clone(), true));
        }
        // Truncated before the end command: passed on, but not complete.
        let cut = stream("s1", &command(15, &[1u8; 300]));
        assert!(!run_pieces(&cut, 7).unwrap().1);
    }

    #[test]
    fn refuses_a_second_subvolume_or_stream() {
        for (cmd, err) in [
            (CMD_SUBVOL, StreamError::SecondSubvolume(CMD_SUBVOL)),
            (CMD_SNAPSHOT, StreamError::SecondSubvolume(CMD_SNAPSHOT)),
        ] {
            let mut rest = command(15, &[1u8; 100]);
            rest.extend(command(cmd, b"\x0f\x00\x03\x00evil"));
            for split in [1, 9, 4096] {
                assert_eq!(run_pieces(&stream("s1", &rest), split).unwrap_err(), err);
            }
        }
        // A second stream after the end command.
        let mut rest = command(CMD_END, b"");
        rest.extend(stream("evil", &command(CMD_END, b"")));
        for split in [1, 9, 4096] {
            assert_eq!(
                run_pieces(&stream("s1", &rest), split).unwrap_err(),
                StreamError::AfterEnd
            );
        }
    }

    #[test]
    fn refuses_other_streams() {
        let mut r = SubvolRenamer::new("x");
        assert_eq!(
            r.feed(Bytes::from_static(b"not-a-btrfs-stream-at-all-here"))
                .unwrap_err(),
            StreamError::BadMagic
        );
        let mut s = stream("s1", b"");
        s[STREAM_HEADER + 4] = 9;
        let mut r = SubvolRenamer::new("x");
        assert_eq!(
            r.feed(Bytes::from(s)).unwrap_err(),
            StreamError::FirstCommand(9)
        );
    }
}
