//! `cargo xtask image`: builds the container image from
//! `deploy/container/Containerfile` with podman, from the project's own
//! files only. No container registry is needed: the base is a Debian
//! bookworm root filesystem made by mmdebstrap from the Debian mirror the
//! host's apt uses, imported once as [`BASE_IMAGE`] and reused after that.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    setup,
    util::{cargo, envoy_bin, output, repo_root, run, target_dir},
};

/// The image built by default.
pub use ::tests::podman::IMAGE;

/// The locally made base image (see [`BASE_PACKAGES`]).
pub const BASE_IMAGE: &str = "localhost/dns-egress-gateway-base:bookworm";

/// The Debian release of the base; the Containerfile's default base is the
/// same release.
const SUITE: &str = "bookworm";

/// Packages added to mmdebstrap's minbase: what the Containerfile would
/// otherwise fetch with apt (its RUN step checks for exactly these).
const BASE_PACKAGES: &[&str] = &["ca-certificates", "curl", "passwd"];

/// Host packages the command needs: podman (which builds with buildah's
/// library, so no buildah command) and the OCI runtime runc (works with
/// every cgroup layout, crun not with hybrid ones), and mmdebstrap for the
/// base. Not uidmap: the command runs as root, never rootless.
const HOST_PACKAGES: &[&str] = &["podman", "runc", "mmdebstrap"];

/// The module's file name, as cargo builds it and the gateway looks for it.
const MODULE_FILE: &str = "libconnectivity_envoy_module.so";

/// Options of the image command.
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// Use the debug build instead of the release build (quick, for tests).
    #[arg(long)]
    pub debug: bool,
    /// Name and tag of the image.
    #[arg(long, default_value = IMAGE)]
    pub tag: String,
    /// Do not run cargo: use the binaries already in target/<profile>/
    /// (for example right after `cargo xtask test` built them).
    #[arg(long)]
    pub no_build: bool,
    /// Make the base image again even if it exists (to pick up Debian
    /// updates).
    #[arg(long)]
    pub refresh_base: bool,
}

/// Installs what is missing, builds the binaries, makes the base image if
/// needed, stages the build context and builds the image.
pub fn image(args: &ImageArgs) -> Result<()> {
    setup::apt_ensure(HOST_PACKAGES)?;
    setup::envoy()?;
    let profile = if args.debug { "debug" } else { "release" };
    if !args.no_build {
        // Release: only what the image holds. Debug: the whole workspace,
        // as `cargo xtask test` builds it, so its artifacts are reused.
        let mut build = cargo();
        if args.debug {
            build.args(["build", "--workspace"]);
        } else {
            build.args([
                "build",
                "--release",
                "-p",
                "gateway-user",
                "-p",
                "envoy-module",
            ]);
        }
        run(&mut build)?;
    }
    let old_base = image_id(BASE_IMAGE);
    let old_image = image_id(&args.tag);
    let context = stage_context(&target_dir().join(profile))?;
    ensure_base(args.refresh_base)?;
    let containerfile = repo_root().join("deploy/container/Containerfile");
    run(podman()
        .arg("build")
        .args(::tests::podman::limit_args())
        // The local base has every package the Containerfile wants, so no
        // RUN step needs the network; this makes sure none uses it.
        .arg("--network=none")
        .arg("--build-arg")
        .arg(format!("BASE={BASE_IMAGE}"))
        .arg("--build-arg")
        .arg(format!("VERSION={}", env!("CARGO_PKG_VERSION")))
        .arg("--build-arg")
        .arg(format!("ENVOY_VERSION={}", setup::ENVOY_VERSION))
        .arg("--file")
        .arg(&containerfile)
        .args(["--tag", args.tag.as_str()])
        .arg(&context))?;
    // A rebuild leaves the previous image (and after --refresh-base the
    // previous base) untagged; remove them so repeated builds do not pile
    // up. Removal fails, harmlessly, while a container or another tag
    // still uses one.
    for (old, name) in [(old_image, args.tag.as_str()), (old_base, BASE_IMAGE)] {
        if let Some(old) = old.filter(|old| image_id(name).as_ref() != Some(old)) {
            let _ = output(podman().args(["image", "rm", old.as_str()]));
        }
    }
    let inspect = output(podman().args([
        "image",
        "inspect",
        "--format",
        "{{.Id}} {{.Size}}",
        args.tag.as_str(),
    ]))
    .with_context(|| format!("podman image inspect {} failed", args.tag))?;
    let (id, size) = inspect
        .trim()
        .split_once(' ')
        .with_context(|| format!("unexpected podman image inspect output {inspect:?}"))?;
    let size: u64 = size
        .parse()
        .with_context(|| format!("image size {size:?} is not a number"))?;
    let seccomp = target_dir().join("image/seccomp-loader.json");
    ::tests::podman::write_loader_seccomp_profile(
        Path::new(::tests::podman::DEFAULT_SECCOMP_PROFILE),
        &seccomp,
    )?;
    println!(
        "seccomp profile for the loader's container (podman's default plus bpf and \
         perf_event_open): {}",
        seccomp.display()
    );
    println!(
        "image: {} ({profile} build), id {}, size {:.1} MB",
        args.tag,
        id.get(..12).unwrap_or(id),
        size as f64 / 1e6
    );
    Ok(())
}

