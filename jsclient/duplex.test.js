// Unit tests of duplex.js under Node's test runner (`node --test jsclient/`):
// backoff, the event-stream parser, and frame handling against fake
// WebSocket and fetch implementations. The browser tests (browser_test.go)
// run the same module against a real Caddy.
import test from "node:test";
import assert from "node:assert/strict";
import { backoff, connect, DuplexError, sseParser } from "./duplex.js";

// FakeWS is a WebSocket whose server side the test plays.
class FakeWS {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeWS.all.push(this);
  }
  send(d) { this.sent.push(JSON.parse(d)); }
  close(code) {
    this.closedWith = code ?? 1005;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code: this.closedWith }), 0);
  }
  // server side
  accept(open) { this.readyState = 1; this.onopen?.({}); if (open) this.frame(open); }
  frame(f) { this.onmessage?.({ data: JSON.stringify(f) }); }
  drop(code = 1006) { this.readyState = 3; this.onclose?.({ code }); }
  static last() { return FakeWS.all[FakeWS.all.length - 1]; }
}
globalThis.WebSocket = FakeWS;
// Node 18 (Debian 12's) has no global CustomEvent; browsers and Node ≥ 19 do.
globalThis.CustomEvent ??= class CustomEvent extends Event {
  constructor(type, init) { super(type, init); this.detail = init?.detail ?? null; }
};

const window = new EventTarget();
globalThis.addEventListener = window.addEventListener.bind(window);
globalThis.removeEventListener = window.removeEventListener.bind(window);

const URL_ = "http://example.test/live";
const open = (extra) => ({ type: "open", session: "S1", token: "T1", resumed: false, heartbeat: 25, ...extra });

async function waitFor(what, cond, ms = 3000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("gave up waiting for " + what);
    await new Promise((r) => setTimeout(r, 2));
  }
}

// session opens a session over a FakeWS and returns it with its socket.
async function session(opts = {}) {
  const before = FakeWS.all.length;
  const s = connect(URL_, { transports: ["websocket"], minBackoff: 1, maxBackoff: 5, ackInterval: 5, ...opts });
  await waitFor("a websocket", () => FakeWS.all.length > before);
  const ws = FakeWS.last();
  ws.accept(open());
  await s.ready;
  return [s, ws];
}

async function nextSocket(n) {
  await waitFor("a new websocket", () => FakeWS.all.length > n);
  return FakeWS.last();
}

test("backoff: full jitter, doubling from min, capped at max", () => {
  assert.equal(backoff(0, 500, 20000, () => 1), 500);
  assert.equal(backoff(1, 500, 20000, () => 1), 1000);
  assert.equal(backoff(3, 500, 20000, () => 1), 4000);
  assert.equal(backoff(6, 500, 20000, () => 1), 20000);
  assert.equal(backoff(5000, 500, 20000, () => 1), 20000);
  assert.equal(backoff(4, 500, 20000, () => 0), 0);
  assert.equal(backoff(2, 500, 20000, () => 0.5), 1000);
  for (let n = 0; n < 40; n++) {
    const d = backoff(n);
    assert.ok(d >= 0 && d <= Math.min(500 * 2 ** n, 20000), `attempt ${n}: ${d}`);
  }
});

test("sseParser: events, split chunks, CRLF, comments and other fields", () => {
  const got = [];
  const feed = sseParser((d) => got.push(d));
  feed("retry: 2000\n\nid: T:0\nevent: open\nda");
  feed('ta: {"type":"open"}\r');
  feed("\n\r\n: a comment\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\n");
  feed("data: a\ndata:b\ndata\ndatax: no\n\n");
  assert.deepEqual(got, ['{"type":"open"}', '{"type":"ping"}', "a\nb\n"]);
});

