//! Persisted state: what vmkeeper has applied and promised, as versioned JSON replaced
//! atomically (write, fsync, rename, fsync the directory), with intents written first.
//!
//! The format is documented in docs/development/state.md.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::deletion::{Progress, Stage};
use crate::model::{InvocationId, ProjectName, Resources, VmName};

/// The version this build reads and writes. Version 1 (typed-less intents, no instances) is
/// migrated on load: see [`migrate_v1`].
pub const STATE_VERSION: u32 = 2;

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";

/// Everything vmkeeper must remember across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct State {
    /// Format version, [`STATE_VERSION`].
    pub version: u32,
    /// VMs that exist (their disk was created), with what they run with.
    #[serde(default)]
    pub vms: BTreeMap<VmName, VmRecord>,
    /// Announced maintenance reboots, one per VM at most.
    #[serde(default)]
    pub maintenances: BTreeMap<VmName, Maintenance>,
    /// Deletions in progress, kept until the name is free again.
    #[serde(default)]
    pub deletions: BTreeMap<VmName, Deletion>,
    /// What vmkeeper is about to do to a VM, written before doing it.
    #[serde(default)]
    pub intents: BTreeMap<VmName, Intent>,
    /// The kernel boot id when the state was last written; a different one at start means
    /// the host rebooted.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// Notifications decided but not yet delivered to the hook, in order.
    #[serde(default)]
    pub outbox: Vec<Notice>,
    /// The id the next notification gets.
    #[serde(default)]
    pub next_notice: u64,
    /// Names of deleted VMs, with the generation deleted.
    #[serde(default)]
    pub released: BTreeMap<VmName, Released>,
    /// VMs removed from the configuration whose deletion an operator confirmed (when more
    /// were removed at once than the guard allows).
    #[serde(default)]
    pub confirmed_removals: std::collections::BTreeSet<VmName>,
    /// VMs removed from the configuration in one change with more than the guard allows:
    /// held until confirmed one by one (or declared again).
    #[serde(default)]
    pub removal_held: std::collections::BTreeSet<VmName>,
    /// Alertmanager silences created for monitoring downtimes, with their ids, so that a
    /// restart neither creates one twice nor forgets one it must remove.
    #[serde(default)]
    pub silences: Vec<SilenceRecord>,
    /// The project of each VM on record, as it was last declared: a VM removed from the
    /// configuration is deleted in its project's zone and announced to its contacts.
    #[serde(default)]
    pub projects: BTreeMap<VmName, ProjectName>,
}

impl Default for State {
    fn default() -> State {
        State {
            version: STATE_VERSION,
            vms: BTreeMap::new(),
            maintenances: BTreeMap::new(),
            deletions: BTreeMap::new(),
            intents: BTreeMap::new(),
            boot_id: None,
            outbox: Vec::new(),
            next_notice: 1,
            released: BTreeMap::new(),
            confirmed_removals: Default::default(),
            removal_held: Default::default(),
            silences: Vec::new(),
            projects: BTreeMap::new(),
        }
    }
}

impl State {
    /// Queues a notification of `project` for its hook; returns its id.
    pub fn enqueue(
        &mut self,
        project: &ProjectName,
        event: serde_json::Value,
        at: DateTime<Utc>,
    ) -> u64 {
        let id = self.next_notice.max(1);
        self.next_notice = id + 1;
        self.outbox.push(Notice {
            id,
            project: project.clone(),
            event,
            queued_at: at,
            attempts: 0,
            last_error: None,
        });
        id
    }
}

