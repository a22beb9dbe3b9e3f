//! `vmkeeper status`: what the loop knows of the host and every VM, without asking systemd,
//! QEMU or Ceph (so it answers while they are slow).

use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use super::eventloop::Daemon;
use crate::access::Scope;
use crate::exec::systemd;
use crate::localtime::rfc3339;
use crate::maintenance::Slot;
use crate::model::{InvocationId, ProjectName, Resources, VmName};
use crate::plan::slot_in;
use crate::state::{SilencePurpose, Unplanned};
use crate::supervisor::{Link, Unit};

/// `vmkeeper status --json`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The daemon.
    pub host: HostStatus,
    /// Every VM it is responsible for.
    pub vms: Vec<VmStatus>,
}

/// The daemon's own state.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    /// When the daemon started.
    pub started_at: String,
    /// Whether the state file can be written; while not, nothing is stopped or deleted.
    pub state_writable: bool,
    /// Why not, and since when.
    pub state_error: Option<String>,
    /// Notifications the hook has not taken yet.
    pub undelivered_notifications: usize,
    /// Why the hook failed last, while it does.
    pub hook_error: Option<String>,
    /// The Alertmanager that gets the downtimes as silences, when one is configured.
    pub alertmanager: Option<AlertmanagerStatus>,
}

/// The Alertmanager as the daemon sees it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerStatus {
    /// Its URL.
    pub url: String,
    /// Whether the last attempt to sync the silences worked.
    pub reachable: bool,
    /// Why not, and since when.
    pub error: Option<String>,
    /// Downtimes it has no silence for yet (they are made once it answers).
    pub silences_pending: usize,
}

/// A silence the daemon made for a VM.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SilenceStatus {
    purpose: SilencePurpose,
    id: String,
    starts_at: String,
    ends_at: String,
}

/// One VM.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    name: VmName,
    /// The project it belongs to.
    project: ProjectName,
    running: bool,
    unit: String,
    qemu_pid: Option<u32>,
    /// The running QEMU's instance (the unit's InvocationID).
    instance: Option<InvocationId>,
    /// `connected`, `reconnecting since <instant>`, or `none` (nothing runs).
    qmp: String,
    /// Removed from the configuration, its deletion waiting for `confirm-removal`.
    awaiting_removal: bool,
    /// Destructive deletion stages due but held (an untrusted clock), and why.
    held: Vec<String>,
    /// Its deletion: every stage's earliest instant as it stands (moved when one ran late).
    deletion: Option<crate::plan::DeletionTimeline>,
    /// Whether its maintenance's announcement reached the contacts (the hook took it).
    maintenance_announced: Option<bool>,
    /// The operation in flight, and since when.
    operation: Option<String>,
    declared: Option<Resources>,
    applied: Option<Resources>,
    pending: Option<Resources>,
    maintenance_slot: Option<Slot>,
    in_maintenance: bool,
    refusals: Vec<String>,
    /// Operations that failed and wait for their next attempt.
    failures: Vec<String>,
    last_unplanned: Option<Unplanned>,
    /// The date the VM is deleted on, when a deletion is under way.
    deletion_date: Option<NaiveDate>,
    /// Monitoring downtime recorded by a deletion's announcement: from T on.
    downtime_from: Option<String>,
    /// Alerts about the VM are expected now (in maintenance, or deleted from T on).
    monitoring_downtime: bool,
    /// Its Alertmanager silences.
    silences: Vec<SilenceStatus>,
}

