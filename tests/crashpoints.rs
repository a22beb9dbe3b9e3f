//! A crash at every step: for each failpoint of `vmkeeper::failpoint::ALL`, the daemon is held
//! there, killed with `kill -9` and started again, and with the real components these
//! invariants are checked once it has settled:
//!
//! - `once`: the operation took effect exactly once (QEMU instances counted from systemd's own
//!   "Started" entries: no VM rebooted twice, none restarted by a stop);
//! - `applied`: the change it was for is applied (CPU/RAM, disk size, stopped, the stage);
//! - `alarms`: no alarm for planned work;
//! - `disk`: no disk shrunk, trashed or deleted before its stage;
//! - `notices`: no false announcement (no "cancelled" for a maintenance that happened, the
//!   immediate reboot's one true cancellation, each deletion stage announced once).
//!
//! Each case writes its row to `<target tmp>/crashpoints/`; scripts/test.sh prints the table.

mod support;

use std::process::{Child, Command};
use std::time::Duration;

use chrono::{DateTime, Days, TimeDelta, Utc};
use chrono_tz::Europe::Berlin;
use serde_json::{Value, json};
use support::host::*;
use vmkeeper::deletion::{Schedule, Stage};

const FAILPOINT_WAIT: Duration = Duration::from_secs(120);
const INVARIANTS: [&str; 5] = ["once", "applied", "alarms", "disk", "notices"];

/// One row of the table: the failpoint and each invariant's verdict.
struct Row {
    point: String,
    checks: Vec<(&'static str, bool, String)>,
}

impl Row {
    fn new(point: &str) -> Row {
        Row {
            point: point.to_owned(),
            checks: vec![],
        }
    }

    fn check(&mut self, invariant: &'static str, ok: bool, detail: impl Into<String>) {
        assert!(INVARIANTS.contains(&invariant));
        self.checks.push((invariant, ok, detail.into()));
    }

    /// Writes the row for the table and fails the test if an invariant does not hold.
    fn finish(self) {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("crashpoints");
        std::fs::create_dir_all(&dir).unwrap();
        let cells: Vec<String> = INVARIANTS
            .iter()
            .map(|inv| {
                let mine: Vec<&(&str, bool, String)> =
                    self.checks.iter().filter(|c| c.0 == *inv).collect();
                match mine.iter().all(|c| c.1) {
                    _ if mine.is_empty() => "-".to_owned(),
                    true => "ok".to_owned(),
                    false => "FAIL".to_owned(),
                }
            })
            .collect();
        let line = format!("{}\t{}\n", self.point, cells.join("\t"));
        std::fs::write(dir.join(self.point.replace(':', "_")), &line).unwrap();
        print!("{line}");
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.1)
            .map(|c| format!("{}: {}", c.0, c.2))
            .collect();
        assert!(failed.is_empty(), "{}: {}", self.point, failed.join("; "));
    }
}

