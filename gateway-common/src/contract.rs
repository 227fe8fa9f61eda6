//! The contract between the gateway (`gateway-user`) and its Envoy module
//! (`envoy-module`): filter names, filter-state keys, and the rules every
//! configuration value must follow. Both sides use these definitions, so
//! `gateway run` refuses exactly what the module (or Envoy) would refuse,
//! before Envoy starts.

/// Name under which Envoy loads the module (`lib<name>.so`), as in the seed.
pub const MODULE_NAME: &str = "connectivity_envoy_module";

/// Filter name of the UDP listener filter that answers DNS with VIPs.
pub const DNS_GATEWAY_FILTER: &str = "dns_gateway";

/// Filter name of the network filter that maps a connection to its domain.
pub const CACHE_LOOKUP_FILTER: &str = "cache_lookup";

/// Filter name of the module's DNS-over-TCP network filter (answers
/// matched names, hands the rest to the tcp_proxy behind it).
pub const DNS_GATEWAY_TCP_FILTER: &str = "dns_gateway_tcp";

/// Name of the module's canned-reply UDP listener filter (the benchmark's
/// ceiling).
pub const DNS_REFLECTOR_FILTER: &str = "dns_reflector";

/// Prefix length of an IPv6 VIP range: the last 32 bits carry the IPv4
/// VIP a name was given, so A and AAAA answers stand for the same domain.
pub const VIP6_PREFIX_LEN: u8 = 96;

/// Filter-state key of the domain a connection dialled.
pub const DOMAIN_KEY: &str = "envoy.dns_gateway.domain";

/// Filter-state key of the port the client originally dialled.
pub const PORT_KEY: &str = "envoy.dns_gateway.port";

/// Prefix of the filter-state keys of a domain's metadata.
pub const METADATA_KEY_PREFIX: &str = "envoy.dns_gateway.metadata.";

/// Envoy's typed filter-state key selecting the tcp_proxy cluster.
pub const TCP_PROXY_CLUSTER_KEY: &str = "envoy.tcp_proxy.cluster";

/// Prefix Envoy gives the module's counters on `/stats`.
pub const STATS_PREFIX: &str = "dynamicmodulescustom.";

/// Largest TTL of an answer, seconds (one week).
pub const MAX_TTL_SECS: u32 = 604_800;

/// Longest `reclaim_idle_after`, seconds (30 days). It must also be at
/// least twice the TTL: a client may cache an answer for the TTL.
pub const MAX_RECLAIM_IDLE_SECS: u64 = 30 * 24 * 3600;

/// Shortest `reclaim_idle_after`, seconds. Longer than the second for
/// which an Envoy trusts its last check of a VIP against the shared map
/// (see the module's allocator): no reclaim can complete within it.
pub const MIN_RECLAIM_IDLE_SECS: u64 = 2;

/// The shortest `reclaim_idle_after` allowed with answers of `ttl`
/// seconds: twice the TTL (a client may cache an answer that long), and
/// never below [`MIN_RECLAIM_IDLE_SECS`].
pub fn reclaim_idle_floor(ttl: u32) -> u64 {
    (2 * u64::from(ttl)).max(MIN_RECLAIM_IDLE_SECS)
}

/// Most Envoy worker threads `gateway run` starts.
pub const MAX_CONCURRENCY: u32 = 128;

/// Default cap on new VIP allocations per second (per gateway).
pub const DEFAULT_MAX_NEW_VIPS_PER_SECOND: u32 = 50;

/// Default number of new VIPs that may be allocated at once before the
/// per-second cap applies.
pub const DEFAULT_NEW_VIP_BURST: u32 = 100;

/// Largest accepted allocation rate or burst.
pub const MAX_NEW_VIP_RATE: u32 = 100_000;

/// Longest metadata value, bytes (it may become an HTTP header value).
pub const MAX_METADATA_VALUE_LEN: usize = 4096;

/// Longest metadata key (it becomes part of a filter-state key).
pub const MAX_METADATA_KEY_LEN: usize = 128;

#[cfg(feature = "user")]
pub use checks::*;

#[cfg(feature = "user")]
mod checks {
    use std::{
        net::Ipv4Addr,
        path::{Component, Path},
    };

    use super::*;

