//! The Prometheus metrics: a plain [`Snapshot`] of what the daemon knows (filled by its loop,
//! no I/O) and its exposition in the OpenMetrics or Prometheus text format, written by
//! prometheus-client. Names and labels are documented in docs/usage/monitoring.md.
//!
//! Gauges describe the state at the scrape; counters count since the daemon started (a
//! restart resets them, which `rate()` and `increase()` handle). Every counter of a VM is
//! shown from zero on, so the first event is an increase Prometheus can see.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::model::{GIB, Resources};
use crate::state::UnplannedKind;

/// Prefix of every metric name.
pub const PREFIX: &str = "vmkeeper";

/// Why vmkeeper stopped a VM as planned (label `reason` of the planned stops).
pub const STOP_REASONS: [&str; 2] = ["offline", "deletion"];
/// Why vmkeeper rebooted a VM as planned (label `reason` of the planned reboots).
pub const REBOOT_REASONS: [&str; 2] = ["maintenance", "requested"];

/// Counts kept per VM by the loop, since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmCounters {
    /// Unplanned stops and resets, indexed like [`UnplannedKind::ALL`].
    pub unplanned: [u64; UnplannedKind::ALL.len()],
    /// Planned stops, indexed like [`STOP_REASONS`].
    pub planned_stops: [u64; STOP_REASONS.len()],
    /// Planned cold reboots, indexed like [`REBOOT_REASONS`].
    pub planned_reboots: [u64; REBOOT_REASONS.len()],
    /// Failed operations by operation name (`OpKind::as_str`).
    pub failures: BTreeMap<&'static str, u64>,
}

impl VmCounters {
    /// Counts an unplanned event.
    pub fn unplanned(&mut self, kind: UnplannedKind) {
        if let Some(i) = UnplannedKind::ALL.iter().position(|k| *k == kind) {
            self.unplanned[i] += 1;
        }
    }

    /// Counts a planned stop for `reason` (one of [`STOP_REASONS`]).
    pub fn planned_stop(&mut self, reason: &str) {
        if let Some(i) = STOP_REASONS.iter().position(|r| *r == reason) {
            self.planned_stops[i] += 1;
        }
    }

    /// Counts a planned reboot for `reason` (one of [`REBOOT_REASONS`]).
    pub fn planned_reboot(&mut self, reason: &str) {
        if let Some(i) = REBOOT_REASONS.iter().position(|r| *r == reason) {
            self.planned_reboots[i] += 1;
        }
    }

    /// Counts a failed operation.
    pub fn failure(&mut self, operation: &'static str) {
        *self.failures.entry(operation).or_default() += 1;
    }
}

/// Histograms of the host, observed by the loop where things happen; clones share the
/// observations, so a snapshot carries them cheaply.
#[derive(Debug, Clone)]
pub struct Histograms {
    /// One reconcile pass of the loop (plan and hand out operations).
    pub pass: Histogram,
    /// One disk grow, from the operation's start to its report.
    pub grow: Histogram,
}

impl Default for Histograms {
    fn default() -> Histograms {
        Histograms {
            // 10 µs to about 2.6 s: a pass is pure and in memory; thousands of VMs take ms.
            pass: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
            // 1 ms to about 65 s: a live grow is a few ms; a slow cluster takes its timeout.
            grow: Histogram::new(exponential_buckets(0.001, 4.0, 9)),
        }
    }
}

/// The daemon at the scrape.
#[derive(Debug, Clone, Default)]
pub struct HostMetrics {
    /// The daemon's start, seconds since the epoch.
    pub started_at: i64,
    /// Whether the state file can be written.
    pub state_writable: bool,
    /// Notifications the hook has not taken yet.
    pub undelivered_notifications: usize,
    /// `Some(reachable)` when an Alertmanager is configured: whether the last attempt to
    /// sync the silences worked.
    pub alertmanager_up: Option<bool>,
    /// Silences that should exist but Alertmanager does not have yet.
    pub silences_pending: usize,
}

/// How far a VM's deletion is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletionMetrics {
    /// The last stage done, `scheduled` before the first.
    pub stage: &'static str,
    /// The next stage and when it is due (seconds since the epoch).
    pub next: Option<(&'static str, i64)>,
}

