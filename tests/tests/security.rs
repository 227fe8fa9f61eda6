//! The gateway under attack, end to end (real kernel, real Envoy 1.40):
//! a connection gets a domain's credentials only if it dialled that
//! domain's VIP itself, in Envoy's network namespace, and no other local
//! user can read a token or steer the gateway. Each test runs in its own
//! network namespace with its own cgroup and pin directory.

use std::{
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;
use tests::{
    enter_private_netns, gateway_bin, repo_root,
    scenario::{isolated_config, scenario_prerequisites, start_isolated, SeedScenario},
    unique_name, wait_for,
};

/// The unprivileged user the attacks run as.
const NOBODY: &str = "65534";

/// Debian's python3 (root's PATH may point into root's home, which other
/// users cannot enter).
const PYTHON: &str = "/usr/bin/python3";

/// Clients the tests of this file run.
const TOOLS: [&str; 5] = ["dig", "curl", "setpriv", "unshare", "pgrep"];

fn test_config() -> Result<String> {
    isolated_config("gw-sec")
}

fn start_with(config: String) -> Result<Option<SeedScenario>> {
    start_isolated(config, &[], &TOOLS)
}

fn start() -> Result<Option<SeedScenario>> {
    start_with(test_config()?)
}

fn dig(scenario: &SeedScenario, name: &str) -> Result<String> {
    let out = scenario.exec("dig", &["+short", "+time=2", "+tries=1", name])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `setpriv` as the unprivileged user, no supplementary groups.
fn as_nobody(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        NOBODY,
        "--regid",
        NOBODY,
        "--clear-groups",
        "--",
        program,
    ])
    .args(args);
    cmd
}

fn client_script() -> String {
    repo_root()
        .join("tests/clients/bound_client.py")
        .to_string_lossy()
        .into_owned()
}

