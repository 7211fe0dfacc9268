/* The customer page: sign in with a device or account token, then the latest reading, a
 * usage chart (an SVG drawn here: nothing vendored), the month's bill and, for a device, a
 * CSV upload through POST /v1/readings. Talks only to the gateway that served it.
 * The token lives in this tab's sessionStorage only: never localStorage, never a cookie.
 */
"use strict";

(function () {
  const SESSION_KEY = "energy.session";
  const UPLOAD_CHUNK_ROWS = 500; // readings per POST /v1/readings
  const UPLOADS_IN_FLIGHT = 2;
  // Tries of a call refused for its rate (429), while the gateway is unavailable (503) or
  // unreachable; between tries the wait is Retry-After, or a backoff without one.
  const READ_TRIES = 4;
  const UPLOAD_TRIES = 6; // per chunk
  const MAX_REPORTED_PROBLEMS = 50; // as make import
  // The chart's drawing units are the screen's pixels (the viewBox is the SVG's width when
  // drawn), so its text stays readable at phone width; a resize draws it again.
  const CHART = { height: 260, left: 56, right: 12, top: 14, bottom: 40 };
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  let session = null; // {kind: "device" | "account", id, token}
  let drawn = null; // the chart's last arguments, for a redraw on resize

  // --- talking to the gateway -------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const message = (body && body.message) || `HTTP ${status}`;
      super(message);
      this.status = status;
      this.code = body && body.code;
      this.retryAfterS = null;
    }
    get refused() { return this.status === 401 || this.status === 403; }
  }

  /** A field by its proto name or its JSON (lowerCamelCase) name. */
  function pick(object, name) {
    if (!object) return undefined;
    if (name in object) return object[name];
    const camel = name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
    return object[camel];
  }

  /** ``path``'s answer, tried up to ``tries`` times while it is refused for a while only. */
  async function api(path, options, tries = READ_TRIES) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await callOnce(path, options);
      } catch (error) {
        const again = error.status === 429 || error.status === 503 || error.status === 0;
        if (!again || attempt >= tries || !session) throw error;
        const backoffS = Math.min(0.5 * 2 ** (attempt - 1), 10) * (0.5 + Math.random() / 2);
        await sleep(1000 * (error.retryAfterS !== null ? error.retryAfterS : backoffS));
      }
    }
  }

  async function callOnce(path, options) {
    if (!session) throw new ApiError(0, { message: "signed out" });
    const headers = { Accept: "application/json", Authorization: `Bearer ${session.token}` };
    if (options && options.body) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
    } catch (error) {
      throw new ApiError(0, { message: `the gateway cannot be reached (${error.message})` });
    }
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { body = { message: text.slice(0, 200) }; }
    if (!response.ok) {
      const error = new ApiError(response.status, body);
      const after = Number(response.headers.get("Retry-After"));
      if (Number.isFinite(after) && after >= 0) error.retryAfterS = after;
      throw error;
    }
    return body || {};
  }

  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // --- small view helpers -----------------------------------------------------------------

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function money(amount, currency) {
    if (amount === undefined || amount === null || amount === "") return "";
    return currency ? `${amount} ${currency}` : String(amount);
  }

  function formatInstant(iso, zone, withSeconds) {
    if (!iso) return "";
    const options = { timeZone: zone, year: "numeric", month: "short", day: "numeric",
      hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
    if (withSeconds) options.second = "2-digit";
    return new Intl.DateTimeFormat(undefined, options).format(new Date(iso));
  }

  function browserZone() {
    try { return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC"; } catch (_) { return "UTC"; }
  }

  function fillZones(select, selected) {
    let zones = [];
    try { zones = Intl.supportedValuesOf("timeZone"); } catch (_) { zones = []; }
    zones = [...new Set(["UTC", selected, ...zones])].filter(Boolean);
    select.replaceChildren(...zones.map((zone) => {
      const option = el("option", zone);
      option.value = zone;
      option.selected = zone === selected;
      return option;
    }));
  }

  function todayIn(zone) {
    const w = EnergyCsv.wallClock(Date.now(), zone);
    const pad = (n) => String(n).padStart(2, "0");
    return { date: `${w.year}-${pad(w.month)}-${pad(w.day)}`, month: `${w.year}-${pad(w.month)}` };
  }

  // --- signing in and out -----------------------------------------------------------------

  function subjectKind() {
    return document.querySelector('input[name="kind"]:checked').value;
  }

  function clearData() {
    $("latest").replaceChildren();
    $("usage-chart").replaceChildren(el("title", "Usage chart"));
    $("usage-chart").firstChild.id = "usage-chart-title";
    $("usage-table").tBodies[0].replaceChildren();
    $("usage-summary").textContent = "";
    $("bill-lines").replaceChildren();
    $("bill-total").textContent = "";
    $("bill-status").textContent = "";
    $("bill-meta").textContent = "";
    $("account-devices").tBodies[0].replaceChildren();
    $("device-select").replaceChildren();
    $("upload-report").hidden = true;
    $("upload-status").textContent = "";
    $("upload-progress").value = 0;
  }

  function signOut(message) {
    session = null;
    sessionStorage.removeItem(SESSION_KEY);
    clearData();
    $("dashboard").hidden = true;
    $("sign-in").hidden = false;
    $("who").hidden = true;
    $("sign-out").hidden = true;
    showError(message || "");
    $("token").value = "";
    if (message) $("token").focus();
  }

  /** A refusal of the token ends the session: an error, and no data left on the page. */
  function handleFailure(error, what) {
    if (!session) return; // signed out meanwhile: say nothing more
    if (error instanceof ApiError && error.refused) {
      signOut(`Signed out: the gateway refused the token (${error.status}): ${error.message}`);
    } else {
      showError(`${what}: ${error.message}`);
    }
  }

  async function signIn(kind, id, token) {
    session = { kind, id, token };
    showError("");
    try {
      // Proves the token before anything is shown: the account's bill, or the device's
      // latest reading (404 there only means no readings yet).
      if (kind === "account") {
        await api(`/v1/accounts/${enc(id)}/bill`);
      } else {
        try { await api(`/v1/devices/${enc(id)}/latest`); } catch (error) {
          if (error.status !== 404) throw error;
        }
      }
    } catch (error) {
      session = null;
      sessionStorage.removeItem(SESSION_KEY);
      const why = error.refused ? `the gateway refused the token (${error.status})` : "cannot sign in";
      signOut(`Not signed in: ${why}: ${error.message}`);
      return false;
    }
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
    $("sign-in").hidden = true;
    $("dashboard").hidden = false;
    $("who").textContent = `${kind === "account" ? "Account" : "Device"} ${id}`;
    $("who").hidden = false;
    $("sign-out").hidden = false;
    $("account-section").hidden = kind !== "account";
    $("upload-readonly").hidden = kind !== "account";
    $("upload-form").hidden = kind === "account";
    $("upload-progress-box").hidden = kind === "account";
    $("upload-device").value = kind === "device" ? id : "";
    $("dashboard-title").focus();
    await refreshAll();
    return true;
  }

  // --- the data -----------------------------------------------------------------------------

  function currentDevice() {
    return session.kind === "device" ? session.id : $("device-select").value;
  }

  async function refreshAll() {
    await loadBill(); // for an account, lists its devices first
    await Promise.all([loadLatest(), loadUsage()]);
  }

  async function loadLatest() {
    const list = $("latest");
    const device = currentDevice();
    list.replaceChildren();
    if (!device) { list.append(el("dd", "No device on this account's bill.")); return; }
    let reading;
    try {
      reading = pick(await api(`/v1/devices/${enc(device)}/latest`), "reading");
    } catch (error) {
      if (error.status === 404) { list.append(el("dt", "Device"), el("dd", `${device}: no readings yet`)); return; }
      handleFailure(error, "Latest reading");
      return;
    }
    const zone = $("usage-zone").value || browserZone();
    list.append(
      el("dt", "Device"), el("dd", pick(reading, "device_id")),
      el("dt", "Interval ending"), el("dd", formatInstant(pick(reading, "timestamp"), zone, true)),
      el("dt", "Energy used"), el("dd", `${pick(reading, "usage_kwh") || 0} kWh`, "big"),
    );
    list.lastChild.id = "latest-usage";
  }

  /** [start, end) of the chosen day, week (Monday on) or month, in ms, in ``zone``. */
  function usageRange(range, dateText, zone) {
    let [y, m, d] = dateText.split("-").map(Number);
    if (range === "week") {
      const weekday = (new Date(Date.UTC(y, m - 1, d)).getUTCDay() + 6) % 7; // Monday = 0
      const monday = new Date(Date.UTC(y, m - 1, d - weekday));
      [y, m, d] = [monday.getUTCFullYear(), monday.getUTCMonth() + 1, monday.getUTCDate()];
    }
    if (range === "month") d = 1;
    const days = range === "day" ? 1 : range === "week" ? 7 : 0;
    const next = days ? new Date(Date.UTC(y, m - 1, d + days)) : new Date(Date.UTC(y, m, 1));
    const start = EnergyCsv.startOfLocalDay(y, m, d, zone);
    const end = EnergyCsv.startOfLocalDay(next.getUTCFullYear(), next.getUTCMonth() + 1, next.getUTCDate(), zone);
    return [start, end];
  }

  async function loadUsage() {
    const device = currentDevice();
    const zone = $("usage-zone").value;
    const windowSize = $("usage-window").value;
    if (!device || !$("usage-date").value) return;
    const [start, end] = usageRange($("usage-range").value, $("usage-date").value, zone);
    const query = new URLSearchParams({
      start: new Date(start).toISOString(), end: new Date(end).toISOString(), window: windowSize, time_zone: zone,
    });
    $("usage-summary").textContent = "Loading usage…";
    let buckets;
    try {
      buckets = pick(await api(`/v1/devices/${enc(device)}/usage?${query}`), "buckets") || [];
    } catch (error) {
      $("usage-summary").textContent = "";
      drawChart([], zone, windowSize);
      handleFailure(error, "Usage");
      return;
    }
    const points = buckets.map((b) => ({
      start: pick(b, "start"), count: Number(pick(b, "count") || 0), kwh: Number(pick(b, "sum_kwh") || 0),
    }));
    drawChart(points, zone, windowSize);
    const total = points.reduce((sum, p) => sum + p.kwh, 0);
    const readings = points.reduce((sum, p) => sum + p.count, 0);
    $("usage-summary").textContent = `${device}: ${total.toFixed(3)} kWh in ${readings} readings, ` +
      `${points.length} windows of ${windowSize} (${zone})`;
    $("usage-table").tBodies[0].replaceChildren(...points.map((p) => {
      const row = el("tr");
      row.append(el("td", formatInstant(p.start, zone)), el("td", String(p.count)), el("td", p.kwh.toFixed(3)));
      return row;
    }));
  }

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const step = 10 ** Math.floor(Math.log10(value));
    for (const factor of [1, 2, 2.5, 5, 10]) if (factor * step >= value) return factor * step;
    return 10 * step;
  }

  /** A bar per window (kWh), four grid lines, and a few start times under the axis. */
  function drawChart(points, zone, windowSize) {
    const chart = $("usage-chart");
    drawn = [points, zone, windowSize];
    const { height, left, right, top, bottom } = CHART;
    const width = Math.max(300, Math.round(chart.getBoundingClientRect().width) || 640);
    chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const title = svg("title", { id: "usage-chart-title" },
      points.length ? `Usage in kWh per ${windowSize} window, ${points.length} windows` : "No usage to show");
    chart.replaceChildren(title);
    if (!points.length) return;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const max = niceMax(Math.max(...points.map((p) => p.kwh)));
    const grid = svg("g", { class: "grid" });
    for (let i = 0; i <= 4; i++) {
      const y = top + plotH - (plotH * i) / 4;
      grid.append(svg("line", { x1: left, x2: width - right, y1: y, y2: y }));
      const label = String(+((max * i) / 4).toFixed(3)) + (i === 4 ? " kWh" : "");
      grid.append(svg("text", { x: i === 4 ? 4 : left - 6, y: i === 4 ? y - 3 : y + 4, "text-anchor": i === 4 ? "start" : "end" }, label));
    }
    chart.append(grid);
    const bars = svg("g", { class: "bars" });
    const slot = plotW / points.length;
    const barW = Math.max(slot * 0.8, 0.5);
    points.forEach((p, i) => {
      const h = (p.kwh / max) * plotH;
      const rect = svg("rect", {
        class: "bar", x: (left + i * slot + (slot - barW) / 2).toFixed(2), y: (top + plotH - h).toFixed(2),
        width: barW.toFixed(2), height: h.toFixed(2), "data-kwh": p.kwh, "data-start": p.start,
      });
      rect.append(svg("title", {}, `${formatInstant(p.start, zone)}: ${p.kwh.toFixed(3)} kWh, ${p.count} readings`));
      bars.append(rect);
    });
    chart.append(bars);
    const axis = svg("g", { class: "axis" });
    axis.append(svg("line", { x1: left, x2: width - right, y1: top + plotH, y2: top + plotH }));
    const labels = Math.min(points.length, width < 480 ? 2 : 4);
    for (let k = 0; k < labels; k++) {
      const i = labels === 1 ? 0 : Math.round((k * (points.length - 1)) / (labels - 1));
      const x = left + i * slot + slot / 2;
      const anchor = k === 0 ? "start" : k === labels - 1 ? "end" : "middle";
      axis.append(svg("text", { x: x.toFixed(1), y: height - bottom + 18, "text-anchor": anchor },
        formatInstant(points[i].start, zone)));
    }
    chart.append(axis);
  }

  function billStatus(value) {
    if (value === 2 || value === "BILL_STATUS_ISSUED") return "issued";
    if (value === 1 || value === "BILL_STATUS_ESTIMATE") return "estimate";
    return "estimate";
  }

  function linesTable(bill, caption) {
    const table = el("table", undefined, "lines");
    table.append(el("caption", caption));
    const head = el("tr");
    for (const name of ["Item", "Quantity", "Unit price", "Amount"]) {
      const th = el("th", name, name === "Amount" ? "num" : undefined); th.scope = "col"; head.append(th);
    }
    table.append(el("thead")); table.tHead.append(head);
    const body = el("tbody");
    const currency = pick(bill, "currency") || "";
    for (const line of pick(bill, "lines") || []) {
      const row = el("tr");
      const unit = pick(line, "unit");
      row.append(
        el("td", pick(line, "description")),
        el("td", unit ? `${pick(line, "quantity")} ${unit}` : (pick(line, "quantity") || "")),
        el("td", pick(line, "unit_price") ? `${pick(line, "unit_price")}${unit ? ` per ${unit}` : ""}` : ""),
        el("td", money(pick(line, "amount"), currency), "num"),
      );
      body.append(row);
    }
    for (const adjustment of pick(bill, "adjustments") || []) {
      const row = el("tr");
      row.append(el("td", `Adjustment of ${pick(adjustment, "period")}`),
        el("td", `${pick(adjustment, "energy_kwh")} kWh`), el("td", ""),
        el("td", money(pick(adjustment, "amount"), currency), "num"));
      body.append(row);
    }
    table.append(body);
    const foot = el("tfoot");
    for (const [name, key] of [["Subtotal", "subtotal"], ["Tax", "tax"], ["Total", "total"]]) {
      if (pick(bill, key) === undefined) continue;
      const row = el("tr");
      const th = el("th", name); th.scope = "row"; th.colSpan = 3;
      row.append(th, el("td", money(pick(bill, key), currency), "num"));
      foot.append(row);
    }
    table.append(foot);
    const wrap = el("div", undefined, "table-wrap");
    wrap.tabIndex = 0;
    wrap.setAttribute("role", "region");
    wrap.setAttribute("aria-label", caption);
    wrap.append(table);
    return wrap;
  }

  async function loadBill() {
    const period = $("bill-period").value;
    const query = period ? `?period=${enc(period)}` : "";
    const path = session.kind === "account"
      ? `/v1/accounts/${enc(session.id)}/bill${query}` : `/v1/devices/${enc(session.id)}/bill${query}`;
    let answer;
    try {
      answer = await api(path);
    } catch (error) {
      $("bill-lines").replaceChildren();
      $("bill-total").textContent = "";
      handleFailure(error, "Bill");
      return;
    }
    const target = $("bill-lines");
    if (session.kind === "account") {
      const bills = pick(answer, "bills") || [];
      const currency = pick(answer, "currency") || "";
      const total = pick(answer, "total") || "0";
      $("bill-total").textContent = money(total, currency);
      $("bill-total").dataset.amount = total;
      $("bill-status").textContent = billStatus(pick(answer, "status"));
      $("bill-meta").textContent = billMeta(answer, pick(answer, "period"));
      $("account-period").textContent = pick(answer, "period") || period;
      showAccountDevices(bills, total, currency);
      target.replaceChildren(...bills.map((bill) => {
        const details = el("details");
        details.open = bills.length <= 3;
        details.append(el("summary", `${pick(bill, "device_id")}: ${money(pick(bill, "total"), pick(bill, "currency"))}`));
        details.append(linesTable(bill, `Bill of ${pick(bill, "device_id")}`));
        return details;
      }));
    } else {
      const bill = pick(answer, "bill") || {};
      $("bill-total").textContent = money(pick(bill, "total"), pick(bill, "currency"));
      $("bill-total").dataset.amount = pick(bill, "total") || "";
      $("bill-status").textContent = billStatus(pick(bill, "status"));
      $("bill-meta").textContent = billMeta(bill, pick(bill, "period")) +
        (pick(bill, "tariff_id") ? `, tariff ${pick(bill, "tariff_id")}` : "") +
        (pick(bill, "energy_kwh") ? `, ${pick(bill, "energy_kwh")} kWh` : "");
      target.replaceChildren(linesTable(bill, `Bill lines for ${pick(bill, "period") || period}`));
    }
  }

  function billMeta(bill, period) {
    const parts = [`Period ${period || ""}`];
    if (pick(bill, "bill_id")) parts.push(`bill ${pick(bill, "bill_id")} no. ${pick(bill, "number")}`);
    if (pick(bill, "issued_at")) parts.push(`issued ${formatInstant(pick(bill, "issued_at"), browserZone())}`);
    else if (pick(bill, "as_of")) parts.push(`as of ${formatInstant(pick(bill, "as_of"), browserZone())}`);
    return parts.join(", ");
  }

  function showAccountDevices(bills, total, currency) {
    const whole = Number(total);
    const body = $("account-devices").tBodies[0];
    body.replaceChildren(...bills.map((bill) => {
      const share = whole > 0 ? (100 * Number(pick(bill, "total") || 0)) / whole : 0;
      const row = el("tr");
      const bar = el("span", undefined, "share-bar");
      bar.style.width = `${Math.min(share, 100).toFixed(1)}%`;
      const shareCell = el("td", undefined, "share");
      shareCell.append(el("span", `${share.toFixed(1)} %`), el("span", undefined, "share-track"));
      shareCell.lastChild.append(bar);
      row.append(el("td", pick(bill, "device_id")), el("td", pick(bill, "energy_kwh") || "0", "num"),
        el("td", money(pick(bill, "total"), currency), "num"), shareCell);
      return row;
    }));
    const select = $("device-select");
    const chosen = select.value;
    select.replaceChildren(...bills.map((bill) => {
      const option = el("option", pick(bill, "device_id"));
      option.value = pick(bill, "device_id");
      return option;
    }));
    if (chosen && [...select.options].some((o) => o.value === chosen)) select.value = chosen;
  }

  // --- CSV upload -------------------------------------------------------------------------

  function postChunk(readings) {
    // A JSON array of SendReadingRequest, the SendReadings stream of the gRPC API: one
    // message carrying the chunk's readings (the gateway's cost is mostly per message).
    const body = JSON.stringify([{ readings }]);
    return api("/v1/readings", { method: "POST", body }, UPLOAD_TRIES);
  }

  async function upload(file) {
    const status = $("upload-status");
    const progress = $("upload-progress");
    $("upload-report").hidden = true;
    const started = performance.now();
    let parsed;
    try {
      parsed = EnergyCsv.parseCsv(await file.text(), {
        zone: $("upload-zone").value, device: $("upload-device").value,
      });
    } catch (error) {
      status.textContent = `Not uploaded: ${error.message}`;
      return;
    }
    const problems = [];
    const chunks = [];
    let current = { lines: [], readings: [] };
    for (const row of parsed.rows) {
      if (row.reason) { problems.push({ line: row.line, reason: row.reason }); continue; }
      current.lines.push(row.line);
      current.readings.push(row.reading);
      if (current.readings.length === UPLOAD_CHUNK_ROWS) { chunks.push(current); current = { lines: [], readings: [] }; }
    }
    if (current.readings.length) chunks.push(current);
    const summary = { read: parsed.rows.length, accepted: 0, local: problems.length, gateway: 0, failure: "" };
    progress.max = Math.max(chunks.length, 1);
    progress.value = 0;
    let answered = 0;
    const report = () => {
      status.textContent = `${answered} of ${chunks.length} chunks answered: ` +
        `${summary.accepted} rows accepted, ${summary.local + summary.gateway} rejected`;
    };
    report();
    let next = 0;
    const worker = async () => {
      while (next < chunks.length && !summary.failure) {
        const chunk = chunks[next++];
        try {
          const reply = await postChunk(chunk.readings);
          const rejected = pick(reply, "rejected") || [];
          const count = Number(pick(reply, "rejected_count") || rejected.length);
          summary.accepted += Number(pick(reply, "accepted") || 0);
          summary.gateway += count;
          for (const r of rejected) {
            problems.push({ line: chunk.lines[Number(pick(r, "index") || 0)], reason: `gateway: ${pick(r, "reason")}` });
          }
          if (count > rejected.length) {
            const after = rejected.length ? Number(pick(rejected[rejected.length - 1], "index") || 0) + 1 : 0;
            problems.push({ line: chunk.lines[Math.min(after, chunk.lines.length - 1)],
              reason: `gateway: ${count - rejected.length} more rows up to line ${chunk.lines[chunk.lines.length - 1]} rejected, not listed` });
          }
        } catch (error) {
          if (!summary.failure) {
            summary.failure = `the chunk of lines ${chunk.lines[0]}-${chunk.lines[chunk.lines.length - 1]} ` +
              `failed (${error.status || "no answer"}): ${error.message}`;
          }
          if (error.refused && session && session.kind === "account") break;
        }
        answered += 1;
        progress.value = answered;
        report();
      }
    };
    await Promise.all(Array.from({ length: Math.min(UPLOADS_IN_FLIGHT, chunks.length) }, worker));
    const elapsedS = (performance.now() - started) / 1000;
    const rejected = summary.local + summary.gateway;
    $("upload-summary").textContent = `Rows read: ${summary.read}, accepted: ${summary.accepted}, ` +
      `rejected: ${rejected} (${summary.local} in the file, ${summary.gateway} by the gateway), ` +
      `duplicates in file: ${parsed.duplicates}; ${elapsedS.toFixed(2)} s.` +
      (summary.failure ? ` FAILED: ${summary.failure}. Upload again: accepted rows are not billed twice.` : "");
    problems.sort((a, b) => a.line - b.line);
    const items = problems.slice(0, MAX_REPORTED_PROBLEMS).map((p) => {
      const item = el("li", `line ${p.line}: ${p.reason}`);
      item.dataset.line = p.line;
      return item;
    });
    if (rejected > items.length) items.push(el("li", `… and ${rejected - items.length} more rejected rows (${rejected} in total)`, "more"));
    $("upload-problems").replaceChildren(...items);
    $("upload-report").hidden = false;
    status.textContent = summary.failure ? "Upload failed" : "Upload finished";
    if (summary.accepted) await Promise.all([loadLatest(), loadUsage(), loadBill()]);
  }

  // --- wiring -------------------------------------------------------------------------------

  function busy(button, work) {
    return async (event) => {
      event.preventDefault();
      if (button.disabled) return;
      button.disabled = true;
      try { await work(); } finally { button.disabled = false; }
    };
  }

  function start() {
    const zone = browserZone();
    fillZones($("usage-zone"), zone);
    fillZones($("upload-zone"), "UTC"); // make import's default
    const today = todayIn(zone);
    $("usage-date").value = today.date;
    $("bill-period").value = today.month;

    for (const radio of document.querySelectorAll('input[name="kind"]')) {
      radio.addEventListener("change", () => {
        $("subject-label").textContent = subjectKind() === "account" ? "Account id" : "Device id";
      });
    }
    $("sign-in-form").addEventListener("submit", busy($("sign-in-button"), async () => {
      const id = $("subject-id").value.trim();
      const token = $("token").value.trim();
      if (!id || !token) { showError("Give the id and the token."); (id ? $("token") : $("subject-id")).focus(); return; }
      await signIn(subjectKind(), id, token);
    }));
    $("sign-out").addEventListener("click", () => { signOut(""); $("subject-id").focus(); });
    $("usage-form").addEventListener("submit", busy($("usage-show"), loadUsage));
    $("bill-form").addEventListener("submit", busy($("bill-show"), loadBill));
    $("device-select").addEventListener("change", () => Promise.all([loadLatest(), loadUsage()]));
    $("upload-form").addEventListener("submit", busy($("upload-button"), async () => {
      const file = $("upload-file").files[0];
      if (!file) { $("upload-status").textContent = "Choose a CSV file first."; $("upload-file").focus(); return; }
      await upload(file);
    }));

    let resizing = 0;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => { if (drawn && session) drawChart(...drawn); }, 150);
    });

    const saved = sessionStorage.getItem(SESSION_KEY);
    if (saved) {
      try {
        const { kind, id, token } = JSON.parse(saved);
        document.querySelector(`input[name="kind"][value="${kind === "account" ? "account" : "device"}"]`).checked = true;
        $("subject-id").value = id;
        signIn(kind, id, token);
      } catch (_) { sessionStorage.removeItem(SESSION_KEY); }
    }
    document.body.dataset.ready = "true";
  }

  start();
})();
