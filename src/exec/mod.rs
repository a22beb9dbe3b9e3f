//! Edges: the only code that talks to QEMU, Ceph, systemd, Alertmanager and the notification
//! hook.

pub mod alertmanager;
pub mod notify;
pub mod peer;
pub mod qmp;
pub mod rbd;
pub mod systemd;
pub mod tap;
