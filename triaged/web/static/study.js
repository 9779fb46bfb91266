// Study page: notice changes (a score arriving, a delivery, another reader's verdict) without
// a manual reload. Polls the small revision endpoint; reloads the page when nothing would be
// lost, otherwise (a note being typed) shows a banner and lets the reader choose.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const head = document.getElementById("study");
  if (!head || !head.dataset.revision) return;
  const url = `/api/studies/${encodeURIComponent(head.dataset.uid)}/revision`;
  const pollMs = Number(head.dataset.pollMs || 3000);
  const banner = document.getElementById("changed");
  const note = document.querySelector("textarea[name=note]");
  const typing = () => note && (note.value.trim() !== "" || document.activeElement === note);
  document.getElementById("reload").addEventListener("click", () => location.reload());

  async function check() {
    if (!document.hidden) {
      try {
        const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (r.status === 401) { location.reload(); return; }  // session ended: go to login
        if (r.ok) {
          const d = await r.json();
          if (d.revision !== head.dataset.revision) {
            if (!typing()) { location.reload(); return; }
            banner.hidden = false;
          }
        }
      } catch (e) { /* server restarting: try again next time */ }
    }
    setTimeout(check, pollMs);
  }
  setTimeout(check, pollMs);
});
