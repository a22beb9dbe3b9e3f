//! Pure deletion lifecycle: the stage dates of a deletion and its stage machine.
//!
//! A deletion for date D has T = local midnight at the start of D. Stages fall on calendar
//! days in the policy's zone, so across a DST change their gaps are not multiples of 24 h.
//!
//! Those dates are the earliest instants a stage may run, never a reason to run several back
//! to back: a stage that ran late moves the later ones, which keep their spacing from when it
//! actually ran (purge ≥ 3 days after the real shutdown, backups ≥ 5 days after the real
//! purge, the name ≥ 30 days after that).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Days, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::localtime::{Edge, resolve, start_of_day};

/// Days before T on which the deletion is announced.
pub const ANNOUNCE_DAYS_BEFORE: u64 = 5;
/// Days after T on which the disk goes to the trash, records go and IPs are released.
pub const PURGE_DAYS_AFTER: u64 = 3;
/// Days after T on which backups (snapshots, trashed image) are deleted.
pub const BACKUPS_DAYS_AFTER: u64 = 8;
/// Days after T on which the deletion notice goes and the name is free again.
pub const RELEASE_DAYS_AFTER: u64 = 38;

/// One stage of the lifecycle, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// T−5 days: announce to the contacts; monitoring downtime from T.
    Announce,
    /// T: planned shutdown; disk, addresses and records kept.
    Shutdown,
    /// T+3 days: disk to the RBD trash, records deleted, addresses released.
    Purge,
    /// T+8 days: snapshots and the trashed image deleted.
    DeleteBackups,
    /// T+38 days: deletion notice deleted, the name is free.
    ReleaseName,
}

impl Stage {
    /// All stages in order.
    pub const ALL: [Stage; 5] = [
        Stage::Announce,
        Stage::Shutdown,
        Stage::Purge,
        Stage::DeleteBackups,
        Stage::ReleaseName,
    ];

    /// The stage's name as used in unit names, the journal and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Announce => "announce",
            Stage::Shutdown => "shutdown",
            Stage::Purge => "purge",
            Stage::DeleteBackups => "delete-backups",
            Stage::ReleaseName => "release-name",
        }
    }

    /// The stage after this one.
    pub fn next(self) -> Option<Stage> {
        Stage::ALL.iter().copied().find(|s| *s > self)
    }

    /// The stage before this one.
    pub fn previous(self) -> Option<Stage> {
        Stage::ALL.iter().rev().copied().find(|s| *s < self)
    }

    /// Days this stage keeps from the one before it actually ran, and whether it is
    /// destructive (its act cannot be undone, so it never runs on an untrusted clock).
    fn spacing(self) -> Option<u64> {
        match self {
            Stage::Announce | Stage::Shutdown => None,
            Stage::Purge => Some(PURGE_DAYS_AFTER),
            Stage::DeleteBackups => Some(BACKUPS_DAYS_AFTER - PURGE_DAYS_AFTER),
            Stage::ReleaseName => Some(RELEASE_DAYS_AFTER - BACKUPS_DAYS_AFTER),
        }
    }

    /// Whether the stage destroys something (disk, backups, the name's record): such stages
    /// never run on a clock that is not known to be right.
    pub fn destructive(self) -> bool {
        matches!(
            self,
            Stage::Purge | Stage::DeleteBackups | Stage::ReleaseName
        )
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The instants of every stage of a deletion for local date `date`: the nominal dates, moved
/// by stages that ran late.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The date D the deletion was requested for.
    pub date: NaiveDate,
    tz: Tz,
    /// When stages actually completed.
    done: BTreeMap<Stage, DateTime<Utc>>,
}

impl Schedule {
    /// The nominal schedule for a deletion on `date` in zone `tz`.
    pub fn new(tz: Tz, date: NaiveDate) -> Schedule {
        Schedule {
            date,
            tz,
            done: BTreeMap::new(),
        }
    }

