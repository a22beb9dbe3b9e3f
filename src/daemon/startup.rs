//! Startup: connect, notice a host reboot (its alarms only after the new boot id is saved),
//! look at every unit once, decide with the pure `recover` what to do with each intent found,
//! and tell systemd the daemon is ready. What follows (interrupted operations resumed, QMP
//! connections, deletion stages, hooks) is ordinary work of the loop.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::Utc;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{error, warn};

use super::eventloop::{Channels, Daemon};
use super::notifier::Outbox;
use super::ops::{Ceph, Ctx, Job, QemuStart};
use super::silences::SilencePlan;
use super::timers::TimerPlan;
use super::{Event, notifier, persist, projects, resync, scrape, silences, timers};
use crate::api::{self, Response};
use crate::config::{self, Config};
use crate::events::Event as Journal;
use crate::exec::rbd::ClusterOptions;
use crate::exec::systemd::{self, ActiveState, Systemd, SystemdEvent};
use crate::model::VmName;
use crate::state::{Intent, RebootKind, State, StopReason, Unplanned, UnplannedKind};
use crate::supervisor::recovery::{self, Fate};
use crate::supervisor::{OpKind, UnitSeen};

/// Brings the daemon up to the point where its loop can run.
pub async fn start(config_path: &Path, test_clock: bool) -> Result<Daemon> {
    let checked = config::load(config_path)?;
    for w in &checked.warnings {
        warn!("configuration: {w}");
    }
    let config = Arc::new(checked.config);
    let state = State::load(&config.state_dir)?;
    std::fs::create_dir_all(&config.runtime_dir)
        .with_context(|| format!("cannot create {}", config.runtime_dir.display()))?;
    let systemd = Systemd::connect(None).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    // Subscribe before looking, so no change between the look and the first signal is lost.
    let sub = systemd.subscribe(&[systemd::VM_UNIT_PREFIX]).await?;
    forward_signals(sub, tx.clone());

    let (persist_tx, persist_rx) = watch::channel(None);
    persist::spawn(config.state_dir.clone(), persist_rx, tx.clone());
    let (outbox_tx, outbox_rx) = watch::channel(Outbox::default());
    notifier::spawn(outbox_rx, tx.clone());
    let (timers_tx, timers_rx) = watch::channel(TimerPlan::default());
    timers::spawn(systemd.clone(), timers_rx, tx.clone());
    let (resync_tx, resync_rx) = mpsc::unbounded_channel();
    resync::spawn(systemd.clone(), resync_rx, tx.clone());
    let (silences_tx, silences_rx) = watch::channel(SilencePlan::default());
    silences::spawn(silences_rx, tx.clone());
    // Bound before anything else is done, so a taken port fails the start at once.
    let metrics = match config.metrics_listen {
        Some(addr) => Some(
            scrape::bind(addr)
                .with_context(|| format!("cannot listen for metrics on {addr} (metrics.listen)"))?,
        ),
        None => None,
    };

    let ctx = Arc::new(Ctx {
        systemd: systemd.clone(),
        ceph: Ceph::new(cluster_options(&config)),
        starts: Arc::new(Semaphore::new(config.qemu.max_concurrent_starts)),
        events: tx.clone(),
    });
    let channels = Channels {
        tx,
        rx,
        persist_tx,
        outbox_tx,
        timers_tx,
        resync_tx,
        silences_tx,
    };
    let mut d = Daemon::new(
        config_path.to_owned(),
        config,
        state,
        ctx,
        channels,
        test_clock,
    );
    d.host_reboot().await?;
    d.recover(&systemd).await?;
    save_now(&mut d).await?;
    d.resume_stages();
    spawn_api(&d)?;
    if let Some(listener) = metrics {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("metrics on http://{addr}/metrics");
        }
        scrape::spawn(listener, d.tx.clone());
    }
    spawn_signals(d.tx.clone())?;
    notify_ready();
    Ok(d)
}

