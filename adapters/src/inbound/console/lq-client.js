// lq-client.js — a small browser client for lq-realtime (no dependencies, an ES module).
//
// It keeps one connection open: a WebSocket to /ws or, where WebSockets do not get through, a
// Server-Sent Events stream from /sse, whose client frames are POSTed to /sse/{connection_id}.
// Over either transport it
// - reconnects after any close it may reconnect after, with exponential backoff and jitter;
//   a refused handshake is explained (status and the server's message) and, for a 401 or 403,
//   ends the retries until connect() is called with another token;
// - resumes where it stopped: every envelope of a tenant or user channel carries its `offset`
//   and `epoch`, the client remembers the latest of each channel and reconnects with
//   `since=<epoch>:<offset>` (tenant channel) and `user_since=` (user channel), so the server
//   replays what was missed (`welcome.payload.recovered === true`) or says it cannot
//   (`recovered === false`: resync from your own backend);
// - refreshes its token before it expires with a `refresh` frame, asking `getToken()` for a
//   fresh one, and asks again before every reconnection;
// - keeps its topic subscriptions: `subscribe(name, {onMessage})` subscribes now and again after
//   every reconnection, from the last position it saw in the topic (`since`), and again when the
//   server ends a subscription that missed messages (`unsubscribed` with `resubscribe: true`).
//
//   import { LqClient } from "./lq-client.js";
//   const client = new LqClient({
//     url: "wss://realtime.example.com/ws",
//     getToken: async () => (await fetch("/my-backend/realtime-token")).text(),
//     onEnvelope: (envelope) => console.log(envelope.type, envelope.payload),
//     onWelcome: (welcome) => { if (welcome.payload.recovered === false) resyncFromBackend(); },
//   });
//   client.connect();
//   client.message({ text: "hello" });
//   const orders = client.subscribe("orders", { onMessage: (m) => render(m.payload) });
//   client.publish("orders", { id: 7 });
//   orders.unsubscribe();

/** What each close code means, as docs/protocol.md lists them, and whether to reconnect. */
export const CLOSE_CODES = {
  1000: { meaning: "closed normally", reconnect: false },
  1001: { meaning: "server shutting down or draining, or idle timeout", reconnect: true },
  1002: { meaning: "protocol error", reconnect: false },
  1006: { meaning: "connection lost without a close frame (network, server down, or refused)", reconnect: true },
  1007: { meaning: "invalid UTF-8", reconnect: false },
  1008: { meaning: "policy violation: kept flooding past the rate limit", reconnect: true, delayMs: 10000 },
  1009: { meaning: "message over MAX_MESSAGE_BYTES", reconnect: false },
  1011: { meaning: "internal error", reconnect: true },
  4001: { meaning: "token expired and not refreshed", reconnect: true },
  4003: { meaning: "disconnected on purpose: inactive, or by a backend", reconnect: false },
  4008: { meaning: "slow consumer: outbound queue overflowed", reconnect: true },
  4009: { meaning: "the instance missed messages: reconnect with since to recover", reconnect: true, delayMs: 0 },
};

/** The meaning of a close code. */
export function describeClose(code) {
  return (CLOSE_CODES[code] || { meaning: "unknown close code" }).meaning;
}

/** Seconds since the epoch at which a JWT expires, or null when it cannot be read. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4))).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

/** Browsers' timers take at most 2^31 - 1 ms. */
const LONGEST_TIMER_MS = 2147483647;

/** How long the request that asks why a handshake was refused may take. */
const REFUSAL_TIMEOUT_MS = 5000;

/** Refusals only another token (or origin) can change: the client stops on them. */
const STOP_ON_REFUSAL = ["unauthorized", "forbidden", "origin_not_allowed"];

/** WebSocket attempts in a row that end with 1006 before a welcome until "auto" uses SSE. */
const WEBSOCKET_FAILURES_BEFORE_FALLBACK = 2;

