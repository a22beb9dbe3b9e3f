//! Maintenance as the loop records it: scheduled and announced, moved, cancelled, completed
//! by a reboot. The timers follow from the state (see `timers`).

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tracing::info;

use super::eventloop::{Daemon, hook_event};
use crate::api::Caller;
use crate::events::Event as Journal;
use crate::maintenance::Slot;
use crate::model::{ProjectName, VmName};
use crate::plan::slot_in;
use crate::state::{Intent, Maintenance, Reason, RebootKind};

/// A reason as the announcement words it.
pub fn describe_reason(r: &Reason) -> String {
    match r {
        Reason::PendingResources { from, to } => format!(
            "CPU/RAM change: cores {} -> {}, memoryMiB {} -> {}",
            from.cores, to.cores, from.memory_mib, to.memory_mib
        ),
        Reason::Outdated { detail } => format!("outdated QEMU: {detail}"),
        Reason::Requested { by, reason } => format!("requested by {by}: {reason}"),
    }
}

impl Daemon {
    /// Whether `vm` is in maintenance at `now`: its maintenance reboot runs, or its slot has
    /// begun and not ended.
    pub(super) fn in_maintenance(&self, vm: &VmName, now: DateTime<Utc>) -> bool {
        matches!(
            self.state.intents.get(vm),
            Some(Intent::Reboot {
                kind: RebootKind::Maintenance { .. },
                ..
            })
        ) || self
            .state
            .maintenances
            .get(vm)
            .is_some_and(|m| m.slot_start <= now && now < m.slot_end)
    }

    /// Records a maintenance slot and announces it (or its move or update).
    pub(super) fn schedule_maintenance(
        &mut self,
        vm: &VmName,
        project: &ProjectName,
        slot: Slot,
        reasons: &[Reason],
        replaces: Option<Slot>,
        now: DateTime<Utc>,
    ) {
        // An update of the same slot keeps the slot's first announcement (and its delivery);
        // a new or moved slot counts from its own announcement, once the hook took it.
        let kept = match replaces {
            Some(old) if old == slot => self
                .state
                .maintenances
                .get(vm)
                .map(|m| (m.announced_at, m.notice, m.delivered_at)),
            _ => None,
        };
        self.state.maintenances.insert(
            vm.clone(),
            Maintenance {
                reasons: reasons.to_vec(),
                slot_start: slot.start.with_timezone(&Utc),
                slot_end: slot.end.with_timezone(&Utc),
                announced_at: kept.map_or(now, |k| k.0),
                notice: kept.and_then(|k| k.1),
                delivered_at: kept.and_then(|k| k.2),
                project: project.clone(),
            },
        );
        let reason = reasons
            .iter()
            .map(describe_reason)
            .collect::<Vec<_>>()
            .join("; ");
        let text = match replaces {
            Some(old) if old != slot => format!("maintenance moved from {old} to {slot}: {reason}"),
            Some(_) => format!("maintenance in {slot} updated: {reason}"),
            None => format!("maintenance scheduled for {slot}: {reason}"),
        };
        info!(
            message_id = Journal::MaintenanceScheduled.message_id(),
            vm = vm.as_str(),
            project = self.project(vm).name.as_str(),
            action = "schedule-maintenance",
            reason = reason.as_str(),
            planned = true,
            slot = %slot,
            "{text}"
        );
        let mut event = hook_event(
            self.config.project_named(project),
            Journal::MaintenanceScheduled,
            vm,
            "schedule-maintenance",
            &reason,
            true,
            now,
        );
        event["slot"] = serde_json::to_value(slot).unwrap_or_default();
        let id = self.state.enqueue(project, event, now);
        if kept.is_none()
            && let Some(m) = self.state.maintenances.get_mut(vm)
        {
            m.notice = Some(id);
        }
        self.changed();
    }

