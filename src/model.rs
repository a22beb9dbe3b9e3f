//! Plain domain types shared by the core and the edges.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest VM name: names become unit names, image names and DNS labels.
pub const MAX_NAME_LEN: usize = 63;

/// A VM's name: 1–63 characters of `a-z`, `0-9` and `-`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

/// Why a string is not a valid VM or project name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmNameError {
    /// Empty or longer than [`MAX_NAME_LEN`].
    #[error("must be 1..={MAX_NAME_LEN} characters long, got {0}")]
    Length(usize),
    /// The first character is not a lowercase ASCII letter.
    #[error("must start with a letter a-z")]
    Start,
    /// A character outside `a-z`, `0-9` and `-`.
    #[error("may only contain a-z, 0-9 and '-', found {0:?}")]
    Char(char),
}

impl VmName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of the VM's tap device: `vmk-NAME` when that fits the kernel's 15 characters,
    /// else `vmk-` with the name's first 6 characters and a hash of all of it. The same name
    /// always gives the same device; configuration validation refuses two VMs that would share
    /// one.
    pub fn tap_name(&self) -> String {
        const PREFIX: &str = "vmk-";
        if PREFIX.len() + self.0.len() <= 15 {
            return format!("{PREFIX}{}", self.0);
        }
        // FNV-1a: stable across builds and Rust versions, unlike std's hasher.
        let hash = self.0.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        format!("{PREFIX}{}-{:04x}", &self.0[..6], hash & 0xffff)
    }
}

/// The DNS-label rule VM and project names follow.
fn check_label(s: &str) -> Result<(), VmNameError> {
    let len = s.chars().count();
    if len == 0 || len > MAX_NAME_LEN {
        return Err(VmNameError::Length(len));
    }
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(VmNameError::Start);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(VmNameError::Char(c));
    }
    Ok(())
}

