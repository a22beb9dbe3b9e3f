//! Named failpoints: steps where a crash test holds the daemon so it can be killed there.
//!
//! `VMKEEPER_FAILPOINT=<name>[,<name>...]` makes the operation that reaches one of the named
//! points log it (journal, `ACTION=failpoint`) and then wait forever instead of going on; the
//! test kills the daemon with `kill -9` and checks that the restarted one finishes the work
//! exactly once. A name may be qualified with a VM (`<name>@<vm>`) to hold only that VM's
//! operation. Unset (production), every point is a no-op.
//!
//! Not the `fail` crate: its actions (`pause`, `sleep`) block the thread, which would stall
//! every other operation and the event loop of the daemon's runtime; a held operation here is
//! an `await` that never returns, and everything else keeps running.

use std::sync::OnceLock;
use std::time::Duration;

use tracing::warn;

use crate::events::Event;

/// The environment variable that arms failpoints.
pub const ENV: &str = "VMKEEPER_FAILPOINT";

/// Every failpoint, in the order an operation reaches them. The crash-point test covers each
/// of them (tests/crashpoints.rs checks this list against what it ran).
pub const ALL: &[&str] = &[
    // A VM's start: before and after systemd's start job.
    "start:before-job",
    "start:after-job",
    // A planned stop (online = false): ACPI power button sent; unit inactive, not recorded.
    "stop:after-powerdown",
    "stop:after-stopped",
    // A maintenance reboot: intent persisted and the operation begun; QEMU stopped; the new
    // QEMU started but not recorded.
    "maintenance-reboot:after-intent",
    "maintenance-reboot:after-stop",
    "maintenance-reboot:after-start",
    // `vmkeeper reboot NAME --now`: the same three steps.
    "reboot-now:after-intent",
    "reboot-now:after-stop",
    "reboot-now:after-start",
    // A live disk grow: before and after QMP block_resize.
    "grow:before-resize",
    "grow:after-resize",
    // A new thin disk created, not recorded.
    "create:after-create",
    // A disk cloned from a base image, before and after it is grown to the declared size.
    "clone:after-clone",
    "clone:after-grow",
    // Each deletion stage: recorded as started; its act done, not recorded as done.
    "deletion:announce:after-started",
    "deletion:announce:after-acted",
    "deletion:shutdown:after-started",
    "deletion:shutdown:after-acted",
    "deletion:purge:after-started",
    "deletion:purge:after-acted",
    "deletion:delete-backups:after-started",
    "deletion:delete-backups:after-acted",
    "deletion:release-name:after-started",
    "deletion:release-name:after-acted",
];

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Whether `point` is armed for `vm`.
fn is_armed(point: &str, vm: &str) -> bool {
    armed().iter().any(|a| match a.split_once('@') {
        Some((p, v)) => p == point && v == vm,
        None => a == point,
    })
}

/// Warns once at start when failpoints are armed: never in production.
pub fn warn_if_armed() {
    if !armed().is_empty() {
        warn!(
            message_id = Event::OperationFailed.message_id(),
            action = "failpoint",
            "failpoints armed ({ENV}={}): for crash tests only",
            armed().join(",")
        );
    }
}

/// Holds the calling operation forever when `point` is armed for `vm`; returns at once
/// otherwise.
pub async fn hit(point: &str, vm: &str) {
    debug_assert!(ALL.contains(&point), "unknown failpoint {point}");
    if !is_armed(point, vm) {
        return;
    }
    warn!(
        message_id = Event::OperationFailed.message_id(),
        vm,
        action = "failpoint",
        failpoint = point,
        "failpoint {point} reached: the operation waits here to be killed"
    );
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for p in ALL {
            assert!(seen.insert(*p), "{p} twice");
            assert!(
                p.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-' || c == ':'),
                "{p}"
            );
            assert!(p.contains(':'), "{p} names its operation");
        }
    }
}
