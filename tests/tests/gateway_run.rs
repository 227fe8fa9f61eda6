//! `gateway run` end to end: the real kernel, the real Envoy 1.40 with the
//! module, and unmodified clients (dig, curl, getent, Python), each test in
//! its own network namespace with its own cgroup and pin directory.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tests::{
    gateway_bin,
    scenario::{
        default_config_text, isolated_config, start_isolated, SeedScenario, FALLBACK_ANSWER,
        FALLBACK_NAME,
    },
    unique_name, wait_for,
};

/// Clients the tests of this file run.
const TOOLS: [&str; 4] = ["dig", "curl", "getent", "pgrep"];

fn test_config() -> Result<String> {
    isolated_config("gw-run")
}

fn start() -> Result<Option<SeedScenario>> {
    start_with_args(&[])
}

fn start_with_args(extra_args: &[&str]) -> Result<Option<SeedScenario>> {
    start_isolated(test_config()?, extra_args, &TOOLS)
}

fn stdout_of(output: std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn dig(scenario: &SeedScenario, name: &str) -> Result<String> {
    Ok(stdout_of(
        scenario.exec("dig", &["+short", "+tries=2", "+time=3", name])?,
    ))
}

fn curl(scenario: &SeedScenario, args: &[&str]) -> Result<String> {
    let mut all = vec!["-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    let out = scenario.exec("curl", &all)?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[test]
fn seed_scenario_runs_without_iptables() -> Result<()> {
    let Some(scenario) = start()? else {
        return Ok(());
    };

    // Sequential VIPs from the configured range, stable per name.
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, "10.10.0.1");
    assert_eq!(dig(&scenario, "two.s3.aws.com")?, "10.10.0.2");
    assert_eq!(dig(&scenario, "example.com")?, "10.10.0.3");
    assert_eq!(dig(&scenario, "ONE.s3.aws.com.")?, "10.10.0.1");
    // No pattern matches: the fallback resolver answers.
    assert_eq!(dig(&scenario, FALLBACK_NAME)?, FALLBACK_ANSWER);

    let body = curl(&scenario, &["http://s3.aws.com./"])?;
    assert!(body.starts_with("cluster_1\n"), "curl s3.aws.com: {body}");
    let body = curl(&scenario, &["http://example.com./"])?;
    assert!(body.starts_with("cluster_2\n"), "curl example.com: {body}");

    let one = scenario.upstream_requests("cluster_1")?;
    assert_eq!(one.len(), 1, "cluster_1 received {one:?}");
    assert_eq!(one[0]["connect"], "s3.aws.com:80");
    assert_eq!(one[0]["headers"]["x-auth-token"], "abc123");
    let two = scenario.upstream_requests("cluster_2")?;
    assert_eq!(two.len(), 1, "cluster_2 received {two:?}");
    assert_eq!(two[0]["connect"], "example.com:80");
    assert_eq!(two[0]["headers"]["x-auth-token"], "def456");
    Ok(())
}

#[test]
fn system_resolver_clients_resolve_and_connect() -> Result<()> {
    let Some(scenario) = start()? else {
        return Ok(());
    };

    let getent = stdout_of(scenario.exec("getent", &["hosts", "bucket-1.s3.aws.com"])?);
    assert!(
        getent.starts_with("10.10.0.") && getent.contains("bucket-1.s3.aws.com"),
        "getent hosts: {getent:?}"
    );

    // getaddrinfo sends A and AAAA in parallel; AAAA gets NODATA, so only
    // the VIP comes back, and the connection goes through.
    let script = r#"
import socket, urllib.request
infos = socket.getaddrinfo("bucket-2.s3.aws.com", 80, socket.AF_UNSPEC, socket.SOCK_STREAM)
addrs = sorted({i[4][0] for i in infos})
body = urllib.request.urlopen("http://bucket-2.s3.aws.com/", timeout=10).read().decode()
print(",".join(addrs))
print(body.splitlines()[0])
"#;
    let out = scenario.exec("python3", &["-c", script])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "python: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lines[0].starts_with("10.10.0.") && !lines[0].contains(','),
        "getaddrinfo gave {}",
        lines[0]
    );
    assert_eq!(lines[1], "cluster_1");
    let requests = scenario.upstream_requests("cluster_1")?;
    assert!(
        requests
            .iter()
            .any(|r| r["connect"] == "bucket-2.s3.aws.com:80"),
        "{requests:?}"
    );
    Ok(())
}

#[test]
fn processes_outside_the_cgroup_are_untouched() -> Result<()> {
    let Some(scenario) = start()? else {
        return Ok(());
    };
    // Outside the cgroup, DNS goes where resolv.conf says, which in a
    // namespace with only lo is nowhere.
    let out = Command::new("dig")
        .args(["+short", "+tries=1", "+time=1", "one.s3.aws.com"])
        .output()?;
    assert!(
        !stdout_of(out).starts_with("10.10.0."),
        "dig outside the cgroup got a VIP"
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "3", "http://10.10.0.1/"])
        .output()?;
    assert!(
        !out.status.success(),
        "curl to a VIP outside the cgroup succeeded"
    );
    assert!(scenario.upstream_requests("cluster_1")?.is_empty());
    // Meanwhile the gated cgroup works.
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, "10.10.0.1");
    Ok(())
}

