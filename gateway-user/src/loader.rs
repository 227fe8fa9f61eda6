//! A loader's life as a sequence of states: [`discover`] (check the
//! request, lock the pin directory, find what a previous loader left),
//! [`Discovered::load_or_adopt`] (keep programs of this build still
//! attached, or load new ones; write the configuration),
//! [`Prepared::attach`] (attach by pinned links), and [`Attached::stop`]
//! (detach). The links are pinned, so a loader that dies leaves the gate in
//! place; only a clean stop removes it.

use std::{
    fs::File,
    net::{Ipv6Addr, SocketAddrV4},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, SockOps},
    Ebpf, EbpfLoader,
};
use gateway_common::{
    pinned::{sockaddr_from_std, PinDir},
    GatewayConfig, LoaderInfo, CONFIG_FLAG_DNS_OUTAGE_DROP, CONFIG_FLAG_DNS_TCP,
    CONFIG_FLAG_ENABLED, CONFIG_FLAG_IPV6, CONFIG_FLAG_REFUSE_UNKNOWN_VIPS, CONFIG_FLAG_VIP6,
    MAX_VIP_CIDRS,
};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::{addr::Cidr, bpffs, cgroup, links};

/// The eBPF object built by build.rs, embedded so the binary is
/// self-contained.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf"));

/// The programs in the object, in attach order. sockops comes first so
/// that no redirected connect can happen before its destination is
/// recorded.
pub const PROGRAMS: [&str; 9] = [
    "gw_sockops",
    "gw_recvmsg4",
    "gw_recvmsg6",
    "gw_getpeername4",
    "gw_getpeername6",
    "gw_sendmsg4",
    "gw_sendmsg6",
    "gw_connect4",
    "gw_connect6",
];

/// What `gateway attach` is asked to do.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    /// cgroup v2 directory the programs are attached to: processes below
    /// it are seen, and those in a gated cgroup (`gate`) are redirected.
    pub cgroup: PathBuf,
    /// cgroups to gate, at or below `cgroup` (relative paths are below
    /// it); `None` gates `cgroup` itself. Replaces the previous start's
    /// list; cgroups gated at run time (`gateway gate`) stay gated.
    pub gate: Option<Vec<PathBuf>>,
    /// Networks whose TCP connects go to `tcp_to`.
    pub vip_cidrs: Vec<Cidr>,
    /// DNS listener of the proxy.
    pub dns_to: SocketAddrV4,
    /// TCP listener of the proxy.
    pub tcp_to: SocketAddrV4,
    /// DNS-over-TCP listener of the proxy; without it TCP to port 53 is
    /// left alone.
    pub dns_tcp_to: Option<SocketAddrV4>,
    /// The proxy also listens on `::1` at the ports of the listeners above,
    /// so IPv6 DNS and connects to IPv6 VIPs are redirected there.
    pub ipv6_listeners: bool,
    /// IPv6 VIP range: a /96 prefix followed by the IPv4 VIP.
    pub vip6_prefix: Option<Ipv6Addr>,
    /// Refuse (EPERM) connects to VIP-range addresses no name holds.
    pub refuse_unknown_vips: bool,
    /// Refuse DNS while no proxy listener is bound, instead of leaving it
    /// on its original path.
    pub dns_outage_drop: bool,
    /// bpffs directory for the maps.
    pub pin_dir: PathBuf,
    /// Accept the root cgroup.
    pub allow_root_cgroup: bool,
    /// Group whose members (e.g. an unprivileged Envoy) may use the maps.
    pub maps_group: Option<u32>,
    /// Envoy's own uid: its sockets are never gated (none for root).
    pub exempt_uid: Option<u32>,
}

/// An exclusive `flock` on a pin directory: one gateway per directory,
/// for as long as it has programs loaded. Released when dropped (or when
/// the process dies, however it dies).
pub struct PinLock {
    _lock: Flock<File>,
}

impl PinLock {
    /// Takes the lock without waiting; fails with advice if it is held.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err((_, Errno::EWOULDBLOCK)) => bail!(
                "pin directory {} is in use by another gateway (`gateway attach` or `gateway run`); \
                 stop it first or choose another pin directory",
                dir.display()
            ),
            Err((_, errno)) => Err(errno).with_context(|| format!("locking {}", dir.display())),
        }
    }
}

