//! The daemon against real systemd, Ceph and QEMU: VMs start from a config, survive a
//! `kill -9` of the daemon, unplanned events raise exactly one alarm, planned stops none,
//! CPU changes stay pending, disks grow live and never shrink.
//!
//! Each test runs its own daemon (as a transient unit of the harness systemd, so its journal
//! entries carry their fields) with its own VM names, config, state and runtime directory.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::host::*;

#[test]
fn two_vms_start_and_a_killed_daemon_adopts_them() {
    let host = Host::new("adopt", &[("adopt-a", json!({})), ("adopt-b", json!({}))]);
    host.start_daemon();
    for vm in ["adopt-a", "adopt-b"] {
        host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    }
    // Thin: a 30 GiB image holds almost nothing.
    let du = host
        .h
        .rbd_ok(&["du", "--format", "json", &host.h.image_spec("adopt-a")]);
    let used = serde_json::from_str::<Value>(&du).unwrap()["images"][0]["used_size"]
        .as_u64()
        .unwrap();
    assert!(used < 64 << 20, "image not thin: {used} bytes used");
    assert_eq!(host.h.image_size("adopt-a"), 30 << 30);
    let pids: Vec<Value> = ["adopt-a", "adopt-b"]
        .iter()
        .map(|v| host.vm_status(v)["qemuPid"].clone())
        .collect();
    assert!(pids.iter().all(Value::is_u64), "{pids:?}");

    host.kill9_daemon();
    host.start_daemon();
    wait_until(Duration::from_secs(20), "both adopted", || {
        host.count("adopt-a", ADOPTED) == 1 && host.count("adopt-b", ADOPTED) == 1
    });
    let after: Vec<Value> = ["adopt-a", "adopt-b"]
        .iter()
        .map(|v| host.vm_status(v)["qemuPid"].clone())
        .collect();
    assert_eq!(pids, after, "the same QEMU processes run");
    // Nothing duplicated, nothing alarmed.
    let units = host.h.systemctl(&[
        "list-units",
        "--no-legend",
        "--plain",
        "vmkeeper-vm-adopt-*",
    ]);
    assert_eq!(String::from_utf8_lossy(&units.stdout).lines().count(), 2);
    assert_eq!(
        host.count("adopt-a", UNPLANNED) + host.count("adopt-b", UNPLANNED),
        0
    );
}

