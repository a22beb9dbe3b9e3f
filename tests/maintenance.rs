//! Maintenance against real systemd, Ceph and QEMU: announced once with a slot in the next
//! window a day ahead, a timer per slot, the cold reboot in the slot applying the change,
//! immediate reboots only for the authorized group, cancellation and missed slots.

mod support;

use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use support::host::*;

const SCHEDULED: &str = "maintenance-scheduled";
const CANCELLED: &str = "maintenance-cancelled";
const AUDIT: &str = "21690075974949ab8ad5f5b8fd76af2b";

fn hooks(host: &Host, event: &str) -> Vec<Value> {
    host.hook_events()
        .into_iter()
        .filter(|e| e["event"] == event)
        .collect()
}

fn instant(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

fn timers(host: &Host) -> String {
    let out = host
        .h
        .systemctl(&["list-timers", "--all", "--no-pager", "--no-legend"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exec_start(host: &Host, vm: &str) -> String {
    let out = host
        .h
        .systemctl(&["show", "-p", "ExecStart", &Host::vm_unit(vm)]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_cpu_change_is_announced_once_and_applied_in_its_slot() {
    let mut host = Host::new("maint", &[("mnt-a", json!({}))]);
    host.start_daemon();
    host.wait_vmsize("mnt-a", Host::sectors(30), 0, BOOT);
    let pid = host.vm_status("mnt-a")["qemuPid"].clone();

    host.change("mnt-a", json!({ "cores": 2 }));
    wait_until(Duration::from_secs(20), "announcement", || {
        hooks(&host, SCHEDULED).len() == 1
    });
    let event = &hooks(&host, SCHEDULED)[0];
    assert_eq!(event["vm"], "mnt-a");
    assert_eq!(event["contacts"], json!(["ops@example.com"]));
    assert!(
        event["reason"].as_str().unwrap().contains("cores 1 -> 2"),
        "{event}"
    );
    let (start, end) = (
        instant(&event["slot"]["start"]),
        instant(&event["slot"]["end"]),
    );
    let announced = instant(&event["at"]);
    // The earliest valid slot: inside the first window that still holds 15 minutes once a
    // day has passed since the announcement.
    let earliest = announced + TimeDelta::hours(24);
    let out = host.vmkeeper(&[
        "windows",
        "--config",
        host.config_path().to_str().unwrap(),
        "--from",
        &earliest.to_rfc3339(),
        "--count",
        "2",
        "--json",
    ]);
    let windows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let w = windows
        .iter()
        .find(|w| instant(&w["end"]) >= earliest + TimeDelta::minutes(15))
        .unwrap();
    assert!(
        start >= earliest && start >= instant(&w["start"]) && end <= instant(&w["end"]),
        "{event} vs {w}"
    );
    assert!(
        start - earliest.max(instant(&w["start"])) < TimeDelta::minutes(1),
        "not the earliest: {event}"
    );
    assert_eq!(end - start, TimeDelta::minutes(15));
    assert!(
        timers(&host).contains("vmkeeper-maint-mnt-a.timer"),
        "{}",
        timers(&host)
    );
    // The running VM is left alone until then.
    assert_eq!(host.vm_status("mnt-a")["qemuPid"], pid);
    assert!(exec_start(&host, "mnt-a").contains("-smp 1 "));

    let mark = host.console_len("mnt-a");
    host.run_due(&(start + TimeDelta::minutes(1)).to_rfc3339());
    host.wait_vmsize("mnt-a", Host::sectors(30), mark, BOOT);
    let s = host.vm_status("mnt-a");
    assert_eq!(s["applied"]["cores"], 2);
    assert!(
        s["pending"].is_null() && s["maintenanceSlot"].is_null(),
        "{s}"
    );
    assert_ne!(s["qemuPid"], pid, "a cold reboot: a new QEMU");
    assert!(
        exec_start(&host, "mnt-a").contains("-smp 2 "),
        "{}",
        exec_start(&host, "mnt-a")
    );
    assert_eq!(host.count("mnt-a", STOPPED), 1);
    assert_eq!(host.count("mnt-a", UNPLANNED), 0);
    assert_eq!(hooks(&host, SCHEDULED).len(), 1, "announced once");
    assert!(!timers(&host).contains("vmkeeper-maint-mnt-a.timer"));
}

#[test]
fn a_reverted_change_or_a_new_qemu_command_line_moves_the_maintenance() {
    let mut host = Host::new("revert", &[("rvt-a", json!({}))]);
    host.start_daemon();
    host.wait_vmsize("rvt-a", Host::sectors(30), 0, BOOT);
    host.change("rvt-a", json!({ "memoryMiB": 2048 }));
    wait_until(Duration::from_secs(20), "announcement", || {
        hooks(&host, SCHEDULED).len() == 1
    });
    host.change("rvt-a", json!({ "memoryMiB": 1024 }));
    wait_until(Duration::from_secs(20), "cancellation", || {
        hooks(&host, CANCELLED).len() == 1
    });
    assert!(
        hooks(&host, CANCELLED)[0]["reason"]
            .as_str()
            .unwrap()
            .contains("reverted")
    );
    wait_until(Duration::from_secs(10), "timer gone", || {
        !timers(&host).contains("vmkeeper-maint-rvt-a.timer")
    });
    assert!(host.vm_status("rvt-a")["maintenanceSlot"].is_null());

    // A changed QEMU command line (here: extra arguments) needs a reboot as well.
    host.config["qemu"]["extraArgs"] = json!(["-no-user-config"]);
    host.reload();
    wait_until(Duration::from_secs(20), "outdated announcement", || {
        hooks(&host, SCHEDULED).len() == 2
    });
    assert!(
        hooks(&host, SCHEDULED)[1]["reason"]
            .as_str()
            .unwrap()
            .contains("command line changed")
    );
    assert_eq!(host.count("rvt-a", UNPLANNED), 0);
}

#[test]
fn a_slot_missed_while_the_daemon_was_down_is_rescheduled_not_run() {
    let mut host = Host::new("missed", &[("mis-a", json!({}))]);
    host.start_daemon();
    host.wait_vmsize("mis-a", Host::sectors(30), 0, BOOT);
    let pid = host.vm_status("mis-a")["qemuPid"].clone();
    host.change("mis-a", json!({ "cores": 2 }));
    wait_until(Duration::from_secs(20), "announcement", || {
        hooks(&host, SCHEDULED).len() == 1
    });
    let first = hooks(&host, SCHEDULED)[0]["slot"].clone();

    host.kill9_daemon();
    host.start_daemon();
    // The daemon comes back twelve hours after the slot began: outside every window.
    let late = instant(&first["start"]) + TimeDelta::hours(12);
    host.run_due(&late.to_rfc3339());
    wait_until(Duration::from_secs(20), "moved announcement", || {
        hooks(&host, SCHEDULED).len() == 2
    });
    let moved = hooks(&host, SCHEDULED)[1]["slot"].clone();
    assert!(
        instant(&moved["start"]) >= late + TimeDelta::hours(24),
        "{moved}"
    );
    let s = host.vm_status("mis-a");
    assert_eq!(s["qemuPid"], pid, "not rebooted outside a window");
    assert_eq!(s["applied"]["cores"], 1);
    assert_eq!(s["maintenanceSlot"], moved);
    assert!(timers(&host).contains("vmkeeper-maint-mis-a.timer"));
}

/// Creates the group and the two users the authorization test runs as.
fn users() -> (String, String) {
    let run = |args: &[&str]| Command::new(args[0]).args(&args[1..]).output().unwrap();
    run(&["groupadd", "-f", "sudo-srv"]);
    for (user, extra) in [("vmk-outsider", None), ("vmk-operator", Some("sudo-srv"))] {
        if !run(&["id", user]).status.success() {
            let mut args = vec!["useradd", "-M", "-N", "-s", "/usr/sbin/nologin"];
            if let Some(g) = extra {
                args.extend(["-G", g]);
            }
            args.push(user);
            assert!(run(&args).status.success(), "useradd {user}");
        }
    }
    ("vmk-outsider".into(), "vmk-operator".into())
}

#[test]
fn only_the_authorized_group_may_reboot_at_once() {
    let (outsider, operator) = users();
    let mut host = Host::new("authz", &[("auth-a", json!({}))]);
    host.start_daemon();
    host.wait_vmsize("auth-a", Host::sectors(30), 0, BOOT);
    host.change("auth-a", json!({ "cores": 2 }));
    wait_until(Duration::from_secs(20), "announcement", || {
        hooks(&host, SCHEDULED).len() == 1
    });
    let pid = host.vm_status("auth-a")["qemuPid"].clone();
    // Other users reach the socket (authorization is per request, by the caller's uid).
    let socket = host.dir.join("run/api.sock");
    let mut p = socket.parent().unwrap().to_path_buf();
    while p != std::path::Path::new("/") {
        Command::new("chmod").arg("o+x").arg(&p).status().unwrap();
        p.pop();
    }
    let as_user = |user: &str, args: &[&str]| {
        Command::new("runuser")
            .args(["-u", user, "--", env!("CARGO_BIN_EXE_vmkeeper")])
            .args(args)
            .args(["--socket", socket.to_str().unwrap()])
            .output()
            .unwrap()
    };
    // Reading is open to everyone.
    assert!(as_user(&outsider, &["status"]).status.success());
    let out = as_user(&outsider, &["reboot", "auth-a", "--now"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not authorized"),
        "{out:?}"
    );
    assert_eq!(host.vm_status("auth-a")["qemuPid"], pid, "nothing happened");
    assert_eq!(host.count("auth-a", AUDIT), 0);

    let mark = host.console_len("auth-a");
    let out = as_user(&operator, &["reboot", "auth-a", "--now"]);
    assert!(out.status.success(), "{out:?}");
    host.wait_vmsize("auth-a", Host::sectors(30), mark, BOOT);
    let s = host.vm_status("auth-a");
    assert_ne!(s["qemuPid"], pid);
    assert_eq!(
        s["applied"]["cores"], 2,
        "the reboot applied the pending change"
    );
    assert!(
        s["maintenanceSlot"].is_null(),
        "and made the maintenance unnecessary"
    );
    let audit = host
        .journal("auth-a")
        .into_iter()
        .find(|e| e["MESSAGE_ID"] == AUDIT)
        .unwrap();
    assert_eq!(audit["CALLER"], operator.as_str());
    assert_eq!(
        host.count("auth-a", UNPLANNED),
        0,
        "a requested reboot is planned"
    );
    assert_eq!(hooks(&host, CANCELLED).len(), 1);
}