#[test]
fn envoy_killed_is_restarted_and_cached_vips_keep_working() -> Result<()> {
    let Some(scenario) = start()? else {
        return Ok(());
    };
    let vip = dig(&scenario, "s3.aws.com")?;
    assert!(vip.starts_with("10.10.0."), "dig gave {vip:?}");

    let first = scenario.envoy_pid().context("no Envoy under gateway run")?;
    kill(Pid::from_raw(first as i32), Signal::SIGKILL)?;
    let second = wait_for("Envoy to be restarted", Duration::from_secs(30), || {
        Ok(scenario.envoy_pid().filter(|p| *p != first))
    })?;
    wait_for(
        "the restarted Envoy to be ready",
        Duration::from_secs(30),
        || {
            Ok(scenario
                .admin_get("/ready")
                .ok()
                .filter(|b| b.contains("LIVE")))
        },
    )?;
    assert!(
        scenario.gateway_output().contains("restarting"),
        "no restart logged"
    );

    // A client holding the answer from before the kill connects with it.
    let resolve = format!("s3.aws.com:80:{vip}");
    let body = curl(&scenario, &["--resolve", &resolve, "http://s3.aws.com/"])?;
    assert!(body.starts_with("cluster_1\n"), "after restart: {body}");
    // And the name still resolves to the same VIP.
    assert_eq!(dig(&scenario, "s3.aws.com")?, vip);
    assert!(Path::new(&format!("/proc/{second}")).exists());
    Ok(())
}

#[test]
fn stopping_gateway_run_leaves_nothing_behind() -> Result<()> {
    let Some(mut scenario) = start()? else {
        return Ok(());
    };
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, "10.10.0.1");
    let envoy = scenario.envoy_pid().context("no Envoy under gateway run")?;
    let cgroup = scenario.cgroup().to_path_buf();
    assert!(cgroup.is_dir());

    let (status, output) = scenario.stop()?;
    assert!(
        status.success(),
        "gateway run exited with {status}:\n{output}"
    );
    assert!(
        !Path::new(&format!("/proc/{envoy}")).exists(),
        "Envoy {envoy} still runs"
    );
    assert!(
        !cgroup.exists(),
        "the cgroup gateway run created is still there"
    );
    let status = tests::status_json(scenario.pin_dir())?;
    assert_eq!(status["attached"], false);
    // Documented: the VIP table stays pinned for the next start.
    assert_eq!(status["vips"][0][1], "one.s3.aws.com");
    Ok(())
}

#[test]
fn envoy_runs_unprivileged_as_another_user() -> Result<()> {
    let user = tests::dedicated_user()?;
    let Some(scenario) = start_with_args(&["--envoy-user", &user.name])? else {
        return Ok(());
    };
    let envoy = scenario.envoy_pid().context("no Envoy under gateway run")?;
    let status = std::fs::read_to_string(format!("/proc/{envoy}/status"))?;
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    let cap_eff = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap_or_default();
    assert!(
        uid_line.split_whitespace().nth(1) == Some(user.uid.to_string().as_str()),
        "Envoy runs as {uid_line}, not as {}",
        user.uid
    );
    assert!(
        cap_eff.ends_with("0000000000000000"),
        "Envoy has capabilities: {cap_eff}"
    );

    // Without any capability it still reads and writes the pinned maps.
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, "10.10.0.1");
    let body = curl(&scenario, &["http://one.s3.aws.com./"])?;
    assert!(body.starts_with("cluster_1\n"), "curl: {body}");
    let vips = tests::status_json(scenario.pin_dir())?["vips"].clone();
    assert_eq!(
        vips[0][1], "one.s3.aws.com",
        "allocation not in the shared map: {vips}"
    );
    Ok(())
}

