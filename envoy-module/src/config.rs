//! Filter configurations: parsing and validation.
//!
//! Envoy hands a `google.protobuf.Struct` filter config over as compact
//! JSON, numbers as floats (`24.0`); integral floats are accepted wherever
//! an integer is expected. Every problem is reported as `field: problem`,
//! naming the field (`domains[2].metadata.cluster`, `prefix_len`, …), and
//! unknown fields are rejected so that a typo does not go unnoticed.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use gateway_common::{
    contract::{
        self, DEFAULT_MAX_NEW_VIPS_PER_SECOND, DEFAULT_NEW_VIP_BURST, MAX_NEW_VIP_RATE,
        MAX_RECLAIM_IDLE_SECS, MAX_TTL_SECS,
    },
    DEFAULT_PIN_DIR, VIP_TABLE_CAPACITY,
};
use serde_json::{Map, Value};

use crate::{
    allocator::Pool,
    matcher::{normalize, DomainRule, Pattern, PatternSet},
};

/// Default TTL of answers (and of the negative-answer SOA), in seconds.
pub const DEFAULT_TTL: u32 = 300;

pub use gateway_common::contract::MIN_RECLAIM_IDLE_SECS;

/// Settings of the `dns_gateway` UDP listener filter.
#[derive(Clone, Debug)]
pub struct DnsGatewaySettings {
    /// Where VIPs come from and how many may be handed out.
    pub pool: Pool,
    /// The configured domains.
    pub patterns: PatternSet,
    /// TTL of A answers and of the SOA in negative answers.
    pub ttl: u32,
    /// Directory of the gateway's pinned maps; without a pinned VIP map the
    /// VIP table lives in this process only (unless required).
    pub pin_dir: PathBuf,
    /// The pinned VIP map must exist (as under `gateway run`): the config is
    /// refused without it, and a lost map means SERVFAIL, never a silent
    /// fall-back to an in-process table that would hand out VIPs again.
    pub require_pinned_maps: bool,
    /// Test hook: a query for this (normalised) name panics inside the
    /// filter, to show that a panic never takes Envoy down.
    pub debug_panic_on_domain: Option<String>,
    /// IPv6 VIP range (a /96): a matched AAAA query is answered with this
    /// prefix followed by the name's IPv4 VIP. `None`: AAAA gets NODATA.
    pub vip6_prefix: Option<std::net::Ipv6Addr>,
    /// With the pool full (and nothing reclaimable): pass the query on to
    /// the next filter (the real resolver: the name then resolves to its
    /// real address) instead of answering SERVFAIL.
    pub pass_on_exhausted: bool,
    /// Where the domains came from when not inline: a JSON file with the
    /// `domains` array, watched and applied again whenever it is replaced
    /// (`gateway reload`), see [`crate::reload`].
    pub domains_file: Option<PathBuf>,
    /// Where each applied domains file is acknowledged (default: the
    /// file's path + `.applied`); under `gateway run`, in Envoy's own
    /// directory, the only one it may write.
    pub domains_ack: Option<PathBuf>,
    /// The version of the domains file read at load (what was applied).
    pub domains_version: Option<crate::reload::FileVersion>,
}

/// What `cache_lookup` does with a connection whose VIP it cannot resolve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMiss {
    /// Log, count and let the connection go on (the seed's behaviour).
    Continue,
    /// Log, count and close the connection.
    Close,
}

/// Where `cache_lookup` learns which VIP a connection dialled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationSource {
    /// Only the original destination the gateway's kernel programs
    /// recorded (consumed once): a connection the gateway did not redirect
    /// gets no domain. What `gateway run` uses.
    PinnedMap,
    /// Only the connection's local address (the seed's iptables DNAT with
    /// `original_dst`).
    LocalAddress,
    /// The recorded original destination, else the local address (works in
    /// both set-ups; the default, for the seed's configuration).
    Either,
}

