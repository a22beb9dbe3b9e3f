//! Edges: the only code that talks to QEMU, Ceph, systemd, Alertmanager, the notification
//! hook and the clock.

pub mod alertmanager;
pub mod clock;
pub mod notify;
pub mod peer;
pub mod qmp;
pub mod rbd;
pub mod systemd;
pub mod tap;
