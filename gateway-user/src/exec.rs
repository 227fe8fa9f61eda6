//! `gateway exec`: run an unmodified command inside the gated cgroup.

use std::{os::unix::process::CommandExt as _, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};
use gateway_common::pinned::PinDir;

use crate::{cgroup, config, loader};

/// Moves this process into the configured cgroup and replaces it with
/// `command`; returns only on failure.
pub fn exec(config_path: Option<&Path>, into: Option<&Path>, command: &[String]) -> Result<()> {
    let Some((program, args)) = command.split_first() else {
        bail!("no command given: gateway exec [--config FILE] -- <command> [args…]");
    };
    let config = config::load(config_path)?;
    let cgroup = match into {
        Some(path) => config.attach_cgroup()?.join(path),
        None => config.gated_cgroups()?.into_iter().next().context(
            "the configuration gates no cgroup at start (gate = []): name one with --cgroup",
        )?,
    };
    if !cgroup.is_dir() {
        bail!(
            "the gated cgroup {} does not exist: start the gateway first (`gateway run`)",
            cgroup.display()
        );
    }
    let pins = PinDir::new(&config.file.pin_dir);
    let owner_alive = loader::owner_alive(&config.file.pin_dir)
        && pins
            .loader_info()
            .map(|info| info.pid != 0)
            .unwrap_or(false);
    let gated = !crate::links::pinned(&config.file.pin_dir).is_empty();
    if !owner_alive && gated {
        log::warn!(
            "no running gateway owns {}: {program} runs in {} with the programs a stopped gateway left \
             attached, and no Envoy (DNS follows the outage policy; connects to VIPs are refused)",
            config.file.pin_dir.display(),
            cgroup.display()
        );
    } else if !owner_alive {
        log::warn!(
            "no running gateway owns {}: {program} runs in {} without redirection",
            config.file.pin_dir.display(),
            cgroup.display()
        );
    }
    cgroup::add_process(&cgroup, std::process::id())?;
    let err = Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("executing {program}"))
}