/** The /sse URL beside a /ws URL: ws: becomes http:, wss: https:, and /ws /sse. */
export function sseUrlFor(url) {
  return url.replace(/^ws(s?):/, "http$1:").replace(/\/ws$/, "/sse");
}

/**
 * The transports. Each opens one connection with `query` (token and resume positions) and
 * returns its link: `send(frame)` says whether the frame was taken, `close()` whether the
 * connection was still open. `on.frame(text)` gets every frame the client receives, and
 * `on.closed(code, reason)` the end, with a WebSocket close code, once.
 */
const TRANSPORTS = {
  websocket(client, query, on) {
    const socket = new WebSocket(`${client.options.url}${query}`);
    socket.onmessage = (event) => on.frame(event.data);
    socket.onclose = (event) => on.closed(event.code, event.reason);
    return {
      send(frame) {
        if (socket.readyState !== WebSocket.OPEN) return false;
        socket.send(JSON.stringify(frame));
        return true;
      },
      close() {
        if (socket.readyState > WebSocket.OPEN) return false;
        socket.close(1000, "bye");
        return true;
      },
    };
  },

  sse(client, query, on) {
    const url = client.options.sseUrl || sseUrlFor(client.options.url);
    const source = new EventSource(`${url}${query}`);
    let ended = false;
    const end = (code, reason) => {
      if (ended) return;
      ended = true;
      source.close();
      on.closed(code, reason);
    };
    source.onmessage = (event) => on.frame(event.data);
    source.addEventListener("close", (event) => {
      let close = {};
      try {
        close = JSON.parse(event.data);
      } catch {
        // A close event without its code: the connection is lost all the same.
      }
      end(typeof close.code === "number" ? close.code : 1006, close.reason || "");
    });
    // A lost or refused stream. The EventSource's own reconnection is not used: the client's
    // asks getToken for a token first, and sends its latest positions.
    source.onerror = () => end(1006, "");
    // One POST at a time, so that frames reach the server in the order they were sent, as over
    // a WebSocket.
    let posting = Promise.resolve();
    const post = async (body, token, connectionId) => {
      const response = await fetch(`${url}/${encodeURIComponent(connectionId)}`, {
        method: "POST",
        headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
        body,
      });
      if (ended) return;
      if (response.status === 404) {
        end(1006, "the stream is gone");
      } else if (response.status === 200) {
        on.frame(await response.text());
      } else if (!response.ok) {
        // A refused POST ({code, message}) reaches onEnvelope as the error frame it stands for.
        const payload = await response.json().catch(() => ({ code: "http_" + response.status, message: "" }));
        on.frame(JSON.stringify({ type: "error", payload }));
      }
    };
    return {
      send(frame) {
        const connectionId = client.connectionId;
        if (ended || !connectionId) return false;
        const body = JSON.stringify(frame);
        const token = client.token;
        // A POST that fails on the network changes nothing: the stream's own error reconnects.
        posting = posting.then(() => post(body, token, connectionId)).catch(() => {});
        return true;
      },
      close() {
        const open = !ended;
        ended = true;
        source.close();
        return open;
      },
    };
  },
};

