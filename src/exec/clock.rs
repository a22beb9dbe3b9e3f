//! Whether the host's clock is known to be right: the flag file systemd-timesyncd keeps
//! (`/run/systemd/timesync/synchronized`, created once the clock was synchronized), or the
//! file another NTP daemon is told to keep (`clock.syncedFlag`).
//!
//! Not the kernel's `adjtimex` status: chrony and ntpd set it, but a daemon that stopped
//! disciplining the clock can leave it set, and it cannot be pointed elsewhere for tests.

use std::path::Path;

/// True when the flag file exists.
pub fn synchronized(flag: &Path) -> bool {
    flag.exists()
}