/// A VM whose disk exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmRecord {
    /// What the VM's QEMU was last started with, and its disk size.
    pub applied: Resources,
    /// Whether it was running when last observed.
    pub running: bool,
    /// The QEMU instance that runs (or last ran), as far as vmkeeper knows.
    #[serde(default)]
    pub instance: Option<InvocationId>,
    /// Addresses it holds.
    #[serde(default)]
    pub ip_addresses: Vec<IpAddr>,
    /// The last stop or reset vmkeeper did not plan.
    #[serde(default)]
    pub last_unplanned: Option<Unplanned>,
    /// The QEMU command line the VM was last started with; a VM whose command line would
    /// differ now (new QEMU, new vmkeeper) needs a maintenance reboot.
    #[serde(default)]
    pub argv: Vec<String>,
    /// The RBD id of its image (stable across a move to the trash): the purge trashes and
    /// delete-backups deletes this image and no other.
    #[serde(default)]
    pub image_id: Option<String>,
    /// Which VM of this name it is (`vms.<name>.generation`): a name used again after a
    /// deletion is a new VM only with a higher generation.
    #[serde(default = "first_generation")]
    pub generation: u32,
}

fn first_generation() -> u32 {
    1
}

/// A name whose VM was deleted and released: kept so that a declaration older than the
/// deletion never creates it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Released {
    /// The date T of its deletion.
    pub deleted_on: NaiveDate,
    /// The generation of the VM that was deleted.
    pub generation: u32,
    /// When the name was released.
    pub released_at: DateTime<Utc>,
}

/// What kind of stop or reset vmkeeper did not plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnplannedKind {
    /// The guest rebooted itself (QMP `RESET`, `guest: true`).
    GuestReset,
    /// The guest powered itself off (QMP `SHUTDOWN`, `guest: true`, then QEMU exited).
    GuestPoweroff,
    /// QEMU ended on its own: it crashed, was killed, or exited non-zero.
    QemuExited,
    /// The unit was stopped from outside vmkeeper (`systemctl stop`).
    UnitStopped,
    /// The unit was restarted from outside vmkeeper (`systemctl restart`).
    UnitRestarted,
    /// The host rebooted while the VM ran.
    HostRebooted,
}

impl UnplannedKind {
    /// Every kind, in a fixed order (metrics show each, also at zero).
    pub const ALL: [UnplannedKind; 6] = [
        UnplannedKind::GuestReset,
        UnplannedKind::GuestPoweroff,
        UnplannedKind::QemuExited,
        UnplannedKind::UnitStopped,
        UnplannedKind::UnitRestarted,
        UnplannedKind::HostRebooted,
    ];

    /// The kind's name in the journal (`ACTION=`) and the hook's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            UnplannedKind::GuestReset => "guest-reset",
            UnplannedKind::GuestPoweroff => "guest-poweroff",
            UnplannedKind::QemuExited => "qemu-exited",
            UnplannedKind::UnitStopped => "unit-stopped",
            UnplannedKind::UnitRestarted => "unit-restarted",
            UnplannedKind::HostRebooted => "host-rebooted",
        }
    }
}

impl std::fmt::Display for UnplannedKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stop or reset vmkeeper did not plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Unplanned {
    /// When it was noticed.
    pub at: DateTime<Utc>,
    /// What happened.
    pub kind: UnplannedKind,
    /// Details for humans.
    pub detail: String,
    /// The QEMU instance it happened to; one alarm per instance and kind of end.
    #[serde(default)]
    pub instance: Option<InvocationId>,
}

/// Why a VM needs a maintenance reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", deny_unknown_fields)]
pub enum Reason {
    /// CPU or RAM differ between what runs and what is declared.
    PendingResources {
        /// What runs.
        from: Resources,
        /// What is declared.
        to: Resources,
    },
    /// QEMU runs an outdated binary or command line.
    Outdated {
        /// What changed.
        detail: String,
    },
    /// Someone asked for it.
    Requested {
        /// Who asked (user name).
        by: String,
        /// Why.
        reason: String,
    },
}

