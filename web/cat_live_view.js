// ComfyUI-CAT live training view: the CAT LoRA and CatVersion Trainer nodes draw their loss curves (total raw + smoothed,
// identity term "fit", preservation term "keep"), step, it/s and ETA from the "cat.train.progress" events
// the trainer sends every step. When the run ends, ComfyUI's execution events decide how it is shown:
// done, cancelled or failed, with the curve dimmed and no ETA, so a stopped run never looks alive.
// Validation rows ("cat.train.validation": fit and keep drift at fixed points, every validate_every steps) are drawn
// on the same axis as dotted lines with a dot per row, so the measured fit and drift sit next to the noisy loss.
// The chart is a widget of the node, added by its first event: a trainer node that never trained has none, so the
// editor behaves as without this extension.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "cat.train.progress";
const VALIDATION_EVENT = "cat.train.validation";
const STOPPED_EVENT = "cat.train.stopped"; // nodes/common.py STOPPED_EVENT
const TRAINERS = ["CAT_LoraTrainer", "CAT_CatVersionTrainer"]; // both train in cat_train.training.loop.train
const PLOT_H = 150;
const APT_H = 62; // APT runs: a band under the loss plot with the overfitting indicator of each timestep bin
const AUTO_H = 34; // auto preservation runs: two lines naming the probes it added, and when
const NEAREST_H = 15; // and with source `nearest`, a line per class word naming the probes it chose and their similarity
const LEFT = 44; // room for the y tick labels
const SERIES = [ // drawn in this order: the dashed lines on top keep "fit" visible where it equals the total
  { key: "loss", label: "loss", color: "rgb(110,160,255)", width: 2.5, dash: [] },
  { key: "fit", label: "fit", color: "rgb(255,170,60)", width: 1.5, dash: [5, 3] },
  { key: "keep", label: "keep", color: "rgb(90,210,120)", width: 1.5, dash: [2, 2] },
];
const VALIDATION = [ // validation rows: {step, fit, keep_drift, probe_drift?}
  { key: "fit", label: "val fit", color: "rgb(240,110,200)", width: 2, dash: [2, 2] },
  { key: "keep_drift", label: "keep drift", color: "rgb(190,140,255)", width: 2, dash: [2, 2] },
  { key: "probe_drift", label: "probe drift", color: "rgb(120,220,230)", width: 2, dash: [2, 2] },
];
// node id (string) -> {loss, fit, keep, validation, start, step, total, elapsed, lr, state: running|done|cancelled|failed, message}
const runs = new Map();
// node id -> where its chart was last drawn: {canvas, rect: [x0, y0, x1, y1] in that canvas' pixels}
const drawn = new Map();
// Tests (tests/comfy/test_browser.py) and curious users read the state here.
globalThis.__catLiveView = { runs, drawn, PLOT_H, APT_H, AUTO_H, NEAREST_H, VALIDATION, CHART: "cat_live_view" };

function newRun(d) {
  return { loss: [], fit: [], keep: [], validation: [], start: null, step: 0, total: d.total, elapsed: 0, lr: d.lr,
           state: "running", message: "" };
}

