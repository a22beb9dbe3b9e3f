//! vmkeeper: a per-host supervisor that runs declared VMs as QEMU units under systemd, with
//! disks in Ceph RBD, maintenance reboots in announced windows and staged deletion.
//!
//! The decision-making core (`config`, `model`, `maintenance`, `deletion`, `plan`,
//! `supervisor`, `access`) is pure: no clock, no I/O, no async. Everything that touches the world lives in `exec` and is
//! driven by the daemon.

pub mod access;
pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod deletion;
pub mod events;
pub mod exec;
pub mod failpoint;
pub mod localtime;
pub mod maintenance;
pub mod metrics;
pub mod model;
pub mod ownership;
pub mod plan;
pub mod render;
pub mod state;
pub mod supervisor;
