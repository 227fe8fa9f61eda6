//! The one configuration file of the whole gateway (TOML): the cgroup to
//! gate, the VIP range, the domain patterns with their metadata, the
//! upstream clusters, the fallback resolvers and the listeners. The kernel
//! configuration and Envoy's bootstrap are both derived from it, so nothing
//! is written twice.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::addr::{parse_cidr, parse_resolver_addr, parse_socket_addr, Cidr};

/// The built-in configuration: the seed's example (`*.aws.com` → cluster_1
/// with an auth token, `example.com` → cluster_2).
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// The whole gateway configuration, as written in the file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// The cgroup v2 directory the programs are attached to: absolute, or
    /// relative to the cgroup v2 mount. Created by `gateway run` if
    /// missing (and removed again when it stops). Gated itself unless
    /// `gate` says otherwise.
    pub cgroup: PathBuf,
    /// The cgroups whose processes are redirected, at or below `cgroup`
    /// (a relative path is taken below it). Absent: `cgroup` itself.
    /// Empty: none at start (workloads are gated at run time with
    /// `gateway gate` or `gateway gate-pods`). Applied again on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<Vec<PathBuf>>,
    /// bpffs directory for the shared maps.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Listener addresses of the generated Envoy.
    #[serde(default)]
    pub listeners: Listeners,
    /// DNS behaviour: VIP range, TTL, fallback resolvers.
    pub dns: Dns,
    /// Domain patterns and their metadata; the `cluster` key picks the
    /// upstream.
    pub domains: Vec<Domain>,
    /// Upstream HTTP CONNECT proxies.
    pub clusters: Vec<Cluster>,
    /// What every CONNECT carries.
    #[serde(default)]
    pub tunnel: Tunnel,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(gateway_common::DEFAULT_PIN_DIR)
}

/// Where Envoy listens.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// DNS listener, UDP and TCP on the same port (the kernel sends
    /// port-53 datagrams to the UDP one and DNS-over-TCP connects to the
    /// TCP one).
    pub dns: String,
    /// TCP listener (the kernel sends VIP connects here).
    pub tcp: String,
    /// No longer accepted: Envoy's admin interface is a Unix socket in the
    /// gateway's state directory, reachable by root only (it shows every
    /// token and can stop Envoy). Kept to refuse it with a clear message.
    #[serde(default, skip_serializing)]
    pub admin: Option<String>,
    /// Also listen on `[::1]` at the same ports, for IPv6 resolvers and
    /// IPv6 VIPs: true requires it, false turns it off, absent uses it
    /// when the host has IPv6 loopback.
    #[serde(default)]
    pub ipv6: Option<bool>,
    /// Optional Prometheus endpoint: an Envoy listener at this address
    /// that serves only `GET /stats/prometheus` (from the admin socket;
    /// nothing else of the admin interface), for scrapers on the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            dns: "127.0.0.1:15053".into(),
            tcp: "127.0.0.1:15001".into(),
            admin: None,
            ipv6: None,
            metrics: None,
        }
    }
}

/// DNS settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// VIP range, e.g. "10.10.0.0/24".
    pub vip_cidr: String,
    /// IPv6 VIP range, a /96 such as "fd00:6a7e::/96": a matched name is
    /// also answered for AAAA, with this prefix followed by its IPv4 VIP.
    /// Absent: AAAA for a matched name is NODATA.
    #[serde(default)]
    pub vip_ipv6_prefix: Option<String>,
    /// TTL of VIP answers, seconds.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Resolvers for names that match no pattern ("ip:port"); empty means
    /// the nameservers of /etc/resolv.conf.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// Seconds after which a VIP neither answered nor connected to may be
    /// given to a new name once the range is full; absent = never (a full
    /// range answers SERVFAIL). At least twice the TTL.
    #[serde(default)]
    pub reclaim_idle_after: Option<u64>,
    /// Cap on new VIPs handed out per second; a query for a new name over
    /// the cap gets SERVFAIL (names that have a VIP are always answered).
    #[serde(default)]
    pub max_new_vips_per_second: Option<u32>,
    /// New VIPs that may be handed out at once before the cap applies.
    #[serde(default)]
    pub new_vip_burst: Option<u32>,
    /// What the kernel does with DNS while Envoy is down (restarting).
    #[serde(default)]
    pub outage: DnsOutage,
    /// What a new name gets once the VIP range is full and nothing is
    /// reclaimable: "servfail" (default) or "pass" (on to the fallback
    /// resolvers: the name resolves to its real address, without the proxy).
    #[serde(default)]
    pub on_exhausted: Option<String>,
}

