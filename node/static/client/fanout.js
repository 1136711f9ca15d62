// fanout.js: the browser client of a fanout cluster (SPEC §11). One ES module, no
// dependencies, no build step; the types are in fanout.d.ts beside it.
//
// What it keeps for the page: a socket to one of the nodes, moved to another when that
// one drains or dies; the user's seq stream without gap or duplicate across reconnects
// (resumed with `last_seq`, kept in localStorage per user and device); sends retried
// with the same id until acked; a token refreshed before it expires (the `auth` frame).

const EVENT_FRAMES = new Set([
  "welcome", "message", "message_delta", "session", "typing", "read", "presence",
  "notification", "resumed", "auth",
]);
const CLOSE = { GOING_AWAY: 1001, POLICY: 1008, TRY_AGAIN: 1013 };
// Sends waiting for their ack: past this, send() rejects at once (OUTBOX_FULL).
export const OUTBOX_LIMIT = 1000;
// Attempts of one send refused with a retryable error (RATE_LIMIT, UNAVAILABLE, ...).
export const SEND_ATTEMPTS = 5;
// A refresh is asked for this share of the token's lifetime before it ends (capped).
const REFRESH_SHARE = 1 / 3;
const REFRESH_MAX_LEAD = 60;
// A connection that lasted this long (ms) was a success: the back-off starts over. One
// closed sooner (a 1013 right after the welcome) keeps growing it.
const STABLE_MS = 10_000;
// Seconds before getToken() is asked again when it failed or gave no fresher token.
const STALE_RETRY = 5;

/** An error answer of the node (WebSocket `error` frame or HTTP error body). */
export class FanoutError extends Error {
  constructor(code, message, { retry = false, status = 0 } = {}) {
    super(message);
    this.name = "FanoutError";
    this.code = code;
    this.retry = retry;
    this.status = status;
  }
}

// -- pure parts (unit-tested with node --test) -----------------------------------------

/** Capped exponential back-off with equal jitter: attempt n waits in [d/2, d), d = min(max, base·2^n). */
export class Backoff {
  constructor({ base = 0.25, max = 10, random = Math.random } = {}) {
    this.base = base;
    this.max = max;
    this.random = random;
    this.attempt = 0;
  }

  /** Seconds to wait before the next attempt; each call counts one failure. */
  next() {
    const ceiling = Math.min(this.max, this.base * 2 ** this.attempt);
    this.attempt += 1;
    return ceiling / 2 + (ceiling / 2) * this.random();
  }

  reset() {
    this.attempt = 0;
  }
}

/** A Storage in memory, for where there is no localStorage (Node, private modes). */
export class MemoryStorage {
  constructor() {
    this.items = new Map();
  }
  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.items.set(key, String(value));
  }
  removeItem(key) {
    this.items.delete(key);
  }
}

/** The user's seq stream as this device has seen it: the newest seq, kept in storage. */
export class SeqTracker {
  constructor(storage, key) {
    this.storage = storage;
    this.key = key;
    const stored = Number.parseInt(storage.getItem(key) ?? "", 10);
    this.last = Number.isSafeInteger(stored) && stored >= 0 ? stored : null;
  }

  /** The `last_seq` to resume from, or null on the first connection of this device. */
  get resumeFrom() {
    return this.last;
  }

  /** A welcome's `last_seq` (the user's newest at connect). Returns whether the stream was reset. */
  welcome(newest) {
    if (this.last === null || newest < this.last) {
      // First connection: every seq after `newest` is for us. A newest below ours means
      // the cluster's log was reset (a new Redis): follow it rather than drop all as old.
      const reset = this.last !== null;
      this.set(newest);
      return reset;
    }
    return false;
  }

  /** A frame's seq: "new" (in order), "gap" (new, but seqs were skipped) or "duplicate". */
  accept(seq) {
    if (this.last !== null && seq <= this.last) return "duplicate";
    const verdict = this.last === null || seq === this.last + 1 ? "new" : "gap";
    this.set(seq);
    return verdict;
  }

  set(seq) {
    this.last = seq;
    this.storage.setItem(this.key, String(seq));
  }
}

/** Sends waiting for their ack, in order; each one's promise settles once. Bounded. */
export class Outbox {
  constructor(limit = OUTBOX_LIMIT) {
    this.limit = limit;
    this.entries = new Map(); // id -> {frame, resolve, reject, refusals}
  }

  get size() {
    return this.entries.size;
  }

