//! Benchmark of a host start: a real daemon (release binary `VMKEEPER_BIN`) with N declared
//! VMs whose disks exist and whose QEMUs are all gone (as after a host reboot) starts them
//! all. Timed: until every unit is active, every QMP connection is up, and every guest printed
//! its first line; once with the host-wide bound on concurrent starts
//! (`qemu.maxConcurrentStarts`, default 4) and once without it (1000).
//!
//! Usage: bench_boot [N] (default 50). Run by scripts/bench-boot.sh under harness/run.sh.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run under the harness"))
}

struct Bench {
    dir: PathBuf,
    nsenter: Vec<String>,
    bin: String,
    names: Vec<String>,
}

impl Bench {
    fn inside(&self, args: &[&str]) -> std::process::Output {
        let (prog, rest) = self.nsenter.split_first().expect("VMKEEPER_NSENTER");
        Command::new(prog)
            .args(rest)
            .arg("--")
            .args(args)
            .output()
            .expect("nsenter")
    }

    fn config(&self, bound: usize) -> PathBuf {
        let vms: serde_json::Map<String, Value> = self
            .names
            .iter()
            .map(|n| {
                // `no_timer_check`: 50 TCG guests on 2 cores make a guest kernel's boot-time
                // check of the timer interrupt fail ("IO-APIC + timer doesn't work!", a panic);
                // the kernel documents the flag for virtualized guests, where ticks can be late.
                let vm = json!({
                    "cores": 1, "memoryMiB": 1024, "diskGiB": 30,
                    "boot": { "kernel": env("VMKEEPER_GUEST_KERNEL"),
                              "initrd": env("VMKEEPER_GUEST_INITRD"),
                              "append": "console=ttyS0 quiet no_timer_check" }
                });
                (n.clone(), vm)
            })
            .collect();
        let c = json!({
            "stateDir": self.dir.join("state"),
            "runtimeDir": self.dir.join("run"),
            "ceph": { "conf": env("CEPH_CONF"), "pool": env("VMKEEPER_CEPH_POOL"),
                      "clientId": env("VMKEEPER_CEPH_CLIENT"),
                      "qemuClientId": env("VMKEEPER_CEPH_QEMU_CLIENT"),
                      "qemuKeyFile": env("VMKEEPER_CEPH_QEMU_KEY") },
            "qemu": { "accel": env("VMKEEPER_QEMU_ACCEL"), "stopTimeout": "5s",
                      "user": env("VMKEEPER_QEMU_USER"), "maxConcurrentStarts": bound },
            "vms": vms,
        });
        let path = self.dir.join("config.json");
        std::fs::write(&path, c.to_string()).unwrap();
        path
    }

