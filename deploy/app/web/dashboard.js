// The dashboard: GET /admin/dashboard every few seconds, drawn as figures, SVG charts and tables.
"use strict";

const fmt = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function badge(td, status) {
  td.textContent = "";
  const span = document.createElement("span");
  span.className = "badge " + status;
  span.textContent = status;
  td.appendChild(span);
}

function fillTable(id, items, columns) {
  const body = document.querySelector(`#${id} tbody`);
  body.textContent = "";
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const [value, cls, isBadge] of columns(item)) {
      const td = cell(tr, value, cls);
      if (isBadge) badge(td, value);
    }
    body.appendChild(tr);
  }
}

function draw(d) {
  const r = d.routing;
  $("champion").textContent = r.champion || "base model";
  $("challenger").textContent = r.challenger ? `${r.challenger} (${Math.round(r.ab_fraction * 100)}% of pairs)` : "none";

  if (d.ab) {
    const n = d.ab.wins + d.ab.losses;
    const rate = n ? d.ab.wins / n : null;
    $("ab-text").textContent = `${d.ab.challenger}: ${d.ab.wins} wins, ${d.ab.losses} losses` +
      (rate === null ? "" : `, win rate ${fmt(rate, 2)}`) +
      `. Decides: ${d.ab.statistic} = ${fmt(d.ab.evidence, 2)} for, ${fmt(d.ab.evidence_worse, 2)} against; ` +
      `promote at ≥ ${fmt(d.ab.threshold, 0)} (1/alpha, alpha ${d.ab.alpha}) after ${d.ab.min_votes} votes, ` +
      `retire at ≥ ${fmt(d.ab.threshold, 0)} against or after ${d.ab.max_votes}. ` +
      `Shown, not deciding: ${Math.round(d.ab.confidence * 100)}% Wilson interval [${fmt(d.ab.lower, 2)}, ${fmt(d.ab.upper, 2)}]`;
    intervalChart($("ab-chart"), rate, d.ab.lower, d.ab.upper);
  } else {
    $("ab-text").textContent = "no challenger";
    $("ab-chart").textContent = "";
  }

  const fb = d.feedback;
  $("feedback-total").textContent = fb.total;
  $("feedback-kinds").textContent = Object.entries(fb.by_kind).map(([k, v]) => `${k} ${v}`).join(" · ") || "none yet";
  barChart($("feedback-chart"), fb.buckets.map((b) => ({ label: new Date(b.end).toLocaleTimeString(), value: b.count })));
  $("feedback-span").textContent = `per ${Math.round(fb.bucket_s)} s`;

  const q = d.queues;
  $("q-queued").textContent = q.feedback.queued;
  $("q-running").textContent = `${q.feedback.started} / ${q.feedback.scheduled}`;
  $("q-failed").textContent = q.feedback.failed;
  $("q-workers").textContent = q.feedback.workers;
  $("q-training").textContent = q.training.running ? "a round is running" : (q.training.queued ? `${q.training.queued} queued` : "idle");
  const b = d.backlog;
  $("q-backlog").textContent = `${b.examples} ${b.method} (a round starts at ${b.round_starts_at}, takes ${b.round_takes_at_most})`;

  const adapters = [...d.adapters].sort((a, b) => a.version - b.version);
  versionChart($("versions-chart"), adapters.map((a) => ({ t: new Date(a.created_at), version: a.version, status: a.status, name: a.name })));
  lineChart($("rounds-chart"), [
    { name: "loss", points: d.rounds.filter((x) => x.loss !== null).map((x) => [x.id, x.loss]) },
    { name: "accuracy", points: d.rounds.filter((x) => x.accuracy !== null).map((x) => [x.id, x.accuracy]) },
  ], { yMin: 0, yMax: 1 });

  fillTable("adapters", [...adapters].reverse(), (a) => {
    const gate = (a.metrics && a.metrics.gate) || {};
    return [[a.name], [a.status, "", true], [new Date(a.created_at).toLocaleString()],
      [fmt(a.metrics && a.metrics.loss), "num"], [fmt(gate.candidate && gate.candidate.accuracy), "num"],
      [fmt(gate.champion && gate.champion.accuracy), "num"], [fmt(gate.length_ratio, 2), "num"], [a.reason || ""]];
  });
  fillTable("rounds", [...d.rounds].reverse(), (x) => [[String(x.id)], [x.trigger], [x.status, "", true], [x.adapter || "–"],
    [String(x.new_examples), "num"], [fmt(x.loss), "num"], [fmt(x.accuracy), "num"], [new Date(x.started_at).toLocaleString()]]);
}

function drawLeaderboard(b) {
  $("leaderboard-text").textContent = b.variants.length
    ? `${b.model}; ${b.scale}; ${b.votes} votes, ${b.bootstrap} bootstrap refits; ` +
      `the answer shown first wins ${fmt(b.position_effect * 100, 1)}% of even matches`
    : "no pairwise votes between two variants yet";
  fillTable("leaderboard", b.variants, (v) => [[String(v.rank), "num"], [v.name], [fmt(v.rating, 0), "num"],
    [`[${fmt(v.lower, 0)}, ${fmt(v.upper, 0)}]`], [String(v.votes), "num"], [String(v.wins), "num"],
    [String(v.losses), "num"], [String(v.ties), "num"]]);
}

// The leaderboard refits with bootstrap intervals: every tenth refresh (30 s), not every 3 s.
let refreshes = 0;

async function refresh() {
  if (!Settings.key) { setStatus($("status"), "enter an API key with the admin scope", "error"); return; }
  try {
    if (refreshes++ % 10 === 0) drawLeaderboard(await api("GET", "/admin/leaderboard"));
    draw(await api("GET", "/admin/dashboard"));
    setStatus($("status"), "updated " + new Date().toLocaleTimeString(), "ok");
  } catch (err) {
    setStatus($("status"), err.message, "error");
  }
}

$("api-key").value = Settings.key;
$("api-key").addEventListener("change", () => { Settings.key = $("api-key").value; refresh(); });
refresh();
setInterval(refresh, 3000);
