//! Validation of the raw mirror into a `Config`: every platform rule, every problem collected.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use chrono::{TimeDelta, Weekday};
use chrono_tz::Tz;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::file::*;
use super::{Accel, AlertmanagerConfig, CephConfig, Checked, Config, Problem, QemuConfig};
use crate::localtime::{format_duration, parse_date, parse_duration};
use crate::model::{BaseImage, DirectBoot, GroupName, Network, Resources, VmName, VmSpec};

/// Most vCPUs a VM may have.
pub const MAX_CORES: i64 = 12;
/// Least RAM a VM may have, in MiB.
pub const MIN_MEMORY_MIB: i64 = 1024;
/// Most RAM any VM may have, in MiB (128 GiB).
pub const MAX_MEMORY_MIB: i64 = 131_072;
/// The customer-facing RAM limit, in MiB (64 GiB); operators may raise it per VM.
pub const DEFAULT_MEMORY_LIMIT_MIB: i64 = 65_536;
/// Smallest disk, in GiB.
pub const MIN_DISK_GIB: i64 = 30;
/// Disks this large (10 TiB) need the operator's acknowledgement.
pub const HUGE_DISK_GIB: i64 = 10_240;
/// QEMUs starting at once by default: enough to keep a host start short, few enough that
/// each gets CPU to open its disk and begin booting.
pub const DEFAULT_CONCURRENT_STARTS: i64 = 4;
/// The system user QEMU runs as by default (the NixOS module creates it).
pub const DEFAULT_QEMU_USER: &str = "vmkeeper-qemu";
/// QEMU's Ceph client by default.
pub const DEFAULT_QEMU_CLIENT: &str = "vmkeeper-qemu";
/// VMs scheduled for deletion at once for being removed from the configuration, without
/// confirmation.
pub const DEFAULT_REMOVALS_AT_ONCE: i64 = 3;
/// Largest disk, in GiB (1 PiB): far beyond any sane block device, and keeps byte sizes in u64.
pub const MAX_DISK_GIB: i64 = 1 << 20;

struct Validator {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Validator {
    /// Records a problem once: a host-wide value a project inherits is checked again in the
    /// project, and a problem with it is the host-wide key's, reported there.
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let p = Problem::new(path, message);
        if !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }

    /// Deserializes one section, reporting a type error with its full path.
    fn section<T: DeserializeOwned + Default>(
        &mut self,
        path: &str,
        v: Option<Value>,
    ) -> Option<T> {
        let v = match v {
            None | Some(Value::Null) => return Some(T::default()),
            Some(v) => v,
        };
        match serde_path_to_error::deserialize::<_, T>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                let inner = e.path().to_string();
                let full = if inner == "." {
                    path.to_owned()
                } else {
                    format!("{path}.{inner}")
                };
                self.err(full, e.into_inner().to_string());
                None
            }
        }
    }

    fn unknown(&mut self, path: &str, unknown: &Unknown, known: &[&str]) {
        for key in unknown.keys() {
            let full = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            let msg = match closest(key, known) {
                Some(k) => format!("unknown key (did you mean `{k}`?)"),
                None => format!("unknown key (known keys: {})", known.join(", ")),
            };
            self.err(full, msg);
        }
    }

    fn string_or(&mut self, path: &str, v: Option<Value>, default: &str) -> String {
        self.section::<Option<String>>(path, v)
            .flatten()
            .unwrap_or_else(|| default.to_owned())
    }

    fn abs_path(&mut self, path: &str, s: &str) -> PathBuf {
        if !s.starts_with('/') {
            self.err(path, format!("{s:?} must be an absolute path"));
        }
        PathBuf::from(s)
    }

    fn duration(
        &mut self,
        path: &str,
        s: Option<&str>,
        default: &str,
        min: TimeDelta,
    ) -> TimeDelta {
        let s = s.unwrap_or(default);
        match parse_duration(s) {
            Ok(d) if d < min => {
                self.err(
                    path,
                    format!(
                        "{s} is shorter than the minimum of {}",
                        format_duration(min)
                    ),
                );
                d
            }
            Ok(d) => d,
            Err(e) => {
                self.err(path, e);
                TimeDelta::zero()
            }
        }
    }

    /// Refuses a value that would end a QEMU option early and start another (`,` separates
    /// options; `=` is refused too, so nothing can pose as a `key=value` pair).
    fn option_safe(&mut self, path: &str, s: &str) {
        if s.contains([',', '=']) || s.chars().any(char::is_control) {
            self.err(
                path,
                format!("{s:?} contains ',', '=' or a control character, which QEMU option strings cannot carry"),
            );
        }
    }

    fn range(&mut self, path: &str, v: i64, lo: i64, hi: i64) -> bool {
        if (lo..=hi).contains(&v) {
            true
        } else {
            self.err(path, format!("{v} is outside {lo}..={hi}"));
            false
        }
    }
}

