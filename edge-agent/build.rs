//! Link settings that shrink the agent's resident memory on gateways (ARCHITECTURE.md, "Agent binary layout").
//!
//! An idle agent's RSS is mostly its own executable, mapped from the page cache: the kernel maps the 64 KiB around
//! every page it touches, and in a link where the code run at start and in the idle loop lies scattered among code
//! that never runs, nearly the whole `.text` ends up resident. Two linker settings fix what can be fixed there:
//!
//! - packed relative relocations (`DT_RELR`, glibc >= 2.36; x86_64): the loader reads a few KiB of bitmap instead
//!   of ~330 KiB of `R_*_RELATIVE` entries at every start;
//! - a symbol ordering file (`link-order/<target>[.precompiled-only].txt`, written by
//!   `scripts/gen-agent-link-order.sh` from what the agent runs while it starts, enrolls, idles and runs a
//!   workload), so that code is laid out together at the start of `.text`. Only LLD reads it (rustc's default
//!   linker on x86_64 Linux); names that no longer exist (a dependency or the toolchain changed) are skipped and
//!   cost only memory, which `scripts/test-targets.sh` checks.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=FLOTILLA_LINK_ORDER");
    println!("cargo:rerun-if-env-changed=FLOTILLA_LINK_MAP");
    let var = |name: &str| env::var(name).unwrap_or_default();
    // x86_64 only: the cross builds link with Debian's GNU ld 2.40, which packs relocations only for x86 (it
    // ignores the flag with a warning elsewhere).
    if var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    // One file per agent: symbol names carry hashes of each crate's features, which differ between the two.
    let variant = if env::var_os("CARGO_FEATURE_COMPILER").is_some() {
        ""
    } else {
        ".precompiled-only"
    };
    let order = PathBuf::from(var("CARGO_MANIFEST_DIR"))
        .join("link-order")
        .join(format!("{}{variant}.txt", var("TARGET")));
    println!("cargo:rerun-if-changed={}", order.display());
    // Release builds only: a debug build's symbols differ (other hashes, no inlining), so the file would not apply.
    if var("PROFILE") == "release" && order.is_file() && var("FLOTILLA_LINK_ORDER") != "0" {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
    }
    // The link map names every input section and symbol by address even when the binary is stripped; the order
    // generator maps the addresses the stripped binary runs back to symbols with it. Symbol names carry hashes of
    // the build settings (stripping among them), so the order is taken from exactly the build that ships.
    let map = var("FLOTILLA_LINK_MAP");
    if !map.is_empty() {
        println!("cargo:rustc-link-arg-bins=-Wl,-Map={map}");
        // Mangled, as the ordering file must name them (LLD's map demangles by default).
        println!("cargo:rustc-link-arg-bins=-Wl,--no-demangle");
    }
}
