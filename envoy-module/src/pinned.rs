//! The gateway's pinned BPF maps, seen through the module's traits.
//!
//! [`PinnedMaps`] opens the maps the loader (`gateway attach`) pins:
//! the VIP map as a [`VipStore`] and the original-destination map as an
//! [`OrigDstSource`]. A map that is not pinned is not an error: the module
//! then works in-process only (VIP table) or by the connection's local
//! address (original destination), as in the seed's iptables setup.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use gateway_common::{
    pinned::{OrigDstTable, PinDir, VipTable},
    MAP_ORIG_DST, MAP_VIPS,
};

use crate::allocator::VipStore;

/// Where a connection's client originally connected to.
pub trait OrigDstSource: Send {
    /// Consumes the original destination of the connection whose client is
    /// `client`: at most one caller ever gets it.
    fn take(&mut self, client: SocketAddr) -> Result<Option<SocketAddr>, String>;
}

/// Reads the VIP table without the allocator (a connection's lookup).
pub trait VipLookup: Send + Sync {
    /// The domain of `vip`, if allocated.
    fn get(&self, vip: Ipv4Addr) -> Result<Option<String>, String>;
}

/// Opens the persistent maps of a pin directory.
pub trait MapOpener: Send + Sync {
    /// A read-only view of the VIP map for lookups, `Ok(None)` when it is
    /// not pinned (or the opener offers none: lookups then go through the
    /// allocator).
    fn open_vip_lookup(&self, _dir: &Path) -> Result<Option<Box<dyn VipLookup>>, String> {
        Ok(None)
    }
    /// The VIP map, `Ok(None)` when it is not pinned.
    fn open_vips(&self, dir: &Path) -> Result<Option<Box<dyn VipStore>>, String>;
    /// The original-destination map, `Ok(None)` when it is not pinned.
    fn open_orig_dst(&self, dir: &Path) -> Result<Option<Box<dyn OrigDstSource>>, String>;
}

/// [`MapOpener`] for the real pinned maps on bpffs.
#[derive(Clone, Copy, Debug, Default)]
pub struct PinnedMaps;

struct PinnedVips {
    table: VipTable,
    uses: Option<gateway_common::pinned::VipUseTable>,
    pins: PinDir,
}

impl VipStore for PinnedVips {
    fn entries(&self) -> Result<Vec<(Ipv4Addr, String)>, String> {
        self.table.entries().map_err(|e| format!("{e:#}"))
    }

    fn get(&self, vip: Ipv4Addr) -> Result<Option<String>, String> {
        self.table.get(vip).map_err(|e| format!("{e:#}"))
    }

    fn insert(&mut self, vip: Ipv4Addr, domain: &str) -> Result<(), String> {
        self.table.insert(vip, domain).map_err(|e| format!("{e:#}"))
    }

    fn insert_new(&mut self, vip: Ipv4Addr, domain: &str) -> Result<bool, String> {
        self.table
            .insert_new(vip, domain)
            .map_err(|e| format!("{e:#}"))
    }

    fn mark_reclaiming(&mut self, vip: Ipv4Addr) -> Result<(), String> {
        self.table
            .mark_reclaiming(vip)
            .map_err(|e| format!("{e:#}"))
    }

    fn repair_marked(&mut self) -> Result<usize, String> {
        self.table
            .repair_marked()
            .map(|repaired| repaired.len())
            .map_err(|e| format!("{e:#}"))
    }

    fn lock_reclaims(&self) -> Result<crate::allocator::ReclaimGuard, String> {
        let lock = self.pins.lock_reclaims().map_err(|e| format!("{e:#}"))?;
        Ok(Box::new(lock))
    }

    fn last_use_ns(&self, vip: Ipv4Addr) -> Option<u64> {
        self.uses.as_ref()?.last_use_ns(vip).ok().flatten()
    }

    fn all_last_uses(&self) -> Option<std::collections::HashMap<u32, u64>> {
        self.uses.as_ref()?.entries().ok().map(|all| {
            all.into_iter()
                .map(|(vip, ns)| (u32::from(vip), ns))
                .collect()
        })
    }

    fn stamp_use(&mut self, vip: Ipv4Addr, ns: u64) -> bool {
        // A lost stamp makes the VIP look idler; the caller then checks the
        // map on every answer instead of trusting a recent check. A zero
        // (the clock could not be read) would say "idle since boot".
        ns != 0
            && self
                .uses
                .as_mut()
                .is_some_and(|table| table.stamp(vip, ns).is_ok())
    }
}

impl VipLookup for VipTable {
    fn get(&self, vip: Ipv4Addr) -> Result<Option<String>, String> {
        VipTable::get(self, vip).map_err(|e| format!("{e:#}"))
    }
}

struct PinnedOrigDst(OrigDstTable);

impl OrigDstSource for PinnedOrigDst {
    fn take(&mut self, client: SocketAddr) -> Result<Option<SocketAddr>, String> {
        self.0
            .take(client, crate::abi::monotonic_ns())
            .map_err(|e| format!("{e:#}"))
    }
}

impl MapOpener for PinnedMaps {
    fn open_vip_lookup(&self, dir: &Path) -> Result<Option<Box<dyn VipLookup>>, String> {
        let pins = PinDir::new(dir);
        if !pins.has(MAP_VIPS) {
            return Ok(None);
        }
        let table = pins.vips().map_err(|e| format!("{e:#}"))?;
        Ok(Some(Box::new(table)))
    }

    fn open_vips(&self, dir: &Path) -> Result<Option<Box<dyn VipStore>>, String> {
        let pins = PinDir::new(dir);
        if !pins.has(MAP_VIPS) {
            return Ok(None);
        }
        // Opening checks the key and value sizes against this build.
        let table = pins.vips().map_err(|e| format!("{e:#}"))?;
        // The use table is optional: an older loader has none.
        let uses = pins
            .has(gateway_common::MAP_VIP_USE)
            .then(|| pins.vip_use().ok())
            .flatten();
        Ok(Some(Box::new(PinnedVips { table, uses, pins })))
    }

    fn open_orig_dst(&self, dir: &Path) -> Result<Option<Box<dyn OrigDstSource>>, String> {
        let pins = PinDir::new(dir);
        if !pins.has(MAP_ORIG_DST) {
            return Ok(None);
        }
        let table = pins.orig_dst().map_err(|e| format!("{e:#}"))?;
        Ok(Some(Box::new(PinnedOrigDst(table))))
    }
}