/// The id of a local image, None if there is no such image.
fn image_id(name: &str) -> Option<String> {
    output(podman().args(["image", "inspect", "--format", "{{.Id}}", name]))
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// A `podman` command with the base arguments this machine needs.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(::tests::podman::base_args());
    cmd
}

/// Makes [`BASE_IMAGE`] unless it exists (or `refresh`): a minbase
/// bookworm root filesystem with [`BASE_PACKAGES`], without manual pages,
/// documentation (copyright files stay) and translations.
fn ensure_base(refresh: bool) -> Result<()> {
    let exists = podman()
        .args(["image", "exists", BASE_IMAGE])
        .status()
        .context("starting podman image exists")?
        .success();
    if exists && !refresh {
        eprintln!("image: base {BASE_IMAGE} present");
        return Ok(());
    }
    let dir = target_dir().join("image");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tarball = dir.join(format!("base-{SUITE}.tar"));
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args(["--variant=minbase", "--quiet"])
        // Merged /usr made with symlinks, as debootstrap does: otherwise
        // bookworm's init-system-helpers pulls in usrmerge and with it
        // the whole of perl (about 50 MB).
        .arg("--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr")
        .arg(format!("--include={}", BASE_PACKAGES.join(",")))
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        ])
        .arg(SUITE)
        .arg(&tarball)
        .args(debian_sources(SUITE));
    run(&mut mmdebstrap)?;
    let imported = run(podman()
        .args([
            "import",
            "--message",
            "Debian minbase made by cargo xtask image",
        ])
        .arg(&tarball)
        .arg(BASE_IMAGE));
    // The image holds it now; the tarball is only a step.
    let _ = fs::remove_file(&tarball);
    imported
}

/// The Debian archives the host's apt uses for `suite` (and its -updates
/// and -security suites), as sources.list lines for mmdebstrap; Debian's
/// own mirrors when the host names none.
fn debian_sources(suite: &str) -> Vec<String> {
    let suites = [
        suite.to_owned(),
        format!("{suite}-updates"),
        format!("{suite}-security"),
    ];
    let mut lines: Vec<String> = Vec::new();
    for entry in host_apt_entries() {
        for (uri, entry_suite) in entry
            .uris
            .iter()
            .flat_map(|u| entry.suites.iter().map(move |s| (u, s)))
        {
            let line = format!("deb {uri} {entry_suite} main");
            if entry.components.iter().any(|c| c == "main")
                && suites.contains(entry_suite)
                && !lines.contains(&line)
            {
                lines.push(line);
            }
        }
    }
    if !lines.iter().any(|l| l.ends_with(&format!(" {suite} main"))) {
        lines = vec![
            format!("deb http://deb.debian.org/debian {suite} main"),
            format!("deb http://deb.debian.org/debian {suite}-updates main"),
            format!("deb http://deb.debian.org/debian-security {suite}-security main"),
        ];
    }
    lines
}

/// One binary-package source of the host's apt configuration.
#[derive(Debug, Default, PartialEq)]
struct AptEntry {
    uris: Vec<String>,
    suites: Vec<String>,
    components: Vec<String>,
}

/// The `deb` entries of /etc/apt/sources.list and /etc/apt/sources.list.d/
/// (one-line `.list` and deb822 `.sources` files), skipping disabled ones.
fn host_apt_entries() -> Vec<AptEntry> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    let mut entries = Vec::new();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(text.lines().filter_map(parse_one_line)),
            _ => {}
        }
    }
    entries
}

