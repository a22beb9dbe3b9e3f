//! QMP client: one connection to one QEMU monitor socket.
//!
//! A background task reads the socket: replies go to the command that sent the matching
//! `id`, events go to a channel ([`QmpEvents`]), so events arrive while commands run.
//! Every command has a timeout. Why our own client rather than the `qapi` crate:
//! docs/development/qmp.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Why one command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot write to the monitor socket")]
    Write(#[source] std::io::Error),
    #[error("monitor connection closed before the reply")]
    Disconnected,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("QEMU replied {class}: {desc}")]
    Qemu { class: String, desc: String },
    #[error("unexpected reply")]
    Decode(#[source] serde_json::Error),
}

/// Everything that can fail here, one variant per operation.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no QMP greeting on {} within {timeout:?}", path.display())]
    GreetingTimeout { path: PathBuf, timeout: Duration },
    #[error("bad QMP greeting on {}", path.display())]
    Greeting {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP capabilities negotiation failed")]
    Negotiate(#[source] CommandError),
    #[error("query-status failed")]
    QueryStatus(#[source] CommandError),
    #[error("query-block failed")]
    QueryBlock(#[source] CommandError),
    #[error("block_resize of node {node_name} to {size} bytes failed")]
    BlockResize {
        node_name: String,
        size: u64,
        #[source]
        source: CommandError,
    },
    #[error("system_powerdown failed")]
    SystemPowerdown(#[source] CommandError),
    #[error("quit failed")]
    Quit(#[source] CommandError),
    #[error("{command} failed")]
    Execute {
        command: String,
        #[source]
        source: CommandError,
    },
}

/// Timeouts of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QmpOptions {
    /// How long to wait for the greeting after connecting.
    pub greeting_timeout: Duration,
    /// How long any command may take. `block_resize` on RBD runs synchronously inside QEMU
    /// and waits for Ceph, so this also bounds a grow against a slow cluster.
    pub command_timeout: Duration,
}

impl Default for QmpOptions {
    fn default() -> Self {
        Self {
            greeting_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
        }
    }
}

/// QEMU's run state (`query-status`), as QAPI `RunState` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Debug,
    InMigrate,
    InternalError,
    IoError,
    Paused,
    PostMigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// A state this QEMU knows and this client does not.
    Other(String),
}

impl RunState {
    fn from_qapi(s: &str) -> Self {
        match s {
            "debug" => Self::Debug,
            "inmigrate" => Self::InMigrate,
            "internal-error" => Self::InternalError,
            "io-error" => Self::IoError,
            "paused" => Self::Paused,
            "postmigrate" => Self::PostMigrate,
            "prelaunch" => Self::Prelaunch,
            "finish-migrate" => Self::FinishMigrate,
            "restore-vm" => Self::RestoreVm,
            "running" => Self::Running,
            "save-vm" => Self::SaveVm,
            "shutdown" => Self::Shutdown,
            "suspended" => Self::Suspended,
            "watchdog" => Self::Watchdog,
            "guest-panicked" => Self::GuestPanicked,
            "colo" => Self::Colo,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// One block device as `query-block` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// The legacy drive name; empty for `-blockdev` nodes attached by `drive=`.
    pub device: String,
    /// The guest device's QOM path, if attached to one.
    pub qdev: Option<String>,
    /// The node-name of the inserted medium (`block_resize` takes this).
    pub node_name: Option<String>,
    /// Virtual size of the inserted image in bytes.
    pub size_bytes: Option<u64>,
}

/// A QMP event. Data QEMU sends and this enum does not model is dropped; unknown events
/// arrive as [`QmpEvent::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEvent {
    /// QEMU is shutting down. `guest` is true when the guest asked (poweroff, ACPI button
    /// handled); `reason` is QAPI's `ShutdownCause` (`guest-shutdown`, `host-qmp-quit`, ...).
    Shutdown {
        guest: bool,
        reason: String,
    },
    /// The machine was reset; `guest` is true for a reboot from inside.
    Reset {
        guest: bool,
        reason: String,
    },
    /// `system_powerdown` raised the ACPI power button.
    Powerdown,
    Stop,
    Resume,
    /// The guest kernel panicked; `action` is what QEMU does about it (`pause`, `poweroff`, ...).
    GuestPanicked {
        action: String,
    },
    /// An event not listed above.
    Other {
        name: String,
    },
}

impl QmpEvent {
    fn from_wire(name: &str, data: &Value) -> Self {
        let flag = |k: &str| data.get(k).and_then(Value::as_bool).unwrap_or(false);
        let text = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        match name {
            "SHUTDOWN" => Self::Shutdown {
                guest: flag("guest"),
                reason: text("reason"),
            },
            "RESET" => Self::Reset {
                guest: flag("guest"),
                reason: text("reason"),
            },
            "POWERDOWN" => Self::Powerdown,
            "STOP" => Self::Stop,
            "RESUME" => Self::Resume,
            "GUEST_PANICKED" => Self::GuestPanicked {
                action: text("action"),
            },
            other => Self::Other {
                name: other.to_owned(),
            },
        }
    }
}

/// The events of one connection, in order. `recv` returns `None` once the connection is
/// closed (QEMU exited or the socket broke) and all earlier events were taken.
#[derive(Debug)]
pub struct QmpEvents(mpsc::UnboundedReceiver<QmpEvent>);

impl QmpEvents {
    /// The next event, or `None` when the connection is gone.
    pub async fn recv(&mut self) -> Option<QmpEvent> {
        self.0.recv().await
    }

    /// Waits up to `timeout` for the first event that `pick` accepts, dropping the others.
    /// `None` on timeout or when the connection closed first.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&QmpEvent) -> bool,
    ) -> Option<QmpEvent> {
        tokio::time::timeout(timeout, async {
            while let Some(e) = self.0.recv().await {
                if pick(&e) {
                    return Some(e);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }
}

type Reply = Result<Value, CommandError>;
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

/// A connected, negotiated QMP session. Cheap to share by reference across tasks: commands
/// take `&self` and may run concurrently. Dropping it closes the connection.
#[derive(Debug)]
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// Replies awaited by id; `None` once the reader saw the socket close.
    pending: Pending,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    events: Option<QmpEvents>,
    options: QmpOptions,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    _qmp: Value,
}

#[derive(Deserialize)]
struct StatusInfo {
    status: String,
}

#[derive(Deserialize)]
struct RawBlockInfo {
    device: String,
    qdev: Option<String>,
    inserted: Option<RawInserted>,
}

#[derive(Deserialize)]
struct RawInserted {
    #[serde(rename = "node-name")]
    node_name: Option<String>,
    image: Option<RawImage>,
}

#[derive(Deserialize)]
struct RawImage {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

#[derive(Serialize)]
struct NoArgs {}

impl Qmp {
    /// Connects with default timeouts; see [`Qmp::connect_with`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Qmp, QmpError> {
        Self::connect_with(path, QmpOptions::default()).await
    }

    /// Connects, reads the greeting and negotiates capabilities. Events are collected from
    /// this moment on; take them with [`Qmp::take_events`].
    pub async fn connect_with(
        path: impl AsRef<Path>,
        options: QmpOptions,
    ) -> Result<Qmp, QmpError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut read = BufReader::new(read);

        let mut line = String::new();
        let greeting = tokio::time::timeout(options.greeting_timeout, read.read_line(&mut line))
            .await
            .map_err(|_| QmpError::GreetingTimeout {
                path: path.to_owned(),
                timeout: options.greeting_timeout,
            })?;
        let bad = |source| QmpError::Greeting {
            path: path.to_owned(),
            source,
        };
        match greeting {
            Err(e) => return Err(bad(e)),
            Ok(0) => return Err(bad(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
        }
        serde_json::from_str::<Greeting>(&line).map_err(|e| bad(e.into()))?;

        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(read, Arc::clone(&pending), event_tx));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            reader,
            events: Some(QmpEvents(event_rx)),
            options,
        };
        qmp.call("qmp_capabilities", &NoArgs {})
            .await
            .map_err(QmpError::Negotiate)?;
        Ok(qmp)
    }

    /// The event stream of this connection; `None` after the first call. Events are queued
    /// from connect on until taken (QEMU sends few), so none is lost in between.
    pub fn take_events(&mut self) -> Option<QmpEvents> {
        self.events.take()
    }

    /// `query-status`: QEMU's run state.
    pub async fn query_status(&self) -> Result<RunState, QmpError> {
        let info: StatusInfo = self
            .call_typed("query-status", &NoArgs {})
            .await
            .map_err(QmpError::QueryStatus)?;
        Ok(RunState::from_qapi(&info.status))
    }

    /// `query-block`: the block devices with their node-names and sizes.
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>, QmpError> {
        let raw: Vec<RawBlockInfo> = self
            .call_typed("query-block", &NoArgs {})
            .await
            .map_err(QmpError::QueryBlock)?;
        Ok(raw
            .into_iter()
            .map(|b| {
                let (node_name, size_bytes) = match b.inserted {
                    Some(i) => (i.node_name, i.image.map(|img| img.virtual_size)),
                    None => (None, None),
                };
                BlockInfo {
                    device: b.device,
                    qdev: b.qdev,
                    node_name,
                    size_bytes,
                }
            })
            .collect())
    }

    /// `block_resize` of a node to `size` bytes.
    ///
    /// DANGER: this resizes the RBD image itself, in both directions. A smaller `size`
    /// silently SHRINKS the image and destroys the data past the new end. QEMU does not
    /// check, and neither does this low-level call: the caller must read the current size
    /// first (from [`Qmp::query_block`] and/or librbd) and only ever pass a larger one.
    pub async fn block_resize(&self, node_name: &str, size: u64) -> Result<(), QmpError> {
        #[derive(Serialize)]
        struct Args<'a> {
            #[serde(rename = "node-name")]
            node_name: &'a str,
            size: u64,
        }
        self.call("block_resize", &Args { node_name, size })
            .await
            .map_err(|source| QmpError::BlockResize {
                node_name: node_name.to_owned(),
                size,
                source,
            })?;
        Ok(())
    }

    /// `system_powerdown`: presses the ACPI power button. Returns at once; the guest then
    /// decides (a [`QmpEvent::Powerdown`] follows, and a `Shutdown` if the guest obeys).
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.call("system_powerdown", &NoArgs {})
            .await
            .map_err(QmpError::SystemPowerdown)?;
        Ok(())
    }

    /// `quit`: QEMU exits at once, without asking the guest.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.call("quit", &NoArgs {}).await {
            // QEMU may close the socket before its reply is read: it quit all the same.
            Ok(_) | Err(CommandError::Disconnected) => Ok(()),
            Err(e) => Err(QmpError::Quit(e)),
        }
    }

    /// Any other command, with typed arguments and result (e.g. `query-kvm`).
    pub async fn execute<A: Serialize, R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: &A,
    ) -> Result<R, QmpError> {
        self.call_typed(command, arguments)
            .await
            .map_err(|source| QmpError::Execute {
                command: command.to_owned(),
                source,
            })
    }

    async fn call_typed<A: Serialize, R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: &A,
    ) -> Result<R, CommandError> {
        let value = self.call(command, arguments).await?;
        serde_json::from_value(value).map_err(CommandError::Decode)
    }

    async fn call<A: Serialize>(&self, command: &str, arguments: &A) -> Reply {
        #[derive(Serialize)]
        struct Request<'a, A> {
            execute: &'a str,
            arguments: &'a A,
            id: u64,
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut line = serde_json::to_vec(&Request {
            execute: command,
            arguments,
            id,
        })
        .map_err(CommandError::Decode)?;
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        match lock(&self.pending).as_mut() {
            Some(map) => map.insert(id, tx),
            None => return Err(CommandError::Disconnected),
        };
        // Forgets the waiter however this call ends: reply, timeout, or the caller dropping
        // this future.
        let _forget = Forget {
            pending: &self.pending,
            id,
        };
        let timeout = self.options.command_timeout;
        let outcome = tokio::time::timeout(timeout, async {
            // One write_all of a short line: on a unix socket it does not end half-written
            // in practice, so a timeout here does not garble the stream.
            let mut writer = self.writer.lock().await;
            writer.write_all(&line).await.map_err(CommandError::Write)?;
            drop(writer);
            rx.await.map_err(|_| CommandError::Disconnected)?
        })
        .await;
        outcome.map_err(|_| CommandError::Timeout(timeout))?
    }
}

