//! Scale of capture: the connect latency of each mode while many other
//! connections are held through it, and the kernel memory it holds per
//! connection (conntrack entries grow with DNAT; the eBPF redirect keeps
//! one small map entry per socket).

use anyhow::Result;

use super::{
    capture::{in_mode, Mode},
    env::{self, Env, Gate, HeldMany},
    report::{median, quantile, Row, Table},
    Plan,
};

/// Takes every recorded original destination, as the proxy does when it
/// accepts a redirected connection. The benchmark's echo server is no
/// proxy: without this, the held connections' records would stay in the
/// table, and the loader's sweep of closed ones (every 200 ms, over the
/// whole table) would be measured instead of the redirect.
fn consume_original_destinations(gate: &Gate) -> Result<()> {
    let mut table = gateway_common::pinned::PinDir::new(gate.pin_dir()).orig_dst()?;
    for (client, _) in table.entries()? {
        // Records of open connections are never expired: any clock will do.
        table.take(client, 0)?;
    }
    Ok(())
}

/// The scale comparison: one table per number of held connections.
pub fn run(plan: &Plan, env: &Env) -> Result<Vec<Table>> {
    let gate = Gate::attach(env::VIP_CIDR, env::UDP, env::ECHO)?;
    let modes = Mode::all(env);
    let mut tables = Vec::new();
    for &held in &plan.scales {
        let mut latency: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let mut memory: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let mut tracked: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for round in 0..plan.rounds {
            for i in super::rotated(modes.len(), round) {
                let mode = &modes[i];
                eprintln!("  scale: {held} held, {} ...", mode.name());
                let (lat, bytes, conntrack) = in_mode(*mode, &gate, |cgroup, direct| {
                    let target = if direct { env::ECHO } else { env::VIP_TARGET };
                    let before = env::slab_bytes()?;
                    let tracked_before = env::conntrack_count();
                    let holder = HeldMany::open(cgroup, target, held)?;
                    if cgroup.is_some() {
                        consume_original_destinations(&gate)?;
                    }
                    let after = env::slab_bytes()?;
                    let conntrack = env::conntrack_count().saturating_sub(tracked_before) as f64;
                    let lat = env::latencies(cgroup, "tcp", target, plan.ops)?;
                    drop(holder);
                    Ok((
                        lat,
                        after.saturating_sub(before) as f64 / held as f64,
                        conntrack,
                    ))
                })?;
                latency[i].extend(lat);
                memory[i].push(bytes);
                tracked[i].push(conntrack);
            }
        }
        let rows = modes
            .iter()
            .enumerate()
            .map(|(i, mode)| Row {
                mode: mode.name().to_owned(),
                cells: vec![
                    quantile(&mut latency[i], 0.5) / 1000.0,
                    quantile(&mut latency[i], 0.99) / 1000.0,
                    median(&memory[i]),
                    median(&tracked[i]),
                ],
            })
            .collect();
        tables.push(Table {
            id: format!("scale_{held}"),
            title: format!("Scale: TCP connect + exchange with {held} connections held"),
            columns: vec![
                "p50 µs".into(),
                "p99 µs".into(),
                "kernel slab bytes per held connection".into(),
                "conntrack entries added".into(),
            ],
            rows,
            chart: Some((0, "p50 / direct".into())),
            note: format!(
                "{} rounds, modes interleaved; the slab figure is the growth of the kernel's slab memory while the connections were opened (both ends, so a direct connection counts two sockets), divided by their number; conntrack entries added while the connections were opened (a DNAT round removes its nat table afterwards, so connection tracking is off again for the other modes).",
                plan.rounds
            ),
        });
    }
    Ok(tables)
}
