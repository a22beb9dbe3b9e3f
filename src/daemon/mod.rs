//! The supervisor daemon: an event loop that owns the state and every VM's supervisor, and
//! the tasks that touch the world for it.
//!
//! ```text
//! systemd signals ─┐                       ┌─► ops (one task per operation, one per VM at a time)
//! QMP events ──────┤                       ├─► link (a QMP connection per QEMU instance)
//! op reports ──────┤                       ├─► persist (state.json, newest generation)
//! API requests ────┼─► Event ─► eventloop ─┼─► notifier (the hook, in order, with retries)
//! resync results ──┤     (routes, plans,   ├─► timers (maintenance and deletion timers)
//! scrapes ─────────┤      never awaits)    ├─► silences (Alertmanager, with retries)
//! SIGHUP, ticks ───┘                       └─► resync (ListUnitsByPatterns on every tick)
//! ```
//!
//! The loop only routes events, asks the pure core (`supervisor`, `plan`) what they mean and
//! hands the effects to tasks; their results come back as events. See
//! docs/development/architecture.md.

mod api;
mod deletion;
mod downtime;
mod eventloop;
mod link;
mod maintenance;
mod metrics;
mod notifier;
mod ops;
mod persist;
mod projects;
pub mod resync;
mod sandbox;
mod scrape;
pub mod silences;
mod startup;
mod status;
mod timers;

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::access::GroupIds;
use crate::api::{Caller, Request, Response};
use crate::config::{Checked, LoadError};
use crate::events::Event as Journal;
use crate::exec::qmp::QmpEvent;
use crate::model::{InvocationId, VmName};
use crate::supervisor::UnitSeen;

pub use status::{HostStatus, Status, VmStatus};

/// Something the event loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// systemd says a VM unit changed (a signal).
    Unit {
        /// The VM.
        vm: VmName,
        /// What its unit shows now, with the instance the change is about.
        seen: UnitSeen,
    },
    /// A VM unit was unloaded.
    UnitRemoved {
        /// The VM.
        vm: VmName,
    },
    /// Signals were lost: look at every unit again.
    Lagged,
    /// The connection to systemd is gone.
    SystemdGone,
    /// A resync's result.
    Resynced(resync::Report),
    /// A resync failed.
    ResyncFailed(String),
    /// An event from a QEMU.
    Qmp {
        /// The VM.
        vm: VmName,
        /// The QEMU instance it came from.
        instance: Option<InvocationId>,
        /// The event.
        event: QmpEvent,
    },
    /// A QMP connection came up or went down.
    Link {
        /// The VM.
        vm: VmName,
        /// The instance it connects to.
        instance: Option<InvocationId>,
        /// Up or down.
        connected: bool,
    },
    /// An operation's progress or result.
    Op {
        /// The VM.
        vm: VmName,
        /// The operation.
        id: u64,
        /// What it says.
        report: ops::Report,
    },
    /// State generation `generation` is on disk.
    Persisted {
        /// The generation.
        generation: u64,
    },
    /// Writing generation `generation` failed (the writer retries).
    PersistFailed {
        /// The generation.
        generation: u64,
        /// Why.
        error: String,
    },
    /// The hook took notification `id`.
    Delivered {
        /// The notification.
        id: u64,
    },
    /// The hook failed on notification `id` (the notifier retries).
    DeliveryFailed {
        /// The notification.
        id: u64,
        /// Why.
        error: String,
    },
    /// A scrape of the metrics listener asks for what the loop knows.
    Metrics {
        /// Where the snapshot goes.
        reply: oneshot::Sender<Arc<crate::metrics::Snapshot>>,
    },
    /// The silences task did something, or could not.
    Silences(silences::Report),
    /// systemd's timers match the plan of this state generation.
    TimersSynced {
        /// The generation.
        generation: u64,
    },
    /// A request on the local API.
    Api {
        /// The request.
        request: Request,
        /// Who asks, as the kernel says.
        caller: Caller,
        /// The ids of the configured groups, looked up for this request.
        groups: GroupIds,
        /// Where the answer goes.
        reply: oneshot::Sender<Response>,
    },
    /// A configuration was read (SIGHUP or `vmkeeper reload`).
    ConfigLoaded {
        /// The configuration or why not.
        result: Box<Result<Checked, LoadError>>,
        /// The `reload` request waiting for it, if any.
        reply: Option<oneshot::Sender<Response>>,
    },
    /// SIGHUP: read the configuration again.
    Reload,
    /// SIGTERM or SIGINT.
    Terminate,
    /// Time passed (a backoff or deadline ran out, or the periodic tick).
    Tick,
}

/// Runs the daemon until SIGTERM.
pub async fn run(config_path: &Path, test_clock: bool) -> Result<()> {
    crate::failpoint::warn_if_armed();
    let daemon = startup::start(config_path, test_clock).await?;
    let result = daemon.run().await;
    info!("vmkeeper daemon stops; VMs keep running");
    result
}

impl eventloop::Daemon {
    /// One structured journal entry about a VM, with its project (`PROJECT=`), so that
    /// `journalctl PROJECT=shop` tells a project's story.
    fn journal(&self, event: Journal, vm: &VmName, action: &str, reason: &str, text: &str) {
        info!(
            message_id = event.message_id(),
            vm = vm.as_str(),
            project = self.project(vm).name.as_str(),
            action,
            reason,
            planned = true,
            "{text}"
        );
    }

    /// Journals a failed operation; `retry` says when it is tried again, if it is.
    fn failed(&self, vm: &VmName, what: &str, error: &str, retry: Option<std::time::Duration>) {
        let next = retry.map_or(String::new(), |d| format!("; next attempt in {d:?}"));
        warn!(
            message_id = Journal::OperationFailed.message_id(),
            vm = vm.as_str(),
            project = self.project(vm).name.as_str(),
            action = what,
            reason = error,
            planned = true,
            "VM {vm}: {what} failed: {error}{next}"
        );
    }
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
