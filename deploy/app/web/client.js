// Shared by the arena and the dashboard: the settings kept in localStorage, and calls to the public API.
"use strict";

const $ = (id) => document.getElementById(id);

// A status line: its text, styled "ok", "error" or plain.
function setStatus(el, text, kind) { el.textContent = text; el.className = "status" + (kind ? " " + kind : ""); }

const Settings = {
  get key() { return localStorage.getItem("pairloop.key") || ""; },
  set key(v) { localStorage.setItem("pairloop.key", v.trim()); },
  get user() { return localStorage.getItem("pairloop.user") || ""; },
  set user(v) { localStorage.setItem("pairloop.user", v.trim()); },
  get maxTokens() { return parseInt(localStorage.getItem("pairloop.maxTokens") || "96", 10) || 96; },
  set maxTokens(v) { localStorage.setItem("pairloop.maxTokens", String(v)); },
};

// `pairloop up` prints a link with the development key in the fragment (never sent to the server):
// take it into the settings and drop it from the address bar.
(function importKeyFromFragment() {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    Settings.key = decodeURIComponent(m[1]);
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (Settings.key) h["Authorization"] = "Bearer " + Settings.key;
  return h;
}

async function errorOf(resp) {
  let message = resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  if (resp.status === 401) message += " (set an API key in Settings)";
  return new ApiError(resp.status, message);
}

async function api(method, path, body) {
  const resp = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

// POST a streaming chat request; calls onChunk(chunk) per server-sent event. Errors inside the stream
// (after the 200 status) arrive as {"error": ...} events and are thrown.
async function streamChat(body, onChunk) {
  const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }) });
  if (!resp.ok) throw await errorOf(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(503, chunk.error.message || "the stream failed");
        onChunk(chunk);
      }
    }
  }
}
