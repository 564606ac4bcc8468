// ComfyUI-CAT workflows open where they can be read. The editor restores the view a workflow was saved with
// (extra.ds), but newer frontends fit a template opened from the template browser to the screen instead; a training
// graph fitted whole is zoomed out so far that the editor draws its nodes as blank boxes (below the
// "LiteGraph.Canvas.MinFontSizeForLOD" text size). Where the editor opened a graph with this pack's nodes at such a
// zoom and the graph carries a saved view that is readable, the saved view is used. Nothing changes where the user
// turned view restoring off (Comfy.EnableWorkflowViewRestore), nor where the editor's own view is readable.
import { app } from "../../scripts/app.js";

const PACK_NODE = /^CAT_/;

function setting(id) {
  try {
    return app.extensionManager?.setting?.get?.(id) ?? app.ui?.settings?.getSettingValue?.(id);
  } catch {
    return undefined;
  }
}

// Whether the canvas draws nodes as blank boxes at `scale`: the canvas decides (its low_quality flag follows the
// scale when the view is next computed), so the threshold stays the editor's own.
function blankAt(canvas, scale) {
  const { ds } = canvas;
  const was = ds.scale;
  ds.scale = scale;
  ds.computeVisibleArea?.(canvas.viewport);
  const blank = !!canvas.low_quality;
  ds.scale = was;
  ds.computeVisibleArea?.(canvas.viewport);
  return blank;
}

export function restoreReadableView() {
  const canvas = app.canvas, graph = app.graph, saved = graph?.extra?.ds;
  if (!canvas?.ds || !saved || !(saved.scale > 0) || !Array.isArray(saved.offset)) return false;
  if (!(graph.nodes ?? graph._nodes ?? []).some((n) => PACK_NODE.test(String(n.type)))) return false;
  if (setting("Comfy.EnableWorkflowViewRestore") === false) return false;
  if (!blankAt(canvas, canvas.ds.scale) || blankAt(canvas, saved.scale)) return false;
  canvas.ds.scale = saved.scale;
  canvas.ds.offset = [saved.offset[0], saved.offset[1]];
  canvas.ds.computeVisibleArea?.(canvas.viewport);
  canvas.setDirty?.(true, true);
  return true;
}

function tryRestore() {
  try {
    return restoreReadableView();
  } catch (e) {
    console.warn("[ComfyUI-CAT] workflow view:", e);
    return false;
  }
}

// Frontend 1.58 moves the camera in a task it schedules for when the canvas is ready, which can run after the load
// has returned: the view is checked again on the next frames (about half a second), and only a blank one is replaced.
const RECHECK_FRAMES = 30;

app.registerExtension({
  name: "ComfyUI-CAT.WorkflowView",
  async afterConfigureGraph() {
    tryRestore();
    if (typeof requestAnimationFrame !== "function") return;
    let frames = 0;
    const again = () => {
      tryRestore();
      if (++frames < RECHECK_FRAMES) requestAnimationFrame(again);
    };
    requestAnimationFrame(again);
  },
});
