//! Builds the kernel programs (`gateway-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker, so a plain `cargo build` produces a
//! loader with the object embedded. `cargo xtask setup` installs both.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway-ebpf");
    let common_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway-common");
    println!("cargo:rerun-if-changed={common_dir}");
    let package = aya_build::Package {
        name: "gateway-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("nightly")).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install \
         the nightly rust-src component and bpf-linker",
    )
}