/// Removes a command's reply slot when the command is over.
struct Forget<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(map) = lock(self.pending).as_mut() {
            map.remove(&self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves only a map behind, still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Deserialize)]
struct Incoming {
    event: Option<String>,
    #[serde(default)]
    data: Value,
    id: Option<u64>,
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<QemuError>,
}

#[derive(Deserialize)]
struct QemuError {
    class: String,
    desc: String,
}

async fn read_loop(
    mut read: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: mpsc::UnboundedSender<QmpEvent>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match read.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let msg: Incoming = match serde_json::from_str(&line) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring undecodable QMP message");
                continue;
            }
        };
        if let Some(name) = msg.event {
            // A closed receiver only means nobody listens for events.
            let _ = events.send(QmpEvent::from_wire(&name, &msg.data));
            continue;
        }
        let reply = match (msg.ret, msg.error) {
            (_, Some(e)) => Err(CommandError::Qemu {
                class: e.class,
                desc: e.desc,
            }),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(Value::Null),
        };
        let waiter = msg
            .id
            .and_then(|id| lock(&pending).as_mut().and_then(|m| m.remove(&id)));
        match waiter {
            // The command may have timed out meanwhile; then nobody waits.
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(id = ?msg.id, "QMP reply nobody waits for"),
        }
    }
    // Dropping the senders wakes every waiting command with Disconnected; the event sender
    // drops with this task, which ends the event stream.
    lock(&pending).take();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_from_wire() {
        let data = serde_json::json!({"guest": true, "reason": "guest-reset"});
        assert_eq!(
            QmpEvent::from_wire("RESET", &data),
            QmpEvent::Reset {
                guest: true,
                reason: "guest-reset".into()
            }
        );
        assert_eq!(
            QmpEvent::from_wire("SHUTDOWN", &serde_json::json!({"guest": false})),
            QmpEvent::Shutdown {
                guest: false,
                reason: String::new()
            }
        );
        assert_eq!(
            QmpEvent::from_wire("BLOCK_IO_ERROR", &Value::Null),
            QmpEvent::Other {
                name: "BLOCK_IO_ERROR".into()
            }
        );
    }

    #[test]
    fn run_states() {
        assert_eq!(RunState::from_qapi("running"), RunState::Running);
        assert_eq!(
            RunState::from_qapi("guest-panicked"),
            RunState::GuestPanicked
        );
        assert_eq!(
            RunState::from_qapi("new-state"),
            RunState::Other("new-state".into())
        );
    }
}
