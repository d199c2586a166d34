// The gallery's small behaviours; every page also works without them.
"use strict";

// Infinite scroll: when the "Older images" link comes into view, fetch the next cards and
// put them in its place. Without JavaScript the link is an ordinary next page.
function watchMore() {
  const more = document.getElementById("more");
  const grid = document.getElementById("grid");
  if (!more || !grid || !("IntersectionObserver" in window)) return;
  const seen = new IntersectionObserver(async (entries) => {
    if (!entries.some((e) => e.isIntersecting)) return;
    seen.disconnect();
    const url = new URL(more.href);
    url.searchParams.set("partial", "1");
    const reply = await fetch(url, { credentials: "same-origin" });
    if (!reply.ok) return;
    const holder = document.createElement("div");
    holder.innerHTML = await reply.text();
    more.remove();
    grid.append(...holder.childNodes);
    watchMore();
  }, { rootMargin: "600px" });
  seen.observe(more);
}

// Copy buttons: the text of the element the button names.
function watchCopy() {
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).textContent.trim();
      try {
        await navigator.clipboard.writeText(text);
        button.dataset.done = "1";
        button.textContent = "Copied";
      } catch (err) {
        window.prompt("Copy:", text);
      }
    });
  }
}

// Delete asks first.
function watchDelete() {
  const form = document.getElementById("delete");
  if (!form) return;
  form.addEventListener("submit", (event) => {
    if (!window.confirm("Delete this image for good?")) event.preventDefault();
  });
}

// A job's progress over Server-Sent Events, then the new images.
function watchJob() {
  const job = document.getElementById("job");
  if (!job) return;
  const status = document.getElementById("status");
  const bar = document.getElementById("progress");
  const results = document.getElementById("results");
  const source = new EventSource(job.dataset.events);
  // What arrived, in order, kept on the element (for people debugging, and for the tests).
  const seen = [];
  const on = (kind, fn) => source.addEventListener(kind, (e) => {
    seen.push(kind);
    job.dataset.seen = seen.join(" ");
    fn(JSON.parse(e.data));
  });
  on("queued", (d) => { status.textContent = d.position ? `queued (position ${d.position})` : "queued"; });
  on("started", () => { status.textContent = "rendering"; });
  on("progress", (d) => {
    status.textContent = `rendering: step ${d.step} of ${d.total}`;
    bar.max = d.total; bar.value = d.step;
  });
  on("done", (d) => {
    source.close();
    status.textContent = "done";
    bar.max = 1; bar.value = 1;
    for (const image of d.images) {
      const link = document.createElement("a");
      link.href = image.url;
      link.className = "card new-image";
      const img = document.createElement("img");
      img.src = image.thumb;
      img.alt = `seed ${image.seed}`;
      link.append(img);
      results.append(link);
    }
  });
  for (const kind of ["failed", "cancelled"]) {
    on(kind, (d) => { source.close(); status.textContent = `${kind}: ${d.reason || ""}`; });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  watchMore();
  watchCopy();
  watchDelete();
  watchJob();
});