/// Parses and validates a configuration document.
pub fn parse(text: &str) -> Result<Checked, Vec<Problem>> {
    let doc: Value = serde_json::from_str(text).map_err(|e| {
        vec![Problem::new(
            "",
            format!(
                "malformed JSON at line {}, column {}: {}",
                e.line(),
                e.column(),
                strip_position(&e)
            ),
        )]
    })?;
    let mut v = Validator {
        problems: vec![],
        warnings: vec![],
    };
    if !doc.is_object() {
        v.err("", "the configuration must be a JSON object");
        return Err(v.problems);
    }
    let raw: RawConfig = v.section("", Some(doc)).unwrap_or_default();
    v.unknown("", &raw.unknown, CONFIG_KEYS);

    let tz_name = v.string_or("timezone", raw.timezone, "Europe/Berlin");
    let timezone = Tz::from_str(&tz_name).unwrap_or_else(|_| {
        v.err(
            "timezone",
            format!("{tz_name:?} is not a known IANA time zone"),
        );
        chrono_tz::UTC
    });
    let host_keys = maintenance::read(&mut v, "maintenance", raw.maintenance)
        .map(|r| maintenance::Keys::host(&r, timezone));
    let host = projects::Host {
        tz: timezone,
        policy: host_keys
            .as_ref()
            .and_then(|k| maintenance::policy(&mut v, k)),
        maintenance: host_keys,
        contacts: contacts(&mut v, "contacts", raw.contacts),
        notify_command: notify_command(&mut v, "notifyCommand", raw.notify_command),
        authorized_group: group(&mut v, "authorizedGroup", raw.authorized_group)
            .unwrap_or_else(|| "sudo-srv".parse().expect("a group name")),
    };
    let operator_group = match raw.operator_group {
        None | Some(Value::Null) => None,
        some => group(&mut v, "operatorGroup", some),
    };
    let project_keys: BTreeSet<String> = raw
        .projects
        .as_ref()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    let projects = projects::projects(&mut v, raw.projects, &host);
    let state_dir = v.string_or("stateDir", raw.state_dir, "/var/lib/vmkeeper");
    let state_dir = v.abs_path("stateDir", &state_dir);
    let runtime_dir = v.string_or("runtimeDir", raw.runtime_dir, "/run/vmkeeper");
    let runtime_dir = v.abs_path("runtimeDir", &runtime_dir);
    // Its paths reach QEMU option strings (`-qmp unix:PATH,server=on`).
    v.option_safe("runtimeDir", &runtime_dir.display().to_string());
    let ceph = ceph(&mut v, raw.ceph);
    let qemu = qemu(&mut v, raw.qemu);
    let metrics_listen = metrics(&mut v, raw.metrics);
    let removal = removal(&mut v, raw.removal);
    let clock = clock(&mut v, raw.clock);
    let alertmanager = monitoring(&mut v, raw.monitoring);

    let mut vms = BTreeMap::new();
    let mut addresses = BTreeMap::new();
    for (name, raw_vm) in raw.vms.unwrap_or_default() {
        let path = format!("vms.{name}");
        let vm_name = match name.parse::<VmName>() {
            Ok(n) => Some(n),
            Err(e) => {
                v.err(&path, format!("name {e}"));
                None
            }
        };
        let spec = v.section::<RawVm>(&path, Some(raw_vm)).and_then(|r| {
            let claims = addresses.entry(name.clone()).or_default();
            vm(&mut v, &path, r, &project_keys, claims)
        });
        if let (Some(n), Some(mut s)) = (vm_name, spec) {
            s.name = n.clone();
            vms.insert(n, s);
        }
    }
    unique_addresses(&mut v, &addresses);
    let mut taps: BTreeMap<String, &VmName> = BTreeMap::new();
    for (name, spec) in &vms {
        if spec.network.is_some()
            && let Some(first) = taps.insert(name.tap_name(), name)
        {
            v.err(
                format!("vms.{name}.network"),
                format!(
                    "its tap device {} would be the same as {first}'s; rename one of them",
                    name.tap_name()
                ),
            );
        }
    }

    if !v.problems.is_empty() {
        return Err(v.problems);
    }
    let config = Config {
        timezone,
        max_parallel: host
            .policy
            .as_ref()
            .expect("a maintenance policy without problems")
            .max_parallel,
        projects,
        operator_group,
        state_dir,
        runtime_dir,
        ceph,
        qemu,
        metrics_listen,
        removal,
        clock,
        alertmanager,
        vms,
    };
    projects::group_warnings(&mut v, &config);
    Ok(Checked {
        config,
        warnings: v.warnings,
    })
}