/// How late the hook may take an announcement and it still counts as made when decided.
pub const DELIVERY_GRACE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// An announced maintenance reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Maintenance {
    /// Why; several needs merge into one maintenance.
    pub reasons: Vec<Reason>,
    /// Slot start.
    pub slot_start: DateTime<Utc>,
    /// Slot end.
    pub slot_end: DateTime<Utc>,
    /// When it was decided and handed to the hook.
    pub announced_at: DateTime<Utc>,
    /// The announcement waiting for the hook; `None` once delivered (or for a maintenance
    /// recorded before deliveries were tracked).
    #[serde(default)]
    pub notice: Option<u64>,
    /// When the hook took the announcement.
    #[serde(default)]
    pub delivered_at: Option<DateTime<Utc>>,
    /// The project whose windows the slot is in and whose contacts it was announced to
    /// (state written before projects existed: the default project).
    #[serde(default)]
    pub project: ProjectName,
}

impl Maintenance {
    /// When its announcement reached the contacts: `None` while it waits for the hook. A
    /// hook that took it within [`DELIVERY_GRACE`] of the decision delivered it then (the
    /// slot was picked `announceAhead` from the decision).
    pub fn announced(&self) -> Option<DateTime<Utc>> {
        match (self.notice, self.delivered_at) {
            (_, Some(t)) if t - self.announced_at <= DELIVERY_GRACE => Some(self.announced_at),
            (_, Some(t)) => Some(t),
            (None, None) => Some(self.announced_at),
            (Some(_), None) => None,
        }
    }
}

/// Who asked for a deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", deny_unknown_fields)]
pub enum DeletionSource {
    /// `deleteAt` in the configuration.
    Config,
    /// The VM was removed from the configuration.
    Removed,
    /// `vmkeeper delete` by a user.
    Cli {
        /// User name.
        by: String,
    },
}

/// A deletion in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Deletion {
    /// The local date T.
    pub date: NaiveDate,
    /// Who asked.
    pub source: DeletionSource,
    /// When.
    pub requested_at: DateTime<Utc>,
    /// Stages completed.
    pub progress: Progress,
    /// A stage begun but not recorded as complete: finished (never repeated destructively)
    /// at the next start.
    #[serde(default)]
    pub stage_started: Option<Stage>,
    /// Addresses held until the purge.
    #[serde(default)]
    pub ip_addresses: Vec<IpAddr>,
    /// Monitoring downtime recorded at the announcement: from T on, the VM is expected down.
    #[serde(default)]
    pub downtime_from: Option<DateTime<Utc>>,
    /// When each completed stage really ran: later stages keep their spacing from these.
    #[serde(default)]
    pub done_at: BTreeMap<Stage, DateTime<Utc>>,
    /// The id of the image the purge moved to the trash: the only image delete-backups
    /// deletes.
    #[serde(default)]
    pub trashed_image: Option<String>,
    /// The T − 5 announcement waiting for the hook to take it: the stage counts as done once
    /// it has.
    #[serde(default)]
    pub announcement: Option<u64>,
    /// When the stage in `stage_started` began (the instant it was planned for).
    #[serde(default)]
    pub stage_started_at: Option<DateTime<Utc>>,
    /// The generation of the VM being deleted.
    #[serde(default = "first_generation")]
    pub generation: u32,
}

impl Deletion {
    /// The deletion's schedule: its nominal dates, moved by stages that ran late.
    pub fn schedule(&self, tz: chrono_tz::Tz) -> crate::deletion::Schedule {
        let nominal = crate::deletion::Schedule::new(tz, self.date);
        // Stages recorded as done before their instants were kept ran on their dates.
        let mut done = crate::deletion::done_at(&nominal, self.progress);
        done.extend(self.done_at.iter().map(|(s, t)| (*s, *t)));
        nominal.with_done(&done)
    }
}

/// Why a VM's alerts are silenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SilencePurpose {
    /// The VM is being deleted: from T until its name is released.
    Deletion,
    /// An announced maintenance slot, for its duration.
    Maintenance,
}

impl SilencePurpose {
    /// The name in `status`, the journal and the silence's comment.
    pub fn as_str(self) -> &'static str {
        match self {
            SilencePurpose::Deletion => "deletion",
            SilencePurpose::Maintenance => "maintenance",
        }
    }
}

