//! The cookie of the network namespace the gateway runs in: the kernel
//! programs redirect and record only sockets of this namespace, the one
//! whose loopback Envoy listens on.
//!
//! This is the loader's one `unsafe` block: neither std nor nix wraps the
//! `SO_NETNS_COOKIE` socket option.

use std::os::fd::AsRawFd as _;

use anyhow::{Context as _, Result};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace, as
/// `bpf_get_netns_cookie` reports it for sockets created there.
pub fn current_netns_cookie() -> Result<u64> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a socket to read the network namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket owned by this function; `cookie` and
    // `len` are valid, writable and describe exactly 8 bytes, which is what
    // the kernel writes for SO_NETNS_COOKIE.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(
            "reading SO_NETNS_COOKIE (needs Linux 5.14 or later): the gateway scopes its redirects to one network namespace",
        );
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_stable_and_non_zero() {
        let first = current_netns_cookie().expect("cookie");
        assert_ne!(first, 0);
        assert_eq!(current_netns_cookie().expect("cookie"), first);
    }
}
