//! Many workloads under one attachment: the programs are attached once to
//! a parent cgroup, and `gateway gate` / `ungate` add and remove child
//! cgroups at run time through the pinned gate table. Measured here: the
//! time from `gateway gate` to the first redirected query, and that a
//! sibling cgroup under the same parent is never touched.

use std::{
    net::UdpSocket,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;
use tests::{
    enter_private_netns, gateway_bin, prerequisites_met, repo_root, unique_name, Loader, TestCgroup,
};

const DNS_TO: &str = "127.0.0.1:15053";
const TCP_TO: &str = "127.0.0.1:15001";
const VIP_CIDR: &str = "10.10.0.0/24";

/// A DNS stand-in at the redirect target: answers every datagram with
/// "answer" and remembers how many it got.
struct Answerer {
    socket: UdpSocket,
}

impl Answerer {
    fn start() -> Result<Self> {
        let socket = UdpSocket::bind(DNS_TO).context("binding the DNS target")?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        Ok(Self { socket })
    }

    /// Answers what has arrived; returns how many datagrams that was.
    fn drain(&self) -> usize {
        let mut buf = [0u8; 512];
        let mut n = 0;
        while let Ok((_, from)) = self.socket.recv_from(&mut buf) {
            let _ = self.socket.send_to(b"answer", from);
            n += 1;
        }
        n
    }
}

/// Sends one DNS datagram from inside `cgroup` (tests/clients/probe.py,
/// plain socket calls) while `answerer` serves; returns whether it was
/// answered by the gateway's target (redirected) — in this namespace
/// (only `lo`) an unredirected datagram to 203.0.113.53 cannot leave.
fn redirected(cgroup: &TestCgroup, answerer: &Answerer) -> Result<bool> {
    redirected_as(cgroup, answerer, None)
}

/// [`redirected`], the probe running as `user` when given.
fn redirected_as(cgroup: &TestCgroup, answerer: &Answerer, user: Option<&str>) -> Result<bool> {
    let script = repo_root().join("tests/clients/probe.py");
    let script = script.to_string_lossy().into_owned();
    let mut args = vec![script.as_str(), "udp-sendto", "203.0.113.53", "53"];
    let program = match user {
        Some(user) => {
            args.splice(
                0..0,
                [
                    "--reuid",
                    user,
                    "--regid",
                    user,
                    "--clear-groups",
                    "--",
                    // Debian's, which any user may run (not root's own pyenv).
                    "/usr/bin/python3",
                ],
            );
            "setpriv"
        }
        None => "python3",
    };
    let mut child = cgroup
        .command(program, &args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the probe")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        answerer.drain();
    }
    let out = child.wait_with_output()?;
    let line = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("probe printed {line:?}"))?;
    Ok(result["ok"] == true && result["reply"] == "answer")
}

