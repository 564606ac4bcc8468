"""Issue 32: the loop reports how many steps were done before this run (a resume's), so a host's it/s and ETA
count only this run's steps (tests/web/test_web_resume.py draws them)."""
from __future__ import annotations


def test_the_loop_reports_the_steps_done_before_this_run(tiny_denoiser, text, tmp_path):
    import torch

    from cat_train.adapters.lora import LoraSpec
    from cat_train.training import CatLossConfig, TrainConfig, build_examples, train

    loss = CatLossConfig(class_word="dog")
    exs = build_examples([(torch.randn(4, 8, 8), "a photo of sks dog", ("sks",))], text, loss)
    cfg = TrainConfig(steps=2, save_every=2, checkpoint_dir=str(tmp_path / "r"))
    train(tiny_denoiser, exs, loss, LoraSpec(rank=2), cfg)
    seen = []
    more = TrainConfig(steps=4, save_every=2, checkpoint_dir=cfg.checkpoint_dir)
    train(tiny_denoiser, exs, loss, LoraSpec(rank=2), more,
          callback=lambda info: seen.append((info.step, info.first_step)), resume=tmp_path / "r" / "cat-step000002.pt")
    assert seen == [(3, 2), (4, 2)]
