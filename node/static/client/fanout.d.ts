// Types of fanout.js, the browser client of a fanout cluster (SPEC §11).

/** JSON object metadata of a session or message (at most FANOUT_MAX_METADATA bytes). */
export type Metadata = { [key: string]: unknown };

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export type SessionStatus =
  | "pending" | "running" | "paused" | "completed" | "cancelled" | "failed" | "expired";

export interface Message {
  id: number;
  client_msg_id: string;
  role: "user" | "assistant" | "agent" | "system";
  user_id: string;
  device_id: string | null;
  content: string;
  created_at: string;
  metadata?: Metadata;
}

export interface Session {
  id: string;
  owner: string;
  participants: string[];
  status: SessionStatus;
  agent: "ai" | "human";
  metadata: Metadata;
  ttl: number;
  created_at: string;
  updated_at: string;
  last_activity_at: string;
  expires_at: string;
}

export interface Page<T> {
  items: T[];
  /** The cursor of the next page; null on the last one. */
  next: string | null;
}

// -- server frames (SPEC §4) --------------------------------------------------------------

export interface WelcomeFrame {
  type: "welcome";
  connection_id: string;
  node_id: string;
  user_id: string;
  device_id: string;
  last_seq: number;
  heartbeat: number;
}
export interface MessageFrame {
  type: "message";
  seq: number;
  session_id: string;
  message: Message;
}
export interface MessageDeltaFrame {
  type: "message_delta";
  session_id: string;
  /** The id of the final `message` this chunk belongs to. */
  message_id: number;
  delta: string;
}
export interface SessionFrame {
  type: "session";
  seq: number;
  session_id: string;
  /** "deleted": the session is gone (its messages' places in the log say so too). */
  status: SessionStatus | "deleted";
  agent: "ai" | "human";
  expires_at: string;
}
export interface NotificationFrame {
  type: "notification";
  /** Absent on a broadcast to every device. */
  seq?: number;
  level: "info" | "success" | "warning" | "error";
  title: string;
  body?: string;
}
export interface ReadFrame {
  type: "read";
  seq: number;
  session_id: string;
  message_id: number;
}
export interface TypingFrame {
  type: "typing";
  session_id: string;
  user_id: string;
  device_id: string;
  is_typing: boolean;
}
export interface PresenceFrame {
  type: "presence";
  user_id: string;
  device_id: string;
  status: "online" | "offline";
}
export interface ResumedFrame {
  type: "resumed";
  from: number;
  to: number;
  /** False: the log no longer held every missed seq; fetch history over HTTP. */
  complete: boolean;
}
export interface AuthFrame {
  type: "auth";
  /** The new token's `exp`, epoch seconds. */
  expires_at: number;
}
export interface AckFrame {
  type: "ack";
  id: string;
  session_id: string;
}
export interface ErrorFrame {
  type: "error";
  code: string;
  message: string;
  retry: boolean;
  id?: string;
}
export interface PongFrame {
  type: "pong";
}

export type ServerFrame =
  | WelcomeFrame | MessageFrame | MessageDeltaFrame | SessionFrame | NotificationFrame
  | ReadFrame | TypingFrame | PresenceFrame | ResumedFrame | AuthFrame | AckFrame
  | ErrorFrame | PongFrame;

// -- the client ---------------------------------------------------------------------------

export interface StateEvent {
  state: ConnectionState;
  previous: ConnectionState;
  /** The node tried or connected to. */
  url?: string;
  nodeId?: string;
  /** Seconds until the next attempt (state "reconnecting"). */
  delay?: number;
  code?: number;
  reason?: string;
}

export interface CloseEvent {
  code: number;
  reason: string;
  url: string;
}

export interface FanoutEvents {
  state: StateEvent;
  welcome: WelcomeFrame;
  message: MessageFrame;
  message_delta: MessageDeltaFrame;
  session: SessionFrame;
  typing: TypingFrame;
  read: ReadFrame;
  presence: PresenceFrame;
  notification: NotificationFrame;
  resumed: ResumedFrame;
  auth: AuthFrame;
  /** Every server frame as it arrives, duplicates included (before they are dropped). */
  frame: ServerFrame;
  close: CloseEvent;
  /** A seq arrived with seqs missing before it (the node promises this never happens). */
  gap: { seq: number };
  /** The cluster's seq stream restarted below this device's (e.g. a new Redis). */
  reset: { last_seq: number };
  /** An error not tied to a send (a send's error rejects its promise instead). */
  error: FanoutError;
}

/** Something like localStorage. */
export interface SeqStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export interface BackoffOptions {
  /** Seconds of the first delay's ceiling (default 0.25). */
  base?: number;
  /** Seconds: the ceiling never grows past this (default 10). */
  max?: number;
  /** Returns [0, 1) (default Math.random). */
  random?: () => number;
}

export interface FanoutClientOptions {
  /** Base URLs of the nodes (http(s)://host:port or ws(s)://host:port), tried in order. */
  urls: string[];
  /** This device: 1-64 characters of [A-Za-z0-9._-], stable across page loads. */
  deviceId: string;
  /** A valid JWT for the user; called at connect and again before each token expires. */
  getToken: () => string | Promise<string>;
  /** The default session of frames that name none. */
  sessionId?: string;
  /** Where `last_seq` is kept (default localStorage, else memory). */
  storage?: SeqStorage;
  backoff?: BackoffOptions;
  /** Sends awaiting their ack at most (default 1000); past it send() rejects OUTBOX_FULL. */
  outboxLimit?: number;
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
}