function ema(values, beta = 0.9) {
  const out = [];
  let m = null;
  for (const v of values) {
    if (!isFinite(v)) { out.push(v); continue; } // a NaN step stays visible as a gap, it does not poison the mean
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

// Compact tick label: 0.12, 3.5, 120, 1.1e-2, 2e+4; digits grow until every label is distinct.
export function tickLabels(values) {
  for (let digits = 2; digits <= 8; digits++) {
    const labels = values.map((v) => {
      if (v === 0) return "0";
      const a = Math.abs(v);
      if (a >= 0.01 && a < 1000) return String(Number(v.toPrecision(digits)));
      const [m, e] = v.toExponential(digits - 1).split("e");
      return `${Number(m)}e${Number(e) < 0 ? "" : "+"}${Number(e)}`;
    });
    if (new Set(labels).size === labels.length) return labels;
  }
  return values.map((v) => v.toExponential(6));
}

function niceStep(span, count) {
  const raw = span / Math.max(count, 1), p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const f of [1, 2, 2.5, 5, 10]) if (f * p >= raw) return f * p;
  return 10 * p;
}

// The y axis: log scale when the data spans more than a factor of 20, else linear; 3-5 ticks inside the range.
export function yAxis(values) {
  const pos = values.filter((v) => isFinite(v) && v > 0);
  if (!pos.length) return null;
  let lo = Math.min(...pos), hi = Math.max(...pos);
  // keep starts near 0 (the LoRA starts as a no-op): at most 4 decades, or the loss flattens into one line
  lo = Math.max(lo, hi * 1e-4);
  if (hi / lo > 20) {
    const l0 = Math.log10(lo), l1 = Math.log10(hi);
    const inRange = (fs, every) => {
      const out = [];
      for (let e = Math.floor(l0); e <= Math.ceil(l1); e += every) for (const f of fs) {
        const t = Number((f * Math.pow(10, e)).toPrecision(12));
        if (t >= lo && t <= hi) out.push(t);
      }
      return out;
    };
    // powers of ten, every one or every 2nd, 3rd... so at most 5; under ~2 decades those give too few
    // ticks, then 1-3-10 or 1-2-5 steps
    let ticks = [];
    for (let every = 1; every < 30 && !(ticks.length && ticks.length <= 5); every++) ticks = inRange([1], every);
    if (ticks.length < 3) ticks = inRange([1, 3], 1);
    if (ticks.length < 3) ticks = inRange([1, 2, 5], 1);
    ticks.sort((a, b) => a - b);
    return { log: true, lo: l0, hi: l1, map: (v) => Math.log10(v), ticks, labels: tickLabels(ticks) };
  }
  if (hi - lo < hi * 1e-6) { lo = hi * 0.9; hi = hi * 1.1; } // a flat curve still gets an axis
  const step = niceStep(hi - lo, 4);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return { log: false, lo, hi, map: (v) => v, ticks, labels: tickLabels(ticks) };
}

function findNode(id) {
  if (id === null || id === undefined || !app.graph) return null;
  const last = String(id).split(":").pop(); // nodes inside subgraphs arrive as "outer:inner"
  return app.graph.getNodeById(Number(last)) ?? null;
}

function redraw(key) {
  const node = key === undefined ? null : findNode(key);
  node?.setDirtyCanvas?.(true, false);
  // Nodes 2.0 draws the chart on a canvas of its own, repainted only when asked
  node?.widgets?.find((w) => w.name === CHART)?.triggerDraw?.();
  app.graph?.setDirtyCanvas(true, false);
}

// The chart is a widget under the node's widgets rather than a drawing over the node's bottom edge: both node
// renderers lay it out (the LiteGraph canvas draws it with the node, Nodes 2.0 draws a custom widget on a canvas of
// its own), and ComfyUI's image preview (the trainer's preview grid), a widget that sizes itself, is laid out under it
// instead of over it.
const CHART = "cat_live_view";
const PREVIEW_WIDGET = "$$canvas-image-preview";

function chartHeight(run) {
  return PLOT_H + below(run);
}

function chartWidget(node) {
  const had = node.widgets?.find((w) => w.name === CHART);
  if (had || typeof node.addCustomWidget !== "function") return had;
  const w = node.addCustomWidget({
    name: CHART, type: CHART, value: "", y: 0, serialize: false, options: { serialize: false },
    computeSize(width) {
      const run = runs.get(String(node.id));
      return [width ?? node.size[0], run ? chartHeight(run) : 0];
    },
    draw(ctx, n, width, y) {
      const run = runs.get(String(n.id));
      if (!run || n.flags?.collapsed) return;
      drawRun(ctx, run, width, y);
      const m = ctx.getTransform?.();
      if (m) {
        const [a, b] = [new DOMPoint(0, y), new DOMPoint(width, y + chartHeight(run))].map((p) => m.transformPoint(p));
        drawn.set(String(n.id), { canvas: ctx.canvas, rect: [a.x, a.y, b.x, b.y] });
      }
    },
  }) ?? node.widgets.find((x) => x.name === CHART);
  const list = node.widgets, at = list.findIndex((x) => x.name === PREVIEW_WIDGET), i = list.indexOf(w);
  if (at >= 0 && at < i) list.splice(at, 0, ...list.splice(i, 1)); // a preview shown before the first event
  return w;
}

// Room for the chart: the node grows to what its renderer computes for all its widgets, the chart included.
function fit(node) {
  if (!chartWidget(node)) return;
  const need = node.computeSize?.()[1] ?? node.size[1];
  if (node.size[1] < need) node.setSize([Math.max(node.size[0], 340), need]);
}

function onProgress(event) {
  try {
    const d = event.detail;
    if (!d || d.step === undefined) return;
    const key = String(d.node);
    let run = runs.get(key);
    if (!run || run.state !== "running" || d.step <= run.step) { // a new run (or a resumed one) starts a fresh curve
      run = newRun(d);
      runs.set(key, run);
    }
    if (run.start === null) run.start = d.step; // loss[i] is step start + i
    run.loss.push(d.loss); run.fit.push(d.fit); run.keep.push(d.keep);
    // steps done before this run (a resume's): elapsed counts only this run's, and so do it/s and the ETA
    Object.assign(run, { step: d.step, total: d.total, elapsed: d.elapsed, lr: d.lr,
                         first: d.first_step ?? run.first ?? run.start - 1 });
    if (d.apt) run.apt = d.apt; // {indicator: [per bin, null if not drawn yet], fit_weight, augment_prob, ...}
    if (d.auto) run.auto = d.auto; // {auto_added: [[probe, step, drift], ...], drift: {probe: drift}, measured, ...}
    if (run.step >= run.total) run.state = "done";
    const node = findNode(d.node);
    if (node && TRAINERS.includes(node.comfyClass ?? node.type)) fit(node);
    redraw(key);
  } catch (e) {
    console.warn("[ComfyUI-CAT] live view:", e);
  }
}

// A run stopped (Cancel, a crash) with a checkpoint saved: the status line says what to type into resume_from.
function onStopped(event) {
  const d = event.detail;
  const run = d ? runs.get(String(d.node)) : undefined;
  if (!run || !d.resume_from) return;
  run.resume = d.resume_from;
  redraw(String(d.node));
}

function onValidation(event) {
  try {
    const d = event.detail;
    if (!d || d.step === undefined) return;
    const key = String(d.node);
    let run = runs.get(key);
    // the step-0 row comes before the first training step; a row for a step the run already reached (its last one,
    // after the run read "done") belongs to it
    if (!run || (run.state !== "running" && !(d.step > 0 && d.step <= run.step))) {
      run = newRun(d);
      runs.set(key, run);
    }
    if (d.total) run.total = d.total;
    run.validation.push({ step: d.step, fit: d.fit, keep_drift: d.keep_drift, probe_drift: d.probe_drift });
    const node = findNode(d.node);
    if (node && TRAINERS.includes(node.comfyClass ?? node.type)) fit(node);
    redraw(key);
  } catch (e) {
    console.warn("[ComfyUI-CAT] live view:", e);
  }
}

// End every run still marked running: the prompt finished (done), was cancelled or failed.
function endRuns(state, detail) {
  for (const [key, run] of runs) {
    if (run.state !== "running") continue;
    if (state === "failed") {
      const here = detail?.node_id !== undefined && String(detail.node_id) === key;
      const msg = String(detail?.exception_message ?? "").split("\n")[0].slice(0, 80);
      run.message = here ? msg : `${detail?.node_type ?? "another node"} failed`;
    }
    // "executing null" after all steps is a finish; before them (a run that left early) it is not "done"
    run.state = state === "done" && run.step < run.total ? "stopped" : state;
    redraw(key);
  }
}

// Data -> pixel row, with a margin so a curve at the top or bottom of the range is not cut by the plot edge.
function rowOf(axis, v, y, h) {
  const m = 0.06 * h, f = (axis.map(Math.max(v, axis.log ? Math.pow(10, axis.lo) : -Infinity)) - axis.lo) / (axis.hi - axis.lo || 1);
  return Math.min(y + h, Math.max(y, y + m + (h - 2 * m) * (1 - f)));
}

function drawSeries(ctx, values, axis, x, y, w, h, n, s) {
  const pts = [];
  values.forEach((v, i) => {
    if (!(isFinite(v) && (v > 0 || !axis.log))) return;
    const px = x + (n > 1 ? (w * i) / (n - 1) : 0);
    pts.push([px, rowOf(axis, v, y, h)]);
  });
  if (pts.length < 2) return false;
  ctx.strokeStyle = s.color; ctx.lineWidth = s.width; ctx.setLineDash?.(s.dash ?? []);
  ctx.beginPath();
  pts.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
  ctx.stroke();
  ctx.setLineDash?.([]);
  return true;
}

// Validation rows at their steps (loss[i] is step start + i; the step-0 row sits at the left edge), a dot per row.
export function drawValidation(ctx, rows, s, axis, x, y, w, h, n, start) {
  const pts = rows.filter((r) => isFinite(r[s.key]) && (r[s.key] > 0 || !axis.log)).map((r) => {
    const i = Math.min(Math.max(r.step - start, 0), Math.max(n - 1, 0));
    return [x + (n > 1 ? (w * i) / (n - 1) : 0), rowOf(axis, r[s.key], y, h)];
  });
  if (!pts.length) return false;
  ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = s.width; ctx.setLineDash?.(s.dash);
  ctx.beginPath();
  pts.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
  ctx.stroke();
  ctx.setLineDash?.([]);
  for (const [px, py] of pts) { ctx.beginPath(); ctx.arc?.(px, py, 3, 0, 2 * Math.PI); ctx.fill?.(); }
  return true;
}

function resumeFrom(run) {
  return run.resume ? ` · resume_from ${run.resume}` : "";
}

function statusLine(run) {
  const done = run.step - (run.first ?? 0);
  const rate = run.elapsed > 0 ? done / run.elapsed : 0;
  const at = `${run.step}/${run.total}`;
  switch (run.state) {
    case "running": {
      const eta = rate > 0 ? (run.total - run.step) / rate : NaN;
      return `step ${at} · ${rate.toFixed(2)} it/s · ETA ${fmtTime(eta)}`;
    }
    case "done": return run.first ? `done: ${done} steps (resumed at ${run.first}) in ${fmtTime(run.elapsed)} · ` +
      `${rate.toFixed(2)} it/s` : `done: ${run.total} steps in ${fmtTime(run.elapsed)} · ${rate.toFixed(2)} it/s`;
    case "cancelled": return `cancelled at step ${at}${resumeFrom(run)}`;
    case "stopped": return `stopped at step ${at}${resumeFrom(run)}`;
    default: return `failed at step ${at}${run.message ? ": " + run.message : ""}${resumeFrom(run)}`;
  }
}

// What regularizers draw under the loss plot: APT's indicator band, auto preservation's lines.
function below(run) {
  return (run.apt ? APT_H : 0) + (run.auto ? AUTO_H + (run.auto.auto_nearest?.length ? NEAREST_H : 0) : 0);
}

export function drawRun(ctx, run, width, y0) {
  // a legend row, the plot, two text lines in the first PLOT_H pixels from y0; then what regularizers add
  const pad = 8, x = pad + LEFT, w = width - 2 * pad - LEFT, top = y0 + 2, y = top + 14, h = PLOT_H - 50;
  const ended = run.state !== "running";
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)"; ctx.fillRect(x, y, w, h);
  const smooth = Object.fromEntries(SERIES.map((s) => [s.key, ema(run[s.key])]));
  // keep is all zeros in a plain-LoRA run (cat_factor 0): leave it out rather than draw a line at the floor
  const shown = SERIES.filter((s) => run[s.key].some((v) => isFinite(v) && v > 0));
  const val = run.validation ?? [];
  const valShown = VALIDATION.filter((s) => val.some((r) => isFinite(r[s.key]) && r[s.key] > 0));
  const axis = yAxis([...shown.flatMap((s) => run[s.key]), ...valShown.flatMap((s) => val.map((r) => r[s.key]))]);
  const drawn = [];
  if (axis) {
    ctx.font = "10px sans-serif"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    axis.ticks.forEach((t, i) => {
      const py = rowOf(axis, t, y, h);
      ctx.strokeStyle = "rgba(255,255,255,0.12)"; ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(x, py); ctx.lineTo(x + w, py); ctx.stroke();
      ctx.fillStyle = "#bbb"; ctx.fillText(axis.labels[i], x - 4, py);
    });
    ctx.globalAlpha = ended ? 0.4 : 1; // a finished run stays readable but plainly not live
    const n = run.loss.length;
    drawSeries(ctx, run.loss, axis, x, y, w, h, n, { color: "rgba(110,160,255,0.3)", width: 1 });
    for (const s of shown) if (drawSeries(ctx, smooth[s.key], axis, x, y, w, h, n, s)) drawn.push(s);
    for (const s of valShown) if (drawValidation(ctx, val, s, axis, x, y, w, h, n, run.start ?? 1)) drawn.push(s);
    ctx.globalAlpha = 1;
    ctx.textAlign = "left"; ctx.textBaseline = "alphabetic"; // legend, right-aligned above the plot
    let lx = x + w;
    for (const s of [...drawn].reverse()) {
      const tw = ctx.measureText?.(s.label)?.width ?? 6 * s.label.length;
      lx -= tw;
      ctx.fillStyle = s.color; ctx.fillText(s.label, lx, top + 10);
      lx -= 20;
      ctx.strokeStyle = s.color; ctx.lineWidth = 2; ctx.setLineDash?.(s.dash);
      ctx.beginPath(); ctx.moveTo(lx + 2, top + 6); ctx.lineTo(lx + 16, top + 6); ctx.stroke(); ctx.setLineDash?.([]);
      lx -= 8;
    }
  }
  ctx.textAlign = "left"; ctx.textBaseline = "alphabetic";
  ctx.font = ended ? "bold 12px sans-serif" : "12px sans-serif";
  ctx.fillStyle = { running: "#ddd", done: "#8d8", cancelled: "#fc6", stopped: "#fc6" }[run.state] ?? "#f77";
  ctx.fillText(statusLine(run), pad, y + h + 15);
  const last = (k) => smooth[k][smooth[k].length - 1];
  ctx.fillStyle = "#ccc"; ctx.font = "11px sans-serif";
  ctx.fillText(`smoothed loss ${tickLabels([last("loss") ?? 0])[0]} · fit ${tickLabels([last("fit") ?? 0])[0]} · keep ${tickLabels([last("keep") ?? 0])[0]}`,
    pad, y + h + 30);
  if (run.apt) drawIndicator(ctx, run, x, y + h + 40, w, APT_H - 24, ended);
  if (run.auto) drawAuto(ctx, run, x, y, w, h, pad, y + h + 40 + (run.apt ? APT_H : 0));
  ctx.restore();
}

