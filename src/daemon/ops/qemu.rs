//! Starting, stopping and rebooting a VM's QEMU unit, and reading how a run ended.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::unistd::{Gid, Uid, chown};
use tracing::warn;

use super::{Ctx, LinkRx, Report, Reporter, connection};
use crate::events::Event;
use crate::exec::peer;
use crate::exec::qmp::Qmp;
use crate::exec::systemd::{ActiveState, JobResult, MainExit, TransientService};
use crate::exec::tap;
use crate::failpoint;
use crate::model::InvocationId;

/// How often a stop presses the power button again while the guest has not powered off.
const REPRESS: Duration = Duration::from_secs(10);
/// How long QEMU gets to exit after `quit` before systemd stops the unit.
const QUIT_GRACE: Duration = Duration::from_secs(10);
/// How long a stop waits for a QMP connection that is being re-established before it goes on
/// without one (and so without the ACPI power button).
const LINK_WAIT: Duration = Duration::from_secs(5);
/// How long a start holds its slot of the host-wide bound waiting for QEMU to come up (QMP
/// answering, the machine running).
const READY_WAIT: Duration = Duration::from_secs(30);

/// Where a VM's runtime files live and who may touch them.
#[derive(Debug, Clone)]
pub struct VmFiles {
    /// `<runtimeDir>/vms`: root and QEMU's group may enter it, nobody else.
    pub vms_dir: PathBuf,
    /// The VM's directory: QEMU's user writes its sockets and console log there.
    pub dir: PathBuf,
    /// QEMU's user.
    pub user: String,
}

/// How to start a VM's QEMU.
#[derive(Debug)]
pub struct QemuStart {
    /// The unit and its command line.
    pub service: TransientService,
    /// The runtime directories to prepare first.
    pub files: VmFiles,
    /// The tap device to make and the bridge it joins.
    pub tap: Option<(String, String)>,
    /// Files of an earlier QEMU to remove first (sockets it left).
    pub stale: Vec<PathBuf>,
    /// The disk QEMU attaches: checked to be the VM's own first.
    pub disk: super::Disk,
    /// The VM's QMP connection, to see the new QEMU come up.
    pub link: LinkRx,
}

/// How to stop a VM's QEMU.
#[derive(Debug)]
pub struct QemuStop {
    /// The unit.
    pub unit: String,
    /// The instance to stop.
    pub instance: Option<InvocationId>,
    /// How long the guest gets to power off after the ACPI button.
    pub grace: Duration,
    /// The VM's QMP connection.
    pub link: LinkRx,
    /// The VM's tap device, removed once QEMU is stopped (if there is one).
    pub tap: String,
}

/// Starts QEMU: one slot of the host-wide bound, the unit, then waits until QEMU answers QMP
/// and runs (holding the slot, so a boot storm starts a few QEMUs at a time).
///
/// `before_job` and `after_job` are the failpoints around systemd's start job (the reboots
/// have their own names, and none before the job).
pub async fn start(
    ctx: &Ctx,
    r: &Reporter,
    s: &QemuStart,
    before_job: Option<&str>,
    after_job: &str,
) -> Result<()> {
    let _slot = ctx
        .starts
        .acquire()
        .await
        .context("the start bound is closed")?;
    let (files, tap, stale) = (s.files.clone(), s.tap.clone(), s.stale.clone());
    tokio::task::spawn_blocking(move || prepare(&files, tap.as_ref(), &stale))
        .await
        .context("preparing the VM's files panicked")??;
    // Never attach an image that is not the VM's own (checked before each start: an image
    // can be replaced behind vmkeeper's back while the VM is off).
    super::disk::check_owned(ctx, &s.disk).await?;
    let unit = &s.service.name;
    let _ = ctx.systemd.reset_failed(unit).await;
    if let Some(point) = before_job {
        failpoint::hit(point, r.vm()).await;
    }
    let result = ctx.systemd.start_service(&s.service).await?;
    if result != JobResult::Done {
        anyhow::bail!("the start job of {unit} ended with {result:?}");
    }
    let details = ctx.systemd.service_details(unit).await.ok();
    let instance = details.as_ref().and_then(|d| d.invocation_id.clone());
    let pid = details.as_ref().and_then(|d| d.main_pid);
    failpoint::hit(after_job, r.vm()).await;
    r.send(Report::Started {
        instance: instance.clone(),
        pid,
    });
    let mut link = s.link.clone();
    match connection(&mut link, instance.as_ref(), READY_WAIT).await {
        Some(q) => {
            if let Err(e) = q.query_status().await {
                warn!(
                    message_id = Event::OperationFailed.message_id(),
                    vm = r.vm(),
                    "the new QEMU does not answer query-status: {e}"
                );
            }
        }
        None => warn!(
            message_id = Event::OperationFailed.message_id(),
            vm = r.vm(),
            "no QMP connection to the new QEMU within {READY_WAIT:?}"
        ),
    }
    Ok(())
}

