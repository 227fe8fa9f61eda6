//! Unmodified clients in the gated cgroup, each with a test resolv.conf
//! bind-mounted over /etc/resolv.conf in a private mount namespace: glibc
//! (a C program, getent, `options use-vc`), a static musl program (IPv4,
//! IPv6 and both nameservers), Python (getaddrinfo and asyncio), curl,
//! Node (dns.lookup and c-ares' resolve4), Java with default settings
//! (dual-stack sockets), dig over UDP and TCP. A matched name (wildcard or
//! exact) must resolve to a VIP and its connection reach the domain's
//! upstream with the right CONNECT target and header; an unmatched name
//! must get the fallback resolver's own answer, byte for byte.
//!
//! The fallback resolver is dnsmasq (a real recursive-resolver stand-in
//! that answers A, AAAA, MX, TXT and SRV, over UDP and TCP, with EDNS).

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tests::{
    repo_root,
    scenario::{isolated_config, scenario_prerequisites, SeedScenario},
    unique_name, wait_for_listener, Guarded,
};

/// Where dnsmasq, the fallback resolver, listens (UDP and TCP).
const FALLBACK: &str = "127.0.0.1:5354";
/// The unmatched name dnsmasq knows, with its IPv4 and IPv6 answers.
const UNMATCHED: &str = "github.com";
const UNMATCHED_V4: &str = "192.0.2.10";
const UNMATCHED_V6: &str = "2001:db8::10";
/// A name whose TXT answer does not fit 512 bytes (forces TC, then TCP).
const BIG_TXT: &str = "big.github.com";
/// Nameservers in the test resolv.conf files: nothing listens there; only
/// the redirect makes them answer.
const NAMESERVER_V4: &str = "192.0.2.53";
const NAMESERVER_V6: &str = "2001:db8::53";
/// The IPv6 VIP range of the scenario.
const VIP6_PREFIX: &str = "fd00:6a7e::";

/// Tools this test needs besides Envoy and the module.
const TOOLS: [&str; 8] = [
    "dnsmasq", "gcc", "musl-gcc", "node", "java", "javac", "curl", "dig",
];

/// What a client should end with.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Connected through the gateway to `cluster`, whose CONNECT carried
    /// `name:80` and the domain's token.
    Tunnel {
        cluster: &'static str,
        token: &'static str,
    },
    /// Only resolved, to the fallback's answer (IPv4 or IPv6).
    Resolved(&'static str, &'static str),
}

/// The names every client is tried with.
const NAMES: [(&str, Expect); 3] = [
    (
        "bucket.aws.com",
        Expect::Tunnel {
            cluster: "cluster_1",
            token: "abc123",
        },
    ),
    (
        "example.com",
        Expect::Tunnel {
            cluster: "cluster_2",
            token: "def456",
        },
    ),
    (UNMATCHED, Expect::Resolved(UNMATCHED_V4, UNMATCHED_V6)),
];

/// A resolv.conf variant.
#[derive(Clone, Copy, Debug)]
enum Resolv {
    V4,
    V6,
    Both,
    V4UseVc,
}

impl Resolv {
    fn text(self) -> String {
        match self {
            Resolv::V4 => format!("nameserver {NAMESERVER_V4}\n"),
            Resolv::V6 => format!("nameserver {NAMESERVER_V6}\n"),
            Resolv::Both => format!("nameserver {NAMESERVER_V6}\nnameserver {NAMESERVER_V4}\n"),
            Resolv::V4UseVc => format!("nameserver {NAMESERVER_V4}\noptions use-vc\n"),
        }
    }

    fn file(self) -> &'static str {
        match self {
            Resolv::V4 => "resolv-v4.conf",
            Resolv::V6 => "resolv-v6.conf",
            Resolv::Both => "resolv-both.conf",
            Resolv::V4UseVc => "resolv-use-vc.conf",
        }
    }
}

