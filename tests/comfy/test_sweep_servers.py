"""`python -m cat_train queue` sweeps over two real ComfyUI servers (main.py --cpu, this pack, a tiny SD1.x
checkpoint node and a tiny open_clip for the KPS Evaluator): a 2x2 grid spread over both with its table,
--resume, Ctrl-C, and a server killed mid-sweep. Each server runs with OMP_NUM_THREADS=1."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import COMFY, ROOT
from test_server import HELPER, _free_port, train_graph
from tiny_models import make_images

OPEN_CLIP_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
REGISTER_CLIP = '''
import open_clip
open_clip.add_model_config({cfg_dir!r})
'''


def _sigint_as_from_a_terminal() -> None:
    """The CLI's child gets Ctrl-C as a shell gives it: a runner started in the background by a non-interactive shell
    (`cmd &`) ignores SIGINT, and a child inherits that, so Python would install no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)



def make_base(base: Path, clip_ckpt: Path, cfg_dir: Path) -> None:
    """A ComfyUI base directory: this pack, the tiny checkpoint node (and the tiny open_clip's config), a
    dataset, a reference image and the open_clip checkpoint in models/clip."""
    (base / "custom_nodes" / "cat_test_models").mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-CAT").symlink_to(ROOT)
    (base / "custom_nodes" / "cat_test_models" / "__init__.py").write_text(
        REGISTER_CLIP.format(cfg_dir=str(cfg_dir)) + HELPER.format(tests=str(Path(__file__).parent)))
    make_images(base / "input" / "ds", n=2)
    shutil.copy(base / "input" / "ds" / "img0.png", base / "input" / "ref.png")
    (base / "models" / "clip").mkdir(parents=True)
    shutil.copy(clip_ckpt, base / "models" / "clip" / "tiny_open_clip.pt")


