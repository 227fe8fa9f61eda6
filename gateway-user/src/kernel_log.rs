//! Forwarding of the kernel programs' aya-log records to the loader's log.

use std::time::Duration;

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::task::JoinHandle;

/// How often the ring buffer is drained. Kernel logs are debug output, so
/// polling keeps this free of fd-registration subtleties at no real cost.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Starts a task that drains the kernel log ring buffer into `log`.
/// Returns `None` (after a warning) when the object carries no log map, so
/// that a logging problem never stops the gateway.
pub fn forward(ebpf: &mut Ebpf) -> Option<JoinHandle<()>> {
    let mut logger = match EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(err) => {
            log::warn!("kernel logs will not be shown: {err}");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        loop {
            tick.tick().await;
            logger.flush();
        }
    }))
}
