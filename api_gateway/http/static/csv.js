/* CSV rows for POST /v1/readings, by the rules of scripts/import_csv.py (make import).
 *
 * Headers device_id,timestamp,usage_kwh or time,meterusage (the latter for one device);
 * header = line 1, a row's line is where it starts (a quoted field may span lines), blank
 * lines are skipped. Timestamps: ISO-8601 or YYYY-MM-DD HH:MM:SS; without an offset they
 * are local times in the chosen zone: where the clocks go back, the first row of a device at
 * a repeated local time is the earlier instant and the next one the later; a local time the
 * clocks skipped is a bad row. Usage: a number as Python's float() reads it. Bad rows carry
 * the same reasons as make import. No I/O here: pure functions, also used by the tests.
 */
"use strict";

(function () {
  const DEVICE_HEADER = ["device_id", "timestamp", "usage_kwh"];
  const METER_HEADER = ["time", "meterusage"];
  const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$/;
  const ID_RULE = "1-128 characters from A-Z a-z 0-9 . _ : - starting with a letter or digit";
  const DUPLICATE_WINDOW = 200000;

  class InputError extends Error {}

  /** Python's repr() of a str, as the CLI's messages show it. */
  function pyRepr(text) {
    const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
    let out = "";
    for (const c of text) {
      const code = c.codePointAt(0);
      if (c === "\\") out += "\\\\";
      else if (c === quote) out += "\\" + c;
      else if (c === "\n") out += "\\n";
      else if (c === "\r") out += "\\r";
      else if (c === "\t") out += "\\t";
      else if (code < 0x20 || code === 0x7f) out += "\\x" + code.toString(16).padStart(2, "0");
      else out += c;
    }
    return quote + out + quote;
  }

  /** Records of Python's csv.reader (excel dialect), each with the line it starts on. */
  function* records(text) {
    const lines = text.match(/[^\r\n]*(\r\n|\r|\n)|[^\r\n]+$/g) || [];
    let fields = [];
    let field = "";
    let state = "start_record";
    let start = 1;
    for (let index = 0; index < lines.length; index++) {
      const line = lines[index];
      if (state === "start_record") start = index + 1;
      for (const c of line) {
        const newline = c === "\n" || c === "\r";
        switch (state) {
          case "start_record":
            if (newline) { state = "eat_newline"; break; }
            state = "start_field";
          // falls through
          case "start_field":
            if (newline) { fields.push(field); field = ""; state = "eat_newline"; }
            else if (c === '"') state = "in_quoted";
            else if (c === ",") { fields.push(field); field = ""; }
            else { field += c; state = "in_field"; }
            break;
          case "in_field":
            if (newline) { fields.push(field); field = ""; state = "eat_newline"; }
            else if (c === ",") { fields.push(field); field = ""; state = "start_field"; }
            else field += c;
            break;
          case "in_quoted":
            if (c === '"') state = "quote_in_quoted";
            else field += c;
            break;
          case "quote_in_quoted":
            if (c === '"') { field += c; state = "in_quoted"; }
            else if (c === ",") { fields.push(field); field = ""; state = "start_field"; }
            else if (newline) { fields.push(field); field = ""; state = "eat_newline"; }
            else { field += c; state = "in_field"; }
            break;
          case "eat_newline":
            break; // the \n of \r\n
        }
      }
      if (state === "in_quoted") continue; // the field goes on on the next line
      if (state !== "eat_newline" && state !== "start_record") fields.push(field); // no line break
      yield { line: start, fields };
      fields = [];
      field = "";
      state = "start_record";
    }
    if (state === "in_quoted") { // unterminated quote at the end of the file (not strict)
      fields.push(field);
      yield { line: start, fields };
    }
  }

  // --- time zones ----------------------------------------------------------------------

  const formatters = new Map();
  function formatter(zone) {
    if (!formatters.has(zone)) {
      formatters.set(zone, new Intl.DateTimeFormat("en-US", {
        timeZone: zone, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
        hour: "2-digit", minute: "2-digit", second: "2-digit", era: "short",
      }));
    }
    return formatters.get(zone);
  }

  /** Local wall-clock fields of an instant (ms since the epoch) in an IANA zone. */
  function wallClock(ms, zone) {
    const parts = {};
    for (const p of formatter(zone).formatToParts(new Date(ms))) parts[p.type] = p.value;
    let year = Number(parts.year);
    if (parts.era === "BC" || parts.era === "B") year = 1 - year;
    return { year, month: Number(parts.month), day: Number(parts.day),
      hour: Number(parts.hour), minute: Number(parts.minute), second: Number(parts.second) };
  }

  function utcOffsetMs(ms, zone) {
    const whole = Math.floor(ms / 1000) * 1000;
    const w = wallClock(whole, zone);
    const asUtc = Date.UTC(w.year, w.month - 1, w.day, w.hour, w.minute, w.second);
    return asUtc - whole;
  }

  function isZone(zone) {
    try { formatter(zone); return true; } catch (_) { return false; }
  }

  /** The instants (ms) a local time names in ``zone``: none where the clocks skipped it,
   * two where they went back (earlier first), else one. Seconds resolution. */
  function localInstants(y, mo, d, h, mi, s, zone) {
    const naive = Date.UTC(y, mo - 1, d, h, mi, s);
    const day = 86400000;
    const offsets = new Set([utcOffsetMs(naive - day, zone), utcOffsetMs(naive + day, zone),
      utcOffsetMs(naive, zone)]);
    const found = new Set();
    for (const offset of offsets) {
      const candidate = naive - offset;
      if (candidate + utcOffsetMs(candidate, zone) === naive) found.add(candidate);
    }
    return [...found].sort((a, b) => a - b);
  }

  /** Local midnight of a calendar date in ``zone`` as ms (the first instant of that day). */
  function startOfLocalDay(y, mo, d, zone) {
    const found = localInstants(y, mo, d, 0, 0, 0, zone);
    if (found.length) return found[0];
    for (let minutes = 15; minutes <= 180; minutes += 15) { // midnight skipped (rare zones)
      const later = localInstants(y, mo, d, Math.floor(minutes / 60), minutes % 60, 0, zone);
      if (later.length) return later[0];
    }
    return Date.UTC(y, mo - 1, d) - utcOffsetMs(Date.UTC(y, mo - 1, d), zone);
  }

  // --- timestamps and usage --------------------------------------------------------------

  const ISO = new RegExp(
    "^(\\d{4})-?(\\d{2})-?(\\d{2})[T ]" +
    "(\\d{2})(?::?(\\d{2})(?::?(\\d{2})(?:[.,](\\d{1,6}))?)?)?" +
    "(Z|[+-]\\d{2}(?::?\\d{2}(?::?\\d{2}(?:\\.\\d{1,6})?)?)?)?$", "i");

  function pad(n, width) { return String(n).padStart(width, "0"); }

  function daysIn(year, month) { return new Date(Date.UTC(year, month, 0)).getUTCDate(); }

  function offsetSeconds(text) {
    if (text.toUpperCase() === "Z") return 0;
    const sign = text[0] === "-" ? -1 : 1;
    const digits = text.slice(1).replace(/:/g, "");
    const h = Number(digits.slice(0, 2));
    const m = Number(digits.slice(2, 4) || 0);
    const s = Number(digits.slice(4, 6) || 0);
    if (m > 59 || s > 59 || h > 23) return null;
    return sign * (h * 3600 + m * 60 + s);
  }

  /** Remembers the repeated local times already used, as scripts.import_csv.LocalTimes. */
  class LocalTimes {
    constructor(zone) { this.zone = zone; this.seenAmbiguous = new Set(); }

    resolve(f, device) {
      const found = localInstants(f.year, f.month, f.day, f.hour, f.minute, f.second, this.zone);
      if (found.length === 0) {
        const local = `${pad(f.year, 4)}-${pad(f.month, 2)}-${pad(f.day, 2)} ` +
          `${pad(f.hour, 2)}:${pad(f.minute, 2)}:${pad(f.second, 2)}` +
          (f.fraction ? "." + f.fraction.padEnd(6, "0") : "");
        throw new Error(`local time ${local} does not exist in ${this.zone} (the clocks went ` +
          "forward then); check the row, or write it with a UTC offset");
      }
      if (found.length === 1) return found[0];
      const key = JSON.stringify([device, f.year, f.month, f.day, f.hour, f.minute, f.second, f.fraction]);
      if (this.seenAmbiguous.has(key)) return found[1];
      this.seenAmbiguous.add(key);
      return found[0];
    }
  }

  /** An RFC 3339 UTC timestamp (microseconds kept) for the text, or throw with the reason. */
  function parseTimestamp(raw, zone, localTimes, device) {
    const text = raw.trim();
    if (!text) throw new Error("timestamp is empty");
    const bad = () => new Error(`timestamp ${pyRepr(text.slice(0, 40))} is not ISO-8601 ` +
      "(2024-05-01T12:00:00Z) or YYYY-MM-DD HH:MM:SS");
    const m = ISO.exec(text);
    if (!m) throw bad();
    const f = {
      year: Number(m[1]), month: Number(m[2]), day: Number(m[3]), hour: Number(m[4]),
      minute: Number(m[5] || 0), second: Number(m[6] || 0), fraction: m[7] || "",
    };
    if (f.year < 1 || f.month < 1 || f.month > 12 || f.day < 1 || f.day > daysIn(f.year, f.month) ||
        f.hour > 23 || f.minute > 59 || f.second > 59) throw bad();
    let ms;
    if (m[8]) {
      const offset = offsetSeconds(m[8]);
      if (offset === null) throw bad();
      ms = Date.UTC(f.year, f.month - 1, f.day, f.hour, f.minute, f.second) - offset * 1000;
    } else {
      ms = localTimes.resolve(f, device);
    }
    const iso = new Date(ms).toISOString(); // ms are whole seconds here
    if (iso.startsWith("+") || iso.startsWith("-")) {
      throw new Error(`timestamp ${pyRepr(text.slice(0, 40))} is out of range in ${zone}`);
    }
    return iso.slice(0, 19) + (f.fraction ? "." + f.fraction.padEnd(6, "0") : "") + "Z";
  }

  const FLOAT = /^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|inf(?:inity)?|nan)$/i;

  /** The usage column as Python's float() reads it; NaN and infinities as protobuf JSON
   * strings, so the gateway answers them with its own reason. */
  function parseUsage(raw) {
    const text = raw.trim();
    if (!FLOAT.test(text)) throw new Error(`usage ${pyRepr(text.slice(0, 40))} is not a number of kWh`);
    const lower = text.toLowerCase().replace(/^\+/, "");
    if (lower.endsWith("nan")) return "NaN";
    if (lower.startsWith("-inf")) return "-Infinity";
    if (lower.startsWith("inf")) return "Infinity";
    return Number(text);
  }

  // --- the file ---------------------------------------------------------------------------

  /** Parse a whole file: {rows: [{line, reading} | {line, reason}], duplicates}; throws
   * InputError when the file cannot be imported at all (header, device, time zone). */
  function parseCsv(text, options) {
    const zone = (options && options.zone) || "UTC";
    const device = options && options.device ? options.device.trim() : "";
    if (!isZone(zone)) throw new InputError(`unknown time zone ${pyRepr(zone)}; try UTC, Europe/Oslo`);
    const all = records(text.replace(/^\uFEFF/, ""));
    const first = all.next();
    const header = first.done ? [] : first.value.fields.map((name) => name.trim().toLowerCase());
    const joined = header.join(",");
    let width;
    if (joined === DEVICE_HEADER.join(",") && header.length === 3) width = 3;
    else if (joined === METER_HEADER.join(",") && header.length === 2) {
      if (!device) throw new InputError("a time,meterusage file needs a device id");
      if (!ID_PATTERN.test(device)) throw new InputError(`device ${pyRepr(device)} is not valid; use ${ID_RULE}`);
      width = 2;
    } else {
      const found = header.length ? joined : "nothing (empty file)";
      throw new InputError(`unknown CSV header: found '${found}', expected ` +
        `'${DEVICE_HEADER.join(",")}' or '${METER_HEADER.join(",")}' (with a device id)`);
    }
    const localTimes = new LocalTimes(zone);
    const recent = new Set();
    const order = [];
    const rows = [];
    let duplicates = 0;
    for (const { line, fields } of all) {
      if (fields.length === 0) continue; // blank line
      if (fields.length !== width) {
        rows.push({ line, reason: `${fields.length} columns, expected ${width} (${joined})` });
        continue;
      }
      const [owner, stamp, usage] = width === 2 ? [device, ...fields] : fields;
      const deviceId = owner.trim();
      try {
        const timestamp = parseTimestamp(stamp, zone, localTimes, deviceId);
        const reading = { device_id: deviceId, timestamp, usage_kwh: parseUsage(usage) };
        const key = deviceId + "|" + timestamp;
        if (recent.has(key)) duplicates += 1;
        else {
          recent.add(key);
          order.push(key);
          if (order.length > DUPLICATE_WINDOW) recent.delete(order.shift());
        }
        rows.push({ line, reading });
      } catch (error) {
        rows.push({ line, reason: error.message });
      }
    }
    return { header: joined, rows, duplicates };
  }

  window.EnergyCsv = {
    parseCsv, parseTimestamp, parseUsage, records, InputError, LocalTimes,
    localInstants, startOfLocalDay, wallClock, utcOffsetMs, isZone, pyRepr,
  };
})();