fn cluster_options(config: &Config) -> ClusterOptions {
    let mut opts = ClusterOptions::new(config.ceph.conf.clone(), config.ceph.client_id.clone());
    opts.keyring = config.ceph.keyring.clone();
    opts
}

/// Writes the state now and counts it as durable; startup fails if it cannot.
async fn save_now(d: &mut Daemon) -> Result<()> {
    let state = d.state.clone();
    let dir = d.config.state_dir.clone();
    tokio::task::spawn_blocking(move || state.save(&dir))
        .await?
        .context("cannot write the state at start")?;
    d.changed();
    d.durability.durable = d.durability.generation;
    Ok(())
}

impl Daemon {
    /// A changed boot id means the host rebooted: VMs that were running stopped unplanned,
    /// unless vmkeeper itself was stopping or rebooting them. The new boot id and the alarms
    /// are saved first, so a crash during startup never repeats them.
    async fn host_reboot(&mut self) -> Result<()> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .ok();
        let rebooted =
            matches!((&self.state.boot_id, &boot_id), (Some(old), Some(new)) if old != new);
        self.state.boot_id = boot_id;
        let alarms = if rebooted {
            recovery::after_host_reboot(&mut self.state)
        } else {
            vec![]
        };
        let now = Utc::now();
        let detail = "the host rebooted outside a planned maintenance";
        for (vm, instance) in &alarms {
            self.count_unplanned(vm, UnplannedKind::HostRebooted);
            if let Some(r) = self.state.vms.get_mut(vm) {
                r.last_unplanned = Some(Unplanned {
                    at: now,
                    kind: UnplannedKind::HostRebooted,
                    detail: detail.into(),
                    instance: instance.clone(),
                });
            }
            let event = self.hook_event(
                Journal::Unplanned,
                vm,
                UnplannedKind::HostRebooted.as_str(),
                detail,
                false,
                now,
            );
            self.notify(vm, event, now);
        }
        save_now(self).await?;
        for (vm, _) in &alarms {
            error!(
                message_id = Journal::Unplanned.message_id(),
                vm = vm.as_str(),
                project = self.project(vm).name.as_str(),
                action = UnplannedKind::HostRebooted.as_str(),
                reason = detail,
                planned = false,
                "ALARM: unplanned host-rebooted of VM {vm}: {detail}"
            );
        }
        Ok(())
    }

    /// Looks at every unit once and settles each VM: adopts what runs, finishes or resumes
    /// the operation its intent names, alarms for ends nobody planned.
    async fn recover(&mut self, systemd: &Systemd) -> Result<()> {
        let req = resync::Request {
            id: 0,
            full: true,
            vms: self
                .ours()
                .into_iter()
                .map(|vm| {
                    let belief = resync::Belief {
                        up: None,
                        pid: None,
                        epoch: 0,
                    };
                    (vm, belief)
                })
                .collect(),
        };
        let report = resync::observe(systemd, &req).await?;
        let now = std::time::Instant::now();
        for row in report.rows {
            let vm = row.vm.clone();
            self.slot(&vm).sup.init(&row.seen, row.pid, now);
            self.slot(&vm).binary_replaced = row.binary_replaced;
            self.recover_vm(&vm, &row.seen);
        }
        Ok(())
    }

    fn recover_vm(&mut self, vm: &VmName, seen: &UnitSeen) {
        let intent = self.state.intents.get(vm).cloned();
        let r = recovery::recover(intent.as_ref(), seen, self.state.vms.get(vm));
        let instance = seen.running().flatten().cloned();
        if let Some(a) = r.alarm {
            let detail = match a.kind {
                UnplannedKind::QemuExited => "QEMU ended while the daemon was down",
                UnplannedKind::UnitRestarted => {
                    "the unit was restarted from outside vmkeeper while the daemon was down"
                }
                _ => "the VM's unit ended while the daemon was down",
            };
            self.alarm(vm, a.kind, a.instance, detail);
        }
        let running = seen.running().is_some();
        if let Some(rec) = self.state.vms.get_mut(vm) {
            rec.running = running;
            if instance.is_some() {
                rec.instance = instance.clone();
            }
        }
        match (r.fate, intent) {
            (Fate::None, _) => {}
            (
                Fate::Completed,
                Some(Intent::Start {
                    resources, argv, ..
                }),
            ) => {
                self.state.intents.remove(vm);
                self.record_started(vm, resources, argv, instance);
                self.journal(
                    Journal::VmStarted,
                    vm,
                    "start",
                    "finished after a restart",
                    "VM start finished: its QEMU runs (the daemon restarted before recording it)",
                );
            }
            (Fate::Completed, Some(i @ Intent::Reboot { .. })) => {
                let Intent::Reboot {
                    resources,
                    argv,
                    kind,
                    ..
                } = &i
                else {
                    return;
                };
                self.count_planned_reboot(vm, kind);
                self.state.intents.remove(vm);
                self.record_started(vm, *resources, argv.clone(), instance);
                self.journal(
                    Journal::VmStarted,
                    vm,
                    "start",
                    "reboot finished after a restart",
                    "VM reboot finished: the new QEMU runs (the daemon restarted before \
                     recording it)",
                );
                self.reboot_completed(vm, Some(&i), Utc::now());
            }
            (Fate::Completed, Some(Intent::Stop { reason, .. })) => {
                if !matches!(reason, StopReason::Deletion { .. }) {
                    self.state.intents.remove(vm);
                }
                self.journal(
                    Journal::VmStopped,
                    vm,
                    "stop",
                    &reason.to_string(),
                    &format!("VM stopped as planned: {reason} (finished after a restart)"),
                );
            }
            (Fate::Resume, Some(Intent::Stop { reason, .. })) => {
                // A deletion stage's stop is resumed with its stage.
                if !matches!(reason, StopReason::Deletion { .. }) {
                    self.state.intents.remove(vm);
                    self.stop(vm, reason, crate::state::Actor::Vmkeeper, Utc::now());
                }
            }
            (Fate::Resume, Some(i @ Intent::Reboot { .. })) => self.resume_reboot(vm, &i),
            // A start is never resumed: the planner starts the VM afresh.
            (Fate::Abandoned | Fate::Resume | Fate::Completed, _) => {
                self.state.intents.remove(vm);
            }
        }
        if running {
            self.journal(
                Journal::VmAdopted,
                vm,
                "adopt",
                "daemon started",
                "running VM adopted",
            );
            self.connect_running(vm);
        }
        self.changed();
    }

    /// Carries an interrupted reboot on with what its intent says (not what the configuration
    /// says now): the change it was for is applied exactly once.
    fn resume_reboot(&mut self, vm: &VmName, intent: &Intent) {
        let Intent::Reboot { kind, argv, .. } = intent else {
            return;
        };
        let Some(spec) = self.config.vms.get(vm).cloned() else {
            // No longer declared: nothing to start; the planner deletes it.
            self.state.intents.remove(vm);
            return;
        };
        warn!(
            message_id = Journal::VmStopped.message_id(),
            vm = vm.as_str(),
            project = self.project(vm).name.as_str(),
            action = "reboot",
            planned = true,
            "resuming a reboot the daemon was carrying out when it stopped"
        );
        let stop = self.qemu_stop(vm);
        let start: QemuStart = self.qemu_start(&spec, argv.clone());
        let failpoints = match kind {
            RebootKind::Maintenance { .. } => "maintenance-reboot",
            RebootKind::Immediate => "reboot-now",
        };
        let job = Job::Reboot {
            stop,
            start,
            failpoints,
        };
        // The intent is on disk already.
        self.spawn_op(vm, OpKind::Reboot, job);
    }

    /// Stages a crash interrupted are carried out again (their acts are idempotent).
    fn resume_stages(&mut self) {
        let started: Vec<(VmName, crate::deletion::Stage)> = self
            .state
            .deletions
            .iter()
            .filter_map(|(vm, d)| d.stage_started.map(|s| (vm.clone(), s)))
            .collect();
        for (vm, stage) in started {
            warn!(
                message_id = Journal::Deletion.message_id(),
                vm = vm.as_str(),
                project = self.project(&vm).name.as_str(),
                action = "deletion-resume",
                stage = stage.as_str(),
                planned = true,
                "finishing deletion stage {stage}, interrupted before it was recorded as done"
            );
            if !self.slot(&vm).busy() {
                self.run_stage(&vm, stage, Utc::now());
            }
        }
    }
}

