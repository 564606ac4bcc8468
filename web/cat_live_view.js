// ComfyUI-CAT live training view: the CAT LoRA Trainer node draws its loss curve (raw + EMA),
// step, steps/s and ETA from the "cat.train.progress" events the trainer sends every step.
// Idle (no events), it draws nothing and changes nothing, so the editor behaves as without it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "cat.train.progress";
const TRAINER = "CAT_LoraTrainer";
const PLOT_H = 150;
const runs = new Map(); // node id (string) -> {loss: [], fit: [], keep: [], step, total, elapsed, done}

function ema(values, beta = 0.9) {
  const out = [];
  let m = null;
  for (const v of values) {
    m = m === null ? v : beta * m + (1 - beta) * v;
    out.push(m);
  }
  return out;
}

function fmtTime(s) {
  if (!isFinite(s) || s < 0) return "--";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
  return (h ? `${h}:${String(m).padStart(2, "0")}` : `${m}`) + `:${String(sec).padStart(2, "0")}`;
}

function findNode(id) {
  if (id === null || id === undefined || !app.graph) return null;
  const last = String(id).split(":").pop(); // nodes inside subgraphs arrive as "outer:inner"
  return app.graph.getNodeById(Number(last)) ?? null;
}

function onProgress(event) {
  try {
    const d = event.detail;
    if (!d || d.step === undefined) return;
    const key = String(d.node);
    let run = runs.get(key);
    if (!run || d.step <= run.step) { // a new run (or a resumed one) starts a fresh curve
      run = { loss: [], fit: [], keep: [], step: 0, total: d.total, elapsed: 0 };
      runs.set(key, run);
    }
    run.loss.push(d.loss); run.fit.push(d.fit); run.keep.push(d.keep);
    Object.assign(run, { step: d.step, total: d.total, elapsed: d.elapsed, lr: d.lr });
    const node = findNode(d.node);
    if (node) {
      const need = (node.computeSize?.()[1] ?? node.size[1]) + PLOT_H;
      if (node.size[1] < need) node.setSize([Math.max(node.size[0], 340), need]);
      node.setDirtyCanvas?.(true, false);
    }
    app.graph?.setDirtyCanvas(true, false);
  } catch (e) {
    console.warn("[ComfyUI-CAT] live view:", e);
  }
}

function drawSeries(ctx, values, x, y, w, h, lo, hi, color, width) {
  if (values.length < 2) return;
  const tf = (v) => Math.log10(Math.max(v, 1e-12));
  ctx.strokeStyle = color; ctx.lineWidth = width; ctx.beginPath();
  values.forEach((v, i) => {
    const px = x + (w * i) / (values.length - 1);
    const py = y + h * (1 - (tf(v) - lo) / (hi - lo || 1));
    i ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
  });
  ctx.stroke();
}

function drawRun(node, ctx, run) {
  const pad = 8, w = node.size[0] - 2 * pad, h = PLOT_H - 36, x = pad, y = node.size[1] - PLOT_H + 6;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)"; ctx.fillRect(x, y, w, h);
  const finite = run.loss.filter((v) => isFinite(v) && v > 0).map((v) => Math.log10(v));
  if (finite.length) {
    const lo = Math.min(...finite), hi = Math.max(...finite);
    drawSeries(ctx, run.loss, x, y, w, h, lo, hi, "rgba(110,160,255,0.35)", 1);
    drawSeries(ctx, ema(run.loss), x, y, w, h, lo, hi, "rgb(110,160,255)", 2);
    ctx.fillStyle = "#ccc"; ctx.font = "10px sans-serif";
    ctx.fillText(`${Math.pow(10, hi).toExponential(2)}`, x + 3, y + 10);
    ctx.fillText(`${Math.pow(10, lo).toExponential(2)}`, x + 3, y + h - 3);
  }
  const rate = run.elapsed > 0 ? run.step / run.elapsed : 0;
  const eta = rate > 0 ? (run.total - run.step) / rate : NaN;
  const last = run.loss[run.loss.length - 1];
  ctx.fillStyle = "#ddd"; ctx.font = "12px sans-serif";
  ctx.fillText(`step ${run.step}/${run.total} · ${rate.toFixed(2)} it/s · ETA ${run.step >= run.total ? "done" : fmtTime(eta)}`, x, y + h + 14);
  ctx.fillText(`loss ${last?.toFixed?.(5) ?? "-"} (smoothed ${ema(run.loss).pop()?.toFixed?.(5) ?? "-"})`, x, y + h + 28);
  ctx.restore();
}

app.registerExtension({
  name: "ComfyUI-CAT.LiveTrainingView",
  setup() {
    api.addEventListener(EVENT, onProgress);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== TRAINER) return;
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = draw?.apply(this, arguments);
      try {
        const run = runs.get(String(this.id));
        if (run && !this.flags?.collapsed) drawRun(this, ctx, run);
      } catch (e) {
        console.warn("[ComfyUI-CAT] live view:", e);
      }
      return r;
    };
  },
});