/// A silence vmkeeper created in Alertmanager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SilenceRecord {
    /// The VM whose alerts it silences (matcher `vm="<name>"`).
    pub vm: VmName,
    /// Why.
    pub purpose: SilencePurpose,
    /// Alertmanager's silence id.
    pub id: String,
    /// From.
    pub starts_at: DateTime<Utc>,
    /// Until.
    pub ends_at: DateTime<Utc>,
}

/// Who asked for something vmkeeper does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", deny_unknown_fields)]
pub enum Actor {
    /// vmkeeper itself, following the configuration or its schedule.
    Vmkeeper,
    /// A user of the local API, as the kernel identified them.
    User {
        /// User name (or the uid as text when it has none).
        name: String,
        /// User id.
        uid: u32,
    },
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Vmkeeper => f.write_str("vmkeeper"),
            Actor::User { name, .. } => f.write_str(name),
        }
    }
}

/// Why vmkeeper stops a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", deny_unknown_fields)]
pub enum StopReason {
    /// The VM is declared `online = false`.
    Offline,
    /// A deletion stage shuts it down.
    Deletion {
        /// The stage.
        stage: Stage,
    },
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Offline => f.write_str("online = false"),
            StopReason::Deletion { stage } => write!(f, "deletion ({stage})"),
        }
    }
}

/// Which kind of planned cold reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", deny_unknown_fields)]
pub enum RebootKind {
    /// The announced maintenance whose slot starts then.
    Maintenance {
        /// The slot's start.
        slot_start: DateTime<Utc>,
    },
    /// `vmkeeper reboot NAME --now` by an authorized user.
    Immediate,
}

/// What vmkeeper is about to do to a VM, persisted before it acts. Each variant carries what
/// is needed to finish the step after a crash; `recovery::recover` decides how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "action", deny_unknown_fields)]
pub enum Intent {
    /// Start the VM's QEMU with these resources and this command line.
    #[serde(rename_all = "camelCase")]
    Start {
        /// What it starts with (recorded as applied once it runs).
        resources: Resources,
        /// The command line.
        argv: Vec<String>,
        /// The instance that ran before, if any: a failed unit of that instance is not ours.
        previous: Option<InvocationId>,
        /// When it was written.
        at: DateTime<Utc>,
    },
    /// Stop the VM's QEMU (this instance), gracefully.
    #[serde(rename_all = "camelCase")]
    Stop {
        /// The instance to stop; `None` when none was known.
        instance: Option<InvocationId>,
        /// Why.
        reason: StopReason,
        /// Who asked.
        by: Actor,
        /// When it was written.
        at: DateTime<Utc>,
    },
    /// A planned cold reboot of this instance: stop it, start a new one with `resources`.
    #[serde(rename_all = "camelCase")]
    Reboot {
        /// The instance to stop; `None` when it was not running.
        instance: Option<InvocationId>,
        /// Maintenance or immediate.
        kind: RebootKind,
        /// What the new QEMU starts with.
        resources: Resources,
        /// Its command line.
        argv: Vec<String>,
        /// Who asked.
        by: Actor,
        /// When it was written.
        at: DateTime<Utc>,
    },
}

/// A notification for the hook, kept until the hook took it (exit status 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Notice {
    /// Increasing id; the hook's JSON carries it as `id`, so a receiver can drop a repeat
    /// (delivery is at least once: a crash right after the hook ran repeats it).
    pub id: u64,
    /// The project whose hook gets it (state written before projects existed: the default
    /// project's, which was the host's).
    #[serde(default)]
    pub project: ProjectName,
    /// The JSON event the hook gets on stdin.
    pub event: serde_json::Value,
    /// When it was decided.
    pub queued_at: DateTime<Utc>,
    /// Failed deliveries so far.
    #[serde(default)]
    pub attempts: u32,
    /// Why the last delivery failed.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading the file failed.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid state JSON.
    #[error("{} is not a valid state file", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Written by a version of vmkeeper this one does not understand.
    #[error("{} has format version {found}, this vmkeeper reads version {STATE_VERSION}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Writing failed; the previous state is untouched.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl State {
    /// Reads the state in `dir`; a missing file is an empty state (first start).
    pub fn load(dir: &Path) -> Result<State, StateError> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_str(&text).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
        match v.version {
            STATE_VERSION => {
                serde_json::from_str(&text).map_err(|source| StateError::Parse { path, source })
            }
            1 => {
                let doc: serde_json::Value =
                    serde_json::from_str(&text).map_err(|source| StateError::Parse {
                        path: path.clone(),
                        source,
                    })?;
                serde_json::from_value(migrate_v1(doc))
                    .map_err(|source| StateError::Parse { path, source })
            }
            found => Err(StateError::Version { path, found }),
        }
    }

    /// Replaces the state in `dir` atomically: a crash leaves either the old or the new file.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let mut f = std::fs::File::create(&tmp)?;
            let mut json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
            json.push(b'\n');
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|source| StateError::Write { path, source })
    }
}