/// A `deb [options] URI SUITE COMPONENT…` line.
fn parse_one_line(line: &str) -> Option<AptEntry> {
    let line = line.split('#').next()?.trim();
    let rest = line.strip_prefix("deb ")?.trim_start();
    // Options are `[key=value …]`, possibly with spaces inside the brackets.
    let rest = match rest.strip_prefix('[') {
        Some(options) => options.split_once(']')?.1,
        None => rest,
    };
    let mut words = rest.split_whitespace();
    let uri = words.next()?.to_owned();
    let suite = words.next()?.to_owned();
    Some(AptEntry {
        uris: vec![uri],
        suites: vec![suite],
        components: words.map(str::to_owned).collect(),
    })
}

/// The paragraphs of a deb822 `.sources` file with `Types: deb`.
fn parse_deb822(text: &str) -> Vec<AptEntry> {
    let mut entries = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    let lines = text.lines().chain(std::iter::once(""));
    for line in lines {
        if line.trim().is_empty() {
            if let Some(entry) = deb822_entry(&fields) {
                entries.push(entry);
            }
            fields.clear();
        } else if line.starts_with('#') {
            continue;
        } else if line.starts_with([' ', '\t']) {
            // A continuation line extends the previous field.
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            fields.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    entries
}

fn deb822_entry(fields: &[(String, String)]) -> Option<AptEntry> {
    let get = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
    };
    let enabled = get("enabled").is_none_or(|v| v.first().is_none_or(|e| e != "no"));
    if !enabled || !get("types")?.iter().any(|t| t == "deb") {
        return None;
    }
    Some(AptEntry {
        uris: get("uris")?,
        suites: get("suites")?,
        components: get("components").unwrap_or_default(),
    })
}

/// Fills `target/image/context/` with what the Containerfile copies: the
/// gateway and the module from `binaries`, Envoy, and the gateway's
/// built-in configuration as printed by that gateway.
fn stage_context(binaries: &Path) -> Result<PathBuf> {
    let context = target_dir().join("image").join("context");
    if context.exists() {
        fs::remove_dir_all(&context).with_context(|| format!("clearing {}", context.display()))?;
    }
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    let gateway = binaries.join("gateway");
    let sources = [
        (gateway.clone(), "gateway"),
        (binaries.join(MODULE_FILE), MODULE_FILE),
        (envoy_bin(), "envoy"),
    ];
    for (source, name) in &sources {
        if !source.is_file() {
            bail!(
                "{} is missing: build it first (without --no-build, cargo xtask image builds it)",
                source.display()
            );
        }
        let dest = context.join(name);
        fs::copy(source, &dest)
            .with_context(|| format!("copying {} to {}", source.display(), dest.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", dest.display()))?;
    }
    let config = output(Command::new(&gateway).arg("default-config"))
        .with_context(|| format!("{} default-config failed", gateway.display()))?;
    let config_path = context.join("gateway.toml");
    fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    Ok(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_sources_with_options_and_comments() {
        let entry = parse_one_line(
            "deb [arch=amd64 signed-by=/k.gpg] http://mirror/debian bookworm main contrib # x",
        );
        assert_eq!(
            entry,
            Some(AptEntry {
                uris: vec!["http://mirror/debian".into()],
                suites: vec!["bookworm".into()],
                components: vec!["main".into(), "contrib".into()],
            })
        );
        assert_eq!(
            parse_one_line("deb-src http://mirror/debian bookworm main"),
            None
        );
        assert_eq!(
            parse_one_line("# deb http://mirror/debian bookworm main"),
            None
        );
    }

    #[test]
    fn deb822_paragraphs() {
        let text = "Types: deb\n# a comment\nURIs: http://a/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /k.gpg\n\n\
                    Types: deb\nURIs: http://b/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n\
                    Types: deb-src\nURIs: http://c/debian\nSuites: bookworm\nComponents: main\n";
        let entries = parse_deb822(text);
        assert_eq!(
            entries,
            vec![AptEntry {
                uris: vec!["http://a/debian".into()],
                suites: vec!["bookworm".into(), "bookworm-updates".into()],
                components: vec!["main".into()],
            }]
        );
    }
}
