//! Minimal RFC 3339 parsing so that `apply` can compare leader-stamped times exactly
//! (string comparison breaks on differing fractional digits or offsets).

use crate::clock::days_from_civil;

/// An instant parsed from RFC 3339: seconds since the Unix epoch and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rfc3339 {
    secs: i64,
    nanos: u32,
}

impl Rfc3339 {
    /// Whole seconds since the Unix epoch (a fraction is dropped, towards the past).
    pub fn unix_secs(self) -> i64 {
        self.secs
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; `None` if malformed.
    pub fn parse(s: &str) -> Option<Rfc3339> {
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return None;
        }
        if b[13] != b':' || b[16] != b':' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let part = s.get(r)?;
            if part.bytes().all(|c| c.is_ascii_digit()) {
                part.parse().ok()
            } else {
                None
            }
        };
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
            return None;
        }
        if second > 60 {
            return None;
        }
        let mut i = 19;
        let mut nanos: u32 = 0;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                if i - start < 9 {
                    nanos = nanos * 10 + u32::from(b[i] - b'0');
                }
                i += 1;
            }
            let digits = i - start;
            if digits == 0 {
                return None;
            }
            for _ in digits..9 {
                nanos *= 10;
            }
        }
        let offset_secs = match b.get(i)? {
            b'Z' | b'z' if i + 1 == b.len() => 0,
            sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
                let oh = num(i + 1..i + 3)?;
                let om = num(i + 4..i + 6)?;
                let off = oh * 3600 + om * 60;
                if *sign == b'+' { off } else { -off }
            }
            _ => return None,
        };
        let days = days_from_civil(year, month, day);
        let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
        Some(Rfc3339 { secs, nanos })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Rfc3339;

    #[test]
    fn parses_and_orders() {
        let a = Rfc3339::parse("2026-11-29T19:00:00Z").unwrap();
        let b = Rfc3339::parse("2026-11-29T19:00:00.5Z").unwrap();
        let c = Rfc3339::parse("2026-11-29T20:00:00+01:00").unwrap();
        assert!(a < b);
        assert_eq!(a, c);
        assert_eq!(
            Rfc3339::parse("1970-01-01T00:00:00Z").unwrap(),
            Rfc3339 { secs: 0, nanos: 0 }
        );
        assert_eq!(
            Rfc3339::parse("2000-03-01T00:00:00Z").unwrap().secs,
            951_868_800
        );
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "2026-11-29",
            "2026-13-01T00:00:00Z",
            "2026-11-29T19:00:00",
            "2026-11-29T19:00:00.Z",
            "x026-11-29T19:00:00Z",
        ] {
            assert!(Rfc3339::parse(s).is_none(), "{s}");
        }
    }
}
