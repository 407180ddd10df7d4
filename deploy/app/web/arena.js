// The arena: one prompt, two streamed answers side by side, a vote (keys A, B, T, X) or thumbs on each.
"use strict";

let current = null;   // {id, token, adapters, voted}
let model = null;

function showKeyState() { $("key-state").textContent = Settings.key ? "key set" : "no API key: open Settings"; }

function enableVoting(on) {
  document.querySelectorAll(".vote, .thumb").forEach((b) => { b.disabled = !on; b.classList.remove("chosen"); });
}

async function publicModel() {
  if (!model) model = (await api("GET", "/v1/models")).data[0].id;
  return model;
}

async function ask(event) {
  if (event) event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  current = null;
  enableVoting(false);
  $("send").disabled = true;
  for (const i of [0, 1]) { $("answer-" + i).textContent = ""; $("answer-" + i).dataset.chunks = "0"; $("adapter-" + i).textContent = ""; }
  setStatus($("vote-status"), "");
  setStatus($("status"), "generating…");
  const body = { model: await publicModel().catch(() => undefined), messages: [{ role: "user", content: prompt }],
                 n: 2, max_tokens: Settings.maxTokens };
  if (Settings.user) body.user = Settings.user;
  let id = null, ext = null;
  try {
    await streamChat(body, (chunk) => {
      id = chunk.id;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) {
          const el = $("answer-" + c.index);
          el.textContent += c.delta.content;
          el.dataset.chunks = String(Number(el.dataset.chunks || 0) + 1);  // rendered as it streams
        }
      }
      if (chunk.pairloop) ext = chunk.pairloop;
    });
    if (!ext) throw new Error("the stream ended without its feedback token");
    current = { id, token: ext.feedback_token, adapters: ext.choices.map((c) => c.adapter), voted: false };
    enableVoting(true);
    setStatus($("status"), "done: vote with A, B, T (tie) or X (both bad)", "ok");
  } catch (err) {
    setStatus($("status"), err.message, "error");
  } finally {
    $("send").disabled = false;
  }
}

function feedbackBody(fields) {
  const body = { completion_id: current.id, feedback_token: current.token, feedback_id: crypto.randomUUID(), ...fields };
  if (Settings.user) body.user = Settings.user;
  return body;
}

function reveal() {
  current.adapters.forEach((name, i) => { $("adapter-" + i).textContent = "by " + name; });
}

async function vote(preference) {
  if (!current || current.voted) return;
  const button = document.querySelector(`.vote[data-preference="${preference}"]`);
  try {
    const res = await api("POST", "/v1/feedback", feedbackBody({ kind: "pairwise", preference: preference === "0" || preference === "1" ? Number(preference) : preference }));
    current.voted = true;
    document.querySelectorAll(".vote").forEach((b) => { b.disabled = true; });
    button.classList.add("chosen");
    reveal();
    setStatus($("vote-status"), "vote counted (" + res.status + ")", "ok");
  } catch (err) {
    setStatus($("vote-status"), err.message, "error");
  }
}

async function thumb(choice, rating) {
  if (!current) return;
  const button = document.querySelector(`.thumb[data-choice="${choice}"][data-rating="${rating}"]`);
  try {
    await api("POST", "/v1/feedback", feedbackBody({ kind: "rating", choice: Number(choice), rating }));
    document.querySelectorAll(`.thumb[data-choice="${choice}"]`).forEach((b) => { b.disabled = true; });
    button.classList.add("chosen");
    reveal();
    setStatus($("vote-status"), `thumbs ${rating} on ${choice === "0" ? "A" : "B"} counted`, "ok");
  } catch (err) {
    setStatus($("vote-status"), err.message, "error");
  }
}

function openSettings() {
  $("api-key").value = Settings.key;
  $("user").value = Settings.user;
  $("max-tokens").value = Settings.maxTokens;
  $("settings").showModal();
}

$("settings-form").addEventListener("submit", () => {
  Settings.key = $("api-key").value;
  Settings.user = $("user").value;
  const n = parseInt($("max-tokens").value, 10);
  if (n > 0) Settings.maxTokens = n;
  model = null;
  showKeyState();
});
$("open-settings").addEventListener("click", openSettings);
$("ask").addEventListener("submit", ask);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask(e); });
document.querySelectorAll(".vote").forEach((b) => b.addEventListener("click", () => vote(b.dataset.preference)));
document.querySelectorAll(".thumb").forEach((b) => b.addEventListener("click", () => thumb(b.dataset.choice, b.dataset.rating)));
document.addEventListener("keydown", (e) => {
  const tag = (e.target.tagName || "").toLowerCase();
  if (tag === "textarea" || tag === "input" || e.ctrlKey || e.metaKey || e.altKey) return;
  const keys = { a: "0", b: "1", t: "tie", x: "both_bad" };
  const preference = keys[e.key.toLowerCase()];
  if (preference !== undefined) { e.preventDefault(); vote(preference); }
});
showKeyState();
if (!Settings.key) openSettings();