fn ceph(v: &mut Validator, raw: Option<Value>) -> CephConfig {
    let raw: RawCeph = v.section("ceph", raw).unwrap_or_default();
    v.unknown("ceph", &raw.unknown, CEPH_KEYS);
    let conf = v.abs_path(
        "ceph.conf",
        raw.conf.as_deref().unwrap_or("/etc/ceph/ceph.conf"),
    );
    let keyring = raw.keyring.map(|k| v.abs_path("ceph.keyring", &k));
    let client_id = raw.client_id.unwrap_or_else(|| "admin".to_owned());
    if client_id.is_empty() || client_id.starts_with("client.") {
        v.err(
            "ceph.clientId",
            format!("{client_id:?} must be a client id without the \"client.\" prefix"),
        );
    }
    let pool = raw.pool.unwrap_or_else(|| "rbd".to_owned());
    if pool.is_empty() || pool.contains(['/', '@']) {
        v.err("ceph.pool", format!("{pool:?} is not a pool name"));
    }
    let qemu_client_id = raw
        .qemu_client_id
        .unwrap_or_else(|| DEFAULT_QEMU_CLIENT.to_owned());
    if !is_ceph_id(&qemu_client_id) {
        v.err(
            "ceph.qemuClientId",
            format!("{qemu_client_id:?} is not a client id without the \"client.\" prefix (a-z, A-Z, 0-9, '_', '-', '.')"),
        );
    } else if qemu_client_id == client_id {
        v.err(
            "ceph.qemuClientId",
            format!("{qemu_client_id:?} is the daemon's own client; QEMU gets a client of its own, limited to the pool"),
        );
    }
    let qemu_key_file = raw.qemu_key_file.map(|k| {
        let p = v.abs_path("ceph.qemuKeyFile", &k);
        v.option_safe("ceph.qemuKeyFile", &k);
        p
    });
    v.option_safe("ceph.conf", &conf.display().to_string());
    CephConfig {
        conf,
        client_id,
        keyring,
        pool,
        qemu_client_id,
        qemu_key_file,
    }
}

