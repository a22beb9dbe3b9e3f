//! The supervisor keeps control of a VM across its own reboots and broken connections, against
//! real systemd, Ceph and QEMU: after `reboot --now` and after a maintenance reboot, a live
//! grow reaches the guest, a guest reboot raises exactly one alarm and a stop goes through
//! ACPI; a QMP connection cut from outside is re-established; while the state file cannot be
//! written, no VM is stopped.

mod support;

use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use support::host::*;

const STATE_NOT_WRITABLE: &str = "00c0fa4fe374403b85658b6f6e74a216";

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

fn wait_connected(host: &Host, vm: &str) {
    wait_until(Duration::from_secs(30), "QMP connected", || {
        host.vm_status(vm)["qmp"] == "connected"
    });
}

/// What must hold of a VM after vmkeeper rebooted it: the new QEMU is supervised exactly like
/// the old one was.
fn supervised_after_reboot(host: &mut Host, vm: &str, disk_gib: u64) {
    wait_connected(host, vm);
    let instance = host.vm_status(vm)["instance"].clone();
    assert!(instance.is_string(), "{instance}");
    let alarms = host.count(vm, UNPLANNED);

    // A live grow reaches the guest, same QEMU.
    let mark = host.console_len(vm);
    host.change(vm, json!({ "diskGiB": disk_gib + 5 }));
    host.wait_vmsize(
        vm,
        Host::sectors(disk_gib + 5),
        mark,
        Duration::from_secs(30),
    );
    assert_eq!(host.vm_status(vm)["instance"], instance);
    assert_eq!(host.h.image_size(vm), (disk_gib + 5) << 30);

    // A reboot from inside the guest: exactly one alarm for its double RESET. The guest's
    // next boot line comes seconds after both RESETs, so waiting for it covers the second.
    let mark = host.console_len(vm);
    send_guest(&host.dir, vm, "reboot");
    wait_until(Duration::from_secs(30), "reset alarm", || {
        host.count(vm, UNPLANNED) == alarms + 1
    });
    host.wait_vmsize(vm, Host::sectors(disk_gib + 5), mark, BOOT);
    assert_eq!(host.count(vm, UNPLANNED), alarms + 1);
    let last = host.vm_status(vm)["lastUnplanned"].clone();
    assert_eq!(last["kind"], "guest-reset");
    assert_eq!(
        last["instance"], instance,
        "the alarm names the new instance"
    );

    // A planned stop presses the ACPI button, and raises no alarm.
    host.change(vm, json!({ "online": false }));
    wait_until(Duration::from_secs(60), "VM stopped", || {
        !host.active(&Host::vm_unit(vm))
    });
    wait_until(Duration::from_secs(10), "stop journaled", || {
        host.count(vm, STOPPED) >= 2
    });
    let stop = host
        .journal(vm)
        .into_iter()
        .rfind(|e| e["MESSAGE_ID"] == STOPPED)
        .unwrap();
    assert!(
        stop["MESSAGE"]
            .as_str()
            .unwrap()
            .contains("(ACPI power-off)"),
        "{stop}"
    );
    assert!(
        std::fs::read_to_string(host.console(vm))
            .unwrap()
            .contains("VMTEST POWEROFF"),
        "the guest powered off itself"
    );
    assert_eq!(host.count(vm, UNPLANNED), alarms + 1);
}

#[test]
fn after_reboot_now_the_new_qemu_is_supervised() {
    let vm = "supn-a";
    let mut host = Host::new("sup-now", &[(vm, json!({}))]);
    host.start_daemon();
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    wait_connected(&host, vm);
    let before = host.vm_status(vm)["instance"].clone();
    let mark = host.console_len(vm);
    let out = host.vmkeeper_ok(&["reboot", vm, "--now"]);
    assert!(out.contains("rebooted"), "{out}");
    host.wait_vmsize(vm, Host::sectors(30), mark, BOOT);
    assert_ne!(host.vm_status(vm)["instance"], before);
    assert_eq!(host.qemu_starts(vm), 2);
    assert_eq!(
        host.count(vm, UNPLANNED),
        0,
        "a requested reboot is planned"
    );
    supervised_after_reboot(&mut host, vm, 30);
}

