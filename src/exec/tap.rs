//! Tap devices for VM NICs, made by the daemon so that QEMU needs no privilege and no setuid
//! helper: a persistent tap owned by QEMU's user, joined to the bridge and up. QEMU opens it by
//! name (`-netdev tap,ifname=...,script=no,downscript=no`), which the kernel allows its owner.
//!
//! Needs CAP_NET_ADMIN (the daemon has it; QEMU does not). Blocking ioctls: call from a
//! blocking thread.

use std::ffi::c_int;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// The clone device.
const TUN: &str = "/dev/net/tun";
/// `SIOCBRADDIF` from linux/sockios.h (not in libc): add the interface `ifr_ifindex` to the
/// bridge `ifr_name`.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);
nix::ioctl_write_int_bad!(tun_set_group, libc::TUNSETGROUP);
nix::ioctl_readwrite_bad!(get_flags, libc::SIOCGIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(set_flags, libc::SIOCSIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(bridge_add, SIOCBRADDIF, libc::ifreq);

/// Why a tap device could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Not a usable interface name.
    #[error("{0:?} is not an interface name")]
    Name(String),
    /// The bridge to join is not there, or not a bridge.
    #[error("bridge {0} does not exist or is not a bridge")]
    NoBridge(String),
    /// Opening the clone device failed.
    #[error("cannot open {TUN}")]
    Open(#[source] std::io::Error),
    /// An ioctl failed.
    #[error("{what} failed for {tap}")]
    Ioctl {
        /// The step.
        what: &'static str,
        /// The tap device.
        tap: String,
        /// The cause.
        #[source]
        source: Errno,
    },
}

/// Whether interface `name` exists (in the calling thread's network namespace; sysfs would
/// show the namespace it was mounted in).
pub fn exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Makes tap device `name` afresh (an old one of that name is removed first), owned by
/// `uid`/`gid`, joined to `bridge` and up.
pub fn create(name: &str, bridge: &str, uid: u32, gid: u32) -> Result<(), TapError> {
    if !exists(bridge) {
        return Err(TapError::NoBridge(bridge.to_owned()));
    }
    remove(name)?;
    let fail = |what| {
        move |source| TapError::Ioctl {
            what,
            tap: name.to_owned(),
            source,
        }
    };
    let id = |n: u32, what| c_int::try_from(n).map_err(|_| fail(what)(Errno::EINVAL));
    let (uid, gid) = (id(uid, "TUNSETOWNER")?, id(gid, "TUNSETGROUP")?);
    let tun = attach(name)?;
    // SAFETY: the fd is the open clone device attached to `name`; the ioctls take plain ints.
    unsafe {
        tun_set_owner(tun.as_raw_fd(), uid).map_err(fail("TUNSETOWNER"))?;
        tun_set_group(tun.as_raw_fd(), gid).map_err(fail("TUNSETGROUP"))?;
        tun_set_persist(tun.as_raw_fd(), 1).map_err(fail("TUNSETPERSIST"))?;
    }
    drop(tun);
    let sock = control_socket().map_err(fail("socket"))?;
    let index = nix::net::if_::if_nametoindex(name).map_err(fail("if_nametoindex"))?;
    let mut req = ifreq(bridge)?;
    req.ifr_ifru.ifru_ifindex =
        c_int::try_from(index).map_err(|_| fail("SIOCBRADDIF")(Errno::EINVAL))?;
    // SAFETY: `req` is a valid ifreq naming the bridge with the tap's index, alive for the call.
    if let Err(e) = unsafe { bridge_add(sock.as_raw_fd(), &req) } {
        // A tap left outside the bridge would look plugged in to QEMU and carry nothing.
        let _ = remove(name);
        return Err(match e {
            Errno::EOPNOTSUPP | Errno::EINVAL => TapError::NoBridge(bridge.to_owned()),
            e => fail("SIOCBRADDIF")(e),
        });
    }
    let mut req = ifreq(name)?;
    // SAFETY: `req` is a valid ifreq naming the tap; the kernel fills in its flags.
    unsafe { get_flags(sock.as_raw_fd(), &mut req) }.map_err(fail("SIOCGIFFLAGS"))?;
    // SAFETY: reading the union member SIOCGIFFLAGS just wrote.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: `req` is a valid ifreq naming the tap with its new flags.
    unsafe { set_flags(sock.as_raw_fd(), &req) }.map_err(fail("SIOCSIFFLAGS"))?;
    Ok(())
}

/// Removes tap device `name`, if it exists (it leaves its bridge with it).
pub fn remove(name: &str) -> Result<(), TapError> {
    if !exists(name) {
        return Ok(());
    }
    let tun = attach(name)?;
    // SAFETY: the fd is the open clone device attached to `name`; the ioctl takes a plain int.
    unsafe { tun_set_persist(tun.as_raw_fd(), 0) }.map_err(|source| TapError::Ioctl {
        what: "TUNSETPERSIST",
        tap: name.to_owned(),
        source,
    })?;
    // Closing the last fd of a tap that is not persistent deletes it.
    drop(tun);
    Ok(())
}

/// Opens the clone device and attaches it to tap `name` (made when it does not exist).
fn attach(name: &str) -> Result<OwnedFd, TapError> {
    let tun: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN)
        .map_err(TapError::Open)?
        .into();
    let mut req = ifreq(name)?;
    // The flags QEMU asks for when it opens the tap (no multiqueue, which would have to match).
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `req` is a valid ifreq naming the tap, alive for the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &req) }.map_err(|source| TapError::Ioctl {
        what: "TUNSETIFF",
        tap: name.to_owned(),
        source,
    })?;
    Ok(tun)
}

/// A socket for interface ioctls.
fn control_socket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// An `ifreq` naming interface `name`, the rest zero.
fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0']) {
        return Err(TapError::Name(name.to_owned()));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers and pointers), for
    // which all zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_do_not_fit_are_refused_before_any_ioctl() {
        assert!(matches!(ifreq(""), Err(TapError::Name(_))));
        assert!(matches!(ifreq("sixteen-chars-xx"), Err(TapError::Name(_))));
        assert!(ifreq("fifteen-chars-x").is_ok());
        assert!(matches!(
            create("vmk-t", "no-such-bridge0", 0, 0),
            Err(TapError::NoBridge(_))
        ));
    }
}