/// Whether a gateway holds the lock on `pin_dir`, i.e. is alive and owns
/// the pins. The lock dies with its owner however it dies, so unlike a
/// recorded pid this is right under pid reuse and in pid namespaces.
pub fn owner_alive(pin_dir: &Path) -> bool {
    let Ok(file) = File::open(pin_dir) else {
        return false;
    };
    matches!(
        Flock::lock(file, FlockArg::LockSharedNonblock),
        Err((_, Errno::EWOULDBLOCK))
    )
}

/// Removes the pinned maps of a stopped gateway; refuses while the loader
/// that owns them is alive, and touches nothing that is not on bpffs.
/// Returns the removed paths.
pub fn reset(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    gateway_common::contract::check_pin_dir(pin_dir)
        .map_err(|e| anyhow::anyhow!("--pin-dir: {e}"))?;
    if !pin_dir.exists() {
        return Ok(Vec::new());
    }
    if !bpffs::is_bpffs(pin_dir) {
        bail!(
            "{} is not on bpffs: `gateway reset` only removes pinned maps, and there are none here",
            pin_dir.display()
        );
    }
    let _lock = PinLock::acquire(pin_dir)?;
    let detached = links::unpin_all(pin_dir)?;
    if detached > 0 {
        log::info!("detached {detached} programs a stopped gateway left attached");
    }
    PinDir::new(pin_dir).remove_all()
}

/// Builds the kernel configuration from a request.
pub fn kernel_config(request: &AttachRequest) -> Result<GatewayConfig> {
    if request.vip_cidrs.is_empty() {
        bail!("at least one --vip-cidr is needed");
    }
    if request.vip_cidrs.len() > MAX_VIP_CIDRS {
        bail!(
            "{} VIP CIDRs given; the kernel programs match at most {MAX_VIP_CIDRS}",
            request.vip_cidrs.len()
        );
    }
    for cidr in &request.vip_cidrs {
        if let Some(why) =
            gateway_common::contract::forbidden_vip_range(cidr.network, cidr.prefix_len)
        {
            bail!("VIP CIDR {cidr} cannot hold VIPs: {why}");
        }
        for target in [request.dns_to, request.tcp_to]
            .into_iter()
            .chain(request.dns_tcp_to)
        {
            if cidr.contains(*target.ip()) {
                bail!(
                    "VIP CIDR {cidr} contains the proxy address {target}: connections to the proxy \
                     itself would be redirected"
                );
            }
        }
    }
    let mut flags = CONFIG_FLAG_ENABLED;
    if request.ipv6_listeners {
        flags |= CONFIG_FLAG_IPV6;
    }
    if request.refuse_unknown_vips {
        flags |= CONFIG_FLAG_REFUSE_UNKNOWN_VIPS;
    }
    if request.dns_outage_drop {
        flags |= CONFIG_FLAG_DNS_OUTAGE_DROP;
    }
    let mut vip6_prefix = [0u32; 3];
    if let Some(prefix) = request.vip6_prefix {
        if !request.ipv6_listeners {
            bail!("an IPv6 VIP range needs the proxy's IPv6 listeners on ::1");
        }
        gateway_common::contract::check_vip6_prefix(prefix).map_err(anyhow::Error::msg)?;
        let o = prefix.octets();
        for (i, word) in vip6_prefix.iter_mut().enumerate() {
            *word = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
        }
        flags |= CONFIG_FLAG_VIP6;
    }
    let mut config = GatewayConfig {
        dns_target: sockaddr_from_std(request.dns_to),
        tcp_target: sockaddr_from_std(request.tcp_to),
        dns_tcp_target: request
            .dns_tcp_to
            .map(sockaddr_from_std)
            .unwrap_or_default(),
        vip6_prefix,
        flags: if request.dns_tcp_to.is_some() {
            flags | CONFIG_FLAG_DNS_TCP
        } else {
            flags
        },
        vip_cidr_count: request.vip_cidrs.len() as u32,
        netns_cookie: crate::sys::current_netns_cookie()?,
        exempt_uid: gateway_common::NO_EXEMPT_UID,
        ..Default::default()
    };
    for (slot, cidr) in config.vip_cidrs.iter_mut().zip(&request.vip_cidrs) {
        *slot = cidr.to_kernel();
    }
    Ok(config)
}

/// Kernel log level for aya-log: above `info` only when the operator asked
/// for debug output, so that redirects cost no ring-buffer writes by
/// default.
fn kernel_log_level() -> u8 {
    match log::max_level() {
        log::LevelFilter::Trace => 5,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Off => 0,
    }
}

