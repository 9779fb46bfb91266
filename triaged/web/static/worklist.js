// Worklist: poll the JSON API and patch the table in place (order, values, new and gone
// rows) so that scroll position, focus and filters survive; filters live in the URL.
"use strict";
(() => {
  const table = document.getElementById("worklist");
  if (!table) return;
  const tbody = table.tBodies[0];
  const form = document.getElementById("filters");
  const live = document.getElementById("live-status");
  const empty = document.getElementById("empty");
  const pollMs = Number(table.dataset.pollMs || 3000);
  const COLS = ["flag", "priority", "fusion", "cbam", "state", "patient", "accession", "date", "waiting", "model"];
  const OPT = new Set(["cbam", "date", "model"]);
  const OPT2 = new Set(["priority", "accession"]);
  let timer = null;
  let inflight = null;

  const pct = (p) => (p === null || p === undefined ? "–" : `${Math.round(p * 100)}%`);
  function age(seconds) {
    const m = Math.floor(seconds / 60);
    if (m < 1) return "<1 min";
    if (m < 60) return `${m} min`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h} h ${String(m % 60).padStart(2, "0")}`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function query() {
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v !== "") p.set(k, v);
    return p;
  }
  // Replace a cell's children only when what it shows changed (keeps the DOM calm).
  function setCell(td, key, build) {
    if (td.dataset.key === key) return;
    td.dataset.key = key;
    td.replaceChildren(...build());
  }
  function fill(tr, s) {
    const uid = s.study_instance_uid;
    tr.classList.toggle("flagged", !!s.flag);
    const cells = {};
    for (const td of tr.cells) cells[td.dataset.col] = td;
    setCell(cells.flag, `${s.flag}|${s.fusion_probability !== null}`, () =>
      s.flag ? [el("span", "flag", "COVID-19")] : s.fusion_probability !== null ? [el("span", "neg", "negative")] : []);
    setCell(cells.priority, String(s.priority), () => [document.createTextNode(String(s.priority))]);
    setCell(cells.fusion, pct(s.fusion_probability), () => [document.createTextNode(pct(s.fusion_probability))]);
    setCell(cells.cbam, pct(s.cbam_probability), () => [document.createTextNode(pct(s.cbam_probability))]);
    const d = s.deliveries;
    setCell(cells.state, JSON.stringify([s.state, s.state_reason, d, s.feedback, s.ood_reason]), () => {
      const out = [el("span", `state state-${s.state}`, s.state)];
      if (s.state_reason && (s.state === "FAILED" || s.state === "SKIPPED")) out.push(el("span", "reason", s.state_reason));
      if (d.dead) {
        out.push(el("span", "delivery-failed",
          `${d.dead} deliver${d.dead === 1 ? "y" : "ies"} failed${d.last_error ? ": " + d.last_error : ""}`));
      } else if (d.pending) {
        out.push(el("span", "reason", `${d.pending} delivery pending`));
      }
      if (s.ood_reason) {
        out.push(el("span", "ood", "out of distribution"));
        out.push(el("span", "reason", s.ood_reason));
      }
      if (s.feedback) out.push(el("span", `fb fb-${s.feedback}`, s.feedback === "confirm" ? "✓ confirmed" : "✗ refuted"));
      return out;
    });
    setCell(cells.patient, `${uid}|${s.patient_id}`, () => {
      const a = el("a", "", s.patient_id || "–");
      a.href = `/studies/${encodeURIComponent(uid)}`;
      a.tabIndex = -1;
      return [a];
    });
    setCell(cells.accession, s.accession_number || "–", () => [document.createTextNode(s.accession_number || "–")]);
    setCell(cells.date, s.study_date || "–", () => [document.createTextNode(s.study_date || "–")]);
    const w = age(s.waiting_seconds);
    setCell(cells.waiting, w, () => [document.createTextNode(w)]);
    setCell(cells.model, s.model_version || "–", () => [document.createTextNode(s.model_version || "–")]);
  }
  function newRow(s) {
    const tr = el("tr");
    tr.tabIndex = 0;
    tr.dataset.uid = s.study_instance_uid;
    for (const c of COLS) {
      const td = el("td");
      td.dataset.col = c;
      if (["priority", "fusion", "cbam", "waiting"].includes(c)) td.classList.add("num");
      if (c === "fusion" || c === "cbam") td.classList.add("prob");
      if (OPT.has(c)) td.classList.add("opt");
      if (OPT2.has(c)) td.classList.add("opt2");
      if (c === "model") td.classList.add("small");
      tr.appendChild(td);
    }
    return tr;
  }
  function render(studies) {
    const focused = document.activeElement && document.activeElement.closest
      ? document.activeElement.closest("tr[data-uid]") : null;
    const old = new Map([...tbody.rows].map((r) => [r.dataset.uid, r]));
    const firstLoad = tbody.dataset.patched !== "1";
    let prev = null;
    for (const s of studies) {
      let tr = old.get(s.study_instance_uid);
      const isNew = !tr;
      if (isNew) tr = newRow(s); else old.delete(s.study_instance_uid);
      fill(tr, s);
      const want = prev ? prev.nextElementSibling : tbody.firstElementChild;
      if (tr !== want) {
        tbody.insertBefore(tr, want);
        if (!firstLoad) {
          tr.classList.remove("fresh", "moved");
          void tr.offsetWidth; // restart the highlight animation
          tr.classList.add(isNew ? "fresh" : "moved");
        }
      }
      prev = tr;
    }
    for (const tr of old.values()) tr.remove();
    tbody.dataset.patched = "1";
    if (focused && focused.isConnected && document.activeElement !== focused) focused.focus({ preventScroll: true });
    empty.hidden = studies.length > 0;
  }
  async function refresh() {
    clearTimeout(timer);
    if (inflight) inflight.abort();
    const ctrl = new AbortController();
    inflight = ctrl;
    try {
      const r = await fetch(`/api/studies?${query()}`, {
        credentials: "same-origin", headers: { Accept: "application/json" }, signal: ctrl.signal,
      });
      if (r.status === 401) {
        location.href = `/login?next=${encodeURIComponent(location.pathname + location.search)}`;
        return;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const data = await r.json();
      render(data.studies);
      live.textContent = `${data.count} stud${data.count === 1 ? "y" : "ies"} · updated ${new Date().toLocaleTimeString()}`;
      live.classList.remove("bad");
    } catch (e) {
      if (e.name === "AbortError") return;
      live.textContent = `not updating (${e.message}); retrying…`;
      live.classList.add("bad");
    } finally {
      if (inflight === ctrl) {
        inflight = null;
        timer = setTimeout(refresh, pollMs);
      }
    }
  }
  function filtersChanged(ev) {
    if (ev) ev.preventDefault();
    const q = query().toString();
    history.replaceState(null, "", q ? `/?${q}` : "/");
    refresh();
  }
  form.addEventListener("change", filtersChanged);
  form.addEventListener("submit", filtersChanged);
  document.getElementById("clear-filters").addEventListener("click", (ev) => {
    form.reset();
    for (const e of form.elements) if (e.name) e.value = "";
    filtersChanged(ev);
  });

  function open(tr) {
    if (tr) location.href = `/studies/${encodeURIComponent(tr.dataset.uid)}`;
  }
  tbody.addEventListener("click", (ev) => {
    if (ev.target.closest("a")) return; // the link itself navigates
    open(ev.target.closest("tr[data-uid]"));
  });
  tbody.addEventListener("keydown", (ev) => {
    const tr = ev.target.closest("tr[data-uid]");
    if (!tr) return;
    let next = null;
    if (ev.key === "Enter") { ev.preventDefault(); open(tr); return; }
    if (ev.key === "ArrowDown" || ev.key === "j") next = tr.nextElementSibling;
    else if (ev.key === "ArrowUp" || ev.key === "k") next = tr.previousElementSibling;
    else if (ev.key === "Home") next = tbody.firstElementChild;
    else if (ev.key === "End") next = tbody.lastElementChild;
    else return;
    ev.preventDefault();
    if (next) { next.focus(); next.scrollIntoView({ block: "nearest" }); }
  });
  // Arrow down from anywhere outside a form field lands on the first study.
  document.addEventListener("keydown", (ev) => {
    if (ev.key !== "ArrowDown" || ev.target.closest("form, tr[data-uid], input, select, textarea")) return;
    const first = tbody.firstElementChild;
    if (first) { ev.preventDefault(); first.focus(); }
  });
  timer = setTimeout(refresh, pollMs);
})();
