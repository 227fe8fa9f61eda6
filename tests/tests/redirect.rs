//! The kernel programs on the real kernel: each test runs in its own network
//! namespace (only `lo`) with its own child cgroup and pin directory, and
//! drives unmodified Python socket code as the application.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener, UdpSocket},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use gateway_common::pinned::PinDir;
use nix::sys::signal::Signal;
use tests::{
    cgroup2_root, enter_private_netns, gateway_bin, prerequisites_met, repo_root, wait_for, Loader,
    TestCgroup,
};

const DNS_TO: &str = "127.0.0.1:15053";
const TCP_TO: &str = "127.0.0.1:15001";
const VIP_CIDR: &str = "10.10.0.0/24";
const WAIT: Duration = Duration::from_secs(5);

fn addr(text: &str) -> SocketAddrV4 {
    text.parse().expect("test address literal")
}

/// Prerequisites, a private network namespace and a fresh cgroup; `None`
/// means "skipped" (never in CI).
fn setup() -> Result<Option<TestCgroup>> {
    if !prerequisites_met(&[]) {
        return Ok(None);
    }
    enter_private_netns()?;
    Ok(Some(TestCgroup::new()?))
}

/// Runs tests/clients/probe.py (plain socket calls) and parses its line.
fn probe(
    cgroup: Option<&TestCgroup>,
    kind: &str,
    host: &str,
    port: u16,
) -> Result<serde_json::Value> {
    let script = repo_root().join("tests/clients/probe.py");
    let script = script.to_string_lossy().into_owned();
    let port = port.to_string();
    let args = [script.as_str(), kind, host, port.as_str()];
    let out = match cgroup {
        Some(cg) => cg.run("python3", &args)?,
        None => Command::new("python3").args(args).output()?,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "probe output {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A TCP listener standing in for Envoy's TCP listener: answers "pong"
/// and reports the peer address of every accepted connection.
struct TcpServer {
    peers: mpsc::Receiver<SocketAddr>,
    stop: Arc<AtomicBool>,
    held: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl TcpServer {
    fn start(at: &str) -> Result<Self> {
        Self::start_holding(at, false)
    }

    /// With `hold`, accepted connections stay open (the proxy's side does
    /// not close) until [`TcpServer::close_held`].
    fn start_holding(at: &str, hold: bool) -> Result<Self> {
        let listener = TcpListener::bind(at).with_context(|| format!("binding {at}"))?;
        listener.set_nonblocking(true)?;
        let (tx, peers) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let holder = held.clone();
        thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(WAIT));
                        let mut buf = [0u8; 4];
                        let _ = conn.read_exact(&mut buf);
                        let _ = conn.write_all(b"pong");
                        let _ = tx.send(peer);
                        if hold {
                            if let Ok(mut h) = holder.lock() {
                                h.push(conn);
                            }
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self { peers, stop, held })
    }

    /// Closes the connections kept open so far (the proxy's side closes).
    fn close_held(&self) {
        if let Ok(mut h) = self.held.lock() {
            h.clear();
        }
    }

    fn next_peer(&self) -> Option<SocketAddr> {
        self.peers.recv_timeout(WAIT).ok()
    }

    fn no_more_peers(&self) -> bool {
        self.peers.recv_timeout(Duration::from_millis(300)).is_err()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP server that replies `reply` to every datagram and reports sources.
struct UdpServer {
    sources: mpsc::Receiver<SocketAddr>,
    stop: Arc<AtomicBool>,
}

impl UdpServer {
    fn start(at: &str, reply: &'static [u8]) -> Result<Self> {
        let socket = UdpSocket::bind(at).with_context(|| format!("binding {at}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (tx, sources) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((_, src)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(reply, src);
                    let _ = tx.send(src);
                }
            }
        });
        Ok(Self { sources, stop })
    }

    fn next_source(&self) -> Option<SocketAddr> {
        self.sources.recv_timeout(WAIT).ok()
    }

    fn no_more_sources(&self) -> bool {
        self.sources
            .recv_timeout(Duration::from_millis(300))
            .is_err()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn attach(cgroup: &TestCgroup) -> Result<Loader> {
    Loader::attach(cgroup, &[VIP_CIDR], addr(DNS_TO), addr(TCP_TO))
}

#[test]
fn tcp_connect_to_vip_reaches_proxy_and_original_destination_is_recovered() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    // The proxy keeps its side open, so the client side cannot finish
    // closing: the record lives until the proxy consumes it.
    let proxy = TcpServer::start_holding(TCP_TO, true)?;
    let loader = attach(&cgroup)?;

    let seen = probe(Some(&cgroup), "tcp", "10.10.0.7", 443)?;
    assert_eq!(seen["ok"], true, "client could not connect: {seen}");
    assert_eq!(
        seen["reply"], "pong",
        "client did not reach the proxy: {seen}"
    );
    assert_eq!(
        seen["peer"], "10.10.0.7:443",
        "getpeername must show the VIP"
    );

    let accepted = proxy.next_peer().context("the proxy accepted nothing")?;
    assert_eq!(
        accepted.to_string(),
        seen["local"].as_str().unwrap_or_default()
    );
    let SocketAddr::V4(accepted) = accepted else {
        panic!("IPv4 peer expected, got {accepted}");
    };

    // The CLI shows the record while the proxy has not consumed it.
    let status = loader.status()?;
    let recorded = status["original_destinations"]
        .as_array()
        .context("original_destinations")?;
    assert!(
        recorded
            .iter()
            .any(|pair| pair[0] == accepted.to_string().as_str() && pair[1] == "10.10.0.7:443"),
        "status does not show the original destination: {status}"
    );
    assert_eq!(loader.counter("tcp_redirected")?, 1);
    assert_eq!(loader.counter("orig_dst_recorded")?, 1);

    // Another process (this test, not the loader) recovers the original
    // destination from the pinned map, given only the accepted peer, and
    // it is handed out once: a later socket on the same address gets none.
    let mut table = PinDir::new(loader.pin_dir()).orig_dst()?;
    assert_eq!(
        table.take(accepted.into(), 0)?,
        Some(addr("10.10.0.7:443").into())
    );
    assert_eq!(
        table.take(accepted.into(), 0)?,
        None,
        "an entry is consumed once"
    );
    Ok(())
}

/// Whether `gateway status` still lists an original destination for
/// `client`.
fn recorded(loader: &Loader, client: SocketAddr) -> Result<bool> {
    let status = loader.status()?;
    Ok(status["original_destinations"]
        .as_array()
        .context("original_destinations")?
        .iter()
        .any(|pair| pair[0] == client.to_string().as_str()))
}

#[test]
fn an_unconsumed_original_destination_dies_with_its_connection() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    let proxy = TcpServer::start_holding(TCP_TO, true)?;
    let loader = attach(&cgroup)?;

    // The client closes first (it exits after the exchange) while the
    // proxy's side stays open: the record is kept for the grace period, in
    // case the proxy accepts late, then removed by the loader.
    let seen = probe(Some(&cgroup), "tcp", "10.10.0.7", 443)?;
    assert_eq!(seen["ok"], true, "{seen}");
    let client_first = proxy.next_peer().context("the proxy accepted nothing")?;
    wait_for(
        "the loader to remove the record of a client that closed first",
        Duration::from_secs(5),
        || Ok((!recorded(&loader, client_first)?).then_some(())),
    )?;

    // The proxy's side closes first: the record goes at once, in the kernel.
    let closed_before = loader.counter("orig_dst_closed")?;
    let python = "import socket\n\
        s=socket.create_connection(('10.10.0.8',80),timeout=3)\n\
        s.sendall(b'ping'); s.recv(4)\n\
        s.settimeout(10)\n\
        while s.recv(100): pass\n\
        s.close()\n";
    let mut client = cgroup.command("python3", &["-c", python]).spawn()?;
    let proxy_first = proxy.next_peer().context("the proxy accepted nothing")?;
    assert!(recorded(&loader, proxy_first)?, "not recorded while open");
    proxy.close_held();
    let status = client.wait()?;
    assert!(status.success(), "client: {status}");
    wait_for(
        "the kernel to remove the record when the connection closed",
        Duration::from_secs(5),
        || Ok((!recorded(&loader, proxy_first)?).then_some(())),
    )?;
    assert_eq!(loader.counter("orig_dst_closed")?, closed_before + 1);
    Ok(())
}

#[test]
fn dns_queries_are_redirected_and_replies_carry_the_original_server() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    let dns = UdpServer::start(DNS_TO, b"answer")?;
    let loader = attach(&cgroup)?;

    let sendto = probe(Some(&cgroup), "udp-sendto", "203.0.113.53", 53)?;
    assert_eq!(sendto["ok"], true, "sendto query failed: {sendto}");
    assert_eq!(sendto["reply"], "answer");
    assert_eq!(
        sendto["from"], "203.0.113.53:53",
        "reply must look like it came from the server asked"
    );
    let source = dns
        .next_source()
        .context("the DNS target received nothing")?;
    assert_eq!(source.ip().to_string(), "127.0.0.1");

    let connected = probe(Some(&cgroup), "udp-connected", "198.51.100.7", 53)?;
    assert_eq!(connected["ok"], true, "connected query failed: {connected}");
    assert_eq!(connected["reply"], "answer");
    assert_eq!(connected["from"], "198.51.100.7:53");
    assert_eq!(
        connected["peer"], "198.51.100.7:53",
        "getpeername must show the server asked"
    );
    dns.next_source()
        .context("the DNS target received no connected query")?;

    assert_eq!(loader.counter("udp_send_redirected")?, 1);
    assert_eq!(loader.counter("udp_connect_redirected")?, 1);
    assert!(loader.counter("recv_rewritten")? >= 2);
    assert!(loader.counter("peer_rewritten")? >= 1);
    Ok(())
}

#[test]
fn traffic_the_configuration_does_not_name_is_left_alone() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    let proxy = TcpServer::start(TCP_TO)?;
    let dns = UdpServer::start(DNS_TO, b"answer")?;
    let other_udp = UdpServer::start("127.0.0.1:5353", b"direct")?;
    let loader = attach(&cgroup)?;

    // TCP outside the VIP CIDRs: not redirected, so in a namespace with
    // only lo it cannot be routed.
    let outside = probe(Some(&cgroup), "tcp", "10.20.0.1", 443)?;
    assert_eq!(
        outside["ok"], false,
        "connect outside the VIP CIDR succeeded: {outside}"
    );
    assert!(proxy.no_more_peers(), "a non-VIP connect reached the proxy");
    assert_eq!(loader.counter("tcp_passed")?, 1);

    // UDP to another port goes where it was sent.
    let mdns = probe(Some(&cgroup), "udp-sendto", "127.0.0.1", 5353)?;
    assert_eq!(
        mdns["reply"], "direct",
        "UDP to port 5353 was diverted: {mdns}"
    );
    assert_eq!(mdns["from"], "127.0.0.1:5353");
    other_udp
        .next_source()
        .context("port 5353 server received nothing")?;

    // A process outside the cgroup is untouched.
    let tcp_outside_cgroup = probe(None, "tcp", "10.10.0.7", 443)?;
    assert_eq!(tcp_outside_cgroup["ok"], false, "{tcp_outside_cgroup}");
    let dns_outside_cgroup = probe(None, "udp-sendto", "203.0.113.53", 53)?;
    assert_eq!(dns_outside_cgroup["ok"], false, "{dns_outside_cgroup}");
    assert!(
        proxy.no_more_peers(),
        "a process outside the cgroup reached the proxy"
    );
    assert!(
        dns.no_more_sources(),
        "a process outside the cgroup reached the DNS target"
    );

    assert_eq!(loader.counter("tcp_redirected")?, 0);
    assert_eq!(loader.counter("udp_send_redirected")?, 0);
    assert!(loader.counter("udp_passed")? >= 1);
    Ok(())
}

