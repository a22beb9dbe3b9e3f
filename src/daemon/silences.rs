//! Monitoring downtimes as Alertmanager silences: a deletion silences the VM's alerts from T
//! until its name is released, a maintenance slot for its duration. Which silences should
//! exist is a pure function of the state ([`wanted`]); what to do about the difference to
//! what Alertmanager has is another ([`reconcile`]); a task carries that out and reports back
//! as events, retrying with backoff while Alertmanager cannot be reached. Nothing waits for
//! it: a stage or a reboot runs whether or not its silence exists yet.
//!
//! Every silence matches `vm="<name>"`, so it covers every alert about the VM. Its id is kept
//! in the state (`silences`), so a restart neither creates it twice nor forgets to remove it;
//! one created just before a crash, before its id reached the disk, is recognised by its
//! creator, matcher, window and comment and taken over.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use chrono_tz::Tz;
use tokio::sync::{mpsc, watch};

use super::Event;
use crate::config::AlertmanagerConfig;
use crate::deletion::Stage;
use crate::exec::alertmanager::{
    Alertmanager, AlertmanagerError, Matcher, NewSilence, Silence, SilenceState,
};
use crate::localtime::rfc3339;
use crate::model::VmName;
use crate::plan::slot_in;
use crate::state::{DeletionSource, SilencePurpose, SilenceRecord, State};

/// First wait after a failed sync; doubles up to [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_secs(2);
/// Longest wait between attempts while Alertmanager cannot be reached.
const MAX_RETRY: Duration = Duration::from_secs(300);
/// How often silences that exist are checked again (an Alertmanager that lost its data, a
/// silence expired by hand), while there are any.
const RECHECK: Duration = Duration::from_secs(300);

/// A silence that should exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The VM whose alerts it silences.
    pub vm: VmName,
    /// Why.
    pub purpose: SilencePurpose,
    /// From (whole seconds).
    pub starts_at: DateTime<Utc>,
    /// Until (whole seconds).
    pub ends_at: DateTime<Utc>,
    /// What and why, for the people who read Alertmanager; starts with [`comment_prefix`].
    pub comment: String,
}

/// What the silences task works from; sent by the loop whenever the state changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SilencePlan {
    /// The Alertmanager; none configured, nothing to do.
    pub alertmanager: Option<AlertmanagerConfig>,
    /// `createdBy` of every silence this daemon makes (names the host).
    pub created_by: String,
    /// The silences that should exist.
    pub wanted: Vec<Wanted>,
    /// The silences the state says exist.
    pub records: Vec<SilenceRecord>,
    /// VMs this daemon is responsible for: only their silences are ever removed.
    pub ours: BTreeSet<VmName>,
}

/// What the task tells the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// This silence exists now (created, updated or taken over): record it.
    Recorded(SilenceRecord),
    /// The silence with this id is gone (expired by vmkeeper or by time): forget it.
    Gone {
        /// The VM.
        vm: VmName,
        /// Why it was there.
        purpose: SilencePurpose,
        /// Its id.
        id: String,
    },
    /// Alertmanager has what the plan asks for.
    Synced,
    /// Alertmanager could not be reached or refused; retried after `retry`.
    Failed {
        /// Why.
        error: String,
        /// When the next attempt is.
        retry: Duration,
    },
}

/// The beginning of every comment of a silence for `purpose` of `vm`.
pub fn comment_prefix(purpose: SilencePurpose, vm: &VmName) -> String {
    format!("vmkeeper {} of VM {vm}", purpose.as_str())
}

