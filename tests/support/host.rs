//! A vmkeeper daemon under test: its config, its transient unit in the harness systemd,
//! and ways to look at what it did (status, journal, hook log, guest consoles).
//!
//! Each test builds its own `Host` with its own VM names, so tests run in parallel.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Harness, harness};

/// A deletion date far enough ahead (ten days, Berlin) that a request made now is valid and
/// no real timer fires during a test.
pub fn deletion_date() -> chrono::NaiveDate {
    chrono::Utc::now()
        .with_timezone(&chrono_tz::Europe::Berlin)
        .date_naive()
        .checked_add_days(chrono::Days::new(10))
        .unwrap()
}

/// Upper bound for a TCG guest to boot on a loaded 2-core machine.
pub const BOOT: Duration = Duration::from_secs(90);
pub const UNPLANNED: &str = "5a9f1f2c90ee4c2fb7905d1dd0033ad3";
pub const STOPPED: &str = "43285ae08a3442daae2684d12070b7c4";
pub const ADOPTED: &str = "74137d52afc0430b8ee78ca6de7be8ee";
pub const REFUSED: &str = "ccf4d8956bc44914b5f421a2e3764e6b";
pub const GROWN: &str = "e5d7e239d53b4ffd90a42792a9d67a92";
pub const FAILED: &str = "a20647aaa26f4c73a16f17dc0727e58f";

/// One daemon with its configuration, under a scratch directory.
pub struct Host {
    pub h: &'static Harness,
    pub dir: PathBuf,
    pub unit: String,
    pub vms: Vec<String>,
    pub config: Value,
    /// Journal entries before this (µs since the epoch) belong to earlier runs.
    pub since_us: u128,
}

impl Host {
    /// A host declaring `vms` (name, extra keys), none started yet.
    pub fn new(test: &str, vms: &[(&str, Value)]) -> Host {
        let h = harness();
        let dir = h.scratch(test);
        let hook = dir.join("hook.sh");
        std::fs::write(
            &hook,
            format!("#!/bin/sh\ncat >> {}\n", dir.join("hook.log").display()),
        )
        .unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&hook)
            .status()
            .unwrap();
        let mut declared = serde_json::Map::new();
        for (name, extra) in vms {
            let mut vm = json!({
                "cores": 1, "memoryMiB": 1024, "diskGiB": 30,
                "boot": { "kernel": h.guest_kernel, "initrd": h.guest_initrd, "append": "console=ttyS0 quiet" }
            });
            vm.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            declared.insert((*name).to_owned(), vm);
        }
        let config = json!({
            "stateDir": dir.join("state"),
            "runtimeDir": dir.join("run"),
            "notifyCommand": hook,
            "contacts": ["ops@example.com"],
            "ceph": { "conf": h.ceph_conf, "pool": h.ceph_pool, "clientId": h.ceph_client,
                      "qemuClientId": h.ceph_qemu_client, "qemuKeyFile": h.ceph_qemu_key },
            "qemu": { "accel": h.accel, "stopTimeout": "60s", "user": h.qemu_user },
            // The harness's clock stands for a synchronized one (see `Host::clock_synced`).
            "clock": { "syncedFlag": dir.join("clock-synchronized") },
            "vms": declared,
        });
        std::fs::write(dir.join("clock-synchronized"), "").unwrap();
        let since_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros();
        let host = Host {
            since_us,
            h,
            unit: format!("vmkd-{test}.service"),
            vms: vms.iter().map(|(n, _)| (*n).to_owned()).collect(),
            dir,
            config,
        };
        host.write_config();
        host
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    pub fn write_config(&self) {
        std::fs::write(
            self.config_path(),
            serde_json::to_string_pretty(&self.config).unwrap(),
        )
        .unwrap();
    }

    /// Whether this host's clock counts as synchronized (its flag file exists); the daemon
    /// notices at its next look at the units (a tick, or a start).
    pub fn clock_synced(&self, synced: bool) {
        let flag = self.dir.join("clock-synchronized");
        if synced {
            std::fs::write(flag, "").unwrap();
        } else {
            let _ = std::fs::remove_file(flag);
        }
    }

