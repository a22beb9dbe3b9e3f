//! Pure maintenance-window arithmetic in a time zone (DST-correct) and slot picking.
//!
//! Windows are wall-clock times in the policy's zone: a daylight-saving change shortens or
//! lengthens a night's window, it never shifts it. Local times that don't exist or exist
//! twice follow [`crate::localtime::resolve`].

use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, TimeDelta, Utc, Weekday};
use chrono_tz::Tz;
use serde::Serialize;

use crate::localtime::{Edge, resolve, start_of_day};

/// How far ahead windows are searched. A policy that yields no slot within this horizon
/// (blackouts everywhere, a duration that never fits) gets a refusal, not an endless search.
pub const HORIZON_DAYS: i64 = 800;

/// The days of the week windows may start on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeekdaySet(u8);

impl WeekdaySet {
    /// Every day of the week.
    pub const ALL: WeekdaySet = WeekdaySet(0x7f);

    /// A set of the given days.
    pub fn of(days: &[Weekday]) -> WeekdaySet {
        WeekdaySet(
            days.iter()
                .fold(0, |m, d| m | 1 << d.num_days_from_monday()),
        )
    }

    /// Whether `day` is in the set.
    pub fn contains(self, day: Weekday) -> bool {
        self.0 & (1 << day.num_days_from_monday()) != 0
    }

    /// Whether no day is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// How windows are laid out.
#[derive(Debug, Clone)]
pub enum WindowRule {
    /// Every allowed weekday from `start` to `end`, local time; `end <= start` crosses midnight.
    Daily {
        /// Local start time.
        start: NaiveTime,
        /// Local end time.
        end: NaiveTime,
        /// Weekdays a window may start on.
        weekdays: WeekdaySet,
    },
    /// Window starts from a cron expression evaluated on local wall-clock time.
    Cron {
        /// Window starts.
        schedule: Box<cron::Schedule>,
        /// Wall-clock length of each window.
        length: TimeDelta,
    },
}

/// Local dates, both inclusive, on which nothing is scheduled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blackout {
    /// The zone the dates are local to: the host's for a host-wide blackout (it applies to
    /// every project), the project's for a project's own.
    pub tz: Tz,
    /// First day of the freeze.
    pub from: NaiveDate,
    /// Last day of the freeze.
    pub to: NaiveDate,
    /// Why, for the plan's output.
    pub reason: String,
}

/// A project's maintenance policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Zone of the windows' wall-clock times.
    pub tz: Tz,
    /// The windows.
    pub rule: WindowRule,
    /// A slot starts no sooner than this after it is announced.
    pub announce_ahead: TimeDelta,
    /// How many VMs of the project may be in maintenance at once (the host-wide limit is
    /// on top: [`Taken::host_max_parallel`]).
    pub max_parallel: u32,
    /// Planned length of one maintenance reboot.
    pub expected_duration: TimeDelta,
    /// Freezes: the host-wide ones and the project's own.
    pub blackouts: Vec<Blackout>,
}

/// The slots other VMs hold when one more is picked: those of the same project (limited by
/// the policy's `max_parallel`) and all of the host's, which include them (limited by
/// `host_max_parallel`).
#[derive(Debug, Clone, Copy)]
pub struct Taken<'a> {
    /// Slots of the project's other VMs.
    pub project: &'a [Slot],
    /// Slots of every other VM of the host, the project's included.
    pub host: &'a [Slot],
    /// How many VMs of the host may be in maintenance at once, whatever their project.
    pub host_max_parallel: u32,
}

impl Taken<'_> {
    /// Nothing taken, no host-wide limit below the project's.
    pub const NONE: Taken<'static> = Taken {
        project: &[],
        host: &[],
        host_max_parallel: u32::MAX,
    };
}

/// A concrete maintenance window: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    /// First instant inside the window.
    #[serde(serialize_with = "crate::localtime::ser_instant")]
    pub start: DateTime<Tz>,
    /// First instant after the window.
    #[serde(serialize_with = "crate::localtime::ser_instant")]
    pub end: DateTime<Tz>,
}

impl Window {
    /// Real elapsed length, which differs from the wall-clock length on DST nights.
    pub fn duration(&self) -> TimeDelta {
        self.end - self.start
    }

    /// Whether `[start, end)` lies wholly inside the window.
    pub fn contains_interval(&self, start: DateTime<Tz>, end: DateTime<Tz>) -> bool {
        self.start <= start && end <= self.end
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} – {}",
            crate::localtime::rfc3339(self.start),
            crate::localtime::rfc3339(self.end)
        )
    }
}

/// The time one maintenance reboot is planned for: `[start, end)`.
pub type Slot = Window;