/// Turns systemd's signals about VM units into loop events.
fn forward_signals(mut sub: systemd::Subscription, tx: mpsc::UnboundedSender<Event>) {
    tokio::spawn(async move {
        while let Some(ev) = sub.next().await {
            let event = match ev {
                SystemdEvent::UnitStateChanged {
                    unit,
                    invocation,
                    active_state,
                    ..
                } => {
                    let Some(vm) = vm_of_unit(&unit) else {
                        continue;
                    };
                    let seen = match active_state {
                        ActiveState::Active
                        | ActiveState::Activating
                        | ActiveState::Reloading
                        | ActiveState::Deactivating => UnitSeen::Running {
                            instance: invocation,
                        },
                        ActiveState::Inactive => UnitSeen::Stopped {
                            instance: invocation,
                            failed: false,
                        },
                        ActiveState::Failed => UnitSeen::Stopped {
                            instance: invocation,
                            failed: true,
                        },
                        ActiveState::Other(_) => continue,
                    };
                    Event::Unit { vm, seen }
                }
                SystemdEvent::UnitRemoved { unit } => match vm_of_unit(&unit) {
                    Some(vm) => Event::UnitRemoved { vm },
                    None => continue,
                },
                SystemdEvent::Lagged => Event::Lagged,
                SystemdEvent::JobRemoved { .. } | SystemdEvent::UnitNew { .. } => continue,
            };
            if tx.send(event).is_err() {
                return;
            }
        }
        let _ = tx.send(Event::SystemdGone);
    });
}

