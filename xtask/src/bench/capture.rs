//! Capture: what it costs a client to be redirected. One TCP connect +
//! 1-byte exchange + close, and one UDP query + reply, at a time, from a
//! client that dials the server itself (direct), dials a VIP / a far DNS
//! server and is redirected by the gateway's cgroup programs (ebpf), or by
//! a DNAT rule (iptables, nftables).

use anyhow::Result;

use super::{
    env::{self, Dnat, Env, Firewall, Gate},
    report::{quantile, Row, Table},
    Plan,
};

/// A way for a client to reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The client dials the server.
    Direct,
    /// The gateway's programs redirect the client's connect/sendmsg.
    Ebpf,
    /// A DNAT rule rewrites the packets.
    Dnat(Firewall),
}

impl Mode {
    /// The mode's name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Ebpf => "ebpf",
            Self::Dnat(Firewall::Iptables) => "iptables DNAT",
            Self::Dnat(Firewall::Nftables) => "nftables DNAT",
        }
    }

    /// Every mode this machine offers.
    pub fn all(env: &Env) -> Vec<Self> {
        let mut modes = vec![Self::Direct, Self::Ebpf, Self::Dnat(Firewall::Iptables)];
        if env.has_nft {
            modes.push(Self::Dnat(Firewall::Nftables));
        }
        modes
    }
}

/// Runs `measure` in `mode`: in the gated cgroup for ebpf, with the DNAT
/// rules in place for a firewall mode, to the server itself for direct.
pub fn in_mode<T>(
    mode: Mode,
    gate: &Gate,
    measure: impl FnOnce(Option<&tests::TestCgroup>, bool) -> Result<T>,
) -> Result<T> {
    match mode {
        Mode::Direct => measure(None, true),
        Mode::Ebpf => measure(Some(&gate.cgroup), false),
        Mode::Dnat(firewall) => {
            let _rules = Dnat::new(firewall, (env::VIP_CIDR, env::ECHO), Some(env::UDP))?;
            measure(None, false)
        }
    }
}

/// The capture comparison: one table per protocol.
pub fn run(plan: &Plan, env: &Env) -> Result<Vec<Table>> {
    let gate = Gate::attach(env::VIP_CIDR, env::UDP, env::ECHO)?;
    let modes = Mode::all(env);
    let mut tables = Vec::new();
    for (proto, server, far) in [
        ("tcp", env::ECHO, env::VIP_TARGET),
        ("udp", env::UDP, env::DNS_TARGET),
    ] {
        let mut values: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for round in 0..plan.rounds {
            for i in super::rotated(modes.len(), round) {
                let mode = &modes[i];
                let got = in_mode(*mode, &gate, |cgroup, direct| {
                    env::latencies(cgroup, proto, if direct { server } else { far }, plan.ops)
                })?;
                values[i].extend(got);
            }
        }
        let rows = modes
            .iter()
            .zip(values.iter_mut())
            .map(|(mode, v)| {
                let ops = v.len() as f64;
                let mean = v.iter().sum::<f64>() / ops.max(1.0);
                Row {
                    mode: mode.name().to_owned(),
                    cells: vec![
                        quantile(v, 0.5) / 1000.0,
                        quantile(v, 0.99) / 1000.0,
                        1e9 / mean,
                    ],
                }
            })
            .collect();
        let what = if proto == "tcp" {
            "TCP connect + 1-byte exchange + close"
        } else {
            "UDP query + reply"
        };
        tables.push(Table {
            id: format!("capture_{proto}"),
            title: format!("Capture: {what}"),
            columns: vec!["p50 µs".into(), "p99 µs".into(), "ops/s (one client)".into()],
            rows,
            chart: Some((0, "p50 / direct".into())),
            note: format!(
                "{} rounds × {} operations per mode, modes interleaved; one client process, one operation at a time.",
                plan.rounds, plan.ops
            ),
        });
    }
    Ok(tables)
}
