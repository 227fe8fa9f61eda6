//! The state directory of one gateway: `<state dir>/<name>/`, where
//! `<name>` is derived from the pin directory (which identifies a gateway:
//! its lock allows one per pin directory). It holds the generated Envoy
//! bootstrap (tokens inside) and Envoy's admin socket, so it is readable
//! by root and by Envoy's own user only.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// Default parent of the gateways' state directories.
pub const DEFAULT_STATE_DIR: &str = "/run/dns-egress-gateway";

/// Who besides root may use a gateway's state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Root only (Envoy runs as root).
    Private,
    /// Envoy runs as this user, started by the gateway: the directory and
    /// files are its own (0700/0600).
    EnvoyUser {
        /// Envoy's uid.
        uid: u32,
        /// Its primary group.
        gid: u32,
    },
    /// Envoy runs elsewhere (another container) as a member of this group:
    /// root owns everything, the group may read the files and create its
    /// admin socket (0770/0640, admin socket 0660). Needs no CAP_CHOWN:
    /// the gateway is a member of the group.
    EnvoyGroup {
        /// The group shared with Envoy.
        gid: u32,
    },
}

impl Sharing {
    /// The group root's files are shared with, if any.
    fn group(self) -> Option<u32> {
        match self {
            Sharing::Private => None,
            Sharing::EnvoyUser { gid, .. } | Sharing::EnvoyGroup { gid } => Some(gid),
        }
    }

    /// Mode of the directories and files only root writes: Envoy's group
    /// may read them, nobody but root may change them.
    /// Envoy's uid when the gateway starts Envoy as that user: directories
    /// it owned in an older layout are taken back from it.
    fn envoy_uid(self) -> Option<u32> {
        match self {
            Sharing::EnvoyUser { uid, .. } => Some(uid),
            _ => None,
        }
    }

    fn root_dir_mode(self) -> u32 {
        if self.group().is_some() {
            0o750
        } else {
            0o700
        }
    }

    fn file_mode(self) -> u32 {
        if self.group().is_some() {
            0o640
        } else {
            0o600
        }
    }

    /// Owner and mode of Envoy's own directory (its admin socket, its
    /// acknowledgements): Envoy's user, or root with Envoy's group when
    /// Envoy runs elsewhere (no CAP_CHOWN here).
    fn envoy_dir(self) -> (Option<u32>, Option<u32>, u32) {
        match self {
            Sharing::Private => (None, None, 0o700),
            Sharing::EnvoyUser { uid, gid } => (Some(uid), Some(gid), 0o700),
            Sharing::EnvoyGroup { gid } => (None, Some(gid), 0o770),
        }
    }

    /// Mode of Envoy's admin socket: its group may use it when Envoy runs
    /// in another container, so that the gateway needs no
    /// CAP_DAC_OVERRIDE to reach it.
    pub fn admin_socket_mode(self) -> u32 {
        match self {
            Sharing::EnvoyGroup { .. } => 0o660,
            _ => 0o600,
        }
    }
}

/// Where one gateway keeps its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    dir: PathBuf,
    sharing: Sharing,
}

impl Instance {
    /// The state directory of the gateway pinned in `pin_dir`: its last
    /// path component (readable) and a digest of the whole path (unique, so
    /// /a/gw and /b/gw never share a bootstrap).
    pub fn new(state_dir: &Path, pin_dir: &Path) -> Self {
        Self {
            dir: gateway_common::pinned::instance_dir(state_dir, pin_dir),
            sharing: Sharing::Private,
        }
    }

    /// The same directory, shared with Envoy as `sharing` says.
    pub fn with_sharing(mut self, sharing: Sharing) -> Self {
        self.sharing = sharing;
        self
    }

    /// How the directory is shared with Envoy.
    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The generated Envoy bootstrap (mode 0600).
    pub fn bootstrap(&self) -> PathBuf {
        self.dir.join("envoy.json")
    }

    /// The only directory Envoy may write: its admin socket and its
    /// acknowledgements. Root only reads from it, never follows a link in
    /// it, and writes nothing there.
    pub fn envoy_dir(&self) -> PathBuf {
        gateway_common::pinned::envoy_dir(&self.dir)
    }

    /// Envoy's admin interface: a Unix socket (mode 0600, 0660 for an
    /// Envoy in another container), the only way to reach it.
    pub fn admin_socket(&self) -> PathBuf {
        self.envoy_dir()
            .join(gateway_common::pinned::ADMIN_SOCKET_NAME)
    }

