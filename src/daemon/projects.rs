//! Projects as the loop sees them: which project a VM belongs to (declared, or recorded for
//! one that left the configuration), kept in the state for the VMs on record, and the
//! groups whose ids each API request needs.

use std::sync::Arc;

use chrono_tz::Tz;

use super::eventloop::Daemon;
use crate::access::GroupIds;
use crate::config::{Config, Project};
use crate::model::{GroupName, VmName};

impl Daemon {
    /// The project `vm` belongs to now.
    pub(super) fn project(&self, vm: &VmName) -> &Project {
        self.config.project_of(vm, self.state.projects.get(vm))
    }

    /// The zone of `vm`'s dates and slots: its project's.
    pub(super) fn zone(&self, vm: &VmName) -> Tz {
        self.project(vm).tz()
    }

    /// Records the declared project of every VM this daemon is responsible for, and forgets
    /// those it no longer is: a VM removed from the configuration keeps the project it was
    /// last declared in until its name is released.
    pub(super) fn sync_projects(&mut self) {
        let ours = self.ours();
        let before = self.state.projects.len();
        self.state.projects.retain(|vm, _| ours.contains(vm));
        let mut changed = self.state.projects.len() != before;
        for vm in &ours {
            let Some(spec) = self.config.vms.get(vm) else {
                continue;
            };
            if self.state.projects.get(vm) != Some(&spec.project) {
                self.state.projects.insert(vm.clone(), spec.project.clone());
                changed = true;
            }
        }
        if changed {
            self.changed();
        }
    }
}

/// The groups an API request is judged by: every project's authorized group and the
/// operator group. Each connection resolves them to ids (NSS, off the loop) when its
/// request comes, so a group made after the daemon started counts at once.
pub(super) fn groups(config: &Config) -> Arc<Vec<GroupName>> {
    let mut groups: Vec<GroupName> = config
        .projects
        .values()
        .map(|p| p.authorized_group.clone())
        .chain(config.operator_group.clone())
        .collect();
    groups.sort();
    groups.dedup();
    Arc::new(groups)
}

/// The ids of `groups` the group database knows. Blocking (NSS): never on the loop.
pub(super) fn resolve(groups: &[GroupName]) -> GroupIds {
    groups
        .iter()
        .filter_map(|g| crate::exec::peer::group_id(g.as_str()).map(|id| (g.clone(), id)))
        .collect()
}