export interface SendResult {
  id: string;
  session_id: string;
}

export interface CreateSessionOptions {
  participants?: string[];
  agent?: "ai" | "human";
  ttl?: number;
  metadata?: Metadata;
}

export interface SessionChanges {
  status?: SessionStatus;
  agent?: "ai" | "human";
  ttl?: number;
  metadata?: Metadata;
}

export interface Presence {
  user_id: string;
  online: boolean;
  devices: { device_id: string; connection_id: string; node_id: string }[];
}

export class FanoutClient {
  constructor(options: FanoutClientOptions);
  readonly state: ConnectionState;
  /** The token's `sub`, once the first token is known. */
  readonly userId: string | null;
  /** The node of the current connection. */
  readonly nodeId: string | null;
  /** Frames dropped because their seq had been seen already. */
  readonly duplicates: number;

  /** Connect, and keep reconnecting (to any of `urls`) until close(). */
  connect(): Promise<void>;
  /** Stop for good; unacked sends reject with CLOSED. */
  close(): void;

  on<K extends keyof FanoutEvents>(type: K, listener: (event: FanoutEvents[K]) => void): () => void;
  off<K extends keyof FanoutEvents>(type: K, listener: (event: FanoutEvents[K]) => void): void;

  /** Resolves on the node's ack (retried with the same id across reconnects); rejects with FanoutError. */
  send(
    sessionId: string,
    content: string,
    metadata?: Metadata | null,
    options?: { id?: string },
  ): Promise<SendResult>;
  /** False when not connected (typing is not queued). */
  typing(sessionId: string, isTyping?: boolean): boolean;
  /** Read up to and including `messageId`; false when not connected. */
  read(sessionId: string, messageId: number): boolean;

  createSession(options?: CreateSessionOptions): Promise<Session>;
  listSessions(query?: { status?: SessionStatus; limit?: number; cursor?: string }): Promise<Page<Session>>;
  getSession(sessionId: string): Promise<Session>;
  updateSession(sessionId: string, changes: SessionChanges): Promise<Session>;
  deleteSession(sessionId: string): Promise<null>;
  addParticipant(sessionId: string, userId: string): Promise<Session>;
  removeParticipant(sessionId: string, userId: string): Promise<null>;
  /** One page of history, newest first. */
  history(sessionId: string, query?: { limit?: number; before?: string }): Promise<Page<Message>>;
  /** Every page of history, newest first. */
  historyPages(sessionId: string, query?: { limit?: number }): AsyncGenerator<Page<Message>, void, void>;
  presence(userId: string): Promise<Presence>;
}

export class FanoutError extends Error {
  constructor(code: string, message: string, options?: { retry?: boolean; status?: number });
  /** The node's error code (BAD_REQUEST, FORBIDDEN, ...), or the client's: CLOSED, OUTBOX_FULL,
   * DUPLICATE_ID, BAD_TOKEN (getToken gave no JWT), STALE_TOKEN (no token expiring later). */
  readonly code: string;
  readonly retry: boolean;
  /** The HTTP status, for an HTTP helper's error (0 otherwise). */
  readonly status: number;
}

// -- the pure parts, exported for tests and for pages that build their own -------------------

export class Backoff {
  constructor(options?: BackoffOptions);
  readonly attempt: number;
  /** Seconds to wait: in [d/2, d) with d = min(max, base * 2^attempt); counts one attempt. */
  next(): number;
  reset(): void;
  random(): number;
}

export class MemoryStorage implements SeqStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export class SeqTracker {
  constructor(storage: SeqStorage, key: string);
  readonly last: number | null;
  readonly resumeFrom: number | null;
  /** Returns true if the cluster's stream was reset below ours. */
  welcome(newest: number): boolean;
  accept(seq: number): "new" | "gap" | "duplicate";
}

export interface ChatFrame {
  type: "chat";
  id: string;
  session_id: string;
  content: string;
  metadata?: Metadata;
}

export class Outbox {
  constructor(limit?: number);
  readonly size: number;
  add(frame: ChatFrame): Promise<SendResult>;
  pending(): ChatFrame[];
  has(id: string): boolean;
  frame(id: string): ChatFrame | undefined;
  refused(id: string, error: FanoutError, maxAttempts?: number): boolean;
  ack(id: string, answer: SendResult): boolean;
  fail(id: string, error: Error): boolean;
  failAll(error: Error): void;
}

export const OUTBOX_LIMIT: number;
export const SEND_ATTEMPTS: number;
export function tokenClaims(token: string): { [claim: string]: unknown } | null;
export function refreshDelay(exp: number, now: number, issuedAt?: number): number;
export function socketUrl(base: string, params: { [name: string]: string | number | null | undefined }): string;
export function httpBase(base: string): string;
export function closeVerdict(code: number, reason: string): "stop" | "move" | "backoff";
