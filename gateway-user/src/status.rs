//! `gateway status`: what is attached where, the counters, the recorded
//! original destinations and the VIP table, read from the pins.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};
use gateway_common::{
    pinned::{sockaddr_to_std, PinDir},
    CONFIG_FLAG_DNS_TCP, CONFIG_FLAG_ENABLED, CONFIG_FLAG_IPV6, CONFIG_FLAG_VIP6, MAP_CONFIG,
};
use serde::Serialize;

/// Everything `status` reports, serialisable for `--json`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The pin directory read.
    pub pin_dir: String,
    /// True when the programs are attached: by a live loader, or by the
    /// pinned links a loader that died left (the gate stays in place).
    pub attached: bool,
    /// Program links pinned in the pin directory.
    pub links_pinned: usize,
    /// Program id behind each pinned link (a new loader that adopts keeps
    /// them; one that loads anew changes them).
    pub link_programs: Vec<(String, u32)>,
    /// The loader's own record, if any.
    pub loader: Option<LoaderStatus>,
    /// The kernel configuration in force.
    pub config: Option<ConfigStatus>,
    /// Kernel decision counters, summed over CPUs.
    pub counters: Vec<(String, u64)>,
    /// Recorded original destinations: client → destination.
    pub original_destinations: Vec<(String, String)>,
    /// Allocated VIPs and their domains.
    pub vips: Vec<(String, String)>,
    /// Gated cgroups below the attach cgroup.
    pub gated: Vec<GatedStatus>,
}

/// One entry of the gate table.
#[derive(Debug, Serialize)]
pub struct GatedStatus {
    /// cgroup id.
    pub id: u64,
    /// Where the cgroup is, or `None` when it no longer exists (ungate it
    /// by id).
    pub path: Option<String>,
    /// Why it is gated: `config`, `gate` or `pod`.
    pub origin: String,
}

/// The loader's record.
#[derive(Debug, Serialize)]
pub struct LoaderStatus {
    /// Process id, 0 once it detached.
    pub pid: u32,
    /// Whether a gateway holds the pin directory's lock and has attached.
    pub alive: bool,
    /// The cgroup the programs were attached to.
    pub cgroup: String,
    /// Unix time of the attach.
    pub attached_at: u64,
}

/// The kernel configuration.
#[derive(Debug, Serialize)]
pub struct ConfigStatus {
    /// Whether the programs act at all.
    pub enabled: bool,
    /// DNS redirect target.
    pub dns_to: String,
    /// TCP redirect target.
    pub tcp_to: String,
    /// VIP networks.
    pub vip_cidrs: Vec<String>,
    /// DNS-over-TCP redirect target, if TCP to port 53 is redirected.
    pub dns_tcp_to: Option<String>,
    /// Whether IPv6 DNS and IPv6 VIPs go to the proxy's `[::1]` listeners.
    pub ipv6: bool,
    /// The IPv6 VIP range (a /96), if any.
    pub vip6_prefix: Option<String>,
}

