//! Pure planning: (config, observed world, persisted state, now) -> plan.
//!
//! The plan says what to do now, which CPU/RAM changes wait for which maintenance slot,
//! what is refused and why, and where each deletion stands. It changes nothing; the daemon
//! carries out its actions and `vmkeeper plan` prints it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::config::{Config, Project};
use crate::deletion::{self, Progress, Schedule, Stage};
use crate::localtime::{rfc3339, ser_instant};
use crate::maintenance::{Slot, Taken, Window};
use crate::model::{BaseImage, ProjectName, Resources, VmName, VmSpec};
use crate::state::{Deletion, DeletionSource, Reason, State};

/// What the daemon saw of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedVm {
    /// Its QEMU unit is active.
    pub running: bool,
    /// The real size of its image, when known.
    pub disk_gib: Option<u64>,
    /// Why its running QEMU is outdated (binary or command line), if it is.
    pub outdated: Option<String>,
}

/// What the daemon saw of the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Per VM; a VM missing here is not running.
    pub vms: BTreeMap<VmName, ObservedVm>,
    /// Why the clock cannot be trusted now (not synchronized, or it just jumped forward):
    /// destructive deletion stages wait while it is set.
    pub clock_untrusted: Option<String>,
}

impl Observed {
    /// The world as the state last recorded it: what `vmkeeper plan` assumes without a daemon.
    pub fn as_recorded(state: &State) -> Observed {
        let vms = state
            .vms
            .iter()
            .map(|(n, r)| {
                (
                    n.clone(),
                    ObservedVm {
                        running: r.running,
                        disk_gib: Some(r.applied.disk_gib),
                        outdated: None,
                    },
                )
            })
            .collect();
        Observed {
            vms,
            clock_untrusted: None,
        }
    }
}

/// Something to do now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Create the VM's image, thin, or as a clone of a base image.
    CreateDisk {
        /// The VM.
        vm: VmName,
        /// Size in GiB.
        #[serde(rename = "sizeGiB")]
        size_gib: u64,
        /// Base image snapshot to clone.
        #[serde(rename = "cloneFrom")]
        clone_from: Option<BaseImage>,
    },
    /// Start the VM's QEMU with these resources.
    Start {
        /// The VM.
        vm: VmName,
        /// What it starts with.
        resources: Resources,
    },
    /// Grow the image; live through QMP when the VM runs.
    GrowDisk {
        /// The VM.
        vm: VmName,
        /// Current size.
        #[serde(rename = "fromGiB")]
        from_gib: u64,
        /// New size.
        #[serde(rename = "toGiB")]
        to_gib: u64,
        /// Whether the VM runs (QMP `block_resize`) or not (RBD resize).
        live: bool,
    },
    /// Stop the VM, planned.
    Stop {
        /// The VM.
        vm: VmName,
        /// Why.
        reason: String,
    },
    /// Reboot the VM cold now, in its maintenance slot, applying its pending changes.
    MaintenanceReboot {
        /// The VM.
        vm: VmName,
        /// The slot.
        slot: Slot,
    },
    /// Record and announce a maintenance slot.
    ScheduleMaintenance {
        /// The VM.
        vm: VmName,
        /// The project whose windows the slot is in and whose contacts hear of it.
        project: ProjectName,
        /// The slot.
        slot: Slot,
        /// Why.
        reasons: Vec<Reason>,
        /// The slot it replaces (moved or updated), announced as such.
        replaces: Option<Slot>,
    },
    /// Drop a maintenance and announce that.
    CancelMaintenance {
        /// The VM.
        vm: VmName,
        /// Why.
        reason: String,
    },
    /// Hold the deletion of these VMs, removed from the configuration at once, until each is
    /// confirmed.
    HoldRemovals {
        /// The VMs.
        vms: Vec<VmName>,
    },
    /// Record the addresses a VM now holds.
    UpdateAddresses {
        /// The VM.
        vm: VmName,
        /// Its addresses.
        addresses: Vec<IpAddr>,
    },
    /// Record a deletion.
    ScheduleDeletion {
        /// The VM.
        vm: VmName,
        /// T.
        date: NaiveDate,
        /// Who asked.
        source: DeletionSource,
    },
    /// Drop a deletion before its purge.
    CancelDeletion {
        /// The VM.
        vm: VmName,
        /// Why.
        reason: String,
    },
    /// Run a due deletion stage.
    RunDeletionStage {
        /// The VM.
        vm: VmName,
        /// The stage.
        stage: Stage,
    },
}

