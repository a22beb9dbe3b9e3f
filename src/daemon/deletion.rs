//! The deletion lifecycle as the loop records it: scheduled, cancelled, each stage marked as
//! started (on disk before it acts), carried out by an operation, and recorded as done.

use chrono::{DateTime, NaiveDate, Utc};
use tracing::{info, warn};

use super::eventloop::Daemon;
use super::ops::Job;
use crate::api::{Caller, Response};
use crate::deletion::{self, Progress, Schedule, Stage};
use crate::events::Event as Journal;
use crate::localtime::rfc3339;
use crate::model::VmName;
use crate::state::{Actor, Deletion, DeletionSource, Intent, Released, StopReason};
use crate::supervisor::OpKind;

impl Daemon {
    pub(super) fn schedule_deletion(
        &mut self,
        vm: &VmName,
        date: NaiveDate,
        source: &DeletionSource,
        now: DateTime<Utc>,
    ) {
        let ip_addresses = self
            .state
            .vms
            .get(vm)
            .map(|r| r.ip_addresses.clone())
            .or_else(|| self.config.vms.get(vm).map(|s| s.ip_addresses.clone()))
            .unwrap_or_default();
        let moved_from = self.state.deletions.get(vm).map(|d| d.date);
        self.state.confirmed_removals.remove(vm);
        self.state.deletions.insert(
            vm.clone(),
            Deletion {
                date,
                source: source.clone(),
                requested_at: now,
                progress: Progress::Scheduled,
                stage_started: None,
                ip_addresses,
                downtime_from: None,
                done_at: Default::default(),
                trashed_image: None,
                announcement: None,
                stage_started_at: None,
                generation: self
                    .state
                    .vms
                    .get(vm)
                    .map(|r| r.generation)
                    .or_else(|| self.config.vms.get(vm).map(|s| s.generation))
                    .unwrap_or(1),
            },
        );
        self.changed();
        let schedule = Schedule::new(self.zone(vm), date);
        let by = match source {
            DeletionSource::Config => "deleteAt in the configuration".to_owned(),
            DeletionSource::Removed => "removal from the configuration".to_owned(),
            DeletionSource::Cli { by } => format!("vmkeeper delete by {by}"),
        };
        let text = match moved_from {
            Some(old) => format!("deletion moved from {old} to {date} ({by})"),
            None => format!("deletion scheduled for {date} ({by})"),
        };
        let reason = format!(
            "{text}; shutdown at {}, disk to the trash at {}, cancellable until then",
            rfc3339(schedule.t()),
            rfc3339(schedule.at(Stage::Purge))
        );
        if *source == DeletionSource::Removed {
            // Nobody asked for this one explicitly: say it loudly.
            warn!(
                message_id = Journal::Deletion.message_id(),
                vm = vm.as_str(),
                project = self.project(vm).name.as_str(),
                action = "schedule-deletion",
                reason = by.as_str(),
                planned = true,
                "{vm} was removed from the configuration: {reason}; declare it again to keep it"
            );
        } else {
            self.journal(Journal::Deletion, vm, "schedule-deletion", &by, &reason);
        }
        self.notify_deletion(vm, "schedule-deletion", &reason, now);
    }

    pub(super) fn cancel_deletion(&mut self, vm: &VmName, reason: &str, now: DateTime<Utc>) {
        let Some(d) = self.state.deletions.get(vm) else {
            return;
        };
        if d.progress.has_done(Stage::Purge) || d.stage_started == Some(Stage::Purge) {
            return;
        }
        // The VM holds again the addresses its deletion held.
        let held = d.ip_addresses.clone();
        if let Some(r) = self.state.vms.get_mut(vm) {
            r.ip_addresses = held;
        }
        let text = format!("deletion cancelled: {reason}; the VM is kept as it was");
        self.journal(Journal::Deletion, vm, "cancel-deletion", reason, &text);
        // Told while the deletion is still on record, so the hook sees its dates.
        self.notify_deletion(vm, "cancel-deletion", reason, now);
        self.state.deletions.remove(vm);
        self.retired.insert(vm.clone());
        self.changed();
    }

