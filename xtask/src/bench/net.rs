//! The benchmark's own network peers: an epoll echo server that never
//! makes the measured path wait (a held connection costs it nothing), a
//! UDP responder, and the client workloads that run as separate processes
//! (so that they can be placed in the gated cgroup).

use std::{
    collections::HashMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

/// A fresh IPv4 TCP socket, for options std does not offer.
fn tcp_socket() -> Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    Ok(socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// A listener on `addr` with SO_REUSEPORT, so that several processes can
/// serve one address (each with its own descriptor limit).
fn reuseport_listener(addr: SocketAddr) -> Result<TcpListener> {
    use nix::sys::socket::{bind, listen, setsockopt, sockopt, Backlog, SockaddrIn};
    let SocketAddr::V4(v4) = addr else {
        bail!("the echo server listens on IPv4 only");
    };
    let fd = tcp_socket()?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(v4)).with_context(|| format!("binding {addr}"))?;
    listen(&fd, Backlog::new(65535).unwrap_or(Backlog::MAXCONN))?;
    Ok(TcpListener::from(fd))
}

/// Serves echo on `addr` in this process with `threads` epoll loops (run
/// as `bench-client serve`, several processes side by side).
pub fn serve(addr: SocketAddr, threads: usize) -> Result<()> {
    start_echo_server(addr, threads)?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// Starts an echo server on `addr` with `threads` epoll loops sharing one
/// listener: every byte read is written back; connections that send
/// nothing are only held.
pub fn start_echo_server(addr: SocketAddr, threads: usize) -> Result<()> {
    let listener = reuseport_listener(addr)?;
    listener.set_nonblocking(true)?;
    for _ in 0..threads.max(1) {
        let listener = listener.try_clone()?;
        thread::spawn(move || {
            if let Err(e) = echo_loop(&listener) {
                eprintln!("bench: echo server stopped: {e:#}");
            }
        });
    }
    Ok(())
}

const LISTENER_TOKEN: u64 = u64::MAX;

fn echo_loop(listener: &TcpListener) -> Result<()> {
    let epoll = Epoll::new(EpollCreateFlags::empty())?;
    epoll.add(
        listener,
        EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE,
            LISTENER_TOKEN,
        ),
    )?;
    let mut conns: HashMap<u64, TcpStream> = HashMap::new();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = [0u8; 4096];
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for event in &events[..n] {
            let token = event.data();
            if token == LISTENER_TOKEN {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(true)?;
                            let _ = stream.set_nodelay(true);
                            let key = stream.as_raw_fd() as u64;
                            epoll.add(&stream, EpollEvent::new(EpollFlags::EPOLLIN, key))?;
                            conns.insert(key, stream);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        // Out of descriptors or similar: the listener stays
                        // readable, so pause instead of spinning.
                        Err(_) => {
                            thread::sleep(Duration::from_millis(10));
                            break;
                        }
                    }
                }
                continue;
            }
            let Some(stream) = conns.get_mut(&token) else {
                continue;
            };
            let close = match stream.read(&mut buf) {
                Ok(0) => true,
                Ok(n) => stream.write_all(&buf[..n]).is_err(),
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(_) => true,
            };
            if close {
                if let Some(stream) = conns.remove(&token) {
                    let _ = epoll.delete(&stream);
                }
            }
        }
    }
}

/// Starts a UDP responder on `addr`: each datagram comes back with the DNS
/// QR bit set, so it is both an echo and a valid (empty) DNS answer.
pub fn start_udp_responder(addr: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if n >= 12 {
                buf[2] |= 0x80;
            }
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    Ok(())
}

/// The client workloads of `cargo xtask bench-client`.
#[derive(clap::Subcommand, Debug)]
pub enum Workload {
    /// An echo server process sharing `addr` with its siblings; prints
    /// "ready", serves until stdin closes.
    Serve {
        /// Where to listen.
        #[arg(long)]
        addr: SocketAddr,
        /// Epoll loops.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// One operation at a time (TCP connect + 1-byte exchange + close, or
    /// a UDP query and its reply); prints every operation's nanoseconds.
    Latency {
        /// "tcp" or "udp".
        #[arg(long)]
        proto: String,
        /// Where to send.
        #[arg(long)]
        target: SocketAddr,
        /// How many operations.
        #[arg(long)]
        ops: u32,
    },
    /// As many TCP connect + 1-byte exchange + close as `threads` loops
    /// manage in `seconds`; prints a JSON summary.
    Rate {
        /// Where to connect.
        #[arg(long)]
        target: SocketAddr,
        /// Concurrent loops.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// How long.
        #[arg(long)]
        seconds: f64,
    },
    /// Opens `count` TCP connections and holds them until stdin closes;
    /// prints "ready" once all are established.
    Hold {
        /// Where to connect.
        #[arg(long)]
        target: SocketAddr,
        /// How many connections.
        #[arg(long)]
        count: usize,
        /// Sources are 127.0.<this + n>.1, a new one every 8,000
        /// connections.
        #[arg(long, default_value_t = 10)]
        first_source: u8,
    },
    /// DNS A queries for `names` distinct names at a fixed rate; prints a
    /// JSON summary with latency quantiles.
    Dns {
        /// The DNS server.
        #[arg(long)]
        target: SocketAddr,
        /// Queries per second.
        #[arg(long)]
        rate: u32,
        /// How long.
        #[arg(long)]
        seconds: f64,
        /// Names `n<i>.<zone>` for i below this.
        #[arg(long)]
        names: u32,
        /// The zone of the names.
        #[arg(long)]
        zone: String,
    },
}

/// Runs one workload in this process.
pub fn run_workload(workload: &Workload) -> Result<()> {
    match workload {
        Workload::Serve { addr, threads } => serve(*addr, *threads),
        Workload::Latency { proto, target, ops } => latency(proto, *target, *ops),
        Workload::Rate {
            target,
            threads,
            seconds,
        } => rate(*target, *threads, *seconds),
        Workload::Hold {
            target,
            count,
            first_source,
        } => hold(*target, *count, *first_source),
        Workload::Dns {
            target,
            rate,
            seconds,
            names,
            zone,
        } => dns(*target, *rate, *seconds, *names, zone),
    }
}

fn exchange(target: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .with_context(|| format!("connecting to {target}"))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).context("no echo")?;
    Ok(())
}