    /// Metadata keys become filter-state keys
    /// (`envoy.dns_gateway.metadata.<key>`): letters, digits, `_`, `-`, `.`.
    pub fn check_metadata_key(key: &str) -> Result<(), String> {
        let valid = !key.is_empty()
            && key.len() <= MAX_METADATA_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if valid {
            Ok(())
        } else {
            Err(format!(
                "metadata key {key:?} must be 1 to {MAX_METADATA_KEY_LEN} letters, digits, `_`, `-` or `.` (it becomes a filter-state key)"
            ))
        }
    }

    /// Metadata values may be sent as HTTP header values: no control
    /// characters (CR/LF would split a header), bounded length.
    pub fn check_metadata_value(value: &str) -> Result<(), String> {
        if value.len() > MAX_METADATA_VALUE_LEN {
            return Err(format!(
                "value is {} bytes, longer than {MAX_METADATA_VALUE_LEN}",
                value.len()
            ));
        }
        if value.chars().any(|c| c.is_control()) {
            return Err(
                "control characters (CR, LF, NUL, …) are not allowed: the value may become an HTTP header".to_owned(),
            );
        }
        Ok(())
    }

    /// Headers Envoy manages itself or that change how the CONNECT request
    /// is framed; adding one is refused by Envoy or breaks the tunnel.
    const RESERVED_HEADERS: [&str; 10] = [
        "host",
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    ];

