//! The deletion lifecycle as the daemon carries it out, stage by stage, intent first.
//!
//! Every stage persists `stageStarted` before it acts and is written so that running it again
//! finds its work done: a crash in the middle is finished at the next start, never repeated
//! destructively.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use tracing::{info, warn};

use super::{Daemon, journal};
use crate::api::{Caller, Response};
use crate::deletion::{self, Progress, Schedule, Stage};
use crate::events::Event;
use crate::exec::rbd::TrashEntry;
use crate::exec::systemd::{self, TimerTrigger, TransientTimer};
use crate::localtime::rfc3339;
use crate::model::VmName;
use crate::plan::Action;
use crate::render;
use crate::state::{Deletion, DeletionSource};

/// Environment variable naming a point where the daemon stops dead, for crash tests:
/// `after-stage-started:<stage>` or `after-stage-acted:<stage>`.
const FAILPOINT: &str = "VMKEEPER_FAILPOINT";

impl Daemon {
    /// Carries out a deletion action of the plan.
    pub(super) async fn apply_deletion(&mut self, action: Action, now: DateTime<Utc>) {
        match action {
            Action::ScheduleDeletion { vm, date, source } => {
                self.schedule_deletion(&vm, date, source, now).await;
            }
            Action::CancelDeletion { vm, reason } => {
                self.cancel_deletion(&vm, &reason).await;
            }
            Action::RunDeletionStage { vm, stage } => {
                if let Err(e) = self.run_stage(&vm, stage, now).await {
                    self.failed(&vm, &format!("deletion stage {stage}"), &e, None);
                }
            }
            _ => return,
        }
        self.sync_deletion_timers().await;
    }

    /// At start: finishes stages a crash interrupted, then recreates the timers of every
    /// upcoming stage. Stages that fell due while the host was down follow in the first plan.
    pub(super) async fn resume_deletions(&mut self) {
        let started: Vec<(VmName, Stage)> = self
            .state
            .deletions
            .iter()
            .filter_map(|(vm, d)| d.stage_started.map(|s| (vm.clone(), s)))
            .collect();
        for (vm, stage) in started {
            info!(
                message_id = Event::Deletion.message_id(),
                vm = vm.as_str(),
                action = "deletion-resume",
                stage = stage.as_str(),
                planned = true,
                "finishing deletion stage {stage}, interrupted before it was recorded as done"
            );
            if let Err(e) = self.run_stage(&vm, stage, Utc::now()).await {
                self.failed(&vm, &format!("deletion stage {stage}"), &e, None);
            }
        }
        self.sync_deletion_timers().await;
    }

