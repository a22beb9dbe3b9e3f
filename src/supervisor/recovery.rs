//! Pure recovery after a daemon restart: what to do with the intent found in the state, given
//! what the unit shows now and what the state recorded of the VM.
//!
//! The daemon may have died at any point of an operation. The intent says what it was doing
//! (and carries the instance it was doing it to); the unit's state and `InvocationID` say how
//! far it got. From the two this module decides, with no I/O, whether the step completed, must
//! be resumed, or never happened, and whether a stop the daemon did not plan must raise its
//! alarm (once per instance).

use crate::model::{InvocationId, VmName};
use crate::state::{Intent, State, UnplannedKind, VmRecord};

/// What a look at a VM's unit showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitSeen {
    /// Not loaded: never started, or collected after it stopped.
    Absent,
    /// Loaded and not running; `instance` is the run that ended.
    Stopped {
        /// The instance that ended, when systemd still knows it.
        instance: Option<InvocationId>,
        /// The unit failed (QEMU exited non-zero or was killed) rather than stopped cleanly.
        failed: bool,
    },
    /// Running (active, activating or stopping).
    Running {
        /// The instance that runs.
        instance: Option<InvocationId>,
    },
}

impl UnitSeen {
    /// The instance that runs, if one does.
    pub fn running(&self) -> Option<Option<&InvocationId>> {
        match self {
            UnitSeen::Running { instance } => Some(instance.as_ref()),
            _ => None,
        }
    }
}

/// How the intent found at start ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// There was none.
    None,
    /// Its step completed before the crash: record the outcome (a start or reboot: the
    /// intent's resources and command line as applied, with the running instance; a stop: the
    /// VM stopped, planned).
    Completed,
    /// Its step has not happened (or not completely): carry the operation out again. A reboot
    /// whose old QEMU is already gone only starts the new one.
    Resume,
    /// Its step did not happen and is not to be repeated as such: drop it (the planner decides
    /// afresh, e.g. starts the VM again).
    Abandoned,
}

/// An alarm recovery raises: a stop or restart nobody planned happened while the daemon was
/// down (or between its last record and its crash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarm {
    /// What happened.
    pub kind: UnplannedKind,
    /// The instance it happened to.
    pub instance: Option<InvocationId>,
}

/// The decision for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// What happens to the intent.
    pub fate: Fate,
    /// The alarm to raise, if any (never for a stop vmkeeper had planned).
    pub alarm: Option<Alarm>,
}

/// Decides what to do with `intent` given the unit as `seen` now and the VM's `record`.
pub fn recover(intent: Option<&Intent>, seen: &UnitSeen, record: Option<&VmRecord>) -> Recovery {
    match intent {
        None => Recovery {
            fate: Fate::None,
            alarm: adopt_alarm(seen, record),
        },
        Some(Intent::Start { previous, .. }) => start(previous.as_ref(), seen, record),
        Some(Intent::Stop { instance, .. }) => Recovery {
            fate: if still_runs(instance.as_ref(), seen) {
                Fate::Resume
            } else {
                Fate::Completed
            },
            alarm: None,
        },
        Some(Intent::Reboot { instance, .. }) => Recovery {
            fate: match seen {
                UnitSeen::Running { instance: now } if started_anew(instance.as_ref(), now) => {
                    Fate::Completed
                }
                // The old QEMU still runs, or none runs: the operation stops what runs (if
                // anything) and starts the new one.
                _ => Fate::Resume,
            },
            alarm: None,
        },
    }
}