/// Reads the status from the pins in `pin_dir`.
pub fn read(pin_dir: &Path) -> Result<Status> {
    let pins = PinDir::new(pin_dir);
    let mut status = Status {
        pin_dir: pin_dir.display().to_string(),
        attached: false,
        links_pinned: crate::links::pinned(pin_dir).len(),
        link_programs: crate::links::pinned(pin_dir)
            .into_iter()
            .filter_map(|name| {
                let id = crate::links::program_id(pin_dir, &name)?;
                Some((name, id))
            })
            .collect(),
        loader: None,
        config: None,
        counters: Vec::new(),
        original_destinations: Vec::new(),
        vips: Vec::new(),
        gated: Vec::new(),
    };
    if !pins.has(MAP_CONFIG) {
        return Ok(status);
    }
    let info = pins.loader_info()?;
    // Liveness is the pin directory's lock, which dies with its owner;
    // the recorded pid is only informative (it may be reused, or be from
    // another pid namespace).
    let alive = crate::loader::owner_alive(pin_dir) && info.pid != 0;
    let len = (info.cgroup_path_len as usize).min(info.cgroup_path.len());
    status.loader = Some(LoaderStatus {
        pid: info.pid,
        alive,
        cgroup: String::from_utf8_lossy(&info.cgroup_path[..len]).into_owned(),
        attached_at: info.attached_at,
    });
    let config = pins.config()?;
    let enabled = config.flags & CONFIG_FLAG_ENABLED != 0;
    let cgroup_path = std::path::PathBuf::from(
        status
            .loader
            .as_ref()
            .map(|l| l.cgroup.clone())
            .unwrap_or_default(),
    );
    status.attached = enabled
        && (alive
            || (status.links_pinned > 0
                && crate::loader::verify_attached(pin_dir, &cgroup_path).is_ok()));
    status.config = Some(ConfigStatus {
        enabled,
        dns_to: sockaddr_to_std(config.dns_target).to_string(),
        tcp_to: sockaddr_to_std(config.tcp_target).to_string(),
        vip_cidrs: config
            .vip_cidrs
            .iter()
            .take(config.vip_cidr_count as usize)
            .map(|c| {
                format!(
                    "{}/{}",
                    Ipv4Addr::from(c.network.to_ne_bytes()),
                    c.prefix_len()
                )
            })
            .collect(),
        dns_tcp_to: config
            .has(CONFIG_FLAG_DNS_TCP)
            .then(|| sockaddr_to_std(config.dns_tcp_target).to_string()),
        ipv6: config.has(CONFIG_FLAG_IPV6),
        vip6_prefix: config.has(CONFIG_FLAG_VIP6).then(|| {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(config.vip6_prefix) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            format!("{}/96", std::net::Ipv6Addr::from(octets))
        }),
    });
    status.counters = pins
        .counters()?
        .into_iter()
        .map(|(c, n)| (c.name().to_owned(), n))
        .collect();
    status.original_destinations = pins
        .orig_dst()?
        .entries()?
        .into_iter()
        .map(|(client, orig)| (client.to_string(), orig.to_string()))
        .collect();
    status.vips = pins
        .vips()?
        .entries()?
        .into_iter()
        .map(|(vip, domain)| (vip.to_string(), domain))
        .collect();
    if pins.has(gateway_common::MAP_GATED) {
        let entries = pins.gated()?.entries()?;
        let ids = entries.iter().map(|(id, _)| *id).collect();
        let paths = crate::gate::paths_by_id(&cgroup_path, &ids);
        status.gated = entries
            .into_iter()
            .map(|(id, entry)| GatedStatus {
                id,
                path: paths.get(&id).map(|p| p.display().to_string()),
                origin: gateway_common::GateOrigin::from_raw(entry.origin)
                    .map_or("unknown", |o| o.name())
                    .to_owned(),
            })
            .collect();
    }
    Ok(status)
}

/// Renders the status for a person.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("pin directory: {}", status.pin_dir));
    match &status.loader {
        None => {
            line("nothing pinned here: start `gateway attach` or `gateway run`".to_owned());
            return out;
        }
        Some(l) => {
            line(format!(
                "attached: {} (loader pid {}{}, cgroup {})",
                if status.attached { "yes" } else { "no" },
                l.pid,
                if l.alive { "" } else { ", not running" },
                l.cgroup
            ));
            if status.attached && !l.alive {
                line(format!(
                    "  the loader is gone; {} pinned links keep the programs attached: start the gateway again to adopt them, or `gateway reset` to detach",
                    status.links_pinned
                ));
            }
        }
    }
    if let Some(c) = &status.config {
        line(format!(
            "dns -> {}  tcp -> {}  vip cidrs: {}",
            c.dns_to,
            c.tcp_to,
            c.vip_cidrs.join(", ")
        ));
        line(format!(
            "dns over tcp -> {}  ipv6 (listeners on [::1]): {}  ipv6 vips: {}",
            c.dns_tcp_to.as_deref().unwrap_or("not redirected"),
            if c.ipv6 { "yes" } else { "no" },
            c.vip6_prefix.as_deref().unwrap_or("none")
        ));
    }
    line(format!("gated cgroups ({}):", status.gated.len()));
    for g in &status.gated {
        line(format!(
            "  {:<8} {:<10} {}",
            g.origin,
            g.id,
            g.path
                .as_deref()
                .unwrap_or("(removed; `gateway ungate <id>`)")
        ));
    }
    line("counters:".to_owned());
    for (name, n) in &status.counters {
        line(format!("  {name:<24} {n}"));
    }
    line(format!(
        "original destinations ({}):",
        status.original_destinations.len()
    ));
    for (client, orig) in &status.original_destinations {
        line(format!("  {client:<22} -> {orig}"));
    }
    line(format!("vips ({}):", status.vips.len()));
    for (vip, domain) in &status.vips {
        line(format!("  {vip:<16} {domain}"));
    }
    out
}

/// JSON for scripts and tests.
pub fn to_json(status: &Status) -> Result<String> {
    serde_json::to_string_pretty(status).context("serialising the status")
}