/// The scenario plus the files the clients need.
struct Clients {
    scenario: SeedScenario,
    dir: PathBuf,
    dnsmasq: Guarded,
}

impl Clients {
    /// Runs `program args` in the gated cgroup, in a private mount
    /// namespace where /etc/resolv.conf is `resolv` and /etc/nsswitch.conf
    /// says `hosts: files dns` (so that no host-specific NSS module, e.g.
    /// systemd-resolved's, answers instead of DNS).
    fn run(&self, resolv: Resolv, program: &str, args: &[&str]) -> Result<Output> {
        let script = "mount --bind \"$0\" /etc/resolv.conf && mount --bind \"$1\" /etc/nsswitch.conf && shift && exec \"$@\"";
        let resolv_path = self.dir.join(resolv.file());
        let nsswitch = self.dir.join("nsswitch.conf");
        let mut full = vec![
            "--mount",
            "sh",
            "-c",
            script,
            resolv_path.to_str().context("path")?,
            nsswitch.to_str().context("path")?,
            program,
        ];
        full.extend_from_slice(args);
        self.scenario.exec("unshare", &full)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// The scenario with IPv6 listeners and an IPv6 VIP range.
fn start() -> Result<Option<Clients>> {
    start_with(|config| {
        config.replacen(
            "vip_cidr = \"10.10.0.0/24\"",
            &format!("vip_cidr = \"10.10.0.0/24\"\nvip_ipv6_prefix = \"{VIP6_PREFIX}/96\""),
            1,
        )
    })
}

/// The scenario on the built-in configuration as `edit` changes it.
fn start_with(edit: impl Fn(String) -> String) -> Result<Option<Clients>> {
    if !scenario_prerequisites(&TOOLS) {
        return Ok(None);
    }
    tests::enter_private_netns()?;
    let dir = std::env::temp_dir().join(unique_name("gw-clients"));
    fs::create_dir_all(&dir)?;
    for resolv in [Resolv::V4, Resolv::V6, Resolv::Both, Resolv::V4UseVc] {
        fs::write(dir.join(resolv.file()), resolv.text())?;
    }
    fs::write(dir.join("nsswitch.conf"), "hosts: files dns\n")?;
    build_clients(&dir)?;

    // A TXT answer of 12 strings of 60 bytes: about 750 bytes on the wire.
    let big_txt = format!(
        "--txt-record={BIG_TXT},{}",
        vec!["x".repeat(60); 12].join(",")
    );
    let dnsmasq = Guarded::spawn("dnsmasq", {
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--port=5354",
            "--edns-packet-max=1232",
            // Authoritative for the test zone: unknown names NXDOMAIN.
            &format!("--local=/{UNMATCHED}/"),
            &format!("--host-record={UNMATCHED},{UNMATCHED_V4},{UNMATCHED_V6}"),
            &format!("--mx-host={UNMATCHED},mail.{UNMATCHED},10"),
            &format!("--txt-record={UNMATCHED},v=spf1 -all"),
            &format!("--srv-host=_xmpp._tcp.{UNMATCHED},xmpp.{UNMATCHED},5222,0,5"),
            &big_txt,
        ]);
        cmd
    })?;
    wait_for_listener(FALLBACK, Duration::from_secs(10))?;

    let config = edit(isolated_config("gw-clients")?);
    let scenario = SeedScenario::start_with_args(Some(config), &["--fallback", FALLBACK])?;
    Ok(Some(Clients {
        scenario,
        dir,
        dnsmasq,
    }))
}

