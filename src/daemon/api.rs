//! The local API's requests as the loop answers them: read-only ones at once from what the
//! loop knows (never a reconcile), mutating ones after their operations are done.

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::eventloop::Daemon;
use super::maintenance::describe_reason;
use crate::access::{self, GroupIds, Scope};
use crate::api::{Caller, Request, Response};
use crate::events::Event as Journal;
use crate::localtime::rfc3339;
use crate::model::VmName;
use crate::plan::slot_in;
use crate::state::RebootKind;

impl Daemon {
    pub(super) fn api(
        &mut self,
        req: Request,
        caller: &Caller,
        groups: &GroupIds,
        reply: oneshot::Sender<Response>,
    ) {
        let scope = access::scope(&self.config, caller.uid, &caller.gids, groups);
        if let Some(refusal) = self.refusal(&req, &scope) {
            warn!(
                message_id = Journal::Audit.message_id(),
                caller_uid = caller.uid,
                caller = caller.user.as_deref().unwrap_or("?"),
                "refused {req:?} from uid {}: {refusal}",
                caller.uid,
            );
            let _ = reply.send(Response::Error(refusal));
            return;
        }
        let answer = match req {
            // Read-only: answered at once, from memory.
            Request::Status => {
                let _ = reply.send(match serde_json::to_value(self.status(&scope)) {
                    Ok(v) => Response::Ok(v),
                    Err(e) => Response::Error(e.to_string()),
                });
                return;
            }
            Request::MaintenanceList => {
                let _ = reply.send(Response::Ok(self.maintenance_list(&scope)));
                return;
            }
            Request::Reboot { vm } => {
                self.audit(caller, "reboot", Some(&vm));
                return self.api_reboot(&vm, caller, reply);
            }
            Request::MaintenanceRequest { vm, reason } => {
                self.audit(caller, "maintenance-request", Some(&vm));
                match self.request_maintenance(&vm, &reason, caller, Utc::now()) {
                    Ok(slot) => Response::Ok(serde_json::json!({ "vm": vm, "slot": slot })),
                    Err(e) => Response::Error(format!("{e:#}")),
                }
            }
            Request::RunDue { now } => {
                self.audit(caller, "run-due", None);
                let now = match self.api_now(now, caller) {
                    Ok(n) => n,
                    Err(e) => return drop(reply.send(e)),
                };
                let ops = self.pass(now);
                let ok = serde_json::json!({
                    "ranAt": rfc3339(now.with_timezone(&self.config.timezone)),
                    "operations": ops.len(),
                });
                return self.wait_until_idle(ops, now, ok, reply);
            }
            Request::Delete { vm, date, now } => {
                self.audit(caller, "delete", Some(&vm));
                match self.api_now(now, caller) {
                    Ok(now) => self.api_delete(&vm, date, now, caller),
                    Err(e) => e,
                }
            }
            Request::CancelDeletion { vm, now } => {
                self.audit(caller, "cancel-deletion", Some(&vm));
                match self.api_now(now, caller) {
                    Ok(now) => self.api_cancel_deletion(&vm, now, caller),
                    Err(e) => e,
                }
            }
            Request::AdoptDisk { vm } => {
                self.audit(caller, "adopt-disk", Some(&vm));
                return self.api_adopt(&vm, caller, reply);
            }
            Request::ConfirmRemoval { vms } => {
                for vm in &vms {
                    self.audit(caller, "confirm-removal", Some(vm));
                }
                self.api_confirm_removal(&vms)
            }
            Request::Reload => {
                self.audit(caller, "reload", None);
                return self.load_config(Some(reply));
            }
        };
        self.answer(answer, reply);
    }

    /// Why `req` is refused to a caller of `scope`, if it is: a VM's commands need its
    /// project, the host-wide ones some project; reading is open (and filtered).
    fn refusal(&self, req: &Request, scope: &Scope) -> Option<String> {
        let vm = match req {
            Request::Status | Request::MaintenanceList => return None,
            Request::RunDue { .. } | Request::Reload => {
                return (!scope.any()).then(|| access::host_refusal(&self.config));
            }
            Request::ConfirmRemoval { vms } => {
                return vms.iter().find_map(|vm| {
                    let project = &self.project(vm).name;
                    (!scope.covers(project))
                        .then(|| access::refusal(&self.config, vm.as_str(), project))
                });
            }
            Request::Reboot { vm }
            | Request::MaintenanceRequest { vm, .. }
            | Request::Delete { vm, .. }
            | Request::CancelDeletion { vm, .. }
            | Request::AdoptDisk { vm } => vm,
        };
        let project = &self.project(vm).name;
        (!scope.covers(project)).then(|| access::refusal(&self.config, vm.as_str(), project))
    }

