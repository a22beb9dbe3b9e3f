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
use crate::model::{Resources, VmName};

/// The version this build reads and writes.
pub const STATE_VERSION: u32 = 1;

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
        }
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
}

/// A stop or reset vmkeeper did not plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Unplanned {
    /// When it was noticed.
    pub at: DateTime<Utc>,
    /// What happened, e.g. `guest-reset`, `qemu-exited`, `unit-stopped`, `host-rebooted`.
    pub kind: String,
    /// Details for humans.
    pub detail: String,
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
    /// When it was announced.
    pub announced_at: DateTime<Utc>,
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
}

/// What vmkeeper is about to do, persisted before it acts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Intent {
    /// The action, e.g. `stop`, `reboot`, `start`.
    pub action: String,
    /// Why, e.g. `maintenance`, `online=false`, `deletion`.
    pub reason: String,
    /// Who asked: `vmkeeper` or a user name.
    pub by: String,
    /// When it was written.
    pub at: DateTime<Utc>,
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
        if v.version != STATE_VERSION {
            return Err(StateError::Version {
                path,
                found: v.version,
            });
        }
        serde_json::from_str(&text).map_err(|source| StateError::Parse { path, source })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        let mut s = State::default();
        let name: VmName = "web01".parse().unwrap();
        s.vms.insert(
            name.clone(),
            VmRecord {
                applied: Resources {
                    cores: 2,
                    memory_mib: 2048,
                    disk_gib: 30,
                },
                running: true,
                ip_addresses: vec!["192.0.2.1".parse().unwrap()],
                last_unplanned: None,
                argv: vec![],
            },
        );
        s.intents.insert(
            name,
            Intent {
                action: "stop".into(),
                reason: "online=false".into(),
                by: "vmkeeper".into(),
                at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            },
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
        std::fs::write(dir.path().join(STATE_FILE), r#"{"version": 2}"#).unwrap();
        let e = State::load(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("has format version 2, this vmkeeper reads version 1"),
            "{e}"
        );
        std::fs::write(dir.path().join(STATE_FILE), r#"{"version": 1, "vmz": {}}"#).unwrap();
        assert!(matches!(
            State::load(dir.path()),
            Err(StateError::Parse { .. })
        ));
    }
}
