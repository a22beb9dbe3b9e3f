//! The notification hook: runs `notifyCommand` with one JSON event on stdin.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt;

/// How long a hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a hook run failed.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The hook could not be started.
    #[error("cannot run {}", command.display())]
    Spawn {
        /// The hook.
        command: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the event or waiting for the hook failed.
    #[error("talking to {} failed", command.display())]
    Io {
        /// The hook.
        command: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hook exited non-zero.
    #[error("{} exited with {status}", command.display())]
    Failed {
        /// The hook.
        command: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The hook ran longer than [`HOOK_TIMEOUT`] and was killed.
    #[error("{} did not finish within {HOOK_TIMEOUT:?}", command.display())]
    Timeout {
        /// The hook.
        command: PathBuf,
    },
}

/// Runs the hook, if one is configured.
#[derive(Debug, Clone)]
pub struct Notifier {
    command: Option<PathBuf>,
}

impl Notifier {
    /// A notifier for `command` (none: events go to the journal only).
    pub fn new(command: Option<PathBuf>) -> Notifier {
        Notifier { command }
    }

    /// Sends one event. Returns `Ok` without a hook.
    pub async fn send<E: Serialize>(&self, event: &E) -> Result<(), NotifyError> {
        let Some(command) = &self.command else {
            return Ok(());
        };
        let io = |source| NotifyError::Io {
            command: command.clone(),
            source,
        };
        let mut json = serde_json::to_vec(event).map_err(|e| io(std::io::Error::other(e)))?;
        json.push(b'\n');
        let mut child = tokio::process::Command::new(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| NotifyError::Spawn {
                command: command.clone(),
                source,
            })?;
        let run = async {
            if let Some(mut stdin) = child.stdin.take() {
                // A hook may exit without reading its event; its exit status says how it went.
                match stdin.write_all(&json).await {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                    other => other.map_err(io)?,
                }
            }
            child.wait().await.map_err(io)
        };
        match tokio::time::timeout(HOOK_TIMEOUT, run).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(NotifyError::Failed {
                command: command.clone(),
                status,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NotifyError::Timeout {
                command: command.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn hook(dir: &std::path::Path, body: &str) -> PathBuf {
        let p = dir.join("hook");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn the_hook_gets_the_event_on_stdin_and_failures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.json");
        let n = Notifier::new(Some(hook(dir.path(), &format!("cat > {}", out.display()))));
        n.send(&serde_json::json!({ "event": "unplanned", "vm": "web01" }))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"event\":\"unplanned\",\"vm\":\"web01\"}\n"
        );
        let n = Notifier::new(Some(hook(dir.path(), "exit 3")));
        let e = n.send(&1).await.unwrap_err();
        assert!(e.to_string().ends_with("exited with exit status: 3"), "{e}");
        let n = Notifier::new(Some(dir.path().join("missing")));
        assert!(matches!(n.send(&1).await, Err(NotifyError::Spawn { .. })));
        assert!(Notifier::new(None).send(&1).await.is_ok());
    }
}
