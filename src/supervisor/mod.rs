//! A VM's supervisor as a pure state machine: which QEMU instance runs, which operation is in
//! flight, and what each event about the VM means — planned or unplanned, current or stale.
//!
//! The daemon's event loop feeds it unit signals, resync results, QMP events and the progress
//! of operations, and carries out the [`Decision`]s it returns. Nothing here does I/O or reads
//! the clock: times come in as parameters. Every event names the instance it is about; one
//! about an instance other than the current one is dropped, so nothing from an old QEMU
//! touches a new one.

pub mod recovery;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::deletion::Stage;
use crate::model::{InvocationId, VmName};
use crate::state::UnplannedKind;

pub use recovery::UnitSeen;

/// A guest reboot gives two RESET events (kernel, then firmware); one alarm covers both.
pub const RESET_DEBOUNCE: Duration = Duration::from_secs(10);
/// First wait before retrying an operation that failed; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait between attempts of a failing operation.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A QEMU that ends unplanned sooner than this after its start counts as a failed start, so a
/// VM that crashes at once is restarted on a growing backoff, not in a tight loop.
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);

/// What runs of the VM, as far as the supervisor knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// Not looked at yet (before the first resync).
    Unknown,
    /// No QEMU runs; `last` is the instance that ran last, if known.
    Down {
        /// The instance that ended.
        last: Option<InvocationId>,
    },
    /// A QEMU runs.
    Up {
        /// Its instance (unknown only when systemd would not tell).
        instance: Option<InvocationId>,
        /// Its main pid, when known.
        pid: Option<u32>,
        /// When the supervisor learnt it runs.
        since: Instant,
    },
}

impl Unit {
    /// The running instance: `Some(None)` when one runs whose id is unknown.
    pub fn running(&self) -> Option<Option<&InvocationId>> {
        match self {
            Unit::Up { instance, .. } => Some(instance.as_ref()),
            _ => None,
        }
    }

    /// Whether a QEMU runs.
    pub fn is_up(&self) -> bool {
        matches!(self, Unit::Up { .. })
    }
}

/// The kinds of operations on a VM; at most one runs at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    /// Create or clone the disk.
    Create,
    /// Start QEMU.
    Start,
    /// Stop QEMU as planned (online = false).
    Stop,
    /// A planned cold reboot (maintenance or `reboot --now`).
    Reboot,
    /// Grow the disk.
    Grow,
    /// A deletion stage.
    Stage(Stage),
    /// Read how an unplanned end went (exit status) before raising its alarm.
    Inspect,
}

impl OpKind {
    /// The name in the journal (`ACTION=`) and in `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Create => "create-disk",
            OpKind::Start => "start",
            OpKind::Stop => "stop",
            OpKind::Reboot => "reboot",
            OpKind::Grow => "grow-disk",
            OpKind::Stage(Stage::Announce) => "deletion-announce",
            OpKind::Stage(Stage::Shutdown) => "deletion-shutdown",
            OpKind::Stage(Stage::Purge) => "deletion-purge",
            OpKind::Stage(Stage::DeleteBackups) => "deletion-delete-backups",
            OpKind::Stage(Stage::ReleaseName) => "deletion-release-name",
            OpKind::Inspect => "inspect",
        }
    }

    /// Whether the operation stops the running QEMU (its stop is planned).
    pub fn stops(self) -> bool {
        matches!(
            self,
            OpKind::Stop | OpKind::Reboot | OpKind::Stage(Stage::Shutdown | Stage::Purge)
        )
    }

    /// Whether the operation starts a QEMU (a new instance appearing is its own).
    pub fn starts(self) -> bool {
        matches!(self, OpKind::Start | OpKind::Reboot)
    }
}

/// The operation in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Unique per daemon run; progress and results name it.
    pub id: u64,
    /// What it does.
    pub kind: OpKind,
    /// The instance it stops, for operations that stop one.
    pub target: Option<InvocationId>,
    /// When it began.
    pub started: Instant,
    /// When it is given up (its task aborted): no intent outlives its operation.
    pub deadline: Instant,
}

/// The QMP connection to the current instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// No QEMU runs, so there is nothing to connect to.
    Idle,
    /// Not connected; the connection task retries with backoff.
    Reconnecting {
        /// Since when the VM has been without a connection.
        since: Instant,
    },
    /// Connected.
    Connected {
        /// Since when.
        since: Instant,
    },
}

/// Spaces out the attempts of an operation that keeps failing: none before `not_before`; the
/// wait doubles with each failure (twice [`MIN_BACKOFF`] after the first), up to
/// [`MAX_BACKOFF`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backoff {
    /// Failures in a row.
    pub failures: u32,
    /// No attempt before this.
    pub not_before: Option<Instant>,
    /// What the last failed attempt was for (e.g. a grow's target): a new target is tried at
    /// once.
    pub target: Option<u64>,
    /// The last failure, for `status`.
    pub last_error: Option<String>,
}