    async fn schedule_deletion(
        &mut self,
        vm: &VmName,
        date: NaiveDate,
        source: DeletionSource,
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
            },
        );
        self.save();
        let schedule = Schedule::new(self.config.timezone, date);
        let by = match &source {
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
        if source == DeletionSource::Removed {
            // Nobody asked for this one explicitly: say it loudly.
            warn!(
                message_id = Event::Deletion.message_id(),
                vm = vm.as_str(),
                action = "schedule-deletion",
                reason = by.as_str(),
                planned = true,
                "{vm} was removed from the configuration: {reason}; declare it again to keep it"
            );
        } else {
            journal(Event::Deletion, vm, "schedule-deletion", &by, true, &reason);
        }
        self.notify_deletion(vm, "schedule-deletion", &reason).await;
    }

    async fn cancel_deletion(&mut self, vm: &VmName, reason: &str) {
        let Some(d) = self.state.deletions.get(vm) else {
            return;
        };
        if d.progress.has_done(Stage::Purge) || d.stage_started == Some(Stage::Purge) {
            return;
        }
        self.state.deletions.remove(vm);
        self.save();
        self.stop_deletion_timers(vm).await;
        let text = format!("deletion cancelled: {reason}; the VM is kept as it was");
        journal(Event::Deletion, vm, "cancel-deletion", reason, true, &text);
        self.notify_deletion(vm, "cancel-deletion", reason).await;
    }

    /// Runs one stage: `stageStarted` persisted first, the act, then the progress.
    async fn run_stage(&mut self, vm: &VmName, stage: Stage, now: DateTime<Utc>) -> Result<()> {
        let Some(d) = self.state.deletions.get_mut(vm) else {
            return Ok(());
        };
        if d.progress.has_done(stage) {
            return Ok(());
        }
        let next = d.progress.complete(stage)?;
        d.stage_started = Some(stage);
        // Unlike `save`, a failure here stops the stage: nothing destructive without the record.
        self.state
            .save(&self.config.state_dir)
            .context("cannot record the stage as started")?;
        failpoint("after-stage-started", stage).await;
        let what = self.act(vm, stage, now).await?;
        failpoint("after-stage-acted", stage).await;
        let Some(d) = self.state.deletions.get_mut(vm) else {
            return Ok(());
        };
        d.progress = next;
        d.stage_started = None;
        if stage == Stage::ReleaseName {
            self.state.deletions.remove(vm);
        }
        self.save();
        if stage == Stage::ReleaseName {
            self.stop_deletion_timers(vm).await;
        }
        info!(
            message_id = Event::Deletion.message_id(),
            vm = vm.as_str(),
            action = "deletion-stage",
            reason = what.as_str(),
            planned = true,
            stage = stage.as_str(),
            "deletion stage {stage} done: {what}"
        );
        if stage == Stage::Announce {
            self.notify_deletion(vm, "deletion-announce", &what).await;
        } else {
            self.notify_deletion(vm, &format!("deletion-{stage}"), &what)
                .await;
        }
        Ok(())
    }

    /// The stage's work, idempotent; returns what was done, for the journal.
    async fn act(&mut self, vm: &VmName, stage: Stage, now: DateTime<Utc>) -> Result<String> {
        let schedule = match self.state.deletions.get(vm) {
            Some(d) => Schedule::new(self.config.timezone, d.date),
            None => return Ok(String::new()),
        };
        let tz = self.config.timezone;
        match stage {
            Stage::Announce => {
                let t = schedule.t().with_timezone(&Utc);
                if let Some(d) = self.state.deletions.get_mut(vm) {
                    d.downtime_from = Some(t);
                }
                let dates = Stage::ALL
                    .iter()
                    .map(|s| format!("{s} {}", rfc3339(schedule.at(*s))))
                    .collect::<Vec<_>>()
                    .join(", ");
                Ok(format!(
                    "VM {vm} is deleted on {}; monitoring downtime from {}; stages: {dates}; \
                     cancellable until {}",
                    schedule.date,
                    rfc3339(t.with_timezone(&tz)),
                    rfc3339(schedule.at(Stage::Purge))
                ))
            }
            Stage::Shutdown => {
                let running = self.state.vms.get(vm).is_some_and(|r| r.running);
                if running {
                    self.stop_vm(vm, "deletion", "vmkeeper").await?;
                }
                Ok(format!(
                    "VM off{}; disk, addresses and records kept until {}",
                    if running { "" } else { " (it was not running)" },
                    rfc3339(schedule.at(Stage::Purge))
                ))
            }
            Stage::Purge => {
                if self.state.vms.get(vm).is_some_and(|r| r.running) {
                    self.stop_vm(vm, "deletion", "vmkeeper").await?;
                }
                let trashed = self.trash_image(vm).await?;
                self.state.vms.remove(vm);
                self.state.maintenances.remove(vm);
                self.state.intents.remove(vm);
                self.vms.remove(vm);
                let ips = match self.state.deletions.get_mut(vm) {
                    Some(d) => std::mem::take(&mut d.ip_addresses),
                    None => vec![],
                };
                let ips = ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                Ok(format!(
                    "{trashed}; records deleted; addresses released: [{ips}]; backups are \
                     deleted on {}",
                    schedule.date_of(Stage::DeleteBackups)
                ))
            }
            Stage::DeleteBackups => self.delete_backups(vm).await,
            Stage::ReleaseName => Ok(format!(
                "deletion notice removed; the name is free again (it was deleted as of {}, \
                 now {})",
                schedule.date,
                rfc3339(now.with_timezone(&tz))
            )),
        }
    }

    /// Moves the VM's image to the RBD trash; an image already there is done.
    async fn trash_image(&mut self, vm: &VmName) -> Result<String> {
        let cluster = self.cluster().await?;
        let pool = self.config.ceph.pool.clone();
        let image = render::image_name(vm).to_owned();
        let msg = cluster
            .run(move |c| {
                let io = c.ioctx(&pool)?;
                if io.exists(&image)? {
                    let id = io.trash_move(&image)?;
                    return Ok(format!("image {pool}/{image} moved to the trash (id {id})"));
                }
                let ids = trashed(&io.trash_list()?, &image);
                Ok(if ids.is_empty() {
                    format!("image {pool}/{image} was neither in the pool nor in the trash")
                } else {
                    format!(
                        "image {pool}/{image} already in the trash (id {})",
                        ids.join(", ")
                    )
                })
            })
            .await
            .with_context(|| format!("cannot move the image of {vm} to the trash"))?;
        Ok(msg)
    }

    /// Deletes the backups: every snapshot of the trashed image, then the image itself.
    async fn delete_backups(&mut self, vm: &VmName) -> Result<String> {
        let cluster = self.cluster().await?;
        let pool = self.config.ceph.pool.clone();
        let image = render::image_name(vm).to_owned();
        let msg = cluster
            .run(move |c| {
                let io = c.ioctx(&pool)?;
                let ids = trashed(&io.trash_list()?, &image);
                let mut snaps = 0;
                for id in &ids {
                    let img = io.open_by_id(id)?;
                    for s in img.snapshots()? {
                        if img.snapshot_is_protected(&s.name)? {
                            img.unprotect_snapshot(&s.name)?;
                        }
                        img.remove_snapshot(&s.name)?;
                        snaps += 1;
                    }
                    drop(img);
                    io.trash_remove(id, true)?;
                }
                let mut msg = format!(
                    "{snaps} snapshot(s) and {} trashed image(s) of {pool}/{image} deleted",
                    ids.len()
                );
                if io.exists(&image)? {
                    // Restored from the trash by an operator: theirs now, left alone.
                    msg.push_str("; an image of that name is back in the pool and is left alone");
                }
                Ok(msg)
            })
            .await
            .with_context(|| format!("cannot delete the backups of {vm}"))?;
        Ok(msg)
    }

    /// Makes the transient timers match the upcoming stages of every deletion: creates missing
    /// ones, replaces moved ones, stops those of stages done or deletions cancelled.
    pub(super) async fn sync_deletion_timers(&mut self) {
        let real_now = Utc::now();
        let tz = self.config.timezone;
        let mut desired: BTreeMap<String, (VmName, Stage, DateTime<Utc>)> = BTreeMap::new();
        for (vm, d) in &self.state.deletions {
            let schedule = Schedule::new(tz, d.date);
            for stage in Stage::ALL {
                let at = schedule.at(stage).with_timezone(&Utc);
                if !d.progress.has_done(stage) && at > real_now {
                    let name = systemd::deletion_timer_name(vm.as_str(), stage.as_str());
                    desired.insert(name, (vm.clone(), stage, at));
                }
            }
        }
        let present = match self.systemd.list_timers(&["vmkeeper-delete-*.timer"]).await {
            Ok(t) => t,
            Err(e) => {
                warn!(
                    message_id = Event::OperationFailed.message_id(),
                    "cannot list deletion timers: {e}"
                );
                return;
            }
        };
        for t in &present {
            let keep = desired.get(&t.name).is_some_and(|(_, _, at)| {
                t.next_elapse.map(|n| n.timestamp()) == Some(at.timestamp())
            });
            if keep {
                desired.remove(&t.name);
                continue;
            }
            // Timers of other daemons' VMs (tests run several on one systemd) stay.
            let ours = timer_vm(&t.name).is_some_and(|vm| self.ours(&vm));
            if ours {
                match self.systemd.stop_unit(&t.name).await {
                    Ok(_) => {}
                    Err(e) if e.is_no_such_unit() => {}
                    Err(e) => warn!(
                        message_id = Event::OperationFailed.message_id(),
                        "cannot stop timer {}: {e}", t.name
                    ),
                }
            }
        }
        // The timers' services run with / as working directory.
        let config = std::path::absolute(&self.config_path)
            .unwrap_or_else(|_| self.config_path.clone())
            .display()
            .to_string();
        let exe = match std::env::current_exe() {
            Ok(p) => p.display().to_string(),
            Err(e) => {
                warn!(
                    message_id = Event::OperationFailed.message_id(),
                    "cannot find the vmkeeper binary for the deletion timers: {e}"
                );
                return;
            }
        };
        for (name, (vm, stage, at)) in desired {
            let timer = TransientTimer {
                name,
                description: format!("vmkeeper deletion of VM {vm}: stage {stage}"),
                trigger: TimerTrigger::At(at),
                argv: vec![
                    exe.clone(),
                    "run-due".into(),
                    "--config".into(),
                    config.clone(),
                ],
                environment: vec![],
            };
            if let Err(e) = self.systemd.start_timer(&timer).await {
                warn!(
                    message_id = Event::OperationFailed.message_id(),
                    vm = vm.as_str(),
                    "cannot create the timer of deletion stage {stage}: {e}"
                );
            }
        }
    }

    /// Stops every stage timer of a deletion that ended (cancelled or the name released):
    /// the VM may no longer be known by then, so the sync would not recognise them as ours.
    async fn stop_deletion_timers(&self, vm: &VmName) {
        for stage in Stage::ALL {
            let name = systemd::deletion_timer_name(vm.as_str(), stage.as_str());
            match self.systemd.stop_unit(&name).await {
                Ok(_) => {}
                Err(e) if e.is_no_such_unit() => {}
                Err(e) => warn!(
                    message_id = Event::OperationFailed.message_id(),
                    vm = vm.as_str(),
                    "cannot stop timer {name}: {e}"
                ),
            }
        }
    }

    /// `vmkeeper delete NAME --at DATE`.
    pub(super) async fn api_delete(
        &mut self,
        vm: VmName,
        date: NaiveDate,
        now: Option<DateTime<Utc>>,
        caller: &Caller,
    ) -> Response {
        super::audit(caller, "delete", &vm);
        let now = match self.api_now(now, caller) {
            Ok(n) => n,
            Err(r) => return r,
        };
        if let Some(d) = self.state.deletions.get(&vm) {
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
        let Some(spec) = self.config.vms.get(&vm) else {
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
        if let Err(e) = deletion::check_request(self.config.timezone, now, date) {
            return Response::Error(format!("refused: {e}"));
        }
        let by = caller
            .user
            .clone()
            .unwrap_or_else(|| caller.uid.to_string());
        self.schedule_deletion(&vm, date, DeletionSource::Cli { by }, now)
            .await;
        self.sync_deletion_timers().await;
        let schedule = Schedule::new(self.config.timezone, date);
        Response::Ok(timeline_json(&vm, &schedule))
    }

    /// `vmkeeper cancel-deletion NAME`.
    pub(super) async fn api_cancel_deletion(
        &mut self,
        vm: VmName,
        now: Option<DateTime<Utc>>,
        caller: &Caller,
    ) -> Response {
        super::audit(caller, "cancel-deletion", &vm);
        let now = match self.api_now(now, caller) {
            Ok(n) => n,
            Err(r) => return r,
        };
        let Some(d) = self.state.deletions.get(&vm) else {
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
        let schedule = Schedule::new(self.config.timezone, d.date);
        if let Err(e) = deletion::can_cancel(&schedule, d.progress, now) {
            return Response::Error(format!("too late to cancel: {e}"));
        }
        let by = caller
            .user
            .clone()
            .unwrap_or_else(|| caller.uid.to_string());
        self.cancel_deletion(&vm, &format!("cancelled by {by}"))
            .await;
        self.sync_deletion_timers().await;
        Response::Ok(serde_json::json!({ "vm": vm, "cancelled": true }))
    }

    /// The instant a request is judged as of: the clock, or `--now` from root.
    fn api_now(
        &self,
        now: Option<DateTime<Utc>>,
        caller: &Caller,
    ) -> Result<DateTime<Utc>, Response> {
        match now {
            Some(_) if caller.uid != 0 => Err(Response::Error(
                "not authorized: only root may pass --now".into(),
            )),
            Some(n) => Ok(n),
            None => Ok(Utc::now()),
        }
    }

    /// Journal and hook; the hook's event carries the deletion's date and every stage's
    /// instant, and the downtime once announced.
    async fn notify_deletion(&self, vm: &VmName, action: &str, reason: &str) {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct HookEvent<'a> {
            event: &'a str,
            vm: &'a str,
            action: &'a str,
            reason: &'a str,
            planned: bool,
            at: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            deletion: Option<serde_json::Value>,
            contacts: &'a [String],
        }
        let tz = self.config.timezone;
        let deletion = self.state.deletions.get(vm).map(|d| {
            let mut v = timeline_json(vm, &Schedule::new(tz, d.date));
            v["downtimeFrom"] = d.downtime_from.map_or(serde_json::Value::Null, |t| {
                rfc3339(t.with_timezone(&tz)).into()
            });
            v
        });
        let ev = HookEvent {
            event: Event::Deletion.as_str(),
            vm: vm.as_str(),
            action,
            reason,
            planned: true,
            at: rfc3339(Utc::now().with_timezone(&tz)),
            deletion,
            contacts: &self.config.contacts,
        };
        if let Err(e) = self.notifier.send(&ev).await {
            warn!(
                message_id = Event::OperationFailed.message_id(),
                vm = vm.as_str(),
                "notification hook failed: {e}"
            );
        }
    }
}

/// Ids of the trashed images that had `image`'s name.
fn trashed(entries: &[TrashEntry], image: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e.name == image)
        .map(|e| e.id.clone())
        .collect()
}

