//! Maintenance as the daemon carries it out: announce, keep its timer, reboot in the slot.

use anyhow::Result;
use chrono::{DateTime, Utc};
use tracing::info;

use super::{Daemon, describe_reason};
use crate::events::Event;
use crate::maintenance::Slot;
use crate::model::VmName;
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
        Ok(())
    }
}
