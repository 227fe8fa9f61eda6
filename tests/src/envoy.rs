//! Running the real Envoy with the module in tests: bootstraps, the Envoy
//! process, its admin API, `dig`, a stub DNS resolver for the fallback and
//! HTTP CONNECT upstreams that record what they receive.

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{rdata::A, RData, Record, RecordType},
};
use serde_json::{json, Value};

use crate::{target_dir, tools_dir, wait_for, which, Guarded};

/// The Envoy binary (`ENVOY_BIN` overrides `.tools/bin/envoy`).
pub fn envoy_bin() -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools_dir().join("bin").join("envoy"))
}

/// Directory holding the module `.so` (what `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`
/// points at).
pub fn module_dir() -> PathBuf {
    target_dir().join("debug")
}

/// The module built by `cargo build -p envoy-module`.
pub fn module_path() -> PathBuf {
    module_dir().join("libconnectivity_envoy_module.so")
}

/// Everything the Envoy tests need, as paths for
/// [`crate::prerequisites_met`]: Envoy, the module and `dig` (a missing
/// `dig` shows up as a path that does not exist).
pub fn envoy_prerequisites() -> Vec<PathBuf> {
    vec![
        envoy_bin(),
        module_path(),
        which("dig").unwrap_or_else(|| PathBuf::from("dig (apt-get install dnsutils)")),
    ]
}

/// A free port on 127.0.0.1 (TCP and UDP alike, in a fresh namespace).
pub fn free_port() -> Result<u16> {
    let tcp = TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    let port = tcp.local_addr()?.port();
    UdpSocket::bind(("127.0.0.1", port)).context("probing the UDP port")?;
    Ok(port)
}

static BASE_ID: AtomicU32 = AtomicU32::new(0);

/// A `--base-id` no other Envoy of this machine uses at the same time.
pub fn unique_base_id() -> u32 {
    (std::process::id() % 100_000) * 64 + BASE_ID.fetch_add(1, Ordering::Relaxed) % 64
}

/// Ports of one test's Envoy and its neighbours.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// Envoy's DNS (UDP) listener.
    pub dns: u16,
    /// Envoy's TCP listener.
    pub tcp: u16,
    /// Envoy's admin listener.
    pub admin: u16,
    /// The stub resolver behind the `dns_filter` fallback.
    pub resolver: u16,
    /// The CONNECT upstream of `cluster_1`.
    pub upstream_1: u16,
    /// The CONNECT upstream of `cluster_2`.
    pub upstream_2: u16,
}

impl Ports {
    /// Picks free ports for everything.
    pub fn pick() -> Result<Self> {
        let mut seen = Vec::new();
        let mut next = || -> Result<u16> {
            loop {
                let port = free_port()?;
                if !seen.contains(&port) {
                    seen.push(port);
                    return Ok(port);
                }
            }
        };
        Ok(Self {
            dns: next()?,
            tcp: next()?,
            admin: next()?,
            resolver: next()?,
            upstream_1: next()?,
            upstream_2: next()?,
        })
    }
}

/// The seed's `dns_gateway` config with a VIP range and a pin directory.
pub fn seed_dns_gateway_config(base_ip: &str, prefix_len: u8, pin_dir: &Path) -> Value {
    json!({
        "base_ip": base_ip,
        "prefix_len": prefix_len,
        "pin_dir": pin_dir.to_string_lossy(),
        "domains": [
            {"domain": "*.aws.com", "metadata": {"cluster": "cluster_1", "auth_token": "abc123"}},
            {"domain": "example.com", "metadata": {"cluster": "cluster_2", "auth_token": "def456"}}
        ]
    })
}