#[test]
fn after_a_maintenance_reboot_the_new_qemu_is_supervised() {
    let vm = "supm-a";
    let mut host = Host::new("sup-maint", &[(vm, json!({}))]);
    host.start_daemon();
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    host.change(vm, json!({ "cores": 2 }));
    wait_until(Duration::from_secs(20), "announcement", || {
        hooks(&host, "maintenance-scheduled").len() == 1
    });
    let slot = hooks(&host, "maintenance-scheduled")[0]["slot"].clone();
    let mark = host.console_len(vm);
    host.run_due(&(instant(&slot["start"]) + TimeDelta::minutes(1)).to_rfc3339());
    host.wait_vmsize(vm, Host::sectors(30), mark, BOOT);
    let s = host.vm_status(vm);
    assert_eq!(s["applied"]["cores"], 2);
    assert!(s["maintenanceSlot"].is_null(), "{s}");
    assert_eq!(host.qemu_starts(vm), 2);
    assert_eq!(host.count(vm, UNPLANNED), 0);
    assert!(hooks(&host, "maintenance-cancelled").is_empty());
    supervised_after_reboot(&mut host, vm, 30);
}

#[test]
fn a_qmp_connection_cut_from_outside_is_reestablished() {
    let vm = "supq-a";
    let mut host = Host::new("sup-qmp", &[(vm, json!({}))]);
    host.start_daemon();
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    wait_connected(&host, vm);
    let instance = host.vm_status(vm)["instance"].clone();
    assert!(host.cut_qmp(vm), "found QEMU's end of the QMP connection");
    wait_until(Duration::from_secs(10), "loss journaled", || {
        host.journal(vm).iter().any(|e| e["ACTION"] == "qmp-lost")
    });
    wait_until(Duration::from_secs(30), "reconnected", || {
        host.journal(vm)
            .iter()
            .any(|e| e["ACTION"] == "qmp-reconnected")
    });
    wait_connected(&host, vm);
    assert_eq!(
        host.vm_status(vm)["instance"],
        instance,
        "QEMU itself kept running"
    );
    // The new connection carries commands and events.
    let mark = host.console_len(vm);
    host.change(vm, json!({ "diskGiB": 35 }));
    host.wait_vmsize(vm, Host::sectors(35), mark, Duration::from_secs(30));
    send_guest(&host.dir, vm, "reboot");
    wait_until(Duration::from_secs(30), "reset alarm", || {
        host.count(vm, UNPLANNED) == 1
    });
    assert_eq!(host.qemu_starts(vm), 1);
}

/// `chattr +i` makes the state directory refuse new files even to root; undone on drop.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(dir: &std::path::Path) -> Immutable {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chattr +i {}", dir.display());
        Immutable(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn no_vm_is_stopped_while_the_state_cannot_be_written() {
    let vm = "supw-a";
    let mut host = Host::new("sup-write", &[(vm, json!({}))]);
    host.start_daemon();
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    let pid = host.vm_status(vm)["qemuPid"].clone();
    let lock = Immutable::set(&host.dir.join("state"));
    host.change(vm, json!({ "online": false }));
    wait_until(Duration::from_secs(20), "alert journaled", || {
        let out = host.h.journalctl(&[
            &format!("MESSAGE_ID={STATE_NOT_WRITABLE}"),
            &format!("_SYSTEMD_UNIT={}", host.unit),
            "-o",
            "json",
            "--no-pager",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|e| e["PRIORITY"] == "1")
    });
    let s = host.status();
    assert_eq!(s["host"]["stateWritable"], false, "{s}");
    // The stop waits for its intent to be on disk: give it longer than a stop takes.
    std::thread::sleep(Duration::from_secs(15));
    assert!(host.active(&Host::vm_unit(vm)), "no VM is stopped");
    assert_eq!(host.vm_status(vm)["qemuPid"], pid);
    assert_eq!(host.count(vm, STOPPED), 0);
    // Writable again: the stop goes ahead, planned.
    drop(lock);
    wait_until(Duration::from_secs(60), "VM stopped", || {
        !host.active(&Host::vm_unit(vm))
    });
    wait_until(Duration::from_secs(10), "state writable", || {
        host.status()["host"]["stateWritable"] == true
    });
    assert_eq!(host.count(vm, UNPLANNED), 0);
    assert_eq!(host.count(vm, STOPPED), 1);
}