fn default_ttl() -> u32 {
    300
}

/// What happens to DNS while no Envoy listener is bound (Envoy crashed or
/// restarts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DnsOutage {
    /// Leave it on its original path: every name keeps resolving; matched
    /// names get their real addresses meanwhile (connections to those go
    /// out directly if the network allows).
    #[default]
    Pass,
    /// Refuse it (EPERM): nothing resolves and nothing bypasses the
    /// gateway until Envoy is back.
    Drop,
}

/// One domain pattern.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    /// "example.com" (exact) or "*.example.com" (any subdomain).
    pub domain: String,
    /// String values exposed as filter state; `cluster` names the upstream.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// One upstream HTTP CONNECT proxy.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Name the domains' `metadata.cluster` refers to.
    pub name: String,
    /// "ip:port" of the proxy.
    pub address: String,
}

/// CONNECT tunnelling settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tunnel {
    /// Header name → metadata key: added to every CONNECT with the value
    /// of that key for the connection's domain (e.g. X-Auth-Token =
    /// "auth_token").
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Seconds a tunnelled connection may go without traffic either way
    /// before both sides are closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u64,
    /// Seconds from accepting a client's connection to the upstream proxy's
    /// answer to the CONNECT (the TCP connect included); past it the
    /// client's connection is closed (`cache_lookup` enforces it: Envoy
    /// 1.40's tcp_proxy has no such timer).
    #[serde(default = "default_connect_response_timeout")]
    pub connect_response_timeout: u64,
    /// Seconds to establish the TCP connection to an upstream proxy; a
    /// failure closes the client's connection at once.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
}

fn default_idle_timeout() -> u64 {
    3600
}

fn default_connect_timeout() -> u64 {
    5
}

fn default_connect_response_timeout() -> u64 {
    10
}

impl Default for Tunnel {
    fn default() -> Self {
        Self {
            headers: BTreeMap::new(),
            idle_timeout: default_idle_timeout(),
            connect_timeout: default_connect_timeout(),
            connect_response_timeout: default_connect_response_timeout(),
        }
    }
}

/// A validated configuration, with parsed addresses.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file as written (for generating Envoy's bootstrap).
    pub file: GatewayFile,
    /// The VIP range.
    pub vip_cidr: Cidr,
    /// DNS listener.
    pub dns_listener: SocketAddrV4,
    /// TCP listener.
    pub tcp_listener: SocketAddrV4,
    /// DNS-over-TCP listener (the DNS listener's address, over TCP).
    pub dns_tcp_listener: SocketAddrV4,
    /// Whether Envoy also listens on `[::1]` at the same ports.
    pub ipv6: bool,
    /// The IPv6 VIP prefix (a /96), if any.
    pub vip6_prefix: Option<Ipv6Addr>,
    /// Fallback resolvers (from the file or /etc/resolv.conf), IPv4 or
    /// IPv6.
    pub fallback: Vec<SocketAddr>,
    /// Cluster addresses by name.
    pub clusters: BTreeMap<String, SocketAddrV4>,
    /// The Prometheus listener, if any.
    pub metrics_listener: Option<SocketAddrV4>,
}

impl Config {
    /// A digest of everything a running Envoy cannot take from a reload
    /// (listeners, VIP range, tunnel settings, …): the configuration
    /// without the reloadable fields, with IPv6 as detected. Carried in
    /// the bootstrap's node metadata, so that a loader that restarts next
    /// to a running Envoy can tell whether that Envoy matches it.
    pub fn static_digest(&self) -> u64 {
        let mut value = toml::Value::try_from(&self.file).unwrap_or(toml::Value::Boolean(false));
        if let Some(table) = value.as_table_mut() {
            for key in ["domains", "clusters", "gate"] {
                table.remove(key);
            }
            if let Some(dns) = table.get_mut("dns").and_then(|d| d.as_table_mut()) {
                dns.remove("fallback");
            }
            table.insert("ipv6 (detected)".into(), toml::Value::Boolean(self.ipv6));
        }
        gateway_common::pinned::fnv1a(value.to_string().as_bytes())
    }

    /// The cgroup the programs are attached to, resolved.
    pub fn attach_cgroup(&self) -> Result<PathBuf> {
        crate::cgroup::resolve(&self.file.cgroup)
    }