fn privilege_hint(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        " (the capabilities are present, so something else refuses bpf(): a container's \
         seccomp profile (try --security-opt seccomp=unconfined), kernel lockdown, or \
         kernel.unprivileged_bpf_disabled with a user namespace)"
            .to_owned()
    } else {
        String::new()
    }
}

/// The eBPF object's digest, recorded with the attachment so that a later
/// loader adopts only programs of its own build.
pub fn object_digest() -> u64 {
    gateway_common::pinned::fnv1a(EBPF_OBJECT)
}

/// What a loader finds in its pin directory (see [`discover`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Previous {
    /// No program attached by pinned links: a first start, or a clean
    /// stop before.
    Nothing,
    /// Every program of this very build attached to this cgroup by pinned
    /// links, left by a loader that died: kept attached as they are, so
    /// there is no moment without the gate, and the counters go on.
    Adoptable,
    /// Pinned links of another build or cgroup, or an incomplete set: new
    /// programs are attached first, then the old links released.
    Replaceable(String),
}

/// First state of a loader's life: the request checked, the pin
/// directory prepared and locked, and what a previous loader left known.
pub struct Discovered {
    config: GatewayConfig,
    cgroup: PathBuf,
    gate: Vec<crate::gate::GatedCgroup>,
    pin_dir: PinDir,
    lock: PinLock,
    previous: Previous,
    maps_group: Option<u32>,
}

/// Checks the request, prepares and locks the pin directory, and finds
/// out what a previous loader left attached.
pub fn discover(request: &AttachRequest) -> Result<Discovered> {
    let mut config = kernel_config(request)?;
    let cgroup = cgroup::validate(&request.cgroup, request.allow_root_cgroup)?;
    config.exempt_uid = match request.exempt_uid {
        Some(0) => {
            bail!("root cannot be exempt from the gate: every gated root process would escape it")
        }
        Some(uid) => uid,
        None => gateway_common::NO_EXEMPT_UID,
    };
    let gate = match &request.gate {
        None => vec![crate::gate::identify(&cgroup, &cgroup)?],
        Some(list) => list
            .iter()
            .map(|path| crate::gate::identify(&cgroup, path))
            .collect::<Result<Vec<_>>>()?,
    };
    crate::privileges::check_attach()?;
    bpffs::prepare_pin_dir(&request.pin_dir)?;
    let lock = PinLock::acquire(&request.pin_dir)?;
    let pin_dir = PinDir::new(&request.pin_dir);
    // An upgrade changes the layouts of the per-connection maps; they are
    // recreated, while the VIP table (whose loss would re-hand VIPs that
    // clients still cache) must match or the start is refused.
    for name in pin_dir.remove_stale_transient_maps()? {
        log::info!("removed {name} pinned by another version of the gateway; it is recreated");
    }
    pin_dir.check_layouts()?;
    let previous = previous_attachment(&pin_dir, &cgroup);
    Ok(Discovered {
        config,
        cgroup,
        gate,
        pin_dir,
        lock,
        previous,
        maps_group: request.maps_group,
    })
}

fn previous_attachment(pin_dir: &PinDir, cgroup: &Path) -> Previous {
    let pinned = links::pinned(pin_dir.path());
    if pinned.is_empty() {
        return Previous::Nothing;
    }
    let complete = PROGRAMS.iter().all(|p| pinned.iter().any(|n| n == p));
    let info = match pin_dir.loader_info() {
        Ok(info) => info,
        Err(e) => return Previous::Replaceable(format!("no loader record ({e:#})")),
    };
    let len = (info.cgroup_path_len as usize).min(info.cgroup_path.len());
    let recorded = Path::new(std::ffi::OsStr::from_bytes(&info.cgroup_path[..len]));
    if !complete {
        Previous::Replaceable(format!(
            "only {} of {} links pinned",
            pinned.len(),
            PROGRAMS.len()
        ))
    } else if info.object_digest != object_digest() {
        Previous::Replaceable("programs of another build".to_owned())
    } else if recorded != cgroup {
        Previous::Replaceable(format!("attached to {}", recorded.display()))
    } else if let Err(why) = verify_attached(pin_dir.path(), cgroup) {
        Previous::Replaceable(why)
    } else {
        Previous::Adoptable
    }
}

/// The `bpf_attach_type` each program is attached with.
fn attach_type(program: &str) -> Option<u32> {
    Some(match program {
        "gw_sockops" => 3,
        "gw_connect4" => 10,
        "gw_connect6" => 11,
        "gw_sendmsg4" => 14,
        "gw_sendmsg6" => 15,
        "gw_recvmsg4" => 19,
        "gw_recvmsg6" => 20,
        "gw_getpeername4" => 29,
        "gw_getpeername6" => 30,
        _ => return None,
    })
}

