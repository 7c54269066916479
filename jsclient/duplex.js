// caddy-duplex browser client: one ES module, no dependencies. See the
// README, "JavaScript client", for the API and its guarantees.

const WS = "websocket", SSE = "sse";

/** A call that failed: code "error" (an error frame; status is its status), "timeout", "closed" or "full" (maxQueue frames wait already). */
export class DuplexError extends Error {
  constructor(code, message, status) {
    super(message);
    this.name = "DuplexError";
    this.code = code;
    this.status = status;
  }
}

/** Delay (ms) before reconnection attempt n (from 0): full jitter, random in [0, min·2ⁿ] capped at max. */
export function backoff(n, min = 500, max = 20000, random = Math.random) {
  const ceil = Math.min(min * 2 ** n, max);
  return random() * (ceil > 0 ? ceil : 0);
}

/** Opens a session on url (e.g. "/live"); see the README for options. */
export function connect(url, options) {
  return new Session(url, options);
}

// Conn is one opened connection (its open frame has arrived). Frames that
// come before the session takes it are queued.
class Conn {
  constructor(kind, open, write, drop) {
    Object.assign(this, { kind, open, write, drop, q: [], on: null, gone: false });
  }
  emit(f) { this.on ? this.on(f) : this.q.push(f); }
  end() { this.gone = true; this.off?.(); }
  attach(on, off) {
    this.on = on;
    this.off = off;
    for (const f of this.q.splice(0)) on(f);
    if (this.gone) off();
  }
}

const opened = (kind, f, write, drop, resolve, reject) => {
  if (f.type !== "open" || !f.session || !f.token) {
    drop(true);
    reject(new Error(kind + ": first frame is not open"));
    return null;
  }
  const c = new Conn(kind, f, write, drop);
  resolve(c);
  return c;
};

// failed is an opening refused with an HTTP status (not seen on WebSocket).
const failed = (msg, status) => Object.assign(new Error(msg), { status });

function openWS(s, cursor) {
  return new Promise((resolve, reject) => {
    const u = new URL(s._url);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.searchParams.set("ping", "text");
    if (cursor) u.searchParams.set("resume", cursor);
    const ws = new WebSocket(u.href);
    let c = null;
    // Dropping a connection leaves the socket to the server: a close frame
    // from the client would end the session, and the resume replaces it.
    // A socket still opening, or whose first frame was no open (bad), is
    // closed: it carries no session of ours.
    const drop = (bad) => {
      ws.onmessage = ws.onclose = ws.onerror = null;
      if (bad || ws.readyState === 0) ws.close();
    };
    const fail = (e) => { clearTimeout(t); drop(); reject(e); };
    const t = setTimeout(() => fail(new Error("websocket: no open frame in time")), s._o.openTimeout);
    s._abort = () => fail(new Error("aborted"));
    const write = (frames) => {
      for (let i = 0; i < frames.length; i++) {
        if (ws.readyState !== 1) throw { sent: i, dead: true };
        ws.send(frames[i]);
      }
    };
    ws.onmessage = (ev) => {
      let f;
      try { f = JSON.parse(ev.data); } catch { return; }
      if (!f || typeof f !== "object") return;
      if (c) return c.emit(f);
      if (f.type === "ping") return;
      clearTimeout(t);
      c = opened(WS, f, write, drop, resolve, reject);
      c && (c.ws = ws);
    };
    ws.onclose = (ev) => {
      if (c) return c.end();
      fail(new Error("websocket: closed before open (" + ev.code + ")"));
    };
  });
}

// sseParser splits an event stream into events and calls on(data) for each.
// A line or an event's data over max characters throws a RangeError: a
// stream that never ends one must not grow without bound.
export function sseParser(on, max = 16 << 20) {
  let buf = "", data = null;
  const big = () => { throw new RangeError("sse: event larger than " + max + " characters"); };
  return (chunk) => {
    buf += chunk;
    let i;
    while ((i = buf.search(/\r\n|\r|\n/)) >= 0) {
      if (buf[i] === "\r" && i === buf.length - 1) break; // \r\n may be split
      const line = buf.slice(0, i);
      buf = buf.slice(i + (buf.startsWith("\r\n", i) ? 2 : 1));
      if (line === "") {
        if (data !== null) on(data);
        data = null;
      } else if (line.startsWith("data")) {
        const v = line.slice(line[4] === ":" ? (line[5] === " " ? 6 : 5) : line.length);
        if (line.length === 4 || line[4] === ":") data = data === null ? v : data + "\n" + v;
        if (data?.length > max) big();
      }
    }
    if (buf.length > max) big();
  };
}