impl Backoff {
    /// Whether an attempt for `target` must wait at `now`.
    pub fn waiting(&self, now: Instant, target: Option<u64>) -> bool {
        self.not_before.is_some_and(|t| now < t) && (target.is_none() || target == self.target)
    }

    /// Records a failure; returns the wait before the next attempt.
    pub fn failed(&mut self, now: Instant, target: Option<u64>, error: String) -> Duration {
        if target != self.target {
            self.failures = 0;
        }
        self.failures += 1;
        let delay = MIN_BACKOFF
            .saturating_mul(1 << self.failures.min(16))
            .min(MAX_BACKOFF);
        self.not_before = Some(now + delay);
        self.target = target;
        self.last_error = Some(error);
        delay
    }
}

/// What the event loop must do about an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Raise an alarm now: an unplanned event that needs no further look (a guest reset, a
    /// restart from outside).
    Alarm {
        /// What happened.
        kind: UnplannedKind,
        /// The instance it happened to.
        instance: Option<InvocationId>,
        /// For humans.
        detail: String,
    },
    /// The current instance ended unplanned: look at how (exit status), then raise the alarm.
    Ended {
        /// What kind of end it looks like.
        kind: UnplannedKind,
        /// The instance that ended.
        instance: Option<InvocationId>,
        /// For humans, until the exit status is known.
        detail: String,
    },
    /// A QEMU nobody (vmkeeper or its operation) started runs: it is taken over.
    Adopted {
        /// Its instance.
        instance: Option<InvocationId>,
    },
    /// The instance changed: close the old QMP connection, open one to this instance.
    Connect {
        /// The instance to connect to (unknown id: whatever listens on the VM's socket).
        instance: Option<InvocationId>,
    },
    /// Nothing runs any more: close the QMP connection.
    Disconnect,
    /// The view may be wrong (a unit vanished without saying how): list the units again.
    Resync,
}

/// The supervisor of one VM.
#[derive(Debug, Clone)]
pub struct Supervisor {
    /// The VM.
    pub vm: VmName,
    /// What runs.
    pub unit: Unit,
    /// The operation in flight.
    pub op: Option<Op>,
    /// The QMP connection.
    pub link: Link,
    /// Per kind of operation.
    pub backoff: BTreeMap<OpKind, Backoff>,
    /// Bumped whenever the supervisor's view of the unit changes; a resync result taken
    /// before the change is stale for this VM.
    pub epoch: u64,
    last_reset: Option<(InvocationId, Instant)>,
    guest_shutdown: Option<(InvocationId, String)>,
}

impl Supervisor {
    /// A supervisor that has not looked at the unit yet.
    pub fn new(vm: VmName) -> Supervisor {
        Supervisor {
            vm,
            unit: Unit::Unknown,
            op: None,
            link: Link::Idle,
            backoff: BTreeMap::new(),
            epoch: 0,
            last_reset: None,
            guest_shutdown: None,
        }
    }

    /// Whether an operation is in flight.
    pub fn busy(&self) -> bool {
        self.op.is_some()
    }

    /// The current instance's id, when one runs and its id is known.
    pub fn instance(&self) -> Option<&InvocationId> {
        self.unit.running().flatten()
    }

    fn set_unit(&mut self, unit: Unit) {
        if unit != self.unit {
            self.epoch += 1;
        }
        self.unit = unit;
    }

    /// Whether the operation in flight stops `instance` (so its end is planned).
    fn stopping(&self, instance: Option<&InvocationId>) -> bool {
        self.op.as_ref().is_some_and(|op| {
            op.kind.stops()
                && (op.target.is_none() || instance.is_none() || op.target.as_ref() == instance)
        })
    }

    fn starting(&self) -> bool {
        self.op.as_ref().is_some_and(|op| op.kind.starts())
    }

    /// Takes the unit as a full look at start showed it, without judging: recovery decides
    /// what the look means.
    pub fn init(&mut self, seen: &UnitSeen, pid: Option<u32>, now: Instant) {
        let unit = match seen {
            UnitSeen::Running { instance } => Unit::Up {
                instance: instance.clone(),
                pid,
                since: now,
            },
            UnitSeen::Stopped { instance, .. } => Unit::Down {
                last: instance.clone(),
            },
            UnitSeen::Absent => Unit::Down { last: None },
        };
        self.link = match unit {
            Unit::Up { .. } => Link::Reconnecting { since: now },
            _ => Link::Idle,
        };
        self.set_unit(unit);
    }