fn assert_detaches_on(signal: Signal) -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    let mut loader = attach(&cgroup)?;
    let attached = cgroup.attached_programs()?;
    for expected in [
        "gw_connect4",
        "gw_sendmsg4",
        "gw_recvmsg4",
        "gw_getpeername4",
        "gw_sockops",
    ] {
        assert!(
            attached.iter().any(|l| l.contains(expected)),
            "{expected} not attached: {attached:?}"
        );
    }
    let (status, output) = loader.stop_with(signal)?;
    assert!(
        status.success(),
        "gateway attach exited with {status} on {signal}:\n{output}"
    );
    assert!(output.contains("detached"), "no detach message:\n{output}");
    assert_eq!(cgroup.attached_programs()?, Vec::<String>::new());
    let status = loader.status()?;
    assert_eq!(status["attached"], false, "{status}");
    // The maps stay pinned for the next start (documented), until reset.
    assert!(PinDir::new(loader.pin_dir()).has(gateway_common::MAP_VIPS));
    Ok(())
}

#[test]
fn stopping_with_sigint_leaves_nothing_attached() -> Result<()> {
    assert_detaches_on(Signal::SIGINT)
}

#[test]
fn stopping_with_sigterm_leaves_nothing_attached() -> Result<()> {
    assert_detaches_on(Signal::SIGTERM)
}

