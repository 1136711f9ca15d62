// Unit tests of fanout.js's pure parts (node --test): seq bookkeeping, back-off, the
// outbox of unacked sends, token timing, and the client's frame handling with a fake socket.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Backoff,
  FanoutClient,
  FanoutError,
  MemoryStorage,
  Outbox,
  SeqTracker,
  closeVerdict,
  httpBase,
  refreshDelay,
  socketUrl,
  tokenClaims,
} from "../../node/static/client/fanout.js";

function jwt(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}.signature`;
}

test("seqs: new, gap and duplicate, kept in storage per key", () => {
  const storage = new MemoryStorage();
  const seqs = new SeqTracker(storage, "k");
  assert.equal(seqs.resumeFrom, null);
  assert.equal(seqs.welcome(7), false); // first connection: start after the newest
  assert.equal(seqs.accept(8), "new");
  assert.equal(seqs.accept(8), "duplicate");
  assert.equal(seqs.accept(5), "duplicate");
  assert.equal(seqs.accept(10), "gap");
  assert.equal(seqs.accept(11), "new");
  assert.equal(storage.getItem("k"), "11");
  const again = new SeqTracker(storage, "k"); // a page reload resumes where it was
  assert.equal(again.resumeFrom, 11);
  assert.equal(again.welcome(20), false); // resuming: the replay brings 12..20
  assert.equal(again.accept(11), "duplicate");
  assert.equal(again.accept(12), "new");
  assert.equal(new SeqTracker(storage, "other").resumeFrom, null);
});

test("seqs: a welcome below ours (a reset cluster) is followed, not ignored", () => {
  const storage = new MemoryStorage();
  storage.setItem("k", "500");
  const seqs = new SeqTracker(storage, "k");
  assert.equal(seqs.welcome(3), true);
  assert.equal(seqs.accept(4), "new");
});

test("seqs: garbage in storage is a first connection", () => {
  const storage = new MemoryStorage();
  storage.setItem("k", "nope");
  assert.equal(new SeqTracker(storage, "k").resumeFrom, null);
});

test("back-off grows, is capped, jitters within [d/2, d) and resets", () => {
  const low = new Backoff({ base: 1, max: 8, random: () => 0 });
  assert.deepEqual([1, 2, 3, 4, 5].map(() => low.next()), [0.5, 1, 2, 4, 4]);
  const high = new Backoff({ base: 1, max: 8, random: () => 0.999 });
  const delays = [1, 2, 3, 4, 5].map(() => high.next());
  delays.forEach((d, i) => assert.ok(d < Math.min(8, 2 ** i) && d > 0.99 * Math.min(8, 2 ** i)));
  high.reset();
  assert.ok(high.next() < 1);
  const random = new Backoff({ base: 0.25, max: 10 });
  for (let i = 0; i < 50; i += 1) {
    const ceiling = Math.min(10, 0.25 * 2 ** i);
    const d = random.next();
    assert.ok(d >= ceiling / 2 && d < ceiling, `${d} outside [${ceiling / 2}, ${ceiling})`);
  }
});

test("outbox: acked once, in order, refused retryable errors up to a bound", async () => {
  const outbox = new Outbox(2);
  const a = outbox.add({ type: "chat", id: "a", session_id: "s", content: "1" });
  const b = outbox.add({ type: "chat", id: "b", session_id: "s", content: "2" });
  await assert.rejects(outbox.add({ type: "chat", id: "c", session_id: "s", content: "3" }), {
    code: "OUTBOX_FULL",
  });
  await assert.rejects(outbox.add({ type: "chat", id: "a", session_id: "s", content: "1" }), {
    code: "DUPLICATE_ID",
  });
  assert.deepEqual(outbox.pending().map((f) => f.id), ["a", "b"]);
  assert.equal(outbox.ack("a", { id: "a", session_id: "s" }), true);
  assert.equal(outbox.ack("a", { id: "a", session_id: "s" }), false); // a retry's second ack
  assert.deepEqual(await a, { id: "a", session_id: "s" });
  assert.deepEqual(outbox.pending().map((f) => f.id), ["b"]);

  const busy = new FanoutError("RATE_LIMIT", "slow down", { retry: true });
  assert.equal(outbox.refused("b", busy, 3), true);
  assert.equal(outbox.refused("b", busy, 3), true);
  assert.equal(outbox.refused("b", busy, 3), false); // the third refusal rejects it
  await assert.rejects(b, { code: "RATE_LIMIT" });
  assert.equal(outbox.size, 0);

  const c = outbox.add({ type: "chat", id: "c", session_id: "s", content: "3" });
  assert.equal(outbox.refused("c", new FanoutError("FORBIDDEN", "no")), false); // not retryable
  await assert.rejects(c, { code: "FORBIDDEN" });
});

test("token claims and refresh timing", () => {
  const claims = tokenClaims(jwt({ sub: "ann", exp: 1000, iat: 100 }));
  assert.deepEqual(claims, { sub: "ann", exp: 1000, iat: 100 });
  assert.equal(tokenClaims("not-a-jwt"), null);
  assert.equal(tokenClaims("a.!!!.c"), null);
  assert.equal(refreshDelay(190, 100, 100), 60); // a third of the lifetime before exp
  assert.equal(refreshDelay(1000, 100, 100), 840); // ...but at most a minute ahead
  assert.equal(refreshDelay(1000, 2000, 100), 0); // already expired: now
  assert.ok(Math.abs(refreshDelay(103, 100, 100) - 2) < 1e-9); // a 3-second token: at 2 s
});

test("URLs and close verdicts", () => {
  assert.equal(
    socketUrl("http://127.0.0.1:8080", { device_id: "d", last_seq: 0, session_id: null }),
    "ws://127.0.0.1:8080/ws?device_id=d&last_seq=0",
  );
  assert.equal(socketUrl("https://x.example/", { device_id: "d" }), "wss://x.example/ws?device_id=d");
  assert.equal(httpBase("wss://x.example:9/"), "https://x.example:9");
  assert.equal(closeVerdict(1001, ""), "move");
  assert.equal(closeVerdict(1008, "token expired"), "move");
  assert.equal(closeVerdict(1008, "replaced"), "stop");
  assert.equal(closeVerdict(1013, "slow consumer"), "backoff");
  assert.equal(closeVerdict(1006, ""), "backoff");
});

// -- the client with a fake socket: what it sends and keeps across reconnects -------------

class FakeSocket {
  static made = [];
  constructor(url) {
    this.url = new URL(url);
    this.sent = [];
    this.readyState = 1;
    FakeSocket.made.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.readyState = 3;
  }
  frame(value) {
    this.onmessage({ data: JSON.stringify(value) });
  }
  drop(code, reason = "") {
    this.readyState = 3;
    this.onclose({ code, reason });
  }
}

async function until(check) {
  for (let i = 0; i < 200; i += 1) {
    if (check()) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  throw new Error("condition not met");
}

test("client: resumes with last_seq on another node, resends unacked sends, drops duplicates", async () => {
  FakeSocket.made = [];
  const storage = new MemoryStorage();
  const token = jwt({ sub: "ann", exp: Date.now() / 1000 + 3600 });
  const client = new FanoutClient({
    urls: ["http://n1", "http://n2"],
    deviceId: "a1",
    getToken: () => token,
    storage,
    WebSocket: FakeSocket,
    backoff: { base: 0.001, max: 0.002 },
  });
  const seen = [];
  client.on("message", (f) => seen.push(f.seq));
  await client.connect();
  const first = FakeSocket.made[0];
  assert.equal(first.url.host, "n1");
  assert.equal(first.url.searchParams.get("last_seq"), null);
  assert.equal(first.url.searchParams.get("token"), token);
  first.frame({ type: "welcome", node_id: "n1", last_seq: 4, heartbeat: 30 });
  assert.equal(client.state, "open");
  const sent = client.send("s1", "hello");
  const id = first.sent.at(-1).id;
  assert.deepEqual(first.sent.at(-1), { type: "chat", id, session_id: "s1", content: "hello" });
  first.frame({ type: "message", seq: 5, session_id: "s1", message: { id: 1 } });
  first.drop(1006); // the node died before the ack

  await until(() => FakeSocket.made.length === 2);
  const second = FakeSocket.made[1];
  assert.equal(second.url.host, "n2");
  assert.equal(second.url.searchParams.get("last_seq"), "5");
  assert.equal(storage.getItem("fanout.last_seq.ann.a1"), "5");
  second.frame({ type: "welcome", node_id: "n2", last_seq: 6, heartbeat: 30 });
  assert.deepEqual(second.sent.at(-1), { type: "chat", id, session_id: "s1", content: "hello" });
  second.frame({ type: "message", seq: 5, session_id: "s1", message: { id: 1 } }); // duplicate
  second.frame({ type: "message", seq: 6, session_id: "s1", message: { id: 2 } });
  second.frame({ type: "resumed", from: 6, to: 6, complete: true });
  second.frame({ type: "ack", id, session_id: "s1" });
  assert.deepEqual(await sent, { id, session_id: "s1" });
  assert.deepEqual(seen, [5, 6]);
  assert.equal(client.duplicates, 1);

  second.drop(1008, "replaced"); // policy: stop, no reconnect
  assert.equal(client.state, "closed");
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.equal(FakeSocket.made.length, 2);
});

test("client: a refused send rejects; a draining node moves the client at once", async () => {
  FakeSocket.made = [];
  const client = new FanoutClient({
    urls: ["http://n1", "http://n2"],
    deviceId: "a1",
    getToken: () => jwt({ sub: "bo", exp: Date.now() / 1000 + 3600 }),
    storage: new MemoryStorage(),
    WebSocket: FakeSocket,
    backoff: { base: 60, max: 60 }, // a back-off would outlast the test: only "move" is quick
  });
  await client.connect();
  const first = FakeSocket.made[0];
  first.frame({ type: "welcome", node_id: "n1", last_seq: 0, heartbeat: 30 });
  const refused = client.send("s1", "hi");
  const { id } = first.sent.at(-1);
  first.frame({ type: "error", code: "FORBIDDEN", message: "not a participant", retry: false, id });
  await assert.rejects(refused, (error) => error instanceof FanoutError && error.code === "FORBIDDEN");
  first.drop(1001, "node shutting down");
  await until(() => FakeSocket.made.length === 2);
  assert.equal(FakeSocket.made[1].url.host, "n2");
  client.close();
});

test("client: refreshes the token with an auth frame before it expires", async () => {
  FakeSocket.made = [];
  let minted = 0;
  const client = new FanoutClient({
    urls: ["http://n1"],
    deviceId: "a1",
    getToken: () => {
      minted += 1;
      const now = Date.now() / 1000;
      return jwt({ sub: "cy", iat: now, exp: now + 0.09 }); // refreshed ~30 ms ahead
    },
    storage: new MemoryStorage(),
    WebSocket: FakeSocket,
  });
  await client.connect();
  const socket = FakeSocket.made[0];
  socket.frame({ type: "welcome", node_id: "n1", last_seq: 0, heartbeat: 30 });
  await until(() => socket.sent.some((f) => f.type === "auth"));
  const auth = socket.sent.find((f) => f.type === "auth");
  assert.equal(tokenClaims(auth.token).sub, "cy");
  assert.equal(minted, 2);
  client.close();
});

test("client: a retryable refusal is sent again with the same id; the ack resolves it", async () => {
  FakeSocket.made = [];
  const client = new FanoutClient({
    urls: ["http://n1"],
    deviceId: "a1",
    getToken: () => jwt({ sub: "di", exp: Date.now() / 1000 + 3600 }),
    storage: new MemoryStorage(),
    WebSocket: FakeSocket,
  });
  await client.connect();
  const socket = FakeSocket.made[0];
  socket.frame({ type: "welcome", node_id: "n1", last_seq: 0, heartbeat: 30 });
  const sent = client.send("s1", "busy?");
  const { id } = socket.sent.at(-1);
  socket.frame({ type: "error", code: "RATE_LIMIT", message: "slow down", retry: true, id });
  await until(() => socket.sent.filter((f) => f.id === id).length === 2); // within ~0.5 s
  socket.frame({ type: "ack", id, session_id: "s1" });
  assert.deepEqual(await sent, { id, session_id: "s1" });
  client.close();
});

test("client: pings a silent node, then leaves it for another after two heartbeats", async () => {
  FakeSocket.made = [];
  const client = new FanoutClient({
    urls: ["http://n1", "http://n2"],
    deviceId: "a1",
    getToken: () => jwt({ sub: "ed", exp: Date.now() / 1000 + 3600 }),
    storage: new MemoryStorage(),
    WebSocket: FakeSocket,
    backoff: { base: 0.001, max: 0.002 },
  });
  await client.connect();
  const first = FakeSocket.made[0];
  first.frame({ type: "welcome", node_id: "n1", last_seq: 0, heartbeat: 0.05 });
  await until(() => first.sent.some((f) => f.type === "ping"));
  await until(() => FakeSocket.made.length === 2); // no pong: half-open, gone
  assert.equal(first.readyState, 3);
  assert.equal(FakeSocket.made[1].url.host, "n2");
  client.close();
});

test("client: a node that answers keeps the socket", async () => {
  FakeSocket.made = [];
  const client = new FanoutClient({
    urls: ["http://n1", "http://n2"],
    deviceId: "a1",
    getToken: () => jwt({ sub: "fi", exp: Date.now() / 1000 + 3600 }),
    storage: new MemoryStorage(),
    WebSocket: FakeSocket,
  });
  await client.connect();
  const socket = FakeSocket.made[0];
  socket.send = (text) => {
    FakeSocket.prototype.send.call(socket, text);
    if (JSON.parse(text).type === "ping") setTimeout(() => socket.frame({ type: "pong" }), 5);
  };
  socket.frame({ type: "welcome", node_id: "n1", last_seq: 0, heartbeat: 0.05 });
  await new Promise((resolve) => setTimeout(resolve, 300)); // six heartbeats
  assert.ok(socket.sent.filter((f) => f.type === "ping").length >= 2);
  assert.equal(FakeSocket.made.length, 1);
  assert.equal(client.state, "open");
  client.close();
});

test("client: 1013 right after each welcome backs off longer each time", async () => {
  FakeSocket.made = [];
  const client = new FanoutClient({
    urls: ["http://n1"],
    deviceId: "a1",
    getToken: () => jwt({ sub: "gu", exp: Date.now() / 1000 + 3600 }),
    storage: new MemoryStorage(),
    WebSocket: FakeSocket,
    backoff: { base: 0.01, max: 1, random: () => 0 },
  });
  const delays = [];
  client.on("state", ({ state, delay }) => { if (state === "reconnecting") delays.push(delay); });
  await client.connect();
  for (let i = 0; i < 3; i += 1) {
    const socket = FakeSocket.made[i];
    socket.frame({ type: "welcome", node_id: "n1", last_seq: 0, heartbeat: 30 });
    socket.drop(1013, "slow consumer");
    await until(() => FakeSocket.made.length === i + 2);
  }
  assert.deepEqual(delays, [0.005, 0.01, 0.02]);
  client.close();
});

test("client: a getToken that gives the same token again does not spin", async () => {
  FakeSocket.made = [];
  const fixed = jwt({ sub: "hu", iat: Date.now() / 1000, exp: Date.now() / 1000 + 0.09 });
  let asked = 0;
  const client = new FanoutClient({
    urls: ["http://n1"],
    deviceId: "a1",
    getToken: () => {
      asked += 1;
      return fixed;
    },
    storage: new MemoryStorage(),
    WebSocket: FakeSocket,
  });
  const errors = [];
  client.on("error", (error) => errors.push(error.code));
  await client.connect();
  const socket = FakeSocket.made[0];
  socket.frame({ type: "welcome", node_id: "n1", last_seq: 0, heartbeat: 30 });
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(asked, 2); // at connect, and once before expiry; the next ask is 5 s later
  assert.deepEqual(errors, ["STALE_TOKEN"]);
  assert.equal(socket.sent.filter((f) => f.type === "auth").length, 0);
  client.close();
});

test("client: an HTTP call tries every node once, even when the socket moves meanwhile", async () => {
  const asked = [];
  const client = new FanoutClient({
    urls: ["ws://dead.test/ws", "ws://alive.test/ws"],
    deviceId: "d1",
    getToken: async () => jwt({ sub: "u", exp: Math.floor(Date.now() / 1000) + 3600 }),
    storage: new MemoryStorage(),
    fetch: async (url) => {
      asked.push(new URL(url).host);
      if (url.startsWith("http://dead.test")) {
        client.urlIndex = 1; // the socket reached the other node while this call waited
        throw new TypeError("Failed to fetch");
      }
      return new Response(JSON.stringify({ items: [], next: null }), { status: 200 });
    },
  });
  assert.deepEqual(await client.listSessions(), { items: [], next: null });
  assert.deepEqual(asked, ["dead.test", "alive.test"]);
});
