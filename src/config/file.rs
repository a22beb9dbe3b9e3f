//! The raw serde mirror of the configuration JSON: every key optional, unknown keys kept so
//! validation can name each of them.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// Keys the file does not define, kept to be reported.
pub type Unknown = BTreeMap<String, Value>;

/// The top level. Sections stay JSON values here so a type error in one VM or section is
/// reported without hiding the problems of the others.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawConfig {
    pub timezone: Option<Value>,
    pub maintenance: Option<Value>,
    pub contacts: Option<Value>,
    pub notify_command: Option<Value>,
    pub authorized_group: Option<Value>,
    pub operator_group: Option<Value>,
    pub projects: Option<BTreeMap<String, Value>>,
    pub state_dir: Option<Value>,
    pub runtime_dir: Option<Value>,
    pub ceph: Option<Value>,
    pub qemu: Option<Value>,
    pub metrics: Option<Value>,
    pub monitoring: Option<Value>,
    pub removal: Option<Value>,
    pub clock: Option<Value>,
    pub vms: Option<BTreeMap<String, Value>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Keys of [`RawConfig`], for suggestions.
pub const CONFIG_KEYS: &[&str] = &[
    "timezone",
    "maintenance",
    "contacts",
    "notifyCommand",
    "authorizedGroup",
    "operatorGroup",
    "projects",
    "stateDir",
    "runtimeDir",
    "ceph",
    "qemu",
    "metrics",
    "monitoring",
    "removal",
    "clock",
    "vms",
];

/// One project: every key optional, each defaulting to the host-wide one.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawProject {
    pub timezone: Option<Value>,
    pub maintenance: Option<Value>,
    pub contacts: Option<Value>,
    pub notify_command: Option<Value>,
    pub authorized_group: Option<Value>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const PROJECT_KEYS: &[&str] = &[
    "timezone",
    "maintenance",
    "contacts",
    "notifyCommand",
    "authorizedGroup",
];

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawMaintenance {
    pub window: Option<String>,
    pub weekdays: Option<Vec<String>>,
    pub schedule: Option<RawSchedule>,
    pub announce_ahead: Option<String>,
    pub max_parallel: Option<i64>,
    pub expected_duration: Option<String>,
    pub blackouts: Option<Vec<RawBlackout>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const MAINTENANCE_KEYS: &[&str] = &[
    "window",
    "weekdays",
    "schedule",
    "announceAhead",
    "maxParallel",
    "expectedDuration",
    "blackouts",
];

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawSchedule {
    pub cron: Option<String>,
    pub length: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const SCHEDULE_KEYS: &[&str] = &["cron", "length"];

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawBlackout {
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const BLACKOUT_KEYS: &[&str] = &["from", "to", "reason"];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawCeph {
    pub conf: Option<String>,
    pub client_id: Option<String>,
    pub keyring: Option<String>,
    pub pool: Option<String>,
    pub qemu_client_id: Option<String>,
    pub qemu_key_file: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const CEPH_KEYS: &[&str] = &[
    "conf",
    "clientId",
    "keyring",
    "pool",
    "qemuClientId",
    "qemuKeyFile",
];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawQemu {
    pub binary: Option<String>,
    pub accel: Option<String>,
    pub machine: Option<String>,
    pub stop_timeout: Option<String>,
    pub extra_args: Option<Vec<String>>,
    pub max_concurrent_starts: Option<i64>,
    pub user: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const QEMU_KEYS: &[&str] = &[
    "binary",
    "accel",
    "machine",
    "stopTimeout",
    "extraArgs",
    "maxConcurrentStarts",
    "user",
];

#[derive(Debug, Default, Deserialize)]
pub struct RawMetrics {
    pub listen: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const METRICS_KEYS: &[&str] = &["listen"];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawRemoval {
    pub max_at_once: Option<i64>,
    pub confirmed: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const REMOVAL_KEYS: &[&str] = &["maxAtOnce", "confirmed"];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawClock {
    pub require_sync: Option<bool>,
    pub synced_flag: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const CLOCK_KEYS: &[&str] = &["requireSync", "syncedFlag"];

#[derive(Debug, Default, Deserialize)]
pub struct RawMonitoring {
    pub alertmanager: Option<RawAlertmanager>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const MONITORING_KEYS: &[&str] = &["alertmanager"];

#[derive(Debug, Default, Deserialize)]
pub struct RawAlertmanager {
    pub url: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const ALERTMANAGER_KEYS: &[&str] = &["url"];

#[derive(Debug, Default, Deserialize)]
pub struct RawVm {
    pub project: Option<String>,
    pub cores: Option<i64>,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: Option<i64>,
    #[serde(rename = "memoryLimitMiB")]
    pub memory_limit_mib: Option<i64>,
    #[serde(rename = "diskGiB")]
    pub disk_gib: Option<i64>,
    #[serde(rename = "allowHugeDisk")]
    pub allow_huge_disk: Option<bool>,
    pub online: Option<bool>,
    #[serde(rename = "deleteAt")]
    pub delete_at: Option<String>,
    pub generation: Option<i64>,
    #[serde(rename = "ipAddresses")]
    pub ip_addresses: Option<Vec<String>>,
    pub image: Option<RawImage>,
    pub network: Option<RawNetwork>,
    pub boot: Option<RawBoot>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const VM_KEYS: &[&str] = &[
    "project",
    "cores",
    "memoryMiB",
    "memoryLimitMiB",
    "diskGiB",
    "allowHugeDisk",
    "online",
    "deleteAt",
    "generation",
    "ipAddresses",
    "image",
    "network",
    "boot",
];

#[derive(Debug, Default, Deserialize)]
pub struct RawImage {
    pub pool: Option<String>,
    pub name: Option<String>,
    pub snapshot: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const IMAGE_KEYS: &[&str] = &["pool", "name", "snapshot"];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawNetwork {
    pub bridge: Option<String>,
    pub mac_address: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const NETWORK_KEYS: &[&str] = &["bridge", "macAddress"];

#[derive(Debug, Default, Deserialize)]
pub struct RawBoot {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

pub const BOOT_KEYS: &[&str] = &["kernel", "initrd", "append"];
