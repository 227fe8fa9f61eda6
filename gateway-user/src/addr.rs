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

/// Resolves a group name or number to a gid.
pub fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(text) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("no group named {text:?}")),
        Err(e) => Err(format!("looking up group {text:?}: {e}")),
    }
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
