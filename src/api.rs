//! The daemon's local API: one JSON request and one JSON response per connection on a Unix
//! socket. The caller's identity comes from the kernel (SO_PEERCRED), never from the request.

use std::ffi::{CStr, CString};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The API socket's name inside the runtime directory.
pub const SOCKET: &str = "api.sock";

/// The longest request accepted; requests are tiny, so anything bigger is garbage.
const MAX_REQUEST: u64 = 64 * 1024;

/// The longest response a client reads (a status of thousands of VMs fits easily).
const MAX_RESPONSE: u64 = 256 * 1024 * 1024;

/// Connections served at once; more are refused at once (not queued), so idle or slow
/// clients cannot take the API away from others.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request may wait for its answer (a reboot waits for the stop and the start).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(900);

/// How long a client may take to take the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every VM's state.
    Status,
    /// Reboot a VM at once (planned, applies pending changes).
    Reboot {
        /// The VM.
        vm: crate::model::VmName,
    },
    /// Ask for a maintenance reboot of a VM in its next slot.
    MaintenanceRequest {
        /// The VM.
        vm: crate::model::VmName,
        /// Why, for the announcement.
        reason: String,
    },
    /// List announced maintenances.
    MaintenanceList,
    /// Run what is due now (the command maintenance and deletion timers run). `now` moves
    /// time for tests and dry runs; only root may set it.
    RunDue {
        /// The instant to act as of.
        now: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Schedule a VM's deletion (`vmkeeper delete`).
    Delete {
        /// The VM.
        vm: crate::model::VmName,
        /// The local date T.
        date: chrono::NaiveDate,
        /// The instant to judge the request as of; only root may set it.
        now: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Cancel a deletion requested with `vmkeeper delete`.
    CancelDeletion {
        /// The VM.
        vm: crate::model::VmName,
        /// The instant to judge the request as of; only root may set it.
        now: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Read the configuration again and apply it (as SIGHUP does); answered once what it
    /// started is done.
    Reload,
}

impl Request {
    /// Whether the request changes anything (and so needs an authorized group).
    pub fn is_mutating(&self) -> bool {
        match self {
            Request::Status | Request::MaintenanceList => false,
            Request::Reboot { .. }
            | Request::MaintenanceRequest { .. }
            | Request::RunDue { .. }
            | Request::Delete { .. }
            | Request::CancelDeletion { .. }
            | Request::Reload => true,
        }
    }
}

/// A response: the command's JSON result or an error message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Response {
    /// Success.
    Ok(serde_json::Value),
    /// Refused or failed, with the reason.
    Error(String),
}

/// Who is calling, as the kernel says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// User name, when the uid has one.
    pub user: Option<String>,
    /// Its groups, primary and supplementary; what it may act on is decided per request
    /// (`access::scope`).
    pub gids: Vec<u32>,
}

impl Caller {
    /// The caller's name for messages and records: the user name, or the uid.
    pub fn name(&self) -> String {
        self.user.clone().unwrap_or_else(|| self.uid.to_string())
    }

    /// The caller as the actor of something vmkeeper records.
    pub fn actor(&self) -> crate::state::Actor {
        crate::state::Actor::User {
            name: self.name(),
            uid: self.uid,
        }
    }
}

/// Why the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the socket failed.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the daemon failed.
    #[error("cannot reach the vmkeeper daemon at {} (is it running?)", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("talking to the vmkeeper daemon failed")]
    Io(#[source] std::io::Error),
    /// The peer sent something that is not a request or response.
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
    /// The daemon did not answer in time.
    #[error("the vmkeeper daemon did not answer within {0:?}")]
    Timeout(Duration),
}

/// Binds the API socket, replacing a stale one; everyone may connect, authorization is
/// per request.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let bind = || -> std::io::Result<UnixListener> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let l = UnixListener::bind(path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(l)
    };
    bind().map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Serves the API on `listener`: each connection in a task of its own, at most
/// [`MAX_CONNECTIONS`] at once, each bounded in time; `answer` turns a request into its
/// response. Never returns; `accept` errors (such as running out of file descriptors) are
/// waited out with a growing pause instead of spinning.
pub fn serve<F, Fut>(listener: UnixListener, answer: F)
where
    F: Fn(Request, Caller) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let answer = Arc::new(answer);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(10);
        loop {
            let mut stream = match listener.accept().await {
                Ok((s, _)) => {
                    pause = Duration::from_millis(10);
                    s
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Refused, not queued: a best-effort answer that never blocks.
                let _ =
                    stream.try_write(b"{\"error\":\"the daemon is busy: too many connections\"}\n");
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let resp = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await
                {
                    Ok(Ok((req, caller))) => {
                        match tokio::time::timeout(ANSWER_TIMEOUT, answer(req, caller)).await {
                            Ok(r) => r,
                            Err(_) => Response::Error("no answer in time".into()),
                        }
                    }
                    Ok(Err(e)) => Response::Error(format!("bad request: {e}")),
                    Err(_) => Response::Error(format!("no request within {READ_TIMEOUT:?}")),
                };
                let _ =
                    tokio::time::timeout(WRITE_TIMEOUT, write_response(&mut stream, &resp)).await;
            });
        }
    });
}