    fn start_daemon(&self, config: &Path) {
        let out = self.inside(&[
            "systemd-run",
            "--unit",
            "vmkd-bench-boot.service",
            "--property",
            "Type=notify",
            &self.bin,
            "daemon",
            "--config",
            config.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "systemd-run: {out:?}");
    }

    /// Stops the daemon, then every QEMU (from outside, as a host reboot would end them).
    fn stop_all(&self) {
        self.inside(&["systemctl", "stop", "vmkd-bench-boot.service"]);
        self.inside(&["systemctl", "kill", "-s", "KILL", "vmkeeper-vm-boot*"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.active() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.inside(&["systemctl", "reset-failed", "vmkeeper-vm-boot*"]);
    }

    fn active(&self) -> usize {
        let out = self.inside(&[
            "systemctl",
            "list-units",
            "--no-legend",
            "--plain",
            "--state=active",
            "vmkeeper-vm-boot*",
        ]);
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    fn connected(&self, rt: &tokio::runtime::Runtime) -> usize {
        let socket = self.dir.join("run").join(vmkeeper::api::SOCKET);
        let r = rt.block_on(vmkeeper::api::call(
            &socket,
            &vmkeeper::api::Request::Status,
            Duration::from_secs(5),
        ));
        match r {
            Ok(vmkeeper::api::Response::Ok(v)) => v["vms"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|s| s["qmp"] == "connected").count()),
            _ => 0,
        }
    }

    fn booted(&self, since: usize) -> usize {
        self.names
            .iter()
            .filter(|n| {
                let log = self.dir.join("run/vms").join(n).join("console.log");
                std::fs::read_to_string(log)
                    .is_ok_and(|t| t.len() > since && t.contains("VMSIZE vda="))
            })
            .count()
    }

    /// One host start; returns (all active, all connected, all booted) since the daemon start.
    fn run(&self, bound: usize, rt: &tokio::runtime::Runtime) -> [Duration; 3] {
        let config = self.config(bound);
        let t = Instant::now();
        self.start_daemon(&config);
        let n = self.names.len();
        let mut marks = [None, None, None];
        let mut shown = Duration::ZERO;
        while marks.iter().any(Option::is_none) {
            // Progress, so a slow run shows where it stands rather than hanging silently.
            if t.elapsed() >= shown + Duration::from_secs(10) {
                shown = t.elapsed();
                eprintln!(
                    "  {:>5.0} s: {} active, {} QMP connected, {} booted of {n}",
                    shown.as_secs_f64(),
                    self.active(),
                    self.connected(rt),
                    self.booted(0)
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(900),
                "host start too slow"
            );
            if marks[0].is_none() && self.active() == n {
                marks[0] = Some(t.elapsed());
            }
            if marks[1].is_none() && self.connected(rt) == n {
                marks[1] = Some(t.elapsed());
            }
            if marks[2].is_none() && self.booted(0) == n {
                marks[2] = Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        marks.map(Option::unwrap)
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(50, |a| a.parse().expect("N is a number"));
    let dir = PathBuf::from(env("VMKEEPER_HARNESS_DIR")).join("bench-boot");
    std::fs::create_dir_all(&dir).unwrap();
    let b = Bench {
        dir,
        nsenter: env("VMKEEPER_NSENTER")
            .split_whitespace()
            .map(String::from)
            .collect(),
        bin: env("VMKEEPER_BIN"),
        names: (0..n).map(|i| format!("boot{i:03}")).collect(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // First start: the daemon creates the disks; not timed.
    eprintln!("# creating {n} VMs (disks and a first start), not timed");
    b.run(1000, &rt);
    let mut rows = vec![];
    for bound in [4, 1000] {
        b.stop_all();
        for n in &b.names {
            // A fresh console log, so "booted" means booted in this start.
            let _ = std::fs::remove_file(b.dir.join("run/vms").join(n).join("console.log"));
        }
        eprintln!("# host start with maxConcurrentStarts = {bound}");
        rows.push((bound, b.run(bound, &rt)));
    }
    b.stop_all();
    println!(
        "host start with {n} declared VMs (disks exist, no QEMU runs), seconds since the daemon started"
    );
    println!(
        "{:<28} {:>12} {:>14} {:>14}",
        "start bound", "units active", "QMP connected", "guests booted"
    );
    for (bound, [a, c, g]) in rows {
        let label = if bound >= 1000 {
            "none (1000)".to_owned()
        } else {
            format!("{bound} at a time (default)")
        };
        println!(
            "{label:<28} {:>12.1} {:>14.1} {:>14.1}",
            a.as_secs_f64(),
            c.as_secs_f64(),
            g.as_secs_f64()
        );
    }
    // Disks go, so a rerun on the same harness starts from scratch.
    for n in &b.names {
        let _ = Command::new("rbd")
            .args([
                "--conf",
                &env("CEPH_CONF"),
                "--id",
                &env("VMKEEPER_CEPH_CLIENT"),
            ])
            .args([
                "rm",
                "--no-progress",
                &format!("{}/{n}", env("VMKEEPER_CEPH_POOL")),
            ])
            .output();
    }
}
