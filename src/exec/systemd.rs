//! systemd edge: VM services and vmkeeper's timers as transient units, driven and observed over D-Bus.
//!
//! Every VM runs in a transient service `vmkeeper-vm-<name>.service`, created with
//! `StartTransientUnit` rather than from a template the NixOS module installs: the QEMU command
//! line is computed by the daemon from the configuration, so a template would only be a shell
//! around an `ExecStart` the daemon writes anyway, and transient units leave no files behind.
//! Maintenance and deletion stages are transient timers (`vmkeeper-maint-<name>.timer`,
//! `vmkeeper-delete-<name>-<stage>.timer`), each activating a transient oneshot service of the
//! same name that runs a vmkeeper command. Transient units vanish when the manager restarts
//! (host reboot), which is why the daemon recreates them from its state when it starts.
//!
//! Services are created with `Restart=no` (the daemon decides restarts, with a backoff, and
//! must see every stop) and `CollectMode=inactive`: a service whose process failed stays
//! loaded as `failed` with its `Result` and `ExecMainStatus`, so a daemon that was down when
//! QEMU died still reads how it died; the daemon then calls [`Systemd::reset_failed`] (which
//! also frees the name for a new start). A service that stopped cleanly is unloaded at once.
//!
//! Observation is one `ListUnitsByPatterns` call for all units plus signals
//! ([`Systemd::subscribe`]); no zbus type leaves this module.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zbus::message::Type as MessageType;
use zbus::proxy::CacheProperties;
use zbus::{
    Connection, DBusError, MatchRule, Message, MessageStream, OwnedObjectPath, OwnedVariant,
    Variant,
};

use crate::model::InvocationId;

/// Prefix of every VM service.
pub const VM_UNIT_PREFIX: &str = "vmkeeper-vm-";

/// Unit-name glob that matches every unit vmkeeper creates.
pub const ALL_UNITS_PATTERN: &str = "vmkeeper-*";

const DESTINATION: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER_INTERFACE: &str = "org.freedesktop.systemd1.Manager";
const UNIT_INTERFACE: &str = "org.freedesktop.systemd1.Unit";
const SERVICE_INTERFACE: &str = "org.freedesktop.systemd1.Service";
const TIMER_INTERFACE: &str = "org.freedesktop.systemd1.Timer";
const UNIT_PATH_NAMESPACE: &str = "/org/freedesktop/systemd1/unit";

/// How long a D-Bus method call may take before it fails.
const METHOD_TIMEOUT: Duration = Duration::from_secs(30);

/// Default for how long to wait for a start or stop job to finish. A stop can take as long as
/// the unit's `TimeoutStopUSec` plus the SIGKILL that follows, so this is generous.
const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// Signals queued for one job wait before the connection's reader stalls. A stalled reader
/// also holds back method replies, so this is far above what a busy host emits while one call
/// is in flight.
const JOB_SIGNAL_QUEUE: usize = 4096;

/// Signals queued between the bus and a [`Subscription`] before they are dropped and the
/// subscriber is told to re-list (see [`SystemdEvent::Lagged`]).
const EVENT_QUEUE: usize = 1024;

/// Name of the service that runs VM `vm`.
pub fn vm_unit_name(vm: &str) -> String {
    format!("{VM_UNIT_PREFIX}{vm}.service")
}

/// Name of the timer of VM `vm`'s scheduled maintenance.
pub fn maintenance_timer_name(vm: &str) -> String {
    format!("vmkeeper-maint-{vm}.timer")
}

/// Name of the timer of deletion stage `stage` of VM `vm`.
pub fn deletion_timer_name(vm: &str, stage: &str) -> String {
    format!("vmkeeper-delete-{vm}-{stage}.timer")
}

/// A D-Bus failure, without exposing zbus.
#[derive(Debug)]
pub struct BusError(BusErrorKind);

#[derive(Debug)]
enum BusErrorKind {
    Dbus(zbus::Error),
    JobTimeout(Duration),
    SignalsEnded,
    Invalid(String),
}