    /// The schedule given when stages actually completed.
    pub fn with_done(mut self, done: &BTreeMap<Stage, DateTime<Utc>>) -> Schedule {
        self.done = done.clone();
        self
    }

    /// T: local midnight at the start of the date.
    pub fn t(&self) -> DateTime<Tz> {
        start_of_day(self.tz, self.date)
    }

    /// The nominal local date of a stage (T − 5, T, T + 3, T + 8, T + 38 days).
    pub fn nominal_date(&self, stage: Stage) -> NaiveDate {
        let d = self.date;
        let shifted = match stage {
            Stage::Announce => d.checked_sub_days(Days::new(ANNOUNCE_DAYS_BEFORE)),
            Stage::Shutdown => Some(d),
            Stage::Purge => d.checked_add_days(Days::new(PURGE_DAYS_AFTER)),
            Stage::DeleteBackups => d.checked_add_days(Days::new(BACKUPS_DAYS_AFTER)),
            Stage::ReleaseName => d.checked_add_days(Days::new(RELEASE_DAYS_AFTER)),
        };
        shifted.unwrap_or(d)
    }

    /// The earliest instant a stage may run: its nominal local midnight, or later when the
    /// stage before it ran (or will run) late, keeping the spacing from that real instant.
    pub fn at(&self, stage: Stage) -> DateTime<Tz> {
        let nominal = start_of_day(self.tz, self.nominal_date(stage));
        let (Some(days), Some(prev)) = (stage.spacing(), stage.previous()) else {
            return nominal;
        };
        let prev_at = match self.done.get(&prev) {
            Some(t) => t.with_timezone(&self.tz),
            None => self.at(prev),
        };
        let local = prev_at.naive_local();
        let spaced = local
            .date()
            .checked_add_days(Days::new(days))
            .map_or(prev_at, |d| {
                resolve(self.tz, d.and_time(local.time()), Edge::Start)
            });
        nominal.max(spaced)
    }

    /// The local date a stage runs on (its earliest instant's date).
    pub fn date_of(&self, stage: Stage) -> NaiveDate {
        self.at(stage).date_naive()
    }

    /// Whether a stage's date moved from its nominal one.
    pub fn moved(&self, stage: Stage) -> bool {
        self.at(stage) != start_of_day(self.tz, self.nominal_date(stage))
    }
}

/// The earliest date a deletion requested at `now` may be scheduled for: the date that
/// begins at the next local midnight after `now`.
pub fn earliest_date(tz: Tz, now: DateTime<Utc>) -> NaiveDate {
    let today = now.with_timezone(&tz).date_naive();
    today.succ_opt().unwrap_or(today)
}

/// A deletion request for a date that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{requested} is too early: the earliest allowed date is {earliest}")]
pub struct TooEarly {
    /// The date asked for.
    pub requested: NaiveDate,
    /// The earliest date allowed now.
    pub earliest: NaiveDate,
}

/// Checks a requested deletion date against `now`.
pub fn check_request(tz: Tz, now: DateTime<Utc>, date: NaiveDate) -> Result<Schedule, TooEarly> {
    let earliest = earliest_date(tz, now);
    if date < earliest {
        return Err(TooEarly {
            requested: date,
            earliest,
        });
    }
    Ok(Schedule::new(tz, date))
}

/// When a deletion's stages completed, from its progress: for a deletion recorded before the
/// instants were kept, a completed stage counts as done at its nominal date.
pub fn done_at(schedule: &Schedule, progress: Progress) -> BTreeMap<Stage, DateTime<Utc>> {
    Stage::ALL
        .into_iter()
        .filter(|s| progress.has_done(*s))
        .map(|s| (s, schedule.at(s).with_timezone(&Utc)))
        .collect()
}

/// How far a deletion has got: the last stage that completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "stage")]
pub enum Progress {
    /// Requested; no stage has run.
    #[default]
    Scheduled,
    /// A stage has completed.
    Done {
        /// The last completed stage.
        last: Stage,
    },
}

