//! Installs the map page's third-party libraries (Leaflet, leaflet-geoman, world-atlas,
//! topojson-client) and the API explorer's (swagger-ui-dist) from the npm registry into
//! `web/node_modules`, so that the binary can embed them: the pages load nothing from outside the
//! engine. `--ignore-scripts` also keeps swagger-ui-dist's dependency `@scarf/scarf` from running
//! its install script (which reports the install over the network).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=web/package.json");
    println!("cargo:rerun-if-changed=web/package-lock.json");
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    let lock = web.join("package-lock.json");
    let installed = web.join("node_modules/.package-lock.json");
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    if matches!((modified(&installed), modified(&lock)), (Some(i), Some(l)) if i >= l) {
        return;
    }
    let status = Command::new("npm")
        .args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--loglevel=error",
        ])
        .current_dir(&web)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "`npm ci` in {} failed ({s}); the map page needs its npm packages",
            web.display()
        ),
        Err(e) => panic!(
            "cannot run npm ({e}): the map page's libraries come from the npm registry. \
             Install Node.js and npm (Debian: apt-get install -y nodejs npm) and build again"
        ),
    }
}