/// A CPU/RAM change that waits for its maintenance reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    /// The VM.
    pub vm: VmName,
    /// Its project, in whose zone the slot is given.
    pub project: ProjectName,
    /// What runs.
    pub from: Resources,
    /// What is declared.
    pub to: Resources,
    /// The reboot's slot.
    pub slot: Slot,
    /// When the slot was (or is now) announced.
    #[serde(serialize_with = "ser_instant")]
    pub announced_at: DateTime<Tz>,
}

/// A declared change that is not carried out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The VM.
    pub vm: VmName,
    /// Field path in the configuration.
    pub field: String,
    /// The rule and what to do instead.
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Whether a deletion stage has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageStatus {
    /// It ran.
    Done,
    /// Its time has come; it runs now.
    Due,
    /// Later.
    Upcoming,
}

/// One stage of a deletion timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageAt {
    /// The stage.
    pub stage: Stage,
    /// When it is due.
    #[serde(serialize_with = "ser_instant")]
    pub at: DateTime<Tz>,
    /// Where it stands.
    pub status: StageStatus,
}

/// Where a deletion stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeletionTimeline {
    /// The VM.
    pub vm: VmName,
    /// T.
    pub date: NaiveDate,
    /// Who asked.
    pub source: DeletionSource,
    /// Every stage.
    pub stages: Vec<StageAt>,
    /// Last instant a cancel is accepted (the purge).
    #[serde(serialize_with = "ser_instant")]
    pub cancellable_until: DateTime<Tz>,
}

/// A destructive deletion stage that is due but waits for a trustworthy clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldStage {
    /// The VM.
    pub vm: VmName,
    /// The stage.
    pub stage: Stage,
    /// Why the clock is not trusted.
    pub reason: String,
}

/// A name held by a deleted VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReservedName {
    /// The name.
    pub vm: VmName,
    /// The date it becomes free.
    pub free_on: NaiveDate,
}

/// The outcome of planning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The instant planned for.
    #[serde(serialize_with = "ser_instant")]
    pub now: DateTime<Tz>,
    /// Zone of every local date and instant.
    pub timezone: String,
    /// What to do now, in order.
    pub actions: Vec<Action>,
    /// CPU/RAM changes waiting for a reboot.
    pub pending: Vec<Pending>,
    /// What is refused.
    pub refusals: Vec<Refusal>,
    /// Deletions in progress or scheduled now.
    pub deletions: Vec<DeletionTimeline>,
    /// Names not free yet.
    pub reserved_names: Vec<ReservedName>,
    /// Things to say loudly.
    pub warnings: Vec<String>,
    /// Destructive stages held back by an untrusted clock.
    pub held: Vec<HeldStage>,
    /// VMs removed from the configuration whose deletion waits for a confirmation.
    pub awaiting_removal: Vec<VmName>,
}

/// Plans one step. Pure: the same inputs give the same plan.
pub fn plan(config: &Config, observed: &Observed, state: &State, now: DateTime<Utc>) -> Plan {
    let tz = config.timezone;
    let mut p = Planner {
        config,
        observed,
        state,
        now,
        plan: Plan {
            now: now.with_timezone(&tz),
            timezone: tz.name().to_owned(),
            actions: vec![],
            pending: vec![],
            refusals: vec![],
            deletions: vec![],
            reserved_names: vec![],
            warnings: vec![],
            held: vec![],
            awaiting_removal: vec![],
        },
        taken: held_slots(state),
    };
    for spec in config.vms.values() {
        p.declared(spec);
    }
    p.removed();
    for (name, d) in &state.deletions {
        if !config.vms.contains_key(name) {
            p.timeline(name, &d.schedule(tz), &d.source, d.progress);
        }
        if !d.progress.has_done(Stage::ReleaseName) {
            let free_on = d.schedule(p.zone(name)).date_of(Stage::ReleaseName);
            p.plan.reserved_names.push(ReservedName {
                vm: name.clone(),
                free_on,
            });
        }
    }
    p.plan
}

