//! Builds the kernel programs (`gateway-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker, so a plain `cargo build` produces a
//! loader with the object embedded. `cargo xtask setup` installs both.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway-ebpf");
    let common_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway-common");
    let toolchain_file = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf-toolchain");
    println!("cargo:rerun-if-changed={common_dir}");
    println!("cargo:rerun-if-changed={toolchain_file}");
    // The nightly that builds the kernel crate is pinned by date in one
    // file, which `cargo xtask setup` reads too.
    let toolchain = std::fs::read_to_string(toolchain_file)
        .with_context(|| format!("reading {toolchain_file}"))?;
    let toolchain = toolchain.trim();
    let package = aya_build::Package {
        name: "gateway-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(toolchain)).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install \
         the pinned nightly (file ebpf-toolchain), its rust-src component and bpf-linker",
    )
}
