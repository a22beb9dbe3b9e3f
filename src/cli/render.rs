//! Text output of the commands that print more than a line: `status` and `plan`.

use crate::localtime::rfc3339;
use crate::plan::{Action, Plan, StageStatus};

/// `vmkeeper status` as a table: one line per VM, then the daemon's own troubles.
pub fn status(v: &serde_json::Value) -> String {
    let mut s = format!(
        "{:<16} {:<12} {:<8} {:>8}  {:<22} {:<22} {}\n",
        "VM", "PROJECT", "STATE", "PID", "APPLIED", "DECLARED", "NOTES"
    );
    let res = |r: &serde_json::Value| {
        if r.is_null() {
            "-".to_owned()
        } else {
            format!("{}c/{}M/{}G", r["cores"], r["memoryMiB"], r["diskGiB"])
        }
    };
    for vm in v["vms"].as_array().into_iter().flatten() {
        let mut notes = vec![];
        if !vm["pending"].is_null() {
            notes.push(format!(
                "pending {} in {} – {}",
                res(&vm["pending"]),
                vm["maintenanceSlot"]["start"].as_str().unwrap_or("?"),
                vm["maintenanceSlot"]["end"].as_str().unwrap_or("?")
            ));
        }
        if let Some(date) = vm["deletionDate"].as_str() {
            notes.push(format!("deleted on {date}"));
        }
        if vm["inMaintenance"].as_bool() == Some(true) {
            notes.push("IN MAINTENANCE".into());
        }
        if vm["monitoringDowntime"].as_bool() == Some(true) {
            notes.push("monitoring downtime".into());
        }
        for r in vm["refusals"].as_array().into_iter().flatten() {
            notes.push(format!("refused: {}", r.as_str().unwrap_or("")));
        }
        if let Some(op) = vm["operation"].as_str() {
            notes.push(op.to_owned());
        }
        if vm["running"].as_bool() == Some(true) && vm["qmp"] != "connected" {
            notes.push(format!("qmp: {}", vm["qmp"].as_str().unwrap_or("?")));
        }
        for f in vm["failures"].as_array().into_iter().flatten() {
            notes.push(f.as_str().unwrap_or("").to_owned());
        }
        if let Some(u) = vm["lastUnplanned"].as_object() {
            notes.push(format!(
                "last unplanned: {} at {}",
                u["kind"].as_str().unwrap_or("?"),
                u["at"].as_str().unwrap_or("?")
            ));
        }
        s.push_str(&format!(
            "{:<16} {:<12} {:<8} {:>8}  {:<22} {:<22} {}\n",
            vm["name"].as_str().unwrap_or("?"),
            vm["project"].as_str().unwrap_or("?"),
            if vm["running"].as_bool() == Some(true) {
                "running"
            } else {
                "stopped"
            },
            vm["qemuPid"]
                .as_u64()
                .map_or("-".to_owned(), |p| p.to_string()),
            res(&vm["applied"]),
            res(&vm["declared"]),
            notes.join("; ")
        ));
    }
    let host = &v["host"];
    if host["stateWritable"] == false {
        s.push_str(&format!(
            "\nSTATE NOT WRITABLE: {} (nothing is stopped or deleted until it is)\n",
            host["stateError"].as_str().unwrap_or("?")
        ));
    }
    if let Some(e) = host["hookError"].as_str() {
        s.push_str(&format!(
            "\nnotification hook failing: {e}; {} notification(s) waiting\n",
            host["undeliveredNotifications"]
        ));
    }
    let am = &host["alertmanager"];
    if am["reachable"] == false {
        s.push_str(&format!(
            "\nAlertmanager unreachable: {}; {} silence(s) waiting (stages and reboots go on)\n",
            am["error"].as_str().unwrap_or("?"),
            am["silencesPending"]
        ));
    }
    s
}

