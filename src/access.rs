//! Pure: which projects' VMs a caller may act on and see, from the uid and groups the
//! kernel gave for it and the ids of the configured groups.
//!
//! root and members of the operator group act on every project; a member of a project's
//! authorized group acts on that project's VMs only.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::Config;
use crate::model::{GroupName, ProjectName};

/// The ids of the configured groups the group database knows (an unknown group admits
/// nobody).
pub type GroupIds = BTreeMap<GroupName, u32>;

/// What a caller may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every project: root, or a member of the operator group.
    All,
    /// These projects (perhaps none).
    Projects(BTreeSet<ProjectName>),
}

impl Scope {
    /// Whether the caller may act on (and see) the VMs of `project`.
    pub fn covers(&self, project: &ProjectName) -> bool {
        match self {
            Scope::All => true,
            Scope::Projects(p) => p.contains(project),
        }
    }

    /// Whether the caller may act on the VMs of some project: enough for the host-wide
    /// commands (`run-due`, `reload`), which only make the daemon do now what it does anyway.
    pub fn any(&self) -> bool {
        match self {
            Scope::All => true,
            Scope::Projects(p) => !p.is_empty(),
        }
    }
}

/// The scope of a caller with user id `uid` holding groups `gids` (primary and
/// supplementary).
pub fn scope(config: &Config, uid: u32, gids: &[u32], ids: &GroupIds) -> Scope {
    let holds = |g: &GroupName| ids.get(g).is_some_and(|id| gids.contains(id));
    if uid == 0 || config.operator_group.as_ref().is_some_and(holds) {
        return Scope::All;
    }
    Scope::Projects(
        config
            .projects
            .values()
            .filter(|p| holds(&p.authorized_group))
            .map(|p| p.name.clone())
            .collect(),
    )
}

/// Why a caller is refused an action on a VM of `project`: it names the project and who may.
pub fn refusal(config: &Config, vm: &str, project: &ProjectName) -> String {
    let group = &config.project_named(project).authorized_group;
    let operators = match &config.operator_group {
        Some(op) => format!(" and of the operator group {op}"),
        None => String::new(),
    };
    format!(
        "not authorized: {vm} belongs to project {project}; only root, members of {group} \
         (project {project}'s authorized group){operators} may do this"
    )
}

/// Why a caller is refused a host-wide command.
pub fn host_refusal(config: &Config) -> String {
    let operators = match &config.operator_group {
        Some(op) => format!(", members of the operator group {op}"),
        None => String::new(),
    };
    format!(
        "not authorized: only root{operators} and members of a project's authorized group \
         may do this"
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config(operator: Option<&str>) -> Config {
        let mut doc = json!({
            "authorizedGroup": "sudo-srv",
            "projects": {
                "shop": { "authorizedGroup": "shop-admins" },
                "blog": { "authorizedGroup": "blog-admins" },
                "wiki": {},
            },
        });
        if let Some(op) = operator {
            doc["operatorGroup"] = op.into();
        }
        crate::config::parse(&doc.to_string()).unwrap().config
    }

    fn ids() -> GroupIds {
        [
            ("sudo-srv", 100),
            ("shop-admins", 101),
            ("blog-admins", 102),
            ("ops", 103),
        ]
        .into_iter()
        .map(|(n, id)| (n.parse().unwrap(), id))
        .collect()
    }

    fn projects(names: &[&str]) -> Scope {
        Scope::Projects(names.iter().map(|n| n.parse().unwrap()).collect())
    }

    #[test]
    fn root_and_operators_act_on_every_project() {
        let c = config(Some("ops"));
        assert_eq!(scope(&c, 0, &[], &ids()), Scope::All);
        assert_eq!(scope(&c, 1000, &[5, 103], &ids()), Scope::All);
        assert!(Scope::All.covers(&"shop".parse().unwrap()));
        // Without an operator group only root does.
        let c = config(None);
        assert_eq!(scope(&c, 1000, &[103], &ids()), projects(&[]));
    }

    #[test]
    fn a_project_group_covers_its_own_projects_only() {
        let c = config(Some("ops"));
        let shop = scope(&c, 1000, &[101], &ids());
        assert_eq!(shop, projects(&["shop"]));
        assert!(shop.covers(&"shop".parse().unwrap()));
        assert!(!shop.covers(&"blog".parse().unwrap()));
        assert!(!shop.covers(&ProjectName::default()));
        assert!(shop.any());
        // The host-wide group is the default project's and that of every project that sets
        // none (here wiki).
        assert_eq!(
            scope(&c, 1000, &[100], &ids()),
            projects(&["default", "wiki"])
        );
        assert_eq!(
            scope(&c, 1000, &[101, 102], &ids()),
            projects(&["blog", "shop"])
        );
    }

    #[test]
    fn no_group_no_scope_and_unknown_groups_admit_nobody() {
        let c = config(Some("ops"));
        let none = scope(&c, 1000, &[7], &ids());
        assert_eq!(none, projects(&[]));
        assert!(!none.any());
        // The group database does not know shop-admins: gid 101 means nothing then.
        let mut partial = ids();
        partial.remove(&"shop-admins".parse().unwrap());
        assert_eq!(scope(&c, 1000, &[101], &partial), projects(&[]));
    }

    #[test]
    fn refusals_name_the_project_and_who_may() {
        let c = config(Some("ops"));
        assert_eq!(
            refusal(&c, "shop-web", &"shop".parse().unwrap()),
            "not authorized: shop-web belongs to project shop; only root, members of \
             shop-admins (project shop's authorized group) and of the operator group ops may \
             do this"
        );
        assert_eq!(
            host_refusal(&config(None)),
            "not authorized: only root and members of a project's authorized group may do this"
        );
    }
}