fn qemu(v: &mut Validator, raw: Option<Value>) -> QemuConfig {
    let raw: RawQemu = v.section("qemu", raw).unwrap_or_default();
    v.unknown("qemu", &raw.unknown, QEMU_KEYS);
    let accel = match raw.accel.as_deref().unwrap_or("kvm") {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        other => {
            v.err("qemu.accel", format!("{other:?} is not one of kvm, tcg"));
            Accel::Kvm
        }
    };
    let binary = raw
        .binary
        .unwrap_or_else(|| "qemu-system-x86_64".to_owned());
    if binary.is_empty() {
        v.err("qemu.binary", "must not be empty");
    }
    let machine = raw.machine.unwrap_or_else(|| "q35".to_owned());
    if machine.is_empty()
        || !machine
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        v.err(
            "qemu.machine",
            format!("{machine:?} is not a machine type (a-z, A-Z, 0-9, '-', '_', '.')"),
        );
    }
    let user = raw.user.unwrap_or_else(|| DEFAULT_QEMU_USER.to_owned());
    if user.parse::<crate::model::GroupName>().is_err() {
        v.err(
            "qemu.user",
            format!("{user:?} is not a user name (a-z, 0-9, '_', '-', at most 32, starting with a letter or '_')"),
        );
    } else if user == "root" {
        v.err(
            "qemu.user",
            "QEMU never runs as root: name an unprivileged system user",
        );
    }
    QemuConfig {
        binary: PathBuf::from(binary),
        accel,
        machine,
        user,
        stop_timeout: v.duration(
            "qemu.stopTimeout",
            raw.stop_timeout.as_deref(),
            "60s",
            TimeDelta::seconds(1),
        ),
        extra_args: raw.extra_args.unwrap_or_default(),
        max_concurrent_starts: {
            let n = raw
                .max_concurrent_starts
                .unwrap_or(DEFAULT_CONCURRENT_STARTS);
            v.range("qemu.maxConcurrentStarts", n, 1, 1000);
            usize::try_from(n.clamp(1, 1000)).unwrap_or(1)
        },
    }
}

fn removal(v: &mut Validator, raw: Option<Value>) -> super::RemovalGuard {
    let raw: RawRemoval = v.section("removal", raw).unwrap_or_default();
    v.unknown("removal", &raw.unknown, REMOVAL_KEYS);
    let max = raw.max_at_once.unwrap_or(DEFAULT_REMOVALS_AT_ONCE);
    v.range("removal.maxAtOnce", max, 0, 100_000);
    let mut confirmed = std::collections::BTreeSet::new();
    for (i, name) in raw.confirmed.unwrap_or_default().iter().enumerate() {
        match name.parse::<VmName>() {
            Ok(n) => {
                confirmed.insert(n);
            }
            Err(e) => v.err(format!("removal.confirmed[{i}]"), format!("name {e}")),
        }
    }
    super::RemovalGuard {
        max_at_once: usize::try_from(max.max(0)).unwrap_or(0),
        confirmed,
    }
}

fn clock(v: &mut Validator, raw: Option<Value>) -> super::ClockConfig {
    let raw: RawClock = v.section("clock", raw).unwrap_or_default();
    v.unknown("clock", &raw.unknown, CLOCK_KEYS);
    let flag = raw
        .synced_flag
        .unwrap_or_else(|| "/run/systemd/timesync/synchronized".to_owned());
    super::ClockConfig {
        require_sync: raw.require_sync.unwrap_or(true),
        synced_flag: v.abs_path("clock.syncedFlag", &flag),
    }
}

fn metrics(v: &mut Validator, raw: Option<Value>) -> Option<std::net::SocketAddr> {
    let raw: RawMetrics = v.section("metrics", raw).unwrap_or_default();
    v.unknown("metrics", &raw.unknown, METRICS_KEYS);
    let listen = raw.listen?;
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.port() == 0 => {
            v.err(
                "metrics.listen",
                format!("{listen:?} needs a port other than 0"),
            );
            None
        }
        Ok(a) => Some(a),
        Err(_) => {
            v.err(
                "metrics.listen",
                format!(
                    "{listen:?} is not an address and port such as \"127.0.0.1:9848\" or \"[::1]:9848\" (host names are not resolved)"
                ),
            );
            None
        }
    }
}