#[test]
fn a_full_range_reclaims_the_idlest_vip_when_configured() -> Result<()> {
    // Two VIPs, a 1 s TTL, and reclaiming after 2 s idle.
    let config = test_config()?
        .replacen("10.10.0.0/24", "10.10.0.0/30", 1)
        .replacen("ttl = 300", "ttl = 1\nreclaim_idle_after = 2", 1);
    let Some(scenario) = start_isolated(config, &[], &TOOLS)? else {
        return Ok(());
    };
    assert_eq!(dig(&scenario, "a.s3.aws.com")?, "10.10.0.1");
    assert_eq!(dig(&scenario, "b.s3.aws.com")?, "10.10.0.2");
    // Full, and nothing idle for 2 s yet: SERVFAIL (dig +short prints nothing).
    assert_eq!(dig(&scenario, "c.s3.aws.com")?, "");
    std::thread::sleep(Duration::from_millis(3200));
    // b.s3.aws.com is used again just before: a.s3.aws.com is the idlest.
    assert_eq!(dig(&scenario, "b.s3.aws.com")?, "10.10.0.2");
    assert_eq!(dig(&scenario, "c.s3.aws.com")?, "10.10.0.1");
    let stats = scenario.admin_get("/stats")?;
    for (counter, at_least) in [("reclaimed", 1), ("exhausted", 1)] {
        let value = tests::envoy::stat_in(
            &stats,
            &format!("dynamicmodulescustom.dns_gateway.{counter}"),
        )
        .with_context(|| format!("no {counter} counter in /stats"))?;
        assert!(value >= at_least, "{counter}: {value}");
    }
    // The shared map follows: the CLI sees the new owner.
    let status = tests::status_json(scenario.pin_dir())?;
    assert!(
        status["vips"].as_array().is_some_and(|v| v
            .iter()
            .any(|e| e[0] == "10.10.0.1" && e[1] == "c.s3.aws.com")),
        "{status}"
    );
    Ok(())
}