impl BusError {
    /// The D-Bus error name of a failed method call, e.g. `org.freedesktop.systemd1.NoSuchUnit`.
    pub fn dbus_name(&self) -> Option<String> {
        match &self.0 {
            BusErrorKind::Dbus(zbus::Error::MethodError(name, _, _)) => Some(name.to_string()),
            BusErrorKind::Dbus(zbus::Error::FDO(e)) => Some(e.name().to_string()),
            _ => None,
        }
    }
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            BusErrorKind::Dbus(zbus::Error::MethodError(name, Some(text), _)) => {
                write!(f, "{text} ({name})")
            }
            BusErrorKind::Dbus(e) => write!(f, "{e}"),
            BusErrorKind::JobTimeout(d) => write!(f, "job did not finish within {d:?}"),
            BusErrorKind::SignalsEnded => write!(f, "the bus connection closed"),
            BusErrorKind::Invalid(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for BusError {}

impl From<zbus::Error> for BusError {
    fn from(e: zbus::Error) -> Self {
        Self(BusErrorKind::Dbus(e))
    }
}

impl From<zbus::fdo::Error> for BusError {
    fn from(e: zbus::fdo::Error) -> Self {
        Self(BusErrorKind::Dbus(zbus::Error::FDO(Box::new(e))))
    }
}

/// A failed systemd operation.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("Cannot connect to the system bus")]
    Connect(#[source] BusError),
    #[error("Cannot start {unit}")]
    Start {
        unit: String,
        #[source]
        source: BusError,
    },
    #[error("Cannot stop {unit}")]
    Stop {
        unit: String,
        #[source]
        source: BusError,
    },
    #[error("Cannot send signal {signal} to {unit}")]
    Kill {
        unit: String,
        signal: i32,
        #[source]
        source: BusError,
    },
    #[error("Cannot reset the failed state of {unit}")]
    ResetFailed {
        unit: String,
        #[source]
        source: BusError,
    },
    #[error("Cannot list units")]
    List(#[source] BusError),
    #[error("Cannot read the properties of {unit}")]
    Properties {
        unit: String,
        #[source]
        source: BusError,
    },
    #[error("Cannot subscribe to systemd's signals")]
    Subscribe(#[source] BusError),
}

impl SystemdError {
    fn bus(&self) -> &BusError {
        match self {
            Self::Connect(source) | Self::List(source) | Self::Subscribe(source) => source,
            Self::Start { source, .. }
            | Self::Stop { source, .. }
            | Self::Kill { source, .. }
            | Self::ResetFailed { source, .. }
            | Self::Properties { source, .. } => source,
        }
    }

    /// The unit is not loaded (never started, or already stopped and collected).
    pub fn is_no_such_unit(&self) -> bool {
        self.bus().dbus_name().as_deref() == Some("org.freedesktop.systemd1.NoSuchUnit")
    }

    /// A transient unit of that name is still loaded, typically `failed` and waiting for
    /// [`Systemd::reset_failed`].
    pub fn is_unit_exists(&self) -> bool {
        self.bus().dbus_name().as_deref() == Some("org.freedesktop.systemd1.UnitExists")
    }
}

/// A value of a unit property, in the D-Bus type systemd expects for that property
/// (see `org.freedesktop.systemd1(5)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertyValue {
    /// `b`
    Bool(bool),
    /// `s`
    Str(String),
    /// `as`
    Strs(Vec<String>),
    /// `t`
    U64(u64),
    /// `u`, e.g. `UMask`
    U32(u32),
    /// `i`
    I32(i32),
    /// `a(ss)`, e.g. `DeviceAllow`
    Pairs(Vec<(String, String)>),
    /// `(bas)`, e.g. `SystemCallFilter` and `RestrictAddressFamilies` (allow-list when true)
    FlaggedStrs(bool, Vec<String>),
    /// `a(ssbt)`, `BindPaths` and `BindReadOnlyPaths`: source, destination, whether a missing
    /// source is ignored, mount flags (`MS_REC` = recursive)
    Binds(Vec<(String, String, bool, u64)>),
}

impl PropertyValue {
    fn to_variant(&self) -> Variant<'static> {
        match self {
            Self::Bool(b) => Variant::from(*b),
            Self::Str(s) => Variant::from(s.clone()),
            Self::Strs(v) => Variant::from(v.clone()),
            Self::U64(n) => Variant::from(*n),
            Self::U32(n) => Variant::from(*n),
            Self::I32(n) => Variant::from(*n),
            Self::Pairs(v) => Variant::from(v.clone()),
            Self::FlaggedStrs(b, v) => Variant::from((*b, v.clone())),
            Self::Binds(v) => Variant::from(v.clone()),
        }
    }
}

/// Which processes of a unit get the stop signal first (`KillMode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillMode {
    /// SIGTERM to the main process only, SIGKILL to every remaining process after the timeout.
    Mixed,
    /// SIGTERM to every process of the unit.
    ControlGroup,
}

impl KillMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Mixed => "mixed",
            Self::ControlGroup => "control-group",
        }
    }
}

