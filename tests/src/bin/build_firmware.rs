//! Build recipe for `firmware-images/`: compiles every `wat/*.wat` into `wasm/*.wasm` (the prebuilt modules that
//! are committed, embedded by `flotilla demo` and used by the fleet tests). Run:
//! `cargo run -p flotilla-fleet-tests --bin build-firmware`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    flotilla_fleet_tests::answer_help(
        "build-firmware: compiles firmware-images/wat/*.wat into firmware-images/wasm/*.wasm.\n\nUsage: build-firmware",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-images");
    std::fs::create_dir_all(root.join("wasm"))?;
    let mut entries: Vec<_> = std::fs::read_dir(root.join("wat"))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("wat") {
            continue;
        }
        let bytes = wat::parse_file(&path)?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("module");
        let out = root.join("wasm").join(format!("{stem}.wasm"));
        std::fs::write(&out, &bytes)?;
        println!(
            "{} -> {} ({} bytes)",
            path.display(),
            out.display(),
            bytes.len()
        );
    }
    Ok(())
}
