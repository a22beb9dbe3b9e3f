//! The deletion lifecycle against real systemd, Ceph and QEMU, with time driven by
//! `vmkeeper run-due --now` (the command the stage timers run): announce and downtime,
//! shutdown with the disk intact, a cancel that brings the VM back with its disk and
//! addresses, the purge to the RBD trash (finished exactly once after a `kill -9` in the
//! middle), the backups deleted, and the name held until T + 38 days.

mod support;

use std::process::Output;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use chrono_tz::Europe::Berlin;
use serde_json::{Value, json};
use support::host::*;
use vmkeeper::deletion::{Schedule, Stage};
use vmkeeper::localtime::rfc3339;

const AUDIT: &str = "21690075974949ab8ad5f5b8fd76af2b";

/// Today in the configuration's zone (the default, Europe/Berlin).
fn today() -> NaiveDate {
    Utc::now().with_timezone(&Berlin).date_naive()
}

/// One minute after a stage is due.
fn at(s: &Schedule, stage: Stage) -> DateTime<Utc> {
    s.at(stage).with_timezone(&Utc) + TimeDelta::minutes(1)
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339()
}

fn vmk(host: &Host, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
        .args(args)
        .args(["--config", host.config_path().to_str().unwrap()])
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run_due(host: &Host, now: DateTime<Utc>) {
    let o = vmk(host, &["run-due", "--now", &iso(now)]);
    assert!(o.status.success(), "run-due: {}", text(&o));
}

/// `vmkeeper plan --json` for another configuration against this host's state.
fn plan_with(host: &Host, config: &Value, now: DateTime<Utc>) -> Value {
    let path = host.dir.join("plan-config.json");
    std::fs::write(&path, serde_json::to_string(config).unwrap()).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
        .args(["plan", "--json", "--now", &iso(now), "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "plan: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn refusals_of(plan: &Value, vm: &str) -> Vec<String> {
    plan["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["vm"] == vm)
        .map(|r| {
            format!(
                "{}: {}",
                r["field"].as_str().unwrap(),
                r["message"].as_str().unwrap()
            )
        })
        .collect()
}

/// The deletion timers of `vm` that systemd lists.
fn timers(host: &Host, vm: &str) -> Vec<String> {
    let o = host.h.systemctl(&[
        "list-timers",
        "--all",
        "--no-legend",
        "--plain",
        &format!("vmkeeper-delete-{vm}-*"),
    ]);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter(|w| w.ends_with(".timer"))
        .map(str::to_owned)
        .collect()
}

fn timer(vm: &str, stage: &str) -> String {
    format!("vmkeeper-delete-{vm}-{stage}.timer")
}

/// Removes what a previous run on the same harness left: trashed images of that name and
/// the image with its snapshots.
fn clear_leftovers(host: &Host, name: &str) {
    for id in host.trash(name) {
        host.h
            .rbd_ok(&["trash", "restore", &format!("{}/{id}", host.h.ceph_pool)]);
    }
    let spec = host.h.image_spec(name);
    if host.image_exists(name) {
        host.h
            .rbd(&["snap", "unprotect", &format!("{spec}@protected")]);
        host.h.rbd_ok(&["snap", "purge", "--no-progress", &spec]);
        host.h.rbd_ok(&["rm", "--no-progress", &spec]);
    }
}

fn image_id(host: &Host, vm: &str) -> String {
    let info = host
        .h
        .rbd_ok(&["info", "--format", "json", &host.h.image_spec(vm)]);
    serde_json::from_str::<Value>(&info).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The first 4 KiB of the VM's image, read by the host (`rbd export` to a pipe, cut short).
fn first_block(host: &Host, vm: &str) -> Vec<u8> {
    use std::io::Read;
    let mut child = std::process::Command::new("rbd")
        .arg("--conf")
        .arg(&host.h.ceph_conf)
        .args(["--id", &host.h.ceph_client, "export", "--no-progress"])
        .arg(host.h.image_spec(vm))
        .arg("-")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut block = vec![0u8; 4096];
    child.stdout.take().unwrap().read_exact(&mut block).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    block
}

#[test]
fn a_cli_deletion_is_announced_shuts_down_and_a_cancel_brings_the_vm_back() {
    let vm = "del-a";
    let host = Host::new(
        "del-cancel",
        &[(vm, json!({ "ipAddresses": ["192.0.2.71"] }))],
    );
    host.start_daemon();
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    let id = image_id(&host, vm);

    // Today is refused, naming the earliest date; nothing is recorded.
    let o = vmk(&host, &["delete", vm, "--at", &today().to_string()]);
    assert!(!o.status.success());
    let tomorrow = today().succ_opt().unwrap();
    assert!(
        text(&o).contains(&format!("the earliest allowed date is {tomorrow}")),
        "{}",
        text(&o)
    );
    assert!(
        host.state_json()["deletions"]
            .as_object()
            .unwrap()
            .is_empty()
    );

    let d = deletion_date();
    let s = Schedule::new(Berlin, d);
    // Someone outside the authorized group is refused and nothing happens. The socket is
    // world-connectable; the directories above it only need to be traversable for this.
    let socket = host.dir.join("run/api.sock");
    let mut up = socket.parent();
    while let Some(dir) = up.filter(|d| d.starts_with(&host.h.dir)) {
        let o = std::process::Command::new("chmod")
            .arg("o+x")
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "chmod: {}", text(&o));
        up = dir.parent();
    }
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_vmkeeper"))
        .args(["delete", vm, "--at", &d.to_string(), "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("not authorized: "), "{}", text(&o));
    assert!(
        host.state_json()["deletions"]
            .as_object()
            .unwrap()
            .is_empty()
    );
    let o = vmk(&host, &["delete", vm, "--at", &d.to_string()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("purge"), "{}", text(&o));
    assert_eq!(host.state_json()["deletions"][vm]["source"]["kind"], "cli");
    let audit: Vec<Value> = host
        .journal(vm)
        .into_iter()
        .filter(|e| e["MESSAGE_ID"] == AUDIT)
        .collect();
    assert_eq!(audit.len(), 2, "both accepted calls are audited: {audit:?}");
    assert!(
        audit
            .iter()
            .all(|e| e["CALLER_UID"] == "0" && e["CALLER"] == "root")
    );
    // Every stage has its timer, named after the VM (the timers follow the state at once).
    wait_until(Duration::from_secs(10), "a timer per stage", || {
        timers(&host, vm).len() == 5
    });
    // What a timer runs works under systemd: start one stage's service by hand (nothing is due
    // by the clock, so it changes nothing).
    let svc = format!("vmkeeper-delete-{vm}-release-name.service");
    let exec = host
        .h
        .systemctl(&["show", "-p", "ExecStart", "--value", &svc]);
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains(&format!(
            "run-due --config {}",
            host.config_path().display()
        )),
        "{}",
        String::from_utf8_lossy(&exec.stdout)
    );
    let o = host.h.systemctl(&["start", &svc]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        host.state_json()["deletions"][vm]["progress"]["stage"],
        "scheduled"
    );

    // T-5 days: announced (journal, hook with every stage's date), downtime from T.
    run_due(&host, at(&s, Stage::Announce));
    assert_eq!(host.stage_done(vm, "announce").len(), 1);
    let hook = host
        .hook_events()
        .into_iter()
        .find(|e| e["action"] == "deletion-announce")
        .expect("announce hook");
    assert_eq!(hook["event"], "deletion");
    assert_eq!(hook["deletion"]["stages"].as_array().unwrap().len(), 5);
    assert_eq!(hook["deletion"]["downtimeFrom"], rfc3339(s.t()).as_str());
    assert_eq!(
        host.state_json()["deletions"][vm]["downtimeFrom"],
        s.t()
            .with_timezone(&Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let ts = timers(&host, vm);
    assert!(!ts.contains(&timer(vm, "announce")), "{ts:?}");
    assert!(ts.contains(&timer(vm, "shutdown")), "{ts:?}");
    assert_eq!(host.vm_status(vm)["running"], true);

    // T: off as planned, no alarm, the disk untouched.
    run_due(&host, at(&s, Stage::Shutdown));
    assert_eq!(host.stage_done(vm, "shutdown").len(), 1);
    assert!(!host.active(&Host::vm_unit(vm)));
    assert_eq!(host.vm_status(vm)["running"], false);
    assert_eq!(host.count(vm, UNPLANNED), 0);
    assert_eq!(image_id(&host, vm), id);
    assert!(timers(&host, vm).contains(&timer(vm, "purge")));
    // A marker on the disk while the VM is off, to find after the cancel.
    host.h.rbd_ok(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4096",
        "--io-threads",
        "1",
        "--io-total",
        "4096",
        "--io-pattern",
        "seq",
        &host.h.image_spec(vm),
    ]);
    let marker = first_block(&host, vm);
    assert!(marker.iter().any(|b| *b != 0), "the marker was written");
    // It stays off (the daemon's own passes at the clock's now do not restart it).
    std::thread::sleep(Duration::from_secs(2));
    run_due(&host, at(&s, Stage::Shutdown) + TimeDelta::hours(1));
    assert!(!host.active(&Host::vm_unit(vm)));

    // At T+3 days after the shutdown really ran (T + 1 min here) a cancel is too late, and
    // says when the backups go.
    let purge = at(&s, Stage::Purge);
    let o = vmk(&host, &["cancel-deletion", vm, "--now", &iso(purge)]);
    assert!(!o.status.success());
    let backups = s.date_of(Stage::DeleteBackups);
    assert!(
        text(&o).contains(&format!("backups are deleted on {backups}")),
        "{}",
        text(&o)
    );
    assert!(host.state_json()["deletions"].get(vm).is_some());

    // At T+2 days the cancel is accepted: the VM comes back with its disk and addresses.
    let mark = host.console_len(vm);
    let o = vmk(
        &host,
        &[
            "cancel-deletion",
            vm,
            "--now",
            &iso(purge - TimeDelta::days(1)),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    host.wait_vmsize(vm, Host::sectors(30), mark, BOOT);
    assert_eq!(image_id(&host, vm), id);
    assert!(
        first_block(&host, vm) == marker,
        "the disk content is the same"
    );
    let st = host.state_json();
    assert!(st["deletions"].get(vm).is_none());
    assert_eq!(st["vms"][vm]["ipAddresses"], json!(["192.0.2.71"]));
    wait_until(Duration::from_secs(10), "timers gone", || {
        timers(&host, vm).is_empty()
    });
    host.wait_hooks(1, |e| e["action"] == "cancel-deletion" && e["vm"] == vm);
    assert_eq!(host.count(vm, UNPLANNED), 0);
}

#[test]
fn a_configured_deletion_runs_to_the_end_and_a_crash_in_the_purge_finishes_it_once() {
    let vm = "del-b";
    let d = deletion_date();
    let s = Schedule::new(Berlin, d);
    let mut host = Host::new(
        "del-purge",
        &[(
            vm,
            json!({ "ipAddresses": ["192.0.2.72"], "deleteAt": d.to_string() }),
        )],
    );
    clear_leftovers(&host, vm);
    host.start_daemon_at("deletion:purge:after-acted");
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    wait_until(Duration::from_secs(10), "deletion recorded", || {
        host.state_json()["deletions"][vm]["source"]["kind"] == "config"
    });
    // Two snapshots stand for backups in the pool, one protected.
    let spec = host.h.image_spec(vm);
    host.h
        .rbd_ok(&["snap", "create", &format!("{spec}@nightly")]);
    host.h
        .rbd_ok(&["snap", "create", &format!("{spec}@protected")]);
    host.h
        .rbd_ok(&["snap", "protect", &format!("{spec}@protected")]);

    // A deletion declared in the configuration is not cancelled from the CLI.
    let o = vmk(&host, &["cancel-deletion", vm]);
    assert!(!o.status.success());
    assert!(text(&o).contains("remove deleteAt"), "{}", text(&o));

    // The host was "down" over T-5d: at T both stages run, in order.
    run_due(&host, at(&s, Stage::Shutdown));
    let order: Vec<String> = host
        .journal(vm)
        .iter()
        .filter(|e| e["MESSAGE_ID"] == DELETION && e["ACTION"] == "deletion-stage")
        .map(|e| e["STAGE"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(order, ["announce", "shutdown"]);
    assert!(!host.active(&Host::vm_unit(vm)));

    // Until the purge the address is held: another VM may not declare it.
    let mut other = host.config.clone();
    let mut del_c = other["vms"][vm].clone();
    del_c.as_object_mut().unwrap().remove("deleteAt");
    other["vms"].as_object_mut().unwrap().remove(vm);
    other["vms"]["del-c"] = del_c;
    let refused = refusals_of(&plan_with(&host, &other, at(&s, Stage::Shutdown)), "del-c");
    let purge_date = s.date_of(Stage::Purge);
    assert_eq!(
        refused,
        [format!(
            "vms.del-c.ipAddresses: 192.0.2.72 is still held by del-b, which is being deleted; it is released on {purge_date}"
        )]
    );

    // T+3 days: the daemon dies right after moving the image to the trash, before recording
    // the stage as done.
    let runner = {
        let args = vec![
            "run-due".to_owned(),
            "--now".to_owned(),
            iso(at(&s, Stage::Purge)),
            "--config".to_owned(),
            host.config_path().display().to_string(),
        ];
        std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
                .args(args)
                .output()
                .unwrap()
        })
    };
    wait_until(Duration::from_secs(60), "image in the trash", || {
        host.trash(vm).len() == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(host.state_json()["deletions"][vm]["stageStarted"], "purge");
    host.kill9_daemon();
    let o = runner.join().unwrap();
    assert!(
        !o.status.success(),
        "run-due ended with the daemon: {}",
        text(&o)
    );
    assert!(host.stage_done(vm, "purge").is_empty());
    // Timers are recreated from the state at start: drop them to see that.
    for t in timers(&host, vm) {
        host.h.systemctl(&["stop", &t]);
    }

    host.start_daemon();
    wait_until(Duration::from_secs(30), "purge finished", || {
        host.state_json()["deletions"][vm]["progress"]["last"] == "purge"
    });
    let done = host.stage_done(vm, "purge");
    assert_eq!(done.len(), 1, "the purge completes exactly once");
    assert!(
        done[0]["REASON"]
            .as_str()
            .unwrap()
            .contains("already in the trash"),
        "{:?}",
        done[0]["REASON"]
    );
    let st = host.state_json();
    assert_eq!(st["deletions"][vm]["stageStarted"], Value::Null);
    assert!(st["vms"].get(vm).is_none(), "the VM's record is gone");
    assert_eq!(st["deletions"][vm]["ipAddresses"], json!([]));
    assert_eq!(host.trash(vm).len(), 1);
    assert!(!host.image_exists(vm));
    let ts = timers(&host, vm);
    assert_eq!(
        ts,
        [timer(vm, "delete-backups"), timer(vm, "release-name")],
        "upcoming stages have timers again"
    );
    // The address is free now.
    assert!(refusals_of(&plan_with(&host, &other, at(&s, Stage::Purge)), "del-c").is_empty());

    // From here on the VM is gone from the configuration too (otherwise its deleteAt, still
    // ahead of the real clock, would be a new request once the name is free).
    host.config["vms"].as_object_mut().unwrap().remove(vm);
    host.write_config();
    host.h.systemctl(&["kill", "-s", "HUP", &host.unit]);
    // The VM is still listed while its deletion runs, but no longer as declared.
    wait_until(Duration::from_secs(10), "configuration reloaded", || {
        host.vm_status(vm)["declared"].is_null()
    });

    // T+8 days: snapshots and the trashed image are gone.
    run_due(&host, at(&s, Stage::DeleteBackups));
    let done = host.stage_done(vm, "delete-backups");
    assert_eq!(done.len(), 1);
    assert!(
        done[0]["REASON"]
            .as_str()
            .unwrap()
            .starts_with("2 snapshot(s) and the trashed image "),
        "{:?}",
        done[0]["REASON"]
    );
    assert!(host.trash(vm).is_empty());
    assert!(!host.image_exists(vm));

    // The name is held until T+38 days, with the date it is free.
    let mut again = host.config.clone();
    again["vms"][vm] = other["vms"]["del-c"].clone();
    let free = s.date_of(Stage::ReleaseName);
    let before = at(&s, Stage::ReleaseName) - TimeDelta::days(1);
    run_due(&host, before);
    let refused = refusals_of(&plan_with(&host, &again, before), vm);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains(&format!("it is free again on {free}")),
        "{refused:?}"
    );
    run_due(&host, at(&s, Stage::ReleaseName));
    assert_eq!(host.stage_done(vm, "release-name").len(), 1);
    assert!(host.state_json()["deletions"].get(vm).is_none());
    // The old declaration does not bring the deleted VM back; a new one of that name says
    // it is a new VM.
    let plan = plan_with(&host, &again, at(&s, Stage::ReleaseName));
    let refused = refusals_of(&plan, vm);
    assert!(
        refused.len() == 1 && refused[0].contains("declare generation = 2"),
        "{refused:?}"
    );
    again["vms"][vm]["generation"] = json!(2);
    let plan = plan_with(&host, &again, at(&s, Stage::ReleaseName));
    assert!(refusals_of(&plan, vm).is_empty());
    assert!(
        plan["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "create-disk" && a["vm"] == vm),
        "{plan}"
    );
    assert!(timers(&host, vm).is_empty());
    let hooks: Vec<String> = host
        .wait_hooks(6, |e| e["vm"] == vm && e["event"] == "deletion")
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        hooks,
        [
            "schedule-deletion",
            "deletion-announce",
            "deletion-shutdown",
            "deletion-purge",
            "deletion-delete-backups",
            "deletion-release-name"
        ]
    );
}

#[test]
fn a_crash_right_after_a_stage_started_is_finished_at_the_next_start() {
    let vm = "del-s";
    let host = Host::new("del-started", &[(vm, json!({}))]);
    host.start_daemon_at("deletion:shutdown:after-started");
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    let d = deletion_date();
    let s = Schedule::new(Berlin, d);
    let o = vmk(&host, &["delete", vm, "--at", &d.to_string()]);
    assert!(o.status.success(), "{}", text(&o));

    // At T the daemon records the shutdown as started and dies before stopping the VM.
    let runner = {
        let args = vec![
            "run-due".to_owned(),
            "--now".to_owned(),
            iso(at(&s, Stage::Shutdown)),
            "--config".to_owned(),
            host.config_path().display().to_string(),
        ];
        std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
                .args(args)
                .output()
                .unwrap()
        })
    };
    wait_until(Duration::from_secs(60), "shutdown started", || {
        host.state_json()["deletions"][vm]["stageStarted"] == "shutdown"
    });
    host.kill9_daemon();
    assert!(!runner.join().unwrap().status.success());
    assert!(host.active(&Host::vm_unit(vm)), "the VM still runs");
    assert!(host.stage_done(vm, "shutdown").is_empty());

    // The clock is still days before T, yet the begun stage is finished, once, as planned.
    host.start_daemon();
    wait_until(Duration::from_secs(60), "shutdown finished", || {
        host.state_json()["deletions"][vm]["progress"]["last"] == "shutdown"
    });
    assert!(!host.active(&Host::vm_unit(vm)));
    assert_eq!(host.stage_done(vm, "shutdown").len(), 1);
    assert_eq!(host.stage_done(vm, "announce").len(), 1);
    assert!(
        host.journal(vm)
            .iter()
            .any(|e| e["MESSAGE_ID"] == DELETION && e["ACTION"] == "deletion-resume")
    );
    assert_eq!(host.count(vm, UNPLANNED), 0);
    assert_eq!(
        host.state_json()["deletions"][vm]["stageStarted"],
        Value::Null
    );
    // It stays off at the clock's now, and the next stage's timer is there.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!host.active(&Host::vm_unit(vm)));
    assert!(timers(&host, vm).contains(&timer(vm, "purge")));
}