/// The silences the state calls for: a deletion's from T (once announced) until its name is
/// released, a maintenance slot's for the slot. `zone` gives each VM's zone (its project's).
pub fn wanted(state: &State, zone: impl Fn(&VmName) -> Tz) -> Vec<Wanted> {
    let mut wanted = vec![];
    for (vm, d) in &state.deletions {
        let Some(from) = d.downtime_from else {
            continue;
        };
        let tz = zone(vm);
        let schedule = d.schedule(tz);
        let until = schedule.at(Stage::ReleaseName).with_timezone(&Utc);
        let by = match &d.source {
            DeletionSource::Config => "deleteAt in the configuration".to_owned(),
            DeletionSource::Removed => "its removal from the configuration".to_owned(),
            DeletionSource::Cli { by } => format!("vmkeeper delete by {by}"),
        };
        wanted.push(Wanted {
            vm: vm.clone(),
            purpose: SilencePurpose::Deletion,
            starts_at: from.trunc_subsecs(0),
            ends_at: until.trunc_subsecs(0),
            comment: format!(
                "{}: deleted on {} ({by}); shut down at {}, its name is released at {}",
                comment_prefix(SilencePurpose::Deletion, vm),
                d.date,
                rfc3339(from.with_timezone(&tz)),
                rfc3339(schedule.at(Stage::ReleaseName)),
            ),
        });
    }
    for (vm, m) in &state.maintenances {
        let reasons = m
            .reasons
            .iter()
            .map(super::maintenance::describe_reason)
            .collect::<Vec<_>>()
            .join("; ");
        wanted.push(Wanted {
            vm: vm.clone(),
            purpose: SilencePurpose::Maintenance,
            starts_at: m.slot_start.trunc_subsecs(0),
            ends_at: m.slot_end.trunc_subsecs(0),
            comment: format!(
                "{}: maintenance reboot in slot {} ({reasons})",
                comment_prefix(SilencePurpose::Maintenance, vm),
                slot_in(zone(vm), m.slot_start, m.slot_end),
            ),
        });
    }
    wanted
}

/// One thing to do to make Alertmanager match the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the silence (updating `replaces`, which Alertmanager still has).
    Create {
        /// The silence.
        wanted: Wanted,
        /// The silence it replaces.
        replaces: Option<String>,
    },
    /// Alertmanager has it already under this id (made before a crash): record it.
    Adopt(SilenceRecord),
    /// Expire the recorded silence and forget it.
    Expire(SilenceRecord),
    /// Forget the recorded silence: Alertmanager no longer has it active or pending.
    Forget(SilenceRecord),
    /// Expire a silence of ours that nothing records or wants (made before a crash).
    ExpireOrphan {
        /// Its id.
        id: String,
    },
}

fn same_window(s: &Silence, starts: DateTime<Utc>, ends: DateTime<Utc>) -> bool {
    s.starts_at.trunc_subsecs(0) == starts && s.ends_at.trunc_subsecs(0) == ends
}

fn matches_only(s: &Silence, vm: &VmName) -> bool {
    s.matchers == [Matcher::equal("vm", vm.as_str())]
}

/// What to do, at `now`, to make the silences Alertmanager has (`remote`) match `plan`:
/// - a wanted silence that is recorded, live and has its window needs nothing; otherwise one
///   of ours with that window is adopted, or it is created (replacing the recorded one);
/// - a recorded silence no longer wanted is expired, except a maintenance slot's once the
///   slot has begun (its alerts may still come; it runs out by itself); one Alertmanager
///   no longer has live is forgotten;
/// - a live silence of ours (creator and matcher) for one of our VMs that nothing records or
///   wants is expired.
///
/// A silence whose end has passed is neither wanted nor kept.
pub fn reconcile(plan: &SilencePlan, remote: &[Silence], now: DateTime<Utc>) -> Vec<Step> {
    let live = |id: &str| {
        remote
            .iter()
            .find(|s| s.id == id && s.state() != SilenceState::Expired)
    };
    let ours = |s: &Silence| s.created_by == plan.created_by && s.state() != SilenceState::Expired;
    let mut steps = vec![];
    let mut used: BTreeSet<&str> = plan.records.iter().map(|r| r.id.as_str()).collect();
    let wanted: Vec<&Wanted> = plan.wanted.iter().filter(|w| w.ends_at > now).collect();
    for w in &wanted {
        let record = plan
            .records
            .iter()
            .find(|r| r.vm == w.vm && r.purpose == w.purpose);
        let current = record.and_then(|r| live(&r.id));
        if current.is_some_and(|s| same_window(s, w.starts_at, w.ends_at) && matches_only(s, &w.vm))
        {
            continue;
        }
        let prefix = comment_prefix(w.purpose, &w.vm);
        let adoptable = remote.iter().find(|s| {
            ours(s)
                && !used.contains(s.id.as_str())
                && matches_only(s, &w.vm)
                && same_window(s, w.starts_at, w.ends_at)
                && s.comment.starts_with(&prefix)
        });
        match adoptable {
            Some(s) => {
                used.insert(&s.id);
                steps.push(Step::Adopt(SilenceRecord {
                    vm: w.vm.clone(),
                    purpose: w.purpose,
                    id: s.id.clone(),
                    starts_at: w.starts_at,
                    ends_at: w.ends_at,
                }));
            }
            None => steps.push(Step::Create {
                wanted: (*w).clone(),
                replaces: current.map(|s| s.id.clone()),
            }),
        }
    }
    for r in &plan.records {
        if wanted
            .iter()
            .any(|w| w.vm == r.vm && w.purpose == r.purpose)
        {
            continue;
        }
        let running_slot = r.purpose == SilencePurpose::Maintenance && r.starts_at <= now;
        match live(&r.id) {
            Some(_) if r.ends_at > now && running_slot => {}
            Some(_) if r.ends_at > now => steps.push(Step::Expire(r.clone())),
            _ => steps.push(Step::Forget(r.clone())),
        }
    }
    for s in remote {
        let for_ours = match s.matchers.as_slice() {
            [m] if m.name == "vm" && m.is_equal && !m.is_regex => m
                .value
                .parse::<VmName>()
                .is_ok_and(|vm| plan.ours.contains(&vm)),
            _ => false,
        };
        if ours(s) && for_ours && !used.contains(s.id.as_str()) && s.ends_at > now {
            steps.push(Step::ExpireOrphan { id: s.id.clone() });
        }
    }
    steps
}