#[test]
fn invalid_configuration_files_name_the_field() -> Result<()> {
    if !gateway_bin().exists() {
        assert!(!tests::in_ci(), "gateway binary missing");
        return Ok(());
    }
    let dir = std::env::temp_dir().join(unique_name("gw-badconfig"));
    std::fs::create_dir_all(&dir)?;
    let text = default_config_text()?;
    let cases = [
        (text.replace("10.10.0.0/24", "10.10.0.0/33"), "dns.vip_cidr"),
        (
            text.replace("\"*.aws.com\"", "\"*.*.aws.com\""),
            "domains[0].domain",
        ),
        (
            text.replace("cluster = \"cluster_2\"", "cluster = \"cluster_9\""),
            "domains[1].metadata.cluster",
        ),
        (
            text.replace("127.0.0.1:18001", "127.0.0.1:99999"),
            "clusters[0].address",
        ),
        (
            text.replace("[dns]", "[dns]\nbogus = 1"),
            "unknown field `bogus`",
        ),
        ("cgroup = [".to_owned(), "line 1"),
        // The issue's hostile configurations: each refused before Envoy
        // starts, naming the field.
        (
            text.replace("auth_token = \"abc123\"", "\"auth token\" = \"abc123\""),
            "domains[0].metadata.auth token",
        ),
        (
            text.replace("ttl = 300", "ttl = 300\nreclaim_idle_after = 3000000"),
            "dns.reclaim_idle_after",
        ),
        (
            text.replace("\"X-Auth-Token\"", "\"Host\""),
            "tunnel.headers.Host",
        ),
        (
            text.replace("\"abc123\"", "\"abc\\r\\nX-Evil: 1\""),
            "domains[0].metadata.auth_token",
        ),
        (
            text.replace(
                "pin_dir = \"/sys/fs/bpf/dns-egress-gateway\"",
                "pin_dir = \"\"",
            ),
            "pin_dir",
        ),
        (
            text.replace(
                "pin_dir = \"/sys/fs/bpf/dns-egress-gateway\"",
                "pin_dir = \"/sys/fs/bpf\"",
            ),
            "pin_dir",
        ),
        (
            text.replace("127.0.0.1:15001", "0.0.0.0:15001"),
            "listeners.tcp",
        ),
        (text.replace("10.10.0.0/24", "127.0.0.0/24"), "dns.vip_cidr"),
        (text.replace("10.10.0.0/24", "224.1.0.0/24"), "dns.vip_cidr"),
        (
            text.replace("127.0.0.1:18002", "10.10.0.20:18002"),
            "clusters[1].address",
        ),
        (
            text.replace("fallback = []", "fallback = [\"10.10.0.53:53\"]"),
            "dns.fallback[0]",
        ),
        (
            text.replace(
                "tcp = \"127.0.0.1:15001\"",
                "tcp = \"127.0.0.1:15001\"\nadmin = \"127.0.0.1:15000\"",
            ),
            "listeners.admin",
        ),
    ];
    // The command line gets the same checks as the file: (arguments,
    // expected text, whether `envoy-config` takes them too).
    let cli_cases: [(&[&str], &str, bool); 4] = [
        (&["--fallback", "127.0.0.1:15053"], "dns.fallback[0]", true),
        (&["--fallback", "10.10.0.9:53"], "dns.fallback[0]", true),
        (&["--concurrency", "100000"], "--concurrency", false),
        (&["--envoy-user", "nobody"], "shared by other users", false),
    ];
    let both: &[&str] = &["run", "envoy-config"];
    let all = cases
        .iter()
        .map(|(config, field)| (config.as_str(), &[][..], *field, both))
        .chain(cli_cases.iter().map(|(args, field, also)| {
            let commands: &[&str] = if *also { both } else { &["run"] };
            (text.as_str(), *args, *field, commands)
        }));
    for (i, (config, args, field, commands)) in all.enumerate() {
        let path = dir.join(format!("case-{i}.toml"));
        std::fs::write(&path, config)?;
        for command in commands {
            let out = Command::new(gateway_bin())
                .arg(command)
                .arg("--config")
                .arg(&path)
                .args(args)
                .output()?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "gateway {command} accepted case {i}");
            assert!(
                stderr.contains(field),
                "gateway {command} case {i}: expected {field:?} in {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
            assert!(!stderr.contains("starting Envoy"), "{stderr}");
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn an_upstream_that_fails_or_never_answers_closes_the_client_in_bounded_time() -> Result<()> {
    // cluster_1 → a port nothing listens on; cluster_2 → a proxy that
    // accepts the connection and never answers the CONNECT.
    let config = test_config()?
        .replacen("127.0.0.1:18001", "127.0.0.1:18004", 1)
        .replacen("127.0.0.1:18002", "127.0.0.1:18003", 1)
        .replacen("connect_timeout = 5", "connect_timeout = 1", 1)
        .replacen(
            "connect_response_timeout = 10",
            "connect_response_timeout = 2",
            1,
        );
    let Some(scenario) = start_isolated(config, &[], &TOOLS)? else {
        return Ok(());
    };
    let _silent = tests::Guarded::spawn("silent proxy", {
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', 18003))\ns.listen(16)\nheld=[]\nwhile True:\n    held.append(s.accept())",
        ]);
        cmd
    })?;
    tests::wait_for_listener("127.0.0.1:18003", Duration::from_secs(10))?;
    let timed = |name: &str| -> Result<(Duration, String)> {
        let started = std::time::Instant::now();
        let out = scenario.exec(
            "curl",
            &["-sS", "--max-time", "30", &format!("http://{name}/")],
        )?;
        Ok((
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    // Connect refused upstream: the client is closed at once.
    let (took, err) = timed("bucket.aws.com")?;
    assert!(took < Duration::from_secs(3), "took {took:?}: {err}");
    assert!(!err.is_empty(), "curl must fail");
    // CONNECT never answered: closed after the CONNECT response timeout
    // (2 s), not the idle timeout (an hour) or curl's 30 s.
    let (took, err) = timed("example.com")?;
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "took {took:?}: {err}"
    );
    // Counted per cluster.
    let stats = scenario.admin_get("/stats")?;
    let stat = |name: &str| tests::envoy::stat_in(&stats, name).unwrap_or(0);
    assert!(
        stat("cluster.cluster_1.upstream_cx_connect_fail") >= 1,
        "{stats}"
    );
    for counter in [
        "dynamicmodulescustom.cache_lookup.connect_response_timeout",
        "dynamicmodulescustom.cache_lookup.connect_response_timeout.cluster_2",
    ] {
        assert_eq!(stat(counter), 1, "{counter}\n{stats}");
    }
    assert_eq!(
        stat("dynamicmodulescustom.cache_lookup.connect_response_timeout.cluster_1"),
        0,
        "a refused connect is no CONNECT timeout"
    );

    Ok(())
}

#[test]
fn a_tunnel_that_is_up_outlives_the_connect_response_timeout() -> Result<()> {
    let config = test_config()?
        .replacen("connect_timeout = 5", "connect_timeout = 1", 1)
        .replacen(
            "connect_response_timeout = 10",
            "connect_response_timeout = 2",
            1,
        );
    let Some(scenario) = start_isolated(config, &[], &TOOLS)? else {
        return Ok(());
    };
    // The client connects, stays silent for longer than the timeout (a
    // pooled connection does), then sends a request: the tunnel was up, so
    // the deadline left it alone.
    let out = scenario.exec(
        "python3",
        &[
            "-c",
            "import socket, time\n\
             s = socket.create_connection(('one.s3.aws.com', 80), timeout=10)\n\
             time.sleep(2.5)\n\
             s.sendall(b'GET / HTTP/1.0\\r\\nHost: one.s3.aws.com\\r\\n\\r\\n')\n\
             data = b''\n\
             while True:\n    chunk = s.recv(4096)\n    if not chunk: break\n    data += chunk\n\
             print(data.decode(errors='replace'))",
        ],
    )?;
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.contains("cluster_1"),
        "reply {reply:?}, stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = scenario.admin_get("/stats")?;
    assert_eq!(
        tests::envoy::stat_in(
            &stats,
            "dynamicmodulescustom.cache_lookup.connect_response_timeout"
        ),
        Some(0),
        "{stats}"
    );
    Ok(())
}

#[test]
fn an_envoy_left_on_the_admin_socket_is_taken_over() -> Result<()> {
    let Some(mut scenario) = start()? else {
        return Ok(());
    };
    // The gateway dies; Envoy dies with it (PR_SET_PDEATHSIG).
    let envoy = scenario.envoy_pid().context("no Envoy")?;
    scenario.kill_gateway(Signal::SIGKILL)?;
    wait_for(
        "Envoy to die with the gateway",
        Duration::from_secs(10),
        || Ok((!Path::new(&format!("/proc/{envoy}")).exists()).then_some(())),
    )?;
    // An Envoy on this gateway's bootstrap (and so its admin socket) that
    // nothing supervises, as an older gateway could leave.
    let instance = std::fs::read_dir(scenario.state_dir())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.join("envoy.json").exists())
        .context("no instance directory")?;
    let mut stray = tests::Guarded::spawn("stray envoy", {
        let mut cmd = Command::new(tests::envoy::envoy_bin());
        cmd.arg("-c")
            .arg(instance.join("envoy.json"))
            .args(["-l", "error", "--disable-hot-restart", "--base-id"])
            .arg(tests::envoy::unique_base_id().to_string())
            .env(
                "ENVOY_DYNAMIC_MODULES_SEARCH_PATH",
                tests::envoy::module_dir(),
            );
        cmd
    })?;
    wait_for("the stray Envoy to answer", Duration::from_secs(20), || {
        Ok(scenario
            .admin_get("/ready")
            .ok()
            .filter(|b| b.contains("LIVE")))
    })?;
    scenario.restart_gateway()?;
    let output = scenario.gateway_output();
    assert!(
        output.contains("still answers") && output.contains("stopping it to take over"),
        "{output}"
    );
    assert!(!stray.is_running(), "the stray Envoy was stopped");
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, "10.10.0.1");
    Ok(())
}

/// `listeners.metrics`: Prometheus text from Envoy's stats, and nothing
/// else of the admin interface (no config dump with the tokens, no quit).
#[test]
fn the_metrics_listener_serves_prometheus_stats_and_nothing_else() -> Result<()> {
    let config = test_config()?.replacen(
        "tcp = \"127.0.0.1:15001\"",
        "tcp = \"127.0.0.1:15001\"\nmetrics = \"127.0.0.1:15090\"",
        1,
    );
    let Some(scenario) = start_isolated(config, &[], &TOOLS)? else {
        return Ok(());
    };
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, "10.10.0.1");
    let get = |method: &str, path: &str| -> Result<(String, String)> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-X",
                method,
            ])
            .arg(format!("http://127.0.0.1:15090{path}"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        Ok((code.to_owned(), body.to_owned()))
    };
    let (code, body) = get("GET", "/stats/prometheus")?;
    assert_eq!(code, "200", "{body}");
    assert!(
        body.contains("# TYPE envoy_"),
        "Prometheus text: {}",
        &body[..body.len().min(300)]
    );
    assert!(
        body.lines()
            .any(|l| l.contains("dns_gateway") && l.contains("answered")),
        "the module's counters are among them"
    );
    for (method, path) in [
        ("GET", "/config_dump"),
        ("POST", "/quitquitquit"),
        ("POST", "/stats/prometheus"),
        ("HEAD", "/stats/prometheus"),
        ("GET", "/stats/prometheus?filter=.*&format=json"),
        ("GET", "/stats/prometheus/../../config_dump"),
        ("GET", "/stats"),
    ] {
        let (code, body) = get(method, path)?;
        assert_eq!(code, "404", "{method} {path}: {body}");
        assert!(!body.contains("abc123"), "no token leaks through {path}");
    }
    assert!(
        scenario.envoy_pid().is_some(),
        "Envoy still runs after POST /quitquitquit"
    );
    Ok(())
}

