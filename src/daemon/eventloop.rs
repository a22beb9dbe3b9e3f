//! The event loop: owns the configuration, the state and every VM's supervisor; routes each
//! event to the VM it names, plans, and hands effects to tasks. It never awaits an effect.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use super::notifier::{Hooks, Outbox};
use super::ops::{self, Ctx, Job, QemuStart, QemuStop, QmpConn};
use super::silences::SilencePlan;
use super::timers::TimerPlan;
use super::{Event, link, persist, resync, sandbox, timers};
use crate::api::Response;
use crate::config::{Config, Project};
use crate::events::Event as Journal;
use crate::exec::qmp::QmpEvent;
use crate::exec::systemd::{self, StopPolicy, TransientService};
use crate::metrics::{Histograms, VmCounters};
use crate::model::{GIB, GroupName, InvocationId, Resources, VmName, VmSpec};
use crate::plan::{self, Action, Observed, ObservedVm, Plan};
use crate::render::{self, VmPaths};
use crate::state::{
    Actor, Intent, RebootKind, State, StopReason, Unplanned, UnplannedKind, VmRecord,
};
use crate::supervisor::{Decision, Link, OpKind, Supervisor};

/// A full look at the units at least this often, behind the signals.
pub const TICK: Duration = Duration::from_secs(60);
/// Every this many ticks the look reads every unit's details (instances), not just the list.
const FULL_EVERY: u32 = 10;
/// A forward jump of the wall clock against the monotonic one larger than this makes the
/// clock untrusted for one pass.
const CLOCK_JUMP: chrono::TimeDelta = chrono::TimeDelta::hours(1);
/// How long an operation waits for its intent to reach the disk before it is given up.
const PERSIST_WAIT: Duration = Duration::from_secs(60);

/// An operation that waits for its intent to be on disk.
#[derive(Debug)]
struct Waiting {
    id: u64,
    kind: OpKind,
    job: Job,
    generation: u64,
    since: Instant,
    timeout: Duration,
}

/// What the loop keeps per VM besides its supervisor.
#[derive(Debug)]
pub(super) struct Slot {
    pub sup: Supervisor,
    link_tx: watch::Sender<Option<QmpConn>>,
    link_task: Option<tokio::task::JoinHandle<()>>,
    op_task: Option<tokio::task::JoinHandle<()>>,
    waiting: Option<Waiting>,
    /// When the running QEMU's QMP connection broke, until it is back.
    link_lost: Option<Instant>,
    /// An unplanned end being looked at (exit status) before its alarm.
    pending_alarm: Option<(UnplannedKind, Option<InvocationId>, String)>,
    /// The running QEMU's binary was replaced on disk.
    pub binary_replaced: bool,
    /// Why the running QEMU's command line is outdated; `None` = not computed yet.
    outdated_argv: Option<Option<String>>,
    announced_refusals: BTreeSet<String>,
    announced_pending: Option<Resources>,
}

impl Slot {
    fn new(vm: VmName) -> Slot {
        Slot {
            sup: Supervisor::new(vm),
            link_tx: watch::channel(None).0,
            link_task: None,
            op_task: None,
            waiting: None,
            link_lost: None,
            pending_alarm: None,
            binary_replaced: false,
            outdated_argv: None,
            announced_refusals: BTreeSet::new(),
            announced_pending: None,
        }
    }

    /// Busy: an operation runs or waits for its intent.
    pub fn busy(&self) -> bool {
        self.sup.busy() || self.waiting.is_some()
    }

    fn link_rx(&self) -> ops::LinkRx {
        self.link_tx.subscribe()
    }

    fn drop_link(&mut self) {
        if let Some(t) = self.link_task.take() {
            t.abort();
        }
        self.link_lost = None;
        self.link_tx.send_replace(None);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.drop_link();
    }
}

/// A caller waiting until some operations are done.
#[derive(Debug)]
struct Waiter {
    ops: BTreeSet<u64>,
    errors: Vec<String>,
    ok: serde_json::Value,
    reply: oneshot::Sender<Response>,
    /// `run-due`: once these are done, plan again as of this instant, until nothing more is
    /// due then (at most [`MAX_ROUNDS`] rounds).
    rerun: Option<(DateTime<Utc>, u32)>,
    /// Answer only once the state is on disk (what the command changed is the state).
    durable: bool,
    /// When the caller began waiting.
    since: Instant,
}

/// How long `run-due` waits for the hook to take a deletion announcement it made.
const ANNOUNCEMENT_WAIT: Duration = Duration::from_secs(30);

/// Rounds of `run-due`: each stage or reboot it starts may make another one due.
const MAX_ROUNDS: u32 = 20;

/// How long an answer waits for systemd's timers to show what it changed.
const TIMERS_WAIT: Duration = Duration::from_secs(10);

/// An answer held until the timers match the state it left behind, so that after a command
/// returns `systemctl list-timers` shows its effect.
#[derive(Debug)]
struct Parked {
    generation: u64,
    durable: u64,
    deadline: Instant,
    response: Response,
    reply: oneshot::Sender<Response>,
}

/// Persistence as the loop tracks it.
#[derive(Debug, Default)]
pub(super) struct Durability {
    /// Generation of the state in memory (bumped on every change).
    pub generation: u64,
    /// Newest generation handed to the writer.
    sent: u64,
    /// Newest generation on disk.
    pub durable: u64,
    /// Since when, and why, writing fails.
    pub failing: Option<(DateTime<Utc>, String)>,
}

/// The daemon.
pub(super) struct Daemon {
    pub config_path: PathBuf,
    pub config: Arc<Config>,
    pub state: State,
    pub vms: BTreeMap<VmName, Slot>,
    pub ctx: Arc<Ctx>,
    pub durability: Durability,
    /// `run-due --now` and `--now` on the API are allowed (tests only).
    pub test_clock: bool,
    /// The last delivery failure of the hook, for `status`.
    pub delivery_error: Option<(u64, String)>,
    /// The plan of the last pass, for `status` (pending changes, refusals).
    pub last_plan: Option<Plan>,
    pub started_at: DateTime<Utc>,
    pub(super) tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    persist_tx: watch::Sender<persist::Snapshot>,
    outbox_tx: watch::Sender<Outbox>,
    timers_tx: watch::Sender<TimerPlan>,
    resync_tx: mpsc::UnboundedSender<resync::Request>,
    next_op: u64,
    next_resync: u64,
    ticks: u32,
    next_tick: Instant,
    dirty: bool,
    waiters: Vec<Waiter>,
    parked: Vec<Parked>,
    /// VMs whose deletion ended (cancelled or the name released) since the daemon started:
    /// their timers are still removed although the VMs are no longer ours.
    pub retired: BTreeSet<VmName>,
    timers_sent: u64,
    timers_synced: u64,
    timer_argv: Vec<String>,
    silences_tx: watch::Sender<SilencePlan>,
    /// `createdBy` of this daemon's silences.
    pub silence_creator: String,
    /// This host's name, for owner records.
    pub hostname: String,
    /// The wall clock and the monotonic clock at the last pass, to notice a jump.
    clocks: (DateTime<Utc>, Instant),
    /// The wall clock jumped forward by this much before this pass.
    clock_jump: Option<chrono::TimeDelta>,
    /// Held destructive stages already said in the journal.
    announced_holds: BTreeSet<String>,
    /// Since when, and why, Alertmanager cannot be reached (for `status` and the metrics).
    pub alertmanager_error: Option<(DateTime<Utc>, String)>,
    /// Counts per VM since the daemon started, for the metrics.
    pub counters: BTreeMap<VmName, VmCounters>,
    /// Pass and grow durations, for the metrics.
    pub histograms: Histograms,
    /// The groups API requests are judged by (each connection resolves them).
    pub groups_tx: watch::Sender<Arc<Vec<GroupName>>>,
}

