// Polls /api/state once a second and redraws. Names come from cluster
// objects, so everything is set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderServices(state) {
  const body = $("services").tBodies[0];
  body.replaceChildren();
  for (const s of state.services) {
    const row = body.insertRow();
    row.className = "service";
    row.dataset.frontend = s.frontend;
    cell(row, s.name);
    cell(row, s.frontend);
    cell(row, s.app_protocol ? `${s.type} (${s.app_protocol})` : s.type);
    cell(row, s.backends.length ? `${s.backends.length} backend(s)` : "no endpoints");
    cell(row, "");
    cell(row, state.counters ? s.packets : "–", "num packets");
    cell(row, state.counters ? s.bytes : "–", "num bytes");
    for (const b of s.backends) {
      const r = body.insertRow();
      r.className = "backend";
      r.dataset.frontend = s.frontend;
      r.dataset.backend = b.address;
      cell(r, "");
      cell(r, "");
      cell(r, "");
      cell(r, b.address);
      cell(r, b.state, b.state);
      cell(r, state.counters ? b.packets : "–", "num packets");
      cell(r, state.counters ? b.bytes : "–", "num bytes");
    }
  }
  const shown = state.services.length;
  $("services-count").textContent =
    shown < state.services_total ? `(${shown} of ${state.services_total})` : `(${shown})`;
  $("no-counters").hidden = state.counters;
}

function renderSyncs(syncs) {
  // One bar per sync, the tallest filling the chart; newest on the right.
  const svg = $("syncs");
  svg.replaceChildren();
  if (!syncs.length) return;
  const max = Math.max(...syncs.map((s) => s.duration_ms), 0.001);
  const width = 300 / 60;
  syncs.forEach((s, i) => {
    const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const height = Math.max((s.duration_ms / max) * 76, 1);
    bar.setAttribute("x", (300 - (syncs.length - i) * width + 0.5).toFixed(1));
    bar.setAttribute("y", (80 - height).toFixed(1));
    bar.setAttribute("width", (width - 1).toFixed(1));
    bar.setAttribute("height", height.toFixed(1));
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `${s.duration_ms.toFixed(2)} ms, ${s.changes} change(s)`;
    bar.appendChild(title);
    svg.appendChild(bar);
  });
  const last = syncs[syncs.length - 1];
  $("sync-last").textContent = `(last ${last.duration_ms.toFixed(2)} ms, max ${max.toFixed(2)} ms, ${syncs.length} syncs)`;
}

function renderTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const values of rows) {
    const row = body.insertRow();
    values.forEach((v, i) => cell(row, v, i > 0 && typeof v === "number" ? "num" : ""));
  }
}

function render(state) {
  $("mode").textContent = `mode: ${state.mode}`;
  $("health").textContent = state.healthy ? "healthy" : "unhealthy";
  $("health").className = `badge ${state.healthy ? "ok" : "bad"}`;
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  renderServices(state);
  renderSyncs(state.syncs);
  renderTable("datapath", Object.entries(state.datapath));
  if (state.dns) {
    $("dns-section").hidden = false;
    renderTable("dns", state.dns.names.map((n) => [n.name, n.kind, n.answers.join(", ")]));
    $("dns-count").textContent =
      `(${state.dns.names_total} names, ${state.dns.queries} queries, ${state.dns.cache_hits} cache hits)`;
  }
  renderTable("rejected", state.rejected.map((r) => [r.object, r.reason]));
  $("rejected-count").textContent = `(${state.rejected.length})`;
}

async function poll() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (response.ok) {
      render(await response.json());
    } else {
      $("updated").textContent = `agent answered ${response.status}`;
    }
  } catch (e) {
    // The agent may be restarting: say so and keep trying.
    $("updated").textContent = "agent unreachable";
  }
  setTimeout(poll, 1000);
}

poll();
