//! The metrics as the loop keeps them: counts where things happen (alarms, planned stops and
//! reboots, failed operations, pass and grow durations) and, for each scrape, a snapshot of
//! what it knows, built from memory in one walk over the VMs: no systemd, QMP or Ceph call.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::eventloop::Daemon;
use crate::deletion::{Progress, Stage};
use crate::metrics::{DeletionMetrics, HostMetrics, Snapshot, VmCounters, VmMetrics};
use crate::model::VmName;
use crate::state::{Intent, RebootKind, StopReason, UnplannedKind};
use crate::supervisor::{Link, OpKind};

impl Daemon {
    /// The counts of `vm`, created at zero on first use.
    pub(super) fn counters(&mut self, vm: &VmName) -> &mut VmCounters {
        self.counters.entry(vm.clone()).or_default()
    }

    /// Counts an alarm.
    pub(super) fn count_unplanned(&mut self, vm: &VmName, kind: UnplannedKind) {
        self.counters(vm).unplanned(kind);
    }

    /// Counts a failed operation.
    pub(super) fn count_failure(&mut self, vm: &VmName, kind: OpKind) {
        self.counters(vm).failure(kind.as_str());
    }

    /// Counts a planned stop (`kind` is the operation that stopped the VM; a reboot's stop is
    /// counted as the reboot, once its new QEMU runs).
    pub(super) fn count_planned_stop(&mut self, vm: &VmName, kind: OpKind) {
        let reason = match (kind, self.state.intents.get(vm)) {
            (OpKind::Reboot, _) => return,
            (
                _,
                Some(Intent::Stop {
                    reason: StopReason::Deletion { .. },
                    ..
                }),
            )
            | (OpKind::Stage(_), _) => "deletion",
            _ => "offline",
        };
        self.counters(vm).planned_stop(reason);
    }

    /// Counts a planned reboot whose new QEMU runs.
    pub(super) fn count_planned_reboot(&mut self, vm: &VmName, kind: &RebootKind) {
        let reason = match kind {
            RebootKind::Maintenance { .. } => "maintenance",
            RebootKind::Immediate => "requested",
        };
        self.counters(vm).planned_reboot(reason);
    }

    /// Observes one pass's duration.
    pub(super) fn observe_pass(&self, took: Duration) {
        self.histograms.pass.observe(took.as_secs_f64());
    }

    /// Observes one grow's duration.
    pub(super) fn observe_grow(&self, took: Duration) {
        self.histograms.grow.observe(took.as_secs_f64());
    }

    /// Whether alerts about `vm` are expected at `now`: it is in maintenance, or its deletion
    /// date has come (the downtime recorded at the announcement).
    pub(super) fn downtime(&self, vm: &VmName, now: DateTime<Utc>) -> bool {
        self.in_maintenance(vm, now)
            || self
                .state
                .deletions
                .get(vm)
                .and_then(|d| d.downtime_from)
                .is_some_and(|from| from <= now)
    }

    /// What a scrape shows at `now`.
    pub(super) fn metrics_snapshot(&self, now: DateTime<Utc>) -> Snapshot {
        let vms = self
            .ours()
            .into_iter()
            .map(|vm| {
                let record = self.state.vms.get(&vm);
                let slot = self.vms.get(&vm);
                let spec = self.config.vms.get(&vm);
                let deletion = self.state.deletions.get(&vm);
                let shut_down = deletion.is_some_and(|d| {
                    d.progress.has_done(Stage::Shutdown)
                        || d.stage_started.is_some_and(|s| s >= Stage::Shutdown)
                });
                let running = match slot {
                    Some(s) if !matches!(s.sup.unit, crate::supervisor::Unit::Unknown) => {
                        s.sup.unit.is_up()
                    }
                    _ => record.is_some_and(|r| r.running),
                };
                let maintenance = self.state.maintenances.get(&vm);
                VmMetrics {
                    project: self.project(&vm).name.to_string(),
                    running,
                    should_run: spec.is_some_and(|s| s.online) && !shut_down,
                    declared: spec.map(|s| s.resources),
                    applied: record.map(|r| r.applied),
                    change_pending: self
                        .last_plan
                        .as_ref()
                        .is_some_and(|p| p.pending.iter().any(|p| p.vm == vm)),
                    counters: self.counters.get(&vm).cloned().unwrap_or_default(),
                    last_unplanned: record
                        .and_then(|r| r.last_unplanned.as_ref())
                        .map(|u| (u.kind, u.at.timestamp())),
                    failing: slot
                        .map(|s| {
                            s.sup
                                .backoff
                                .iter()
                                .filter(|(_, b)| b.failures > 0)
                                .map(|(k, _)| k.as_str())
                                .collect()
                        })
                        .unwrap_or_default(),
                    maintenance_slot: maintenance
                        .map(|m| (m.slot_start.timestamp(), m.slot_end.timestamp())),
                    in_maintenance: self.in_maintenance(&vm, now),
                    deletion: deletion.map(|d| {
                        let schedule = d.schedule(self.zone(&vm));
                        DeletionMetrics {
                            stage: match d.progress {
                                Progress::Scheduled => "scheduled",
                                Progress::Done { last } => last.as_str(),
                            },
                            next: d
                                .progress
                                .next_stage()
                                .map(|s| (s.as_str(), schedule.at(s).timestamp())),
                        }
                    }),
                    downtime: self.downtime(&vm, now),
                    qmp_connected: slot
                        .is_some_and(|s| matches!(s.sup.link, Link::Connected { .. })),
                    vm: vm.to_string(),
                }
            })
            .collect();
        let wanted = self.silences_pending();
        Snapshot {
            host: HostMetrics {
                started_at: self.started_at.timestamp(),
                state_writable: self.durability.failing.is_none(),
                undelivered_notifications: self.state.outbox.len(),
                alertmanager_up: self
                    .config
                    .alertmanager
                    .as_ref()
                    .map(|_| self.alertmanager_error.is_none()),
                silences_pending: wanted,
            },
            vms,
            histograms: self.histograms.clone(),
        }
    }

    /// Answers a scrape.
    pub(super) fn scrape(&self, reply: tokio::sync::oneshot::Sender<Arc<Snapshot>>) {
        let _ = reply.send(Arc::new(self.metrics_snapshot(Utc::now())));
    }
}
