/* The demo storefront: a grid by category, a product page, a cart, and a shelf of
 * recommendations that the API pushes by Server-Sent Events when the speed layer changes them.
 * With keys configured the page holds no key: it gets a session token from its server (/demo/token)
 * and renews it before it expires. */
(function () {
  "use strict";
  const { Tracker, uuid } = window.LambdarecTracker;
  const $ = (id) => document.getElementById(id);

  function stored(storage, key) {
    let value = storage.getItem(key);
    if (!value) {
      value = uuid();
      storage.setItem(key, value);
    }
    return value;
  }
  const params = new URLSearchParams(location.search);
  const anonymousId = params.get("anonymous_id") || stored(localStorage, "lr_anonymous_id");
  const sessionId = params.get("session_id") || stored(sessionStorage, "lr_session_id");
  const tracker = new Tracker({ anonymousId, sessionId, refreshToken: () => renewToken() });
  const items = new Map(); // item_id -> catalog row
  const cart = new Map(); // item_id -> quantity
  const state = { tracker, renders: 0, lastRecs: null, current: null, connected: false, token: null };
  window.demo = state;

  // ------------------------------------------------------------ the session token (none with auth off)

  let renewal = null;
  async function renewToken() {
    const response = await fetch("/demo/token", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ anonymous_id: anonymousId, session_id: sessionId }),
    });
    if (!response.ok) throw new Error(`no session token: ${response.status}`);
    if (response.status === 204) return null; // auth off
    const body = await response.json();
    state.token = tracker.token = body.token;
    clearTimeout(renewal);
    renewal = setTimeout(renewToken, body.expires_in * 800); // at 80% of its life
    return body.token;
  }
  $("who").textContent = `device ${anonymousId.slice(0, 8)} · session ${sessionId.slice(0, 8)}`;

  function hue(text) {
    let h = 2166136261;
    for (const c of text) h = Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0;
    return h % 360;
  }

  function card(item, extra) {
    const el = document.createElement("div");
    el.className = "card";
    el.dataset.itemId = item.item_id;
    el.dataset.category = item.category || "";
    el.dataset.page = extra ? "home" : "category";
    const sw = document.createElement("div");
    sw.className = "swatch";
    sw.style.background = `hsl(${hue(item.category || "")}, 55%, 70%)`;
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = item.title || item.item_id;
    const cat = document.createElement("div");
    cat.className = "cat";
    cat.textContent = `${item.category || ""}${item.price ? " · " + item.price.toFixed(2) : ""}`;
    el.append(sw, title, cat);
    if (item.promoted) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "promoted";
      el.append(badge);
    }
    if (extra && extra.reason) {
      const reason = document.createElement("div");
      reason.className = "reason";
      reason.textContent = extra.reason;
      el.append(reason);
    }
    el.addEventListener("click", () => openProduct(item.item_id, extra ? extra.requestId : null, extra ? "shelf" : "grid"));
    return el;
  }

  function show(section) {
    for (const id of ["grid", "product", "cart"]) $(id).hidden = id !== section;
  }

  async function loadCatalog() {
    const response = await fetch("/demo/catalog");
    const body = await response.json();
    const grid = $("grid");
    grid.replaceChildren();
    for (const group of body.categories) {
      const section = document.createElement("div");
      section.className = "category";
      section.dataset.category = group.category;
      const h = document.createElement("h2");
      h.textContent = group.category;
      const cards = document.createElement("div");
      cards.className = "cards";
      for (const item of group.items) {
        items.set(item.item_id, item);
        cards.append(card(item));
      }
      section.append(h, cards);
      grid.append(section);
    }
  }

  // ------------------------------------------------------------ product page: view with dwell and scroll depth

  function scrollDepth() {
    const doc = document.documentElement;
    const seen = window.scrollY + window.innerHeight;
    return Math.max(0, Math.min(1, doc.scrollHeight ? seen / doc.scrollHeight : 1));
  }

  function leaveProduct() {
    const cur = state.current;
    if (!cur) return;
    state.current = null;
    tracker.track("view", {
      item_id: cur.itemId,
      dwell_ms: Math.round(performance.now() - cur.openedAt),
      scroll_depth: Number(cur.maxDepth.toFixed(3)),
      context: { page: "product" },
    });
  }

  function openProduct(itemId, recRequestId, from) {
    leaveProduct();
    const fields = { item_id: itemId, context: { page: from === "shelf" ? "home" : "category" } };
    if (recRequestId) fields.rec_request_id = recRequestId;
    tracker.track("click", fields);
    const item = items.get(itemId) || { item_id: itemId, title: itemId, category: "", price: 0 };
    $("product-title").textContent = item.title || itemId;
    $("product-category").textContent = item.category;
    $("product-price").textContent = item.price ? item.price.toFixed(2) : "";
    $("product-swatch").style.background = `hsl(${hue(item.category || "")}, 55%, 70%)`;
    state.current = { itemId, openedAt: performance.now(), maxDepth: 0 };
    show("product");
    window.scrollTo(0, 0);
    state.current.maxDepth = scrollDepth();
  }

  window.addEventListener("scroll", () => {
    if (state.current) state.current.maxDepth = Math.max(state.current.maxDepth, scrollDepth());
  }, { passive: true });
  window.addEventListener("pagehide", leaveProduct, { capture: true }); // before the tracker's beacon

  $("back").addEventListener("click", () => {
    leaveProduct();
    show("grid");
  });
  $("home").addEventListener("click", (e) => {
    e.preventDefault();
    leaveProduct();
    show("grid");
  });

  // ------------------------------------------------------------ cart and purchase

  function renderCart() {
    $("cart-count").textContent = [...cart.values()].reduce((a, b) => a + b, 0);
    const lines = $("cart-lines");
    lines.replaceChildren();
    for (const [itemId, qty] of cart) {
      const li = document.createElement("li");
      const item = items.get(itemId);
      li.textContent = `${qty} × ${item ? item.title : itemId}`;
      lines.append(li);
    }
  }

  $("add-to-cart").addEventListener("click", () => {
    const cur = state.current;
    if (!cur) return;
    cart.set(cur.itemId, (cart.get(cur.itemId) || 0) + 1);
    const item = items.get(cur.itemId);
    tracker.track("add_to_cart", { item_id: cur.itemId, quantity: 1, ...(item && item.price ? { price: item.price } : {}) });
    renderCart();
  });
  $("cart-button").addEventListener("click", () => {
    leaveProduct();
    $("cart-message").textContent = "";
    show("cart");
  });
  $("cart-back").addEventListener("click", () => show("grid"));
  $("purchase").addEventListener("click", () => {
    for (const [itemId, quantity] of cart) {
      const item = items.get(itemId);
      tracker.track("purchase", { item_id: itemId, quantity, ...(item && item.price ? { price: item.price } : {}) });
    }
    $("cart-message").textContent = cart.size ? "Thank you for your order." : "The cart is empty.";
    cart.clear();
    renderCart();
  });

  // ------------------------------------------------------------ the shelf, pushed by SSE

  function renderShelf(recs) {
    state.lastRecs = recs;
    state.renders += 1;
    const row = $("shelf-items");
    row.replaceChildren();
    for (const rec of recs.items) {
      const known = items.get(rec.item_id);
      const item = { ...(known || { item_id: rec.item_id, title: rec.item_id }), category: rec.category, promoted: rec.promoted };
      row.append(card(item, { reason: rec.reason, requestId: recs.request_id }));
    }
    const degraded = recs.degraded && recs.degraded.length ? ` · degraded: ${recs.degraded.join(", ")}` : "";
    $("shelf-meta").textContent = `model ${recs.model_version || "none"} · ${recs.variant}${degraded} · update ${state.renders}`;
  }

  function subscribe() {
    let url = `/v1/stream/recommendations?anonymous_id=${encodeURIComponent(anonymousId)}&session_id=${encodeURIComponent(sessionId)}&k=8`;
    if (state.token) url += `&access_token=${encodeURIComponent(state.token)}`; // EventSource sends no headers
    const source = new EventSource(url);
    const resubscribe = async () => {
      source.close();
      await renewToken().catch(() => null);
      subscribe();
    };
    source.addEventListener("open", () => { state.connected = true; });
    source.addEventListener("recommendations", (e) => renderShelf(JSON.parse(e.data)));
    source.addEventListener("token_expired", resubscribe);
    source.addEventListener("error", () => {
      state.connected = false; // EventSource reconnects by itself, but not after a refusal (an expired token)
      if (source.readyState === EventSource.CLOSED) setTimeout(resubscribe, 1000);
    });
    state.source = source;
  }

  tracker.watchHover(document.body, ".card[data-item-id]");
  Promise.all([renewToken(), loadCatalog()]).then(() => {
    show("grid");
    subscribe();
  });
})();