/// A stage asked to run out of order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stage {stage} cannot follow {progress:?}")]
pub struct OutOfOrder {
    /// The stage asked for.
    pub stage: Stage,
    /// Where the deletion stands.
    pub progress: Progress,
}

impl Progress {
    /// The stage that runs next, if any.
    pub fn next_stage(self) -> Option<Stage> {
        match self {
            Progress::Scheduled => Some(Stage::Announce),
            Progress::Done { last } => last.next(),
        }
    }

    /// Whether `stage` has completed.
    pub fn has_done(self, stage: Stage) -> bool {
        matches!(self, Progress::Done { last } if last >= stage)
    }

    /// Records that `stage` completed. Stages complete strictly in order; completing the
    /// same stage again is a no-op, so a stage re-run after a crash is harmless.
    pub fn complete(self, stage: Stage) -> Result<Progress, OutOfOrder> {
        if self.has_done(stage) {
            return Ok(self);
        }
        if self.next_stage() == Some(stage) {
            Ok(Progress::Done { last: stage })
        } else {
            Err(OutOfOrder {
                stage,
                progress: self,
            })
        }
    }

    /// The stage due at `now`, if any.
    ///
    /// Only the next stage can be due: a later stage's instant depends on when the one before
    /// it really runs, so a host that was down over several dates runs one stage, and the
    /// next one keeps its spacing from then.
    pub fn due(self, schedule: &Schedule, now: DateTime<Utc>) -> Vec<Stage> {
        self.next_stage()
            .filter(|s| schedule.at(*s) <= now)
            .into_iter()
            .collect()
    }
}

/// Why a deletion can no longer be cancelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the disk went to the trash on {purged} and the VM's records and addresses were released; \
     backups are deleted on {backups_gone}"
)]
pub struct TooLateToCancel {
    /// Date of the purge stage.
    pub purged: NaiveDate,
    /// Date the backups go (restoring from them is an operator's job until then).
    pub backups_gone: NaiveDate,
}

