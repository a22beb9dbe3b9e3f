//! Monitoring downtimes as the loop records them: the silence plan it hands the silences
//! task (from the state, on every change), and what the task reports back (silence ids into
//! the state, Alertmanager's reachability for `status` and the metrics).

use chrono::Utc;
use tracing::{info, warn};

use super::eventloop::Daemon;
use super::silences::{self, Report, SilencePlan};
use crate::events::Event as Journal;
use crate::model::VmName;
use crate::state::SilencePurpose;

impl Daemon {
    /// What the silences task should make Alertmanager show now.
    pub(super) fn silence_plan(&self) -> SilencePlan {
        SilencePlan {
            alertmanager: self.config.alertmanager.clone(),
            created_by: self.silence_creator.clone(),
            wanted: silences::wanted(&self.state, |vm| self.zone(vm)),
            records: self.state.silences.clone(),
            ours: self.ours().union(&self.retired).cloned().collect(),
        }
    }

    /// Downtimes Alertmanager has no silence for yet (recorded with their window).
    pub(super) fn silences_pending(&self) -> usize {
        if self.config.alertmanager.is_none() {
            return 0;
        }
        let now = Utc::now();
        silences::wanted(&self.state, |vm| self.zone(vm))
            .iter()
            .filter(|w| w.ends_at > now)
            .filter(|w| {
                !self.state.silences.iter().any(|r| {
                    r.vm == w.vm
                        && r.purpose == w.purpose
                        && r.starts_at == w.starts_at
                        && r.ends_at == w.ends_at
                })
            })
            .count()
    }

    /// A report of the silences task.
    pub(super) fn silences_report(&mut self, report: Report) {
        match report {
            Report::Recorded(record) => {
                let known = self.state.silences.contains(&record);
                if known {
                    return;
                }
                info!(
                    message_id = Journal::Downtime.message_id(),
                    vm = record.vm.as_str(),
                    project = self.project(&record.vm).name.as_str(),
                    action = "silence",
                    reason = record.purpose.as_str(),
                    planned = true,
                    silence = record.id.as_str(),
                    "Alertmanager silence {} for the {} of VM {} from {} until {}",
                    record.id,
                    record.purpose.as_str(),
                    record.vm,
                    record.starts_at,
                    record.ends_at
                );
                self.state
                    .silences
                    .retain(|r| !(r.vm == record.vm && r.purpose == record.purpose));
                self.state.silences.push(record);
                self.changed();
            }
            Report::Gone { vm, purpose, id } => {
                let before = self.state.silences.len();
                self.state.silences.retain(|r| r.id != id);
                if self.state.silences.len() != before {
                    self.silence_gone(&vm, purpose, &id);
                    self.changed();
                }
            }
            Report::Synced => {
                if let Some((since, _)) = self.alertmanager_error.take() {
                    info!(
                        message_id = Journal::Downtime.message_id(),
                        action = "silences",
                        "Alertmanager is reachable again (it was not since {since}); silences \
                         are in line with the downtimes"
                    );
                }
            }
            Report::Failed { error, retry } => {
                if self.alertmanager_error.is_none() {
                    warn!(
                        message_id = Journal::OperationFailed.message_id(),
                        action = "silences",
                        reason = error.as_str(),
                        "cannot sync the monitoring downtimes with Alertmanager: {error}; \
                         retrying with backoff (next in {retry:?}); stages and reboots go on"
                    );
                }
                let since = self
                    .alertmanager_error
                    .take()
                    .map_or(Utc::now(), |(s, _)| s);
                self.alertmanager_error = Some((since, error));
            }
        }
    }

    fn silence_gone(&self, vm: &VmName, purpose: SilencePurpose, id: &str) {
        info!(
            message_id = Journal::Downtime.message_id(),
            vm = vm.as_str(),
            project = self.project(vm).name.as_str(),
            action = "unsilence",
            reason = purpose.as_str(),
            planned = true,
            silence = id,
            "Alertmanager silence {id} for the {} of VM {vm} is over",
            purpose.as_str()
        );
    }
}