/// What systemd does when the unit is stopped; the daemon's graceful QMP shutdown comes first,
/// so this is the fallback for a QEMU that does not exit by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopPolicy {
    pub kill_mode: KillMode,
    /// Signal sent first (`KillSignal=`).
    pub signal: i32,
    /// Time from the first signal to SIGKILL (`TimeoutStopUSec=`).
    pub timeout: Duration,
    /// Whether SIGKILL follows the timeout (`SendSIGKILL=`).
    pub send_sigkill: bool,
}

impl Default for StopPolicy {
    fn default() -> Self {
        Self {
            kill_mode: KillMode::Mixed,
            signal: libc::SIGTERM,
            timeout: Duration::from_secs(30),
            send_sigkill: true,
        }
    }
}

/// A long-running transient service, such as a VM's QEMU.
///
/// Fixed for every service: `Type=exec` (the start job fails when the program cannot be
/// executed), `Restart=no` and `CollectMode=inactive` (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransientService {
    /// Unit name, ending in `.service`.
    pub name: String,
    pub description: String,
    /// Program and arguments; `argv[0]` must be an absolute path.
    pub argv: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub working_directory: Option<PathBuf>,
    pub stop: StopPolicy,
    /// Further properties, e.g. the hardening the daemon applies.
    pub properties: Vec<(String, PropertyValue)>,
}

impl TransientService {
    pub fn new(name: impl Into<String>, description: impl Into<String>, argv: Vec<String>) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            argv,
            environment: Vec::new(),
            working_directory: None,
            stop: StopPolicy::default(),
            properties: Vec::new(),
        }
    }

    fn to_properties(&self) -> Result<Vec<(String, Variant<'static>)>, BusError> {
        check_suffix(&self.name, ".service")?;
        let mut props = vec![
            prop("Description", Variant::from(self.description.clone())),
            prop("ExecStart", exec_start(&self.argv)?),
            prop("Type", Variant::from("exec")),
            prop("Restart", Variant::from("no")),
            prop("CollectMode", Variant::from("inactive")),
            prop("KillMode", Variant::from(self.stop.kill_mode.as_str())),
            prop("KillSignal", Variant::from(self.stop.signal)),
            prop("TimeoutStopUSec", Variant::from(usec(self.stop.timeout))),
            prop("SendSIGKILL", Variant::from(self.stop.send_sigkill)),
        ];
        if !self.environment.is_empty() {
            props.push(prop("Environment", environment(&self.environment)));
        }
        if let Some(dir) = &self.working_directory {
            let dir = dir
                .to_str()
                .ok_or_else(|| invalid("working directory is not UTF-8"))?;
            props.push(prop("WorkingDirectory", Variant::from(dir.to_owned())));
        }
        props.extend(
            self.properties
                .iter()
                .map(|(k, v)| (k.clone(), v.to_variant())),
        );
        Ok(props)
    }
}

/// When a timer elapses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerTrigger {
    /// At a wall-clock instant (`OnCalendar=`, whole seconds, in UTC). An instant already past
    /// never elapses: the daemon runs overdue stages itself.
    At(DateTime<Utc>),
    /// This long after the timer starts (`OnActiveSec=`).
    AfterStart(Duration),
}

/// A transient timer and the oneshot service of the same name that it activates.
///
/// The timer is not persistent (`Persistent=no`): the daemon recreates timers from its state
/// when it starts and catches up overdue work itself. It is unloaded once it has elapsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransientTimer {
    /// Unit name, ending in `.timer`.
    pub name: String,
    pub description: String,
    pub trigger: TimerTrigger,
    /// Command the activated service runs; `argv[0]` must be an absolute path.
    pub argv: Vec<String>,
    pub environment: Vec<(String, String)>,
}

impl TransientTimer {
    /// Name of the service the timer activates.
    pub fn service_name(&self) -> String {
        let stem = self.name.strip_suffix(".timer").unwrap_or(&self.name);
        format!("{stem}.service")
    }

    fn to_properties(&self) -> Result<Vec<(String, Variant<'static>)>, BusError> {
        check_suffix(&self.name, ".timer")?;
        let mut props = vec![
            prop("Description", Variant::from(self.description.clone())),
            prop("AccuracyUSec", Variant::from(1_000_000u64)),
            prop("RemainAfterElapse", Variant::from(false)),
            prop("Persistent", Variant::from(false)),
        ];
        props.push(match self.trigger {
            TimerTrigger::At(at) => prop(
                "OnCalendar",
                Variant::from(at.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
            ),
            TimerTrigger::AfterStart(after) => prop("OnActiveSec", Variant::from(usec(after))),
        });
        Ok(props)
    }

    fn service_properties(&self) -> Result<Vec<(String, Variant<'static>)>, BusError> {
        let mut props = vec![
            prop("Description", Variant::from(self.description.clone())),
            prop("ExecStart", exec_start(&self.argv)?),
            prop("Type", Variant::from("oneshot")),
            prop("CollectMode", Variant::from("inactive")),
        ];
        if !self.environment.is_empty() {
            props.push(prop("Environment", environment(&self.environment)));
        }
        Ok(props)
    }
}

/// Outcome of a start or stop job (the `result` of systemd's `JobRemoved` signal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    Done,
    Canceled,
    Timeout,
    Failed,
    Dependency,
    Skipped,
    Other(String),
}

