//! Least privilege, on the harness: a VM's QEMU runs as the unprivileged QEMU user with no
//! capabilities, no new privileges and a seccomp filter, on a tap device the daemon made on a
//! real bridge, with its Ceph client of its own; its files are closed to other users. Prints
//! `systemd-analyze security` of the VM unit and of a daemon unit hardened as the NixOS
//! module hardens it (which the daemon runs under here).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::host::*;

/// A bridge in the host's network namespace (which the harness's systemd shares), removed
/// when dropped, with the VM's tap: the test's teardown stops the VM unit behind the
/// daemon's back, and only the daemon's own stops remove taps.
struct Bridge(&'static str, &'static str);

impl Bridge {
    fn new(name: &'static str, tap: &'static str) -> Bridge {
        for dev in [name, tap] {
            let _ = Command::new("ip").args(["link", "del", dev]).output();
        }
        for args in [
            vec!["link", "add", name, "type", "bridge"],
            vec!["link", "set", name, "up"],
        ] {
            let ok = Command::new("ip").args(&args).status().unwrap().success();
            assert!(ok, "ip {}", args.join(" "));
        }
        Bridge(name, tap)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for dev in [self.0, self.1] {
            let _ = Command::new("ip").args(["link", "del", dev]).output();
        }
    }
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
        .trim()
}

/// `systemd-analyze security UNIT` inside the harness: the table and the overall exposure.
fn analyze(host: &Host, unit: &str) -> f64 {
    let out = host
        .h
        .inside("systemd-analyze", ["security", "--no-pager", unit])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("systemd-analyze security {unit}:\n{text}");
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    line.split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no score in {line}"))
}

/// The daemon's sandbox from nixos/default.nix, as `systemd-run` properties (with the test's
/// directories writable instead of /var/lib/vmkeeper and /run/vmkeeper).
fn daemon_hardening(host: &Host) -> Vec<String> {
    [
        "CapabilityBoundingSet=CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_KILL CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        &format!("ReadWritePaths={}", host.h.dir.display()),
        "ProtectHome=yes",
        "PrivateTmp=no",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/net/tun rw",
        "ProtectClock=yes",
        "ProtectControlGroups=yes",
        "ProtectHostname=yes",
        "ProtectKernelLogs=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelTunables=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@resources",
        "SystemCallErrorNumber=EPERM",
        "UMask=0022",
    ]
    .iter()
    .flat_map(|p| ["--property".to_owned(), (*p).to_owned()])
    .collect()
}