/// Version 1 to 2: intents were free text (`action`, `reason`, `by`) and instances unknown.
/// A version-1 intent cannot be finished safely without its instance, so it is dropped: the
/// daemon then treats a VM it finds stopped as stopped unplanned, which errs on the side of an
/// alarm. Unplanned kinds keep their names.
pub fn migrate_v1(mut doc: serde_json::Value) -> serde_json::Value {
    doc["version"] = STATE_VERSION.into();
    if let Some(obj) = doc.as_object_mut() {
        obj.remove("intents");
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        let mut s = State::default();
        let name: VmName = "web01".parse().unwrap();
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let instance: InvocationId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        s.vms.insert(
            name.clone(),
            VmRecord {
                applied: Resources {
                    cores: 2,
                    memory_mib: 2048,
                    disk_gib: 30,
                },
                running: true,
                instance: Some(instance.clone()),
                ip_addresses: vec!["192.0.2.1".parse().unwrap()],
                last_unplanned: Some(Unplanned {
                    at,
                    kind: UnplannedKind::GuestReset,
                    detail: "the guest rebooted itself".into(),
                    instance: Some(instance.clone()),
                }),
                argv: vec![],
                image_id: None,
                generation: 1,
            },
        );
        s.intents.insert(
            name,
            Intent::Stop {
                instance: Some(instance),
                reason: StopReason::Offline,
                by: Actor::User {
                    name: "alice".into(),
                    uid: 1000,
                },
                at,
            },
        );
        s.enqueue(
            &ProjectName::default(),
            serde_json::json!({ "event": "unplanned" }),
            at,
        );
        s
    }

    #[test]
    fn round_trips_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), State::default());
        let s = sample();
        s.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), s);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [STATE_FILE]);
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), r#"{"version": 3}"#).unwrap();
        let e = State::load(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("has format version 3, this vmkeeper reads version 2"),
            "{e}"
        );
        std::fs::write(dir.path().join(STATE_FILE), r#"{"version": 2, "vmz": {}}"#).unwrap();
        assert!(matches!(
            State::load(dir.path()),
            Err(StateError::Parse { .. })
        ));
    }

    #[test]
    fn version_1_is_migrated_and_its_free_text_intents_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"version": 1,
                "vms": {"web01": {"applied": {"cores": 1, "memoryMiB": 1024, "diskGiB": 30},
                                  "running": true,
                                  "lastUnplanned": {"at": "2026-11-29T17:00:00Z", "kind": "guest-reset", "detail": "x"}}},
                "intents": {"web01": {"action": "stop", "reason": "online=false", "by": "vmkeeper", "at": "2026-11-29T17:05:00Z"}},
                "bootId": "b"}"#,
        )
        .unwrap();
        let s = State::load(dir.path()).unwrap();
        assert_eq!(s.version, STATE_VERSION);
        assert!(s.intents.is_empty());
        let r = &s.vms[&"web01".parse::<VmName>().unwrap()];
        assert!(r.running && r.instance.is_none());
        assert_eq!(
            r.last_unplanned.as_ref().unwrap().kind,
            UnplannedKind::GuestReset
        );
    }
}
