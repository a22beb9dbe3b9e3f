//! Wall-clock time in a zone: the rule for local times that don't exist or exist twice on a
//! daylight-saving night, and the duration and date formats of the config and the CLI.

use chrono::{
    DateTime, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Utc,
};
use chrono_tz::Tz;

/// Which end of an interval a local time is: decides how a repeated local time resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// An interval's start: a repeated local time takes its first occurrence.
    Start,
    /// An interval's end: a repeated local time takes its second occurrence.
    End,
}

/// The instant of a local wall-clock time in `tz`.
///
/// The rule for daylight-saving nights (docs/usage/maintenance.md):
/// - a local time that doesn't exist (the clock jumps over it) is the instant of the jump;
/// - a local time that exists twice is, for a start, its first occurrence and, for an end,
///   its second: an interval is never shortened by a repeated hour.
pub fn resolve(tz: Tz, local: NaiveDateTime, edge: Edge) -> DateTime<Tz> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t,
        LocalResult::Ambiguous(first, second) => match edge {
            Edge::Start => first.min(second),
            Edge::End => first.max(second),
        },
        LocalResult::None => first_instant_at_or_after(tz, local),
    }
}

/// The earliest instant whose wall-clock time in `tz` is at or after `local`.
///
/// Only called for a local time in a gap, where wall-clock time as a function of the instant
/// jumps over `local`; offsets stay within ±26 h of UTC, and within such a span a zone has
/// no other transition, so the function is monotone there and a binary search finds the jump.
fn first_instant_at_or_after(tz: Tz, local: NaiveDateTime) -> DateTime<Tz> {
    let as_utc = local.and_utc().timestamp();
    let (mut lo, mut hi) = (as_utc - 26 * 3600, as_utc + 26 * 3600);
    let wall = |secs: i64| {
        let t = DateTime::from_timestamp(secs, 0).unwrap_or_default();
        t.with_timezone(&tz).naive_local()
    };
    // Invariant: wall(lo) < local <= wall(hi).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if wall(mid) < local {
            lo = mid
        } else {
            hi = mid
        }
    }
    DateTime::from_timestamp(hi, 0)
        .unwrap_or_default()
        .with_timezone(&tz)
}

/// Local midnight at the start of `date`, following [`resolve`]'s rule.
pub fn start_of_day(tz: Tz, date: NaiveDate) -> DateTime<Tz> {
    resolve(tz, date.and_time(NaiveTime::MIN), Edge::Start)
}

/// Parses a duration such as `24h`, `90m`, `1h 30m` or `45s`.
pub fn parse_duration(s: &str) -> Result<TimeDelta, String> {
    let std = humantime::parse_duration(s)
        .map_err(|_| format!("{s:?} is not a duration such as 24h, 90m or 1h 30m"))?;
    TimeDelta::from_std(std).map_err(|_| format!("{s:?} is too long"))
}

/// Formats a duration compactly in hours, minutes and seconds, e.g. `24h` or `1h 30m`.
pub fn format_duration(d: TimeDelta) -> String {
    let sign = if d < TimeDelta::zero() { "-" } else { "" };
    let secs = d.num_seconds().unsigned_abs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let parts: Vec<String> = [(h, "h"), (m, "m"), (s, "s")]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if parts.is_empty() {
        "0s".to_owned()
    } else {
        format!("{sign}{}", parts.join(" "))
    }
}

/// Parses a calendar date written `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Result<NaiveDate, String> {
    let ok_shape = s.len() == 10
        && s.char_indices().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    if !ok_shape {
        return Err(format!("{s:?} is not a date of the form YYYY-MM-DD"));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| format!("{s:?} is not a valid date"))
}

/// Parses a wall-clock time written `HH:MM` (00:00 to 23:59).
pub fn parse_hhmm(s: &str) -> Result<NaiveTime, String> {
    let ok_shape = s.len() == 5
        && s.char_indices()
            .all(|(i, c)| if i == 2 { c == ':' } else { c.is_ascii_digit() });
    if !ok_shape {
        return Err(format!("{s:?} is not a time of the form HH:MM"));
    }
    NaiveTime::parse_from_str(s, "%H:%M").map_err(|_| format!("{s:?} is not a valid time"))
}

/// Parses an RFC 3339 instant, as taken by `--now` and `--from`.
pub fn parse_instant(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("{s:?} is not an RFC 3339 instant such as 2026-12-01T22:00:00+01:00 ({e})")
        })
}

/// Formats an instant in `tz` as RFC 3339 with its offset, e.g. `2026-12-01T22:00:00+01:00`.
pub fn rfc3339(t: DateTime<Tz>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

/// Serializes an instant as RFC 3339 with the offset of its zone (serde `serialize_with`).
pub fn ser_instant<S: serde::Serializer>(t: &DateTime<Tz>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// Serializes an optional instant like [`ser_instant`].
pub fn ser_opt_instant<S: serde::Serializer>(
    t: &Option<DateTime<Tz>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;
    use chrono_tz::{America::New_York, Australia::Lord_Howe, Europe::Berlin};

    use super::*;

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, min, 0)
            .unwrap()
    }

    #[test]
    fn a_missing_local_time_is_the_instant_of_the_jump() {
        // 2027-03-28 02:30 does not exist in Berlin; clocks jump at 01:00 UTC.
        let t = resolve(Berlin, at(2027, 3, 28, 2, 30), Edge::Start);
        assert_eq!(rfc3339(t), "2027-03-28T03:00:00+02:00");
        assert_eq!(resolve(Berlin, at(2027, 3, 28, 2, 30), Edge::End), t);
        // Lord Howe jumps by 30 minutes, from 02:00 to 02:30 on the first Sunday of October.
        let t = resolve(Lord_Howe, at(2026, 10, 4, 2, 10), Edge::Start);
        assert_eq!(rfc3339(t), "2026-10-04T02:30:00+11:00");
    }

    #[test]
    fn a_repeated_local_time_starts_early_and_ends_late() {
        // 2026-10-25 02:30 happens twice in Berlin.
        let start = resolve(Berlin, at(2026, 10, 25, 2, 30), Edge::Start);
        let end = resolve(Berlin, at(2026, 10, 25, 2, 30), Edge::End);
        assert_eq!(rfc3339(start), "2026-10-25T02:30:00+02:00");
        assert_eq!(rfc3339(end), "2026-10-25T02:30:00+01:00");
        let start = resolve(New_York, at(2026, 11, 1, 1, 15), Edge::Start);
        assert_eq!(rfc3339(start), "2026-11-01T01:15:00-04:00");
    }

    #[test]
    fn formats_are_strict() {
        assert!(parse_date("2026-12-01").is_ok());
        assert!(parse_date("2026-2-01").is_err());
        assert!(parse_date("2026-02-30").is_err());
        assert!(parse_hhmm("22:00").is_ok());
        assert!(parse_hhmm("24:00").is_err());
        assert!(parse_hhmm("9:00").is_err());
        assert_eq!(parse_duration("1h 30m").unwrap(), TimeDelta::minutes(90));
        assert!(parse_duration("soon").is_err());
        assert_eq!(format_duration(TimeDelta::hours(24)), "24h");
        assert_eq!(format_duration(TimeDelta::seconds(5430)), "1h 30m 30s");
        assert!(parse_instant("2026-12-01T22:00:00+01:00").is_ok());
        assert!(parse_instant("2026-12-01 22:00").is_err());
    }
}