fn gateway(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(gateway_bin())
        .args(args)
        .output()
        .context("running gateway")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

fn pin(loader: &Loader) -> String {
    loader.pin_dir().display().to_string()
}

fn gated_origins(loader: &Loader) -> Result<Vec<(Option<String>, String)>> {
    let status = loader.status()?;
    Ok(status["gated"]
        .as_array()
        .context("status has no gated list")?
        .iter()
        .map(|g| {
            (
                g["path"].as_str().map(str::to_owned),
                g["origin"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

#[test]
fn cgroups_are_gated_and_ungated_at_run_time_and_siblings_stay_untouched() -> Result<()> {
    if !prerequisites_met(&[]) {
        return Ok(());
    }
    enter_private_netns()?;
    let parent = TestCgroup::new()?;
    let app_a = parent.child("app-a")?;
    let app_b = parent.child("app-b")?;
    let app_b_worker = app_b.child("worker")?;
    let answerer = Answerer::start()?;
    let envoy_user = tests::dedicated_user()?;
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("gw-test"));
    let mut loader = Loader::attach_with_args(
        &parent,
        &[VIP_CIDR],
        DNS_TO.parse()?,
        TCP_TO.parse()?,
        &pin_dir,
        &["--gate", "app-a", "--envoy-user", &envoy_user.name],
    )?;
    // Envoy's own user is never gated, even in a gated cgroup (its own
    // DNS must never come back to it).
    assert!(
        !redirected_as(&app_a, &answerer, Some(&envoy_user.name))?,
        "Envoy's user must not be redirected"
    );

    // Only app-a is gated: its sibling (and the parent itself) are left
    // alone, counted as not gated.
    assert!(
        redirected(&app_a, &answerer)?,
        "the gated cgroup must be redirected"
    );
    assert!(
        !redirected(&app_b, &answerer)?,
        "a sibling must stay untouched"
    );
    assert!(
        !redirected(&parent, &answerer)?,
        "the attach cgroup itself is not gated here"
    );
    assert!(loader.counter("not_gated_passed")? >= 2);

    // Gate app-b at run time; its child cgroup follows. Measured: the
    // command's own time and the time until the first redirected query.
    let started = Instant::now();
    let (ok, text) = gateway(&["gate", "--pin-dir", &pin(&loader), "app-b"])?;
    let command_took = started.elapsed();
    assert!(ok, "gateway gate failed: {text}");
    assert!(redirected(&app_b, &answerer)?, "gated at run time: {text}");
    let first_redirect_after = started.elapsed();
    eprintln!(
        "measured: `gateway gate` took {command_took:?} (it reports {}), first redirected query \
         {first_redirect_after:?} after the command started (probe process start included)",
        text.trim()
    );
    assert!(
        redirected(&app_b_worker, &answerer)?,
        "a gated cgroup's children are gated"
    );
    assert!(
        redirected(&app_a, &answerer)?,
        "gating app-b leaves app-a as it was"
    );

    // Ungate app-a: from its next datagram on it is left alone; app-b
    // stays gated.
    let (ok, text) = gateway(&["ungate", "--pin-dir", &pin(&loader), "app-a"])?;
    assert!(ok, "gateway ungate failed: {text}");
    assert!(!redirected(&app_a, &answerer)?, "ungated");
    assert!(redirected(&app_b, &answerer)?);

    // The status names each gated cgroup and why it is gated.
    let origins = gated_origins(&loader)?;
    assert_eq!(
        origins,
        vec![(Some(app_b.path().display().to_string()), "gate".to_owned())],
        "status must list app-b as gated by command (app-a's configured gate was removed)"
    );

    // Bad requests are refused with a reason, and change nothing.
    let outside = TestCgroup::new()?;
    let table: &[(&[&str], &str)] = &[
        (&["gate", "no-such-cgroup"], "does not exist"),
        (
            &["gate", &outside.path().display().to_string()],
            "is not below",
        ),
        (&["ungate", "no-such-cgroup"], "does not exist"),
    ];
    for (args, expected) in table {
        let mut full: Vec<&str> = args.to_vec();
        let pin = pin(&loader);
        full.extend(["--pin-dir", &pin]);
        let (ok, text) = gateway(&full)?;
        assert!(!ok, "{args:?} must fail");
        assert!(text.contains(expected), "{args:?}: {text}");
    }
    assert_eq!(gated_origins(&loader)?.len(), 1);

    // A restart keeps the cgroups gated at run time; the configured list
    // is applied again.
    let (status, _) = loader.stop_with(Signal::SIGTERM)?;
    assert!(status.success());
    let loader = Loader::attach_with_args(
        &parent,
        &[VIP_CIDR],
        DNS_TO.parse()?,
        TCP_TO.parse()?,
        &pin_dir,
        &["--gate", "app-a"],
    )?;
    assert!(redirected(&app_a, &answerer)?, "configured again at start");
    assert!(
        redirected(&app_b, &answerer)?,
        "a run-time gate survives a restart"
    );
    let mut origins = gated_origins(&loader)?;
    origins.sort();
    assert_eq!(
        origins,
        vec![
            (
                Some(app_a.path().display().to_string()),
                "config".to_owned()
            ),
            (Some(app_b.path().display().to_string()), "gate".to_owned()),
        ]
    );
    drop(loader);
    tests::reset_pins(&pin_dir);
    drop(app_b_worker);
    drop((app_a, app_b));
    Ok(())
}

/// `gateway gate-pods` with a PodList, as a Kubernetes pod-sync loop runs
/// it: the kubelet's cgroups (both driver layouts) are made here below a
/// test cgroup that stands for kubepods.slice.
#[test]
fn pods_of_a_pod_list_are_gated_by_uid_and_ungated_when_no_longer_listed() -> Result<()> {
    if !prerequisites_met(&[]) {
        return Ok(());
    }
    enter_private_netns()?;
    let kubepods = TestCgroup::new()?;
    let idle = kubepods.child("idle")?;
    let qos = kubepods.child("kubepods-besteffort.slice")?;
    let uid_a = "0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9";
    let pod_a = qos.child(&format!(
        "kubepods-besteffort-pod{}.slice",
        uid_a.replace('-', "_")
    ))?;
    let container_a = pod_a.child("cri-containerd-aaaa.scope")?;
    let uid_b = "11111111-2222-3333-4444-555555555555";
    let cgroupfs_qos = kubepods.child("burstable")?;
    let pod_b = cgroupfs_qos.child(&format!("pod{uid_b}"))?;
    let pod_c = cgroupfs_qos.child("pod99999999-2222-3333-4444-555555555555")?;
    // A container's own cgroup named like a listed pod cannot pass for it.
    let decoy = pod_c.child(&format!("pod{uid_b}"))?;
    let answerer = Answerer::start()?;
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("gw-test"));
    let loader = Loader::attach_with_args(
        &kubepods,
        &[VIP_CIDR],
        DNS_TO.parse()?,
        TCP_TO.parse()?,
        &pin_dir,
        &["--gate", "idle"],
    )?;
    let pod = |name: &str, uid: &str| {
        format!(
            r#"{{"metadata":{{"namespace":"default","name":"{name}","uid":"{uid}"}},"spec":{{"hostNetwork":true}},"status":{{"phase":"Running"}}}}"#
        )
    };
    // `gateway gate-pods` with `list` as the API server's answer.
    let gate_pods = |list: &str| -> Result<(bool, String)> {
        let file = std::env::temp_dir().join(unique_name("gw-pods"));
        std::fs::write(&file, list)?;
        let result = gateway(&[
            "gate-pods",
            "--pin-dir",
            &pin(&loader),
            "--kubepods-root",
            &kubepods.path().display().to_string(),
            "--pod-list",
            &file.display().to_string(),
        ]);
        let _ = std::fs::remove_file(&file);
        result
    };
    let sync = |items: &[String]| {
        gate_pods(&format!(
            r#"{{"kind":"PodList","items":[{}]}}"#,
            items.join(",")
        ))
    };

    assert!(!redirected(&container_a, &answerer)?, "nothing gated yet");
    let (ok, text) = sync(&[pod("a", uid_a), pod("b", uid_b), pod("late", "abcdef")])?;
    assert!(ok, "{text}");
    assert!(
        text.contains("2 pods gated (2 new)") && text.contains("default/late"),
        "{text}"
    );
    assert!(
        redirected(&container_a, &answerer)?,
        "pod a (systemd layout), in its container"
    );
    assert!(redirected(&pod_b, &answerer)?, "pod b (cgroupfs layout)");
    assert!(
        !redirected(&pod_c, &answerer)?,
        "an unlisted pod stays untouched"
    );

    // Pod a is gone from the list: ungated; b stays.
    let (ok, text) = sync(&[pod("b", uid_b)])?;
    assert!(ok && text.contains("1 ungated"), "{text}");
    assert!(!redirected(&container_a, &answerer)?);
    assert!(redirected(&pod_b, &answerer)?);

    // A failed API answer is not an empty list: nothing changes.
    let (ok, text) = gate_pods(r#"{"kind":"Status","status":"Failure","code":403}"#)?;
    assert!(
        !ok && text.contains("expected a Kubernetes PodList"),
        "{text}"
    );
    assert!(
        redirected(&pod_b, &answerer)?,
        "still gated after a failed list"
    );
    assert!(
        redirected(&idle, &answerer)?,
        "the configured gate is not a pod's"
    );

    drop(loader);
    tests::reset_pins(&pin_dir);
    drop((container_a, decoy));
    drop(pod_c);
    drop((pod_a, pod_b));
    drop((qos, cgroupfs_qos, idle));
    Ok(())
}