/// Longest `connect_response_timeout_ms` of `cache_lookup` (one hour).
pub const MAX_CONNECT_RESPONSE_TIMEOUT_MS: u64 = 3_600_000;

/// Settings of the `cache_lookup` network filter.
#[derive(Clone, Debug)]
pub struct CacheLookupSettings {
    /// Miss behaviour.
    pub on_miss: OnMiss,
    /// Where the dialled VIP comes from.
    pub destination_from: DestinationSource,
    /// The pinned maps must exist: the config is refused without them.
    pub require_pinned_maps: bool,
    /// Pinned-map directory; `None` = the one of the latest `dns_gateway`
    /// config (or the default when there is none).
    pub pin_dir: Option<PathBuf>,
    /// Also select the tcp_proxy cluster from the `cluster` metadata through
    /// the typed filter state `envoy.tcp_proxy.cluster`.
    pub set_tcp_proxy_cluster: bool,
    /// Close a connection whose upstream is not ready this long after it
    /// was accepted: the TCP connect to the proxy and its answer to the
    /// CONNECT together (Envoy 1.40's tcp_proxy has no such timeout).
    pub connect_response_timeout: Option<std::time::Duration>,
    /// Clusters that get a timeout counter of their own.
    pub clusters: Vec<String>,
}

impl Default for CacheLookupSettings {
    fn default() -> Self {
        Self {
            on_miss: OnMiss::Continue,
            destination_from: DestinationSource::Either,
            require_pinned_maps: false,
            pin_dir: None,
            set_tcp_proxy_cluster: false,
            connect_response_timeout: None,
            clusters: Vec::new(),
        }
    }
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("config: not valid JSON ({e}); expected a google.protobuf.Struct"))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(format!("config: expected an object, got {}", kind(&other))),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn reject_unknown(map: &Map<String, Value>, prefix: &str, known: &[&str]) -> Result<(), String> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(format!(
            "{prefix}{key}: unknown field (known: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

fn string<'a>(value: &'a Value, field: &str) -> Result<&'a str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("{field}: expected a string, got {}", kind(value)))
}

/// An integer in `min..=max`, given as a JSON integer or an integral float.
fn integer(value: &Value, field: &str, min: u64, max: u64) -> Result<u64, String> {
    let number = if let Some(n) = value.as_u64() {
        Some(n)
    } else if let Some(f) = value.as_f64() {
        (f.fract() == 0.0 && f >= 0.0 && f <= u64::MAX as f64).then_some(f as u64)
    } else {
        return Err(format!("{field}: expected an integer, got {}", kind(value)));
    };
    match number {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "{field}: expected an integer from {min} to {max}, got {value}"
        )),
    }
}

fn path(value: &Value, field: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(string(value, field)?);
    contract::check_pin_dir(&path).map_err(|e| format!("{field}: {e}"))?;
    Ok(path)
}

fn boolean(value: &Value, field: &str) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("{field}: expected a boolean, got {}", kind(value)))
}

fn metadata(value: &Value, field: &str) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "{field}: expected an object of strings, got {}",
            kind(value)
        ));
    };
    map.iter()
        .map(|(key, value)| {
            contract::check_metadata_key(key).map_err(|e| format!("{field}.{key}: {e}"))?;
            let text = string(value, &format!("{field}.{key}"))?;
            contract::check_metadata_value(text).map_err(|e| format!("{field}.{key}: {e}"))?;
            Ok((key.clone(), text.to_owned()))
        })
        .collect()
}