#[test]
fn a_guest_reboot_and_an_outside_stop_raise_one_alarm_each() {
    let host = Host::new("unplanned", &[("unpl-a", json!({}))]);
    host.start_daemon();
    host.wait_vmsize("unpl-a", Host::sectors(30), 0, BOOT);

    let mark = host.console_len("unpl-a");
    send_guest(&host.dir, "unpl-a", "reboot");
    wait_until(Duration::from_secs(30), "reset alarm", || {
        host.count("unpl-a", UNPLANNED) == 1
    });
    // The guest comes back by itself (QEMU keeps running); the double RESET gives one alarm.
    host.wait_vmsize("unpl-a", Host::sectors(30), mark, BOOT);
    assert_eq!(host.count("unpl-a", UNPLANNED), 1);
    let entry = host
        .journal("unpl-a")
        .into_iter()
        .find(|e| e["MESSAGE_ID"] == UNPLANNED)
        .unwrap();
    assert_eq!(entry["PRIORITY"], "1", "alarms are at alert priority");
    assert_eq!(entry["ACTION"], "guest-reset");
    assert_eq!(entry["PLANNED"], "false");

    let pid = host.vm_status("unpl-a")["qemuPid"].clone();
    host.h.systemctl(&["stop", &Host::vm_unit("unpl-a")]);
    wait_until(Duration::from_secs(30), "stop alarm", || {
        host.count("unpl-a", UNPLANNED) == 2
    });
    wait_until(BOOT, "VM running again", || {
        let s = host.vm_status("unpl-a");
        s["running"] == true && s["qemuPid"] != pid && s["qemuPid"].is_u64()
    });
    let kinds: Vec<String> = host
        .journal("unpl-a")
        .iter()
        .filter(|e| e["MESSAGE_ID"] == UNPLANNED)
        .map(|e| e["ACTION"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["guest-reset", "unit-stopped"]);
    let hooks: Vec<String> = host
        .wait_hooks(2, |e| e["event"] == "unplanned")
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(hooks, ["guest-reset", "unit-stopped"]);
    assert_eq!(
        host.vm_status("unpl-a")["lastUnplanned"]["kind"],
        "unit-stopped"
    );
}

#[test]
fn a_cpu_change_stays_pending_and_online_false_stops_without_alarm() {
    let mut host = Host::new("planned", &[("plan-a", json!({}))]);
    host.start_daemon();
    host.wait_vmsize("plan-a", Host::sectors(30), 0, BOOT);
    let pid = host.vm_status("plan-a")["qemuPid"].clone();

    host.change("plan-a", json!({ "cores": 2 }));
    wait_until(Duration::from_secs(20), "pending change", || {
        !host.vm_status("plan-a")["pending"].is_null()
    });
    let s = host.vm_status("plan-a");
    assert_eq!(s["pending"]["cores"], 2);
    assert_eq!(s["applied"]["cores"], 1);
    assert_eq!(s["qemuPid"], pid, "the running VM is left alone");
    assert!(s["maintenanceSlot"]["start"].is_string());
    let announced = || -> Vec<Value> {
        host.hook_events()
            .into_iter()
            .filter(|e| e["event"] == "maintenance-scheduled")
            .collect()
    };
    // The hook runs after the state shows the slot: wait for it.
    wait_until(Duration::from_secs(20), "announcement", || {
        !announced().is_empty()
    });
    let announced = announced();
    assert_eq!(announced.len(), 1);
    assert_eq!(announced[0]["slot"], s["maintenanceSlot"]);

    host.change("plan-a", json!({ "online": false }));
    wait_until(Duration::from_secs(60), "VM stopped", || {
        !host.active(&Host::vm_unit("plan-a"))
    });
    wait_until(Duration::from_secs(10), "planned stop journaled", || {
        host.count("plan-a", STOPPED) == 1
    });
    assert_eq!(host.count("plan-a", UNPLANNED), 0);
    let stop = host
        .journal("plan-a")
        .into_iter()
        .find(|e| e["MESSAGE_ID"] == STOPPED)
        .unwrap();
    assert_eq!(stop["PLANNED"], "true");
    assert!(
        stop["MESSAGE"].as_str().unwrap().contains("ACPI power-off"),
        "{stop}"
    );
    assert_eq!(host.vm_status("plan-a")["running"], false);
}

#[test]
fn a_disk_grows_live_and_never_shrinks() {
    let mut host = Host::new("grow", &[("grow-a", json!({ "diskGiB": 40 }))]);
    host.start_daemon();
    host.wait_vmsize("grow-a", Host::sectors(40), 0, BOOT);
    let pid = host.vm_status("grow-a")["qemuPid"].clone();

    let mark = host.console_len("grow-a");
    host.change("grow-a", json!({ "diskGiB": 45 }));
    host.wait_vmsize("grow-a", Host::sectors(45), mark, Duration::from_secs(20));
    assert_eq!(host.h.image_size("grow-a"), 45 << 30);
    assert_eq!(
        host.vm_status("grow-a")["qemuPid"],
        pid,
        "same QEMU process"
    );
    wait_until(Duration::from_secs(10), "grow journaled", || {
        host.journal("grow-a")
            .iter()
            .any(|e| e["MESSAGE_ID"] == GROWN && e["ACTION"] == "grow-disk")
    });

    let mark = host.console_len("grow-a");
    host.change("grow-a", json!({ "diskGiB": 35 }));
    let msg = "vms.grow-a.diskGiB: cannot shrink from 45 to 35 GiB; disks only grow — provision a new VM instead";
    wait_until(Duration::from_secs(20), "refusal in status", || {
        host.vm_status("grow-a")["refusals"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == msg))
    });
    wait_until(Duration::from_secs(10), "refusal journaled", || {
        host.count("grow-a", REFUSED) == 1
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
        .args(["plan", "--config", host.config_path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(msg));
    // Nothing changed: the image, and what the guest sees (it keeps printing 45 GiB).
    assert_eq!(host.h.image_size("grow-a"), 45 << 30);
    host.wait_vmsize("grow-a", Host::sectors(45), mark, Duration::from_secs(5));
    let tail = std::fs::read_to_string(host.console("grow-a")).unwrap();
    assert!(!tail[mark..].contains(&format!("VMSIZE vda={}", Host::sectors(35))));
    assert_eq!(host.vm_status("grow-a")["qemuPid"], pid);
}

#[test]
fn a_changed_boot_id_is_an_unplanned_host_reboot() {
    let host = Host::new("bootid", &[("boot-a", json!({}))]);
    host.start_daemon();
    host.wait_vmsize("boot-a", Host::sectors(30), 0, BOOT);
    host.kill9_daemon();
    // What the daemon finds after a host reboot it did not plan: another kernel boot id.
    let state_path = host.dir.join("state/state.json");
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert!(state["bootId"].is_string());
    state["bootId"] = json!("00000000-0000-0000-0000-000000000000");
    std::fs::write(&state_path, state.to_string()).unwrap();
    host.start_daemon();
    wait_until(Duration::from_secs(20), "host-reboot alarm", || {
        host.count("boot-a", UNPLANNED) == 1
    });
    let alarm = host
        .journal("boot-a")
        .into_iter()
        .find(|e| e["MESSAGE_ID"] == UNPLANNED)
        .unwrap();
    assert_eq!(alarm["ACTION"], "host-rebooted");
    assert_eq!(
        host.wait_hooks(1, |e| e["action"] == "host-rebooted").len(),
        1
    );
}