export class LqClient {
  /**
   * @param {object} options
   * @param {string} options.url             the /ws URL (ws:// or wss://)
   * @param {"auto"|"websocket"|"sse"} [options.transport] "auto" (default): WebSocket, and
   *        SSE once WebSocket has failed to connect (see chooseTransport)
   * @param {string} [options.sseUrl]         the /sse URL (default: sseUrlFor(url))
   * @param {() => Promise<string>|string} options.getToken   a current token, asked before
   *        every connection and before the token in use expires
   * @param {(envelope: object) => void} [options.onEnvelope] every frame but welcome
   * @param {(welcome: object) => void} [options.onWelcome]
   * @param {(state: string, detail?: object) => void} [options.onState] "connecting",
   *        "open" (detail: {recovered: true | false | null when not resuming}), "reconnecting"
   *        (detail: {code, reason, meaning, delayMs}), "closed" (detail: {code, reason, meaning});
   *        every detail also has `transport`, "websocket" or "sse". A handshake the server
   *        refused adds `refused: {status, code, message}` (the client fetches the reason, which
   *        browsers hide); after a 401 or 403 the client stops until connect() is called again,
   *        and with no token (getToken gives an empty one) it stops at once
   * @param {boolean} [options.presence]  receive the tenant's presence.join and presence.leave
   *        (presence=1 when connecting)
   * @param {number} [options.minDelayMs]  first reconnection delay (default 500)
   * @param {number} [options.maxDelayMs]  longest reconnection delay (default 15000)
   */
  constructor(options) {
    this.options = { minDelayMs: 500, maxDelayMs: 15000, transport: "auto", ...options };
    if (!["auto", "websocket", "sse"].includes(this.options.transport)) {
      throw new Error(`transport must be "auto", "websocket" or "sse", not ${this.options.transport}`);
    }
    this.positions = {}; // channel -> {offset, epoch}
    this.subscriptions = new Map(); // topic name -> Subscription
    this.tenantId = null; // from the welcome
    this.state = "idle";
    this.transport = null; // of the current or last attempt: "websocket" or "sse"
    this.link = null; // the open connection, see TRANSPORTS
    this.token = null;
    this.connectionId = null; // from the welcome; SSE posts frames to it
    this.welcomed = false; // the current connection got its welcome
    this.websocketFailures = 0; // see chooseTransport
    this.websocketWorked = false;
    this.attempts = 0;
    this.stopped = true;
    // Bumped by every connect() and disconnect(): events of an older connection are ignored.
    this.generation = 0;
    this.timers = { reconnect: null, refresh: null };
  }

  /** Opens the connection (and keeps it open until disconnect()). */
  connect() {
    this.retire();
    this.stopped = false;
    this.attempts = 0;
    this.websocketFailures = 0;
    this.websocketWorked = false;
    this.open(this.generation);
  }

  /** Closes the connection with 1000 and stops reconnecting. */
  disconnect() {
    const wasOpen = this.retire();
    this.stopped = true;
    this.setState("closed", { code: 1000, reason: wasOpen ? "closed by the client" : "", meaning: describeClose(1000) });
  }

  /** Ends the current connection and timers; their later events are ignored. */
  retire() {
    this.generation += 1;
    this.clearTimers();
    const link = this.link;
    this.link = null;
    return link ? link.close() : false;
  }

  /**
   * Sends a frame; returns false when the connection is not open. Over SSE the answer to the
   * POST (a pong, an error, refreshed…) reaches onEnvelope like a WebSocket reply.
   */
  send(frame) {
    return this.link ? this.link.send(frame) : false;
  }

  message(payload) { return this.send({ type: "message", payload }); }
  direct(toUser, payload) { return this.send({ type: "direct", to_user: toUser, payload }); }
  /** Asks who is online in the tenant or, given a topic's name, who is present in the topic. */
  presence(topic) { return this.send(topic ? { type: "presence", channel: topic } : { type: "presence" }); }
  /** Publishes to topic `name` of the tenant (the token must allow pub on it). */
  publish(name, payload) { return this.send({ type: "message", channel: name, payload }); }

  /**
   * Subscribes to topic `name` of the tenant, now if connected and after every reconnection,
   * from the last position seen in it; returns the subscription (`unsubscribe()` ends it).
   * @param {string} name   the topic's name (1-128 of A-Z a-z 0-9 . _ -)
   * @param {object} [handlers]
   * @param {(envelope: object) => void} [handlers.onMessage]  the topic's messages
   * @param {(subscribed: object) => void} [handlers.onSubscribed]  each `subscribed` frame;
   *        `payload.recovered === false` means what was missed is gone: resync from your backend
   * @param {(reason: string, frame: object) => void} [handlers.onUnsubscribed]  the server
   *        ended it ("server", "revoked") or refused it (an error code: "forbidden", "limit"…)
   * @param {boolean} [handlers.presence]  be one of the topic's present members and receive
   *        its joins and leaves (the token must allow presence)
   * @param {(envelope: object) => void} [handlers.onPresence]  presence.join / presence.leave
   * @param {() => Promise<string>|string} [handlers.getToken]  a subscription token, asked
   *        before every subscribe, for a topic the connection's caps do not allow
   */
  subscribe(name, handlers = {}) {
    const subscription = {
      name,
      handlers,
      position: null, // {epoch, offset}: where the client stands in the topic
      active: false,
      unsubscribe: () => {
        if (this.subscriptions.get(name) !== subscription) return false;
        this.subscriptions.delete(name);
        return this.send({ type: "unsubscribe", channel: name });
      },
    };
    const previous = this.subscriptions.get(name);
    if (previous) subscription.position = previous.position;
    this.subscriptions.set(name, subscription);
    if (this.welcomed) this.sendSubscribe(subscription);
    return subscription;
  }