/// The host rebooted since the state was written, so no QEMU survived: every VM recorded as
/// running stopped. Returns those whose stop nobody planned (no stop or reboot intent), with
/// the instance that ran; marks every record stopped. Intents stay for [`recover`], which
/// finishes planned stops and reboots (a reboot then only starts the new QEMU).
pub fn after_host_reboot(state: &mut State) -> Vec<(VmName, Option<InvocationId>)> {
    let mut unplanned = vec![];
    for (vm, r) in &mut state.vms {
        if !r.running {
            continue;
        }
        let planned = matches!(
            state.intents.get(vm),
            Some(Intent::Stop { .. } | Intent::Reboot { .. })
        );
        if !planned {
            unplanned.push((vm.clone(), r.instance.clone()));
        }
        r.running = false;
    }
    unplanned
}

/// A start intent: the new QEMU runs (done), never came (abandoned), or came and died.
fn start(previous: Option<&InvocationId>, seen: &UnitSeen, record: Option<&VmRecord>) -> Recovery {
    match seen {
        UnitSeen::Running { instance } if started_anew(previous, instance) => Recovery {
            fate: Fate::Completed,
            alarm: None,
        },
        // The instance from before the start still runs: the start never happened.
        UnitSeen::Running { .. } => Recovery {
            fate: Fate::Abandoned,
            alarm: None,
        },
        UnitSeen::Stopped {
            instance: Some(ended),
            ..
        } if Some(ended) != previous => {
            // Started, and that new QEMU ended on its own before the daemon recorded it.
            let alarmed = record
                .and_then(|r| r.last_unplanned.as_ref())
                .is_some_and(|u| u.instance.as_ref() == Some(ended));
            Recovery {
                fate: Fate::Abandoned,
                alarm: (!alarmed).then(|| Alarm {
                    kind: UnplannedKind::QemuExited,
                    instance: Some(ended.clone()),
                }),
            }
        }
        _ => Recovery {
            fate: Fate::Abandoned,
            alarm: None,
        },
    }
}

/// Whether a running instance `now` is a new one compared to `before` (the one that ran when
/// the intent was written). Unknown ids on either side count as new only when nothing ran
/// before: an instance that cannot be told apart from the old one is the old one.
fn started_anew(before: Option<&InvocationId>, now: &Option<InvocationId>) -> bool {
    match (before, now) {
        (None, _) => true,
        (Some(b), Some(n)) => b != n,
        (Some(_), None) => false,
    }
}

/// Whether the instance a stop was meant for (or, without one, any instance) still runs.
fn still_runs(target: Option<&InvocationId>, seen: &UnitSeen) -> bool {
    match (target, seen) {
        (_, UnitSeen::Running { instance: None }) | (None, UnitSeen::Running { .. }) => true,
        (Some(t), UnitSeen::Running { instance: Some(n) }) => t == n,
        _ => false,
    }
}

/// No intent: the state recorded the VM as running (or not); an alarm when the recorded
/// instance is gone or replaced and that has not been alarmed yet.
fn adopt_alarm(seen: &UnitSeen, record: Option<&VmRecord>) -> Option<Alarm> {
    let record = record.filter(|r| r.running)?;
    let recorded = record.instance.as_ref();
    let kind = match seen {
        UnitSeen::Running { instance } => match (recorded, instance) {
            (Some(r), Some(n)) if r != n => UnplannedKind::UnitRestarted,
            _ => return None,
        },
        UnitSeen::Stopped { instance, failed } => {
            if let (Some(r), Some(ended)) = (recorded, instance)
                && r != ended
            {
                // Another instance ran and ended since the one on record: the one on record
                // was restarted from outside, and that one ended too. One alarm, about ours.
                UnplannedKind::UnitRestarted
            } else if *failed {
                UnplannedKind::QemuExited
            } else {
                UnplannedKind::UnitStopped
            }
        }
        UnitSeen::Absent => UnplannedKind::UnitStopped,
    };
    let alarmed = record
        .last_unplanned
        .as_ref()
        .is_some_and(|u| recorded.is_some() && u.instance.as_ref() == recorded);
    (!alarmed).then(|| Alarm {
        kind,
        instance: recorded.cloned(),
    })
}

#[cfg(test)]
mod tests;
