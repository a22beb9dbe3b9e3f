//! The kinds of journal events vmkeeper writes, each with a stable MESSAGE_ID that
//! dist/vmkeeper.catalog explains.
//!
//! Convention: `tracing::error!` is reserved for alarms (unplanned events, a state file that
//! cannot be written) and is written at journald's alert priority (1); everything else uses
//! info/warn.

/// One kind of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// vmkeeper started a VM.
    VmStarted,
    /// vmkeeper stopped a VM, planned.
    VmStopped,
    /// A running VM was adopted after the daemon (re)started.
    VmAdopted,
    /// A stop or reset vmkeeper did not plan: an alarm.
    Unplanned,
    /// A disk was grown.
    DiskGrown,
    /// A disk change was refused (shrink).
    ChangeRefused,
    /// A CPU/RAM change waits for a maintenance reboot.
    ChangePending,
    /// A maintenance was scheduled, moved or updated (announced).
    MaintenanceScheduled,
    /// A maintenance was cancelled (announced).
    MaintenanceCancelled,
    /// A deletion was scheduled, cancelled or advanced a stage.
    Deletion,
    /// An operation on Ceph, QEMU or systemd failed and will be retried.
    OperationFailed,
    /// A mutating command from a user was accepted.
    Audit,
    /// The state file cannot be written: nothing is stopped or deleted until it can (alert).
    StateNotWritable,
    /// The state file is written again.
    StateWritable,
    /// A monitoring downtime got its Alertmanager silence, or the silence is over.
    Downtime,
}

impl Event {
    /// Every kind, for the catalog test.
    pub const ALL: [Event; 15] = [
        Event::VmStarted,
        Event::VmStopped,
        Event::VmAdopted,
        Event::Unplanned,
        Event::DiskGrown,
        Event::ChangeRefused,
        Event::ChangePending,
        Event::MaintenanceScheduled,
        Event::MaintenanceCancelled,
        Event::Deletion,
        Event::OperationFailed,
        Event::Audit,
        Event::StateNotWritable,
        Event::StateWritable,
        Event::Downtime,
    ];

    /// The journal MESSAGE_ID.
    pub fn message_id(self) -> &'static str {
        match self {
            Event::VmStarted => "1e92f1ce93124991b578e9fccdddac6c",
            Event::VmStopped => "43285ae08a3442daae2684d12070b7c4",
            Event::VmAdopted => "74137d52afc0430b8ee78ca6de7be8ee",
            Event::Unplanned => "5a9f1f2c90ee4c2fb7905d1dd0033ad3",
            Event::DiskGrown => "e5d7e239d53b4ffd90a42792a9d67a92",
            Event::ChangeRefused => "ccf4d8956bc44914b5f421a2e3764e6b",
            Event::ChangePending => "711004efa6dd42e4bf1d19dc65ad77cf",
            Event::MaintenanceScheduled => "3d1bb950661240cb96617ca2301e51d0",
            Event::MaintenanceCancelled => "32fd80c1b3e54c66bcf3f029eef07276",
            Event::Deletion => "5c8158d104664dda940939c01b257d88",
            Event::OperationFailed => "a20647aaa26f4c73a16f17dc0727e58f",
            Event::Audit => "21690075974949ab8ad5f5b8fd76af2b",
            Event::StateNotWritable => "00c0fa4fe374403b85658b6f6e74a216",
            Event::StateWritable => "fbe00cd92f3d462b9f4f58432b54e1aa",
            Event::Downtime => "c9445f43bd444b8490bff3841ffa2499",
        }
    }

    /// The event's name in the notification hook's JSON (`event` field).
    pub fn as_str(self) -> &'static str {
        match self {
            Event::VmStarted => "vm-started",
            Event::VmStopped => "vm-stopped",
            Event::VmAdopted => "vm-adopted",
            Event::Unplanned => "unplanned",
            Event::DiskGrown => "disk-grown",
            Event::ChangeRefused => "change-refused",
            Event::ChangePending => "change-pending",
            Event::MaintenanceScheduled => "maintenance-scheduled",
            Event::MaintenanceCancelled => "maintenance-cancelled",
            Event::Deletion => "deletion",
            Event::OperationFailed => "operation-failed",
            Event::Audit => "audit",
            Event::StateNotWritable => "state-not-writable",
            Event::StateWritable => "state-writable",
            Event::Downtime => "downtime",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_id_is_unique_and_explained_in_the_catalog() {
        let catalog = include_str!("../dist/vmkeeper.catalog");
        let mut seen = std::collections::HashSet::new();
        for e in Event::ALL {
            let id = e.message_id();
            assert_eq!(id.len(), 32);
            assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
            assert!(seen.insert(id), "{e:?} reuses {id}");
            assert!(
                catalog.contains(&format!("-- {id}\n")),
                "{e:?} ({id}) is missing from the catalog"
            );
        }
    }
}