impl JobResult {
    fn parse(s: &str) -> Self {
        match s {
            "done" => Self::Done,
            "canceled" => Self::Canceled,
            "timeout" => Self::Timeout,
            "failed" => Self::Failed,
            "dependency" => Self::Dependency,
            "skipped" => Self::Skipped,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// A unit's `ActiveState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActiveState {
    Active,
    Reloading,
    Inactive,
    Failed,
    Activating,
    Deactivating,
    Other(String),
}

impl ActiveState {
    fn parse(s: &str) -> Self {
        match s {
            "active" => Self::Active,
            "reloading" => Self::Reloading,
            "inactive" => Self::Inactive,
            "failed" => Self::Failed,
            "activating" => Self::Activating,
            "deactivating" => Self::Deactivating,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// One row of [`Systemd::list_units`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitInfo {
    pub name: String,
    pub description: String,
    pub load_state: String,
    pub active_state: ActiveState,
    pub sub_state: String,
    /// Id of the job queued for the unit, if any (a start or stop in progress).
    pub job_id: Option<u32>,
}

/// How a service's main process ended (`ExecMainCode` and `ExecMainStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MainExit {
    /// Still running, or never ran.
    None,
    /// Exited with this status.
    Exited(i32),
    /// Killed by this signal.
    Killed(i32),
    /// Killed by this signal and dumped core.
    Dumped(i32),
}

/// The state of one service, for adopting it or learning how it died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDetails {
    pub active_state: ActiveState,
    pub sub_state: String,
    pub main_pid: Option<u32>,
    pub main_exit: MainExit,
    /// `Result`: `success`, `exit-code`, `signal`, `core-dump`, `timeout`, ...
    pub result: String,
    /// The unit's `InvocationID`, new for every start; `None` for a unit never started.
    pub invocation_id: Option<InvocationId>,
    pub active_enter: Option<DateTime<Utc>>,
    pub inactive_enter: Option<DateTime<Utc>>,
    pub n_restarts: u32,
}

/// One timer of [`Systemd::list_timers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerInfo {
    pub name: String,
    pub active_state: ActiveState,
    /// The unit it activates.
    pub unit: String,
    pub next_elapse: Option<DateTime<Utc>>,
    pub last_trigger: Option<DateTime<Utc>>,
}

/// Processes of a unit that [`Systemd::kill_unit`] signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillWhom {
    Main,
    All,
}

/// A change systemd announced for a unit that matched the subscription's prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemdEvent {
    /// The unit's `ActiveState`/`SubState` changed (for example an outside `systemctl stop`).
    /// `invocation` is the run the change is about (systemd sends `InvocationID` with every
    /// change of the unit's state), `None` when the signal did not carry it.
    UnitStateChanged {
        unit: String,
        invocation: Option<InvocationId>,
        active_state: ActiveState,
        sub_state: String,
    },
    /// A job for the unit finished.
    JobRemoved {
        unit: String,
        job_id: u32,
        result: JobResult,
    },
    /// The unit was loaded.
    UnitNew { unit: String },
    /// The unit was unloaded (collected).
    UnitRemoved { unit: String },
    /// Events were dropped because the subscriber fell behind: list the units again.
    Lagged,
}

/// A stream of [`SystemdEvent`]s; ends when the bus connection closes.
pub struct Subscription {
    events: mpsc::Receiver<SystemdEvent>,
    forwarder: JoinHandle<()>,
}

impl Subscription {
    /// The next event, or `None` once the connection to systemd is gone (reconnect and re-list).
    pub async fn next(&mut self) -> Option<SystemdEvent> {
        self.events.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

type UnitRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    OwnedObjectPath,
    u32,
    String,
    OwnedObjectPath,
);

type Properties = Vec<(String, Variant<'static>)>;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(String, Variant<'_>)],
        aux: &[(String, Properties)],
    ) -> zbus::Result<OwnedObjectPath>;

    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;

    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;

    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<Vec<UnitRow>>;

    fn subscribe(&self) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.DBus.Properties",
    default_service = "org.freedesktop.systemd1"
)]
trait Properties {
    fn get_all(&self, interface: &str) -> zbus::Result<HashMap<String, OwnedVariant>>;
}

