"""The LoRA-family warning as a user sees it: queued from the real editor page (ComfyUI's frontend, headless
Chromium), the page shows a toast for each stock LoRA loader that applies an SD1.5 LoRA to an SDXL checkpoint.
Skips as test_browser.py does without Playwright, Chromium or the frontend package."""
from __future__ import annotations

import time

from test_browser import browser, editor, pytestmark, server  # noqa: F401  (fixtures and skip marks)
from test_queue_guards import _files, _graph


# The toasts on screen, by their role rather than their markup: frontend 1.27/1.49 draw PrimeVue's
# `.p-toast-message`, 1.58 its own `li[data-testid=toast]`; each is a role="alert" box (1.58 also repeats the text in a
# screen-reader-only alert of 1 px, left out by size).
SHOWN_TOASTS = """() => Array.from(document.querySelectorAll('[role="alert"]'))
  .filter((e) => { const r = e.getBoundingClientRect(); return r.width > 50 && r.height > 20 && !e.parentElement?.closest('[role="alert"]'); })
  .map((e) => e.innerText).filter((t) => t.includes('was trained for'))"""


def test_the_editor_shows_a_toast_for_a_lora_of_another_family(editor, server, tmp_path):  # noqa: F811
    url, _, base = server
    _files(base)
    g = _graph("fake_xl.safetensors", ["cat_sd15.safetensors", "xl_lora.safetensors"])
    answer = editor.evaluate("""async (g) => {
      const r = await fetch('/prompt', {method: 'POST', headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({prompt: g, client_id: app.api?.clientId ?? app.api?.initialClientId})});
      return await r.json(); }""", g)
    assert "prompt_id" in answer and not answer.get("node_errors"), answer  # queued as sent
    end, toasts = time.monotonic() + 30, []
    while time.monotonic() < end and not toasts:
        toasts = editor.evaluate(SHOWN_TOASTS)
        time.sleep(0.25)
    editor.screenshot(path=str(tmp_path / "lora_family_toast.png"))
    print(f"screenshot {tmp_path / 'lora_family_toast.png'}")
    assert len(toasts) == 1, toasts  # one loader of the two applies a LoRA of another family
    assert "LoRA for another model family" in toasts[0] and "cat_sd15.safetensors was trained for SD1.x/SD2" in toasts[0]
    assert "(fake_xl.safetensors) is SDXL" in toasts[0]
    assert editor.evaluate("() => globalThis.__catWarnings.length") == 1
    assert [e for e in editor.errors if "was trained for" not in e] == []  # the warning itself is also console.warn