/// Stops QEMU on purpose: the ACPI power button, then `quit`, finally systemd's stop (SIGTERM,
/// then SIGKILL). Reports how. `points` prefixes the stop's own failpoints (`stop`); a reboot
/// has its own and passes `None`.
pub async fn stop(ctx: &Ctx, r: &Reporter, s: &QemuStop, points: Option<&str>) -> Result<()> {
    let mut link = s.link.clone();
    let qmp = connection(&mut link, s.instance.as_ref(), LINK_WAIT).await;
    let mut how = "ACPI power-off";
    let mut stopped = false;
    if let Some(q) = &qmp {
        if q.system_powerdown().await.is_ok() {
            if let Some(p) = points {
                failpoint::hit(&format!("{p}:after-powerdown"), r.vm()).await;
            }
            stopped = press_until_off(ctx, q, &s.unit, s.grace).await;
        }
        if !stopped {
            how = "QMP quit";
            if q.quit().await.is_ok() {
                stopped = wait_inactive(ctx, &s.unit, QUIT_GRACE).await;
            }
        }
    }
    if !stopped {
        how = "systemd stop";
        match ctx.systemd.stop_unit(&s.unit).await {
            Ok(_) => {}
            Err(e) if e.is_no_such_unit() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let _ = ctx.systemd.reset_failed(&s.unit).await;
    let tap_name = s.tap.clone();
    match tokio::task::spawn_blocking(move || tap::remove(&tap_name)).await {
        Ok(Ok(())) => {}
        // A tap left behind is harmless: the next start makes it afresh.
        Ok(Err(e)) => warn!(
            message_id = Event::OperationFailed.message_id(),
            vm = r.vm(),
            "cannot remove the tap device {}: {e}",
            s.tap
        ),
        Err(e) => warn!(vm = r.vm(), "removing the tap device panicked: {e}"),
    }
    if let Some(p) = points {
        failpoint::hit(&format!("{p}:after-stopped"), r.vm()).await;
    }
    r.send(Report::Stopped { how });
    Ok(())
}

/// Makes the VM's directories with their owners and modes, hands files an earlier QEMU left
/// to QEMU's user (an upgrade from a QEMU that ran as root leaves a root-owned console log),
/// removes stale sockets and makes the tap device.
fn prepare(files: &VmFiles, tap: Option<&(String, String)>, stale: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (uid, gid) = peer::user_ids(&files.user)
        .with_context(|| format!("QEMU's user {} does not exist", files.user))?;
    let (uid_, gid_) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    let set = |path: &Path, mode: u32, owner: Option<Uid>, group: Option<Gid>| -> Result<()> {
        chown(path, owner, group).with_context(|| format!("cannot chown {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot chmod {}", path.display()))
    };
    std::fs::create_dir_all(&files.dir)
        .with_context(|| format!("cannot create {}", files.dir.display()))?;
    set(&files.vms_dir, 0o750, Some(Uid::from_raw(0)), gid_)?;
    set(&files.dir, 0o750, uid_, Some(Gid::from_raw(0)))?;
    for f in stale {
        // A socket left by a dead QEMU would make the new one fail to bind.
        let _ = std::fs::remove_file(f);
    }
    for entry in std::fs::read_dir(&files.dir)
        .with_context(|| format!("cannot read {}", files.dir.display()))?
    {
        let path = entry?.path();
        if path.is_file() {
            set(&path, 0o600, uid_, gid_)?;
        }
    }
    if let Some((name, bridge)) = tap {
        tap::create(name, bridge, uid, gid)
            .with_context(|| format!("cannot make the tap device {name} on {bridge}"))?;
    }
    Ok(())
}

/// A planned cold reboot: stop what runs (if anything), start the new QEMU.
pub async fn reboot(
    ctx: &Ctx,
    r: &Reporter,
    stop_: &QemuStop,
    start_: &QemuStart,
    fp: &str,
) -> Result<()> {
    failpoint::hit(&format!("{fp}:after-intent"), r.vm()).await;
    if unit_runs(ctx, &stop_.unit).await? {
        stop(ctx, r, stop_, None).await?;
    } else {
        r.send(Report::Stopped {
            how: "already stopped",
        });
    }
    failpoint::hit(&format!("{fp}:after-stop"), r.vm()).await;
    start(ctx, r, start_, None, &format!("{fp}:after-start")).await
}

/// How the unit's last run ended, for an alarm; clears a failed state so the name is free.
pub async fn inspect(ctx: &Ctx, unit: &str) -> String {
    let detail = match ctx.systemd.service_details(unit).await {
        Ok(d) => match d.main_exit {
            MainExit::Exited(code) => format!("exit status {code}, result {}", d.result),
            MainExit::Killed(sig) => format!("killed by signal {sig}, result {}", d.result),
            MainExit::Dumped(sig) => format!("dumped core on signal {sig}"),
            MainExit::None => format!("result {}", d.result),
        },
        Err(_) => "unit gone".into(),
    };
    let _ = ctx.systemd.reset_failed(unit).await;
    detail
}

async fn unit_runs(ctx: &Ctx, unit: &str) -> Result<bool> {
    let units = ctx.systemd.list_units(&[unit]).await?;
    Ok(units.iter().any(|u| runs(&u.active_state)))
}

fn runs(state: &ActiveState) -> bool {
    matches!(
        state,
        ActiveState::Active
            | ActiveState::Activating
            | ActiveState::Deactivating
            | ActiveState::Reloading
    )
}

/// Waits up to `grace` for the guest to power off, pressing the power button again every
/// `REPRESS`: a guest that is still booting (no button driver or handler yet) drops a press,
/// and a later one is what a person at the console would do. Presses are idempotent for a
/// guest that is already shutting down.
async fn press_until_off(ctx: &Ctx, q: &Qmp, unit: &str, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if wait_inactive(ctx, unit, left.min(REPRESS)).await {
            return true;
        }
        if Instant::now() >= deadline || q.system_powerdown().await.is_err() {
            return false;
        }
    }
}

/// Polls until the unit no longer runs, up to `timeout`.
async fn wait_inactive(ctx: &Ctx, unit: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match unit_runs(ctx, unit).await {
            Ok(false) => return true,
            Ok(true) => {}
            Err(_) => return false,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
