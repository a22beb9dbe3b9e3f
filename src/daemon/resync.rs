//! A full look at the VM units, off the loop: one `ListUnitsByPatterns` call, plus a unit's
//! details where the loop's view may be wrong (an instance it does not know, a unit that
//! stopped without its signal). Signals keep the view current; this catches what they missed
//! (a lagging subscription, a daemon restart) and runs on every tick.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Event;
use crate::exec::systemd::{self, ActiveState, Systemd, SystemdError};
use crate::model::{InvocationId, VmName};
use crate::supervisor::UnitSeen;

/// What the loop believes of one VM when it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Belief {
    /// `Some(instance)` when it believes a QEMU runs.
    pub up: Option<Option<InvocationId>>,
    /// That QEMU's pid, when known.
    pub pid: Option<u32>,
    /// The VM's epoch: a row for a VM whose view changed since is stale.
    pub epoch: u64,
}

/// A request: which VMs, and whether to read every running unit's details (after lost
/// signals or at start) or only where the belief disagrees with the listing.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Increasing id.
    pub id: u64,
    /// Read every running unit's instance.
    pub full: bool,
    /// The VMs this daemon is responsible for.
    pub vms: BTreeMap<VmName, Belief>,
}

/// What was seen of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The VM.
    pub vm: VmName,
    /// Its unit.
    pub seen: UnitSeen,
    /// Its QEMU's pid, when it runs and is known.
    pub pid: Option<u32>,
    /// The QEMU binary it runs was replaced on disk (an upgrade).
    pub binary_replaced: bool,
    /// The epoch of the request.
    pub epoch: u64,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone)]
pub struct Report {
    /// The request's id.
    pub id: u64,
    /// Whether it was a full look.
    pub full: bool,
    /// One per requested VM.
    pub rows: Vec<Row>,
    /// How long it took.
    pub took: Duration,
}

/// Looks at every requested VM's unit.
pub async fn observe(systemd: &Systemd, req: &Request) -> Result<Report, SystemdError> {
    let started = Instant::now();
    let pattern = format!("{}*.service", systemd::VM_UNIT_PREFIX);
    let listed: BTreeMap<String, ActiveState> = systemd
        .list_units(&[&pattern])
        .await?
        .into_iter()
        .map(|u| (u.name, u.active_state))
        .collect();
    let mut rows = Vec::with_capacity(req.vms.len());
    for (vm, belief) in &req.vms {
        let unit = systemd::vm_unit_name(vm.as_str());
        let state = listed.get(&unit);
        let (seen, pid) = match state {
            None => (UnitSeen::Absent, None),
            Some(s) if runs(s) => match (&belief.up, req.full) {
                (Some(Some(known)), false) => (
                    UnitSeen::Running {
                        instance: Some(known.clone()),
                    },
                    belief.pid,
                ),
                _ => {
                    let d = systemd.service_details(&unit).await.ok();
                    (
                        UnitSeen::Running {
                            instance: d.as_ref().and_then(|d| d.invocation_id.clone()),
                        },
                        d.and_then(|d| d.main_pid),
                    )
                }
            },
            Some(s) => {
                let failed = *s == ActiveState::Failed;
                // Which run ended matters only when the loop thinks one runs.
                let instance = if belief.up.is_some() {
                    systemd
                        .service_details(&unit)
                        .await
                        .ok()
                        .and_then(|d| d.invocation_id)
                } else {
                    None
                };
                (UnitSeen::Stopped { instance, failed }, None)
            }
        };
        let binary_replaced = pid.is_some_and(replaced);
        rows.push(Row {
            vm: vm.clone(),
            seen,
            pid,
            binary_replaced,
            epoch: belief.epoch,
        });
    }
    Ok(Report {
        id: req.id,
        full: req.full,
        rows,
        took: started.elapsed(),
    })
}

impl Report {
    /// The beliefs this report supports: what a next, cheaper look starts from.
    pub fn beliefs(&self) -> BTreeMap<VmName, Belief> {
        self.rows
            .iter()
            .map(|r| {
                let up = match &r.seen {
                    UnitSeen::Running { instance } => Some(instance.clone()),
                    _ => None,
                };
                let belief = Belief {
                    up,
                    pid: r.pid,
                    epoch: r.epoch,
                };
                (r.vm.clone(), belief)
            })
            .collect()
    }

    /// The world as this look saw it, with disk sizes from the state, for the planner.
    pub fn observed(&self, state: &crate::state::State) -> crate::plan::Observed {
        let vms = self
            .rows
            .iter()
            .map(|r| {
                let seen = crate::plan::ObservedVm {
                    running: matches!(r.seen, UnitSeen::Running { .. }),
                    disk_gib: state.vms.get(&r.vm).map(|v| v.applied.disk_gib),
                    outdated: r
                        .binary_replaced
                        .then(|| "the QEMU binary was replaced (upgrade)".to_owned()),
                };
                (r.vm.clone(), seen)
            })
            .collect();
        crate::plan::Observed {
            vms,
            clock_untrusted: None,
        }
    }
}

/// Serves requests one at a time; a request queued behind another is merged into it.
pub fn spawn(
    systemd: Systemd,
    mut requests: mpsc::UnboundedReceiver<Request>,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(mut req) = requests.recv().await {
            while let Ok(newer) = requests.try_recv() {
                let full = req.full || newer.full;
                req = Request { full, ..newer };
            }
            let event = match observe(&systemd, &req).await {
                Ok(report) => Event::Resynced(report),
                Err(e) => Event::ResyncFailed(e.to_string()),
            };
            if events.send(event).is_err() {
                return;
            }
        }
    })
}

fn runs(state: &ActiveState) -> bool {
    matches!(
        state,
        ActiveState::Active
            | ActiveState::Activating
            | ActiveState::Reloading
            | ActiveState::Deactivating
    )
}

/// Whether the process runs a binary that was replaced (or removed) on disk since it started.
fn replaced(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|exe| exe.to_string_lossy().ends_with(" (deleted)"))
}
