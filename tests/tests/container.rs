//! The image under podman, as an operator runs it: two containers from
//! `localhost/dns-egress-gateway`, the loader as root with only CAP_BPF,
//! CAP_PERFMON and CAP_NET_ADMIN (plus Envoy's group, to share files
//! without CAP_CHOWN), Envoy as its own non-root user without any
//! capability, both in this test's private network namespace with the
//! host's cgroup2 and bpffs mounts. An unmodified dig and curl in the
//! gated cgroup run the seed scenario through them.
//!
//! Needs the image (`cargo xtask image`, which `cargo xtask test` runs
//! first) and podman; in CI a missing one is a failure.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tests::{
    podman::{base_args, limit_args, IMAGE},
    scenario::{
        isolated_config, start_fallback_resolver, start_upstreams, FALLBACK, FALLBACK_ANSWER,
        FALLBACK_NAME,
    },
    target_dir, unique_name, wait_for,
};

/// CAP_NET_ADMIN, CAP_PERFMON and CAP_BPF, as bits of /proc/<pid>/status.
const THREE_CAPS: u64 = (1 << 12) | (1 << 38) | (1 << 39);

/// Where the configuration is inside both containers.
const CONFIG_IN: &str = "/etc/dns-egress-gateway/gateway.toml";

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(base_args());
    cmd
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A container removed (with its log shown) when dropped.
struct Container {
    name: String,
}

impl Container {
    fn logs(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    fn pid(&self) -> Result<u32> {
        let out = run(podman().args(["inspect", "--format", "{{.State.Pid}}", &self.name]))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("container pid")
    }

    fn exec(&self, args: &[&str]) -> Result<Output> {
        podman()
            .args(["exec", &self.name])
            .args(args)
            .output()
            .context("podman exec")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.name, self.logs());
        }
        let _ = podman()
            .args(["rm", "--force", "--time", "10", &self.name])
            .output();
    }
}

/// (uid, CapEff) of a process.
fn identity(pid: u32) -> Result<(u32, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("{name} missing"))
    };
    let uid = field("Uid:")?
        .split_whitespace()
        .nth(1)
        .context("effective uid")?
        .parse()?;
    let caps = u64::from_str_radix(field("CapEff:")?, 16)?;
    Ok((uid, caps))
}