fn parse_json(out: &Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "client printed {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A module counter from Envoy's admin socket (0 when not yet defined).
fn module_counter(scenario: &SeedScenario, name: &str) -> Result<u64> {
    let stats = scenario.admin_get("/stats?filter=dynamicmodulescustom")?;
    Ok(stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("dynamicmodulescustom.{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

fn kernel_counter(scenario: &SeedScenario, name: &str) -> Result<u64> {
    let status = tests::status_json(scenario.pin_dir())?;
    status["counters"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p[0] == name).and_then(|p| p[1].as_u64()))
        .with_context(|| format!("no kernel counter {name}"))
}

/// A client port unlikely to be in use, distinct per test process.
fn client_port(offset: u16) -> u16 {
    41_000 + (std::process::id() % 4000) as u16 + offset
}

#[test]
fn a_reused_client_port_gets_no_credentials() -> Result<()> {
    let Some(scenario) = start()? else {
        return Ok(());
    };
    let port = client_port(0);
    let port_arg = port.to_string();
    // A gated client from port P reaches one.s3.aws.com with its token
    // (it reads until the proxy closes, so its port is not left in
    // TIME_WAIT and can be bound again at once).
    let script = client_script();
    let out = scenario.exec(
        PYTHON,
        &[
            &script,
            "--bind-port",
            &port_arg,
            "--connect",
            "one.s3.aws.com:80",
            "--send",
            "GET / HTTP/1.1\\r\\nHost: one.s3.aws.com\\r\\nConnection: close\\r\\n\\r\\n",
            "--timeout",
            "10",
        ],
    )?;
    let gated = parse_json(&out)?;
    let body = gated["received"].as_str().unwrap_or_default();
    assert!(body.contains("cluster_1\n"), "gated client: {gated}");
    let before = scenario.upstream_requests("cluster_1")?.len();
    assert_eq!(before, 1);

    // An unprivileged process outside the cgroup binds P and connects
    // straight to the TCP listener, as the issue's port scan did.
    let out = as_nobody(
        PYTHON,
        &[
            &script,
            "--bind-port",
            &port_arg,
            "--connect",
            "127.0.0.1:15001",
            "--send",
            "GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
            "--timeout",
            "3",
            "--retry-seconds",
            "5",
        ],
    )
    .output()?;
    let attempt = parse_json(&out)?;
    assert_eq!(
        attempt["connected"], true,
        "the attack never connected: {attempt}"
    );
    assert_eq!(attempt["local"], format!("127.0.0.1:{port}"));
    assert_eq!(
        attempt["received"], "",
        "the attacker got an answer: {attempt}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        scenario.upstream_requests("cluster_1")?.len(),
        before,
        "the upstream saw a CONNECT for the attacker"
    );
    assert!(scenario.upstream_requests("cluster_2")?.is_empty());
    assert!(module_counter(&scenario, "cache_lookup.not_redirected")? >= 1);
    assert!(module_counter(&scenario, "cache_lookup.closed")? >= 1);
    Ok(())
}

#[test]
fn a_foreign_network_namespace_cannot_take_over_a_clients_destination() -> Result<()> {
    let Some(scenario) = start()? else {
        return Ok(());
    };
    let vip_a = dig(&scenario, "one.s3.aws.com")?;
    let vip_b = dig(&scenario, "example.com")?;
    assert!(vip_a.starts_with("10.10.0.") && vip_b.starts_with("10.10.0."));
    assert_ne!(vip_a, vip_b);
    let envoy = scenario.envoy_pid().context("no Envoy")?;
    let port = client_port(100);
    let port_arg = port.to_string();
    let script = client_script();

    kill(Pid::from_raw(envoy as i32), Signal::SIGSTOP)?;
    let resumed = scopeguard(envoy);
    // The victim, gated, dials domain A's VIP from port P; Envoy is stopped,
    // so the connection waits in the accept queue.
    let victim_target = format!("{vip_a}:80");
    let victim = tests::Guarded::spawn("victim", {
        let mut c = Command::new(gateway_bin());
        c.arg("exec")
            .arg("--config")
            .arg(scenario.work_dir().join("gateway.toml"))
            .args(["--", "python3", &script, "--bind-port", &port_arg])
            .args(["--connect", &victim_target, "--timeout", "20"])
            .args([
                "--send",
                "GET / HTTP/1.1\\r\\nHost: one.s3.aws.com\\r\\nConnection: close\\r\\n\\r\\n",
            ]);
        c
    })?;
    let client = format!("127.0.0.1:{port}");
    wait_for("the victim's record", Duration::from_secs(10), || {
        let status = tests::status_json(scenario.pin_dir())?;
        Ok(status["original_destinations"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p[0] == client.as_str()))
            .then_some(()))
    })?;

    // The attacker, gated and unprivileged, in its own user and network
    // namespace, dials domain B's VIP from 127.0.0.1:P there.
    let cgroup_procs = scenario.cgroup().join("cgroup.procs");
    let attacker_target = format!("{vip_b}:80");
    let inner = format!(
        "ip link set lo up && exec {PYTHON} {script} --bind-port {port} --connect {attacker_target} --timeout 2"
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > '{}' && exec setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups -- unshare -Urn sh -c \"$0\"",
            cgroup_procs.display()
        ))
        .arg(&inner)
        .output()?;
    let attack = parse_json(&out)?;
    assert_eq!(
        attack["connected"], false,
        "the foreign namespace reached something: {attack}"
    );
    let status = tests::status_json(scenario.pin_dir())?;
    let entry = status["original_destinations"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p[0] == client.as_str()).cloned())
        .context("the victim's record is gone")?;
    assert_eq!(entry[1], victim_target.as_str(), "overwritten: {entry}");
    assert!(kernel_counter(&scenario, "foreign_netns_passed")? >= 1);

    drop(resumed);
    let mut victim = victim;
    wait_for("the victim to finish", Duration::from_secs(20), || {
        Ok((!victim.is_running()).then_some(()))
    })?;
    let seen: Value = serde_json::from_str(victim.output().lines().last().unwrap_or_default())
        .with_context(|| format!("victim output: {}", victim.output()))?;
    let received = seen["received"].as_str().unwrap_or_default();
    assert!(received.contains("cluster_1\n"), "victim: {seen}");
    let requests = scenario.upstream_requests("cluster_1")?;
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0]["connect"], "one.s3.aws.com:80");
    assert_eq!(requests[0]["headers"]["x-auth-token"], "abc123");
    assert!(scenario.upstream_requests("cluster_2")?.is_empty());
    Ok(())
}

/// Sends SIGCONT to the stopped Envoy when dropped, whatever happens.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

fn scopeguard(pid: u32) -> Resume {
    Resume(pid)
}