/// The channels the loop talks to its tasks through, made by startup.
pub(super) struct Channels {
    pub tx: mpsc::UnboundedSender<Event>,
    pub rx: mpsc::UnboundedReceiver<Event>,
    pub persist_tx: watch::Sender<persist::Snapshot>,
    pub outbox_tx: watch::Sender<Outbox>,
    pub timers_tx: watch::Sender<TimerPlan>,
    pub resync_tx: mpsc::UnboundedSender<resync::Request>,
    pub silences_tx: watch::Sender<SilencePlan>,
}

impl Daemon {
    pub(super) fn new(
        config_path: PathBuf,
        config: Arc<Config>,
        state: State,
        ctx: Arc<Ctx>,
        ch: Channels,
        test_clock: bool,
    ) -> Daemon {
        let config_abs = std::path::absolute(&config_path).unwrap_or_else(|_| config_path.clone());
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "vmkeeper".into());
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
        let groups_tx = watch::channel(super::projects::groups(&config)).0;
        Daemon {
            config_path,
            config,
            state,
            vms: BTreeMap::new(),
            ctx,
            durability: Durability::default(),
            test_clock,
            delivery_error: None,
            last_plan: None,
            started_at: Utc::now(),
            tx: ch.tx,
            rx: ch.rx,
            persist_tx: ch.persist_tx,
            outbox_tx: ch.outbox_tx,
            timers_tx: ch.timers_tx,
            resync_tx: ch.resync_tx,
            next_op: 1,
            next_resync: 1,
            ticks: 0,
            next_tick: Instant::now() + TICK,
            dirty: true,
            waiters: vec![],
            parked: vec![],
            retired: BTreeSet::new(),
            timers_sent: 0,
            timers_synced: 0,
            timer_argv: vec![
                exe,
                "run-due".into(),
                "--config".into(),
                config_abs.display().to_string(),
            ],
            silences_tx: ch.silences_tx,
            silence_creator: format!("vmkeeper on {hostname}"),
            hostname,
            clocks: (Utc::now(), Instant::now()),
            clock_jump: None,
            announced_holds: BTreeSet::new(),
            alertmanager_error: None,
            counters: BTreeMap::new(),
            histograms: Histograms::default(),
            groups_tx,
        }
    }

    /// The loop: handle what arrived, plan if anything changed, hand effects to tasks.
    pub(super) async fn run(mut self) -> Result<()> {
        loop {
            if self.dirty {
                self.dirty = false;
                self.watch_clock();
                self.pass(Utc::now());
                self.clock_jump = None;
            }
            self.flush();
            let wake = self.next_wake();
            let event = tokio::select! {
                e = self.rx.recv() => e,
                () = tokio::time::sleep_until(wake.into()) => Some(Event::Tick),
            };
            let mut next = event;
            while let Some(e) = next {
                match e {
                    Event::Terminate => return Ok(()),
                    Event::SystemdGone => anyhow::bail!("lost the connection to systemd"),
                    e => self.handle(e),
                }
                next = self.rx.try_recv().ok();
            }
            self.expire(Instant::now());
        }
    }

    pub(super) fn changed(&mut self) {
        self.durability.generation += 1;
    }

    /// Notices the wall clock jumping forward against the monotonic clock (a late NTP step,
    /// an operator's `date -s`): the pass right after such a jump runs no destructive stage.
    fn watch_clock(&mut self) {
        let (wall, mono) = (Utc::now(), Instant::now());
        let (last_wall, last_mono) = self.clocks;
        let elapsed = chrono::TimeDelta::from_std(mono - last_mono).unwrap_or_default();
        let jump = (wall - last_wall) - elapsed;
        if jump > CLOCK_JUMP {
            warn!(
                message_id = Journal::OperationFailed.message_id(),
                action = "clock",
                "the wall clock jumped forward by {} s against the monotonic clock; no \
                 destructive deletion stage runs in this pass",
                jump.num_seconds()
            );
            self.clock_jump = Some(jump);
        }
        self.clocks = (wall, mono);
    }

    /// Asks for a pass once the current events are handled.
    pub(super) fn dirty_pass(&mut self) {
        self.dirty = true;
    }

    /// Hands the newest state to the writer, the outbox to the notifier and the timer plan
    /// to the timers task, when they changed.
    pub(super) fn flush(&mut self) {
        if self.durability.generation > self.durability.sent {
            self.durability.sent = self.durability.generation;
            let snapshot = Arc::new(self.state.clone());
            self.persist_tx
                .send_replace(Some((self.durability.generation, snapshot)));
            let outbox = Outbox {
                hooks: Hooks::of(&self.config),
                notices: Arc::new(self.state.outbox.clone()),
            };
            self.outbox_tx.send_if_modified(|o| {
                let modified = o.notices != outbox.notices || o.hooks != outbox.hooks;
                if modified {
                    *o = outbox;
                }
                modified
            });
            let plan = TimerPlan {
                wanted: timers::desired(&self.state, |vm| self.zone(vm), Utc::now()),
                ours: self.ours().union(&self.retired).cloned().collect(),
                argv: self.timer_argv.clone(),
                generation: self.durability.generation,
            };
            let sent = self.timers_tx.send_if_modified(|p| {
                let modified = !p.same_timers(&plan);
                if modified {
                    *p = plan;
                }
                modified
            });
            if sent {
                self.timers_sent = self.durability.generation;
            }
            let silences = self.silence_plan();
            self.silences_tx.send_if_modified(|p| {
                let modified = *p != silences;
                if modified {
                    *p = silences;
                }
                modified
            });
        }
    }

    /// VMs this daemon is responsible for: declared, on record, or being deleted.
    pub(super) fn ours(&self) -> BTreeSet<VmName> {
        self.config
            .vms
            .keys()
            .chain(self.state.vms.keys())
            .chain(self.state.deletions.keys())
            .cloned()
            .collect()
    }

    pub(super) fn slot(&mut self, vm: &VmName) -> &mut Slot {
        self.vms
            .entry(vm.clone())
            .or_insert_with(|| Slot::new(vm.clone()))
    }

    fn next_wake(&self) -> Instant {
        self.vms
            .values()
            .flat_map(|s| {
                s.sup
                    .next_wake()
                    .into_iter()
                    .chain(s.waiting.as_ref().map(|w| w.since + w.timeout))
            })
            .chain(self.parked.iter().map(|p| p.deadline))
            .chain(
                self.waiters
                    .iter()
                    .filter(|w| w.ops.is_empty())
                    .map(|w| w.since + ANNOUNCEMENT_WAIT),
            )
            .filter(|t| *t > Instant::now())
            .fold(self.next_tick, Instant::min)
    }

    fn handle(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Unit { vm, seen } => {
                if self.ours().contains(&vm) {
                    let d = self.slot(&vm).sup.unit_event(&seen, now);
                    self.decide(&vm, d);
                }
            }
            Event::UnitRemoved { vm } => {
                if let Some(slot) = self.vms.get_mut(&vm) {
                    let d = slot.sup.unit_removed();
                    self.decide(&vm, d);
                }
            }
            Event::Lagged => {
                warn!(
                    message_id = Journal::OperationFailed.message_id(),
                    action = "resync",
                    "systemd signals were lost: looking at every unit again"
                );
                self.request_resync(true);
            }
            Event::Resynced(report) => self.resynced(report, now),
            Event::ResyncFailed(e) => warn!(
                message_id = Journal::OperationFailed.message_id(),
                action = "resync",
                "cannot list the VM units: {e}"
            ),
            Event::Qmp {
                vm,
                instance: Some(instance),
                event,
            } => self.qmp_event(&vm, &instance, event, now),
            Event::Qmp { instance: None, .. } => {}
            Event::Link {
                vm,
                instance: Some(instance),
                connected,
            } => self.link_event(&vm, &instance, connected, now),
            Event::Link { instance: None, .. } => {}
            Event::Op { vm, id, report } => self.op_report(&vm, id, report, now),
            Event::Persisted { generation } => self.persisted(generation),
            Event::PersistFailed { generation, error } => self.persist_failed(generation, &error),
            Event::Delivered { id } => {
                self.state.outbox.retain(|n| n.id != id);
                self.delivered(id, Utc::now());
                if self.delivery_error.as_ref().is_some_and(|(i, _)| *i == id) {
                    self.delivery_error = None;
                }
                self.changed();
            }
            Event::DeliveryFailed { id, error } => {
                let vm = self
                    .state
                    .outbox
                    .iter()
                    .find(|n| n.id == id)
                    .and_then(|n| n.event["vm"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                warn!(
                    message_id = Journal::OperationFailed.message_id(),
                    vm = vm.as_str(),
                    action = "notify",
                    "notification hook failed: {error}; retrying"
                );
                if let Some(n) = self.state.outbox.iter_mut().find(|n| n.id == id) {
                    n.attempts += 1;
                    n.last_error = Some(error.clone());
                }
                self.delivery_error = Some((id, error));
                self.changed();
            }
            Event::Api {
                request,
                caller,
                groups,
                reply,
            } => self.api(request, &caller, &groups, reply),
            Event::Metrics { reply } => self.scrape(reply),
            Event::Silences(report) => self.silences_report(report),
            Event::TimersSynced { generation } => {
                self.timers_synced = self.timers_synced.max(generation);
                self.unpark(now);
            }
            Event::ConfigLoaded { result, reply } => self.config_loaded(*result, reply),
            Event::Reload => self.load_config(None),
            Event::Tick => {
                if now >= self.next_tick {
                    self.ticks += 1;
                    self.next_tick = now + TICK;
                    self.request_resync(self.ticks.is_multiple_of(FULL_EVERY));
                }
                self.dirty = true;
            }
            Event::Terminate | Event::SystemdGone => {}
        }
    }

    /// Reads the configuration off the loop; the result comes back as an event.
    pub(super) fn load_config(&mut self, reply: Option<oneshot::Sender<Response>>) {
        let path = self.config_path.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || crate::config::load(&path)).await;
            let result = match result {
                Ok(r) => r,
                Err(e) => Err(crate::config::LoadError::Read {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e),
                }),
            };
            let _ = tx.send(Event::ConfigLoaded {
                result: Box::new(result),
                reply,
            });
        });
    }

    fn config_loaded(
        &mut self,
        result: Result<crate::config::Checked, crate::config::LoadError>,
        reply: Option<oneshot::Sender<Response>>,
    ) {
        match result {
            Ok(c) => {
                info!("configuration reloaded: {} VM(s)", c.config.vms.len());
                for w in &c.warnings {
                    warn!("configuration: {w}");
                }
                if c.config.metrics_listen != self.config.metrics_listen {
                    // The listener is bound once, at start (where a taken port fails loudly).
                    warn!(
                        "configuration: metrics.listen changed; the metrics listener keeps its \
                         address until the daemon restarts"
                    );
                }
                self.config = Arc::new(c.config);
                self.groups_tx
                    .send_replace(super::projects::groups(&self.config));
                for slot in self.vms.values_mut() {
                    slot.outdated_argv = None;
                }
                self.changed();
                let ops = self.pass(Utc::now());
                if let Some(reply) = reply {
                    let ok = serde_json::json!({ "reloaded": true, "operations": ops.len() });
                    self.wait_for_world(ops, ok, reply);
                }
            }
            Err(e) => {
                // Every problem with its field path, as check-config prints them.
                let problems = match &e {
                    crate::config::LoadError::Invalid { problems, .. } => problems
                        .iter()
                        .map(|p| format!("; {p}"))
                        .collect::<String>(),
                    crate::config::LoadError::Read { .. } => String::new(),
                };
                let msg =
                    format!("configuration not reloaded, keeping the old one: {e:#}{problems}");
                warn!(message_id = Journal::OperationFailed.message_id(), "{msg}");
                if let Some(reply) = reply {
                    let _ = reply.send(Response::Error(msg));
                }
            }
        }
    }

    pub(super) fn request_resync(&mut self, full: bool) {
        let vms = self
            .ours()
            .into_iter()
            .map(|vm| {
                let slot = self.slot(&vm);
                let (up, pid) = match &slot.sup.unit {
                    crate::supervisor::Unit::Up { instance, pid, .. } => {
                        (Some(instance.clone()), *pid)
                    }
                    _ => (None, None),
                };
                let belief = resync::Belief {
                    up,
                    pid,
                    epoch: slot.sup.epoch,
                };
                (vm, belief)
            })
            .collect();
        let id = self.next_resync;
        self.next_resync += 1;
        let _ = self.resync_tx.send(resync::Request { id, full, vms });
    }

    fn resynced(&mut self, report: resync::Report, now: Instant) {
        for row in report.rows {
            let Some(slot) = self.vms.get_mut(&row.vm) else {
                continue;
            };
            if slot.sup.epoch != row.epoch {
                // The view changed since the look was asked for: this row is older news.
                continue;
            }
            slot.binary_replaced = row.binary_replaced;
            let d = slot.sup.unit_event(&row.seen, now);
            if let crate::supervisor::Unit::Up { pid, .. } = &mut slot.sup.unit
                && pid.is_none()
            {
                *pid = row.pid;
            }
            self.decide(&row.vm, d);
        }
        self.dirty = true;
    }

    /// A QMP connection came up or broke; a break of a running QEMU's connection is said in
    /// the journal, and so is its repair.
    fn link_event(&mut self, vm: &VmName, instance: &InvocationId, connected: bool, now: Instant) {
        let Some(slot) = self.vms.get_mut(vm) else {
            return;
        };
        if slot.sup.instance() != Some(instance) {
            return;
        }
        let was_connected = matches!(slot.sup.link, Link::Connected { .. });
        slot.sup.link_event(instance, connected, now);
        match (was_connected, connected, slot.link_lost) {
            (true, false, _) => {
                slot.link_lost = Some(now);
                warn!(
                    message_id = Journal::OperationFailed.message_id(),
                    vm = vm.as_str(),
                    project = self.project(vm).name.as_str(),
                    action = "qmp-lost",
                    reason = "the QMP connection closed while QEMU runs",
                    planned = true,
                    "QMP connection to instance {} lost; reconnecting",
                    instance.short()
                );
            }
            (false, true, Some(lost)) => {
                slot.link_lost = None;
                info!(
                    message_id = Journal::OperationFailed.message_id(),
                    vm = vm.as_str(),
                    project = self.project(vm).name.as_str(),
                    action = "qmp-reconnected",
                    planned = true,
                    "QMP connection to instance {} re-established after {:.1} s",
                    instance.short(),
                    now.saturating_duration_since(lost).as_secs_f64()
                );
            }
            _ => {}
        }
    }

    fn qmp_event(&mut self, vm: &VmName, instance: &InvocationId, event: QmpEvent, now: Instant) {
        let Some(slot) = self.vms.get_mut(vm) else {
            return;
        };
        match event {
            QmpEvent::Reset {
                guest: true,
                reason,
            } => {
                let d = slot.sup.guest_reset(instance, &reason, now);
                self.decide(vm, d);
            }
            QmpEvent::Shutdown {
                guest: true,
                reason,
            } => slot.sup.guest_shutdown(instance, &reason),
            _ => {}
        }
    }

    /// Carries out the supervisor's decisions.
    pub(super) fn decide(&mut self, vm: &VmName, decisions: Vec<Decision>) {
        for d in decisions {
            match d {
                Decision::Alarm {
                    kind,
                    instance,
                    detail,
                } => self.alarm(vm, kind, instance, &detail),
                Decision::Ended {
                    kind,
                    instance,
                    detail,
                } => self.ended(vm, kind, instance, detail),
                Decision::Adopted { instance } => {
                    self.journal(
                        Journal::VmAdopted,
                        vm,
                        "adopt",
                        "started outside vmkeeper",
                        &format!(
                            "a QEMU vmkeeper did not start runs (instance {}); taken over",
                            instance.as_ref().map_or("?", InvocationId::short)
                        ),
                    );
                }
                Decision::Connect { instance } => self.connect(vm, instance),
                Decision::Disconnect => self.slot(vm).drop_link(),
                Decision::Resync => self.request_resync(false),
            }
        }
        self.sync_record(vm);
        self.dirty = true;
    }

    /// Keeps the record's `running` and `instance` in line with the supervisor's view.
    fn sync_record(&mut self, vm: &VmName) {
        let Some(slot) = self.vms.get(vm) else {
            return;
        };
        let (running, instance) = match &slot.sup.unit {
            crate::supervisor::Unit::Up { instance, .. } => (true, instance.clone()),
            crate::supervisor::Unit::Down { last } => (false, last.clone()),
            crate::supervisor::Unit::Unknown => return,
        };
        if let Some(r) = self.state.vms.get_mut(vm)
            && (r.running != running || (instance.is_some() && r.instance != instance))
        {
            r.running = running;
            if instance.is_some() {
                r.instance = instance;
            }
            self.changed();
        }
    }

    /// Opens the QMP connection of a VM found running at start.
    pub(super) fn connect_running(&mut self, vm: &VmName) {
        let instance = self.slot(vm).sup.instance().cloned();
        self.connect(vm, instance);
    }

    fn connect(&mut self, vm: &VmName, instance: Option<InvocationId>) {
        let path = VmPaths::new(&self.config.runtime_dir, vm).qmp;
        let tx = self.tx.clone();
        let slot = self.slot(vm);
        slot.drop_link();
        slot.link_task = Some(link::spawn(
            vm.clone(),
            instance,
            path,
            slot.link_tx.clone(),
            tx,
        ));
    }

    /// The current instance ended unplanned: look at how, then alarm.
    fn ended(
        &mut self,
        vm: &VmName,
        kind: UnplannedKind,
        instance: Option<InvocationId>,
        detail: String,
    ) {
        // An operation that waited for its intent has nothing left to act on.
        if let Some(w) = self.slot(vm).waiting.take() {
            self.drop_intent_of(vm, w.kind);
            self.op_finished(w.id, Some("the VM stopped by itself first"));
        }
        if self.slot(vm).busy() {
            self.alarm(vm, kind, instance, &detail);
            return;
        }
        self.slot(vm).pending_alarm = Some((kind, instance, detail));
        let unit = systemd::vm_unit_name(vm.as_str());
        self.spawn_op(vm, OpKind::Inspect, Job::Inspect { unit });
    }

    /// Raises an alarm: journal at alert priority, the VM's record, the hook.
    pub(super) fn alarm(
        &mut self,
        vm: &VmName,
        kind: UnplannedKind,
        instance: Option<InvocationId>,
        detail: &str,
    ) {
        let now = Utc::now();
        error!(
            message_id = Journal::Unplanned.message_id(),
            vm = vm.as_str(),
            project = self.project(vm).name.as_str(),
            action = kind.as_str(),
            reason = detail,
            planned = false,
            instance = instance.as_ref().map_or("", InvocationId::as_str),
            "ALARM: unplanned {kind} of VM {vm}: {detail}"
        );
        self.count_unplanned(vm, kind);
        if let Some(r) = self.state.vms.get_mut(vm) {
            r.last_unplanned = Some(Unplanned {
                at: now,
                kind,
                detail: detail.to_owned(),
                instance,
            });
        }
        let event = self.hook_event(Journal::Unplanned, vm, kind.as_str(), detail, false, now);
        self.notify(vm, event, now);
    }

    /// Queues `event` about `vm` for its project's hook.
    pub(super) fn notify(
        &mut self,
        vm: &VmName,
        event: serde_json::Value,
        now: DateTime<Utc>,
    ) -> u64 {
        let project = self.project(vm).name.clone();
        let id = self.state.enqueue(&project, event, now);
        self.changed();
        id
    }

    /// The JSON the hook gets for an event about `vm`: it names the VM's project and its
    /// contacts, so one hook can tell each customer, and gives the time in its zone.
    pub(super) fn hook_event(
        &self,
        event: Journal,
        vm: &VmName,
        action: &str,
        reason: &str,
        planned: bool,
        now: DateTime<Utc>,
    ) -> serde_json::Value {
        hook_event(self.project(vm), event, vm, action, reason, planned, now)
    }

    /// One pass: plan for `now` and carry out what the plan says for every VM that is not
    /// busy. Returns the operations it began (for callers that wait for them).
    pub(super) fn pass(&mut self, now: DateTime<Utc>) -> Vec<u64> {
        let began = Instant::now();
        let ops = self.pass_at(now);
        self.observe_pass(began.elapsed());
        ops
    }

    fn pass_at(&mut self, now: DateTime<Utc>) -> Vec<u64> {
        self.sync_projects();
        let observed = self.observed();
        for n in plan::released_removal_holds(&self.config, &self.state) {
            self.state.removal_held.remove(&n);
            self.state.confirmed_removals.remove(&n);
            self.changed();
        }
        let plan = plan::plan(&self.config, &observed, &self.state, now);
        self.report(&plan);
        let mut ops = vec![];
        for action in plan.actions.clone() {
            if let Some(vm) = action_vm(&action).cloned()
                && self.slot(&vm).busy()
            {
                // One operation at a time: the next pass looks again.
                continue;
            }
            if let Some(id) = self.apply(action, now) {
                ops.push(id);
            }
        }
        self.last_plan = Some(plan);
        ops
    }

    /// The world as the supervisors see it, for the planner.
    fn observed(&mut self) -> Observed {
        let clock = &self.config.clock;
        let clock_untrusted = match self.clock_jump {
            Some(j) => Some(format!(
                "the wall clock just jumped forward by {} s",
                j.num_seconds()
            )),
            // One stat of a file on /run (tmpfs) a pass, so the answer is as fresh as the pass.
            None if clock.require_sync && !crate::exec::clock::synchronized(&clock.synced_flag) => {
                Some(format!(
                    "the clock is not known to be synchronized ({} does not exist)",
                    clock.synced_flag.display()
                ))
            }
            None => None,
        };
        let mut observed = Observed {
            vms: BTreeMap::new(),
            clock_untrusted,
        };
        for vm in self.ours() {
            let outdated = self.outdated(&vm);
            let slot = self.slot(&vm);
            let running = slot.sup.unit.is_up();
            let disk_gib = self.state.vms.get(&vm).map(|r| r.applied.disk_gib);
            observed.vms.insert(
                vm,
                ObservedVm {
                    running,
                    disk_gib,
                    outdated: outdated.filter(|_| running),
                },
            );
        }
        observed
    }

    /// Why a VM's running QEMU would be started differently now, if it would.
    fn outdated(&mut self, vm: &VmName) -> Option<String> {
        let config = self.config.clone();
        let record = self.state.vms.get(vm).cloned();
        let slot = self.slot(vm);
        if slot.binary_replaced {
            return Some("the QEMU binary was replaced (upgrade)".into());
        }
        if let Some(cached) = &slot.outdated_argv {
            return cached.clone();
        }
        let why = (|| {
            let record = record?;
            if record.argv.is_empty() {
                return None;
            }
            let spec = config.vms.get(vm)?;
            let argv = qemu_argv(&config, spec, record.applied);
            (argv != record.argv).then(|| {
                if argv[0] != record.argv[0] {
                    format!("QEMU changed from {} to {}", record.argv[0], argv[0])
                } else {
                    "the QEMU command line changed".to_owned()
                }
            })
        })();
        slot.outdated_argv = Some(why.clone());
        why
    }

    /// Journals refusals and pending changes once each, not on every pass.
    fn report(&mut self, plan: &Plan) {
        for vm in &plan.awaiting_removal {
            let key = format!("awaiting-removal {vm}");
            if self.announced_holds.insert(key) {
                warn!(
                    message_id = Journal::Deletion.message_id(),
                    vm = vm.as_str(),
                    action = "removal-held",
                    planned = true,
                    "{vm} was removed from the configuration, awaiting confirmation: more than {} \
                     VMs were removed at once, so none is deleted until confirmed (vmkeeper \
                     confirm-removal {vm}, or removal.confirmed); declare it again to keep it",
                    self.config.removal.max_at_once
                );
            }
        }
        for h in &plan.held {
            let key = format!("{} {} {}", h.vm, h.stage, h.reason);
            if self.announced_holds.insert(key) {
                warn!(
                    message_id = Journal::Deletion.message_id(),
                    vm = h.vm.as_str(),
                    action = "deletion-held",
                    stage = h.stage.as_str(),
                    reason = h.reason.as_str(),
                    planned = true,
                    "deletion stage {} held: {}",
                    h.stage,
                    h.reason
                );
            }
        }
        if plan.held.is_empty() && plan.awaiting_removal.is_empty() {
            self.announced_holds.clear();
        }
        for r in &plan.refusals {
            let text = r.to_string();
            if self.slot(&r.vm).announced_refusals.insert(text.clone()) {
                self.journal(Journal::ChangeRefused, &r.vm, "refuse", &r.message, &text);
            }
        }
        for p in &plan.pending {
            let slot = self.slot(&p.vm);
            if slot.announced_pending != Some(p.to) {
                slot.announced_pending = Some(p.to);
                let text = format!(
                    "CPU/RAM change pending: cores {} -> {}, memoryMiB {} -> {}; reboot in slot {}",
                    p.from.cores, p.to.cores, p.from.memory_mib, p.to.memory_mib, p.slot
                );
                self.journal(Journal::ChangePending, &p.vm, "pending", &text, &text);
            }
        }
    }

    fn apply(&mut self, action: Action, now: DateTime<Utc>) -> Option<u64> {
        let mono = Instant::now();
        match action {
            Action::CreateDisk {
                vm,
                size_gib,
                clone_from,
            } => {
                if self.slot(&vm).sup.backing_off(OpKind::Create, mono, None) {
                    return None;
                }
                let job = Job::Create {
                    disk: self.disk(&vm, now),
                    bytes: size_gib * GIB,
                    clone_from,
                };
                Some(self.spawn_op(&vm, OpKind::Create, job))
            }
            Action::Start { vm, resources } => {
                if self.slot(&vm).sup.backing_off(OpKind::Start, mono, None) {
                    return None;
                }
                self.start(&vm, resources, now)
            }
            Action::Stop { vm, .. } => {
                if self.slot(&vm).sup.backing_off(OpKind::Stop, mono, None) {
                    return None;
                }
                self.stop(&vm, StopReason::Offline, Actor::Vmkeeper, now)
            }
            Action::GrowDisk {
                vm, to_gib, live, ..
            } => {
                if self
                    .slot(&vm)
                    .sup
                    .backing_off(OpKind::Grow, mono, Some(to_gib))
                {
                    return None;
                }
                let link = live.then(|| self.slot(&vm).link_rx());
                let job = Job::Grow {
                    disk: self.disk(&vm, now),
                    bytes: to_gib * GIB,
                    link,
                };
                Some(self.spawn_op(&vm, OpKind::Grow, job))
            }
            Action::MaintenanceReboot { vm, slot } => {
                if self.slot(&vm).sup.backing_off(OpKind::Reboot, mono, None) {
                    return None;
                }
                let kind = RebootKind::Maintenance {
                    slot_start: slot.start.with_timezone(&Utc),
                };
                self.reboot(&vm, kind, Actor::Vmkeeper, now)
            }
            Action::ScheduleMaintenance {
                vm,
                project,
                slot,
                reasons,
                replaces,
            } => {
                self.schedule_maintenance(&vm, &project, slot, &reasons, replaces, now);
                None
            }
            Action::CancelMaintenance { vm, reason } => {
                self.cancel_maintenance(&vm, &reason, now);
                None
            }
            Action::ScheduleDeletion { vm, date, source } => {
                self.schedule_deletion(&vm, date, &source, now);
                None
            }
            Action::HoldRemovals { vms } => {
                self.state.removal_held.extend(vms);
                self.changed();
                None
            }
            Action::UpdateAddresses { vm, addresses } => {
                if let Some(r) = self.state.vms.get_mut(&vm) {
                    r.ip_addresses = addresses;
                    self.changed();
                }
                None
            }
            Action::CancelDeletion { vm, reason } => {
                self.cancel_deletion(&vm, &reason, now);
                None
            }
            Action::RunDeletionStage { vm, stage } => self.run_stage(&vm, stage, now),
        }
    }

    /// The VM's disk, with the owner record a new image of it gets.
    pub(super) fn disk(&self, vm: &VmName, now: DateTime<Utc>) -> ops::Disk {
        ops::Disk {
            pool: self.config.ceph.pool.clone(),
            image: render::image_name(vm).to_owned(),
            vm: vm.to_string(),
            owner: crate::ownership::Owner::new(
                vm.as_str(),
                &self.hostname,
                &now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
        }
    }

    /// The resources a VM starts with now: declared CPU and RAM, the disk as it is.
    pub(super) fn start_resources(&self, spec: &VmSpec) -> Resources {
        let disk = self
            .state
            .vms
            .get(&spec.name)
            .map_or(spec.resources.disk_gib, |r| r.applied.disk_gib);
        Resources {
            disk_gib: disk,
            ..spec.resources
        }
    }

    /// Starts the VM with `resources`: the intent first, the operation once it is on disk.
    pub(super) fn start(
        &mut self,
        vm: &VmName,
        resources: Resources,
        now: DateTime<Utc>,
    ) -> Option<u64> {
        let spec = self.config.vms.get(vm)?.clone();
        let argv = qemu_argv(&self.config, &spec, resources);
        let previous = self.state.vms.get(vm).and_then(|r| r.instance.clone());
        let start = self.qemu_start(&spec, argv.clone());
        self.state.intents.insert(
            vm.clone(),
            Intent::Start {
                resources,
                argv,
                previous,
                at: now,
            },
        );
        self.changed();
        Some(self.spawn_durable(vm, OpKind::Start, Job::Start(start)))
    }

    /// Stops the VM as planned: the intent first, the operation once it is on disk.
    pub(super) fn stop(
        &mut self,
        vm: &VmName,
        reason: StopReason,
        by: Actor,
        now: DateTime<Utc>,
    ) -> Option<u64> {
        let stop = self.qemu_stop(vm);
        self.state.intents.insert(
            vm.clone(),
            Intent::Stop {
                instance: stop.instance.clone(),
                reason,
                by,
                at: now,
            },
        );
        self.changed();
        Some(self.spawn_durable(vm, OpKind::Stop, Job::Stop(stop)))
    }

    /// A planned cold reboot with the declared CPU and RAM: the intent first.
    pub(super) fn reboot(
        &mut self,
        vm: &VmName,
        kind: RebootKind,
        by: Actor,
        now: DateTime<Utc>,
    ) -> Option<u64> {
        let spec = self.config.vms.get(vm)?.clone();
        let resources = self.start_resources(&spec);
        let argv = qemu_argv(&self.config, &spec, resources);
        let stop = self.qemu_stop(vm);
        let start = self.qemu_start(&spec, argv.clone());
        let failpoints = match kind {
            RebootKind::Maintenance { .. } => "maintenance-reboot",
            RebootKind::Immediate => "reboot-now",
        };
        self.state.intents.insert(
            vm.clone(),
            Intent::Reboot {
                instance: stop.instance.clone(),
                kind,
                resources,
                argv,
                by,
                at: now,
            },
        );
        self.changed();
        let job = Job::Reboot {
            stop,
            start,
            failpoints,
        };
        Some(self.spawn_durable(vm, OpKind::Reboot, job))
    }

    pub(super) fn qemu_stop(&mut self, vm: &VmName) -> QemuStop {
        let grace = self
            .config
            .qemu
            .stop_timeout
            .to_std()
            .unwrap_or(Duration::from_secs(60));
        let slot = self.slot(vm);
        QemuStop {
            unit: systemd::vm_unit_name(vm.as_str()),
            instance: slot.sup.instance().cloned(),
            grace,
            link: slot.link_rx(),
            tap: vm.tap_name(),
        }
    }

    /// The unit that runs `spec`'s QEMU with `argv`, in its sandbox, and what to prepare for it.
    pub(super) fn qemu_start(&mut self, spec: &VmSpec, argv: Vec<String>) -> QemuStart {
        let vm = &spec.name;
        let paths = VmPaths::new(&self.config.runtime_dir, vm);
        let unit = systemd::vm_unit_name(vm.as_str());
        let mut service = TransientService::new(&unit, format!("vmkeeper VM {vm}"), argv);
        service
            .environment
            .push(("VMKEEPER_VM".into(), vm.to_string()));
        service.stop = StopPolicy {
            timeout: self
                .config
                .qemu
                .stop_timeout
                .to_std()
                .unwrap_or(Duration::from_secs(60)),
            ..StopPolicy::default()
        };
        service.properties = sandbox::qemu_unit_properties(&self.config, spec, &paths);
        QemuStart {
            service,
            files: ops::VmFiles {
                vms_dir: self.config.runtime_dir.join("vms"),
                dir: paths.dir.clone(),
                user: self.config.qemu.user.clone(),
            },
            tap: spec
                .network
                .as_ref()
                .map(|n| (vm.tap_name(), n.bridge.clone())),
            stale: vec![paths.qmp.clone(), paths.serial_socket.clone()],
            disk: self.disk(vm, Utc::now()),
            link: self.slot(vm).link_rx(),
        }
    }

    fn op_timeout(&self, kind: OpKind) -> Duration {
        let stop = self
            .config
            .qemu
            .stop_timeout
            .to_std()
            .unwrap_or(Duration::from_secs(60))
            + Duration::from_secs(180);
        let start = Duration::from_secs(600);
        match kind {
            OpKind::Create | OpKind::Grow => Duration::from_secs(300),
            OpKind::Start => start,
            OpKind::Stop | OpKind::Stage(_) => stop + Duration::from_secs(300),
            OpKind::Reboot => stop + start,
            OpKind::Inspect => Duration::from_secs(60),
        }
    }

    fn new_op_id(&mut self) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        id
    }

    /// Spawns an operation now.
    pub(super) fn spawn_op(&mut self, vm: &VmName, kind: OpKind, job: Job) -> u64 {
        let id = self.new_op_id();
        self.launch(vm, id, kind, job);
        id
    }

    fn launch(&mut self, vm: &VmName, id: u64, kind: OpKind, job: Job) {
        let timeout = self.op_timeout(kind);
        let ctx = self.ctx.clone();
        let slot = self.slot(vm);
        slot.sup.begin(id, kind, Instant::now(), timeout);
        slot.op_task = Some(ops::spawn(ctx, vm.clone(), id, job));
    }

    /// Spawns an operation once the state as it is now is on disk.
    pub(super) fn spawn_durable(&mut self, vm: &VmName, kind: OpKind, job: Job) -> u64 {
        let id = self.new_op_id();
        let generation = self.durability.generation;
        if self.durability.durable >= generation {
            self.launch(vm, id, kind, job);
        } else {
            let timeout = PERSIST_WAIT;
            self.slot(vm).waiting = Some(Waiting {
                id,
                kind,
                job,
                generation,
                since: Instant::now(),
                timeout,
            });
        }
        id
    }

    fn persisted(&mut self, generation: u64) {
        self.durability.durable = self.durability.durable.max(generation);
        self.unpark(Instant::now());
        if let Some((since, _)) = self.durability.failing.take() {
            warn!(
                message_id = Journal::StateWritable.message_id(),
                action = "persist",
                "the state is written again (it could not be since {since})"
            );
        }
        let ready: Vec<VmName> = self
            .vms
            .iter()
            .filter(|(_, s)| {
                s.waiting
                    .as_ref()
                    .is_some_and(|w| w.generation <= generation)
            })
            .map(|(vm, _)| vm.clone())
            .collect();
        for vm in ready {
            if let Some(w) = self.slot(&vm).waiting.take() {
                self.launch(&vm, w.id, w.kind, w.job);
            }
        }
    }

    fn persist_failed(&mut self, generation: u64, error: &str) {
        if self.durability.failing.is_none() {
            // At alert priority: until this clears nothing is stopped and nothing deleted.
            error!(
                message_id = Journal::StateNotWritable.message_id(),
                action = "persist",
                reason = error,
                planned = false,
                "cannot write the state (generation {generation}): {error}; no VM is stopped and \
                 nothing is deleted until it can be written; retrying"
            );
            self.durability.failing = Some((Utc::now(), error.to_owned()));
        }
    }

    /// Gives up operations past their deadline and ones whose intent never reached the disk.
    fn expire(&mut self, now: Instant) {
        self.unpark(now);
        if self
            .waiters
            .iter()
            .any(|w| w.ops.is_empty() && now >= w.since + ANNOUNCEMENT_WAIT)
        {
            self.advance_waiters();
        }
        let overdue: Vec<(VmName, u64, OpKind)> = self
            .vms
            .iter()
            .filter_map(|(vm, s)| s.sup.overdue(now).map(|op| (vm.clone(), op.id, op.kind)))
            .collect();
        for (vm, id, kind) in overdue {
            if let Some(t) = self.slot(&vm).op_task.take() {
                t.abort();
            }
            let timeout = self.op_timeout(kind);
            self.op_report(
                &vm,
                id,
                ops::Report::Done(Err(format!("did not finish within {timeout:?}"))),
                now,
            );
        }
        let stale: Vec<VmName> = self
            .vms
            .iter()
            .filter(|(_, s)| {
                s.waiting
                    .as_ref()
                    .is_some_and(|w| now >= w.since + w.timeout)
            })
            .map(|(vm, _)| vm.clone())
            .collect();
        for vm in stale {
            let Some(w) = self.slot(&vm).waiting.take() else {
                continue;
            };
            self.drop_intent_of(&vm, w.kind);
            let error = "its intent could not be written to the state file".to_owned();
            let slot = self.slot(&vm);
            slot.sup.begin(w.id, w.kind, now, Duration::ZERO);
            let retry = slot.sup.finish(w.id, now, Err(error.clone()), None);
            self.failed(&vm, w.kind.as_str(), &error, retry);
            self.count_failure(&vm, w.kind);
            self.op_finished(w.id, Some(&error));
        }
    }

    /// Removes the intent an operation of `kind` wrote (a deletion stage that stops the VM
    /// writes a stop intent; its stage mark stays until the stage is done).
    fn drop_intent_of(&mut self, vm: &VmName, kind: OpKind) {
        if (kind.stops() || kind.starts()) && self.state.intents.remove(vm).is_some() {
            self.changed();
        }
    }

    fn op_report(&mut self, vm: &VmName, id: u64, report: ops::Report, now: Instant) {
        let Some(op) = self.vms.get(vm).and_then(|s| s.sup.op.clone()) else {
            return;
        };
        if op.id != id {
            // A report of an operation that was given up.
            return;
        }
        match report {
            ops::Report::Started { instance, pid } => {
                let d = self.slot(vm).sup.started(instance.clone(), pid, now);
                self.decide(vm, d);
                self.started(vm, op.kind, instance);
            }
            ops::Report::Stopped { how } => {
                let d = self.slot(vm).sup.stopped();
                self.decide(vm, d);
                self.stopped(vm, op.kind, how);
            }
            ops::Report::Done(result) => {
                let target = match &result {
                    Ok(_) => None,
                    Err(_) if op.kind == OpKind::Grow => {
                        self.config.vms.get(vm).map(|s| s.resources.disk_gib)
                    }
                    Err(_) => None,
                };
                let error = result.as_ref().err().cloned();
                let slot = self.slot(vm);
                slot.op_task = None;
                let retry = slot.sup.finish(id, now, result.clone().map(|_| ()), target);
                match result {
                    Ok(outcome) => self.done(vm, op.kind, outcome, op.started),
                    Err(e) => {
                        self.drop_intent_of(vm, op.kind);
                        if e.contains("cannot shrink") {
                            self.journal(Journal::ChangeRefused, vm, "refuse", &e, &e);
                        } else {
                            self.failed(vm, op.kind.as_str(), &e, retry);
                            self.count_failure(vm, op.kind);
                        }
                        if let Some((kind, instance, detail)) = self.slot(vm).pending_alarm.take() {
                            self.alarm(vm, kind, instance, &detail);
                        }
                    }
                }
                self.op_finished(id, error.as_deref());
                self.dirty = true;
            }
        }
    }

    /// A QEMU an operation started runs: record what it runs with.
    fn started(&mut self, vm: &VmName, kind: OpKind, instance: Option<InvocationId>) {
        let intent = self.state.intents.remove(vm);
        let (resources, argv, why) = match &intent {
            Some(Intent::Start {
                resources, argv, ..
            }) => (*resources, argv.clone(), "declared online".to_owned()),
            Some(Intent::Reboot {
                resources,
                argv,
                kind,
                by,
                ..
            }) => (
                *resources,
                argv.clone(),
                match kind {
                    RebootKind::Maintenance { .. } => "maintenance reboot".to_owned(),
                    RebootKind::Immediate => format!("reboot requested by {by}"),
                },
            ),
            _ => return,
        };
        self.record_started(vm, resources, argv, instance);
        self.journal(
            Journal::VmStarted,
            vm,
            "start",
            &why,
            &format!(
                "VM started with {} vCPU, {} MiB RAM ({why})",
                resources.cores, resources.memory_mib
            ),
        );
        if kind == OpKind::Reboot {
            if let Some(Intent::Reboot { kind, .. }) = &intent {
                self.count_planned_reboot(vm, kind);
            }
            self.reboot_completed(vm, intent.as_ref(), Utc::now());
        }
    }

    /// Records a started QEMU: its resources and command line as applied.
    pub(super) fn record_started(
        &mut self,
        vm: &VmName,
        resources: Resources,
        argv: Vec<String>,
        instance: Option<InvocationId>,
    ) {
        if let Some(r) = self.state.vms.get_mut(vm) {
            r.applied = Resources {
                disk_gib: r.applied.disk_gib,
                ..resources
            };
            r.argv = argv;
            r.running = true;
            if instance.is_some() {
                r.instance = instance;
            }
        }
        let slot = self.slot(vm);
        slot.outdated_argv = None;
        slot.binary_replaced = false;
        slot.announced_pending = None;
        self.changed();
    }

    /// A planned stop happened.
    fn stopped(&mut self, vm: &VmName, kind: OpKind, how: &str) {
        let why = match self.state.intents.get(vm) {
            Some(Intent::Stop { reason, .. }) => reason.to_string(),
            Some(Intent::Reboot { kind, by, .. }) => match kind {
                RebootKind::Maintenance { .. } => "maintenance reboot".to_owned(),
                RebootKind::Immediate => format!("reboot requested by {by}"),
            },
            _ => kind.as_str().to_owned(),
        };
        self.count_planned_stop(vm, kind);
        if matches!(kind, OpKind::Stop) {
            self.state.intents.remove(vm);
        }
        if let Some(r) = self.state.vms.get_mut(vm) {
            r.running = false;
        }
        self.changed();
        self.journal(
            Journal::VmStopped,
            vm,
            "stop",
            &why,
            &format!("VM stopped as planned ({how}): {why}"),
        );
    }

    /// An operation ended well.
    fn done(&mut self, vm: &VmName, kind: OpKind, outcome: ops::Outcome, began: Instant) {
        match outcome {
            ops::Outcome::Created { bytes, created, id } => {
                self.disk_created(vm, bytes, created, id);
            }
            ops::Outcome::Grown { bytes, how } => {
                let from = self.state.vms.get(vm).map_or(0, |r| r.applied.disk_gib);
                let to = bytes / GIB;
                if let Some(r) = self.state.vms.get_mut(vm) {
                    r.applied.disk_gib = to;
                }
                self.changed();
                self.observe_grow(began.elapsed());
                let ms = began.elapsed().as_secs_f64() * 1000.0;
                self.journal(
                    Journal::DiskGrown,
                    vm,
                    "grow-disk",
                    &format!("{from} -> {to} GiB"),
                    &format!("disk grown {from} -> {to} GiB ({how}) in {ms:.1} ms"),
                );
            }
            ops::Outcome::Staged { what, trashed } => match kind {
                OpKind::Stage(stage) => self.stage_done(vm, stage, &what, trashed, Utc::now()),
                _ => self.journal(Journal::DiskGrown, vm, "adopt-disk", &what, &what),
            },
            ops::Outcome::Inspected(exit) => {
                if let Some((kind, instance, detail)) = self.slot(vm).pending_alarm.take() {
                    self.alarm(vm, kind, instance, &format!("{detail} ({exit})"));
                }
            }
            ops::Outcome::Done => {
                // A start or reboot whose QEMU never reported (cannot happen: a start reports
                // before it returns) leaves no intent behind.
                if kind.starts() && self.state.intents.remove(vm).is_some() {
                    self.changed();
                }
            }
        }
    }

    fn disk_created(&mut self, vm: &VmName, bytes: u64, created: bool, id: String) {
        let Some(spec) = self.config.vms.get(vm) else {
            return;
        };
        let gib = bytes / GIB;
        self.state.vms.insert(
            vm.clone(),
            VmRecord {
                applied: Resources {
                    disk_gib: gib,
                    ..spec.resources
                },
                running: false,
                instance: None,
                ip_addresses: spec.ip_addresses.clone(),
                last_unplanned: None,
                argv: vec![],
                image_id: Some(id),
                generation: spec.generation,
            },
        );
        // A new VM of a released name: the tombstone has served.
        self.state.released.remove(vm);
        self.changed();
        let text = if created {
            format!("disk created: {gib} GiB")
        } else {
            format!("disk found and taken: {gib} GiB")
        };
        self.journal(
            Journal::DiskGrown,
            vm,
            "create-disk",
            &format!("{gib} GiB"),
            &text,
        );
    }

    /// Replies to `reply` once every operation in `ops` is done.
    pub(super) fn wait_for(
        &mut self,
        ops: Vec<u64>,
        ok: serde_json::Value,
        reply: oneshot::Sender<Response>,
    ) {
        self.wait(ops, vec![], ok, reply, None, true);
    }

    /// Replies once every operation in `ops` is done, without waiting for the state write:
    /// `reload` changes the world, and its answer says the world matches.
    pub(super) fn wait_for_world(
        &mut self,
        ops: Vec<u64>,
        ok: serde_json::Value,
        reply: oneshot::Sender<Response>,
    ) {
        self.wait(ops, vec![], ok, reply, None, false);
    }

    /// `run-due`: replies once nothing more is due at `now` and what was started is done.
    pub(super) fn wait_until_idle(
        &mut self,
        ops: Vec<u64>,
        now: DateTime<Utc>,
        ok: serde_json::Value,
        reply: oneshot::Sender<Response>,
    ) {
        self.wait(ops, vec![], ok, reply, Some((now, 1)), true);
    }

    fn wait(
        &mut self,
        ops: Vec<u64>,
        errors: Vec<String>,
        ok: serde_json::Value,
        reply: oneshot::Sender<Response>,
        rerun: Option<(DateTime<Utc>, u32)>,
        durable: bool,
    ) {
        if ops.is_empty() {
            let response = if errors.is_empty() {
                Response::Ok(ok)
            } else {
                Response::Error(errors.join("; "))
            };
            if durable {
                self.answer(response, reply);
            } else {
                let _ = reply.send(response);
            }
            return;
        }
        self.waiters.push(Waiter {
            ops: ops.into_iter().collect(),
            errors,
            ok,
            reply,
            rerun,
            durable,
            since: Instant::now(),
        });
    }

    /// Answers once the state as it is now is on disk and the timers show it.
    pub(super) fn answer(&mut self, response: Response, reply: oneshot::Sender<Response>) {
        self.flush();
        self.parked.push(Parked {
            generation: self.timers_sent,
            durable: self.durability.generation,
            deadline: Instant::now() + TIMERS_WAIT,
            response,
            reply,
        });
        self.unpark(Instant::now());
    }

    fn unpark(&mut self, now: Instant) {
        let synced = self.timers_synced;
        let durable = self.durability.durable;
        let (ready, held): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| (p.generation <= synced && p.durable <= durable) || now >= p.deadline);
        self.parked = held;
        for p in ready {
            let _ = p.reply.send(p.response);
        }
    }

    fn op_finished(&mut self, id: u64, error: Option<&str>) {
        for w in &mut self.waiters {
            if w.ops.remove(&id)
                && let Some(e) = error
            {
                w.errors.push(e.to_owned());
            }
        }
        self.advance_waiters();
    }

    /// Answers the waiters whose operations are done; `run-due` plans again at its instant
    /// first, and while an announcement it made waits for the hook (nothing after it can be
    /// due before), it waits for that too, up to [`ANNOUNCEMENT_WAIT`].
    pub(super) fn advance_waiters(&mut self) {
        let (done, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.ops.is_empty());
        self.waiters = waiting;
        let announcing = self
            .state
            .deletions
            .values()
            .any(|d| d.announcement.is_some());
        for mut w in done {
            let Some((now, round)) = w.rerun else {
                self.wait(vec![], w.errors, w.ok, w.reply, None, w.durable);
                continue;
            };
            let ops = if round < MAX_ROUNDS {
                self.pass(now)
            } else {
                vec![]
            };
            if !ops.is_empty() {
                self.wait(
                    ops,
                    w.errors,
                    w.ok,
                    w.reply,
                    Some((now, round + 1)),
                    w.durable,
                );
            } else if announcing && Instant::now() < w.since + ANNOUNCEMENT_WAIT {
                // Parked with no operation: a delivery (or the deadline) advances it.
                w.rerun = Some((now, round + 1));
                self.waiters.push(w);
            } else {
                self.wait(vec![], w.errors, w.ok, w.reply, None, w.durable);
            }
        }
    }
}

