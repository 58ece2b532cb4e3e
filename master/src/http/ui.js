// Agora's web UI: keeps the page current without a reload. No library: every second it asks
// the master's /ui/api/... for what changed and writes it into the page as text (never HTML).
"use strict";
(function () {
  const POLL_MS = 1000;
  // The most log text a page keeps (older text is dropped from the top).
  const KEEP = 256 * 1024;

  function setText(root, field, text) {
    const el = root.querySelector('[data-field="' + field + '"]');
    if (el && el.textContent !== text) el.textContent = text;
  }

  function badgeClass(state) {
    if (state === "TASK_RUNNING") return "ok";
    if (state === "TASK_FINISHED") return "done";
    if (["TASK_STAGING", "TASK_STARTING", "TASK_KILLING"].includes(state)) return "pending";
    if (["TASK_UNREACHABLE", "TASK_UNKNOWN"].includes(state)) return "warn";
    return "bad";
  }

  async function getJson(url) {
    const r = await fetch(url, { cache: "no-store" });
    if (!r.ok) throw new Error(url + ": " + r.status);
    return r.json();
  }

  function appendLog(pre, piece) {
    if (!pre || !piece || piece.error || typeof piece.next !== "number") return;
    if (piece.text) {
      let text = pre.textContent + piece.text;
      if (text.length > KEEP) text = text.slice(text.length - KEEP);
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = text;
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
    pre.dataset.next = String(piece.next);
  }

  function followTask(root) {
    const out = document.getElementById("stdout");
    const err = document.getElementById("stderr");
    let stopped = false;
    async function tick() {
      let url = root.dataset.poll;
      if (out) url += "&stdout=" + out.dataset.next;
      if (err) url += "&stderr=" + err.dataset.next;
      try {
        const t = await getJson(url);
        const badge = root.querySelector('[data-field="state"]');
        if (badge && badge.textContent !== t.state) {
          badge.textContent = t.state;
          badge.className = "badge " + badgeClass(t.state);
        }
        setText(root, "reason", t.reason);
        setText(root, "message", t.message);
        setText(root, "exit", t.exit);
        const usage = root.querySelector('[data-field="usage"]');
        if (usage) {
          usage.replaceChildren(...t.usage.map(function (u) {
            const s = document.createElement("span");
            s.className = "usage";
            s.textContent = u;
            return s;
          }));
        }
        appendLog(out, t.stdout);
        appendLog(err, t.stderr);
        // Terminal: one last poll drained the logs (the agent sends everything once the task
        // has ended), so the page stops asking.
        const drained = (!t.stdout || !t.stdout.text) && (!t.stderr || !t.stderr.text);
        if (t.terminal && drained) stopped = true;
      } catch (e) {
        // The master may be restarting: keep asking.
      }
      if (!stopped) setTimeout(tick, POLL_MS);
    }
    setTimeout(tick, POLL_MS);
  }

  function followOverview(root) {
    async function tick() {
      try {
        const o = await getJson(root.dataset.poll);
        const total = root.querySelector('[data-count="total"]');
        if (total) total.textContent = String(o.total);
        for (const [state, n] of Object.entries(o.counts)) {
          const el = root.querySelector('[data-count="' + state + '"]');
          if (el) {
            el.textContent = String(n);
            const li = el.closest("li");
            if (li) li.classList.toggle("zero", n === 0);
          }
        }
      } catch (e) {
        // Keep asking.
      }
      setTimeout(tick, POLL_MS);
    }
    setTimeout(tick, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", function () {
    const task = document.getElementById("task");
    if (task && task.dataset.poll) followTask(task);
    const counts = document.getElementById("counts");
    if (counts && counts.dataset.poll) followOverview(counts);
  });
})();