#[test]
fn other_local_users_cannot_read_tokens_or_steer_the_gateway() -> Result<()> {
    let Some(scenario) = start()? else {
        return Ok(());
    };
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, "10.10.0.1");
    let envoy = scenario.envoy_pid().context("no Envoy")?;
    let state = scenario.state_dir();
    let admin = scenario.admin_socket().to_path_buf();
    let instance = admin
        .parent()
        .and_then(Path::parent)
        .context("admin socket parent")?
        .to_path_buf();

    // Root sees the token where it lives; nobody else can read it anywhere.
    let as_root = Command::new("grep")
        .args(["-rl", "abc123"])
        .arg(&state)
        .output()?;
    assert!(
        !as_root.stdout.is_empty(),
        "the bootstrap should hold the token (as root)"
    );
    assert!(
        scenario
            .pin_dir()
            .join(gateway_common::RECLAIM_LOCK_DIR)
            .is_dir(),
        "the loader creates the reclaim lock"
    );
    let attempts: Vec<(&str, Vec<String>)> = vec![
        (
            "grep the state directory",
            vec![
                "grep".into(),
                "-r".into(),
                "abc123".into(),
                state.display().to_string(),
            ],
        ),
        (
            "list the gateway's directory",
            vec!["ls".into(), instance.display().to_string()],
        ),
        (
            "read the bootstrap",
            vec![
                "cat".into(),
                instance.join("envoy.json").display().to_string(),
            ],
        ),
        (
            "admin config_dump",
            curl_admin(&admin, "GET", "/config_dump"),
        ),
        (
            "admin quitquitquit",
            curl_admin(&admin, "POST", "/quitquitquit"),
        ),
        (
            "admin drain_listeners",
            curl_admin(&admin, "POST", "/drain_listeners"),
        ),
        (
            "the old TCP admin port",
            vec![
                "curl".into(),
                "-sS".into(),
                "--max-time".into(),
                "2".into(),
                "http://127.0.0.1:15000/config_dump".into(),
            ],
        ),
        (
            "list the pin directory",
            vec!["ls".into(), scenario.pin_dir().display().to_string()],
        ),
        (
            // Holding it would stall every Envoy's reclaiming.
            "take the reclaim lock",
            vec![
                "flock".into(),
                "-n".into(),
                scenario
                    .pin_dir()
                    .join(gateway_common::RECLAIM_LOCK_DIR)
                    .display()
                    .to_string(),
                "true".into(),
            ],
        ),
        (
            "open a pinned map for writing",
            vec![
                PYTHON.into(),
                "-c".into(),
                format!(
                    "import os; os.open('{}/GW_VIPS', os.O_RDWR)",
                    scenario.pin_dir().display()
                ),
            ],
        ),
    ];
    for (what, argv) in &attempts {
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        let out = as_nobody(&argv[0], &args).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success(),
            "an unprivileged user could {what}: {stdout}"
        );
        assert!(!stdout.contains("abc123"), "{what} showed the token");
    }
    // Envoy was neither stopped nor drained.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(scenario.envoy_pid(), Some(envoy));
    assert_eq!(dig(&scenario, "example.com")?, "10.10.0.2");

    // The supervisor notices listeners that stopped (drained by root here)
    // although the process lives and /ready says LIVE, and restarts Envoy.
    let out = Command::new("curl")
        .args(["-sS", "-X", "POST", "--max-time", "5", "--unix-socket"])
        .arg(&admin)
        .arg("http://admin/drain_listeners")
        .output()?;
    assert!(out.status.success(), "root could not drain: {out:?}");
    wait_for("Envoy to be restarted", Duration::from_secs(30), || {
        Ok(scenario.envoy_pid().filter(|p| *p != envoy))
    })?;
    wait_for("DNS to be served again", Duration::from_secs(30), || {
        Ok((dig(&scenario, "example.com")? == "10.10.0.2").then_some(()))
    })?;
    assert!(
        scenario.gateway_output().contains("not serving"),
        "no health restart logged:\n{}",
        scenario.gateway_output()
    );
    Ok(())
}

fn curl_admin(admin: &Path, method: &str, path: &str) -> Vec<String> {
    vec![
        "curl".into(),
        "-sS".into(),
        "-f".into(),
        "--max-time".into(),
        "3".into(),
        "-X".into(),
        method.into(),
        "--unix-socket".into(),
        admin.display().to_string(),
        format!("http://admin{path}"),
    ]
}

