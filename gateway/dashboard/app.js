// The gateway's live page. It polls the admin listener's JSON views and keeps
// its own history (15 minutes of /admin/stats samples): the server stays
// stateless, and a refresh costs it one read of its counters.
// ?refresh=SECONDS (0.5 to 60, default 2) sets the stats poll; the clients
// and health views are polled 2.5 times less often.
"use strict";

(function () {
  const DECISIONS = ["allowed", "delayed", "exempt", "unlimited", "shadow_denied", "denied", "blocked"];
  const HISTORY_SECONDS = 15 * 60;
  const NOW_SECONDS = 10; // "req/s" and "denied/s" are rates over this much history
  const SVG = "http://www.w3.org/2000/svg";

  const query = new URLSearchParams(location.search);
  const refresh = Math.min(60, Math.max(0.5, Number(query.get("refresh")) || 2));

  const samples = []; // {t, totals: {decision: n}, routes: Map(label -> {decision: n}), inflight, tracked}
  let routeOrder = [];
  let topByRoute = new Map(); // route -> {client, denied}
  const rows = new Map(); // route -> row elements

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const child of children) node.append(child);
    return node;
  };
  const svg = (tag, attrs) => {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  };

  function fmtRate(x) {
    if (!isFinite(x)) return "–";
    if (x >= 1000) return (x / 1000).toFixed(x >= 10000 ? 0 : 1) + "k";
    if (x >= 100) return x.toFixed(0);
    if (x >= 10) return x.toFixed(1);
    return x.toFixed(x === 0 ? 0 : 2);
  }
  function fmtCount(n) {
    return n.toLocaleString("en-US");
  }
  function fmtPct(x) {
    if (!isFinite(x)) return "–";
    if (x === 0) return "0 %";
    return (x < 0.001 ? "<0.1" : (100 * x).toFixed(x < 0.1 ? 1 : 0)) + " %";
  }
  function fmtSpan(seconds) {
    if (seconds >= 60) return Math.round(seconds / 60) + " min";
    return Math.max(1, Math.round(seconds)) + " s";
  }
  // 0.4 s, 45 s, 12 min 5 s, 1 h, 2 h 30 min
  function fmtDuration(seconds) {
    if (seconds < 10) return seconds.toFixed(1).replace(/\.0$/, "") + " s";
    if (seconds < 60) return Math.round(seconds) + " s";
    const parts = [];
    let rest = Math.round(seconds);
    for (const [unit, size] of [["h", 3600], ["min", 60], ["s", 1]]) {
      if (rest >= size && parts.length < 2) {
        parts.push(Math.floor(rest / size) + " " + unit);
        rest %= size;
      } else if (parts.length) break;
    }
    return parts.join(" ");
  }
  function fmtRefill(b) {
    return b.refill_tokens + " every " + fmtDuration(b.refill_period_seconds);
  }
  function sum(obj) {
    let s = 0;
    for (const d of DECISIONS) s += obj[d] || 0;
    return s;
  }

  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      throw new Error(path + ": HTTP " + response.status);
    }
    return { status: response.status, body };
  }

  function showError(message) {
    $("error").textContent = message ? "· " + message : "";
  }

  // ---- history ----

  function addSample(stats) {
    const routes = new Map();
    for (const r of stats.routes) routes.set(r.route, r.decisions);
    const sample = {
      t: stats.time,
      totals: stats.totals.decisions,
      errors: stats.totals.upstream_errors,
      routes,
      inflight: stats.inflight,
      tracked: stats.clients_tracked,
    };
    const last = samples[samples.length - 1];
    // Counters that went down: the gateway restarted; rates across it mean nothing.
    if (last && (sum(sample.totals) < sum(last.totals) || sample.t <= last.t)) samples.length = 0;
    samples.push(sample);
    while (samples.length > 2 && samples[1].t < sample.t - HISTORY_SECONDS) samples.shift();
    routeOrder = stats.routes.map((r) => r.route);
    $("workers").textContent = stats.workers > 1 ? stats.workers + " workers" : "1 process";
  }

  // The sample closest to `seconds` before the last one (at least one step back).
  function sampleBefore(seconds) {
    const last = samples[samples.length - 1];
    let i = samples.length - 2;
    while (i > 0 && samples[i - 1].t >= last.t - seconds) i--;
    return samples[Math.max(0, i)];
  }

  function rates(a, b, pick) {
    const dt = b.t - a.t;
    const out = {};
    const ca = pick(a) || {};
    const cb = pick(b) || {};
    for (const d of DECISIONS) out[d] = dt > 0 ? Math.max(0, (cb[d] || 0) - (ca[d] || 0)) / dt : 0;
    return out;
  }

  // ---- charts ----

  // The time axis: the page's history, at least a minute, at most 15.
  function span() {
    const history = samples[samples.length - 1].t - samples[0].t;
    return Math.min(HISTORY_SECONDS, Math.max(60, Math.ceil(history / 60) * 60));
  }

  function fmtAgo(seconds) {
    return seconds >= 60 ? "−" + seconds / 60 + " min" : "−" + seconds + " s";
  }

  function niceMax(x) {
    if (x <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    // Four steps of 0.25, 0.5, 1, 2 or 2.5 x 10^n: round labels.
    for (const m of [1, 2, 4, 8, 10]) if (m * p >= x - 1e-12) return m * p;
    return 10 * p;
  }

  function axes(chart, yMax, yFmt, now, width) {
    const W = 640, H = 200, L = 44, B = 18;
    chart.replaceChildren();
    for (let i = 0; i <= 4; i++) {
      const y = (H - B) * (1 - i / 4);
      chart.append(svg("line", { x1: L, x2: W, y1: y, y2: y, class: "grid" }));
      const label = svg("text", { x: L - 6, y: y + 4, "text-anchor": "end" });
      label.textContent = yFmt((yMax * i) / 4);
      chart.append(label);
    }
    const step = [10, 15, 30, 60, 120, 300].find((s) => width / s <= 4) || 300;
    for (let ago = 0; ago <= width; ago += step) {
      const x = L + (W - L) * (1 - ago / width);
      const label = svg("text", { x, y: H - 3, "text-anchor": ago === 0 ? "end" : ago === width ? "start" : "middle" });
      label.textContent = ago === 0 ? "now" : fmtAgo(ago);
      chart.append(label);
    }
    return {
      x: (t) => L + (W - L) * Math.max(0, 1 - (now - t) / width),
      y: (v) => (H - B) * (1 - v / yMax),
    };
  }

  function drawRates() {
    const chart = $("chart-rps");
    const now = samples[samples.length - 1].t;
    const steps = [];
    for (let i = 1; i < samples.length; i++) {
      steps.push({ t: samples[i].t, r: rates(samples[i - 1], samples[i], (s) => s.totals) });
    }
    const present = DECISIONS.filter((d) => steps.some((s) => s.r[d] > 0) || samples[samples.length - 1].totals[d] > 0);
    let peak = 0;
    for (const s of steps) peak = Math.max(peak, present.reduce((a, d) => a + s.r[d], 0));
    const yMax = niceMax(peak * 1.1);
    const scale = axes(chart, yMax, fmtRate, now, span());
    if (steps.length) {
      const base = steps.map(() => 0);
      for (const d of present) {
        const top = steps.map((s, i) => base[i] + s.r[d]);
        const pts = [];
        steps.forEach((s, i) => pts.push(scale.x(s.t).toFixed(1) + "," + scale.y(top[i]).toFixed(1)));
        for (let i = steps.length - 1; i >= 0; i--) pts.push(scale.x(steps[i].t).toFixed(1) + "," + scale.y(base[i]).toFixed(1));
        if (steps.length === 1) pts.splice(1, 0, scale.x(samples[0].t) + "," + scale.y(top[0]));
        chart.append(svg("polygon", { points: pts.join(" "), fill: `var(--${d})`, "fill-opacity": "0.85" }));
        steps.forEach((s, i) => (base[i] = top[i]));
      }
    }
    const legend = $("legend");
    legend.replaceChildren(
      ...present.map((d) => el("span", { class: "key" }, el("i", { class: "sw " + d }), d.replace("_", " ")))
    );
  }

  function drawRatio() {
    const chart = $("chart-ratio");
    const now = samples[samples.length - 1].t;
    // Steps of 1/30 of the axis (30 s over 15 min): the first sample of
    // each step against the next step's first.
    const width = span();
    const stepSeconds = Math.max(5, Math.round(width / 30 / 5) * 5);
    const marks = [];
    let lastStep = null;
    for (const s of samples) {
      const step = Math.floor(s.t / stepSeconds);
      if (step !== lastStep) marks.push(s);
      lastStep = step;
    }
    const lastSample = samples[samples.length - 1];
    if (marks[marks.length - 1] !== lastSample) marks.push(lastSample);
    const series = { denied: [], shadow_denied: [] };
    let peak = 0;
    for (let i = 1; i < marks.length; i++) {
      const a = marks[i - 1], b = marks[i];
      const all = sum(b.totals) - sum(a.totals);
      for (const d of ["denied", "shadow_denied"]) {
        const v = all > 0 ? (b.totals[d] - a.totals[d]) / all : 0;
        series[d].push([b.t, v]);
        peak = Math.max(peak, v);
      }
    }
    const yMax = Math.min(1, niceMax(Math.max(peak * 1.15, 0.05)));
    const scale = axes(chart, yMax, (v) => Math.round(v * 100) + " %", now, width);
    $("ratio-caption").textContent = "· denied / all decisions, " + stepSeconds + " s steps";
    const shadowSeen = series.shadow_denied.some(([, v]) => v > 0);
    $("ratio-shadow-key").hidden = !shadowSeen;
    for (const d of shadowSeen ? ["shadow_denied", "denied"] : ["denied"]) {
      const pts = series[d].map(([t, v]) => scale.x(t).toFixed(1) + "," + scale.y(v).toFixed(1));
      if (pts.length === 1) pts.unshift(scale.x(marks[0].t).toFixed(1) + "," + scale.y(series[d][0][1]).toFixed(1));
      chart.append(svg("polyline", { points: pts.join(" "), class: "line", stroke: `var(--${d})` }));
    }
  }

  // ---- cards ----

  function drawCards() {
    const last = samples[samples.length - 1];
    const first = samples[0];
    if (samples.length > 1) {
      const r = rates(sampleBefore(NOW_SECONDS), last, (s) => s.totals);
      $("card-rps").textContent = fmtRate(sum(r));
      $("card-denied").textContent = fmtRate(r.denied);
      $("card-shadow").textContent = fmtRate(r.shadow_denied);
      const all = sum(last.totals) - sum(first.totals);
      $("card-ratio").textContent = all > 0 ? fmtPct((last.totals.denied - first.totals.denied) / all) : "–";
      const recent = sampleBefore(NOW_SECONDS);
      const dt = last.t - recent.t;
      const errors = Object.keys(last.errors).reduce((a, k) => a + last.errors[k] - (recent.errors[k] || 0), 0);
      $("card-upstream").textContent = dt > 0 ? fmtRate(Math.max(0, errors) / dt) : "–";
      $("card-upstream").classList.toggle("bad", errors > 0);
      const span = last.t - first.t;
      $("card-ratio-sub").textContent = span >= HISTORY_SECONDS - 5 ? "last 15 min" : "last " + fmtSpan(span) + " (page open)";
    }
    const kinds = Object.entries(last.errors);
    $("card-upstream-sub").textContent = kinds.some(([, n]) => n > 0)
      ? "since start: " + kinds.map(([k, n]) => fmtCount(n) + " " + k).join(", ")
      : "none since start";
    $("card-inflight").textContent = fmtCount(last.inflight);
    $("card-tracked").textContent = fmtCount(last.tracked);
  }

  // ---- routes ----

  function routeRow(route) {
    let row = rows.get(route);
    if (row) return row;
    const split = el("div", { class: "split" });
    const spark = svg("svg", { class: "spark", viewBox: "0 0 140 24", preserveAspectRatio: "none" });
    const line = svg("polyline", {});
    const denied = svg("polyline", { class: "d" });
    spark.append(line, denied);
    const cells = {
      route: el("td", { class: "route", title: route }, route),
      rps: el("td", { class: "num", "data-field": "rps" }),
      split: el("td", {}, split),
      ratio: el("td", { class: "num", "data-field": "denied-ratio" }),
      total: el("td", { class: "num", "data-field": "total" }),
      spark: el("td", {}, spark),
      top: el("td", { "data-field": "top-client" }),
    };
    const tr = el("tr", { "data-route": route }, ...Object.values(cells));
    row = { tr, cells, split, line, denied, rate: 0 };
    rows.set(route, row);
    return row;
  }

  function drawRoutes() {
    const last = samples[samples.length - 1];
    const first = samples[0];
    const recent = sampleBefore(NOW_SECONDS);
    const filter = $("route-filter").value.trim();
    const tbody = $("routes").tBodies[0];
    const now = last.t;
    const width = span();
    const shown = [];
    for (const route of routeOrder) {
      const row = routeRow(route);
      const counts = last.routes.get(route) || {};
      const total = sum(counts);
      const r = samples.length > 1 ? rates(recent, last, (s) => s.routes.get(route)) : {};
      const rps = samples.length > 1 ? sum(r) : NaN;
      row.rate = isFinite(rps) ? rps : 0;
      row.total = total;
      row.cells.rps.textContent = fmtRate(rps);
      row.cells.total.textContent = fmtCount(total);
      const before = first.routes.get(route) || {};
      const all = total - sum(before);
      row.cells.ratio.textContent = all > 0 ? fmtPct(((counts.denied || 0) - (before.denied || 0)) / all) : "–";
      row.split.replaceChildren(
        ...DECISIONS.filter((d) => r[d] > 0).map((d) => {
          const part = el("span", { class: d, title: d + ": " + fmtRate(r[d]) + "/s" });
          part.style.width = (100 * r[d]) / rps + "%";
          return part;
        })
      );
      // Sparkline: total and denied rates over the page's history.
      const pts = [], dpts = [];
      let peak = 0;
      const steps = [];
      for (let i = 1; i < samples.length; i++) {
        const rr = rates(samples[i - 1], samples[i], (s) => s.routes.get(route));
        steps.push([samples[i].t, sum(rr), rr.denied]);
        peak = Math.max(peak, sum(rr));
      }
      for (const [t, v, dv] of steps) {
        const x = (140 * Math.max(0, 1 - (now - t) / width)).toFixed(1);
        pts.push(x + "," + (23 - (22 * v) / (peak || 1)).toFixed(1));
        dpts.push(x + "," + (23 - (22 * dv) / (peak || 1)).toFixed(1));
      }
      row.line.setAttribute("points", peak > 0 ? pts.join(" ") : "");
      row.denied.setAttribute("points", steps.some((step) => step[2] > 0) ? dpts.join(" ") : "");
      const top = topByRoute.get(route);
      row.cells.top.replaceChildren(top ? clientButton(top.client) : "");
      if (top) row.cells.top.append(el("span", { class: "err" }, " " + fmtCount(top.denied)));
      row.tr.classList.toggle("idle", total === 0);
      row.tr.hidden = filter !== "" && !route.includes(filter);
      if (!row.tr.hidden) shown.push(row);
    }
    // Busiest first; a route never used keeps its config order at the end.
    const order = routeOrder.map((route) => rows.get(route));
    order.sort((a, b) => b.rate - a.rate || b.total - a.total);
    for (const row of order) tbody.append(row.tr);
    $("routes-count").textContent =
      "· " + routeOrder.length + ", busiest first" + (filter ? ", " + shown.length + " shown" : "") + " · denied % over the charts' period";
  }

  // ---- top denied clients ----

  function clientButton(client) {
    const button = el("button", { class: "client-link", type: "button", title: "look up " + client }, client);
    button.addEventListener("click", () => {
      $("lookup-input").value = client;
      lookup(client);
    });
    return button;
  }

  // The bucket of `route` (a label) with the fewest tokens: bucket routes
  // are keys, "/login POST" for a route with methods.
  function lowestBucket(buckets, route) {
    let lowest = null;
    for (const b of buckets || []) {
      if (b.route !== route && !b.route.startsWith(route + " ")) continue;
      if (!lowest || b.tokens < lowest.tokens) lowest = b;
    }
    return lowest;
  }

  function routeTags(entry) {
    const routes = Object.entries(entry.routes);
    const tags = routes.slice(0, 3).map(([route, n]) => {
      const tag = el("span", { class: "tag" }, route + " ", el("b", {}, fmtCount(n)));
      const b = lowestBucket(entry.buckets, route);
      if (b) {
        tag.title = b.policy + ": " + b.tokens + " of " + b.max_tokens + " tokens, " + fmtRefill(b);
        tag.append(el("span", { class: "tokens" + (b.tokens <= 0 ? " tokens-empty" : "") }, b.tokens + "/" + b.max_tokens));
      }
      return tag;
    });
    if (routes.length > 3) tags.push(el("span", { class: "muted" }, "+" + (routes.length - 3) + " more"));
    if (entry.buckets === null) tags.push(el("span", { class: "err" }, " tokens: storage unreachable"));
    return tags;
  }

  function drawClients(answer) {
    const tbody = $("clients").tBodies[0];
    const trs = answer.clients.map((c, i) => {
      const denied = el("td", { class: "num", "data-field": "denied" }, fmtCount(c.denied));
      if (c.error > 0) denied.append(el("span", { class: "err" }, " ±" + fmtCount(c.error)));
      return el(
        "tr",
        { "data-client": c.client },
        el("td", { class: "num" }, String(i + 1)),
        el("td", { class: "client" }, clientButton(c.client)),
        denied,
        el("td", {}, ...routeTags(c))
      );
    });
    tbody.replaceChildren(...trs);
    $("clients-empty").hidden = trs.length > 0;
    $("clients").hidden = trs.length === 0;
    topByRoute = new Map(answer.routes.filter((r) => r.clients.length).map((r) => [r.route, r.clients[0]]));
    $("clients-window").textContent = "· last " + fmtSpan(answer.window_seconds) + ", " + fmtCount(answer.denied_total) + " denials";
    $("clients-note").textContent =
      "Counts are estimates from " + answer.counters + " counters per 1-minute step: never below the true count, over by at most ±error. " +
      "Includes shadow would-be denials. Allowed requests are not counted per client." +
      (answer.storage_error ? " Tokens: " + answer.storage_error : "");
  }

  // ---- lookup ----

  async function lookup(client) {
    const out = $("lookup-result");
    client = client.trim();
    if (!client) return;
    out.className = "lookup-result";
    out.replaceChildren("Looking up " + client + "…");
    let answer;
    try {
      // Keep "/" and ":" readable: "2001:db8:1:2::/64" is one id.
      answer = await getJSON("/admin/clients/" + encodeURIComponent(client).replace(/%2F/gi, "/").replace(/%3A/gi, ":"));
    } catch (e) {
      out.replaceChildren(String(e.message || e));
      return;
    }
    const body = answer.body;
    const head = el("h3", { "data-field": "lookup-client" }, body.id || client);
    if (answer.status === 503) {
      out.replaceChildren(head, el("p", { class: "error" }, "storage unreachable: " + (body.detail || "")));
      return;
    }
    const denied = body.denied
      ? "denied " + fmtCount(body.denied.count) + (body.denied.error ? " (±" + fmtCount(body.denied.error) + ")" : "") + " times in the last 5 min"
      : "not among the top denied clients of the last 5 min";
    if (!body.tracked) {
      out.replaceChildren(
        head,
        el("p", { "data-field": "lookup-status" }, el("span", { class: "pill" }, "not tracked"), " the gateway holds no bucket for this id: a new client, one whose buckets refilled and were forgotten, or a typo."),
        el("p", { class: "muted" }, denied)
      );
      return;
    }
    const table = el(
      "table",
      { class: "table" },
      el("thead", {}, el("tr", {}, ...["route", "limit", "tokens", "refill", "next refill"].map((h) => el("th", {}, h))))
    );
    const tbody = el("tbody");
    for (const b of body.buckets) {
      tbody.append(
        el(
          "tr",
          { "data-bucket": b.route + " " + b.policy },
          el("td", { class: "route" }, b.route),
          el("td", {}, b.policy + (b.key && b.key !== body.id ? " (" + b.key + ")" : "")),
          el("td", { class: "num" }, el("b", { class: b.tokens <= 0 ? "tokens-empty" : "" }, String(b.tokens)), " / " + b.max_tokens),
          el("td", {}, fmtRefill(b)),
          el("td", { class: "num" }, b.held ? fmtDuration(b.next_refill_seconds) : "full")
        )
      );
    }
    table.append(tbody);
    out.replaceChildren(
      head,
      el("p", { "data-field": "lookup-status" }, el("span", { class: "pill ok" }, "tracked"), " " + denied),
      table
    );
  }

  // ---- health ----

  function pill(text, ok) {
    return el("span", { class: "pill " + (ok ? "ok" : "bad") }, text);
  }

  async function pollHealth() {
    try {
      const [ready, health] = await Promise.all([getJSON("/readyz"), getJSON("/healthz")]);
      const readyOk = ready.status === 200;
      const healthOk = health.status === 200;
      $("ready").replaceWith(Object.assign(pill(readyOk ? "ready" : "not ready", readyOk), { id: "ready" }));
      $("healthy").replaceWith(Object.assign(pill(healthOk ? "healthy" : "unhealthy", healthOk), { id: "healthy" }));
      const checks = Object.entries(ready.body.checks).map(([k, v]) => pill(k.replace(/_/g, " "), v));
      const parts = Object.entries(health.body.parts).map(([k, v]) => pill(k.replace(/_/g, " ") + (v === "alive" ? "" : ": " + v), v === "alive"));
      $("checks").replaceChildren(...checks, ...parts);
    } catch (e) {
      showError(String(e.message || e));
    }
  }

  // ---- polling ----

  async function pollStats() {
    try {
      const { body } = await getJSON("/admin/stats");
      addSample(body);
      drawCards();
      drawRates();
      drawRatio();
      drawRoutes();
      $("updated").textContent = "updated " + new Date(body.time * 1000).toLocaleTimeString() + " · every " + refresh + " s";
      showError("");
    } catch (e) {
      showError("stats: " + (e.message || e));
    }
  }

  async function pollClients() {
    try {
      const { body } = await getJSON("/admin/clients");
      drawClients(body);
    } catch (e) {
      showError("clients: " + (e.message || e));
    }
  }

  function every(seconds, fn) {
    // One request at a time per view: a slow answer delays the next poll
    // instead of piling requests up.
    const run = async () => {
      await fn();
      setTimeout(run, seconds * 1000);
    };
    run();
  }

  $("lookup").addEventListener("submit", (event) => {
    event.preventDefault();
    lookup($("lookup-input").value);
  });
  $("route-filter").addEventListener("input", () => samples.length && drawRoutes());
  every(refresh, pollStats);
  every(refresh * 2.5, pollClients);
  every(refresh * 2.5, pollHealth);
})();