#[test]
fn restarted_loader_reuses_the_pinned_tables() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    let mut first = attach(&cgroup)?;
    PinDir::new(first.pin_dir())
        .vips()?
        .insert("10.10.0.9".parse()?, "kept.example.com")?;
    first.stop_with(Signal::SIGTERM)?;
    let second = Loader::attach_with_pin_dir(
        &cgroup,
        &[VIP_CIDR],
        addr(DNS_TO),
        addr(TCP_TO),
        first.pin_dir(),
    )?;
    let vips = second.status()?["vips"].clone();
    assert_eq!(vips, serde_json::json!([["10.10.0.9", "kept.example.com"]]));
    Ok(())
}

fn attach_with(cgroup: &TestCgroup, extra: &[&str]) -> Result<Loader> {
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(tests::unique_name("gw-test"));
    Loader::attach_with_args(
        cgroup,
        &[VIP_CIDR],
        addr(DNS_TO),
        addr(TCP_TO),
        &pin_dir,
        extra,
    )
}

#[test]
fn while_the_proxy_is_down_dns_passes_or_is_refused_and_vip_connects_fail_at_once() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    // The real resolver of the namespace; nothing listens at DNS_TO yet.
    let _resolver = UdpServer::start("127.0.0.53:53", b"direct")?;
    let mut loader = attach(&cgroup)?;
    let passed = probe(Some(&cgroup), "udp-sendto", "127.0.0.53", 53)?;
    assert_eq!(passed["reply"], "direct", "left on its path: {passed}");
    let connected = probe(Some(&cgroup), "udp-connected", "127.0.0.53", 53)?;
    assert_eq!(connected["reply"], "direct", "{connected}");
    assert_eq!(loader.counter("dns_outage_passed")?, 2);
    // The proxy is back: redirected again.
    let dns = UdpServer::start(DNS_TO, b"answer")?;
    let back = probe(Some(&cgroup), "udp-sendto", "127.0.0.53", 53)?;
    assert_eq!(back["reply"], "answer", "{back}");
    assert_eq!(back["from"], "127.0.0.53:53");
    drop(dns);

    // A VIP connect while nothing listens fails at once.
    let started = std::time::Instant::now();
    let refused = probe(Some(&cgroup), "tcp", "10.10.0.7", 443)?;
    assert_eq!(refused["ok"], false);
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Connection refused"),
        "{refused}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "not at once");
    assert_eq!(loader.counter("tcp_target_down")?, 1);
    loader.stop_with(Signal::SIGTERM)?;

    // Policy "drop": refused at once, nothing leaves.
    let cgroup = TestCgroup::new()?;
    let strict = attach_with(&cgroup, &["--dns-outage", "drop"])?;
    let dropped = probe(Some(&cgroup), "udp-sendto", "127.0.0.53", 53)?;
    assert_eq!(dropped["ok"], false, "{dropped}");
    assert!(
        dropped["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not permitted"),
        "{dropped}"
    );
    assert_eq!(strict.counter("dns_outage_refused")?, 1);
    assert_eq!(strict.counter("dns_outage_passed")?, 0);
    Ok(())
}

