//! Delivers the outbox: every notification the loop decided, in order, to the hook. A
//! notification counts as delivered when the hook exited 0; a failing hook is retried with
//! backoff, and later notifications wait behind it so the hook sees them in order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::Event;
use crate::config::Config;
use crate::exec::notify::Notifier;
use crate::model::ProjectName;
use crate::state::Notice;

/// First wait after a failed delivery; doubles up to [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_secs(2);
/// Longest wait between delivery attempts.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// The hooks and what is to deliver.
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    /// Each project's hook.
    pub hooks: Hooks,
    /// Undelivered notifications, oldest first.
    pub notices: Arc<Vec<Notice>>,
}

/// The hook of each project, as the configuration says now (not as it said when a notice
/// was queued: a hook's path changes with every NixOS rebuild).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    by_project: BTreeMap<ProjectName, PathBuf>,
    /// The default project's, for notices of a project no longer configured.
    fallback: Option<PathBuf>,
}

impl Hooks {
    /// The hooks `config` names.
    pub fn of(config: &Config) -> Hooks {
        Hooks {
            by_project: config
                .projects
                .values()
                .filter_map(|p| Some((p.name.clone(), p.notify_command.clone()?)))
                .collect(),
            fallback: config.default_project().notify_command.clone(),
        }
    }

    /// The hook a notice of `project` goes to; without one it is delivered by being in the
    /// journal. A configured project without a hook has none because the host has none, so
    /// the fallback is only ever taken for a project that is gone.
    pub fn command(&self, project: &ProjectName) -> Option<PathBuf> {
        self.by_project
            .get(project)
            .or(self.fallback.as_ref())
            .cloned()
    }
}

/// Delivers what `rx` shows, reporting [`Event::Delivered`] and [`Event::DeliveryFailed`].
pub fn spawn(
    mut rx: watch::Receiver<Outbox>,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Delivered, but maybe not yet dropped from the loop's outbox.
        let mut delivered = BTreeSet::new();
        let mut retry = MIN_RETRY;
        loop {
            let outbox = rx.borrow_and_update().clone();
            delivered.retain(|id| outbox.notices.iter().any(|n| n.id == *id));
            let Some(next) = outbox.notices.iter().find(|n| !delivered.contains(&n.id)) else {
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            };
            let mut event = next.event.clone();
            event["id"] = next.id.into();
            let command = outbox.hooks.command(&next.project);
            match Notifier::new(command).send(&event).await {
                Ok(()) => {
                    delivered.insert(next.id);
                    retry = MIN_RETRY;
                    let _ = events.send(Event::Delivered { id: next.id });
                }
                Err(e) => {
                    let _ = events.send(Event::DeliveryFailed {
                        id: next.id,
                        error: e.to_string(),
                    });
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    })
}