    /// The hook took notification `id`: a maintenance or deletion announcement is made now.
    pub(super) fn delivered(&mut self, id: u64, now: DateTime<Utc>) {
        if let Some(m) = self
            .state
            .maintenances
            .values_mut()
            .find(|m| m.notice == Some(id))
        {
            m.notice = None;
            m.delivered_at = Some(now);
            self.changed();
            self.dirty_pass();
        }
        self.announcement_delivered(id, now);
        self.advance_waiters();
        self.dirty_pass();
    }

    /// Drops a maintenance that is no longer needed and announces that, to the project it
    /// was announced to (the VM's old project, when it moved).
    pub(super) fn cancel_maintenance(&mut self, vm: &VmName, reason: &str, now: DateTime<Utc>) {
        let Some(m) = self.state.maintenances.remove(vm) else {
            return;
        };
        self.journal(
            Journal::MaintenanceCancelled,
            vm,
            "cancel-maintenance",
            reason,
            &format!("maintenance cancelled: {reason}"),
        );
        let event = hook_event(
            self.config.project_named(&m.project),
            Journal::MaintenanceCancelled,
            vm,
            "cancel-maintenance",
            reason,
            true,
            now,
        );
        self.state.enqueue(&m.project, event, now);
        self.changed();
    }

    /// A reboot's new QEMU runs: its maintenance is done (a maintenance reboot), or no longer
    /// needed (an immediate reboot applied what it was for, and that is announced).
    pub(super) fn reboot_completed(
        &mut self,
        vm: &VmName,
        intent: Option<&Intent>,
        now: DateTime<Utc>,
    ) {
        match intent {
            Some(Intent::Reboot {
                kind: RebootKind::Maintenance { .. },
                ..
            }) if self.state.maintenances.contains_key(vm) => {
                self.state.maintenances.remove(vm);
                {
                    self.journal(
                        Journal::MaintenanceScheduled,
                        vm,
                        "maintenance-done",
                        "maintenance reboot",
                        "maintenance done: the VM runs with its declared values",
                    );
                    self.changed();
                }
            }
            Some(Intent::Reboot {
                kind: RebootKind::Immediate,
                by,
                ..
            }) => {
                let reason = format!("the VM was rebooted at once (reboot requested by {by})");
                self.cancel_maintenance(vm, &reason, now);
            }
            _ => {}
        }
    }

    /// `maintenance request`: adds a reason to the VM's maintenance, or schedules one.
    pub(super) fn request_maintenance(
        &mut self,
        vm: &VmName,
        reason: &str,
        caller: &Caller,
        now: DateTime<Utc>,
    ) -> Result<Slot> {
        anyhow::ensure!(
            self.config.vms.contains_key(vm),
            "no VM named {vm} is declared"
        );
        anyhow::ensure!(
            self.state.vms.get(vm).is_some_and(|r| r.running),
            "{vm} is not running; its next start applies every change"
        );
        let requested = Reason::Requested {
            by: caller.name(),
            reason: reason.to_owned(),
        };
        let project = self.project(vm);
        let (name, tz) = (project.name.clone(), project.tz());
        let (slot, replaces, mut reasons) = match self.state.maintenances.get(vm) {
            // A maintenance of the project the VM belonged to before it moved is the
            // planner's to move; this one adds to it as it stands.
            Some(m) => {
                let slot = slot_in(tz, m.slot_start, m.slot_end);
                (slot, Some(slot), m.reasons.clone())
            }
            None => {
                let held = crate::plan::held_slots(&self.state);
                let slot = crate::plan::pick_slot(&self.config, project, &held, now)
                    .context("no maintenance slot fits within the search horizon")?;
                (slot, None, vec![])
            }
        };
        let project = self
            .state
            .maintenances
            .get(vm)
            .map_or(name, |m| m.project.clone());
        reasons.push(requested);
        self.schedule_maintenance(vm, &project, slot, &reasons, replaces, now);
        Ok(slot)
    }
}