fn monitoring(v: &mut Validator, raw: Option<Value>) -> Option<AlertmanagerConfig> {
    let raw: RawMonitoring = v.section("monitoring", raw).unwrap_or_default();
    v.unknown("monitoring", &raw.unknown, MONITORING_KEYS);
    let am = raw.alertmanager?;
    v.unknown("monitoring.alertmanager", &am.unknown, ALERTMANAGER_KEYS);
    let Some(url) = am.url else {
        v.err(
            "monitoring.alertmanager.url",
            "is required (e.g. \"http://127.0.0.1:9093\")",
        );
        return None;
    };
    match alertmanager_url(&url) {
        Ok(c) => Some(c),
        Err(e) => {
            v.err("monitoring.alertmanager.url", format!("{url:?} {e}"));
            None
        }
    }
}

/// `http://host[:port][/prefix]`. Only plain HTTP: vmkeeper has no TLS client (an
/// Alertmanager behind TLS is reached through a local proxy or its plain listener).
fn alertmanager_url(url: &str) -> Result<AlertmanagerConfig, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| "is not a URL such as \"http://127.0.0.1:9093\"".to_owned())?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "uses https, which vmkeeper does not speak: give Alertmanager's plain http \
                 listener (or a local proxy)"
                    .into(),
            );
        }
        _ => return Err("must start with http://".into()),
    }
    let authority = uri.authority().ok_or("names no host")?;
    if authority.as_str().contains('@') {
        return Err("must not carry credentials".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err("names no host".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query".into());
    }
    Ok(AlertmanagerConfig {
        url: url.trim_end_matches('/').to_owned(),
        host: host.to_owned(),
        port: authority.port_u16().unwrap_or(80),
        path: uri.path().trim_end_matches('/').to_owned(),
    })
}

/// What a VM claims that must be unique across VMs, collected even when the VM is invalid.
#[derive(Default)]
struct Claims {
    ips: Vec<IpAddr>,
    mac: Option<String>,
}

fn vm(
    v: &mut Validator,
    path: &str,
    raw: RawVm,
    projects: &BTreeSet<String>,
    claims: &mut Claims,
) -> Option<VmSpec> {
    let before = v.problems.len();
    v.unknown(path, &raw.unknown, VM_KEYS);
    let project = projects::vm_project(v, path, raw.project, projects);
    let required = |v: &mut Validator, key: &str, x: Option<i64>| {
        if x.is_none() {
            v.err(format!("{path}.{key}"), "is required");
        }
        x.unwrap_or_default()
    };
    let cores = required(v, "cores", raw.cores);
    let memory = required(v, "memoryMiB", raw.memory_mib);
    let disk = required(v, "diskGiB", raw.disk_gib);
    if raw.cores.is_some() {
        v.range(&format!("{path}.cores"), cores, 1, MAX_CORES);
    }
    let limit = raw.memory_limit_mib.unwrap_or(DEFAULT_MEMORY_LIMIT_MIB);
    let limit_ok = v.range(
        &format!("{path}.memoryLimitMiB"),
        limit,
        DEFAULT_MEMORY_LIMIT_MIB,
        MAX_MEMORY_MIB,
    );
    if raw.memory_mib.is_some()
        && v.range(
            &format!("{path}.memoryMiB"),
            memory,
            MIN_MEMORY_MIB,
            MAX_MEMORY_MIB,
        )
        && limit_ok
        && memory > limit
    {
        v.err(
            format!("{path}.memoryMiB"),
            format!(
                "{memory} is above this VM's limit of {limit} MiB ({} GiB); only an operator can raise memoryLimitMiB (up to {MAX_MEMORY_MIB})",
                limit / 1024
            ),
        );
    }
    let allow_huge_disk = raw.allow_huge_disk.unwrap_or(false);
    if raw.disk_gib.is_some()
        && v.range(&format!("{path}.diskGiB"), disk, MIN_DISK_GIB, MAX_DISK_GIB)
        && disk >= HUGE_DISK_GIB
    {
        if allow_huge_disk {
            v.warnings.push(Problem::new(
                format!("{path}.diskGiB"),
                format!("{disk} GiB is 10 TiB or more: object storage is recommended for data of this size"),
            ));
        } else {
            v.err(
                format!("{path}.diskGiB"),
                format!("{disk} GiB is 10 TiB or more and needs allowHugeDisk = true from an operator (object storage is recommended instead)"),
            );
        }
    }
    let delete_at = raw.delete_at.as_deref().and_then(|s| match parse_date(s) {
        Ok(d) => Some(d),
        Err(e) => {
            v.err(format!("{path}.deleteAt"), e);
            None
        }
    });
    let mut ip_addresses: Vec<IpAddr> = vec![];
    for (i, a) in raw.ip_addresses.unwrap_or_default().iter().enumerate() {
        match a.parse::<IpAddr>() {
            Ok(ip) if ip_addresses.contains(&ip) => v.err(
                format!("{path}.ipAddresses[{i}]"),
                format!("{ip} is listed twice"),
            ),
            Ok(ip) => {
                ip_addresses.push(ip);
                claims.ips.push(ip);
            }
            Err(_) => v.err(
                format!("{path}.ipAddresses[{i}]"),
                format!("{a:?} is not an IP address"),
            ),
        }
    }
    let image = raw.image.and_then(|img| {
        let p = format!("{path}.image");
        v.unknown(&p, &img.unknown, IMAGE_KEYS);
        let name = nonempty(v, &format!("{p}.name"), img.name);
        let snapshot = nonempty(v, &format!("{p}.snapshot"), img.snapshot);
        Some(BaseImage {
            pool: img.pool,
            name: name?,
            snapshot: snapshot?,
        })
    });
    let network = raw.network.and_then(|n| {
        let p = format!("{path}.network");
        v.unknown(&p, &n.unknown, NETWORK_KEYS);
        let bridge = nonempty(v, &format!("{p}.bridge"), n.bridge);
        if let Some(b) = &bridge
            && !is_interface_name(b)
        {
            v.err(
                format!("{p}.bridge"),
                format!("{b:?} is not an interface name (1 to 15 of a-z, A-Z, 0-9, '-', '_', '.')"),
            );
        }
        let mac = nonempty(v, &format!("{p}.macAddress"), n.mac_address);
        claims.mac = mac.as_ref().map(|m| m.to_ascii_lowercase());
        if let Some(m) = &mac
            && !is_unicast_mac(m)
        {
            v.err(
                format!("{p}.macAddress"),
                format!("{m:?} is not a unicast MAC address xx:xx:xx:xx:xx:xx"),
            );
        }
        Some(Network {
            bridge: bridge?,
            mac_address: mac?.to_ascii_lowercase(),
        })
    });
    let boot = raw.boot.and_then(|b| {
        let p = format!("{path}.boot");
        v.unknown(&p, &b.unknown, BOOT_KEYS);
        let kernel = nonempty(v, &format!("{p}.kernel"), b.kernel)
            .map(|k| v.abs_path(&format!("{p}.kernel"), &k));
        let initrd = b.initrd.map(|i| v.abs_path(&format!("{p}.initrd"), &i));
        Some(DirectBoot {
            kernel: kernel?,
            initrd,
            append: b.append,
        })
    });
    if v.problems.len() > before {
        return None;
    }
    Some(VmSpec {
        name: "placeholder".parse().ok()?,
        project: project?,
        resources: Resources {
            cores: u32::try_from(cores).ok()?,
            memory_mib: u64::try_from(memory).ok()?,
            disk_gib: u64::try_from(disk).ok()?,
        },
        memory_limit_mib: u64::try_from(limit).ok()?,
        allow_huge_disk,
        online: raw.online.unwrap_or(true),
        delete_at,
        generation: {
            let g = raw.generation.unwrap_or(1);
            if !(1..=i64::from(u32::MAX)).contains(&g) {
                v.err(
                    format!("{path}.generation"),
                    format!("{g} must be 1 or more"),
                );
            }
            u32::try_from(g.max(1)).unwrap_or(1)
        },
        ip_addresses,
        image,
        network,
        boot,
    })
}

fn unique_addresses(v: &mut Validator, claims: &BTreeMap<String, Claims>) {
    let mut owner: BTreeMap<IpAddr, &str> = BTreeMap::new();
    let mut macs: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, c) in claims {
        for ip in &c.ips {
            match owner.get(ip) {
                Some(first) => v.err(
                    format!("vms.{name}.ipAddresses"),
                    format!("{ip} is also assigned to {first}; addresses must be unique"),
                ),
                None => {
                    owner.insert(*ip, name);
                }
            }
        }
        if let Some(mac) = &c.mac {
            match macs.get(mac.as_str()) {
                Some(first) => v.err(
                    format!("vms.{name}.network.macAddress"),
                    format!("{mac} is also used by {first}; MAC addresses must be unique"),
                ),
                None => {
                    macs.insert(mac, name);
                }
            }
        }
    }
}

