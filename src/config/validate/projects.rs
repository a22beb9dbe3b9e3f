//! Projects: each project's keys over the host-wide ones (which make the default project),
//! the project each VM names, and warnings about groups that would let one customer act on
//! another's VMs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::str::FromStr;

use chrono_tz::Tz;
use serde_json::Value;

use super::maintenance::{self, Keys};
use super::{Validator, closest};
use crate::config::file::{PROJECT_KEYS, RawProject};
use crate::config::{Config, Problem, Project};
use crate::maintenance::Policy;
use crate::model::{GroupName, ProjectName};

/// The host-wide keys: the default project's values and every project's defaults.
pub(super) struct Host {
    pub tz: Tz,
    /// `None` when the host-wide maintenance section could not be read.
    pub maintenance: Option<Keys>,
    pub policy: Option<Policy>,
    pub contacts: Vec<String>,
    pub notify_command: Option<PathBuf>,
    pub authorized_group: GroupName,
}

/// Every project by name, the default project first made of the host-wide keys. A project
/// with a problem is left out (its problems are reported).
pub(super) fn projects(
    v: &mut Validator,
    raw: Option<BTreeMap<String, Value>>,
    host: &Host,
) -> BTreeMap<ProjectName, Project> {
    let mut projects = BTreeMap::new();
    if let Some(policy) = &host.policy {
        projects.insert(
            ProjectName::default(),
            Project {
                name: ProjectName::default(),
                maintenance: policy.clone(),
                contacts: host.contacts.clone(),
                authorized_group: host.authorized_group.clone(),
                notify_command: host.notify_command.clone(),
            },
        );
    }
    for (name, raw) in raw.unwrap_or_default() {
        let path = format!("projects.{name}");
        let parsed = match name.parse::<ProjectName>() {
            Ok(n) if n.is_default() => {
                v.err(
                    &path,
                    "the default project is made of the host-wide keys (timezone, maintenance, \
                     contacts, notifyCommand, authorizedGroup); give this project another name",
                );
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                v.err(&path, format!("name {e}"));
                None
            }
        };
        let project = v
            .section::<RawProject>(&path, Some(raw))
            .and_then(|r| project(v, &path, r, host));
        if let (Some(name), Some(mut p)) = (parsed, project) {
            p.name = name.clone();
            projects.insert(name, p);
        }
    }
    projects
}

fn project(v: &mut Validator, path: &str, raw: RawProject, host: &Host) -> Option<Project> {
    let before = v.problems.len();
    v.unknown(path, &raw.unknown, PROJECT_KEYS);
    let tz = match v
        .section::<Option<String>>(&format!("{path}.timezone"), raw.timezone)
        .flatten()
    {
        None => host.tz,
        Some(name) => Tz::from_str(&name).unwrap_or_else(|_| {
            v.err(
                format!("{path}.timezone"),
                format!("{name:?} is not a known IANA time zone"),
            );
            chrono_tz::UTC
        }),
    };
    let section = format!("{path}.maintenance");
    let policy = maintenance::read(v, &section, raw.maintenance).and_then(|own| {
        let keys = Keys::over(host.maintenance.as_ref()?, &section, &own, tz);
        let policy = maintenance::policy(v, &keys)?;
        let ((max, inherited), host_max) = (keys.max_parallel(), host.policy.as_ref()?);
        if !inherited && max > i64::from(host_max.max_parallel) {
            v.warnings.push(Problem::new(
                format!("{section}.maxParallel"),
                format!(
                    "{max} is more than the host-wide maintenance.maxParallel ({}), which \
                     limits the VMs of all projects together",
                    host_max.max_parallel
                ),
            ));
        }
        Some(policy)
    });
    // An absent key or null takes the host-wide value.
    let contacts = match raw.contacts {
        None | Some(Value::Null) => host.contacts.clone(),
        some => super::contacts(v, &format!("{path}.contacts"), some),
    };
    let notify_command = match raw.notify_command {
        None | Some(Value::Null) => host.notify_command.clone(),
        some => super::notify_command(v, &format!("{path}.notifyCommand"), some),
    };
    let authorized_group = match raw.authorized_group {
        None | Some(Value::Null) => Some(host.authorized_group.clone()),
        some => super::group(v, &format!("{path}.authorizedGroup"), some),
    };
    if v.problems.len() > before {
        return None;
    }
    Some(Project {
        name: ProjectName::default(),
        maintenance: policy?,
        contacts,
        authorized_group: authorized_group?,
        notify_command,
    })
}

/// The project a VM names, which must be one of `known` (the keys of `projects`, valid or
/// not, so a broken project is not reported once more by each of its VMs) or the default.
pub(super) fn vm_project(
    v: &mut Validator,
    path: &str,
    raw: Option<String>,
    known: &BTreeSet<String>,
) -> Option<ProjectName> {
    let Some(name) = raw else {
        return Some(ProjectName::default());
    };
    if name == ProjectName::DEFAULT || known.contains(&name) {
        // An invalid project name is reported at the project's own key.
        return name.parse().ok();
    }
    let names: Vec<&str> = known.iter().map(String::as_str).collect();
    let hint = match closest(&name, &names) {
        Some(n) => format!("did you mean {n:?}?"),
        None if names.is_empty() => "no projects are defined (see `projects`)".to_owned(),
        None => format!("the projects are {}", names.join(", ")),
    };
    v.err(
        format!("{path}.project"),
        format!("no project {name:?}; {hint}"),
    );
    None
}

/// Warnings about groups: a group authorized for two projects that both have VMs lets each
/// customer act on the other's, and an operator group that is also a project's makes that
/// customer an operator of every project.
pub(super) fn group_warnings(v: &mut Validator, config: &Config) {
    let host_group = &config.default_project().authorized_group;
    let used: BTreeSet<&ProjectName> = config.vms.values().map(|s| &s.project).collect();
    let path = |p: &ProjectName| {
        if p.is_default() {
            "authorizedGroup".to_owned()
        } else {
            format!("projects.{p}.authorizedGroup")
        }
    };
    let mut seen: BTreeMap<&GroupName, &ProjectName> = BTreeMap::new();
    // The default project first: the others are told that they share its (host-wide) group.
    let (default, others): (Vec<&Project>, Vec<&Project>) =
        config.projects.values().partition(|p| p.name.is_default());
    for p in default
        .into_iter()
        .chain(others)
        .filter(|p| used.contains(&p.name))
    {
        let group = &p.authorized_group;
        if let Some(first) = seen.get(group) {
            let inherited = if group == host_group && !p.name.is_default() {
                " (the host-wide authorizedGroup)"
            } else {
                ""
            };
            v.warnings.push(Problem::new(
                path(&p.name),
                format!(
                    "{:?}{inherited} is also the authorized group of project {first}: its \
                     members may act on the VMs of both",
                    group.as_str()
                ),
            ));
        } else {
            seen.insert(group, &p.name);
        }
    }
    if let Some(op) = &config.operator_group {
        for p in config
            .projects
            .values()
            .filter(|p| p.authorized_group == *op)
        {
            v.warnings.push(Problem::new(
                "operatorGroup",
                format!(
                    "{:?} is also the authorized group of project {}: its members may act on \
                     the VMs of every project",
                    op.as_str(),
                    p.name
                ),
            ));
        }
    }
}