/// The VM a VM unit runs.
pub(super) fn vm_of_unit(unit: &str) -> Option<VmName> {
    unit.strip_prefix(systemd::VM_UNIT_PREFIX)?
        .strip_suffix(".service")?
        .parse()
        .ok()
}

fn spawn_api(d: &Daemon) -> Result<()> {
    let listener = api::bind(&d.config.runtime_dir.join(api::SOCKET))?;
    let tx = d.tx.clone();
    let groups = d.groups_tx.subscribe();
    api::serve(listener, move |request, caller| {
        let tx = tx.clone();
        let names = groups.borrow().clone();
        async move {
            // The group database may be remote (NSS): looked up off the runtime's threads,
            // for each request, so a group made after the daemon started counts at once.
            let groups = tokio::task::spawn_blocking(move || projects::resolve(&names))
                .await
                .unwrap_or_default();
            let (reply, answer) = oneshot::channel();
            let sent = tx.send(Event::Api {
                request,
                caller,
                groups,
                reply,
            });
            if sent.is_err() {
                return Response::Error("the daemon is stopping".into());
            }
            answer
                .await
                .unwrap_or(Response::Error("the daemon is stopping".into()))
        }
    });
    Ok(())
}

fn spawn_signals(tx: mpsc::UnboundedSender<Event>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            let e = tokio::select! {
                _ = hup.recv() => Event::Reload,
                _ = term.recv() => Event::Terminate,
                _ = int.recv() => Event::Terminate,
            };
            if tx.send(e).is_err() {
                return;
            }
        }
    });
    Ok(())
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