impl Policy {
    /// The effective windows (blackouts cut out) that end after `from`, in order, up to
    /// [`HORIZON_DAYS`] ahead.
    pub fn windows(&self, from: DateTime<Utc>) -> impl Iterator<Item = Window> + '_ {
        let from = from.with_timezone(&self.tz);
        let horizon = from + TimeDelta::days(HORIZON_DAYS);
        let raw: Box<dyn Iterator<Item = Window> + '_> = match &self.rule {
            WindowRule::Daily {
                start,
                end,
                weekdays,
            } => Box::new(self.daily(from, *start, *end, *weekdays)),
            WindowRule::Cron { schedule, length } => Box::new(self.cron(from, schedule, *length)),
        };
        merge_overlapping(raw.take_while(move |w| w.start < horizon))
            .flat_map(move |w| self.cut_blackouts(w))
            .filter(move |w| w.end > from && w.start < w.end)
    }

    fn daily(
        &self,
        from: DateTime<Tz>,
        start: NaiveTime,
        end: NaiveTime,
        weekdays: WeekdaySet,
    ) -> impl Iterator<Item = Window> + '_ {
        let tz = self.tz;
        let crosses_midnight = end <= start;
        // A window that started yesterday may still be open at `from`.
        let first = from.date_naive().pred_opt().unwrap_or(NaiveDate::MIN);
        first
            .iter_days()
            .filter(move |d| weekdays.contains(d.weekday()))
            .map(move |d| {
                let end_date = if crosses_midnight {
                    d.succ_opt().unwrap_or(d)
                } else {
                    d
                };
                Window {
                    start: resolve(tz, d.and_time(start), Edge::Start),
                    end: resolve(tz, end_date.and_time(end), Edge::End),
                }
            })
    }

    fn cron<'a>(
        &'a self,
        from: DateTime<Tz>,
        schedule: &'a cron::Schedule,
        length: TimeDelta,
    ) -> impl Iterator<Item = Window> + 'a {
        let tz = self.tz;
        // The cron crate skips local times that don't exist; evaluating it on naive wall-clock
        // time (as if it were UTC) and resolving each start ourselves keeps one DST rule.
        let naive_from = from.naive_local() - length - TimeDelta::days(1);
        schedule.after_owned(naive_from.and_utc()).map(move |s| {
            let local = s.naive_utc();
            Window {
                start: resolve(tz, local, Edge::Start),
                end: resolve(tz, local + length, Edge::End),
            }
        })
    }

    fn cut_blackouts(&self, w: Window) -> Vec<Window> {
        let mut pieces = vec![w];
        for b in &self.blackouts {
            // A blackout's instants come from its own zone; the pieces stay in the policy's.
            let b_start = start_of_day(b.tz, b.from).with_timezone(&self.tz);
            let b_end = start_of_day(b.tz, b.to.succ_opt().unwrap_or(b.to)).with_timezone(&self.tz);
            pieces = pieces
                .into_iter()
                .flat_map(|p| {
                    let before = Window {
                        start: p.start,
                        end: p.end.min(b_start),
                    };
                    let after = Window {
                        start: p.start.max(b_end),
                        end: p.end,
                    };
                    [before, after].into_iter().filter(|x| x.start < x.end)
                })
                .collect();
        }
        pieces
    }

    /// The blackout that covers date `d` (local to the blackout's zone), if any.
    pub fn blackout_on(&self, d: NaiveDate) -> Option<&Blackout> {
        self.blackouts.iter().find(|b| b.from <= d && d <= b.to)
    }

    /// The earliest slot for one maintenance announced at `now`.
    ///
    /// It starts on a whole minute, no sooner than `now + announce_ahead`; the whole expected
    /// duration lies inside one effective window; and no more than `max_parallel`
    /// maintenances of the project, and no more than the host-wide limit of all, overlap
    /// (counting the `taken` slots of other VMs). `None` when nothing fits within
    /// [`HORIZON_DAYS`].
    pub fn pick_slot(&self, now: DateTime<Utc>, taken: Taken<'_>) -> Option<Slot> {
        let earliest = ceil_minute(now + self.announce_ahead).with_timezone(&self.tz);
        let dur = self.expected_duration;
        let overlapping = |slots: &[Slot], start: DateTime<Tz>, end: DateTime<Tz>| {
            slots
                .iter()
                .filter(|s| s.start < end && start < s.end)
                .count()
        };
        for w in self.windows(earliest.with_timezone(&Utc)) {
            let lo = ceil_minute_tz(w.start.max(earliest));
            // The earliest valid start is either the lower bound or the moment another slot
            // ends: moving a start earlier only ever adds overlaps when it crosses such an end.
            // Both limits count only overlaps, so the ends of the slots of either list are
            // all the candidates there are.
            let mut candidates: Vec<DateTime<Tz>> = taken
                .host
                .iter()
                .chain(taken.project)
                .map(|s| ceil_minute_tz(s.end).with_timezone(&self.tz))
                .filter(|e| *e > lo && *e < w.end)
                .collect();
            candidates.push(lo);
            candidates.sort();
            for start in candidates {
                let end = start + dur;
                if end > w.end {
                    break;
                }
                if overlapping(taken.project, start, end) < self.max_parallel as usize
                    && overlapping(taken.host, start, end) < taken.host_max_parallel as usize
                {
                    return Some(Slot { start, end });
                }
            }
        }
        None
    }
}

/// Merges windows that overlap or touch (a long window on a DST night can reach the next).
fn merge_overlapping(mut it: impl Iterator<Item = Window>) -> impl Iterator<Item = Window> {
    let mut pending = it.next();
    std::iter::from_fn(move || {
        let mut cur = pending.take()?;
        for next in it.by_ref() {
            if next.start <= cur.end {
                cur.end = cur.end.max(next.end);
            } else {
                pending = Some(next);
                break;
            }
        }
        Some(cur)
    })
}

fn ceil_minute(t: DateTime<Utc>) -> DateTime<Utc> {
    let secs = t.timestamp();
    let rounded = if t.timestamp_subsec_nanos() == 0 && secs.rem_euclid(60) == 0 {
        secs
    } else {
        secs - secs.rem_euclid(60) + 60
    };
    DateTime::from_timestamp(rounded, 0).unwrap_or(t)
}

fn ceil_minute_tz(t: DateTime<Tz>) -> DateTime<Tz> {
    ceil_minute(t.with_timezone(&Utc)).with_timezone(&t.timezone())
}

#[cfg(test)]
mod tests;