/// Builds the C client against glibc and, statically, against musl, and
/// the Java client.
fn build_clients(dir: &Path) -> Result<()> {
    let clients = repo_root().join("tests/clients");
    let source = clients.join("resolve_connect.c");
    for (compiler, out, extra) in [
        ("gcc", "rc-glibc", &[][..]),
        ("musl-gcc", "rc-musl", &["-static"][..]),
    ] {
        let status = Command::new(compiler)
            .args(extra)
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(dir.join(out))
            .arg(&source)
            .status()
            .with_context(|| format!("running {compiler}"))?;
        if !status.success() {
            bail!("{compiler} failed to build {}", source.display());
        }
    }
    let file = Command::new("file").arg(dir.join("rc-musl")).output();
    if let Ok(out) = file {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("statically linked") || text.contains("static-pie"),
            "the musl client must be static: {text}"
        );
    }
    let status = Command::new("javac")
        .arg("-d")
        .arg(dir)
        .arg(clients.join("ResolveConnect.java"))
        .status()
        .context("running javac")?;
    if !status.success() {
        bail!("javac failed");
    }
    Ok(())
}

/// Parsed client output (see tests/clients/resolve_connect.c).
#[derive(Debug, Default)]
struct Report {
    addrs: Vec<IpAddr>,
    connected: Option<IpAddr>,
    body: String,
    raw: String,
}

fn report(out: &Output) -> Report {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut report = Report {
        raw: format!("{stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr)),
        ..Default::default()
    };
    let mut lines = stdout.lines();
    for line in lines.by_ref() {
        if let Some(addr) = line.strip_prefix("addr ") {
            if let Ok(ip) = addr.trim().parse() {
                report.addrs.push(ip);
            }
        } else if let Some(rest) = line.strip_prefix("connected ") {
            report.connected = rest.split_whitespace().next().and_then(|a| a.parse().ok());
        } else if line == "body:" {
            break;
        }
    }
    report.body = lines.collect::<Vec<_>>().join("\n");
    report
}

fn is_vip(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [10, 10, 0],
        IpAddr::V6(v6) => v6.to_string().starts_with(VIP6_PREFIX),
    }
}

/// Checks one client's report against what its name should give.
fn check(name: &str, expect: Expect, report: &Report) -> Result<(), String> {
    match expect {
        Expect::Tunnel { cluster, token } => {
            if report.addrs.is_empty() || !report.addrs.iter().all(is_vip) {
                return Err(format!(
                    "{name} did not resolve to VIPs only: {}",
                    report.raw
                ));
            }
            for want in [
                cluster.to_owned(),
                format!("CONNECT: {name}:80"),
                format!("x-auth-token: {token}"),
            ] {
                if !report.body.lines().any(|l| l.trim() == want) {
                    return Err(format!(
                        "{name}: the upstream did not see {want:?}: {}",
                        report.raw
                    ));
                }
            }
            Ok(())
        }
        Expect::Resolved(v4, v6) => {
            let wanted: Vec<IpAddr> = [v4, v6].iter().filter_map(|a| a.parse().ok()).collect();
            if !report.addrs.is_empty() && report.addrs.iter().all(|a| wanted.contains(a)) {
                Ok(())
            } else {
                Err(format!(
                    "{name} did not resolve to {v4} / {v6}: {}",
                    report.raw
                ))
            }
        }
    }
}