/// `vmkeeper plan` as text.
pub fn plan(p: &Plan) -> String {
    let mut s = format!("Plan at {} ({})\n", rfc3339(p.now), p.timezone);
    let section = |s: &mut String, title: &str, lines: Vec<String>| {
        if !lines.is_empty() {
            s.push_str(&format!("\n{title}:\n"));
            for l in lines {
                s.push_str(&format!("  {l}\n"));
            }
        }
    };
    section(&mut s, "Warnings", p.warnings.clone());
    section(
        &mut s,
        "Actions now",
        p.actions.iter().map(action).collect(),
    );
    section(
        &mut s,
        "Pending (applied by a maintenance reboot)",
        p.pending
            .iter()
            .map(|x| {
                // A host without projects reads as it always did.
                let project = if x.project.is_default() {
                    String::new()
                } else {
                    format!(" (project {})", x.project)
                };
                format!(
                    "{}{project}: pending cores {} -> {}, memoryMiB {} -> {}; reboot in slot {}, announced {}",
                    x.vm,
                    x.from.cores,
                    x.to.cores,
                    x.from.memory_mib,
                    x.to.memory_mib,
                    x.slot,
                    rfc3339(x.announced_at)
                )
            })
            .collect(),
    );
    section(
        &mut s,
        "Refused",
        p.refusals.iter().map(ToString::to_string).collect(),
    );
    section(
        &mut s,
        "Deletions",
        p.deletions
            .iter()
            .flat_map(|d| {
                let mut lines = vec![format!(
                    "{} on {} (cancellable until {})",
                    d.vm,
                    d.date,
                    rfc3339(d.cancellable_until)
                )];
                lines.extend(d.stages.iter().map(|st| {
                    let status = match st.status {
                        StageStatus::Done => "done",
                        StageStatus::Due => "due now",
                        StageStatus::Upcoming => "upcoming",
                    };
                    format!("  {:<15} {}  {status}", st.stage.as_str(), rfc3339(st.at))
                }));
                lines
            })
            .collect(),
    );
    section(
        &mut s,
        "Reserved names",
        p.reserved_names
            .iter()
            .map(|r| format!("{} is free on {}", r.vm, r.free_on))
            .collect(),
    );
    if p.actions.is_empty() && p.pending.is_empty() && p.refusals.is_empty() {
        s.push_str("\nNothing to do.\n");
    }
    s
}

fn action(a: &Action) -> String {
    match a {
        Action::CreateDisk {
            vm,
            size_gib,
            clone_from: None,
        } => {
            format!("{vm}: create disk {size_gib} GiB (thin)")
        }
        Action::CreateDisk {
            vm,
            size_gib,
            clone_from: Some(b),
        } => format!(
            "{vm}: create disk {size_gib} GiB as a clone of {}{}@{}",
            b.pool
                .as_deref()
                .map(|p| format!("{p}/"))
                .unwrap_or_default(),
            b.name,
            b.snapshot
        ),
        Action::Start { vm, resources: r } => format!(
            "{vm}: start with {} vCPU, {} MiB RAM, {} GiB disk",
            r.cores, r.memory_mib, r.disk_gib
        ),
        Action::GrowDisk {
            vm,
            from_gib,
            to_gib,
            live,
        } => format!(
            "{vm}: grow disk {from_gib} -> {to_gib} GiB{}",
            if *live {
                " live (QMP block_resize)"
            } else {
                ""
            }
        ),
        Action::Stop { vm, reason } => format!("{vm}: stop ({reason})"),
        Action::MaintenanceReboot { vm, slot } => {
            format!("{vm}: maintenance reboot in slot {slot}")
        }
        Action::ScheduleMaintenance {
            vm, slot, replaces, ..
        } => match replaces {
            Some(old) if old != slot => {
                format!("{vm}: move maintenance from {old} to {slot}, announce")
            }
            Some(_) => format!("{vm}: update maintenance in slot {slot}, announce"),
            None => format!("{vm}: schedule maintenance in slot {slot}, announce"),
        },
        Action::CancelMaintenance { vm, reason } => {
            format!("{vm}: cancel maintenance ({reason}), announce")
        }
        Action::HoldRemovals { vms } => format!(
            "hold the deletion of [{}]: more VMs were removed at once than removal.maxAtOnce \
             allows; each waits for confirm-removal",
            vms.iter()
                .map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Action::UpdateAddresses { vm, addresses } => format!(
            "{vm}: holds addresses [{}] now",
            addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Action::ScheduleDeletion { vm, date, .. } => format!("{vm}: schedule deletion on {date}"),
        Action::CancelDeletion { vm, reason } => format!("{vm}: cancel deletion ({reason})"),
        Action::RunDeletionStage { vm, stage } => format!("{vm}: run deletion stage {stage}"),
    }
}
