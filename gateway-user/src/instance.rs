//! The state directory of one gateway: `<state dir>/<name>/`, where
//! `<name>` is derived from the pin directory (which identifies a gateway:
//! its lock allows one per pin directory). It holds the generated Envoy
//! bootstrap (tokens inside) and Envoy's admin socket, so it is readable
//! by root and by Envoy's own user only.

use std::{
    fs,
    os::unix::fs::{chown, DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
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
    fn owner(self) -> (Option<u32>, Option<u32>) {
        match self {
            Sharing::Private => (None, None),
            Sharing::EnvoyUser { uid, gid } => (Some(uid), Some(gid)),
            Sharing::EnvoyGroup { gid } => (None, Some(gid)),
        }
    }

    fn dir_mode(self) -> u32 {
        match self {
            Sharing::EnvoyGroup { .. } => 0o770,
            _ => 0o700,
        }
    }

    fn file_mode(self) -> u32 {
        match self {
            Sharing::EnvoyGroup { .. } => 0o640,
            _ => 0o600,
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

    /// Envoy's admin interface: a Unix socket (mode 0600), the only way to
    /// reach it.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join(gateway_common::pinned::ADMIN_SOCKET_NAME)
    }

    /// Creates the directories: the parent 0711 owned by root (others may
    /// pass through, not list), this gateway's 0700 owned by `owner` (root,
    /// or Envoy's user, which must create its admin socket there). An
    /// existing directory owned by someone else is refused.
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
        match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", self.dir.display())),
        }
        let meta = fs::symlink_metadata(&self.dir)
            .with_context(|| format!("inspecting {}", self.dir.display()))?;
        let (uid, gid) = self.sharing.owner();
        if !meta.is_dir() || (meta.uid() != me && Some(meta.uid()) != uid) {
            bail!(
                "{} is not a directory of this gateway (owner uid {}); remove it and start again",
                self.dir.display(),
                meta.uid()
            );
        }
        if uid.is_some() || gid.is_some() {
            chown(&self.dir, Some(uid.unwrap_or(me)), gid)
                .with_context(|| format!("chown {}", self.dir.display()))?;
        }
        let mode = self.sharing.dir_mode();
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", self.dir.display()))?;
        Ok(())
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
        let cds_dir = self.cds_dir();
        match fs::DirBuilder::new().mode(0o700).create(&cds_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", cds_dir.display())),
        }
        let (uid, gid) = self.sharing.owner();
        if uid.is_some() || gid.is_some() {
            chown(&cds_dir, uid, gid).with_context(|| format!("chown {}", cds_dir.display()))?;
        }
        // Envoy's group reads and searches it, and never writes it.
        let mode = self.sharing.dir_mode() & 0o750;
        fs::set_permissions(&cds_dir, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", cds_dir.display()))?;
        write_private(&self.domains_file(), domains, self.sharing)?;
        let staged = self.dir.join("clusters.json.staged");
        write_private(&staged, clusters, self.sharing)?;
        fs::rename(&staged, self.cds_file())
            .with_context(|| format!("moving the clusters into {}", self.cds_file().display()))
    }
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
        let (uid, gid) = sharing.owner();
        if uid.is_some() || gid.is_some() {
            chown(&partial, uid, gid).with_context(|| format!("chown {}", partial.display()))?;
        }
        fs::rename(&partial, target).with_context(|| format!("writing {}", target.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(a.admin_socket().parent(), Some(a.dir()));
    }
}
