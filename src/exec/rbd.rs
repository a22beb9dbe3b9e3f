//! Safe wrapper over librados/librbd: the only code that calls into Ceph.
//!
//! The binding is hand-written (about 35 `extern "C"` functions of the Ceph 16 ABI) so the
//! build needs only `librados-dev` and `librbd-dev`, no bindgen or libclang.
//!
//! # Handles
//! - [`Cluster`]: one `rados_t`, connected. Cheap to clone (an `Arc`); `rados_shutdown` runs
//!   when the last clone, [`IoCtx`] or [`Image`] made from it is dropped.
//! - [`IoCtx`]: one pool (`rados_ioctx_t`), destroyed on drop. Most daemon operations are
//!   methods here and take image names, opening and closing the image themselves.
//! - [`Image`]: one open image (`rbd_image_t`), closed on drop.
//!
//! # Threads and blocking
//! Every call here blocks the calling thread until Ceph answers or a timeout in
//! [`ClusterOptions`] fires. The async daemon must therefore run them on tokio's blocking
//! pool: [`Cluster::run`] does that for a closure that gets a clone of the cluster.
//!
//! What this relies on (librados.h, librbd.h of Ceph 16): a `rados_t` may be used from
//! several threads at once; a `rados_ioctx_t` too as long as nobody changes its snapshot,
//! locator or namespace settings, which this module never does; an `rbd_image_t` is not
//! bound to the thread that opened it, but is not shared between threads here (`Image` is
//! `Send`, not `Sync`). An open image keeps its own copy of the pool context, so an
//! [`Image`] only keeps the cluster alive, not the [`IoCtx`] it was opened from.
//!
//! # Timeouts
//! Without timeouts librados waits forever for an unreachable monitor or a down OSD. The
//! defaults in [`ClusterOptions`] make such calls fail with `ETIMEDOUT` instead. The OSD
//! timeout is safe here because this client only does metadata operations; QEMU's own
//! librbd, which does the guest's I/O, is configured separately and must not get it.

use std::ffi::{CStr, CString, c_char, c_int};
use std::fmt;
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

/// Raw declarations of the librados/librbd C API (Ceph 16, librbd 1.16).
#[allow(non_camel_case_types)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    pub type rados_t = *mut c_void;
    pub type rados_ioctx_t = *mut c_void;
    pub type rbd_image_t = *mut c_void;
    pub type rbd_image_options_t = *mut c_void;
    pub type librbd_progress_fn_t = Option<extern "C" fn(u64, u64, *mut c_void) -> c_int>;

    pub const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
    pub const RBD_IMAGE_OPTION_FEATURES_SET: c_int = 8;
    pub const RBD_FEATURE_LAYERING: u64 = 1;
    pub const RBD_MAX_BLOCK_NAME_SIZE: usize = 24;
    pub const RBD_MAX_IMAGE_NAME_SIZE: usize = 96;

    #[repr(C)]
    pub struct rbd_image_info_t {
        pub size: u64,
        pub obj_size: u64,
        pub num_objs: u64,
        pub order: c_int,
        pub block_name_prefix: [c_char; RBD_MAX_BLOCK_NAME_SIZE],
        pub parent_pool: i64,
        pub parent_name: [c_char; RBD_MAX_IMAGE_NAME_SIZE],
    }

    #[repr(C)]
    pub struct rbd_image_spec_t {
        pub id: *mut c_char,
        pub name: *mut c_char,
    }

    #[repr(C)]
    pub struct rbd_snap_info_t {
        pub id: u64,
        pub size: u64,
        pub name: *const c_char,
    }

    #[repr(C)]
    pub struct rbd_trash_image_info_t {
        pub id: *mut c_char,
        pub name: *mut c_char,
        /// `rbd_trash_image_source_t`, a C enum (int-sized).
        pub source: c_int,
        pub deletion_time: libc::time_t,
        pub deferment_end_time: libc::time_t,
    }

    #[link(name = "rados")]
    unsafe extern "C" {
        pub fn rados_create2(
            cluster: *mut rados_t,
            cluster_name: *const c_char,
            name: *const c_char,
            flags: u64,
        ) -> c_int;
        pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
        pub fn rados_conf_set(
            cluster: rados_t,
            option: *const c_char,
            value: *const c_char,
        ) -> c_int;
        pub fn rados_connect(cluster: rados_t) -> c_int;
        pub fn rados_shutdown(cluster: rados_t);
        pub fn rados_ioctx_create(
            cluster: rados_t,
            pool_name: *const c_char,
            ioctx: *mut rados_ioctx_t,
        ) -> c_int;
        pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    }

    #[link(name = "rbd")]
    unsafe extern "C" {
        pub fn rbd_image_options_create(opts: *mut rbd_image_options_t);
        pub fn rbd_image_options_destroy(opts: rbd_image_options_t);
        pub fn rbd_image_options_set_uint64(
            opts: rbd_image_options_t,
            optname: c_int,
            optval: u64,
        ) -> c_int;
        pub fn rbd_list2(
            io: rados_ioctx_t,
            images: *mut rbd_image_spec_t,
            max_images: *mut usize,
        ) -> c_int;
        pub fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, num_images: usize);
        pub fn rbd_create4(
            io: rados_ioctx_t,
            name: *const c_char,
            size: u64,
            opts: rbd_image_options_t,
        ) -> c_int;
        pub fn rbd_clone3(
            p_ioctx: rados_ioctx_t,
            p_name: *const c_char,
            p_snapname: *const c_char,
            c_ioctx: rados_ioctx_t,
            c_name: *const c_char,
            c_opts: rbd_image_options_t,
        ) -> c_int;
        pub fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
        pub fn rbd_trash_move(io: rados_ioctx_t, name: *const c_char, delay: u64) -> c_int;
        pub fn rbd_trash_list(
            io: rados_ioctx_t,
            entries: *mut rbd_trash_image_info_t,
            num_entries: *mut usize,
        ) -> c_int;
        pub fn rbd_trash_list_cleanup(entries: *mut rbd_trash_image_info_t, num_entries: usize);
        pub fn rbd_trash_remove(io: rados_ioctx_t, id: *const c_char, force: bool) -> c_int;
        pub fn rbd_trash_restore(
            io: rados_ioctx_t,
            id: *const c_char,
            name: *const c_char,
        ) -> c_int;
        pub fn rbd_open(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        pub fn rbd_open_read_only(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        pub fn rbd_open_by_id(
            io: rados_ioctx_t,
            id: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        pub fn rbd_close(image: rbd_image_t) -> c_int;
        pub fn rbd_stat(image: rbd_image_t, info: *mut rbd_image_info_t, infosize: usize) -> c_int;
        pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
        pub fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: usize) -> c_int;
        pub fn rbd_resize2(
            image: rbd_image_t,
            size: u64,
            allow_shrink: bool,
            cb: librbd_progress_fn_t,
            cbdata: *mut c_void,
        ) -> c_int;
        pub fn rbd_snap_list(
            image: rbd_image_t,
            snaps: *mut rbd_snap_info_t,
            max_snaps: *mut c_int,
        ) -> c_int;
        pub fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
        pub fn rbd_snap_create(image: rbd_image_t, snap_name: *const c_char) -> c_int;
        pub fn rbd_snap_remove(image: rbd_image_t, snap_name: *const c_char) -> c_int;
        pub fn rbd_snap_protect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
        pub fn rbd_snap_unprotect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
        pub fn rbd_snap_is_protected(
            image: rbd_image_t,
            snap_name: *const c_char,
            is_protected: *mut c_int,
        ) -> c_int;
        pub fn rbd_metadata_get(
            image: rbd_image_t,
            key: *const c_char,
            value: *mut c_char,
            val_len: *mut usize,
        ) -> c_int;
        pub fn rbd_metadata_set(
            image: rbd_image_t,
            key: *const c_char,
            value: *const c_char,
        ) -> c_int;
        pub fn rbd_rename(
            io: rados_ioctx_t,
            src_name: *const c_char,
            dest_name: *const c_char,
        ) -> c_int;
    }
}

