// kensa console: keyboard labelling, image zoom, the anomaly heatmap, and the line panel's refresh.
// No framework, no build.
"use strict";

function typing(event) {
  const el = event.target;
  return el && (el.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(el.tagName));
}

// Keys are handled from the first moment the script runs (it is loaded in <head>), looking up the
// form at key time, so a key pressed as the next part appears is not lost.
function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey || typing(event)) return;
  const key = event.key.toLowerCase();
  const zoom = document.getElementById("zoom");
  if (key === "z" && zoom) {
    event.preventDefault();
    zoom.click();
    return;
  }
  const heat = document.getElementById("heat-toggle");
  if (key === "h" && heat) {
    event.preventDefault();
    if (!heat.disabled) heat.click();
    return;
  }
  const form = document.getElementById("label-form");
  if (!form || form.dataset.sent) return;
  const button = form.querySelector(`button[data-key="${CSS.escape(key)}"]:not([disabled])`);
  if (!button) return;
  event.preventDefault();
  form.dataset.sent = "1"; // one label per part: a held key must not label the next part too
  button.classList.add("pressed");
  form.requestSubmit(button);
}
document.addEventListener("keydown", onKey);

function setupZoom() {
  const zoom = document.getElementById("zoom");
  if (!zoom) return;
  zoom.addEventListener("click", () => {
    const on = zoom.getAttribute("aria-pressed") !== "true";
    zoom.setAttribute("aria-pressed", String(on));
    zoom.classList.toggle("zoomed", on);
  });
}

// The heatmap of a part an anomaly model judged: drawn by the served model on first show (it runs
// the model, so never on page load), laid over the part image with the region the model cut.
function setupHeatmap() {
  const toggle = document.getElementById("heat-toggle");
  const overlay = document.getElementById("heatmap");
  if (!toggle || !overlay) return;
  const region = document.querySelector("svg.region");
  const status = document.getElementById("heat-status");
  function say(text, error) {
    status.textContent = text; // text, never markup
    status.classList.toggle("error", Boolean(error));
  }
  function show(on) {
    toggle.setAttribute("aria-pressed", String(on));
    toggle.setAttribute("aria-label", on ? toggle.dataset.labelOn : toggle.dataset.labelOff);
    if (on && !overlay.getAttribute("src")) {
      say("Drawing the heatmap…");
      overlay.src = overlay.dataset.src;
    }
    overlay.toggleAttribute("hidden", !on);
    if (region) region.toggleAttribute("hidden", !on);
    if (!on && overlay.complete && overlay.naturalWidth > 0) say("Heatmap hidden.");
  }
  overlay.addEventListener("load", () => {
    if (toggle.getAttribute("aria-pressed") === "true") {
      say("Heatmap shown: yellow to red where the part differs from good parts, the region outlined.");
    }
  });
  overlay.addEventListener("error", async () => {
    overlay.removeAttribute("src"); // drawn again on the next show
    show(false);
    let detail = "the heatmap could not be drawn";
    try {
      // The console answers why as JSON (an image request cannot read it): ask once more.
      const response = await fetch(overlay.dataset.src, { credentials: "same-origin" });
      const body = await response.json();
      if (body && body.detail) detail = body.detail;
    } catch (err) {
      // keep the general sentence
    }
    say(`No heatmap: ${detail}`, true);
  });
  toggle.addEventListener("click", () => show(toggle.getAttribute("aria-pressed") !== "true"));
}

function setupRefresh() {
  const panel = document.querySelector("[data-refresh-url]");
  if (!panel) return;
  const url = panel.dataset.refreshUrl;
  const seconds = Math.max(1, Number(panel.dataset.refreshS) || 10);
  let busy = false;
  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      // Not "text/html": a lapsed session answers 401 JSON here instead of the sign-in page.
      const response = await fetch(url, { headers: { Accept: "text/x-console-fragment" }, credentials: "same-origin" });
      if (response.status === 401) {
        panel.dataset.stale = "signed-out";
        const note = document.createElement("p");
        note.className = "error";
        note.setAttribute("role", "alert");
        note.textContent = "Your session ended: reload the page to sign in again.";
        panel.replaceChildren(note);
        return;
      }
      if (response.ok) {
        panel.innerHTML = await response.text();
        delete panel.dataset.stale;
      }
    } catch (err) {
      panel.dataset.stale = "unreachable";
    } finally {
      busy = false;
    }
  }
  setInterval(refresh, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  setupZoom();
  setupHeatmap();
  setupRefresh();
});