/// A list of technical contacts (e-mail addresses).
fn contacts(v: &mut Validator, path: &str, raw: Option<Value>) -> Vec<String> {
    let contacts = v
        .section::<Option<Vec<String>>>(path, raw)
        .flatten()
        .unwrap_or_default();
    for (i, c) in contacts.iter().enumerate() {
        let ok = c
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.'))
            && !c.chars().any(|ch| ch.is_whitespace() || ch.is_control());
        if !ok {
            v.err(
                format!("{path}[{i}]"),
                format!("{c:?} is not an e-mail address"),
            );
        }
    }
    contacts
}

fn notify_command(v: &mut Validator, path: &str, raw: Option<Value>) -> Option<PathBuf> {
    v.section::<Option<String>>(path, raw)
        .flatten()
        .map(|s| v.abs_path(path, &s))
}

fn group(v: &mut Validator, path: &str, raw: Option<Value>) -> Option<GroupName> {
    let name = v.string_or(path, raw, "sudo-srv");
    match name.parse() {
        Ok(g) => Some(g),
        Err(e) => {
            v.err(path, format!("{e}"));
            None
        }
    }
}

fn nonempty(v: &mut Validator, path: &str, s: Option<String>) -> Option<String> {
    match s {
        Some(s) if !s.is_empty() => Some(s),
        Some(_) => {
            v.err(path, "must not be empty");
            None
        }
        None => {
            v.err(path, "is required");
            None
        }
    }
}

fn weekday(s: &str) -> Option<Weekday> {
    Some(match s {
        "mon" => Weekday::Mon,
        "tue" => Weekday::Tue,
        "wed" => Weekday::Wed,
        "thu" => Weekday::Thu,
        "fri" => Weekday::Fri,
        "sat" => Weekday::Sat,
        "sun" => Weekday::Sun,
        _ => return None,
    })
}

/// A Linux interface name that is also safe inside a QEMU option string.
pub(crate) fn is_interface_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s != "."
        && s != ".."
}

fn is_ceph_id(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with("client.")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_unicast_mac(s: &str) -> bool {
    let octets: Vec<&str> = s.split(':').collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// serde_json appends " at line L column C" to its messages; the position is printed first.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// The known key closest to a typo, if it is close enough to be a likely typo.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| {
            (
                edit_distance(&key.to_ascii_lowercase(), &k.to_ascii_lowercase()),
                *k,
            )
        })
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

mod maintenance;
mod projects;
#[cfg(test)]
mod tests;
