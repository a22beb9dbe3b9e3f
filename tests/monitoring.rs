//! Monitoring with the real programs of Debian's packages, on loopback: a real Prometheus
//! scrapes the daemon's metrics listener and evaluates docs/examples/alerts.yml (an
//! unplanned guest reboot counts and alerts), and a real Alertmanager gets the monitoring
//! downtimes as silences: a maintenance slot's and a deletion's, read back through its API
//! with their start and end, expired on cancel, and made once it is back after an outage,
//! while the deletion stage itself never waited for it.

mod support;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Europe::Berlin;
use serde_json::{Value, json};
use support::host::*;
use support::monitoring::*;
use vmkeeper::deletion::{Schedule, Stage};

fn state(host: &Host) -> Value {
    serde_json::from_slice(&std::fs::read(host.dir.join("state/state.json")).unwrap()).unwrap()
}

fn vmk(host: &Host, args: &[&str]) -> std::process::Output {
    let o = host.vmkeeper(&[args, &["--config", host.config_path().to_str().unwrap()]].concat());
    assert!(
        o.status.success(),
        "vmkeeper {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn instant(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap()
        .with_timezone(&Utc)
}

fn live(silences: &[Value]) -> Vec<Value> {
    silences
        .iter()
        .filter(|s| s["status"]["state"] != "expired")
        .cloned()
        .collect()
}

/// Waits until the VM's disk exists (the daemon created it), so a deletion can be asked for.
fn wait_recorded(host: &Host, vm: &str) {
    wait_until(Duration::from_secs(60), &format!("{vm} on record"), || {
        state(host)["vms"].get(vm).is_some()
    });
}

#[test]
fn prometheus_scrapes_the_vms_and_sees_an_unplanned_guest_reboot() {
    let mut host = Host::new(
        "prom",
        &[
            ("prom-a", json!({})),
            ("prom-b", json!({ "online": false })),
        ],
    );
    let port = free_port();
    host.config["metrics"] = json!({ "listen": format!("127.0.0.1:{port}") });
    host.write_config();
    host.start_daemon();
    let target = format!("127.0.0.1:{port}");
    wait_until(Duration::from_secs(30), "metrics listener", || {
        http("GET", &format!("http://{target}/metrics")).0 == 200
    });
    let (_, text) = http("GET", &format!("http://{target}/metrics"));
    println!(
        "one scrape by curl: {} bytes, {} lines",
        text.len(),
        text.lines().count()
    );
    assert!(
        text.contains(r#"vmkeeper_vm_should_run{vm="prom-b",project="default"} 0"#),
        "{text}"
    );
    assert_eq!(http("GET", &format!("http://{target}/nothing")).0, 404);
    assert_eq!(http("POST", &format!("http://{target}/metrics")).0, 405);

    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/alerts.yml");
    let prom = Prometheus::start(&host.dir.join("prometheus"), &target, &rules);
    host.wait_vmsize("prom-a", Host::sectors(30), 0, BOOT);
    wait_until(
        Duration::from_secs(60),
        "Prometheus has prom-a running",
        || prom.value(r#"vmkeeper_vm_running{vm="prom-a",project="default"}"#) == Some(1.0),
    );
    assert_eq!(prom.target_health(), "up");
    for (q, want) in [
        (r#"vmkeeper_vm_running{vm="prom-b"}"#, 0.0),
        (r#"vmkeeper_vm_should_run{vm="prom-a"}"#, 1.0),
        (r#"vmkeeper_vm_declared_cpus{vm="prom-a"}"#, 1.0),
        (
            r#"vmkeeper_vm_applied_memory_bytes{vm="prom-a"}"#,
            1024.0 * 1024.0 * 1024.0,
        ),
        (
            r#"vmkeeper_vm_disk_bytes{vm="prom-a"}"#,
            30.0 * 1024.0 * 1024.0 * 1024.0,
        ),
        (r#"vmkeeper_vm_qmp_connected{vm="prom-a"}"#, 1.0),
        (
            r#"vmkeeper_vm_unplanned_events_total{vm="prom-a",kind="guest-reset"}"#,
            0.0,
        ),
        (r#"vmkeeper_vm_monitoring_downtime{vm="prom-a"}"#, 0.0),
        ("vmkeeper_state_writable", 1.0),
    ] {
        assert_eq!(prom.value(q), Some(want), "{q}");
    }
    let series = prom.query(r#"{__name__=~"vmkeeper_.+", vm="prom-a"}"#);
    println!("Prometheus holds {} series of prom-a", series.len());
    assert!(
        prom.query(r#"vmkeeper_pass_duration_seconds_count"#)
            .first()
            .is_some_and(|s| s["value"][1].as_str().unwrap_or("0") != "0"),
        "passes are observed"
    );

    let mark = host.console_len("prom-a");
    send_guest(&host.dir, "prom-a", "reboot");
    wait_until(Duration::from_secs(30), "reset alarm", || {
        host.count("prom-a", UNPLANNED) == 1
    });
    host.wait_vmsize("prom-a", Host::sectors(30), mark, BOOT);
    wait_until(Duration::from_secs(30), "the counter in Prometheus", || {
        prom.value(r#"vmkeeper_vm_unplanned_events_total{vm="prom-a",kind="guest-reset"}"#)
            == Some(1.0)
    });
    assert_eq!(
        prom.value(r#"increase(vmkeeper_vm_unplanned_events_total{vm="prom-a",kind="guest-reset"}[5m]) > 0"#)
            .map(|v| v > 0.0),
        Some(true)
    );
    wait_until(Duration::from_secs(30), "the example rule fires", || {
        prom.query(r#"ALERTS{alertname="VmkeeperUnplannedEvent",alertstate="firing"}"#)
            .iter()
            .any(|a| a["metric"]["vm"] == "prom-a" && a["metric"]["kind"] == "guest-reset")
    });
    // The offline VM alerts for nothing.
    assert!(prom.query(r#"ALERTS{vm="prom-b"}"#).is_empty());
    assert_eq!(
        prom.value(r#"vmkeeper_vm_unplanned_events_total{vm="prom-a",kind="guest-reset"}"#),
        Some(1.0),
        "one alarm for the double RESET"
    );
}

#[test]
fn alertmanager_gets_a_silence_per_maintenance_slot_and_deletion_and_loses_it_on_cancel() {
    let mut am = Alertmanager::new(&harness_scratch("am-silences"));
    am.start();
    let (mnt, del) = ("ams-mnt", "ams-del");
    let mut host = Host::new(
        "am-silences",
        &[(mnt, json!({})), (del, json!({ "online": false }))],
    );
    host.config["monitoring"] = json!({ "alertmanager": { "url": am.url } });
    host.write_config();
    host.start_daemon();
    host.wait_vmsize(mnt, Host::sectors(30), 0, BOOT);

    // A CPU change: a maintenance slot, silenced for its duration.
    host.change(mnt, json!({ "cores": 2 }));
    wait_until(Duration::from_secs(30), "the slot's silence", || {
        live(&am.silences_of(mnt)).len() == 1
    });
    let slot = host.vm_status(mnt)["maintenanceSlot"].clone();
    let s = &live(&am.silences_of(mnt))[0];
    println!(
        "maintenance silence {}: {} .. {} (slot {} .. {})",
        s["id"], s["startsAt"], s["endsAt"], slot["start"], slot["end"]
    );
    assert_eq!(instant(&s["startsAt"]), instant(&slot["start"]));
    assert_eq!(instant(&s["endsAt"]), instant(&slot["end"]));
    assert_eq!(s["status"]["state"], "pending");
    assert!(
        s["createdBy"].as_str().unwrap().starts_with("vmkeeper on "),
        "{s}"
    );
    assert!(
        s["comment"]
            .as_str()
            .unwrap()
            .starts_with("vmkeeper maintenance of VM ams-mnt: maintenance reboot in slot"),
        "{s}"
    );
    wait_until(Duration::from_secs(10), "the id in status", || {
        host.vm_status(mnt)["silences"][0]["id"] == s["id"]
    });
    // The change reverted: no maintenance, no silence (expired at once).
    host.change(mnt, json!({ "cores": 1 }));
    wait_until(
        Duration::from_secs(30),
        "the slot's silence expired",
        || live(&am.silences_of(mnt)).is_empty(),
    );
    wait_until(Duration::from_secs(10), "forgotten", || {
        host.vm_status(mnt)["silences"] == json!([])
    });

    // A deletion: announced at T-5 days, silenced from T until the name is released.
    wait_recorded(&host, del);
    let d = deletion_date();
    let schedule = Schedule::new(Berlin, d);
    vmk(&host, &["delete", del, "--at", &d.to_string()]);
    assert!(
        live(&am.silences_of(del)).is_empty(),
        "none before the announcement"
    );
    let announce = schedule.at(Stage::Announce).with_timezone(&Utc) + TimeDelta::minutes(1);
    vmk(&host, &["run-due", "--now", &announce.to_rfc3339()]);
    wait_until(Duration::from_secs(30), "the deletion's silence", || {
        live(&am.silences_of(del)).len() == 1
    });
    let s = &live(&am.silences_of(del))[0];
    let (t, free) = (
        schedule.t().with_timezone(&Utc),
        schedule.at(Stage::ReleaseName).with_timezone(&Utc),
    );
    println!(
        "deletion silence {}: {} .. {} (T {t}, name released {free})",
        s["id"], s["startsAt"], s["endsAt"]
    );
    assert_eq!(instant(&s["startsAt"]), t);
    assert_eq!(instant(&s["endsAt"]), free);
    assert!(
        s["comment"]
            .as_str()
            .unwrap()
            .starts_with(&format!("vmkeeper deletion of VM {del}: deleted on {d}")),
        "{s}"
    );
    wait_until(Duration::from_secs(10), "the id in the state", || {
        let st = state(&host);
        st["silences"][0]["id"] == s["id"] && st["silences"][0]["purpose"] == "deletion"
    });
    // A daemon restart neither doubles nor drops it.
    host.kill9_daemon();
    host.start_daemon();
    wait_until(Duration::from_secs(30), "daemon back", || {
        host.vm_status(del)["silences"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
    // The restarted daemon's first sync round starts at once and takes milliseconds on
    // loopback; a second silence would be there well within this wait.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(am.silences_of(del).len(), 1);

    // Cancelled: the VM comes back and its alerts with it.
    vmk(
        &host,
        &[
            "cancel-deletion",
            del,
            "--now",
            &(announce + TimeDelta::hours(1)).to_rfc3339(),
        ],
    );
    wait_until(
        Duration::from_secs(30),
        "the deletion's silence expired",
        || live(&am.silences_of(del)).is_empty(),
    );
    assert_eq!(am.silences_of(del).len(), 1, "expired, not a second one");
    wait_until(Duration::from_secs(10), "forgotten", || {
        state(&host)["silences"] == json!([])
    });
}

#[test]
fn a_stopped_alertmanager_delays_the_silence_but_not_the_stage() {
    let mut am = Alertmanager::new(&harness_scratch("am-outage"));
    am.start();
    am.stop();
    let vm = "amo-del";
    let mut host = Host::new("am-outage", &[(vm, json!({ "online": false }))]);
    let port = free_port();
    host.config["monitoring"] = json!({ "alertmanager": { "url": am.url } });
    host.config["metrics"] = json!({ "listen": format!("127.0.0.1:{port}") });
    host.write_config();
    host.start_daemon();
    wait_recorded(&host, vm);
    let d = deletion_date();
    let schedule = Schedule::new(Berlin, d);
    vmk(&host, &["delete", vm, "--at", &d.to_string()]);
    let announce = schedule.at(Stage::Announce).with_timezone(&Utc) + TimeDelta::minutes(1);
    vmk(&host, &["run-due", "--now", &announce.to_rfc3339()]);
    // The stage ran, with Alertmanager down.
    assert_eq!(
        state(&host)["deletions"][vm]["progress"]["last"],
        "announce"
    );
    wait_until(Duration::from_secs(30), "the outage in status", || {
        host.status()["host"]["alertmanager"]["reachable"] == false
    });
    let a = &host.status()["host"]["alertmanager"];
    println!("status while Alertmanager is down: {a}");
    assert_eq!(a["silencesPending"], 1);
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect to Alertmanager"),
        "{a}"
    );
    let (_, text) = http("GET", &format!("http://127.0.0.1:{port}/metrics"));
    assert!(
        text.lines().any(|l| l == "vmkeeper_alertmanager_up 0"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "vmkeeper_silences_pending 1"),
        "{text}"
    );

    let back = std::time::Instant::now();
    am.start();
    wait_until(
        Duration::from_secs(120),
        "the silence once it is back",
        || live(&am.silences_of(vm)).len() == 1,
    );
    println!(
        "silence made {:?} after Alertmanager came back",
        back.elapsed()
    );
    let s = &live(&am.silences_of(vm))[0];
    assert_eq!(instant(&s["startsAt"]), schedule.t().with_timezone(&Utc));
    assert_eq!(
        instant(&s["endsAt"]),
        schedule.at(Stage::ReleaseName).with_timezone(&Utc)
    );
    wait_until(Duration::from_secs(10), "status reachable", || {
        let a = host.status()["host"]["alertmanager"].clone();
        a["reachable"] == true && a["silencesPending"] == 0
    });
}

/// A scratch directory of the harness for a program the test runs beside the daemon.
fn harness_scratch(name: &str) -> std::path::PathBuf {
    support::harness().scratch(name)
}