// Auto preservation: a dashed mark on the plot at each step where probes were added, and under the plot the
// probes added (with their step and drift) and the last measurement's worst probe not (yet) added; with source
// `nearest`, the probes chosen from the class word and their similarity.
export function drawAuto(ctx, run, x, y, w, h, pad, ty) {
  const a = run.auto, added = a.auto_added ?? [];
  ctx.strokeStyle = "rgba(255,120,200,0.8)"; ctx.lineWidth = 1; ctx.setLineDash?.([3, 3]);
  for (const step of new Set(added.map((e) => e[1]))) {
    const px = x + (run.total > 1 ? (w * (step - 1)) / (run.total - 1) : 0);
    ctx.beginPath(); ctx.moveTo(px, y); ctx.lineTo(px, y + h); ctx.stroke();
  }
  ctx.setLineDash?.([]);
  ctx.textAlign = "left"; ctx.textBaseline = "alphabetic"; ctx.font = "11px sans-serif"; ctx.fillStyle = "rgb(255,150,210)";
  const byStep = new Map(); // "wolf, cat (step 50); fox (step 100)": short enough for the node's width
  for (const [p, s] of added) byStep.set(s, [...(byStep.get(s) ?? []), p]);
  const list = [...byStep].map(([s, ps]) => `${ps.join(", ")} (step ${s})`).join("; ");
  ctx.fillText(added.length ? `auto preservation added: ${list}` : `auto preservation: nothing added yet (threshold ${a.threshold})`, pad, ty);
  const have = new Set(added.map((e) => e[0]));
  const rest = Object.entries(a.drift ?? {}).filter(([p]) => !have.has(p)).sort((u, v) => v[1] - u[1]);
  ctx.fillStyle = "#bbb";
  ctx.fillText(a.measured ? `checked at step ${a.measured}: ${added.length}/${a.top_k} added` +
    (rest.length ? ` · worst of the rest ${rest[0][0]} ${tickLabels([rest[0][1]])[0]}` : "") : "first check not yet run", pad, ty + 15);
  // nearest: the words the text encoder put closest to the class word, with their cosine (one line, the first class word's)
  const near = a.auto_nearest?.[0];
  if (near) ctx.fillText(`nearest to ${near.class_word}: ` + near.probes.map(([p, s]) => `${p} ${s.toFixed(2)}`).join(", ") +
    (a.auto_nearest.length > 1 ? ` (+${a.auto_nearest.length - 1} class words)` : ""), pad, ty + 30);
}

