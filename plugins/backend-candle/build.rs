//! With the `cuda` feature, keeps the CUDA driver library (libcuda.so.1) among the plugin's
//! dependencies. cudarc calls the driver API directly; when the link sees a stub libcuda.so
//! without symbols (a toolkit on a machine with no driver, as scripts/build-cuda.sh sets up),
//! `--as-needed` drops it, and the plugin then fails to load on the GPU machine with an
//! undefined `cu*` symbol.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-cdylib-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-cdylib-link-arg=-lcuda");
    }
}
