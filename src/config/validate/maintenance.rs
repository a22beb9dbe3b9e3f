//! The maintenance section, host-wide or a project's laid over the host-wide one: every key
//! validated at the field path it is written at, then the policy made of them.

use std::str::FromStr;

use chrono::TimeDelta;
use chrono_tz::Tz;
use serde_json::Value;

use super::Validator;
use crate::config::file::{
    BLACKOUT_KEYS, MAINTENANCE_KEYS, RawBlackout, RawMaintenance, RawSchedule, SCHEDULE_KEYS,
};
use crate::localtime::{format_duration, parse_date, parse_hhmm};
use crate::maintenance::{Blackout, Policy, WeekdaySet, WindowRule};

/// A key's value and the field path it is written at; a default's path is that of the
/// section that lacks it.
#[derive(Debug, Clone)]
struct At<T> {
    path: String,
    value: T,
    /// Taken from the host-wide section into a project's.
    inherited: bool,
}

impl<T> At<T> {
    fn new(section: &str, key: &str, value: T) -> At<T> {
        At {
            path: format!("{section}.{key}"),
            value,
            inherited: false,
        }
    }

    fn inherit(mut self) -> At<T> {
        self.inherited = true;
        self
    }
}

/// One blackout as written, with the zone its dates are local to.
#[derive(Debug, Clone)]
struct BlackoutAt {
    path: String,
    raw: RawBlackout,
    tz: Tz,
}

/// Everything a policy is made of, each key from the section that sets it.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    tz: Tz,
    window: Option<At<String>>,
    weekdays: Option<At<Vec<String>>>,
    schedule: Option<At<RawSchedule>>,
    announce_ahead: At<String>,
    max_parallel: At<i64>,
    expected_duration: At<String>,
    blackouts: Vec<BlackoutAt>,
}

/// Reads a maintenance section (`path` is `maintenance` or `projects.<name>.maintenance`),
/// reporting its unknown keys.
pub(super) fn read(v: &mut Validator, path: &str, raw: Option<Value>) -> Option<RawMaintenance> {
    let raw: RawMaintenance = v.section(path, raw)?;
    v.unknown(path, &raw.unknown, MAINTENANCE_KEYS);
    Some(raw)
}

impl Keys {
    /// The host-wide section, in the host's zone.
    pub(super) fn host(raw: &RawMaintenance, tz: Tz) -> Keys {
        Keys::of("maintenance", raw, tz)
    }

    /// A section on its own: its keys and the defaults for the rest.
    fn of(section: &str, raw: &RawMaintenance, tz: Tz) -> Keys {
        let at = |key: &str, v| At::new(section, key, v);
        Keys {
            tz,
            window: match (&raw.window, &raw.schedule) {
                (Some(w), _) => Some(at("window", w.clone())),
                (None, Some(_)) => None,
                (None, None) => Some(at("window", "22:00-05:00".to_owned())),
            },
            weekdays: raw
                .weekdays
                .clone()
                .map(|d| At::new(section, "weekdays", d)),
            schedule: raw
                .schedule
                .clone()
                .map(|s| At::new(section, "schedule", s)),
            announce_ahead: at(
                "announceAhead",
                raw.announce_ahead.clone().unwrap_or_else(|| "24h".into()),
            ),
            max_parallel: At::new(section, "maxParallel", raw.max_parallel.unwrap_or(1)),
            expected_duration: at(
                "expectedDuration",
                raw.expected_duration
                    .clone()
                    .unwrap_or_else(|| "15m".into()),
            ),
            blackouts: blackouts(section, raw, tz),
        }
    }

