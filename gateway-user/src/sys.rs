//! The two system calls std and nix do not wrap, and the loader's only
//! `unsafe` code:
//!
//! - the cookie of the network namespace the gateway runs in (the kernel
//!   programs redirect and record only sockets of this namespace, the one
//!   whose loopback Envoy listens on): `SO_NETNS_COOKIE`;
//! - a child that dies with its supervisor: `PR_SET_PDEATHSIG` between
//!   fork and exec, so Envoy never outlives `gateway run` unnoticed;
//! - which programs are attached to a cgroup: `BPF_PROG_QUERY` (aya does
//!   not expose it), so that a restarted gateway adopts only programs that
//!   really are attached there.

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

/// Makes `command`'s child receive SIGKILL when the thread that spawned it
/// dies, and exit at once if the supervisor is already gone. The
/// supervisor spawns Envoy from the thread that drives `gateway run`'s
/// main future (`block_on`), which lives as long as the process; never
/// call this from a `spawn_blocking` thread, which may exit when idle.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (prctl, getppid, _exit); it
    // touches no memory of the parent's heap or locks.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died between fork and prctl: no signal will come.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// `bpf_attr` for `BPF_PROG_QUERY` (the fields up to `revision`).
#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// `BPF_PROG_QUERY` from `<linux/bpf.h>`.
const BPF_PROG_QUERY: libc::c_long = 16;

/// Ids of the programs attached directly to the cgroup open as `cgroup`
/// for `attach_type` (a `bpf_attach_type` value).
pub fn attached_program_ids(cgroup: &std::fs::File, attach_type: u32) -> Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = ProgQuery {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, initialised BPF_PROG_QUERY attribute of
    // the size passed; `prog_ids` points at `ids`, which has room for the
    // `prog_cnt` ids the kernel may write, and both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQuery,
            size_of::<ProgQuery>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("querying the programs attached to a cgroup (BPF_PROG_QUERY)");
    }
    let count = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..count].to_vec())
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
