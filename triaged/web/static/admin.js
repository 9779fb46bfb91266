// Admin page: run C-ECHO through the API and show the answer in place (forms still work without JS).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form.echo")) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const name = form.dataset.name;
      const out = document.querySelector(`.echo-result[data-for="${CSS.escape(name)}"]`);
      const button = form.querySelector("button");
      button.disabled = true;
      out.textContent = "testing…";
      out.className = "echo-result small";
      try {
        const r = await window.triaged.postJSON(`/api/admin/destinations/${encodeURIComponent(name)}/echo`);
        const ok = r.ok && r.data && r.data.ok;
        out.textContent = r.data ? (r.data.message || r.data.detail || "") : `HTTP ${r.status}`;
        out.classList.add(ok ? "ok" : "bad");
      } catch (e) {
        out.textContent = "request failed";
        out.classList.add("bad");
      } finally {
        button.disabled = false;
      }
    });
  }
});