    /// A project's section over the host-wide one: each key the project sets replaces the
    /// host's; the window rule is taken whole unless the project names one of its keys (then
    /// a `schedule` replaces the host's window and weekdays, and a `window` or `weekdays`
    /// keeps the host's other one unless the host has a schedule). Host-wide blackouts stay,
    /// in the host's zone, and the project's own are added.
    pub(super) fn over(host: &Keys, section: &str, raw: &RawMaintenance, tz: Tz) -> Keys {
        let own = Keys::of(section, raw, tz);
        let host_daily = host.schedule.is_none();
        let (window, weekdays, schedule) = if raw.schedule.is_some() {
            (own.window, own.weekdays, own.schedule)
        } else if raw.window.is_some() || raw.weekdays.is_some() {
            let window = match raw.window {
                None if host_daily => host.window.clone().map(At::inherit),
                _ => own.window,
            };
            let weekdays = match raw.weekdays {
                None if host_daily => host.weekdays.clone().map(At::inherit),
                _ => own.weekdays,
            };
            (window, weekdays, None)
        } else {
            (
                host.window.clone().map(At::inherit),
                host.weekdays.clone().map(At::inherit),
                host.schedule.clone().map(At::inherit),
            )
        };
        let pick = |set: bool, own: At<String>, host: &At<String>| {
            if set { own } else { host.clone().inherit() }
        };
        let mut blackouts = host.blackouts.clone();
        blackouts.extend(own.blackouts);
        Keys {
            tz,
            window,
            weekdays,
            schedule,
            announce_ahead: pick(
                raw.announce_ahead.is_some(),
                own.announce_ahead,
                &host.announce_ahead,
            ),
            max_parallel: if raw.max_parallel.is_some() {
                own.max_parallel
            } else {
                host.max_parallel.clone().inherit()
            },
            expected_duration: pick(
                raw.expected_duration.is_some(),
                own.expected_duration,
                &host.expected_duration,
            ),
            blackouts,
        }
    }

    /// The `maxParallel` these keys give, for comparing a project's with the host's.
    pub(super) fn max_parallel(&self) -> (i64, bool) {
        (self.max_parallel.value, self.max_parallel.inherited)
    }
}

fn blackouts(section: &str, raw: &RawMaintenance, tz: Tz) -> Vec<BlackoutAt> {
    raw.blackouts
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, b)| BlackoutAt {
            path: format!("{section}.blackouts[{i}]"),
            raw: b.clone(),
            tz,
        })
        .collect()
}

/// Validates every key and builds the policy; `None` when a key is wrong (each problem is
/// reported, a problem of an inherited key at the host-wide key's path, once).
pub(super) fn policy(v: &mut Validator, k: &Keys) -> Option<Policy> {
    let before = v.problems.len();
    let rule = match &k.schedule {
        Some(s) => schedule_rule(v, k, s),
        None => daily_rule(v, k),
    };
    let announce_ahead = v.duration(
        &k.announce_ahead.path,
        Some(&k.announce_ahead.value),
        "",
        TimeDelta::zero(),
    );
    v.range(&k.max_parallel.path, k.max_parallel.value, 1, 1000);
    let expected_duration = v.duration(
        &k.expected_duration.path,
        Some(&k.expected_duration.value),
        "",
        TimeDelta::minutes(1),
    );
    if let Some(rule) = &rule {
        fits(v, k, rule, expected_duration);
    }
    let blackouts: Vec<Blackout> = k.blackouts.iter().filter_map(|b| blackout(v, b)).collect();
    if v.problems.len() > before {
        return None;
    }
    Some(Policy {
        tz: k.tz,
        rule: rule?,
        announce_ahead,
        max_parallel: u32::try_from(k.max_parallel.value).ok()?,
        expected_duration,
        blackouts,
    })
}

fn schedule_rule(v: &mut Validator, k: &Keys, s: &At<RawSchedule>) -> Option<WindowRule> {
    if let Some(w) = &k.window {
        v.err(
            &w.path,
            format!("cannot be combined with {}; use one", s.path),
        );
    }
    if let Some(d) = &k.weekdays {
        v.err(
            &d.path,
            format!(
                "cannot be combined with {}; put the days into the cron expression",
                s.path
            ),
        );
    }
    let path = &s.path;
    v.unknown(path, &s.value.unknown, SCHEDULE_KEYS);
    let schedule = match s.value.cron.as_deref().map(cron::Schedule::from_str) {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            v.err(
                format!("{path}.cron"),
                format!("not a cron expression: {e}"),
            );
            None
        }
        None => {
            v.err(
                format!("{path}.cron"),
                "is required (e.g. \"0 0 22 1-7 * Sun\")",
            );
            None
        }
    };
    let length = match s.value.length.as_deref() {
        Some(l) => v.duration(
            &format!("{path}.length"),
            Some(l),
            "",
            TimeDelta::minutes(1),
        ),
        None => {
            v.err(format!("{path}.length"), "is required (e.g. \"6h\")");
            TimeDelta::zero()
        }
    };
    schedule.map(|c| WindowRule::Cron {
        schedule: Box::new(c),
        length,
    })
}