  /** Sends the `subscribe` frame of `subscription`, from where it stands. */
  async sendSubscribe(subscription) {
    const frame = { type: "subscribe", channel: subscription.name };
    if (subscription.position) frame.since = `${subscription.position.epoch}:${subscription.position.offset}`;
    if (subscription.handlers.presence) frame.presence = true;
    if (subscription.handlers.getToken) {
      try {
        frame.token = await subscription.handlers.getToken();
      } catch {
        return; // Subscribed again at the next reconnection.
      }
    }
    if (this.subscriptions.get(subscription.name) === subscription) this.send(frame);
  }

  /** The subscription a frame of channel `topic:<tenant>:<name>` or `presence:<tenant>:<name>` belongs to. */
  subscriptionOf(channel) {
    if (typeof channel !== "string") return null;
    const [kind, tenant, name] = channel.split(":");
    if ((kind !== "topic" && kind !== "presence") || tenant !== this.tenantId || !name) return null;
    return this.subscriptions.get(name) || null;
  }

  /** Routes a frame to its subscription; returns whether it belonged to one. */
  receiveTopic(frame) {
    // A refusal names its topic in its payload.
    const channel = frame.type === "error" ? frame.payload && frame.payload.channel : frame.channel;
    const subscription = this.subscriptionOf(channel);
    if (!subscription) return false;
    const { handlers } = subscription;
    if (frame.type === "subscribed") {
      subscription.active = true;
      // When recovered, the replayed messages that follow move the position on.
      if (frame.payload.recovered !== true || !subscription.position) subscription.position = frame.payload.position || null;
      if (handlers.onSubscribed) handlers.onSubscribed(frame);
    } else if (frame.type === "unsubscribed") {
      subscription.active = false;
      if (frame.payload.resubscribe) {
        this.sendSubscribe(subscription);
      } else {
        this.subscriptions.delete(subscription.name);
        if (handlers.onUnsubscribed) handlers.onUnsubscribed(frame.payload.reason, frame);
      }
    } else if (frame.type === "error") {
      // Refused while subscribing: the subscription is given up. An error about an active
      // subscription answers a publish or a presence question, and changes nothing.
      if (subscription.active) return true;
      this.subscriptions.delete(subscription.name);
      if (handlers.onUnsubscribed) handlers.onUnsubscribed(frame.payload.code, frame);
    } else if (frame.type === "presence.join" || frame.type === "presence.leave") {
      if (handlers.onPresence) handlers.onPresence(frame);
    } else if (channel.startsWith("topic:")) {
      if (typeof frame.offset === "number" && frame.epoch) subscription.position = { offset: frame.offset, epoch: frame.epoch };
      if (frame.type !== "presence" && handlers.onMessage) handlers.onMessage(frame);
    }
    return true;
  }

  setState(state, detail) {
    this.state = state;
    if (this.options.onState) this.options.onState(state, { transport: this.transport, ...detail });
  }

  clearTimers() {
    clearTimeout(this.timers.reconnect);
    clearTimeout(this.timers.refresh);
  }