    /// Begins a due stage: `stageStarted` (and, for a stage that stops the VM, the stop's
    /// intent) first; the operation acts once that is on disk.
    pub(super) fn run_stage(
        &mut self,
        vm: &VmName,
        stage: Stage,
        now: DateTime<Utc>,
    ) -> Option<u64> {
        let mono = std::time::Instant::now();
        if self
            .slot(vm)
            .sup
            .backing_off(OpKind::Stage(stage), mono, None)
        {
            return None;
        }
        let tz = self.zone(vm);
        let d = self.state.deletions.get_mut(vm)?;
        if d.progress.has_done(stage) || d.announcement.is_some() {
            // Done, or the announcement waits for the hook.
            return None;
        }
        if let Err(e) = d.progress.complete(stage) {
            warn!(
                message_id = Journal::OperationFailed.message_id(),
                vm = vm.as_str(),
                project = self.project(vm).name.as_str(),
                "deletion stage {stage} refused: {e}"
            );
            return None;
        }
        d.stage_started = Some(stage);
        d.stage_started_at = Some(now);
        // The trashed image is deferred until its delete-backups date, as it will be once
        // the purge ran now, so no outside `rbd trash purge` takes it early.
        let mut done = d.done_at.clone();
        done.insert(Stage::Purge, now);
        let backups = d.schedule(tz).with_done(&done).at(Stage::DeleteBackups);
        let defer = (backups.with_timezone(&Utc) - now)
            .to_std()
            .unwrap_or_default();
        let trashed = d.trashed_image.clone();
        let kind = OpKind::Stage(stage);
        let stop = if kind.stops() && self.slot(vm).sup.unit.is_up() {
            let stop = self.qemu_stop(vm);
            self.state.intents.insert(
                vm.clone(),
                Intent::Stop {
                    instance: stop.instance.clone(),
                    reason: StopReason::Deletion { stage },
                    by: Actor::Vmkeeper,
                    at: now,
                },
            );
            Some(stop)
        } else {
            None
        };
        self.changed();
        let job = Job::Stage {
            stage,
            stop,
            disk: self.disk(vm, now),
            defer,
            image_id: self.state.vms.get(vm).and_then(|r| r.image_id.clone()),
            trashed,
        };
        Some(self.spawn_durable(vm, kind, job))
    }

    /// A stage's act is done: record it (the announcement once the hook took it), then say
    /// what was done, and which later dates moved because it ran late.
    pub(super) fn stage_done(
        &mut self,
        vm: &VmName,
        stage: Stage,
        acted: &str,
        trashed: Option<String>,
        now: DateTime<Utc>,
    ) {
        if matches!(stage, Stage::Shutdown | Stage::Purge)
            && matches!(
                self.state.intents.get(vm),
                Some(Intent::Stop {
                    reason: StopReason::Deletion { .. },
                    ..
                })
            )
        {
            self.state.intents.remove(vm);
        }
        if stage == Stage::Announce {
            self.announce_deletion(vm, now);
            return;
        }
        let tz = self.zone(vm);
        let Some(d) = self.state.deletions.get_mut(vm) else {
            return;
        };
        let Ok(next) = d.progress.complete(stage) else {
            return;
        };
        d.progress = next;
        d.stage_started = None;
        d.done_at
            .insert(stage, d.stage_started_at.take().unwrap_or(now));
        let schedule = d.schedule(tz);
        let mut what = vec![];
        if !acted.is_empty() {
            what.push(acted.to_owned());
        }
        match stage {
            Stage::Announce => {}
            Stage::Shutdown => what.push(format!(
                "disk, addresses and records kept until {}",
                rfc3339(schedule.at(Stage::Purge))
            )),
            Stage::Purge => {
                d.trashed_image = trashed;
                let ips = std::mem::take(&mut d.ip_addresses)
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                what.push(format!(
                    "records deleted; addresses released: [{ips}]; backups are deleted on {}",
                    schedule.date_of(Stage::DeleteBackups)
                ));
                self.state.vms.remove(vm);
                self.state.maintenances.remove(vm);
            }
            Stage::DeleteBackups => {}
            Stage::ReleaseName => {
                what.push(format!(
                    "deletion notice removed; the name is free again (it was deleted as of {}, \
                     now {})",
                    schedule.date,
                    rfc3339(now.with_timezone(&tz))
                ));
                let released = Released {
                    deleted_on: d.date,
                    generation: d.generation,
                    released_at: now,
                };
                self.state.released.insert(vm.clone(), released);
            }
        }
        let moved: Vec<String> = Stage::ALL
            .into_iter()
            .filter(|s| *s > stage && schedule.moved(*s))
            .map(|s| format!("{s} now {}", rfc3339(schedule.at(s))))
            .collect();
        if !moved.is_empty() {
            what.push(format!(
                "this stage ran late, so the later ones keep their spacing from it: {}",
                moved.join(", ")
            ));
        }
        let what = what.join("; ");
        self.stage_journal(vm, stage, &what);
        self.notify_deletion(vm, &format!("deletion-{stage}"), &what, now);
        if stage == Stage::ReleaseName {
            self.state.deletions.remove(vm);
            self.vms.remove(vm);
            self.counters.remove(vm);
            self.retired.insert(vm.clone());
        }
        self.changed();
    }