/// A connection to systemd's manager on the system bus.
#[derive(Clone)]
pub struct Systemd {
    conn: Connection,
    manager: ManagerProxy<'static>,
    job_timeout: Duration,
}

impl fmt::Debug for Systemd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Systemd")
            .field("job_timeout", &self.job_timeout)
            .finish_non_exhaustive()
    }
}

impl Systemd {
    /// Connects to the bus at `address` (a D-Bus address such as
    /// `unix:path=/run/dbus/system_bus_socket`), or to the system bus (honouring
    /// `DBUS_SYSTEM_BUS_ADDRESS`) when `None`.
    pub async fn connect(address: Option<&str>) -> Result<Self, SystemdError> {
        let connect = async {
            let builder = match address {
                Some(address) => zbus::connection::Builder::address(address),
                None => zbus::connection::Builder::system(),
            };
            let conn = builder.method_timeout(METHOD_TIMEOUT).build().await?;
            let manager = ManagerProxy::builder(&conn)
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            Ok::<_, zbus::Error>(Self {
                conn,
                manager,
                job_timeout: DEFAULT_JOB_TIMEOUT,
            })
        };
        connect.await.map_err(|e| SystemdError::Connect(e.into()))
    }

    /// Sets how long start and stop wait for their job to finish.
    pub fn with_job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    /// Creates and starts a transient service and waits for its start job. With `Type=exec`
    /// the job is done once the program was executed; a program that cannot be executed
    /// gives [`JobResult::Failed`].
    pub async fn start_service(
        &self,
        service: &TransientService,
    ) -> Result<JobResult, SystemdError> {
        let start = async {
            let props = service.to_properties()?;
            self.run_job(
                self.manager
                    .start_transient_unit(&service.name, "fail", &props, &[]),
            )
            .await
        };
        start.await.map_err(|source| SystemdError::Start {
            unit: service.name.clone(),
            source,
        })
    }

    /// Creates and starts a transient timer with its service and waits for the timer's start.
    pub async fn start_timer(&self, timer: &TransientTimer) -> Result<JobResult, SystemdError> {
        let start = async {
            let props = timer.to_properties()?;
            let aux = [(timer.service_name(), timer.service_properties()?)];
            self.run_job(
                self.manager
                    .start_transient_unit(&timer.name, "fail", &props, &aux),
            )
            .await
        };
        start.await.map_err(|source| SystemdError::Start {
            unit: timer.name.clone(),
            source,
        })
    }

    /// Stops a unit and waits for the stop job. A unit that is not loaded gives an error for
    /// which [`SystemdError::is_no_such_unit`] holds.
    pub async fn stop_unit(&self, unit: &str) -> Result<JobResult, SystemdError> {
        self.run_job(self.manager.stop_unit(unit, "replace"))
            .await
            .map_err(|source| SystemdError::Stop {
                unit: unit.to_owned(),
                source,
            })
    }

    /// Sends `signal` to the unit's processes without changing its desired state.
    pub async fn kill_unit(
        &self,
        unit: &str,
        whom: KillWhom,
        signal: i32,
    ) -> Result<(), SystemdError> {
        let whom = match whom {
            KillWhom::Main => "main",
            KillWhom::All => "all",
        };
        self.manager
            .kill_unit(unit, whom, signal)
            .await
            .map_err(|e| SystemdError::Kill {
                unit: unit.to_owned(),
                signal,
                source: e.into(),
            })
    }

    /// Forgets a unit's failed state; a failed transient unit is then collected.
    pub async fn reset_failed(&self, unit: &str) -> Result<(), SystemdError> {
        self.manager
            .reset_failed_unit(unit)
            .await
            .map_err(|e| SystemdError::ResetFailed {
                unit: unit.to_owned(),
                source: e.into(),
            })
    }

    /// All loaded units whose names match one of the globs, in one D-Bus call.
    pub async fn list_units(&self, patterns: &[&str]) -> Result<Vec<UnitInfo>, SystemdError> {
        let rows = self
            .manager
            .list_units_by_patterns(&[], patterns)
            .await
            .map_err(|e| SystemdError::List(e.into()))?;
        Ok(rows
            .into_iter()
            .map(
                |(name, description, load_state, active, sub_state, _, _, job_id, _, _)| UnitInfo {
                    name,
                    description,
                    load_state,
                    active_state: ActiveState::parse(&active),
                    sub_state,
                    job_id: (job_id != 0).then_some(job_id),
                },
            )
            .collect())
    }