  /** A promise for `frame` (a chat with an `id`), settled by ack() or fail(). */
  add(frame) {
    if (this.entries.has(frame.id)) {
      return Promise.reject(new FanoutError("DUPLICATE_ID", `send ${frame.id} is already pending`));
    }
    if (this.entries.size >= this.limit) {
      return Promise.reject(new FanoutError("OUTBOX_FULL", `${this.limit} sends await their ack`));
    }
    return new Promise((resolve, reject) => {
      this.entries.set(frame.id, { frame, resolve, reject, refusals: 0 });
    });
  }

  /** The frames to (re)send on a fresh connection, oldest first. */
  pending() {
    return [...this.entries.values()].map((entry) => entry.frame);
  }

  has(id) {
    return this.entries.has(id);
  }

  frame(id) {
    return this.entries.get(id)?.frame;
  }

  /**
   * The node refused `id` with a retryable error: true if it may be sent again, false if
   * it has been refused `maxAttempts` times (it is then rejected with `error`).
   */
  refused(id, error, maxAttempts = SEND_ATTEMPTS) {
    const entry = this.entries.get(id);
    if (!entry) return false;
    entry.refusals += 1;
    if (!error.retry || entry.refusals >= maxAttempts) {
      this.fail(id, error);
      return false;
    }
    return true;
  }

  ack(id, answer) {
    const entry = this.entries.get(id);
    if (!entry) return false; // an ack of a retry already acked
    this.entries.delete(id);
    entry.resolve(answer);
    return true;
  }

  fail(id, error) {
    const entry = this.entries.get(id);
    if (!entry) return false;
    this.entries.delete(id);
    entry.reject(error);
    return true;
  }

  failAll(error) {
    for (const id of [...this.entries.keys()]) this.fail(id, error);
  }
}

/** The claims of a JWT (not verified: the node does that), or null if it is not one. */
export function tokenClaims(token) {
  const part = typeof token === "string" ? token.split(".")[1] : undefined;
  if (!part) return null;
  try {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** Seconds from `now` until a token expiring at `exp` should be replaced (never negative). */
export function refreshDelay(exp, now, issuedAt = now) {
  const lifetime = Math.max(0, exp - Math.min(issuedAt, now));
  const lead = Math.min(REFRESH_MAX_LEAD, lifetime * REFRESH_SHARE);
  return Math.max(0, exp - lead - now);
}

/** The WebSocket URL of a node given by its base URL (http(s):// or ws(s)://). */
export function socketUrl(base, params) {
  const url = new URL("/ws", base.replace(/^http/, "ws"));
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) url.searchParams.set(name, String(value));
  }
  return url.toString();
}

/** The HTTP base URL of a node given by its base URL (ws(s):// becomes http(s)://). */
export function httpBase(base) {
  return new URL("/", base.replace(/^ws/, "http")).toString().replace(/\/$/, "");
}

/** What to do after a close with `code`: "stop", "move" (to another node now) or "backoff". */
export function closeVerdict(code, reason) {
  if (code === CLOSE.POLICY) return reason === "token expired" ? "move" : "stop";
  if (code === CLOSE.GOING_AWAY) return "move";
  return "backoff";
}

