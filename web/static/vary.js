// Vary (Region): paint a mask over the image (brush, eraser, size, undo, invert), then send
// it with the region's prompt. Pointer events, so a mouse, a pen and a finger all paint.
"use strict";

const PAINT = "#ff2d95"; // what the painted region shows as (the canvas is half transparent)
const UNDO_DEPTH = 30;

function setUpEditor() {
  const root = document.getElementById("vary");
  if (!root) return;
  const canvas = document.getElementById("mask");
  const stage = document.getElementById("stage");
  const ctx = canvas.getContext("2d");
  const size = document.getElementById("brush-size");
  const sizeOut = document.getElementById("brush-size-value");
  const undoButton = document.getElementById("undo");
  const brushButton = document.getElementById("tool-brush");
  const eraserButton = document.getElementById("tool-eraser");
  const error = document.getElementById("vary-error");
  const history = [];
  let erasing = false;
  let last = null; // the previous point of the stroke under way
  let activePointer = null;

  // The stage keeps the image's shape; the CSS sizes it from this (no inline styles: CSP).
  stage.style.setProperty("--aspect", String(canvas.width / canvas.height));

  function setTool(erase) {
    erasing = erase;
    brushButton.setAttribute("aria-pressed", String(!erase));
    eraserButton.setAttribute("aria-pressed", String(erase));
  }

  function remember() {
    history.push(ctx.getImageData(0, 0, canvas.width, canvas.height));
    if (history.length > UNDO_DEPTH) history.shift();
    undoButton.disabled = false;
  }

  function undo() {
    const previous = history.pop();
    if (previous) ctx.putImageData(previous, 0, 0);
    undoButton.disabled = history.length === 0;
  }

  // Canvas pixels per CSS pixel: the brush size is what the person sees on screen.
  function scale() {
    const box = canvas.getBoundingClientRect();
    return box.width > 0 ? canvas.width / box.width : 1;
  }

  function at(event) {
    const box = canvas.getBoundingClientRect();
    const k = scale();
    return { x: (event.clientX - box.left) * k, y: (event.clientY - box.top) * k };
  }

  function stroke(from, to) {
    ctx.save();
    ctx.globalCompositeOperation = erasing ? "destination-out" : "source-over";
    ctx.strokeStyle = PAINT;
    ctx.fillStyle = PAINT;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number(size.value) * scale();
    ctx.beginPath();
    if (from.x === to.x && from.y === to.y) {
      ctx.arc(to.x, to.y, ctx.lineWidth / 2, 0, Math.PI * 2);
      ctx.fill();
    } else {
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
    }
    ctx.restore();
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (activePointer !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    activePointer = event.pointerId;
    canvas.setPointerCapture(event.pointerId);
    remember();
    last = at(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (event.pointerId !== activePointer || last === null) return;
    event.preventDefault();
    // Every sample since the last frame, so a fast stroke stays a line, not dots.
    const samples = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const sample of samples.length ? samples : [event]) {
      const point = at(sample);
      stroke(last, point);
      last = point;
    }
  });
  function end(event) {
    if (event.pointerId !== activePointer) return;
    activePointer = null;
    last = null;
  }
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());

  size.addEventListener("input", () => { sizeOut.value = size.value; });
  brushButton.addEventListener("click", () => setTool(false));
  eraserButton.addEventListener("click", () => setTool(true));
  undoButton.addEventListener("click", undo);
  document.getElementById("clear").addEventListener("click", () => {
    remember();
    ctx.clearRect(0, 0, canvas.width, canvas.height);
  });
  document.getElementById("invert").addEventListener("click", () => {
    remember();
    // Paint everywhere, then cut out what was painted before.
    const before = document.createElement("canvas");
    before.width = canvas.width;
    before.height = canvas.height;
    before.getContext("2d").drawImage(canvas, 0, 0);
    ctx.save();
    ctx.globalCompositeOperation = "source-over";
    ctx.fillStyle = PAINT;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(before, 0, 0);
    ctx.restore();
  });
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "z" && event.target.tagName !== "TEXTAREA") {
      event.preventDefault();
      undo();
    }
  });

  // The mask the server reads: white where painted (its coverage as grey at soft edges),
  // black elsewhere, at the image's own size.
  function maskBlob() {
    const out = document.createElement("canvas");
    out.width = canvas.width;
    out.height = canvas.height;
    const o = out.getContext("2d");
    o.drawImage(canvas, 0, 0);
    o.globalCompositeOperation = "source-in";
    o.fillStyle = "#fff";
    o.fillRect(0, 0, out.width, out.height);
    o.globalCompositeOperation = "destination-over";
    o.fillStyle = "#000";
    o.fillRect(0, 0, out.width, out.height);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }

  function painted() {
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) return true;
    return false;
  }

  function say(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  const form = document.getElementById("vary-form");
  const submit = document.getElementById("vary-submit");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    say("");
    if (!painted()) {
      say("Paint the region to change first.");
      return;
    }
    submit.disabled = true;
    try {
      const body = new FormData();
      body.set("csrf", root.dataset.csrf);
      body.set("nonce", root.dataset.nonce);
      body.set("prompt", document.getElementById("vary-prompt").value);
      body.set("mask", await maskBlob(), "mask.png");
      const reply = await fetch(root.dataset.action, {
        method: "POST", body, credentials: "same-origin",
      });
      let answer = {};
      try { answer = await reply.json(); } catch (_) { answer = {}; }
      if (reply.ok && answer.job) {
        window.location.assign(answer.job);
        return;
      }
      say(answer.detail || `The server said ${reply.status}; try again.`);
    } catch (_) {
      say("Could not reach the server; try again.");
    }
    submit.disabled = false;
  });
  root.dataset.ready = "1"; // for tests: the handlers are in place
}

if (document.readyState === "loading") {
  document.addEventListener("DOMContentLoaded", setUpEditor);
} else {
  setUpEditor();
}
