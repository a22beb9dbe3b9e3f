//! Who is on the other end of a Unix socket, as the kernel says: uid and gid (`SO_PEERCRED`),
//! the supplementary groups the peer had when it connected (`SO_PEERGROUPS`), and names from
//! the user and group databases for messages.
//!
//! Group membership is never looked up in the group database: the kernel's list is what the
//! peer really holds, costs no NSS round trip, and cannot be overflowed by a huge group.

use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::sys::socket::{GetSockOpt, getsockopt, sockopt};
use nix::unistd::{Gid, Group, Uid, User};

/// The most supplementary groups a Linux process can have (`NGROUPS_MAX`).
const MAX_GROUPS: usize = 65_536;

/// A peer's credentials at the time it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl PeerCred {
    /// Whether the peer holds group `gid`, as its primary or a supplementary group.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// Why the peer's credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// `SO_PEERCRED` failed.
    #[error("cannot read the peer's credentials (SO_PEERCRED)")]
    Cred(#[source] Errno),
    /// `SO_PEERGROUPS` failed.
    #[error("cannot read the peer's groups (SO_PEERGROUPS)")]
    Groups(#[source] Errno),
}

/// The credentials of the peer of the connected Unix socket `fd`.
pub fn peer_cred<F: AsFd>(fd: &F) -> Result<PeerCred, PeerError> {
    let cred = getsockopt(fd, sockopt::PeerCredentials).map_err(PeerError::Cred)?;
    let groups = getsockopt(fd, PeerGroups).map_err(PeerError::Groups)?;
    Ok(PeerCred {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
        groups,
    })
}

/// The name of user `uid`, when the password database has one.
pub fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// The id of group `name`, when the group database has it.
pub fn group_id(name: &str) -> Option<u32> {
    Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// The ids of user `name` and of its primary group, when the password database has it.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    User::from_name(name)
        .ok()
        .flatten()
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
}

/// `SO_PEERGROUPS`, which nix does not provide: the peer's supplementary groups.
#[derive(Debug, Clone, Copy)]
struct PeerGroups;

impl GetSockOpt for PeerGroups {
    type Val = Vec<u32>;

    fn get<F: AsFd>(&self, fd: &F) -> nix::Result<Vec<u32>> {
        use std::os::fd::AsRawFd;
        let mut groups: Vec<libc::gid_t> = vec![0; 64];
        loop {
            let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
                .map_err(|_| Errno::E2BIG)?;
            // SAFETY: the buffer holds `len` bytes of gid_t; the kernel writes at most that many
            // and sets `len` to what it wrote, or to what it needs (ERANGE).
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_fd().as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            let n = usize::try_from(len).unwrap_or(usize::MAX) / size_of::<libc::gid_t>();
            match Errno::result(rc) {
                Ok(_) => {
                    groups.truncate(n);
                    return Ok(groups
                        .into_iter()
                        .map(|g| Gid::from_raw(g).as_raw())
                        .collect());
                }
                Err(Errno::ERANGE) if n > groups.len() && n <= MAX_GROUPS => {
                    groups.resize(n, 0);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_pair_shows_our_own_credentials_and_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        assert_eq!(cred.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(cred.gid, nix::unistd::getegid().as_raw());
        assert_eq!(cred.pid, i32::try_from(std::process::id()).unwrap());
        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        let mut theirs = cred.groups.clone();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(theirs, ours);
        assert!(cred.in_group(cred.gid));
    }

    #[test]
    fn names_come_from_the_databases() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(user_name(4_000_000), None);
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-here"), None);
        assert_eq!(user_ids("root"), Some((0, 0)));
    }
}