function openSSE(s, cursor) {
  const o = s._o, f = globalThis.fetch.bind(globalThis);
  const ac = new AbortController();
  let c = null, t;
  const drop = () => ac.abort();
  s._abort = drop;
  return new Promise((resolve, reject) => {
    t = setTimeout(() => { drop(); reject(new Error("sse: no open frame in time")); }, o.openTimeout);
    const headers = { ...o.headers, Accept: "text/event-stream" };
    if (cursor) headers["Last-Event-ID"] = cursor; // event ids are cursors
    const post = async (frames) => {
      const h = { ...o.headers, "Duplex-Token": c.open.token,
        "Content-Type": frames.length > 1 ? "application/x-ndjson" : "application/json" };
      let r;
      try {
        r = await f(s._url, { method: "POST", headers: h, body: frames.join("\n"), credentials: o.credentials, signal: ac.signal });
      } catch {
        throw { sent: frames.length, dead: true }; // it may have arrived: never sent again
      }
      r.body?.cancel?.().catch(() => {});
      // 504: a cluster node got no answer in time from the one holding the
      // session, which may still take the frames: sent, as a lost answer.
      if (r.status === 202 || r.status === 504) return;
      if (r.status === 429) throw { sent: 0, retry: Math.min(1000 * Math.max(1, +r.headers.get("Retry-After") || 1), o.maxBackoff) };
      if (r.status === 400 || r.status === 413) throw { sent: 0, status: r.status, bad: 1, msg: await r.text().catch(() => "") };
      throw { sent: 0, dead: true }; // 401 ended, 409 no stream: reconnect
    };
    const write = async (frames) => {
      try { return await post(frames); } catch (e) {
        if (!e.bad || frames.length < 2) { if (e.bad) e.at = 0; throw e; }
      }
      for (let i = 0; i < frames.length; i++) { // which one is bad?
        try { await post([frames[i]]); } catch (e) { e.sent += i; if (e.bad) e.at = i; throw e; }
      }
    };
    f(s._url, { headers, credentials: o.credentials, cache: "no-store", signal: ac.signal }).then(async (r) => {
      if (r.status !== 200 || !(r.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
        drop();
        throw failed("sse: opening refused with status " + r.status, r.status);
      }
      const rd = r.body.getReader(), dec = new TextDecoder();
      const parse = sseParser((d) => {
        let fr;
        try { fr = JSON.parse(d); } catch { return; }
        if (!fr || typeof fr !== "object") return;
        if (c) return c.emit(fr);
        if (fr.type === "ping") return;
        clearTimeout(t);
        c = opened(SSE, fr, write, drop, resolve, reject);
      }, o.maxFrameSize);
      try {
        for (;;) {
          const { done, value } = await rd.read();
          if (done) break;
          parse(dec.decode(value, { stream: true }));
        }
      } catch (e) { // an event too large breaks the connection like a read error
        if (e instanceof RangeError) s._emit("error", { status: 0, message: e.message });
      }
      drop();
      if (c) c.end();
      else throw new Error("sse: stream ended before open");
    }).catch((e) => { clearTimeout(t); reject(e); });
  });
}

const OPENERS = { [WS]: openWS, [SSE]: openSSE };

class Session extends EventTarget {
  constructor(url, options = {}) {
    super();
    this._o = { transports: [WS, SSE], headers: {}, callTimeout: 30000, openTimeout: 15000,
      minBackoff: 500, maxBackoff: 20000, ackInterval: 1000, credentials: "same-origin",
      maxFrameSize: 16 << 20, maxQueue: 1000, ...options };
    for (const t of this._o.transports) if (!OPENERS[t]) throw new TypeError("duplex: unknown transport " + t);
    this._url = new URL(url, globalThis.location?.href).href;
    this.state = "connecting";
    this.transport = this.id = null;
    this._token = "";
    this._seq = this._acked = this._n = this._try = 0;
    this._calls = new Map(); // id → {resolve, reject, timer}
    this._out = []; // frames to write: {frame, id?, ack?}
    this._conn = null;
    this.ready = new Promise((res, rej) => (this._ready = [res, rej]));
    this.ready.catch(() => {});
    this._online = () => this._wake();
    globalThis.addEventListener?.("online", this._online);
    this._dial();
  }

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  _set(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("statechange", state);
  }

  // _dial tries each transport once, in order, resuming if there is a session.
  async _dial() {
    const cursor = this._token && this._token + ":" + this._seq;
    let refused = 0, other = 0;
    for (const t of this._o.transports) {
      if (this.state === "closed") return;
      try {
        const c = await OPENERS[t](this, cursor);
        if (this.state === "closed") return c.ws ? c.ws.close(1000) : c.drop(); // closed meanwhile
        return this._opened(c);
      } catch (e) {
        if (e.status === 401 || e.status === 403) refused = e.status;
        else if (t !== WS) other++; // a WebSocket cannot tell why it failed
      }
    }
    if (this.state === "closed") return;
    if (refused && !other) {
      return this._end({ code: refused, reason: "opening refused", reconnect: false }, refused);
    }
    this._retry();
  }

  _retry() {
    this._set(this._token ? "reconnecting" : "connecting");
    this._timer = setTimeout(() => { this._timer = 0; this._dial(); },
      backoff(this._try++, this._o.minBackoff, this._o.maxBackoff));
  }

  _wake() { // back online: reconnect now
    if (!this._timer) return;
    clearTimeout(this._timer);
    this._timer = 0;
    this._try = 0;
    this._dial();
  }

  _opened(c) {
    const f = c.open;
    if (this._token && !f.resumed) { // a new session instead of ours
      this._failAll("session lost");
      this._out = [];
      this._seq = 0;
    }
    this._token = f.token;
    this.id = f.session;
    this.transport = c.kind;
    this._hb = (f.heartbeat || 0) * 1000;
    this._acked = this._seq; // the cursor acknowledged them
    this._conn = c; // backoff resets on its first frame: a server that opens and drops still gets backoff
    this._alive(c);
    this._set("open");
    const detail = { session: f.session, resumed: !!f.resumed, data: f.data, transport: c.kind };
    this._ready[0](detail);
    this._emit("open", detail);
    c.attach((fr) => this._frame(c, fr), () => this._lost(c));
    this._flush();
  }

  // _alive restarts the watchdog: two missed heartbeats and c counts as dead.
  _alive(c) {
    clearTimeout(this._dog);
    if (this._hb > 0) this._dog = setTimeout(() => this._lost(c), 2 * this._hb);
  }

  _lost(c) {
    if (c !== this._conn) return;
    this._conn = null;
    clearTimeout(this._dog);
    c.drop();
    this._retry();
  }

  _frame(c, f) {
    if (c !== this._conn) return;
    this._try = 0;
    this._alive(c);
    switch (f.type) {
      case "push":
        if (!(f.seq > this._seq)) return; // seen before a reconnect
        this._seq = f.seq;
        this._emit("push", { seq: f.seq, channel: f.channel, data: f.data });
        this._ackT ||= setTimeout(() => { this._ackT = 0; this._ackDue = true; this._flush(); }, this._o.ackInterval);
        return;
      case "ack":
      case "reply":
        return this._settle(f.ref, f.data);
      case "error":
        if (!this._settle(f.ref, undefined, new DuplexError("error", f.error || "status " + f.status, f.status))) {
          this._emit("error", { ref: f.ref, status: f.status, message: f.error });
        }
        return;
      case "close":
        this._emit("close", { code: f.code, reason: f.reason, reconnect: !!f.reconnect });
        this._conn = null;
        clearTimeout(this._dog);
        c.drop();
        if (f.reconnect) return this._retry();
        return this._end(null, 0, f.reason || "closed by the server");
    }
  }

  _settle(ref, data, err) {
    const p = ref != null && this._calls.get(String(ref));
    if (!p) return false; // not ours, or a second answer after a resume
    this._calls.delete(String(ref));
    clearTimeout(p.timer);
    err ? p.reject(err) : p.resolve(data);
    return true;
  }

  _failAll(why) {
    for (const id of [...this._calls.keys()]) this._settle(id, undefined, new DuplexError("closed", why));
  }

  // _flush writes queued frames on the current connection, in order.
  async _flush() {
    const c = this._conn;
    if (!c || this._writing) return;
    this._writing = true;
    try {
      while (c === this._conn) {
        const batch = this._out.splice(0, 64);
        if (this._ackDue && this._seq > this._acked && batch.length < 64) {
          batch.push({ frame: '{"type":"ack","seq":' + this._seq + "}", ack: 1 });
          this._acked = this._seq;
        }
        this._ackDue = false;
        if (!batch.length) break;
        try {
          await c.write(batch.map((o) => o.frame));
        } catch (e) {
          if (!(e.sent >= 0)) e = { sent: 0, dead: true }; // not ours: a broken connection
          let rest = batch.slice(e.sent);
          if (e.at !== undefined) {
            const o = batch[e.at];
            o.id && this._settle(o.id, undefined, new DuplexError("error", e.msg || "status " + e.status, e.status));
            rest = batch.slice(e.at + 1);
          }
          this._out = rest.filter((o) => !o.ack && (!o.id || this._calls.has(o.id))).concat(this._out);
          if (e.retry) await new Promise((r) => setTimeout(r, e.retry));
          else if (e.dead) { this._lost(c); break; }
        }
      }
    } finally {
      this._writing = false;
    }
    if (this._conn && this._conn !== c) this._flush();
  }

  _queue(path, data, method, id) {
    if (this.state === "closed") throw new DuplexError("closed", "session closed");
    // Bounded: while disconnected, frames wait here; past maxQueue the new one fails at once.
    if (this._out.length >= this._o.maxQueue) throw new DuplexError("full", "send queue full (" + this._o.maxQueue + " frames)");
    const f = { path };
    if (id) f.id = id;
    if (method && method.toUpperCase() !== "POST") f.method = method;
    if (data !== undefined) f.data = data;
    const o = { frame: JSON.stringify(f), id };
    this._out.push(o);
    queueMicrotask(() => this._flush());
    return o;
  }

  /** Sends a message and resolves with the reply's data (undefined for an ack). */
  call(path, data, opts = {}) {
    return new Promise((resolve, reject) => {
      const id = "c" + ++this._n;
      const o = this._queue(path, data, opts.method, id);
      const p = { resolve, reject };
      const ms = opts.timeout ?? this._o.callTimeout;
      if (ms > 0) {
        p.timer = setTimeout(() => {
          this._out = this._out.filter((x) => x !== o); // never written, then never written
          this._settle(id, undefined, new DuplexError("timeout", "no answer to " + path + " in " + ms + " ms"));
        }, ms);
      }
      this._calls.set(id, p);
    });
  }

  /** Sends a message without an id: only errors come back (as "error" events). */
  send(path, data, opts = {}) {
    this._queue(path, data, opts.method);
  }

  /** Ends the session. */
  close() {
    this._end({ code: 1000, reason: "closed by the client", reconnect: false }, 0, "session closed");
  }

  _end(detail, status, why = "opening refused") {
    if (this.state === "closed") return;
    const c = this._conn;
    this._conn = null;
    clearTimeout(this._timer);
    clearTimeout(this._dog);
    clearTimeout(this._ackT);
    this._abort?.();
    globalThis.removeEventListener?.("online", this._online);
    if (c) {
      if (c.ws) { c.ws.onclose = c.ws.onmessage = null; c.ws.close(1000); } // ends it on the server
      else c.drop(); // SSE cannot say goodbye: the server keeps it for its resume window
    }
    this._out = [];
    this._set("closed");
    this._failAll(why);
    this._ready[1](new DuplexError("closed", why, status || undefined));
    if (detail) this._emit("close", detail);
  }
}
