//! Pure rendering of a VM's QEMU command line from its spec and the resources it is
//! started with.

use std::path::{Path, PathBuf};

use crate::config::{Accel, Config};
use crate::model::{Resources, VmName, VmSpec};

/// The QMP node-name of every VM's root disk; `block_resize` addresses it.
pub const ROOT_NODE: &str = "root0";

/// QEMU's own seccomp sandbox: no obsolete system calls, no set*id, no fork/exec, no changes
/// to scheduling or resource limits (the systemd unit filters system calls too).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The id of the secret object holding QEMU's Ceph key.
const CEPH_SECRET: &str = "ceph-key";

/// Where a VM's runtime files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// The VM's directory under the runtime directory.
    pub dir: PathBuf,
    /// QMP socket.
    pub qmp: PathBuf,
    /// First serial port (the guest console), appended to.
    pub console_log: PathBuf,
    /// Second serial port as a socket, for an operator's interactive console.
    pub serial_socket: PathBuf,
}

impl VmPaths {
    /// The paths of `vm` under `runtime_dir`.
    pub fn new(runtime_dir: &Path, vm: &VmName) -> VmPaths {
        let dir = runtime_dir.join("vms").join(vm.as_str());
        VmPaths {
            qmp: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            serial_socket: dir.join("serial.sock"),
            dir,
        }
    }
}

/// The RBD image name of a VM's disk: the VM's name, in the configured pool.
pub fn image_name(vm: &VmName) -> &str {
    vm.as_str()
}

/// QEMU's argv (program first) for `spec` started with `resources`.
///
/// `resources` are what the VM is started with now; the daemon passes the declared values
/// on a cold start and records them as applied.
pub fn qemu_argv(
    config: &Config,
    spec: &VmSpec,
    resources: Resources,
    paths: &VmPaths,
) -> Vec<String> {
    let q = &config.qemu;
    let ceph = &config.ceph;
    let mut blockdev = serde_json::json!({
        "driver": "rbd",
        "node-name": ROOT_NODE,
        "pool": ceph.pool,
        "image": image_name(&spec.name),
        "conf": ceph.conf,
        "user": ceph.qemu_client_id,
        "discard": "unmap",
        "cache": { "direct": false },
    });
    if ceph.qemu_key_file.is_some() {
        blockdev["key-secret"] = CEPH_SECRET.into();
    }
    let mut argv: Vec<String> = vec![
        q.binary.display().to_string(),
        "-name".into(),
        format!("guest={},debug-threads=on", spec.name),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-sandbox".into(),
        SANDBOX.into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        q.machine.clone(),
        "-accel".into(),
        q.accel.as_str().into(),
        "-cpu".into(),
        match q.accel {
            Accel::Kvm => "host".into(),
            Accel::Tcg => "max".into(),
        },
        "-smp".into(),
        resources.cores.to_string(),
        "-m".into(),
        format!("{}M", resources.memory_mib),
    ];
    if let Some(key) = &ceph.qemu_key_file {
        // The key reaches librados through QEMU's secret object, never the command line.
        argv.extend([
            "-object".into(),
            format!(
                "secret,id={CEPH_SECRET},file={},format=base64",
                key.display()
            ),
        ]);
    }
    argv.extend([
        "-blockdev".into(),
        blockdev.to_string(),
        "-device".into(),
        format!("virtio-blk-pci,drive={ROOT_NODE},id=disk0,bootindex=1"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", paths.qmp.display()),
        "-serial".into(),
        format!("file:{}", paths.console_log.display()),
        "-chardev".into(),
        format!(
            "socket,id=serial1,path={},server=on,wait=off",
            paths.serial_socket.display()
        ),
        "-serial".into(),
        "chardev:serial1".into(),
    ]);
    if let Some(net) = &spec.network {
        // The daemon made the tap device, owned by QEMU's user and on the bridge already: QEMU
        // only opens it, and runs no helper scripts.
        argv.extend([
            "-netdev".into(),
            format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                spec.name.tap_name()
            ),
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={}", net.mac_address),
        ]);
    }
    if let Some(boot) = &spec.boot {
        argv.extend(["-kernel".into(), boot.kernel.display().to_string()]);
        if let Some(initrd) = &boot.initrd {
            argv.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        if let Some(append) = &boot.append {
            argv.extend(["-append".into(), append.clone()]);
        }
    }
    argv.extend(q.extra_args.iter().cloned());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_follows_the_spec() {
        let c = crate::config::parse(
            r#"{ "ceph": { "qemuKeyFile": "/etc/ceph/vmkeeper-qemu.key" },
                 "qemu": { "accel": "tcg", "binary": "/usr/bin/qemu-system-x86_64", "extraArgs": ["-snapshot"] },
                 "runtimeDir": "/run/vmk",
                 "vms": { "web01": { "cores": 2, "memoryMiB": 2048, "diskGiB": 30,
                   "network": { "bridge": "br0", "macAddress": "52:54:00:00:00:01" },
                   "boot": { "kernel": "/k", "initrd": "/i", "append": "console=ttyS0" } } } }"#,
        )
        .unwrap()
        .config;
        let spec = c.vms.values().next().unwrap();
        let paths = VmPaths::new(&c.runtime_dir, &spec.name);
        // Started with the applied values, not the declared ones.
        let argv = qemu_argv(
            &c,
            spec,
            Resources {
                cores: 1,
                memory_mib: 1024,
                disk_gib: 30,
            },
            &paths,
        );
        let line = argv.join(" ");
        assert_eq!(argv[0], "/usr/bin/qemu-system-x86_64");
        for part in [
            "-accel tcg -cpu max -smp 1 -m 1024M",
            "-nodefaults -no-user-config -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny ",
            "-object secret,id=ceph-key,file=/etc/ceph/vmkeeper-qemu.key,format=base64 -blockdev",
            r#"-blockdev {"cache":{"direct":false},"conf":"/etc/ceph/ceph.conf","discard":"unmap","driver":"rbd","image":"web01","key-secret":"ceph-key","node-name":"root0","pool":"rbd","user":"vmkeeper-qemu"}"#,
            "-device virtio-blk-pci,drive=root0,id=disk0,bootindex=1",
            "-qmp unix:/run/vmk/vms/web01/qmp.sock,server=on,wait=off",
            "-serial file:/run/vmk/vms/web01/console.log",
            "-netdev tap,id=net0,ifname=vmk-web01,script=no,downscript=no -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01",
            "-kernel /k -initrd /i -append console=ttyS0 -snapshot",
        ] {
            assert!(line.contains(part), "{part}\nnot in\n{line}");
        }
    }
}