/// Whether a deletion can still be cancelled at `now`: until T+3 days, as long as the purge
/// has not run.
pub fn can_cancel(
    schedule: &Schedule,
    progress: Progress,
    now: DateTime<Utc>,
) -> Result<(), TooLateToCancel> {
    if progress.has_done(Stage::Purge) || schedule.at(Stage::Purge) <= now {
        return Err(TooLateToCancel {
            purged: schedule.date_of(Stage::Purge),
            backups_gone: schedule.date_of(Stage::DeleteBackups),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono_tz::Europe::Berlin;

    use super::*;
    use crate::localtime::{parse_instant, rfc3339};

    fn d(s: &str) -> NaiveDate {
        crate::localtime::parse_date(s).unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        parse_instant(s).unwrap()
    }

    #[test]
    fn stages_fall_on_local_midnights_across_dst() {
        // T on 2027-03-26: the purge (T+3) lies after the spring change of 2027-03-28.
        let s = Schedule::new(Berlin, d("2027-03-26"));
        assert_eq!(rfc3339(s.at(Stage::Announce)), "2027-03-21T00:00:00+01:00");
        assert_eq!(rfc3339(s.at(Stage::Shutdown)), "2027-03-26T00:00:00+01:00");
        assert_eq!(rfc3339(s.at(Stage::Purge)), "2027-03-29T00:00:00+02:00");
        assert_eq!(
            rfc3339(s.at(Stage::DeleteBackups)),
            "2027-04-03T00:00:00+02:00"
        );
        assert_eq!(
            rfc3339(s.at(Stage::ReleaseName)),
            "2027-05-03T00:00:00+02:00"
        );
        // Three calendar days, but only 71 hours.
        assert_eq!((s.at(Stage::Purge) - s.t()).num_hours(), 71);
        let s = Schedule::new(Berlin, d("2026-10-24"));
        assert_eq!((s.at(Stage::Purge) - s.t()).num_hours(), 73);
    }

    #[test]
    fn the_earliest_date_is_the_next_local_midnight() {
        // 23:30 UTC on the 29th is already the 30th in Berlin.
        assert_eq!(
            earliest_date(Berlin, t("2026-11-29T23:30:00Z")),
            d("2026-12-01")
        );
        assert_eq!(
            earliest_date(Berlin, t("2026-11-29T12:00:00Z")),
            d("2026-11-30")
        );
        let err = check_request(Berlin, t("2026-11-29T12:00:00Z"), d("2026-11-29")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "2026-11-29 is too early: the earliest allowed date is 2026-11-30"
        );
        assert!(check_request(Berlin, t("2026-11-29T12:00:00Z"), d("2026-11-30")).is_ok());
    }

    #[test]
    fn stages_complete_in_order_and_rerun_harmlessly() {
        let p = Progress::Scheduled;
        assert!(p.complete(Stage::Shutdown).is_err());
        let p = p.complete(Stage::Announce).unwrap();
        let p = p.complete(Stage::Shutdown).unwrap();
        assert_eq!(p.complete(Stage::Shutdown), Ok(p));
        assert_eq!(p.complete(Stage::Announce), Ok(p));
        assert!(p.complete(Stage::DeleteBackups).is_err());
        assert_eq!(p.next_stage(), Some(Stage::Purge));
        let p = Progress::Done {
            last: Stage::ReleaseName,
        };
        assert_eq!(p.next_stage(), None);
    }

    #[test]
    fn due_stages_run_in_order_after_downtime() {
        let s = Schedule::new(Berlin, d("2026-12-10"));
        let p = Progress::Done {
            last: Stage::Announce,
        };
        // The host was down from before T until T+4 days: only the shutdown is due; the purge
        // then keeps its three days from when the shutdown really ran.
        let late = t("2026-12-14T08:00:00+01:00");
        assert_eq!(p.due(&s, late), [Stage::Shutdown]);
        let p = p.complete(Stage::Shutdown).unwrap();
        let mut done = done_at(
            &s,
            Progress::Done {
                last: Stage::Announce,
            },
        );
        done.insert(Stage::Shutdown, late);
        let s = s.with_done(&done);
        assert!(p.due(&s, t("2026-12-16T23:00:00+01:00")).is_empty());
        assert_eq!(rfc3339(s.at(Stage::Purge)), "2026-12-17T08:00:00+01:00");
        assert_eq!(p.due(&s, t("2026-12-17T08:00:00+01:00")), [Stage::Purge]);
        // The later dates move with it.
        assert_eq!(
            rfc3339(s.at(Stage::DeleteBackups)),
            "2026-12-22T08:00:00+01:00"
        );
        assert_eq!(
            rfc3339(s.at(Stage::ReleaseName)),
            "2027-01-21T08:00:00+01:00"
        );
        assert!(s.moved(Stage::Purge) && !s.moved(Stage::Shutdown));
        assert!(p.due(&s, t("2026-12-09T23:59:59+01:00")).is_empty());
        // Announced at once when T is less than five days away.
        assert_eq!(
            Progress::Scheduled.due(&s, t("2026-12-07T12:00:00+01:00")),
            [Stage::Announce]
        );
    }

    #[test]
    fn cancelling_ends_at_the_purge() {
        let s = Schedule::new(Berlin, d("2026-12-10"));
        let shut = Progress::Done {
            last: Stage::Shutdown,
        };
        assert!(can_cancel(&s, shut, t("2026-12-12T23:59:00+01:00")).is_ok());
        let err = can_cancel(&s, shut, t("2026-12-13T00:00:00+01:00")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the disk went to the trash on 2026-12-13 and the VM's records and addresses were \
             released; backups are deleted on 2026-12-18"
        );
    }
}
