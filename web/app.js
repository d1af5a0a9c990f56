// ragline web chat: one page, no build step. Talks to POST /api/chat on the same origin
// and reads its SSE stream with fetch + ReadableStream (EventSource cannot POST).
//
// Safety: nothing from the model or the documents is ever parsed as HTML. Sources are built
// with DOM methods and textContent; answers go through renderMarkdown, which escapes all
// HTML first and then adds only a few known tags (links only to http/https URLs). The page's
// Content-Security-Policy (nginx) allows no inline script and enforces Trusted Types, so the
// only way into innerHTML is the renderer's policy below.
"use strict";

(() => {
  const STORAGE_KEY = "ragline.apiKey";
  const STORAGE_COLLECTION = "ragline.collection";

  // ---------------------------------------------------------------- Markdown (safe subset)

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ESCAPES[c]);
  // Placeholders use private-use characters, removed from the input first.
  const PH_OPEN = "\uE000";
  const PH_CLOSE = "\uE001";
  const HTTP_URL = /^https?:\/\/[^\s]+$/i;

  // Inline Markdown of one block of raw text: escape everything, then add <code>, <a>,
  // <strong>, <em>, <br> and citation buttons. `maxCite` bounds which [n] become buttons.
  function renderInline(raw, maxCite) {
    const stash = [];
    const keep = (html) => `${PH_OPEN}${stash.push(html) - 1}${PH_CLOSE}`;
    let s = escapeHtml(raw);
    // `code` spans first: nothing inside them is formatted.
    s = s.replace(/`([^`\n]+)`/g, (_, code) => keep(`<code>${code}</code>`));
    // [text](url): a link only for http/https URLs; anything else stays visible as text.
    s = s.replace(/\[([^\]\n]+)\]\(([^)\s\uE000\uE001]+)\)/g, (whole, text, url) => {
      if (!HTTP_URL.test(url)) return keep(whole);
      return keep(
        `<a href="${url}" rel="noopener noreferrer" target="_blank">${emphasis(text)}</a>`,
      );
    });
    s = emphasis(s);
    // Citations: [1], [2, 3], [1][2].
    s = s.replace(/\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]/g, (whole, list) => {
      const nums = list.split(",").map((x) => Number(x.trim()));
      if (!nums.every((n) => n >= 1 && n <= maxCite)) return whole;
      const buttons = nums.map(
        (n) =>
          `<button type="button" class="cite" data-n="${n}" ` +
          `aria-label="Show source ${n}">${n}</button>`,
      );
      return keep(`<span class="cites">[${buttons.join(", ")}]</span>`);
    });
    s = s.replace(/\n/g, "<br>");
    const restore = (text) =>
      text.replace(new RegExp(`${PH_OPEN}(\\d+)${PH_CLOSE}`, "g"), (_, i) =>
        restore(stash[Number(i)]),
      );
    return restore(s);
  }

  function emphasis(s) {
    return s
      .replace(/\*\*(?=\S)([^*\n]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^_\w])__(?=\S)([^_\n]*?\S)__(?![_\w])/g, "$1<strong>$2</strong>")
      .replace(/(^|[^*\w])\*(?=\S)([^*\n]*?\S)\*(?![*\w])/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_(?=\S)([^_\n]*?\S)_(?![_\w])/g, "$1<em>$2</em>");
  }

  const LIST_ITEM = /^\s{0,3}(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/;
  const FENCE = /^\s{0,3}(```|~~~)/;
  const HEADING = /^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$/;

  // Blocks: fenced code (an unclosed fence runs to the end: the answer may still be
  // streaming), lists, paragraphs. Returns [{src, html}] so that a re-render while
  // streaming replaces only the blocks that changed.
  function renderBlocks(text, maxCite) {
    const lines = text.replace(/[\uE000\uE001]/g, "").replace(/\r\n?/g, "\n").split("\n");
    const blocks = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        const start = i;
        const body = [];
        i += 1;
        while (i < lines.length && !lines[i].trimStart().startsWith(fence[1])) {
          body.push(lines[i]);
          i += 1;
        }
        i += 1; // the closing fence
        const src = lines.slice(start, i).join("\n");
        blocks.push({ src, html: `<pre><code>${escapeHtml(body.join("\n"))}</code></pre>` });
        continue;
      }
      if (!line.trim()) {
        i += 1;
        continue;
      }
      const heading = HEADING.exec(line);
      if (heading) {
        const inner = renderInline(heading[1], maxCite);
        blocks.push({ src: line, html: `<p class="heading"><strong>${inner}</strong></p>` });
        i += 1;
        continue;
      }
      const item = LIST_ITEM.exec(line);
      if (item) {
        const ordered = item[2] !== undefined;
        const start = i;
        const items = [];
        while (i < lines.length) {
          const m = LIST_ITEM.exec(lines[i]);
          if (m && (m[2] !== undefined) === ordered) {
            items.push(m[3]);
          } else if (lines[i].trim() && /^\s+/.test(lines[i]) && items.length) {
            items[items.length - 1] += `\n${lines[i].trim()}`;
          } else {
            break;
          }
          i += 1;
        }
        const tag = ordered ? "ol" : "ul";
        const first = ordered ? Number(item[2]) : 1;
        const startAttr = ordered && first !== 1 ? ` start="${first}"` : "";
        const lis = items.map((t) => `<li>${renderInline(t, maxCite)}</li>`).join("");
        blocks.push({ src: lines.slice(start, i).join("\n"), html: `<${tag}${startAttr}>${lis}</${tag}>` });
        continue;
      }
      const start = i;
      const ends = (l) => !l.trim() || FENCE.test(l) || LIST_ITEM.test(l) || HEADING.test(l);
      while (i < lines.length && (i === start || !ends(lines[i]))) i += 1;
      const para = lines.slice(start, i).join("\n");
      blocks.push({ src: para, html: `<p>${renderInline(para, maxCite)}</p>` });
    }
    return blocks;
  }

  function renderMarkdown(text, maxCite = 0) {
    return renderBlocks(text, maxCite)
      .map((b) => b.html)
      .join("");
  }

  // Trusted Types: the CSP (`require-trusted-types-for 'script'`) makes every innerHTML
  // assignment that does not come from this policy throw.
  const htmlPolicy =
    window.trustedTypes && window.trustedTypes.createPolicy
      ? window.trustedTypes.createPolicy("ragline-markdown", { createHTML: (s) => s })
      : { createHTML: (s) => s };

  // The Markdown source each rendered block element came from.
  const blockSource = new WeakMap();

  // Renders `text` into `el`, re-using the elements of blocks that did not change (while
  // an answer streams only its last block grows).
  function renderInto(el, text, maxCite = 0) {
    const blocks = renderBlocks(text, maxCite);
    const old = Array.from(el.children);
    blocks.forEach((block, index) => {
      const key = `${maxCite}\u0000${block.src}`;
      const current = old[index];
      if (current && blockSource.get(current) === key) return;
      const tpl = document.createElement("template");
      tpl.innerHTML = htmlPolicy.createHTML(block.html);
      const node = tpl.content.firstElementChild;
      blockSource.set(node, key);
      if (current) el.replaceChild(node, current);
      else el.appendChild(node);
    });
    for (let k = old.length - 1; k >= blocks.length; k -= 1) old[k].remove();
  }

  // ---------------------------------------------------------------- SSE over fetch

  // Yields {event, data} per dispatched SSE event (data is the joined data lines, raw).
  // Comment lines (": ping") are skipped. Follows the EventSource parsing rules.
  async function* readSse(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let eventName = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        for (;;) {
          const m = /\r\n|\r|\n/.exec(buffer);
          if (!m) break;
          // A lone \r at the end may be the first half of \r\n: wait for more.
          if (m[0] === "\r" && m.index === buffer.length - 1) break;
          const line = buffer.slice(0, m.index);
          buffer = buffer.slice(m.index + m[0].length);
          if (line === "") {
            if (data.length) yield { event: eventName || "message", data: data.join("\n") };
            eventName = "";
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") eventName = val;
          else if (field === "data") data.push(val);
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  // ---------------------------------------------------------------- state and elements

  const $ = (id) => document.getElementById(id);
  const el = {
    chat: document.querySelector(".chat"),
    conversation: $("conversation"),
    emptyHint: $("empty-hint"),
    sources: $("sources"),
    sourcesEmpty: $("sources-empty"),
    form: $("ask"),
    question: $("question"),
    send: $("send"),
    stop: $("stop"),
    status: $("status"),
    newChat: $("new-chat"),
    settings: $("settings"),
    settingsToggle: $("settings-toggle"),
    settingsCancel: $("settings-cancel"),
    apiKey: $("api-key"),
    collection: $("collection"),
    collectionBadge: $("collection-badge"),
  };

  const params = new URLSearchParams(window.location.search);
  const state = {
    conversationId: null,
    controller: null, // AbortController of the answer streaming now
    active: null, // its turn
    shownTurn: null, // the turn whose sources the panel shows
    collectionOverride: params.get("collection") || "",
  };

  const storage = {
    get(key) {
      try {
        return window.localStorage.getItem(key) || "";
      } catch {
        return "";
      }
    },
    set(key, value) {
      try {
        if (value) window.localStorage.setItem(key, value);
        else window.localStorage.removeItem(key);
      } catch {
        /* storage disabled: the setting lasts for this page only */
      }
    },
  };
  let apiKey = storage.get(STORAGE_KEY);
  let savedCollection = storage.get(STORAGE_COLLECTION);

  const collection = () => state.collectionOverride || savedCollection;

  function showCollection() {
    const name = collection();
    el.collectionBadge.textContent = name ? `collection: ${name}` : "";
    el.collectionBadge.hidden = !name;
  }

  function setStatus(text) {
    el.status.textContent = text;
  }

  // ---------------------------------------------------------------- turns

  function newTurn(question) {
    el.emptyHint.hidden = true;
    const article = document.createElement("article");
    article.className = "turn";
    article.dataset.state = "waiting";
    const q = document.createElement("p");
    q.className = "question";
    q.textContent = question;
    const answer = document.createElement("div");
    answer.className = "answer";
    answer.setAttribute("aria-busy", "true");
    const notices = document.createElement("div");
    notices.className = "notices";
    const meta = document.createElement("p");
    meta.className = "turn-meta";
    article.append(q, answer, notices, meta);
    el.conversation.appendChild(article);
    const turn = { article, answer, notices, meta, text: "", sources: [], frame: 0 };
    article._turn = turn;
    article.scrollIntoView({ block: "end" });
    return turn;
  }

  // Follow the answer as it grows, unless the reader scrolled up. The conversation scrolls
  // on its own on wide screens, the whole page on phones.
  function nearBottom() {
    const c = el.chat;
    const inner = c.scrollHeight - c.scrollTop - c.clientHeight < 80;
    const outer =
      window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
    return inner && outer;
  }

  function renderAnswer(turn) {
    turn.frame = 0;
    const follow = nearBottom();
    renderInto(turn.answer, turn.text, turn.sources.length);
    if (follow) turn.article.scrollIntoView({ block: "end" });
  }

  function scheduleRender(turn) {
    if (!turn.frame) turn.frame = window.requestAnimationFrame(() => renderAnswer(turn));
  }

  function flushRender(turn) {
    if (turn.frame) window.cancelAnimationFrame(turn.frame);
    renderAnswer(turn);
  }

  function addNotice(turn, kind, text) {
    const p = document.createElement("p");
    p.className = `notice notice-${kind}`;
    if (kind === "error") p.setAttribute("role", "alert");
    p.textContent = text;
    turn.notices.appendChild(p);
    return p;
  }

  function finish(turn, stateName) {
    turn.article.dataset.state = stateName;
    turn.answer.setAttribute("aria-busy", "false");
  }

  // ---------------------------------------------------------------- sources panel

  function safeHttpUrl(raw) {
    if (!raw) return null;
    try {
      const url = new URL(raw);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch {
      return null;
    }
  }

  function showSources(turn) {
    state.shownTurn = turn;
    el.sources.replaceChildren();
    el.sourcesEmpty.hidden = turn.sources.length > 0;
    if (!turn.sources.length) el.sourcesEmpty.textContent = "This answer has no sources.";
    for (const src of turn.sources) {
      const li = document.createElement("li");
      li.className = "source";
      li.id = `source-${src.n}`;
      li.tabIndex = -1;
      li.dataset.n = String(src.n);
      const head = document.createElement("p");
      head.className = "source-title";
      const num = document.createElement("span");
      num.className = "source-n";
      num.textContent = `[${src.n}]`;
      const title = String(src.title || src.doc_id || "Untitled");
      const href = safeHttpUrl(String(src.url || ""));
      let titleEl;
      if (href) {
        titleEl = document.createElement("a");
        titleEl.href = href;
        titleEl.rel = "noopener noreferrer";
        titleEl.target = "_blank";
      } else {
        titleEl = document.createElement("span");
      }
      titleEl.className = "source-name";
      titleEl.textContent = title;
      head.append(num, " ", titleEl);
      const snippet = document.createElement("p");
      snippet.className = "snippet";
      // Passages keep their source's line wrapping: keep paragraphs, join the lines.
      snippet.textContent = String(src.text || "")
        .split(/\n[ \t]*\n/)
        .map((para) => para.replace(/\s+/g, " ").trim())
        .filter(Boolean)
        .join("\n\n");
      const info = document.createElement("p");
      info.className = "source-info";
      const score = typeof src.score === "number" ? ` · score ${src.score.toFixed(3)}` : "";
      info.textContent = `${src.doc_id || ""}${score}`;
      li.append(head, snippet, info);
      el.sources.appendChild(li);
    }
  }

  function highlightSource(turn, n) {
    if (state.shownTurn !== turn) showSources(turn);
    let target = null;
    for (const li of el.sources.children) {
      const on = li.dataset.n === String(n);
      li.classList.toggle("highlight", on);
      if (on) {
        li.setAttribute("aria-current", "true");
        target = li;
      } else {
        li.removeAttribute("aria-current");
      }
    }
    if (target) {
      const reduce = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      target.scrollIntoView({ block: "nearest", behavior: reduce ? "auto" : "smooth" });
      target.focus({ preventScroll: true });
    }
  }

  // ---------------------------------------------------------------- asking

  const DEGRADED = {
    rerank: "the reranker was unavailable, so sources are in search order",
    lexical: "keyword search was unavailable (meaning-based search only)",
    dense: "meaning-based search was unavailable (keyword search only)",
    memory: "conversation memory was unavailable, so earlier turns were not used",
    rewrite: "the follow-up could not be rewritten; the search used both questions as typed",
  };

  function httpErrorMessage(status, statusText, envelope, retryAfter) {
    const detail = envelope && envelope.message ? `: ${envelope.message}` : "";
    const code = `HTTP ${status}${statusText ? ` ${statusText}` : ""}`;
    const wait = retryAfter ? ` Try again in ${retryAfter} s.` : "";
    if (status === 401) {
      return `This server needs an API key (${code}${detail}). Set one in Settings.`;
    }
    if (status === 403) return `Your API key may not do this (${code}${detail}).`;
    if (status === 429) return `Too many requests (${code}${detail}).${wait || " Try again shortly."}`;
    if (status === 502 || status === 504) {
      return `The chat service is unavailable (${code}). Try again in a moment.`;
    }
    if (status === 503) {
      return `The service is unavailable right now (${code}${detail}).${wait || " Try again in a moment."}`;
    }
    if (status >= 500) return `The server failed (${code}${detail}).`;
    return `The question was refused (${code}${detail}).`;
  }

  async function errorEnvelope(response) {
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error === "object") return body.error;
    } catch {
      /* not JSON, e.g. nginx's own 502 page */
    }
    return null;
  }

  function setBusy(busy) {
    el.send.disabled = busy;
    el.stop.disabled = !busy;
    document.body.dataset.busy = busy ? "true" : "false";
  }

  async function ask(question) {
    const turn = newTurn(question);
    const controller = new AbortController();
    state.controller = controller;
    state.active = turn;
    setBusy(true);
    setStatus("Searching the documents…");

    const body = { message: question };
    if (state.conversationId) body.conversation_id = state.conversationId;
    if (collection()) body.collection = collection();
    const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;

    let ended = false; // a done or error event arrived
    try {
      const response = await fetch("/api/chat", {
        method: "POST",
        headers,
        body: JSON.stringify(body),
        signal: controller.signal,
        cache: "no-store",
        credentials: "same-origin",
      });
      const requestId = response.headers.get("X-Request-ID") || "";
      if (!response.ok) {
        const envelope = await errorEnvelope(response);
        const message = httpErrorMessage(
          response.status,
          response.statusText,
          envelope,
          response.headers.get("Retry-After"),
        );
        addNotice(turn, "error", message);
        const rid = (envelope && envelope.request_id) || requestId;
        if (rid) turn.meta.textContent = `request ${rid}`;
        turn.article.dataset.status = String(response.status);
        finish(turn, "error");
        setStatus(message);
        return;
      }
      const type = response.headers.get("Content-Type") || "";
      if (!type.startsWith("text/event-stream") || !response.body) {
        throw new Error(`unexpected response (${type || "no content type"})`);
      }
      turn.article.dataset.state = "streaming";
      for await (const ev of readSse(response.body)) {
        let data;
        try {
          data = JSON.parse(ev.data);
        } catch {
          continue;
        }
        if (ev.event === "meta") {
          if (data.conversation_id) state.conversationId = data.conversation_id;
          if (data.request_id) turn.requestId = data.request_id;
        } else if (ev.event === "sources") {
          turn.sources = Array.isArray(data.sources) ? data.sources : [];
          showSources(turn);
          setStatus("Answering…");
        } else if (ev.event === "token") {
          if (typeof data.text === "string") {
            turn.text += data.text;
            scheduleRender(turn);
          }
        } else if (ev.event === "done") {
          ended = true;
          flushRender(turn);
          onDone(turn, data);
        } else if (ev.event === "error") {
          ended = true;
          flushRender(turn);
          const msg = `The answer failed: ${data.message || "unknown error"}${data.code ? ` (${data.code})` : ""}.`;
          addNotice(turn, "error", msg);
          finish(turn, "error");
          setStatus(msg);
        }
      }
      if (!ended) {
        flushRender(turn);
        addNotice(turn, "error", "The connection closed before the answer was complete.");
        finish(turn, "error");
        setStatus("The answer was cut off.");
      }
    } catch (err) {
      flushRender(turn);
      if (controller.signal.aborted) {
        addNotice(turn, "stopped", "Stopped.");
        finish(turn, "stopped");
        if (turn.article.isConnected) setStatus("Stopped.");
      } else {
        const msg = `Could not reach the chat service (${err && err.message ? err.message : "network error"}). Check your connection and try again.`;
        addNotice(turn, "error", msg);
        finish(turn, "error");
        setStatus(msg);
      }
    } finally {
      if (!turn.text && turn.article.dataset.state !== "done") turn.answer.hidden = true;
      if (turn.requestId && !turn.meta.textContent) turn.meta.textContent = `request ${turn.requestId}`;
      if (state.controller === controller) {
        state.controller = null;
        state.active = null;
        setBusy(false);
      }
    }
  }

  function onDone(turn, data) {
    const degraded = Array.isArray(data.degraded) ? data.degraded : [];
    if (degraded.length) {
      const parts = degraded.map((d) => DEGRADED[d] || String(d));
      addNotice(turn, "degraded", `Degraded answer: ${parts.join("; ")}.`);
      turn.article.dataset.degraded = degraded.join(" ");
    }
    const bits = [];
    if (data.cached) bits.push("cached");
    if (data.search_query) bits.push(`searched for: ${data.search_query}`);
    if (turn.requestId) bits.push(`request ${turn.requestId}`);
    turn.meta.textContent = bits.join(" · ");
    if (!turn.text) turn.answer.textContent = "(empty answer)";
    finish(turn, "done");
    setStatus(degraded.length ? "Answered (degraded)." : "Answered.");
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.conversationId = null;
    state.shownTurn = null;
    for (const a of el.conversation.querySelectorAll(".turn")) a.remove();
    el.emptyHint.hidden = false;
    el.sources.replaceChildren();
    el.sourcesEmpty.hidden = false;
    el.sourcesEmpty.textContent = "The passages an answer draws on appear here.";
    setStatus("New chat started.");
    el.question.focus();
  }

  // ---------------------------------------------------------------- settings

  function openSettings(open) {
    el.settings.hidden = !open;
    el.settingsToggle.setAttribute("aria-expanded", String(open));
    if (open) {
      el.apiKey.value = apiKey;
      el.collection.value = savedCollection;
      el.apiKey.focus();
    } else {
      el.settingsToggle.focus();
    }
  }

  el.settings.addEventListener("submit", (e) => {
    e.preventDefault();
    apiKey = el.apiKey.value.trim();
    savedCollection = el.collection.value.trim();
    storage.set(STORAGE_KEY, apiKey);
    storage.set(STORAGE_COLLECTION, savedCollection);
    if (state.collectionOverride && savedCollection !== state.collectionOverride) {
      state.collectionOverride = ""; // a saved choice wins over the link's
    }
    showCollection();
    openSettings(false);
    setStatus(apiKey ? "Settings saved (API key set)." : "Settings saved (no API key).");
  });
  el.settingsCancel.addEventListener("click", () => openSettings(false));
  el.settingsToggle.addEventListener("click", () => openSettings(el.settings.hidden));

  // ---------------------------------------------------------------- wiring

  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const question = el.question.value.trim();
    if (!question || state.controller) return;
    el.question.value = "";
    ask(question);
  });

  el.question.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      el.form.requestSubmit();
    }
  });

  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (state.controller) {
      e.preventDefault();
      stop();
    } else if (!el.settings.hidden) {
      openSettings(false);
    }
  });

  el.stop.addEventListener("click", stop);
  el.newChat.addEventListener("click", newChat);

  function onCite(e) {
    const button = e.target.closest("button.cite");
    if (!button) return;
    const article = button.closest(".turn");
    if (article && article._turn) highlightSource(article._turn, Number(button.dataset.n));
  }
  el.conversation.addEventListener("click", onCite);
  // While an answer streams its last paragraph is re-rendered every frame, so a button
  // pressed there may be replaced before the click completes: act on the press too.
  el.conversation.addEventListener("pointerdown", (e) => {
    if (e.button === 0 && state.active && e.target.closest(".turn") === state.active.article) {
      onCite(e);
    }
  });

  showCollection();
  setBusy(false);
  el.question.focus();

  // For tests and the curious: the renderer, as the page uses it.
  window.ragline = Object.freeze({ renderMarkdown, renderInto });
})();
