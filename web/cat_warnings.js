// ComfyUI-CAT warnings about a queued graph ("cat.warning" events, sent only to the client that queued it), e.g. a
// LoRA applied by the stock LoRA loader to a model of another family (nodes/lora_family_warning.py): a toast that
// stays until closed, and the console. Nothing is blocked; the graph runs as queued.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const shown = []; // tests and curious users read what was shown here
globalThis.__catWarnings = shown;

function onWarning(e) {
  const d = e.detail || {};
  for (const text of d.warnings || []) {
    shown.push(text);
    console.warn(`ComfyUI-CAT: ${text}`);
    const toast = app.extensionManager?.toast;
    if (toast?.add) toast.add({ severity: "warn", summary: d.title || "ComfyUI-CAT", detail: text });
  }
}

app.registerExtension({
  name: "ComfyUI-CAT.warnings",
  setup() {
    api.addEventListener("cat.warning", onWarning);
  },
});
