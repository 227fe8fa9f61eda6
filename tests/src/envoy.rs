//! Running the real Envoy with the module in tests: bootstraps, the Envoy
//! process, its admin API, `dig`, and thin wrappers around the Python test
//! servers of `tests/clients/`: the stub DNS resolver behind the fallback
//! and the HTTP CONNECT upstreams, with what they observed.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};

use crate::{scenario::python, target_dir, tools_dir, wait_for, wait_for_listener, which, Guarded};

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
    // The module keeps state per pin directory: cache_lookup must name the
    // dns_gateway's to see its VIPs.
    let mut cache_lookup = cache_lookup.clone();
    if let (Some(map), Some(dir)) = (cache_lookup.as_object_mut(), dns_gateway.get("pin_dir")) {
        map.entry("pin_dir").or_insert_with(|| dir.clone());
    }
    let cache_lookup = &cache_lookup;
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

/// The value of counter or gauge `name` in the text of Envoy's `/stats`.
pub fn stat_in(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|v| v.trim().parse().ok())
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

/// A scratch directory for a test server's log, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique_name(prefix));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The JSON lines of `path` (none while it does not exist), parsed.
fn read_json_lines<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .with_context(|| format!("parsing {line:?} of {}", path.display()))
        })
        .collect()
}

/// One query the stub resolver answered.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct StubQuery {
    /// The name asked (lower case, no trailing dot).
    pub name: String,
    /// The query type (1 for A, 28 for AAAA, …).
    #[serde(rename = "type")]
    pub qtype: u16,
    /// How it came: `udp` or `tcp`.
    pub proto: String,
}

/// `tests/clients/stub_resolver.py` on 127.0.0.1 (UDP and TCP) with a fixed
/// zone: names in the zone get their A record, everything else NXDOMAIN.
/// Stops when dropped.
pub struct StubResolver {
    process: Guarded,
    log: PathBuf,
    _dir: ScratchDir,
}

impl StubResolver {
    /// Serves `zone` on 127.0.0.1:`port`, UDP and TCP, and waits until it
    /// listens.
    pub fn start(port: u16, zone: &[(&str, Ipv4Addr)]) -> Result<Self> {
        let dir = ScratchDir::create("stub-resolver")?;
        let log = dir.0.join("queries.jsonl");
        let mut args = vec![
            "--port".to_owned(),
            port.to_string(),
            "--log".to_owned(),
            log.to_string_lossy().into_owned(),
        ];
        for (name, ip) in zone {
            args.extend(["--record".to_owned(), format!("{name}={ip}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Guarded::spawn("stub resolver", python("stub_resolver.py", &args))?;
        let resolver = Self {
            process,
            log,
            _dir: dir,
        };
        // UDP is bound before TCP listens.
        wait_for_listener(&format!("127.0.0.1:{port}"), Duration::from_secs(10))
            .with_context(|| format!("stub resolver output:\n{}", resolver.process.output()))?;
        Ok(resolver)
    }

    /// The queries answered so far, in order.
    pub fn queries(&self) -> Result<Vec<StubQuery>> {
        read_json_lines(&self.log)
    }
}

/// One CONNECT request an upstream received.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConnectRequest {
    /// The request target (`host:port`).
    #[serde(rename = "connect")]
    pub authority: String,
    /// Header names in lower case → values.
    pub headers: BTreeMap<String, String>,
}

/// `tests/clients/upstream.py` on 127.0.0.1, in the role of the seed's
/// `upstream_N.py`: it records each CONNECT, answers 200, then answers
/// whatever comes through the tunnel with an HTTP response whose body is
/// `<name>\nCONNECT: <authority>\n` followed by the headers. Stops when
/// dropped.
pub struct ConnectUpstream {
    process: Guarded,
    log: PathBuf,
    _dir: ScratchDir,
}

impl ConnectUpstream {
    /// Listens on 127.0.0.1:`port`, announcing itself as `name`, and waits
    /// until it accepts connections.
    pub fn start(name: &str, port: u16) -> Result<Self> {
        let dir = ScratchDir::create("connect-upstream")?;
        let log = dir.0.join(format!("{name}.jsonl"));
        let port_arg = port.to_string();
        let log_arg = log.to_string_lossy().into_owned();
        let args = ["--name", name, "--port", &port_arg, "--log", &log_arg];
        let process = Guarded::spawn(name, python("upstream.py", &args))?;
        let upstream = Self {
            process,
            log,
            _dir: dir,
        };
        wait_for_listener(&format!("127.0.0.1:{port}"), Duration::from_secs(10))
            .with_context(|| format!("upstream {name} output:\n{}", upstream.process.output()))?;
        Ok(upstream)
    }

    /// The CONNECT requests received so far, in order.
    pub fn requests(&self) -> Result<Vec<ConnectRequest>> {
        read_json_lines(&self.log)
    }
}

/// Connects to `to`, sends a line and reads until the peer closes or 3 s
/// pass. Returns the body of the HTTP response that came back (what
/// follows the header), or everything when there is no HTTP header.
pub fn tcp_exchange(to: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"hello through the tunnel\n")?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/") => Ok(body.to_owned()),
        _ => Ok(text),
    }
}
