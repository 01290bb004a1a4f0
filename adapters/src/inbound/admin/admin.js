// The operators' dashboard: signs in with a server API key, reads the cluster-wide statistics
// as Server-Sent Events from GET /api/stats/stream (fetch, so the key travels in a header and
// never in a URL), draws them, and acts through the server API.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "lq-realtime-admin-key";
  const WINDOW_MS = 15 * 60 * 1000;
  const COLORS = ["#2f6fdf", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8590c", "#0c8599", "#c2255c", "#5c940d"];

  let key = sessionStorage.getItem(KEY_STORAGE) || "";
  let controller = null;
  let retryMs = 1000;
  let retryTimer = null;
  let samples = [];
  const tenantColors = new Map();

  function setState(state, text) {
    $("state").dataset.state = state;
    $("state").textContent = text;
  }

  function stop() {
    if (controller) controller.abort();
    controller = null;
    clearTimeout(retryTimer);
  }

  function signedIn(on) {
    $("dashboard").hidden = !on;
    $("sign-out").hidden = !on;
  }

  async function errorText(response) {
    const body = await response.json().catch(() => ({}));
    return `${response.status} ${body.message || response.statusText}`;
  }

  async function connect() {
    stop();
    const own = new AbortController();
    controller = own;
    setState("connecting", "Connecting…");
    let response;
    try {
      response = await fetch("/api/stats/stream", {
        headers: { Authorization: `Bearer ${key}` },
        cache: "no-store",
        signal: own.signal,
      });
    } catch (_) {
      if (!own.signal.aborted) retry("the server cannot be reached");
      return;
    }
    if (response.status === 401) {
      signedIn(false);
      setState("refused", `Key refused: ${await errorText(response)}`);
      return;
    }
    if (!response.ok || !response.body) {
      retry(await errorText(response));
      return;
    }
    retryMs = 1000;
    signedIn(true);
    setState("live", "Live");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          handle(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (_) {
      // Aborted, or the connection broke: retried below unless aborted.
    }
    if (!own.signal.aborted) retry("the stream ended");
  }

  function retry(why) {
    setState("reconnecting", `Reconnecting: ${why}`);
    clearTimeout(retryTimer);
    retryTimer = setTimeout(() => { if (key) connect(); }, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  }

  function handle(block) {
    let name = "message";
    let data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) name = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (!data) return;
    const value = JSON.parse(data);
    if (name === "history") {
      samples = value;
      drawCharts();
    } else if (name === "sample") {
      samples.push(value);
      const oldest = value.at_ms - WINDOW_MS;
      while (samples.length && samples[0].at_ms < oldest) samples.shift();
      drawCharts();
    } else if (name === "stats") {
      render(value);
      setState("live", `Live · updated ${new Date(value.generated_at_ms).toLocaleTimeString()}`);
    }
  }

  // ---- tables ----

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function fill(tableId, items, build) {
    const body = $(tableId).querySelector("tbody");
    const rows = items.map((item) => {
      const row = document.createElement("tr");
      build(row, item);
      return row;
    });
    body.replaceChildren(...rows);
  }

  const number = (n) => n.toLocaleString();
  const rate = (n) => n.toLocaleString(undefined, { maximumFractionDigits: 2 });

  function duration(secs) {
    if (secs < 60) return `${secs} s`;
    if (secs < 3600) return `${Math.floor(secs / 60)} min`;
    if (secs < 86400) return `${Math.floor(secs / 3600)} h ${Math.floor((secs % 3600) / 60)} min`;
    return `${Math.floor(secs / 86400)} d ${Math.floor((secs % 86400) / 3600)} h`;
  }

  function render(stats) {
    const totals = stats.totals;
    $("total-instances").textContent = number(totals.instances);
    $("total-connections").textContent = number(totals.connections);
    $("total-in").textContent = rate(totals.messages_in_per_sec);
    $("total-out").textContent = rate(totals.messages_out_per_sec);
    $("total-refused").textContent = number(totals.webhooks_refused_last_minute);
    fill("instances", stats.instances, (row, i) => {
      row.dataset.instance = i.id;
      row.dataset.state = i.silent ? "silent" : i.draining ? "draining" : "live";
      cell(row, i.id, "mono");
      cell(row, i.host || "–");
      cell(row, i.version);
      cell(row, duration(i.uptime_secs));
      cell(row, number(i.connections), "n connections");
      cell(row, number(i.subscriptions), "n");
      cell(row, i.broker);
      cell(row, i.silent ? "silent" : i.draining ? "draining" : "live");
      cell(row, `${(i.report_age_ms / 1000).toFixed(1)} s ago`, "n");
    });
    fill("tenants", stats.tenants, (row, t) => {
      row.dataset.tenant = t.tenant;
      const name = cell(row, t.tenant, "mono");
      name.title = "Click to use this tenant in the actions";
      name.addEventListener("click", () => {
        $("disconnect-tenant").value = t.tenant;
        $("publish-channel").value = `tenant:${t.tenant}`;
      });
      cell(row, number(t.connections), "n connections");
      cell(row, number(t.users), "n");
      cell(row, number(t.instances), "n");
      const spread = Object.entries(t.connections_by_instance).map(([id, n]) => `${id} ${n}`);
      cell(row, spread.join(", ") || "–", "mono per-instance");
      cell(row, rate(t.messages_in_per_sec), "n messages-in");
      cell(row, rate(t.messages_out_per_sec), "n");
      const hooks = Object.entries(t.webhooks).map(([p, v]) => `${p} ${v.accepted} / ${v.refused}`);
      cell(row, hooks.join(", ") || "–", "webhooks");
    });
    const leftOut = $("tenants-left-out");
    leftOut.hidden = stats.tenants_left_out === 0;
    leftOut.textContent = `${number(stats.tenants_left_out)} quieter tenants are left out of the reports (each instance names its busiest).`;
    fill("channels", stats.top_channels, (row, c) => {
      cell(row, c.channel, "mono");
      cell(row, rate(c.messages_per_sec), "n");
      cell(row, number(c.messages_last_minute), "n");
    });
    fill("failures", stats.webhook_failures, (row, f) => {
      cell(row, new Date(f.at_ms).toLocaleTimeString());
      cell(row, f.tenant || "(invalid)", "mono");
      cell(row, f.provider || "(invalid)", "mono");
      cell(row, f.result);
      cell(row, f.reason, "reason");
    });
  }

  // ---- charts ----

  const SVG = "http://www.w3.org/2000/svg";
  const [W, H, LEFT, BOTTOM, TOP] = [600, 180, 44, 16, 8];

  function svgElement(name, attributes, text) {
    const element = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attributes)) element.setAttribute(k, v);
    if (text !== undefined) element.textContent = text;
    return element;
  }

  function colorOf(tenant) {
    if (!tenantColors.has(tenant)) tenantColors.set(tenant, COLORS[tenantColors.size % COLORS.length]);
    return tenantColors.get(tenant);
  }

  // The span drawn: the last 15 minutes, or less while the samples cover less (a minute at
  // least), so a young cluster's lines are not squeezed against the right edge.
  function span() {
    if (!samples.length) return 60 * 1000;
    const covered = samples[samples.length - 1].at_ms - samples[0].at_ms;
    return Math.min(WINDOW_MS, Math.max(60 * 1000, covered));
  }

  function ago(ms) {
    return ms >= 60 * 1000 ? `−${Math.round(ms / 60000)} min` : `−${Math.round(ms / 1000)} s`;
  }

  function drawChart(svgId, field, total) {
    const svg = $(svgId);
    const now = samples.length ? samples[samples.length - 1].at_ms : Date.now();
    const width = span();
    const from = now - width;
    const series = new Map();
    if (total) series.set("all tenants", samples.map((s) => [s.at_ms, s[total]]));
    for (const s of samples) {
      for (const t of s.tenants) {
        if (!series.has(t.tenant)) series.set(t.tenant, []);
        series.get(t.tenant).push([s.at_ms, t[field]]);
      }
    }
    let top = 0;
    for (const points of series.values()) for (const [t, v] of points) if (t >= from) top = Math.max(top, v);
    if (top === 0) top = 1;
    const x = (t) => LEFT + ((t - from) / width) * (W - LEFT - 4);
    const y = (v) => H - BOTTOM - (v / (top * 1.1)) * (H - BOTTOM - TOP);
    const children = [
      svgElement("line", { class: "axis", x1: LEFT, y1: H - BOTTOM, x2: W - 4, y2: H - BOTTOM }),
      svgElement("line", { class: "axis", x1: LEFT, y1: TOP, x2: LEFT, y2: H - BOTTOM }),
      svgElement("text", { x: LEFT - 4, y: y(top) + 4, "text-anchor": "end" }, rate(top)),
      svgElement("text", { x: LEFT - 4, y: H - BOTTOM, "text-anchor": "end" }, "0"),
      svgElement("text", { x: LEFT, y: H - 2 }, ago(width)),
      svgElement("text", { x: W - 4, y: H - 2, "text-anchor": "end" }, "now"),
    ];
    for (const [name, all] of series) {
      const points = all.filter(([t]) => t >= from);
      if (!points.length) continue;
      const line = svgElement("polyline", {
        points: points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
        stroke: name === "all tenants" ? "#99a" : colorOf(name),
        "data-series": name,
      });
      if (name === "all tenants") line.setAttribute("stroke-dasharray", "4 3");
      children.push(line);
    }
    svg.replaceChildren(...children);
  }

  function drawCharts() {
    drawChart("chart-connections", "connections", "connections");
    drawChart("chart-in", "messages_in_per_sec", "messages_in_per_sec");
    drawChart("chart-out", "messages_out_per_sec", "messages_out_per_sec");
    const shown = new Set(samples.flatMap((s) => s.tenants.map((t) => t.tenant)));
    const items = [...shown].map((tenant) => {
      const item = document.createElement("li");
      item.style.setProperty("--color", colorOf(tenant));
      item.textContent = tenant;
      return item;
    });
    $("legend").replaceChildren(...items);
  }

  // ---- actions ----

  function result(ok, text) {
    $("action-result").dataset.ok = String(ok);
    $("action-result").textContent = text;
  }

  async function act(path, body, describe) {
    try {
      const response = await fetch(path, {
        method: "POST",
        headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (response.ok) result(true, describe(await response.json()));
      else result(false, `Refused: ${await errorText(response)}`);
    } catch (error) {
      result(false, `The server cannot be reached: ${error}`);
    }
  }

  $("disconnect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const [tenant, user] = [$("disconnect-tenant").value.trim(), $("disconnect-user").value.trim()];
    act("/api/disconnect", { tenant_id: tenant, user_id: user },
      (b) => `Disconnected ${user} of ${tenant}: the order reached ${b.instances} instance(s).`);
  });

  $("publish-form").addEventListener("submit", (event) => {
    event.preventDefault();
    let payload;
    try {
      payload = JSON.parse($("publish-payload").value);
    } catch (error) {
      result(false, `The payload is not JSON: ${error.message}`);
      return;
    }
    const channel = $("publish-channel").value.trim();
    act("/api/publish", { channel, type: $("publish-type").value.trim(), payload },
      (b) => `Published to ${channel}: message ${b.message_id}.`);
  });

  // ---- signing in ----

  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key = $("key").value.trim();
    if (!key) {
      setState("refused", "Enter a server API key (one of API_KEYS).");
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    connect();
  });

  $("sign-out").addEventListener("click", () => {
    stop();
    key = "";
    sessionStorage.removeItem(KEY_STORAGE);
    $("key").value = "";
    signedIn(false);
    setState("signed-out", "Signed out.");
  });

  (async () => {
    if (!key) {
      const config = await fetch("/admin/config", { cache: "no-store" }).then((r) => r.json()).catch(() => ({}));
      if (config.demo_key) {
        key = config.demo_key;
        $("key").value = key;
      }
    }
    if (key) connect();
  })();
})();