#[test]
fn a_squatted_pin_directory_is_refused() -> Result<()> {
    if !scenario_prerequisites(&TOOLS) {
        return Ok(());
    }
    enter_private_netns()?;
    use std::os::unix::fs::PermissionsExt as _;
    for (what, owner, mode, expected) in [
        (
            "owned by another user",
            Some(65534),
            0o700,
            "owned by uid 65534",
        ),
        (
            "writable by others",
            None,
            0o777,
            "writable by group or others",
        ),
    ] {
        let config = test_config()?;
        let table: toml::Table = config.parse()?;
        let pin_dir = table["pin_dir"].as_str().context("pin_dir")?.to_owned();
        std::fs::create_dir(&pin_dir)?;
        std::fs::set_permissions(&pin_dir, std::fs::Permissions::from_mode(mode))?;
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&pin_dir, Some(uid), Some(uid))?;
        }
        let dir = std::env::temp_dir().join(unique_name("gw-squat"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("gateway.toml");
        std::fs::write(&path, &config)?;
        let out = Command::new(gateway_bin())
            .args(["run", "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--fallback", "127.0.0.1:5353"])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let _ = std::fs::remove_dir(&pin_dir);
        let cgroup = tests::cgroup2_root()?.join(table["cgroup"].as_str().unwrap_or_default());
        let _ = std::fs::remove_dir(&cgroup);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!out.status.success(), "a pin directory {what} was accepted");
        assert!(stderr.contains(expected), "{what}: {stderr}");
        assert!(!stderr.contains("starting Envoy"), "{stderr}");
    }
    Ok(())
}

#[test]
fn dns_responses_get_no_answer_other_opcodes_notimp_and_floods_are_capped() -> Result<()> {
    let config = test_config()?.replacen(
        "max_new_vips_per_second = 50\nnew_vip_burst = 100",
        "max_new_vips_per_second = 1\nnew_vip_burst = 5",
        1,
    );
    if !config.contains("new_vip_burst = 5") {
        bail!("the default configuration lacks the allocation cap lines");
    }
    let Some(scenario) = start_with(config)? else {
        return Ok(());
    };
    let script = repo_root().join("tests/clients/dns_hygiene.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--server", "127.0.0.1:15053", "--zone", "aws.com"])
        .args(["--known", "known.s3.aws.com", "--flood", "40"])
        .output()?;
    let result = parse_json(&out)?;
    let known = result["known_before"]["answer"].clone();
    assert!(
        known.as_str().is_some_and(|a| a.starts_with("10.10.0.")),
        "{result}"
    );
    assert_eq!(
        result["response_reply"],
        Value::Null,
        "a response was answered: {result}"
    );
    for op in ["1", "2", "4", "5"] {
        assert_eq!(result["opcodes"][op]["rcode"], 4, "opcode {op}: {result}");
        assert_eq!(result["opcodes"][op]["qr"], 1);
    }
    let servfail = result["flood_rcodes"]["2"].as_u64().unwrap_or(0);
    let answered = result["flood_rcodes"]["0"].as_u64().unwrap_or(0);
    assert_eq!(servfail + answered, 40, "{result}");
    assert!(
        answered <= 8,
        "the cap let {answered} new names through: {result}"
    );
    assert!(servfail >= 32, "{result}");
    assert_eq!(result["known_after"]["answer"], known, "{result}");
    assert_eq!(
        module_counter(&scenario, "dns_gateway.rate_limited")?,
        servfail
    );
    assert!(module_counter(&scenario, "dns_gateway.responses_dropped")? >= 1);
    assert_eq!(module_counter(&scenario, "dns_gateway.notimp")?, 4);
    Ok(())
}

