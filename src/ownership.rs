//! Who an RBD image belongs to: vmkeeper marks every image it creates with metadata naming
//! its owner, and never attaches, grows, trashes or deletes an image it does not own.

use serde::{Deserialize, Serialize};

/// The image metadata key holding the owner.
pub const OWNER_KEY: &str = "vmkeeper.owner";

/// The name an image has while vmkeeper creates it: only once it is complete and marked is
/// it renamed to the VM's name, so the VM's name only ever names a finished, owned image. The
/// suffix is vmkeeper's: an image of that name is its unfinished work.
pub const CREATING_SUFFIX: &str = ".vmkeeper-new";

/// The owner metadata, as JSON in [`OWNER_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// Always `vmkeeper`.
    pub by: String,
    /// The VM whose disk it is.
    pub vm: String,
    /// The host whose vmkeeper made (or adopted) it.
    pub host: String,
    /// When (RFC 3339).
    pub at: String,
    /// Who adopted it deliberately (`vmkeeper adopt-disk`), when it was not created by
    /// vmkeeper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_by: Option<String>,
}

impl Owner {
    /// The owner record of `vm`'s disk made now on `host`.
    pub fn new(vm: &str, host: &str, at: &str) -> Owner {
        Owner {
            by: "vmkeeper".into(),
            vm: vm.into(),
            host: host.into(),
            at: at.into(),
            adopted_by: None,
        }
    }

    /// As stored.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Whose an image is, judged from its owner metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// `vm`'s, marked by vmkeeper.
    Ours,
    /// No owner metadata: not made by vmkeeper (or made by one that did not mark images).
    Unowned,
    /// Marked, but for another VM or by something else; the text says whose.
    Other(String),
}

/// Judges owner metadata `value` for `vm`'s disk.
pub fn judge(value: Option<&str>, vm: &str) -> Ownership {
    let Some(value) = value else {
        return Ownership::Unowned;
    };
    match serde_json::from_str::<Owner>(value) {
        Ok(o) if o.by == "vmkeeper" && o.vm == vm => Ownership::Ours,
        Ok(o) => Ownership::Other(format!("{} of VM {} on {}", o.by, o.vm, o.host)),
        Err(_) => Ownership::Other(format!("unreadable owner {value:?}")),
    }
}

impl std::fmt::Display for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ownership::Ours => f.write_str("this VM's"),
            Ownership::Unowned => f.write_str("no owner recorded"),
            Ownership::Other(who) => write!(f, "owned by {who}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_vmkeepers_mark_for_this_vm_is_ours() {
        let o = Owner::new("web01", "host-a", "2026-12-01T00:00:00Z").to_json();
        assert_eq!(judge(Some(&o), "web01"), Ownership::Ours);
        assert!(matches!(judge(Some(&o), "web02"), Ownership::Other(w) if w.contains("web01")));
        assert_eq!(judge(None, "web01"), Ownership::Unowned);
        assert!(matches!(
            judge(Some("{\"someone\": 1}"), "web01"),
            Ownership::Other(_)
        ));
        let adopted = Owner {
            adopted_by: Some("alice".into()),
            ..Owner::new("web01", "host-a", "2026-12-01T00:00:00Z")
        };
        assert_eq!(judge(Some(&adopted.to_json()), "web01"), Ownership::Ours);
    }
}
