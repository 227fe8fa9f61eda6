//! An up-front check of the capabilities the loader needs, so a missing
//! privilege is reported as such instead of as an obscure EPERM later.

use std::fs;

use anyhow::{bail, Context as _, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability set of this process, from /proc/self/status.
fn effective_caps() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line in /proc/self/status")?;
    u64::from_str_radix(hex.trim(), 16).context("parsing CapEff")
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Names the capabilities missing for loading and attaching cgroup eBPF
/// programs: CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN, which covers both on
/// any kernel) and CAP_NET_ADMIN for the networking program types.
pub fn missing_for_attach(caps: u64) -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !has(caps, CAP_SYS_ADMIN) {
        if !has(caps, CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(caps, CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if !has(caps, CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// Fails with advice when this process cannot load and attach the programs.
pub fn check_attach() -> Result<()> {
    let missing = missing_for_attach(effective_caps()?);
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "insufficient privileges: missing {}; run as root, or grant CAP_BPF, CAP_PERFMON and \
         CAP_NET_ADMIN (e.g. `docker run --cap-add BPF --cap-add PERFMON --cap-add NET_ADMIN`, \
         or `setcap cap_bpf,cap_perfmon,cap_net_admin+ep gateway`)",
        missing.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_covers_bpf_and_perfmon_but_not_net_admin() {
        assert_eq!(
            missing_for_attach(1 << CAP_SYS_ADMIN),
            vec!["CAP_NET_ADMIN"]
        );
        assert!(missing_for_attach((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)).is_empty());
        assert!(
            missing_for_attach((1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN))
                .is_empty()
        );
        assert_eq!(
            missing_for_attach(0),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
    }
}
