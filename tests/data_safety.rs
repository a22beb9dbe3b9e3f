//! Nothing deleted early, nothing attached that is not the VM's own — against real Ceph and
//! systemd, time driven with `run-due --now`: stages keep their spacing after a late one, the
//! trashed disk is deferred (an outside `rbd trash purge` cannot take it) and delete-backups
//! removes exactly it, destructive stages wait for a synchronized clock, a deleted VM stays
//! deleted, a foreign image is refused until adopted, addresses held by a VM in deletion are
//! refused, a mass removal waits for confirmation, and a failing hook is retried while the
//! maintenance it could not announce moves.
//!
//! An interrupted clone finished on restart is shown by tests/crashpoints.rs
//! (`clone:after-clone`, `clone:after-grow`).

mod support;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Europe::Berlin;
use serde_json::{Value, json};
use support::host::*;
use vmkeeper::deletion::{Schedule, Stage};

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339()
}

fn instant(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

/// The instant a stage is listed at in `status` (its deletion timeline).
fn stage_at(host: &Host, vm: &str, stage: &str) -> DateTime<Utc> {
    let s = host.vm_status(vm);
    let st = s["deletion"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["stage"] == stage)
        .unwrap_or_else(|| panic!("no {stage} in {s}"))
        .clone();
    instant(&st["at"])
}

/// The next elapse of a deletion stage's timer, from systemd, in seconds since the epoch
/// (`systemctl show` prints a local time with its zone; GNU date reads it).
fn timer_elapse(host: &Host, vm: &str, stage: &str) -> Option<i64> {
    let out = host.h.systemctl(&[
        "show",
        "-p",
        "NextElapseUSecRealtime",
        "--value",
        &format!("vmkeeper-delete-{vm}-{stage}.timer"),
    ]);
    let shown = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if shown.is_empty() {
        return None;
    }
    let out = std::process::Command::new("date")
        .args(["-d", &shown, "+%s"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[test]
fn late_stages_keep_their_spacing_and_only_the_own_trashed_image_goes() {
    let vm = "ds-late";
    let d = deletion_date();
    let s = Schedule::new(Berlin, d);
    let h = support::harness();
    // Someone's older image of the same name sits in the trash, deferred far ahead.
    for e in h.trash_entries(vm) {
        h.rbd(&[
            "trash",
            "rm",
            "--force",
            &format!("{}/{}", h.ceph_pool, e["id"].as_str().unwrap()),
        ]);
    }
    h.create_image(vm, 1 << 30);
    h.rbd_ok(&[
        "trash",
        "mv",
        "--expires-at",
        "2099-01-01",
        &h.image_spec(vm),
    ]);
    let decoy = h.trash_entries(vm)[0]["id"].as_str().unwrap().to_owned();

    let mut host = Host::new("ds-late", &[(vm, json!({}))]);
    host.start_daemon();
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    host.vmkeeper_ok(&["delete", vm, "--at", &d.to_string()]);
    host.run_due(&iso(s.at(Stage::Announce).to_utc() + TimeDelta::minutes(1)));
    assert_eq!(host.stage_done(vm, "announce").len(), 1);

    // The host was down over T and T + 3 days: at T + 3 days + 1 h only the shutdown runs.
    let late = s.at(Stage::Purge).to_utc() + TimeDelta::hours(1);
    host.run_due(&iso(late));
    assert_eq!(host.stage_done(vm, "shutdown").len(), 1);
    assert!(
        host.stage_done(vm, "purge").is_empty(),
        "no purge in the same pass"
    );
    assert!(host.image_exists(vm), "the disk stays for three more days");
    // The later dates moved, and say so: status, the timers, the contacts.
    let purge = stage_at(&host, vm, "purge");
    assert_eq!(purge, late + TimeDelta::days(3));
    assert_eq!(
        stage_at(&host, vm, "delete-backups"),
        late + TimeDelta::days(8)
    );
    assert_eq!(
        instant(&host.vm_status(vm)["deletion"]["cancellableUntil"]),
        purge
    );
    wait_until(Duration::from_secs(10), "the purge timer moved", || {
        timer_elapse(&host, vm, "purge") == Some(purge.timestamp())
    });
    let told = host.wait_hooks(1, |e| e["action"] == "deletion-shutdown");
    assert!(
        told[0]["reason"].as_str().unwrap().contains("ran late"),
        "{told:?}"
    );
    // Still within the three days after the real shutdown: a cancel would be accepted; the
    // purge is not due yet.
    host.run_due(&iso(purge - TimeDelta::minutes(1)));
    assert!(host.stage_done(vm, "purge").is_empty());

    // Not on a clock that is not known to be synchronized.
    host.clock_synced(false);
    host.run_due(&iso(purge + TimeDelta::minutes(1)));
    assert!(host.stage_done(vm, "purge").is_empty(), "held");
    assert!(
        host.vm_status(vm)["held"][0]
            .as_str()
            .unwrap()
            .contains("not known to be synchronized"),
        "{}",
        host.vm_status(vm)
    );
    assert!(
        host.journal(vm)
            .iter()
            .any(|e| e["ACTION"] == "deletion-held"),
        "journaled"
    );
    host.clock_synced(true);
    host.run_due(&iso(purge + TimeDelta::minutes(1)));
    assert_eq!(host.stage_done(vm, "purge").len(), 1);
    let trashed: Vec<Value> = host
        .h
        .trash_entries(vm)
        .into_iter()
        .filter(|e| e["id"] != decoy.as_str())
        .collect();
    assert_eq!(trashed.len(), 1, "{trashed:?}");
    let ours = trashed[0]["id"].as_str().unwrap().to_owned();
    println!("rbd trash ls --long after the purge: {trashed:?}");
    // Deferred until its delete-backups date: an outside purge leaves it alone.
    assert!(
        trashed[0]["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("protected until")),
        "{trashed:?}"
    );
    host.h
        .rbd(&["trash", "purge", "--no-progress", &host.h.ceph_pool]);
    assert!(
        host.h
            .trash_entries(vm)
            .iter()
            .any(|e| e["id"] == ours.as_str()),
        "rbd trash purge took the deferred image"
    );
    // Cancelling is too late now, and says so.
    let out = host.vmkeeper(&[
        "cancel-deletion",
        vm,
        "--now",
        &iso(purge + TimeDelta::hours(1)),
        "--config",
        host.config_path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("too late"));

    // delete-backups deletes exactly the image it trashed.
    let backups = stage_at(&host, vm, "delete-backups");
    host.run_due(&iso(backups + TimeDelta::minutes(1)));
    assert_eq!(host.stage_done(vm, "delete-backups").len(), 1);
    let left: Vec<String> = host
        .h
        .trash_entries(vm)
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        left,
        std::slice::from_ref(&decoy),
        "only the trashed image of this VM went"
    );

    // A VM deleted while still declared stays deleted once its name is released.
    let release = stage_at(&host, vm, "release-name");
    host.run_due(&iso(release + TimeDelta::minutes(1)));
    assert_eq!(host.stage_done(vm, "release-name").len(), 1);
    // Well past when a create would have shown.
    host.run_due(&iso(release + TimeDelta::minutes(2)));
    std::thread::sleep(Duration::from_secs(3));
    assert!(!host.image_exists(vm), "not created again");
    let refusals = host.vm_status(vm)["refusals"].clone();
    assert!(
        refusals[0]
            .as_str()
            .unwrap()
            .contains("declare generation = 2"),
        "{refusals}"
    );
    // A new VM of the name is created once the declaration says it is one.
    host.change(vm, json!({ "generation": 2 }));
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    assert_eq!(host.count(vm, UNPLANNED), 0);
    h.rbd(&[
        "trash",
        "rm",
        "--force",
        &format!("{}/{decoy}", h.ceph_pool),
    ]);
}

#[test]
fn a_foreign_image_is_refused_until_adopted() {
    let vm = "ds-foreign";
    let h = support::harness();
    let _ = h.rbd(&["rm", "--no-progress", &h.image_spec(vm)]);
    // An old customer's disk, 40 GiB, under the new VM's name.
    h.create_image(vm, 40 << 30);
    let host = Host::new("ds-foreign", &[(vm, json!({}))]);
    host.start_daemon();
    wait_until(Duration::from_secs(30), "refusal in status", || {
        host.vm_status(vm)["failures"].as_array().is_some_and(|f| {
            f.iter()
                .any(|x| x.as_str().unwrap().contains("not this VM's disk"))
        })
    });
    let failure = host.vm_status(vm)["failures"][0].clone();
    assert!(
        failure
            .as_str()
            .unwrap()
            .contains("vmkeeper adopt-disk ds-foreign"),
        "{failure}"
    );
    // Longer than a create and a start take: nothing attached, nothing recorded.
    std::thread::sleep(Duration::from_secs(10));
    assert!(!host.active(&Host::vm_unit(vm)));
    assert!(host.state_json()["vms"].get(vm).is_none());
    assert_eq!(host.h.image_size(vm), 40 << 30);

    let out = host.vmkeeper_ok(&["adopt-disk", vm]);
    assert!(out.contains("adopted"), "{out}");
    host.wait_vmsize(vm, Host::sectors(40), 0, BOOT);
    let meta = host.h.rbd_ok(&[
        "image-meta",
        "get",
        &host.h.image_spec(vm),
        "vmkeeper.owner",
    ]);
    let owner: Value = serde_json::from_str(meta.trim()).unwrap();
    assert_eq!(owner["vm"], vm);
    assert_eq!(owner["adoptedBy"], "root");
    // The record has the image's size, not the declared one.
    assert_eq!(host.vm_status(vm)["applied"]["diskGiB"], 40);
    assert!(
        host.journal(vm)
            .iter()
            .any(|e| e["ACTION"] == "adopt-disk" && e["CALLER"] == "root"),
        "audited"
    );
}

#[test]
fn an_address_held_by_a_vm_in_deletion_is_refused_and_given_back_on_cancel() {
    let (a, b, c) = ("ds-ip-a", "ds-ip-b", "ds-ip-c");
    let mut host = Host::new(
        "ds-ip",
        &[
            (a, json!({ "ipAddresses": ["192.0.2.81"], "online": false })),
            (b, json!({ "ipAddresses": ["192.0.2.82"], "online": false })),
        ],
    );
    host.start_daemon();
    wait_until(Duration::from_secs(30), "disks created", || {
        host.state_json()["vms"].get(a).is_some() && host.state_json()["vms"].get(b).is_some()
    });
    // Removed from the configuration: its deletion holds its address until the purge.
    let a_decl = host.config["vms"][a].clone();
    host.config["vms"].as_object_mut().unwrap().remove(a);
    host.reload();
    wait_until(Duration::from_secs(20), "deletion scheduled", || {
        host.state_json()["deletions"].get(a).is_some()
    });
    let t = host.state_json()["deletions"][a]["date"]
        .as_str()
        .unwrap()
        .to_owned();
    let s = Schedule::new(Berlin, t.parse().unwrap());
    host.run_due(&iso(s.at(Stage::Shutdown).to_utc() + TimeDelta::minutes(1)));
    let refused = |host: &Host, vm: &str| {
        host.vm_status(vm)["refusals"].as_array().is_some_and(|r| {
            r.iter().any(|x| {
                x.as_str()
                    .unwrap()
                    .contains("192.0.2.81 is still held by ds-ip-a")
            })
        })
    };
    // An existing VM may not take the address: it keeps what it held.
    host.config["vms"][b]["ipAddresses"] = json!(["192.0.2.81"]);
    host.reload();
    wait_until(Duration::from_secs(20), "b refused", || refused(&host, b));
    // Longer than an address change takes.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        host.state_json()["vms"][b]["ipAddresses"],
        json!(["192.0.2.82"]),
        "b keeps what it held"
    );
    // A new VM is not created with it.
    host.config["vms"][b]["ipAddresses"] = json!(["192.0.2.82"]);
    host.config["vms"][c] = json!({
        "cores": 1, "memoryMiB": 1024, "diskGiB": 30, "online": false,
        "ipAddresses": ["192.0.2.81"],
        "boot": a_decl["boot"].clone(),
    });
    host.vms.push(c.to_owned());
    host.reload();
    wait_until(Duration::from_secs(20), "c refused", || refused(&host, c));
    // Longer than a create takes.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        host.state_json()["vms"].get(c).is_none(),
        "c is not created"
    );
    // Declared again before its purge: the deletion is cancelled and a holds its address.
    host.config["vms"].as_object_mut().unwrap().remove(c);
    host.config["vms"][a] = a_decl;
    host.reload();
    wait_until(Duration::from_secs(20), "deletion cancelled", || {
        host.state_json()["deletions"].get(a).is_none()
    });
    assert_eq!(
        host.state_json()["vms"][a]["ipAddresses"],
        json!(["192.0.2.81"])
    );
    assert_eq!(host.count(a, UNPLANNED), 0);
}

#[test]
fn five_vms_removed_at_once_wait_for_confirmation() {
    let names = ["ds-rm-1", "ds-rm-2", "ds-rm-3", "ds-rm-4", "ds-rm-5"];
    let vms: Vec<(&str, Value)> = names
        .iter()
        .map(|n| (*n, json!({ "online": false })))
        .collect();
    let mut host = Host::new("ds-removal", &vms);
    host.start_daemon();
    wait_until(Duration::from_secs(30), "disks created", || {
        names
            .iter()
            .all(|n| host.state_json()["vms"].get(n).is_some())
    });
    // One deploy drops them all.
    host.config["vms"] = json!({});
    host.reload();
    wait_until(Duration::from_secs(20), "awaiting confirmation", || {
        names
            .iter()
            .all(|n| host.vm_status(n)["awaitingRemoval"] == true)
    });
    // Longer than scheduling takes: none is scheduled.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(host.state_json()["deletions"], json!({}));
    let warned = host.journal(names[0]).iter().any(|e| {
        e["PRIORITY"] == "4"
            && e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.contains("awaiting confirmation"))
    });
    assert!(warned, "said at warning priority");
    // Confirmed ones are scheduled, one by the CLI, the rest by the configuration.
    host.vmkeeper_ok(&["confirm-removal", names[0], names[1]]);
    wait_until(Duration::from_secs(10), "two scheduled", || {
        host.state_json()["deletions"].as_object().unwrap().len() == 2
    });
    // The three left stay held although three are within the limit: they came together.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(host.state_json()["deletions"].as_object().unwrap().len(), 2);
    host.config["removal"] = json!({ "confirmed": &names[2..] });
    host.reload();
    wait_until(Duration::from_secs(10), "all scheduled", || {
        host.state_json()["deletions"].as_object().unwrap().len() == 5
    });
    for n in names {
        assert_eq!(
            host.state_json()["deletions"][n]["source"]["kind"],
            "removed"
        );
    }
}

#[test]
fn a_failing_hook_is_retried_and_an_unannounced_maintenance_moves() {
    let vm = "ds-hook";
    let mut host = Host::new("ds-hook", &[(vm, json!({}))]);
    // The hook fails until the file `ok` exists.
    let hook = host.dir.join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n[ -e {ok} ] || exit 1\ncat >> {log}\n",
            ok = host.dir.join("ok").display(),
            log = host.dir.join("hook.log").display()
        ),
    )
    .unwrap();
    host.start_daemon();
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    host.change(vm, json!({ "cores": 2 }));
    wait_until(Duration::from_secs(20), "maintenance scheduled", || {
        !host.vm_status(vm)["maintenanceSlot"].is_null()
    });
    let first = host.vm_status(vm)["maintenanceSlot"].clone();
    wait_until(Duration::from_secs(30), "hook failure shown", || {
        host.status()["host"]["hookError"].is_string()
    });
    assert_eq!(host.vm_status(vm)["maintenanceAnnounced"], false);
    // A day before the slot it is still not announced: it moves, and stays unannounced.
    let deadline = instant(&first["start"]) - TimeDelta::hours(24);
    host.run_due(&iso(deadline + TimeDelta::minutes(1)));
    let moved = host.vm_status(vm)["maintenanceSlot"].clone();
    assert_ne!(moved, first, "moved");
    assert!(instant(&moved["start"]) >= deadline + TimeDelta::hours(24));
    let failures = || {
        host.journal(vm)
            .iter()
            .filter(|e| {
                e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.contains("notification hook failed"))
            })
            .count()
    };
    wait_until(Duration::from_secs(30), "retried", || failures() >= 2);
    assert!(host.hook_events().is_empty(), "nothing taken yet");
    // The hook works again: both announcements arrive, in order, and the slot counts.
    std::fs::write(host.dir.join("ok"), "").unwrap();
    wait_until(Duration::from_secs(360), "delivered", || {
        host.vm_status(vm)["maintenanceAnnounced"] == true
    });
    let told: Vec<String> = host
        .hook_events()
        .iter()
        .map(|e| e["slot"]["start"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        told,
        [
            first["start"].as_str().unwrap().to_owned(),
            moved["start"].as_str().unwrap().to_owned()
        ]
    );
    assert!(host.status()["host"]["hookError"].is_null());
}