/// A negative return code of librados/librbd, kept as the positive errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The symbolic name (`"ENOENT"`), for the errnos Ceph returns in practice.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::ENXIO => "ENXIO",
            libc::E2BIG => "E2BIG",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::EXDEV => "EXDEV",
            libc::ENODEV => "ENODEV",
            libc::EINVAL => "EINVAL",
            libc::EFBIG => "EFBIG",
            libc::ENOSPC => "ENOSPC",
            libc::EROFS => "EROFS",
            libc::EMLINK => "EMLINK",
            libc::ERANGE => "ERANGE",
            libc::EDEADLK => "EDEADLK",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            libc::ENOSYS => "ENOSYS",
            libc::ENOTEMPTY => "ENOTEMPTY",
            libc::ENODATA => "ENODATA",
            libc::ENOLINK => "ENOLINK",
            libc::EOVERFLOW => "EOVERFLOW",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::ECONNRESET => "ECONNRESET",
            libc::ENOTCONN => "ENOTCONN",
            // Ceph's EBLOCKLISTED is ESHUTDOWN on Linux.
            libc::ESHUTDOWN => "ESHUTDOWN",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::EHOSTUNREACH => "EHOSTUNREACH",
            libc::EALREADY => "EALREADY",
            libc::EINPROGRESS => "EINPROGRESS",
            libc::EDQUOT => "EDQUOT",
            libc::ECANCELED => "ECANCELED",
            _ => return None,
        })
    }

    fn check(rc: c_int) -> Result<c_int, Errno> {
        if rc < 0 { Err(Errno(-rc)) } else { Ok(rc) }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // strerror's text, without the " (os error N)" that std appends.
        let full = std::io::Error::from_raw_os_error(self.0).to_string();
        let text = full
            .rsplit_once(" (os error")
            .map_or(full.as_str(), |(t, _)| t);
        match self.name() {
            Some(name) => write!(f, "{name} ({text})"),
            None => write!(f, "errno {} ({text})", self.0),
        }
    }
}

impl std::error::Error for Errno {}