/// Whether every program's pinned link is really attached to `cgroup`
/// now: the program behind the link is among those the kernel lists for
/// that cgroup (a cgroup removed and created again under the same path
/// has none; its links were detached with it).
pub fn verify_attached(pin_dir: &Path, cgroup: &Path) -> std::result::Result<(), String> {
    let file = File::open(cgroup).map_err(|e| format!("cannot open {}: {e}", cgroup.display()))?;
    for program in PROGRAMS {
        let kind = attach_type(program).ok_or_else(|| format!("no attach type for {program}"))?;
        let id = links::program_id(pin_dir, program)
            .ok_or_else(|| format!("the pinned link of {program} cannot be read"))?;
        let attached =
            crate::sys::attached_program_ids(&file, kind).map_err(|e| format!("{e:#}"))?;
        if !attached.contains(&id) {
            return Err(format!(
                "the pinned {program} is no longer attached to {} (was the cgroup recreated?)",
                cgroup.display()
            ));
        }
    }
    Ok(())
}

impl Discovered {
    /// What the previous loader left.
    pub fn previous(&self) -> &Previous {
        &self.previous
    }

    /// Second state: adopts the attached programs or loads new ones, and
    /// writes the kernel configuration (the running programs read it at
    /// once, so an adopted attachment takes a changed configuration
    /// without a reattach).
    pub fn load_or_adopt(self) -> Result<Prepared> {
        let Discovered {
            config,
            cgroup,
            gate,
            pin_dir,
            lock,
            previous,
            maps_group,
        } = self;
        let ebpf = if previous == Previous::Adoptable {
            log::info!(
                "adopting the programs still attached to {} (a previous gateway stopped without detaching)",
                cgroup.display()
            );
            None
        } else {
            if let Previous::Replaceable(why) = &previous {
                log::info!("replacing the programs attached by a previous gateway ({why})");
            }
            let log_level = kernel_log_level();
            Some(
                EbpfLoader::new()
                    .default_map_pin_directory(pin_dir.path())
                    .override_global("AYA_LOG_LEVEL", &log_level, false)
                    .load(EBPF_OBJECT)
                    .map_err(anyhow::Error::from)
                    .map_err(|e| {
                        let hint = privilege_hint(&e);
                        e.context(format!("loading the eBPF object{hint}"))
                    })?,
            )
        };
        // Configure before attaching, so the first redirected socket already
        // sees the targets.
        pin_dir
            .set_config(&config)
            .context("writing the kernel configuration")?;
        let (gated, ungated) = crate::gate::sync_configured(&pin_dir, &gate)?;
        log::info!(
            "gate table: {} configured cgroups ({gated} newly gated, {ungated} no longer configured)",
            gate.len()
        );
        pin_dir.ensure_reclaim_lock()?;
        if let Some(gid) = maps_group {
            bpffs::allow_traversal(pin_dir.path())?;
            pin_dir.share_with_group(gid)?;
        }
        Ok(Prepared {
            ebpf,
            pin_dir,
            cgroup,
            lock,
        })
    }
}

/// Programs loaded (or adopted) and maps pinned and configured: the moment
/// to start Envoy, which opens the pinned maps, before any traffic is
/// redirected to it (adopted programs redirect already; while no listener
/// is bound, the DNS outage policy applies).
pub struct Prepared {
    ebpf: Option<Ebpf>,
    pin_dir: PinDir,
    cgroup: PathBuf,
    lock: PinLock,
}

/// Checks the request, then loads or adopts ([`discover`], then
/// [`Discovered::load_or_adopt`]).
pub fn load(request: &AttachRequest) -> Result<Prepared> {
    discover(request)?.load_or_adopt()
}

impl Prepared {
    /// The pinned maps.
    pub fn pin_dir(&self) -> &PinDir {
        &self.pin_dir
    }

    /// Whether the programs were adopted rather than loaded.
    pub fn adopted(&self) -> bool {
        self.ebpf.is_none()
    }