fn latency(proto: &str, target: SocketAddr, ops: u32) -> Result<()> {
    let mut times = Vec::with_capacity(ops as usize);
    match proto {
        "tcp" => {
            for _ in 0..ops {
                let start = Instant::now();
                exchange(target)?;
                times.push(start.elapsed().as_nanos());
            }
        }
        "udp" => {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut b = [0u8; 64];
            let query = dns_query(0x1234, "x.bench.example");
            for _ in 0..ops {
                let start = Instant::now();
                s.send_to(&query, target)?;
                s.recv_from(&mut b).context("no UDP reply")?;
                times.push(start.elapsed().as_nanos());
            }
        }
        other => bail!("unknown protocol {other}"),
    }
    let lines: Vec<String> = times.iter().map(ToString::to_string).collect();
    println!("{}", lines.join("\n"));
    Ok(())
}

fn rate(target: SocketAddr, threads: usize, seconds: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let failures = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let failures = failures.clone();
            let samples = samples.clone();
            thread::spawn(move || {
                let mut mine = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    match exchange(target) {
                        Ok(()) => mine.push(start.elapsed().as_nanos() as u64),
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if let Ok(mut all) = samples.lock() {
                    all.extend(mine);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let mut all = samples
        .lock()
        .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
        .clone();
    all.sort_unstable();
    let q = |p: f64| all.get(((all.len() as f64 - 1.0) * p) as usize).copied();
    println!(
        "{}",
        serde_json::json!({
            "ops": all.len(),
            "failures": failures.load(Ordering::Relaxed),
            "seconds": seconds,
            "ops_per_s": all.len() as f64 / seconds,
            "p50_ns": q(0.5),
            "p99_ns": q(0.99),
        })
    );
    Ok(())
}

/// Connections per source address of a holder: one address's ephemeral
/// ports toward one destination run out (and the kernel's search for a
/// free one slows to milliseconds) long before 50,000.
const PER_SOURCE: usize = 8000;

/// A connection to `target` from `source` (port chosen at connect time,
/// IP_BIND_ADDRESS_NO_PORT, so each source has its own port space).
fn connect_from(source: std::net::Ipv4Addr, target: SocketAddr) -> Result<TcpStream> {
    use nix::sys::socket::{bind, connect, setsockopt, sockopt, SockaddrIn};
    let SocketAddr::V4(target) = target else {
        bail!("holding connections to IPv4 targets only");
    };
    let fd = tcp_socket()?;
    setsockopt(&fd, sockopt::IpBindAddressNoPort, &true)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(target))?;
    Ok(TcpStream::from(fd))
}

fn hold(target: SocketAddr, count: usize, first_source: u8) -> Result<()> {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let source =
            std::net::Ipv4Addr::new(127, 0, first_source.wrapping_add((i / PER_SOURCE) as u8), 1);
        let s = connect_from(source, target)
            .with_context(|| format!("holding connection {i} to {target} from {source}"))?;
        held.push(s);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
    Ok(())
}

/// A DNS A query for `name` with id `id` (recursion desired).
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(12 + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn dns(target: SocketAddr, rate: u32, seconds: f64, names: u32, zone: &str) -> Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(target)?;
    let receiver = socket.try_clone()?;
    receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
    // Send time per id (nanoseconds since `origin`), 0 = none outstanding.
    let origin = Instant::now();
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..65536).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let collector = {
        let sent_at = sent_at.clone();
        let done = done.clone();
        thread::spawn(move || {
            let mut latencies = Vec::new();
            let mut buf = [0u8; 1500];
            loop {
                match receiver.recv(&mut buf) {
                    Ok(n) if n >= 2 => {
                        let now = origin.elapsed().as_nanos() as u64;
                        let id = u16::from_be_bytes([buf[0], buf[1]]) as usize;
                        let at = sent_at[id].swap(0, Ordering::AcqRel);
                        if at != 0 {
                            latencies.push(now.saturating_sub(at));
                        }
                    }
                    Ok(_) => {}
                    Err(_) if done.load(Ordering::Acquire) => break,
                    Err(_) => {}
                }
            }
            latencies
        })
    };
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let total = (f64::from(rate) * seconds) as u64;
    let mut sent = 0u64;
    let start = Instant::now();
    while sent < total {
        let due = start + interval.mul_f64(sent as f64);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let id = (sent % 65536) as u16;
        let name = format!("n{}.{zone}", sent % u64::from(names.max(1)));
        sent_at[id as usize].store(
            (origin.elapsed().as_nanos() as u64).max(1),
            Ordering::Release,
        );
        let _ = socket.send(&dns_query(id, &name));
        sent += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Release);
    let mut latencies = collector
        .join()
        .map_err(|_| anyhow::anyhow!("the DNS receiver panicked"))?;
    latencies.sort_unstable();
    let q = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
    };
    println!(
        "{}",
        serde_json::json!({
            "sent": sent,
            "answered": latencies.len(),
            "offered_qps": sent as f64 / elapsed,
            "p50_ns": q(0.5),
            "p99_ns": q(0.99),
        })
    );
    Ok(())
}
