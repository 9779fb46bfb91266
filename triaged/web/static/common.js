// Shared helpers: the CSRF token, JSON POSTs, local times. No framework, no network but our own.
"use strict";
window.triaged = {
  csrf() {
    const m = document.querySelector('meta[name="csrf-token"]');
    return m ? m.content : "";
  },
  async postJSON(url, body) {
    const r = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": this.csrf() },
      body: JSON.stringify(body || {}),
    });
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    return { ok: r.ok, status: r.status, data };
  },
  localTime(iso) {
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  },
};
document.addEventListener("DOMContentLoaded", () => {
  for (const t of document.querySelectorAll("time[datetime]")) {
    t.title = t.textContent;
    t.textContent = window.triaged.localTime(t.getAttribute("datetime"));
  }
  // On a study page, Escape goes back to the worklist (keeping its filters).
  const back = document.getElementById("back");
  if (back) {
    if (document.referrer) {
      try {
        const ref = new URL(document.referrer);
        if (ref.origin === location.origin && ref.pathname === "/") back.href = ref.pathname + ref.search;
      } catch (e) { /* keep the plain link */ }
    }
    document.addEventListener("keydown", (ev) => {
      const tag = (ev.target && ev.target.tagName) || "";
      if (ev.key === "Escape" && !["INPUT", "TEXTAREA", "SELECT"].includes(tag)) location.href = back.href;
    });
  }
});