test("open, call answered by reply, ack and error; a second answer is ignored", async () => {
  const [s, ws] = await session();
  assert.equal(s.state, "open");
  assert.equal(s.id, "S1");
  assert.equal(s.transport, "websocket");
  assert.equal(ws.url.searchParams.get("ping"), "text");
  assert.equal(ws.url.searchParams.get("resume"), null);

  const r = s.call("/live/a", { x: 1 });
  const a = s.call("/live/b", undefined, { method: "put" });
  const e = s.call("/live/c", 3);
  await waitFor("three frames", () => ws.sent.length === 3);
  assert.deepEqual(ws.sent, [
    { id: "c1", path: "/live/a", data: { x: 1 } },
    { id: "c2", path: "/live/b", method: "put" },
    { id: "c3", path: "/live/c", data: 3 },
  ]);
  ws.frame({ type: "reply", ref: "c1", status: 200, data: { ok: true } });
  ws.frame({ type: "reply", ref: "c1", status: 200, data: { ok: "again" } });
  ws.frame({ type: "ack", ref: "c2" });
  ws.frame({ type: "error", ref: "c3", status: 502, error: "unreachable" });
  assert.deepEqual(await r, { ok: true });
  assert.equal(await a, undefined);
  await assert.rejects(e, (err) => err instanceof DuplexError && err.code === "error" && err.status === 502 && err.message === "unreachable");
  s.close();
  assert.equal(ws.closedWith, 1000, "close() ends the session with a close frame");
});

test("pushes: in order, duplicates dropped, acked", async () => {
  const [s, ws] = await session();
  const got = [];
  s.addEventListener("push", (ev) => got.push(ev.detail));
  ws.frame({ type: "push", seq: 1, channel: "a", data: 1 });
  ws.frame({ type: "push", seq: 2, data: 2 });
  ws.frame({ type: "push", seq: 2, data: "dup" });
  ws.frame({ type: "push", seq: 1, data: "dup" });
  ws.frame({ type: "ping" });
  assert.deepEqual(got, [{ seq: 1, channel: "a", data: 1 }, { seq: 2, channel: undefined, data: 2 }]);
  await waitFor("an ack", () => ws.sent.some((f) => f.type === "ack"));
  assert.deepEqual(ws.sent.filter((f) => f.type === "ack"), [{ type: "ack", seq: 2 }]);
  s.close();
});

test("a dropped connection resumes with the cursor; a pending call is not sent again", async () => {
  const [s, ws] = await session();
  const states = [];
  s.addEventListener("statechange", () => states.push(s.state));
  const pushes = [];
  s.addEventListener("push", (ev) => pushes.push(ev.detail.seq));
  ws.frame({ type: "push", seq: 1, data: "a" });
  const p = s.call("/live/x", 1);
  await waitFor("the call", () => ws.sent.some((f) => f.id === "c1"));
  const n = FakeWS.all.length;
  ws.drop();
  const ws2 = await nextSocket(n);
  assert.equal(ws.closedWith, null, "a dropped socket gets no close frame from the client");
  assert.equal(ws2.url.searchParams.get("resume"), "T1:1");
  assert.equal(ws2.url.searchParams.get("ping"), "text");
  const opens = [];
  s.addEventListener("open", (ev) => opens.push(ev.detail));
  ws2.accept(open({ resumed: true }));
  ws2.frame({ type: "push", seq: 1, data: "a" }); // seen before
  ws2.frame({ type: "push", seq: 2, data: "b" });
  ws2.frame({ type: "reply", ref: "c1", status: 200, data: "done" });
  assert.equal(await p, "done");
  assert.deepEqual(pushes, [1, 2]);
  assert.deepEqual(opens, [{ session: "S1", resumed: true, data: undefined, transport: "websocket" }]);
  assert.deepEqual(states, ["reconnecting", "open"]);
  assert.ok(!ws2.sent.some((f) => f.id === "c1"), "the call was written once");
  s.close();
});

test("a lost session (resumed:false) rejects pending calls with code closed", async () => {
  const [s, ws] = await session();
  ws.frame({ type: "push", seq: 5, data: "a" });
  const p = s.call("/live/x");
  await waitFor("the call", () => ws.sent.length > 0);
  const n = FakeWS.all.length;
  ws.drop();
  const ws2 = await nextSocket(n);
  ws2.accept(open({ session: "S2", token: "T2" }));
  await assert.rejects(p, (err) => err.code === "closed");
  assert.equal(s.id, "S2");
  const seqs = [];
  s.addEventListener("push", (ev) => seqs.push(ev.detail.seq));
  ws2.frame({ type: "push", seq: 1, data: "new session" });
  assert.deepEqual(seqs, [1], "seq starts again in the new session");
  s.close();
});