#[test]
fn connects_to_vips_no_name_holds_are_refused_by_the_kernel() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    let proxy = TcpServer::start(TCP_TO)?;
    let loader = attach_with(&cgroup, &["--refuse-unknown-vips"])?;
    let unknown = probe(Some(&cgroup), "tcp", "10.10.0.8", 443)?;
    assert_eq!(unknown["ok"], false);
    assert!(
        unknown["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not permitted"),
        "{unknown}"
    );
    assert_eq!(loader.counter("unknown_vip_refused")?, 1);
    assert!(proxy.no_more_peers(), "the proxy saw nothing");
    PinDir::new(loader.pin_dir())
        .vips()?
        .insert("10.10.0.9".parse()?, "held.example.com")?;
    let held = probe(Some(&cgroup), "tcp", "10.10.0.9", 443)?;
    assert_eq!(held["ok"], true, "{held}");
    assert_eq!(held["peer"], "10.10.0.9:443");
    assert_eq!(loader.counter("tcp_redirected")?, 1);
    // The kernel stamped the VIP's use, for reclaiming by what it saw.
    let uses = PinDir::new(loader.pin_dir()).vip_use()?;
    assert!(uses.last_use_ns("10.10.0.9".parse()?)?.is_some());
    assert!(uses.last_use_ns("10.10.0.10".parse()?)?.is_none());
    Ok(())
}