/// The seed's `envoy.yaml` as a JSON bootstrap: the DNS listener with
/// `dns_gateway` then Envoy's `dns_filter` (fallback over TCP to the stub
/// resolver), the TCP listener with `cache_lookup`, `set_filter_state` and
/// `tcp_proxy` tunnelling to the CONNECT upstreams, and an admin listener,
/// all on loopback. The CONNECT authority is `<domain>:<dialled port>`.
pub fn seed_bootstrap(ports: &Ports, dns_gateway: &Value, cache_lookup: &Value) -> Value {
    let cluster = |name: &str, port: u16| {
        json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                }}}]}]
            }
        })
    };
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "dns_listener",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.dns, "protocol": "UDP"}},
                    "listener_filters": [
                        {
                            "name": "envoy.filters.udp_listener.dynamic_modules",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.udp.dynamic_modules.v3.DynamicModuleUdpListenerFilter",
                                "dynamic_module_config": {"name": "connectivity_envoy_module", "do_not_close": true},
                                "filter_name": "dns_gateway",
                                "filter_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": dns_gateway}
                            }
                        },
                        {
                            "name": "envoy.filters.udp_listener.dns_filter",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig",
                                "stat_prefix": "dns_fallback",
                                "client_config": {
                                    "resolver_timeout": "2s",
                                    "max_pending_lookups": 256,
                                    "dns_resolution_config": {
                                        "resolvers": [{"socket_address": {"protocol": "TCP", "address": "127.0.0.1", "port_value": ports.resolver}}],
                                        "dns_resolver_options": {"no_default_search_domain": true, "use_tcp_for_dns_lookups": true}
                                    }
                                },
                                "server_config": {"inline_dns_table": {}}
                            }
                        }
                    ]
                },
                {
                    "name": "tcp_listener",
                    "address": {"socket_address": {"address": "0.0.0.0", "port_value": ports.tcp}},
                    "listener_filters": [{
                        "name": "envoy.filters.listener.original_dst",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}
                    }],
                    "filter_chains": [{"filters": [
                        {
                            "name": "envoy.filters.network.dynamic_modules",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network.dynamic_modules.v3.DynamicModuleNetworkFilter",
                                "dynamic_module_config": {"name": "connectivity_envoy_module", "do_not_close": true},
                                "filter_name": "cache_lookup",
                                "filter_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": cache_lookup}
                            }
                        },
                        {
                            "name": "envoy.filters.network.set_filter_state",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config",
                                "on_new_connection": [{
                                    "object_key": "envoy.tcp_proxy.cluster",
                                    "format_string": {"text_format_source": {"inline_string": "%FILTER_STATE(envoy.dns_gateway.metadata.cluster:PLAIN)%"}}
                                }]
                            }
                        },
                        {
                            "name": "envoy.filters.network.tcp_proxy",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                "stat_prefix": "egress",
                                "cluster": "default",
                                "tunneling_config": {
                                    "hostname": "%FILTER_STATE(envoy.dns_gateway.domain:PLAIN)%:%DOWNSTREAM_LOCAL_PORT%",
                                    "headers_to_add": [{"header": {
                                        "key": "X-Auth-Token",
                                        "value": "%FILTER_STATE(envoy.dns_gateway.metadata.auth_token:PLAIN)%"
                                    }}]
                                }
                            }
                        }
                    ]}]
                }
            ],
            "clusters": [cluster("cluster_1", ports.upstream_1), cluster("cluster_2", ports.upstream_2)]
        }
    })
}

/// A running Envoy, killed when dropped.
pub struct Envoy {
    process: Guarded,
    admin: u16,
    _config: PathBuf,
}

fn write_config(bootstrap: &Value, name: &str) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("{}.json", crate::unique_name(name)));
    std::fs::write(&path, serde_json::to_vec_pretty(bootstrap)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn envoy_command(config: &Path) -> Command {
    let mut cmd = Command::new(envoy_bin());
    cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module_dir())
        .arg("-c")
        .arg(config)
        .args(["--concurrency", "2", "--base-id"])
        .arg(unique_base_id().to_string())
        .args(["-l", "info"]);
    cmd
}

impl Envoy {
    /// Starts Envoy with `bootstrap` (admin port `admin`) and waits until it
    /// is ready and its workers run.
    pub fn start(bootstrap: &Value, admin: u16) -> Result<Self> {
        let config = write_config(bootstrap, "envoy-module-test")?;
        let mut process = Guarded::spawn("envoy", envoy_command(&config))?;
        let ready = wait_for("Envoy to be ready", Duration::from_secs(15), || {
            if !process.is_running() {
                bail!("Envoy exited:\n{}", process.output());
            }
            let Ok(stats) = admin_get(admin, "/stats?filter=workers_started") else {
                return Ok(None);
            };
            Ok(stats
                .contains("listener_manager.workers_started: 1")
                .then_some(()))
        });
        let envoy = Self {
            process,
            admin,
            _config: config,
        };
        ready?;
        Ok(envoy)
    }