test("a call times out; a message never written is then never written", async () => {
  const s = connect(URL_, { transports: ["websocket"], minBackoff: 1, maxBackoff: 5 });
  const p = s.call("/live/slow", null, { timeout: 20 });
  await assert.rejects(p, (err) => err.code === "timeout");
  const ws = FakeWS.last();
  ws.accept(open());
  await s.ready;
  const q = s.call("/live/next");
  await waitFor("a frame", () => ws.sent.length > 0);
  assert.deepEqual(ws.sent, [{ id: "c2", path: "/live/next" }]);
  ws.frame({ type: "ack", ref: "c2" });
  await q;
  s.close();
});

test("a close frame without reconnect ends the session; with reconnect it resumes", async () => {
  const [s, ws] = await session();
  const closes = [];
  s.addEventListener("close", (ev) => closes.push(ev.detail));
  const n = FakeWS.all.length;
  ws.frame({ type: "close", code: 4012, reason: "reload", reconnect: true });
  const ws2 = await nextSocket(n);
  assert.equal(ws2.url.searchParams.get("resume"), "T1:0");
  ws2.accept(open({ resumed: true }));
  await waitFor("open", () => s.state === "open");
  const p = s.call("/live/x");
  ws2.frame({ type: "close", code: 4000, reason: "bye", reconnect: false });
  await assert.rejects(p, (err) => err.code === "closed");
  assert.equal(s.state, "closed");
  assert.deepEqual(closes, [
    { code: 4012, reason: "reload", reconnect: true },
    { code: 4000, reason: "bye", reconnect: false },
  ]);
  assert.throws(() => s.send("/live/x"), DuplexError);
});

test("two missed heartbeats count as a dead connection", async () => {
  const before = FakeWS.all.length;
  const s = connect(URL_, { transports: ["websocket"], minBackoff: 1, maxBackoff: 5 });
  await waitFor("a websocket", () => FakeWS.all.length > before);
  const ws = FakeWS.last();
  ws.accept(open({ heartbeat: 0.02 }));
  await s.ready;
  const ws2 = await nextSocket(FakeWS.all.length);
  assert.equal(ws.closedWith, null);
  assert.equal(ws2.url.searchParams.get("resume"), "T1:0");
  s.close();
});

test("the online event cuts the backoff short", async () => {
  const [s, ws] = await session({ minBackoff: 60000, maxBackoff: 60000 });
  const n = FakeWS.all.length;
  ws.drop();
  await waitFor("reconnecting", () => s.state === "reconnecting");
  window.dispatchEvent(new Event("online"));
  const ws2 = await nextSocket(n);
  ws2.accept(open({ resumed: true }));
  await waitFor("open", () => s.state === "open");
  s.close();
});

// sseServer answers fetch like the server's SSE + POST transport.
function sseServer() {
  const srv = { posts: [], gets: [], ctl: null };
  globalThis.fetch = async (url, init = {}) => {
    const h = new Headers(init.headers);
    if ((init.method || "GET") === "GET") {
      srv.gets.push(h);
      const body = new ReadableStream({ start(c) { srv.ctl = c; } });
      init.signal?.addEventListener("abort", () => { try { srv.ctl.error(new Error("aborted")); } catch {} });
      return new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
    }
    srv.posts.push({ token: h.get("Duplex-Token"), type: h.get("Content-Type"), frames: init.body.split("\n").map((l) => JSON.parse(l)) });
    return new Response(null, { status: 202 });
  };
  srv.event = (f) => srv.ctl.enqueue(new TextEncoder().encode("event: " + f.type + "\ndata: " + JSON.stringify(f) + "\n\n"));
  return srv;
}

