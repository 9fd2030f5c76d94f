//! The live map page and its libraries, and the API explorer's (Swagger UI), embedded in the
//! binary at build time (`build.rs` installs the libraries from the npm registry into
//! `OUT_DIR`), so the pages need nothing but the engine.

use actix_web::http::header;
use actix_web::HttpResponse;

use super::Routes;

pub(super) struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:literal, $file:literal) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/", $file)),
        }
    };
}

/// The pages' own files, from the source tree.
static PAGE: &[Asset] = &[
    asset!("/", "text/html; charset=utf-8", "static/index.html"),
    asset!(
        "/static/app.js",
        "text/javascript; charset=utf-8",
        "static/app.js"
    ),
    asset!(
        "/static/app.css",
        "text/css; charset=utf-8",
        "static/app.css"
    ),
    // The API explorer (`/api/docs`, see `openapi.rs`); Swagger UI itself is in web/vendor.rs.
    asset!(
        "/api/docs/explorer.js",
        "text/javascript; charset=utf-8",
        "static/explorer.js"
    ),
];

/// The npm files listed in `web/vendor.rs`, from where build.rs installed them (under `OUT_DIR`,
/// never the source tree: a checkout without `web/node_modules` builds too).
macro_rules! vendor_files {
    ($($url:literal, $content_type:literal, $file:literal;)*) => {
        &[$(Asset {
            path: $url,
            content_type: $content_type,
            body: include_bytes!(concat!(env!("OUT_DIR"), "/web/node_modules/", $file)),
        }),*]
    };
}
static VENDOR: &[Asset] = include!("../../web/vendor.rs");

/// Every embedded file: the pages' own and the npm ones.
pub(super) fn assets() -> impl Iterator<Item = &'static Asset> {
    PAGE.iter().chain(VENDOR)
}

/// Whether `path` is one of the page's own files (open to anyone: it holds no data).
pub fn is_asset(path: &str) -> bool {
    assets().any(|asset| asset.path == path)
}

pub(super) fn routes(r: &mut Routes<'_>) {
    for asset in assets() {
        r.get(asset.path, move || async move { serve(asset) });
    }
}

fn serve(asset: &'static Asset) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, asset.content_type))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(asset.body)
}