    /// An operation begins. Its deadline bounds how long its intent can mark events as
    /// planned.
    pub fn begin(&mut self, id: u64, kind: OpKind, now: Instant, timeout: Duration) {
        debug_assert!(self.op.is_none(), "one operation at a time");
        self.op = Some(Op {
            id,
            kind,
            target: self.instance().cloned(),
            started: now,
            deadline: now + timeout,
        });
    }

    /// The operation `id` ended. On failure its backoff grows; on success it is cleared.
    /// Returns the wait before a retry after a failure.
    pub fn finish(
        &mut self,
        id: u64,
        now: Instant,
        outcome: Result<(), String>,
        target: Option<u64>,
    ) -> Option<Duration> {
        let op = self.op.take_if(|op| op.id == id)?;
        match outcome {
            Ok(()) => {
                // A start only counts as a success once its QEMU has run for a while (see
                // [`Supervisor::unit_event`]); everything else succeeds when it returns.
                if op.kind != OpKind::Start {
                    self.backoff.remove(&op.kind);
                }
                None
            }
            Err(e) => Some(
                self.backoff
                    .entry(op.kind)
                    .or_default()
                    .failed(now, target, e),
            ),
        }
    }

    /// Whether an operation of `kind` (for `target`) must wait for its backoff.
    pub fn backing_off(&self, kind: OpKind, now: Instant, target: Option<u64>) -> bool {
        self.backoff
            .get(&kind)
            .is_some_and(|b| b.waiting(now, target))
    }

    /// The earliest instant something of this VM needs attention: a backoff that ends or an
    /// operation's deadline.
    pub fn next_wake(&self) -> Option<Instant> {
        self.backoff
            .values()
            .filter_map(|b| b.not_before)
            .chain(self.op.as_ref().map(|op| op.deadline))
            .min()
    }

    /// The operation in flight has outlived its deadline.
    pub fn overdue(&self, now: Instant) -> Option<&Op> {
        self.op.as_ref().filter(|op| now >= op.deadline)
    }

    /// An operation started a QEMU: it is the current instance.
    pub fn started(
        &mut self,
        instance: Option<InvocationId>,
        pid: Option<u32>,
        now: Instant,
    ) -> Vec<Decision> {
        let same = self.instance().is_some() && self.instance() == instance.as_ref();
        let pid = pid.or(match &self.unit {
            Unit::Up { pid, .. } if same => *pid,
            _ => None,
        });
        let since = match &self.unit {
            Unit::Up { since, .. } if same => *since,
            _ => now,
        };
        self.set_unit(Unit::Up {
            instance: instance.clone(),
            pid,
            since,
        });
        if same {
            vec![]
        } else {
            self.link = Link::Reconnecting { since: now };
            vec![Decision::Connect { instance }]
        }
    }

    /// An operation stopped the QEMU (planned).
    pub fn stopped(&mut self) -> Vec<Decision> {
        if let Unit::Up { instance, .. } = &self.unit {
            let last = instance.clone();
            self.set_unit(Unit::Down { last });
            self.link = Link::Idle;
            return vec![Decision::Disconnect];
        }
        vec![]
    }

    /// What systemd (a signal or a resync) says of the unit now. `failed` distinguishes a
    /// failed unit from a cleanly stopped one.
    pub fn unit_event(&mut self, seen: &UnitSeen, now: Instant) -> Vec<Decision> {
        match seen {
            UnitSeen::Running { instance } => self.seen_running(instance.as_ref(), now),
            UnitSeen::Stopped { instance, failed } => {
                self.seen_stopped(instance.as_ref(), *failed, now)
            }
            UnitSeen::Absent => {
                let current = self.instance().cloned();
                self.seen_stopped(current.as_ref(), false, now)
            }
        }
    }

    fn seen_running(&mut self, instance: Option<&InvocationId>, now: Instant) -> Vec<Decision> {
        match &self.unit {
            Unit::Up {
                instance: current, ..
            } => {
                let current = current.clone();
                match (current.as_ref(), instance) {
                    (Some(c), Some(i)) if c != i => {
                        if self.starting() {
                            // The operation's own new QEMU, seen before it reported.
                            return self.started(Some(i.clone()), None, now);
                        }
                        let mut d = vec![Decision::Alarm {
                            kind: UnplannedKind::UnitRestarted,
                            instance: current,
                            detail: "the unit was restarted from outside vmkeeper".into(),
                        }];
                        d.extend(self.started(Some(i.clone()), None, now));
                        d
                    }
                    (None, Some(i)) => {
                        // The id was unknown; now it is.
                        self.set_unit(Unit::Up {
                            instance: Some(i.clone()),
                            pid: None,
                            since: now,
                        });
                        vec![Decision::Connect {
                            instance: Some(i.clone()),
                        }]
                    }
                    _ => vec![],
                }
            }
            Unit::Down { last } => {
                if instance.is_some() && last.as_ref() == instance {
                    // A late signal of the instance that ended.
                    return vec![];
                }
                let own = self.starting();
                let mut d = self.started(instance.cloned(), None, now);
                if !own {
                    d.insert(
                        0,
                        Decision::Adopted {
                            instance: instance.cloned(),
                        },
                    );
                }
                d
            }
            Unit::Unknown => {
                let mut d = self.started(instance.cloned(), None, now);
                d.insert(
                    0,
                    Decision::Adopted {
                        instance: instance.cloned(),
                    },
                );
                d
            }
        }
    }

