// A trainer added to the canvas trains with a fixed seed. ComfyUI's seed widget comes with "control after generate"
// set to "randomize", so every Run of a new trainer node trained another LoRA from another seed, and a resume or a
// rerun of "the same" graph was refused as another run. Graphs opened from a file keep the mode they were saved with
// (the editor restores widget values after nodeCreated).
import { app } from "../../scripts/app.js";

const TRAINERS = ["CAT_LoraTrainer", "CAT_CatVersionTrainer"];
const MODES = ["fixed", "increment", "decrement", "randomize"];

app.registerExtension({
  name: "ComfyUI-CAT.FixedSeed",
  nodeCreated(node) {
    try {
      if (!TRAINERS.includes(node.comfyClass ?? node.type)) return;
      const seed = node.widgets?.find((w) => w.name === "seed");
      const control = seed?.linkedWidgets?.find((w) => MODES.includes(w.value));
      if (control) control.value = "fixed";
    } catch (e) {
      console.warn("[ComfyUI-CAT] fixed seed:", e);
    }
  },
});