function newId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`;
}

// -- the client ------------------------------------------------------------------------

export class FanoutClient {
  constructor(options) {
    const { urls, deviceId, getToken } = options ?? {};
    if (!Array.isArray(urls) || urls.length === 0) throw new TypeError("urls: at least one node URL");
    if (typeof deviceId !== "string" || !/^[A-Za-z0-9._-]{1,64}$/.test(deviceId)) {
      throw new TypeError("deviceId: 1-64 characters of [A-Za-z0-9._-]");
    }
    if (typeof getToken !== "function") throw new TypeError("getToken: a function returning a JWT");
    this.urls = urls.map(String);
    this.deviceId = deviceId;
    this.getToken = getToken;
    this.sessionId = options.sessionId ?? null;
    this.storage = options.storage ?? globalThis.localStorage ?? new MemoryStorage();
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.backoff = new Backoff(options.backoff);
    this.outbox = new Outbox(options.outboxLimit);
    this.state = "idle";
    this.userId = null;
    this.nodeId = null;
    this.heartbeat = null;
    this.duplicates = 0;
    this.urlIndex = 0;
    this.token = null;
    this.tokenExp = 0;
    this.tokenIat = 0;
    this.seqs = null;
    this.ws = null;
    this.listeners = new Map();
    this.timers = { reconnect: null, refresh: null, silence: null, retry: new Set() };
    this.heardAt = 0;
    this.openedAt = 0;
    this.stopped = false;
  }

  // -- events ----------------------------------------------------------------------------

  /** Call `listener` for each event of `type`; returns a function that stops it. */
  on(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this.listeners.get(type)?.delete(listener);
  }

  emit(type, detail) {
    for (const listener of [...(this.listeners.get(type) ?? [])]) {
      try {
        listener(detail);
      } catch (error) {
        // A listener's bug must not break the stream for the others.
        setTimeout(() => { throw error; });
      }
    }
  }

  setState(state, detail = {}) {
    if (this.state === state) return;
    const previous = this.state;
    this.state = state;
    this.emit("state", { state, previous, ...detail });
  }

  // -- connection ------------------------------------------------------------------------

  /** Connect (and keep reconnecting until close()); resolves once the first attempt is made. */
  async connect() {
    this.stopped = false;
    if (this.ws || this.timers.reconnect) return;
    await this.open();
  }

  /** Close for good: no reconnect; unacked sends are rejected with CLOSED. */
  close() {
    this.stopped = true;
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "client closed");
    this.outbox.failAll(new FanoutError("CLOSED", "the client was closed"));
    this.setState("closed", { code: 1000, reason: "client closed" });
  }

  clearTimers() {
    clearTimeout(this.timers.reconnect);
    clearTimeout(this.timers.refresh);
    clearTimeout(this.timers.silence);
    for (const timer of this.timers.retry) clearTimeout(timer);
    this.timers.retry.clear();
    this.timers.reconnect = this.timers.refresh = this.timers.silence = null;
  }

  get url() {
    return this.urls[this.urlIndex % this.urls.length];
  }

  async currentToken(force = false) {
    const now = Date.now() / 1000;
    if (force || !this.token || refreshDelay(this.tokenExp, now, this.tokenIat) <= 0) {
      const token = await this.getToken();
      const claims = tokenClaims(token);
      if (!claims || typeof claims.sub !== "string") throw new FanoutError("BAD_TOKEN", "getToken() gave no JWT");
      if (this.userId !== null && claims.sub !== this.userId) {
        throw new FanoutError("BAD_TOKEN", "getToken() gave a token of another user");
      }
      this.token = token;
      this.tokenExp = typeof claims.exp === "number" ? claims.exp : Infinity;
      this.tokenIat = typeof claims.iat === "number" ? claims.iat : now;
      this.userId = claims.sub;
    }
    return this.token;
  }

  async open() {
    this.timers.reconnect = null;
    this.setState(this.seqs ? "reconnecting" : "connecting", { url: this.url });
    let token;
    try {
      token = await this.currentToken();
    } catch (error) {
      this.emit("error", error instanceof FanoutError ? error : new FanoutError("BAD_TOKEN", String(error)));
      this.schedule("backoff");
      return;
    }
    if (this.stopped) return;
    if (!this.seqs) this.seqs = new SeqTracker(this.storage, `fanout.last_seq.${this.userId}.${this.deviceId}`);
    const url = socketUrl(this.url, {
      device_id: this.deviceId,
      session_id: this.sessionId,
      last_seq: this.seqs.resumeFrom,
      token,
    });
    const ws = new this.WebSocket(url);
    this.ws = ws;
    let welcomed = false;
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this.heard();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return; // the node sends JSON only
      }
      if (frame.type === "welcome") welcomed = true;
      this.receive(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return; // replaced or closed by us
      this.ws = null;
      clearTimeout(this.timers.silence);
      clearTimeout(this.timers.refresh);
      // Refused before the upgrade (a browser does not say why): maybe the token.
      if (!welcomed) this.token = null;
      const verdict = welcomed ? closeVerdict(event.code, event.reason) : "backoff";
      if (welcomed && Date.now() - this.openedAt >= STABLE_MS) this.backoff.reset();
      this.emit("close", { code: event.code, reason: event.reason, url: this.url });
      if (this.stopped) return;
      if (verdict === "stop") {
        this.stopped = true;
        this.outbox.failAll(new FanoutError("CLOSED", `closed by the node: ${event.code} ${event.reason}`));
        this.setState("closed", { code: event.code, reason: event.reason });
        return;
      }
      this.schedule(verdict);
    };
  }

  /** Reconnect: to the next node now ("move") or after a jittered back-off ("backoff"). */
  schedule(verdict) {
    if (this.stopped || this.timers.reconnect) return;
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    // A draining node's clients all move at once: a few ms of jitter spreads them.
    const delay = verdict === "move" ? this.backoff.random() * 0.05 : this.backoff.next();
    this.setState("reconnecting", { url: this.url, delay });
    this.timers.reconnect = setTimeout(() => {
      this.open().catch((error) => this.emit("error", error));
    }, delay * 1000);
  }

  heard() {
    this.heardAt = Date.now();
  }

  /** Liveness: a node answers pings; one silent for 2 heartbeats is gone (half-open TCP). */
  watchSilence() {
    clearTimeout(this.timers.silence);
    if (!this.heartbeat) return;
    const interval = this.heartbeat * 1000;
    const check = () => {
      const silent = Date.now() - this.heardAt;
      if (silent >= 2 * interval) {
        this.ws?.close(4000, "node silent");
        this.dropSocket("backoff");
        return;
      }
      if (silent >= interval) this.sendFrame({ type: "ping" });
      this.timers.silence = setTimeout(check, interval / 2);
    };
    this.timers.silence = setTimeout(check, interval / 2);
  }

  dropSocket(verdict) {
    this.ws = null;
    clearTimeout(this.timers.refresh);
    this.schedule(verdict);
  }

  sendFrame(frame) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  // -- frames in -------------------------------------------------------------------------

  receive(frame) {
    this.emit("frame", frame);
    // Every frame with a seq is in the user's stream, whatever its type (SPEC §4).
    if (typeof frame.seq === "number") {
      const verdict = this.seqs.accept(frame.seq);
      if (verdict === "duplicate") {
        this.duplicates += 1;
        return; // seen before this reconnect: the page already has it
      }
      if (verdict === "gap") this.emit("gap", { seq: frame.seq });
    }
    switch (frame.type) {
      case "welcome":
        this.welcomed(frame);
        break;
      case "ack":
        this.outbox.ack(frame.id, { id: frame.id, session_id: frame.session_id });
        break;
      case "error":
        this.refused(frame);
        break;
      case "auth":
        this.scheduleRefresh(frame.expires_at);
        break;
      default:
        break;
    }
    if (EVENT_FRAMES.has(frame.type)) this.emit(frame.type, frame);
  }

  welcomed(frame) {
    this.nodeId = frame.node_id;
    this.heartbeat = frame.heartbeat;
    if (this.seqs.welcome(frame.last_seq)) this.emit("reset", { last_seq: frame.last_seq });
    this.openedAt = Date.now();
    this.setState("open", { url: this.url, nodeId: frame.node_id });
    this.watchSilence();
    this.scheduleRefresh(this.tokenExp);
    // Unacked sends go again with the same ids: the node acks a retry of an accepted
    // id again and the worker stores it once.
    for (const chat of this.outbox.pending()) this.sendFrame(chat);
  }

  refused(frame) {
    const error = new FanoutError(frame.code, frame.message, { retry: frame.retry });
    if (frame.id && this.outbox.has(frame.id)) {
      if (!this.outbox.refused(frame.id, error)) return; // rejected: send() reports it
      const timer = setTimeout(() => {
        this.timers.retry.delete(timer);
        const chat = this.outbox.frame(frame.id);
        if (chat) this.sendFrame(chat); // else acked meanwhile; if closed, the reconnect resends
      }, new Backoff({ base: 0.5 }).next() * 1000);
      this.timers.retry.add(timer);
      return;
    }
    if (frame.code === "BAD_TOKEN") this.scheduleRefresh(this.tokenExp, 1);
    this.emit("error", error);
  }

  /** Ask getToken() for a fresh token before `exp`, and hand it to the node (`auth`). */
  scheduleRefresh(exp, atLeast = 0) {
    clearTimeout(this.timers.refresh);
    if (!Number.isFinite(exp)) return;
    const now = Date.now() / 1000;
    const delay = Math.max(atLeast, refreshDelay(exp, now, Math.min(this.tokenIat ?? now, now)));
    this.timers.refresh = setTimeout(() => this.refresh(), delay * 1000);
  }

  async refresh() {
    const ws = this.ws;
    const before = this.tokenExp;
    let token;
    try {
      token = await this.currentToken(true);
      if (this.tokenExp <= before) {
        // The same token again (a page with one fixed token): sending it would change
        // nothing, and asking at once again would spin. Ask less often until it runs out.
        throw new FanoutError("STALE_TOKEN", "getToken() gave no token expiring later");
      }
    } catch (error) {
      this.emit("error", error instanceof FanoutError ? error : new FanoutError("BAD_TOKEN", String(error)));
      // Try again soon; if the token runs out first, the node closes 1008 and we reconnect.
      this.scheduleRefresh(this.tokenExp, STALE_RETRY);
      return;
    }
    if (this.ws === ws) this.sendFrame({ type: "auth", token });
  }

  // -- frames out ------------------------------------------------------------------------

  /** Send a chat; resolves with {id, session_id} on its ack, rejects with a FanoutError. */
  send(sessionId, content, metadata, { id } = {}) {
    const frame = { type: "chat", id: id ?? newId(), session_id: sessionId ?? this.sessionId, content };
    if (metadata !== undefined && metadata !== null) frame.metadata = metadata;
    if (this.stopped && this.state === "closed") {
      return Promise.reject(new FanoutError("CLOSED", "the client is closed"));
    }
    const acked = this.outbox.add(frame);
    // Sent now if open; otherwise it goes out after the next welcome (so does a send
    // whose socket dies before its ack).
    if (this.outbox.frame(frame.id) === frame && this.state === "open") this.sendFrame(frame);
    return acked;
  }

  /** Tell the session's other devices whether this one is typing (dropped while offline). */
  typing(sessionId, isTyping = true) {
    return this.sendFrame({ type: "typing", session_id: sessionId ?? this.sessionId, is_typing: Boolean(isTyping) });
  }

  /** Mark a session read up to and including `messageId` (dropped while offline). */
  read(sessionId, messageId) {
    return this.sendFrame({ type: "read", session_id: sessionId ?? this.sessionId, message_id: messageId });
  }

  // -- HTTP ------------------------------------------------------------------------------

  /** One HTTP API call on the connected node (another one if it cannot be reached). */
  async request(method, path, body) {
    const token = await this.currentToken();
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let lastError;
    // From the node the socket is on, then each other once: the start is fixed here, since
    // the socket may move to another node (urlIndex) while a call is on its way.
    const start = this.urlIndex;
    for (let i = 0; i < this.urls.length; i += 1) {
      const base = httpBase(this.urls[(start + i) % this.urls.length]);
      let response;
      try {
        response = await this.fetch(base + path, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (error) {
        lastError = error; // unreachable: the next node
        continue;
      }
      if (response.status === 204) return null;
      const data = await response.json().catch(() => null);
      if (!response.ok) {
        const error = data?.error ?? {};
        throw new FanoutError(error.code ?? `HTTP_${response.status}`, error.message ?? response.statusText, {
          status: response.status,
          retry: response.status === 503 || response.status === 429,
        });
      }
      return data;
    }
    throw new FanoutError("UNAVAILABLE", `no node answered: ${lastError}`, { retry: true });
  }

  createSession(options = {}) {
    return this.request("POST", "/api/v1/sessions", options);
  }

  listSessions({ status, limit, cursor } = {}) {
    return this.request("GET", `/api/v1/sessions${query({ status, limit, cursor })}`);
  }

  getSession(sessionId) {
    return this.request("GET", `/api/v1/sessions/${encodeURIComponent(sessionId)}`);
  }

  updateSession(sessionId, changes) {
    return this.request("PATCH", `/api/v1/sessions/${encodeURIComponent(sessionId)}`, changes);
  }

  deleteSession(sessionId) {
    return this.request("DELETE", `/api/v1/sessions/${encodeURIComponent(sessionId)}`);
  }

  addParticipant(sessionId, userId) {
    return this.request("POST", `/api/v1/sessions/${encodeURIComponent(sessionId)}/participants`, { user_id: userId });
  }

  removeParticipant(sessionId, userId) {
    const path = `/api/v1/sessions/${encodeURIComponent(sessionId)}/participants/${encodeURIComponent(userId)}`;
    return this.request("DELETE", path);
  }

  /** One page of a session's history, newest first; `next` is the cursor of the page after. */
  history(sessionId, { limit, before } = {}) {
    return this.request("GET", `/api/v1/sessions/${encodeURIComponent(sessionId)}/messages${query({ limit, before })}`);
  }

  /** Every page of a session's history, newest first (e.g. after `resumed.complete === false`). */
  async *historyPages(sessionId, { limit } = {}) {
    let before;
    do {
      const page = await this.history(sessionId, { limit, before });
      yield page;
      before = page.next;
    } while (before);
  }

  presence(userId) {
    return this.request("GET", `/api/v1/presence/${encodeURIComponent(userId)}`);
  }
}

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
