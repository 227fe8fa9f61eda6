//! Parsing of the addresses and networks given on the command line, with
//! errors that say what was expected.

use std::net::{Ipv4Addr, SocketAddrV4};

use gateway_common::Ipv4Cidr;

/// An IPv4 network as written by an operator, e.g. `10.10.0.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address with host bits cleared.
    pub network: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix_len: u8,
}

impl Cidr {
    /// The kernel representation.
    pub fn to_kernel(self) -> Ipv4Cidr {
        Ipv4Cidr::new(self.network.octets(), self.prefix_len)
    }

    /// Whether `ip` lies inside the network.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        self.to_kernel().contains(u32::from_ne_bytes(ip.octets()))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Parses `a.b.c.d/len`; host bits must be zero so that a typo such as
/// `10.10.0.1/24` is caught rather than silently widened.
pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let (ip, len) = text.split_once('/').ok_or_else(|| {
        format!("{text:?} is not a CIDR: expected an IPv4 network like 10.10.0.0/24")
    })?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR: {ip:?} is not an IPv4 address"))?;
    let prefix_len: u8 =
        len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| {
            format!("{text:?} is not a CIDR: prefix length {len:?} must be 0 to 32")
        })?;
    let cidr = Cidr {
        network: ip,
        prefix_len,
    };
    let network = Ipv4Addr::from(cidr.to_kernel().network.to_ne_bytes());
    if network != ip {
        return Err(format!(
            "{text:?} has host bits set: did you mean {network}/{prefix_len}?"
        ));
    }
    Ok(cidr)
}

/// Resolves a group name or number to a gid; refuses the groups every
/// unprivileged daemon shares (root, nogroup), whose members would all be
/// able to write the shared maps.
pub fn parse_group(text: &str) -> Result<u32, String> {
    let gid = match text.parse::<u32>() {
        Ok(gid) => gid,
        Err(_) => match nix::unistd::Group::from_name(text) {
            Ok(Some(group)) => group.gid.as_raw(),
            Ok(None) => return Err(format!("no group named {text:?}")),
            Err(e) => return Err(format!("looking up group {text:?}: {e}")),
        },
    };
    if gid == 0 || gid == 65534 || SHARED_GROUPS.contains(&text) {
        return Err(format!(
            "group {text:?} is shared by many users; {DEDICATED_USER_ADVICE}"
        ));
    }
    Ok(gid)
}

/// A user to run Envoy as: its uid and primary gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The name given.
    pub name: String,
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
}

/// Resolves a user name or number.
pub fn parse_user(text: &str) -> Result<RunAs, String> {
    let user = match text.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(text),
    };
    match user {
        Ok(Some(u)) => Ok(RunAs {
            name: text.to_owned(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }),
        Ok(None) => Err(format!("no user named {text:?}")),
        Err(e) => Err(format!("looking up user {text:?}: {e}")),
    }
}

/// Groups that many users share on Debian-like systems; sharing the pinned
/// maps with one would let every member steer the gateway.
const SHARED_GROUPS: [&str; 6] = ["nogroup", "nobody", "users", "staff", "daemon", "root"];

/// The advice given when Envoy's group is not its own.
pub const DEDICATED_USER_ADVICE: &str = "create a dedicated user with a group of its own: \
     useradd --system --user-group --no-create-home --shell /usr/sbin/nologin dns-gateway-envoy \
     (then --envoy-user dns-gateway-envoy)";

/// Checks that `user` is fit to run Envoy: not root, and its primary group
/// (with which the writable maps are shared) has no other user in it, as a
/// member or as another user's primary group. `passwd` is the text of
/// /etc/passwd.
pub fn check_dedicated_user(
    user: &RunAs,
    group_name: &str,
    group_members: &[String],
    passwd: &str,
) -> Result<(), String> {
    if user.uid == 0 {
        return Err("--envoy-user: root is what --envoy-user exists to avoid".to_owned());
    }
    if user.gid == 0 || user.gid == 65534 || SHARED_GROUPS.contains(&group_name) {
        return Err(format!(
            "--envoy-user {}: its group {group_name:?} (gid {}) is shared by other users, who could then \
             write the gateway's maps; {DEDICATED_USER_ADVICE}",
            user.name, user.gid
        ));
    }
    if let Some(other) = group_members
        .iter()
        .find(|m| m.as_str() != user.name.as_str())
    {
        return Err(format!(
            "--envoy-user {}: its group {group_name:?} also has member {other:?}; {DEDICATED_USER_ADVICE}",
            user.name
        ));
    }
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if let [name, _, uid, gid, ..] = fields.as_slice() {
            if gid.parse::<u32>() == Ok(user.gid) && uid.parse::<u32>() != Ok(user.uid) {
                return Err(format!(
                    "--envoy-user {}: its group {group_name:?} is also the primary group of user {name:?}; {DEDICATED_USER_ADVICE}",
                    user.name
                ));
            }
        }
    }
    Ok(())
}

