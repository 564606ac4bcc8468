import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cat_train.step.denoiser import ModuleDenoiser  # noqa: E402
from cat_train.world.toytext import HashTextEncoder  # noqa: E402
from cat_train.world.unet import TINY_CONFIG, UNet  # noqa: E402

# The tests' models are tiny, and one thread is fastest for them (cat_train/training/threads.py); CI's second run of
# the core suite sets OMP_NUM_THREADS to another count, which stands.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_denoiser():
    torch.manual_seed(0)
    unet = UNet(**TINY_CONFIG)
    with torch.no_grad():  # ldm zero-inits output convs; random ones make LoRA effects visible everywhere
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return ModuleDenoiser(unet)


class RecordingText(HashTextEncoder):
    """The toy encoder, remembering every batch of prompts it was asked to encode."""

    def __init__(self):
        super().__init__(dim=64, length=6)
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return super().__call__(prompts)


@pytest.fixture
def text():
    return RecordingText()


def pytest_sessionfinish(session, exitstatus):
    """CI sets CAT_REQUIRE_ALL=1 once it has laid out ComfyUI, Chromium, Playwright and Node.js: then a skipped
    test is a test that silently stopped guarding something, and the run fails naming it."""
    import os

    if os.environ.get("CAT_REQUIRE_ALL") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.ensure_newline()
        reporter.write_line(f"CAT_REQUIRE_ALL=1: {len(skipped)} test(s) skipped where everything they need was set "
                            "up:", red=True)
        for rep in skipped[:20]:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            reporter.write_line(f"  {rep.nodeid}: {reason}", red=True)
        session.exitstatus = 1
