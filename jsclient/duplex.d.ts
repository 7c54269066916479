// Type declarations of the caddy-duplex browser client (duplex.js).

export type Transport = "websocket" | "sse";
export type State = "connecting" | "open" | "reconnecting" | "closed";

export interface Options {
  /** Transports tried in order at every (re)connection. Default ["websocket", "sse"]. */
  transports?: Transport[];
  /** Headers of the SSE requests (the event stream and each POST); browsers cannot set headers on a WebSocket. */
  headers?: Record<string, string>;
  /** fetch credentials mode of the SSE requests. Default "same-origin". */
  credentials?: RequestCredentials;
  /** Milliseconds a call waits for its answer; 0 or less: no limit. Default 30000. */
  callTimeout?: number;
  /** Milliseconds one transport may take to deliver the open frame. Default 15000. */
  openTimeout?: number;
  /** Reconnection delay: random in [0, minBackoff·2ⁿ], capped at maxBackoff (ms). Defaults 500, 20000. */
  minBackoff?: number;
  maxBackoff?: number;
  /** Pushes are acknowledged at most this often (ms). Default 1000. */
  ackInterval?: number;
  /** Longest SSE line or event data (characters); a longer one drops the connection (an "error" event, status 0) and the session resumes. Default 16 MiB. */
  maxFrameSize?: number;
  /** Frames waiting to be written (e.g. while disconnected) at most; past it, send() throws and call() rejects with a DuplexError "full". Default 1000. */
  maxQueue?: number;
}

export interface OpenDetail {
  session: string;
  /** false after the first open: a new session, reload your state. */
  resumed: boolean;
  /** The connect hook's body, if any. */
  data?: unknown;
  transport: Transport;
}

export interface PushDetail {
  seq: number;
  channel?: string;
  data: unknown;
}

export interface CloseDetail {
  code: number;
  reason: string;
  reconnect: boolean;
}

/** An error frame that answered no call (e.g. for a send()); status 0: the client's own (an SSE event over maxFrameSize). */
export interface ErrorDetail {
  ref?: string | number;
  status: number;
  message: string;
}

export interface CallOptions {
  /** Default "POST". */
  method?: string;
  /** Overrides Options.callTimeout for this call (ms). */
  timeout?: number;
}

export interface DuplexEventMap {
  open: CustomEvent<OpenDetail>;
  push: CustomEvent<PushDetail>;
  close: CustomEvent<CloseDetail>;
  error: CustomEvent<ErrorDetail>;
  statechange: CustomEvent<State>;
}

export interface Session extends EventTarget {
  readonly state: State;
  /** The transport of the current (or last) connection; null before the first open. */
  readonly transport: Transport | null;
  /** The session id; null before the first open. */
  readonly id: string | null;
  /** Resolves with the first open; rejects with a DuplexError if the session ends before. */
  readonly ready: Promise<OpenDetail>;
  /** Sends a message; resolves with the reply's data, undefined for an ack. */
  call<T = unknown>(path: string, data?: unknown, options?: CallOptions): Promise<T>;
  /** Sends a message without an id (fire-and-forget); throws a DuplexError ("closed", "full"). */
  send(path: string, data?: unknown, options?: { method?: string }): void;
  /** Ends the session. */
  close(): void;
  addEventListener<K extends keyof DuplexEventMap>(type: K, listener: (ev: DuplexEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof DuplexEventMap>(type: K, listener: (ev: DuplexEventMap[K]) => void, options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

export class DuplexError extends Error {
  /** "error": an error frame (status is its status); "timeout": callTimeout passed; "closed": the session ended or was lost; "full": maxQueue frames wait already. */
  readonly code: "error" | "timeout" | "closed" | "full";
  readonly status?: number;
  constructor(code: "error" | "timeout" | "closed" | "full", message: string, status?: number);
}

/** Opens a session on url (absolute, or relative to the page). */
export function connect(url: string | URL, options?: Options): Session;

/** The reconnection delay before attempt n (from 0), in ms: full jitter. */
export function backoff(n: number, min?: number, max?: number, random?: () => number): number;

/** An event-stream parser: feed it text, it calls on(data) for each event's data; a line or data over max characters (default 16 MiB) throws a RangeError. */
export function sseParser(on: (data: string) => void, max?: number): (chunk: string) => void;