    /// The T − 5 announcement goes to the hook; the stage counts as done once the hook took
    /// it ([`Daemon::announcement_delivered`]).
    fn announce_deletion(&mut self, vm: &VmName, now: DateTime<Utc>) {
        let tz = self.zone(vm);
        let Some(d) = self.state.deletions.get(vm) else {
            return;
        };
        let schedule = d.schedule(tz);
        let t = schedule.t();
        let dates = Stage::ALL
            .iter()
            .map(|s| format!("{s} {}", rfc3339(schedule.at(*s))))
            .collect::<Vec<_>>()
            .join(", ");
        let what = format!(
            "VM {vm} is deleted on {}; monitoring downtime from {}; stages: {dates}; \
             cancellable until {}",
            schedule.date,
            rfc3339(t),
            rfc3339(schedule.at(Stage::Purge))
        );
        // The downtime is what the announcement promises: recorded with it.
        if let Some(d) = self.state.deletions.get_mut(vm) {
            d.downtime_from = Some(t.with_timezone(&Utc));
        }
        let id = self.notify_deletion(vm, "deletion-announce", &what, now);
        if let Some(d) = self.state.deletions.get_mut(vm) {
            d.announcement = Some(id);
        }
        self.journal(
            Journal::Deletion,
            vm,
            "deletion-announcing",
            &what,
            "deletion announcement handed to the hook; the stage counts once it is delivered",
        );
        self.changed();
    }

    /// The hook took notification `id`: if it was a deletion's announcement, the announce
    /// stage is done now, and the monitoring downtime recorded.
    pub(super) fn announcement_delivered(&mut self, id: u64, now: DateTime<Utc>) {
        let Some(vm) = self
            .state
            .deletions
            .iter()
            .find(|(_, d)| d.announcement == Some(id))
            .map(|(vm, _)| vm.clone())
        else {
            return;
        };
        let tz = self.zone(&vm);
        let Some(d) = self.state.deletions.get_mut(&vm) else {
            return;
        };
        let Ok(next) = d.progress.complete(Stage::Announce) else {
            return;
        };
        d.progress = next;
        d.announcement = None;
        d.stage_started = None;
        d.done_at
            .insert(Stage::Announce, d.stage_started_at.take().unwrap_or(now));
        let t = d.schedule(tz).t();
        let what = format!(
            "announcement delivered to the contacts; monitoring downtime from {}",
            rfc3339(t)
        );
        self.stage_journal(&vm, Stage::Announce, &what);
        self.changed();
    }

    fn stage_journal(&self, vm: &VmName, stage: Stage, what: &str) {
        info!(
            message_id = Journal::Deletion.message_id(),
            vm = vm.as_str(),
            project = self.project(vm).name.as_str(),
            action = "deletion-stage",
            reason = what,
            planned = true,
            stage = stage.as_str(),
            "deletion stage {stage} done: {what}"
        );
    }