/// `gateway envoy-config | head`: a reader that went away ends the output
/// quietly, never with a panic. The pipe's read end is closed before the
/// command starts, so its first write fails with EPIPE.
#[test]
fn printing_into_a_closed_pipe_is_not_a_panic() -> Result<()> {
    for args in [&["envoy-config"][..], &["default-config"][..]] {
        let (read_end, write_end) = nix::unistd::pipe()?;
        drop(read_end);
        let out = Command::new(gateway_bin())
            .args(args)
            .stdout(std::process::Stdio::from(write_end))
            .stderr(std::process::Stdio::piped())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.status.success(), "{args:?}: {stderr}");
    }
    Ok(())
}

/// A configured gated cgroup removed and created again (as systemd does
/// when a service restarts) has a new id; `gateway run` gates it again
/// within a second instead of leaving it ungated until a reload.
#[test]
fn a_configured_cgroup_created_again_is_gated_again() -> Result<()> {
    let config = test_config()?.replacen("pin_dir = ", "gate = [\"app\"]\npin_dir = ", 1);
    let Some(scenario) = start_isolated(config, &[], &TOOLS)? else {
        return Ok(());
    };
    let app = scenario.cgroup().join("app");
    let dig_in = |cgroup: &Path| -> Result<String> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > '{}/cgroup.procs' && exec dig +short +tries=1 +time=1 one.s3.aws.com",
                cgroup.display()
            ))
            .output()?;
        Ok(stdout_of(out))
    };
    assert_eq!(dig_in(&app)?, "10.10.0.1", "the configured cgroup is gated");
    std::fs::remove_dir(&app).context("removing the gated cgroup")?;
    std::fs::create_dir(&app).context("creating it again")?;
    let started = std::time::Instant::now();
    wait_for(
        "the new cgroup to be gated",
        Duration::from_secs(10),
        || Ok((dig_in(&app)? == "10.10.0.1").then_some(())),
    )
    .with_context(|| scenario.gateway_output())?;
    eprintln!(
        "measured: gated again {:?} after it was created",
        started.elapsed()
    );
    assert!(scenario.gateway_output().contains("gated again"));
    Ok(())
}