    /// Main process, exit and timestamps of one loaded service (two D-Bus calls).
    pub async fn service_details(&self, unit: &str) -> Result<ServiceDetails, SystemdError> {
        let read = async {
            let path = self.manager.get_unit(unit).await?;
            let props = self.properties_of(path).await?;
            let u = props.get_all(UNIT_INTERFACE).await?;
            let s = props.get_all(SERVICE_INTERFACE).await?;
            let main_pid: u32 = get(&s, "MainPID")?;
            let status: i32 = get(&s, "ExecMainStatus")?;
            // ExecMainCode is a waitid() si_code: CLD_EXITED, CLD_KILLED, CLD_DUMPED.
            let main_exit = match get::<i32>(&s, "ExecMainCode")? {
                libc::CLD_EXITED => MainExit::Exited(status),
                libc::CLD_KILLED => MainExit::Killed(status),
                libc::CLD_DUMPED => MainExit::Dumped(status),
                _ => MainExit::None,
            };
            let invocation: Vec<u8> = get(&u, "InvocationID")?;
            Ok::<_, BusError>(ServiceDetails {
                active_state: ActiveState::parse(&get::<String>(&u, "ActiveState")?),
                sub_state: get(&u, "SubState")?,
                main_pid: (main_pid != 0).then_some(main_pid),
                main_exit,
                result: get(&s, "Result")?,
                invocation_id: InvocationId::from_bytes(&invocation),
                active_enter: timestamp(get(&u, "ActiveEnterTimestamp")?),
                inactive_enter: timestamp(get(&u, "InactiveEnterTimestamp")?),
                n_restarts: get(&s, "NRestarts")?,
            })
        };
        read.await.map_err(|source| SystemdError::Properties {
            unit: unit.to_owned(),
            source,
        })
    }

    /// Loaded timers whose names match one of the globs, with their next elapse: one call to
    /// list them and one per timer for its properties.
    pub async fn list_timers(&self, patterns: &[&str]) -> Result<Vec<TimerInfo>, SystemdError> {
        let rows = self
            .manager
            .list_units_by_patterns(&[], patterns)
            .await
            .map_err(|e| SystemdError::List(e.into()))?;
        let mut timers = Vec::new();
        for (name, _, _, active, _, _, path, _, _, _) in rows {
            if !name.ends_with(".timer") {
                continue;
            }
            let read = async {
                let t = self
                    .properties_of(path)
                    .await?
                    .get_all(TIMER_INTERFACE)
                    .await?;
                let unit: String = get(&t, "Unit")?;
                let next: u64 = get(&t, "NextElapseUSecRealtime")?;
                let last: u64 = get(&t, "LastTriggerUSec")?;
                Ok::<_, BusError>((unit, next, last))
            };
            match read.await {
                Ok((unit, next, last)) => timers.push(TimerInfo {
                    name,
                    active_state: ActiveState::parse(&active),
                    unit,
                    next_elapse: timestamp(next),
                    last_trigger: timestamp(last),
                }),
                // Collected between the listing and the read: it has elapsed, so skip it.
                Err(e)
                    if e.dbus_name().as_deref()
                        == Some("org.freedesktop.DBus.Error.UnknownObject") => {}
                Err(source) => return Err(SystemdError::Properties { unit: name, source }),
            }
        }
        Ok(timers)
    }

    /// Follows systemd's signals for units whose names start with one of `prefixes` (all
    /// units when empty). Subscribe before listing, so that no change falls between the list
    /// and the first event.
    ///
    /// Unit state changes come from one match rule on `PropertiesChanged` of the `Unit`
    /// interface under `/org/freedesktop/systemd1/unit` (a path namespace), filtered here by
    /// name: D-Bus match rules cannot match an object-path prefix, and per-unit rules would
    /// have to be added as units appear, missing the first changes of a new unit. Manager
    /// signals (`JobRemoved`, `UnitNew`, `UnitRemoved`) come from a second rule.
    pub async fn subscribe(&self, prefixes: &[&str]) -> Result<Subscription, SystemdError> {
        let open = async {
            let manager_rule = MatchRule::builder()
                .msg_type(MessageType::Signal)
                .sender(DESTINATION)
                .path(MANAGER_PATH)
                .interface(MANAGER_INTERFACE)
                .build()?;
            let unit_rule = MatchRule::builder()
                .msg_type(MessageType::Signal)
                .sender(DESTINATION)
                .path_namespace(UNIT_PATH_NAMESPACE)
                .interface("org.freedesktop.DBus.Properties")
                .member("PropertiesChanged")
                .arg(0, UNIT_INTERFACE)
                .build()?;
            let queue = NonZeroUsize::new(EVENT_QUEUE);
            let manager_signals =
                MessageStream::for_match_rule(manager_rule, &self.conn, queue).await?;
            let unit_signals = MessageStream::for_match_rule(unit_rule, &self.conn, queue).await?;
            // Without a subscriber systemd emits no unit signals at all.
            match self.manager.subscribe().await {
                Err(zbus::Error::MethodError(name, _, _))
                    if name.as_str() == "org.freedesktop.systemd1.AlreadySubscribed" => {}
                other => other?,
            }
            Ok::<_, zbus::Error>((manager_signals, unit_signals))
        };
        let (manager_signals, unit_signals) =
            open.await.map_err(|e| SystemdError::Subscribe(e.into()))?;
        let prefixes = prefixes.iter().map(|p| (*p).to_owned()).collect();
        let (tx, events) = mpsc::channel(EVENT_QUEUE);
        let forwarder = tokio::spawn(forward(manager_signals, unit_signals, prefixes, tx));
        Ok(Subscription { events, forwarder })
    }

