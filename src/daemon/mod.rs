//! The supervisor loop: the only place that reads the clock and carries out plans.
//!
//! One task owns the state. Everything that happens — a systemd signal, a QMP event, an API
//! request, SIGHUP, a tick — arrives on one channel and is handled in turn; after each, the
//! daemon observes the units with one D-Bus call, plans, and applies the plan's actions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

mod deletion;
mod maintenance;

use crate::api::{self, Caller, Request, Response};
use crate::config::{self, Config};
use crate::events::Event;
use crate::exec::notify::Notifier;
use crate::exec::qmp::{Qmp, QmpEvent};
use crate::exec::rbd::{Cluster, ClusterOptions};
use crate::exec::systemd::{
    self, ActiveState, MainExit, PropertyValue, StopPolicy, Systemd, SystemdEvent, TransientService,
};
use crate::localtime::rfc3339;
use crate::maintenance::Slot;
use crate::model::{GIB, Resources, VmName, VmSpec};
use crate::plan::{self, Action, Observed, ObservedVm, Plan};
use crate::render::{self, ROOT_NODE, VmPaths};
use crate::state::{Intent, Reason, State, Unplanned, VmRecord};

/// A safety net under the signal-driven loop: one full reconcile at least this often.
const TICK: Duration = Duration::from_secs(60);
/// A guest reboot gives two RESET events (kernel, then firmware); one alarm covers both.
const RESET_DEBOUNCE: Duration = Duration::from_secs(10);
/// First delay before restarting a VM that keeps failing; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(2);
/// Longest delay between restart attempts of a failing VM.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long QEMU gets to exit after `quit` before systemd stops the unit.
const QUIT_GRACE: Duration = Duration::from_secs(10);
/// How long a newly started QEMU gets to create its QMP socket.
const QMP_APPEAR: Duration = Duration::from_secs(15);

/// Something the loop reacts to.
#[derive(Debug)]
enum Wake {
    Systemd(SystemdEvent),
    SystemdGone,
    Qmp(VmName, QmpEvent),
    QmpGone(VmName),
    Api(Request, Caller, oneshot::Sender<Response>),
    Reload,
    Terminate,
}

/// What the daemon keeps in memory about a VM (not persisted: rebuilt on adoption).
#[derive(Default)]
struct Runtime {
    qmp: Option<Arc<Qmp>>,
    invocation_id: Option<String>,
    main_pid: Option<u32>,
    last_reset: Option<Instant>,
    guest_shutdown: Option<String>,
    start_backoff: Backoff,
    grow_backoff: Backoff,
    announced_refusals: BTreeSet<String>,
    announced_pending: Option<Resources>,
}

/// Spaces out the attempts of an operation that keeps failing: none before `not_before`;
/// the wait doubles with each failure (twice [`MIN_BACKOFF`] after the first), up to
/// [`MAX_BACKOFF`].
#[derive(Default)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    fn waiting(&self, now: Instant) -> bool {
        self.not_before.is_some_and(|t| now < t)
    }

    /// Records a failure; returns the wait before the next attempt.
    fn failed(&mut self, now: Instant) -> Duration {
        self.failures += 1;
        let delay = MIN_BACKOFF
            .saturating_mul(1 << self.failures.min(16))
            .min(MAX_BACKOFF);
        self.not_before = Some(now + delay);
        delay
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }
}

/// Observes every VM unit with one `ListUnitsByPatterns` call: what the daemon sees of the
/// host on every pass. Disk sizes are the recorded ones; units of VMs neither declared nor
/// on record belong to someone else and are left out. `main_pids` (the QEMU pids the daemon
/// knows) let it notice a QEMU binary replaced on disk.
pub async fn observe(
    systemd: &Systemd,
    config: &Config,
    state: &State,
    main_pids: &BTreeMap<VmName, u32>,
) -> Result<Observed, systemd::SystemdError> {
    let pattern = format!("{}*.service", systemd::VM_UNIT_PREFIX);
    let units = systemd.list_units(&[&pattern]).await?;
    let mut observed = Observed::default();
    // Resolved once per pass: a PATH lookup per VM would cost a pass of 1000 VMs dearly.
    let qemu = resolve_program(&config.qemu.binary.display().to_string());
    for (name, r) in &state.vms {
        observed.vms.insert(
            name.clone(),
            ObservedVm {
                running: false,
                disk_gib: Some(r.applied.disk_gib),
                outdated: outdated(config, &qemu, name, r, main_pids.get(name).copied()),
            },
        );
    }
    for u in units {
        let Some(vm) = vm_of_unit(config, state, &u.name) else {
            continue;
        };
        let running = matches!(
            u.active_state,
            ActiveState::Active
                | ActiveState::Activating
                | ActiveState::Reloading
                | ActiveState::Deactivating
        );
        observed.vms.entry(vm).or_default().running = running;
    }
    Ok(observed)
}

/// One reconcile pass up to its plan, exactly as the daemon runs it on every wake-up: observe
/// (one D-Bus call), then plan for `now`. The daemon then applies the plan's actions; when
/// there is nothing to do there are none, and this is the whole pass (examples/bench_daemon
/// times it).
pub async fn plan_pass(
    systemd: &Systemd,
    config: &Config,
    state: &State,
    main_pids: &BTreeMap<VmName, u32>,
    now: DateTime<Utc>,
) -> Result<Plan, systemd::SystemdError> {
    let observed = observe(systemd, config, state, main_pids).await?;
    Ok(plan::plan(config, &observed, state, now))
}