/// The JSON the hook gets for an event about `vm` of `project`.
pub(super) fn hook_event(
    project: &Project,
    event: Journal,
    vm: &VmName,
    action: &str,
    reason: &str,
    planned: bool,
    now: DateTime<Utc>,
) -> serde_json::Value {
    serde_json::json!({
        "event": event.as_str(),
        "vm": vm,
        "project": project.name,
        "action": action,
        "reason": reason,
        "planned": planned,
        "at": crate::localtime::rfc3339(now.with_timezone(&project.tz())),
        "contacts": project.contacts,
    })
}

/// The VM an action is about.
fn action_vm(a: &Action) -> Option<&VmName> {
    Some(match a {
        Action::CreateDisk { vm, .. }
        | Action::Start { vm, .. }
        | Action::GrowDisk { vm, .. }
        | Action::Stop { vm, .. }
        | Action::MaintenanceReboot { vm, .. }
        | Action::ScheduleMaintenance { vm, .. }
        | Action::CancelMaintenance { vm, .. }
        | Action::ScheduleDeletion { vm, .. }
        | Action::UpdateAddresses { vm, .. }
        | Action::CancelDeletion { vm, .. }
        | Action::RunDeletionStage { vm, .. } => vm,
        Action::HoldRemovals { .. } => return None,
    })
}

/// The command line a VM's QEMU is started with (program resolved in PATH).
pub(super) fn qemu_argv(config: &Config, spec: &VmSpec, resources: Resources) -> Vec<String> {
    let paths = VmPaths::new(&config.runtime_dir, &spec.name);
    let mut argv = render::qemu_argv(config, spec, resources, &paths);
    argv[0] = super::resolve_program(&argv[0]);
    argv
}