fn daily_rule(v: &mut Validator, k: &Keys) -> Option<WindowRule> {
    let w = k.window.as_ref()?;
    let (path, window) = (&w.path, &w.value);
    let parsed = window
        .split_once('-')
        .map(|(a, b)| (parse_hhmm(a), parse_hhmm(b)));
    let times = match parsed {
        Some((Ok(s), Ok(e))) if s == e => {
            v.err(
                path,
                format!("{window:?} has no length: start and end are equal"),
            );
            None
        }
        Some((Ok(s), Ok(e))) => Some((s, e)),
        Some((Err(e), _)) | Some((_, Err(e))) => {
            v.err(path, format!("{e}; write \"HH:MM-HH:MM\""));
            None
        }
        None => {
            v.err(
                path,
                format!("{window:?} is not of the form \"HH:MM-HH:MM\""),
            );
            None
        }
    };
    let weekdays = match &k.weekdays {
        None => WeekdaySet::ALL,
        Some(At { path, value, .. }) => {
            let mut parsed = vec![];
            for (i, d) in value.iter().enumerate() {
                match super::weekday(d) {
                    Some(w) => parsed.push(w),
                    None => v.err(
                        format!("{path}[{i}]"),
                        format!("{d:?} is not one of mon, tue, wed, thu, fri, sat, sun"),
                    ),
                }
            }
            if value.is_empty() {
                v.err(path, "must name at least one day");
            }
            WeekdaySet::of(&parsed)
        }
    };
    times.map(|(start, end)| WindowRule::Daily {
        start,
        end,
        weekdays,
    })
}

/// One maintenance reboot must fit into one window. Reported at the expected duration when
/// the section sets it, else at the window that is too short for the one it inherits.
fn fits(v: &mut Validator, k: &Keys, rule: &WindowRule, expected: TimeDelta) {
    let (nominal, rule_path, rule_inherited) = match rule {
        WindowRule::Daily { start, end, .. } => {
            let d = *end - *start;
            let w = k.window.as_ref();
            (
                if d <= TimeDelta::zero() {
                    d + TimeDelta::days(1)
                } else {
                    d
                },
                w.map_or(String::new(), |w| w.path.clone()),
                w.is_some_and(|w| w.inherited),
            )
        }
        WindowRule::Cron { length, .. } => {
            let s = k.schedule.as_ref();
            (
                *length,
                s.map_or(String::new(), |s| format!("{}.length", s.path)),
                s.is_some_and(|s| s.inherited),
            )
        }
    };
    if expected <= nominal {
        return;
    }
    let ed = &k.expected_duration;
    if ed.inherited && !rule_inherited {
        v.err(
            rule_path,
            format!(
                "a window of {} is shorter than expectedDuration {} (from {})",
                format_duration(nominal),
                format_duration(expected),
                ed.path
            ),
        );
    } else {
        v.err(
            &ed.path,
            format!(
                "{} does not fit into a window of {}",
                format_duration(expected),
                format_duration(nominal)
            ),
        );
    }
}

fn blackout(v: &mut Validator, b: &BlackoutAt) -> Option<Blackout> {
    let path = &b.path;
    v.unknown(path, &b.raw.unknown, BLACKOUT_KEYS);
    let mut date = |key: &str, s: Option<&str>| match s.map(parse_date) {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            v.err(format!("{path}.{key}"), e);
            None
        }
        None => {
            v.err(format!("{path}.{key}"), "is required (a date YYYY-MM-DD)");
            None
        }
    };
    let (from, to) = (
        date("from", b.raw.from.as_deref()),
        date("to", b.raw.to.as_deref()),
    );
    let (from, to) = (from?, to?);
    if to < from {
        v.err(
            format!("{path}.to"),
            format!("{to} is before from ({from})"),
        );
    }
    Some(Blackout {
        tz: b.tz,
        from,
        to,
        reason: b.raw.reason.clone().unwrap_or_default(),
    })
}