    async fn properties_of(&self, path: OwnedObjectPath) -> zbus::Result<PropertiesProxy<'static>> {
        PropertiesProxy::builder(&self.conn)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await
    }

    /// Runs a method that queues a job and waits for that job's `JobRemoved` signal. The
    /// signal stream is opened before the call, since the job can finish before the reply
    /// reaches us.
    async fn run_job(
        &self,
        call: impl Future<Output = zbus::Result<OwnedObjectPath>>,
    ) -> Result<JobResult, BusError> {
        let rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(DESTINATION)
            .path(MANAGER_PATH)
            .interface(MANAGER_INTERFACE)
            .member("JobRemoved")
            .build()?;
        let mut removed =
            MessageStream::for_match_rule(rule, &self.conn, NonZeroUsize::new(JOB_SIGNAL_QUEUE))
                .await?;
        let job = call.await?;
        let wait = async {
            while let Some(msg) = removed.next().await {
                let (_, path, _, result): (u32, OwnedObjectPath, String, String) =
                    msg?.body().deserialize()?;
                if path == job {
                    return Ok(JobResult::parse(&result));
                }
            }
            Err(BusError(BusErrorKind::SignalsEnded))
        };
        tokio::time::timeout(self.job_timeout, wait)
            .await
            .unwrap_or(Err(BusError(BusErrorKind::JobTimeout(self.job_timeout))))
    }
}