/// One VM at the scrape.
#[derive(Debug, Clone, Default)]
pub struct VmMetrics {
    /// Its name.
    pub vm: String,
    /// Its project.
    pub project: String,
    /// A QEMU runs.
    pub running: bool,
    /// vmkeeper keeps it running: declared online and not shut down by its deletion.
    pub should_run: bool,
    /// What the configuration declares.
    pub declared: Option<Resources>,
    /// What its QEMU runs with (the disk: its size as last grown).
    pub applied: Option<Resources>,
    /// A CPU/RAM change waits for a maintenance reboot.
    pub change_pending: bool,
    /// Counts since the daemon started.
    pub counters: VmCounters,
    /// The last unplanned event on record (it survives restarts): its kind and when.
    pub last_unplanned: Option<(UnplannedKind, i64)>,
    /// Operations that failed and have not succeeded since.
    pub failing: Vec<&'static str>,
    /// The announced maintenance slot: start and end, seconds since the epoch.
    pub maintenance_slot: Option<(i64, i64)>,
    /// In its maintenance slot, or its maintenance reboot runs.
    pub in_maintenance: bool,
    /// Its deletion, when one is under way.
    pub deletion: Option<DeletionMetrics>,
    /// Alerts about the VM are expected and silenced: in maintenance, or deleted (from T).
    pub downtime: bool,
    /// The QMP connection to its QEMU is up.
    pub qmp_connected: bool,
}

/// Everything one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The daemon.
    pub host: HostMetrics,
    /// Every VM the daemon is responsible for.
    pub vms: Vec<VmMetrics>,
    /// Host-wide histograms.
    pub histograms: Histograms,
}

/// The two text formats Prometheus scrapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (what Prometheus asks for first).
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4 (curl, older scrapers).
    Prometheus,
}

impl Format {
    /// The format a scraper's `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// The exposition of `snapshot`.
pub fn encode(snapshot: Arc<Snapshot>, format: Format) -> Result<String, fmt::Error> {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(Exposition(snapshot)));
    let mut out = String::new();
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        }
    }
    Ok(out)
}

/// `vm`, `project` and at most one more label.
struct Labels<'a> {
    vm: &'a str,
    project: &'a str,
    extra: Option<(&'static str, &'a str)>,
}

impl EncodeLabelSet for Labels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        ("vm", self.vm).encode(encoder.encode_label())?;
        ("project", self.project).encode(encoder.encode_label())?;
        if let Some(kv) = self.extra {
            kv.encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

impl VmMetrics {
    fn labels(&self) -> Labels<'_> {
        self.labels_with(None)
    }

    fn labels_with<'a>(&'a self, extra: Option<(&'static str, &'a str)>) -> Labels<'a> {
        Labels {
            vm: &self.vm,
            project: &self.project,
            extra,
        }
    }
}

/// Encodes a snapshot on each scrape (a collector: the values are the snapshot's, nothing is
/// kept in the registry).
#[derive(Debug)]
struct Exposition(Arc<Snapshot>);

