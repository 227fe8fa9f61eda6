//! The gateway's privileged user-space side: loading and attaching the
//! kernel programs to a cgroup, pinning the maps the Envoy module reads,
//! and reporting what is attached where.
//!
//! `unsafe` is denied everywhere except [`sys`], which wraps the two system
//! calls neither std nor nix provides.
#![deny(unsafe_code)]

pub mod addr;
pub mod bpffs;
pub mod cgroup;
pub mod config;
pub mod envoy_bootstrap;
pub mod exec;
pub mod gate;
pub mod instance;
pub mod kernel_log;
pub mod links;
pub mod loader;
pub mod privileges;
pub mod reaper;
pub mod reload;
pub mod run;
pub mod status;
pub mod supervisor;
#[allow(unsafe_code)]
pub mod sys;