    /// The cgroups gated at start, resolved (relative ones below the
    /// attach cgroup); the attach cgroup itself when `gate` is absent.
    pub fn gated_cgroups(&self) -> Result<Vec<PathBuf>> {
        let attach = self.attach_cgroup()?;
        Ok(match &self.file.gate {
            None => vec![attach],
            Some(list) => list.iter().map(|p| attach.join(p)).collect(),
        })
    }
}

/// The parts of a configuration `gateway reload` applies while running:
/// the domains and their metadata, the clusters, the fallback resolvers
/// and the gated cgroups. Everything else shapes listeners, the kernel
/// configuration or the VIP table, and needs a restart.
pub const RELOADABLE: [&str; 4] = ["domains", "clusters", "dns.fallback", "gate"];

/// What a reload from `old` to `new` changes (dotted field names), or an
/// error naming every field that cannot change while the gateway runs.
pub fn reload_changes(old: &Config, new: &Config) -> Result<Vec<String>> {
    let old_value = toml::Value::try_from(&old.file).context("comparing configurations")?;
    let new_value = toml::Value::try_from(&new.file).context("comparing configurations")?;
    let mut differing = Vec::new();
    diff_fields("", &old_value, &new_value, &mut differing);
    // Derived values count as their fields: IPv6 listeners as detected,
    // fallback resolvers taken from /etc/resolv.conf.
    if old.ipv6 != new.ipv6 && !differing.iter().any(|f| f == "listeners.ipv6") {
        differing.push("listeners.ipv6 (as detected on this host)".to_owned());
    }
    if old.fallback != new.fallback && !differing.iter().any(|f| f == "dns.fallback") {
        differing.push("dns.fallback".to_owned());
    }
    let (changes, refused): (Vec<String>, Vec<String>) = differing
        .into_iter()
        .partition(|field| RELOADABLE.contains(&field.as_str()));
    if !refused.is_empty() {
        bail!(
            "{} cannot change while the gateway runs (only {} can); restart `gateway run` to apply \
             them — the VIP table survives the restart",
            refused.join(", "),
            RELOADABLE.join(", ")
        );
    }
    Ok(changes)
}

/// Collects the dotted names of the fields that differ, descending into
/// tables (a reloadable top-level array is one field).
fn diff_fields(prefix: &str, old: &toml::Value, new: &toml::Value, out: &mut Vec<String>) {
    match (old, new) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => diff_fields(&name, x, y, out),
                    _ => out.push(name),
                }
            }
        }
        (a, b) if a != b => out.push(prefix.to_owned()),
        _ => {}
    }
}