  /** The resume part of the query: the last position of the tenant and user channels. */
  resumeQuery() {
    let query = this.options.presence ? "&presence=1" : "";
    for (const [channel, position] of Object.entries(this.positions)) {
      const value = encodeURIComponent(`${position.epoch}:${position.offset}`);
      if (channel.startsWith("tenant:")) query += `&since=${value}`;
      if (channel.startsWith("user:")) query += `&user_since=${value}`;
    }
    return query;
  }

  /**
   * The transport of the next attempt. "auto" takes SSE when there is no WebSocket, or when
   * WebSocket attempts end with 1006 before a welcome WEBSOCKET_FAILURES_BEFORE_FALLBACK times
   * in a row, until connect(); not once a WebSocket got a welcome, since then a 1006 means the
   * server or the network went away, not that WebSockets are blocked.
   */
  chooseTransport() {
    const { transport } = this.options;
    if (transport !== "auto") return transport;
    if (typeof WebSocket === "undefined") return "sse";
    const blocked = !this.websocketWorked && this.websocketFailures >= WEBSOCKET_FAILURES_BEFORE_FALLBACK;
    return blocked ? "sse" : "websocket";
  }

  async open(generation) {
    this.transport = this.chooseTransport();
    this.setState(this.attempts === 0 ? "connecting" : "reconnecting");
    let token;
    try {
      token = await this.options.getToken();
    } catch (error) {
      if (generation === this.generation && !this.stopped) {
        this.scheduleReconnect(generation, { code: 1006, reason: `no token: ${error.message || error}` });
      }
      return;
    }
    if (generation !== this.generation || this.stopped) return;
    if (!token) {
      // Nothing to connect with: retrying would only loop. connect() again once there is one.
      this.stopped = true;
      this.setState("closed", { code: null, reason: "no token: getToken gave none", meaning: "no token to connect with" });
      return;
    }
    const exp = tokenExpiry(token);
    if (exp !== null && exp * 1000 <= Date.now()) {
      // The server would refuse it: only a fresh token helps.
      this.stopped = true;
      this.setState("closed", { code: 4001, reason: "the token has expired and getToken gave no fresh one", meaning: describeClose(4001) });
      return;
    }
    this.token = token;
    this.connectionId = null;
    this.welcomed = false;
    const query = `?token=${encodeURIComponent(token)}${this.resumeQuery()}`;
    this.query = query;
    this.link = TRANSPORTS[this.transport](this, query, {
      frame: (data) => {
        if (generation === this.generation) this.receive(data);
      },
      closed: (code, reason) => {
        if (generation === this.generation) this.closed(generation, code, reason);
      },
    });
  }

  /**
   * Why the server refused the handshake of `query`, since browsers do not tell: the same URL
   * fetched without an upgrade is answered with the refusal ({status, code, message}), or is
   * not refused (null: the network, or the server going away, broke the attempt).
   */
  async refusal(query) {
    const base = this.transport === "sse"
      ? this.options.sseUrl || sseUrlFor(this.options.url)
      : this.options.url.replace(/^ws(s?):/, "http$1:");
    const controller = new AbortController();
    // A network that never answers must not hold the reconnection up.
    const timeout = setTimeout(() => controller.abort(), REFUSAL_TIMEOUT_MS);
    try {
      const response = await fetch(`${base}${query}`, { cache: "no-store", signal: controller.signal });
      // 426: the token passed and only the upgrade is missing; 200: a stream opened.
      if (response.ok || response.status === 426) {
        controller.abort();
        return null;
      }
      const body = await response.json().catch(() => ({}));
      // Only this service's own answers count: a proxy's error page is a blocked path, not a
      // refusal of the token.
      if (typeof body.code !== "string" || typeof body.message !== "string") return null;
      return { status: response.status, code: body.code, message: body.message };
    } catch {
      return null;
    } finally {
      clearTimeout(timeout);
    }
  }

