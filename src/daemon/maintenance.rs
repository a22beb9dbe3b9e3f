//! Maintenance as the daemon carries it out: announce, keep its timer, reboot in the slot.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::{Daemon, describe_reason, intent, journal};
use crate::api::Caller;
use crate::events::Event;
use crate::exec::systemd::{self, TimerTrigger, TransientTimer};
use crate::maintenance::Slot;
use crate::model::VmName;
use crate::plan::slot_in;
use crate::state::{Maintenance, Reason};

impl Daemon {
    pub(super) async fn schedule_maintenance(
        &mut self,
        vm: &VmName,
        slot: Slot,
        reasons: Vec<Reason>,
        replaces: Option<Slot>,
        now: DateTime<Utc>,
    ) {
        let announced_at = match replaces {
            Some(old) if old == slot => self
                .state
                .maintenances
                .get(vm)
                .map_or(now, |m| m.announced_at),
            _ => now,
        };
        self.state.maintenances.insert(
            vm.clone(),
            Maintenance {
                reasons: reasons.clone(),
                slot_start: slot.start.with_timezone(&Utc),
                slot_end: slot.end.with_timezone(&Utc),
                announced_at,
            },
        );
        self.save();
        self.arm_maintenance_timer(vm, slot).await;
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
            message_id = Event::MaintenanceScheduled.message_id(),
            vm = vm.as_str(),
            action = "schedule-maintenance",
            reason = reason.as_str(),
            planned = true,
            slot = %slot,
            "{text}"
        );
        self.notify(
            Event::MaintenanceScheduled,
            vm,
            "schedule-maintenance",
            &reason,
            Some(slot),
        )
        .await;
    }

    /// A planned cold reboot: stop QEMU gracefully, start it with the declared values.
    pub(super) async fn maintenance_reboot(&mut self, vm: &VmName) -> Result<()> {
        let Some(spec) = self.config.vms.get(vm).cloned() else {
            return Ok(());
        };
        self.stop_vm(vm, "maintenance reboot", "vmkeeper").await?;
        self.start_vm(&spec, spec.resources, "maintenance reboot")
            .await?;
        self.state.maintenances.remove(vm);
        self.save();
        self.disarm_maintenance_timer(vm).await;
        Ok(())
    }

    /// Drops a maintenance that is no longer needed and announces that.
    pub(super) async fn cancel_maintenance(&mut self, vm: &VmName, reason: &str) {
        if self.state.maintenances.remove(vm).is_none() {
            return;
        }
        self.save();
        self.disarm_maintenance_timer(vm).await;
        journal(
            Event::MaintenanceCancelled,
            vm,
            "cancel-maintenance",
            reason,
            true,
            &format!("maintenance cancelled: {reason}"),
        );
        self.notify(
            Event::MaintenanceCancelled,
            vm,
            "cancel-maintenance",
            reason,
            None,
        )
        .await;
    }

    /// The timer that runs `vmkeeper run-due` at the slot's start. systemd never fires a
    /// timer whose instant has passed: a slot missed while the host was down is found by the
    /// planner instead, which reschedules it.
    async fn arm_maintenance_timer(&mut self, vm: &VmName, slot: Slot) {
        let name = systemd::maintenance_timer_name(vm.as_str());
        self.disarm_maintenance_timer(vm).await;
        let start = slot.start.with_timezone(&Utc);
        if start <= Utc::now() {
            return;
        }
        let timer = TransientTimer {
            name: name.clone(),
            description: format!("vmkeeper maintenance of VM {vm} at {slot}"),
            trigger: TimerTrigger::At(start),
            argv: self.run_due_argv(),
            environment: vec![("VMKEEPER_VM".into(), vm.to_string())],
        };
        if let Err(e) = self.systemd.start_timer(&timer).await {
            warn!(
                message_id = Event::OperationFailed.message_id(),
                vm = vm.as_str(),
                "cannot create {name}: {e}"
            );
        }
    }

    async fn disarm_maintenance_timer(&mut self, vm: &VmName) {
        let name = systemd::maintenance_timer_name(vm.as_str());
        // Not loaded is fine: there was nothing to stop.
        let _ = self.systemd.stop_unit(&name).await;
    }

    /// Recreates the timers of every recorded maintenance (after a daemon or host restart)
    /// and stops timers of maintenances that are gone.
    pub(super) async fn sync_maintenance_timers(&mut self) {
        let pattern = format!("{}*", systemd::maintenance_timer_name(""));
        let present: Vec<String> = match self.systemd.list_timers(&[&pattern]).await {
            Ok(t) => t.into_iter().map(|t| t.name).collect(),
            Err(e) => {
                warn!(
                    message_id = Event::OperationFailed.message_id(),
                    "cannot list timers: {e}"
                );
                return;
            }
        };
        let tz = self.config.timezone;
        let wanted: Vec<(VmName, Slot)> = self
            .state
            .maintenances
            .iter()
            .map(|(vm, m)| (vm.clone(), slot_in(tz, m.slot_start, m.slot_end)))
            .collect();
        for (vm, slot) in &wanted {
            if !present.contains(&systemd::maintenance_timer_name(vm.as_str())) {
                self.arm_maintenance_timer(vm, *slot).await;
            }
        }
        for name in present {
            let vm = name
                .strip_prefix(&systemd::maintenance_timer_name(""))
                .and_then(|r| r.strip_suffix(".timer"))
                .and_then(|n| n.parse::<VmName>().ok());
            if let Some(vm) = vm
                && self.ours(&vm)
                && !self.state.maintenances.contains_key(&vm)
            {
                let _ = self.systemd.stop_unit(&name).await;
            }
        }
    }

    /// The command a timer runs: this binary's `run-due` for this configuration.
    pub(super) fn run_due_argv(&self) -> Vec<String> {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "vmkeeper".into());
        vec![
            exe,
            "run-due".into(),
            "--config".into(),
            self.config_path.display().to_string(),
        ]
    }

    /// `maintenance request`: adds a reason to the VM's maintenance, or schedules one.
    pub(super) async fn request_maintenance(
        &mut self,
        vm: &VmName,
        reason: &str,
        caller: &Caller,
    ) -> Result<Slot> {
        anyhow::ensure!(
            self.config.vms.contains_key(vm),
            "no VM named {vm} is declared"
        );
        anyhow::ensure!(
            self.state.vms.get(vm).is_some_and(|r| r.running),
            "{vm} is not running; its next start applies every change"
        );
        let by = caller
            .user
            .clone()
            .unwrap_or_else(|| caller.uid.to_string());
        let requested = Reason::Requested {
            by,
            reason: reason.to_owned(),
        };
        let now = Utc::now();
        let tz = self.config.timezone;
        let (slot, replaces, mut reasons) = match self.state.maintenances.get(vm) {
            Some(m) => {
                let slot = slot_in(tz, m.slot_start, m.slot_end);
                (slot, Some(slot), m.reasons.clone())
            }
            None => {
                let taken: Vec<Slot> = self
                    .state
                    .maintenances
                    .values()
                    .map(|m| slot_in(tz, m.slot_start, m.slot_end))
                    .collect();
                let slot = self
                    .config
                    .maintenance
                    .pick_slot(now, &taken)
                    .context("no maintenance slot fits within the search horizon")?;
                (slot, None, vec![])
            }
        };
        reasons.push(requested);
        self.schedule_maintenance(vm, slot, reasons, replaces, now)
            .await;
        Ok(slot)
    }

    /// `reboot NAME --now` by an authorized user: a planned cold reboot that applies pending
    /// changes and makes the VM's maintenance unnecessary.
    pub(super) async fn reboot_now(&mut self, vm: &VmName, caller: &Caller) -> Result<()> {
        let spec = self
            .config
            .vms
            .get(vm)
            .cloned()
            .with_context(|| format!("no VM named {vm} is declared"))?;
        anyhow::ensure!(spec.online, "{vm} is declared offline (online = false)");
        let by = caller
            .user
            .clone()
            .unwrap_or_else(|| caller.uid.to_string());
        let why = format!("reboot requested by {by}");
        self.state
            .intents
            .insert(vm.clone(), intent("reboot", &why, &by));
        self.save();
        if self.state.vms.get(vm).is_some_and(|r| r.running) {
            self.stop_vm(vm, &why, &by).await?;
        }
        let disk = self
            .state
            .vms
            .get(vm)
            .map_or(spec.resources.disk_gib, |r| r.applied.disk_gib);
        let resources = crate::model::Resources {
            disk_gib: disk,
            ..spec.resources
        };
        self.start_vm(&spec, resources, &why).await?;
        self.cancel_maintenance(vm, &format!("the VM was rebooted at once ({why})"))
            .await;
        Ok(())
    }
}
