//! Projects on one host against real systemd, Ceph and QEMU: each project's change announced
//! once to its own contacts (its own hook) and applied in a slot of its own windows and zone;
//! a member of one project's group refused for another project's VM, with nothing done;
//! deletion dates in the project's zone, announced to its contacts; a bad project in a
//! reload refused with the field named and nothing changed.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use support::host::*;

const SCHEDULED: &str = "maintenance-scheduled";
const AUDIT: &str = "21690075974949ab8ad5f5b8fd76af2b";

fn instant(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A hook of its own for a project: appends each event to `<name>.log` in the scratch dir.
fn hook(host: &Host, name: &str) -> std::path::PathBuf {
    let path = host.dir.join(format!("{name}.sh"));
    let log = host.dir.join(format!("{name}.log"));
    std::fs::write(&path, format!("#!/bin/sh\ncat >> {}\n", log.display())).unwrap();
    Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    path
}

fn events(host: &Host, name: &str) -> Vec<Value> {
    std::fs::read_to_string(host.dir.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn of_kind(events: &[Value], kind: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["event"] == kind)
        .cloned()
        .collect()
}

/// Journal entries of a project (`journalctl PROJECT=...`) since the host was made.
fn project_journal(host: &Host, project: &str) -> Vec<Value> {
    let out = host
        .h
        .journalctl(&[&format!("PROJECT={project}"), "-o", "json", "--no-pager"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        // Other tests' daemons share the journal (and may have a project of that name).
        .filter(|e| e["_SYSTEMD_UNIT"] == host.unit.as_str())
        .filter(|e| {
            e["__REALTIME_TIMESTAMP"]
                .as_str()
                .and_then(|t| t.parse::<u128>().ok())
                .is_some_and(|t| t >= host.since_us)
        })
        .collect()
}

/// Asserts that `slot` is the earliest 15 minutes a day after `announced` inside one of
/// `project`'s windows, as `vmkeeper windows --project` lists them.
fn is_earliest_slot_of(host: &Host, project: &str, slot: &Value, announced: DateTime<Utc>) {
    let (start, end) = (instant(&slot["start"]), instant(&slot["end"]));
    let earliest = announced + TimeDelta::hours(24);
    let out = host.vmkeeper(&[
        "windows",
        "--config",
        host.config_path().to_str().unwrap(),
        "--project",
        project,
        "--from",
        &earliest.to_rfc3339(),
        "--count",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let windows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let w = windows
        .iter()
        .find(|w| instant(&w["end"]) >= earliest + TimeDelta::minutes(15))
        .unwrap();
    assert!(
        start >= earliest && start >= instant(&w["start"]) && end <= instant(&w["end"]),
        "{slot} not in {w} of project {project}"
    );
    assert!(
        start - earliest.max(instant(&w["start"])) < TimeDelta::minutes(1),
        "not the earliest: {slot} in {w}"
    );
    // Given in the project's zone: the window's offset.
    assert_eq!(
        slot["start"].as_str().unwrap()[19..],
        w["start"].as_str().unwrap()[19..],
        "{slot} vs {w}"
    );
}

#[test]
fn each_projects_change_is_announced_to_its_own_contacts_and_applied_in_its_own_slot() {
    let mut host = Host::new(
        "projects",
        &[
            ("prj-home", json!({})),
            ("prj-shop", json!({ "project": "shop" })),
        ],
    );
    let shop_hook = hook(&host, "shop-hook");
    host.config["projects"] = json!({
        "shop": {
            "timezone": "America/New_York",
            "contacts": ["it@shop.example"],
            "notifyCommand": shop_hook,
            "maintenance": { "window": "01:00-05:00" }
        }
    });
    host.write_config();
    host.start_daemon();
    host.wait_vmsize("prj-home", Host::sectors(30), 0, BOOT);
    host.wait_vmsize("prj-shop", Host::sectors(30), 0, BOOT);
    let pid = |host: &Host, vm: &str| host.vm_status(vm)["qemuPid"].clone();
    let (home_pid, shop_pid) = (pid(&host, "prj-home"), pid(&host, "prj-shop"));

    host.config["vms"]["prj-home"]["cores"] = 2.into();
    host.config["vms"]["prj-shop"]["cores"] = 2.into();
    host.reload();
    wait_until(Duration::from_secs(30), "both announcements", || {
        of_kind(&host.hook_events(), SCHEDULED).len() == 1
            && of_kind(&events(&host, "shop-hook"), SCHEDULED).len() == 1
    });
    // Each hook heard of its own project's VM only, with its project and contacts.
    let home = &of_kind(&host.hook_events(), SCHEDULED)[0];
    let shop = &of_kind(&events(&host, "shop-hook"), SCHEDULED)[0];
    assert_eq!(
        (&home["vm"], &home["project"], &home["contacts"]),
        (
            &json!("prj-home"),
            &json!("default"),
            &json!(["ops@example.com"])
        )
    );
    assert_eq!(
        (&shop["vm"], &shop["project"], &shop["contacts"]),
        (
            &json!("prj-shop"),
            &json!("shop"),
            &json!(["it@shop.example"])
        )
    );
    assert!(host.hook_events().iter().all(|e| e["vm"] == "prj-home"));
    assert!(
        events(&host, "shop-hook")
            .iter()
            .all(|e| e["vm"] == "prj-shop")
    );
    is_earliest_slot_of(&host, "default", &home["slot"], instant(&home["at"]));
    is_earliest_slot_of(&host, "shop", &shop["slot"], instant(&shop["at"]));
    let shop_offset = &shop["slot"]["start"].as_str().unwrap()[19..];
    assert!(["-05:00", "-04:00"].contains(&shop_offset), "{shop}");

    // `journalctl PROJECT=shop` is the shop's story: its VM only, its announcement in it.
    let story = project_journal(&host, "shop");
    assert!(story.iter().all(|e| e["VM"] == "prj-shop"), "{story:?}");
    assert!(
        story
            .iter()
            .any(|e| e["MESSAGE_ID"] == "3d1bb950661240cb96617ca2301e51d0"),
        "{story:?}"
    );

    // Each reboots in its own slot, the other left alone until its own.
    let mut order = [("prj-home", home.clone()), ("prj-shop", shop.clone())];
    order.sort_by_key(|(_, e)| instant(&e["slot"]["start"]));
    for (i, (vm, event)) in order.iter().enumerate() {
        let mark = host.console_len(vm);
        host.run_due(&(instant(&event["slot"]["start"]) + TimeDelta::minutes(1)).to_rfc3339());
        host.wait_vmsize(vm, Host::sectors(30), mark, BOOT);
        let s = host.vm_status(vm);
        assert_eq!(s["applied"]["cores"], 2, "{s}");
        assert!(s["maintenanceSlot"].is_null(), "{s}");
        if i == 0 {
            let (other, _) = &order[1];
            let o = host.vm_status(other);
            assert_eq!(
                o["applied"]["cores"], 1,
                "{other} waits for its own slot: {o}"
            );
            let before = if *other == "prj-home" {
                &home_pid
            } else {
                &shop_pid
            };
            assert_eq!(&o["qemuPid"], before);
        }
    }
    assert_ne!(pid(&host, "prj-home"), home_pid);
    assert_ne!(pid(&host, "prj-shop"), shop_pid);
    // Announced once each, to its own contacts; nothing cancelled, no alarm.
    assert_eq!(of_kind(&host.hook_events(), SCHEDULED).len(), 1);
    assert_eq!(of_kind(&events(&host, "shop-hook"), SCHEDULED).len(), 1);
    for vm in ["prj-home", "prj-shop"] {
        assert_eq!(host.count(vm, UNPLANNED), 0);
        assert_eq!(host.count(vm, STOPPED), 1);
    }
    assert!(of_kind(&host.hook_events(), "maintenance-cancelled").is_empty());
}

/// Creates the groups of two customers and an operator of the first.
fn shop_operator() -> String {
    let run = |args: &[&str]| Command::new(args[0]).args(&args[1..]).output().unwrap();
    run(&["groupadd", "-f", "vmk-shop"]);
    run(&["groupadd", "-f", "vmk-blog"]);
    let user = "vmk-shop-op";
    if !run(&["id", user]).status.success() {
        let o = run(&[
            "useradd",
            "-M",
            "-N",
            "-s",
            "/usr/sbin/nologin",
            "-G",
            "vmk-shop",
            user,
        ]);
        assert!(o.status.success(), "useradd {user}: {o:?}");
    }
    user.into()
}

#[test]
fn a_projects_group_acts_on_its_own_vms_only() {
    let user = shop_operator();
    let mut host = Host::new(
        "prjauth",
        &[
            ("pa-shop", json!({ "project": "shop" })),
            ("pa-blog", json!({ "project": "blog" })),
        ],
    );
    host.config["projects"] = json!({
        "shop": { "authorizedGroup": "vmk-shop" },
        "blog": { "authorizedGroup": "vmk-blog" }
    });
    host.write_config();
    host.start_daemon();
    host.wait_vmsize("pa-shop", Host::sectors(30), 0, BOOT);
    host.wait_vmsize("pa-blog", Host::sectors(30), 0, BOOT);
    let blog_pid = host.vm_status("pa-blog")["qemuPid"].clone();
    let shop_pid = host.vm_status("pa-shop")["qemuPid"].clone();
    // Other users reach the socket (authorization is per request, by the caller's groups).
    let socket = host.dir.join("run/api.sock");
    let mut p = socket.parent().unwrap().to_path_buf();
    while p != std::path::Path::new("/") {
        Command::new("chmod").arg("o+x").arg(&p).status().unwrap();
        p.pop();
    }
    let as_user = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", &user, "--", env!("CARGO_BIN_EXE_vmkeeper")])
            .args(args)
            .args(["--socket", socket.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let listed = |o: &Output, key: &str| -> Vec<String> {
        assert!(o.status.success(), "{}", text(o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let rows = if key == "vms" { &v["vms"] } else { &v };
        let field = if key == "vms" { "name" } else { "vm" };
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r[field].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(listed(&as_user(&["status", "--json"]), "vms"), ["pa-shop"]);

    let refused = "not authorized: pa-blog belongs to project blog; only root, members of \
                   vmk-blog (project blog's authorized group) may do this";
    for args in [
        &["reboot", "pa-blog", "--now"][..],
        &["maintenance", "request", "pa-blog", "--reason", "mine"],
        &["delete", "pa-blog", "--at", "2030-01-01"],
        &["cancel-deletion", "pa-blog"],
    ] {
        let o = as_user(args);
        assert!(!o.status.success(), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(refused), "{args:?}: {}", text(&o));
    }
    // The user's own project's VM: a reboot at once, answered once it is done. A reboot of
    // pa-blog, had one begun, would have finished by then too.
    let mark = host.console_len("pa-shop");
    let o = as_user(&["reboot", "pa-shop", "--now"]);
    assert!(o.status.success(), "{}", text(&o));
    host.wait_vmsize("pa-shop", Host::sectors(30), mark, BOOT);
    assert_ne!(host.vm_status("pa-shop")["qemuPid"], shop_pid);
    // Nothing happened to pa-blog.
    assert_eq!(host.vm_status("pa-blog")["qemuPid"], blog_pid);
    assert_eq!(host.qemu_starts("pa-blog"), 1);
    assert_eq!(host.count("pa-blog", AUDIT), 0);
    let state = host.state_json();
    assert!(
        state["deletions"].as_object().unwrap().is_empty(),
        "{state}"
    );
    assert!(state["maintenances"].get("pa-blog").is_none(), "{state}");
    let audit: Vec<Value> = host
        .journal("pa-shop")
        .into_iter()
        .filter(|e| e["MESSAGE_ID"] == AUDIT)
        .collect();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(
        (&audit[0]["CALLER"], &audit[0]["PROJECT"]),
        (&json!(user), &json!("shop"))
    );

    // Maintenances: the user sees its project's, root every one.
    let o = host.vmkeeper_ok(&["maintenance", "request", "pa-blog", "--reason", "kernel"]);
    assert!(o.contains("announced"), "{o}");
    let o = as_user(&["maintenance", "request", "pa-shop", "--reason", "kernel"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        listed(&as_user(&["maintenance", "list", "--json"]), "list"),
        ["pa-shop"]
    );
    let all = host.vmkeeper_ok(&["maintenance", "list", "--json"]);
    let all: Vec<String> = serde_json::from_str::<Value>(&all)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["vm"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all, ["pa-blog", "pa-shop"]);
}

#[test]
fn deletion_dates_follow_the_projects_zone_and_its_contacts_hear_of_it() {
    let mut host = Host::new(
        "prjdel",
        &[
            ("dz-ny", json!({ "project": "ny", "online": false })),
            ("dz-home", json!({ "online": false })),
        ],
    );
    host.config["projects"] = json!({
        "ny": { "timezone": "America/New_York", "contacts": ["it@ny.example"] }
    });
    host.write_config();
    host.start_daemon();
    wait_until(Duration::from_secs(60), "both disks created", || {
        host.vms().iter().all(|v| !v["applied"].is_null())
    });
    let config = host.config_path();
    let vmk = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
            .args(args)
            .args(["--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    // 02:00 on 5 March in Berlin is still the evening of 4 March in New York: the next
    // midnight there is that of the 5th, in Berlin that of the 6th.
    let now = "2030-03-05T01:00:00Z";
    let o = vmk(&["delete", "dz-home", "--at", "2030-03-05", "--now", now]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("the earliest allowed date is 2030-03-06"),
        "{}",
        text(&o)
    );
    let o = vmk(&["delete", "dz-ny", "--at", "2030-03-05", "--now", now]);
    assert!(o.status.success(), "{}", text(&o));
    // Stage dates are New York's midnights, across its DST change of 10 March.
    for line in [
        "shutdown        2030-03-05T00:00:00-05:00",
        "purge           2030-03-08T00:00:00-05:00",
        "delete-backups  2030-03-13T00:00:00-04:00",
    ] {
        assert!(text(&o).contains(line), "{line} in {}", text(&o));
    }
    // The announcement (T − 5 days has passed at `now`) goes to the project's contacts, with
    // the downtime from T in its zone.
    host.run_due(now);
    wait_until(Duration::from_secs(20), "announcement", || {
        host.hook_events()
            .iter()
            .any(|e| e["action"] == "deletion-announce")
    });
    let announce = host
        .hook_events()
        .into_iter()
        .find(|e| e["action"] == "deletion-announce")
        .unwrap();
    assert_eq!(announce["project"], "ny");
    assert_eq!(announce["contacts"], json!(["it@ny.example"]));
    assert_eq!(
        announce["deletion"]["downtimeFrom"],
        "2030-03-05T00:00:00-05:00"
    );
    let s = host.vm_status("dz-ny");
    assert_eq!(
        (&s["project"], &s["deletionDate"], &s["downtimeFrom"]),
        (
            &json!("ny"),
            &json!("2030-03-05"),
            &json!("2030-03-05T00:00:00-05:00")
        )
    );
    assert!(
        project_journal(&host, "ny")
            .iter()
            .any(|e| e["ACTION"] == "deletion-stage" && e["STAGE"] == "announce"),
        "the announcement is in the project's story"
    );

    // A reload naming a project that does not exist is refused with the field, and nothing
    // changes: the VM stays in its project, its deletion in its zone.
    host.config["vms"]["dz-ny"]["project"] = "nyy".into();
    host.write_config();
    let o = vmk(&["reload"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("vms.dz-ny.project: no project \"nyy\"; did you mean \"ny\"?"),
        "{}",
        text(&o)
    );
    // The CLI cannot read the broken file either: ask the daemon through its socket.
    let o = host.vmkeeper(&[
        "status",
        "--json",
        "--socket",
        host.dir.join("run/api.sock").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let status: Value = serde_json::from_slice(&o.stdout).unwrap();
    let after = status["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "dz-ny")
        .unwrap()
        .clone();
    assert_eq!(
        (&after["project"], &after["downtimeFrom"]),
        (&s["project"], &s["downtimeFrom"])
    );
    assert_eq!(host.state_json()["projects"]["dz-ny"], "ny");
}
