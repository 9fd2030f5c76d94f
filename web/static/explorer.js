// The API explorer at /api/docs: Swagger UI (from the npm package swagger-ui-dist, embedded in
// the engine) on the engine's own OpenAPI document. Nothing is loaded from anywhere else.
"use strict";

window.ui = SwaggerUIBundle({
  url: "/api/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  // Swagger UI would otherwise send the document to an online validator for its badge.
  validatorUrl: null,
  // The token given to "Authorize" stays in this page only (not in localStorage).
  persistAuthorization: false,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
