// framewatch mosaic page: plain JavaScript, no build step, no dependencies.
// Live data comes from /api/events (Server-Sent Events); the alert log is seeded from /api/alerts.
// Every server string goes into the page through textContent or setAttribute, never as HTML.
(() => {
  "use strict";

  const TOKEN_KEY = "framewatch_token";
  const OPERATOR_KEY = "framewatch_operator";
  const COOKIE_SAFE = /^[A-Za-z0-9._~+/=-]+$/; // a token the cookie can carry as it is
  const MAX_ROWS = 200; // alert log rows kept in the page
  const THUMB_EVERY_MS = 2000;
  const LUFS_MIN = -60, LUFS_MAX = 0, LUFS_TARGET = -23;
  const ALARM = new Set(["critical", "major"]);

  const $ = (id) => document.getElementById(id);
  const ui = {
    tiles: $("tiles"), empty: $("empty"), rows: $("alert-rows"), conn: $("conn"), operator: $("operator"),
    hideResolved: $("hide-resolved"), log: $("log"),
    nStreams: $("count-streams"), nAlarms: $("count-alarms"), nWarnings: $("count-warnings"), nUnacked: $("count-unacked"),
  };

  // ---------------------------------------------------------------- access token
  let token = null;
  let authDeclined = false;

  function setToken(t) {
    token = t || null;
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
      // EventSource and <img> cannot send headers: the server also accepts this cookie.
      if (COOKIE_SAFE.test(token)) document.cookie = `${TOKEN_KEY}=${token}; path=/; SameSite=Strict`;
    } else {
      sessionStorage.removeItem(TOKEN_KEY);
      document.cookie = `${TOKEN_KEY}=; path=/; SameSite=Strict; max-age=0`;
    }
  }

  function initToken() {
    // #token=... (percent-encoded if need be; "+" stays "+", unlike form decoding)
    const parts = location.hash.replace(/^#/, "").split("&").filter(Boolean);
    const given = parts.find((p) => p.startsWith("token="));
    if (given) {
      let t = given.slice(6);
      try { t = decodeURIComponent(t); } catch { /* used as it is */ }
      if (t) setToken(t);
      const rest = parts.filter((p) => p !== given).join("&"); // not left in the address bar or history
      history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    }
    if (!token) {
      const saved = sessionStorage.getItem(TOKEN_KEY);
      if (saved) setToken(saved);
    }
  }

  // Asked when the service answers 401 (prompt blocks, so one question at a time).
  function askToken(used) {
    if (token !== used) return true; // a new token came in while this request was out: just retry
    if (authDeclined) return false;
    const t = window.prompt("This framewatch service needs its access token:", "");
    if (t && t.trim()) {
      setToken(t.trim());
      return true;
    }
    authDeclined = true;
    setConn("unauthorised", "no token given: click to enter it");
    return false;
  }

  function withParam(url, key, value) {
    return url + (url.includes("?") ? "&" : "?") + key + "=" + encodeURIComponent(value);
  }

  // A URL the browser fetches by itself (EventSource, <img>): the cookie carries the token, or, for a
  // token a cookie cannot hold, the query parameter the server also accepts.
  function authed(url) {
    return token && !COOKIE_SAFE.test(token) ? withParam(url, "access_token", token) : url;
  }

  class HttpError extends Error {
    constructor(status, text) {
      super(`HTTP ${status}${text ? ": " + text : ""}`);
      this.status = status;
    }
  }

  async function api(path, opts = {}, retry = true) {
    const used = token;
    const headers = new Headers(opts.headers || {});
    if (token) headers.set("Authorization", "Bearer " + token);
    const res = await fetch(path, { ...opts, headers, credentials: "same-origin", cache: "no-store" });
    if (res.status === 401 && retry && askToken(used)) return api(path, opts, false);
    if (!res.ok) throw new HttpError(res.status, (await res.text().catch(() => "")).slice(0, 200));
    return res.status === 204 ? null : res.json();
  }

  // ---------------------------------------------------------------- small helpers
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function wallTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleTimeString([], { hour12: false });
  }

  function fullTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleString([], { hour12: false });
  }

  function mediaTime(t) {
    if (t === null || t === undefined || !isFinite(t)) return "…";
    if (t < 60) return t.toFixed(1) + "s";
    const h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), s = (t % 60).toFixed(1).padStart(4, "0");
    return (h ? h + ":" + String(m).padStart(2, "0") : String(m)) + ":" + s;
  }

  // ---------------------------------------------------------------- connection state
  let connState = "";
  function setConn(state, detail) {
    ui.conn.title = detail || "connection to the service";
    if (state === connState) return;
    connState = state;
    ui.conn.dataset.state = state;
    ui.conn.textContent = state;
  }

  // ---------------------------------------------------------------- stream tiles
  const tiles = new Map(); // stream id -> tile
  const seen = new IntersectionObserver((entries) => {
    for (const e of entries) {
      const t = tiles.get(e.target.dataset.stream);
      if (!t) continue;
      t.visible = e.isIntersecting;
      if (t.visible && Date.now() - t.thumbAt > THUMB_EVERY_MS) refreshThumb(t);
    }
  }, { rootMargin: "200px" });

  function makeTile(id) {
    const root = el("article", "tile");
    root.dataset.stream = id;
    const head = el("header", "tile-head");
    const name = el("span", "sid", id);
    name.title = id;
    const state = el("span", "state");
    head.append(name, state);
    const pic = el("div", "pic");
    const ph = el("div", "placeholder", "NO PICTURE");
    const img = el("img", "thumb");
    img.alt = "";
    img.hidden = true;
    const badges = el("div", "badges");
    pic.append(ph, img, badges);
    const info = el("div", "info");
    const res = el("span", "res");
    const fps = el("span", "fps");
    info.append(res, fps);
    const audio = el("div", "audio");
    const meter = el("div", "meter");
    const fill = el("div", "fill");
    const target = el("div", "target");
    target.style.left = pct(LUFS_TARGET) + "%";
    target.title = `target ${LUFS_TARGET} LUFS`;
    meter.append(fill, target);
    const lufs = el("span", "lufs");
    audio.append(meter, lufs);
    const err = el("div", "err");
    err.hidden = true;
    root.append(head, pic, info, audio, err);
    return { id, root, state, ph, img, badges, res, fps, fill, lufs, err, last: {}, thumbUrl: null,
             loading: 0, thumbAt: 0, visible: false };
  }

  function pct(lufs) {
    return (Math.min(LUFS_MAX, Math.max(LUFS_MIN, lufs)) - LUFS_MIN) / (LUFS_MAX - LUFS_MIN) * 100;
  }

  // Calls fn only when a value changed since the last snapshot: a few hundred tiles, once a second.
  function changed(t, key, value) {
    if (t.last[key] === value) return false;
    t.last[key] = value;
    return true;
  }

  function updateTile(t, s) {
    const alerts = s.active_alerts || [];
    const unackedAlarm = alerts.some((a) => ALARM.has(a.severity) && !a.acknowledged);
    const cls = `tile level-${s.level}${unackedAlarm ? " unacked" : ""}`;
    if (changed(t, "cls", cls)) t.root.className = cls;
    if (changed(t, "level", s.level)) t.root.dataset.level = s.level;
    if (changed(t, "state", s.state)) {
      t.state.textContent = String(s.state).replace("_", " ");
      t.root.dataset.state = s.state;
    }
    const info = s.info;
    let res = info ? `${info.width}×${info.height} ${info.video_codec || ""}`.trim() : "—";
    if (s.decoder) res += " · " + s.decoder;
    if (s.tier && s.tier !== "all") res += " · " + s.tier;
    if (changed(t, "res", res)) {
      t.res.textContent = res;
      t.res.title = `${res}${s.device ? " on " + s.device : ""}${s.profile ? ", profile " + s.profile : ""}`;
    }
    const fps = (Number(s.fps) || 0).toFixed(1) + " fps";
    if (changed(t, "fps", fps)) t.fps.textContent = fps;

    const m = s.loudness ? s.loudness.momentary : null;
    const mKey = m === null || m === undefined ? "none" : m.toFixed(1);
    if (changed(t, "lufs", mKey)) {
      if (mKey === "none") {
        t.fill.style.width = "0";
        t.lufs.textContent = s.loudness ? "-∞ LUFS" : "no audio";
        t.fill.className = "fill";
      } else {
        t.fill.style.width = pct(m).toFixed(1) + "%";
        t.lufs.textContent = mKey + " LUFS";
        t.fill.className = "fill" + (m > -10 ? " hot" : m > -18 ? " loud" : m < -50 ? " quiet" : "");
      }
      if (s.loudness) {
        const l = s.loudness;
        t.lufs.title = `momentary ${l.momentary ?? "-"}, short-term ${l.short_term ?? "-"}, integrated ${l.integrated ?? "-"} LUFS`;
      }
    }

    const badgeKey = alerts.map((a) => `${a.id}:${a.acknowledged ? 1 : 0}`).join(",");
    if (changed(t, "badges", badgeKey)) {
      const out = [];
      for (const a of alerts) {
        const b = el("span", `badge sev-${a.severity}${a.acknowledged ? " acked" : ""}`, `${a.type} · ${a.severity}`);
        b.dataset.alert = a.id;
        b.title = `${a.message || a.type}${a.acknowledged ? " (acknowledged)" : ""}`;
        out.push(b);
      }
      t.badges.replaceChildren(...out);
    }

    const errors = s.errors || [];
    const errText = s.state === "error" && errors.length ? errors[errors.length - 1] : "";
    if (changed(t, "err", errText)) {
      t.err.textContent = errText;
      t.err.title = errText;
      t.err.hidden = !errText;
    }

    if (changed(t, "thumb", s.thumbnail || "")) {
      t.thumbUrl = s.thumbnail || null;
      if (!t.thumbUrl) {
        t.img.hidden = true;
        t.ph.hidden = false;
      } else if (t.visible) {
        refreshThumb(t); // a tile off screen gets its picture when scrolled to
      }
    }
  }

  // The picture is fetched into a fresh <img> and swapped in once loaded: no flicker, and a slow server
  // never gets a second request for the same tile.
  function refreshThumb(t) {
    const now = Date.now();
    if (!t.thumbUrl || (t.loading && now - t.loading < 10000)) return;
    t.loading = now;
    t.thumbAt = now;
    const url = t.thumbUrl;
    const next = new Image();
    next.className = "thumb";
    next.alt = "";
    next.onload = () => {
      t.loading = 0;
      if (!t.root.isConnected || t.thumbUrl !== url) return;
      t.img.replaceWith(next);
      t.img = next;
      t.ph.hidden = true;
    };
    next.onerror = () => { t.loading = 0; };
    next.src = authed(withParam(url, "t", now));
  }

  function renderStreams(list) {
    const ids = new Set();
    const frag = document.createDocumentFragment();
    for (const s of list) {
      ids.add(s.id);
      let t = tiles.get(s.id);
      if (!t) {
        t = makeTile(s.id);
        tiles.set(s.id, t);
        frag.append(t.root);
        seen.observe(t.root);
      }
      updateTile(t, s);
    }
    if (frag.childNodes.length) ui.tiles.append(frag);
    for (const id of [...tiles.keys()]) if (!ids.has(id)) removeTile(id);
    updateCounts(list);
  }

  function removeTile(id) {
    const t = tiles.get(id);
    if (!t) return;
    seen.unobserve(t.root);
    t.root.remove();
    tiles.delete(id);
  }

  let lastList = [];
  function updateCounts(list) {
    lastList = list;
    let alarms = 0, warnings = 0, unacked = 0;
    for (const s of list) {
      if (!tiles.has(s.id)) continue;
      if (s.level === "alarm") alarms++;
      else if (s.level === "warning") warnings++;
      for (const a of s.active_alerts || []) if (!a.acknowledged) unacked++;
    }
    ui.nStreams.textContent = String(tiles.size);
    ui.nAlarms.textContent = String(alarms);
    ui.nWarnings.textContent = String(warnings);
    ui.nUnacked.textContent = String(unacked);
    ui.nAlarms.parentElement.classList.toggle("hot", alarms > 0);
    ui.nWarnings.parentElement.classList.toggle("hot", warnings > 0);
    ui.nUnacked.parentElement.classList.toggle("hot", unacked > 0);
    ui.empty.hidden = tiles.size > 0;
    document.title = alarms ? `(${alarms}) framewatch mosaic` : "framewatch mosaic";
  }

  setInterval(() => {
    const now = Date.now();
    for (const t of tiles.values()) if (t.visible && now - t.thumbAt >= THUMB_EVERY_MS - 100) refreshThumb(t);
  }, THUMB_EVERY_MS);

  // ---------------------------------------------------------------- alert log
  const rows = new Map(); // alert id -> {a, tr}

  function sortKey(a) {
    return a.fired_at || a.wallclock || "";
  }

  // Data from a fetch can be older than an event already shown: never undo a resolve or an ack.
  function merge(old, a) {
    const out = { ...old, ...a };
    if (old.status === "resolved" && a.status === "firing") {
      out.status = "resolved";
      out.end = old.end;
      out.duration = old.duration;
      out.message = old.message;
    }
    if (old.acknowledged && !a.acknowledged) {
      out.acknowledged = true;
      out.acked_at = old.acked_at;
      out.acked_by = old.acked_by;
    }
    return out;
  }

  function fillRow(tr, a) {
    tr.className = `alert-row status-${a.status} sev-row-${a.severity}${a.acknowledged ? " acked" : ""}`;
    tr.dataset.alert = a.id;
    tr.dataset.stream = a.stream;
    tr.dataset.status = a.status;

    const thumb = el("td", "thumb-cell");
    if (a.thumbnail_url) {
      const img = el("img", "alert-thumb");
      img.alt = "";
      img.loading = "lazy";
      img.src = authed(a.thumbnail_url);
      thumb.append(img);
    }

    const time = el("td", "time");
    time.append(el("div", "", wallTime(a.fired_at || a.wallclock)),
                el("div", `status st-${a.status}`, a.status === "firing" ? "FIRING" : "resolved"));
    time.title = `fired ${fullTime(a.fired_at || a.wallclock)}`;

    const stream = el("td", "stream", a.stream);
    stream.title = a.stream;

    const what = el("td", "what");
    const line = el("div", "what-line");
    line.append(el("span", `badge sev-${a.severity}`, a.severity), el("span", "type", a.type));
    const msg = el("div", "msg", a.message || "");
    msg.title = a.message || "";
    what.append(line, msg);

    const media = el("td", "media", `${mediaTime(a.start)} – ${a.status === "resolved" ? mediaTime(a.end) : "…"}`);
    media.title = a.duration !== null && a.duration !== undefined ? `lasted ${Number(a.duration).toFixed(1)} s of media` : "still firing";

    const ack = el("td", "ack");
    if (a.acknowledged) {
      const who = a.acked_by ? `${a.acked_by} ` : "";
      const done = el("span", "acked-by", `✓ ${who}${wallTime(a.acked_at)}`);
      done.title = `acknowledged${a.acked_by ? " by " + a.acked_by : ""} at ${fullTime(a.acked_at)}${a.ack_comment ? ": " + a.ack_comment : ""}`;
      ack.append(done);
    } else {
      const b = el("button", "ack-btn", "Ack");
      b.type = "button";
      b.dataset.ack = a.id;
      b.title = "acknowledge this alert";
      ack.append(b);
    }
    tr.replaceChildren(thumb, time, stream, what, media, ack);
  }

  function upsertAlert(a) {
    if (!a || !a.id) return;
    const have = rows.get(a.id);
    if (have) {
      have.a = merge(have.a, a);
      fillRow(have.tr, have.a);
    } else {
      const tr = document.createElement("tr");
      fillRow(tr, a);
      const key = sortKey(a);
      let before = null; // newest first: before the first row that is older
      for (let r = ui.rows.firstElementChild; r; r = r.nextElementSibling) {
        const other = rows.get(r.dataset.alert);
        if (other && sortKey(other.a) < key) { before = r; break; }
      }
      ui.rows.insertBefore(tr, before);
      rows.set(a.id, { a, tr });
      while (rows.size > MAX_ROWS) {
        const last = ui.rows.lastElementChild;
        if (!last) break;
        rows.delete(last.dataset.alert);
        last.remove();
      }
    }
    if (a.acknowledged) markBadgeAcked(a.id);
  }

  // An ack shows on the tiles and counts at once, not only with the next snapshot.
  function markBadgeAcked(id) {
    let hit = false;
    for (const s of lastList) {
      for (const a of s.active_alerts || []) {
        if (a.id === id && !a.acknowledged) {
          a.acknowledged = true;
          hit = true;
        }
      }
    }
    if (hit) renderStreams(lastList);
  }

  async function loadAlerts() {
    try {
      const list = await api(`/api/alerts?limit=${MAX_ROWS}`);
      for (const a of list) upsertAlert(a);
    } catch (exc) {
      console.warn("alerts not loaded:", exc.message);
    }
  }

  ui.rows.addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-ack]");
    if (!b || b.disabled) return;
    b.disabled = true;
    b.textContent = "…";
    try {
      const a = await api(`/api/alerts/${encodeURIComponent(b.dataset.ack)}/ack`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ by: ui.operator.value.trim() || "mosaic" }),
      });
      upsertAlert(a);
    } catch (exc) {
      b.disabled = false;
      b.textContent = "Ack";
      b.title = "acknowledge failed: " + exc.message;
      b.classList.add("failed");
    }
  });

  ui.operator.value = localStorage.getItem(OPERATOR_KEY) || "";
  ui.operator.addEventListener("change", () => localStorage.setItem(OPERATOR_KEY, ui.operator.value.trim()));
  ui.hideResolved.addEventListener("change", () => ui.log.classList.toggle("hide-resolved", ui.hideResolved.checked));

  // ---------------------------------------------------------------- live feed
  let es = null;
  let retryMs = 1000;
  let reconnectTimer = null;
  let lastSnapshot = 0;

  function connect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (es) es.close();
    setConn(connState === "" || connState === "connecting" ? "connecting" : "reconnecting");
    es = new EventSource(authed("/api/events"));
    es.onopen = () => {
      retryMs = 1000;
      lastSnapshot = Date.now();
      setConn("live");
      loadAlerts(); // anything that happened while the feed was down
    };
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) {
        reconnectLater(); // refused (an HTTP error): the browser does not retry by itself
      } else {
        setConn("reconnecting", "the service ended the feed; the browser reconnects");
      }
    };
    es.addEventListener("streams", (e) => {
      lastSnapshot = Date.now();
      if (connState !== "live") setConn("live");
      renderStreams(JSON.parse(e.data));
    });
    es.addEventListener("alert", (e) => upsertAlert(JSON.parse(e.data)));
    es.addEventListener("ack", (e) => upsertAlert(JSON.parse(e.data)));
    es.addEventListener("removed", (e) => {
      const { id } = JSON.parse(e.data);
      removeTile(id);
      updateCounts(lastList.filter((s) => s.id !== id));
    });
  }

  async function reconnectLater() {
    if (es) es.close();
    if (reconnectTimer) return;
    setConn("reconnecting", `retrying in ${Math.round(retryMs / 1000)} s`);
    try {
      await api("/api/about"); // a 401 asks for the token here
    } catch (exc) {
      if (exc.status === 401) {
        setConn("unauthorised", "missing or wrong token: click to enter it");
        return;
      }
    }
    reconnectTimer = setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 30000);
  }

  // A feed that went quiet (a proxy holding it open, a sleeping laptop): said, then replaced.
  setInterval(() => {
    if (!es || connState === "unauthorised") return;
    const quiet = Date.now() - lastSnapshot;
    if (connState === "live" && quiet > 5000) setConn("stalled", "no update for more than 5 s");
    if (quiet > 20000 && es.readyState !== EventSource.CONNECTING) {
      lastSnapshot = Date.now();
      connect();
    }
  }, 2000);

  ui.conn.addEventListener("click", async () => {
    if (connState !== "unauthorised") return;
    authDeclined = false;
    if (askToken(token)) connect();
  });

  initToken();
  connect();
})();