    fn seen_stopped(
        &mut self,
        instance: Option<&InvocationId>,
        failed: bool,
        now: Instant,
    ) -> Vec<Decision> {
        let Unit::Up {
            instance: current,
            since,
            ..
        } = &self.unit
        else {
            if self.unit == Unit::Unknown {
                self.set_unit(Unit::Down {
                    last: instance.cloned(),
                });
            }
            return vec![];
        };
        if let (Some(c), Some(i)) = (current, instance)
            && c != i
        {
            // About an instance that is not the current one: an older one's late news.
            return vec![];
        }
        let (current, since) = (current.clone(), *since);
        let planned = self.stopping(current.as_ref());
        let mut d = self.stopped();
        if planned {
            return d;
        }
        if now.saturating_duration_since(since) < CRASH_LOOP_WINDOW {
            // Ended soon after its start: the start did not really succeed.
            self.backoff.entry(OpKind::Start).or_default().failed(
                now,
                None,
                "QEMU ended right after its start".into(),
            );
        } else {
            self.backoff.remove(&OpKind::Start);
        }
        let guest = self
            .guest_shutdown
            .take()
            .filter(|(i, _)| Some(i) == current.as_ref());
        let (kind, detail) = match guest {
            Some((_, reason)) => (
                UnplannedKind::GuestPoweroff,
                format!("the guest powered itself off ({reason})"),
            ),
            None if failed => (UnplannedKind::QemuExited, "QEMU ended".to_owned()),
            None => (
                UnplannedKind::UnitStopped,
                "the unit was stopped from outside vmkeeper".to_owned(),
            ),
        };
        d.insert(
            0,
            Decision::Ended {
                kind,
                instance: current,
                detail,
            },
        );
        d
    }

    /// The unit was unloaded without a state change seen first (systemd collects stopped
    /// transient units): ask for a resync unless an operation stops it anyway.
    pub fn unit_removed(&mut self) -> Vec<Decision> {
        if !self.unit.is_up() {
            return vec![];
        }
        if self.stopping(self.instance().cloned().as_ref()) {
            return self.stopped();
        }
        vec![Decision::Resync]
    }

    /// The guest reset itself (QMP `RESET`, `guest: true`) in `instance`.
    pub fn guest_reset(
        &mut self,
        instance: &InvocationId,
        reason: &str,
        now: Instant,
    ) -> Vec<Decision> {
        if self.instance() != Some(instance) || self.stopping(Some(instance)) {
            return vec![];
        }
        let repeat = self.last_reset.as_ref().is_some_and(|(i, t)| {
            i == instance && now.saturating_duration_since(*t) < RESET_DEBOUNCE
        });
        self.last_reset = Some((instance.clone(), now));
        if repeat {
            return vec![];
        }
        vec![Decision::Alarm {
            kind: UnplannedKind::GuestReset,
            instance: Some(instance.clone()),
            detail: format!("the guest rebooted itself ({reason})"),
        }]
    }

    /// The guest asked to power off (QMP `SHUTDOWN`, `guest: true`) in `instance`: its end
    /// that follows is a guest poweroff.
    pub fn guest_shutdown(&mut self, instance: &InvocationId, reason: &str) {
        if self.instance() == Some(instance) {
            self.guest_shutdown = Some((instance.clone(), reason.to_owned()));
        }
    }

    /// The QMP connection to `instance` came up or went down.
    pub fn link_event(&mut self, instance: &InvocationId, connected: bool, now: Instant) {
        if self.instance() != Some(instance) {
            return;
        }
        self.link = match (connected, &self.link) {
            (true, Link::Connected { since }) => Link::Connected { since: *since },
            (true, _) => Link::Connected { since: now },
            (false, Link::Reconnecting { since }) => Link::Reconnecting { since: *since },
            (false, _) => Link::Reconnecting { since: now },
        };
    }
}

#[cfg(test)]
mod tests;
