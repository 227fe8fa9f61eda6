//! Putting a new workload under the gateway, three ways side by side: an
//! entry in the pinned gate table written in-process (what `gateway gate`
//! and `gate-pods` do inside), the `gateway gate` command as an operator
//! runs it (process start included), and the alternative the gate table
//! replaces: a loader of its own attached to the workload's cgroup
//! (`gateway attach`, until its status says attached).

use std::{
    os::unix::fs::MetadataExt as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use gateway_common::{pinned::PinDir, GateOrigin};

use super::{
    env::{self, Env, Gate},
    report::{median, Row, Table},
    Plan,
};

/// The gate table comparison.
pub fn run(plan: &Plan, _env: &Env) -> Result<Vec<Table>> {
    let gate = Gate::attach("10.66.0.0/24", env::UDP, env::ECHO)?;
    let pins = PinDir::new(gate.pin_dir());
    let gateway = tests::gateway_bin();
    let updates = plan.ops.clamp(10, 1000);
    let commands = (plan.ops / 10).clamp(5, 100);
    let attaches = plan.rounds.clamp(1, 5) * 2;

    let workload = gate.cgroup.child("workload")?;
    let id = std::fs::metadata(workload.path())?.ino();
    // The level is informational (the kernel looks at every ancestor
    // level); the gateway computes it for the entries it writes.
    let level = 0;
    let mut table = pins.gated()?;
    let mut in_process = Vec::new();
    for _ in 0..updates {
        let started = Instant::now();
        table.gate(id, level, GateOrigin::Command)?;
        in_process.push(started.elapsed().as_secs_f64() * 1e3);
        table.ungate(id)?;
    }

    let pin_dir = gate.pin_dir().display().to_string();
    let path = workload.path().display().to_string();
    let mut by_command = Vec::new();
    for _ in 0..commands {
        let started = Instant::now();
        let out = Command::new(&gateway)
            .args(["gate", "--pin-dir", &pin_dir, &path])
            .output()
            .context("running gateway gate")?;
        by_command.push(started.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            bail!(
                "gateway gate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        table.ungate(id)?;
    }

    let mut by_attach = Vec::new();
    for _ in 0..attaches {
        let cgroup = tests::TestCgroup::new()?;
        let started = Instant::now();
        let loader = tests::Loader::attach(
            &cgroup,
            &["10.67.0.0/24"],
            "127.0.0.1:15153".parse()?,
            "127.0.0.1:15101".parse()?,
        )?;
        by_attach.push(started.elapsed().as_secs_f64() * 1e3);
        let pin = loader.pin_dir().to_path_buf();
        drop(loader);
        tests::reset_pins(&pin);
        std::thread::sleep(Duration::from_millis(50));
    }

    let row = |mode: &str, values: &[f64]| Row {
        mode: mode.into(),
        cells: vec![median(values), values.len() as f64],
    };
    Ok(vec![Table {
        id: "gate".into(),
        title: "Gating a new cgroup: gate table vs an attachment of its own".into(),
        columns: vec!["median ms".into(), "samples".into()],
        rows: vec![
            row("gate table entry (in-process map update)", &in_process),
            row("`gateway gate` command", &by_command),
            row("new loader attached to the cgroup (`gateway attach`)", &by_attach),
        ],
        chart: Some((0, "time / gate table entry".into())),
        note: "A gated cgroup's next connect or datagram is redirected; the programs stay attached once, to the parent. The command's time is mostly process start-up; a new loader loads, verifies and attaches nine programs (and would leave siblings of the parent ungated or need one attachment per workload).".into(),
    }])
}
