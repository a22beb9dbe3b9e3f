//! The sandbox of a VM's QEMU unit: the unprivileged user it runs as, no capabilities, a
//! system call filter, a read-only file system in which it sees its own VM directory and
//! nothing of the others, and only the devices a VM needs. docs/development/security.md says
//! why each setting is there and what is left exposed.

use std::path::{Path, PathBuf};

use crate::config::{Accel, Config};
use crate::exec::systemd::PropertyValue;
use crate::model::VmSpec;
use crate::render::VmPaths;

/// Directories that `PrivateTmp=` replaces with empty private ones.
const TMP_DIRS: [&str; 2] = ["/tmp", "/var/tmp"];

/// `MS_REC`: bind a directory with the mounts below it.
const MS_REC: u64 = 0x4000;

/// The unit properties of `spec`'s QEMU.
pub fn qemu_unit_properties(
    config: &Config,
    spec: &VmSpec,
    paths: &VmPaths,
) -> Vec<(String, PropertyValue)> {
    let s = |k: &str, v: &str| (k.to_owned(), PropertyValue::Str(v.to_owned()));
    let b = |k: &str, v: bool| (k.to_owned(), PropertyValue::Bool(v));
    let strs = |k: &str, v: &[&str]| {
        (
            k.to_owned(),
            PropertyValue::Strs(v.iter().map(|x| (*x).to_owned()).collect()),
        )
    };
    let flagged = |k: &str, allow: bool, v: &[&str]| {
        (
            k.to_owned(),
            PropertyValue::FlaggedStrs(allow, v.iter().map(|x| (*x).to_owned()).collect()),
        )
    };
    let dir = paths.dir.display().to_string();
    let mut props = vec![
        s("User", &config.qemu.user),
        ("CapabilityBoundingSet".into(), PropertyValue::U64(0)),
        ("AmbientCapabilities".into(), PropertyValue::U64(0)),
        b("NoNewPrivileges", true),
        ("UMask".into(), PropertyValue::U32(0o077)),
        // System calls: what a service needs, without privileged ones, resource control, and
        // anything under @debug (ptrace of another VM's QEMU, which runs as the same user).
        // `seccomp` itself, so that QEMU can install its own filter (-sandbox) on top.
        flagged("SystemCallFilter", true, &["@system-service", "seccomp"]),
        flagged("SystemCallFilter", false, &["@privileged", "@resources"]),
        strs("SystemCallArchitectures", &["native"]),
        (
            "SystemCallErrorNumber".into(),
            PropertyValue::I32(libc::EPERM),
        ),
        // librbd talks TCP to the monitors and OSDs; QMP and the serial port are Unix sockets.
        flagged(
            "RestrictAddressFamilies",
            true,
            &["AF_UNIX", "AF_INET", "AF_INET6"],
        ),
        ("RestrictNamespaces".into(), PropertyValue::U64(0)),
        b("RestrictRealtime", true),
        b("RestrictSUIDSGID", true),
        b("LockPersonality", true),
        // File system: read-only, no home, private /tmp, and the VM's own directory.
        s("ProtectSystem", "strict"),
        s("ProtectHome", "yes"),
        b("PrivateTmp", true),
        s("ProtectProc", "invisible"),
        s("ProcSubset", "pid"),
        b("ProtectKernelTunables", true),
        b("ProtectKernelModules", true),
        b("ProtectKernelLogs", true),
        b("ProtectControlGroups", true),
        b("ProtectClock", true),
        b("ProtectHostname", true),
        // Devices: a private /dev with the two QEMU needs bound in (missing ones skipped).
        b("PrivateDevices", true),
        s("DevicePolicy", "closed"),
        (
            "DeviceAllow".into(),
            PropertyValue::Pairs(vec![
                ("/dev/kvm".into(), "rw".into()),
                ("/dev/net/tun".into(), "rw".into()),
            ]),
        ),
    ];
    if config.qemu.accel == Accel::Kvm {
        // TCG writes the code it translates into executable memory; KVM does not.
        props.push(b("MemoryDenyWriteExecute", true));
    }
    let binds = vec![
        ("/dev/kvm".to_owned(), "/dev/kvm".to_owned(), true, 0),
        (
            "/dev/net/tun".to_owned(),
            "/dev/net/tun".to_owned(),
            true,
            0,
        ),
        (dir.clone(), dir, false, MS_REC),
    ];
    // The other VMs' directories (QMP sockets, consoles) and the API socket are hidden: an
    // empty read-only tmpfs over the runtime directory, with the VM's own one bound in.
    props.push((
        "TemporaryFileSystem".into(),
        PropertyValue::Pairs(vec![(
            config.runtime_dir.display().to_string(),
            "ro".into(),
        )]),
    ));
    props.push(("BindPaths".into(), PropertyValue::Binds(binds)));
    // Files QEMU reads from a directory that PrivateTmp replaces are bound in read-only
    // (only test setups and hand-run hosts keep them there).
    let read: Vec<(String, String, bool, u64)> = read_files(config, spec)
        .into_iter()
        .filter(|p| under_tmp(p))
        .map(|p| {
            let p = p.display().to_string();
            (p.clone(), p, false, 0)
        })
        .collect();
    if !read.is_empty() {
        props.push(("BindReadOnlyPaths".into(), PropertyValue::Binds(read)));
    }
    props
}

