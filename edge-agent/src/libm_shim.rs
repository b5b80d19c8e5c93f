//! The C math library's `pow`, defined in the agent itself so that the agent does not load glibc's libm at all.
//!
//! `pow` is the one libm function left in the agent (tokio's multi-threaded scheduler, which wasmtime-wasi's
//! blocking calls pull in, smooths poll times with `f64::powf`; the agent's own trigonometry, and h3o's, use the
//! `libm` crate: see shared/Cargo.toml). Loading libm costs about 330 KiB of an idle agent's RSS whatever it
//! imports: the loader runs the resolver of each of libm's own CPU-dispatched functions. With `pow` defined here
//! the linker finds no reference to libm and, linking as needed, leaves it out. `tests::pow_is_the_c_pow` checks
//! the values; `scripts/test-targets.sh` checks that the release agent needs no libm.

/// `double pow(double, double)`: LLVM lowers `f64::powf` to a call to this symbol.
#[allow(unsafe_code)] // `no_mangle` is unsafe only because two definitions of one symbol would clash at link time.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    /// The libm crate's `pow` (a port of musl's) agrees with the C library's on the cases that matter, including
    /// the IEEE special cases.
    #[test]
    fn pow_is_the_c_pow() {
        let cases: &[(f64, f64, f64)] = &[
            (2.0, 10.0, 1024.0),
            (0.5, 3.0, 0.125),
            (9.0, 0.5, 3.0),
            (1.0, f64::NAN, 1.0),
            (f64::NAN, 0.0, 1.0),
            (0.0, -1.0, f64::INFINITY),
            (-8.0, 1.0 / 3.0, f64::NAN),
        ];
        for &(x, y, want) in cases {
            let got = std::hint::black_box(x).powf(std::hint::black_box(y));
            assert!(
                got == want || (got.is_nan() && want.is_nan()),
                "{x}^{y} = {got}, want {want}"
            );
            let ours = super::pow(x, y);
            assert!(
                ours == want || (ours.is_nan() && want.is_nan()),
                "pow({x}, {y}) = {ours}"
            );
        }
    }
}