/// Whether a VM's QEMU would be started differently now: another command line (a new
/// vmkeeper or configuration) or a QEMU binary replaced on disk since it started.
fn outdated(
    config: &Config,
    qemu: &str,
    vm: &VmName,
    record: &VmRecord,
    pid: Option<u32>,
) -> Option<String> {
    if record.argv.is_empty() {
        return None;
    }
    if let Some(pid) = pid
        && let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe"))
        && exe.to_string_lossy().ends_with(" (deleted)")
    {
        return Some("the QEMU binary was replaced (upgrade)".into());
    }
    let spec = config.vms.get(vm)?;
    let paths = VmPaths::new(&config.runtime_dir, vm);
    let mut argv = render::qemu_argv(config, spec, record.applied, &paths);
    qemu.clone_into(&mut argv[0]);
    (argv != record.argv).then(|| {
        if argv[0] != record.argv[0] {
            format!("QEMU changed from {} to {}", record.argv[0], argv[0])
        } else {
            "the QEMU command line changed".to_owned()
        }
    })
}

/// Whether this daemon is responsible for a VM: declared, on record, or being deleted.
/// Units and timers of other names are someone else's (another vmkeeper instance in tests)
/// and left alone.
fn is_ours(config: &Config, state: &State, vm: &VmName) -> bool {
    config.vms.contains_key(vm) || state.vms.contains_key(vm) || state.deletions.contains_key(vm)
}

/// The VM a unit runs, if the unit is a VM unit and the VM is ours.
fn vm_of_unit(config: &Config, state: &State, unit: &str) -> Option<VmName> {
    let name = unit
        .strip_prefix(systemd::VM_UNIT_PREFIX)?
        .strip_suffix(".service")?;
    let vm: VmName = name.parse().ok()?;
    is_ours(config, state, &vm).then_some(vm)
}

/// Runs the daemon until SIGTERM.
pub async fn run(config_path: &Path) -> Result<()> {
    let checked = config::load(config_path)?;
    for w in &checked.warnings {
        warn!("configuration: {w}");
    }
    let mut d = Daemon::start(config_path.to_owned(), checked.config).await?;
    d.main_loop().await
}

struct Daemon {
    config_path: PathBuf,
    config: Config,
    state: State,
    systemd: Systemd,
    rbd: Option<Cluster>,
    notifier: Notifier,
    vms: BTreeMap<VmName, Runtime>,
    tx: mpsc::UnboundedSender<Wake>,
    rx: mpsc::UnboundedReceiver<Wake>,
}