/// Turns signals into events until the connection or the subscriber goes away.
async fn forward(
    mut manager_signals: MessageStream,
    mut unit_signals: MessageStream,
    prefixes: Vec<String>,
    tx: mpsc::Sender<SystemdEvent>,
) {
    let mut lagged = false;
    loop {
        let msg = tokio::select! {
            msg = manager_signals.next() => msg,
            msg = unit_signals.next() => msg,
            () = tx.closed() => return,
        };
        let Some(Ok(msg)) = msg else { return };
        let Some(event) = to_event(&msg) else {
            continue;
        };
        let unit = match &event {
            SystemdEvent::UnitStateChanged { unit, .. }
            | SystemdEvent::JobRemoved { unit, .. }
            | SystemdEvent::UnitNew { unit }
            | SystemdEvent::UnitRemoved { unit } => unit,
            SystemdEvent::Lagged => continue,
        };
        if !prefixes.is_empty() && !prefixes.iter().any(|p| unit.starts_with(p.as_str())) {
            continue;
        }
        // Never block here: a stalled stream stalls the connection's reader and with it every
        // method reply. A full queue drops events and tells the subscriber to re-list instead.
        if lagged {
            match tx.try_send(SystemdEvent::Lagged) {
                Ok(()) => lagged = false,
                Err(mpsc::error::TrySendError::Full(_)) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        match tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => lagged = true,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

fn to_event(msg: &Message) -> Option<SystemdEvent> {
    let header = msg.header();
    match header.member()?.as_str() {
        "PropertiesChanged" => {
            let unit = unit_name_from_path(header.path()?.as_str())?;
            let (_, changed, _): (String, HashMap<String, OwnedVariant>, Vec<String>) =
                msg.body().deserialize().ok()?;
            let active: String = get(&changed, "ActiveState").ok()?;
            let sub_state: String = get(&changed, "SubState").unwrap_or_default();
            let invocation = get::<Vec<u8>>(&changed, "InvocationID")
                .ok()
                .and_then(|b| InvocationId::from_bytes(&b));
            Some(SystemdEvent::UnitStateChanged {
                unit,
                invocation,
                active_state: ActiveState::parse(&active),
                sub_state,
            })
        }
        "JobRemoved" => {
            let (job_id, _, unit, result): (u32, OwnedObjectPath, String, String) =
                msg.body().deserialize().ok()?;
            Some(SystemdEvent::JobRemoved {
                unit,
                job_id,
                result: JobResult::parse(&result),
            })
        }
        "UnitNew" => {
            let (unit, _): (String, OwnedObjectPath) = msg.body().deserialize().ok()?;
            Some(SystemdEvent::UnitNew { unit })
        }
        "UnitRemoved" => {
            let (unit, _): (String, OwnedObjectPath) = msg.body().deserialize().ok()?;
            Some(SystemdEvent::UnitRemoved { unit })
        }
        _ => None,
    }
}

/// Unit name from its object path: systemd escapes every byte outside `[A-Za-z0-9]` of the
/// name as `_` and two hex digits.
fn unit_name_from_path(path: &str) -> Option<String> {
    let label = path.strip_prefix(UNIT_PATH_NAMESPACE)?.strip_prefix('/')?;
    let bytes = label.as_bytes();
    let mut name = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            name.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            name.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(name).ok()
}

fn get<T>(props: &HashMap<String, OwnedVariant>, key: &str) -> Result<T, BusError>
where
    T: TryFrom<OwnedVariant>,
{
    let value = props
        .get(key)
        .ok_or_else(|| invalid(format!("property {key} is missing")))?;
    let value = value.try_clone()?;
    T::try_from(value).map_err(|_| invalid(format!("property {key} has an unexpected type")))
}

fn prop(name: &str, value: Variant<'static>) -> (String, Variant<'static>) {
    (name.to_owned(), value)
}

fn exec_start(argv: &[String]) -> Result<Variant<'static>, BusError> {
    let program = argv.first().ok_or_else(|| invalid("empty command line"))?;
    if !program.starts_with('/') {
        return Err(invalid(format!(
            "program {program} is not an absolute path"
        )));
    }
    // a(sasb): path, argv, ignore-failure
    Ok(Variant::from(vec![(program.clone(), argv.to_vec(), false)]))
}

fn environment(vars: &[(String, String)]) -> Variant<'static> {
    Variant::from(
        vars.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
    )
}

fn check_suffix(name: &str, suffix: &str) -> Result<(), BusError> {
    if name.ends_with(suffix) && name.len() > suffix.len() {
        Ok(())
    } else {
        Err(invalid(format!(
            "unit name {name} does not end in {suffix}"
        )))
    }
}

fn invalid(why: impl Into<String>) -> BusError {
    BusError(BusErrorKind::Invalid(why.into()))
}

fn usec(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// systemd's realtime microseconds; 0 and `u64::MAX` mean "never".
fn timestamp(usec: u64) -> Option<DateTime<Utc>> {
    if usec == 0 || usec == u64::MAX {
        return None;
    }
    DateTime::from_timestamp_micros(i64::try_from(usec).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_round_trip_through_object_paths() {
        let path = "/org/freedesktop/systemd1/unit/vmkeeper_2dvm_2dweb01_2eservice";
        assert_eq!(
            unit_name_from_path(path).as_deref(),
            Some("vmkeeper-vm-web01.service")
        );
        assert_eq!(
            unit_name_from_path("/org/freedesktop/systemd1/unit/bad_2"),
            None
        );
        assert_eq!(
            unit_name_from_path("/org/freedesktop/systemd1/job/12"),
            None
        );
    }

    #[test]
    fn timer_service_shares_the_timer_stem() {
        let timer = TransientTimer {
            name: deletion_timer_name("web01", "trash"),
            description: String::new(),
            trigger: TimerTrigger::AfterStart(Duration::from_secs(1)),
            argv: vec!["/bin/true".into()],
            environment: Vec::new(),
        };
        assert_eq!(timer.name, "vmkeeper-delete-web01-trash.timer");
        assert_eq!(timer.service_name(), "vmkeeper-delete-web01-trash.service");
    }

    #[test]
    fn relative_programs_and_wrong_suffixes_are_refused() {
        let service = TransientService::new("x.service", "", vec!["qemu".into()]);
        assert!(service.to_properties().is_err());
        let service = TransientService::new("x.timer", "", vec!["/bin/true".into()]);
        assert!(service.to_properties().is_err());
    }

    #[test]
    fn never_is_none() {
        assert_eq!(timestamp(0), None);
        assert_eq!(timestamp(u64::MAX), None);
        assert_eq!(timestamp(1_000_000).map(|t| t.timestamp()), Some(1));
    }
}
