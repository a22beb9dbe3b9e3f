//! The state writer: persists the newest state the loop hands it, off the loop's thread, and
//! says which generation is durable. A failed write is retried with backoff; meanwhile the
//! loop starts nothing that needs its intent on disk.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::Event;
use crate::state::State;

/// First wait after a failed write; doubles up to [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between write attempts.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// A state to write: its generation (increasing) and the state.
pub type Snapshot = Option<(u64, Arc<State>)>;

/// Writes every snapshot sent on `rx` (only the newest one when several queue up) to
/// `dir/state.json`, reporting [`Event::Persisted`] or [`Event::PersistFailed`].
pub fn spawn(
    dir: PathBuf,
    mut rx: watch::Receiver<Snapshot>,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut written = 0;
        while rx.changed().await.is_ok() {
            let mut retry = MIN_RETRY;
            loop {
                let Some((generation, state)) = rx.borrow_and_update().clone() else {
                    break;
                };
                if generation <= written {
                    break;
                }
                let d = dir.clone();
                let result = tokio::task::spawn_blocking(move || state.save(&d))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| format!("{:#}", anyhow::Error::from(e))));
                match result {
                    Ok(()) => {
                        written = generation;
                        let _ = events.send(Event::Persisted { generation });
                        break;
                    }
                    Err(error) => {
                        let _ = events.send(Event::PersistFailed { generation, error });
                        // A newer snapshot is tried at once; the same one after a wait.
                        let _ = tokio::time::timeout(retry, rx.changed()).await;
                        retry = (retry * 2).min(MAX_RETRY);
                    }
                }
            }
        }
    })
}
