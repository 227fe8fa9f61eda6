//! Removes original destinations whose client socket closed first and that
//! the proxy did not consume within the grace period (the kernel stamps
//! them at close; see `GW_ORIG_DST` in the eBPF programs). Together with
//! consume-once and delete-at-close this leaves no entry that a later
//! socket reusing the client's address could be given.

use std::{path::PathBuf, time::Duration};

use gateway_common::{pinned::PinDir, ORIG_DST_CLOSE_GRACE_NS};
use nix::time::{clock_gettime, ClockId};

/// How often the table is swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> Option<u64> {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).ok()?;
    u64::try_from(now.tv_sec())
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(now.tv_nsec()).ok()?)
}

/// One sweep of the table pinned in `pin_dir`; the number removed.
pub fn sweep(pin_dir: &PinDir) -> anyhow::Result<usize> {
    let now = monotonic_ns().ok_or_else(|| anyhow::anyhow!("reading CLOCK_MONOTONIC"))?;
    pin_dir
        .orig_dst()?
        .reap_closed(now, ORIG_DST_CLOSE_GRACE_NS)
}

/// Sweeps every [`SWEEP_INTERVAL`] until the task is aborted.
pub fn spawn(pin_dir: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pins = PinDir::new(pin_dir);
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        let mut failing = false;
        loop {
            tick.tick().await;
            match sweep(&pins) {
                Ok(0) => failing = false,
                Ok(n) => {
                    failing = false;
                    log::debug!(
                        "removed {n} original destinations whose clients closed unaccepted"
                    );
                }
                Err(err) if !failing => {
                    failing = true;
                    log::warn!("cannot sweep closed original destinations: {err:#}");
                }
                Err(_) => {}
            }
        }
    })
}
