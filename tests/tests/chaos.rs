//! A bounded chaos soak through the real path: 8 unmodified-style clients
//! resolve and connect through the gateway while Envoy is killed twice and
//! `gateway run` is killed with SIGKILL once and started again. The
//! namespace has a veth "uplink" carrying the default route; whatever
//! would leave the machine is recorded at its far end. With the DNS
//! outage policy "drop", nothing may escape: no packet to a VIP, no DNS
//! query to the original server; every query is answered and every
//! connection tunnelled to its own domain's upstream within the clients'
//! retries; the VIP table is the same before and after.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tests::{
    repo_root,
    scenario::{isolated_config, start_isolated, FALLBACK_ANSWER, FALLBACK_NAME},
    status_json, unique_name, wait_for,
};

const CLIENTS: usize = 8;
const QUERIES_PER_CLIENT: u32 = 1300;
const CONNECTS_PER_CLIENT: u32 = 260;
/// How long each client spreads its queries over.
const SPREAD_SECONDS: u32 = 30;
/// The nameserver the clients ask: reachable only through the redirect
/// (or, if something escaped, through the uplink).
const NAMESERVER: &str = "192.0.2.53";
const MATCHED: [(&str, &str); 4] = [
    ("a.s3.aws.com", "cluster_1"),
    ("b.s3.aws.com", "cluster_1"),
    ("c.aws.com", "cluster_1"),
    ("example.com", "cluster_2"),
];

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// A veth pair in the test namespace: `up0` carries the default route
/// (with a static neighbour, so packets are sent rather than held for
/// ARP), `up1` is where they arrive.
fn uplink() -> Result<()> {
    run(Command::new("ip").args(["link", "add", "up0", "type", "veth", "peer", "name", "up1"]))?;
    run(Command::new("ip").args(["addr", "add", "198.18.0.1/24", "dev", "up0"]))?;
    for dev in ["up0", "up1"] {
        run(Command::new("ip").args(["link", "set", dev, "up"]))?;
    }
    // (/sys/class/net shows the host's namespace, not this one.)
    let out = Command::new("ip")
        .args(["-o", "link", "show", "up1"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no MAC address for up1 in {text:?}"))?
        .to_owned();
    run(Command::new("ip").args([
        "neigh",
        "add",
        "198.18.0.2",
        "lladdr",
        mac.trim(),
        "dev",
        "up0",
    ]))?;
    run(Command::new("ip").args(["route", "add", "default", "via", "198.18.0.2", "dev", "up0"]))?;
    Ok(())
}

#[test]
fn nothing_escapes_and_nothing_is_lost_while_parts_crash() -> Result<()> {
    let config = isolated_config("gw-chaos")?.replacen("outage = \"pass\"", "outage = \"drop\"", 1);
    let Some(mut scenario) = start_isolated(config, &[], &["curl", "dig", "ip"])? else {
        return Ok(());
    };
    uplink()?;
    let watch_out = std::env::temp_dir()
        .join(unique_name("uplink"))
        .with_extension("json");
    let mut watcher = Command::new("python3")
        .arg(repo_root().join("tests/clients/uplink_watch.py"))
        .arg("up1")
        .arg(&watch_out)
        .spawn()?;
    wait_for("the uplink watcher", Duration::from_secs(10), || {
        Ok(watch_out.exists().then_some(()))
    })?;

    // The watcher sees what leaves: a datagram from outside the cgroup
    // (not redirected) to an outside address must show up.
    std::net::UdpSocket::bind("0.0.0.0:0")?.send_to(b"probe", "192.0.2.99:9")?;

    // Every name gets its VIP before the soak; the table must not change.
    for (name, _) in MATCHED {
        let out = scenario.exec("dig", &["+short", &format!("@{NAMESERVER}"), name])?;
        let vip = String::from_utf8_lossy(&out.stdout);
        assert!(vip.starts_with("10.10.0."), "{name}: {vip}");
    }
    let vips_before = status_json(scenario.pin_dir())?["vips"].clone();

    let matched = MATCHED
        .iter()
        .map(|(n, c)| format!("{n}={c}"))
        .collect::<Vec<_>>()
        .join(",");
    let unmatched = format!("{FALLBACK_NAME}={FALLBACK_ANSWER}");
    let script = repo_root().join("tests/clients/chaos_client.py");
    let script = script.to_string_lossy().into_owned();
    let (queries, connects, seconds) = (
        QUERIES_PER_CLIENT.to_string(),
        CONNECTS_PER_CLIENT.to_string(),
        SPREAD_SECONDS.to_string(),
    );
    let started = Instant::now();
    let clients: Vec<Child> = (0..CLIENTS)
        .map(|_| {
            scenario
                .exec_command(
                    "/usr/bin/python3",
                    &[
                        &script,
                        "--server",
                        NAMESERVER,
                        "--queries",
                        &queries,
                        "--connects",
                        &connects,
                        "--seconds",
                        &seconds,
                        "--matched",
                        &matched,
                        "--unmatched",
                        &unmatched,
                    ],
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting a chaos client")
        })
        .collect::<Result<_>>()?;

    // The faults: Envoy killed twice, then the gateway itself.
    for at in [5, 12] {
        std::thread::sleep(Duration::from_secs(at).saturating_sub(started.elapsed()));
        let envoy = scenario.envoy_pid().context("no Envoy to kill")?;
        kill(Pid::from_raw(envoy as i32), Signal::SIGKILL)?;
        wait_for("Envoy to be restarted", Duration::from_secs(30), || {
            Ok(scenario.envoy_pid().filter(|p| *p != envoy))
        })?;
    }
    std::thread::sleep(Duration::from_secs(19).saturating_sub(started.elapsed()));
    scenario.kill_gateway(Signal::SIGKILL)?;
    std::thread::sleep(Duration::from_secs(1));
    scenario.restart_gateway()?;

    let mut totals = serde_json::Map::new();
    let mut failures = Vec::new();
    for client in clients {
        let out = client.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let Ok(stats) = serde_json::from_str::<serde_json::Value>(text.trim()) else {
            failures.push(format!(
                "a client printed no summary: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        };
        for (key, value) in stats.as_object().into_iter().flatten() {
            let entry = totals.entry(key.clone()).or_insert(serde_json::json!(0));
            match value {
                serde_json::Value::Number(n) => {
                    *entry =
                        serde_json::json!(entry.as_u64().unwrap_or(0) + n.as_u64().unwrap_or(0))
                }
                serde_json::Value::Array(items) if !items.is_empty() => {
                    failures.push(format!("{key}: {items:?}"))
                }
                _ => {}
            }
        }
    }
    let took = started.elapsed();
    kill(Pid::from_raw(watcher.id() as i32), Signal::SIGTERM)?;
    watcher.wait()?;
    let uplink: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&watch_out)?)?;
    let _ = std::fs::remove_file(&watch_out);
    eprintln!("chaos soak: {took:?}, totals {totals:?}, uplink {uplink}");

    assert!(failures.is_empty(), "{failures:#?}\ntotals {totals:?}");
    let total = |key: &str| totals.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(total("queries") >= 10_000, "{totals:?}");
    assert_eq!(
        total("answered"),
        total("queries"),
        "every query answered: {totals:?}"
    );
    assert_eq!(total("wrong_answer"), 0, "{totals:?}");
    assert!(total("connects") >= 2_000, "{totals:?}");
    assert_eq!(
        total("tunnelled"),
        total("connects"),
        "every connection tunnelled: {totals:?}"
    );
    assert!(
        total("dns_retried") + total("connect_retried") > 0,
        "the faults were felt: {totals:?}"
    );
    assert!(
        uplink["destinations"]["192.0.2.99"].as_u64().unwrap_or(0) >= 1,
        "the uplink watcher saw nothing at all: {uplink}"
    );
    // Nothing escaped through the uplink.
    for (destination, count) in uplink["destinations"].as_object().into_iter().flatten() {
        assert!(
            !destination.starts_with("10.10.0."),
            "{count} packets to the VIP {destination} left the namespace"
        );
    }
    for (name, count) in uplink["dns_names"].as_object().into_iter().flatten() {
        assert!(
            !MATCHED.iter().any(|(m, _)| m == name),
            "{count} queries for the matched name {name} left for the original server"
        );
    }
    assert_eq!(status_json(scenario.pin_dir())?["vips"], vips_before);
    assert!(took < Duration::from_secs(110), "the soak took {took:?}");
    Ok(())
}
