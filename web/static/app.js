/* fleetwatch live map.
 *
 * Plain browser script, no build step. Expects the globals `L` (Leaflet 1.9 + leaflet-geoman)
 * and `topojson` (topojson-client), all served by the engine under /vendor/.
 * Talks to the engine's HTTP API (docs/api.md): REST for the initial state, server-sent events
 * (/api/stream) for live updates.
 *
 * Devices are circle markers on one canvas (an L.Canvas renderer that paints them by writing
 * pixels, see DeviceCanvas): 10,000 devices moving once a second are repainted several times a
 * second, never one SVG element each. The canvas takes no pointer events; the page finds the
 * device under the pointer itself (`deviceAt`), so zones below stay clickable and editable. The
 * stream is read (fetch) and parsed in a worker, which hands the page a batch every 100 ms. A
 * device's panel charts its temperature buckets (uPlot) and draws its track; the fleet panel
 * shows /api/stats.
 *
 * For automation, `window.fleetwatch` exposes { map, markers, zones, devices, ranges, state,
 * markerState(id), devicePanel, fleet, perf, ... } (see the end of this file).
 *
 * Access (docs/api.md, "Access control"): when /api/config says a scope needs a token, or any call
 * answers 401/403, the page asks for a token in a small form, keeps it in sessionStorage and sends
 * it as `Authorization: Bearer` on every fetch of the page. The stream's reader (a worker, which
 * never sees the token) opens it with a short-lived ticket from POST /api/stream/tickets instead;
 * the token itself never goes into a URL.
 */