    /// The hook's event for a deletion carries its date, every stage's instant, and the
    /// downtime once announced.
    fn notify_deletion(
        &mut self,
        vm: &VmName,
        action: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> u64 {
        let tz = self.zone(vm);
        let mut event = self.hook_event(Journal::Deletion, vm, action, reason, true, now);
        if let Some(d) = self.state.deletions.get(vm) {
            let mut v = timeline_json(vm, &d.schedule(tz));
            v["downtimeFrom"] = d.downtime_from.map_or(serde_json::Value::Null, |t| {
                rfc3339(t.with_timezone(&tz)).into()
            });
            event["deletion"] = v;
        }
        self.notify(vm, event, now)
    }

    /// `vmkeeper delete NAME --at DATE`.
    pub(super) fn api_delete(
        &mut self,
        vm: &VmName,
        date: NaiveDate,
        now: DateTime<Utc>,
        caller: &Caller,
    ) -> Response {
        if let Some(d) = self.state.deletions.get(vm) {
            return Response::Error(match &d.source {
                DeletionSource::Config => format!(
                    "{vm} is already being deleted on {} by deleteAt in the configuration; \
                     change it there",
                    d.date
                ),
                DeletionSource::Removed => format!(
                    "{vm} was removed from the configuration and is deleted on {}",
                    d.date
                ),
                DeletionSource::Cli { .. } => format!(
                    "{vm} is already being deleted on {}; cancel that first (vmkeeper \
                     cancel-deletion {vm})",
                    d.date
                ),
            });
        }
        let Some(spec) = self.config.vms.get(vm) else {
            return Response::Error(format!(
                "{vm} is not declared in the configuration; a VM removed from it is deleted \
                 by that"
            ));
        };
        if let Some(at) = spec.delete_at {
            return Response::Error(format!(
                "{vm} has deleteAt = {at} in the configuration; change it there"
            ));
        }
        let tz = self.zone(vm);
        if let Err(e) = deletion::check_request(tz, now, date) {
            return Response::Error(format!("refused: {e}"));
        }
        self.schedule_deletion(vm, date, &DeletionSource::Cli { by: caller.name() }, now);
        self.dirty_pass();
        let schedule = Schedule::new(tz, date);
        Response::Ok(timeline_json(vm, &schedule))
    }

    /// `vmkeeper cancel-deletion NAME`.
    pub(super) fn api_cancel_deletion(
        &mut self,
        vm: &VmName,
        now: DateTime<Utc>,
        caller: &Caller,
    ) -> Response {
        let Some(d) = self.state.deletions.get(vm) else {
            return Response::Error(format!("{vm} has no deletion to cancel"));
        };
        match &d.source {
            DeletionSource::Config => {
                return Response::Error(format!(
                    "the deletion of {vm} is declared in the configuration (deleteAt = {}); \
                     remove deleteAt there to cancel it",
                    d.date
                ));
            }
            DeletionSource::Removed => {
                return Response::Error(format!(
                    "{vm} was removed from the configuration; declare it there again to cancel \
                     its deletion"
                ));
            }
            DeletionSource::Cli { .. } => {}
        }
        let schedule = d.schedule(self.zone(vm));
        if let Err(e) = deletion::can_cancel(&schedule, d.progress, now) {
            return Response::Error(format!("too late to cancel: {e}"));
        }
        if d.stage_started == Some(Stage::Purge) || self.slot(vm).busy() {
            return Response::Error(format!(
                "too late to cancel: the deletion of {vm} is carrying out a stage right now"
            ));
        }
        self.cancel_deletion(vm, &format!("cancelled by {}", caller.name()), now);
        self.dirty_pass();
        Response::Ok(serde_json::json!({ "vm": vm, "cancelled": true }))
    }
}

pub(super) fn timeline_json(vm: &VmName, schedule: &Schedule) -> serde_json::Value {
    let stages: Vec<serde_json::Value> = Stage::ALL
        .iter()
        .map(|s| serde_json::json!({ "stage": s, "at": rfc3339(schedule.at(*s)) }))
        .collect();
    serde_json::json!({ "vm": vm, "date": schedule.date, "stages": stages })
}
