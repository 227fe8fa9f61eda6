//! Compatibility with the seed design: its `envoy.yaml`, unchanged, with
//! its iptables DNAT rules, inside a private network namespace. The module
//! must work there with no BPF maps (in-process VIP table, lookup by the
//! connection's local address after `original_dst`).

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};
use tests::{
    enter_private_netns, prerequisites_met, repo_root, scenario::start_upstreams, target_dir,
    tools_dir, unique_name, wait_for, Guarded,
};

fn sh(cmd: &str) -> Result<()> {
    let status = Command::new("sh").args(["-c", cmd]).status()?;
    if !status.success() {
        bail!("`{cmd}` failed");
    }
    Ok(())
}

/// Asks `server` (redirected by iptables) for an A record.
fn dig(name: &str) -> Result<String> {
    let out = Command::new("dig")
        .args(["@198.51.100.53", "+short", "+tries=1", "+time=2", name])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn seed_envoy_yaml_works_unchanged_behind_the_seeds_iptables_rules() -> Result<()> {
    let module = target_dir().join("debug/libconnectivity_envoy_module.so");
    if !prerequisites_met(&[tools_dir().join("bin/envoy"), module]) {
        return Ok(());
    }
    enter_private_netns()?;
    // What the seed's host had and a bare namespace lacks: routes to the
    // VIP range and to a DNS server, and DNAT to 127.0.0.1 allowed. All in
    // this namespace, which has nothing but lo.
    sh("ip route add 10.10.0.0/24 dev lo src 127.0.0.1")?;
    sh("ip route add 198.51.100.0/24 dev lo src 127.0.0.1")?;
    sh("sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.lo.route_localnet=1")?;
    // The seed's step 3, verbatim.
    sh("iptables -t nat -A OUTPUT -p udp --dport 53 -j DNAT --to-destination 127.0.0.1:15053")?;
    sh(
        "iptables -t nat -A OUTPUT -p tcp -d 10.10.0.0/24 -j DNAT --to-destination 127.0.0.1:15001",
    )?;

    let logs = std::env::temp_dir().join(unique_name("gw-seed"));
    std::fs::create_dir_all(&logs)?;
    let log_of = |name: &str| logs.join(format!("{name}.jsonl"));
    let _upstreams = start_upstreams(&logs)?;
    let config: PathBuf = repo_root().join("tests/fixtures/seed-envoy.yaml");
    let mut envoy_cmd = Command::new(tools_dir().join("bin/envoy"));
    envoy_cmd
        .arg("-c")
        .arg(&config)
        .args(["-l", "warn", "--disable-hot-restart", "--concurrency", "2"])
        .env(
            "ENVOY_DYNAMIC_MODULES_SEARCH_PATH",
            target_dir().join("debug"),
        );
    let mut envoy = Guarded::spawn("envoy (seed config)", envoy_cmd)?;

    // The seed's step 4.
    let first = wait_for("the seed Envoy to answer", Duration::from_secs(30), || {
        if !envoy.is_running() {
            bail!("Envoy exited:\n{}", envoy.output());
        }
        let answer = dig("one.s3.aws.com")?;
        Ok(answer
            .parse::<std::net::Ipv4Addr>()
            .is_ok()
            .then_some(answer))
    })
    .with_context(|| envoy.output())?;
    assert_eq!(first, "10.10.0.1");
    assert_eq!(dig("two.s3.aws.com")?, "10.10.0.2");
    assert_eq!(dig("example.com")?, "10.10.0.3");

    for (host, vip, cluster, token) in [
        ("s3.aws.com", "10.10.0.4", "cluster_1", "abc123"),
        ("example.com", "10.10.0.3", "cluster_2", "def456"),
    ] {
        assert_eq!(dig(host)?, vip);
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--resolve"])
            .arg(format!("{host}:80:{vip}"))
            .arg(format!("http://{host}/"))
            .output()?;
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.starts_with(&format!("{cluster}\n")),
            "curl {host}: {body}{}\nEnvoy:\n{}",
            String::from_utf8_lossy(&out.stderr),
            envoy.output()
        );
        let log = std::fs::read_to_string(log_of(cluster))?;
        let last: serde_json::Value =
            serde_json::from_str(log.lines().last().context("upstream saw nothing")?)?;
        // The seed's hostname has no port: CONNECT carries the bare domain.
        assert_eq!(last["connect"], host);
        assert_eq!(last["headers"]["x-auth-token"], token);
    }
    std::fs::remove_dir_all(&logs)?;
    Ok(())
}
