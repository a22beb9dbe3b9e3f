//! The daemon's local API: one JSON request and one JSON response per connection on a Unix
//! socket. The caller's identity comes from the kernel (SO_PEERCRED), never from the request.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::exec::peer::{self, PeerCred};

/// The API socket's name inside the runtime directory.
pub const SOCKET: &str = "api.sock";

/// The longest request accepted; requests are tiny, so anything bigger is garbage.
const MAX_REQUEST: u64 = 64 * 1024;

/// The longest response a client reads (a status of thousands of VMs fits easily).
const MAX_RESPONSE: u64 = 256 * 1024 * 1024;

/// Connections served at once (root's not counted); more are refused at once (not queued),
/// so idle or slow clients cannot take the API away from others.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections one user may have served at once, so that one user cannot fill
/// [`MAX_CONNECTIONS`] and lock everybody else out.
pub const MAX_PER_USER: usize = 8;

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
    /// Take an existing image under a declared VM's name as that VM's disk (writes its owner
    /// metadata): `vmkeeper adopt-disk`.
    AdoptDisk {
        /// The VM.
        vm: crate::model::VmName,
    },
    /// Confirm the deletion of VMs removed from the configuration, held because more were
    /// removed at once than `removal.maxAtOnce` allows: `vmkeeper confirm-removal`.
    ConfirmRemoval {
        /// The VMs.
        vms: Vec<crate::model::VmName>,
    },
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
            | Request::Reload
            | Request::AdoptDisk { .. }
            | Request::ConfirmRemoval { .. } => true,
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
    /// The kernel did not say who the peer is.
    #[error("cannot identify the caller")]
    Peer(#[source] peer::PeerError),
    /// Reading the request failed.
    #[error("cannot read the request")]
    Read(#[source] std::io::Error),
    /// The request has no end within the limit.
    #[error("the request is longer than {0} bytes")]
    TooLong(u64),
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

/// Serves the API on `listener`: each connection in a task of its own, bounded in time; at
/// most [`MAX_PER_USER`] at once per user and [`MAX_CONNECTIONS`] in all (root's have a pool
/// of their own, so root is never locked out); more are refused at once, not queued. `answer`
/// turns a request into its response. Never returns; `accept` errors (such as running out of
/// file descriptors) are waited out with a growing pause instead of spinning.
pub fn serve<F, Fut>(listener: UnixListener, answer: F)
where
    F: Fn(Request, Caller) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let answer = Arc::new(answer);
    let slots = Slots::default();
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
            let slot = match peer::peer_cred(&stream) {
                Ok(cred) => slots.take(cred.uid),
                Err(_) => None,
            };
            let Some(slot) = slot else {
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
                    Ok(Err(e)) => Response::Error(format!("bad request: {}", chain(&e))),
                    Err(_) => Response::Error(format!(
                        "bad request: no complete request (one JSON line) within {READ_TIMEOUT:?}"
                    )),
                };
                let _ =
                    tokio::time::timeout(WRITE_TIMEOUT, write_response(&mut stream, &resp)).await;
            });
        }
    });
}

/// Connections being served: per user, and in all (root's counted apart).
#[derive(Debug, Clone, Default)]
struct Slots(Arc<std::sync::Mutex<SlotCounts>>);

#[derive(Debug, Default)]
struct SlotCounts {
    per_user: std::collections::HashMap<u32, usize>,
    shared: usize,
}

/// A connection's place among [`Slots`], given back when dropped.
#[derive(Debug)]
struct Slot {
    slots: Slots,
    uid: u32,
}

impl Slots {
    fn take(&self, uid: u32) -> Option<Slot> {
        let mut c = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = c.per_user.get(&uid).copied().unwrap_or(0);
        if mine >= MAX_PER_USER || (uid != 0 && c.shared >= MAX_CONNECTIONS) {
            return None;
        }
        *c.per_user.entry(uid).or_default() += 1;
        if uid != 0 {
            c.shared += 1;
        }
        Some(Slot {
            slots: self.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self
            .slots
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = c.per_user.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.per_user.remove(&self.uid);
            }
        }
        if self.uid != 0 {
            c.shared -= 1;
        }
    }
}

/// An error with its causes, for a message that says what exactly was wrong.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Reads one request from an accepted connection, with the caller's identity.
pub async fn read_request(stream: &mut UnixStream) -> Result<(Request, Caller), ApiError> {
    let cred = peer::peer_cred(stream).map_err(ApiError::Peer)?;
    // The user database may be remote (NSS): looked up off the runtime's threads.
    let caller = tokio::task::spawn_blocking(move || identify(&cred))
        .await
        .map_err(|e| ApiError::Io(std::io::Error::other(e)))?;
    let mut line = Vec::new();
    let mut reader = BufReader::new((&mut *stream).take(MAX_REQUEST));
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(ApiError::Read)?;
    if !line.ends_with(b"\n") && line.len() as u64 >= MAX_REQUEST {
        return Err(ApiError::TooLong(MAX_REQUEST));
    }
    let req = serde_json::from_slice(&line).map_err(ApiError::Malformed)?;
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

/// The caller's name and groups: its primary and supplementary groups as the kernel
/// recorded them for the peer when it connected, not what the group database says now.
pub fn identify(cred: &PeerCred) -> Caller {
    let mut gids = vec![cred.gid];
    gids.extend(cred.groups.iter().copied().filter(|g| *g != cred.gid));
    Caller {
        uid: cred.uid,
        user: peer::user_name(cred.uid),
        gids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_groups_are_the_kernels() {
        let cred = |uid, gid, groups: &[u32]| PeerCred {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        };
        let root = identify(&cred(0, 0, &[]));
        assert_eq!(root.user.as_deref(), Some("root"));
        assert_eq!(root.gids, [0]);
        let other = identify(&cred(65534, 65534, &[7, 65534, 0]));
        assert_eq!(other.gids, [65534, 7, 0]);
        let ghost = identify(&cred(4_000_000, 4_000_000, &[]));
        assert_eq!(ghost.user, None);
        assert_eq!(peer::group_id("root"), Some(0));
        assert_eq!(peer::group_id("no-such-group-here"), None);
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
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(resp, Response::Ok(serde_json::json!({ "uid": me })));
        assert_eq!(server.await.unwrap(), Request::Status);
    }
}