/// Keeps Alertmanager's silences in line with each plan sent on `rx`, reporting
/// [`Event::Silences`].
pub fn spawn(
    mut rx: watch::Receiver<SilencePlan>,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut retry = MIN_RETRY;
        loop {
            let plan = rx.borrow_and_update().clone();
            let wait = match &plan.alertmanager {
                // Nothing to do, nothing to check: Alertmanager is not bothered.
                Some(_) if plan.wanted.is_empty() && plan.records.is_empty() => None,
                Some(am) => match sync(&Alertmanager::new(am), &plan, &events).await {
                    Ok(()) => {
                        retry = MIN_RETRY;
                        let _ = events.send(Event::Silences(Report::Synced));
                        Some(RECHECK)
                    }
                    Err(e) => {
                        let _ = events.send(Event::Silences(Report::Failed {
                            error: format!("{:#}", anyhow::Error::from(e)),
                            retry,
                        }));
                        let wait = retry;
                        retry = (retry * 2).min(MAX_RETRY);
                        Some(wait)
                    }
                },
                None => None,
            };
            let changed = match wait {
                // A new plan is tried at once; the same one after the wait.
                Some(d) => match tokio::time::timeout(d, rx.changed()).await {
                    Ok(r) => r.is_ok(),
                    Err(_) => true,
                },
                None => rx.changed().await.is_ok(),
            };
            if !changed {
                return;
            }
        }
    })
}