    /// A header added to every CONNECT: an HTTP token, not a pseudo-header
    /// and not one Envoy manages itself (Host, Connection, …).
    pub fn check_tunnel_header(name: &str) -> Result<(), String> {
        let token = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(format!(
                "{name:?} is not a valid header name (letters, digits and -, at most 128)"
            ));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{name:?} is set by Envoy itself and cannot be added to the CONNECT request"
            ));
        }
        Ok(())
    }

    /// Why a VIP range is unusable, if it is: VIPs must be unicast addresses
    /// that are never local, so that a connect to one can only mean "a name
    /// the gateway answered".
    pub fn forbidden_vip_range(network: Ipv4Addr, prefix_len: u8) -> Option<&'static str> {
        let first = u32::from(network);
        let size = if prefix_len >= 32 {
            1u64
        } else {
            1u64 << (32 - u32::from(prefix_len))
        };
        let last = (u64::from(first) + size - 1).min(u64::from(u32::MAX)) as u32;
        let overlaps = |start: [u8; 4], len: u8| {
            let s = u32::from(Ipv4Addr::from(start));
            let e = s | u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            first <= e && s <= last
        };
        if overlaps([0, 0, 0, 0], 8) {
            Some("it overlaps 0.0.0.0/8 (\"this network\")")
        } else if overlaps([127, 0, 0, 0], 8) {
            Some("it overlaps 127.0.0.0/8 (loopback: the gateway's own listeners live there)")
        } else if overlaps([224, 0, 0, 0], 4) {
            Some("it overlaps 224.0.0.0/4 (multicast)")
        } else if overlaps([255, 255, 255, 255], 32) {
            Some("it contains the broadcast address 255.255.255.255")
        } else {
            None
        }
    }

    /// Why an IPv6 VIP prefix (a /96, see [`super::VIP6_PREFIX_LEN`]) is
    /// unusable, if it is: it must be unicast and never local, and its
    /// last 32 bits zero.
    pub fn check_vip6_prefix(prefix: std::net::Ipv6Addr) -> Result<(), String> {
        let o = prefix.octets();
        if o[12..] != [0, 0, 0, 0] {
            return Err(format!(
                "{prefix} has bits set in its last 32 bits; an IPv6 VIP range is a /96 whose last 32 bits carry the IPv4 VIP"
            ));
        }
        let why = if o[0] == 0 {
            Some("it lies in ::/8 (unspecified, loopback, v4-mapped and v4-compatible addresses)")
        } else if o[0] == 0xff {
            Some("it is multicast (ff00::/8)")
        } else if o[0] == 0xfe && o[1] & 0xc0 == 0x80 {
            Some("it is link-local (fe80::/10)")
        } else {
            None
        };
        match why {
            Some(why) => Err(format!(
                "{prefix}/96 cannot hold VIPs: {why}; use a ULA prefix such as fd00:6a7e::/96"
            )),
            None => Ok(()),
        }
    }

    /// Parses an IPv6 VIP range as written in a configuration,
    /// `"fd00:6a7e::/96"`, and checks it ([`check_vip6_prefix`]); the one
    /// parser of the gateway's file and the module's filter config.
    pub fn parse_vip6_prefix(text: &str) -> Result<std::net::Ipv6Addr, String> {
        let len = super::VIP6_PREFIX_LEN;
        let (addr, prefix_len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not an IPv6 prefix such as fd00:6a7e::/{len}"))?;
        let addr: std::net::Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
        if prefix_len != len.to_string() {
            return Err(format!(
                "{text:?}: only /{len} is supported (the last 32 bits carry the IPv4 VIP)"
            ));
        }
        check_vip6_prefix(addr)?;
        Ok(addr)
    }

    /// Where the maps are pinned: an absolute path on bpffs below its mount
    /// point, never the bpffs root itself (the gateway makes the directory
    /// its own and locks it).
    pub fn check_pin_dir(path: &Path) -> Result<(), String> {
        if path.as_os_str().is_empty() {
            return Err("must not be empty".to_owned());
        }
        if !path.is_absolute() {
            return Err(format!("{} must be an absolute path", path.display()));
        }
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(format!("{} must not contain '.' or '..'", path.display()));
        }
        let normal = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count();
        if path == Path::new(crate::BPFFS_ROOT) || normal < 1 {
            return Err(format!(
                "{} is the bpffs root (or /): use a directory of the gateway's own below it, e.g. {}",
                path.display(),
                crate::DEFAULT_PIN_DIR
            ));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn metadata_keys_and_values() {
            for good in ["cluster", "auth_token", "a.b-c_1"] {
                assert!(check_metadata_key(good).is_ok(), "{good}");
            }
            for bad in ["", "a b", "x/y", "ключ", &"k".repeat(129)] {
                assert!(check_metadata_key(bad).is_err(), "{bad:?}");
            }
            assert!(check_metadata_value("abc123 ü").is_ok());
            for bad in ["a\r\nX-Evil: 1", "nul\0", "tab\there", &"v".repeat(4097)] {
                assert!(check_metadata_value(bad).is_err(), "{bad:?}");
            }
        }

        #[test]
        fn ipv6_vip_prefixes() {
            let cases: [(&str, bool); 9] = [
                ("fd00:6a7e::", true),
                ("2001:db8:1::", true),
                ("fd00:6a7e:0:0:1::", true),
                ("fd00:6a7e::1:0", false),
                ("fd00:6a7e::1", false),
                ("::", false),
                ("::ffff:0:0", false),
                ("ff02::", false),
                ("fe80::", false),
            ];
            for (prefix, ok) in cases {
                let addr: std::net::Ipv6Addr = prefix.parse().expect("test prefix");
                assert_eq!(check_vip6_prefix(addr).is_ok(), ok, "{prefix}");
            }
        }

        #[test]
        fn tunnel_headers() {
            assert!(check_tunnel_header("X-Auth-Token").is_ok());
            for bad in [
                "Host",
                "host",
                ":authority",
                "Transfer-Encoding",
                "Bad Header",
                "",
                "X-A\r\n",
            ] {
                assert!(check_tunnel_header(bad).is_err(), "{bad:?}");
            }
        }

        #[test]
        fn vip_ranges() {
            let cases: [([u8; 4], u8, bool); 9] = [
                ([10, 10, 0, 0], 24, true),
                ([240, 240, 0, 0], 16, true),
                ([198, 18, 0, 0], 16, true),
                ([127, 0, 0, 0], 24, false),
                ([0, 0, 0, 0], 24, false),
                ([224, 0, 0, 0], 24, false),
                ([239, 255, 0, 0], 16, false),
                ([255, 255, 255, 0], 24, false),
                ([126, 0, 0, 0], 7, false),
            ];
            for (ip, len, ok) in cases {
                assert_eq!(
                    forbidden_vip_range(Ipv4Addr::from(ip), len).is_none(),
                    ok,
                    "{ip:?}/{len}"
                );
            }
        }

        #[test]
        fn pin_dirs() {
            assert!(check_pin_dir(Path::new("/sys/fs/bpf/gw")).is_ok());
            for bad in [
                "",
                "relative",
                "/sys/fs/bpf",
                "/sys/fs/bpf/",
                "/",
                "/sys/fs/bpf/../x",
            ] {
                assert!(check_pin_dir(Path::new(bad)).is_err(), "{bad:?}");
            }
        }
    }
}
