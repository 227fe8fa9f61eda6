//! VIP table scale, measured on the module's own allocator and the real
//! pinned VIP map (in this process: the code and data structures Envoy
//! runs, without Envoy around them): the time to allocate `vip_names`
//! distinct names, the memory each entry costs the module and the kernel,
//! and what a lookup costs at 100 entries vs at that size.

use std::{hint::black_box, net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result};
use connectivity_envoy_module::{
    allocator::{Pool, VipAllocator},
    pinned::{MapOpener as _, PinnedMaps},
};
use gateway_common::pinned::PinDir;

use super::{
    env::{self, Env, Gate},
    report::{Row, Table},
    Plan,
};

const LOOKUPS: u32 = 20_000;

/// Nanoseconds per map lookup of a present VIP (what `cache_lookup`
/// reads per connection), per answer for a known name from memory (within
/// a second of its last check), and per answer that stamps and checks the
/// map again (each answer a second after the last).
fn lookup_costs(
    pins: &PinDir,
    allocator: &mut VipAllocator,
    pool: &Pool,
    entries: u32,
) -> Result<(f64, f64, f64)> {
    let table = pins.vips()?;
    let started = Instant::now();
    for i in 0..LOOKUPS {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + (i * 7919) % entries);
        black_box(table.get(vip)?);
    }
    let map = started.elapsed().as_nanos() as f64 / f64::from(LOOKUPS);
    let name = |i: u32| format!("n{}.scale.example", (i * 7919) % entries);
    let mut answer = |i: u32, now: Instant| -> Result<()> {
        black_box(
            allocator
                .allocate_at(&name(i), pool, now)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
        Ok(())
    };
    // Every name checked once now; then answers within the second.
    let base = Instant::now();
    for i in 0..entries.min(LOOKUPS) {
        answer(i, base)?;
    }
    let started = Instant::now();
    for i in 0..LOOKUPS {
        answer(i, base)?;
    }
    let memory = started.elapsed().as_nanos() as f64 / f64::from(LOOKUPS);
    let started = Instant::now();
    for i in 0..LOOKUPS {
        answer(
            i,
            base + std::time::Duration::from_millis(1100 * u64::from(i + 1)),
        )?;
    }
    let checked = started.elapsed().as_nanos() as f64 / f64::from(LOOKUPS);
    Ok((map, memory, checked))
}

/// The VIP table comparison.
pub fn run(plan: &Plan, _env: &Env) -> Result<Vec<Table>> {
    connectivity_envoy_module::api::quiet_outside_envoy();
    let names = plan.vip_names.max(200);
    let gate = Gate::attach("10.64.0.0/15", env::UDP, env::ECHO)?;
    let pins = PinDir::new(gate.pin_dir());
    let store = PinnedMaps
        .open_vips(gate.pin_dir())
        .map_err(anyhow::Error::msg)?
        .context("the loader pinned no VIP map")?;
    let mut allocator = VipAllocator::new();
    allocator
        .attach_store(Some(store))
        .map_err(anyhow::Error::msg)?;
    let pool = Pool::new(Ipv4Addr::new(10, 64, 0, 0), 15, names).map_err(anyhow::Error::msg)?;
    let slab_before = env::slab_bytes()?;
    let rss_before = env::rss_bytes(None)?;
    let mut allocating = std::time::Duration::ZERO;
    let mut allocate = |range: std::ops::Range<u32>, allocator: &mut VipAllocator| -> Result<()> {
        let started = Instant::now();
        for i in range {
            allocator
                .allocate(&format!("n{i}.scale.example"), &pool)
                .map_err(|e| anyhow::anyhow!("allocating name {i}: {e:?}"))?;
        }
        allocating += started.elapsed();
        Ok(())
    };
    allocate(0..100, &mut allocator)?;
    let small = lookup_costs(&pins, &mut allocator, &pool, 100)?;
    allocate(100..names, &mut allocator)?;
    let slab_after = env::slab_bytes()?;
    let rss_after = env::rss_bytes(None)?;
    let large = lookup_costs(&pins, &mut allocator, &pool, names)?;
    let stored = pins.vips()?.entries()?.len();
    let per_entry =
        |before: u64, after: u64| after.saturating_sub(before) as f64 / f64::from(names);
    Ok(vec![
        Table {
            id: "vips_lookup".into(),
            title: "VIP table: lookup cost by size".into(),
            columns: vec![
                "map lookup ns (cache_lookup's read)".into(),
                "known name from memory ns".into(),
                "known name with stamp + map check ns".into(),
            ],
            rows: vec![
                Row { mode: "100 entries".into(), cells: vec![small.0, small.1, small.2] },
                Row { mode: format!("{names} entries"), cells: vec![large.0, large.1, large.2] },
            ],
            chart: Some((0, "map lookup / at 100 entries".into())),
            note: format!("{LOOKUPS} lookups of present entries each. An answer from memory checks the shared map again (after stamping the use) at most once a second per VIP."),
        },
        Table {
            id: "vips_allocation".into(),
            title: format!("VIP table: {names} distinct names"),
            columns: vec![
                "seconds to allocate all".into(),
                "µs per allocation".into(),
                "module bytes per entry".into(),
                "kernel slab bytes per entry".into(),
                "entries in the pinned map".into(),
            ],
            rows: vec![Row {
                mode: "dns_gateway's allocator + pinned map".into(),
                cells: vec![
                    allocating.as_secs_f64(),
                    allocating.as_secs_f64() * 1e6 / f64::from(names),
                    per_entry(rss_before, rss_after),
                    per_entry(slab_before, slab_after),
                    stored as f64,
                ],
            }],
            chart: None,
            note: "Each allocation claims the VIP in the pinned map (BPF_NOEXIST) and stamps its use; module memory is the growth of this process's resident set (the allocator's maps), kernel memory the growth of the slab (map elements).".into(),
        },
    ])
}
