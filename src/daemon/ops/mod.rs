//! Operations: the effects of one VM, each run as a task of its own and reported back to the
//! event loop as events (progress, then one result).
//!
//! An operation gets everything it needs when it is spawned ([`Job`]) and never touches the
//! daemon's state: it talks to systemd, QEMU and Ceph, and says what happened. The loop
//! decides what that means (records applied resources, removes a maintenance, raises an alarm).
//! Every step that stops a VM, changes a disk or deletes data passes a named failpoint.

mod deletion;
mod disk;
mod qemu;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore, mpsc, watch};

use super::Event;
use crate::deletion::Stage;
use crate::exec::qmp::Qmp;
use crate::exec::rbd::{Cluster, ClusterOptions, RbdError};
use crate::exec::systemd::Systemd;
use crate::model::{BaseImage, InvocationId, VmName};

pub use disk::Disk;
pub use qemu::{QemuStart, QemuStop, VmFiles};

/// The QMP connection of a VM's current instance, as the connection task publishes it.
#[derive(Debug, Clone)]
pub struct QmpConn {
    /// The instance it talks to.
    pub instance: Option<InvocationId>,
    /// The session.
    pub qmp: Arc<Qmp>,
}

/// A VM's QMP connection as operations see it: `None` while there is none.
pub type LinkRx = watch::Receiver<Option<QmpConn>>;

/// What every operation may use.
#[derive(Debug)]
pub struct Ctx {
    /// The manager.
    pub systemd: Systemd,
    /// The cluster, connected on first use.
    pub ceph: Ceph,
    /// The host-wide bound on QEMUs starting at once.
    pub starts: Arc<Semaphore>,
    /// Where reports go.
    pub events: mpsc::UnboundedSender<Event>,
}

/// A Ceph connection made on first use and kept; a failed connect is retried by the next
/// operation that needs it.
#[derive(Debug)]
pub struct Ceph {
    options: ClusterOptions,
    cluster: Mutex<Option<Cluster>>,
}

impl Ceph {
    /// Not connected yet.
    pub fn new(options: ClusterOptions) -> Ceph {
        Ceph {
            options,
            cluster: Mutex::new(None),
        }
    }

    /// The connected cluster.
    pub async fn get(&self) -> Result<Cluster, RbdError> {
        let mut guard = self.cluster.lock().await;
        if let Some(c) = &*guard {
            return Ok(c.clone());
        }
        let options = self.options.clone();
        let c = tokio::task::spawn_blocking(move || Cluster::connect(&options))
            .await
            .map_err(RbdError::Blocking)??;
        *guard = Some(c.clone());
        Ok(c)
    }
}

/// What an operation does, with all it needs.
#[derive(Debug)]
pub enum Job {
    /// Create the disk, thin or as a clone.
    Create {
        /// The disk.
        disk: Disk,
        /// Size.
        bytes: u64,
        /// Base image to clone.
        clone_from: Option<BaseImage>,
    },
    /// Start QEMU.
    Start(QemuStart),
    /// Stop QEMU gracefully.
    Stop(QemuStop),
    /// Stop (if it runs) and start again; `failpoints` names the kind (`maintenance-reboot`,
    /// `reboot-now`).
    Reboot {
        /// The stop.
        stop: QemuStop,
        /// The start.
        start: QemuStart,
        /// Prefix of the failpoint names.
        failpoints: &'static str,
    },
    /// Grow the disk to `bytes`: live through QMP when `link` is given, else with librbd.
    Grow {
        /// The disk.
        disk: Disk,
        /// Target size.
        bytes: u64,
        /// The running QEMU's connection.
        link: Option<LinkRx>,
    },
    /// Run a deletion stage's act.
    Stage {
        /// The stage.
        stage: Stage,
        /// The VM's QEMU to stop first, if it runs.
        stop: Option<QemuStop>,
        /// The disk.
        disk: Disk,
        /// The purge: how long the trashed image is deferred (until its delete-backups date).
        defer: std::time::Duration,
        /// The id of the VM's image as recorded (the purge trashes this one only).
        image_id: Option<String>,
        /// delete-backups: the id the purge trashed (the only image it deletes).
        trashed: Option<String>,
    },
    /// Mark an existing image as the VM's (`vmkeeper adopt-disk`).
    Adopt {
        /// The disk.
        disk: Disk,
    },
    /// Read how the unit's last run ended, and clear its failed state.
    Inspect {
        /// The unit.
        unit: String,
    },
}