fn domains(value: &Value) -> Result<PatternSet, String> {
    let Value::Array(items) = value else {
        return Err(format!("domains: expected an array, got {}", kind(value)));
    };
    let mut rules = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("domains[{i}]");
        let Value::Object(entry) = item else {
            return Err(format!("{field}: expected an object, got {}", kind(item)));
        };
        reject_unknown(entry, &format!("{field}."), &["domain", "metadata"])?;
        let domain = entry
            .get("domain")
            .ok_or_else(|| format!("{field}.domain: missing"))?;
        let pattern = Pattern::parse(string(domain, &format!("{field}.domain"))?)
            .map_err(|e| format!("{field}.domain: {e}"))?;
        let metadata = match entry.get("metadata") {
            Some(value) => metadata(value, &format!("{field}.metadata"))?,
            None => BTreeMap::new(),
        };
        rules.push(DomainRule { pattern, metadata });
    }
    PatternSet::new(rules)
}

/// Parses and validates a `dns_gateway` config.
pub fn parse_dns_gateway(bytes: &[u8]) -> Result<DnsGatewaySettings, String> {
    let map = parse_object(bytes)?;
    reject_unknown(
        &map,
        "",
        &[
            "base_ip",
            "prefix_len",
            "domains",
            "ttl",
            "pin_dir",
            "max_entries",
            "reclaim_idle_after",
            "max_new_vips_per_second",
            "new_vip_burst",
            "require_pinned_maps",
            "debug_panic_on_domain",
            "vip_ipv6_prefix",
            "on_exhausted",
            "domains_file",
            "domains_ack",
        ],
    )?;
    let base_ip = map.get("base_ip").ok_or("base_ip: missing")?;
    let base_ip: Ipv4Addr = string(base_ip, "base_ip")?
        .parse()
        .map_err(|_| format!("base_ip: {base_ip} is not an IPv4 address"))?;
    let prefix_len = map.get("prefix_len").ok_or("prefix_len: missing")?;
    // /31 and /32 have no address besides the network and broadcast ones.
    let prefix_len = integer(prefix_len, "prefix_len", 1, 30)? as u8;
    if let Some(why) = contract::forbidden_vip_range(base_ip, prefix_len) {
        // Loud, not fatal: the seed's own set-ups (and tests without a
        // kernel redirect) use loopback VIPs. `gateway run` refuses them.
        crate::api::log(
            crate::api::LogLevel::Warn,
            &format!("dns_gateway: base_ip {base_ip}/{prefix_len} is a poor VIP range: {why}"),
        );
    }
    let usable = Pool::usable_hosts(prefix_len);
    let default_max = usable.min(u64::from(VIP_TABLE_CAPACITY));
    let max_entries = match map.get("max_entries") {
        Some(value) => integer(value, "max_entries", 1, default_max)?,
        None => default_max,
    };
    let pool =
        Pool::new(base_ip, prefix_len, max_entries as u32).map_err(|e| format!("base_ip: {e}"))?;
    let (patterns, domains_file, domains_version) =
        match (map.get("domains"), map.get("domains_file")) {
            (Some(inline), None) => (domains(inline)?, None, None),
            (None, Some(file)) => {
                let file = PathBuf::from(string(file, "domains_file")?);
                if !file.is_absolute() {
                    return Err(format!(
                        "domains_file: {} must be an absolute path",
                        file.display()
                    ));
                }
                let (patterns, version) = read_domains_file(&file)?;
                (patterns, Some(file), Some(version))
            }
            (Some(_), Some(_)) => {
                return Err("domains, domains_file: give one of them, not both".to_owned())
            }
            (None, None) => return Err("domains: missing (or give domains_file)".to_owned()),
        };
    let ttl = match map.get("ttl") {
        Some(value) => integer(value, "ttl", 0, u64::from(MAX_TTL_SECS))? as u32,
        None => DEFAULT_TTL,
    };
    // Reclaiming a VIP a client may still cache would misroute it: the idle
    // time must be well beyond the answer TTL.
    let reclaim_floor = gateway_common::contract::reclaim_idle_floor(ttl);
    let reclaim_idle_after = match map.get("reclaim_idle_after") {
        Some(value) => Some(Duration::from_secs(integer(
            value,
            "reclaim_idle_after",
            reclaim_floor,
            MAX_RECLAIM_IDLE_SECS,
        )?)),
        None => None,
    };
    let rate = |name: &str, default: u32| match map.get(name) {
        Some(value) => integer(value, name, 1, u64::from(MAX_NEW_VIP_RATE)).map(|n| n as u32),
        None => Ok(default),
    };
    let per_second = rate("max_new_vips_per_second", DEFAULT_MAX_NEW_VIPS_PER_SECOND)?;
    let burst = rate("new_vip_burst", DEFAULT_NEW_VIP_BURST)?;
    let pool = pool
        .with_reclaim_idle_after(reclaim_idle_after)
        .with_new_vip_rate(per_second, burst);
    let require_pinned_maps = match map.get("require_pinned_maps") {
        Some(value) => boolean(value, "require_pinned_maps")?,
        None => false,
    };
    let pin_dir = match map.get("pin_dir") {
        Some(value) => path(value, "pin_dir")?,
        None => PathBuf::from(DEFAULT_PIN_DIR),
    };
    let debug_panic_on_domain = match map.get("debug_panic_on_domain") {
        Some(value) => Some(
            normalize(string(value, "debug_panic_on_domain")?)
                .ok_or("debug_panic_on_domain: not a valid domain name")?,
        ),
        None => None,
    };
    let vip6_prefix = match map.get("vip_ipv6_prefix") {
        Some(value) => {
            let text = string(value, "vip_ipv6_prefix")?;
            Some(contract::parse_vip6_prefix(text).map_err(|e| format!("vip_ipv6_prefix: {e}"))?)
        }
        None => None,
    };
    let pass_on_exhausted = match map.get("on_exhausted") {
        None => false,
        Some(value) => match string(value, "on_exhausted")? {
            "servfail" => false,
            "pass" => true,
            other => {
                return Err(format!(
                    "on_exhausted: {other:?} is neither \"servfail\" nor \"pass\""
                ))
            }
        },
    };
    let domains_ack = match map.get("domains_ack") {
        None => None,
        Some(value) => {
            let ack = PathBuf::from(string(value, "domains_ack")?);
            if !ack.is_absolute() || domains_file.is_none() {
                return Err(format!(
                    "domains_ack: {} must be an absolute path, and goes with domains_file",
                    ack.display()
                ));
            }
            Some(ack)
        }
    };
    Ok(DnsGatewaySettings {
        pool,
        patterns,
        ttl,
        pin_dir,
        require_pinned_maps,
        debug_panic_on_domain,
        vip6_prefix,
        pass_on_exhausted,
        domains_file,
        domains_ack,
        domains_version,
    })
}