def start_server(base: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    args = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:  # main.py exits without a frontend; a dummy page is enough for the API
        (base / "fe").mkdir(exist_ok=True)
        (base / "fe" / "index.html").write_text("<html></html>")
        args += ["--front-end-root", str(base / "fe")]
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(args, cwd=COMFY, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen, url: str, base: Path, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited ({proc.returncode}); log:\n{(base / 'server.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/object_info/CAT_KPSEvaluator", timeout=5).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"ComfyUI did not come up within {limit:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers, started side by side: [(proc, url, base), (proc, url, base)]."""
    import open_clip
    import torch

    cfg_dir = tmp_path_factory.mktemp("openclip_cfg")
    (cfg_dir / "CATTinyCLIP.json").write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    ckpt = cfg_dir / "tiny_open_clip.pt"
    torch.save(open_clip.create_model("CATTinyCLIP").state_dict(), ckpt)
    started = []
    try:
        for name in ("a", "b"):
            base = tmp_path_factory.mktemp(f"comfy_{name}")
            make_base(base, ckpt, cfg_dir)
            started.append((*start_server(base), base))
        for proc, url, base in started:
            wait_up(proc, url, base)
        yield started
    finally:
        for proc, _, _ in started:
            stop(proc)


def sweep_graph(steps: int) -> dict:
    """train_graph (tiny SD1.x, CAT loss, trainer, Save CAT LoRA) plus sampling with and without the trigger from the
    trained MODEL and a KPS Evaluator against a reference image."""
    g = train_graph(steps=steps, seed=0, checkpoint_name="sweep", save_name="sweep_lora")
    g.update({
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks dog"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of dog"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "positive": ["6", 0], "negative": ["8", 0],
                                                    "latent_image": ["9", 0], "denoise": 1.0}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "positive": ["7", 0], "negative": ["8", 0],
                                                    "latent_image": ["9", 0], "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "14": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
        "15": {"class_type": "CAT_KPSEvaluator", "inputs": {
            "images_with_trigger": ["12", 0], "images_without_trigger": ["13", 0], "reference_images": ["14", 0],
            "prompts": "", "clip_checkpoint": "tiny_open_clip.pt", "open_clip_model": "CATTinyCLIP"}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "sweep/with"}},
    })
    return g


def get(url: str, path: str):
    return json.loads(urllib.request.urlopen(url + path, timeout=10).read())


def workflow(tmp_path: Path, steps: int) -> str:
    p = tmp_path / "sweep.api.json"
    p.write_text(json.dumps(sweep_graph(steps)))
    return str(p)


GRID = ["--sweep", "3.cat_factor=0,1", "--sweep", "4.rank=2,4"]


@pytest.fixture(scope="module")
def grid(servers, tmp_path_factory):
    """The 2x2 grid, swept once over both servers: (exit code, printed text, journal path)."""
    import contextlib
    import io

    from cat_train.queue import cli

    tmp = tmp_path_factory.mktemp("grid")
    out = tmp / "runs.json"
    buf = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(buf):
        rc = cli.main([workflow(tmp, 3), "--server", servers[0][1], "--server", servers[1][1], *GRID,
                       "--out", str(out), "--timeout", "120"])
    print(f"2x2 grid over 2 servers: {time.monotonic() - t0:.1f}s")
    return rc, buf.getvalue(), out


def test_grid_is_spread_over_both_servers_and_gathered_in_one_table(servers, grid):
    rc, text, out = grid
    assert rc == 0, text
    runs = json.loads(out.read_text())
    assert len(runs) == 4 and all(r["ok"] for r in runs)
    assert sorted((r["overrides"]["3.cat_factor"], r["overrides"]["4.rank"]) for r in runs) == [(0, 2), (0, 4), (1, 2), (1, 4)]
    histories = {url: get(url, "/history") for _, url, _ in servers}
    for _, url, _ in servers:  # each server ran at least one prompt of the grid, read from its own /history
        assert any(r["prompt_id"] in histories[url] and r["server"] == url for r in runs), url
    assert all(r["prompt_id"] in histories[r["server"]] for r in runs)
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [int(r["run"]) for r in rows] == [1, 2, 3, 4]
    for row, run in zip(rows, runs):  # IS and KPS as the KPS Evaluator reported them to /history
        report = histories[run["server"]][run["prompt_id"]]["outputs"]["15"]["text"][0]
        for metric in ("IS", "KPS"):
            shown = float(re.search(rf"^{metric}\s+(\S+)", report, re.M).group(1))
            assert float(row[metric]) == pytest.approx(shown, abs=1e-9), (metric, row, report)
    assert sum(r["best"] == "best" for r in rows) == 1
    assert out.with_suffix(".png").stat().st_size > 1000 and "| best |" in out.with_suffix(".md").read_text()
    saved = [o["value"] for r in runs for o in r["outputs"] if o["node"] == "5"]
    assert len(set(saved)) == 4 and all(Path(p).is_file() for p in saved)  # no run overwrote another's LoRA
    assert sorted(Path(p).name for p in saved) == [f"sweep_lora_cat_factor{a}_rank{r}.safetensors" for a in (0, 1) for r in (2, 4)]


def test_resume_posts_only_what_is_missing(servers, grid, tmp_path):
    rc, _, out = grid
    assert rc == 0
    journal = tmp_path / "runs.json"
    kept = json.loads(out.read_text())[:2]
    journal.write_text(json.dumps(kept))
    before = {url: set(get(url, "/history")) for _, url, _ in servers}
    rc = __import__("cat_train.queue.cli", fromlist=["main"]).main(
        [workflow(tmp_path, 3), "--server", servers[0][1], "--server", servers[1][1], *GRID, "--out", str(journal),
         "--resume", "--timeout", "120"])
    assert rc == 0
    new = {pid for _, url, _ in servers for pid in set(get(url, "/history")) - before[url]}
    runs = json.loads(journal.read_text())
    assert [r["run"] for r in runs] == [1, 2, 3, 4] and runs[:2] == kept
    assert new == {r["prompt_id"] for r in runs[2:]}  # two posts: only the runs the journal lacked


def test_ctrl_c_leaves_no_prompt_of_ours_on_either_server(servers, tmp_path):
    urls = [url for _, url, _ in servers]
    out = tmp_path / "runs.json"
    proc = subprocess.Popen([sys.executable, "-m", "cat_train", "queue", workflow(tmp_path, 5000), "--server", urls[0],
                             "--server", urls[1], "--per-server", "2", "--sweep", "3.cat_factor=0,0.5,1", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_sigint_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            qs = [get(u, "/queue") for u in urls]
            if sum(len(q["queue_running"]) + len(q["queue_pending"]) for q in qs) == 3 and all(q["queue_running"] for q in qs):
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"the sweep did not queue 3 prompts: {qs}")
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "interrupted" in stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # an interrupted training stops at its next step
        qs = [get(u, "/queue") for u in urls]
        if not any(q["queue_running"] or q["queue_pending"] for q in qs):
            break
        time.sleep(0.3)
    assert not any(q["queue_running"] or q["queue_pending"] for q in qs), qs
    assert json.loads(out.read_text()) == []  # nothing had finished; the journal says so


def test_a_killed_server_loses_its_run_to_the_other(servers, tmp_path, capsys):
    """Runs last: it kills the second server."""
    from cat_train.queue import cli

    (proc_a, url_a, _), (proc_b, url_b, _) = servers
    out = tmp_path / "runs.json"
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("rc", cli.main(
        [workflow(tmp_path, 120), "--server", url_a, "--server", url_b, "--sweep", "3.cat_factor=0,1", "--out", str(out),
         "--timeout", "120"])))
    th.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not get(url_b, "/queue")["queue_running"]:
        time.sleep(0.2)
    assert get(url_b, "/queue")["queue_running"], "no run started on the second server"
    killed = get(url_b, "/queue")["queue_running"][0][1]
    proc_b.kill()
    proc_b.wait()
    th.join(300)
    text = capsys.readouterr().out
    assert result.get("rc") == 0, text
    assert f"server {url_b} marked down" in text
    runs = json.loads(out.read_text())
    assert [r["ok"] for r in runs] == [True, True] and {r["server"] for r in runs} == {url_a}
    moved = [r for r in runs if r["attempts"] == 2]
    assert len(moved) == 1 and moved[0]["prompt_id"] != killed and moved[0]["prompt_id"] in get(url_a, "/history")