#[test]
fn an_upgrade_recreates_the_connection_maps_and_keeps_the_vip_table() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    let mut first = attach(&cgroup)?;
    PinDir::new(first.pin_dir())
        .vips()?
        .insert("10.10.0.9".parse()?, "kept.example.com")?;
    first.stop_with(Signal::SIGTERM)?;
    // An older version's per-socket map (8-byte values, IPv4 only) left
    // pinned next to the VIP table.
    let stale = first.pin_dir().join(gateway_common::MAP_SOCK_ORIG);
    std::fs::remove_file(&stale)?;
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stale)
        .args([
            "type",
            "lru_hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "GW_SOCK_ORIG",
        ])
        .status()?;
    assert!(created.success(), "bpftool map create failed");
    let second = Loader::attach_with_pin_dir(
        &cgroup,
        &[VIP_CIDR],
        addr(DNS_TO),
        addr(TCP_TO),
        first.pin_dir(),
    )?;
    let vips = second.status()?["vips"].clone();
    assert_eq!(vips, serde_json::json!([["10.10.0.9", "kept.example.com"]]));
    // The programs use the new map: a redirect records its original.
    let _dns = UdpServer::start(DNS_TO, b"answer")?;
    let out = cgroup.run(
        "python3",
        &["-c", "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x'*12, ('192.0.2.1', 53))"],
    )?;
    assert!(out.status.success());
    assert_eq!(second.counter("udp_send_redirected")?, 1);
    assert_eq!(second.counter("map_update_failed")?, 0);
    Ok(())
}