    /// `reboot NAME --now`: a planned cold reboot that applies pending changes (a start, when
    /// the VM is not running); answered once the new QEMU is up.
    fn api_reboot(&mut self, vm: &VmName, caller: &Caller, reply: oneshot::Sender<Response>) {
        let now = Utc::now();
        let config = self.config.clone();
        let refusal = match config.vms.get(vm) {
            None => Some(format!("no VM named {vm} is declared")),
            Some(spec) if !spec.online => {
                Some(format!("{vm} is declared offline (online = false)"))
            }
            Some(_) if !self.state.vms.contains_key(vm) => Some(format!(
                "{vm} has no disk yet; it starts once it is created"
            )),
            Some(_) if self.state.deletions.contains_key(vm) => {
                Some(format!("{vm} is being deleted; cancel the deletion first"))
            }
            Some(_) if self.slot(vm).busy() => Some(format!(
                "{vm} is busy ({} in progress); try again when it is done",
                self.slot(vm)
                    .sup
                    .op
                    .as_ref()
                    .map_or("an operation", |op| op.kind.as_str())
            )),
            Some(_) => None,
        };
        if let Some(r) = refusal {
            let _ = reply.send(Response::Error(r));
            return;
        }
        let id = if self.slot(vm).sup.unit.is_up() {
            self.reboot(vm, RebootKind::Immediate, caller.actor(), now)
        } else {
            let spec = self.config.vms[vm].clone();
            let resources = self.start_resources(&spec);
            self.start(vm, resources, now)
        };
        self.wait_for(
            id.into_iter().collect(),
            serde_json::json!({ "rebooted": vm }),
            reply,
        );
    }

    /// `adopt-disk NAME`: marks an existing image as a declared VM's own, so that its next
    /// create takes it.
    fn api_adopt(&mut self, vm: &VmName, caller: &Caller, reply: oneshot::Sender<Response>) {
        let refusal = if !self.config.vms.contains_key(vm) {
            Some(format!("no VM named {vm} is declared"))
        } else if self.state.vms.contains_key(vm) {
            Some(format!("{vm} has its disk already"))
        } else if self.slot(vm).busy() {
            Some(format!("{vm} is busy; try again when it is done"))
        } else {
            None
        };
        if let Some(r) = refusal {
            let _ = reply.send(Response::Error(r));
            return;
        }
        let mut disk = self.disk(vm, Utc::now());
        disk.owner.adopted_by = Some(caller.name());
        let id = self.spawn_op(
            vm,
            crate::supervisor::OpKind::Create,
            super::ops::Job::Adopt { disk },
        );
        self.wait_for(vec![id], serde_json::json!({ "adopted": vm }), reply);
    }

    /// `confirm-removal NAME...`: the named VMs, removed from the configuration, may be
    /// deleted although more were removed at once than the guard allows.
    fn api_confirm_removal(&mut self, vms: &[VmName]) -> Response {
        let awaiting: Vec<VmName> = self
            .last_plan
            .as_ref()
            .map(|p| p.awaiting_removal.clone())
            .unwrap_or_default();
        if let Some(vm) = vms.iter().find(|vm| !awaiting.contains(vm)) {
            return Response::Error(format!(
                "{vm} is not awaiting a confirmation of its removal (awaiting: [{}])",
                awaiting
                    .iter()
                    .map(VmName::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        self.state.confirmed_removals.extend(vms.iter().cloned());
        self.changed();
        self.dirty_pass();
        Response::Ok(serde_json::json!({ "confirmed": vms }))
    }

    /// The instant a request is judged as of: the clock, or `--now` from root on a daemon
    /// started for tests.
    fn api_now(
        &self,
        now: Option<DateTime<Utc>>,
        caller: &Caller,
    ) -> Result<DateTime<Utc>, Response> {
        match now {
            Some(_) if caller.uid != 0 => Err(Response::Error(
                "not authorized: only root may pass --now".into(),
            )),
            Some(_) if !self.test_clock => Err(Response::Error(
                "--now moves time and is for tests: this daemon was not started with \
                 --test-clock"
                    .into(),
            )),
            Some(n) => Ok(n),
            None => Ok(Utc::now()),
        }
    }

    /// The announced maintenances of the projects the caller may see.
    fn maintenance_list(&self, scope: &Scope) -> serde_json::Value {
        self.state
            .maintenances
            .iter()
            .filter(|(vm, _)| scope.covers(&self.project(vm).name))
            .map(|(vm, m)| {
                let tz = self.zone(vm);
                serde_json::json!({
                    "vm": vm,
                    "project": m.project,
                    "slot": slot_in(tz, m.slot_start, m.slot_end),
                    "announcedAt": rfc3339(m.announced_at.with_timezone(&tz)),
                    "reasons": m.reasons.iter().map(describe_reason).collect::<Vec<_>>(),
                })
            })
            .collect()
    }

    /// Records an accepted mutating call: who (from the kernel), what, on which VM.
    fn audit(&self, caller: &Caller, action: &str, vm: Option<&VmName>) {
        let user = caller.user.as_deref().unwrap_or("?");
        match vm {
            Some(vm) => info!(
                message_id = Journal::Audit.message_id(),
                vm = vm.as_str(),
                project = self.project(vm).name.as_str(),
                action,
                caller_uid = caller.uid,
                caller = user,
                planned = true,
                "{action} {vm} requested by {user} (uid {})",
                caller.uid
            ),
            None => info!(
                message_id = Journal::Audit.message_id(),
                action,
                caller_uid = caller.uid,
                caller = user,
                planned = true,
                "{action} requested by {user} (uid {})",
                caller.uid
            ),
        }
    }
}