/// [`check_dedicated_user`] against this system's users and groups.
pub fn check_dedicated_user_here(user: &RunAs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(user.gid))
        .with_context(|| format!("looking up group {}", user.gid))?;
    let (name, members) = match group {
        Some(g) => (g.name, g.mem),
        None => (user.gid.to_string(), Vec::new()),
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    check_dedicated_user(user, &name, &members, &passwd).map_err(anyhow::Error::msg)
}

/// Parses `a.b.c.d:port` with a non-zero port.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddrV4, String> {
    let addr: SocketAddrV4 = text.parse().map_err(|_| {
        format!("{text:?} is not an address: expected IPv4 address and port, like 127.0.0.1:15053")
    })?;
    if addr.port() == 0 {
        return Err(format!("{text:?}: port 0 cannot receive traffic"));
    }
    Ok(addr)
}

/// A resolver address: IPv4 (`192.0.2.53:53`) or IPv6 (`[2001:db8::53]:53`).
pub fn parse_resolver_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    let addr: std::net::SocketAddr = text.parse().map_err(|_| {
        format!("{text:?} is not an address: expected address and port, like 192.0.2.53:53 or [2001:db8::53]:53")
    })?;
    if addr.port() == 0 {
        return Err(format!("{text:?}: port 0 cannot receive traffic"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_rejects_with_reasons() {
        let c = parse_cidr("10.10.0.0/24").expect("valid");
        assert_eq!(c.network, Ipv4Addr::new(10, 10, 0, 0));
        assert_eq!(c.prefix_len, 24);
        assert!(c.contains(Ipv4Addr::new(10, 10, 0, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 10, 1, 0)));
        assert!(parse_cidr("10.10.0.0").unwrap_err().contains("expected"));
        assert!(parse_cidr("10.10.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(parse_cidr("10.10.0.1/24")
            .unwrap_err()
            .contains("10.10.0.0/24"));
        assert!(parse_cidr("ten/8").unwrap_err().contains("not an IPv4"));
    }

    #[test]
    fn envoy_user_needs_a_group_of_its_own() {
        let user = |uid, gid| RunAs {
            name: "gw-envoy".to_owned(),
            uid,
            gid,
        };
        let passwd = "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n\
                      gw-envoy:x:990:990::/:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\n\
                      bob:x:1001:1000::/home/bob:/bin/sh\n";
        let cases: [(RunAs, &str, Vec<String>, bool); 7] = [
            (user(990, 990), "gw-envoy", vec![], true),
            (user(990, 990), "gw-envoy", vec!["gw-envoy".into()], true),
            (user(0, 0), "root", vec![], false),
            (user(65534, 65534), "nogroup", vec![], false),
            (user(990, 100), "users", vec![], false),
            (user(990, 990), "gw-envoy", vec!["alice".into()], false),
            (user(990, 1000), "alice", vec![], false),
        ];
        for (who, group, members, ok) in cases {
            let result = check_dedicated_user(&who, group, &members, passwd);
            assert_eq!(result.is_ok(), ok, "{group} {members:?}: {result:?}");
        }
    }

    #[test]
    fn socket_addr_needs_ip_and_port() {
        assert_eq!(
            parse_socket_addr("127.0.0.1:15053").expect("valid"),
            "127.0.0.1:15053".parse().expect("literal")
        );
        assert!(parse_socket_addr("127.0.0.1")
            .unwrap_err()
            .contains("like 127.0.0.1:15053"));
        assert!(parse_socket_addr("127.0.0.1:0")
            .unwrap_err()
            .contains("port 0"));
    }
}