/// The VM a deletion timer belongs to (the stage names end the unit name).
fn timer_vm(unit: &str) -> Option<VmName> {
    let stem = unit
        .strip_prefix("vmkeeper-delete-")?
        .strip_suffix(".timer")?;
    Stage::ALL.iter().find_map(|s| {
        stem.strip_suffix(s.as_str())?
            .strip_suffix('-')?
            .parse()
            .ok()
    })
}

fn timeline_json(vm: &VmName, schedule: &Schedule) -> serde_json::Value {
    let stages: Vec<serde_json::Value> = Stage::ALL
        .iter()
        .map(|s| serde_json::json!({ "stage": s, "at": rfc3339(schedule.at(*s)) }))
        .collect();
    serde_json::json!({ "vm": vm, "date": schedule.date, "stages": stages })
}

/// An accepted user command, in the journal with who asked.
/// Stops the daemon dead at a named point when `VMKEEPER_FAILPOINT` asks for it, so tests can
/// `kill -9` it there. Never set in production.
async fn failpoint(point: &str, stage: Stage) {
    let Ok(want) = std::env::var(FAILPOINT) else {
        return;
    };
    if want != format!("{point}:{stage}") {
        return;
    }
    warn!(
        message_id = Event::OperationFailed.message_id(),
        action = "failpoint",
        stage = stage.as_str(),
        "failpoint {want} reached: the daemon waits here to be killed"
    );
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_names_give_back_the_vm() {
        for stage in Stage::ALL {
            let name = systemd::deletion_timer_name("del-web-01", stage.as_str());
            assert_eq!(timer_vm(&name).unwrap().as_str(), "del-web-01");
        }
        assert!(timer_vm("vmkeeper-maint-x.timer").is_none());
        assert!(timer_vm("vmkeeper-delete-x-trash.timer").is_none());
    }
}
