// The npm files the engine embeds and serves, one line each: URL path, content type, path under
// `node_modules`. One list for two readers, each of which defines `vendor_files!` for itself:
// build.rs checks these files are installed (and installs the packages again when one is not);
// src/http/assets.rs embeds them. Add a file here, not in either of them.
vendor_files! {
    "/vendor/leaflet/leaflet.js", "text/javascript; charset=utf-8", "leaflet/dist/leaflet.js";
    "/vendor/leaflet/leaflet.css", "text/css; charset=utf-8", "leaflet/dist/leaflet.css";
    "/vendor/leaflet/images/layers.png", "image/png", "leaflet/dist/images/layers.png";
    "/vendor/leaflet/images/layers-2x.png", "image/png", "leaflet/dist/images/layers-2x.png";
    "/vendor/leaflet/images/marker-icon.png", "image/png", "leaflet/dist/images/marker-icon.png";
    "/vendor/leaflet/images/marker-icon-2x.png", "image/png", "leaflet/dist/images/marker-icon-2x.png";
    "/vendor/leaflet/images/marker-shadow.png", "image/png", "leaflet/dist/images/marker-shadow.png";
    "/vendor/geoman/leaflet-geoman.js", "text/javascript; charset=utf-8",
        "@geoman-io/leaflet-geoman-free/dist/leaflet-geoman.js";
    "/vendor/geoman/leaflet-geoman.css", "text/css; charset=utf-8",
        "@geoman-io/leaflet-geoman-free/dist/leaflet-geoman.css";
    "/vendor/topojson-client/topojson-client.min.js", "text/javascript; charset=utf-8",
        "topojson-client/dist/topojson-client.min.js";
    "/vendor/world-atlas/countries-110m.json", "application/json", "world-atlas/countries-110m.json";
    "/vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8", "uplot/dist/uPlot.iife.min.js";
    "/vendor/uplot/uPlot.min.css", "text/css; charset=utf-8", "uplot/dist/uPlot.min.css";
    "/api/docs/swagger-ui-bundle.js", "text/javascript; charset=utf-8",
        "swagger-ui-dist/swagger-ui-bundle.js";
    "/api/docs/swagger-ui.css", "text/css; charset=utf-8", "swagger-ui-dist/swagger-ui.css";
    "/api/docs/favicon-32x32.png", "image/png", "swagger-ui-dist/favicon-32x32.png";
}
