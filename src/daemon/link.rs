//! The QMP connection of one QEMU instance: connects (and reconnects, with backoff, when the
//! connection breaks), publishes it to the VM's operations and forwards QEMU's events to the
//! loop, each tagged with the instance. The loop aborts the task when the instance ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::Event;
use super::ops::QmpConn;
use crate::exec::qmp::Qmp;
use crate::model::{InvocationId, VmName};

/// First wait between connection attempts; doubles up to [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_millis(100);
/// Longest wait between connection attempts.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Keeps a connection to `instance`'s QMP socket at `path` until aborted.
pub fn spawn(
    vm: VmName,
    instance: Option<InvocationId>,
    path: PathBuf,
    publish: watch::Sender<Option<QmpConn>>,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut retry = MIN_RETRY;
        loop {
            if let Ok(mut qmp) = Qmp::connect(&path).await {
                retry = MIN_RETRY;
                let Some(mut qemu_events) = qmp.take_events() else {
                    return;
                };
                publish.send_replace(Some(QmpConn {
                    instance: instance.clone(),
                    qmp: Arc::new(qmp),
                }));
                let _ = events.send(Event::Link {
                    vm: vm.clone(),
                    instance: instance.clone(),
                    connected: true,
                });
                while let Some(event) = qemu_events.recv().await {
                    let _ = events.send(Event::Qmp {
                        vm: vm.clone(),
                        instance: instance.clone(),
                        event,
                    });
                }
                publish.send_replace(None);
                let _ = events.send(Event::Link {
                    vm: vm.clone(),
                    instance: instance.clone(),
                    connected: false,
                });
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    })
}
