//! Dev tool: converts Natural Earth's 1:110m countries (public domain) into the console's basemap SVG, once.
//! The shapefile comes from the PyPI wheel `geopandas==0.14.4` (`geopandas/datasets/naturalearth_lowres/`):
//!
//! ```text
//! pip download --no-deps geopandas==0.14.4 && unzip -o geopandas-0.14.4-py3-none-any.whl -d gp
//! cargo run -p flotilla-fleet-tests --bin make-basemap -- gp/geopandas/datasets/naturalearth_lowres/naturalearth_lowres.shp \
//!     hub/src/console/static/world-110m.svg
//! ```
//!
//! Projection (the console's `map.rs` uses the same): equirectangular, x = lon + 180, y = 84 - lat, a 360 x 144
//! box from 84 N to 60 S; rings wholly south of 60 S (Antarctica) are left out. Coordinates at 0.1 degree.

use anyhow::{Context, Result, bail};
use std::fmt::Write as _;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, shp, out] = args.as_slice() else {
        bail!("usage: make-basemap NATURALEARTH_LOWRES.shp OUT.svg");
    };
    let mut reader =
        shapefile::ShapeReader::from_path(shp).with_context(|| format!("opening {shp}"))?;
    let mut paths = String::new();
    let (mut countries, mut rings) = (0, 0);
    for shape in reader.iter_shapes_as::<shapefile::Polygon>() {
        let polygon = shape.context("reading a country's polygon")?;
        let mut d = String::new();
        for ring in polygon.rings() {
            let pts = ring.points();
            if pts.iter().all(|p| p.y < -60.0) {
                continue;
            }
            for (i, p) in pts.iter().enumerate() {
                let (x, y) = (p.x + 180.0, (84.0 - p.y).min(144.0));
                let _ = write!(d, "{}{:.1} {:.1}", if i == 0 { "M" } else { "L" }, x, y);
            }
            d.push('Z');
            rings += 1;
        }
        if !d.is_empty() {
            let _ = writeln!(paths, "<path d=\"{d}\"/>");
            countries += 1;
        }
    }
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 360 144\" width=\"360\" height=\"144\">\n\
         <!-- Natural Earth 1:110m countries (public domain, naturalearthdata.com), via geopandas 0.14.4's \
         naturalearth_lowres; converted by tests/src/bin/make_basemap.rs. -->\n\
         <g fill=\"#e3e7ec\" stroke=\"#b9c0ca\" stroke-width=\"0.15\" stroke-linejoin=\"round\">\n{paths}</g>\n</svg>\n"
    );
    std::fs::write(out, &svg).with_context(|| format!("writing {out}"))?;
    println!(
        "{countries} countries, {rings} rings, {} bytes -> {out}",
        svg.len()
    );
    Ok(())
}