(function () {
  'use strict';

  // ------------------------------------------------------------------------------------------
  // Constants

  const STREAM_TYPES = [
    'DeviceRegistered', 'ReadingRecorded',
    'LeftZone', 'EnteredZone', 'TemperatureOutOfRange', 'TemperatureBackInRange',
    'ZoneDefined', 'ZoneRemoved', 'TemperatureRangeDefined', 'TemperatureRangeRemoved',
    'DeviceWentOffline', 'DeviceBackOnline',
    'AlarmOpened', 'AlarmAcknowledged', 'AlarmCleared',
  ];
  const ALARM_TYPES = new Set(['LeftZone', 'EnteredZone', 'TemperatureOutOfRange', 'TemperatureBackInRange', 'DeviceWentOffline', 'DeviceBackOnline']);
  /** The alarm changes (docs/api.md, "Alarms"): they keep the alarm list current. */
  const ALARM_CHANGE_TYPES = new Set(['AlarmOpened', 'AlarmAcknowledged', 'AlarmCleared']);
  const SEVERITY_RANK = { critical: 3, warning: 2, info: 1 };
  const KIND_LABELS = { outside_zone: 'outside zone', temperature_out_of_range: 'temperature out of range', offline: 'offline' };
  /** Pages of GET /api/alarms?state=active read at load, at most (ALARM_PAGE each). */
  const ALARM_PAGE = 1000;
  const ALARM_PAGES_MAX = 20;
  /** Alarm entries drawn in the list, at most (newest first); the counts cover them all. */
  const ALARM_LIST_MAX = 500;
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
  /** Shortest and longest time between two marker flushes (see flushDevices). */
  const FLUSH_MIN_MS = 50;
  const FLUSH_MAX_MS = 1000;
  /** Marker work (flush + canvas redraw) may take at most 1/FLUSH_SHARE of the main thread. */
  const FLUSH_SHARE = 6;
  /** Most markers created or moved in one flush; the rest follow in the next one. */
  const FLUSH_BATCH = 4000;
  /** How far (px) from a device's centre a click or hover still finds it. */
  const HIT_TOLERANCE = 4;
  /** Most readings drawn as a track, and the page size they are fetched in. */
  const TRACK_CAP = 5000;
  const TRACK_PAGE = 1000;
  const FLEET_REFRESH_MS = 5000;
  const TOP_REFRESH_MS = 15000;
  const PANEL_REFRESH_MS = 30000;
  const RANGES = { '1h': 3600, '6h': 6 * 3600, '24h': 86400, '7d': 7 * 86400, '30d': 30 * 86400 };
  const DEFAULT_BUCKET = { '1h': 'minute', '6h': 'minute', '24h': 'hour', '7d': 'hour', '30d': 'day', custom: 'hour' };
  const BUCKET_SECONDS = { minute: 60, hour: 3600, day: 86400 };

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

  // A device's track above zones, below the devices.
  map.createPane('tracks');
  map.getPane('tracks').style.zIndex = 420;
  const trackRenderer = L.svg({ pane: 'tracks' });

  // Page-side counters for tests and benchmarks (window.fleetwatch.perf).
  const perf = {
    streamEvents: 0,   // events received on the live stream
    flushes: 0,        // marker flushes
    flushedMarkers: 0, // markers created or updated by them
    lastFlushMs: 0,
    redraws: 0,        // canvas redraws of the devices
    lastRedrawMs: 0,
    flushGapMs: FLUSH_MIN_MS,
  };

  // Device markers above zones, all on one canvas that takes no pointer events (see deviceAt).
  map.createPane('devices');
  map.getPane('devices').style.zIndex = 450;
  map.getPane('devices').style.pointerEvents = 'none';
  /**
   * A device's circle, drawn once per colour, size and pixel ratio, kept as the list of its
   * pixels: the device canvas is painted by writing these into one ImageData (see DeviceCanvas).
   */
  const sprites = new Map();
  function markerSprite(fill, radius, stroke, weight, opacity, ratio) {
    const key = `${fill}|${radius}|${stroke}|${weight}|${opacity}|${ratio}`;
    let sprite = sprites.get(key);
    if (sprite) return sprite;
    const half = Math.ceil((radius + weight) * ratio) + 1;
    const size = 2 * half;
    const canvas = document.createElement('canvas');
    canvas.width = size;
    canvas.height = size;
    const ctx = canvas.getContext('2d', { willReadFrequently: true });
    ctx.scale(ratio, ratio);
    const c = half / ratio;
    ctx.beginPath();
    ctx.arc(c, c, radius, 0, Math.PI * 2);
    ctx.globalAlpha = opacity;
    ctx.fillStyle = fill;
    ctx.fill();
    if (weight > 0) {
      ctx.globalAlpha = 1;
      ctx.lineWidth = weight;
      ctx.strokeStyle = stroke;
      ctx.stroke();
    }
    const data = ctx.getImageData(0, 0, size, size).data;
    const words = new Uint32Array(data.buffer);
    // Its visible pixels: offset, the pixel as one word (RGBA in the platform's byte order) and
    // its opacity.
    const dx = []; const dy = []; const word = []; const alpha = [];
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        const a = data[(y * size + x) * 4 + 3];
        if (a === 0) continue;
        dx.push(x); dy.push(y); word.push(words[y * size + x]); alpha.push(a);
      }
    }
    sprite = {
      fill, radius, ratio, half, size, n: dx.length,
      dx: Int32Array.from(dx), dy: Int32Array.from(dy), word: Uint32Array.from(word), alpha: Uint8Array.from(alpha),
      offsets: null, offsetsWidth: 0, // dy * width + dx, for the canvas width last painted
    };
    sprites.set(key, sprite);
    return sprite;
  }

  /**
   * Leaflet's canvas renderer for the device markers, painting every marker in one pass: their
   * sprites' pixels are written into one ImageData, put on the canvas at once (markers cover each
   * other in draw order; their anti-aliased rims blend only with the map). 10,000 drawImage or
   * arc calls cost a software-rendered canvas (no GPU) several times as much, much of it in the
   * frame after the script. Every redraw repaints the whole canvas, so no redraw bounds are kept.
   * Redraws are timed (the script's part, and the frame it delays) so that flushes can be spaced
   * by what they cost.
   */
  const DeviceCanvas = L.Canvas.extend({
    _extendRedrawBounds() {},
    _clear() {},
    _draw() { this._paint(); },
    _redraw() {
      this._redrawRequest = null;
      this._redrawBounds = null;
      const t = performance.now();
      this._paint();
      const script = performance.now() - t;
      perf.redraws += 1;
      perf.lastRedrawMs = script;
      // The next frame comes once this one (and the canvas in it) is on screen.
      requestAnimationFrame(() => {
        perf.lastRedrawMs = Math.max(script, performance.now() - t - 1000 / 60);
      });
    },
    _paint() {
      const canvas = this._container;
      if (!canvas || !this._bounds || !this._ctx) return;
      const W = canvas.width;
      const H = canvas.height;
      if (!W || !H) return;
      let img = this._fwImage;
      if (!img || img.width !== W || img.height !== H) {
        img = new ImageData(W, H);
        this._fwImage = img;
        this._fwWords = new Uint32Array(img.data.buffer);
      }
      const px = this._fwWords;
      px.fill(0);
      const ratio = W / Math.max(1, this._bounds.getSize().x);
      const ox = this._bounds.min.x;
      const oy = this._bounds.min.y;
      for (let order = this._drawFirst; order; order = order.next) {
        const layer = order.layer;
        const p = layer._point;
        if (!p) continue;
        const o = layer.options;
        const radius = Math.max(1, Math.round(layer._radius));
        let sprite = layer._fwSprite;
        if (!sprite || sprite.fill !== o.fillColor || sprite.radius !== radius || sprite.ratio !== ratio) {
          sprite = markerSprite(o.fillColor, radius, o.color, o.weight, o.fillOpacity, ratio);
          layer._fwSprite = sprite;
        }
        const x0 = Math.round((p.x - ox) * ratio) - sprite.half;
        const y0 = Math.round((p.y - oy) * ratio) - sprite.half;
        const size = sprite.size;
        if (x0 >= W || y0 >= H || x0 + size <= 0 || y0 + size <= 0) continue;
        const { dx, dy, word, alpha, n } = sprite;
        // A pixel is written over what is there when it is mostly opaque; the anti-aliased rim
        // only over empty canvas (the map shows through it), never over another marker.
        if (x0 >= 0 && y0 >= 0 && x0 + size <= W && y0 + size <= H) {
          if (sprite.offsetsWidth !== W) {
            sprite.offsets = Int32Array.from(dx, (x, k) => dy[k] * W + x);
            sprite.offsetsWidth = W;
          }
          const off = sprite.offsets;
          const base = y0 * W + x0;
          for (let k = 0; k < n; k++) {
            const i = base + off[k];
            if (alpha[k] >= 128 || px[i] === 0) px[i] = word[k];
          }
        } else {
          for (let k = 0; k < n; k++) {
            const x = x0 + dx[k];
            const y = y0 + dy[k];
            if (x < 0 || y < 0 || x >= W || y >= H) continue;
            const i = y * W + x;
            if (alpha[k] >= 128 || px[i] === 0) px[i] = word[k];
          }
        }
      }
      this._ctx.putImageData(img, 0, 0);
    },
  });
  /**
   * A device's marker: a circle marker that keeps no pixel bounds (the renderer above repaints
   * everything, and finds no marker under the pointer: see deviceAt).
   */
  const DeviceMarker = L.CircleMarker.extend({
    _updateBounds() {},
    _empty() { return false; },
  });
  const deviceRenderer = new DeviceCanvas({ pane: 'devices' });
  /** Every marker is in this group (one place to add, remove and count them). */
  const deviceLayer = L.featureGroup([], { pane: 'devices' }).addTo(map);

  // The pulsing ring around a highlighted device: a few SVG elements at most.
  map.createPane('highlights');
  map.getPane('highlights').style.zIndex = 460;
  map.getPane('highlights').style.pointerEvents = 'none';
  const highlightRenderer = L.svg({ pane: 'highlights' });

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
    return { color: '#ffffff', weight: 1.5, fillColor: colour, fillOpacity: 1 };
  }

  const dirtyDevices = new Set();
  let flushTimer = null;

  /**
   * Marker updates are batched so a busy stream doesn't re-render per event: changed devices are
   * marked, and flushed together. A flush moves markers on the canvas, which then redraws once in
   * the next frame. Flushes are spaced by what the last one cost (flush plus redraw, times
   * FLUSH_SHARE, within FLUSH_MIN_MS..FLUSH_MAX_MS): a few devices move within 50 ms, 10,000
   * moving devices are redrawn a few times a second and leave the page most of its time.
   */
  function markDirty(id) {
    dirtyDevices.add(id);
    scheduleFlush();
  }

  function scheduleFlush() {
    if (!flushTimer) flushTimer = setTimeout(flushDevices, perf.flushGapMs);
  }

  /** A rule changed (e.g. the devices it watches): recompute every marker's status. */
  function markAllDevicesDirty() {
    if (!state.loaded) return;
    for (const id of devices.keys()) dirtyDevices.add(id);
    scheduleFlush();
  }

  /** Renders dirty devices now (`all`: every one of them, not just a batch). */
  function flushDevices(all) {
    clearTimeout(flushTimer);
    flushTimer = null;
    const started = performance.now();
    let n = 0;
    for (const id of dirtyDevices) {
      if (all !== true && n >= FLUSH_BATCH) break;
      dirtyDevices.delete(id);
      renderDevice(id);
      n += 1;
    }
    const cost = performance.now() - started;
    perf.flushes += 1;
    perf.flushedMarkers += n;
    perf.lastFlushMs = cost;
    perf.flushGapMs = Math.min(FLUSH_MAX_MS, Math.max(FLUSH_MIN_MS, FLUSH_SHARE * (cost + perf.lastRedrawMs)));
    if (dirtyDevices.size) scheduleFlush();
    scheduleStats();
  }

  function renderDevice(id) {
    const dev = devices.get(id);
    let marker = markers.get(id);
    if (!dev || !dev.last_reading) {
      if (marker) { deviceLayer.removeLayer(marker); markers.delete(id); }
      return;
    }
    const ll = [dev.last_reading.lat, dev.last_reading.lon];
    const status = statusOf(dev);
    if (!marker) {
      marker = new DeviceMarker(ll, {
        ...markerStyle(status),
        radius: MARKER_RADIUS,
        renderer: deviceRenderer,
        pane: 'devices',
        interactive: false, // see deviceAt
        pmIgnore: true,
        snapIgnore: true,
      });
      marker.deviceId = id;
      marker.status = status;
      deviceLayer.addLayer(marker);
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
    const ring = highlights.get(id);
    if (ring) ring.setLatLng(ll);
    if (devicePanel.deviceId === id) updatePanelStatus();
  }

  /** device id -> the pulsing SVG ring drawn around it while it is highlighted */
  const highlights = new Map();

  /**
   * Draws attention to a device for a few seconds: its marker grows and comes to the front, and
   * a pulsing ring (`path.device-highlight.pulse[data-device]`, SVG) is drawn around it.
   */
  function highlightDevice(id) {
    const marker = markers.get(id);
    if (!marker) return;
    marker.setRadius(MARKER_RADIUS * 2);
    marker.bringToFront();
    let ring = highlights.get(id);
    if (!ring) {
      ring = L.circleMarker(marker.getLatLng(), {
        radius: MARKER_RADIUS * 2 + 4,
        renderer: highlightRenderer,
        pane: 'highlights',
        className: 'device-highlight',
        color: STATUS_COLOURS[marker.status] || STATUS_COLOURS.normal,
        weight: 3,
        fill: false,
        interactive: false,
        pmIgnore: true,
        snapIgnore: true,
      }).addTo(map);
      highlights.set(id, ring);
    } else {
      ring.setStyle({ color: STATUS_COLOURS[marker.status] || STATUS_COLOURS.normal });
    }
    const path = ring.getElement();
    if (path) {
      path.setAttribute('data-device', id);
      path.classList.remove('pulse');
      void path.getBoundingClientRect(); // restart the animation
      path.classList.add('pulse');
    }
    clearTimeout(marker._fwHighlightTimer);
    marker._fwHighlightTimer = setTimeout(() => {
      marker.setRadius(MARKER_RADIUS);
      const r = highlights.get(id);
      if (r) { r.remove(); highlights.delete(id); }
    }, HIGHLIGHT_MS);
  }

  /** What the page shows for a device (for tests: canvas markers have no DOM element). */
  function markerState(id) {
    const m = markers.get(id);
    if (!m) return null;
    const ll = m.getLatLng();
    const p = map.latLngToContainerPoint(ll);
    const size = map.getSize();
    return {
      lat: ll.lat,
      lon: ll.lng,
      status: m.status,
      fill: m.options.fillColor,
      radius: m.getRadius(),
      highlighted: highlights.has(id),
      on_map: deviceLayer.hasLayer(m) && map.hasLayer(m),
      x: p.x,
      y: p.y,
      in_view: p.x >= 0 && p.y >= 0 && p.x <= size.x && p.y <= size.y,
    };
  }

  // ---- finding the device under the pointer (the canvas takes no pointer events) ----

  /** The id of the device drawn nearest to a container point, within its radius and a tolerance. */
  function deviceAt(containerPoint) {
    const lp = map.containerPointToLayerPoint(containerPoint);
    let best = null;
    let bestD2 = Infinity;
    for (const [id, m] of markers) {
      // `_point`: where the marker is drawn, in layer pixels (kept by Leaflet as it projects).
      const p = m._point || map.latLngToLayerPoint(m.getLatLng());
      const dx = p.x - lp.x;
      const dy = p.y - lp.y;
      const d2 = dx * dx + dy * dy;
      const r = m.getRadius() + HIT_TOLERANCE;
      if (d2 <= r * r && d2 < bestD2) { best = id; bestD2 = d2; }
    }
    return best;
  }

  /** Clicks go to the zones and the map as usual, unless they are on a device. */
  function pointerIsFree() {
    const pm = map.pm;
    return !(pm.globalDrawModeEnabled() || pm.globalEditModeEnabled() || pm.globalDragModeEnabled()
      || pm.globalRemovalModeEnabled() || (map.dragging && map.dragging.moved()));
  }

  const mapEl = map.getContainer();
  // Capture phase on the map's container: before Leaflet (and a zone below) sees the click.
  mapEl.addEventListener('click', (e) => {
    if (!pointerIsFree() || e.target.closest('.leaflet-control, .leaflet-popup, .leaflet-tooltip')) return;
    const id = deviceAt(map.mouseEventToContainerPoint(e));
    if (!id) return;
    e.stopPropagation();
    e.preventDefault();
    openDevice(id);
  }, true);

  const deviceTooltip = L.tooltip({ direction: 'top', offset: [0, -8], className: 'device-tooltip' });
  let hoverFrame = null;
  let hoverEvent = null;
  let hovered = null;
  mapEl.addEventListener('mousemove', (e) => {
    hoverEvent = e;
    if (hoverFrame) return;
    hoverFrame = requestAnimationFrame(() => {
      hoverFrame = null;
      const ev = hoverEvent;
      const id = pointerIsFree() && !ev.target.closest('.leaflet-control, .leaflet-popup')
        ? deviceAt(map.mouseEventToContainerPoint(ev)) : null;
      if (id === hovered) return;
      hovered = id;
      mapEl.classList.toggle('over-device', !!id);
      if (id) {
        deviceTooltip.setLatLng(markers.get(id).getLatLng()).setContent(esc(id));
        if (!map.hasLayer(deviceTooltip)) deviceTooltip.addTo(map);
      } else if (map.hasLayer(deviceTooltip)) {
        deviceTooltip.remove();
      }
    });
  });
  mapEl.addEventListener('mouseleave', () => {
    hovered = null;
    mapEl.classList.remove('over-device');
    if (map.hasLayer(deviceTooltip)) deviceTooltip.remove();
  });

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
      case 'DeviceWentOffline':
        return `went offline (last seen ${fmtTime(d.last_seen, true)})`;
      case 'DeviceBackOnline':
        return 'back online';
      case 'AlarmOpened':
      case 'AlarmAcknowledged':
      case 'AlarmCleared': {
        const verb = { AlarmOpened: 'opened', AlarmAcknowledged: 'acknowledged', AlarmCleared: 'cleared' }[ev.type];
        const rule = d.rule_id ? ` ${d.kind === 'outside_zone' ? zoneName(d.rule_id) : rangeName(d.rule_id)}` : '';
        const by = ev.type === 'AlarmAcknowledged' && d.by ? ` by ${d.by}${d.comment ? `: ${d.comment}` : ''}` : '';
        return `${d.severity || ''} alarm ${KIND_LABELS[d.kind] || d.kind || ''}${rule} ${verb}${by}`;
      }
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
      const tempAlarms = (dev.temperature_alarms || []).map((a) => `${esc(ranges.get(a.range_id) && ranges.get(a.range_id).name ? ranges.get(a.range_id).name : a.range_id)} (${esc(a.bound)})`);
      // Every alarm of the device that has not cleared (docs/api.md: `alarms`), most severe first.
      const devAlarms = (dev.alarms || []).slice().sort((a, b) => (SEVERITY_RANK[b.severity] || 0) - (SEVERITY_RANK[a.severity] || 0)
        || String(b.opened_at).localeCompare(String(a.opened_at)));
      const alarmRows = devAlarms.map((a) => `<li class="popup-alarm sev-${esc(a.severity)}" data-alarm="${esc(a.id)}" data-state="${a.acknowledged ? 'acknowledged' : 'open'}">
          <span class="popup-alarm-what">${esc(alarmWhat(a.kind, a.rule_id))}</span>
          <span class="muted">${esc(a.severity)} · ${a.acknowledged ? 'acknowledged' : 'open'} · since ${esc(fmtTime(a.opened_at, true))}</span></li>`).join('');
      html = `<div class="fw-popup" data-device="${esc(id)}">
        <h3>${esc(id)} <span class="badge status-${esc(dev.status)}">${esc(STATUS_LABELS[dev.status] || dev.status)}</span></h3>
        <table>
          <tr><th>Position</th><td>${fmtCoord(r.lat)}, ${fmtCoord(r.lon)}</td></tr>
          <tr><th>Temperature</th><td>${fmtTemp(r.temperature)}</td></tr>
          <tr><th>Reading at</th><td title="${esc(r.timestamp)}">${esc(fmtTime(r.timestamp))}</td></tr>
          <tr><th>Status</th><td>${esc(dev.status)}</td></tr>
          ${dev.offline_since ? `<tr><th>Offline</th><td class="popup-offline" title="${esc(dev.offline_since)}">since ${esc(fmtTime(dev.offline_since))}</td></tr>` : ''}
          ${zoneNames.length ? `<tr><th>Outside</th><td>${zoneNames.join(', ')}</td></tr>` : ''}
          ${tempAlarms.length ? `<tr><th>Out of range</th><td>${tempAlarms.join(', ')}</td></tr>` : ''}
          <tr><th>Version</th><td>${esc(dev.version)}</td></tr>
        </table>
        <h4 class="popup-alarms-head">Alarms <span class="count">${devAlarms.length}</span></h4>
        <ul class="popup-alarms">${alarmRows || '<li class="muted">No active alarms</li>'}</ul>
        <ul class="events">
          ${events.map((ev) => `<li><span class="ev-at">${esc(fmtTime(ev.data && ev.data.at, true))}</span><span class="ev-type">${esc(ev.type)}</span> <span class="ev-desc">${esc(describeEvent(ev))}</span></li>`).join('') || '<li class="muted">No events</li>'}
        </ul>
      </div>`;
    } catch (e) {
      html = `<div class="fw-popup"><h3>${esc(id)}</h3><p class="form-error">${esc(e.message)}</p></div>`;
    }
    if (seq !== popupSeq || state.popupDevice !== id) return;
    const marker = markers.get(id);
    // The popup pans the map into view when it opens, not when its content arrives or follows
    // the device: the map would jump with every reading, and away from the track that the
    // device panel has just fitted into view.
    const autoPan = devicePopup.options.autoPan;
    devicePopup.options.autoPan = false;
    try {
      if (marker) devicePopup.setLatLng(marker.getLatLng());
      devicePopup.setContent(html);
    } finally {
      devicePopup.options.autoPan = autoPan;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Device panel: temperature buckets (uPlot) and the track over a time range

  /** What the panel shows (also for tests: window.fleetwatch.devicePanel). */
  const devicePanel = {
    deviceId: null,
    range: null,        // { from: Date, to: Date, relative: bool } of the last load
    bucket: null,       // 'minute' | 'hour' | 'day' of the last load
    buckets: null,      // the last answer of GET /api/devices/{id}/temperature
    chart: null,        // the uPlot instance
    chartDraws: 0,      // times uPlot has drawn the chart
    track: null,        // the L.Polyline of the track, while shown
    trackPoints: 0,
    trackCapped: false,
    error: '',          // the error shown in #device-error ('' when none)
    loads: 0,           // loads finished (successful or not)
    loadedDevice: null, // the device the last finished load was for
    seq: 0,
  };
  let trackLine = null;
  let trackStart = null;
  let panelRefreshTimer = null;
  const mapArea = $('.map-area');

  const enc = encodeURIComponent;
  const errorText = (e) => `${e.message}${e instanceof ApiError ? ` (HTTP ${e.status})` : ''}`;

  /** A device's marker popup and its panel (chart and track). */
  function openDevice(id, opts) {
    if (markers.has(id)) openDevicePopup(id);
    openDevicePanel(id, opts);
  }

  function openDevicePanel(id, opts) {
    const other = devicePanel.deviceId !== id;
    devicePanel.deviceId = id;
    $('#device-name').textContent = id;
    updatePanelStatus();
    $('#device-panel').hidden = false;
    mapArea.classList.add('with-device-panel');
    if (other) {
      clearTrack();
      setPanelError('');
      $('#device-chart-info').textContent = '';
      $('#device-track-info').textContent = '';
    }
    loadDevicePanel({ fit: !(opts && opts.fit === false) });
  }

  function closeDevicePanel() {
    devicePanel.seq += 1; // drops answers still on their way
    devicePanel.deviceId = null;
    clearTimeout(panelRefreshTimer);
    $('#device-panel').hidden = true;
    mapArea.classList.remove('with-device-panel');
    clearTrack();
    if (devicePanel.chart) { devicePanel.chart.destroy(); devicePanel.chart = null; }
    devicePanel.buckets = null;
    setPanelError('');
  }

  function updatePanelStatus() {
    const el = $('#device-status');
    const dev = devices.get(devicePanel.deviceId);
    if (!dev || !dev.last_reading) { el.hidden = true; return; }
    const s = statusOf(dev);
    el.hidden = false;
    el.className = `badge status-${s}`;
    // Besides the one status, every alarm of the device in the alarm list (not cleared).
    const own = [...alarms.values()].filter((a) => a.device_id === devicePanel.deviceId);
    el.textContent = `${STATUS_LABELS[s] || s}${own.length ? ` · ${own.length} alarm${own.length === 1 ? '' : 's'}` : ''}`;
    el.title = own.map((a) => `${a.severity} ${alarmWhat(a.kind, a.rule_id)} (${a.state})`).join('\n');
  }

  function setPanelError(text) {
    devicePanel.error = text;
    $('#device-error').textContent = text;
  }

  const pad2 = (n) => String(n).padStart(2, '0');
  /** A Date as the value of an <input type="datetime-local"> (local time, seconds). */
  function localInput(d) {
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}T${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  /** The range chosen in the panel; throws with a message for an incomplete custom range. */
  function panelRange() {
    const choice = $('#device-range').value;
    if (choice === 'custom') {
      const f = $('#device-from').value;
      const t = $('#device-to').value;
      if (!f || !t) throw new Error('Give both ends of the custom range.');
      const from = new Date(f);
      const to = new Date(t);
      if (Number.isNaN(from.getTime()) || Number.isNaN(to.getTime())) throw new Error('The custom range is not a valid time.');
      return { from, to, relative: false };
    }
    const to = new Date();
    return { from: new Date(to.getTime() - RANGES[choice] * 1000), to, relative: true };
  }

  /**
   * Loads the panel's buckets and track for its range. Both requests are made at once; the answer
   * to an older load (another device or range chosen since) is dropped. Errors are shown in the
   * panel (`#device-error`), naming which part failed and the HTTP status.
   */
  async function loadDevicePanel(opts) {
    const id = devicePanel.deviceId;
    if (!id) return;
    clearTimeout(panelRefreshTimer);
    const seq = ++devicePanel.seq;
    let range;
    try {
      range = panelRange();
    } catch (e) {
      setPanelError(e.message);
      devicePanel.loadedDevice = id;
      devicePanel.loads += 1;
      return;
    }
    const bucket = $('#device-bucket').value;
    const panel = $('#device-panel');
    panel.classList.add('loading');
    const q = new URLSearchParams({ from: range.from.toISOString(), to: range.to.toISOString(), bucket });
    const [buckets, track] = await Promise.allSettled([
      api('GET', `/api/devices/${enc(id)}/temperature?${q}`),
      fetchTrack(id, range, seq),
    ]);
    if (seq !== devicePanel.seq) return;
    panel.classList.remove('loading');
    devicePanel.range = range;
    devicePanel.bucket = bucket;
    const errors = [];
    if (buckets.status === 'fulfilled') {
      drawChart(buckets.value, bucket);
    } else {
      errors.push(`Temperature buckets: ${errorText(buckets.reason)}`);
      drawChart(null, bucket);
    }
    if (track.status === 'fulfilled') {
      drawTrack(track.value, opts && opts.fit);
    } else {
      errors.push(`Track: ${errorText(track.reason)}`);
      clearTrack();
      $('#device-track-info').textContent = '';
    }
    setPanelError(errors.join('\n'));
    devicePanel.loadedDevice = id;
    devicePanel.loads += 1;
    if (range.relative) {
      panelRefreshTimer = setTimeout(() => {
        if (devicePanel.deviceId === id && !document.hidden) loadDevicePanel({ fit: false });
      }, PANEL_REFRESH_MS);
    }
  }

  /**
   * The device's readings in the range, page after page, at most TRACK_CAP of them (the first
   * ones, in time order). `capped`: the range holds more.
   */
  async function fetchTrack(id, range, seq) {
    const readings = [];
    let after = null;
    let retention = null;
    for (;;) {
      const q = new URLSearchParams({
        from: range.from.toISOString(),
        to: range.to.toISOString(),
        limit: String(Math.min(TRACK_PAGE, TRACK_CAP - readings.length)),
      });
      if (after) q.set('after', after);
      const page = await api('GET', `/api/devices/${enc(id)}/readings?${q}`);
      if (seq !== devicePanel.seq) return null;
      retention = page.retention;
      readings.push(...(page.readings || []));
      if (!page.next_after) return { readings, capped: false, retention };
      after = page.next_after;
      if (readings.length >= TRACK_CAP) {
        // A full last page says nothing about what follows: ask for one more reading.
        const more = new URLSearchParams({ from: range.from.toISOString(), to: range.to.toISOString(), limit: '1', after });
        const next = await api('GET', `/api/devices/${enc(id)}/readings?${more}`);
        return { readings, capped: (next.readings || []).length > 0, retention };
      }
    }
  }

  function clearTrack() {
    if (trackLine) trackLine.remove();
    if (trackStart) trackStart.remove();
    trackLine = null;
    trackStart = null;
    devicePanel.track = null;
    devicePanel.trackPoints = 0;
    devicePanel.trackCapped = false;
  }

  const TRACK_STYLE = {
    renderer: trackRenderer, pane: 'tracks', interactive: false, pmIgnore: true, snapIgnore: true,
  };

  function drawTrack(result, fit) {
    if (!result) return;
    const latlngs = result.readings.map((r) => [r.lat, r.lon]);
    clearTrack();
    trackLine = L.polyline(latlngs, {
      ...TRACK_STYLE, className: 'device-track', color: '#0f766e', weight: 3, opacity: 0.85,
    }).addTo(map);
    if (latlngs.length) {
      trackStart = L.circleMarker(latlngs[0], {
        ...TRACK_STYLE, className: 'device-track-start', radius: 4, color: '#0f766e', weight: 2, fillColor: '#ffffff', fillOpacity: 1,
      }).addTo(map);
    }
    const el = trackLine.getElement();
    if (el) el.setAttribute('data-device', devicePanel.deviceId);
    devicePanel.track = trackLine;
    devicePanel.trackPoints = latlngs.length;
    devicePanel.trackCapped = result.capped;
    devicePanel.trackRetention = result.retention && result.retention.readings_removed_before;
    renderTrackInfo();
    if (fit && latlngs.length) {
      // Fit the track into the part of the map the panel leaves visible, unless it is there.
      const b = trackLine.getBounds();
      const size = map.getSize();
      const panelH = $('#device-panel').offsetHeight || 0;
      const visible = L.latLngBounds(
        map.containerPointToLatLng([20, 20]),
        map.containerPointToLatLng([Math.max(21, size.x - 20), Math.max(21, size.y - panelH - 40)]),
      );
      if (!visible.contains(b)) {
        map.fitBounds(b, { paddingTopLeft: [40, 40], paddingBottomRight: [40, panelH + 50], maxZoom: 15 });
      }
    }
  }

  function renderTrackInfo() {
    const info = $('#device-track-info');
    const n = devicePanel.trackPoints;
    info.innerHTML = '';
    const main = document.createElement('span');
    main.textContent = `Track: ${n.toLocaleString('en')} reading${n === 1 ? '' : 's'}`;
    info.appendChild(main);
    if (devicePanel.trackCapped) {
      const cap = document.createElement('span');
      cap.className = 'capped';
      cap.id = 'device-track-capped';
      cap.textContent = ` · capped at the first ${TRACK_CAP.toLocaleString('en')} of the range: narrow it to see the rest`;
      info.appendChild(cap);
    }
    const removed = devicePanel.trackRetention;
    if (removed && devicePanel.range && new Date(removed) > devicePanel.range.from) {
      const r = document.createElement('span');
      r.textContent = ` · readings before ${fmtTime(removed)} were removed (retention)`;
      info.appendChild(r);
    }
    info.dataset.points = String(n);
    info.dataset.capped = String(devicePanel.trackCapped);
  }

  /** A live reading of the panel's device extends its track (last-N ranges, below the cap). */
  function followTrack(d) {
    if (!trackLine || !devicePanel.range || !devicePanel.range.relative || devicePanel.trackCapped) return;
    if (!d.location || d.late) return;
    if (devicePanel.trackPoints >= TRACK_CAP) { devicePanel.trackCapped = true; renderTrackInfo(); return; }
    trackLine.addLatLng([d.location.lat, d.location.lon]);
    devicePanel.trackPoints += 1;
    renderTrackInfo();
  }

  /** The temperature ranges that watch a device (drawn as dashed limits on its chart). */
  function rangesOf(id) {
    return [...ranges.values()].filter((r) => watches(r, id));
  }

  /** A time axis label, 24-hour local time; the date too when the range spans days. */
  function fmtTick(sec, span) {
    const d = new Date(sec * 1000);
    const hm = `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
    const md = `${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}`;
    if (span <= 86400) return hm;
    if (span <= 8 * 86400) return `${md} ${hm}`;
    return md;
  }

  function drawChart(page, bucket) {
    const el = $('#device-chart');
    if (devicePanel.chart) { devicePanel.chart.destroy(); devicePanel.chart = null; }
    devicePanel.buckets = page;
    const info = $('#device-chart-info');
    if (!page) {
      info.textContent = '';
      info.dataset.buckets = '0';
      $('#device-chart-empty').hidden = true;
      return;
    }
    // Buckets with data only: a gap of a bucket or more is a null, so lines break there.
    const width = BUCKET_SECONDS[bucket] || 3600;
    const xs = []; const mins = []; const maxs = []; const means = []; const counts = [];
    let prev = null;
    let total = 0;
    let lo = Infinity;
    let hi = -Infinity;
    for (const b of page.buckets || []) {
      const t = Date.parse(b.start) / 1000;
      if (prev !== null && t - prev > width) {
        xs.push(prev + width); mins.push(null); maxs.push(null); means.push(null); counts.push(null);
      }
      xs.push(t); mins.push(b.min); maxs.push(b.max); means.push(b.mean); counts.push(b.count);
      total += b.count;
      if (typeof b.min === 'number') lo = Math.min(lo, b.min);
      if (typeof b.max === 'number') hi = Math.max(hi, b.max);
      prev = t;
    }
    const n = (page.buckets || []).length;
    info.textContent = n
      ? `${n.toLocaleString('en')} ${bucket} bucket${n === 1 ? '' : 's'} · ${total.toLocaleString('en')} readings · ${fmtTemp(lo)} … ${fmtTemp(hi)}`
      : `No ${bucket} buckets in this range`;
    info.dataset.buckets = String(n);
    $('#device-chart-empty').hidden = n > 0;
    const xFrom = Date.parse(page.from) / 1000;
    const xTo = Date.parse(page.to) / 1000;
    const limits = rangesOf(devicePanel.deviceId);
    const temp = (u, v) => (v === null || v === undefined ? '—' : `${v.toFixed(2)} °C`);
    const opts = {
      width: Math.max(200, el.clientWidth),
      height: Math.max(120, el.clientHeight),
      scales: {
        x: { time: true, range: () => [xFrom, xTo] },
        temp: {
          range: (u, min, max) => {
            const vals = [min, max, ...limits.flatMap((r) => [r.min, r.max])].filter((v) => v !== null && Number.isFinite(v));
            if (!vals.length) return [0, 10];
            const a = Math.min(...vals);
            const b = Math.max(...vals);
            const pad = Math.max(0.5, (b - a) * 0.1);
            return [a - pad, b + pad];
          },
        },
        count: {},
      },
      series: [
        { label: 'time', value: (u, v) => (v === null || v === undefined ? '—' : fmtTime(new Date(v * 1000).toISOString())) },
        { label: 'min', scale: 'temp', stroke: 'rgba(37, 99, 235, .5)', width: 1, value: temp },
        { label: 'max', scale: 'temp', stroke: 'rgba(220, 38, 38, .5)', width: 1, value: temp },
        { label: 'mean', scale: 'temp', stroke: '#1d4ed8', width: 2, value: temp },
        { label: 'readings', scale: 'count', stroke: '#9ca3af', width: 0, paths: () => null, points: { show: false },
          value: (u, v) => (v === null || v === undefined ? '—' : String(v)) },
      ],
      bands: [{ series: [2, 1], fill: 'rgba(37, 99, 235, .14)' }],
      axes: [
        { values: (u, splits) => splits.map((v) => fmtTick(v, xTo - xFrom)) },
        { scale: 'temp', values: (u, vals) => vals.map((v) => `${v}°`), size: 48 },
      ],
      legend: { live: true },
      hooks: {
        draw: [(u) => {
          devicePanel.chartDraws += 1;
          // The device's temperature ranges as dashed limits.
          const { ctx } = u;
          ctx.save();
          ctx.setLineDash([6, 4]);
          ctx.lineWidth = 1;
          ctx.strokeStyle = 'rgba(220, 38, 38, .6)';
          for (const r of limits) {
            for (const v of [r.min, r.max]) {
              const y = Math.round(u.valToPos(v, 'temp', true));
              ctx.beginPath();
              ctx.moveTo(u.bbox.left, y);
              ctx.lineTo(u.bbox.left + u.bbox.width, y);
              ctx.stroke();
            }
          }
          ctx.restore();
        }],
      },
    };
    devicePanel.chart = new uPlot(opts, [xs, mins, maxs, means, counts], el);
  }

  // Keep the chart as wide and tall as the panel.
  new ResizeObserver(() => {
    const el = $('#device-chart');
    if (devicePanel.chart && el.clientWidth > 0) {
      devicePanel.chart.setSize({ width: Math.max(200, el.clientWidth), height: Math.max(120, el.clientHeight) });
    }
  }).observe($('#device-chart'));

  $('#device-range').addEventListener('change', () => {
    const choice = $('#device-range').value;
    const custom = choice === 'custom';
    $('#device-custom').hidden = !custom;
    if (custom) {
      // Start from the range shown.
      const r = devicePanel.range || { from: new Date(Date.now() - 3600e3), to: new Date() };
      $('#device-from').value = localInput(r.from);
      $('#device-to').value = localInput(r.to);
      return; // loaded on Apply
    }
    $('#device-bucket').value = DEFAULT_BUCKET[choice];
    loadDevicePanel({ fit: true });
  });
  $('#device-bucket').addEventListener('change', () => loadDevicePanel({ fit: false }));
  $('#device-apply').addEventListener('click', () => loadDevicePanel({ fit: true }));
  $('#device-reload').addEventListener('click', () => loadDevicePanel({ fit: false }));
  $('#device-close').addEventListener('click', closeDevicePanel);

  // ------------------------------------------------------------------------------------------
  // Fleet panel: GET /api/stats every few seconds, the top devices less often

  /** The last answers (also for tests: window.fleetwatch.fleet). */
  const fleet = { stats: null, top: null, updates: 0, error: '' };
  let fleetTimer = null;
  let topTimer = null;

  const fmtCount = (v) => (typeof v === 'number' ? Math.round(v).toLocaleString('en') : '–');
  const fmtRate = (v) => {
    if (typeof v !== 'number') return '–';
    return v < 10 && v !== Math.round(v) ? v.toFixed(1) : Math.round(v).toLocaleString('en');
  };

  function setFleetError(part, text) {
    fleet.errors = { ...(fleet.errors || {}), [part]: text };
    fleet.error = Object.values(fleet.errors).filter(Boolean).join('\n');
    $('#fleet-error').textContent = fleet.error;
  }

  async function refreshFleet() {
    clearTimeout(fleetTimer);
    try {
      if (!document.hidden) {
        const s = await api('GET', '/api/stats');
        fleet.stats = s;
        fleet.updates += 1;
        const set = (sel, v) => { $(sel).textContent = v; };
        set('#fleet-readings-1s', fmtRate(s.readings_per_second && s.readings_per_second.last_second));
        set('#fleet-readings-1m', fmtRate(s.readings_per_second && s.readings_per_second.last_minute));
        set('#fleet-events-1s', fmtRate(s.events_per_second && s.events_per_second.last_second));
        set('#fleet-events-1m', fmtRate(s.events_per_second && s.events_per_second.last_minute));
        const d = s.devices || {};
        set('#fleet-active', fmtCount(d.active));
        set('#fleet-known', fmtCount(d.known));
        set('#fleet-outside', fmtCount(d.outside_a_zone));
        set('#fleet-out-of-range', fmtCount(d.out_of_range));
        set('#fleet-offline', fmtCount(d.offline));
        // The header's device conditions are this same answer: they cannot disagree with the panel.
        set('#stat-out', fmtCount(d.outside_a_zone));
        set('#stat-temp', fmtCount(d.out_of_range));
        set('#stat-offline', fmtCount(d.offline));
        set('#fleet-dead', fmtCount(s.dead_lettered_messages));
        const behind = (s.store_position || 0) - (s.read_models_position || 0);
        set('#fleet-lag', behind > 0 ? `· history ${fmtCount(behind)} events behind` : '');
        set('#fleet-updated', `updated ${fmtTime(new Date().toISOString())}`);
        setFleetError('stats', '');
      }
    } catch (e) {
      setFleetError('stats', `Statistics: ${errorText(e)}`);
    }
    fleetTimer = setTimeout(refreshFleet, FLEET_REFRESH_MS);
  }

  async function refreshTop() {
    clearTimeout(topTimer);
    const by = $('#fleet-top-by').value;
    try {
      if (!document.hidden) {
        const top = await api('GET', `/api/stats/top?by=${enc(by)}&window=1h&limit=5`);
        if (by === $('#fleet-top-by').value) {
          fleet.top = top;
          const list = $('#fleet-top');
          list.innerHTML = '';
          for (const d of top.devices || []) {
            const li = document.createElement('li');
            li.dataset.device = d.device_id;
            li.title = 'Show its chart and track';
            const name = document.createElement('span');
            name.className = 'top-device';
            name.textContent = d.device_id;
            const value = document.createElement('span');
            value.className = 'top-value';
            value.textContent = by === 'distance' ? fmtDistance(d.value) : fmtCount(d.value);
            li.append(name, value);
            list.appendChild(li);
          }
          if (!list.children.length) list.innerHTML = '<li class="empty">Nothing in the last hour.</li>';
          setFleetError('top', '');
        }
      }
    } catch (e) {
      setFleetError('top', `Top devices: ${errorText(e)}`);
    }
    topTimer = setTimeout(refreshTop, TOP_REFRESH_MS);
  }

  $('#fleet-top-by').addEventListener('change', refreshTop);
  $('#fleet-top').addEventListener('click', (e) => {
    const li = e.target.closest('li[data-device]');
    if (li) openDevice(li.dataset.device);
  });
  $('#device-search-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const id = $('#device-search').value.trim();
    if (!id) return;
    const marker = markers.get(id);
    if (marker) map.setView(marker.getLatLng(), Math.max(map.getZoom(), 12));
    openDevice(id);
  });

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

  /** Replaces an element's content only when it changed (lists are re-rendered often). */
  function setHtml(el, html) {
    if (el._fwHtml === html) return;
    el._fwHtml = html;
    el.innerHTML = html;
  }

  function renderLists() {
    listsTimer = null;
    // Devices outside each zone.
    const outside = new Map();
    for (const dev of devices.values()) {
      for (const zid of dev.outside_zones) outside.set(zid, (outside.get(zid) || 0) + 1);
    }
    const sortedZones = [...zones.values()].map((l) => l.fwZone)
      .sort((a, b) => zoneTitle(a).localeCompare(zoneTitle(b)));
    setHtml($('#zone-list'), sortedZones.map((z) => {
      const n = outside.get(z.id) || 0;
      return `<li data-zone="${esc(z.id)}">
        <span class="swatch swatch-zone"></span>
        <div class="item-main clickable" data-action="zoom-zone" title="Show on map">
          <div class="item-title">${esc(zoneTitle(z))}</div>
          <div class="item-sub">${esc(describeShape(z.shape))} · ${esc(describeDevices(z.devices))}${n ? ` · <b style="color:#b45309">${n} outside</b>` : ''}</div>
        </div>
        <button type="button" class="btn btn-small btn-danger" data-action="delete-zone" title="Delete zone">Delete</button>
      </li>`;
    }).join('') || '<li class="empty">No zones yet.</li>');
    $('#zone-count').textContent = String(zones.size);

    const inAlarm = new Map();
    for (const dev of devices.values()) {
      for (const rid of dev.temperature_alarms.keys()) inAlarm.set(rid, (inAlarm.get(rid) || 0) + 1);
    }
    const sortedRanges = [...ranges.values()].sort((a, b) => (a.name || a.id).localeCompare(b.name || b.id));
    setHtml($('#range-list'), sortedRanges.map((r) => {
      const n = inAlarm.get(r.id) || 0;
      return `<li data-range="${esc(r.id)}">
        <span class="swatch swatch-range"></span>
        <div class="item-main">
          <div class="item-title">${esc(r.name || r.id)}</div>
          <div class="item-sub">${esc(r.min)} … ${esc(r.max)} °C · ${esc(describeDevices(r.devices))}${n ? ` · <b style="color:#b91c1c">${n} out of range</b>` : ''}</div>
        </div>
        <button type="button" class="btn btn-small btn-danger" data-action="delete-range" title="Delete range">Delete</button>
      </li>`;
    }).join('') || '<li class="empty">No temperature ranges yet.</li>');
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
  /**
   * The header: devices known to the page, open and acknowledged alarms counted from the alarm
   * list (renderAlarms), and devices outside a zone / out of range / offline from GET /api/stats
   * (refreshFleet), the one source of the fleet panel too.
   */
  function renderStats() {
    statsTimer = null;
    $('#stat-devices').textContent = String(devices.size);
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
    const raised = ev.type === 'LeftZone' || ev.type === 'TemperatureOutOfRange' || ev.type === 'DeviceWentOffline' || ev.type === 'AlarmOpened';
    const temp = ev.type === 'TemperatureOutOfRange' || ev.type === 'TemperatureBackInRange'
      || (ALARM_CHANGE_TYPES.has(ev.type) && d.kind === 'temperature_out_of_range');
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
  }

  $('#alarm-feed').addEventListener('click', (e) => {
    const li = e.target.closest('.alarm-entry');
    if (!li) return;
    const id = li.getAttribute('data-device');
    const marker = markers.get(id);
    if (!marker) { toast(`Device ${id} has no known position`); return; }
    map.setView(marker.getLatLng(), Math.max(map.getZoom(), 12));
    highlightDevice(id);
    openDevice(id, { fit: false });
  });

  // ------------------------------------------------------------------------------------------
  // Active alarms: GET /api/alarms?state=active at load, then the stream's alarm changes

  /**
   * alarm id -> { id, device_id, kind, rule_id, severity, state ('open' | 'acknowledged'),
   * opened_at, sequence, acknowledged: { at, by, comment } | null }. Only alarms not cleared.
   * A change is applied only when its `sequence` is newer than the one held (AlarmOpened is 1).
   */
  const alarms = new Map();
  /** alarm id -> the sequence it cleared at, so an older answer or event cannot bring it back. */
  const clearedAlarms = new Map();
  /** What the alarm panel shows (also for tests: window.fleetwatch.alarmList). */
  const alarmList = { loads: 0, loaded: false, capped: false, error: '', open: 0, acknowledged: 0, acking: new Set(), errors: new Map() };

  function alarmRuleName(kind, ruleId) {
    if (!ruleId) return '';
    if (kind === 'outside_zone') {
      const z = zones.get(ruleId);
      return z && z.fwZone.name ? z.fwZone.name : ruleId;
    }
    const r = ranges.get(ruleId);
    return r && r.name ? r.name : ruleId;
  }

  function alarmWhat(kind, ruleId) {
    const rule = alarmRuleName(kind, ruleId);
    return `${KIND_LABELS[kind] || kind}${rule ? ` · ${rule}` : ''}`;
  }

  /** Merges one alarm as the API or a stream event describes it; false when it is not newer. */
  function mergeAlarm(a) {
    const seq = typeof a.sequence === 'number' ? a.sequence : 1;
    const cleared = clearedAlarms.get(a.id);
    if (cleared !== undefined && cleared >= seq) return false;
    const held = alarms.get(a.id);
    if (held && held.sequence >= seq) return false;
    if (a.state === 'cleared') {
      alarms.delete(a.id);
      clearedAlarms.set(a.id, seq);
      if (clearedAlarms.size > 20000) clearedAlarms.delete(clearedAlarms.keys().next().value);
      return true;
    }
    alarms.set(a.id, {
      id: a.id,
      device_id: a.device_id,
      kind: a.kind,
      rule_id: a.rule_id ?? a.zone_id ?? a.range_id ?? null,
      severity: a.severity || 'warning',
      state: a.state === 'acknowledged' ? 'acknowledged' : 'open',
      opened_at: a.opened_at || (held && held.opened_at) || null,
      sequence: seq,
      acknowledged: a.acknowledged || (held && held.acknowledged) || null,
    });
    return true;
  }

  /** An AlarmOpened / AlarmAcknowledged / AlarmCleared event from the stream. */
  function applyAlarmChange(ev) {
    const d = ev.data || {};
    if (!d.alarm_id) return;
    const change = {
      id: d.alarm_id, device_id: d.device_id || ev.stream, kind: d.kind, rule_id: d.rule_id,
      severity: d.severity, sequence: ev.type === 'AlarmOpened' ? 1 : d.sequence,
    };
    if (ev.type === 'AlarmOpened') {
      change.state = 'open';
      change.opened_at = d.at;
    } else if (ev.type === 'AlarmAcknowledged') {
      change.state = 'acknowledged';
      change.acknowledged = { at: d.at, by: d.by, comment: d.comment };
    } else {
      change.state = 'cleared';
    }
    if (mergeAlarm(change)) {
      alarmList.errors.delete(d.alarm_id);
      scheduleAlarms();
    }
  }

  /** Reads the alarms not cleared, newest first, following next_after up to a cap. */
  async function loadAlarms() {
    let after = null;
    let pages = 0;
    try {
      for (;;) {
        const q = new URLSearchParams({ state: 'active', limit: String(ALARM_PAGE) });
        if (after !== null) q.set('after', after);
        const page = await api('GET', `/api/alarms?${q}`);
        for (const a of page.alarms || []) mergeAlarm(a);
        pages += 1;
        if (page.next_after === null || page.next_after === undefined || !(page.alarms || []).length) {
          alarmList.capped = false;
          break;
        }
        if (pages >= ALARM_PAGES_MAX) { alarmList.capped = true; break; }
        after = page.next_after;
      }
      alarmList.loaded = true;
      alarmList.error = '';
    } catch (e) {
      alarmList.error = `Alarms: ${errorText(e)}`;
    }
    alarmList.loads += 1;
    renderAlarms();
  }

  let alarmsTimer = null;
  function scheduleAlarms() {
    if (!alarmsTimer) alarmsTimer = setTimeout(renderAlarms, 100);
  }

  function renderAlarms() {
    clearTimeout(alarmsTimer);
    alarmsTimer = null;
    let open = 0;
    let acked = 0;
    for (const a of alarms.values()) {
      if (a.state === 'acknowledged') acked += 1;
      else open += 1;
    }
    alarmList.open = open;
    alarmList.acknowledged = acked;
    // Newest first: by when they opened, then by id.
    const t = (a) => Date.parse(a.opened_at || '') || 0;
    const sorted = [...alarms.values()].sort((a, b) => t(b) - t(a) || b.id.localeCompare(a.id, 'en', { numeric: true }));
    const shown = sorted.slice(0, ALARM_LIST_MAX);
    setHtml($('#alarm-list'), shown.map((a) => {
      const acking = alarmList.acking.has(a.id);
      const err = alarmList.errors.get(a.id);
      const ack = a.acknowledged;
      const ackText = ack ? `acknowledged${ack.by ? ` by ${ack.by}` : ''}${ack.at ? ` at ${fmtTime(ack.at, true)}` : ''}${ack.comment ? `: ${ack.comment}` : ''}` : '';
      return `<li class="alarm-item sev-${esc(a.severity)} state-${esc(a.state)}" data-alarm="${esc(a.id)}" data-device="${esc(a.device_id)}" data-severity="${esc(a.severity)}" data-state="${esc(a.state)}" data-kind="${esc(a.kind)}">
        <span class="alarm-sev" title="${esc(a.severity)}">${esc(a.severity)}</span>
        <div class="alarm-main">
          <div class="alarm-head"><span class="alarm-device">${esc(a.device_id)}</span> <span class="alarm-kind">${esc(alarmWhat(a.kind, a.rule_id))}</span></div>
          <div class="alarm-sub"><span class="alarm-since" title="${esc(a.opened_at)}">since ${esc(fmtTime(a.opened_at, true))}</span> · <span class="alarm-state">${esc(a.state)}</span>${ackText ? ` <span class="alarm-ack-info" title="${esc(ackText)}">(${esc(ackText.replace(/^acknowledged ?/, '') || '✓')})</span>` : ''}</div>
          ${err ? `<div class="alarm-error form-error" role="alert">${esc(err)}</div>` : ''}
        </div>
        ${a.state === 'open' ? `<button type="button" class="btn btn-small alarm-ack" data-action="ack"${acking ? ' disabled' : ''}>${acking ? 'Acknowledging…' : 'Acknowledge'}</button>` : ''}
      </li>`;
    }).join(''));
    if (devicePanel.deviceId) updatePanelStatus();
    $('#alarm-count').textContent = String(open);
    $('#alarm-acked-count').textContent = String(acked);
    $('#stat-open').textContent = String(open);
    $('#stat-acked').textContent = String(acked);
    const more = sorted.length - shown.length;
    const notes = [];
    if (more > 0) notes.push(`${more} older alarms not listed (the counts include them).`);
    if (alarmList.capped) notes.push(`Only the newest ${ALARM_PAGE * ALARM_PAGES_MAX} alarms were read at load.`);
    $('#alarm-empty').hidden = alarms.size > 0 && notes.length === 0;
    $('#alarm-empty').textContent = alarms.size === 0 ? (alarmList.loaded ? 'No active alarms.' : 'Loading alarms…') : notes.join(' ');
    $('#alarm-error').textContent = alarmList.error;
  }

  /** POST /api/alarms/{id}/ack; the answer's error is shown at the alarm. */
  async function acknowledgeAlarm(id, comment) {
    if (alarmList.acking.has(id)) return;
    alarmList.acking.add(id);
    alarmList.errors.delete(id);
    renderAlarms();
    try {
      const body = comment ? { comment } : {};
      const res = await api('POST', `/api/alarms/${enc(id)}/ack`, body);
      // Shown at once; the stream's AlarmAcknowledged (a newer sequence) fills in the rest.
      const a = alarms.get(id);
      if (a && a.state === 'open') {
        a.state = 'acknowledged';
        a.acknowledged = { at: new Date().toISOString(), by: res && res.by, comment: res && res.comment };
      }
    } catch (e) {
      alarmList.errors.set(id, `Not acknowledged: ${errorText(e)}`);
    } finally {
      alarmList.acking.delete(id);
      renderAlarms();
    }
  }

  $('#alarm-list').addEventListener('click', (e) => {
    const li = e.target.closest('li[data-alarm]');
    if (!li) return;
    if (e.target.closest('[data-action="ack"]')) {
      acknowledgeAlarm(li.getAttribute('data-alarm'));
      return;
    }
    const id = li.getAttribute('data-device');
    const marker = markers.get(id);
    if (marker) {
      map.setView(marker.getLatLng(), Math.max(map.getZoom(), 12));
      highlightDevice(id);
    }
    openDevice(id, { fit: false });
  });

  /** Refreshes the statistics soon after a change (the read models are about a second behind). */
  let fleetSoonTimer = null;
  function refreshFleetSoon() {
    if (fleetSoonTimer || !state.loaded) return;
    fleetSoonTimer = setTimeout(() => { fleetSoonTimer = null; refreshFleet(); }, 1500);
  }

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
      scheduleAlarms(); // the list names zones and ranges
      return;
    }

    const id = d.device_id || ev.stream;
    if (ALARM_CHANGE_TYPES.has(ev.type)) {
      // An alarm's change: the list (by its sequence), the feed, the device's popup. It changes
      // nothing the markers show, so it neither moves the device's version nor refetches it.
      addAlarmEntry(ev);
      applyAlarmChange(ev);
      if (state.popupDevice === id) refreshDevicePopupSoon(id);
      refreshFleetSoon();
      return;
    }
    const alarm = ALARM_TYPES.has(ev.type);
    const raised = ev.type === 'LeftZone' || ev.type === 'TemperatureOutOfRange';
    // Every alarm that reaches us happened after the page subscribed: it belongs in the feed even
    // when the state loaded from the REST API already includes it.
    if (alarm) { addAlarmEntry(ev); refreshFleetSoon(); }
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
    if (devicePanel.deviceId === id && ev.type === 'ReadingRecorded' && !replayed) followTrack(d);
    if (raised) {
      flushDevices(); // the marker must exist (and have its new colour) before it is highlighted
      highlightDevice(id);
    }
  }

  /** A batch from the stream reader: its events and readings, applied in stream order. */
  function onStreamBatch(b) {
    perf.streamEvents += b.received;
    perf.streamBatches = (perf.streamBatches || 0) + 1;
    if (b.maxPosition >= 0 && (state.lastEventId === null || b.maxPosition > state.lastEventId)) state.lastEventId = b.maxPosition;
    const r = b.readings;
    const n = r.ids.length;
    let i = 0;
    for (const ev of b.events) {
      while (i < n && r.seq[i] < ev.seq) onStreamReading(r, i++);
      if (!state.loaded) state.buffered.push(ev);
      else applyEvent(ev);
    }
    while (i < n) onStreamReading(r, i++);
  }

  /** Reading `i` of a batch's columns, as the event it came from. */
  function readingEvent(r, i) {
    const id = r.ids[i];
    return {
      position: r.position[i], stream: id, version: r.version[i], type: 'ReadingRecorded',
      data: { type: 'ReadingRecorded', device_id: id, at: r.at[i], location: { lat: r.lat[i], lon: r.lon[i] }, temperature: r.temp[i] },
    };
  }

  /** applyEvent for a live reading of a known device, without making an event object. */
  function onStreamReading(r, i) {
    const id = r.ids[i];
    const dev = devices.get(id);
    if (!state.loaded || !dev || !dev.last_reading || fetchingDevices.has(id)) {
      const ev = readingEvent(r, i);
      if (!state.loaded) state.buffered.push(ev);
      else applyEvent(ev);
      return;
    }
    if (r.version[i] <= dev.version) return;
    dev.version = r.version[i];
    const reading = dev.last_reading;
    reading.lat = r.lat[i];
    reading.lon = r.lon[i];
    reading.temperature = r.temp[i];
    reading.timestamp = r.at[i];
    markDirty(id);
    if (state.popupDevice === id) refreshDevicePopupSoon(id);
    if (devicePanel.deviceId === id) followTrack({ location: { lat: r.lat[i], lon: r.lon[i] } });
  }

  // ------------------------------------------------------------------------------------------
  // Reading the stream off the main thread

  /**
   * The live stream's reader. It runs in a dedicated worker (or, where a worker cannot be made,
   * on the page): it reads the stream, parses every event, and hands the page one batch every
   * `batchMs`. Readings, the bulk of the stream, come as columns holding only the latest live
   * reading of each device in the batch; every other event comes whole. `seq` orders the two, so
   * the page applies them in stream order. Self-contained: its source text is the worker's.
   *
   * The stream is read with fetch and parsed here rather than with EventSource, which dispatches
   * one DOM event per message: at 10,000 events a second that alone took most of a core of a
   * small machine (fetch and this parser: about a seventh of it). It behaves as EventSource does
   * (the HTML standard's rules): `id:` sets the last event id, also without data; `retry:` sets
   * the reconnection delay; a lost or ended stream is reopened after that delay with
   * `Last-Event-ID`, reported as an error with `closed: false`; an answer other than a 200
   * event stream ends it for good (`closed: true`), as EventSource does.
   */
  function streamReader(post, batchMs) {
    let conn = 0;
    let current = null; // { conn, abort: AbortController, timer } of the open connection
    let seq = 0;
    let events = [];
    let readings = new Map(); // device id -> its latest reading in the batch (Map order = seq order)
    let received = 0;
    let maxPosition = -1;
    let timer = null;

    function flush() {
      clearTimeout(timer);
      timer = null;
      if (!received) return;
      const n = readings.size;
      const cols = {
        ids: new Array(n), at: new Array(n),
        seq: new Float64Array(n), version: new Float64Array(n), position: new Float64Array(n),
        lat: new Float64Array(n), lon: new Float64Array(n), temp: new Float64Array(n),
      };
      let i = 0;
      for (const [id, r] of readings) {
        cols.ids[i] = id; cols.at[i] = r.at; cols.seq[i] = r.seq; cols.version[i] = r.version;
        cols.position[i] = r.position; cols.lat[i] = r.lat; cols.lon[i] = r.lon; cols.temp[i] = r.temp;
        i += 1;
      }
      post({ kind: 'batch', conn, events, readings: cols, received, maxPosition },
        [cols.seq.buffer, cols.version.buffer, cols.position.buffer, cols.lat.buffer, cols.lon.buffer, cols.temp.buffer]);
      events = [];
      readings = new Map();
      received = 0;
      seq = 0;
    }

    /** One dispatched message: `type` (the `event:` field, '' for none), its data, the last id. */
    function onMessage(type, data, lastEventId) {
      let ev;
      try {
        ev = JSON.parse(data);
      } catch (_) {
        post({ kind: 'bad', conn, data: String(data).slice(0, 200) });
        return;
      }
      if (!ev || typeof ev !== 'object') return;
      if (!ev.type && type) ev.type = type;
      const pos = typeof ev.position === 'number' ? ev.position : Number(lastEventId);
      if (Number.isFinite(pos) && pos > maxPosition) maxPosition = pos;
      received += 1;
      const d = ev.data;
      if (ev.type === 'ReadingRecorded' && d && typeof d === 'object' && !d.late && d.location
          && typeof ev.version === 'number' && typeof d.temperature === 'number') {
        const id = d.device_id || ev.stream;
        readings.delete(id);
        readings.set(id, {
          seq: seq++, version: ev.version, position: pos, at: d.at,
          lat: d.location.lat, lon: d.location.lon, temp: d.temperature,
        });
      } else {
        ev.seq = seq++;
        events.push(ev);
      }
      if (!timer) timer = setTimeout(flush, batchMs);
    }

    /** Reads one connection's stream (and its reconnections) until it is closed or fails. */
    function open(c, url) {
      let lastEventId = null;
      let retryMs = 3000;
      let failed = false;

      async function attempt() {
        if (current !== c) return;
        c.abort = new AbortController();
        const headers = { Accept: 'text/event-stream' };
        if (lastEventId !== null) headers['Last-Event-ID'] = lastEventId;
        let res;
        try {
          res = await fetch(url, { headers, cache: 'no-store', signal: c.abort.signal });
        } catch (_) {
          return lost(); // unreachable: try again, as EventSource does
        }
        if (current !== c) return;
        const type = res.headers.get('Content-Type') || '';
        if (res.status !== 200 || !/^text\/event-stream\b/i.test(type)) {
          // "Fail the connection": EventSource does not try again.
          failed = true;
          try { c.abort.abort(); } catch (_) { /* done */ }
          flush();
          post({ kind: 'error', conn: c.conn, closed: true, status: res.status });
          return;
        }
        post({ kind: 'open', conn: c.conn });
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        let data = '';
        let hasData = false;
        let eventType = '';
        let first = true;
        try {
          for (;;) {
            const { value, done } = await reader.read();
            if (done || current !== c) break;
            let text = decoder.decode(value, { stream: true });
            if (first) {
              if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
              first = false;
            }
            buf += text;
            let start = 0;
            let cr = buf.indexOf('\r'); // the engine sends none; looked for again only past it
            for (;;) {
              // A line ends at \n, \r\n or \r (a \r last in the buffer waits for what follows).
              let end = buf.indexOf('\n', start);
              if (cr >= 0 && cr < start) cr = buf.indexOf('\r', start);
              if (cr >= 0 && (end < 0 || cr < end)) {
                if (cr === buf.length - 1) break;
                end = cr;
              }
              if (end < 0) break;
              const line = buf.slice(start, end);
              start = end + (buf.charCodeAt(end) === 13 && buf.charCodeAt(end + 1) === 10 ? 2 : 1);
              if (line === '') {
                // Dispatch. An event without data only moves the last event id.
                if (hasData) onMessage(eventType, data, lastEventId);
                data = '';
                hasData = false;
                eventType = '';
                continue;
              }
              if (line.charCodeAt(0) === 58) continue; // ':' comment (keep-alive)
              const colon = line.indexOf(':');
              const field = colon < 0 ? line : line.slice(0, colon);
              let val = colon < 0 ? '' : line.slice(colon + 1);
              if (val.charCodeAt(0) === 32) val = val.slice(1);
              if (field === 'data') {
                data = hasData ? `${data}\n${val}` : val;
                hasData = true;
              } else if (field === 'event') {
                eventType = val;
              } else if (field === 'id') {
                if (val.indexOf('\0') < 0) lastEventId = val;
              } else if (field === 'retry') {
                if (/^\d+$/.test(val)) retryMs = Number(val);
              }
            }
            buf = start ? buf.slice(start) : buf;
          }
        } catch (_) {
          // The connection broke (or was closed): below.
        }
        if (current === c) lost();
      }

      function lost() {
        if (current !== c || failed) return;
        flush();
        post({ kind: 'error', conn: c.conn, closed: false });
        c.timer = setTimeout(attempt, retryMs);
      }

      attempt();
    }

    function close() {
      const c = current;
      current = null;
      if (!c) return;
      clearTimeout(c.timer);
      if (c.abort) { try { c.abort.abort(); } catch (_) { /* done */ } }
    }

    return function control(cmd) {
      if (cmd.cmd === 'open') {
        close();
        flush();
        conn = cmd.conn;
        current = { conn: cmd.conn, abort: null, timer: null };
        open(current, cmd.url);
      } else if (cmd.cmd === 'close') {
        close();
        flush();
      }
    };
  }

  const STREAM_BATCH_MS = 100;
  let streamControl = null;
  let streamConn = 0;
  /** The connection the page listens to: { readyState, onopen, onerror, onbatch, close() }. */
  let streamHandle = null;

  function onReaderMessage(msg) {
    const h = streamHandle;
    if (!h || msg.conn !== h.conn) return; // from a connection closed since
    if (msg.kind === 'batch') {
      h.onbatch(msg);
    } else if (msg.kind === 'open') {
      h.readyState = 1;
      if (h.onopen) h.onopen();
    } else if (msg.kind === 'error') {
      h.readyState = msg.closed ? 2 : 0;
      if (h.onerror) h.onerror();
    } else if (msg.kind === 'bad') {
      console.warn('bad stream message', msg.data);
    }
  }

  /** The reader in a worker made from its source text; on the page if workers are unavailable. */
  function readerControl() {
    if (streamControl) return streamControl;
    try {
      const src = `'use strict';\n${streamReader.toString()}\n`
        + `const control = streamReader((m, transfer) => postMessage(m, transfer || []), ${STREAM_BATCH_MS});\n`
        + 'onmessage = (e) => control(e.data);\n';
      const worker = new Worker(URL.createObjectURL(new Blob([src], { type: 'text/javascript' })), { name: 'fleetwatch-stream' });
      worker.onmessage = (e) => onReaderMessage(e.data);
      worker.onerror = (e) => console.warn('stream worker failed', e.message);
      streamControl = (cmd) => worker.postMessage(cmd);
      state.streamReader = 'worker';
    } catch (e) {
      console.warn('no worker for the stream, reading it on the page', e);
      streamControl = streamReader(onReaderMessage, STREAM_BATCH_MS);
      state.streamReader = 'page';
    }
    return streamControl;
  }

  /** Opens the stream at `url` (relative to the page), like an EventSource. */
  function openStream(url, onbatch) {
    streamConn += 1;
    const h = {
      conn: streamConn, readyState: 0, onopen: null, onerror: null, onbatch,
      close() {
        if (streamHandle === h) { streamHandle = null; readerControl()({ cmd: 'close' }); }
        h.readyState = 2;
      },
    };
    streamHandle = h;
    readerControl()({ cmd: 'open', conn: h.conn, url: new URL(url, window.location.href).href, types: STREAM_TYPES });
    return h;
  }

  // ------------------------------------------------------------------------------------------
  // Connection

  let source = null;
  let recreateTimer = null;

  function setConnection(s) {
    state.connection = s;
    const el = $('#connection-state');
    el.textContent = s;
    el.className = `state-${s}`;
  }

  /** The stream's URL; with a fresh ticket when reading needs a token (the reader has no token). */
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
      const es = openStream(url, onStreamBatch);
      source = es;
      es.onopen = () => {
        if (source !== es) return;
        setConnection('connected');
        done();
      };
      es.onerror = () => {
        if (source !== es) return;
        if (es.readyState === 2) { // CLOSED
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
      await Promise.all([loadDevices(), loadAlarms()]);
    } catch (e) {
      toast(`Could not load the current state: ${e.message}`, 'error');
    }
    state.loaded = true;
    const buffered = state.buffered;
    state.buffered = [];
    for (const ev of buffered) applyEvent(ev, true);
    flushDevices();
    renderLists();
    renderAlarms();
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
    // The fleet panel, once the token (if one is needed) is known.
    refreshFleet();
    refreshTop();
    // The alarm list is read from the read models, up to a second behind the stream: read it
    // again once they have caught up with the moment the page subscribed (merged by sequence).
    setTimeout(loadAlarms, 2000);
  }

  window.addEventListener('beforeunload', () => { if (source) source.close(); });

  window.fleetwatch = {
    map, markers, zones, devices, ranges, state, fitAll, highlightDevice, openDevicePopup,
    // Canvas markers have no DOM element: what each shows, and which is under a point.
    markerState, deviceAt, deviceLayer, deviceRenderer,
    // The device panel (chart and track) and the fleet panel.
    openDevice, openDevicePanel, closeDevicePanel, loadDevicePanel, devicePanel, fleet, refreshFleet, refreshTop,
    // The alarm list (alarms not cleared) and acknowledging one.
    alarms, alarmList, loadAlarms, acknowledgeAlarm,
    perf,
  };

  renderLists();
  renderAlarms();
  start();
})();