/// Everything that can fail here, one variant per operation.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("name {0:?} contains a NUL byte")]
    InvalidName(String),
    #[error("cannot create a Ceph handle for {client}")]
    CreateHandle {
        client: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot read Ceph configuration {}", path.display())]
    ReadConf {
        path: PathBuf,
        #[source]
        errno: Errno,
    },
    #[error("cannot set Ceph option {key}")]
    SetConf {
        key: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot connect to Ceph as {client}")]
    Connect {
        client: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot open pool {pool}")]
    OpenPool {
        pool: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot list images of pool {pool}")]
    ListImages {
        pool: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot create image {pool}/{image}")]
    CreateImage {
        pool: String,
        image: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot clone {parent} to {pool}/{image}")]
    CloneImage {
        parent: String,
        pool: String,
        image: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot open image {pool}/{image}")]
    OpenImage {
        pool: String,
        image: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot read the size of image {pool}/{image}")]
    StatImage {
        pool: String,
        image: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot read the id of image {pool}/{image}")]
    ImageId {
        pool: String,
        image: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot grow image {pool}/{image} to {requested} bytes")]
    Grow {
        pool: String,
        image: String,
        requested: u64,
        #[source]
        errno: Errno,
    },
    #[error(
        "refusing to shrink image {pool}/{image} from {current} to {requested} bytes: \
         disks never shrink, provision a new VM instead"
    )]
    ShrinkRefused {
        pool: String,
        image: String,
        current: u64,
        requested: u64,
    },
    #[error("cannot list snapshots of image {pool}/{image}")]
    ListSnapshots {
        pool: String,
        image: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot create snapshot {pool}/{image}@{snap}")]
    CreateSnapshot {
        pool: String,
        image: String,
        snap: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot remove snapshot {pool}/{image}@{snap}")]
    RemoveSnapshot {
        pool: String,
        image: String,
        snap: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot protect snapshot {pool}/{image}@{snap}")]
    ProtectSnapshot {
        pool: String,
        image: String,
        snap: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot unprotect snapshot {pool}/{image}@{snap}")]
    UnprotectSnapshot {
        pool: String,
        image: String,
        snap: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot tell whether snapshot {pool}/{image}@{snap} is protected")]
    SnapshotProtection {
        pool: String,
        image: String,
        snap: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot move image {pool}/{image} to the trash")]
    TrashMove {
        pool: String,
        image: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot read metadata {key} of image {pool}/{image}")]
    MetadataGet {
        pool: String,
        image: String,
        key: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot set metadata {key} of image {pool}/{image}")]
    MetadataSet {
        pool: String,
        image: String,
        key: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot rename image {pool}/{from} to {to}")]
    Rename {
        pool: String,
        from: String,
        to: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot list the trash of pool {pool}")]
    TrashList {
        pool: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot remove image id {id} from the trash of pool {pool}")]
    TrashRemove {
        pool: String,
        id: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot restore image id {id} from the trash of pool {pool} as {image}")]
    TrashRestore {
        pool: String,
        id: String,
        image: String,
        #[source]
        errno: Errno,
    },
    #[error("cannot remove image {pool}/{image}")]
    RemoveImage {
        pool: String,
        image: String,
        #[source]
        errno: Errno,
    },
    #[error("Ceph call on the blocking pool did not complete")]
    Blocking(#[source] tokio::task::JoinError),
}

impl RbdError {
    /// The errno Ceph returned, if the failure came from Ceph.
    pub fn errno(&self) -> Option<Errno> {
        use RbdError::*;
        match self {
            CreateHandle { errno, .. }
            | ReadConf { errno, .. }
            | SetConf { errno, .. }
            | Connect { errno, .. }
            | OpenPool { errno, .. }
            | ListImages { errno, .. }
            | CreateImage { errno, .. }
            | CloneImage { errno, .. }
            | OpenImage { errno, .. }
            | StatImage { errno, .. }
            | ImageId { errno, .. }
            | Grow { errno, .. }
            | ListSnapshots { errno, .. }
            | CreateSnapshot { errno, .. }
            | RemoveSnapshot { errno, .. }
            | ProtectSnapshot { errno, .. }
            | UnprotectSnapshot { errno, .. }
            | SnapshotProtection { errno, .. }
            | TrashMove { errno, .. }
            | MetadataGet { errno, .. }
            | MetadataSet { errno, .. }
            | Rename { errno, .. }
            | TrashList { errno, .. }
            | TrashRemove { errno, .. }
            | TrashRestore { errno, .. }
            | RemoveImage { errno, .. } => Some(*errno),
            InvalidName(_) | ShrinkRefused { .. } | Blocking(_) => None,
        }
    }

    /// True when Ceph said the pool, image, snapshot or trash entry does not exist.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(Errno(libc::ENOENT))
    }
}

fn cstring(s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::InvalidName(s.to_owned()))
}

/// Copies a C string owned by librbd; a NULL becomes "".
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for the call.
unsafe fn owned_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// How to reach the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// ceph.conf to read (monitor addresses, keyring path, ...).
    pub conf: PathBuf,
    /// Client id without the `client.` prefix, e.g. `admin`.
    pub client_id: String,
    /// Keyring to use instead of the one `conf` names.
    pub keyring: Option<PathBuf>,
    /// How long `connect` may wait for the monitors (`client_mount_timeout`).
    pub mount_timeout: Duration,
    /// Bound on each monitor request (`rados_mon_op_timeout`).
    pub mon_op_timeout: Duration,
    /// Bound on each OSD request (`rados_osd_op_timeout`); a down OSD then gives
    /// `ETIMEDOUT` instead of a hang.
    pub osd_op_timeout: Duration,
}

impl ClusterOptions {
    /// Default timeouts: 10 s to connect and per monitor request, 30 s per OSD request.
    pub fn new(conf: impl Into<PathBuf>, client_id: impl Into<String>) -> Self {
        Self {
            conf: conf.into(),
            client_id: client_id.into(),
            keyring: None,
            mount_timeout: Duration::from_secs(10),
            mon_op_timeout: Duration::from_secs(10),
            osd_op_timeout: Duration::from_secs(30),
        }
    }
}

/// The raw cluster handle; shut down when the last owner drops it.
#[derive(Debug)]
struct ClusterHandle(ffi::rados_t);

// SAFETY: librados documents rados_t as usable from any thread and concurrently; it is a
// pointer to a heap object with internal locking, not tied to the creating thread.
unsafe impl Send for ClusterHandle {}
// SAFETY: see Send; all uses through &ClusterHandle are librados calls that lock internally.
unsafe impl Sync for ClusterHandle {}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and every IoCtx/Image made from it holds
        // an Arc to this value, so none is alive any more; shutdown also frees a handle that
        // never connected.
        unsafe { ffi::rados_shutdown(self.0) }
    }
}

/// A connected cluster handle. Clones share one connection.
#[derive(Debug, Clone)]
pub struct Cluster {
    handle: Arc<ClusterHandle>,
    client: String,
}

impl Cluster {
    /// Creates the handle, reads the configuration, applies the timeouts and connects.
    /// Blocks for up to `options.mount_timeout`.
    pub fn connect(options: &ClusterOptions) -> Result<Cluster, RbdError> {
        let client = format!("client.{}", options.client_id);
        let c_client = cstring(&client)?;
        let mut raw: ffi::rados_t = ptr::null_mut();
        // SAFETY: out-pointer to a local; the name strings are valid NUL-terminated C strings
        // for the duration of the call (librados copies them).
        let rc = unsafe { ffi::rados_create2(&mut raw, c"ceph".as_ptr(), c_client.as_ptr(), 0) };
        Errno::check(rc).map_err(|errno| RbdError::CreateHandle {
            client: client.clone(),
            errno,
        })?;
        // From here the handle is owned, so an early return shuts it down.
        let cluster = Cluster {
            handle: Arc::new(ClusterHandle(raw)),
            client,
        };

        let path = cstring(&options.conf.to_string_lossy())?;
        // SAFETY: valid handle, valid C string.
        let rc = unsafe { ffi::rados_conf_read_file(cluster.raw(), path.as_ptr()) };
        Errno::check(rc).map_err(|errno| RbdError::ReadConf {
            path: options.conf.clone(),
            errno,
        })?;

        if let Some(keyring) = &options.keyring {
            cluster.set_conf("keyring", &keyring.to_string_lossy())?;
        }
        cluster.set_conf("client_mount_timeout", &secs(options.mount_timeout))?;
        cluster.set_conf("rados_mon_op_timeout", &secs(options.mon_op_timeout))?;
        cluster.set_conf("rados_osd_op_timeout", &secs(options.osd_op_timeout))?;

        // SAFETY: valid, configured, not yet connected handle.
        let rc = unsafe { ffi::rados_connect(cluster.raw()) };
        Errno::check(rc).map_err(|errno| RbdError::Connect {
            client: cluster.client.clone(),
            errno,
        })?;
        Ok(cluster)
    }

    /// Runs `f` with a clone of this cluster on tokio's blocking pool, so librbd's blocking
    /// calls never stall the async runtime.
    pub async fn run<T, F>(&self, f: F) -> Result<T, RbdError>
    where
        T: Send + 'static,
        F: FnOnce(&Cluster) -> Result<T, RbdError> + Send + 'static,
    {
        let cluster = self.clone();
        tokio::task::spawn_blocking(move || f(&cluster))
            .await
            .map_err(RbdError::Blocking)?
    }

    /// The client name this handle authenticated as, e.g. `client.admin`.
    pub fn client(&self) -> &str {
        &self.client
    }

    /// Opens a pool.
    pub fn ioctx(&self, pool: &str) -> Result<IoCtx, RbdError> {
        let c_pool = cstring(pool)?;
        let mut io: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle, valid C string, out-pointer to a local.
        let rc = unsafe { ffi::rados_ioctx_create(self.raw(), c_pool.as_ptr(), &mut io) };
        Errno::check(rc).map_err(|errno| RbdError::OpenPool {
            pool: pool.to_owned(),
            errno,
        })?;
        Ok(IoCtx {
            raw: io,
            pool: pool.to_owned(),
            cluster: Arc::clone(&self.handle),
        })
    }

    fn raw(&self) -> ffi::rados_t {
        self.handle.0
    }

    fn set_conf(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let (c_key, c_value) = (cstring(key)?, cstring(value)?);
        // SAFETY: valid handle (not yet connected), valid C strings copied by librados.
        let rc = unsafe { ffi::rados_conf_set(self.raw(), c_key.as_ptr(), c_value.as_ptr()) };
        Errno::check(rc).map_err(|errno| RbdError::SetConf {
            key: key.to_owned(),
            errno,
        })?;
        Ok(())
    }
}

fn secs(d: Duration) -> String {
    // Ceph parses these options as floating-point seconds.
    format!("{}", d.as_secs_f64())
}

/// Size facts of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageStat {
    /// Virtual size in bytes.
    pub size: u64,
    /// Object size in bytes.
    pub object_size: u64,
    /// Number of objects the virtual size spans (not how many exist: images are thin).
    pub objects: u64,
}

/// What a grow did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grown {
    /// Size before, in bytes.
    pub from: u64,
    /// Size after, in bytes (equal to `from` when nothing was to be done).
    pub to: u64,
}

/// One snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: u64,
    pub name: String,
    /// Image size when the snapshot was taken, in bytes.
    pub size: u64,
}

/// Why an image is in the trash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrashSource {
    User,
    Mirroring,
    Migration,
    Removing,
    UserParent,
    Other(i32),
}

impl TrashSource {
    fn from_raw(v: c_int) -> Self {
        match v {
            0 => Self::User,
            1 => Self::Mirroring,
            2 => Self::Migration,
            3 => Self::Removing,
            4 => Self::UserParent,
            other => Self::Other(other),
        }
    }
}

/// One image in a pool's trash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashEntry {
    /// The image id, which `trash_restore`/`trash_remove` take.
    pub id: String,
    /// The name the image had.
    pub name: String,
    pub source: TrashSource,
    /// When it was moved to the trash, seconds since the epoch.
    pub deleted_at: i64,
    /// Before this (seconds since the epoch) `trash_remove` without force refuses.
    pub deferred_until: i64,
}

/// One pool (`rados_ioctx_t`).
#[derive(Debug)]
pub struct IoCtx {
    raw: ffi::rados_ioctx_t,
    pool: String,
    cluster: Arc<ClusterHandle>,
}

// SAFETY: an io context may be used from several threads as long as its snapshot, locator
// and namespace settings are not changed concurrently (librados.h); this type never changes
// them after creation.
unsafe impl Send for IoCtx {}
// SAFETY: see Send.
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create, destroyed exactly once, and the cluster it
        // belongs to is kept alive by `self.cluster` until after this call. Open images hold
        // their own copy of the context.
        unsafe { ffi::rados_ioctx_destroy(self.raw) }
    }
}

impl IoCtx {
    /// The pool name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Opens an image for reading and writing.
    pub fn open(&self, image: &str) -> Result<Image, RbdError> {
        self.open_with(image, ffi::rbd_open)
    }

    /// Opens an image without taking a watch (no write, no exclusive-lock traffic).
    pub fn open_read_only(&self, image: &str) -> Result<Image, RbdError> {
        self.open_with(image, ffi::rbd_open_read_only)
    }

    /// Opens an image by id; works for images in the trash too (to remove their snapshots).
    pub fn open_by_id(&self, id: &str) -> Result<Image, RbdError> {
        self.open_with(id, ffi::rbd_open_by_id)
    }

    fn open_with(
        &self,
        key: &str,
        open: unsafe extern "C" fn(
            ffi::rados_ioctx_t,
            *const c_char,
            *mut ffi::rbd_image_t,
            *const c_char,
        ) -> c_int,
    ) -> Result<Image, RbdError> {
        let c_key = cstring(key)?;
        let mut img: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: valid ioctx, valid C string, out-pointer to a local, NULL snapshot = head.
        let rc = unsafe { open(self.raw, c_key.as_ptr(), &mut img, ptr::null()) };
        Errno::check(rc).map_err(|errno| RbdError::OpenImage {
            pool: self.pool.clone(),
            image: key.to_owned(),
            errno,
        })?;
        Ok(Image {
            raw: img,
            pool: self.pool.clone(),
            name: key.to_owned(),
            _cluster: Arc::clone(&self.cluster),
        })
    }

    /// True if the image exists (opened read-only to find out).
    pub fn exists(&self, image: &str) -> Result<bool, RbdError> {
        match self.open_read_only(image) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Names of the images in the pool (not those in the trash).
    pub fn list(&self) -> Result<Vec<String>, RbdError> {
        let err = |errno| RbdError::ListImages {
            pool: self.pool.clone(),
            errno,
        };
        let mut cap = 16usize;
        loop {
            let mut specs: Vec<ffi::rbd_image_spec_t> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: `specs` has room for `n` entries; librbd fills at most `n` and writes
            // the count (or on ERANGE the needed count) back to `n`.
            let rc = unsafe { ffi::rbd_list2(self.raw, specs.as_mut_ptr(), &mut n) };
            match Errno::check(rc) {
                Err(Errno(libc::ERANGE)) if n > cap => {
                    cap = n;
                    continue;
                }
                Err(errno) => return Err(err(errno)),
                Ok(_) => {}
            }
            // SAFETY: librbd initialised the first `n` entries (n <= cap).
            unsafe { specs.set_len(n) };
            // SAFETY: each name is a NUL-terminated string allocated by librbd.
            let names = specs.iter().map(|s| unsafe { owned_str(s.name) }).collect();
            // SAFETY: frees exactly the `n` entries librbd allocated; `specs` is not read after.
            unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }

    /// Creates a thin image of `size` bytes (format 2, with layering so it can be a
    /// clone parent; other features as the cluster's `rbd_default_features` say).
    pub fn create(&self, image: &str, size: u64) -> Result<(), RbdError> {
        let c_name = cstring(image)?;
        let opts = ImageOptions::layered().map_err(|errno| self.create_err(image, errno))?;
        // SAFETY: valid ioctx, C string and options handle.
        let rc = unsafe { ffi::rbd_create4(self.raw, c_name.as_ptr(), size, opts.0) };
        Errno::check(rc).map_err(|errno| self.create_err(image, errno))?;
        Ok(())
    }

    fn create_err(&self, image: &str, errno: Errno) -> RbdError {
        RbdError::CreateImage {
            pool: self.pool.clone(),
            image: image.to_owned(),
            errno,
        }
    }

    /// Clones `parent_image@parent_snap` (in `parent`'s pool) to `image` in this pool.
    /// The snapshot is protected first if it is not: Ceph 16 makes format-1 ("v1") clones
    /// unless the cluster requires mimic clients, and those need a protected parent.
    pub fn clone_from(
        &self,
        parent: &IoCtx,
        parent_image: &str,
        parent_snap: &str,
        image: &str,
    ) -> Result<(), RbdError> {
        {
            let p = parent.open(parent_image)?;
            if !p.snapshot_is_protected(parent_snap)? {
                p.protect_snapshot(parent_snap)?;
            }
        }
        let err = |errno| RbdError::CloneImage {
            parent: format!("{}/{parent_image}@{parent_snap}", parent.pool),
            pool: self.pool.clone(),
            image: image.to_owned(),
            errno,
        };
        let (c_pimg, c_psnap, c_name) = (
            cstring(parent_image)?,
            cstring(parent_snap)?,
            cstring(image)?,
        );
        let opts = ImageOptions::layered().map_err(err)?;
        // SAFETY: both ioctxs are valid for the call, strings are valid C strings, options
        // handle is valid.
        let rc = unsafe {
            ffi::rbd_clone3(
                parent.raw,
                c_pimg.as_ptr(),
                c_psnap.as_ptr(),
                self.raw,
                c_name.as_ptr(),
                opts.0,
            )
        };
        Errno::check(rc).map_err(err)?;
        Ok(())
    }

    /// Size facts of an image.
    pub fn stat(&self, image: &str) -> Result<ImageStat, RbdError> {
        self.open_read_only(image)?.stat()
    }

    /// Grows an image to `size` bytes; see [`Image::grow_to`].
    pub fn grow(&self, image: &str, size: u64) -> Result<Grown, RbdError> {
        self.open(image)?.grow_to(size)
    }

    /// Moves an image to the trash (no deferment) and returns its id, which
    /// [`IoCtx::trash_restore`] and [`IoCtx::trash_remove`] take.
    pub fn trash_move(&self, image: &str) -> Result<String, RbdError> {
        self.trash_move_deferred(image, Duration::ZERO)
    }

    /// Moves an image to the trash, deferred for `defer`: until then `rbd trash purge` (an
    /// operator's, or a purge schedule of the Ceph manager) leaves it alone, and only a forced
    /// remove deletes it. Returns its id.
    pub fn trash_move_deferred(&self, image: &str, defer: Duration) -> Result<String, RbdError> {
        let id = self.open_read_only(image)?.id()?;
        let c_name = cstring(image)?;
        // SAFETY: valid ioctx and C string; the delay is in seconds.
        let rc = unsafe { ffi::rbd_trash_move(self.raw, c_name.as_ptr(), defer.as_secs()) };
        Errno::check(rc).map_err(|errno| RbdError::TrashMove {
            pool: self.pool.clone(),
            image: image.to_owned(),
            errno,
        })?;
        Ok(id)
    }

    /// The images in this pool's trash.
    pub fn trash_list(&self) -> Result<Vec<TrashEntry>, RbdError> {
        let err = |errno| RbdError::TrashList {
            pool: self.pool.clone(),
            errno,
        };
        let mut cap = 16usize;
        loop {
            let mut raw: Vec<ffi::rbd_trash_image_info_t> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: `raw` has room for `n` entries; librbd fills at most `n` and writes the
            // count (or on ERANGE the needed count) back to `n`.
            let rc = unsafe { ffi::rbd_trash_list(self.raw, raw.as_mut_ptr(), &mut n) };
            match Errno::check(rc) {
                Err(Errno(libc::ERANGE)) if n > cap => {
                    cap = n;
                    continue;
                }
                Err(errno) => return Err(err(errno)),
                Ok(_) => {}
            }
            // SAFETY: librbd initialised the first `n` entries (n <= cap).
            unsafe { raw.set_len(n) };
            let entries = raw
                .iter()
                .map(|e| TrashEntry {
                    // SAFETY: id and name are NUL-terminated strings allocated by librbd.
                    id: unsafe { owned_str(e.id) },
                    // SAFETY: as above.
                    name: unsafe { owned_str(e.name) },
                    source: TrashSource::from_raw(e.source),
                    deleted_at: e.deletion_time,
                    deferred_until: e.deferment_end_time,
                })
                .collect();
            // SAFETY: frees exactly the `n` entries librbd filled; `raw` is not read after.
            unsafe { ffi::rbd_trash_list_cleanup(raw.as_mut_ptr(), n) };
            return Ok(entries);
        }
    }

    /// Restores a trashed image under `image`.
    pub fn trash_restore(&self, id: &str, image: &str) -> Result<(), RbdError> {
        let (c_id, c_name) = (cstring(id)?, cstring(image)?);
        // SAFETY: valid ioctx and C strings.
        let rc = unsafe { ffi::rbd_trash_restore(self.raw, c_id.as_ptr(), c_name.as_ptr()) };
        Errno::check(rc).map_err(|errno| RbdError::TrashRestore {
            pool: self.pool.clone(),
            id: id.to_owned(),
            image: image.to_owned(),
            errno,
        })?;
        Ok(())
    }

    /// Deletes a trashed image for good. Fails with `ENOTEMPTY` while it has snapshots
    /// (remove them through [`IoCtx::open_by_id`] first); `force` overrides a deferment.
    pub fn trash_remove(&self, id: &str, force: bool) -> Result<(), RbdError> {
        let c_id = cstring(id)?;
        // SAFETY: valid ioctx and C string.
        let rc = unsafe { ffi::rbd_trash_remove(self.raw, c_id.as_ptr(), force) };
        Errno::check(rc).map_err(|errno| RbdError::TrashRemove {
            pool: self.pool.clone(),
            id: id.to_owned(),
            errno,
        })?;
        Ok(())
    }

    /// Renames an image; fails with `EEXIST` when `to` exists.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), RbdError> {
        let (c_from, c_to) = (cstring(from)?, cstring(to)?);
        // SAFETY: valid ioctx and C strings.
        let rc = unsafe { ffi::rbd_rename(self.raw, c_from.as_ptr(), c_to.as_ptr()) };
        Errno::check(rc).map_err(|errno| RbdError::Rename {
            pool: self.pool.clone(),
            from: from.to_owned(),
            to: to.to_owned(),
            errno,
        })?;
        Ok(())
    }

    /// Deletes an image for good (not through the trash). Fails with `EBUSY` while a QEMU
    /// has it open and with `ENOTEMPTY` while it has snapshots.
    pub fn remove(&self, image: &str) -> Result<(), RbdError> {
        let c_name = cstring(image)?;
        // SAFETY: valid ioctx and C string.
        let rc = unsafe { ffi::rbd_remove(self.raw, c_name.as_ptr()) };
        Errno::check(rc).map_err(|errno| RbdError::RemoveImage {
            pool: self.pool.clone(),
            image: image.to_owned(),
            errno,
        })?;
        Ok(())
    }
}

/// Options for create/clone; destroyed on drop.
struct ImageOptions(ffi::rbd_image_options_t);

impl ImageOptions {
    /// Format 2 with the layering feature added to the cluster's defaults.
    fn layered() -> Result<Self, Errno> {
        let mut raw: ffi::rbd_image_options_t = ptr::null_mut();
        // SAFETY: out-pointer to a local; librbd allocates the options object.
        unsafe { ffi::rbd_image_options_create(&mut raw) };
        let opts = ImageOptions(raw);
        for (name, value) in [
            (ffi::RBD_IMAGE_OPTION_FORMAT, 2),
            (
                ffi::RBD_IMAGE_OPTION_FEATURES_SET,
                ffi::RBD_FEATURE_LAYERING,
            ),
        ] {
            // SAFETY: valid options handle; both are uint64 options.
            Errno::check(unsafe { ffi::rbd_image_options_set_uint64(opts.0, name, value) })?;
        }
        Ok(opts)
    }
}

impl Drop for ImageOptions {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { ffi::rbd_image_options_destroy(self.0) }
    }
}

/// An open image; closed on drop.
#[derive(Debug)]
pub struct Image {
    raw: ffi::rbd_image_t,
    pool: String,
    /// The name or, when opened by id, the id.
    name: String,
    _cluster: Arc<ClusterHandle>,
}

// SAFETY: an rbd_image_t points to a heap ImageCtx with its own locks and is not tied to
// the thread that opened it, so moving it to another thread is fine. It is deliberately
// not Sync: this module never uses one handle from two threads at once.
unsafe impl Send for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, closed exactly once; the cluster is kept alive by
        // `_cluster` until after this call. A close error leaves nothing to clean up.
        unsafe { ffi::rbd_close(self.raw) };
    }
}

impl Image {
    /// The pool name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The name it was opened by (the id for [`IoCtx::open_by_id`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ids(&self) -> (String, String) {
        (self.pool.clone(), self.name.clone())
    }

    /// Current virtual size in bytes.
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: open image, out-pointer to a local.
        let rc = unsafe { ffi::rbd_get_size(self.raw, &mut size) };
        Errno::check(rc).map_err(|errno| {
            let (pool, image) = self.ids();
            RbdError::StatImage { pool, image, errno }
        })?;
        Ok(size)
    }

    /// Size facts.
    pub fn stat(&self) -> Result<ImageStat, RbdError> {
        // SAFETY: rbd_image_info_t is plain integers and char arrays: all-zero is valid.
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: open image; `info` is a properly sized out-buffer.
        let rc = unsafe { ffi::rbd_stat(self.raw, &mut info, size_of::<ffi::rbd_image_info_t>()) };
        Errno::check(rc).map_err(|errno| {
            let (pool, image) = self.ids();
            RbdError::StatImage { pool, image, errno }
        })?;
        Ok(ImageStat {
            size: info.size,
            object_size: info.obj_size,
            objects: info.num_objs,
        })
    }

    /// The value of image metadata `key`, `None` when it is not set.
    pub fn metadata(&self, key: &str) -> Result<Option<String>, RbdError> {
        let c_key = cstring(key)?;
        let mut cap = 512usize;
        loop {
            let mut buf = vec![0 as c_char; cap];
            let mut len = cap;
            // SAFETY: open image, C string key; `buf` has room for `len` bytes and librbd
            // writes at most that many, or the needed length to `len` on ERANGE.
            let rc = unsafe {
                ffi::rbd_metadata_get(self.raw, c_key.as_ptr(), buf.as_mut_ptr(), &mut len)
            };
            match Errno::check(rc) {
                Err(Errno(libc::ENOENT)) => return Ok(None),
                Err(Errno(libc::ERANGE)) if len > cap => cap = len,
                Err(errno) => {
                    let (pool, image) = self.ids();
                    return Err(RbdError::MetadataGet {
                        pool,
                        image,
                        key: key.to_owned(),
                        errno,
                    });
                }
                // SAFETY: on success librbd wrote a NUL-terminated value into `buf`.
                Ok(_) => return Ok(Some(unsafe { owned_str(buf.as_ptr()) })),
            }
        }
    }

    /// Sets image metadata `key` to `value`.
    pub fn set_metadata(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let (c_key, c_value) = (cstring(key)?, cstring(value)?);
        // SAFETY: open image and C strings.
        let rc = unsafe { ffi::rbd_metadata_set(self.raw, c_key.as_ptr(), c_value.as_ptr()) };
        Errno::check(rc).map_err(|errno| {
            let (pool, image) = self.ids();
            RbdError::MetadataSet {
                pool,
                image,
                key: key.to_owned(),
                errno,
            }
        })?;
        Ok(())
    }

    /// The image id (stable across renames and trash moves).
    pub fn id(&self) -> Result<String, RbdError> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: open image; buffer and its length match.
        let rc = unsafe { ffi::rbd_get_id(self.raw, buf.as_mut_ptr(), buf.len()) };
        Errno::check(rc).map_err(|errno| {
            let (pool, image) = self.ids();
            RbdError::ImageId { pool, image, errno }
        })?;
        // SAFETY: on success librbd wrote a NUL-terminated id into `buf`.
        Ok(unsafe { owned_str(buf.as_ptr()) })
    }

    /// Grows the image to `size` bytes. Never shrinks: a smaller `size` is refused with
    /// [`RbdError::ShrinkRefused`] before librbd is called (and librbd is told not to
    /// shrink anyway); an equal size does nothing.
    ///
    /// Do not use this on an image a running QEMU has open: QEMU would not see the new
    /// size. Use QMP `block_resize` there (after checking [`Image::size`]).
    pub fn grow_to(&self, size: u64) -> Result<Grown, RbdError> {
        let current = self.size()?;
        if size < current {
            let (pool, image) = self.ids();
            return Err(RbdError::ShrinkRefused {
                pool,
                image,
                current,
                requested: size,
            });
        }
        if size == current {
            return Ok(Grown {
                from: current,
                to: current,
            });
        }
        // SAFETY: open image; no progress callback, so a NULL callback argument.
        let rc = unsafe { ffi::rbd_resize2(self.raw, size, false, None, ptr::null_mut()) };
        Errno::check(rc).map_err(|errno| {
            let (pool, image) = self.ids();
            RbdError::Grow {
                pool,
                image,
                requested: size,
                errno,
            }
        })?;
        Ok(Grown {
            from: current,
            to: size,
        })
    }

    /// Snapshots of the image, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>, RbdError> {
        let err = |errno| {
            let (pool, image) = self.ids();
            RbdError::ListSnapshots { pool, image, errno }
        };
        let mut cap: c_int = 16;
        loop {
            let len = usize::try_from(cap).unwrap_or(0);
            let mut raw: Vec<ffi::rbd_snap_info_t> = Vec::with_capacity(len);
            let mut max = cap;
            // SAFETY: `raw` has room for `max` entries. librbd zeroes them, fills one per
            // snapshot plus a NULL-named terminator, or returns ERANGE with the needed count.
            let rc = unsafe { ffi::rbd_snap_list(self.raw, raw.as_mut_ptr(), &mut max) };
            let n = match Errno::check(rc) {
                Err(Errno(libc::ERANGE)) if max > cap => {
                    cap = max;
                    continue;
                }
                Err(errno) => return Err(err(errno)),
                Ok(n) => usize::try_from(n).unwrap_or(0),
            };
            // SAFETY: librbd zeroed all `len` entries and filled the first `n` (n < len).
            unsafe { raw.set_len(len) };
            let snaps = raw[..n]
                .iter()
                .map(|s| Snapshot {
                    id: s.id,
                    // SAFETY: names of filled entries are strings allocated by librbd.
                    name: unsafe { owned_str(s.name) },
                    size: s.size,
                })
                .collect();
            // SAFETY: frees the names up to the NULL terminator librbd wrote.
            unsafe { ffi::rbd_snap_list_end(raw.as_mut_ptr()) };
            return Ok(snaps);
        }
    }

    fn snap_op(
        &self,
        snap: &str,
        op: unsafe extern "C" fn(ffi::rbd_image_t, *const c_char) -> c_int,
        variant: fn(String, String, String, Errno) -> RbdError,
    ) -> Result<(), RbdError> {
        let c_snap = cstring(snap)?;
        // SAFETY: open image and valid C string; `op` is one of librbd's
        // (image, snapshot name) functions.
        let rc = unsafe { op(self.raw, c_snap.as_ptr()) };
        Errno::check(rc).map_err(|errno| {
            let (pool, image) = self.ids();
            variant(pool, image, snap.to_owned(), errno)
        })?;
        Ok(())
    }

    /// Takes a snapshot.
    pub fn create_snapshot(&self, snap: &str) -> Result<(), RbdError> {
        self.snap_op(snap, ffi::rbd_snap_create, |pool, image, snap, errno| {
            RbdError::CreateSnapshot {
                pool,
                image,
                snap,
                errno,
            }
        })
    }

    /// Removes a snapshot (`EBUSY` while it is protected).
    pub fn remove_snapshot(&self, snap: &str) -> Result<(), RbdError> {
        self.snap_op(snap, ffi::rbd_snap_remove, |pool, image, snap, errno| {
            RbdError::RemoveSnapshot {
                pool,
                image,
                snap,
                errno,
            }
        })
    }

    /// Protects a snapshot so it can be a clone parent.
    pub fn protect_snapshot(&self, snap: &str) -> Result<(), RbdError> {
        self.snap_op(snap, ffi::rbd_snap_protect, |pool, image, snap, errno| {
            RbdError::ProtectSnapshot {
                pool,
                image,
                snap,
                errno,
            }
        })
    }

    /// Unprotects a snapshot (`EBUSY` while clones of it exist).
    pub fn unprotect_snapshot(&self, snap: &str) -> Result<(), RbdError> {
        self.snap_op(snap, ffi::rbd_snap_unprotect, |pool, image, snap, errno| {
            RbdError::UnprotectSnapshot {
                pool,
                image,
                snap,
                errno,
            }
        })
    }

    /// Whether a snapshot is protected.
    pub fn snapshot_is_protected(&self, snap: &str) -> Result<bool, RbdError> {
        let c_snap = cstring(snap)?;
        let mut protected: c_int = 0;
        // SAFETY: open image, valid C string, out-pointer to a local.
        let rc = unsafe { ffi::rbd_snap_is_protected(self.raw, c_snap.as_ptr(), &mut protected) };
        Errno::check(rc).map_err(|errno| {
            let (pool, image) = self.ids();
            RbdError::SnapshotProtection {
                pool,
                image,
                snap: snap.to_owned(),
                errno,
            }
        })?;
        Ok(protected != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_the_code() {
        assert_eq!(
            Errno(libc::ENOENT).to_string(),
            "ENOENT (No such file or directory)"
        );
        assert_eq!(Errno(libc::ETIMEDOUT).name(), Some("ETIMEDOUT"));
        assert!(Errno(4095).to_string().starts_with("errno 4095"));
    }

    #[test]
    fn paths_in_messages() {
        let e = RbdError::ReadConf {
            path: "/x/ceph.conf".into(),
            errno: Errno(2),
        };
        assert_eq!(e.to_string(), "cannot read Ceph configuration /x/ceph.conf");
    }
}