/// The files QEMU reads at start besides its own directory.
fn read_files(config: &Config, spec: &VmSpec) -> Vec<PathBuf> {
    let mut files = vec![config.ceph.conf.clone()];
    files.extend(config.ceph.qemu_key_file.clone());
    if let Some(boot) = &spec.boot {
        files.push(boot.kernel.clone());
        files.extend(boot.initrd.clone());
    }
    files
}

fn under_tmp(p: &Path) -> bool {
    TMP_DIRS.iter().any(|t| p.starts_with(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(json: &str) -> Vec<(String, PropertyValue)> {
        let c = crate::config::parse(json).unwrap().config;
        let spec = c.vms.values().next().unwrap().clone();
        let paths = VmPaths::new(&c.runtime_dir, &spec.name);
        qemu_unit_properties(&c, &spec, &paths)
    }

    fn get<'a>(p: &'a [(String, PropertyValue)], k: &str) -> Vec<&'a PropertyValue> {
        p.iter().filter(|(n, _)| n == k).map(|(_, v)| v).collect()
    }

    #[test]
    fn qemu_runs_unprivileged_and_sees_only_its_own_directory() {
        let p = props(
            r#"{ "ceph": { "qemuKeyFile": "/etc/ceph/q.key" },
                 "vms": { "web01": { "cores": 1, "memoryMiB": 1024, "diskGiB": 30 } } }"#,
        );
        assert_eq!(
            get(&p, "User"),
            [&PropertyValue::Str("vmkeeper-qemu".into())]
        );
        assert_eq!(get(&p, "CapabilityBoundingSet"), [&PropertyValue::U64(0)]);
        assert_eq!(get(&p, "UMask"), [&PropertyValue::U32(0o077)]);
        assert_eq!(
            get(&p, "MemoryDenyWriteExecute"),
            [&PropertyValue::Bool(true)]
        );
        assert_eq!(
            get(&p, "TemporaryFileSystem"),
            [&PropertyValue::Pairs(vec![(
                "/run/vmkeeper".into(),
                "ro".into()
            )])]
        );
        let PropertyValue::Binds(binds) = get(&p, "BindPaths")[0] else {
            panic!("BindPaths")
        };
        assert!(binds.contains(&(
            "/run/vmkeeper/vms/web01".into(),
            "/run/vmkeeper/vms/web01".into(),
            false,
            MS_REC
        )));
        assert!(get(&p, "BindReadOnlyPaths").is_empty());
    }

    #[test]
    fn tcg_keeps_writable_code_and_files_under_tmp_are_bound_in() {
        let p = props(
            r#"{ "qemu": { "accel": "tcg" }, "runtimeDir": "/tmp/h/run",
                 "ceph": { "conf": "/tmp/h/ceph.conf", "qemuKeyFile": "/tmp/h/q.key" },
                 "vms": { "web01": { "cores": 1, "memoryMiB": 1024, "diskGiB": 30,
                   "boot": { "kernel": "/boot/k", "initrd": "/tmp/h/i" } } } }"#,
        );
        assert!(get(&p, "MemoryDenyWriteExecute").is_empty());
        assert_eq!(
            get(&p, "BindReadOnlyPaths"),
            [&PropertyValue::Binds(vec![
                (
                    "/tmp/h/ceph.conf".into(),
                    "/tmp/h/ceph.conf".into(),
                    false,
                    0
                ),
                ("/tmp/h/q.key".into(), "/tmp/h/q.key".into(), false, 0),
                ("/tmp/h/i".into(), "/tmp/h/i".into(), false, 0),
            ])]
        );
    }
}
