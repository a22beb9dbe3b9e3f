//! Configuration: the raw serde mirror of the JSON file (`file`) and its validation
//! (`validate`) into a `Config` whose values obey the platform rules.

mod file;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use chrono::TimeDelta;
use chrono_tz::Tz;

use crate::maintenance::Policy;
use crate::model::{GroupName, ProjectName, VmName, VmSpec};

pub use validate::{DEFAULT_MEMORY_LIMIT_MIB, HUGE_DISK_GIB};
pub use validate::{MAX_CORES, MAX_DISK_GIB, MAX_MEMORY_MIB, MIN_DISK_GIB, MIN_MEMORY_MIB};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The host's zone: the default project's, that of host-wide blackouts, and the one
    /// host-wide output (plan time, `status`) is written in. Anything about a VM uses its
    /// project's zone.
    pub timezone: Tz,
    /// Every project by name, the default project ([`ProjectName::DEFAULT`], made of the
    /// host-wide keys) included.
    pub projects: BTreeMap<ProjectName, Project>,
    /// How many VMs of the host may be in maintenance at once, whatever their project (the
    /// host-wide `maintenance.maxParallel`).
    pub max_parallel: u32,
    /// Members may act on the VMs of every project; without one only root may.
    pub operator_group: Option<GroupName>,
    /// Where `state.json` lives.
    pub state_dir: PathBuf,
    /// QMP sockets, API socket, serial logs.
    pub runtime_dir: PathBuf,
    /// Where the disks live.
    pub ceph: CephConfig,
    /// How VMs are run.
    pub qemu: QemuConfig,
    /// Where the Prometheus metrics are served; off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// The Alertmanager that gets the monitoring downtimes as silences, if any.
    pub alertmanager: Option<AlertmanagerConfig>,
    /// The guard against one deploy removing many VMs.
    pub removal: RemovalGuard,
    /// When the clock counts as right for destructive stages.
    pub clock: ClockConfig,
    /// Declared VMs.
    pub vms: BTreeMap<VmName, VmSpec>,
}

/// At most `max_at_once` VMs are scheduled for deletion because they were removed from the
/// configuration in one change; more are held until confirmed (here or with `vmkeeper
/// confirm-removal`). One accidental deploy must not shut down a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovalGuard {
    /// The most removals scheduled at once without confirmation.
    pub max_at_once: usize,
    /// Removals confirmed in the configuration.
    pub confirmed: std::collections::BTreeSet<VmName>,
}

/// The clock check before destructive deletion stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockConfig {
    /// Whether destructive stages wait for a synchronized clock.
    pub require_sync: bool,
    /// The file whose existence says the clock is synchronized (systemd-timesyncd's).
    pub synced_flag: PathBuf,
}

/// A project (a customer) with every key resolved: its own value, or the host-wide one.
#[derive(Debug, Clone)]
pub struct Project {
    /// Its name.
    pub name: ProjectName,
    /// Windows in the project's zone (`maintenance.tz`), announcement period, the project's
    /// `maxParallel`, and blackouts (the host-wide ones, then its own).
    pub maintenance: Policy,
    /// Technical contacts that its announcements and alarms go to.
    pub contacts: Vec<String>,
    /// Members may reboot, request maintenance for, delete and cancel-delete its VMs.
    pub authorized_group: GroupName,
    /// Hook run with a JSON event on stdin for each of its announcements and alarms.
    pub notify_command: Option<PathBuf>,
}

impl Project {
    /// The zone of its windows, blackouts and deletion dates.
    pub fn tz(&self) -> Tz {
        self.maintenance.tz
    }
}

impl Config {
    /// The default project: VMs that name none, and the host-wide keys.
    pub fn default_project(&self) -> &Project {
        self.projects
            .get(ProjectName::DEFAULT)
            .expect("validation always adds the default project")
    }

    /// The project named `name`; the default project when there is none by that name (a
    /// project removed from the configuration while a VM of it is still on record).
    pub fn project_named(&self, name: &ProjectName) -> &Project {
        self.projects
            .get(name)
            .unwrap_or_else(|| self.default_project())
    }

    /// The project of `vm`: as declared; for a VM no longer declared, the one `recorded`
    /// when it last was (see `State::projects`); otherwise the default project.
    pub fn project_of(&self, vm: &VmName, recorded: Option<&ProjectName>) -> &Project {
        match (self.vms.get(vm), recorded) {
            (Some(spec), _) => self.project_named(&spec.project),
            (None, Some(name)) => self.project_named(name),
            (None, None) => self.default_project(),
        }
    }
}

/// Where Alertmanager's API v2 is: `http://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertmanagerConfig {
    /// The URL as configured, without a trailing `/`.
    pub url: String,
    /// Host name or address to connect to (IPv6 without brackets).
    pub host: String,
    /// TCP port (80 when the URL names none).
    pub port: u16,
    /// Path prefix before `/api/v2` (empty, or e.g. `/alertmanager`), without a trailing `/`.
    pub path: String,
}

/// Ceph connection and pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephConfig {
    /// ceph.conf path.
    pub conf: PathBuf,
    /// Client id without the `client.` prefix.
    pub client_id: String,
    /// Keyring path, when not found through `conf`.
    pub keyring: Option<PathBuf>,
    /// Pool of the VM disks.
    pub pool: String,
    /// The Ceph client QEMU connects as (its own, limited to the pool), without `client.`.
    pub qemu_client_id: String,
    /// A file holding only that client's base64 key (as `ceph auth get-key` writes it),
    /// readable by QEMU's user only; QEMU reads it as a secret object. `None`: QEMU's librados
    /// finds a keyring through `conf` itself.
    pub qemu_key_file: Option<PathBuf>,
}

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation, for hosts whose KVM is unusable.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How QEMU is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// QEMU system emulator binary.
    pub binary: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Machine type.
    pub machine: String,
    /// Grace time for a guest to power off before harder means.
    pub stop_timeout: TimeDelta,
    /// Extra arguments for every VM.
    pub extra_args: Vec<String>,
    /// How many QEMUs may be starting at once (a host start with many VMs starts them a
    /// few at a time).
    pub max_concurrent_starts: usize,
    /// The unprivileged system user every VM's QEMU runs as.
    pub user: String,
}

/// One thing wrong with a configuration, or worth a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field, e.g. `vms.web01.cores`; empty for the document itself.
    pub path: String,
    /// The rule that was broken.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A configuration that validated, with its warnings.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The configuration.
    pub config: Config,
    /// Things allowed but worth saying, e.g. a huge disk.
    pub warnings: Vec<Problem>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but breaks rules; every problem is listed.
    #[error("{} has {} problem(s)", path.display(), problems.len())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem, one per broken rule.
        problems: Vec<Problem>,
    },
}

/// Validates a configuration document.
pub fn parse(text: &str) -> Result<Checked, Vec<Problem>> {
    validate::parse(text)
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Checked, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|problems| LoadError::Invalid {
        path: path.to_owned(),
        problems,
    })
}