struct Planner<'a> {
    config: &'a Config,
    observed: &'a Observed,
    state: &'a State,
    now: DateTime<Utc>,
    plan: Plan,
    /// Maintenance slots already held, by VM and project, so new ones are spread by each
    /// project's `maxParallel` and the host-wide one.
    taken: Vec<Held>,
}

impl<'a> Planner<'a> {
    /// The project `vm` belongs to: as declared, or as recorded for a VM no longer declared.
    fn project(&self, vm: &VmName) -> &'a Project {
        self.config.project_of(vm, self.state.projects.get(vm))
    }

    /// The zone of `vm`'s deletion dates and maintenance slots: its project's.
    fn zone(&self, vm: &VmName) -> Tz {
        self.project(vm).tz()
    }

    fn refuse(&mut self, vm: &VmName, field: &str, message: String) {
        self.plan.refusals.push(Refusal {
            vm: vm.clone(),
            field: format!("vms.{vm}{field}"),
            message,
        });
    }

    fn act(&mut self, a: Action) {
        self.plan.actions.push(a);
    }

    fn declared(&mut self, spec: &VmSpec) {
        let name = &spec.name;
        if let Some(r) = self.state.released.get(name)
            && spec.generation <= r.generation
            && !self.state.vms.contains_key(name)
        {
            // A declaration older than the deletion never brings the VM back.
            self.refuse(
                name,
                ".generation",
                format!(
                    "the name belonged to a VM deleted on {} (generation {}); this declaration \
                     is older than that deletion, so nothing is created. To create a new VM of \
                     that name, declare generation = {}",
                    r.deleted_on,
                    r.generation,
                    r.generation + 1
                ),
            );
            return;
        }
        // A deletion decides first: it may hold the name, or stop the VM.
        if let Some(d) = self.state.deletions.get(name) {
            if !self.declared_with_deletion(spec, d) {
                return;
            }
        } else if let Some(date) = spec.delete_at {
            match deletion::check_request(self.zone(name), self.now, date) {
                Ok(_) => {
                    self.act(Action::ScheduleDeletion {
                        vm: name.clone(),
                        date,
                        source: DeletionSource::Config,
                    });
                    self.timeline(
                        name,
                        &Schedule::new(self.zone(name), date),
                        &DeletionSource::Config,
                        Progress::Scheduled,
                    );
                }
                Err(e) => {
                    self.refuse(name, ".deleteAt", e.to_string());
                    if !self.state.vms.contains_key(name) {
                        // Never create a VM that is declared to be gone already.
                        return;
                    }
                }
            }
        }
        let conflict = self.address_conflict(spec);
        match self.state.vms.get(name) {
            // A new VM whose address is taken is not created.
            None if conflict => return,
            // An existing one keeps the addresses it holds until the new ones are free.
            Some(r) if !conflict && r.ip_addresses != spec.ip_addresses => {
                self.act(Action::UpdateAddresses {
                    vm: name.clone(),
                    addresses: spec.ip_addresses.clone(),
                });
            }
            _ => {}
        }
        self.lifecycle(spec);
    }

    /// Handles a declared VM that has a deletion on record; returns whether the VM's normal
    /// lifecycle applies.
    fn declared_with_deletion(&mut self, spec: &VmSpec, d: &Deletion) -> bool {
        let name = &spec.name;
        let schedule = d.schedule(self.zone(name));
        if d.progress.has_done(Stage::Purge) {
            // The remaining stages run whether or not the name is declared again.
            self.timeline(name, &d.schedule(self.zone(name)), &d.source, d.progress);
            let free = schedule.date_of(Stage::ReleaseName);
            self.refuse(
                name,
                "",
                format!(
                    "the name belongs to a VM deleted on {}; it is free again on {free}",
                    d.date
                ),
            );
            return false;
        }
        let cancel_reason = match (&d.source, spec.delete_at) {
            (DeletionSource::Removed, None) => Some("declared again in the configuration"),
            (DeletionSource::Config, None) => Some("deleteAt removed from the configuration"),
            _ => None,
        };
        let moved_to = spec.delete_at.filter(|date| *date != d.date);
        if let Some(reason) = cancel_reason {
            match deletion::can_cancel(&schedule, d.progress, self.now) {
                Ok(()) => {
                    self.act(Action::CancelDeletion {
                        vm: name.clone(),
                        reason: reason.into(),
                    });
                    return true;
                }
                Err(e) => self.refuse(name, "", format!("cannot cancel the deletion: {e}")),
            }
        } else if let Some(date) = moved_to {
            let ok = deletion::can_cancel(&schedule, d.progress, self.now)
                .map_err(|e| format!("cannot move the deletion: {e}"))
                .and_then(|()| {
                    deletion::check_request(self.zone(name), self.now, date)
                        .map_err(|e| e.to_string())
                });
            match ok {
                Ok(_) => {
                    self.act(Action::ScheduleDeletion {
                        vm: name.clone(),
                        date,
                        source: DeletionSource::Config,
                    });
                    self.timeline(
                        name,
                        &Schedule::new(self.zone(name), date),
                        &DeletionSource::Config,
                        Progress::Scheduled,
                    );
                    return !d.progress.has_done(Stage::Shutdown);
                }
                Err(e) => self.refuse(name, ".deleteAt", e),
            }
        }
        self.timeline(name, &d.schedule(self.zone(name)), &d.source, d.progress);
        // After the shutdown the VM stays off until the deletion is cancelled.
        !d.progress.has_done(Stage::Shutdown) && schedule.t() > self.now
    }

    /// Whether one of the VM's declared addresses is held by another VM of the host that is
    /// no longer declared (being deleted, or removed and awaiting confirmation); each such
    /// address is refused. Declared VMs cannot share one (the configuration is checked).
    fn address_conflict(&mut self, spec: &VmSpec) -> bool {
        let mut conflict = false;
        for (other, r) in &self.state.vms {
            if *other == spec.name
                || self.config.vms.contains_key(other)
                || self.state.deletions.contains_key(other)
            {
                continue;
            }
            for ip in spec
                .ip_addresses
                .iter()
                .filter(|ip| r.ip_addresses.contains(ip))
            {
                self.refuse(
                    &spec.name,
                    ".ipAddresses",
                    format!(
                        "{ip} is still held by {other}, which was removed from the configuration"
                    ),
                );
                conflict = true;
            }
        }
        for (other, d) in &self.state.deletions {
            if *other == spec.name || d.progress.has_done(Stage::Purge) {
                continue;
            }
            let held: Vec<&IpAddr> = spec
                .ip_addresses
                .iter()
                .filter(|ip| d.ip_addresses.contains(ip))
                .collect();
            for ip in held {
                let purge = d.schedule(self.zone(other)).date_of(Stage::Purge);
                self.refuse(
                    &spec.name,
                    ".ipAddresses",
                    format!("{ip} is still held by {other}, which is being deleted; it is released on {purge}"),
                );
                conflict = true;
            }
        }
        conflict
    }

    fn lifecycle(&mut self, spec: &VmSpec) {
        let name = &spec.name;
        let declared = spec.resources;
        let Some(record) = self.state.vms.get(name) else {
            self.act(Action::CreateDisk {
                vm: name.clone(),
                size_gib: declared.disk_gib,
                clone_from: spec.image.clone(),
            });
            if spec.online {
                self.act(Action::Start {
                    vm: name.clone(),
                    resources: declared,
                });
            }
            return;
        };
        let seen = self.observed.vms.get(name).cloned().unwrap_or_default();
        let disk = seen.disk_gib.unwrap_or(record.applied.disk_gib);
        let mut effective = declared;
        if declared.disk_gib > disk {
            self.act(Action::GrowDisk {
                vm: name.clone(),
                from_gib: disk,
                to_gib: declared.disk_gib,
                live: seen.running,
            });
        } else if declared.disk_gib < disk {
            self.refuse(
                name,
                ".diskGiB",
                format!(
                    "cannot shrink from {disk} to {} GiB; disks only grow — provision a new VM instead",
                    declared.disk_gib
                ),
            );
            effective.disk_gib = disk;
        }
        let maintenance = self.state.maintenances.get(name);
        match (spec.online, seen.running) {
            (true, false) => {
                self.act(Action::Start {
                    vm: name.clone(),
                    resources: effective,
                });
                if maintenance.is_some() {
                    self.act(Action::CancelMaintenance {
                        vm: name.clone(),
                        reason: "the VM starts with its declared values now".into(),
                    });
                }
            }
            (false, true) => {
                self.act(Action::Stop {
                    vm: name.clone(),
                    reason: "online = false".into(),
                });
                if maintenance.is_some() {
                    self.act(Action::CancelMaintenance {
                        vm: name.clone(),
                        reason: "the VM goes offline; changes apply at its next start".into(),
                    });
                }
            }
            (false, false) => {
                if maintenance.is_some() {
                    self.act(Action::CancelMaintenance {
                        vm: name.clone(),
                        reason: "the VM is offline; changes apply at its next start".into(),
                    });
                }
            }
            (true, true) => self.maintenance(name, record.applied, effective, seen.outdated),
        }
    }

    /// A running VM: schedule, keep, move, run or cancel its maintenance.
    fn maintenance(
        &mut self,
        name: &VmName,
        applied: Resources,
        declared: Resources,
        outdated: Option<String>,
    ) {
        let existing = self.state.maintenances.get(name);
        let mut reasons: Vec<Reason> = existing
            .map(|m| {
                m.reasons
                    .iter()
                    .filter(|r| {
                        !matches!(r, Reason::PendingResources { .. } | Reason::Outdated { .. })
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let running = Resources {
            disk_gib: declared.disk_gib,
            ..applied
        };
        if let Some(detail) = outdated {
            reasons.insert(0, Reason::Outdated { detail });
        }
        if applied.needs_reboot_for(&declared) {
            reasons.insert(
                0,
                Reason::PendingResources {
                    from: running,
                    to: declared,
                },
            );
        }
        let Some(m) = existing else {
            if !reasons.is_empty() {
                self.schedule(name, running, declared, reasons, None);
            }
            return;
        };
        let project = self.project(name);
        let slot = slot_in(project.tz(), m.slot_start, m.slot_end);
        if reasons.is_empty() {
            self.act(Action::CancelMaintenance {
                vm: name.clone(),
                reason: "the change was reverted; no reboot is needed".into(),
            });
            return;
        }
        if m.project != project.name {
            // Moved to another project: its slot was picked in the old project's windows and
            // announced to the old contacts. They hear it is off; the new ones get a slot of
            // the new project's.
            self.act(Action::CancelMaintenance {
                vm: name.clone(),
                reason: format!(
                    "{name} moved from project {} to project {}; its maintenance is planned \
                     and announced there",
                    m.project, project.name
                ),
            });
            self.taken.retain(|(vm, ..)| vm != name);
            self.schedule(name, running, declared, reasons, None);
            return;
        }
        // The contacts must have been told `announceAhead` before the slot: an announcement
        // the hook has not taken by then (or took too late) moves the maintenance.
        let deadline = m.slot_start - project.maintenance.announce_ahead;
        let untold = match m.announced() {
            Some(t) => t > deadline,
            None => self.now > deadline,
        };
        if slot.end <= self.now || untold {
            // Missed (the host or daemon was down), or not announced in time: never run
            // outside a window, never unannounced.
            self.taken.retain(|(vm, ..)| vm != name);
            self.schedule(name, running, declared, reasons, Some(slot));
            return;
        }
        if reasons != m.reasons {
            self.act(Action::ScheduleMaintenance {
                vm: name.clone(),
                project: project.name.clone(),
                slot,
                reasons: reasons.clone(),
                replaces: Some(slot),
            });
        }
        if slot.start <= self.now {
            self.act(Action::MaintenanceReboot {
                vm: name.clone(),
                slot,
            });
        }
        if applied.needs_reboot_for(&declared) {
            self.plan.pending.push(Pending {
                vm: name.clone(),
                project: project.name.clone(),
                from: running,
                to: declared,
                slot,
                announced_at: m.announced_at.with_timezone(&project.tz()),
            });
        }
    }

    fn schedule(
        &mut self,
        name: &VmName,
        running: Resources,
        declared: Resources,
        reasons: Vec<Reason>,
        replaces: Option<Slot>,
    ) {
        let project = self.project(name);
        let Some(slot) = pick_slot(self.config, project, &self.taken, self.now) else {
            self.refuse(
                name,
                "",
                format!(
                    "no maintenance slot fits within {} days (windows, blackouts, expectedDuration)",
                    crate::maintenance::HORIZON_DAYS
                ),
            );
            return;
        };
        self.taken.push((name.clone(), project.name.clone(), slot));
        if running.needs_reboot_for(&declared) {
            self.plan.pending.push(Pending {
                vm: name.clone(),
                project: project.name.clone(),
                from: running,
                to: declared,
                slot,
                announced_at: self.now.with_timezone(&project.tz()),
            });
        }
        self.act(Action::ScheduleMaintenance {
            vm: name.clone(),
            project: project.name.clone(),
            slot,
            reasons,
            replaces,
        });
    }

    /// VMs that exist but are no longer declared are scheduled for deletion, unless more were
    /// removed at once than the guard allows: then only those confirmed are, and the others
    /// wait for a confirmation.
    fn removed(&mut self) {
        let removed = undeclared_vms(self.config, self.state);
        // Removals not held yet came with this change; too many of them are held, and stay
        // held (also when some are confirmed and fewer are left) until each is confirmed.
        let new: Vec<VmName> = removed
            .iter()
            .filter(|n| !self.state.removal_held.contains(*n))
            .cloned()
            .collect();
        let guarded = new.len() > self.config.removal.max_at_once;
        if guarded {
            self.act(Action::HoldRemovals { vms: new.clone() });
        }
        for name in removed {
            let confirmed = self.state.confirmed_removals.contains(&name)
                || self.config.removal.confirmed.contains(&name);
            let held = self.state.removal_held.contains(&name) || (guarded && new.contains(&name));
            if held && !confirmed {
                self.plan.warnings.push(format!(
                    "{name} was removed from the configuration, awaiting confirmation: more than \
                     {} VMs were removed at once, so none is deleted until confirmed \
                     (vmkeeper confirm-removal {name}, or removal.confirmed in the \
                     configuration); declare it again to keep it",
                    self.config.removal.max_at_once
                ));
                self.plan.awaiting_removal.push(name);
                continue;
            }
            self.undeclared(&name);
        }
    }

    /// A VM that exists but is no longer declared: its deletion is scheduled, loudly.
    fn undeclared(&mut self, name: &VmName) {
        if self.state.deletions.contains_key(name) {
            return;
        }
        let tz = self.zone(name);
        let date = deletion::earliest_date(tz, self.now);
        let schedule = Schedule::new(tz, date);
        self.plan.warnings.push(format!(
            "{name} was removed from the configuration: it is deleted on {date} (shut down at {}); \
             declare it again before {} to keep it",
            rfc3339(schedule.t()),
            rfc3339(schedule.at(Stage::Purge)),
        ));
        self.act(Action::ScheduleDeletion {
            vm: name.clone(),
            date,
            source: DeletionSource::Removed,
        });
        self.timeline(
            name,
            &Schedule::new(self.zone(name), date),
            &DeletionSource::Removed,
            Progress::Scheduled,
        );
    }

    fn timeline(
        &mut self,
        name: &VmName,
        schedule: &Schedule,
        source: &DeletionSource,
        progress: Progress,
    ) {
        let date = schedule.date;
        let mut due = progress.due(schedule, self.now);
        if self
            .state
            .deletions
            .get(name)
            .is_some_and(|d| d.announcement.is_some())
        {
            // The announcement waits for the hook; nothing follows until it is delivered.
            due.clear();
        }
        if let Some(why) = &self.observed.clock_untrusted {
            // A destructive stage waits for a clock that can be trusted.
            for stage in due.iter().filter(|s| s.destructive()) {
                self.plan.held.push(HeldStage {
                    vm: name.clone(),
                    stage: *stage,
                    reason: why.clone(),
                });
            }
            due.retain(|s| !s.destructive());
        }
        let stages = Stage::ALL
            .into_iter()
            .map(|stage| StageAt {
                stage,
                at: schedule.at(stage),
                status: if progress.has_done(stage) {
                    StageStatus::Done
                } else if due.contains(&stage) {
                    StageStatus::Due
                } else {
                    StageStatus::Upcoming
                },
            })
            .collect();
        for stage in due {
            self.act(Action::RunDeletionStage {
                vm: name.clone(),
                stage,
            });
        }
        self.plan.deletions.push(DeletionTimeline {
            vm: name.clone(),
            date,
            source: source.clone(),
            stages,
            cancellable_until: schedule.at(Stage::Purge),
        });
    }
}

/// A maintenance slot a VM holds, with the project it was picked for.
pub type Held = (VmName, ProjectName, Slot);

/// The maintenance slots the state records.
pub fn held_slots(state: &State) -> Vec<Held> {
    state
        .maintenances
        .iter()
        .map(|(vm, m)| {
            let slot = slot_in(chrono_tz::UTC, m.slot_start, m.slot_end);
            (vm.clone(), m.project.clone(), slot)
        })
        .collect()
}

/// The earliest slot for a VM of `project` asked for at `now`, beside the slots `held` by
/// other VMs: within the project's `maxParallel` and the host-wide one.
pub fn pick_slot(
    config: &Config,
    project: &Project,
    held: &[Held],
    now: DateTime<Utc>,
) -> Option<Slot> {
    let own: Vec<Slot> = held
        .iter()
        .filter(|(_, p, _)| *p == project.name)
        .map(|h| h.2)
        .collect();
    let host: Vec<Slot> = held.iter().map(|h| h.2).collect();
    let taken = Taken {
        project: &own,
        host: &host,
        host_max_parallel: config.max_parallel,
    };
    project.maintenance.pick_slot(now, taken)
}

/// A stored slot (UTC) as a window in `tz`.
pub fn slot_in(tz: Tz, start: DateTime<Utc>, end: DateTime<Utc>) -> Window {
    Window {
        start: start.with_timezone(&tz),
        end: end.with_timezone(&tz),
    }
}

#[cfg(test)]
mod tests;

/// VMs that exist but are no longer declared and are not being deleted.
fn undeclared_vms(config: &Config, state: &State) -> Vec<VmName> {
    state
        .vms
        .keys()
        .filter(|n| !config.vms.contains_key(*n) && !state.deletions.contains_key(*n))
        .cloned()
        .collect()
}

/// Held removals that no longer wait for a confirmation: the VM was declared again, its
/// deletion was scheduled, or it is gone. The daemon forgets them (and their confirmations)
/// before it plans.
pub fn released_removal_holds(config: &Config, state: &State) -> Vec<VmName> {
    let removed = undeclared_vms(config, state);
    state
        .removal_held
        .iter()
        .filter(|n| !removed.contains(n))
        .cloned()
        .collect()
}