  /** The connection ended with `code`: reconnect or stop, as CLOSE_CODES says. */
  async closed(generation, code, reason) {
    this.link = null;
    clearTimeout(this.timers.refresh);
    if (code === 1006 && !this.welcomed && !this.stopped) {
      const refused = await this.refusal(this.query || "");
      if (generation !== this.generation) return;
      if (refused) {
        const info = { code, reason: refused.message, meaning: `refused by the server: ${refused.status} ${refused.code || ""}`.trim(), refused };
        if (STOP_ON_REFUSAL.includes(refused.code)) {
          // Only another token helps: stop until connect() is called with one.
          this.stopped = true;
          this.setState("closed", info);
        } else {
          this.scheduleReconnect(generation, info);
        }
        return;
      }
    }
    if (this.transport === "websocket" && code === 1006 && !this.welcomed) this.websocketFailures += 1;
    const info = { code, reason, meaning: describeClose(code) };
    const rule = CLOSE_CODES[code] || { reconnect: true };
    if (this.stopped || !rule.reconnect) {
      this.stopped = true;
      this.setState("closed", info);
    } else {
      this.scheduleReconnect(generation, info, rule.delayMs);
    }
  }

  receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame.channel && typeof frame.offset === "number" && frame.epoch && !frame.channel.startsWith("topic:")) {
      this.positions[frame.channel] = { offset: frame.offset, epoch: frame.epoch };
    }
    if (frame.type === "welcome") {
      this.attempts = 0;
      this.welcomed = true;
      this.connectionId = frame.payload.connection_id || null;
      this.tenantId = frame.payload.tenant_id || null;
      if (this.transport === "websocket") {
        this.websocketWorked = true;
        this.websocketFailures = 0;
      }
      // When recovered, the replayed envelopes that follow move the positions on; otherwise
      // the client starts from where the server stands.
      for (const [channel, position] of Object.entries(frame.payload.positions || {})) {
        if (frame.payload.recovered !== true || !this.positions[channel]) this.positions[channel] = position;
      }
      this.scheduleRefresh(tokenExpiry(this.token));
      const recovered = typeof frame.payload.recovered === "boolean" ? frame.payload.recovered : null;
      this.setState("open", { recovered });
      if (this.options.onWelcome) this.options.onWelcome(frame);
      for (const subscription of this.subscriptions.values()) {
        subscription.active = false;
        this.sendSubscribe(subscription);
      }
      return;
    }
    this.receiveTopic(frame);
    if (frame.type === "refreshed" && frame.payload && typeof frame.payload.exp === "number") {
      this.scheduleRefresh(frame.payload.exp);
    }
    if (this.options.onEnvelope) this.options.onEnvelope(frame);
  }

  /** Asks for a fresh token at 80 % of the current one's remaining lifetime, and sends it. */
  scheduleRefresh(exp) {
    clearTimeout(this.timers.refresh);
    if (!exp) return;
    const generation = this.generation;
    const remainingMs = exp * 1000 - Date.now();
    const delay = Math.min(LONGEST_TIMER_MS, Math.max(1000, remainingMs * 0.8));
    this.timers.refresh = setTimeout(async () => {
      let fresh;
      try {
        fresh = await this.options.getToken();
      } catch {
        return; // The server closes with 4001 at expiry; the reconnection asks again.
      }
      if (generation !== this.generation) return;
      const freshExp = tokenExpiry(fresh);
      if (fresh === this.token || (freshExp !== null && freshExp <= exp)) {
        // Nothing newer to send: the server closes with 4001 at expiry, and the reconnection
        // asks for a token again.
        return;
      }
      if (this.send({ type: "refresh", token: fresh })) this.token = fresh;
    }, delay);
  }

  scheduleReconnect(generation, info, delayMs) {
    this.attempts += 1;
    const backoff = Math.min(this.options.maxDelayMs, this.options.minDelayMs * 2 ** (this.attempts - 1));
    const delay = delayMs !== undefined ? delayMs : backoff / 2 + Math.random() * (backoff / 2);
    this.setState("reconnecting", { meaning: describeClose(info.code), ...info, delayMs: Math.round(delay) });
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = setTimeout(() => {
      if (generation === this.generation && !this.stopped) this.open(generation);
    }, delay);
  }
}
