//! Writes the `image_verify` target's canonical tarball into its corpus, so mutations start from a tarball the
//! check accepts: `cargo run --bin seed_image_verify` (in `shared/fuzz`).

#[path = "image_sample.rs"]
mod image_sample;

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new("corpus/image_verify");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("canonical.tar"), &image_sample::sample().0)
}