    /// Runs `envoy --mode validate` on `bootstrap`: exit status and output.
    pub fn validate(bootstrap: &Value) -> Result<(ExitStatus, String)> {
        let config = write_config(bootstrap, "envoy-module-validate")?;
        let out = envoy_command(&config)
            .args(["--mode", "validate"])
            .output()
            .context("running envoy --mode validate")?;
        let _ = std::fs::remove_file(&config);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status, text))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Everything Envoy logged so far.
    pub fn log(&self) -> String {
        self.process.output()
    }

    /// Every counter and gauge of `/stats`, by name.
    pub fn stats(&self) -> Result<HashMap<String, u64>> {
        Ok(admin_get(self.admin, "/stats")?
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect())
    }

    /// One counter of `/stats` (0 when absent).
    pub fn stat(&self, name: &str) -> Result<u64> {
        Ok(self.stats()?.get(name).copied().unwrap_or(0))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self._config);
    }
}

/// `GET path` on the admin listener; the body.
pub fn admin_get(port: u16, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).context("connecting to admin")?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading admin {path}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("admin response without a header")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("admin {path}: {head}");
    }
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(body.to_owned());
    }
    // De-chunk: size line, data, CRLF, … until a zero size.
    let mut rest = body;
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    Ok(out)
}

/// What `dig` printed, parsed.
#[derive(Clone, Debug, Default)]
pub struct DigAnswer {
    /// The `status:` of the header (`NOERROR`, `NXDOMAIN`, …), empty when
    /// there was no answer.
    pub status: String,
    /// The header flags (`qr aa rd ra`).
    pub flags: Vec<String>,
    /// ANSWER section records as `(name, ttl, type, data)`.
    pub answers: Vec<(String, u32, String, String)>,
    /// AUTHORITY section records as `(name, ttl, type, data)`.
    pub authority: Vec<(String, u32, String, String)>,
    /// The OPT pseudo-section line, if any.
    pub edns: Option<String>,
    /// The full output.
    pub raw: String,
}

impl DigAnswer {
    /// The A records of the answer section.
    pub fn a_records(&self) -> Vec<String> {
        self.answers
            .iter()
            .filter(|r| r.2 == "A")
            .map(|r| r.3.clone())
            .collect()
    }
}

fn parse_record(line: &str) -> Option<(String, u32, String, String)> {
    let mut fields = line.split_whitespace();
    let name = fields.next()?.to_owned();
    let ttl = fields.next()?.parse().ok()?;
    let _class = fields.next()?;
    let rtype = fields.next()?.to_owned();
    let data = fields.collect::<Vec<_>>().join(" ");
    Some((name, ttl, rtype, data))
}

/// `dig @127.0.0.1 -p port name qtype` with one try of 2 s.
pub fn dig(port: u16, name: &str, qtype: &str) -> Result<DigAnswer> {
    let out = Command::new("dig")
        .arg("@127.0.0.1")
        .args(["-p", &port.to_string(), name, qtype, "+tries=1", "+time=2"])
        .output()
        .context("running dig")?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut answer = DigAnswer {
        raw: raw.clone(),
        ..Default::default()
    };
    let mut section = "";
    for line in raw.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            answer.status = rest.split(',').next().unwrap_or("").to_owned();
        }
        if let Some(rest) = line.strip_prefix(";; flags: ") {
            answer.flags = rest
                .split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
        }
        if line.starts_with("; EDNS:") {
            answer.edns = Some(line.to_owned());
        }
        if let Some(name) = line
            .strip_prefix(";; ")
            .and_then(|l| l.strip_suffix(" SECTION:"))
        {
            section = if name == "ANSWER" {
                "answer"
            } else if name == "AUTHORITY" {
                "authority"
            } else {
                ""
            };
            continue;
        }
        if line.trim().is_empty() || line.starts_with(';') {
            if line.trim().is_empty() {
                section = "";
            }
            continue;
        }
        if let Some(record) = parse_record(line) {
            match section {
                "answer" => answer.answers.push(record),
                "authority" => answer.authority.push(record),
                _ => {}
            }
        }
    }
    Ok(answer)
}

/// A DNS server on 127.0.0.1 (UDP and TCP) with a fixed zone: names in the
/// zone get their A record, everything else NXDOMAIN. Stops when dropped.
pub struct StubResolver {
    stop: Arc<AtomicBool>,
    queries: Arc<Mutex<Vec<String>>>,
}