/// Reads and validates a configuration file, or the built-in default.
pub fn load(path: Option<&Path>) -> Result<Config> {
    let (text, origin) = match path {
        Some(p) => (
            fs::read_to_string(p)
                .with_context(|| format!("reading the configuration {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_CONFIG.to_owned(),
            "the built-in default configuration".to_owned(),
        ),
    };
    parse(&text).with_context(|| format!("invalid configuration in {origin}"))
}

/// Parses and validates configuration text; errors name the field.
pub fn parse(text: &str) -> Result<Config> {
    let file: GatewayFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    validate(file)
}

fn field<T>(name: &str, result: std::result::Result<T, String>) -> Result<T> {
    result.map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

/// Validates a configuration (after command-line overrides).
pub fn validate(file: GatewayFile) -> Result<Config> {
    field(
        "pin_dir",
        gateway_common::contract::check_pin_dir(&file.pin_dir),
    )?;
    if file.cgroup.as_os_str().is_empty()
        || file
            .cgroup
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        bail!("cgroup: {:?} must name a cgroup directory (absolute, or relative to the cgroup v2 mount) without '..'", file.cgroup);
    }
    for (i, gated) in file.gate.iter().flatten().enumerate() {
        if gated.as_os_str().is_empty()
            || gated
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            bail!("gate[{i}]: {gated:?} must name a cgroup directory at or below `cgroup` (relative to it, or absolute) without '..'");
        }
    }
    let vip_cidr = field("dns.vip_cidr", parse_cidr(&file.dns.vip_cidr))?;
    if vip_cidr.prefix_len > 30 {
        bail!(
            "dns.vip_cidr: /{} leaves no usable VIPs (network and broadcast are never handed out); use /30 or shorter",
            vip_cidr.prefix_len
        );
    }
    if let Some(why) =
        gateway_common::contract::forbidden_vip_range(vip_cidr.network, vip_cidr.prefix_len)
    {
        bail!("dns.vip_cidr: {vip_cidr} cannot hold VIPs: {why}");
    }
    if vip_cidr.prefix_len < 16 {
        bail!(
            "dns.vip_cidr: /{} is larger than the VIP table (65,536 entries); use /16 or longer",
            vip_cidr.prefix_len
        );
    }
    // The module accepts 0 (the seed's schema); under the gateway an
    // answer that cannot be cached would re-ask for every connection.
    let max_ttl = gateway_common::contract::MAX_TTL_SECS;
    if file.dns.ttl == 0 || file.dns.ttl > max_ttl {
        bail!(
            "dns.ttl: {} must be between 1 and {max_ttl} seconds",
            file.dns.ttl
        );
    }
    if let Some(idle) = file.dns.reclaim_idle_after {
        let floor = gateway_common::contract::reclaim_idle_floor(file.dns.ttl);
        if idle < floor {
            bail!(
                "dns.reclaim_idle_after: {idle} s is too short: clients may cache an answer for the TTL; use at least {floor} s"
            );
        }
    }
    if let Some(admin) = &file.listeners.admin {
        bail!(
            "listeners.admin: {admin:?} is no longer accepted: Envoy's admin interface (which shows every \
             token and can stop Envoy) is now a Unix socket in the gateway's state directory, reachable \
             by root only; remove this line"
        );
    }
    let dns_listener = field("listeners.dns", parse_socket_addr(&file.listeners.dns))?;
    let tcp_listener = field("listeners.tcp", parse_socket_addr(&file.listeners.tcp))?;
    for (name, addr) in [
        ("listeners.dns", dns_listener),
        ("listeners.tcp", tcp_listener),
    ] {
        if vip_cidr.contains(*addr.ip()) {
            bail!("{name}: {addr} lies inside dns.vip_cidr {vip_cidr}");
        }
        if addr.port() == 0 {
            bail!("{name}: {addr} needs a fixed port (the kernel redirects to it)");
        }
        if !addr.ip().is_loopback() {
            bail!(
                "{name}: {addr} is not a loopback address: the listener would be open to the network \
                 (the TCP listener tunnels with the domains' credentials to whoever connects); use 127.0.0.1"
            );
        }
    }
    let metrics_listener = match &file.listeners.metrics {
        None => None,
        Some(text) => {
            let addr = field("listeners.metrics", parse_socket_addr(text))?;
            let taken = [dns_listener, tcp_listener].iter().any(|l| {
                l.port() == addr.port() && (l.ip() == addr.ip() || addr.ip().is_unspecified())
            });
            if taken {
                bail!("listeners.metrics: {addr} collides with the DNS or TCP listener");
            }
            if vip_cidr.contains(*addr.ip()) {
                bail!("listeners.metrics: {addr} lies inside dns.vip_cidr {vip_cidr}");
            }
            Some(addr)
        }
    };
    let fallback = if file.dns.fallback.is_empty() {
        system_resolvers()?
    } else {
        file.dns
            .fallback
            .iter()
            .enumerate()
            .map(|(i, r)| field(&format!("dns.fallback[{i}]"), parse_resolver_addr(r)))
            .collect::<Result<_>>()?
    };
    for (i, resolver) in fallback.iter().enumerate() {
        let own = match resolver {
            SocketAddr::V4(v4) => *v4 == dns_listener,
            SocketAddr::V6(v6) => {
                v6.ip().to_ipv4_mapped() == Some(*dns_listener.ip())
                    && v6.port() == dns_listener.port()
                    || (v6.ip().is_loopback() && v6.port() == dns_listener.port())
            }
        };
        if own {
            bail!("dns.fallback[{i}]: {resolver} is the gateway's own DNS listener (queries would loop)");
        }
        if resolver.port() == 0 {
            bail!("dns.fallback[{i}]: {resolver} needs a port");
        }
        let in_vips = match resolver.ip() {
            IpAddr::V4(v4) => vip_cidr.contains(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| vip_cidr.contains(v4)),
        };
        if in_vips {
            bail!("dns.fallback[{i}]: {resolver} lies inside dns.vip_cidr {vip_cidr}");
        }
    }

    let mut clusters = BTreeMap::new();
    if file.clusters.is_empty() {
        bail!("clusters: at least one upstream cluster is needed");
    }
    for (i, c) in file.clusters.iter().enumerate() {
        if c.name.is_empty()
            || !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_-.".contains(ch))
        {
            bail!(
                "clusters[{i}].name: {:?} must be non-empty letters, digits, '_', '-' or '.'",
                c.name
            );
        }
        if crate::envoy_bootstrap::RESERVED_CLUSTER_NAMES.contains(&c.name.as_str())
            || c.name == "-"
        {
            bail!(
                "clusters[{i}].name: {:?} is reserved for the gateway's own clusters ({}); choose another name",
                c.name,
                crate::envoy_bootstrap::RESERVED_CLUSTER_NAMES.join(", ")
            );
        }
        let address = field(
            &format!("clusters[{i}].address"),
            parse_socket_addr(&c.address),
        )?;
        if address.port() == 0 {
            bail!("clusters[{i}].address: {address} needs a port");
        }
        if vip_cidr.contains(*address.ip()) {
            bail!("clusters[{i}].address: {address} lies inside dns.vip_cidr {vip_cidr} (connections to it would be redirected back)");
        }
        if clusters.insert(c.name.clone(), address).is_some() {
            bail!("clusters[{i}].name: {:?} is defined twice", c.name);
        }
    }

    if file.domains.is_empty() {
        bail!("domains: at least one domain pattern is needed");
    }
    let mut seen = BTreeMap::new();
    for (i, d) in file.domains.iter().enumerate() {
        let normalized = field(
            &format!("domains[{i}].domain"),
            gateway_common::pattern::validate_pattern(&d.domain),
        )?;
        if let Some(first) = seen.insert(normalized.clone(), i) {
            bail!(
                "domains[{i}].domain: {:?} repeats domains[{first}]",
                d.domain
            );
        }
        match d.metadata.get("cluster") {
            None => bail!(
                "domains[{i}].metadata.cluster: missing; name one of the clusters ({})",
                clusters.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            Some(name) if !clusters.contains_key(name) => bail!(
                "domains[{i}].metadata.cluster: {name:?} is not a defined cluster ({})",
                clusters.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            Some(_) => {}
        }
    }
    if !(1..=86_400).contains(&file.tunnel.idle_timeout) {
        bail!(
            "tunnel.idle_timeout: {} must be between 1 and 86400 seconds",
            file.tunnel.idle_timeout
        );
    }
    if !(1..=300).contains(&file.tunnel.connect_timeout) {
        bail!(
            "tunnel.connect_timeout: {} must be between 1 and 300 seconds",
            file.tunnel.connect_timeout
        );
    }
    // Longer than the TCP connect timeout, so that a proxy that cannot be
    // reached is counted as such (upstream_cx_connect_timeout), not as a
    // CONNECT left unanswered.
    if !(file.tunnel.connect_timeout + 1..=3600).contains(&file.tunnel.connect_response_timeout) {
        bail!(
            "tunnel.connect_response_timeout: {} must be longer than tunnel.connect_timeout ({}) and at most 3600 seconds",
            file.tunnel.connect_response_timeout,
            file.tunnel.connect_timeout
        );
    }
    for (header, key) in &file.tunnel.headers {
        field(
            &format!("tunnel.headers.{header}"),
            gateway_common::contract::check_tunnel_header(header),
        )?;
        if !file.domains.iter().any(|d| d.metadata.contains_key(key)) {
            bail!("tunnel.headers.{header}: no domain has metadata key {key:?}");
        }
    }

    let ipv6 = match file.listeners.ipv6 {
        Some(false) => false,
        Some(true) => {
            if !ipv6_loopback_available() {
                bail!("listeners.ipv6: true, but this host cannot bind [::1] (IPv6 disabled?); set it to false or leave it out");
            }
            true
        }
        None => ipv6_loopback_available(),
    };
    let vip6_prefix = match &file.dns.vip_ipv6_prefix {
        None => None,
        Some(text) => {
            let prefix = field(
                "dns.vip_ipv6_prefix",
                gateway_common::contract::parse_vip6_prefix(text),
            )?;
            if !ipv6 {
                bail!("dns.vip_ipv6_prefix: IPv6 VIPs need Envoy's IPv6 listeners, and listeners.ipv6 is off or [::1] cannot be bound here");
            }
            Some(prefix)
        }
    };
    let config = Config {
        file,
        vip_cidr,
        dns_listener,
        tcp_listener,
        dns_tcp_listener: dns_listener,
        ipv6,
        vip6_prefix,
        fallback,
        clusters,
        metrics_listener,
    };
    module_accepts(&config)?;
    Ok(config)
}

/// The configuration field a filter-config field of the module comes from.
fn file_field(module_field: &str) -> String {
    let head = module_field
        .split(['.', '['])
        .next()
        .unwrap_or(module_field);
    match head {
        "base_ip" | "prefix_len" | "max_entries" => "dns.vip_cidr".to_owned(),
        "ttl"
        | "reclaim_idle_after"
        | "max_new_vips_per_second"
        | "new_vip_burst"
        | "on_exhausted" => {
            format!("dns.{module_field}")
        }
        _ => module_field.to_owned(),
    }
}

/// Runs the module's own parsers on the filter configurations this
/// configuration generates, so that `gateway run` refuses, before Envoy
/// starts and naming the field, everything the module would refuse.
fn module_accepts(config: &Config) -> Result<()> {
    let dns = crate::envoy_bootstrap::dns_gateway_config(config).to_string();
    if let Err(e) = connectivity_envoy_module::config::parse_dns_gateway(dns.as_bytes()) {
        let (module_field, problem) = e.split_once(": ").unwrap_or(("config", e.as_str()));
        bail!(
            "{}: {problem} (refused by the Envoy module's {} filter as `{module_field}`)",
            file_field(module_field),
            gateway_common::contract::DNS_GATEWAY_FILTER
        );
    }
    let lookup = crate::envoy_bootstrap::cache_lookup_config(config).to_string();
    if let Err(e) = connectivity_envoy_module::config::parse_cache_lookup(lookup.as_bytes()) {
        bail!(
            "{e} (refused by the Envoy module's {} filter)",
            gateway_common::contract::CACHE_LOOKUP_FILTER
        );
    }
    Ok(())
}

/// The IPv4 nameservers of /etc/resolv.conf, port 53.
/// Whether this host (network namespace) can bind the IPv6 loopback.
fn ipv6_loopback_available() -> bool {
    std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

fn system_resolvers() -> Result<Vec<SocketAddr>> {
    let text = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    // A link-local IPv6 nameserver with a zone (fe80::1%eth0) does not
    // parse and is skipped: Envoy's clusters take no zone.
    let found: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if found.is_empty() {
        bail!("dns.fallback: empty, and /etc/resolv.conf names no usable nameserver; list resolvers for unmatched names");
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(replace: &str, by: &str) -> String {
        assert!(
            DEFAULT_CONFIG.contains(replace),
            "default config lacks {replace:?}"
        );
        DEFAULT_CONFIG.replacen(replace, by, 1)
    }

    #[test]
    fn reload_changes_name_what_changes_and_refuse_the_rest() {
        let old = parse(DEFAULT_CONFIG).expect("default config");
        // (edit of the default, Ok(fields changed) or Err(text in the refusal))
        type Expected = Result<&'static [&'static str], &'static str>;
        let table: &[(&str, &str, Expected)] = &[
            ("abc123", "abc123", Ok(&[])),
            ("abc123", "rotated", Ok(&["domains"])),
            (
                "address = \"127.0.0.1:18002\"",
                "address = \"127.0.0.1:18003\"",
                Ok(&["clusters"]),
            ),
            (
                "fallback = []",
                "fallback = [\"192.0.2.53:53\"]",
                Ok(&["dns.fallback"]),
            ),
            (
                "# gate = [\"app-1\", \"app-2\"]",
                "gate = [\"app-1\"]",
                Ok(&["gate"]),
            ),
            (
                "vip_cidr = \"10.10.0.0/24\"",
                "vip_cidr = \"10.20.0.0/24\"",
                Err("dns.vip_cidr cannot change"),
            ),
            ("ttl = 300", "ttl = 60", Err("dns.ttl cannot change")),
            (
                "tcp = \"127.0.0.1:15001\"",
                "tcp = \"127.0.0.1:15002\"",
                Err("listeners.tcp"),
            ),
            (
                "cgroup = \"dns-egress-gateway\"",
                "cgroup = \"other\"",
                Err("cgroup cannot change"),
            ),
            (
                "pin_dir = \"/sys/fs/bpf/dns-egress-gateway\"",
                "pin_dir = \"/sys/fs/bpf/other\"",
                Err("pin_dir"),
            ),
        ];
        for (replace, by, expected) in table {
            let new = parse(&with(replace, by)).expect("edited config parses");
            match (reload_changes(&old, &new), expected) {
                (Ok(changes), Ok(fields)) => assert_eq!(&changes, fields, "{by}"),
                (Err(e), Err(text)) => {
                    let e = format!("{e:#}");
                    assert!(e.contains(text) && e.contains("restart"), "{by}: {e}");
                }
                (got, want) => panic!("{by}: got {got:?}, expected {want:?}"),
            }
        }
    }

    fn error_of(text: &str) -> String {
        format!(
            "{:#}",
            parse(text).expect_err("configuration must be rejected")
        )
    }

    #[test]
    fn default_configuration_is_valid_and_is_the_seed_example() {
        let config = parse(DEFAULT_CONFIG).expect("default is valid");
        assert_eq!(config.vip_cidr.to_string(), "10.10.0.0/24");
        let patterns: Vec<_> = config
            .file
            .domains
            .iter()
            .map(|d| d.domain.as_str())
            .collect();
        assert_eq!(patterns, ["*.aws.com", "example.com"]);
        assert_eq!(config.file.domains[0].metadata["cluster"], "cluster_1");
        assert_eq!(config.file.domains[0].metadata["auth_token"], "abc123");
        assert_eq!(config.file.domains[1].metadata["cluster"], "cluster_2");
        assert_eq!(config.clusters.len(), 2);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (with("10.10.0.0/24", "10.10.0.1/24"), "dns.vip_cidr"),
            (with("10.10.0.0/24", "10.10.0.0/31"), "dns.vip_cidr"),
            (with("ttl = 300", "ttl = 0"), "dns.ttl"),
            (
                with("idle_timeout = 3600", "idle_timeout = 0"),
                "tunnel.idle_timeout",
            ),
            (
                with("connect_timeout = 5", "connect_timeout = 9999"),
                "tunnel.connect_timeout",
            ),
            (
                with(
                    "connect_response_timeout = 10",
                    "connect_response_timeout = 5",
                ),
                "tunnel.connect_response_timeout",
            ),
            (
                with(
                    "connect_response_timeout = 10",
                    "connect_response_timeout = 3601",
                ),
                "tunnel.connect_response_timeout",
            ),
            (
                with("outage = \"pass\"", "outage = \"maybe\""),
                "unknown variant `maybe`",
            ),
            (
                with("ttl = 300", "ttl = 300\nreclaim_idle_after = 400"),
                "dns.reclaim_idle_after",
            ),
            (with("127.0.0.1:15053", "localhost:53"), "listeners.dns"),
            (with("127.0.0.1:15001", "10.10.0.5:15001"), "listeners.tcp"),
            (
                with("\"*.aws.com\"", "\"*.*.aws.com\""),
                "domains[0].domain",
            ),
            (
                with("\"example.com\"", "\"exa mple.com\""),
                "domains[1].domain",
            ),
            (
                with("cluster = \"cluster_2\"", "cluster = \"nowhere\""),
                "domains[1].metadata.cluster",
            ),
            (with("127.0.0.1:18001", "127.0.0.1"), "clusters[0].address"),
            (
                with("name = \"cluster_2\"", "name = \"cluster_1\""),
                "clusters[1].name",
            ),
            (with("cgroup = ", "cgroupz = "), "unknown field `cgroupz`"),
            (
                format!(
                    "{DEFAULT_CONFIG}\n[[clusters]]\nname = \"dns_fallback_udp\"\naddress = \"127.0.0.1:18009\"\n"
                ),
                "is reserved",
            ),
            (
                format!(
                    "{DEFAULT_CONFIG}\n[[clusters]]\nname = \"no_matching_domain\"\naddress = \"127.0.0.1:18009\"\n"
                ),
                "is reserved",
            ),
            (
                with("[listeners]", "[listeners]\nmetrics = \"127.0.0.1:15001\""),
                "listeners.metrics",
            ),
            (
                with("\"auth_token\"", "\"missing_key\""),
                "tunnel.headers.X-Auth-Token",
            ),
            (
                with("fallback = []", "fallback = [\"127.0.0.1:15053\"]"),
                "dns.fallback[0]",
            ),
            // What the module or Envoy would refuse, refused here first.
            (
                with("auth_token = \"abc123\"", "\"bad key\" = \"abc123\""),
                "domains[0].metadata.bad key",
            ),
            (
                with("\"abc123\"", "\"abc\\r\\nX-Injected: 1\""),
                "domains[0].metadata.auth_token",
            ),
            (
                with("ttl = 300", "ttl = 300\nreclaim_idle_after = 3456000"),
                "dns.reclaim_idle_after",
            ),
            (with("\"X-Auth-Token\"", "\"Host\""), "tunnel.headers.Host"),
            (
                with("\"X-Auth-Token\"", "\":authority\""),
                "tunnel.headers.:authority",
            ),
            (
                with(
                    "pin_dir = \"/sys/fs/bpf/dns-egress-gateway\"",
                    "pin_dir = \"\"",
                ),
                "pin_dir",
            ),
            (
                with(
                    "pin_dir = \"/sys/fs/bpf/dns-egress-gateway\"",
                    "pin_dir = \"/sys/fs/bpf\"",
                ),
                "pin_dir",
            ),
            (
                with(
                    "pin_dir = \"/sys/fs/bpf/dns-egress-gateway\"",
                    "pin_dir = \"gw\"",
                ),
                "pin_dir",
            ),
            (with("127.0.0.1:15001", "0.0.0.0:15001"), "listeners.tcp"),
            (with("127.0.0.1:15053", "192.0.2.1:15053"), "listeners.dns"),
            (
                with(
                    "tcp = \"127.0.0.1:15001\"",
                    "tcp = \"127.0.0.1:15001\"\nadmin = \"127.0.0.1:15000\"",
                ),
                "listeners.admin",
            ),
            (with("10.10.0.0/24", "127.0.0.0/24"), "dns.vip_cidr"),
            (with("10.10.0.0/24", "0.0.0.0/24"), "dns.vip_cidr"),
            (with("10.10.0.0/24", "224.0.0.0/24"), "dns.vip_cidr"),
            (
                with("127.0.0.1:18001", "10.10.0.9:18001"),
                "clusters[0].address",
            ),
            (
                with("fallback = []", "fallback = [\"10.10.0.53:53\"]"),
                "dns.fallback[0]",
            ),
            (
                with(
                    "max_new_vips_per_second = 50",
                    "max_new_vips_per_second = 0",
                ),
                "dns.max_new_vips_per_second",
            ),
            (with("ttl = 300", "ttl = 9999999"), "dns.ttl"),
        ];
        for (text, field) in cases {
            let err = error_of(&text);
            assert!(err.contains(field), "expected {field:?} in {err:?}");
        }
    }

    #[test]
    fn fallback_resolvers_of_either_family() {
        let with_fallback = |list: &str| with("fallback = []", &format!("fallback = [{list}]"));
        let config = parse(&with_fallback("\"[2001:db8::53]:53\", \"192.0.2.53:53\""))
            .expect("IPv6 and IPv4 resolvers");
        assert_eq!(config.fallback.len(), 2);
        assert!(config.fallback[0].is_ipv6());
        // (list, what the error names)
        let cases = [
            ("\"[::1]:15053\"", "own DNS listener"),
            ("\"[::ffff:127.0.0.1]:15053\"", "own DNS listener"),
            ("\"[::ffff:10.10.0.9]:53\"", "inside dns.vip_cidr"),
            ("\"[2001:db8::53]\"", "expected address and port"),
        ];
        for (list, why) in cases {
            let err = error_of(&with_fallback(list));
            assert!(
                err.contains("dns.fallback[0]") && err.contains(why),
                "{list}: {err}"
            );
        }
    }

    #[test]
    fn ipv6_vip_ranges_are_checked() {
        let prefix = |value: &str| {
            with(
                "vip_cidr = \"10.10.0.0/24\"",
                &format!("vip_cidr = \"10.10.0.0/24\"\nvip_ipv6_prefix = \"{value}\""),
            )
        };
        // (value, accepted with IPv6 loopback?, what the error names)
        let cases = [
            ("fd00:6a7e::/96", true, ""),
            ("fd00:6a7e::/64", false, "only /96"),
            ("fd00:6a7e::1/96", false, "last 32 bits"),
            ("::ffff:0:0/96", false, "::/8"),
            ("ff02::/96", false, "multicast"),
            ("10.10.0.0/96", false, "not an IPv6 address"),
            ("fd00:6a7e::", false, "not an IPv6 prefix"),
        ];
        for (value, ok, why) in cases {
            let result = parse(&prefix(value));
            if ok {
                if ipv6_loopback_available() {
                    let config = result.expect("a good prefix is accepted");
                    assert_eq!(config.vip6_prefix, Some("fd00:6a7e::".parse().unwrap()));
                }
            } else {
                let err = format!("{:#}", result.expect_err(value));
                assert!(
                    err.contains("dns.vip_ipv6_prefix") && err.contains(why),
                    "{value}: {err}"
                );
            }
        }
        // IPv6 VIPs need the IPv6 listeners.
        let off = prefix("fd00:6a7e::/96").replacen(
            "tcp = \"127.0.0.1:15001\"",
            "tcp = \"127.0.0.1:15001\"\nipv6 = false",
            1,
        );
        let err = error_of(&off);
        assert!(err.contains("listeners.ipv6"), "{err}");
    }

    #[test]
    fn toml_syntax_errors_say_where() {
        let err = error_of("cgroup = ");
        assert!(err.contains("line 1"), "{err}");
    }
}