/// Envoy's own user (the most a compromised Envoy has) can write only its
/// own directory in the state directory: it cannot plant a link or a file
/// where root writes (the bootstrap, the domains and clusters files, the
/// reload report), so nothing it does makes root write through a link.
#[test]
fn envoys_user_cannot_plant_anything_where_root_writes() -> Result<()> {
    let user = tests::dedicated_user()?;
    let Some(scenario) = start_isolated(test_config()?, &["--envoy-user", &user.name], &TOOLS)?
    else {
        return Ok(());
    };
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, "10.10.0.1");
    let envoy_dir = scenario
        .admin_socket()
        .parent()
        .context("admin socket parent")?
        .to_path_buf();
    let instance = envoy_dir.parent().context("instance dir")?.to_path_buf();
    let as_envoy = |args: &[&str]| -> Result<bool> {
        let status = Command::new("setpriv")
            .args([
                "--reuid",
                &user.name,
                "--regid",
                &user.name,
                "--clear-groups",
                "--",
            ])
            .args(args)
            .status()?;
        Ok(status.success())
    };
    let planted = [
        instance.join("cds.new"),
        instance.join("reload-result.partial"),
        instance.join("domains.partial"),
        instance.join("cds").join("clusters.json.link"),
    ];
    for path in &planted {
        let path = path.display().to_string();
        assert!(
            !as_envoy(&["ln", "-s", "/etc/shadow", &path])?,
            "Envoy's user planted a link at {path}"
        );
    }
    assert!(
        !as_envoy(&[
            "mv",
            &instance.join("cds").display().to_string(),
            "/tmp/gw-moved-cds"
        ])?,
        "Envoy's user moved root's cds directory"
    );
    // It reads what it needs, and writes its own directory.
    assert!(as_envoy(&[
        "cat",
        &instance.join("envoy.json").display().to_string()
    ])?);
    let own = envoy_dir.join("probe").display().to_string();
    assert!(
        as_envoy(&["touch", &own])?,
        "Envoy's user writes its own directory"
    );
    // A link it puts where its admin socket was is not followed: root
    // refuses to connect through it.
    let admin = scenario.admin_socket().display().to_string();
    assert!(as_envoy(&["mv", &admin, &format!("{admin}.moved")])?);
    assert!(as_envoy(&["ln", "-s", &format!("{admin}.moved"), &admin])?);
    let check = Command::new(tests::gateway_bin())
        .args(["status", "--check", "--pin-dir"])
        .arg(scenario.pin_dir())
        .arg("--state-dir")
        .arg(scenario.state_dir())
        .output()?;
    let text = String::from_utf8_lossy(&check.stderr);
    assert!(
        !check.status.success() && text.contains("not a socket"),
        "{text}"
    );
    Ok(())
}

/// Any other local user cannot widen, narrow or reload the gate: `gateway
/// gate`, `ungate`, `gate-pods` and `reload` are refused (the pins and the
/// state directory are root's), and the gate table is unchanged.
#[test]
fn other_local_users_cannot_change_the_gate_or_reload() -> Result<()> {
    let Some(scenario) = start()? else {
        return Ok(());
    };
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, "10.10.0.1");
    let before = tests::status_json(scenario.pin_dir())?["gated"].clone();
    let outsider = scenario.cgroup().join("outsider");
    std::fs::create_dir(&outsider)?;
    let gateway = tests::gateway_bin().display().to_string();
    let pin = scenario.pin_dir().display().to_string();
    let state = scenario.state_dir().display().to_string();
    let config = scenario
        .config_path()
        .context("the scenario has a file")?
        .display()
        .to_string();
    let pods = std::env::temp_dir().join(tests::unique_name("gw-pods"));
    std::fs::write(&pods, r#"{"kind":"PodList","items":[]}"#)?;
    std::fs::set_permissions(&pods, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let cgroup = scenario.cgroup().display().to_string();
    let attempts: [&[&str]; 4] = [
        &["gate", "--pin-dir", &pin, "outsider"],
        &["ungate", "--pin-dir", &pin, &cgroup],
        &[
            "gate-pods",
            "--pin-dir",
            &pin,
            "--kubepods-root",
            &cgroup,
            "--pod-list",
            &pods.display().to_string(),
        ],
        &["reload", "--config", &config, "--state-dir", &state],
    ];
    for args in attempts {
        let out = as_nobody(&gateway, args).output()?;
        assert!(
            !out.status.success(),
            "nobody ran gateway {args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let _ = std::fs::remove_file(&pods);
    assert_eq!(tests::status_json(scenario.pin_dir())?["gated"], before);
    assert_eq!(
        dig(&scenario, "one.s3.aws.com")?,
        "10.10.0.1",
        "still gated"
    );
    std::fs::remove_dir(&outsider)?;
    Ok(())
}