/// Runs `gateway <args>` and returns (exit code, stderr).
fn gateway(args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(gateway_bin()).args(args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn bad_command_line_input_gets_a_clear_error() -> Result<()> {
    fn with(mut args: Vec<String>, more: &[&str]) -> Vec<String> {
        args.extend(more.iter().map(|s| s.to_string()));
        args
    }
    if !prerequisites_met(&[]) {
        return Ok(());
    }
    let cgroup = TestCgroup::new()?;
    let cg = cgroup.path().to_string_lossy().into_owned();
    let root = cgroup2_root()?.to_string_lossy().into_owned();
    let base = |cgroup: &str, cidr: &str, dns: &str| -> Vec<String> {
        [
            "attach",
            "--cgroup",
            cgroup,
            "--vip-cidr",
            cidr,
            "--dns-to",
            dns,
            "--tcp-to",
            TCP_TO,
            "--pin-dir",
            "/tmp/not-bpffs-gateway-test",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            base("/nonexistent/cgroup", VIP_CIDR, DNS_TO),
            "does not exist",
        ),
        (
            base(&cg, "10.10.0.1/24", DNS_TO),
            "did you mean 10.10.0.0/24",
        ),
        (base(&cg, "10.10.0.0/40", DNS_TO), "must be 0 to 32"),
        (base(&cg, "banana", DNS_TO), "expected an IPv4 network"),
        (base(&cg, VIP_CIDR, "127.0.0.1"), "like 127.0.0.1:15053"),
        (base(&cg, "127.0.0.0/8", DNS_TO), "cannot hold VIPs"),
        (base(&cg, "224.0.0.0/24", DNS_TO), "multicast"),
        (
            base(&cg, "10.10.0.0/24", "10.10.0.53:15053"),
            "contains the proxy address",
        ),
        (base(&root, VIP_CIDR, DNS_TO), "root cgroup"),
        (base(&cg, VIP_CIDR, DNS_TO), "not on a bpffs mount"),
        (
            vec!["attach".into(), "--cgroup".into(), cg.clone()],
            "required",
        ),
        (vec!["frobnicate".into()], "unrecognized subcommand"),
        (
            with(
                base(&cg, VIP_CIDR, DNS_TO),
                &["--vip6-prefix", "fd00:6a7e::"],
            ),
            "needs the proxy's IPv6 listeners",
        ),
        (
            with(
                base(&cg, VIP_CIDR, DNS_TO),
                &["--ipv6", "--vip6-prefix", "fd00:6a7e::1"],
            ),
            "last 32 bits",
        ),
        (
            with(base(&cg, VIP_CIDR, DNS_TO), &["--vip6-prefix", "10.0.0.1"]),
            "invalid IPv6 address",
        ),
        (
            with(
                base(&cg, VIP_CIDR, DNS_TO),
                &["--dns-tcp-to", "10.10.0.53:53"],
            ),
            "contains the proxy address",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = gateway(&args)?;
        assert_ne!(code, 0, "gateway {args:?} succeeded");
        assert!(
            stderr.contains(expected),
            "gateway {args:?}: expected {expected:?} in:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "gateway {args:?} panicked:\n{stderr}"
        );
    }
    assert_eq!(cgroup.attached_programs()?, Vec::<String>::new());

    // Without privileges: a clear list of what is missing.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(gateway_bin())
        .args(base(&cg, VIP_CIDR, DNS_TO))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("insufficient privileges: missing CAP_BPF"),
        "unprivileged attach: {stderr}"
    );
    Ok(())
}

/// `gateway attach` as root limited to `caps` (a setpriv bounding set).
fn attach_with_only(
    cgroup: &TestCgroup,
    caps: &str,
) -> Result<(tests::Guarded, std::path::PathBuf)> {
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(tests::unique_name("gw-caps"));
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all,{caps}"))
        .arg("--inh-caps=-all")
        .arg(gateway_bin())
        .arg("attach")
        .arg("--cgroup")
        .arg(cgroup.path())
        .args([
            "--vip-cidr",
            VIP_CIDR,
            "--dns-to",
            DNS_TO,
            "--tcp-to",
            TCP_TO,
            "--pin-dir",
        ])
        .arg(&pin_dir);
    Ok((
        tests::Guarded::spawn("gateway attach (limited)", cmd)?,
        pin_dir,
    ))
}

#[test]
fn attach_needs_exactly_bpf_perfmon_and_net_admin() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    // Measured: these three are enough (bpffs is already mounted here).
    let (mut loader, pin_dir) = attach_with_only(&cgroup, "+bpf,+perfmon,+net_admin")?;
    let attached = tests::wait_for("limited loader to attach", WAIT, || {
        Ok((tests::status_json(&pin_dir)?["attached"] == true).then_some(()))
    });
    let stop = loader.stop(Signal::SIGINT, WAIT);
    tests::reset_pins(&pin_dir);
    attached.with_context(|| loader.output())?;
    assert!(stop?.success(), "{}", loader.output());

    // And each one is needed: without it, a clear refusal.
    for (caps, missing) in [
        ("+perfmon,+net_admin", "CAP_BPF"),
        ("+bpf,+net_admin", "CAP_PERFMON"),
        ("+bpf,+perfmon", "CAP_NET_ADMIN"),
    ] {
        let (mut loader, pin_dir) = attach_with_only(&cgroup, caps)?;
        let status = tests::wait_for("limited loader to exit", WAIT, || {
            Ok((!loader.is_running()).then_some(()))
        });
        tests::reset_pins(&pin_dir);
        status?;
        let output = loader.output();
        assert!(
            output.contains("insufficient privileges") && output.contains(missing),
            "without {missing}: {output}"
        );
    }
    assert_eq!(cgroup.attached_programs()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn a_second_gateway_on_the_same_pin_directory_is_refused() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    let first = attach(&cgroup)?;
    let other = TestCgroup::new()?;
    let out = Command::new(gateway_bin())
        .arg("attach")
        .arg("--cgroup")
        .arg(other.path())
        .args([
            "--vip-cidr",
            "10.99.0.0/24",
            "--dns-to",
            "127.0.0.1:25053",
            "--tcp-to",
            "127.0.0.1:25001",
            "--pin-dir",
        ])
        .arg(first.pin_dir())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("in use by another gateway"), "{stderr}");
    assert_eq!(other.attached_programs()?, Vec::<String>::new());
    // The first one's configuration was not touched.
    assert_eq!(first.status()?["config"]["vip_cidrs"][0], VIP_CIDR);
    // Nor can its pins be reset while it runs.
    let (code, stderr) = gateway(&["reset", "--pin-dir", &first.pin_dir().to_string_lossy()])?;
    assert_ne!(code, 0);
    assert!(stderr.contains("in use by another gateway"), "{stderr}");
    Ok(())
}

/// A record whose client closed longer ago than the grace is never handed
/// out, even when no loader sweeps (an Envoy that outlived its loader):
/// `take` removes it and returns nothing; a fresh one is handed out once.
#[test]
fn an_expired_original_destination_is_never_handed_out() -> Result<()> {
    let Some(cgroup) = setup()? else {
        return Ok(());
    };
    let loader = attach(&cgroup)?;
    let mut table = PinDir::new(loader.pin_dir()).orig_dst()?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    let grace = gateway_common::ORIG_DST_CLOSE_GRACE_NS;
    let old: SocketAddr = "127.0.0.1:40001".parse()?;
    let fresh: SocketAddr = "127.0.0.1:40002".parse()?;
    let open: SocketAddr = "127.0.0.1:40003".parse()?;
    let vip: SocketAddr = "10.10.0.1:443".parse()?;
    table.insert_closed(old, vip, now_ns - 2 * grace)?;
    table.insert_closed(fresh, vip, now_ns - grace / 2)?;
    table.insert(open, vip)?;
    assert_eq!(table.take(old, now_ns)?, None, "expired: never handed out");
    assert_eq!(table.peek(old)?, None, "and removed");
    assert_eq!(table.take(fresh, now_ns)?, Some(vip));
    assert_eq!(table.take(open, now_ns)?, Some(vip));
    assert_eq!(table.take(open, now_ns)?, None, "at most once");
    Ok(())
}
