//! A Ceph outage under a running daemon: with the only OSD stopped, a live grow fails with a
//! clear error naming the VM and the operation, the daemon and the other VM keep running,
//! and the grow succeeds once the OSD is back.
//!
//! Stopping the OSD stops every other test's Ceph too, so this binary never shares a harness:
//! nextest's default profiles leave it out, and scripts/test.sh runs it alone in a harness
//! of its own (`--profile outage`), see docs/development/testing.md.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::Harness;
use support::host::*;

/// The harness's only OSD, frozen with SIGSTOP until `resume` (or drop).
///
/// Frozen rather than killed: the OSD keeps its objects in memory (memstore), so a killed
/// one comes back empty. To clients a frozen OSD is a down one: every request to it waits
/// until their OSD timeout (vmkeeper's 30 s).
struct StoppedOsd {
    h: &'static Harness,
    pid: Option<String>,
}

impl StoppedOsd {
    fn stop(h: &'static Harness) -> StoppedOsd {
        let pidfile = h.dir.join("ceph/run/ceph-osd.0.pid");
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()))
            .trim()
            .to_owned();
        signal(&pid, "STOP");
        // The guard exists before anything can fail, so the OSD is resumed whatever happens.
        let osd = StoppedOsd {
            h,
            pid: Some(pid.clone()),
        };
        // SIGSTOP takes effect asynchronously: wait until the kernel shows the task stopped.
        wait_until(Duration::from_secs(5), "ceph-osd stopped", || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") T "))
        });
        osd
    }

    /// Brings the OSD back as a restarted one comes back: running, and in a new interval.
    /// The mark-down gives it that interval (it rejoins at once): after a freeze longer than
    /// the read lease (16 s), placement groups can otherwise stay "waiting for readable"
    /// for minutes (seen in 2 of 6 runs), which a real restart never meets.
    fn resume(mut self) {
        let pid = self.pid.take().unwrap();
        signal(&pid, "CONT");
        let out = self.h.ceph(&["osd", "down", "0"]);
        assert!(
            out.status.success(),
            "ceph osd down 0: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for StoppedOsd {
    fn drop(&mut self) {
        if let Some(pid) = &self.pid {
            signal(pid, "CONT");
        }
    }
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn a_grow_fails_clearly_while_the_osd_is_down_and_succeeds_after() {
    let mut host = Host::new(
        "outage",
        &[("outage-a", json!({})), ("outage-b", json!({}))],
    );
    host.start_daemon();
    for vm in ["outage-a", "outage-b"] {
        host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);
    }
    let pid_a = host.vm_status("outage-a")["qemuPid"].clone();
    let pid_b = host.vm_status("outage-b")["qemuPid"].clone();

    let osd = StoppedOsd::stop(host.h);
    let stopped = Instant::now();
    let mark_a = host.console_len("outage-a");
    let mark_b = host.console_len("outage-b");
    host.change("outage-a", json!({ "diskGiB": 35 }));

    // The grow fails after the OSD timeout, naming the VM and the operation.
    wait_until(Duration::from_secs(90), "grow failure journaled", || {
        host.journal("outage-a")
            .iter()
            .any(|e| e["MESSAGE_ID"] == FAILED && e["ACTION"] == "grow-disk")
    });
    eprintln!(
        "grow failed {:.1} s after the OSD stopped",
        stopped.elapsed().as_secs_f64()
    );
    let failure = host
        .journal("outage-a")
        .into_iter()
        .find(|e| e["MESSAGE_ID"] == FAILED)
        .unwrap();
    let message = failure["MESSAGE"].as_str().unwrap();
    eprintln!("journal: {message}");
    assert!(
        message.starts_with("VM outage-a: grow-disk failed: ") && message.contains("outage-a"),
        "{failure}"
    );
    assert!(message.contains("next attempt in"), "{failure}");
    assert_eq!(failure["VM"], "outage-a");

    // Nothing else is disturbed: the daemon answers, both QEMUs still run, and the other
    // guest keeps printing (it reads its disk size from sysfs, no I/O to the frozen OSD).
    assert!(host.active(&host.unit), "the daemon stays up");
    let asked = Instant::now();
    let b = host.vm_status("outage-b");
    eprintln!(
        "status answered in {:.1} s during the outage",
        asked.elapsed().as_secs_f64()
    );
    assert_eq!(b["running"], true);
    assert_eq!(b["qemuPid"], pid_b);
    host.wait_vmsize(
        "outage-b",
        Host::sectors(30),
        mark_b,
        Duration::from_secs(10),
    );
    let a = host.vm_status("outage-a");
    assert_eq!(a["qemuPid"], pid_a);
    assert_eq!(a["applied"]["diskGiB"], 30);
    let seen = std::fs::read_to_string(host.console("outage-a")).unwrap();
    assert!(!seen[mark_a..].contains(&format!("VMSIZE vda={}", Host::sectors(35))));

    osd.resume();
    let resumed = Instant::now();
    // Retried on the backoff's schedule, without any further event.
    host.wait_vmsize(
        "outage-a",
        Host::sectors(35),
        mark_a,
        Duration::from_secs(120),
    );
    eprintln!(
        "guest saw the new size {:.1} s after the OSD came back",
        resumed.elapsed().as_secs_f64()
    );
    wait_until(Duration::from_secs(10), "grow journaled", || {
        host.journal("outage-a")
            .iter()
            .any(|e| e["MESSAGE_ID"] == GROWN && e["ACTION"] == "grow-disk")
    });
    assert_eq!(host.h.image_size("outage-a"), 35 << 30);
    assert_eq!(host.vm_status("outage-a")["qemuPid"], pid_a);
    assert_eq!(host.vm_status("outage-b")["qemuPid"], pid_b);
    assert!(host.active(&host.unit), "the daemon stays up");
    assert_eq!(
        host.count("outage-a", UNPLANNED) + host.count("outage-b", UNPLANNED),
        0
    );
}

/// Ten VMs stop at once while Ceph is frozen (their QEMUs cannot close their disks): the
/// daemon keeps answering `status` from memory. Prints the latency of every answer.
#[test]
fn status_answers_while_ten_vms_stop_and_ceph_is_frozen() {
    let names: Vec<String> = (0..10).map(|i| format!("storm-{i}")).collect();
    let vms: Vec<(&str, serde_json::Value)> =
        names.iter().map(|n| (n.as_str(), json!({}))).collect();
    let mut host = Host::new("storm", &vms);
    host.start_daemon();
    for vm in &names {
        host.wait_vmsize(vm, Host::sectors(30), 0, Duration::from_secs(180));
    }
    let socket = host.dir.join("run").join(vmkeeper::api::SOCKET);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let osd = StoppedOsd::stop(host.h);
    for vm in &names {
        host.config["vms"][vm.as_str()]["online"] = json!(false);
    }
    host.reload();
    let began = Instant::now();
    let mut samples = vec![];
    let mut stopped_all = None;
    // Until every unit is gone and for 20 s more, while QEMUs hang on the frozen OSD.
    while began.elapsed() < Duration::from_secs(90) {
        let t = Instant::now();
        let r = rt
            .block_on(vmkeeper::api::call(
                &socket,
                &vmkeeper::api::Request::Status,
                Duration::from_secs(10),
            ))
            .expect("status answers");
        samples.push(t.elapsed());
        let vmkeeper::api::Response::Ok(v) = r else {
            panic!("status: {r:?}")
        };
        let running = v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["running"] == true)
            .count();
        if running == 0 && stopped_all.is_none() {
            stopped_all = Some(began.elapsed());
        }
        if stopped_all.is_some_and(|s| began.elapsed() > s + Duration::from_secs(20)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    osd.resume();
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "status during 10 stops with Ceph frozen: {} answers, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; all stopped after {}",
        samples.len(),
        ms(at(0.5)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1]),
        stopped_all.map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
    );
    wait_until(Duration::from_secs(120), "every VM stopped", || {
        names.iter().all(|vm| !host.active(&Host::vm_unit(vm)))
    });
    let alarms: usize = names.iter().map(|vm| host.count(vm, UNPLANNED)).sum();
    assert_eq!(alarms, 0, "planned stops raise no alarm");
}