/// Runs an unmodified program on the host inside `cgroup`.
fn in_cgroup(cgroup: &Path, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
            cgroup.display()
        ))
        .arg("sh")
        .arg(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn prerequisites() -> Result<bool> {
    let ci = tests::in_ci();
    if tests::which("podman").is_none() {
        assert!(!ci, "podman missing (cargo xtask image installs it)");
        eprintln!("SKIPPED: podman missing");
        return Ok(false);
    }
    let image = podman().args(["image", "exists", IMAGE]).status()?;
    if !image.success() {
        assert!(!ci, "image {IMAGE} missing (cargo xtask test builds it)");
        eprintln!("SKIPPED: image {IMAGE} missing: run `cargo xtask image`");
        return Ok(false);
    }
    Ok(tests::prerequisites_met(&[]))
}

#[test]
fn the_image_runs_the_seed_scenario_with_three_capabilities_and_envoy_unprivileged() -> Result<()> {
    if !prerequisites()? {
        return Ok(());
    }
    tests::enter_private_netns()?;
    let work = std::env::temp_dir().join(unique_name("gw-container"));
    std::fs::create_dir_all(work.join("state"))?;
    let _upstreams = start_upstreams(&work)?;
    let _resolver = start_fallback_resolver()?;

    // Attached to one cgroup, gating only its child `app`: the gate can
    // then be widened at run time and a sibling shown untouched.
    let config =
        isolated_config("gw-ctr")?.replacen("pin_dir = ", "gate = [\"app\"]\npin_dir = ", 1);
    let table: toml::Table = config.parse()?;
    let field = |name: &str| -> Result<String> {
        Ok(table
            .get(name)
            .and_then(|v| v.as_str())
            .with_context(|| format!("{name} missing"))?
            .to_owned())
    };
    let pin_dir = PathBuf::from(field("pin_dir")?);
    let attach = tests::cgroup2_root()?.join(field("cgroup")?);
    let cgroup = attach.join("app");
    // The operator's part (kubelet's, in Kubernetes): the cgroups exist
    // before the gateway starts; without CAP_DAC_OVERRIDE it cannot create
    // them under a cgroup root of mode 0555.
    std::fs::create_dir_all(&cgroup)?;
    let config_file = work.join("gateway.toml");
    std::fs::write(&config_file, &config)?;
    let seccomp = target_dir().join("image/seccomp-loader.json");
    tests::podman::write_loader_seccomp_profile(
        Path::new(tests::podman::DEFAULT_SECCOMP_PROFILE),
        &seccomp,
    )?;

    let suffix = unique_name("c");
    // Both containers: the network namespace, the state directory, the
    // configuration and the pins (Envoy opens the two maps shared with its
    // group, so its bpf() calls must pass seccomp too; the kernel still
    // checks the pins' permissions).
    let mounts = |cmd: &mut Command| {
        cmd.args(["--network", "host", "-v", "/sys/fs/bpf:/sys/fs/bpf"])
            .arg("--security-opt")
            .arg(format!("seccomp={}", seccomp.display()))
            .arg("-v")
            .arg(format!(
                "{}:/run/dns-egress-gateway",
                work.join("state").display()
            ))
            .arg("-v")
            .arg(format!("{}:{CONFIG_IN}:ro", config_file.display()));
    };
    let start_loader = |name: String| -> Result<Container> {
        let mut cmd = podman();
        cmd.args(["run", "--detach", "--name", &name])
            .args(limit_args())
            .args(["--cap-drop", "all"])
            .args([
                "--cap-add",
                "BPF",
                "--cap-add",
                "PERFMON",
                "--cap-add",
                "NET_ADMIN",
            ])
            .args(["--group-add", "dns-gateway-envoy"])
            .args(["--cgroupns", "host"])
            .args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup"]);
        mounts(&mut cmd);
        cmd.args([
            IMAGE,
            "run",
            "--config",
            CONFIG_IN,
            "--envoy-user",
            "dns-gateway-envoy",
            "--external-envoy",
            "--fallback",
            FALLBACK,
        ]);
        run(&mut cmd)?;
        Ok(Container { name })
    };
    let start_envoy = |name: String| -> Result<Container> {
        let mut cmd = podman();
        cmd.args(["run", "--detach", "--name", &name])
            .args(limit_args())
            .args(["--user", "dns-gateway-envoy", "--cap-drop", "all"])
            .args(["--security-opt", "no-new-privileges"]);
        mounts(&mut cmd);
        cmd.args([IMAGE, "envoy-exec", "--config", CONFIG_IN]);
        run(&mut cmd)?;
        Ok(Container { name })
    };
    let loader = start_loader(format!("gw-loader-{suffix}"))?;
    let envoy = start_envoy(format!("gw-envoy-{suffix}"))?;

    // Ready: the host's own gateway binary reads the pins the container
    // made, and the containers' health probe says so too.
    wait_for(
        "the containerised gateway to attach",
        Duration::from_secs(60),
        || {
            let status = tests::status_json(&pin_dir);
            Ok(status
                .ok()
                .filter(|s| s["attached"] == true && s["loader"]["alive"] == true)
                .map(|_| ()))
        },
    )
    .with_context(|| format!("loader:\n{}\nenvoy:\n{}", loader.logs(), envoy.logs()))?;
    let probe = loader.exec(&["gateway", "status", "--check", "--config", CONFIG_IN])?;
    assert!(
        probe.status.success(),
        "health probe: {}{}",
        String::from_utf8_lossy(&probe.stdout),
        String::from_utf8_lossy(&probe.stderr)
    );

    // Exactly the three capabilities for the loader; none, and not root,
    // for Envoy.
    let (uid, caps) = identity(loader.pid()?)?;
    assert_eq!(
        (uid, caps),
        (0, THREE_CAPS),
        "loader: uid and CapEff {caps:x}"
    );
    let (uid, caps) = identity(envoy.pid()?)?;
    assert!(
        uid != 0 && caps == 0,
        "Envoy must run unprivileged: uid {uid}, CapEff {caps:x}"
    );

    // The seed scenario, unmodified clients in the gated cgroup.
    let vip = in_cgroup(
        &cgroup,
        "dig",
        &["+short", "+tries=2", "+time=3", "one.s3.aws.com"],
    )?;
    assert!(vip.trim().starts_with("10.10.0."), "VIP: {vip}");
    let other = in_cgroup(
        &cgroup,
        "dig",
        &["+short", "+tries=2", "+time=3", FALLBACK_NAME],
    )?;
    assert_eq!(other.trim(), FALLBACK_ANSWER);
    let body = in_cgroup(
        &cgroup,
        "curl",
        &["-sS", "--max-time", "10", "http://s3.aws.com./"],
    )?;
    assert!(
        body.starts_with("cluster_1") && body.contains("x-auth-token: abc123"),
        "{body}\nloader:\n{}\nenvoy:\n{}",
        loader.logs(),
        envoy.logs()
    );
    let body = in_cgroup(
        &cgroup,
        "curl",
        &["-sS", "--max-time", "10", "http://example.com/"],
    )?;
    assert!(
        body.starts_with("cluster_2") && body.contains("def456"),
        "{body}"
    );

    // Gating at run time works from inside the container, with the same
    // three capabilities.
    let sibling = attach.join("other");
    let child = attach.join("late");
    std::fs::create_dir(&child)?;
    std::fs::create_dir(&sibling)?;
    let before = in_cgroup(
        &child,
        "dig",
        &["+short", "+tries=1", "+time=2", "two.s3.aws.com"],
    )?;
    assert!(!before.contains("10.10.0."), "not gated yet: {before}");
    let gate = loader.exec(&["gateway", "gate", "--config", CONFIG_IN, "late"])?;
    assert!(
        gate.status.success(),
        "{}",
        String::from_utf8_lossy(&gate.stderr)
    );
    let vip_late = in_cgroup(
        &child,
        "dig",
        &["+short", "+tries=2", "+time=3", "two.s3.aws.com"],
    )?;
    assert!(vip_late.trim().starts_with("10.10.0."), "{vip_late}");
    let outside = in_cgroup(
        &sibling,
        "dig",
        &["+short", "+tries=1", "+time=2", "one.s3.aws.com"],
    )?;
    assert!(
        !outside.contains("10.10.0."),
        "a sibling stays untouched: {outside}"
    );

    // A clean stop of the loader detaches the programs.
    run(podman().args(["stop", "--time", "15", &loader.name]))?;
    let status = tests::status_json(&pin_dir)?;
    assert_eq!(status["attached"], false, "{status}");

    // A new loader on a configuration no reload could bring to the running
    // Envoy (another VIP range) does not attach to that Envoy: it has it
    // quit, and attaches to the one started on the new bootstrap.
    std::fs::write(
        &config_file,
        config.replacen(
            "vip_cidr = \"10.10.0.0/24\"",
            "vip_cidr = \"10.11.0.0/24\"",
            1,
        ),
    )?;
    let loader_2 = start_loader(format!("gw-loader2-{suffix}"))?;
    wait_for(
        "the outdated Envoy to quit",
        Duration::from_secs(30),
        || {
            let out = podman()
                .args(["inspect", "--format", "{{.State.Running}}", &envoy.name])
                .output()?;
            Ok((String::from_utf8_lossy(&out.stdout).trim() == "false").then_some(()))
        },
    )
    .with_context(|| format!("loader:\n{}", loader_2.logs()))?;
    assert!(
        loader_2
            .logs()
            .contains("started from another configuration"),
        "{}",
        loader_2.logs()
    );
    let envoy_2 = start_envoy(format!("gw-envoy2-{suffix}"))?;
    wait_for("the new gateway to attach", Duration::from_secs(60), || {
        let status = tests::status_json(&pin_dir);
        Ok(status
            .ok()
            .filter(|s| s["attached"] == true && s["loader"]["alive"] == true)
            .map(|_| ()))
    })
    .with_context(|| format!("loader:\n{}\nenvoy:\n{}", loader_2.logs(), envoy_2.logs()))?;
    let vip = in_cgroup(
        &cgroup,
        "dig",
        &["+short", "+tries=2", "+time=3", "three.s3.aws.com"],
    )?;
    assert!(
        vip.trim().starts_with("10.11.0."),
        "a VIP of the new range: {vip}"
    );
    run(podman().args(["stop", "--time", "15", &loader_2.name]))?;
    drop((envoy_2, loader_2));
    drop(envoy);
    drop(loader);
    for dir in [&sibling, &child, &cgroup, &attach] {
        let _ = std::fs::remove_dir(dir);
    }
    tests::reset_pins(&pin_dir);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
