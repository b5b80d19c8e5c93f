//! Compiles the Sparkplug B payload definition (`proto/sparkplug_b.proto`) into Rust with prost, through protox (a
//! protobuf compiler in Rust), so a build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/sparkplug_b.proto");
    let fds = protox::compile(["proto/sparkplug_b.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