/// Runs `vmkeeper ARGS --config C` in the background (it waits on the held daemon).
fn background(host: &Host, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
        .args(args)
        .args(["--config", host.config_path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits for the failpoint, kills the daemon there, reaps the client, starts it again
/// (armed with `next`, if given).
fn crash_at(host: &Host, vm: &str, point: &str, client: Option<Child>, next: Option<&str>) {
    host.wait_failpoint(vm, point, FAILPOINT_WAIT);
    host.kill9_daemon();
    if let Some(mut c) = client {
        let _ = c.wait();
    }
    match next {
        Some(p) => host.start_daemon_at(p),
        None => host.start_daemon(),
    }
}

fn hooks(host: &Host, event: &str) -> Vec<Value> {
    host.hook_events()
        .into_iter()
        .filter(|e| e["event"] == event)
        .collect()
}

fn exec_start(host: &Host, vm: &str) -> String {
    let out = host
        .h
        .systemctl(&["show", "-p", "ExecStart", &Host::vm_unit(vm)]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn instant(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

/// The common checks once a crashed start settled: one QEMU, running, no alarm.
fn started_once(row: &mut Row, host: &Host, vm: &str, disk_gib: u64) {
    host.wait_vmsize(vm, Host::sectors(disk_gib), 0, BOOT);
    wait_until(Duration::from_secs(30), "recorded running", || {
        host.vm_status(vm)["running"] == true
    });
    let starts = host.qemu_starts(vm);
    row.check("once", starts == 1, format!("{starts} QEMU starts"));
    let s = host.vm_status(vm);
    row.check(
        "applied",
        s["applied"]["diskGiB"] == disk_gib && host.state_json()["intents"] == json!({}),
        format!("{s}"),
    );
    row.check(
        "alarms",
        host.count(vm, UNPLANNED) == 0,
        "an alarm for a planned start",
    );
    let size = host.h.image_size(vm);
    row.check("disk", size == disk_gib << 30, format!("{size} bytes"));
}

fn start_case(test: &str, vm: &str, point: &'static str) {
    let mut row = Row::new(point);
    let host = Host::new(test, &[(vm, json!({}))]);
    host.start_daemon_at(point);
    crash_at(&host, vm, point, None, None);
    started_once(&mut row, &host, vm, 30);
    row.finish();
}

#[test]
fn start_before_job() {
    start_case("cp-start-a", "cp-start-a", "start:before-job");
}

#[test]
fn start_after_job() {
    start_case("cp-start-b", "cp-start-b", "start:after-job");
}

#[test]
fn create_after_create() {
    start_case("cp-create", "cp-create", "create:after-create");
}

/// A base image with a protected snapshot to clone from; removed on drop (after the clones).
struct Base<'a> {
    h: &'a support::Harness,
    name: String,
}

impl<'a> Base<'a> {
    fn new(h: &'a support::Harness, name: &str) -> Base<'a> {
        let spec = h.image_spec(name);
        let _ = h.rbd(&["snap", "unprotect", &format!("{spec}@base")]);
        let _ = h.rbd(&["snap", "purge", "--no-progress", &spec]);
        let _ = h.rbd(&["rm", "--no-progress", &spec]);
        h.create_image(name, 30 << 30);
        h.rbd_ok(&["snap", "create", &format!("{spec}@base")]);
        h.rbd_ok(&["snap", "protect", &format!("{spec}@base")]);
        Base {
            h,
            name: name.to_owned(),
        }
    }
}

impl Drop for Base<'_> {
    fn drop(&mut self) {
        let spec = self.h.image_spec(&self.name);
        let _ = self.h.rbd(&["snap", "unprotect", &format!("{spec}@base")]);
        let _ = self.h.rbd(&["snap", "purge", "--no-progress", &spec]);
        let _ = self.h.rbd(&["rm", "--no-progress", &spec]);
    }
}

fn clone_case(test: &str, vm: &str, point: &'static str) {
    let mut row = Row::new(point);
    let base = Base::new(support::harness(), &format!("{vm}-base"));
    {
        let host = Host::new(
            test,
            &[(
                vm,
                json!({ "diskGiB": 40, "image": { "name": base.name, "snapshot": "base" } }),
            )],
        );
        host.start_daemon_at(point);
        crash_at(&host, vm, point, None, None);
        started_once(&mut row, &host, vm, 40);
        let info = host
            .h
            .rbd_ok(&["info", "--format", "json", &host.h.image_spec(vm)]);
        let parent = serde_json::from_str::<Value>(&info).unwrap()["parent"]["image"].clone();
        row.check(
            "applied",
            parent == base.name.as_str(),
            format!("parent {parent}"),
        );
    }
    row.finish();
}

#[test]
fn clone_after_clone() {
    clone_case("cp-clone-a", "cp-clone-a", "clone:after-clone");
}

#[test]
fn clone_after_grow() {
    clone_case("cp-clone-b", "cp-clone-b", "clone:after-grow");
}

/// A host whose VM runs, booted and connected, with the daemon restarted armed at `point`.
fn running(test: &str, vm: &str, point: &str) -> Host {
    let host = Host::new(test, &[(vm, json!({}))]);
    host.start_daemon();
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    wait_until(Duration::from_secs(30), "QMP connected", || {
        host.vm_status(vm)["qmp"] == "connected"
    });
    host.kill9_daemon();
    host.start_daemon_at(point);
    wait_until(Duration::from_secs(30), "adopted and connected", || {
        host.vm_status(vm)["qmp"] == "connected"
    });
    host
}

fn stop_case(test: &str, vm: &str, point: &'static str) {
    let mut row = Row::new(point);
    let mut host = running(test, vm, point);
    host.change(vm, json!({ "online": false }));
    crash_at(&host, vm, point, None, None);
    wait_until(Duration::from_secs(60), "stopped and recorded", || {
        !host.active(&Host::vm_unit(vm)) && host.vm_status(vm)["running"] == false
    });
    wait_until(Duration::from_secs(10), "stop journaled", || {
        host.count(vm, STOPPED) == 1
    });
    let starts = host.qemu_starts(vm);
    row.check("once", starts == 1, format!("{starts} QEMU starts"));
    row.check(
        "applied",
        host.state_json()["intents"] == json!({}),
        format!("{}", host.state_json()["intents"]),
    );
    row.check(
        "alarms",
        host.count(vm, UNPLANNED) == 0,
        "an alarm for a planned stop",
    );
    row.check("disk", host.h.image_size(vm) == 30 << 30, "image changed");
    row.finish();
}

#[test]
fn stop_after_powerdown() {
    stop_case("cp-stop-a", "cp-stop-a", "stop:after-powerdown");
}

#[test]
fn stop_after_stopped() {
    stop_case("cp-stop-b", "cp-stop-b", "stop:after-stopped");
}

/// A running VM with a pending CPU change announced for its maintenance slot.
fn pending(test: &str, vm: &str, point: &str) -> (Host, Value) {
    let mut host = running(test, vm, point);
    host.change(vm, json!({ "cores": 2 }));
    wait_until(Duration::from_secs(20), "announcement", || {
        hooks(&host, "maintenance-scheduled").len() == 1
    });
    let slot = hooks(&host, "maintenance-scheduled")[0]["slot"].clone();
    (host, slot)
}

/// The checks once a crashed reboot settled: two QEMUs in all, the new one with 2 vCPUs.
fn rebooted_once(row: &mut Row, host: &Host, vm: &str) {
    wait_until(BOOT, "rebooted with 2 vCPUs", || {
        let s = host.vm_status(vm);
        s["running"] == true && s["applied"]["cores"] == 2 && s["qmp"] == "connected"
    });
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    let starts = host.qemu_starts(vm);
    row.check("once", starts == 2, format!("{starts} QEMU starts"));
    let exec = exec_start(host, vm);
    let s = host.vm_status(vm);
    row.check(
        "applied",
        exec.contains("-smp 2 ")
            && s["pending"].is_null()
            && s["maintenanceSlot"].is_null()
            && host.state_json()["intents"] == json!({}),
        format!("{s}"),
    );
    row.check(
        "alarms",
        host.count(vm, UNPLANNED) == 0,
        "an alarm for a planned reboot",
    );
    row.check("disk", host.h.image_size(vm) == 30 << 30, "image changed");
}

fn maintenance_case(test: &str, vm: &str, point: &'static str) {
    let mut row = Row::new(point);
    let (host, slot) = pending(test, vm, point);
    let now = (instant(&slot["start"]) + TimeDelta::minutes(1)).to_rfc3339();
    let client = background(&host, &["run-due", "--now", &now]);
    crash_at(&host, vm, point, Some(client), None);
    rebooted_once(&mut row, &host, vm);
    let cancelled = hooks(&host, "maintenance-cancelled");
    let scheduled = hooks(&host, "maintenance-scheduled");
    row.check(
        "notices",
        cancelled.is_empty() && scheduled.len() == 1,
        format!(
            "{} cancelled, {} scheduled",
            cancelled.len(),
            scheduled.len()
        ),
    );
    row.finish();
}

#[test]
fn maintenance_reboot_after_intent() {
    maintenance_case(
        "cp-maint-a",
        "cp-maint-a",
        "maintenance-reboot:after-intent",
    );
}

#[test]
fn maintenance_reboot_after_stop() {
    maintenance_case("cp-maint-b", "cp-maint-b", "maintenance-reboot:after-stop");
}

#[test]
fn maintenance_reboot_after_start() {
    maintenance_case("cp-maint-c", "cp-maint-c", "maintenance-reboot:after-start");
}

fn reboot_now_case(test: &str, vm: &str, point: &'static str) {
    let mut row = Row::new(point);
    let (host, _) = pending(test, vm, point);
    let client = background(&host, &["reboot", vm, "--now"]);
    crash_at(&host, vm, point, Some(client), None);
    rebooted_once(&mut row, &host, vm);
    // The announced maintenance is cancelled once, and truthfully: the reboot made it moot.
    wait_until(Duration::from_secs(10), "cancellation", || {
        !hooks(&host, "maintenance-cancelled").is_empty()
    });
    let cancelled = hooks(&host, "maintenance-cancelled");
    row.check(
        "notices",
        cancelled.len() == 1
            && cancelled[0]["reason"]
                .as_str()
                .unwrap()
                .contains("rebooted at once"),
        format!("{cancelled:?}"),
    );
    row.finish();
}

#[test]
fn reboot_now_after_intent() {
    reboot_now_case("cp-now-a", "cp-now-a", "reboot-now:after-intent");
}

#[test]
fn reboot_now_after_stop() {
    reboot_now_case("cp-now-b", "cp-now-b", "reboot-now:after-stop");
}

#[test]
fn reboot_now_after_start() {
    reboot_now_case("cp-now-c", "cp-now-c", "reboot-now:after-start");
}

fn grow_case(test: &str, vm: &str, point: &'static str) {
    let mut row = Row::new(point);
    let mut host = running(test, vm, point);
    let mark = host.console_len(vm);
    host.change(vm, json!({ "diskGiB": 40 }));
    crash_at(&host, vm, point, None, None);
    host.wait_vmsize(vm, Host::sectors(40), mark, Duration::from_secs(60));
    wait_until(Duration::from_secs(30), "grow recorded", || {
        host.vm_status(vm)["applied"]["diskGiB"] == 40
    });
    let starts = host.qemu_starts(vm);
    row.check("once", starts == 1, format!("{starts} QEMU starts"));
    let grows = host.count(vm, GROWN);
    row.check(
        "applied",
        host.vm_status(vm)["applied"]["diskGiB"] == 40 && grows >= 1,
        format!("{grows} grow entries"),
    );
    row.check(
        "alarms",
        host.count(vm, UNPLANNED) == 0,
        "an alarm for a grow",
    );
    let size = host.h.image_size(vm);
    row.check("disk", size == 40 << 30, format!("{size} bytes"));
    row.finish();
}

#[test]
fn grow_before_resize() {
    grow_case("cp-grow-a", "cp-grow-a", "grow:before-resize");
}

#[test]
fn grow_after_resize() {
    grow_case("cp-grow-b", "cp-grow-b", "grow:after-resize");
}

/// The two failpoints of a deletion stage.
fn deletion_points(stage: Stage) -> (String, String) {
    (
        format!("deletion:{stage}:after-started"),
        format!("deletion:{stage}:after-acted"),
    )
}

/// One VM walks its whole deletion, crashed at both points of every stage.
#[test]
fn every_deletion_stage() {
    let vm = "cp-del";
    let today = Utc::now().with_timezone(&Berlin).date_naive();
    let date = today.checked_add_days(Days::new(10)).unwrap();
    let s = Schedule::new(Berlin, date);
    let mut host = Host::new("cp-del", &[(vm, json!({ "deleteAt": date.to_string() }))]);
    for id in host.trash(vm) {
        host.h
            .rbd_ok(&["trash", "rm", &format!("{}/{id}", host.h.ceph_pool)]);
    }
    host.start_daemon();
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    wait_until(Duration::from_secs(10), "deletion recorded", || {
        host.state_json()["deletions"].get(vm).is_some()
    });
    let mut rows = vec![];
    for stage in Stage::ALL {
        let (started, acted) = deletion_points(stage);
        let (started, acted) = (started.as_str(), acted.as_str());
        if stage == Stage::ReleaseName {
            // Gone from the configuration by now (a still-declared VM would be recreated once
            // its name is free).
            host.config["vms"].as_object_mut().unwrap().remove(vm);
            host.write_config();
        }
        host.kill9_daemon();
        host.start_daemon_at(started);
        let now = (s.at(stage).with_timezone(&Utc) + TimeDelta::minutes(1)).to_rfc3339();
        let client = background(&host, &["run-due", "--now", &now]);
        crash_at(&host, vm, started, Some(client), Some(acted));
        crash_at(&host, vm, acted, None, None);
        wait_until(Duration::from_secs(60), "stage recorded", || {
            host.stage_done(vm, stage.as_str()).len() == 1
                && host.state_json()["deletions"]
                    .get(vm)
                    .is_none_or(|d| d["stageStarted"].is_null())
        });
        for point in [started, acted] {
            let mut row = Row::new(point);
            let done = host.stage_done(vm, stage.as_str()).len();
            row.check("once", done == 1, format!("stage done {done} times"));
            let deletion = host.state_json()["deletions"].get(vm).cloned();
            let applied = match stage {
                Stage::ReleaseName => deletion.is_none(),
                _ => deletion.is_some_and(|d| d["progress"]["last"] == stage.as_str()),
            };
            row.check("applied", applied, format!("{stage}"));
            row.check(
                "alarms",
                host.count(vm, UNPLANNED) == 0,
                "an alarm for a planned deletion",
            );
            let image = host.image_exists(vm);
            let trashed = host.trash(vm).len();
            let disk_ok = match stage {
                Stage::Announce | Stage::Shutdown => image && trashed == 0,
                Stage::Purge => !image && trashed == 1,
                Stage::DeleteBackups | Stage::ReleaseName => !image && trashed == 0,
            };
            row.check(
                "disk",
                disk_ok,
                format!("image {image}, {trashed} in the trash after {stage}"),
            );
            let action = format!("deletion-{stage}");
            let told = host
                .wait_hooks(1, |e| {
                    e["event"] == "deletion" && e["action"] == action.as_str()
                })
                .len();
            row.check("notices", told == 1, format!("{told} notices of {stage}"));
            if stage == Stage::Shutdown {
                row.check(
                    "applied",
                    !host.active(&Host::vm_unit(vm)),
                    "the VM runs after its shutdown stage",
                );
            }
            rows.push(row);
        }
    }
    for row in rows {
        row.finish();
    }
}

/// Every failpoint the daemon has is covered by a case above.
#[test]
fn every_failpoint_has_a_case() {
    let source = include_str!("crashpoints.rs");
    let walked: Vec<String> = Stage::ALL
        .into_iter()
        .flat_map(|s| {
            let (a, b) = deletion_points(s);
            [a, b]
        })
        .collect();
    for point in vmkeeper::failpoint::ALL {
        let case = source.contains(&format!("\"{point}\"")) || walked.iter().any(|w| w == point);
        assert!(case, "no crash case for failpoint {point}");
    }
    println!(
        "{} of {} failpoints covered",
        vmkeeper::failpoint::ALL.len(),
        vmkeeper::failpoint::ALL.len()
    );
}