/// One round: list, then carry out each step, reporting each as it is done.
async fn sync(
    am: &Alertmanager,
    plan: &SilencePlan,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), AlertmanagerError> {
    let remote = am.list().await?;
    let report = |r| {
        let _ = events.send(Event::Silences(r));
    };
    for step in reconcile(plan, &remote, Utc::now()) {
        match step {
            Step::Create { wanted, replaces } => {
                let mut silence = NewSilence {
                    id: replaces,
                    matchers: vec![Matcher::equal("vm", wanted.vm.as_str())],
                    starts_at: wanted.starts_at,
                    ends_at: wanted.ends_at,
                    created_by: plan.created_by.clone(),
                    comment: wanted.comment.clone(),
                };
                let id = match am.create(&silence).await {
                    // Gone between the list and the update: a new one.
                    Err(e) if e.is_not_found() && silence.id.is_some() => {
                        silence.id = None;
                        am.create(&silence).await?
                    }
                    r => r?,
                };
                report(Report::Recorded(SilenceRecord {
                    vm: wanted.vm,
                    purpose: wanted.purpose,
                    id,
                    starts_at: wanted.starts_at,
                    ends_at: wanted.ends_at,
                }));
            }
            Step::Adopt(record) => report(Report::Recorded(record)),
            Step::Expire(record) => {
                match am.expire(&record.id).await {
                    Err(e) if !e.is_not_found() => return Err(e),
                    _ => {}
                }
                report(Report::Gone {
                    vm: record.vm,
                    purpose: record.purpose,
                    id: record.id,
                });
            }
            Step::Forget(record) => report(Report::Gone {
                vm: record.vm,
                purpose: record.purpose,
                id: record.id,
            }),
            Step::ExpireOrphan { id } => match am.expire(&id).await {
                Err(e) if !e.is_not_found() => return Err(e),
                _ => {}
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn vm(s: &str) -> VmName {
        s.parse().unwrap()
    }

    fn want(name: &str, purpose: SilencePurpose, from: &str, to: &str) -> Wanted {
        Wanted {
            vm: vm(name),
            purpose,
            starts_at: t(from),
            ends_at: t(to),
            comment: format!("{}: why", comment_prefix(purpose, &vm(name))),
        }
    }

    fn record(w: &Wanted, id: &str) -> SilenceRecord {
        SilenceRecord {
            vm: w.vm.clone(),
            purpose: w.purpose,
            id: id.into(),
            starts_at: w.starts_at,
            ends_at: w.ends_at,
        }
    }

    fn remote(id: &str, w: &Wanted, by: &str, state: &str) -> Silence {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "matchers": [{ "name": "vm", "value": w.vm, "isRegex": false, "isEqual": true }],
            "startsAt": w.starts_at, "endsAt": w.ends_at,
            "createdBy": by, "comment": w.comment, "status": { "state": state },
        }))
        .unwrap()
    }

    fn plan(wanted: Vec<Wanted>, records: Vec<SilenceRecord>) -> SilencePlan {
        SilencePlan {
            alertmanager: None,
            created_by: "vmkeeper on h1".into(),
            ours: wanted
                .iter()
                .map(|w| w.vm.clone())
                .chain(records.iter().map(|r| r.vm.clone()))
                .collect(),
            wanted,
            records,
        }
    }

    const NOW: &str = "2026-12-01T12:00:00Z";
    const BY: &str = "vmkeeper on h1";

    #[test]
    fn a_wanted_silence_is_created_once_and_then_left_alone() {
        let w = want(
            "a",
            SilencePurpose::Deletion,
            "2026-12-10T23:00:00Z",
            "2027-01-17T23:00:00Z",
        );
        let p = plan(vec![w.clone()], vec![]);
        assert_eq!(
            reconcile(&p, &[], t(NOW)),
            [Step::Create {
                wanted: w.clone(),
                replaces: None
            }]
        );
        let p = plan(vec![w.clone()], vec![record(&w, "s1")]);
        let am = [remote("s1", &w, BY, "pending")];
        assert_eq!(reconcile(&p, &am, t(NOW)), []);
    }

    #[test]
    fn a_lost_or_moved_silence_is_made_again() {
        let w = want(
            "a",
            SilencePurpose::Maintenance,
            "2026-12-02T21:00:00Z",
            "2026-12-02T21:15:00Z",
        );
        // Alertmanager lost its data: the recorded id is unknown.
        let p = plan(vec![w.clone()], vec![record(&w, "s1")]);
        assert_eq!(
            reconcile(&p, &[], t(NOW)),
            [Step::Create {
                wanted: w.clone(),
                replaces: None
            }]
        );
        // The slot moved: the recorded silence is updated (Alertmanager may replace it).
        let old = want(
            "a",
            SilencePurpose::Maintenance,
            "2026-12-01T21:00:00Z",
            "2026-12-01T21:15:00Z",
        );
        let p = plan(vec![w.clone()], vec![record(&old, "s1")]);
        let am = [remote("s1", &old, BY, "pending")];
        assert_eq!(
            reconcile(&p, &am, t(NOW)),
            [Step::Create {
                wanted: w.clone(),
                replaces: Some("s1".into())
            }]
        );
        // Expired by hand: a new one, not an update of the expired one.
        let p = plan(vec![w.clone()], vec![record(&w, "s1")]);
        let am = [remote("s1", &w, BY, "expired")];
        assert_eq!(
            reconcile(&p, &am, t(NOW)),
            [Step::Create {
                wanted: w,
                replaces: None
            }]
        );
    }

    #[test]
    fn one_made_before_a_crash_is_adopted_not_doubled() {
        let w = want(
            "a",
            SilencePurpose::Deletion,
            "2026-12-10T23:00:00Z",
            "2027-01-17T23:00:00Z",
        );
        let p = plan(vec![w.clone()], vec![]);
        let am = [
            remote("other", &w, "someone else", "pending"),
            remote("s9", &w, BY, "pending"),
        ];
        assert_eq!(reconcile(&p, &am, t(NOW)), [Step::Adopt(record(&w, "s9"))]);
    }

    #[test]
    fn a_cancel_expires_and_a_begun_slot_runs_out() {
        let del = want(
            "a",
            SilencePurpose::Deletion,
            "2026-12-10T23:00:00Z",
            "2027-01-17T23:00:00Z",
        );
        let slot = want(
            "b",
            SilencePurpose::Maintenance,
            "2026-12-01T11:00:00Z",
            "2026-12-01T13:00:00Z",
        );
        let future = want(
            "c",
            SilencePurpose::Maintenance,
            "2026-12-02T11:00:00Z",
            "2026-12-02T13:00:00Z",
        );
        let past = want(
            "d",
            SilencePurpose::Maintenance,
            "2026-11-30T11:00:00Z",
            "2026-11-30T13:00:00Z",
        );
        let records = vec![
            record(&del, "s1"),
            record(&slot, "s2"),
            record(&future, "s3"),
            record(&past, "s4"),
        ];
        let am = [
            remote("s1", &del, BY, "pending"),
            remote("s2", &slot, BY, "active"),
            remote("s3", &future, BY, "pending"),
            remote("s4", &past, BY, "expired"),
        ];
        let p = plan(vec![], records.clone());
        assert_eq!(
            reconcile(&p, &am, t(NOW)),
            [
                Step::Expire(records[0].clone()),
                Step::Expire(records[2].clone()),
                Step::Forget(records[3].clone()),
            ]
        );
        // Once the slot is over its record is forgotten.
        assert!(
            reconcile(&p, &am, t("2026-12-01T13:00:00Z"))
                .contains(&Step::Forget(records[1].clone()))
        );
    }

    #[test]
    fn only_our_orphans_are_expired() {
        let w = want(
            "a",
            SilencePurpose::Deletion,
            "2026-12-10T23:00:00Z",
            "2027-01-17T23:00:00Z",
        );
        let other_vm = want(
            "zz",
            SilencePurpose::Deletion,
            "2026-12-10T23:00:00Z",
            "2027-01-17T23:00:00Z",
        );
        let mut p = plan(vec![], vec![]);
        p.ours.insert(vm("a"));
        let am = [
            remote("mine", &w, BY, "pending"),
            remote("theirs", &w, "someone else", "pending"),
            remote("not-our-vm", &other_vm, BY, "pending"),
            remote("old", &w, BY, "expired"),
        ];
        assert_eq!(
            reconcile(&p, &am, t(NOW)),
            [Step::ExpireOrphan { id: "mine".into() }]
        );
    }

    #[test]
    fn what_the_state_wants() {
        use crate::deletion::Progress;
        use crate::state::{Deletion, Maintenance, Reason};
        let tz = chrono_tz::Europe::Berlin;
        let mut s = State::default();
        let date = chrono::NaiveDate::from_ymd_opt(2026, 12, 11).unwrap();
        let d = Deletion {
            date,
            source: DeletionSource::Cli { by: "alice".into() },
            requested_at: t(NOW),
            progress: Progress::Scheduled,
            stage_started: None,
            ip_addresses: vec![],
            downtime_from: None,
            done_at: Default::default(),
            trashed_image: None,
            announcement: None,
            stage_started_at: None,
            generation: 1,
        };
        s.deletions.insert(vm("a"), d.clone());
        // Not announced yet: no downtime, no silence.
        assert_eq!(wanted(&s, |_| tz), []);
        s.deletions.insert(
            vm("a"),
            Deletion {
                downtime_from: Some(t("2026-12-10T23:00:00Z")),
                ..d
            },
        );
        s.maintenances.insert(
            vm("b"),
            Maintenance {
                reasons: vec![Reason::Requested {
                    by: "bob".into(),
                    reason: "kernel".into(),
                }],
                slot_start: t("2026-12-02T21:00:00.5Z"),
                slot_end: t("2026-12-02T21:15:00Z"),
                announced_at: t(NOW),
                notice: None,
                delivered_at: None,
                project: Default::default(),
            },
        );
        let w = wanted(&s, |_| tz);
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[0].purpose, w[0].starts_at, w[0].ends_at),
            (
                SilencePurpose::Deletion,
                t("2026-12-10T23:00:00Z"),
                t("2027-01-17T23:00:00Z")
            )
        );
        assert_eq!(
            w[0].comment,
            "vmkeeper deletion of VM a: deleted on 2026-12-11 (vmkeeper delete by alice); shut \
             down at 2026-12-11T00:00:00+01:00, its name is released at 2027-01-18T00:00:00+01:00"
        );
        assert_eq!(
            (w[1].purpose, w[1].starts_at, w[1].ends_at),
            (
                SilencePurpose::Maintenance,
                t("2026-12-02T21:00:00Z"),
                t("2026-12-02T21:15:00Z")
            )
        );
        assert!(
            w[1].comment.ends_with("(requested by bob: kernel)"),
            "{}",
            w[1].comment
        );
    }
}
