//! The pure commands end to end through the built binary: check-config, windows, plan.

use std::path::Path;
use std::process::{Command, Output};

fn vmkeeper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
        .args(args)
        .output()
        .expect("run vmkeeper")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn check_config_accepts_a_good_file() {
    let o = vmkeeper(&["check-config", &fixture("two-vms.json")]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).ends_with("ok, 2 VM(s)\n"), "{}", stdout(&o));
}

#[test]
fn check_config_lists_every_problem_and_exits_1() {
    let o = vmkeeper(&["check-config", &fixture("bad.json")]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "maintenance.weekdayz: unknown key (did you mean `weekdays`?)\n\
         vms.huge.diskGiB: 20480 GiB is 10 TiB or more and needs allowHugeDisk = true from an operator (object storage is recommended instead)\n\
         vms.web01.cores: 13 is outside 1..=12\n\
         vms.web01.memoryMiB: 98304 is above this VM's limit of 65536 MiB (64 GiB); only an operator can raise memoryLimitMiB (up to 131072)\n\
         vms.web01.diskGiB: 20 is outside 30..=1048576\n\
         vms.web02.ipAddresses: 192.0.2.10 is also assigned to web01; addresses must be unique\n"
    );
}

#[test]
fn check_config_reports_malformed_json_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.json");
    std::fs::write(&f, "{\n  \"vms\": {\n").unwrap();
    let o = vmkeeper(&["check-config", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "malformed JSON at line 3, column 0: EOF while parsing an object\n"
    );
    let o = vmkeeper(&["check-config", "/nonexistent.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read /nonexistent.json"));
}

#[test]
fn windows_show_both_dst_nights_in_berlin() {
    let cfg = fixture("two-vms.json");
    let o = vmkeeper(&[
        "windows",
        "--config",
        &cfg,
        "--from",
        "2027-03-27T12:00:00+01:00",
        "--count",
        "1",
    ]);
    assert_eq!(
        stdout(&o),
        "2027-03-27T22:00:00+01:00 – 2027-03-28T05:00:00+02:00  (6h)\n"
    );
    let o = vmkeeper(&[
        "windows",
        "--config",
        &cfg,
        "--from",
        "2026-10-24T12:00:00+02:00",
        "--count",
        "1",
        "--json",
    ]);
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        rows,
        serde_json::json!([{ "start": "2026-10-24T22:00:00+02:00", "end": "2026-10-25T05:00:00+01:00", "durationMinutes": 480 }])
    );
}

#[test]
fn plan_shows_pending_changes_with_their_slot_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    // The state of a host where web01 runs with 1 vCPU and a 60 GiB disk.
    std::fs::write(
        dir.path().join("state.json"),
        r#"{ "version": 1, "vms": { "web01": { "applied": { "cores": 1, "memoryMiB": 4096, "diskGiB": 60 }, "running": true } } }"#,
    )
    .unwrap();
    let args = [
        "plan",
        "--config",
        &fixture("two-vms.json"),
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--now",
        "2026-11-30T10:00:00+01:00",
    ];
    let o = vmkeeper(&args);
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    assert!(text.contains("web01: pending cores 1 -> 2, memoryMiB 4096 -> 4096; reboot in slot 2026-12-01T22:00:00+01:00 – 2026-12-01T22:15:00+01:00, announced 2026-11-30T10:00:00+01:00"), "{text}");
    assert!(text.contains("vms.web01.diskGiB: cannot shrink from 60 to 50 GiB; disks only grow — provision a new VM instead"), "{text}");
    let o = vmkeeper(&[&args[..], &["--json"]].concat());
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(p["now"], "2026-11-30T10:00:00+01:00");
    assert_eq!(
        p["pending"][0]["slot"]["start"],
        "2026-12-01T22:00:00+01:00"
    );
    assert_eq!(p["refusals"][0]["field"], "vms.web01.diskGiB");
    assert_eq!(p["actions"][0]["action"], "create-disk");
    // Planning changed nothing.
    let after = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    assert!(after.contains("\"cores\": 1"));
}

#[test]
fn a_bad_now_is_a_clear_error() {
    let o = vmkeeper(&[
        "plan",
        "--config",
        &fixture("two-vms.json"),
        "--now",
        "tomorrow",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not an RFC 3339 instant"));
}

#[test]
fn a_projects_windows_are_in_its_zone_on_the_host_wide_weekdays() {
    let cfg = fixture("projects.json");
    let o = vmkeeper(&["check-config", &cfg]);
    assert!(o.status.success(), "{o:?}");
    // New York's clocks go forward on 14 March 2027; the window keeps its wall-clock times.
    let o = vmkeeper(&[
        "windows",
        "--config",
        &cfg,
        "--project",
        "shop",
        "--from",
        "2027-03-08T12:00:00-05:00",
        "--count",
        "3",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        stdout(&o),
        "2027-03-09T01:00:00-05:00 – 2027-03-09T05:00:00-05:00  (4h)\n\
         2027-03-11T01:00:00-05:00 – 2027-03-11T05:00:00-05:00  (4h)\n\
         2027-03-16T01:00:00-04:00 – 2027-03-16T05:00:00-04:00  (4h)\n"
    );
    // Without --project: the default project's (the host-wide) windows.
    let o = vmkeeper(&[
        "windows",
        "--config",
        &cfg,
        "--from",
        "2027-03-08T12:00:00+01:00",
        "--count",
        "1",
    ]);
    assert_eq!(
        stdout(&o),
        "2027-03-09T22:00:00+01:00 – 2027-03-10T05:00:00+01:00  (7h)\n"
    );
    let o = vmkeeper(&["windows", "--config", &cfg, "--project", "shpo"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("no project shpo (the projects are default, shop)"),
        "{o:?}"
    );
}

#[test]
fn a_project_typo_is_an_error_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("projects.json")).unwrap()).unwrap();
    doc["vms"]["db01"]["project"] = "shpo".into();
    doc["projects"]["shop"]["maintenance"]["window"] = "01:00-01:00".into();
    std::fs::write(&f, doc.to_string()).unwrap();
    let o = vmkeeper(&["check-config", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "projects.shop.maintenance.window: \"01:00-01:00\" has no length: start and end are equal\n\
         vms.db01.project: no project \"shpo\"; did you mean \"shop\"?\n"
    );
}