impl Daemon {
    async fn start(config_path: PathBuf, config: Config) -> Result<Daemon> {
        let state = State::load(&config.state_dir)?;
        std::fs::create_dir_all(&config.runtime_dir)
            .with_context(|| format!("cannot create {}", config.runtime_dir.display()))?;
        let systemd = Systemd::connect(None).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut d = Daemon {
            notifier: Notifier::new(config.notify_command.clone()),
            config_path,
            config,
            state,
            systemd,
            rbd: None,
            vms: BTreeMap::new(),
            tx,
            rx,
        };
        // Subscribe before listing, so no change between the two is missed.
        let mut sub = d.systemd.subscribe(&[systemd::VM_UNIT_PREFIX]).await?;
        let tx = d.tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = sub.next().await {
                if tx.send(Wake::Systemd(ev)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Wake::SystemdGone);
        });
        d.spawn_api()?;
        d.spawn_signals()?;
        d.check_boot().await;
        d.adopt().await?;
        d.resume_deletions().await;
        d.save();
        d.sync_maintenance_timers().await;
        notify_ready();
        Ok(d)
    }

    async fn main_loop(&mut self) -> Result<()> {
        self.reconcile().await;
        loop {
            let wake = tokio::time::timeout(self.next_pass(), self.rx.recv()).await;
            match wake {
                Ok(Some(Wake::Terminate)) | Ok(None) => {
                    info!("vmkeeper daemon stops; VMs keep running");
                    return Ok(());
                }
                Ok(Some(Wake::SystemdGone)) => anyhow::bail!("lost the connection to systemd"),
                Ok(Some(w)) => self.handle(w).await,
                Err(_) => {}
            }
            // Handle everything queued before planning once for all of it.
            while let Ok(w) = self.rx.try_recv() {
                match w {
                    Wake::Terminate => return Ok(()),
                    Wake::SystemdGone => anyhow::bail!("lost the connection to systemd"),
                    w => self.handle(w).await,
                }
            }
            self.reconcile().await;
        }
    }

    /// How long the loop may wait for a wake-up: until the first retry a backoff allows, at
    /// most [`TICK`].
    fn next_pass(&self) -> Duration {
        let now = Instant::now();
        self.vms
            .values()
            .flat_map(|rt| [rt.start_backoff.not_before, rt.grow_backoff.not_before])
            .flatten()
            .filter(|t| *t > now)
            .map(|t| t - now)
            .fold(TICK, Duration::min)
    }

    fn spawn_api(&self) -> Result<()> {
        let listener = api::bind(&self.config.runtime_dir.join(api::SOCKET))?;
        let tx = self.tx.clone();
        let group = self.config.authorized_group.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                let group = group.clone();
                tokio::spawn(async move {
                    let resp = match api::read_request(&mut stream, &group).await {
                        Ok((req, caller)) => {
                            let (otx, orx) = oneshot::channel();
                            if tx.send(Wake::Api(req, caller, otx)).is_err() {
                                return;
                            }
                            orx.await
                                .unwrap_or(Response::Error("the daemon is stopping".into()))
                        }
                        Err(e) => Response::Error(format!("bad request: {e}")),
                    };
                    let _ = api::write_response(&mut stream, &resp).await;
                });
            }
        });
        Ok(())
    }

    fn spawn_signals(&self) -> Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            loop {
                let w = tokio::select! {
                    _ = hup.recv() => Wake::Reload,
                    _ = term.recv() => Wake::Terminate,
                    _ = int.recv() => Wake::Terminate,
                };
                if tx.send(w).is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    fn save(&mut self) {
        if let Err(e) = self.state.save(&self.config.state_dir) {
            // Without a persisted intent nothing destructive may follow; the next pass retries.
            error!(
                message_id = Event::OperationFailed.message_id(),
                "cannot save state: {e:#}"
            );
        }
    }

    fn runtime(&mut self, vm: &VmName) -> &mut Runtime {
        self.vms.entry(vm.clone()).or_default()
    }

    fn ours(&self, vm: &VmName) -> bool {
        is_ours(&self.config, &self.state, vm)
    }

    fn vm_of_unit(&self, unit: &str) -> Option<VmName> {
        vm_of_unit(&self.config, &self.state, unit)
    }

    /// A changed boot id means the host rebooted: every VM that was running stopped unplanned,
    /// unless vmkeeper itself had meant to stop it.
    async fn check_boot(&mut self) {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .ok();
        if let (Some(old), Some(new)) = (&self.state.boot_id, &boot_id)
            && old != new
        {
            let was_running: Vec<VmName> = self
                .state
                .vms
                .iter()
                .filter(|(n, r)| r.running && !self.state.intents.contains_key(*n))
                .map(|(n, _)| n.clone())
                .collect();
            for vm in was_running {
                self.unplanned(
                    &vm,
                    "host-rebooted",
                    "the host rebooted outside a planned maintenance",
                )
                .await;
            }
            for r in self.state.vms.values_mut() {
                r.running = false;
            }
            self.state.intents.clear();
        }
        self.state.boot_id = boot_id;
    }

    /// Takes over VM units that run already; never restarts or duplicates them.
    async fn adopt(&mut self) -> Result<()> {
        let units = self
            .systemd
            .list_units(&[&format!("{}*.service", systemd::VM_UNIT_PREFIX)])
            .await?;
        let mut seen = BTreeSet::new();
        for u in units {
            let Some(vm) = self.vm_of_unit(&u.name) else {
                continue;
            };
            seen.insert(vm.clone());
            match u.active_state {
                ActiveState::Active | ActiveState::Activating | ActiveState::Reloading => {
                    let details = self.systemd.service_details(&u.name).await.ok();
                    let rt = self.runtime(&vm);
                    rt.invocation_id = details.as_ref().map(|d| d.invocation_id.clone());
                    rt.main_pid = details.as_ref().and_then(|d| d.main_pid);
                    if let Some(r) = self.state.vms.get_mut(&vm) {
                        r.running = true;
                    }
                    // An intent to start was fulfilled before the crash; one to stop is
                    // finished by the plan (online=false) or dropped.
                    self.state.intents.remove(&vm);
                    self.connect_qmp(&vm).await;
                    journal(
                        Event::VmAdopted,
                        &vm,
                        "adopt",
                        "daemon started",
                        true,
                        "running VM adopted",
                    );
                }
                ActiveState::Failed => {
                    let why = self.exit_description(&u.name).await;
                    if self.state.vms.get(&vm).is_some_and(|r| r.running)
                        && !self.state.intents.contains_key(&vm)
                    {
                        self.unplanned(
                            &vm,
                            "qemu-exited",
                            &format!("QEMU ended while the daemon was down ({why})"),
                        )
                        .await;
                    }
                    let _ = self.systemd.reset_failed(&u.name).await;
                    self.mark_stopped(&vm);
                }
                _ => {}
            }
        }
        let vanished: Vec<VmName> = self
            .state
            .vms
            .iter()
            .filter(|(n, r)| r.running && !seen.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for vm in vanished {
            if self.state.intents.remove(&vm).is_none() {
                self.unplanned(
                    &vm,
                    "unit-stopped",
                    "the VM's unit ended while the daemon was down",
                )
                .await;
            }
            self.mark_stopped(&vm);
        }
        Ok(())
    }

    async fn exit_description(&self, unit: &str) -> String {
        match self.systemd.service_details(unit).await {
            Ok(d) => match d.main_exit {
                MainExit::Exited(code) => format!("exit status {code}, result {}", d.result),
                MainExit::Killed(sig) => format!("killed by signal {sig}, result {}", d.result),
                MainExit::Dumped(sig) => format!("dumped core on signal {sig}"),
                MainExit::None => format!("result {}", d.result),
            },
            Err(_) => "unit gone".into(),
        }
    }

    fn mark_stopped(&mut self, vm: &VmName) {
        if let Some(r) = self.state.vms.get_mut(vm) {
            r.running = false;
        }
        let rt = self.runtime(vm);
        rt.qmp = None;
        rt.main_pid = None;
        rt.invocation_id = None;
    }

    async fn handle(&mut self, w: Wake) {
        match w {
            Wake::Systemd(SystemdEvent::UnitStateChanged {
                unit, active_state, ..
            }) => {
                if let Some(vm) = self.vm_of_unit(&unit) {
                    self.unit_changed(&vm, &unit, &active_state).await;
                }
            }
            Wake::Systemd(SystemdEvent::UnitRemoved { unit }) => {
                if let Some(vm) = self.vm_of_unit(&unit) {
                    self.unit_changed(&vm, &unit, &ActiveState::Inactive).await;
                }
            }
            Wake::Systemd(_) => {}
            Wake::Qmp(vm, ev) => self.qmp_event(&vm, ev).await,
            Wake::QmpGone(vm) => {
                self.runtime(&vm).qmp = None;
            }
            Wake::Api(req, caller, reply) => {
                let resp = self.api(req, &caller).await;
                let _ = reply.send(resp);
            }
            Wake::Reload => match config::load(&self.config_path) {
                Ok(c) => {
                    info!("configuration reloaded: {} VM(s)", c.config.vms.len());
                    self.notifier = Notifier::new(c.config.notify_command.clone());
                    self.config = c.config;
                }
                Err(e) => error!(
                    message_id = Event::OperationFailed.message_id(),
                    "configuration not reloaded, keeping the old one: {e:#}"
                ),
            },
            Wake::SystemdGone | Wake::Terminate => {}
        }
    }

    /// A VM unit changed state. Stops vmkeeper meant are covered by an intent; the rest are
    /// unplanned.
    async fn unit_changed(&mut self, vm: &VmName, unit: &str, reported: &ActiveState) {
        // Signals queue up while the daemon works (its own starts and stops emit them too):
        // act on the unit's state now, not on the state the signal once reported.
        let current = match self.systemd.list_units(&[unit]).await {
            Ok(units) => units.into_iter().next().map(|u| u.active_state),
            Err(_) => Some(reported.clone()),
        };
        let state = &current.unwrap_or(ActiveState::Inactive);
        let recorded_running = self.state.vms.get(vm).is_some_and(|r| r.running);
        let planned = self.state.intents.contains_key(vm);
        match state {
            ActiveState::Inactive | ActiveState::Failed if recorded_running && !planned => {
                let guest = self.runtime(vm).guest_shutdown.take();
                let why = self.exit_description(unit).await;
                let (kind, detail) = match guest {
                    Some(reason) => (
                        "guest-poweroff",
                        format!("the guest powered itself off ({reason})"),
                    ),
                    None if matches!(state, ActiveState::Failed) => {
                        ("qemu-exited", format!("QEMU ended ({why})"))
                    }
                    None => (
                        "unit-stopped",
                        format!("the unit was stopped from outside vmkeeper ({why})"),
                    ),
                };
                self.unplanned(vm, kind, &detail).await;
                if matches!(state, ActiveState::Failed) {
                    let _ = self.systemd.reset_failed(unit).await;
                }
                self.mark_stopped(vm);
                self.save();
            }
            ActiveState::Active if recorded_running && !planned => {
                // A new invocation we did not start: restarted from outside.
                let details = self.systemd.service_details(unit).await.ok();
                let new_id = details.as_ref().map(|d| d.invocation_id.clone());
                let old_id = self.runtime(vm).invocation_id.clone();
                if old_id.is_some() && new_id.is_some() && old_id != new_id {
                    self.unplanned(
                        vm,
                        "unit-restarted",
                        "the unit was restarted from outside vmkeeper",
                    )
                    .await;
                    let rt = self.runtime(vm);
                    rt.invocation_id = new_id;
                    rt.main_pid = details.and_then(|d| d.main_pid);
                    rt.qmp = None;
                    self.connect_qmp(vm).await;
                    self.save();
                }
            }
            _ => {}
        }
    }

    async fn qmp_event(&mut self, vm: &VmName, ev: QmpEvent) {
        match ev {
            QmpEvent::Reset {
                guest: true,
                reason,
            } if !self.state.intents.contains_key(vm) => {
                let rt = self.runtime(vm);
                let repeat = rt.last_reset.is_some_and(|t| t.elapsed() < RESET_DEBOUNCE);
                rt.last_reset = Some(Instant::now());
                if !repeat {
                    self.unplanned(
                        vm,
                        "guest-reset",
                        &format!("the guest rebooted itself ({reason})"),
                    )
                    .await;
                    self.save();
                }
            }
            QmpEvent::Shutdown {
                guest: true,
                reason,
            } => {
                self.runtime(vm).guest_shutdown = Some(reason);
            }
            _ => {}
        }
    }

    /// Raises an alarm: journal at alert priority, the hook, and the VM's record.
    async fn unplanned(&mut self, vm: &VmName, kind: &str, detail: &str) {
        let now = Utc::now();
        error!(
            message_id = Event::Unplanned.message_id(),
            vm = vm.as_str(),
            action = kind,
            reason = detail,
            planned = false,
            "ALARM: unplanned {kind} of VM {vm}: {detail}"
        );
        if let Some(r) = self.state.vms.get_mut(vm) {
            r.last_unplanned = Some(Unplanned {
                at: now,
                kind: kind.into(),
                detail: detail.into(),
            });
        }
        self.notify(Event::Unplanned, vm, kind, detail, None).await;
    }

    async fn notify(
        &self,
        event: Event,
        vm: &VmName,
        action: &str,
        reason: &str,
        slot: Option<Slot>,
    ) {
        #[derive(Serialize)]
        struct HookEvent<'a> {
            event: &'a str,
            vm: &'a str,
            action: &'a str,
            reason: &'a str,
            planned: bool,
            at: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            slot: Option<Slot>,
            contacts: &'a [String],
        }
        let ev = HookEvent {
            event: event.as_str(),
            vm: vm.as_str(),
            action,
            reason,
            planned: event != Event::Unplanned,
            at: rfc3339(Utc::now().with_timezone(&self.config.timezone)),
            slot,
            contacts: &self.config.contacts,
        };
        if let Err(e) = self.notifier.send(&ev).await {
            warn!(
                message_id = Event::OperationFailed.message_id(),
                vm = vm.as_str(),
                "notification hook failed: {e}"
            );
        }
    }

    async fn observe(&mut self) -> Option<Observed> {
        match observe(&self.systemd, &self.config, &self.state, &self.main_pids()).await {
            Ok(observed) => Some(observed),
            Err(e) => {
                warn!(
                    message_id = Event::OperationFailed.message_id(),
                    "cannot list units: {e}"
                );
                None
            }
        }
    }

    fn main_pids(&self) -> BTreeMap<VmName, u32> {
        self.vms
            .iter()
            .filter_map(|(n, rt)| rt.main_pid.map(|p| (n.clone(), p)))
            .collect()
    }

    /// Observes, plans for the clock's now and applies.
    async fn reconcile(&mut self) {
        // The daemon is the edge: it reads the clock and hands it to the pure planner.
        self.reconcile_at(Utc::now()).await;
    }

    /// Observes, plans for `now` and applies. `run-due --now` (root only) drives time through
    /// here, the same path the timers use.
    async fn reconcile_at(&mut self, now: DateTime<Utc>) {
        let plan = match plan_pass(
            &self.systemd,
            &self.config,
            &self.state,
            &self.main_pids(),
            now,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                warn!(
                    message_id = Event::OperationFailed.message_id(),
                    "cannot list units: {e}"
                );
                return;
            }
        };
        self.report(&plan);
        for action in plan.actions {
            self.apply(action, now).await;
        }
    }

    /// Journals refusals and pending changes once each, not on every pass.
    fn report(&mut self, plan: &Plan) {
        for r in &plan.refusals {
            let text = r.to_string();
            let rt = self.runtime(&r.vm);
            if rt.announced_refusals.insert(text.clone()) {
                journal(
                    Event::ChangeRefused,
                    &r.vm,
                    "refuse",
                    &r.message,
                    true,
                    &text,
                );
            }
        }
        for p in &plan.pending {
            let rt = self.runtime(&p.vm);
            if rt.announced_pending != Some(p.to) {
                rt.announced_pending = Some(p.to);
                let text = format!(
                    "CPU/RAM change pending: cores {} -> {}, memoryMiB {} -> {}; reboot in slot {}",
                    p.from.cores, p.to.cores, p.from.memory_mib, p.to.memory_mib, p.slot
                );
                journal(Event::ChangePending, &p.vm, "pending", &text, true, &text);
            }
        }
    }

    async fn apply(&mut self, action: Action, now: DateTime<Utc>) {
        match action {
            Action::CreateDisk {
                vm,
                size_gib,
                clone_from,
            } => {
                let Some(spec) = self.config.vms.get(&vm).cloned() else {
                    return;
                };
                if let Err(e) = self.create_disk(&spec, size_gib, clone_from).await {
                    self.failed(&vm, "create-disk", &e, None);
                }
            }
            Action::Start { vm, resources } => {
                let Some(spec) = self.config.vms.get(&vm).cloned() else {
                    return;
                };
                if self.runtime(&vm).start_backoff.waiting(Instant::now()) {
                    return;
                }
                if let Err(e) = self.start_vm(&spec, resources, "declared online").await {
                    let delay = self.runtime(&vm).start_backoff.failed(Instant::now());
                    self.failed(&vm, "start", &e, Some(delay));
                }
            }
            Action::Stop { vm, reason } => {
                if let Err(e) = self.stop_vm(&vm, &reason, "vmkeeper").await {
                    self.failed(&vm, "stop", &e, None);
                }
            }
            Action::GrowDisk {
                vm,
                from_gib,
                to_gib,
                live,
            } => {
                // The plan asks again on every pass until the disk has grown; a failing grow
                // (Ceph down) is retried on the backoff's schedule, not on every wake-up.
                if self.runtime(&vm).grow_backoff.waiting(Instant::now()) {
                    return;
                }
                match self.grow_disk(&vm, from_gib, to_gib, live).await {
                    Ok(()) => self.runtime(&vm).grow_backoff.succeeded(),
                    Err(e) => {
                        let delay = self.runtime(&vm).grow_backoff.failed(Instant::now());
                        self.failed(&vm, "grow-disk", &e, Some(delay));
                    }
                }
            }
            Action::ScheduleMaintenance {
                vm,
                slot,
                reasons,
                replaces,
            } => {
                self.schedule_maintenance(&vm, slot, reasons, replaces, now)
                    .await;
            }
            Action::CancelMaintenance { vm, reason } => {
                self.cancel_maintenance(&vm, &reason).await;
            }
            Action::MaintenanceReboot { vm, .. } => {
                if let Err(e) = self.maintenance_reboot(&vm).await {
                    self.failed(&vm, "maintenance-reboot", &e, None);
                }
            }
            a @ (Action::ScheduleDeletion { .. }
            | Action::CancelDeletion { .. }
            | Action::RunDeletionStage { .. }) => self.apply_deletion(a, now).await,
        }
    }

    /// Journals a failed operation; `retry` says when it is tried again, if it is.
    fn failed(&mut self, vm: &VmName, what: &str, e: &anyhow::Error, retry: Option<Duration>) {
        let next = retry.map_or(String::new(), |d| format!("; next attempt in {d:?}"));
        warn!(
            message_id = Event::OperationFailed.message_id(),
            vm = vm.as_str(),
            action = what,
            reason = %format!("{e:#}"),
            planned = true,
            "VM {vm}: {what} failed: {e:#}{next}"
        );
    }

    async fn cluster(&mut self) -> Result<Cluster> {
        if let Some(c) = &self.rbd {
            return Ok(c.clone());
        }
        let mut opts = ClusterOptions::new(
            self.config.ceph.conf.clone(),
            self.config.ceph.client_id.clone(),
        );
        opts.keyring = self.config.ceph.keyring.clone();
        let c = tokio::task::spawn_blocking(move || Cluster::connect(&opts))
            .await
            .context("Ceph connect task")??;
        self.rbd = Some(c.clone());
        Ok(c)
    }

    async fn create_disk(
        &mut self,
        spec: &VmSpec,
        size_gib: u64,
        clone_from: Option<crate::model::BaseImage>,
    ) -> Result<()> {
        let cluster = self.cluster().await?;
        let pool = self.config.ceph.pool.clone();
        let image = render::image_name(&spec.name).to_owned();
        let bytes = size_gib * GIB;
        cluster
            .run(move |c| {
                let io = c.ioctx(&pool)?;
                // Idempotent: an image left by an interrupted create is taken as it is.
                if io.exists(&image)? {
                    return Ok(());
                }
                match &clone_from {
                    None => io.create(&image, bytes),
                    Some(base) => {
                        let parent = c.ioctx(base.pool.as_deref().unwrap_or(&pool))?;
                        io.clone_from(&parent, &base.name, &base.snapshot, &image)?;
                        io.grow(&image, bytes).map(|_| ())
                    }
                }
            })
            .await
            .with_context(|| format!("cannot create the disk of {}", spec.name))?;
        self.state.vms.insert(
            spec.name.clone(),
            VmRecord {
                applied: Resources {
                    disk_gib: size_gib,
                    ..spec.resources
                },
                running: false,
                ip_addresses: spec.ip_addresses.clone(),
                last_unplanned: None,
                argv: vec![],
            },
        );
        self.save();
        journal(
            Event::DiskGrown,
            &spec.name,
            "create-disk",
            &format!("{size_gib} GiB"),
            true,
            &format!("disk created: {size_gib} GiB"),
        );
        Ok(())
    }

    async fn start_vm(&mut self, spec: &VmSpec, resources: Resources, why: &str) -> Result<()> {
        let vm = &spec.name;
        self.state
            .intents
            .insert(vm.clone(), intent("start", why, "vmkeeper"));
        self.save();
        let paths = VmPaths::new(&self.config.runtime_dir, vm);
        std::fs::create_dir_all(&paths.dir)
            .with_context(|| format!("cannot create {}", paths.dir.display()))?;
        // A socket left by a dead QEMU would make the new one fail to bind.
        let _ = std::fs::remove_file(&paths.qmp);
        let _ = std::fs::remove_file(&paths.serial_socket);
        let unit = systemd::vm_unit_name(vm.as_str());
        let _ = self.systemd.reset_failed(&unit).await;
        let mut argv = render::qemu_argv(&self.config, spec, resources, &paths);
        argv[0] = resolve_program(&argv[0]);
        let mut svc = TransientService::new(&unit, format!("vmkeeper VM {vm}"), argv);
        svc.environment.push(("VMKEEPER_VM".into(), vm.to_string()));
        svc.stop = StopPolicy {
            timeout: self
                .config
                .qemu
                .stop_timeout
                .to_std()
                .unwrap_or(Duration::from_secs(60)),
            ..StopPolicy::default()
        };
        svc.properties = qemu_hardening(&paths);
        let started_argv = svc.argv.clone();
        let result = self.systemd.start_service(&svc).await;
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.state.intents.remove(vm);
                self.save();
                return Err(e.into());
            }
        };
        if result != systemd::JobResult::Done {
            self.state.intents.remove(vm);
            self.save();
            anyhow::bail!("the start job of {unit} ended with {result:?}");
        }
        let details = self.systemd.service_details(&unit).await.ok();
        let disk = self
            .state
            .vms
            .get(vm)
            .map_or(resources.disk_gib, |r| r.applied.disk_gib);
        if let Some(r) = self.state.vms.get_mut(vm) {
            r.applied = Resources {
                disk_gib: disk,
                ..resources
            };
            r.running = true;
            r.argv = started_argv;
        }
        self.state.intents.remove(vm);
        self.save();
        let rt = self.runtime(vm);
        rt.invocation_id = details.as_ref().map(|d| d.invocation_id.clone());
        rt.main_pid = details.and_then(|d| d.main_pid);
        rt.start_backoff.succeeded();
        rt.announced_pending = None;
        journal(
            Event::VmStarted,
            vm,
            "start",
            why,
            true,
            &format!(
                "VM started with {} vCPU, {} MiB RAM",
                resources.cores, resources.memory_mib
            ),
        );
        self.connect_qmp(vm).await;
        Ok(())
    }

    /// Connects to a VM's QMP socket and forwards its events; waits briefly for a QEMU that
    /// just started to create the socket.
    async fn connect_qmp(&mut self, vm: &VmName) {
        let path = VmPaths::new(&self.config.runtime_dir, vm).qmp;
        let deadline = Instant::now() + QMP_APPEAR;
        let qmp = loop {
            match Qmp::connect(&path).await {
                Ok(q) => break Some(q),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => {
                    warn!(
                        message_id = Event::OperationFailed.message_id(),
                        vm = vm.as_str(),
                        "no QMP connection: {e}"
                    );
                    break None;
                }
            }
        };
        let Some(mut qmp) = qmp else { return };
        if let Some(mut events) = qmp.take_events() {
            let tx = self.tx.clone();
            let name = vm.clone();
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    if tx.send(Wake::Qmp(name.clone(), ev)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Wake::QmpGone(name));
            });
        }
        self.runtime(vm).qmp = Some(Arc::new(qmp));
    }

    /// Stops a VM on purpose: intent first, then ACPI power button, `quit`, and finally
    /// systemd's stop (SIGTERM, then SIGKILL).
    async fn stop_vm(&mut self, vm: &VmName, why: &str, by: &str) -> Result<()> {
        self.state
            .intents
            .insert(vm.clone(), intent("stop", why, by));
        self.save();
        let unit = systemd::vm_unit_name(vm.as_str());
        let grace = self
            .config
            .qemu
            .stop_timeout
            .to_std()
            .unwrap_or(Duration::from_secs(60));
        let qmp = self.runtime(vm).qmp.clone();
        let mut how = "ACPI power-off";
        let mut stopped = false;
        if let Some(q) = &qmp {
            if q.system_powerdown().await.is_ok() {
                stopped = self.wait_inactive(&unit, grace).await;
            }
            if !stopped {
                how = "QMP quit";
                if q.quit().await.is_ok() {
                    stopped = self.wait_inactive(&unit, QUIT_GRACE).await;
                }
            }
        }
        if !stopped {
            how = "systemd stop";
            match self.systemd.stop_unit(&unit).await {
                Ok(_) => {}
                Err(e) if e.is_no_such_unit() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let _ = self.systemd.reset_failed(&unit).await;
        self.mark_stopped(vm);
        self.state.intents.remove(vm);
        self.save();
        journal(
            Event::VmStopped,
            vm,
            "stop",
            why,
            true,
            &format!("VM stopped as planned ({how}): {why}"),
        );
        Ok(())
    }

    async fn wait_inactive(&self, unit: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.systemd.list_units(&[unit]).await {
                Ok(units) => {
                    if !units.iter().any(|u| {
                        matches!(
                            u.active_state,
                            ActiveState::Active
                                | ActiveState::Activating
                                | ActiveState::Deactivating
                        )
                    }) {
                        return true;
                    }
                }
                Err(_) => return false,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Grows a disk. The real image size is read right before the resize and a smaller
    /// target refused: QMP `block_resize` would shrink an RBD image silently.
    async fn grow_disk(
        &mut self,
        vm: &VmName,
        from_gib: u64,
        to_gib: u64,
        live: bool,
    ) -> Result<()> {
        let started = Instant::now();
        let cluster = self.cluster().await?;
        let pool = self.config.ceph.pool.clone();
        let image = render::image_name(vm).to_owned();
        let target = to_gib * GIB;
        let current = {
            let (pool, image) = (pool.clone(), image.clone());
            cluster
                .run(move |c| c.ioctx(&pool)?.stat(&image))
                .await?
                .size
        };
        if target < current {
            let msg = format!(
                "cannot shrink from {} to {to_gib} GiB; disks only grow — provision a new VM instead",
                current / GIB
            );
            journal(Event::ChangeRefused, vm, "refuse", &msg, true, &msg);
            anyhow::bail!(msg);
        }
        let qmp = self.runtime(vm).qmp.clone();
        let how = match (live, qmp) {
            (true, Some(q)) if target > current => {
                q.block_resize(ROOT_NODE, target).await?;
                let seen = q.query_block().await?;
                let size = seen
                    .iter()
                    .find(|b| b.node_name.as_deref() == Some(ROOT_NODE))
                    .and_then(|b| b.size_bytes);
                if size != Some(target) {
                    anyhow::bail!("QEMU reports {size:?} bytes after block_resize to {target}");
                }
                "live, QMP block_resize"
            }
            (true, None) => anyhow::bail!("no QMP connection to grow the disk live"),
            _ if target > current => {
                cluster
                    .run(move |c| c.ioctx(&pool)?.grow(&image, target))
                    .await?;
                "RBD resize"
            }
            _ => "already at that size",
        };
        if let Some(r) = self.state.vms.get_mut(vm) {
            r.applied.disk_gib = to_gib;
        }
        self.save();
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        journal(
            Event::DiskGrown,
            vm,
            "grow-disk",
            &format!("{from_gib} -> {to_gib} GiB"),
            true,
            &format!(
                "disk grown {from_gib} -> {to_gib} GiB ({how}) in {ms:.1} ms from noticing the change"
            ),
        );
        Ok(())
    }

    async fn api(&mut self, req: Request, caller: &Caller) -> Response {
        if req.is_mutating() && !caller.authorized {
            warn!(
                message_id = Event::Audit.message_id(),
                caller_uid = caller.uid,
                caller = caller.user.as_deref().unwrap_or("?"),
                "refused {req:?} from uid {}: not in {}",
                caller.uid,
                self.config.authorized_group
            );
            return Response::Error(format!(
                "not authorized: only root and members of {} may do this",
                self.config.authorized_group
            ));
        }
        match req {
            Request::Reboot { vm } => {
                audit(caller, "reboot", &vm);
                match self.reboot_now(&vm, caller).await {
                    Ok(()) => Response::Ok(serde_json::json!({ "rebooted": vm })),
                    Err(e) => Response::Error(format!("{e:#}")),
                }
            }
            Request::MaintenanceRequest { vm, reason } => {
                audit(caller, "maintenance-request", &vm);
                match self.request_maintenance(&vm, &reason, caller).await {
                    Ok(slot) => Response::Ok(serde_json::json!({ "vm": vm, "slot": slot })),
                    Err(e) => Response::Error(format!("{e:#}")),
                }
            }
            Request::MaintenanceList => {
                let tz = self.config.timezone;
                let list: Vec<serde_json::Value> = self
                    .state
                    .maintenances
                    .iter()
                    .map(|(vm, m)| {
                        serde_json::json!({
                            "vm": vm,
                            "slot": crate::plan::slot_in(tz, m.slot_start, m.slot_end),
                            "announcedAt": rfc3339(m.announced_at.with_timezone(&tz)),
                            "reasons": m.reasons.iter().map(describe_reason).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                Response::Ok(serde_json::Value::Array(list))
            }
            Request::RunDue { now } => {
                if now.is_some() && caller.uid != 0 {
                    return Response::Error("not authorized: only root may pass --now".into());
                }
                let now = now.unwrap_or_else(Utc::now);
                self.reconcile_at(now).await;
                Response::Ok(
                    serde_json::json!({ "ranAt": rfc3339(now.with_timezone(&self.config.timezone)) }),
                )
            }
            Request::Delete { vm, date, now } => self.api_delete(vm, date, now, caller).await,
            Request::CancelDeletion { vm, now } => self.api_cancel_deletion(vm, now, caller).await,
            Request::Status => {
                let observed = self.observe().await.unwrap_or_default();
                let plan = plan::plan(&self.config, &observed, &self.state, Utc::now());
                match serde_json::to_value(self.status(&plan)) {
                    Ok(v) => Response::Ok(v),
                    Err(e) => Response::Error(e.to_string()),
                }
            }
        }
    }

    fn status(&self, plan: &Plan) -> Vec<VmStatus> {
        let names: BTreeSet<&VmName> = self
            .config
            .vms
            .keys()
            .chain(self.state.vms.keys())
            .collect();
        let tz = self.config.timezone;
        let now = Utc::now();
        names
            .into_iter()
            .map(|n| {
                let record = self.state.vms.get(n);
                let rt = self.vms.get(n);
                let maintenance = self.state.maintenances.get(n);
                VmStatus {
                    name: n.clone(),
                    running: record.is_some_and(|r| r.running),
                    unit: systemd::vm_unit_name(n.as_str()),
                    qemu_pid: rt.and_then(|r| r.main_pid),
                    declared: self.config.vms.get(n).map(|s| s.resources),
                    applied: record.map(|r| r.applied),
                    pending: plan.pending.iter().find(|p| &p.vm == n).map(|p| p.to),
                    maintenance_slot: maintenance
                        .map(|m| crate::plan::slot_in(tz, m.slot_start, m.slot_end)),
                    in_maintenance: self
                        .state
                        .intents
                        .get(n)
                        .is_some_and(|i| i.reason == "maintenance reboot")
                        || maintenance.is_some_and(|m| m.slot_start <= now && now < m.slot_end),
                    refusals: plan
                        .refusals
                        .iter()
                        .filter(|r| &r.vm == n)
                        .map(ToString::to_string)
                        .collect(),
                    last_unplanned: record.and_then(|r| r.last_unplanned.clone()),
                    deletion_date: self.state.deletions.get(n).map(|d| d.date),
                    downtime_from: self
                        .state
                        .deletions
                        .get(n)
                        .and_then(|d| d.downtime_from)
                        .map(|t| rfc3339(t.with_timezone(&tz))),
                }
            })
            .collect()
    }
}

/// One VM in `vmkeeper status --json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    name: VmName,
    running: bool,
    unit: String,
    qemu_pid: Option<u32>,
    declared: Option<Resources>,
    applied: Option<Resources>,
    pending: Option<Resources>,
    maintenance_slot: Option<Slot>,
    in_maintenance: bool,
    refusals: Vec<String>,
    last_unplanned: Option<Unplanned>,
    /// The date the VM is deleted on, when a deletion is under way.
    deletion_date: Option<chrono::NaiveDate>,
    /// Monitoring downtime recorded by a deletion's announcement: from T on.
    downtime_from: Option<String>,
}

fn describe_reason(r: &Reason) -> String {
    match r {
        Reason::PendingResources { from, to } => format!(
            "CPU/RAM change: cores {} -> {}, memoryMiB {} -> {}",
            from.cores, to.cores, from.memory_mib, to.memory_mib
        ),
        Reason::Outdated { detail } => format!("outdated QEMU: {detail}"),
        Reason::Requested { by, reason } => format!("requested by {by}: {reason}"),
    }
}

fn intent(action: &str, reason: &str, by: &str) -> Intent {
    Intent {
        action: action.into(),
        reason: reason.into(),
        by: by.into(),
        at: Utc::now(),
    }
}

/// Records an accepted mutating call: who (from the kernel), what, on which VM.
pub(super) fn audit(caller: &Caller, action: &str, vm: &VmName) {
    let user = caller.user.as_deref().unwrap_or("?");
    info!(
        message_id = Event::Audit.message_id(),
        vm = vm.as_str(),
        action,
        caller_uid = caller.uid,
        caller = user,
        planned = true,
        "{action} {vm} requested by {user} (uid {})",
        caller.uid
    );
}

/// One structured journal entry about a VM.
fn journal(event: Event, vm: &VmName, action: &str, reason: &str, planned: bool, text: &str) {
    info!(
        message_id = event.message_id(),
        vm = vm.as_str(),
        action,
        reason,
        planned,
        "{text}"
    );
}

/// systemd needs an absolute ExecStart path; a bare name is looked up in PATH once here.
pub fn resolve_program(program: &str) -> String {
    if program.contains('/') {
        return program.to_owned();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .map_or_else(|| program.to_owned(), |p| p.display().to_string())
}

/// Sandboxing QEMU tolerates: no new privileges, a read-only system except its own runtime
/// directory, no home, only the devices a VM needs. W^X is not enforced because TCG
/// generates code at run time; /tmp stays shared because operators' kernels and ceph.conf
/// (and the test harness) may live there, and QEMU writes nothing to it.
fn qemu_hardening(paths: &VmPaths) -> Vec<(String, PropertyValue)> {
    let s = |k: &str, v: &str| (k.to_owned(), PropertyValue::Str(v.to_owned()));
    let b = |k: &str, v: bool| (k.to_owned(), PropertyValue::Bool(v));
    vec![
        b("NoNewPrivileges", true),
        s("ProtectSystem", "strict"),
        s("ProtectHome", "yes"),
        (
            "ReadWritePaths".into(),
            PropertyValue::Strs(vec![paths.dir.display().to_string()]),
        ),
        b("ProtectKernelTunables", true),
        b("ProtectKernelModules", true),
        b("ProtectControlGroups", true),
        b("RestrictRealtime", true),
        b("RestrictSUIDSGID", true),
        b("LockPersonality", true),
        s("DevicePolicy", "closed"),
        (
            "DeviceAllow".into(),
            PropertyValue::Pairs(vec![
                ("/dev/kvm".into(), "rw".into()),
                ("/dev/net/tun".into(), "rw".into()),
                ("/dev/vhost-net".into(), "rw".into()),
            ]),
        ),
    ]
}

/// Tells systemd (Type=notify) that the daemon is ready: VMs adopted, API listening.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let path = path.to_string_lossy().into_owned();
    let sent = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(b"READY=1\n", &addr))
    } else {
        sock.send_to(b"READY=1\n", &path)
    };
    if let Err(e) = sent {
        warn!("sd_notify failed: {e}");
    }
}