test("falls back to SSE when the WebSocket cannot open; calls go as POSTs", async () => {
  const srv = sseServer();
  const n = FakeWS.all.length;
  const s = connect(URL_, { headers: { Authorization: "Bearer x" }, minBackoff: 1, maxBackoff: 5 });
  const ws = await nextSocket(n);
  ws.drop(1006); // the upgrade was refused
  await waitFor("the event stream", () => srv.ctl);
  assert.equal(srv.gets[0].get("Accept"), "text/event-stream");
  assert.equal(srv.gets[0].get("Authorization"), "Bearer x");
  srv.event(open());
  const o = await s.ready;
  assert.equal(o.transport, "sse");
  assert.equal(s.transport, "sse");
  const p = s.call("/live/a", { t: 1 });
  await waitFor("a POST", () => srv.posts.length === 1);
  assert.deepEqual(srv.posts[0], { token: "T1", type: "application/json", frames: [{ id: "c1", path: "/live/a", data: { t: 1 } }] });
  srv.event({ type: "reply", ref: "c1", status: 200, data: 7 });
  assert.equal(await p, 7);
  s.close();
});

test("a POST answered 504 (not handed over in time) counts as sent: never sent again", async () => {
  const srv = sseServer();
  const answer = globalThis.fetch;
  let first = true; // the first POST is answered 504, after the server got it
  globalThis.fetch = async (url, init = {}) => {
    const r = await answer(url, init);
    if ((init.method || "GET") !== "POST" || !first) return r;
    first = false;
    return new Response("late", { status: 504 });
  };
  const s = connect(URL_, { transports: ["sse"], minBackoff: 1, maxBackoff: 5 });
  await waitFor("the event stream", () => srv.ctl);
  srv.event(open());
  try {
    await s.ready;
    s.send("/live/a");
    await waitFor("a POST", () => srv.posts.length === 1);
    const p = s.call("/live/b"); // goes out on the same stream, after /live/a
    await waitFor("a second POST", () => srv.posts.length === 2);
    srv.event({ type: "reply", ref: "c1", status: 200, data: "b" });
    assert.equal(await p, "b");
    assert.deepEqual(srv.posts.map((x) => x.frames.map((f) => f.path)), [["/live/a"], ["/live/b"]]);
    assert.equal(srv.gets.length, 1, "the event stream was kept");
  } finally {
    s.close(); // also on failure, or its reconnections keep the test process alive
  }
});

test("SSE resumes with Last-Event-ID; a 401 on every transport ends the session", async () => {
  const srv = sseServer();
  const s = connect(URL_, { transports: ["sse"], minBackoff: 1, maxBackoff: 5 });
  await waitFor("the event stream", () => srv.ctl);
  srv.event(open());
  srv.event({ type: "push", seq: 1, data: 1 });
  await s.ready;
  const first = srv.ctl;
  first.close(); // the stream ends
  await waitFor("a second GET", () => srv.gets.length === 2);
  assert.equal(srv.gets[1].get("Last-Event-ID"), "T1:1");
  srv.event(open({ resumed: true }));
  await waitFor("open", () => s.state === "open");
  globalThis.fetch = async () => new Response("no", { status: 401 });
  srv.ctl.close();
  const closed = new Promise((res) => s.addEventListener("close", (ev) => res(ev.detail)));
  assert.deepEqual(await closed, { code: 401, reason: "opening refused", reconnect: false });
  assert.equal(s.state, "closed");
});

test("a refused first opening rejects ready", async () => {
  globalThis.fetch = async () => new Response("forbidden", { status: 403 });
  const s = connect(URL_, { transports: ["sse"] });
  await assert.rejects(s.ready, (err) => err.code === "closed" && err.status === 403);
});

test("a first frame that is not an open closes the WebSocket, and the client tries again", async () => {
  const before = FakeWS.all.length;
  const s = connect(URL_, { transports: ["websocket"], minBackoff: 1, maxBackoff: 5 });
  await waitFor("a websocket", () => FakeWS.all.length > before);
  const ws = FakeWS.last();
  ws.accept({ type: "open", session: "S1" }); // no token
  const ws2 = await nextSocket(before + 1);
  assert.notEqual(ws.closedWith, null, "the bad socket is closed, not left open");
  ws2.accept(open());
  await s.ready;
  s.close();
});