impl Daemon {
    /// What a caller of `scope` may see: the VMs of its projects (every VM for root and the
    /// operator group) and the daemon's health; the hook's last error only for those who see
    /// every project, since it may quote another project's notification.
    pub(super) fn status(&self, scope: &Scope) -> Status {
        let tz = self.config.timezone;
        let now = Utc::now();
        let mono = Instant::now();
        let ago = |t: Instant| {
            let wall = now
                - chrono::TimeDelta::from_std(mono.saturating_duration_since(t))
                    .unwrap_or_default();
            rfc3339(wall.with_timezone(&tz))
        };
        let vms = self
            .ours()
            .into_iter()
            .filter(|n| scope.covers(&self.project(n).name))
            .map(|n| {
                let project = self.project(&n);
                let vm_tz = project.tz();
                let record = self.state.vms.get(&n);
                let slot = self.vms.get(&n);
                let (running, pid, instance) = match slot.map(|s| &s.sup.unit) {
                    Some(Unit::Up { instance, pid, .. }) => (true, *pid, instance.clone()),
                    Some(Unit::Down { .. }) => (false, None, None),
                    _ => (record.is_some_and(|r| r.running), None, None),
                };
                let qmp = match slot.map(|s| &s.sup.link) {
                    Some(Link::Connected { .. }) => "connected".to_owned(),
                    Some(Link::Reconnecting { since }) => {
                        format!("reconnecting since {}", ago(*since))
                    }
                    _ => "none".to_owned(),
                };
                let operation = slot.and_then(|s| {
                    s.sup
                        .op
                        .as_ref()
                        .map(|op| format!("{} since {}", op.kind.as_str(), ago(op.started)))
                });
                let failures = slot
                    .map(|s| {
                        s.sup
                            .backoff
                            .iter()
                            .filter(|(_, b)| b.not_before.is_some_and(|t| t > mono))
                            .map(|(k, b)| {
                                format!(
                                    "{} failed: {}; next attempt in {}s",
                                    k.as_str(),
                                    b.last_error.as_deref().unwrap_or("?"),
                                    b.not_before
                                        .map_or(0, |t| t.saturating_duration_since(mono).as_secs())
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let plan = self.last_plan.as_ref();
                let maintenance = self.state.maintenances.get(&n);
                let deletion = self.state.deletions.get(&n);
                VmStatus {
                    running,
                    unit: systemd::vm_unit_name(n.as_str()),
                    qemu_pid: pid,
                    instance,
                    qmp,
                    operation,
                    declared: self.config.vms.get(&n).map(|s| s.resources),
                    applied: record.map(|r| r.applied),
                    pending: plan
                        .and_then(|p| p.pending.iter().find(|p| p.vm == n))
                        .map(|p| p.to),
                    maintenance_slot: maintenance.map(|m| slot_in(vm_tz, m.slot_start, m.slot_end)),
                    in_maintenance: self.in_maintenance(&n, now),
                    awaiting_removal: plan.is_some_and(|p| p.awaiting_removal.contains(&n)),
                    held: plan
                        .map(|p| {
                            p.held
                                .iter()
                                .filter(|h| h.vm == n)
                                .map(|h| format!("{}: {}", h.stage, h.reason))
                                .collect()
                        })
                        .unwrap_or_default(),
                    deletion: plan.and_then(|p| p.deletions.iter().find(|d| d.vm == n).cloned()),
                    maintenance_announced: maintenance.map(|m| m.announced().is_some()),
                    refusals: plan
                        .map(|p| {
                            p.refusals
                                .iter()
                                .filter(|r| r.vm == n)
                                .map(ToString::to_string)
                                .collect()
                        })
                        .unwrap_or_default(),
                    failures,
                    last_unplanned: record.and_then(|r| r.last_unplanned.clone()),
                    deletion_date: deletion.map(|d| d.date),
                    downtime_from: deletion
                        .and_then(|d| d.downtime_from)
                        .map(|t| rfc3339(t.with_timezone(&vm_tz))),
                    monitoring_downtime: self.downtime(&n, now),
                    silences: self
                        .state
                        .silences
                        .iter()
                        .filter(|s| s.vm == n)
                        .map(|s| SilenceStatus {
                            purpose: s.purpose,
                            id: s.id.clone(),
                            starts_at: rfc3339(s.starts_at.with_timezone(&vm_tz)),
                            ends_at: rfc3339(s.ends_at.with_timezone(&vm_tz)),
                        })
                        .collect(),
                    project: project.name.clone(),
                    name: n,
                }
            })
            .collect();
        let failing = self.durability.failing.as_ref();
        Status {
            host: HostStatus {
                started_at: rfc3339(self.started_at.with_timezone(&tz)),
                state_writable: failing.is_none(),
                state_error: failing.map(|(since, e): &(DateTime<Utc>, String)| {
                    format!("{e} (since {})", rfc3339(since.with_timezone(&tz)))
                }),
                undelivered_notifications: self.state.outbox.len(),
                hook_error: self
                    .delivery_error
                    .as_ref()
                    .filter(|_| *scope == Scope::All)
                    .map(|(_, e)| e.clone()),
                alertmanager: self
                    .config
                    .alertmanager
                    .as_ref()
                    .map(|am| AlertmanagerStatus {
                        url: am.url.clone(),
                        reachable: self.alertmanager_error.is_none(),
                        error: self.alertmanager_error.as_ref().map(|(since, e)| {
                            format!("{e} (since {})", rfc3339(since.with_timezone(&tz)))
                        }),
                        silences_pending: self.silences_pending(),
                    }),
            },
            vms,
        }
    }
}
