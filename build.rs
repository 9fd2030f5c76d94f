//! Installs the map page's third-party libraries (Leaflet, leaflet-geoman, world-atlas,
//! topojson-client) and the API explorer's (swagger-ui-dist) from the npm registry into
//! `$OUT_DIR/web/node_modules`, so that the binary can embed them: the pages load nothing from
//! outside the engine. `--ignore-scripts` also keeps swagger-ui-dist's dependency `@scarf/scarf`
//! from running its install script (which reports the install over the network).
//!
//! They go under `OUT_DIR`, not into the source tree: the installed files belong to the build
//! that embeds them. Checkouts sharing a `CARGO_TARGET_DIR` share this directory (cargo gives a
//! path package the same `OUT_DIR` whatever its location), so the script never trusts that it
//! ran before: it checks that every embedded file is there, installed from this checkout's lock
//! file, and installs again otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// The files `src/http/assets.rs` embeds, under `node_modules` (the list is shared with it).
macro_rules! vendor_files {
    ($($url:literal, $content_type:literal, $file:literal;)*) => {
        &[$($file),*]
    };
}
const VENDOR_FILES: &[&str] = include!("web/vendor.rs");

/// Which lock file the packages under `OUT_DIR` were installed from (a copy of it).
const STAMP: &str = "installed-from.package-lock.json";

fn main() {
    let started = SystemTime::now();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("web");
    println!("cargo:rerun-if-changed=web/package.json");
    println!("cargo:rerun-if-changed=web/package-lock.json");
    println!("cargo:rerun-if-changed=web/vendor.rs");
    let modules = out.join("node_modules");
    // A deleted (or never installed) file makes cargo run this script again.
    for file in VENDOR_FILES {
        println!("cargo:rerun-if-changed={}", modules.join(file).display());
    }

    let lock = read(&source.join("package-lock.json"));
    let installed = std::fs::read(out.join(STAMP)).ok();
    if installed.as_deref() == Some(lock.as_slice()) && missing(&modules).is_empty() {
        return;
    }
    install(&source, &out, &lock);
    let missing = missing(&modules);
    if !missing.is_empty() {
        panic!(
            "`npm ci` in {} did not install {missing:?}: web/package.json and web/vendor.rs \
             disagree",
            out.display()
        );
    }
    // npm dates the files it writes now, after cargo noted when this script started: cargo would
    // take them for changed and run it (and rebuild the crate) once more on the next build.
    // Dated just before the start instead, they are still newer than anything built before.
    let before = started - Duration::from_secs(1);
    for file in VENDOR_FILES {
        let path = modules.join(file);
        let dated = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(before));
        if let Err(e) = dated {
            println!("cargo:warning=dating {}: {e}", path.display());
        }
    }
}

/// The embedded files that are not installed under `modules`.
fn missing(modules: &Path) -> Vec<&'static str> {
    VENDOR_FILES
        .iter()
        .copied()
        .filter(|file| !modules.join(file).is_file())
        .collect()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn write(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()))
}

/// `npm ci` with this checkout's package.json and lock file copied to `out`.
fn install(source: &Path, out: &Path, lock: &[u8]) {
    std::fs::create_dir_all(out).unwrap_or_else(|e| panic!("creating {}: {e}", out.display()));
    // Not stamped until the install succeeded.
    let _ = std::fs::remove_file(out.join(STAMP));
    write(
        &out.join("package.json"),
        &read(&source.join("package.json")),
    );
    write(&out.join("package-lock.json"), lock);
    let status = Command::new("npm")
        .args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--loglevel=error",
            // The lock file pins every version and its hash: a cached copy is as good as a
            // download (and lets the Dockerfile warm the cache in a layer of its own).
            "--prefer-offline",
        ])
        .current_dir(out)
        .status();
    match status {
        Ok(s) if s.success() => write(&out.join(STAMP), lock),
        Ok(s) => panic!(
            "`npm ci` in {} failed ({s}); the map page needs its npm packages",
            out.display()
        ),
        Err(e) => panic!(
            "cannot run npm ({e}): the map page's libraries come from the npm registry. \
             Install Node.js and npm (Debian: apt-get install -y nodejs npm) and build again"
        ),
    }
}