/// A progress report or the result of one operation.
#[derive(Debug)]
pub enum Report {
    /// A QEMU was started: this is the VM's instance now.
    Started {
        /// Its instance.
        instance: Option<InvocationId>,
        /// Its main pid.
        pid: Option<u32>,
    },
    /// The QEMU was stopped, planned, in this way.
    Stopped {
        /// ACPI power-off, QMP quit or systemd stop.
        how: &'static str,
    },
    /// The operation ended.
    Done(Result<Outcome, String>),
}

/// What a successful operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The disk exists with this size (bytes); `created` is false when it existed already.
    Created {
        /// Its size.
        bytes: u64,
        /// Whether this operation made it.
        created: bool,
        /// Its RBD id.
        id: String,
    },
    /// The disk has this size (bytes) now.
    Grown {
        /// Its size.
        bytes: u64,
        /// Live through QMP, with librbd, or already at that size.
        how: &'static str,
    },
    /// A start, stop or reboot completed (its steps were reported).
    Done,
    /// A deletion stage acted; what it did, for the journal.
    Staged {
        /// What was done.
        what: String,
        /// The id of the image moved to the trash (the purge).
        trashed: Option<String>,
    },
    /// How the last run ended.
    Inspected(String),
}

/// Sends an operation's reports to the loop.
#[derive(Debug, Clone)]
pub struct Reporter {
    vm: VmName,
    id: u64,
    events: mpsc::UnboundedSender<Event>,
}

impl Reporter {
    fn send(&self, report: Report) {
        // The loop only goes away when the daemon stops; then nobody needs the report.
        let _ = self.events.send(Event::Op {
            vm: self.vm.clone(),
            id: self.id,
            report,
        });
    }

    fn vm(&self) -> &str {
        self.vm.as_str()
    }
}

/// Runs `job` for `vm` as operation `id` in a task of its own; its reports come back as
/// [`Event::Op`].
pub fn spawn(ctx: Arc<Ctx>, vm: VmName, id: u64, job: Job) -> tokio::task::JoinHandle<()> {
    let reporter = Reporter {
        vm,
        id,
        events: ctx.events.clone(),
    };
    tokio::spawn(async move {
        let result = run(&ctx, &reporter, job).await;
        reporter.send(Report::Done(result.map_err(|e| format!("{e:#}"))));
    })
}

async fn run(ctx: &Ctx, r: &Reporter, job: Job) -> anyhow::Result<Outcome> {
    match job {
        Job::Create {
            disk,
            bytes,
            clone_from,
        } => disk::create(ctx, r, &disk, bytes, clone_from).await,
        Job::Start(start) => {
            qemu::start(ctx, r, &start, Some("start:before-job"), "start:after-job").await?;
            Ok(Outcome::Done)
        }
        Job::Stop(stop) => {
            qemu::stop(ctx, r, &stop, Some("stop")).await?;
            Ok(Outcome::Done)
        }
        Job::Reboot {
            stop,
            start,
            failpoints,
        } => {
            qemu::reboot(ctx, r, &stop, &start, failpoints).await?;
            Ok(Outcome::Done)
        }
        Job::Grow { disk, bytes, link } => disk::grow(ctx, r, &disk, bytes, link).await,
        Job::Stage {
            stage,
            stop,
            disk,
            defer,
            image_id,
            trashed,
        } => {
            let ids = deletion::Ids {
                image: image_id,
                trashed,
            };
            deletion::act(ctx, r, stage, stop.as_ref(), &disk, defer, &ids).await
        }
        Job::Adopt { disk } => disk::adopt(ctx, &disk).await,
        Job::Inspect { unit } => Ok(Outcome::Inspected(qemu::inspect(ctx, &unit).await)),
    }
}

/// Waits up to `timeout` for a QMP connection to `instance` (any instance when `None`).
async fn connection(
    link: &mut LinkRx,
    instance: Option<&InvocationId>,
    timeout: Duration,
) -> Option<Arc<Qmp>> {
    let wait = link.wait_for(|c| {
        c.as_ref()
            .is_some_and(|c| instance.is_none() || c.instance.as_ref() == instance)
    });
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(c)) => c.as_ref().map(|c| c.qmp.clone()),
        _ => None,
    }
}