#[test]
fn qemu_runs_unprivileged_sandboxed_and_on_a_tap_the_daemon_made() {
    let bridge = Bridge::new("vmkbr-sbx", "vmk-sbx-a");
    let vm = "sbx-a";
    let host = Host::new(
        "sandbox",
        &[(
            vm,
            json!({ "network": { "bridge": bridge.0, "macAddress": "52:54:00:13:00:01" } }),
        )],
    );
    host.start_daemon_hardened(&daemon_hardening(&host));
    host.wait_vmsize(vm, Host::sectors(30), 0, BOOT);

    // The running QEMU, as the kernel sees it.
    let pid = host.vm_status(vm)["qemuPid"].as_u64().expect("a QEMU pid");
    let out = host
        .h
        .inside("cat", [format!("/proc/{pid}/status")])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    for key in [
        "Uid",
        "Gid",
        "Groups",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
    ] {
        println!("QEMU {key}: {}", field(&status, key));
    }
    let uid: Vec<&str> = field(&status, "Uid").split_whitespace().collect();
    let qemu_uid = host.id(&["-u", &host.h.qemu_user]);
    assert!(uid.iter().all(|u| *u == qemu_uid), "Uid {uid:?}");
    assert_ne!(qemu_uid, "0");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&status, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    assert_eq!(field(&status, "Seccomp"), "2");

    // The tap: made by the daemon for QEMU's user, on the bridge, and opened by QEMU.
    let tap = "vmk-sbx-a";
    let link = Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", tap])
        .output()
        .unwrap();
    let link: Value = serde_json::from_slice::<Value>(&link.stdout).unwrap()[0].clone();
    println!("tap: {link}");
    assert_eq!(link["master"], bridge.0);
    assert_eq!(
        link["linkinfo"]["info_data"]["user"],
        host.h.qemu_user.as_str()
    );
    let flags = link["flags"].as_array().unwrap();
    assert!(flags.iter().any(|f| f == "UP"), "{flags:?}");
    assert!(
        !flags.iter().any(|f| f == "NO-CARRIER"),
        "QEMU holds the tap open: {flags:?}"
    );

    // Files: the VM's directory and what QEMU made in it are closed to other users.
    let run = host.dir.join("run");
    let modes = host.stat(&[
        run.join("vms"),
        run.join("vms").join(vm),
        run.join("vms").join(vm).join("console.log"),
        run.join("vms").join(vm).join("qmp.sock"),
        run.join("vms").join(vm).join("serial.sock"),
    ]);
    println!("modes:\n{modes}");
    let lines: Vec<&str> = modes.lines().collect();
    let qemu = &host.h.qemu_user;
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>()[..3],
        ["750", "root", qemu.as_str()]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>()[..3],
        ["750", qemu.as_str(), "root"]
    );
    for l in &lines[2..] {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert!(f[0].ends_with("00"), "not private: {l}");
        assert_eq!(f[1], qemu.as_str(), "{l}");
    }
    // Another user, given a way through the directories above, still reads nothing.
    let mut p = run.clone();
    while p.starts_with(&host.h.dir) {
        Command::new("chmod").arg("o+x").arg(&p).status().unwrap();
        p.pop();
    }
    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(run.join("vms").join(vm).join("console.log"))
        .output()
        .unwrap();
    assert!(!nobody.status.success(), "another user read the console");

    // What QEMU sees of the runtime directory: its own VM directory, nothing else (no API
    // socket, no other VM); of /tmp: only the paths bound in for it.
    let seen = |path: &Path| {
        let out = host
            .h
            .inside("nsenter", ["-t", &pid.to_string(), "-m", "ls", "-A"])
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    println!("QEMU sees in {}: {:?}", run.display(), seen(&run));
    println!("QEMU sees in /tmp: {:?}", seen(Path::new("/tmp")));
    assert_eq!(seen(&run), ["vms"]);
    assert_eq!(seen(&run.join("vms")), [vm]);
    assert!(seen(&run.join("vms").join(vm)).contains(&"qmp.sock".to_owned()));

    // QEMU's Ceph client is its own, limited to the pool.
    let caps = host.h.ceph(&[
        "auth",
        "get",
        &format!("client.{}", host.h.ceph_qemu_client),
    ]);
    let caps = String::from_utf8_lossy(&caps.stdout);
    println!("{caps}");
    assert!(caps.contains("profile rbd pool=rbd"), "{caps}");

    let vm_score = analyze(&host, &Host::vm_unit(vm));
    let daemon_score = analyze(&host, &host.unit);
    println!("exposure: VM unit {vm_score}, daemon unit {daemon_score}");
    assert!(vm_score <= 3.0, "VM unit exposure {vm_score} is above 3.0");

    // A planned reboot starts the sandboxed QEMU again, on a fresh tap.
    let mark = host.console_len(vm);
    let out = host.vmkeeper(&[
        "reboot",
        vm,
        "--now",
        "--config",
        host.config_path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    host.wait_vmsize(vm, Host::sectors(30), mark, BOOT);
    assert_ne!(host.vm_status(vm)["qemuPid"].as_u64(), Some(pid));
    wait_until(Duration::from_secs(10), "the tap is back", || {
        Command::new("ip")
            .args(["link", "show", "dev", tap])
            .status()
            .unwrap()
            .success()
    });
}