fn stub_answer(query: &[u8], zone: &BTreeMap<String, Ipv4Addr>) -> Option<(Vec<u8>, String)> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries().first()?.clone();
    let name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .add_query(question.clone());
    match zone.get(&name) {
        Some(ip) if question.query_type() == RecordType::A => {
            response.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A(*ip)),
            ));
        }
        Some(_) => {}
        None => {
            response.set_response_code(ResponseCode::NXDomain);
        }
    }
    Some((response.to_vec().ok()?, name))
}

impl StubResolver {
    /// Serves `zone` on 127.0.0.1:`port`, UDP and TCP.
    pub fn start(port: u16, zone: &[(&str, Ipv4Addr)]) -> Result<Self> {
        let zone: Arc<BTreeMap<String, Ipv4Addr>> =
            Arc::new(zone.iter().map(|(n, ip)| ((*n).to_owned(), *ip)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let udp =
            UdpSocket::bind(("127.0.0.1", port)).context("binding the stub resolver (UDP)")?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let tcp =
            TcpListener::bind(("127.0.0.1", port)).context("binding the stub resolver (TCP)")?;
        tcp.set_nonblocking(true)?;
        {
            let (stop, zone, queries) = (stop.clone(), zone.clone(), queries.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = udp.recv_from(&mut buf) {
                        if let Some((answer, name)) = stub_answer(&buf[..len], &zone) {
                            if let Ok(mut q) = queries.lock() {
                                q.push(name);
                            }
                            let _ = udp.send_to(&answer, from);
                        }
                    }
                }
            });
        }
        {
            let (stop, queries) = (stop.clone(), queries.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((stream, _)) => {
                            let (zone, queries) = (zone.clone(), queries.clone());
                            thread::spawn(move || serve_dns_tcp(stream, &zone, &queries));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        Ok(Self { stop, queries })
    }

    /// Names asked so far (lower case, no trailing dot).
    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().map(|q| q.clone()).unwrap_or_default()
    }
}

fn serve_dns_tcp(
    mut stream: TcpStream,
    zone: &BTreeMap<String, Ipv4Addr>,
    queries: &Mutex<Vec<String>>,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut query).is_err() {
            return;
        }
        let Some((answer, name)) = stub_answer(&query, zone) else {
            return;
        };
        if let Ok(mut q) = queries.lock() {
            q.push(name);
        }
        let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&answer);
        if stream.write_all(&framed).is_err() {
            return;
        }
    }
}

impl Drop for StubResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One CONNECT request an upstream received.
#[derive(Clone, Debug, Default)]
pub struct ConnectRequest {
    /// The request target (`host:port`).
    pub authority: String,
    /// Header names in lower case → values.
    pub headers: BTreeMap<String, String>,
}

/// An HTTP CONNECT proxy on 127.0.0.1 like the seed's `upstream_N.py`: it
/// records each CONNECT, answers 200, then replies to whatever comes
/// through the tunnel with `<name>\nCONNECT: <authority>\n`. Stops when
/// dropped.
pub struct ConnectUpstream {
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<ConnectRequest>>>,
}

impl ConnectUpstream {
    /// Listens on 127.0.0.1:`port`, announcing itself as `name`.
    pub fn start(name: &str, port: u16) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding upstream {name}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (stop2, requests2, name) = (stop.clone(), requests.clone(), name.to_owned());
        thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (requests, name) = (requests2.clone(), name.clone());
                        thread::spawn(move || {
                            let _ = serve_connect(stream, &name, &requests);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self { stop, requests })
    }

    /// The CONNECT requests received so far.
    pub fn requests(&self) -> Vec<ConnectRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

fn serve_connect(
    stream: TcpStream,
    name: &str,
    requests: &Mutex<Vec<ConnectRequest>>,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    if parts.next() != Some("CONNECT") {
        bail!("not a CONNECT: {line:?}");
    }
    let mut request = ConnectRequest {
        authority: parts.next().unwrap_or("").to_owned(),
        ..Default::default()
    };
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            request
                .headers
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    if let Ok(mut r) = requests.lock() {
        r.push(request.clone());
    }
    let mut stream = stream;
    stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n")?;
    let mut buf = [0u8; 4096];
    let _ = reader.read(&mut buf)?;
    stream.write_all(format!("{name}\nCONNECT: {}\n", request.authority).as_bytes())?;
    Ok(())
}

impl Drop for ConnectUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Connects to `to`, sends a line and returns what comes back until the
/// peer closes or 3 s pass.
pub fn tcp_exchange(to: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"hello through the tunnel\n")?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.ends_with(b"\n") && out.windows(8).any(|w| w == b"CONNECT:") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}
