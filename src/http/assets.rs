//! The live map page and its libraries, and the API explorer's (Swagger UI), embedded in the
//! binary at build time (`build.rs` installs the libraries from the npm registry), so the pages
//! need nothing but the engine.

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

pub(super) static ASSETS: &[Asset] = &[
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
    asset!(
        "/vendor/leaflet/leaflet.js",
        "text/javascript; charset=utf-8",
        "node_modules/leaflet/dist/leaflet.js"
    ),
    asset!(
        "/vendor/leaflet/leaflet.css",
        "text/css; charset=utf-8",
        "node_modules/leaflet/dist/leaflet.css"
    ),
    asset!(
        "/vendor/leaflet/images/layers.png",
        "image/png",
        "node_modules/leaflet/dist/images/layers.png"
    ),
    asset!(
        "/vendor/leaflet/images/layers-2x.png",
        "image/png",
        "node_modules/leaflet/dist/images/layers-2x.png"
    ),
    asset!(
        "/vendor/leaflet/images/marker-icon.png",
        "image/png",
        "node_modules/leaflet/dist/images/marker-icon.png"
    ),
    asset!(
        "/vendor/leaflet/images/marker-icon-2x.png",
        "image/png",
        "node_modules/leaflet/dist/images/marker-icon-2x.png"
    ),
    asset!(
        "/vendor/leaflet/images/marker-shadow.png",
        "image/png",
        "node_modules/leaflet/dist/images/marker-shadow.png"
    ),
    asset!(
        "/vendor/geoman/leaflet-geoman.js",
        "text/javascript; charset=utf-8",
        "node_modules/@geoman-io/leaflet-geoman-free/dist/leaflet-geoman.js"
    ),
    asset!(
        "/vendor/geoman/leaflet-geoman.css",
        "text/css; charset=utf-8",
        "node_modules/@geoman-io/leaflet-geoman-free/dist/leaflet-geoman.css"
    ),
    asset!(
        "/vendor/topojson-client/topojson-client.min.js",
        "text/javascript; charset=utf-8",
        "node_modules/topojson-client/dist/topojson-client.min.js"
    ),
    asset!(
        "/vendor/world-atlas/countries-110m.json",
        "application/json",
        "node_modules/world-atlas/countries-110m.json"
    ),
    // The API explorer (`/api/docs`, see `openapi.rs`).
    asset!(
        "/api/docs/explorer.js",
        "text/javascript; charset=utf-8",
        "static/explorer.js"
    ),
    asset!(
        "/api/docs/swagger-ui-bundle.js",
        "text/javascript; charset=utf-8",
        "node_modules/swagger-ui-dist/swagger-ui-bundle.js"
    ),
    asset!(
        "/api/docs/swagger-ui.css",
        "text/css; charset=utf-8",
        "node_modules/swagger-ui-dist/swagger-ui.css"
    ),
    asset!(
        "/api/docs/favicon-32x32.png",
        "image/png",
        "node_modules/swagger-ui-dist/favicon-32x32.png"
    ),
];

/// Whether `path` is one of the page's own files (open to anyone: it holds no data).
pub fn is_asset(path: &str) -> bool {
    ASSETS.iter().any(|asset| asset.path == path)
}

pub(super) fn routes(r: &mut Routes<'_>) {
    for asset in ASSETS {
        r.get(asset.path, move || async move { serve(asset) });
    }
}

fn serve(asset: &'static Asset) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, asset.content_type))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(asset.body)
}