/// Reads a domains file: the JSON `domains` array of a `dns_gateway`
/// config, alone. Returns the patterns and the version read (inode, time,
/// size and the digest of the very bytes parsed: what `gateway reload`
/// waits to see acknowledged).
pub fn read_domains_file(
    path: &std::path::Path,
) -> Result<(PatternSet, crate::reload::FileVersion), String> {
    read_domains_file_versioned(path).map_err(|(e, _)| e)
}

/// A failed read of a domains file: why, and the version read if any.
pub type DomainsFileError = (String, Option<crate::reload::FileVersion>);

/// [`read_domains_file`], with the version read kept on error.
pub fn read_domains_file_versioned(
    path: &std::path::Path,
) -> Result<(PatternSet, crate::reload::FileVersion), DomainsFileError> {
    let (bytes, version) = crate::reload::read_versioned(path).map_err(|e| {
        (
            format!("domains_file: cannot read {}: {e}", path.display()),
            None,
        )
    })?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        (
            format!("domains_file: {} is not JSON: {e}", path.display()),
            Some(version),
        )
    })?;
    let patterns = domains(&value).map_err(|e| {
        (
            format!("domains_file {}: {e}", path.display()),
            Some(version),
        )
    })?;
    Ok((patterns, version))
}

/// Parses and validates a `cache_lookup` config (empty or `{}` = defaults).
pub fn parse_cache_lookup(bytes: &[u8]) -> Result<CacheLookupSettings, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(CacheLookupSettings::default());
    }
    let map = parse_object(bytes)?;
    reject_unknown(
        &map,
        "",
        &[
            "on_miss",
            "destination_from",
            "require_pinned_maps",
            "pin_dir",
            "set_tcp_proxy_cluster",
            "connect_response_timeout_ms",
            "clusters",
        ],
    )?;
    let mut settings = CacheLookupSettings::default();
    if let Some(value) = map.get("on_miss") {
        settings.on_miss = match string(value, "on_miss")? {
            "continue" => OnMiss::Continue,
            "close" => OnMiss::Close,
            other => {
                return Err(format!(
                    "on_miss: expected \"continue\" or \"close\", got {other:?}"
                ))
            }
        };
    }
    if let Some(value) = map.get("destination_from") {
        settings.destination_from = match string(value, "destination_from")? {
            "pinned_map" => DestinationSource::PinnedMap,
            "local_address" => DestinationSource::LocalAddress,
            "either" => DestinationSource::Either,
            other => {
                return Err(format!(
                    "destination_from: expected \"pinned_map\", \"local_address\" or \"either\", got {other:?}"
                ))
            }
        };
    }
    if let Some(value) = map.get("require_pinned_maps") {
        settings.require_pinned_maps = boolean(value, "require_pinned_maps")?;
    }
    if let Some(value) = map.get("pin_dir") {
        settings.pin_dir = Some(path(value, "pin_dir")?);
    }
    if let Some(value) = map.get("set_tcp_proxy_cluster") {
        settings.set_tcp_proxy_cluster = boolean(value, "set_tcp_proxy_cluster")?;
    }
    if let Some(value) = map.get("connect_response_timeout_ms") {
        let ms = integer(
            value,
            "connect_response_timeout_ms",
            1,
            MAX_CONNECT_RESPONSE_TIMEOUT_MS,
        )?;
        settings.connect_response_timeout = Some(std::time::Duration::from_millis(ms));
    }
    if let Some(value) = map.get("clusters") {
        let list = value
            .as_array()
            .ok_or("clusters: expected a list of cluster names")?;
        for item in list {
            let name = string(item, "clusters")?;
            if name.is_empty() || name.len() > 200 {
                return Err(format!(
                    "clusters: {name:?} is not a cluster name (1 to 200 bytes)"
                ));
            }
            settings.clusters.push(name.to_owned());
        }
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const SEED: &str = r#"{"base_ip":"10.10.0.0","prefix_len":24.0,"domains":[
        {"domain":"*.aws.com","metadata":{"cluster":"cluster_1","auth_token":"abc123"}},
        {"domain":"example.com","metadata":{"cluster":"cluster_2","auth_token":"def456"}}]}"#;

    fn with(field: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(SEED).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    fn error(json: &str) -> String {
        parse_dns_gateway(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn domains_come_inline_or_from_one_absolute_file() {
        let dir = std::env::temp_dir().join(format!("gw-domains-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"[{"domain":"*.a.com","metadata":{"cluster":"c"}}]"#,
        )
        .unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"[{"domain":"a b"}]"#).unwrap();
        let without_domains = |file: Option<&Path>| {
            let mut v: Value = serde_json::from_str(SEED).unwrap();
            let map = v.as_object_mut().unwrap();
            map.remove("domains");
            if let Some(file) = file {
                map.insert(
                    "domains_file".into(),
                    Value::String(file.display().to_string()),
                );
            }
            v.to_string()
        };
        let loaded = parse_dns_gateway(without_domains(Some(&good)).as_bytes()).unwrap();
        assert_eq!(loaded.patterns.rules().len(), 1);
        assert_eq!(loaded.domains_file.as_deref(), Some(good.as_path()));
        let table: &[(String, &str)] = &[
            (
                with("domains_file", &format!("{:?}", good.display().to_string())),
                "not both",
            ),
            (without_domains(None), "domains: missing"),
            (
                without_domains(Some(Path::new("relative.json"))),
                "absolute",
            ),
            (
                without_domains(Some(&dir.join("missing.json"))),
                "cannot read",
            ),
            (without_domains(Some(&bad)), "domains[0].domain"),
        ];
        for (json, expected) in table {
            let e = error(json);
            assert!(e.contains(expected), "{json}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seed_config_parses_with_defaults() {
        let s = parse_dns_gateway(SEED.as_bytes()).unwrap();
        assert_eq!(s.pool.network(), Ipv4Addr::new(10, 10, 0, 0));
        assert_eq!(s.pool.prefix_len(), 24);
        assert_eq!(s.pool.max_entries(), 254);
        assert_eq!(s.ttl, DEFAULT_TTL);
        assert_eq!(s.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(s.patterns.rules().len(), 2);
        assert_eq!(s.patterns.rules()[0].metadata["auth_token"], "abc123");
        assert_eq!(s.debug_panic_on_domain, None);
    }

    #[test]
    fn optional_fields_are_read() {
        let mut v: Value = serde_json::from_str(SEED).unwrap();
        v["ttl"] = 60.0.into();
        v["max_entries"] = 3.into();
        v["pin_dir"] = "/tmp/pins".into();
        v["debug_panic_on_domain"] = "Panic.Test.".into();
        v["reclaim_idle_after"] = 3600.into();
        let s = parse_dns_gateway(v.to_string().as_bytes()).unwrap();
        assert_eq!((s.ttl, s.pool.max_entries()), (60, 3));
        assert_eq!(s.pool.reclaim_idle_after(), Some(Duration::from_secs(3600)));
        assert_eq!(s.pin_dir, PathBuf::from("/tmp/pins"));
        assert_eq!(s.debug_panic_on_domain.as_deref(), Some("panic.test"));
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (with("base_ip", "\"10.10.0\""), "base_ip"),
            (with("base_ip", "10"), "base_ip"),
            (with("base_ip", "\"10.10.0.7\""), "base_ip"),
            (with("prefix_len", "24.5"), "prefix_len"),
            (with("prefix_len", "31"), "prefix_len"),
            (with("prefix_len", "0"), "prefix_len"),
            (with("prefix_len", "\"24\""), "prefix_len"),
            (with("ttl", "-1"), "ttl"),
            (with("ttl", "1e9"), "ttl"),
            (with("max_entries", "255"), "max_entries"),
            (with("max_entries", "0"), "max_entries"),
            (with("reclaim_idle_after", "30"), "reclaim_idle_after"),
            (with("pin_dir", "\"\""), "pin_dir"),
            (with("pin_dir", "\"/sys/fs/bpf\""), "pin_dir"),
            (with("pin_dir", "\"relative\""), "pin_dir"),
            (
                with("max_new_vips_per_second", "0"),
                "max_new_vips_per_second",
            ),
            (with("new_vip_burst", "1e6"), "new_vip_burst"),
            (
                with("require_pinned_maps", "\"yes\""),
                "require_pinned_maps",
            ),
            (with("reclaim_idle_after", "2592001"), "reclaim_idle_after"),
            (
                with(
                    "domains",
                    "[{\"domain\":\"a.com\",\"metadata\":{\"t\":\"a\\r\\nX: y\"}}]",
                ),
                "domains[0].metadata.t",
            ),
            (with("domains", "{}"), "domains"),
            (
                with("domains", "[{\"domain\":\"a b\"}]"),
                "domains[0].domain",
            ),
            (with("domains", "[{\"metadata\":{}}]"), "domains[0].domain"),
            (
                with(
                    "domains",
                    "[{\"domain\":\"a.com\"},{\"domain\":\"*.x..com\"}]",
                ),
                "domains[1].domain",
            ),
            (
                with(
                    "domains",
                    "[{\"domain\":\"a.com\",\"metadata\":{\"port\":443}}]",
                ),
                "domains[0].metadata.port",
            ),
            (
                with(
                    "domains",
                    "[{\"domain\":\"a.com\",\"metadata\":{\"a b\":\"x\"}}]",
                ),
                "domains[0].metadata.a b",
            ),
            (
                with("domains", "[{\"domain\":\"a.com\",\"metdata\":{}}]"),
                "domains[0].metdata",
            ),
            (
                with("debug_panic_on_domain", "\"..\""),
                "debug_panic_on_domain",
            ),
            (with("tll", "5"), "tll"),
        ];
        for (json, field) in cases {
            let e = error(&json);
            assert!(e.starts_with(&format!("{field}:")), "{json} -> {e}");
        }
        assert!(error(r#"{"prefix_len":24,"domains":[]}"#).starts_with("base_ip: missing"));
        assert!(error(r#"{"base_ip":"10.0.0.0","domains":[]}"#).starts_with("prefix_len: missing"));
        assert!(error(r#"{"base_ip":"10.0.0.0","prefix_len":8}"#).starts_with("domains: missing"));
        assert!(error("not json").starts_with("config:"));
        assert!(error("[1]").starts_with("config:"));
        assert!(error("").starts_with("config:"));
    }

    #[test]
    fn cache_lookup_config() {
        let d = parse_cache_lookup(b"").unwrap();
        assert_eq!(
            (d.on_miss, d.pin_dir, d.set_tcp_proxy_cluster),
            (OnMiss::Continue, None, false)
        );
        assert_eq!(parse_cache_lookup(b"{}").unwrap().on_miss, OnMiss::Continue);
        let s = parse_cache_lookup(
            br#"{"on_miss":"close","pin_dir":"/x","set_tcp_proxy_cluster":true}"#,
        )
        .unwrap();
        assert_eq!(
            (s.on_miss, s.pin_dir, s.set_tcp_proxy_cluster),
            (OnMiss::Close, Some(PathBuf::from("/x")), true)
        );
        let t = parse_cache_lookup(
            br#"{"connect_response_timeout_ms":10000,"clusters":["cluster_1","cluster_2"]}"#,
        )
        .unwrap();
        assert_eq!(
            (t.connect_response_timeout, t.clusters),
            (
                Some(std::time::Duration::from_secs(10)),
                vec!["cluster_1".to_owned(), "cluster_2".to_owned()]
            )
        );
        assert_eq!(d.connect_response_timeout, None);
        for (json, field) in [
            (r#"{"on_miss":"drop"}"#, "on_miss"),
            (r#"{"pin_dir":3}"#, "pin_dir"),
            (
                r#"{"set_tcp_proxy_cluster":"yes"}"#,
                "set_tcp_proxy_cluster",
            ),
            (r#"{"onmiss":"close"}"#, "onmiss"),
            (r#"{"destination_from":"peer"}"#, "destination_from"),
            (r#"{"require_pinned_maps":1}"#, "require_pinned_maps"),
            (r#"{"pin_dir":""}"#, "pin_dir"),
            (
                r#"{"connect_response_timeout_ms":0}"#,
                "connect_response_timeout_ms",
            ),
            (
                r#"{"connect_response_timeout_ms":3600001}"#,
                "connect_response_timeout_ms",
            ),
            (
                r#"{"connect_response_timeout_ms":"10s"}"#,
                "connect_response_timeout_ms",
            ),
            (r#"{"clusters":"cluster_1"}"#, "clusters"),
            (r#"{"clusters":[""]}"#, "clusters"),
            (r#"{"clusters":[1]}"#, "clusters"),
        ] {
            let e = parse_cache_lookup(json.as_bytes()).unwrap_err();
            assert!(e.starts_with(&format!("{field}:")), "{json} -> {e}");
        }
    }
}
