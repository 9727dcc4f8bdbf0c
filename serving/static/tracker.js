/* Lambdarec tracker: batches storefront events to POST /v1/events.
 * - each event gets a client-made UUID once; a failed batch is retried as is (same event_id),
 *   so the speed layer's dedup counts it once;
 * - a batch goes after `flushMs` or when `maxBatch` events wait;
 * - on pagehide what is left goes with navigator.sendBeacon;
 * - with auth on, `token` is the session token the storefront's server got (POST /v1/tokens): sent as
 *   a Bearer header, or as ?access_token= on a beacon (which cannot set headers); on a 401 the tracker
 *   asks `refreshToken()` for a new one and resends;
 * - watchHover records a dwell over a product card (a `hover` event with dwell_ms) unless it ends in a click;
 * - each event carries the page's consent ("none" | "analytics" | "personalisation"): the `consent`
 *   option, else the page's <html data-consent="...">; the banner calls setConsent() when it changes.
 *   Unset, the field is left out and the server's default (personalisation) applies. */
(function (global) {
  "use strict";

  function uuid() {
    if (global.crypto && typeof global.crypto.randomUUID === "function") return global.crypto.randomUUID();
    const b = new Uint8Array(16);
    global.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  class Tracker {
    constructor(opts) {
      this.endpoint = opts.endpoint || "/v1/events";
      this.anonymousId = opts.anonymousId;
      this.sessionId = opts.sessionId;
      this.userId = opts.userId || null;
      this.token = opts.token || null;
      this.refreshToken = opts.refreshToken || null;
      this.consent = opts.consent || document.documentElement.dataset.consent || null;
      this.flushMs = opts.flushMs ?? 150;
      this.maxBatch = opts.maxBatch ?? 20;
      this.backoffMs = opts.backoffMs || [200, 500, 1000, 2000, 5000];
      this.queue = [];
      this.inflight = null;
      this.failures = 0;
      this.timer = null;
      this.stats = { posts: 0, failed: 0, sent: 0, beacons: 0 };
      global.addEventListener("pagehide", () => this.beacon());
      document.addEventListener("visibilitychange", () => {
        if (document.visibilityState === "hidden") this.beacon();
      });
    }

    track(eventType, fields) {
      const event = {
        event_id: uuid(),
        event_type: eventType,
        ts: new Date().toISOString(),
        anonymous_id: this.anonymousId,
        session_id: this.sessionId,
        ...fields,
      };
      if (this.userId) event.user_id = this.userId;
      if (this.consent) event.consent = this.consent; // as it was when the event happened
      this.queue.push(event);
      this.schedule(this.queue.length >= this.maxBatch ? 0 : this.flushMs);
      return event;
    }

    setConsent(consent) {
      this.consent = consent;
    }

    schedule(delayMs) {
      if (this.timer !== null || this.inflight) return;
      this.timer = setTimeout(() => {
        this.timer = null;
        this.flush();
      }, delayMs);
    }

    async flush() {
      if (this.inflight || this.queue.length === 0) return this.inflight;
      const batch = this.queue.splice(0, this.maxBatch);
      this.inflight = this.post(batch);
      try {
        await this.inflight;
      } finally {
        this.inflight = null;
      }
      if (this.queue.length) this.schedule(this.failures ? this.delay() : 0);
    }

    delay() {
      return this.backoffMs[Math.min(this.failures - 1, this.backoffMs.length - 1)];
    }

    async post(batch) {
      this.stats.posts += 1;
      let retry = false;
      try {
        const headers = { "Content-Type": "application/json" };
        if (this.token) headers.Authorization = `Bearer ${this.token}`;
        const response = await fetch(this.endpoint, {
          method: "POST",
          headers,
          body: JSON.stringify(batch),
          keepalive: true,
        });
        // 5xx (backpressure, Redis down) and 429 are worth retrying; other 4xx would fail again.
        retry = response.status >= 500 || response.status === 429;
        if (response.status === 401 && this.refreshToken) {
          this.token = await this.refreshToken(); // the token expired: the same batch goes with a new one
          retry = true;
        }
      } catch (err) {
        retry = true; // network error: the server may or may not have the batch; the event_id dedups it
      }
      if (retry) {
        this.stats.failed += 1;
        this.failures += 1;
        this.queue.unshift(...batch); // the same objects, so the same event_id values
      } else {
        this.failures = 0;
        this.stats.sent += batch.length;
      }
    }

    beacon() {
      if (!this.queue.length || !navigator.sendBeacon) return;
      const batch = this.queue.splice(0, this.queue.length);
      const blob = new Blob([JSON.stringify(batch)], { type: "application/json" });
      const url = this.token ? `${this.endpoint}?access_token=${encodeURIComponent(this.token)}` : this.endpoint;
      if (navigator.sendBeacon(url, blob)) this.stats.beacons += 1;
      else this.queue.unshift(...batch);
    }

    /* Cards matching `selector` inside `root` carry data-item-id (and data-page for the context). A hover
     * shorter than minMs is passing over, not dwelling; one that ends in a click is the click's. */
    watchHover(root, selector, minMs = 500) {
      let current = null; // { el, since }
      const end = (clicked) => {
        if (!current) return;
        const { el, since } = current;
        current = null;
        const dwell = Math.round(performance.now() - since);
        if (clicked || dwell < minMs || !el.dataset.itemId) return;
        const fields = { item_id: el.dataset.itemId, dwell_ms: dwell };
        if (el.dataset.page) fields.context = { page: el.dataset.page };
        this.track("hover", fields);
      };
      root.addEventListener("mouseover", (e) => {
        const el = e.target.closest(selector);
        if (current && current.el === el) return;
        end(false);
        if (el) current = { el, since: performance.now() };
      });
      root.addEventListener("mouseout", (e) => {
        if (current && !current.el.contains(e.relatedTarget)) end(false);
      });
      root.addEventListener("click", () => end(true), { capture: true });
      global.addEventListener("pagehide", () => end(false), { capture: true }); // before the beacon
    }
  }

  global.LambdarecTracker = { Tracker, uuid };
})(window);
