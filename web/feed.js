// The live feed: one WebSocket to /ws/live that resumes by change seq.
//
// The hub replays every change after ?since=SEQ, says {"kind": "live"} once it
// has caught up, then streams. Whatever closes the socket (hub restart, network,
// "too slow" 4008), we reconnect with backoff and resume after the last seq we
// handed to onChange, so nothing is missed and nothing needs a reload.

import { session } from "./api.js";

const AUTH_CLOSE_CODES = new Set([4401, 4403]);
const FIRST_RETRY_MS = 250;
const MAX_RETRY_MS = 5000;
// The hub sends stats about once a second; this much silence means a dead link
// (a laptop waking up, a proxy dropping the connection without a close).
const SILENCE_MS = 15000;

export class LiveFeed {
  /**
   * onChange(message) gets every change (messages with a seq) in order;
   * onStats(message) the periodic stats; onState("connecting"|"live"|"reconnecting");
   * onAuthLost() when the session is gone and only a new login helps.
   */
  constructor({ onChange, onStats, onState, onAuthLost }) {
    Object.assign(this, { onChange, onStats, onState, onAuthLost });
    this.socket = null;
    this.lastSeq = 0;
    this.retryMs = FIRST_RETRY_MS;
    this.timer = 0;
    this.watchdog = 0;
    this.heardAt = 0;
    this.stopped = true;
  }

  start(since) {
    this.stop();
    this.stopped = false;
    this.lastSeq = since;
    this.retryMs = FIRST_RETRY_MS;
    this.onState("connecting");
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.watchdog);
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      socket.close(1000, "page closed the feed");
    }
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/live?since=${this.lastSeq}`);
    this.socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
      this.heardAt = Date.now();
      this.watch(socket);
    };
    socket.onmessage = (event) => {
      this.heardAt = Date.now(); // a timestamp, not a timer per message: bursts are thousands
      this.receive(event.data);
    };
    // onerror is always followed by onclose, which decides what to do.
    socket.onclose = (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      clearTimeout(this.watchdog);
      this.closed(event, opened);
    };
  }

  receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return; // not ours to understand; the next message will be fine
    }
    if (message.kind === "live") {
      this.retryMs = FIRST_RETRY_MS; // only a connection that caught up counts as healthy
      this.onState("live");
    } else if (message.kind === "stats") {
      this.onStats(message);
    } else if (typeof message.seq === "number") {
      if (message.seq <= this.lastSeq) return; // already applied before a reconnect
      this.onChange(message);
      this.lastSeq = message.seq;
    }
  }

  async closed(event, opened) {
    if (this.stopped) return;
    if (AUTH_CLOSE_CODES.has(event.code)) {
      this.stop();
      this.onAuthLost();
      return;
    }
    this.onState("reconnecting");
    // A browser hides the HTTP status of a refused handshake (it reports 1006),
    // so when the socket never opened, ask the REST API whether the session is
    // still good. A network error there just means the hub is down: keep trying.
    if (!opened) {
      try {
        await session();
      } catch (error) {
        if (error.authLost) {
          if (!this.stopped) {
            this.stop();
            this.onAuthLost();
          }
          return;
        }
      }
    }
    if (this.stopped) return;
    const delay = this.retryMs * (0.75 + Math.random() / 2); // jitter: don't stampede a restarted hub
    this.retryMs = Math.min(this.retryMs * 2, MAX_RETRY_MS);
    this.timer = setTimeout(() => {
      if (!this.stopped) this.connect();
    }, delay);
  }

  watch(socket) {
    clearTimeout(this.watchdog);
    this.watchdog = setTimeout(() => {
      if (socket !== this.socket) return;
      if (Date.now() - this.heardAt > SILENCE_MS) socket.close(4000, "no message for too long");
      else this.watch(socket);
    }, SILENCE_MS / 3);
  }
}
