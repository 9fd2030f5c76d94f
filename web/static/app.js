/* fleetwatch live map.
 *
 * Plain browser script, no build step. Expects the globals `L` (Leaflet 1.9 + leaflet-geoman)
 * and `topojson` (topojson-client), all served by the engine under /vendor/.
 * Talks to the engine's HTTP API (docs/api.md): REST for the initial state, server-sent events
 * (/api/stream) for live updates.
 *
 * For automation, `window.fleetwatch` exposes { map, markers, zones, devices, ranges, state }.
 *
 * Access (docs/api.md, "Access control"): when /api/config says a scope needs a token, or any call
 * answers 401/403, the page asks for a token in a small form, keeps it in sessionStorage and sends
 * it as `Authorization: Bearer` on every fetch. EventSource cannot send headers, so the stream is
 * opened with a short-lived ticket from POST /api/stream/tickets instead; the token itself never
 * goes into a URL.
 */
(function () {
  'use strict';

  // ------------------------------------------------------------------------------------------
  // Constants

  const STREAM_TYPES = [
    'DeviceRegistered', 'ReadingRecorded',
    'LeftZone', 'EnteredZone', 'TemperatureOutOfRange', 'TemperatureBackInRange',
    'ZoneDefined', 'ZoneRemoved', 'TemperatureRangeDefined', 'TemperatureRangeRemoved',
  ];
  const ALARM_TYPES = new Set(['LeftZone', 'EnteredZone', 'TemperatureOutOfRange', 'TemperatureBackInRange']);
  const STATUS_COLOURS = {
    normal: '#2563eb',
    out_of_zone: '#f59e0b',
    temperature_alarm: '#dc2626',
  };
  const STATUS_LABELS = {
    normal: 'normal',
    out_of_zone: 'out of zone',
    temperature_alarm: 'temperature alarm',
  };
  const ZONE_STYLE = { color: '#7c3aed', weight: 2, opacity: 0.9, fillColor: '#7c3aed', fillOpacity: 0.08 };
  const PENDING_STYLE = { color: '#7c3aed', weight: 2, dashArray: '6 4', fillColor: '#7c3aed', fillOpacity: 0.15 };
  const MAX_FEED = 200;
  const MARKER_RADIUS = 6;
  const HIGHLIGHT_MS = 4000;
  const RECREATE_DELAY_MS = 3000;
  const OPEN_WAIT_MS = 3000;

  // ------------------------------------------------------------------------------------------
  // Small helpers

  const $ = (sel) => document.querySelector(sel);

  function esc(value) {
    return String(value ?? '').replace(/[&<>"']/g, (c) => ({
      '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
    }[c]));
  }

  function pad(n) { return String(n).padStart(2, '0'); }

  /** Local date-time "YYYY-MM-DD HH:MM:SS" (the date is left out when `short` and it is today). */
  function fmtTime(iso, short) {
    if (!iso) return '—';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    const date = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    if (short) {
      const now = new Date();
      if (d.toDateString() === now.toDateString()) return time;
      return `${date.slice(5)} ${time}`;
    }
    return `${date} ${time}`;
  }

  function fmtCoord(v) { return typeof v === 'number' ? v.toFixed(5) : '—'; }
  function fmtTemp(v) { return typeof v === 'number' ? `${v.toFixed(1)} °C` : '—'; }
  function fmtDistance(m) {
    if (typeof m !== 'number') return '';
    return m >= 1000 ? `${(m / 1000).toFixed(1)} km` : `${Math.round(m)} m`;
  }

  function parseList(text) {
    const items = String(text || '').split(',').map((s) => s.trim()).filter(Boolean);
    return items.length ? items : null;
  }

  function toast(message, kind) {
    const box = $('#toasts');
    const el = document.createElement('div');
    el.className = `toast ${kind || ''}`;
    el.textContent = message;
    box.appendChild(el);
    setTimeout(() => el.remove(), kind === 'error' ? 8000 : 4000);
  }

  class ApiError extends Error {
    constructor(status, body) {
      const msg = (body && body.error) ? body.error : `HTTP ${status}`;
      super(body && body.field ? `${msg} (field: ${body.field})` : msg);
      this.status = status;
      this.body = body;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Access token

  const TOKEN_KEY = 'fleetwatch.token';
  const auth = {
    required: { read: false, ingest: false, admin: false }, // from /api/config
    token: sessionStorage.getItem(TOKEN_KEY),
    pending: null, // { promise, resolve } while the prompt is shown
  };

  /**
   * Shows the token form (once, however many calls wait on it); resolves with the new token, or
   * rejects when the user cancels.
   */
  function askToken(message) {
    $('#auth-message').textContent = message;
    if (!auth.pending) {
      let resolve;
      let reject;
      const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
      auth.pending = { promise, resolve, reject };
      $('#auth-panel').hidden = false;
      const input = $('#auth-token');
      input.value = '';
      input.focus();
    }
    return auth.pending.promise;
  }

  $('#auth-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = $('#auth-token').value.trim();
    if (!token || !auth.pending) return;
    auth.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    $('#auth-panel').hidden = true;
    const { resolve } = auth.pending;
    auth.pending = null;
    resolve(token);
  });

  $('#auth-cancel').addEventListener('click', () => {
    if (!auth.pending) return;
    $('#auth-panel').hidden = true;
    const { reject } = auth.pending;
    auth.pending = null;
    reject(new Error('no access token given'));
  });

  async function api(method, path, body) {
    const init = { method, headers: { Accept: 'application/json' } };
    if (auth.token) init.headers.Authorization = `Bearer ${auth.token}`;
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new Error(`cannot reach the engine (${e.message})`);
    }
    if (res.status === 204) return null;
    const text = await res.text();
    let json = null;
    if (text) {
      try { json = JSON.parse(text); } catch (_) { json = null; }
    }
    if (res.status === 401 || res.status === 403) {
      // Ask for a (better) token, then try again with it; cancelling gives the refusal.
      const why = (json && json.error) || res.statusText;
      if (method === 'GET') auth.required.read = true; // so the stream asks for a ticket too
      try {
        await askToken(res.status === 401
          ? `The engine needs an access token (${why}).`
          : `This needs a token with more rights (${why}): ${method} ${path}.`);
      } catch (_) {
        throw new ApiError(res.status, json || { error: why });
      }
      return api(method, path, body);
    }
    if (!res.ok) throw new ApiError(res.status, json || { error: text || res.statusText });
    return json;
  }

  // ------------------------------------------------------------------------------------------
  // State

  /** device_id -> { device_id, version, last_reading, outside_zones:Set, temperature_alarms:Map(range_id->bound) } */
  const devices = new Map();
  /** device_id -> L.CircleMarker */
  const markers = new Map();
  /** zone_id -> L.Layer (L.Polygon / L.Circle / L.Rectangle) with `.fwZone` = the zone JSON */
  const zones = new Map();
  /** range_id -> range JSON */
  const ranges = new Map();

  const state = {
    lastEventId: null,     // highest event position seen on the stream
    connection: 'connecting',
    loaded: false,         // initial REST load finished
    buffered: [],          // stream events received before the initial load finished
    pendingZone: null,     // { layer, shape } drawn but not yet saved
    popupDevice: null,     // device id whose popup is open
  };

  // ------------------------------------------------------------------------------------------
  // Map

  const map = L.map('map', {
    center: [30, 10],
    zoom: 2,
    minZoom: 2,
    worldCopyJump: true,
    zoomControl: true,
  });
  map.attributionControl.setPrefix('<a href="https://leafletjs.com">Leaflet</a>');

  // Countries go below tiles (tilePane is 200) so a configured tile layer covers them.
  map.createPane('countries');
  map.getPane('countries').style.zIndex = 150;
  map.getPane('countries').style.pointerEvents = 'none';

  // Device markers above zones.
  map.createPane('devices');
  map.getPane('devices').style.zIndex = 450;
  const deviceRenderer = L.svg({ pane: 'devices' });

  async function loadBaseLayer() {
    try {
      const topo = await api('GET', '/vendor/world-atlas/countries-110m.json');
      const countries = topojson.feature(topo, topo.objects.countries);
      L.geoJSON(countries, {
        pane: 'countries',
        interactive: false,
        pmIgnore: true,
        snapIgnore: true,
        style: { color: '#9aa5b1', weight: 0.8, fillColor: '#f4f1ea', fillOpacity: 1 },
      }).addTo(map);
      map.attributionControl.addAttribution('Borders: Natural Earth');
    } catch (e) {
      toast(`Could not load the country outlines: ${e.message}`, 'error');
    }
  }

  async function loadConfig() {
    try {
      const config = await api('GET', '/api/config');
      if (config && config.auth) auth.required = { ...auth.required, ...config.auth };
      if (config && config.tile_url) {
        L.tileLayer(config.tile_url, {
          maxZoom: 19,
          pmIgnore: true,
          attribution: config.tile_attribution || '',
        }).addTo(map);
      }
    } catch (e) {
      // Not fatal: the offline base layer is there.
      console.warn('GET /api/config failed', e);
    }
  }

  // Legend
  const legend = L.control({ position: 'bottomleft' });
  legend.onAdd = function () {
    const div = L.DomUtil.create('div', 'legend');
    div.innerHTML = Object.keys(STATUS_COLOURS)
      .map((s) => `<div><i style="background:${STATUS_COLOURS[s]}"></i>${esc(STATUS_LABELS[s])}</div>`)
      .join('') + '<div><i style="background:rgba(124,58,237,.25);border-color:#7c3aed;border-radius:2px"></i>watch zone</div>';
    return div;
  };
  legend.addTo(map);

  // "Fit everything" button
  const FitControl = L.Control.extend({
    options: { position: 'topleft' },
    onAdd() {
      const div = L.DomUtil.create('div', 'leaflet-bar fit-control');
      const a = L.DomUtil.create('a', '', div);
      a.href = '#';
      a.id = 'fit-all';
      a.title = 'Show all devices and zones';
      a.setAttribute('role', 'button');
      a.innerHTML = '&#x2922;';
      L.DomEvent.disableClickPropagation(div);
      L.DomEvent.on(a, 'click', (e) => { L.DomEvent.preventDefault(e); fitAll(); });
      return div;
    },
  });
  map.addControl(new FitControl());

  function fitAll() {
    let bounds = null;
    const extend = (b) => {
      if (!b || !b.isValid()) return;
      bounds = bounds ? bounds.extend(b) : L.latLngBounds(b.getSouthWest(), b.getNorthEast());
    };
    for (const layer of zones.values()) extend(layer.getBounds());
    for (const m of markers.values()) {
      const ll = m.getLatLng();
      extend(L.latLngBounds(ll, ll));
    }
    if (!bounds) return false;
    if (bounds.getNorthEast().equals(bounds.getSouthWest())) {
      map.setView(bounds.getCenter(), 12);
    } else {
      map.fitBounds(bounds, { padding: [40, 40], maxZoom: 14 });
    }
    return true;
  }

  // ------------------------------------------------------------------------------------------
  // Devices

  const watches = (rule, deviceId) => !rule || !Array.isArray(rule.devices) || rule.devices.includes(deviceId);

  /** The status rule of docs/api.md: only alarms of zones/ranges that exist and watch the device count. */
  function statusOf(dev) {
    for (const rid of dev.temperature_alarms.keys()) {
      if (ranges.has(rid) && watches(ranges.get(rid), dev.device_id)) return 'temperature_alarm';
    }
    for (const zid of dev.outside_zones) {
      if (zones.has(zid) && watches(zones.get(zid).fwZone, dev.device_id)) return 'out_of_zone';
    }
    return 'normal';
  }

  function deviceFromApi(d) {
    const alarms = new Map();
    for (const a of d.temperature_alarms || []) alarms.set(a.range_id, a.bound);
    return {
      device_id: d.device_id,
      version: d.version || 0,
      last_reading: d.last_reading ? { ...d.last_reading } : null,
      outside_zones: new Set(d.outside_zones || []),
      temperature_alarms: alarms,
      server_status: d.status,
    };
  }

  function markerStyle(status) {
    const colour = STATUS_COLOURS[status] || STATUS_COLOURS.normal;
    return { color: '#ffffff', weight: 1.5, fillColor: colour, fillOpacity: 0.95 };
  }

  const dirtyDevices = new Set();
  let flushTimer = null;

  /** Marker updates are batched so a busy stream doesn't re-render per event. */
  function markDirty(id) {
    dirtyDevices.add(id);
    if (!flushTimer) flushTimer = setTimeout(flushDevices, 50);
  }

  /** A rule changed (e.g. the devices it watches): recompute every marker's status. */
  function markAllDevicesDirty() {
    if (!state.loaded) return;
    for (const id of devices.keys()) dirtyDevices.add(id);
    if (!flushTimer) flushTimer = setTimeout(flushDevices, 50);
  }

  function flushDevices() {
    flushTimer = null;
    for (const id of dirtyDevices) renderDevice(id);
    dirtyDevices.clear();
    scheduleStats();
  }

  function renderDevice(id) {
    const dev = devices.get(id);
    let marker = markers.get(id);
    if (!dev || !dev.last_reading) {
      if (marker) { marker.remove(); markers.delete(id); }
      return;
    }
    const ll = [dev.last_reading.lat, dev.last_reading.lon];
    const status = statusOf(dev);
    if (!marker) {
      marker = L.circleMarker(ll, {
        ...markerStyle(status),
        radius: MARKER_RADIUS,
        className: 'device-marker',
        renderer: deviceRenderer,
        pane: 'devices',
        pmIgnore: true,
        snapIgnore: true,
      });
      marker.deviceId = id;
      marker.status = status;
      marker.bindTooltip(id, { direction: 'top', offset: [0, -6] });
      marker.on('click', () => openDevicePopup(id));
      marker.addTo(map);
      markers.set(id, marker);
      if (awaitingFirstDevice) fitToFirstDevices();
    } else {
      const cur = marker.getLatLng();
      if (cur.lat !== ll[0] || cur.lng !== ll[1]) marker.setLatLng(ll);
      if (marker.status !== status) {
        marker.setStyle(markerStyle(status));
        marker.status = status;
      }
    }
    if (marker._path) {
      marker._path.setAttribute('data-device', id);
      marker._path.setAttribute('data-status', status);
    }
  }

  function highlightDevice(id) {
    const marker = markers.get(id);
    if (!marker) return;
    marker.setRadius(MARKER_RADIUS * 2);
    marker.bringToFront();
    if (marker._path) {
      marker._path.classList.remove('pulse');
      void marker._path.getBoundingClientRect(); // restart the animation
      marker._path.classList.add('pulse');
    }
    clearTimeout(marker._fwHighlightTimer);
    marker._fwHighlightTimer = setTimeout(() => {
      marker.setRadius(MARKER_RADIUS);
      if (marker._path) marker._path.classList.remove('pulse');
    }, HIGHLIGHT_MS);
  }

  function upsertDeviceFromApi(d) {
    const existing = devices.get(d.device_id);
    if (existing && existing.last_reading && existing.version >= (d.version || 0)) return; // not newer
    devices.set(d.device_id, deviceFromApi(d));
    markDirty(d.device_id);
  }

  /** device id -> stream events that arrived while its state was being fetched */
  const fetchingDevices = new Map();
  /** Get the authoritative state of a device we don't know (or lost track of). */
  async function refetchDevice(id, ev) {
    if (fetchingDevices.has(id)) {
      if (ev) fetchingDevices.get(id).push(ev);
      return;
    }
    fetchingDevices.set(id, ev ? [ev] : []);
    try {
      upsertDeviceFromApi(await api('GET', `/api/devices/${encodeURIComponent(id)}`));
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) console.warn(`GET device ${id} failed`, e);
    } finally {
      const missed = fetchingDevices.get(id);
      fetchingDevices.delete(id);
      // Events newer than the fetched state are applied; older ones are skipped by version.
      if (devices.has(id)) for (const e of missed) applyEvent(e, true);
    }
  }

  async function loadDevices() {
    let after = null;
    for (;;) {
      const q = new URLSearchParams({ limit: '1000' });
      if (after !== null) q.set('after', after);
      const page = await api('GET', `/api/devices?${q}`);
      for (const d of page.devices || []) {
        // A device whose stored history is damaged is listed with an error instead of a state.
        if (d.error) { console.warn(`device ${d.device_id}: ${d.error}`); continue; }
        upsertDeviceFromApi(d);
      }
      if (page.next_after === null || page.next_after === undefined || !(page.devices || []).length) break;
      after = page.next_after;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Device popup

  let popupRefreshTimer = null;
  let popupSeq = 0;
  const devicePopup = L.popup({ maxWidth: 360, minWidth: 260, autoPanPadding: [30, 30] });
  devicePopup.on('remove', () => { state.popupDevice = null; });

  function refreshDevicePopupSoon(id) {
    clearTimeout(popupRefreshTimer);
    popupRefreshTimer = setTimeout(() => {
      if (state.popupDevice === id) loadDevicePopup(id);
    }, 500);
  }

  function openDevicePopup(id) {
    const marker = markers.get(id);
    if (!marker) return;
    state.popupDevice = id;
    devicePopup
      .setLatLng(marker.getLatLng())
      .setContent(`<div class="fw-popup"><h3>${esc(id)}</h3><p class="muted">Loading…</p></div>`)
      .openOn(map);
    state.popupDevice = id;
    loadDevicePopup(id);
  }

  function describeEvent(ev) {
    const d = ev.data || {};
    const zoneName = (zid) => {
      const z = zones.get(zid);
      return z && z.fwZone.name ? `${z.fwZone.name}` : zid;
    };
    const rangeName = (rid) => {
      const r = ranges.get(rid);
      return r && r.name ? r.name : rid;
    };
    switch (ev.type) {
      case 'DeviceRegistered':
        return `registered at ${fmtCoord(d.location && d.location.lat)}, ${fmtCoord(d.location && d.location.lon)}, ${fmtTemp(d.temperature)}`;
      case 'ReadingRecorded':
        return `${d.late ? 'late reading' : 'reading'} ${fmtCoord(d.location && d.location.lat)}, ${fmtCoord(d.location && d.location.lon)}, ${fmtTemp(d.temperature)}`;
      case 'LocationChanged':
        return `moved ${fmtDistance(d.distance_m)}`;
      case 'TemperatureChanged':
        return `temperature ${fmtTemp(d.from)} → ${fmtTemp(d.to)}`;
      case 'LeftZone':
        return `${d.found_outside ? 'found outside' : 'left'} zone ${zoneName(d.zone_id)}`;
      case 'EnteredZone':
        return `entered zone ${zoneName(d.zone_id)}`;
      case 'TemperatureOutOfRange':
        return `temperature ${fmtTemp(d.temperature)} ${d.bound === 'below' ? 'below' : 'above'} range ${rangeName(d.range_id)} (limit ${fmtTemp(d.limit)})`;
      case 'TemperatureBackInRange':
        return `temperature back in range ${rangeName(d.range_id)} (${fmtTemp(d.temperature)})`;
      default:
        return '';
    }
  }

  async function loadDevicePopup(id) {
    const seq = ++popupSeq;
    let html;
    try {
      const dev = await api('GET', `/api/devices/${encodeURIComponent(id)}`);
      const from = Math.max(1, (dev.version || 1) - 9);
      const evs = await api('GET', `/api/devices/${encodeURIComponent(id)}/events?from_version=${from}&limit=10`);
      upsertDeviceFromApi(dev);
      const r = dev.last_reading || {};
      const events = (evs.events || []).slice().reverse();
      const zoneNames = (dev.outside_zones || []).map((z) => esc(zones.get(z) && zones.get(z).fwZone.name ? zones.get(z).fwZone.name : z));
      const alarms = (dev.temperature_alarms || []).map((a) => `${esc(ranges.get(a.range_id) && ranges.get(a.range_id).name ? ranges.get(a.range_id).name : a.range_id)} (${esc(a.bound)})`);
      html = `<div class="fw-popup" data-device="${esc(id)}">
        <h3>${esc(id)} <span class="badge status-${esc(dev.status)}">${esc(STATUS_LABELS[dev.status] || dev.status)}</span></h3>
        <table>
          <tr><th>Position</th><td>${fmtCoord(r.lat)}, ${fmtCoord(r.lon)}</td></tr>
          <tr><th>Temperature</th><td>${fmtTemp(r.temperature)}</td></tr>
          <tr><th>Reading at</th><td title="${esc(r.timestamp)}">${esc(fmtTime(r.timestamp))}</td></tr>
          <tr><th>Status</th><td>${esc(dev.status)}</td></tr>
          ${zoneNames.length ? `<tr><th>Outside</th><td>${zoneNames.join(', ')}</td></tr>` : ''}
          ${alarms.length ? `<tr><th>Temp. alarms</th><td>${alarms.join(', ')}</td></tr>` : ''}
          <tr><th>Version</th><td>${esc(dev.version)}</td></tr>
        </table>
        <ul class="events">
          ${events.map((ev) => `<li><span class="ev-at">${esc(fmtTime(ev.data && ev.data.at, true))}</span><span class="ev-type">${esc(ev.type)}</span> <span class="ev-desc">${esc(describeEvent(ev))}</span></li>`).join('') || '<li class="muted">No events</li>'}
        </ul>
      </div>`;
    } catch (e) {
      html = `<div class="fw-popup"><h3>${esc(id)}</h3><p class="form-error">${esc(e.message)}</p></div>`;
    }
    if (seq !== popupSeq || state.popupDevice !== id) return;
    const marker = markers.get(id);
    if (marker) devicePopup.setLatLng(marker.getLatLng());
    devicePopup.setContent(html);
  }

  // ------------------------------------------------------------------------------------------
  // Zones

  function shapeToLayer(shape, style) {
    switch (shape.type) {
      case 'circle':
        return L.circle([shape.center.lat, shape.center.lon], { ...style, radius: shape.radius_m });
      case 'rectangle':
        return L.rectangle([
          [shape.south_west.lat, shape.south_west.lon],
          [shape.north_east.lat, shape.north_east.lon],
        ], style);
      case 'polygon': {
        let pts = shape.points.map((p) => [p.lat, p.lon]);
        // Stored closed: drop the repeated last vertex for Leaflet.
        if (pts.length > 3) {
          const a = pts[0];
          const b = pts[pts.length - 1];
          if (a[0] === b[0] && a[1] === b[1]) pts = pts.slice(0, -1);
        }
        return L.polygon(pts, style);
      }
      default:
        throw new Error(`unknown zone shape ${shape.type}`);
    }
  }

  const round = (v) => Math.round(v * 1e7) / 1e7;
  const pt = (ll) => {
    const w = L.latLng(ll).wrap();
    return { lat: round(w.lat), lon: round(w.lng) };
  };

  /** Shape JSON (docs/api.md) of a Leaflet layer drawn or edited with geoman. */
  function layerToShape(layer, hint) {
    const kind = hint || (layer instanceof L.Circle ? 'circle' : layer instanceof L.Rectangle ? 'rectangle' : 'polygon');
    if (kind === 'circle' || kind === 'Circle') {
      return { type: 'circle', center: pt(layer.getLatLng()), radius_m: Math.round(layer.getRadius() * 100) / 100 };
    }
    if (kind === 'rectangle' || kind === 'Rectangle') {
      const b = layer.getBounds();
      return { type: 'rectangle', south_west: pt(b.getSouthWest()), north_east: pt(b.getNorthEast()) };
    }
    let latlngs = layer.getLatLngs();
    while (Array.isArray(latlngs[0])) latlngs = latlngs[0]; // outer ring
    return { type: 'polygon', points: latlngs.map(pt) };
  }

  function zoneTitle(z) { return z.name || z.id; }

  function describeShape(s) {
    if (!s) return '';
    if (s.type === 'circle') return `circle, ${fmtDistance(s.radius_m)} radius`;
    if (s.type === 'rectangle') return 'rectangle';
    if (s.type === 'polygon') {
      const n = s.points.length;
      const closed = n > 3 && s.points[0].lat === s.points[n - 1].lat && s.points[0].lon === s.points[n - 1].lon;
      return `polygon, ${closed ? n - 1 : n} vertices`;
    }
    return s.type;
  }

  function describeDevices(list) {
    if (!list || list.length === 0) return 'all devices';
    if (list.length <= 3) return list.join(', ');
    return `${list.slice(0, 3).join(', ')} +${list.length - 3}`;
  }

  function zonePopupHtml(z) {
    return `<div class="fw-popup" data-zone="${esc(z.id)}">
      <h3>${esc(zoneTitle(z))}</h3>
      <table>
        <tr><th>Id</th><td>${esc(z.id)}</td></tr>
        <tr><th>Shape</th><td>${esc(describeShape(z.shape))}</td></tr>
        <tr><th>Watches</th><td>${esc(describeDevices(z.devices))}</td></tr>
        ${z.revision !== undefined ? `<tr><th>Revision</th><td>${esc(z.revision)}</td></tr>` : ''}
      </table>
      <div class="popup-actions">
        <button type="button" class="btn btn-small btn-danger zone-delete" data-zone="${esc(z.id)}">Delete zone</button>
      </div>
    </div>`;
  }

  function sameShape(a, b) { return JSON.stringify(a) === JSON.stringify(b); }

  /**
   * Draw (or redraw) a zone. Rules events are "set"/"remove" operations, so applying them in
   * stream order (also those buffered during the initial load) always ends at the current state.
   */
  function upsertZone(z) {
    const existing = zones.get(z.id);
    if (existing) {
      if (sameShape(existing.fwZone.shape, z.shape)) {
        // Geometry unchanged (e.g. the echo of our own edit): keep the layer, update metadata.
        existing.fwZone = { ...z };
        existing.setPopupContent(zonePopupHtml(existing.fwZone));
        existing.setTooltipContent(esc(zoneTitle(z)));
        scheduleLists();
        return;
      }
      existing.remove();
      zones.delete(z.id);
    }
    let layer;
    try {
      layer = shapeToLayer(z.shape, ZONE_STYLE);
    } catch (e) {
      console.warn('cannot draw zone', z, e);
      return;
    }
    layer.fwZone = { ...z };
    layer.bindPopup(() => zonePopupHtml(layer.fwZone), { minWidth: 220 });
    layer.bindTooltip(esc(zoneTitle(z)), { permanent: true, direction: 'center', className: 'zone-label', opacity: 0.9 });
    layer.on('pm:edit', () => saveZoneGeometry(layer));
    layer.on('pm:remove', () => deleteZone(layer.fwZone.id, layer));
    layer.addTo(map);
    layer.bringToBack();
    zones.set(z.id, layer);
    if (map.pm.globalEditModeEnabled() && layer.pm) layer.pm.enable();
    scheduleLists();
  }

  function removeZone(id) {
    const layer = zones.get(id);
    if (!layer) return;
    layer.remove();
    zones.delete(id);
    // A removed zone no longer watches anyone (status rule in docs/api.md).
    for (const dev of devices.values()) {
      if (dev.outside_zones.delete(id)) markDirty(dev.device_id);
    }
    scheduleLists();
  }

  async function loadZones() {
    const list = await api('GET', '/api/zones');
    const seen = new Set();
    for (const z of list || []) {
      seen.add(z.id);
      upsertZone(z);
    }
    for (const id of [...zones.keys()]) if (!seen.has(id)) removeZone(id);
  }

  async function saveZoneGeometry(layer) {
    const z = layer.fwZone;
    const shape = layerToShape(layer);
    if (sameShape(shape, z.shape)) return;
    const body = { id: z.id, shape, devices: z.devices ?? null };
    if (z.name !== undefined && z.name !== null) body.name = z.name;
    try {
      const saved = await api('PUT', `/api/zones/${encodeURIComponent(z.id)}`, body);
      if (saved && saved.shape) {
        // Keep the drawn layer; adopt the stored zone (revision, closed ring, ...).
        layer.fwZone = saved;
        layer.setPopupContent(zonePopupHtml(saved));
      } else {
        layer.fwZone = { ...z, shape };
      }
      toast(`Zone “${zoneTitle(z)}” updated`);
      scheduleLists();
    } catch (e) {
      toast(`Could not update zone “${zoneTitle(z)}”: ${e.message}`, 'error');
      // Put the stored geometry back.
      layer.remove();
      zones.delete(z.id);
      upsertZone(z);
    }
  }

  async function deleteZone(id, layerAlreadyRemoved) {
    const layer = zones.get(id);
    const z = layer ? layer.fwZone : { id };
    try {
      await api('DELETE', `/api/zones/${encodeURIComponent(id)}`);
      removeZone(id);
      toast(`Zone “${zoneTitle(z)}” deleted`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) { removeZone(id); return; }
      toast(`Could not delete zone “${zoneTitle(z)}”: ${e.message}`, 'error');
      if (layerAlreadyRemoved && layer && !map.hasLayer(layer)) layer.addTo(map);
    }
  }

  // Popup delete buttons (zone popups are re-rendered, so delegate).
  map.on('popupopen', (e) => {
    const btn = e.popup.getElement() && e.popup.getElement().querySelector('.zone-delete');
    if (!btn) return;
    btn.addEventListener('click', () => {
      const id = btn.getAttribute('data-zone');
      map.closePopup();
      deleteZone(id);
    });
  });

  // ---- drawing new zones with geoman ----

  map.pm.setGlobalOptions({
    pathOptions: PENDING_STYLE,
    templineStyle: { color: '#7c3aed' },
    hintlineStyle: { color: '#7c3aed', dashArray: [5, 5] },
    snapDistance: 10,
  });
  map.pm.addControls({
    position: 'topleft',
    drawMarker: false,
    drawCircleMarker: false,
    drawPolyline: false,
    drawText: false,
    drawPolygon: true,
    drawCircle: true,
    drawRectangle: true,
    editMode: true,
    dragMode: true,
    cutPolygon: false,
    rotateMode: false,
    removalMode: true,
  });

  map.on('pm:create', (e) => {
    const layer = e.layer;
    if (state.pendingZone) state.pendingZone.layer.remove();
    const shapeName = { Polygon: 'polygon', Circle: 'circle', Rectangle: 'rectangle' }[e.shape] || 'polygon';
    // Pending shapes must not be treated as stored zones by edit/removal modes.
    layer.setStyle(PENDING_STYLE);
    state.pendingZone = { layer, shape: shapeName };
    $('#zone-panel-shape').textContent = `${shapeName} zone`;
    $('#zone-error').textContent = '';
    $('#zone-panel').hidden = false;
    const input = $('#zone-name');
    input.value = '';
    $('#zone-devices').value = '';
    input.focus();
  });

  function closeZonePanel() {
    if (state.pendingZone) state.pendingZone.layer.remove();
    state.pendingZone = null;
    $('#zone-panel').hidden = true;
    $('#zone-error').textContent = '';
  }

  $('#zone-cancel').addEventListener('click', closeZonePanel);

  $('#zone-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const pending = state.pendingZone;
    if (!pending) { closeZonePanel(); return; }
    const name = $('#zone-name').value.trim();
    if (!name) { $('#zone-error').textContent = 'Give the zone a name.'; return; }
    const body = { name, shape: layerToShape(pending.layer, pending.shape), devices: parseList($('#zone-devices').value) };
    const btn = $('#zone-save');
    btn.disabled = true;
    try {
      const saved = await api('POST', '/api/zones', body);
      if (state.pendingZone === pending) {
        pending.layer.remove();
        state.pendingZone = null;
        $('#zone-panel').hidden = true;
      }
      if (saved && saved.id) upsertZone(saved);
      toast(`Zone “${name}” saved`);
    } catch (err) {
      $('#zone-error').textContent = err.message;
    } finally {
      btn.disabled = false;
    }
  });

  // A pending (unsaved) shape deleted with the removal tool: just close the panel.
  map.on('pm:remove', (e) => {
    if (state.pendingZone && e.layer === state.pendingZone.layer) {
      state.pendingZone = null;
      $('#zone-panel').hidden = true;
    }
  });

  // ------------------------------------------------------------------------------------------
  // Temperature ranges

  function upsertRange(r) {
    ranges.set(r.id, { ...r });
    markAllDevicesDirty();
    scheduleLists();
  }

  function removeRange(id) {
    if (!ranges.has(id)) return;
    ranges.delete(id);
    for (const dev of devices.values()) {
      if (dev.temperature_alarms.delete(id)) markDirty(dev.device_id);
    }
    scheduleLists();
  }

  async function loadRanges() {
    const list = await api('GET', '/api/temperature-ranges');
    const seen = new Set();
    for (const r of list || []) { seen.add(r.id); upsertRange(r); }
    for (const id of [...ranges.keys()]) if (!seen.has(id)) removeRange(id);
  }

  $('#range-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const err = $('#range-error');
    err.textContent = '';
    const name = $('#range-name').value.trim();
    const minText = $('#range-min').value.trim();
    const maxText = $('#range-max').value.trim();
    const min = Number(minText);
    const max = Number(maxText);
    if (minText === '' || maxText === '' || !Number.isFinite(min) || !Number.isFinite(max)) {
      err.textContent = 'min and max must be numbers';
      return;
    }
    const body = { min, max, devices: parseList($('#range-devices').value) };
    if (name) body.name = name;
    const btn = $('#range-save');
    btn.disabled = true;
    try {
      const saved = await api('POST', '/api/temperature-ranges', body);
      if (saved && saved.id) upsertRange(saved);
      $('#range-name').value = '';
      $('#range-min').value = '';
      $('#range-max').value = '';
      $('#range-devices').value = '';
      toast(`Range “${name || saved.id}” saved`);
    } catch (ex) {
      err.textContent = ex.message;
    } finally {
      btn.disabled = false;
    }
  });

  async function deleteRange(id) {
    const r = ranges.get(id);
    try {
      await api('DELETE', `/api/temperature-ranges/${encodeURIComponent(id)}`);
      removeRange(id);
      toast(`Range “${(r && r.name) || id}” deleted`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) { removeRange(id); return; }
      toast(`Could not delete range “${(r && r.name) || id}”: ${e.message}`, 'error');
    }
  }

  // ------------------------------------------------------------------------------------------
  // Sidebar lists and header stats (re-rendered at most a few times per second)

  let listsTimer = null;
  function scheduleLists() {
    if (!listsTimer) listsTimer = setTimeout(renderLists, 100);
  }

  function renderLists() {
    listsTimer = null;
    // Devices outside each zone.
    const outside = new Map();
    for (const dev of devices.values()) {
      for (const zid of dev.outside_zones) outside.set(zid, (outside.get(zid) || 0) + 1);
    }
    const zoneList = $('#zone-list');
    const sortedZones = [...zones.values()].map((l) => l.fwZone)
      .sort((a, b) => zoneTitle(a).localeCompare(zoneTitle(b)));
    zoneList.innerHTML = sortedZones.map((z) => {
      const n = outside.get(z.id) || 0;
      return `<li data-zone="${esc(z.id)}">
        <span class="swatch swatch-zone"></span>
        <div class="item-main clickable" data-action="zoom-zone" title="Show on map">
          <div class="item-title">${esc(zoneTitle(z))}</div>
          <div class="item-sub">${esc(describeShape(z.shape))} · ${esc(describeDevices(z.devices))}${n ? ` · <b style="color:#b45309">${n} outside</b>` : ''}</div>
        </div>
        <button type="button" class="btn btn-small btn-danger" data-action="delete-zone" title="Delete zone">Delete</button>
      </li>`;
    }).join('') || '<li class="empty">No zones yet.</li>';
    $('#zone-count').textContent = String(zones.size);

    const inAlarm = new Map();
    for (const dev of devices.values()) {
      for (const rid of dev.temperature_alarms.keys()) inAlarm.set(rid, (inAlarm.get(rid) || 0) + 1);
    }
    const rangeList = $('#range-list');
    const sortedRanges = [...ranges.values()].sort((a, b) => (a.name || a.id).localeCompare(b.name || b.id));
    rangeList.innerHTML = sortedRanges.map((r) => {
      const n = inAlarm.get(r.id) || 0;
      return `<li data-range="${esc(r.id)}">
        <span class="swatch swatch-range"></span>
        <div class="item-main">
          <div class="item-title">${esc(r.name || r.id)}</div>
          <div class="item-sub">${esc(r.min)} … ${esc(r.max)} °C · ${esc(describeDevices(r.devices))}${n ? ` · <b style="color:#b91c1c">${n} in alarm</b>` : ''}</div>
        </div>
        <button type="button" class="btn btn-small btn-danger" data-action="delete-range" title="Delete range">Delete</button>
      </li>`;
    }).join('') || '<li class="empty">No temperature ranges yet.</li>';
    $('#range-count').textContent = String(ranges.size);
  }

  $('#zone-list').addEventListener('click', (e) => {
    const li = e.target.closest('li[data-zone]');
    if (!li) return;
    const id = li.getAttribute('data-zone');
    const action = e.target.closest('[data-action]');
    if (!action) return;
    if (action.dataset.action === 'delete-zone') {
      deleteZone(id);
    } else if (action.dataset.action === 'zoom-zone') {
      const layer = zones.get(id);
      if (layer) {
        map.fitBounds(layer.getBounds(), { padding: [40, 40], maxZoom: 16 });
        layer.openPopup();
      }
    }
  });

  $('#range-list').addEventListener('click', (e) => {
    const btn = e.target.closest('[data-action="delete-range"]');
    if (!btn) return;
    deleteRange(btn.closest('li[data-range]').getAttribute('data-range'));
  });

  let statsTimer = null;
  function scheduleStats() {
    if (!statsTimer) statsTimer = setTimeout(renderStats, 250);
  }
  function renderStats() {
    statsTimer = null;
    let out = 0;
    let temp = 0;
    for (const dev of devices.values()) {
      const s = statusOf(dev);
      if (s === 'out_of_zone') out += 1;
      else if (s === 'temperature_alarm') temp += 1;
    }
    $('#stat-devices').textContent = String(devices.size);
    $('#stat-out').textContent = String(out);
    $('#stat-temp').textContent = String(temp);
    scheduleLists();
  }

  // ------------------------------------------------------------------------------------------
  // Alarm feed

  const feedPositions = new Set();

  /** One entry per alarm event received on the stream (de-duplicated by store position). */
  function addAlarmEntry(ev) {
    if (feedPositions.has(ev.position)) return;
    feedPositions.add(ev.position);
    if (feedPositions.size > 4 * MAX_FEED) {
      const keep = [...feedPositions].slice(-2 * MAX_FEED);
      feedPositions.clear();
      for (const pos of keep) feedPositions.add(pos);
    }
    const d = ev.data || {};
    const raised = ev.type === 'LeftZone' || ev.type === 'TemperatureOutOfRange';
    const temp = ev.type === 'TemperatureOutOfRange' || ev.type === 'TemperatureBackInRange';
    const li = document.createElement('li');
    li.className = `alarm-entry fresh ${raised ? 'raised' : 'cleared'} ${temp ? 'kind-temp' : 'kind-zone'}`;
    li.setAttribute('data-device', d.device_id);
    li.setAttribute('data-type', ev.type);
    li.setAttribute('data-position', String(ev.position));
    if (d.zone_id) li.setAttribute('data-zone', d.zone_id);
    if (d.range_id) li.setAttribute('data-range', d.range_id);
    li.title = `${ev.type} · event ${ev.position} · ${d.at || ''}`;
    const time = document.createElement('span');
    time.className = 'alarm-time';
    time.textContent = fmtTime(d.at, true);
    const dev = document.createElement('span');
    dev.className = 'alarm-device';
    dev.textContent = d.device_id;
    const what = document.createElement('span');
    what.className = 'alarm-what';
    what.textContent = describeEvent(ev);
    li.append(time, dev, what);
    const feed = $('#alarm-feed');
    feed.insertBefore(li, feed.firstChild);
    while (feed.children.length > MAX_FEED) feed.lastChild.remove();
    $('#alarm-count').textContent = String(feed.children.length);
    $('#alarm-empty').hidden = true;
  }

  $('#alarm-feed').addEventListener('click', (e) => {
    const li = e.target.closest('.alarm-entry');
    if (!li) return;
    const id = li.getAttribute('data-device');
    const marker = markers.get(id);
    if (!marker) { toast(`Device ${id} has no known position`); return; }
    map.setView(marker.getLatLng(), Math.max(map.getZoom(), 12));
    highlightDevice(id);
    openDevicePopup(id);
  });

  // ------------------------------------------------------------------------------------------
  // Applying stream events

  function applyEvent(ev, replayed) {
    if (!ev || !ev.type) return;
    // A damaged stored event arrives with its stored text as `data`: nothing to apply.
    if (typeof ev.data === 'string') { console.warn(`damaged stored event at ${ev.position}`); return; }
    const d = ev.data || {};

    if (ev.stream === '$rules' || ev.type.startsWith('Zone') || ev.type.startsWith('TemperatureRange')) {
      switch (ev.type) {
        case 'ZoneDefined': if (d.zone) { upsertZone(d.zone); markAllDevicesDirty(); } break;
        case 'ZoneRemoved': removeZone(d.zone_id); break;
        case 'TemperatureRangeDefined': if (d.range) upsertRange(d.range); break;
        case 'TemperatureRangeRemoved': removeRange(d.range_id); break;
        default: break;
      }
      return;
    }

    const id = d.device_id || ev.stream;
    const alarm = ALARM_TYPES.has(ev.type);
    const raised = ev.type === 'LeftZone' || ev.type === 'TemperatureOutOfRange';
    // Every alarm that reaches us happened after the page subscribed: it belongs in the feed even
    // when the state loaded from the REST API already includes it.
    if (alarm) addAlarmEntry(ev);
    if (fetchingDevices.has(id)) { refetchDevice(id, ev); return; }
    let dev = devices.get(id);
    if (!dev) {
      if (ev.type !== 'DeviceRegistered') {
        // We missed its registration (or it predates our load): ask for the full state.
        refetchDevice(id, ev);
        return;
      }
      dev = deviceFromApi({ device_id: id, version: 0 });
      devices.set(id, dev);
    }
    if (typeof ev.version === 'number' && ev.version <= dev.version) {
      // Already in the state we loaded.
      if (raised && !replayed) { flushDevices(); highlightDevice(id); }
      return;
    }
    if (typeof ev.version === 'number') dev.version = ev.version;

    const reading = dev.last_reading || (dev.last_reading = {});
    switch (ev.type) {
      case 'DeviceRegistered':
        if (d.location) { reading.lat = d.location.lat; reading.lon = d.location.lon; }
        if (typeof d.temperature === 'number') reading.temperature = d.temperature;
        reading.timestamp = d.at;
        break;
      case 'ReadingRecorded':
        // A late reading is history only: the device's live state does not move.
        if (d.late) break;
        if (d.location) { reading.lat = d.location.lat; reading.lon = d.location.lon; }
        if (typeof d.temperature === 'number') reading.temperature = d.temperature;
        reading.timestamp = d.at;
        break;
      case 'LocationChanged':
        if (d.to) { reading.lat = d.to.lat; reading.lon = d.to.lon; }
        reading.timestamp = d.at;
        break;
      case 'TemperatureChanged':
        reading.temperature = d.to;
        reading.timestamp = d.at;
        break;
      case 'LeftZone':
        dev.outside_zones.add(d.zone_id);
        break;
      case 'EnteredZone':
        dev.outside_zones.delete(d.zone_id);
        break;
      case 'TemperatureOutOfRange':
        dev.temperature_alarms.set(d.range_id, d.bound);
        break;
      case 'TemperatureBackInRange':
        dev.temperature_alarms.delete(d.range_id);
        break;
      default:
        break;
    }
    if (reading.lat === undefined) {
      // No position yet (e.g. only a temperature event seen): fetch the full state.
      dev.last_reading = null;
      dev.version = 0;
      refetchDevice(id);
      return;
    }
    markDirty(id);
    if (state.popupDevice === id) refreshDevicePopupSoon(id);
    if (raised) {
      flushDevices(); // the marker must exist (and have its new colour) before it is highlighted
      highlightDevice(id);
    }
  }

  function onStreamMessage(msg) {
    let ev;
    try {
      ev = JSON.parse(msg.data);
    } catch (e) {
      console.warn('bad stream message', msg.data);
      return;
    }
    if (!ev.type && msg.type && msg.type !== 'message') ev.type = msg.type;
    const pos = typeof ev.position === 'number' ? ev.position : Number(msg.lastEventId);
    if (Number.isFinite(pos) && (state.lastEventId === null || pos > state.lastEventId)) state.lastEventId = pos;
    if (!state.loaded) {
      state.buffered.push(ev);
      return;
    }
    applyEvent(ev);
  }

  // ------------------------------------------------------------------------------------------
  // Connection (EventSource)

  let source = null;
  let recreateTimer = null;

  function setConnection(s) {
    state.connection = s;
    const el = $('#connection-state');
    el.textContent = s;
    el.className = `state-${s}`;
  }

  /** The stream's URL; with a fresh ticket when reading needs a token (EventSource sends no headers). */
  async function streamUrl(since) {
    const q = new URLSearchParams({ types: STREAM_TYPES.join(',') });
    if (since !== null && since !== undefined) q.set('since', String(since));
    if (auth.required.read) {
      const { ticket } = await api('POST', '/api/stream/tickets');
      q.set('ticket', ticket);
    }
    return `/api/stream?${q.toString().replace(/%2C/g, ',')}`;
  }

  /** Opens the stream; resolves once it is open (or after a timeout). */
  async function connect(since) {
    let url;
    try {
      url = await streamUrl(since);
    } catch (e) {
      // No ticket (the engine is unreachable): try again later, as after a lost stream.
      setConnection('reconnecting');
      clearTimeout(recreateTimer);
      recreateTimer = setTimeout(recreate, RECREATE_DELAY_MS);
      return;
    }
    return new Promise((resolve) => {
      let settled = false;
      const done = () => { if (!settled) { settled = true; resolve(); } };
      setTimeout(done, OPEN_WAIT_MS);

      if (source) source.close();
      const es = new EventSource(url);
      source = es;
      es.onopen = () => {
        if (source !== es) return;
        setConnection('connected');
        done();
      };
      es.onerror = () => {
        if (source !== es) return;
        if (es.readyState === EventSource.CLOSED) {
          // The browser gave up (e.g. the engine answered with an error, such as 401 for an
          // expired ticket after a reconnect): start over later, with a new ticket.
          setConnection('reconnecting');
          es.close();
          clearTimeout(recreateTimer);
          recreateTimer = setTimeout(recreate, RECREATE_DELAY_MS);
        } else {
          // The browser reconnects by itself and sends Last-Event-ID.
          setConnection('reconnecting');
        }
        done();
      };
      for (const type of STREAM_TYPES) es.addEventListener(type, onStreamMessage);
      // Unnamed events, should the engine ever send them.
      es.onmessage = onStreamMessage;
    });
  }

  async function recreate() {
    if (state.lastEventId !== null) {
      await connect(state.lastEventId);
    } else {
      // Nothing seen yet, so nothing to resume from: reload the whole state.
      state.loaded = false;
      state.buffered = [];
      await connect(null);
      await loadAll();
    }
  }

  // ------------------------------------------------------------------------------------------
  // Start-up

  async function loadAll() {
    try {
      // Zones and ranges first so device events can name them.
      await Promise.all([loadZones(), loadRanges()]);
      await loadDevices();
    } catch (e) {
      toast(`Could not load the current state: ${e.message}`, 'error');
    }
    state.loaded = true;
    const buffered = state.buffered;
    state.buffered = [];
    for (const ev of buffered) applyEvent(ev, true);
    flushDevices();
    renderLists();
  }

  // The first fit to the fleet must not undo a user who already panned or zoomed.
  let userMovedMap = false;
  // A page opened on an empty fleet fits to the first devices once they appear.
  let awaitingFirstDevice = false;
  function fitToFirstDevices() {
    awaitingFirstDevice = false;
    // Give the rest of the first wave a moment to arrive.
    setTimeout(() => { if (!userMovedMap) fitAll(); }, 1000);
  }
  map.on('dragstart', () => { userMovedMap = true; });
  map.getContainer().addEventListener('wheel', () => { userMovedMap = true; }, { passive: true });

  async function start() {
    loadBaseLayer();
    // The settings say whether a token is needed before anything is read.
    await loadConfig();
    if (auth.required.read && !auth.token) {
      await askToken('This engine needs an access token to show the fleet.').catch(() => {});
    }
    // Subscribe first, then load: events in between are buffered and applied after the load
    // (device events skipped by per-device version, rules events replayed in order), so nothing
    // is lost or applied twice.
    await connect(null);
    await loadAll();
    if (!userMovedMap && !fitAll()) map.setView([30, 10], 2);
    awaitingFirstDevice = markers.size === 0;
  }

  window.addEventListener('beforeunload', () => { if (source) source.close(); });

  window.fleetwatch = { map, markers, zones, devices, ranges, state, fitAll, highlightDevice, openDevicePopup };

  renderLists();
  start();
})();