/// A family of series: each row is (labels, value).
fn family<'a, M: EncodeMetric>(
    d: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    rows: impl Iterator<Item = (Labels<'a>, M)>,
) -> Result<(), fmt::Error> {
    let mut m = d.encode_descriptor(name, help, unit, kind)?;
    for (labels, value) in rows {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<'a>(
    d: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl Iterator<Item = (Labels<'a>, i64)>,
) -> Result<(), fmt::Error> {
    family(
        d,
        name,
        help,
        unit,
        MetricType::Gauge,
        rows.map(|(l, v)| (l, ConstGauge::new(v))),
    )
}

fn counters<'a>(
    d: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (Labels<'a>, u64)>,
) -> Result<(), fmt::Error> {
    family(
        d,
        name,
        help,
        None,
        MetricType::Counter,
        rows.map(|(l, v)| (l, ConstCounter::new(v))),
    )
}

fn host_gauge(d: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), fmt::Error> {
    ConstGauge::new(v).encode(d.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// One series per VM that has the resources `pick` chooses, valued by `value`.
fn resources<'a>(
    vms: &'a [VmMetrics],
    pick: fn(&VmMetrics) -> Option<Resources>,
    value: fn(&Resources) -> i64,
) -> impl Iterator<Item = (Labels<'a>, i64)> {
    vms.iter()
        .filter_map(move |v| pick(v).map(|r| (v.labels(), value(&r))))
}

fn bytes(gib: u64) -> i64 {
    i64::try_from(gib.saturating_mul(GIB)).unwrap_or(i64::MAX)
}

impl Collector for Exposition {
    fn encode(&self, mut d: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = &*self.0;
        let vms = &s.vms;
        let b = i64::from;

        let version = [("version", env!("CARGO_PKG_VERSION"))];
        d.encode_descriptor(
            "build",
            "The vmkeeper daemon that serves these metrics.",
            None,
            MetricType::Info,
        )?
        .encode_info(&version)?;
        ConstGauge::new(s.host.started_at).encode(d.encode_descriptor(
            "daemon_start_time",
            "When the daemon started, seconds since the epoch.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)?;
        host_gauge(
            &mut d,
            "state_writable",
            "1 while the state file can be written; while 0, nothing is stopped or deleted.",
            b(s.host.state_writable),
        )?;
        host_gauge(
            &mut d,
            "undelivered_notifications",
            "Notifications the hook has not taken yet.",
            i64::try_from(s.host.undelivered_notifications).unwrap_or(i64::MAX),
        )?;
        if let Some(up) = s.host.alertmanager_up {
            host_gauge(
                &mut d,
                "alertmanager_up",
                "1 while the last attempt to sync the silences with Alertmanager worked.",
                b(up),
            )?;
            host_gauge(
                &mut d,
                "silences_pending",
                "Monitoring downtimes that Alertmanager has no silence for yet.",
                i64::try_from(s.host.silences_pending).unwrap_or(i64::MAX),
            )?;
        }

        gauges(
            &mut d,
            "vm_info",
            "1 for every VM the daemon is responsible for (declared, on record or being deleted).",
            None,
            vms.iter().map(|v| (v.labels(), 1)),
        )?;
        gauges(
            &mut d,
            "vm_running",
            "1 while a QEMU of the VM runs.",
            None,
            vms.iter().map(|v| (v.labels(), b(v.running))),
        )?;
        gauges(
            &mut d,
            "vm_should_run",
            "1 while vmkeeper keeps the VM running: declared online, not shut down by its deletion.",
            None,
            vms.iter().map(|v| (v.labels(), b(v.should_run))),
        )?;
        let cpus: fn(&Resources) -> i64 = |r| i64::from(r.cores);
        let memory: fn(&Resources) -> i64 =
            |r| i64::try_from(r.memory_mib << 20).unwrap_or(i64::MAX);
        let disk: fn(&Resources) -> i64 = |r| bytes(r.disk_gib);
        gauges(
            &mut d,
            "vm_declared_cpus",
            "vCPUs the configuration declares.",
            None,
            resources(vms, |v| v.declared, cpus),
        )?;
        gauges(
            &mut d,
            "vm_applied_cpus",
            "vCPUs the VM's QEMU was last started with.",
            None,
            resources(vms, |v| v.applied, cpus),
        )?;
        gauges(
            &mut d,
            "vm_declared_memory",
            "RAM the configuration declares.",
            Some(&Unit::Bytes),
            resources(vms, |v| v.declared, memory),
        )?;
        gauges(
            &mut d,
            "vm_applied_memory",
            "RAM the VM's QEMU was last started with.",
            Some(&Unit::Bytes),
            resources(vms, |v| v.applied, memory),
        )?;
        gauges(
            &mut d,
            "vm_declared_disk",
            "Disk size the configuration declares.",
            Some(&Unit::Bytes),
            resources(vms, |v| v.declared, disk),
        )?;
        gauges(
            &mut d,
            "vm_disk",
            "Size of the VM's RBD image as vmkeeper last created or grew it.",
            Some(&Unit::Bytes),
            resources(vms, |v| v.applied, disk),
        )?;
        gauges(
            &mut d,
            "vm_change_pending",
            "1 while a CPU/RAM change waits for a maintenance reboot.",
            None,
            vms.iter().map(|v| (v.labels(), b(v.change_pending))),
        )?;
        counters(
            &mut d,
            "vm_unplanned_events",
            "Stops and resets vmkeeper did not plan (alarms), by kind, since the daemon started.",
            vms.iter().flat_map(|v| {
                UnplannedKind::ALL
                    .iter()
                    .zip(v.counters.unplanned)
                    .map(|(k, n)| (v.labels_with(Some(("kind", k.as_str()))), n))
            }),
        )?;
        gauges(
            &mut d,
            "vm_last_unplanned_event_timestamp",
            "When the VM's last unplanned event was noticed (kept across restarts), by its kind.",
            Some(&Unit::Seconds),
            vms.iter().filter_map(|v| {
                v.last_unplanned
                    .map(|(k, at)| (v.labels_with(Some(("kind", k.as_str()))), at))
            }),
        )?;
        counters(
            &mut d,
            "vm_planned_stops",
            "Stops vmkeeper carried out as planned, by reason, since the daemon started.",
            vms.iter().flat_map(|v| {
                STOP_REASONS
                    .iter()
                    .zip(v.counters.planned_stops)
                    .map(|(r, n)| (v.labels_with(Some(("reason", r))), n))
            }),
        )?;
        counters(
            &mut d,
            "vm_planned_reboots",
            "Cold reboots vmkeeper carried out as planned, by reason, since the daemon started.",
            vms.iter().flat_map(|v| {
                REBOOT_REASONS
                    .iter()
                    .zip(v.counters.planned_reboots)
                    .map(|(r, n)| (v.labels_with(Some(("reason", r))), n))
            }),
        )?;
        counters(
            &mut d,
            "vm_operation_failures",
            "Operations that failed, by operation, since the daemon started (shown from the first failure on).",
            vms.iter().flat_map(|v| {
                v.counters
                    .failures
                    .iter()
                    .map(|(op, n)| (v.labels_with(Some(("operation", op))), *n))
            }),
        )?;
        gauges(
            &mut d,
            "vm_operation_failing",
            "1 while an operation has failed and not succeeded since (it is retried with backoff).",
            None,
            vms.iter().flat_map(|v| {
                v.failing
                    .iter()
                    .map(|op| (v.labels_with(Some(("operation", op))), 1))
            }),
        )?;
        gauges(
            &mut d,
            "vm_maintenance_slot_start_timestamp",
            "Start of the VM's announced maintenance slot, seconds since the epoch.",
            Some(&Unit::Seconds),
            vms.iter()
                .filter_map(|v| v.maintenance_slot.map(|(s, _)| (v.labels(), s))),
        )?;
        gauges(
            &mut d,
            "vm_maintenance_slot_end_timestamp",
            "End of the VM's announced maintenance slot, seconds since the epoch.",
            Some(&Unit::Seconds),
            vms.iter()
                .filter_map(|v| v.maintenance_slot.map(|(_, e)| (v.labels(), e))),
        )?;
        gauges(
            &mut d,
            "vm_in_maintenance",
            "1 while the VM is in its maintenance slot or its maintenance reboot runs.",
            None,
            vms.iter().map(|v| (v.labels(), b(v.in_maintenance))),
        )?;
        gauges(
            &mut d,
            "vm_deletion_stage",
            "1 for a VM being deleted, labelled with the last stage done (scheduled before the first).",
            None,
            vms.iter().filter_map(|v| {
                v.deletion
                    .as_ref()
                    .map(|del| (v.labels_with(Some(("stage", del.stage))), 1))
            }),
        )?;
        gauges(
            &mut d,
            "vm_deletion_next_stage_timestamp",
            "When the next stage of the VM's deletion is due, labelled with that stage.",
            Some(&Unit::Seconds),
            vms.iter().filter_map(|v| {
                let (stage, at) = v.deletion.as_ref()?.next?;
                Some((v.labels_with(Some(("stage", stage))), at))
            }),
        )?;
        gauges(
            &mut d,
            "vm_monitoring_downtime",
            "1 while alerts about the VM are expected: in maintenance, or deleted (from its deletion date on).",
            None,
            vms.iter().map(|v| (v.labels(), b(v.downtime))),
        )?;
        gauges(
            &mut d,
            "vm_qmp_connected",
            "1 while vmkeeper's QMP connection to the VM's QEMU is up.",
            None,
            vms.iter().map(|v| (v.labels(), b(v.qmp_connected))),
        )?;

        s.histograms.pass.encode(d.encode_descriptor(
            "pass_duration",
            "One reconcile pass of the daemon's loop: plan and hand out operations.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        s.histograms.grow.encode(d.encode_descriptor(
            "disk_grow_duration",
            "One disk grow, from the operation's start to its result.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut counters = VmCounters::default();
        counters.unplanned(UnplannedKind::GuestReset);
        counters.planned_reboot("maintenance");
        counters.failure("grow-disk");
        let histograms = Histograms::default();
        histograms.pass.observe(0.002);
        Snapshot {
            host: HostMetrics {
                started_at: 1_800_000_000,
                state_writable: true,
                undelivered_notifications: 2,
                alertmanager_up: Some(false),
                silences_pending: 1,
            },
            vms: vec![VmMetrics {
                vm: "web01".into(),
                project: "default".into(),
                running: true,
                should_run: true,
                declared: Some(Resources {
                    cores: 2,
                    memory_mib: 2048,
                    disk_gib: 40,
                }),
                applied: Some(Resources {
                    cores: 1,
                    memory_mib: 2048,
                    disk_gib: 40,
                }),
                change_pending: true,
                counters,
                last_unplanned: Some((UnplannedKind::GuestReset, 1_800_000_100)),
                failing: vec!["grow-disk"],
                maintenance_slot: Some((1_800_086_400, 1_800_087_300)),
                in_maintenance: false,
                deletion: Some(DeletionMetrics {
                    stage: "announce",
                    next: Some(("shutdown", 1_800_400_000)),
                }),
                downtime: false,
                qmp_connected: true,
            }],
            histograms,
        }
    }

    #[test]
    fn the_openmetrics_text_names_every_series_with_prefix_units_and_labels() {
        let text = encode(Arc::new(snapshot()), Format::OpenMetrics).unwrap();
        let vm = r#"vm="web01",project="default""#;
        for line in [
            format!(
                "vmkeeper_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "vmkeeper_daemon_start_time_seconds 1800000000".into(),
            "vmkeeper_alertmanager_up 0".into(),
            "vmkeeper_silences_pending 1".into(),
            format!("vmkeeper_vm_running{{{vm}}} 1"),
            format!("vmkeeper_vm_declared_cpus{{{vm}}} 2"),
            format!("vmkeeper_vm_applied_cpus{{{vm}}} 1"),
            format!("vmkeeper_vm_declared_memory_bytes{{{vm}}} 2147483648"),
            format!("vmkeeper_vm_disk_bytes{{{vm}}} 42949672960"),
            format!("vmkeeper_vm_change_pending{{{vm}}} 1"),
            format!("vmkeeper_vm_unplanned_events_total{{{vm},kind=\"guest-reset\"}} 1"),
            format!("vmkeeper_vm_unplanned_events_total{{{vm},kind=\"host-rebooted\"}} 0"),
            format!(
                "vmkeeper_vm_last_unplanned_event_timestamp_seconds{{{vm},kind=\"guest-reset\"}} 1800000100"
            ),
            format!("vmkeeper_vm_planned_reboots_total{{{vm},reason=\"maintenance\"}} 1"),
            format!("vmkeeper_vm_planned_stops_total{{{vm},reason=\"offline\"}} 0"),
            format!("vmkeeper_vm_operation_failures_total{{{vm},operation=\"grow-disk\"}} 1"),
            format!("vmkeeper_vm_operation_failing{{{vm},operation=\"grow-disk\"}} 1"),
            format!("vmkeeper_vm_maintenance_slot_start_timestamp_seconds{{{vm}}} 1800086400"),
            format!("vmkeeper_vm_deletion_stage{{{vm},stage=\"announce\"}} 1"),
            format!(
                "vmkeeper_vm_deletion_next_stage_timestamp_seconds{{{vm},stage=\"shutdown\"}} 1800400000"
            ),
            format!("vmkeeper_vm_monitoring_downtime{{{vm}}} 0"),
            format!("vmkeeper_vm_qmp_connected{{{vm}}} 1"),
            "vmkeeper_pass_duration_seconds_count 1".into(),
            "# TYPE vmkeeper_disk_grow_duration_seconds histogram".into(),
            "# TYPE vmkeeper_vm_unplanned_events counter".into(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_prometheus_text_has_the_same_series() {
        let text = encode(Arc::new(snapshot()), Format::Prometheus).unwrap();
        assert!(
            text.lines().any(|l| l
                == r#"vmkeeper_vm_unplanned_events_total{vm="web01",project="default",kind="guest-reset"} 1"#),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
    }
}