impl FromStr for VmName {
    type Err = VmNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_label(s)?;
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for VmName {
    type Error = VmNameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<VmName> for String {
    fn from(n: VmName) -> String {
        n.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A project (a customer): its name follows the VM name rule, because it becomes a journal
/// field, a metrics label and part of messages. VMs without a project are in
/// [`ProjectName::DEFAULT`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProjectName(String);

impl ProjectName {
    /// The implicit project of VMs that name none; the host-wide keys are its values.
    pub const DEFAULT: &'static str = "default";

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the implicit default project.
    pub fn is_default(&self) -> bool {
        self.0 == Self::DEFAULT
    }
}

// Projects are looked up by `&str` too (the default project's name is a constant); the
// derived order is that of the string, as `Borrow` requires.
impl std::borrow::Borrow<str> for ProjectName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Default for ProjectName {
    /// The default project: what state written before projects existed belongs to.
    fn default() -> ProjectName {
        ProjectName(Self::DEFAULT.to_owned())
    }
}

impl FromStr for ProjectName {
    type Err = VmNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_label(s)?;
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for ProjectName {
    type Error = VmNameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ProjectName> for String {
    fn from(n: ProjectName) -> String {
        n.0
    }
}

impl fmt::Display for ProjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Unix group name as `groupadd` accepts it: `a-z`, `0-9`, `_`, `-`, at most 32, starting
/// with a letter or `_`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GroupName(String);

/// Why a string is not a group name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a group name (a-z, 0-9, '_', '-', at most 32, starting with a letter or '_')"
)]
pub struct GroupNameError(String);

impl GroupName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for GroupName {
    type Err = GroupNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(GroupNameError(s.to_owned()))
        }
    }
}

impl TryFrom<String> for GroupName {
    type Error = GroupNameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<GroupName> for String {
    fn from(n: GroupName) -> String {
        n.0
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One run of a VM's QEMU: the unit's systemd `InvocationID` (128 bits, 32 hex digits), new
/// for every start of the unit. Events name the instance they are about, so that nothing
/// from an old QEMU touches a new one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InvocationId(String);

/// Why a string is not an invocation id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an invocation id is 32 hex digits, got {0:?}")]
pub struct InvocationIdError(String);

impl InvocationId {
    /// The id as 32 lowercase hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id systemd gives as 16 bytes; `None` for the all-zero id of a unit never started.
    pub fn from_bytes(bytes: &[u8]) -> Option<InvocationId> {
        if bytes.len() != 16 || bytes.iter().all(|b| *b == 0) {
            return None;
        }
        Some(InvocationId(
            bytes.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    /// A short form for messages: the first 8 digits.
    pub fn short(&self) -> &str {
        &self.0[..8]
    }
}

impl FromStr for InvocationId {
    type Err = InvocationIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(InvocationId(s.to_ascii_lowercase()))
        } else {
            Err(InvocationIdError(s.to_owned()))
        }
    }
}

impl TryFrom<String> for InvocationId {
    type Error = InvocationIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<InvocationId> for String {
    fn from(i: InvocationId) -> String {
        i.0
    }
}

impl fmt::Display for InvocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The resources a VM runs with. Disk in GiB, memory in MiB, as in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// vCPUs.
    pub cores: u32,
    /// RAM in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Disk size in GiB.
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
}

impl Resources {
    /// Whether applying `other` needs a cold reboot (CPU or RAM differ).
    pub fn needs_reboot_for(&self, other: &Resources) -> bool {
        self.cores != other.cores || self.memory_mib != other.memory_mib
    }
}

/// Bytes in one GiB.
pub const GIB: u64 = 1 << 30;

/// A base image snapshot a new disk is cloned from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseImage {
    /// Pool of the base image; the VM's pool when absent.
    pub pool: Option<String>,
    /// Image name.
    pub name: String,
    /// Protected snapshot to clone from.
    pub snapshot: String,
}

/// One virtio-net NIC on a host bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// Host bridge the tap device joins.
    pub bridge: String,
    /// The NIC's MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac_address: String,
}

/// Direct kernel boot instead of booting from the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectBoot {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: Option<String>,
}

/// One declared VM, validated against the platform rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM's name.
    pub name: VmName,
    /// The project it belongs to ([`ProjectName::DEFAULT`] when it names none).
    pub project: ProjectName,
    /// Declared resources.
    pub resources: Resources,
    /// Operator-set memory ceiling in MiB.
    pub memory_limit_mib: u64,
    /// Operator acknowledged a disk of 10 TiB or more.
    pub allow_huge_disk: bool,
    /// Whether the VM should run.
    pub online: bool,
    /// Local date on which the VM is deleted.
    pub delete_at: Option<chrono::NaiveDate>,
    /// Which VM of this name it is: 1 for the first; a name used again after its VM was
    /// deleted needs a higher one, so an old declaration never recreates a deleted VM.
    pub generation: u32,
    /// Addresses the VM owns.
    pub ip_addresses: Vec<IpAddr>,
    /// Base image to clone the disk from.
    pub image: Option<BaseImage>,
    /// Network attachment.
    pub network: Option<Network>,
    /// Direct kernel boot.
    pub boot: Option<DirectBoot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_the_kernels_limit_and_stay_readable() {
        let tap = |n: &str| n.parse::<VmName>().unwrap().tap_name();
        assert_eq!(tap("web01"), "vmk-web01");
        assert_eq!(tap("abcdefghijk"), "vmk-abcdefghijk");
        let long = tap("customer-database-primary");
        assert_eq!(long.len(), 15);
        assert!(long.starts_with("vmk-custom-"), "{long}");
        assert_eq!(long, tap("customer-database-primary"));
        assert_ne!(long, tap("customer-database-replica"));
    }

    #[test]
    fn names_follow_the_dns_label_rule() {
        assert!("web01".parse::<VmName>().is_ok());
        assert!("a".parse::<VmName>().is_ok());
        assert!("a-b-9".parse::<VmName>().is_ok());
        assert_eq!("".parse::<VmName>(), Err(VmNameError::Length(0)));
        assert_eq!("1web".parse::<VmName>(), Err(VmNameError::Start));
        assert_eq!("-web".parse::<VmName>(), Err(VmNameError::Start));
        assert_eq!("Web".parse::<VmName>(), Err(VmNameError::Start));
        assert_eq!("web_1".parse::<VmName>(), Err(VmNameError::Char('_')));
        assert_eq!("wéb".parse::<VmName>(), Err(VmNameError::Char('é')));
        assert!("a".repeat(63).parse::<VmName>().is_ok());
        assert_eq!(
            "a".repeat(64).parse::<VmName>(),
            Err(VmNameError::Length(64))
        );
    }

    #[test]
    fn only_cpu_and_memory_need_a_reboot() {
        let a = Resources {
            cores: 2,
            memory_mib: 2048,
            disk_gib: 30,
        };
        assert!(!a.needs_reboot_for(&Resources { disk_gib: 40, ..a }));
        assert!(a.needs_reboot_for(&Resources { cores: 3, ..a }));
        assert!(a.needs_reboot_for(&Resources {
            memory_mib: 4096,
            ..a
        }));
    }
}