    /// Where the module acknowledges each domains file it applied.
    pub fn domains_ack(&self) -> PathBuf {
        self.envoy_dir().join("domains.applied")
    }

    /// Creates the directories: the parent 0711 owned by root (others may
    /// pass through, not list); this gateway's owned by root, readable by
    /// Envoy's group (0750) so that nothing Envoy's user does can make
    /// root write through a link; and Envoy's own directory in it. An
    /// existing directory of this gateway left owned by Envoy's user (an
    /// older layout) is taken back; anything else foreign is refused.
    pub fn prepare(&self) -> Result<()> {
        let me = nix::unistd::geteuid().as_raw();
        let parent = self
            .dir
            .parent()
            .context("state directory without parent")?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .with_context(|| format!("creating the state directory {}", parent.display()))?;
        let meta = fs::symlink_metadata(parent)
            .with_context(|| format!("inspecting {}", parent.display()))?;
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            bail!(
                "state directory {} must be a directory owned by uid {me} and writable by nobody else \
                 (it holds credentials); fix or remove it, or pass another --state-dir",
                parent.display()
            );
        }
        self.ensure_root_dir(&self.dir)?;
        let (uid, gid, mode) = self.sharing.envoy_dir();
        ensure_dir(
            &self.envoy_dir(),
            me,
            self.sharing.envoy_uid(),
            uid,
            gid,
            mode,
        )
    }

    /// Makes `path` one of root's directories of this gateway: owned by
    /// root, readable by Envoy's group (see [`ensure_dir`]).
    fn ensure_root_dir(&self, path: &Path) -> Result<()> {
        let me = nix::unistd::geteuid().as_raw();
        ensure_dir(
            path,
            me,
            self.sharing.envoy_uid(),
            Some(me),
            self.sharing.group(),
            self.sharing.root_dir_mode(),
        )
    }

    /// The domains and their metadata (tokens inside, mode 0600), which
    /// the module watches and applies again when `gateway reload` replaces
    /// the file.
    pub fn domains_file(&self) -> PathBuf {
        self.dir.join("domains.json")
    }

    /// The directory Envoy watches for its clusters file (CDS from a
    /// file): a file renamed into it is applied at once.
    pub fn cds_dir(&self) -> PathBuf {
        self.dir.join("cds")
    }

    /// The clusters (upstream proxies and fallback resolvers) as a CDS
    /// discovery response.
    pub fn cds_file(&self) -> PathBuf {
        self.cds_dir().join("clusters.json")
    }

    /// Where `gateway run` reports the outcome of each reload (JSON), for
    /// `gateway reload` to wait on.
    pub fn reload_result(&self) -> PathBuf {
        self.dir.join("reload-result.json")
    }

    /// Writes the bootstrap atomically, mode 0600, owned by `owner` (Envoy's
    /// user when it runs as one, so it can read it).
    pub fn write_bootstrap(&self, text: &str) -> Result<()> {
        write_private(&self.bootstrap(), text, self.sharing)
    }

    /// Writes the domains file and the clusters file (see
    /// [`Self::domains_file`], [`Self::cds_file`]), each replaced whole;
    /// the clusters file is written aside and renamed into the watched
    /// directory, which is what makes Envoy read it.
    pub fn write_reloadable(&self, domains: &str, clusters: &str) -> Result<()> {
        self.write_domains(domains)?;
        self.write_clusters(clusters)
    }

    /// Writes the domains file (see [`Self::domains_file`]).
    pub fn write_domains(&self, domains: &str) -> Result<()> {
        write_private(&self.domains_file(), domains, self.sharing)
    }

    /// Writes the clusters file (see [`Self::cds_file`]): aside, then
    /// renamed into the watched directory, which is what makes Envoy read
    /// it.
    pub fn write_clusters(&self, clusters: &str) -> Result<()> {
        self.ensure_root_dir(&self.cds_dir())?;
        let staged = self.dir.join("clusters.json.staged");
        write_private(&staged, clusters, self.sharing)?;
        fs::rename(&staged, self.cds_file())
            .with_context(|| format!("moving the clusters into {}", self.cds_file().display()))
    }

    /// Records a reload's outcome (see [`Self::reload_result`]).
    pub fn write_reload_result(&self, text: &str) -> Result<()> {
        write_private(&self.reload_result(), text, self.sharing)
    }
}

