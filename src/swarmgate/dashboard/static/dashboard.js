// The dashboard works without this file; it adds copy buttons, confirmations and
// live refresh of the sections marked data-live (device states, network status).
"use strict";

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.querySelector(button.dataset.copy);
  if (!source || !navigator.clipboard) return;
  navigator.clipboard.writeText(source.textContent.trim()).then(() => {
    button.textContent = "Copied";
  });
});

document.addEventListener("submit", (event) => {
  const form = event.target.closest("form[data-confirm]");
  if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
});

const LIVE_EVERY_MS = 5000;

async function refreshLive() {
  const sections = document.querySelectorAll("[data-live]");
  if (!sections.length || document.hidden) return;
  try {
    const response = await fetch(window.location.href, {
      credentials: "same-origin",
      headers: { "Accept": "text/html" },
    });
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    sections.forEach((section) => {
      const replacement = fresh.querySelector(`[data-live="${section.dataset.live}"]`);
      if (replacement) section.replaceWith(replacement);
    });
  } catch (error) {
    // Offline or the gateway restarting: try again at the next tick.
  }
}

if (document.querySelector("[data-live]")) {
  window.setInterval(refreshLive, LIVE_EVERY_MS);
}
