//! The gateway's kernel side: cgroup socket-address hooks and a sockops
//! program that together replace the iptables DNAT rules of the seed design.
//!
//! * `connect4` sends TCP connects to a VIP to the proxy's TCP listener and
//!   connected UDP sockets aimed at port 53 to the proxy's DNS listener.
//! * `sendmsg4` does the same for unconnected UDP datagrams to port 53.
//! * `recvmsg4` and `getpeername4` make the application see the server it
//!   asked for, not the proxy.
//! * `sockops` copies the original destination of a redirected TCP socket,
//!   known by socket cookie at connect time, into a map keyed by the
//!   client's (ip, port): the peer address the proxy sees when it accepts.
//!
//! Anything the configuration does not name is left untouched.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

/// On the host this crate is only a placeholder so that `cargo build
/// --workspace` and `cargo clippy --workspace` work; the real object is
/// built for the BPF target by `gateway-user`'s build script.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