    /// Third state: every program attached to the cgroup by a pinned link
    /// (new programs replace old links only once attached), and the loader
    /// recorded.
    pub fn attach(self) -> Result<Attached> {
        let Prepared {
            mut ebpf,
            pin_dir,
            cgroup,
            lock,
        } = self;
        if let Some(ebpf) = ebpf.as_mut() {
            let cgroup_file = File::open(&cgroup)
                .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
            let mut attached = Vec::new();
            for name in PROGRAMS {
                let link = attach_program(ebpf, name, &cgroup_file).map_err(|e| {
                    let hint = privilege_hint(&e);
                    e.context(format!("attaching {name} to {}{hint}", cgroup.display()))
                })?;
                attached.push((name, link));
            }
            for (name, link) in attached {
                links::pin(pin_dir.path(), name, link)?;
            }
            // Links of programs this build no longer has.
            for stale in links::pinned(pin_dir.path()) {
                if !PROGRAMS.contains(&stale.as_str()) {
                    let path = links::dir(pin_dir.path()).join(&stale);
                    let _ = aya::programs::links::PinnedLink::from_pin(&path).map(|l| l.unpin());
                }
            }
        }
        let mut info = LoaderInfo {
            pid: std::process::id(),
            cgroup_path_len: 0,
            attached_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            cgroup_path: [0; 256],
            object_digest: object_digest(),
        };
        let path_bytes = cgroup.as_os_str().as_encoded_bytes();
        let len = path_bytes.len().min(info.cgroup_path.len());
        info.cgroup_path[..len].copy_from_slice(&path_bytes[..len]);
        info.cgroup_path_len = len as u32;
        pin_dir.set_loader_info(&info)?;
        Ok(Attached {
            ebpf,
            pin_dir,
            cgroup,
            _lock: lock,
        })
    }
}

/// Loads (or adopts) and attaches in one step (`gateway attach`).
pub fn attach(request: &AttachRequest) -> Result<Attached> {
    load(request)?.attach()
}

/// Programs attached to a cgroup by pinned links. Dropping it (or the
/// process dying) leaves them attached, for the next loader to adopt;
/// [`Attached::stop`] detaches them.
pub struct Attached {
    ebpf: Option<Ebpf>,
    pin_dir: PinDir,
    cgroup: PathBuf,
    _lock: PinLock,
}

impl Attached {
    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The loaded object, e.g. to start forwarding kernel logs; `None`
    /// for adopted programs (their log buffer belongs to the loader that
    /// loaded them).
    pub fn ebpf_mut(&mut self) -> Option<&mut Ebpf> {
        self.ebpf.as_mut()
    }

    /// Last state, for an upgrade: leaves every program attached by its
    /// pinned link, as a crash would, for the next loader to adopt without
    /// a moment ungated.
    pub fn leave_attached(self) {
        log::info!(
            "left the programs attached to {} (pinned links in {}): the next gateway adopts them; \
             `gateway reset` detaches them",
            self.cgroup.display(),
            self.pin_dir.path().display()
        );
    }

    /// Last state: detaches every program (removes the link pins) and marks
    /// the pins as no longer owned. The maps stay pinned (the VIP table
    /// must survive restarts); `gateway reset` removes them.
    pub fn stop(self) -> Result<()> {
        // The lock is held until the pins are marked as no longer owned.
        let Attached {
            ebpf,
            pin_dir,
            cgroup,
            _lock,
        } = self;
        let detached = links::unpin_all(pin_dir.path())?;
        drop(ebpf);
        let mut info = pin_dir.loader_info()?;
        info.pid = 0;
        pin_dir.set_loader_info(&info)?;
        let mut config = pin_dir.config()?;
        config.flags &= !CONFIG_FLAG_ENABLED;
        pin_dir.set_config(&config)?;
        log::info!("detached {detached} programs from {}", cgroup.display());
        Ok(())
    }
}

/// Attach mode for every program. On kernels with cgroup bpf_links (5.7+)
/// aya creates a link, the kernel requires flags 0 for it and links always
/// coexist with other programs on the cgroup, so this is not exclusive.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

fn attach_program(ebpf: &mut Ebpf, name: &str, cgroup: &File) -> Result<FdLink> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    let link: FdLink = if name == "gw_sockops" {
        let program: &mut SockOps = program.try_into()?;
        program.load()?;
        let id = program.attach(cgroup, ATTACH_MODE)?;
        program
            .take_link(id)?
            .try_into()
            .context("this kernel has no cgroup bpf_links (5.7+), which keep the gate attached across loader restarts")?
    } else {
        let program: &mut CgroupSockAddr = program.try_into()?;
        program.load()?;
        let id = program.attach(cgroup, ATTACH_MODE)?;
        program
            .take_link(id)?
            .try_into()
            .context("this kernel has no cgroup bpf_links (5.7+), which keep the gate attached across loader restarts")?
    };
    log::debug!("attached {name}");
    Ok(link)
}