test("sseParser: a line or an event over max throws instead of growing", () => {
  const got = [];
  const feed = sseParser((d) => got.push(d), 10);
  feed("data: 1234\n\n"); // 4 characters of data, a 10-character line
  assert.deepEqual(got, ["1234"]);
  assert.throws(() => { for (let i = 0; i < 5; i++) feed("xxx"); }, /larger than 10/, "a line that never ends");
  const feed2 = sseParser(() => assert.fail("no event"), 10);
  assert.throws(() => { for (let i = 0; i < 5; i++) feed2("data: abc\n"); }, /larger than 10/, "an event that never ends");
});

test("an SSE event over maxFrameSize drops the connection, is reported, and the session resumes", async () => {
  const srv = sseServer();
  const s = connect(URL_, { transports: ["sse"], minBackoff: 1, maxBackoff: 5, maxFrameSize: 200 });
  const errors = [];
  s.addEventListener("error", (ev) => errors.push(ev.detail));
  await waitFor("the event stream", () => srv.ctl);
  srv.event(open());
  srv.event({ type: "push", seq: 1, data: 1 });
  await s.ready;
  const first = srv.ctl;
  for (let i = 0; i < 20; i++) first.enqueue(new TextEncoder().encode("data: " + "x".repeat(20))); // never ends
  await waitFor("a second GET", () => srv.gets.length === 2);
  assert.equal(srv.gets[1].get("Last-Event-ID"), "T1:1");
  assert.equal(errors.length, 1);
  assert.match(errors[0].message, /sse: event larger than 200 characters/);
  srv.event(open({ resumed: true }));
  await waitFor("open", () => s.state === "open");
  s.close();
});

test("the send queue is bounded: past maxQueue, send throws and call rejects with code full", async () => {
  const before = FakeWS.all.length;
  const s = connect(URL_, { transports: ["websocket"], minBackoff: 1, maxBackoff: 5, maxQueue: 2 });
  const a = s.call("/live/a", 1, { timeout: 0 });
  s.send("/live/b");
  assert.throws(() => s.send("/live/c"), (err) => err instanceof DuplexError && err.code === "full");
  await assert.rejects(s.call("/live/d"), (err) => err instanceof DuplexError && err.code === "full");
  await waitFor("a websocket", () => FakeWS.all.length > before);
  const ws = FakeWS.last();
  ws.accept(open());
  await waitFor("two frames", () => ws.sent.length === 2);
  assert.deepEqual(ws.sent, [{ id: "c1", path: "/live/a", data: 1 }, { path: "/live/b" }]);
  s.send("/live/e"); // written: room again
  await waitFor("the third frame", () => ws.sent.length === 3);
  ws.frame({ type: "ack", ref: "c1" });
  await a;
  s.close();
});

test("calls without a timeout end when the session ends, with its reason; none is left pending", async () => {
  const [s, ws] = await session({ callTimeout: 0 });
  const written = s.call("/live/a");
  await waitFor("the call", () => ws.sent.length === 1);
  const n = FakeWS.all.length;
  ws.drop();
  await nextSocket(n); // reconnecting: the next call waits, unwritten
  const queued = s.call("/live/b", null, { timeout: -1 });
  assert.equal(s._calls.size, 2);
  s.close();
  await assert.rejects(written, (err) => err.code === "closed" && err.message === "session closed");
  await assert.rejects(queued, (err) => err.code === "closed" && err.message === "session closed");
  assert.equal(s._calls.size, 0);

  const [s2, ws2] = await session({ callTimeout: 0 });
  const p = s2.call("/live/c");
  await waitFor("the call", () => ws2.sent.length === 1);
  ws2.frame({ type: "close", code: 4000, reason: "bye", reconnect: false });
  await assert.rejects(p, (err) => err.code === "closed" && err.message === "bye");
  assert.equal(s2._calls.size, 0);
});