// APT's overfitting indicator per timestep bin (low noise left, high noise right) as bars on a 0..1 scale,
// with the fit weight and augmentation probability it sets for the most overfit bin.
export function drawIndicator(ctx, run, x, y, w, h, ended) {
  const ind = run.apt.indicator ?? [];
  if (!ind.length) return;
  ctx.fillStyle = "rgba(0,0,0,0.35)"; ctx.fillRect(x, y, w, h);
  ctx.globalAlpha = ended ? 0.4 : 1;
  const bw = w / ind.length;
  ind.forEach((v, i) => {
    if (v === null || !isFinite(v)) return; // a bin no sample has fallen in yet
    const c = Math.max(0, Math.min(1, v));
    ctx.fillStyle = `rgb(${Math.round(120 + 135 * c)},${Math.round(200 - 120 * c)},90)`;
    ctx.fillRect(x + i * bw + 1, y + h - c * h, Math.max(1, bw - 2), c * h);
  });
  ctx.globalAlpha = 1;
  ctx.font = "10px sans-serif"; ctx.fillStyle = "#bbb"; ctx.textBaseline = "middle"; ctx.textAlign = "right";
  ctx.fillText("1", x - 4, y); ctx.fillText("0", x - 4, y + h);
  ctx.textAlign = "left"; ctx.textBaseline = "alphabetic";
  const vals = ind.map((v) => (v === null || !isFinite(v) ? -Infinity : v));
  const worst = vals.indexOf(Math.max(...vals));
  const fw = run.apt.fit_weight?.[worst], ap = run.apt.augment_prob?.[worst];
  const more = worst >= 0 && isFinite(vals[worst]) ? ` · max ${vals[worst].toFixed(2)} in bin ${worst + 1}` +
    (fw !== undefined ? ` (weight ${fw.toFixed(2)}, aug ${ap.toFixed(2)})` : "") : "";
  ctx.fillText(`APT overfitting indicator per timestep bin, t 0 → T${more}`, x - LEFT + 8, y + h + 12);
}

app.registerExtension({
  name: "ComfyUI-CAT.LiveTrainingView",
  setup() {
    api.addEventListener(EVENT, onProgress);
    api.addEventListener(VALIDATION_EVENT, onValidation);
    api.addEventListener(STOPPED_EVENT, onStopped);
    api.addEventListener("execution_success", () => endRuns("done"));
    api.addEventListener("execution_interrupted", (e) => endRuns("cancelled", e.detail));
    api.addEventListener("execution_error", (e) => endRuns("failed", e.detail));
    // Older servers send no execution_success: "executing" with no node also means the prompt finished.
    api.addEventListener("executing", (e) => {
      const d = e.detail;
      if (d === null || (typeof d === "object" && d !== null && "node" in d && d.node === null)) endRuns("done");
    });
    // Execution events go only to the tab that queued the prompt, progress goes to every tab: in the
    // others an empty queue is the only sign that the run is over.
    api.addEventListener("status", (e) => {
      if (e.detail?.exec_info?.queue_remaining === 0) endRuns("stopped");
    });
  },
});