/// Reads one request from an accepted connection, with the caller's identity.
pub async fn read_request(stream: &mut UnixStream) -> Result<(Request, Caller), ApiError> {
    let cred = stream.peer_cred().map_err(ApiError::Io)?;
    let uid = cred.uid();
    // The user and group databases may be remote (NSS): looked up off the runtime's threads.
    let caller = tokio::task::spawn_blocking(move || identify(uid))
        .await
        .map_err(|e| ApiError::Io(std::io::Error::other(e)))?;
    let mut line = String::new();
    let mut reader = BufReader::new((&mut *stream).take(MAX_REQUEST));
    reader.read_line(&mut line).await.map_err(ApiError::Io)?;
    let req = serde_json::from_str(&line).map_err(ApiError::Malformed)?;
    Ok((req, caller))
}

/// Writes the response to an accepted connection.
pub async fn write_response(stream: &mut UnixStream, resp: &Response) -> Result<(), ApiError> {
    let mut json = serde_json::to_vec(resp).map_err(ApiError::Malformed)?;
    json.push(b'\n');
    stream.write_all(&json).await.map_err(ApiError::Io)?;
    stream.shutdown().await.map_err(ApiError::Io)
}

/// Sends one request to the daemon and waits up to `timeout` for its response.
pub async fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ApiError> {
    let exchange = async {
        let mut s = UnixStream::connect(path)
            .await
            .map_err(|source| ApiError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let mut json = serde_json::to_vec(req).map_err(ApiError::Malformed)?;
        json.push(b'\n');
        s.write_all(&json).await.map_err(ApiError::Io)?;
        let mut line = String::new();
        BufReader::new(s.take(MAX_RESPONSE))
            .read_line(&mut line)
            .await
            .map_err(ApiError::Io)?;
        serde_json::from_str(&line).map_err(ApiError::Malformed)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ApiError::Timeout(timeout))?
}

/// The caller's name and groups (primary and supplementary, as the group database says
/// now).
pub fn identify(uid: u32) -> Caller {
    let user = user_name(uid);
    let gids = user
        .as_deref()
        .map(|name| groups_of(name, uid))
        .unwrap_or_default();
    Caller { uid, user, gids }
}

/// The user's name and primary group from the password database.
fn passwd(uid: u32) -> Option<(String, u32)> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain old data that getpwuid_r fills in.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf's length is passed with it.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside buf, alive here.
    let name = unsafe { CStr::from_ptr(pw.pw_name) }
        .to_string_lossy()
        .into_owned();
    Some((name, pw.pw_gid))
}

fn user_name(uid: u32) -> Option<String> {
    passwd(uid).map(|(name, _)| name)
}

/// The id of group `name`, if the group database knows it.
pub fn group_id(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: group is plain old data that getgrnam_r fills in.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf's length is passed with it.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(gr.gr_gid)
}

fn groups_of(user: &str, uid: u32) -> Vec<u32> {
    let Ok(cuser) = CString::new(user) else {
        return vec![];
    };
    let primary = primary_gid(uid).unwrap_or(u32::MAX);
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: groups holds `count` entries; getgrouplist writes at most that many and
        // sets count to the number it needs.
        let rc =
            unsafe { libc::getgrouplist(cuser.as_ptr(), primary, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return groups;
        }
        if count <= n || count > 65_536 {
            return vec![];
        }
        n = count;
    }
}

fn primary_gid(uid: u32) -> Option<u32> {
    passwd(uid).map(|(_, gid)| gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_has_its_name_and_groups_and_unknown_users_neither() {
        let root = identify(0);
        assert_eq!(root.user.as_deref(), Some("root"));
        // root's primary group, from the group database.
        assert!(root.gids.contains(&0), "{root:?}");
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-here"), None);
        let ghost = identify(4_000_000);
        assert_eq!(ghost.user, None);
        assert!(ghost.gids.is_empty());
    }

    #[tokio::test]
    async fn a_request_round_trips_with_the_kernels_idea_of_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let listener = bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let (req, caller) = read_request(&mut s).await.unwrap();
            write_response(
                &mut s,
                &Response::Ok(serde_json::json!({ "uid": caller.uid })),
            )
            .await
            .unwrap();
            req
        });
        let resp = call(&path, &Request::Status, Duration::from_secs(10))
            .await
            .unwrap();
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        assert_eq!(resp, Response::Ok(serde_json::json!({ "uid": me })));
        assert_eq!(server.await.unwrap(), Request::Status);
    }
}