/// Runs a table of (label, resolv.conf, program, args with `{name}`)
/// against every name and collects the failures.
fn run_table(clients: &Clients, table: &[(&str, Resolv, String, Vec<String>)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (label, resolv, program, args) in table {
        for (name, expect) in NAMES {
            let args: Vec<String> = args.iter().map(|a| a.replace("{name}", name)).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let outcome = clients
                .run(*resolv, program, &args)
                .map_err(|e| format!("{e:#}"))
                .and_then(|out| check(name, expect, &report(&out)));
            if let Err(why) = outcome {
                failures.push(format!("[{label}] {why}"));
            }
        }
    }
    failures
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn unmodified_clients_resolve_and_connect_through_the_gateway() -> Result<()> {
    let Some(clients) = start()? else {
        return Ok(());
    };
    let glibc = clients.path("rc-glibc");
    let musl = clients.path("rc-musl");
    let client = |mode: &str| strings(&["{name}", "80", mode]);
    let table: Vec<(&str, Resolv, String, Vec<String>)> = vec![
        (
            "glibc getaddrinfo AF_UNSPEC",
            Resolv::V4,
            glibc.clone(),
            client("unspec"),
        ),
        (
            "glibc getaddrinfo AF_INET6",
            Resolv::V4,
            glibc.clone(),
            client("inet6"),
        ),
        (
            "glibc options use-vc",
            Resolv::V4UseVc,
            glibc.clone(),
            client("unspec"),
        ),
        (
            "glibc IPv6 nameserver",
            Resolv::V6,
            glibc.clone(),
            client("unspec"),
        ),
        (
            "musl, IPv4 nameserver",
            Resolv::V4,
            musl.clone(),
            client("unspec"),
        ),
        (
            "musl, IPv6 nameserver",
            Resolv::V6,
            musl.clone(),
            client("unspec"),
        ),
        (
            "musl, both nameservers",
            Resolv::Both,
            musl.clone(),
            client("unspec"),
        ),
        (
            "python getaddrinfo AF_INET",
            Resolv::V4,
            "/usr/bin/python3".into(),
            strings(&[
                &clients_script("resolve_connect.py"),
                "inet",
                "{name}",
                "80",
            ]),
        ),
        (
            "python getaddrinfo AF_UNSPEC",
            Resolv::V4,
            "/usr/bin/python3".into(),
            strings(&[
                &clients_script("resolve_connect.py"),
                "unspec",
                "{name}",
                "80",
            ]),
        ),
        (
            "python asyncio",
            Resolv::V4,
            "/usr/bin/python3".into(),
            strings(&[
                &clients_script("resolve_connect.py"),
                "asyncio",
                "{name}",
                "80",
            ]),
        ),
        (
            "node dns.lookup",
            Resolv::V4,
            "node".into(),
            strings(&[
                &clients_script("resolve_connect.js"),
                "lookup",
                "{name}",
                "80",
            ]),
        ),
        (
            "node dns.resolve4 (c-ares)",
            Resolv::V4,
            "node".into(),
            strings(&[
                &clients_script("resolve_connect.js"),
                "resolve4",
                "{name}",
                "80",
            ]),
        ),
        (
            "java, default settings",
            Resolv::V4,
            "java".into(),
            strings(&[
                "-cp",
                &clients.dir.display().to_string(),
                "ResolveConnect",
                "{name}",
                "80",
            ]),
        ),
    ];
    let mut failures = run_table(&clients, &table);

    // getent and curl print their own formats.
    for (name, expect) in NAMES {
        let out = clients.run(Resolv::V4, "getent", &["hosts", name])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let addrs = text
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        let outcome = check(
            name,
            expect,
            &Report {
                addrs,
                raw: text.clone(),
                ..Default::default()
            },
        );
        // getent does not connect: only the resolution part applies.
        match (expect, outcome) {
            (Expect::Tunnel { .. }, Err(why)) if why.contains("did not resolve") => {
                failures.push(format!("[getent hosts] {why}"))
            }
            (Expect::Resolved(..), Err(why)) => failures.push(format!("[getent hosts] {why}")),
            _ => {}
        }
        if let Expect::Tunnel { cluster, token } = expect {
            let out = clients.run(
                Resolv::V4,
                "curl",
                &["-sS", "--max-time", "10", &format!("http://{name}/")],
            )?;
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            let report = Report {
                addrs: vec!["10.10.0.1".parse()?],
                body: body.clone(),
                raw: format!("{body} {}", String::from_utf8_lossy(&out.stderr)),
                ..Default::default()
            };
            if let Err(why) = check(name, Expect::Tunnel { cluster, token }, &report) {
                failures.push(format!("[curl] {why}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} client checks failed:\n{}\ngateway output:\n{}",
        failures.len(),
        failures.join("\n"),
        clients.scenario.gateway_output()
    );

    // Every matched connection went through the upstream of its domain.
    for (cluster, name) in [
        ("cluster_1", "bucket.aws.com"),
        ("cluster_2", "example.com"),
    ] {
        let requests = clients.scenario.upstream_requests(cluster)?;
        assert!(
            requests
                .iter()
                .all(|r| r["connect"] == format!("{name}:80").as_str()),
            "{cluster} saw another domain: {requests:?}"
        );
    }
    Ok(())
}

/// Runs a Python client of tests/clients in the gated cgroup; it must
/// succeed, and each line of its output is a JSON object.
fn run_json(clients: &Clients, script: &str, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    run_json_as(clients, &[], script, args)
}

/// [`run_json`] behind `prefix` (e.g. `setpriv` to another user).
fn run_json_as(
    clients: &Clients,
    prefix: &[&str],
    script: &str,
    args: &[&str],
) -> Result<Vec<serde_json::Value>> {
    let path = clients_script(script);
    let mut all: Vec<&str> = prefix.to_vec();
    all.extend(["/usr/bin/python3", path.as_str()]);
    all.extend_from_slice(args);
    let (program, rest) = (all[0], &all[1..]);
    let out = clients.run(Resolv::V4, program, rest)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{script} {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("{script} printed {l:?}")))
        .collect()
}

fn clients_script(name: &str) -> String {
    repo_root()
        .join("tests/clients")
        .join(name)
        .display()
        .to_string()
}

fn dig(clients: &Clients, resolv: Resolv, args: &[&str]) -> Result<String> {
    let mut full = vec!["+tries=2", "+time=3"];
    full.extend_from_slice(args);
    let out = clients.run(resolv, "dig", &full)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn dns_over_tcp_truncation_and_the_verbatim_fallback() -> Result<()> {
    let Some(mut clients) = start()? else {
        return Ok(());
    };
    // dig +tcp: matched names answered by the gateway, unmatched relayed
    // to the fallback over TCP.
    for (name, want) in [
        ("bucket.aws.com", "10.10.0."),
        ("example.com", "10.10.0."),
        (UNMATCHED, UNMATCHED_V4),
    ] {
        let short = dig(&clients, Resolv::V4, &["+tcp", "+short", name])?;
        assert!(short.trim().starts_with(want), "dig +tcp {name}: {short:?}");
        let six = dig(&clients, Resolv::V6, &["+tcp", "+short", name])?;
        assert!(
            six.trim().starts_with(want),
            "dig +tcp over IPv6 {name}: {six:?}"
        );
    }
    // A matched AAAA is the IPv6 VIP of the same name.
    let a = dig(&clients, Resolv::V4, &["+short", "bucket.aws.com"])?;
    let aaaa = dig(&clients, Resolv::V4, &["+short", "AAAA", "bucket.aws.com"])?;
    let v4: std::net::Ipv4Addr = a.trim().parse().context("A answer")?;
    let v6: std::net::Ipv6Addr = aaaa.trim().parse().context("AAAA answer")?;
    assert_eq!(v6.octets()[12..], v4.octets(), "AAAA embeds the A VIP");

    // Several queries on one TCP connection (dig +keepopen), matched and
    // unmatched mixed.
    let many = dig(
        &clients,
        Resolv::V4,
        &[
            "+tcp",
            "+keepopen",
            "+short",
            "bucket.aws.com",
            UNMATCHED,
            "MX",
            "example.com",
            UNMATCHED,
        ],
    )?;
    for want in ["10.10.0.", UNMATCHED_V4, "mail.github.com."] {
        assert!(many.contains(want), "{want} missing from {many:?}");
    }
    // Pipelined: all queries in one write, answers in any order, each
    // with its own ID and content.
    for server in ["192.0.2.53:53", "[2001:db8::53]:53"] {
        let answers = run_json(
            &clients,
            "tcp_pipeline.py",
            &[
                server,
                "bucket.aws.com",
                "github.com",
                "example.com/AAAA",
                "github.com/MX",
                "bucket.aws.com",
            ],
        )?;
        assert_eq!(answers.len(), 5, "{answers:?}");
        for a in &answers {
            let first = a["answers"][0].to_string();
            let ok = match a["name"].as_str() {
                Some("bucket.aws.com") => first.contains("10.10.0."),
                Some("example.com") => first.contains(VIP6_PREFIX),
                Some("github.com") => first.contains(UNMATCHED_V4) || first == "15",
                _ => false,
            };
            assert!(ok, "wrong answer over {server}: {a}");
        }
    }

    // An answer too big for 512 bytes comes back truncated over UDP; the
    // client retries over TCP, which the gateway now carries.
    let truncated = dig(
        &clients,
        Resolv::V4,
        &["+noedns", "+ignore", "TXT", BIG_TXT],
    )?;
    assert!(
        truncated.contains(" tc"),
        "TC expected over UDP: {truncated}"
    );
    let full = dig(&clients, Resolv::V4, &["+noedns", "+short", "TXT", BIG_TXT])?;
    assert_eq!(
        full.matches(&"x".repeat(60)).count(),
        12,
        "full TXT over TCP: {full}"
    );
    assert!(tests::status_counter(clients.scenario.pin_dir(), "dns_tcp_redirected")? >= 1);
    let stats = clients.scenario.admin_get("/stats")?;
    let stat = |name: &str| {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("dynamicmodulescustom.{name}: ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    assert!(
        stat("dns_gateway_tcp.answered").is_some_and(|n| n >= 6),
        "matched names over TCP are counted: {stats}"
    );
    assert!(
        stat("dns_gateway_tcp.passed_on").is_some_and(|n| n >= 3),
        "relayed ones too: {stats}"
    );

    // Unmatched names: the gateway's answers are the fallback's own, byte
    // for byte (rcode, answer section, EDNS), for every type.
    for (name, types) in [
        (UNMATCHED, &["A", "AAAA", "MX", "TXT", "HTTPS"][..]),
        ("_xmpp._tcp.github.com", &["SRV"][..]),
        ("nonexistent.github.com", &["A"][..]),
    ] {
        let mut args = vec![
            "--direct",
            FALLBACK,
            "--via",
            "192.0.2.53:53",
            "--name",
            name,
        ];
        for t in types {
            args.extend(["--type", t]);
        }
        // dns_compare.py fails unless every answer is byte-identical.
        for v in run_json(&clients, "dns_compare.py", &args)
            .with_context(|| format!("answers for {name} differ from the fallback's"))?
        {
            assert_eq!(v["identical"], true, "{v}");
            assert_eq!(v["has_opt"], true, "EDNS kept: {v}");
        }
    }

    // With every fallback resolver down, matched names still resolve over
    // TCP (no resolver connection is needed for them) and over UDP.
    clients
        .dnsmasq
        .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(5))?;
    for args in [
        &["+tcp", "+short", "bucket.aws.com"][..],
        &["+short", "example.com"][..],
    ] {
        let short = dig(&clients, Resolv::V4, args)?;
        assert!(
            short.trim().starts_with("10.10.0."),
            "dig {args:?} with the fallback down: {short:?}"
        );
    }
    Ok(())
}

#[test]
fn only_the_dns_listener_can_answer_for_a_nameserver() -> Result<()> {
    let Some(clients) = start()? else {
        return Ok(());
    };
    // The TCP listener's port is free for UDP: a local process may bind it.
    for (nameserver, proxy) in [(NAMESERVER_V4, "127.0.0.1"), (NAMESERVER_V6, "::1")] {
        // Victim and forger both unprivileged (nobody), as any local user.
        let seen = run_json_as(
            &clients,
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ],
            "spoof_check.py",
            &[nameserver, proxy, "15001", "bucket.aws.com"],
        )?;
        for v in &seen {
            let line = v.to_string();
            let from = v["from"][0].as_str().unwrap_or_default();
            let from: IpAddr = from.parse()?;
            let nameserver: IpAddr = nameserver.parse()?;
            match v["kind"].as_str() {
                Some("answer") => {
                    assert_eq!(from, nameserver, "the answer shows the nameserver: {line}")
                }
                _ => assert_ne!(
                    from, nameserver,
                    "a forged datagram passed for the nameserver: {line}"
                ),
            }
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
    }
    Ok(())
}

#[test]
fn without_ipv6_listeners_ipv6_dns_is_left_alone_and_counted() -> Result<()> {
    let Some(clients) = start_with(|config| {
        config.replacen(
            "tcp = \"127.0.0.1:15001\"",
            "tcp = \"127.0.0.1:15001\"\nipv6 = false",
            1,
        )
    })?
    else {
        return Ok(());
    };
    let unserved = || tests::status_counter(clients.scenario.pin_dir(), "ipv6_unserved");
    assert_eq!(unserved()?, 0);
    // An IPv6 nameserver is not redirected (nothing listens on [::1]):
    // the query goes where it was sent, which here is nowhere.
    let six = dig(
        &clients,
        Resolv::V6,
        &["+tries=1", "+time=1", "+short", "bucket.aws.com"],
    )?;
    assert!(!six.contains("10.10.0."), "{six}");
    assert!(unserved()? >= 1, "counted");
    // IPv4 and v4-mapped (Java's dual-stack sockets) still work.
    let out = clients.run(
        Resolv::V4,
        "java",
        &[
            "-cp",
            &clients.dir.display().to_string(),
            "ResolveConnect",
            "bucket.aws.com",
            "80",
        ],
    )?;
    check(
        "bucket.aws.com",
        Expect::Tunnel {
            cluster: "cluster_1",
            token: "abc123",
        },
        &report(&out),
    )
    .map_err(anyhow::Error::msg)?;
    // Without an IPv6 VIP range a matched AAAA is NODATA.
    let aaaa = dig(&clients, Resolv::V4, &["+short", "AAAA", "bucket.aws.com"])?;
    assert!(aaaa.trim().is_empty(), "{aaaa}");
    Ok(())
}

#[test]
fn a_killed_gateway_leaves_the_gate_and_dns_and_a_new_one_adopts_it() -> Result<()> {
    let Some(mut clients) = start()? else {
        return Ok(());
    };
    // The namespace's "real" resolver, where DNS goes when it is left on
    // its original path.
    let _local = Guarded::spawn("local dnsmasq", {
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--listen-address=127.0.0.53",
            "--bind-interfaces",
            "--port=53",
            &format!("--host-record={UNMATCHED},{UNMATCHED_V4}"),
        ]);
        cmd
    })?;
    wait_for_listener("127.0.0.53:53", Duration::from_secs(10))?;
    fs::write(
        clients.dir.join("resolv-local.conf"),
        "nameserver 127.0.0.53\n",
    )?;
    let local = |clients: &Clients, name: &str| -> Result<String> {
        let path = clients.dir.join("resolv-local.conf");
        let script = "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"";
        let out = clients.scenario.exec(
            "unshare",
            &[
                "--mount",
                "sh",
                "-c",
                script,
                path.to_str().context("path")?,
                "dig",
                "+short",
                "+tries=1",
                "+time=2",
                name,
            ],
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if stdout.is_empty() {
            return Ok(format!(
                "(nothing) {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(stdout)
    };
    let counter =
        |clients: &Clients, name: &str| tests::status_counter(clients.scenario.pin_dir(), name);
    let glibc = clients.path("rc-glibc");
    let tunnel = |clients: &Clients| -> Result<Report> {
        Ok(report(&clients.run(
            Resolv::V4,
            &glibc,
            &["bucket.aws.com", "80", "inet"],
        )?))
    };
    let expect = Expect::Tunnel {
        cluster: "cluster_1",
        token: "abc123",
    };
    check("bucket.aws.com", expect, &tunnel(&clients)?).map_err(anyhow::Error::msg)?;
    let vips_before = tests::status_json(clients.scenario.pin_dir())?["vips"].clone();
    let programs_before = tests::status_json(clients.scenario.pin_dir())?["link_programs"].clone();
    assert_eq!(
        programs_before.as_array().map(Vec::len),
        Some(9),
        "{programs_before}"
    );
    let redirected_before = counter(&clients, "tcp_redirected")?;
    let envoy = clients.scenario.envoy_pid().context("no Envoy")?;

    // The loader dies without detaching.
    clients
        .scenario
        .kill_gateway(nix::sys::signal::Signal::SIGKILL)?;
    tests::wait_for(
        "Envoy to die with its supervisor",
        Duration::from_secs(10),
        || Ok((!Path::new(&format!("/proc/{envoy}")).exists()).then_some(())),
    )?;
    let status = tests::status_json(clients.scenario.pin_dir())?;
    assert_eq!(status["attached"], true, "the gate stays: {status}");
    assert_eq!(status["loader"]["alive"], false);
    assert_eq!(status["links_pinned"], 9, "{status}");
    // Meanwhile: names resolve on their original path (outage "pass") …
    assert_eq!(local(&clients, UNMATCHED)?, UNMATCHED_V4);
    assert!(counter(&clients, "dns_outage_passed")? >= 1);
    // … and a connect to a VIP fails at once instead of leaving.
    let script = "import socket\ntry:\n    socket.create_connection(('10.10.0.1', 80), timeout=5)\n    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)";
    let started = std::time::Instant::now();
    let out = clients.run(Resolv::V4, "/usr/bin/python3", &["-c", script])?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(said, "ConnectionRefusedError");
    assert!(started.elapsed() < Duration::from_secs(4), "not at once");
    assert!(counter(&clients, "tcp_target_down")? >= 1);

    // A new gateway adopts the attachment: no reattach, counters go on,
    // the same VIP for the same name.
    clients.scenario.restart_gateway()?;
    let output = clients.scenario.gateway_output();
    assert!(output.contains("adopting the programs"), "{output}");
    assert_eq!(
        tests::status_json(clients.scenario.pin_dir())?["link_programs"],
        programs_before,
        "the very same programs stay attached"
    );
    check("bucket.aws.com", expect, &tunnel(&clients)?).map_err(anyhow::Error::msg)?;
    assert!(counter(&clients, "tcp_redirected")? > redirected_before);
    assert_eq!(
        tests::status_json(clients.scenario.pin_dir())?["vips"],
        vips_before
    );

    // The cgroup is removed and created again while no gateway runs (its
    // links are detached with it): the next gateway must not adopt dead
    // links but attach anew.
    clients
        .scenario
        .kill_gateway(nix::sys::signal::Signal::SIGKILL)?;
    let cgroup = clients.scenario.cgroup().to_path_buf();
    std::fs::remove_dir(&cgroup)?;
    let status = tests::status_json(clients.scenario.pin_dir())?;
    assert_eq!(
        status["attached"], false,
        "dead links are not a gate: {status}"
    );
    clients.scenario.restart_gateway()?;
    let output = clients.scenario.gateway_output();
    assert!(output.contains("replacing the programs"), "{output}");
    assert_ne!(
        tests::status_json(clients.scenario.pin_dir())?["link_programs"],
        programs_before
    );
    check("bucket.aws.com", expect, &tunnel(&clients)?).map_err(anyhow::Error::msg)?;

    // A clean stop detaches fully.
    clients.scenario.stop()?;
    let status = tests::status_json(clients.scenario.pin_dir())?;
    assert_eq!(status["attached"], false, "{status}");
    assert_eq!(status["links_pinned"], 0, "{status}");
    Ok(())
}
