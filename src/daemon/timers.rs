//! The timers `systemctl list-timers` shows: one per announced maintenance slot and one per
//! upcoming deletion stage, each running `vmkeeper run-due`. Which timers should exist is a
//! pure function of the state ([`desired`]); a task makes systemd match it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::deletion::Stage;
use crate::events::Event;
use crate::exec::systemd::{self, Systemd, TimerTrigger, TransientTimer};
use crate::model::VmName;
use crate::state::State;

/// Wait before retrying after systemd refused a change.
const RETRY: Duration = Duration::from_secs(5);

/// One timer that should exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The VM it belongs to.
    pub vm: VmName,
    /// When it elapses.
    pub at: DateTime<Utc>,
    /// For `systemctl list-timers`.
    pub description: String,
}

/// Every timer that should exist, and whose timers the task may remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerPlan {
    /// By unit name.
    pub wanted: BTreeMap<String, Wanted>,
    /// VMs this daemon is responsible for: their timers that are not wanted are removed;
    /// timers of other VMs (another daemon's, in tests) are left alone.
    pub ours: BTreeSet<VmName>,
    /// The command the timers' services run.
    pub argv: Vec<String>,
    /// The state generation this plan follows from; acknowledged with
    /// [`Event::TimersSynced`](super::Event::TimersSynced) once systemd matches it.
    pub generation: u64,
}

impl TimerPlan {
    /// Whether two plans want the same timers (whatever state generation they came from).
    pub fn same_timers(&self, other: &TimerPlan) -> bool {
        self.wanted == other.wanted && self.ours == other.ours && self.argv == other.argv
    }
}

/// The timers the state calls for at `now` (the real clock: a timer in the past never fires);
/// `zone` gives each VM's zone (its project's), in which its deletion dates fall.
pub fn desired(
    state: &State,
    zone: impl Fn(&VmName) -> Tz,
    now: DateTime<Utc>,
) -> BTreeMap<String, Wanted> {
    let mut wanted = BTreeMap::new();
    for (vm, m) in &state.maintenances {
        let tz = zone(vm);
        if m.slot_start > now {
            wanted.insert(
                systemd::maintenance_timer_name(vm.as_str()),
                Wanted {
                    vm: vm.clone(),
                    at: m.slot_start,
                    description: format!(
                        "vmkeeper maintenance of VM {vm} at {}",
                        crate::plan::slot_in(tz, m.slot_start, m.slot_end)
                    ),
                },
            );
        }
    }
    for (vm, d) in &state.deletions {
        let schedule = d.schedule(zone(vm));
        for stage in Stage::ALL {
            let at = schedule.at(stage).with_timezone(&Utc);
            if !d.progress.has_done(stage) && at > now {
                wanted.insert(
                    systemd::deletion_timer_name(vm.as_str(), stage.as_str()),
                    Wanted {
                        vm: vm.clone(),
                        at,
                        description: format!("vmkeeper deletion of VM {vm}: stage {stage}"),
                    },
                );
            }
        }
    }
    wanted
}

/// The VM a vmkeeper timer belongs to.
pub fn timer_vm(unit: &str) -> Option<VmName> {
    let stem = unit.strip_suffix(".timer")?;
    if let Some(vm) = stem.strip_prefix("vmkeeper-maint-") {
        return vm.parse().ok();
    }
    let stem = stem.strip_prefix("vmkeeper-delete-")?;
    Stage::ALL.iter().find_map(|s| {
        stem.strip_suffix(s.as_str())?
            .strip_suffix('-')?
            .parse()
            .ok()
    })
}

/// Makes systemd's timers match each plan sent on `rx`, acknowledging each.
pub fn spawn(
    systemd: Systemd,
    mut rx: watch::Receiver<TimerPlan>,
    events: mpsc::UnboundedSender<super::Event>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let plan = rx.borrow_and_update().clone();
            let result = sync(&systemd, &plan).await;
            if result.is_ok() {
                let _ = events.send(super::Event::TimersSynced {
                    generation: plan.generation,
                });
            }
            if let Err(e) = result {
                warn!(
                    message_id = Event::OperationFailed.message_id(),
                    action = "timers",
                    "cannot update the maintenance and deletion timers: {e}; retrying"
                );
                let _ = tokio::time::timeout(RETRY, rx.changed()).await;
                continue;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
}

async fn sync(systemd: &Systemd, plan: &TimerPlan) -> Result<(), systemd::SystemdError> {
    let present = systemd
        .list_timers(&["vmkeeper-maint-*.timer", "vmkeeper-delete-*.timer"])
        .await?;
    let mut missing = plan.wanted.clone();
    for t in &present {
        let keep = missing
            .get(&t.name)
            .is_some_and(|w| t.next_elapse.map(|n| n.timestamp()) == Some(w.at.timestamp()));
        if keep {
            missing.remove(&t.name);
            continue;
        }
        if timer_vm(&t.name).is_some_and(|vm| plan.ours.contains(&vm)) {
            match systemd.stop_unit(&t.name).await {
                Ok(_) => {}
                Err(e) if e.is_no_such_unit() => {}
                Err(e) => return Err(e),
            }
        }
    }
    for (name, w) in missing {
        let timer = TransientTimer {
            name,
            description: w.description,
            trigger: TimerTrigger::At(w.at),
            argv: plan.argv.clone(),
            environment: vec![("VMKEEPER_VM".into(), w.vm.to_string())],
        };
        match systemd.start_timer(&timer).await {
            Ok(_) => {}
            // A timer of that name is still loaded (stopping): the next round replaces it.
            Err(e) if e.is_unit_exists() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
        assert_eq!(
            timer_vm(&systemd::maintenance_timer_name("web-01"))
                .unwrap()
                .as_str(),
            "web-01"
        );
        assert!(timer_vm("vmkeeper-delete-x-trash.timer").is_none());
        assert!(timer_vm("vmkeeper-vm-x.service").is_none());
    }
}
