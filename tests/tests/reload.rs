//! `gateway reload` and SIGHUP against the real gateway: changed domains,
//! metadata, clusters and fallback resolvers apply to new queries and
//! connections while an established tunnel goes on and every VIP keeps
//! its domain; what cannot change is refused and nothing moves.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tests::{
    gateway_bin,
    scenario::{isolated_config, python, start_isolated, SeedScenario},
    wait_for, Guarded,
};

const TOOLS: [&str; 2] = ["dig", "curl"];

fn dig(scenario: &SeedScenario, name: &str) -> Result<String> {
    let out = scenario.exec("dig", &["+short", "+tries=2", "+time=3", name])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn curl(scenario: &SeedScenario, url: &str) -> Result<String> {
    let out = scenario.exec("curl", &["-sS", "--max-time", "10", url])?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// `gateway reload` for the scenario's gateway: (succeeded, output).
fn reload(scenario: &SeedScenario) -> Result<(bool, String)> {
    let config = scenario.config_path().context("the scenario has a file")?;
    let out = Command::new(gateway_bin())
        .arg("reload")
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(scenario.state_dir())
        .output()
        .context("running gateway reload")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn rewrite(scenario: &SeedScenario, edit: impl FnOnce(String) -> String) -> Result<()> {
    let path = scenario.config_path().context("the scenario has a file")?;
    let text = std::fs::read_to_string(path)?;
    std::fs::write(path, edit(text))?;
    Ok(())
}

/// A client in the gated cgroup that opens a tunnel to `host` and sends
/// its request only when told, so the tunnel spans whatever happens in
/// between.
struct HeldConnection {
    child: std::process::Child,
    lines: BufReader<std::process::ChildStdout>,
}

impl HeldConnection {
    fn open(scenario: &SeedScenario, host: &str) -> Result<Self> {
        let script = format!(
            "import socket,sys\n\
             s=socket.create_connection(('{host}',80),timeout=20)\n\
             print('connected',s.getpeername()[0],flush=True)\n\
             sys.stdin.readline()\n\
             s.sendall(b'GET / HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n')\n\
             data=b''\n\
             while True:\n\
             \x20   chunk=s.recv(4096)\n\
             \x20   if not chunk: break\n\
             \x20   data+=chunk\n\
             print(data.decode(errors='replace').replace('\\r',''),flush=True)\n"
        );
        let mut child = scenario
            .exec_command("python3", &["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the held client")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout);
        let mut first = String::new();
        lines.read_line(&mut first)?;
        if !first.starts_with("connected") {
            bail!("the held client did not connect: {first:?}");
        }
        Ok(Self { child, lines })
    }

    /// Sends the request now and returns the whole response.
    fn finish(mut self) -> Result<String> {
        self.child
            .stdin
            .as_mut()
            .context("no stdin")?
            .write_all(b"go\n")?;
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.lines, &mut rest)?;
        self.child.wait()?;
        Ok(rest)
    }
}

#[test]
fn reload_applies_domains_clusters_and_fallback_without_dropping_connections() -> Result<()> {
    // The configuration names its fallback resolver itself, so a reload
    // can change it (a --fallback on the command line would override it).
    let config = isolated_config("gw-reload")?.replacen(
        "fallback = []",
        "fallback = [\"127.0.0.1:5353\"]",
        1,
    );
    let user = tests::dedicated_user()?;
    let Some(scenario) = start_isolated(config, &["--envoy-user", &user.name], &TOOLS)? else {
        return Ok(());
    };
    // A third upstream and a second resolver, for the new configuration.
    let _cluster_3 = Guarded::spawn(
        "cluster_3",
        python("upstream.py", &["--name", "cluster_3", "--port", "18003"]),
    )?;
    let _resolver_2 = Guarded::spawn(
        "second resolver",
        python(
            "stub_resolver.py",
            &["--port", "5354", "--record", "github.com=192.0.2.20"],
        ),
    )?;
    tests::wait_for_listener("127.0.0.1:18003", Duration::from_secs(10))?;

    let vip = dig(&scenario, "one.s3.aws.com")?;
    assert!(vip.starts_with("10.10.0."), "VIP before: {vip:?}");
    assert_eq!(dig(&scenario, "github.com")?, "192.0.2.10");
    let held = HeldConnection::open(&scenario, "one.s3.aws.com")?;

    // New token for *.aws.com, example.com moved to a new cluster at a new
    // address, a new domain, another fallback resolver.
    rewrite(&scenario, |text| {
        text.replacen("abc123", "rotated-1", 1)
            .replacen(
                "metadata = { cluster = \"cluster_2\"",
                "metadata = { cluster = \"cluster_3\"",
                1,
            )
            .replacen("fallback = [\"127.0.0.1:5353\"]", "fallback = [\"127.0.0.1:5354\"]", 1)
            + "\n[[clusters]]\nname = \"cluster_3\"\naddress = \"127.0.0.1:18003\"\n\n\
               [[domains]]\ndomain = \"added.example.org\"\nmetadata = { cluster = \"cluster_3\", auth_token = \"new\" }\n"
    })?;
    let (ok, text) = reload(&scenario)?;
    assert!(ok, "reload failed: {text}\n{}", scenario.gateway_output());
    assert!(text.contains("Envoy confirmed"), "{text}");
    for field in ["domains", "clusters", "dns.fallback"] {
        assert!(text.contains(field), "the report names {field}: {text}");
    }

    // The tunnel opened before the reload is still up, with what it was
    // given when it was opened.
    let response = held.finish()?;
    assert!(
        response.contains("cluster_1") && response.contains("x-auth-token: abc123"),
        "the held tunnel must survive the reload: {response:?}"
    );
    // Same VIP for a name that had one; new metadata, cluster and resolver
    // for what comes next; a new domain resolves and connects.
    assert_eq!(
        dig(&scenario, "one.s3.aws.com")?,
        vip,
        "VIPs never change on reload"
    );
    let body = curl(&scenario, "http://two.s3.aws.com/")?;
    assert!(body.contains("x-auth-token: rotated-1"), "{body}");
    let body = curl(&scenario, "http://example.com/")?;
    assert!(
        body.starts_with("cluster_3"),
        "example.com now on cluster_3: {body}"
    );
    let body = curl(&scenario, "http://added.example.org/")?;
    assert!(
        body.starts_with("cluster_3") && body.contains("x-auth-token: new"),
        "{body}"
    );
    assert_eq!(
        dig(&scenario, "github.com")?,
        "192.0.2.20",
        "the new fallback answers"
    );

    // What cannot change at run time is refused by name, and nothing moves.
    rewrite(&scenario, |text| {
        text.replacen(
            "vip_cidr = \"10.10.0.0/24\"",
            "vip_cidr = \"10.20.0.0/24\"",
            1,
        )
        .replacen("rotated-1", "never-applied", 1)
    })?;
    let (ok, text) = reload(&scenario)?;
    assert!(!ok, "a VIP range change must be refused: {text}");
    assert!(
        text.contains("dns.vip_cidr") && text.contains("restart"),
        "{text}"
    );
    let body = curl(&scenario, "http://three.s3.aws.com/")?;
    assert!(
        body.contains("x-auth-token: rotated-1"),
        "nothing applied: {body}"
    );

    // A configuration that does not validate is refused the same way.
    rewrite(&scenario, |text| {
        text.replacen(
            "vip_cidr = \"10.20.0.0/24\"",
            "vip_cidr = \"10.10.0.0/24\"",
            1,
        )
        .replacen("cluster = \"cluster_3\"", "cluster = \"cluster_9\"", 1)
    })?;
    let (ok, text) = reload(&scenario)?;
    assert!(!ok && text.contains("cluster_9"), "{text}");

    // SIGHUP does the same as `gateway reload`.
    rewrite(&scenario, |text| {
        text.replacen("cluster = \"cluster_9\"", "cluster = \"cluster_3\"", 1)
            .replacen("never-applied", "rotated-2", 1)
    })?;
    let before = std::fs::read_dir(scenario.state_dir())?
        .flatten()
        .find(|e| e.path().is_dir())
        .map(|e| e.path().join("reload-result.json"))
        .context("no state directory")?;
    let generation = |path: &std::path::Path| -> Result<u64> {
        let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        value["generation"].as_u64().context("no generation")
    };
    let last = generation(&before)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(scenario.gateway_pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    wait_for("the SIGHUP reload", Duration::from_secs(15), || {
        Ok((generation(&before)? > last).then_some(()))
    })?;
    let body = curl(&scenario, "http://four.s3.aws.com/")?;
    assert!(body.contains("x-auth-token: rotated-2"), "{body}");
    assert_eq!(dig(&scenario, "one.s3.aws.com")?, vip);
    Ok(())
}