    /// Changes one VM's keys and tells the daemon (SIGHUP), as `nixos-rebuild switch` does.
    pub fn change(&mut self, vm: &str, keys: Value) {
        let Value::Object(keys) = keys else {
            panic!("keys must be an object")
        };
        self.config["vms"][vm].as_object_mut().unwrap().extend(keys);
        self.write_config();
        self.h.systemctl(&["kill", "-s", "HUP", &self.unit]);
    }

    /// Writes the configuration as it is now and tells the daemon (SIGHUP).
    pub fn reload(&self) {
        self.write_config();
        self.h.systemctl(&["kill", "-s", "HUP", &self.unit]);
    }

    /// Runs `vmkeeper ARGS` (as root) and returns its output.
    pub fn vmkeeper(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
            .args(args)
            .output()
            .unwrap()
    }

    /// `vmkeeper run-due --now T`: drives time forward through the timers' code path.
    pub fn run_due(&self, now: &str) {
        let out = self.vmkeeper(&[
            "run-due",
            "--config",
            self.config_path().to_str().unwrap(),
            "--now",
            now,
        ]);
        assert!(
            out.status.success(),
            "run-due: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the daemon (with `--test-clock`, so `run-due --now` works) as a transient unit
    /// of the harness systemd.
    pub fn start_daemon(&self) {
        self.start_daemon_with(&[]);
    }

    /// Starts the daemon with extra environment, e.g. `VMKEEPER_FAILPOINT`.
    pub fn start_daemon_with(&self, env: &[(&str, &str)]) {
        self.start_daemon_props(env, &[]);
    }

    /// Starts the daemon with extra `systemd-run` arguments (`--property` pairs, a sandbox).
    pub fn start_daemon_hardened(&self, props: &[String]) {
        self.start_daemon_props(&[], props);
    }

    fn start_daemon_props(&self, env: &[(&str, &str)], props: &[String]) {
        let bin = env!("CARGO_BIN_EXE_vmkeeper");
        let mut args: Vec<String> = vec![
            "--unit".into(),
            self.unit.clone(),
            "--property".into(),
            "Type=notify".into(),
            "--setenv".into(),
            "VMKEEPER_LOG=info".into(),
        ];
        for (k, v) in env {
            args.extend(["--setenv".into(), format!("{k}={v}")]);
        }
        args.extend(props.iter().cloned());
        args.extend([
            bin.into(),
            "daemon".into(),
            "--test-clock".into(),
            "--config".into(),
            self.config_path().display().to_string(),
        ]);
        let out = self.h.inside("systemd-run", &args).output().unwrap();
        assert!(
            out.status.success(),
            "systemd-run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the daemon with `VMKEEPER_FAILPOINT` set.
    pub fn start_daemon_at(&self, failpoint: &str) {
        self.start_daemon_with(&[("VMKEEPER_FAILPOINT", failpoint)]);
    }

    /// Waits until the daemon holds at failpoint `point` (its journal says so).
    pub fn wait_failpoint(&self, vm: &str, point: &str, timeout: Duration) {
        wait_until(timeout, &format!("failpoint {point} reached"), || {
            self.journal(vm)
                .iter()
                .any(|e| e["ACTION"] == "failpoint" && e["FAILPOINT"] == point)
        });
    }

    pub fn kill9_daemon(&self) {
        self.h.systemctl(&["kill", "-s", "KILL", &self.unit]);
        wait_until(Duration::from_secs(10), "daemon gone", || {
            !self.active(&self.unit)
        });
        self.h.systemctl(&["reset-failed", &self.unit]);
    }

    /// `id ARGS` (e.g. `-u USER`), trimmed.
    pub fn id(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("id")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "id {args:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `stat -c '%a %U %G %n'` of each path, one line each.
    pub fn stat(&self, paths: &[PathBuf]) -> String {
        let out = std::process::Command::new("stat")
            .arg("-c")
            .arg("%a %U %G %n")
            .args(paths)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stat: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn active(&self, unit: &str) -> bool {
        self.h
            .systemctl(&["is-active", "--quiet", unit])
            .status
            .success()
    }

    pub fn vm_unit(vm: &str) -> String {
        format!("vmkeeper-vm-{vm}.service")
    }

    pub fn status(&self) -> Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmkeeper"))
            .args([
                "status",
                "--json",
                "--config",
                self.config_path().to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Every VM of `status --json`.
    pub fn vms(&self) -> Vec<Value> {
        self.status()["vms"].as_array().unwrap().clone()
    }

    pub fn vm_status(&self, vm: &str) -> Value {
        self.vms().into_iter().find(|v| v["name"] == vm).unwrap()
    }

    pub fn console(&self, vm: &str) -> PathBuf {
        self.dir.join("run/vms").join(vm).join("console.log")
    }

    /// Waits until the guest's console shows a disk of `sectors` (after `from` bytes).
    pub fn wait_vmsize(&self, vm: &str, sectors: u64, from: usize, timeout: Duration) {
        let want = format!("VMSIZE vda={sectors}");
        wait_until(timeout, &format!("{vm} prints {want}"), || {
            std::fs::read_to_string(self.console(vm))
                .is_ok_and(|s| s.get(from..).is_some_and(|t| t.contains(&want)))
        });
    }

    pub fn console_len(&self, vm: &str) -> usize {
        std::fs::read_to_string(self.console(vm)).map_or(0, |s| s.len())
    }

    /// The VM's journal entries (`journalctl VM=...`).
    pub fn journal(&self, vm: &str) -> Vec<Value> {
        let out = self
            .h
            .journalctl(&[&format!("VM={vm}"), "-o", "json", "--no-pager"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| {
                e["__REALTIME_TIMESTAMP"]
                    .as_str()
                    .and_then(|t| t.parse::<u128>().ok())
                    .is_some_and(|t| t >= self.since_us)
            })
            .collect()
    }

    pub fn count(&self, vm: &str, message_id: &str) -> usize {
        self.journal(vm)
            .iter()
            .filter(|e| e["MESSAGE_ID"] == message_id)
            .count()
    }

    /// The events the hook has taken so far, in order. A line the hook is still writing
    /// (no newline yet) is not one yet.
    pub fn hook_events(&self) -> Vec<Value> {
        let log = std::fs::read_to_string(self.dir.join("hook.log")).unwrap_or_default();
        let complete = log.rfind('\n').map_or("", |end| &log[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until the hook has taken at least `n` events that `pred` selects and returns
    /// them: the hook runs after the state and the journal show what it is told, so a test
    /// that saw the journal entry must still wait for the hook.
    pub fn wait_hooks(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let selected = || -> Vec<Value> { self.hook_events().into_iter().filter(&pred).collect() };
        wait_until(Duration::from_secs(30), &format!("{n} hook events"), || {
            selected().len() >= n
        });
        selected()
    }

    pub fn sectors(gib: u64) -> u64 {
        gib * (1 << 30) / 512
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.h.systemctl(&["stop", &self.unit]);
        for vm in &self.vms {
            self.h.systemctl(&["stop", &Host::vm_unit(vm)]);
            // Timers the daemon left for later stages must not outlive the test.
            self.h.systemctl(&[
                "stop",
                &format!("vmkeeper-maint-{vm}.timer"),
                &format!("vmkeeper-delete-{vm}-*.timer"),
            ]);
        }
        let mut units = vec![self.unit.clone()];
        units.extend(self.vms.iter().map(|v| Host::vm_unit(v)));
        let mut args = vec!["reset-failed"];
        args.extend(units.iter().map(String::as_str));
        self.h.systemctl(&args);
        // Images go too, so a rerun on the same harness starts from scratch.
        for vm in &self.vms {
            // Bounded, so a sick cluster cannot hang a test's teardown.
            self.h.rbd(&[
                "rm",
                "--no-progress",
                "--rados-osd-op-timeout=30",
                "--rados-mon-op-timeout=30",
                &self.h.image_spec(vm),
            ]);
        }
    }
}

pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

pub fn send_guest(dir: &Path, vm: &str, line: &str) {
    use std::io::Write;
    let mut s =
        std::os::unix::net::UnixStream::connect(dir.join("run/vms").join(vm).join("serial.sock"))
            .unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// systemd's MESSAGE_ID of "unit started" (SD_MESSAGE_UNIT_STARTED).
const UNIT_STARTED: &str = "39f53479d3a045ac8e11786248231fbf";

impl Host {
    /// `vmkeeper ARGS --config CONFIG` as root; panics unless it succeeds; returns stdout.
    pub fn vmkeeper_ok(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        let config = self.config_path();
        all.extend(["--config", config.to_str().unwrap()]);
        let out = self.vmkeeper(&all);
        assert!(
            out.status.success(),
            "vmkeeper {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many times systemd started the VM's unit since this host was made: one per QEMU
    /// instance.
    pub fn qemu_starts(&self, vm: &str) -> usize {
        let unit = Host::vm_unit(vm);
        let out = self.h.journalctl(&[
            &format!("UNIT={unit}"),
            &format!("MESSAGE_ID={UNIT_STARTED}"),
            "-o",
            "json",
            "--no-pager",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| {
                e["__REALTIME_TIMESTAMP"]
                    .as_str()
                    .and_then(|t| t.parse::<u128>().ok())
                    .is_some_and(|t| t >= self.since_us)
            })
            .count()
    }

    /// The VM's QEMU as a pid of the host (status shows the pid in the harness's namespace).
    pub fn qemu_host_pid(&self, vm: &str) -> Option<i32> {
        let name = format!("guest={vm},debug-threads=on");
        std::fs::read_dir("/proc").ok()?.find_map(|e| {
            let e = e.ok()?;
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|a| a == name.as_bytes())
                .then_some(pid)
        })
    }

    /// Cuts the QMP connection between the daemon and the VM's QEMU from outside: takes
    /// QEMU's end of the accepted connection (pidfd_getfd) and shuts it down, as a broken
    /// socket would. Returns false when no connection was found.
    pub fn cut_qmp(&self, vm: &str) -> bool {
        let Some(pid) = self.qemu_host_pid(vm) else {
            return false;
        };
        let qmp = self.dir.join("run/vms").join(vm).join("qmp.sock");
        // Connected (state 03) sockets bound to the QMP path: QEMU's accepted connection.
        let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        let inodes: Vec<String> = unix
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 8 && f[5] == "03" && f[7] == qmp.to_str()?).then(|| f[6].to_owned())
            })
            .collect();
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        let target = fds.filter_map(Result::ok).find_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            let link = link.to_str()?;
            let inode = link.strip_prefix("socket:[")?.strip_suffix(']')?;
            inodes
                .iter()
                .any(|i| i == inode)
                .then(|| fd.file_name().to_str()?.parse::<i32>().ok())
                .flatten()
        });
        let Some(fd) = target else {
            return false;
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
        // passed.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if pidfd < 0 {
            return false;
        }
        // SAFETY: pidfd_getfd duplicates fd `fd` of the process behind `pidfd` into this
        // process; it takes only integers and returns a new fd or -1.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as i32;
        // SAFETY: shutdown and close take fds this function owns (or -1, which they reject).
        let ok = dup >= 0 && unsafe { libc::shutdown(dup, libc::SHUT_RDWR) } == 0;
        // SAFETY: as above; both fds were opened here.
        unsafe {
            libc::close(dup);
            libc::close(pidfd);
        }
        ok
    }
}

/// The deletion journal entries' MESSAGE_ID.
pub const DELETION: &str = "5c8158d104664dda940939c01b257d88";

impl Host {
    /// The daemon's state file as JSON.
    pub fn state_json(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("state/state.json")).unwrap()).unwrap()
    }

    /// Ids of the images named `name` in the pool's trash.
    pub fn trash(&self, name: &str) -> Vec<String> {
        self.h
            .trash_entries(name)
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Whether image `name` exists in the pool.
    pub fn image_exists(&self, name: &str) -> bool {
        self.h
            .rbd(&["info", &self.h.image_spec(name)])
            .status
            .success()
    }

    /// Journal entries of the deletion stage `stage` completing.
    pub fn stage_done(&self, vm: &str, stage: &str) -> Vec<Value> {
        self.journal(vm)
            .into_iter()
            .filter(|e| {
                e["MESSAGE_ID"] == DELETION
                    && e["ACTION"] == "deletion-stage"
                    && e["STAGE"] == stage
            })
            .collect()
    }
}