/// Makes `path` a real directory (never a link) owned by `uid` with group
/// `gid` and `mode`. An existing one owned by `me` or `taken_back_from` is
/// kept (and made ours); a link, a file, or a directory of anyone else is
/// removed when it is inside our own directory, else refused. Ownership is
/// changed through the opened directory, never by path.
fn ensure_dir(
    path: &Path,
    me: u32,
    taken_back_from: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: u32,
) -> Result<()> {
    use std::os::unix::fs::{fchown, OpenOptionsExt as _};
    if let Ok(meta) = fs::symlink_metadata(path) {
        let ours = meta.is_dir() && (meta.uid() == me || Some(meta.uid()) == taken_back_from);
        if !ours {
            if meta.is_dir() {
                bail!(
                    "{} belongs to uid {}, not to this gateway; remove it and start again",
                    path.display(),
                    meta.uid()
                );
            }
            fs::remove_file(path).with_context(|| {
                format!("removing {}, which is not a directory", path.display())
            })?;
            log::warn!(
                "removed {}: it was not a directory (a link?)",
                path.display()
            );
        }
    }
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_directory_nofollow())
        .open(path)
        .with_context(|| {
            format!(
                "opening {} (it must be a directory, not a link)",
                path.display()
            )
        })?;
    if uid.is_some() || gid.is_some() {
        fchown(&dir, uid, gid).with_context(|| format!("chown {}", path.display()))?;
    }
    dir.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// `O_DIRECTORY | O_NOFOLLOW`: opening fails on a link or a file.
fn libc_o_directory_nofollow() -> i32 {
    (nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_NOFOLLOW).bits()
}

/// Writes `text` to `target` atomically (a partial file renamed over it),
/// readable by root and by Envoy as `sharing` says.
fn write_private(target: &Path, text: &str, sharing: Sharing) -> Result<()> {
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let partial = target.with_extension("partial");
        let _ = fs::remove_file(&partial);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(sharing.file_mode())
            .open(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", partial.display()))?;
        if let Some(gid) = sharing.group() {
            std::os::unix::fs::fchown(&file, None, Some(gid))
                .with_context(|| format!("chown {}", partial.display()))?;
        }
        fs::rename(&partial, target).with_context(|| format!("writing {}", target.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_left_in_the_state_directory_are_replaced_never_followed() {
        let root = std::env::temp_dir().join(format!("gw-instance-{}", std::process::id()));
        let victim_dir = root.join("victim-dir");
        let victim_file = root.join("victim-file");
        fs::create_dir_all(&victim_dir).unwrap();
        fs::set_permissions(&victim_dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(&victim_file, "precious").unwrap();
        let instance = Instance::new(&root.join("state"), Path::new("/sys/fs/bpf/gw"));
        instance.prepare().unwrap();
        // What an older layout let Envoy's user leave behind.
        std::os::unix::fs::symlink(&victim_dir, instance.cds_dir()).unwrap();
        std::os::unix::fs::symlink(&victim_file, instance.dir().join("reload-result.partial"))
            .unwrap();
        std::os::unix::fs::symlink(&victim_file, instance.dir().join("clusters.json.partial"))
            .unwrap();
        instance.write_clusters("{}").unwrap();
        instance.write_reload_result("{}").unwrap();
        let cds = fs::symlink_metadata(instance.cds_dir()).unwrap();
        assert!(cds.is_dir() && !cds.file_type().is_symlink());
        assert_eq!(fs::read_to_string(instance.cds_file()).unwrap(), "{}");
        assert_eq!(
            fs::metadata(&victim_dir).unwrap().mode() & 0o7777,
            0o755,
            "the link's target was not chmodded"
        );
        assert!(fs::read_dir(&victim_dir).unwrap().next().is_none());
        assert_eq!(fs::read_to_string(&victim_file).unwrap(), "precious");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn pin_dirs_with_the_same_last_component_get_different_directories() {
        let state = Path::new("/run/gw");
        let a = Instance::new(state, Path::new("/sys/fs/bpf/a/gw"));
        let b = Instance::new(state, Path::new("/sys/fs/bpf/b/gw"));
        assert_ne!(a, b);
        assert_eq!(a, Instance::new(state, Path::new("/sys/fs/bpf/a/gw")));
        assert!(a
            .dir()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("gw-"));
        assert_eq!(a.bootstrap().parent(), Some(a.dir()));
        assert_eq!(a.admin_socket().parent(), Some(a.envoy_dir().as_path()));
        assert_eq!(a.envoy_dir().parent(), Some(a.dir()));
    }
}
