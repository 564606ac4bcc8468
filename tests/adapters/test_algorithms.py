"""LoRA, DoRA, LoHa and LoKr (LoraSpec.algorithm) through the one CAT loop, on the tiny SD-shaped UNet.

The ComfyUI side (the files through the stock LoraLoaderModelOnly) is tests/comfy/test_algorithms_comfy.py."""
import pytest
import torch
import torch.nn.functional as F

from cat_train.adapters import export as E
from cat_train.adapters.lora import (LoraSpec, adapter_disabled, adapter_parameters, inject_lora, lora_layers,
                                     lora_param_count,
                               lora_weights, remove_lora)
from cat_train.families import SDUNet
from cat_train.training import CatLossConfig
from lora_objective import objective
from cat_train.training import TrainConfig, build_examples, checkpoint_path, load_checkpoint, train

ALGOS = ["lora", "dora", "loha", "lokr"]
FILE_KEYS = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
             "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
             "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}


def batch(b=2, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, hw, hw, generator=g)
    return x0, torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (b,), generator=g), \
        {"context": torch.randn(b, 6, 64, generator=g)}, {"context": torch.randn(b, 6, 64, generator=g)}


def examples(text, n=3):
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(n)]
    return build_examples(items, text, CatLossConfig(class_word="dog"))


def spec(algo, rank=4, **kw):
    return LoraSpec(rank=rank, alpha=2.0 * rank, preset="full", algorithm=algo, **kw)


@pytest.mark.parametrize("algo", ALGOS)
def test_adapted_equals_frozen_at_init_and_param_count_is_exact(tiny_denoiser, algo):
    unet = tiny_denoiser.module
    x0, noise, t, c_tok, c_pres = batch()
    with torch.no_grad():
        base = tiny_denoiser.predict(tiny_denoiser.schedule.add_noise(x0, noise, t), t, c_tok)
    for rank in (4, 2):  # LoKr: rank 4 keeps 64-wide layers' w2 full, rank 2 makes it low-rank (w2_a/w2_b)
        s = spec(algo, rank)
        predicted = lora_param_count(unet, s)
        inject_lora(unet, s)
        params = adapter_parameters(unet)
        assert sum(p.numel() for p in params) == predicted  # the memory budget's count is peft's, not an estimate
        assert {p.dtype for p in params} == {torch.float32} and all(p.requires_grad for p in params)
        with torch.no_grad():
            adapted = tiny_denoiser.predict(tiny_denoiser.schedule.add_noise(x0, noise, t), t, c_tok)
            terms = objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, alpha=1.0)
        assert torch.equal(adapted, base)  # peft zeroes one factor (LoRA B, LoHa w2_b, LoKr w1; DoRA m = ||W||)
        assert terms.keep.abs().max() < 1e-10 and terms.fit.min() > 0.1  # batch-size GEMM rounding only
        remove_lora(unet)


def test_param_counts_differ_as_the_algorithms_do(tiny_denoiser):
    unet = tiny_denoiser.module
    n = {a: lora_param_count(unet, spec(a)) for a in ALGOS}
    outs = sum(unet.get_submodule(name).weight.shape[0] for name in lora_weights_names(unet, spec("lora")))
    assert n["loha"] == 2 * n["lora"] and n["dora"] == n["lora"] + outs and n["lokr"] < n["lora"]


def lora_weights_names(unet, s):
    from cat_train.adapters.lora import target_modules
    return target_modules(unet, s)


def fixed_fit(den, exs):
    x0 = torch.stack([e.latent for e in exs])
    c = {"context": torch.stack([e.cond_token["context"] for e in exs])}
    g = torch.Generator().manual_seed(9)
    noise, t = torch.randn(x0.shape, generator=g), torch.tensor([200, 500, 800])
    with torch.no_grad():
        return objective(den, x0, noise, t, c, c, alpha=0.0).loss.item()


@pytest.mark.parametrize("algo", ALGOS)
def test_cat_trains_each_algorithm_and_leaves_the_model_bit_identical(tiny_denoiser, text, algo):
    unet = tiny_denoiser.module
    exs = examples(text)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    start = fixed_fit(tiny_denoiser, exs)
    result = train(tiny_denoiser, exs, CatLossConfig(alpha=1.0, class_word="dog"), spec(algo),
                   TrainConfig(steps=40, lr=3e-3, batch_size=3), keep_adapter=True)
    end = fixed_fit(tiny_denoiser, exs)
    remove_lora(unet)
    after = unet.state_dict()
    assert not lora_layers(unet)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert end < 0.8 * start, (start, end)
    assert result.history[0]["keep"] < 1e-10  # step 1's keep term: adapted == frozen before the first update
    assert result.history[-1]["keep"] > 0


@pytest.mark.parametrize("algo", ALGOS)
def test_resume_is_bit_exact_for_each_algorithm(tiny_denoiser, text, tmp_path, algo):
    exs = examples(text)

    def run(tmp, steps, **kw):
        cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=2, seed=7, save_every=kw.pop("save_every", 0),
                          checkpoint_dir=str(tmp), lr_schedule="cosine", warmup_steps=2)
        return train(tiny_denoiser, exs, CatLossConfig(alpha=1.0, class_word="dog"), spec(algo, dropout=0.1), cfg, **kw)

    full = run(tmp_path / "a", 6, save_every=3)
    state = load_checkpoint(checkpoint_path(tmp_path / "a", 3))
    assert ("algorithm" in state["spec"]) == (algo != "lora")  # LoRA checkpoints keep their earlier spec keys
    resumed = run(tmp_path / "b", 6, resume=checkpoint_path(tmp_path / "a", 3))
    assert full.weights.keys() == resumed.weights.keys()
    for k, w in full.weights.items():
        other = resumed.weights[k].state()
        assert all(torch.equal(v, other[n]) for n, v in w.state().items()), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_resume_with_another_algorithm_says_so(tiny_denoiser, text, tmp_path):
    exs = examples(text)
    cfg = TrainConfig(steps=2, lr=1e-3, seed=7, save_every=1, checkpoint_dir=str(tmp_path / "a"))
    train(tiny_denoiser, exs, CatLossConfig(alpha=1.0, class_word="dog"), spec("loha"), cfg)
    cfg = TrainConfig(steps=3, lr=1e-3, seed=7, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="algorithm loha -> lokr"):
        train(tiny_denoiser, exs, CatLossConfig(alpha=1.0, class_word="dog"), spec("lokr"), cfg,
              resume=checkpoint_path(tmp_path / "a", 1))
    with pytest.raises(ValueError, match="unknown adapter algorithm 'oft'; choose one of lora, dora, loha, lokr"):
        LoraSpec(algorithm="oft")


def comfy_style_weight(weight: torch.Tensor, ft: dict, alpha: float) -> torch.Tensor:
    """The merged weight as ComfyUI 0.3.64's weight_adapter computes it from the file's tensors (lora.py, loha.py,
    lokr.py, base.weight_decompose), written out here so the core tests need no ComfyUI."""
    if "lora_up.weight" in ft:
        up, down = ft["lora_up.weight"], ft["lora_down.weight"]
        diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / down.shape[0])
        if "dora_scale" not in ft:
            return weight + diff
        calc = weight + diff
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
        return calc * (ft["dora_scale"] / (norm + torch.finfo(torch.float32).eps))
    if "hada_w1_a" in ft:
        m = (ft["hada_w1_a"] @ ft["hada_w1_b"]) * (ft["hada_w2_a"] @ ft["hada_w2_b"])
        return weight + m.reshape(weight.shape) * (alpha / ft["hada_w1_b"].shape[0])
    dim, w1, w2 = None, ft.get("lokr_w1"), ft.get("lokr_w2")
    if w1 is None:
        dim, w1 = ft["lokr_w1_b"].shape[0], ft["lokr_w1_a"] @ ft["lokr_w1_b"]
    if w2 is None:
        dim, w2 = ft["lokr_w2_b"].shape[0], ft["lokr_w2_a"] @ ft["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return weight + torch.kron(w1, w2).reshape(weight.shape) * (alpha / dim if dim else 1.0)


@pytest.mark.parametrize("algo,rank", [("lora", 4), ("dora", 4), ("loha", 4), ("lokr", 4), ("lokr", 2)])
def test_export_keys_shapes_and_file_math_equal_peft(tiny_denoiser, algo, rank):
    unet = tiny_denoiser.module
    s = spec(algo, rank)
    inject_lora(unet, s)
    with torch.no_grad():  # a trained-looking adapter: every factor nonzero
        for p in adapter_parameters(unet):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    names = SDUNet.kohya_names(unet)
    sd = E.to_kohya(lora_weights(unet), names)
    layers = lora_layers(unet)
    worst = 0.0
    for path, layer in layers.items():
        key = E.kohya_name(names[path])
        ft = {k[len(key) + 1:]: v for k, v in sd.items() if k.startswith(key + ".")}
        if algo in FILE_KEYS:
            assert set(ft) == FILE_KEYS[algo], (path, set(ft))
        else:  # LoKr: w1 full (decompose_both off); w2 full or w2_a/w2_b by peft's rank rule
            assert set(ft) in ({"lokr_w1", "lokr_w2", "alpha"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}), set(ft)
        base = layer.get_base_layer()
        w = base.weight.detach()
        if algo in ("lora", "dora"):
            assert ft["lora_down.weight"].shape[0] == rank and ft["lora_up.weight"].shape[0] == w.shape[0]
        if algo == "dora":
            assert ft["dora_scale"].shape == (w.shape[0],) + (1,) * (w.dim() - 1)  # 2-D/4-D: ComfyUI's output axis
        if algo == "loha":
            assert ft["hada_w1_a"].shape == (w.shape[0], rank) and ft["hada_w2_b"].shape == (rank, w[0].numel())
        merged = comfy_style_weight(w, ft, float(ft["alpha"]))
        x = torch.randn(3, *((w.shape[1], 8, 8) if w.dim() == 4 else (w.shape[1],)),
                        generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            peft_out = layer(x)
            file_out = (F.conv2d(x, merged, base.bias, base.stride, base.padding) if w.dim() == 4 else
                        F.linear(x, merged, base.bias))
        worst = max(worst, ((peft_out - file_out).abs().max() / peft_out.abs().max()).item())
    # peft's forward vs the file's merged weight: two routes through float32 (and a conv algorithm each CPU picks);
    # a wrong key, shape or scale is off by O(1)
    assert worst < 1e-4, worst
    if algo == "lokr":
        forms = {frozenset(k.rsplit(".",
                                    1)[-1] for k in sd if k.startswith(E.kohya_name(names[p]) + ".")) for p in layers}
        # rank 4: both factors full somewhere
        assert (frozenset({"lokr_w1", "lokr_w2", "alpha"}) in forms) == (rank == 4)
    remove_lora(unet)


def test_frozen_switch_turns_every_algorithm_off(tiny_denoiser):
    unet = tiny_denoiser.module
    x0, noise, t, c, _ = batch()
    x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)
    with torch.no_grad():
        base = tiny_denoiser.predict(x_t, t, c)
    for algo in ALGOS:
        inject_lora(unet, spec(algo))
        with torch.no_grad():
            for p in adapter_parameters(unet):
                p.add_(0.05)
            adapted = tiny_denoiser.predict(x_t, t, c)
            with adapter_disabled(unet):
                frozen = tiny_denoiser.predict(x_t, t, c)
        assert (adapted - base).abs().max() > 1e-3 and torch.equal(frozen, base), algo
        remove_lora(unet)


def test_lycoris_metadata_and_lora_header_unchanged():
    from cat_train.adapters.algorithms import ALGORITHMS

    assert ALGORITHMS["lora"].metadata() == {}
    meta = ALGORITHMS["loha"].metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and '"algo": "loha"' in meta["ss_network_args"]
    assert '"dora_wd": "True"' in ALGORITHMS["dora"].metadata()["ss_network_args"]


@pytest.mark.parametrize("amp", [True, False])
@pytest.mark.parametrize("algo", ALGOS)
def test_bf16_base_starts_equal_to_frozen(tiny_denoiser, algo, amp):
    """A bf16-stored base, with bf16 autocast (the trainer's path for such models) and without: adapter tensors fp32
    and the adapted model equal to the frozen one at init. DoRA needed its norm in fp32 (peft's own init left it
    1.9e-2 off with autocast, 2.0e-2 without, on this model)."""
    unet = tiny_denoiser.module.to(torch.bfloat16)
    x0, noise, t, c, _ = batch()
    x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)
    inject_lora(unet, spec(algo))
    assert {p.dtype for p in adapter_parameters(unet)} == {torch.float32}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        adapted = tiny_denoiser.predict(x_t, t, c)
        with adapter_disabled(unet):
            frozen = tiny_denoiser.predict(x_t, t, c)
    remove_lora(unet)
    assert torch.equal(adapted, frozen)


def saved_for_backward(den, unet, s, b=2):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g)
    c = {"context": torch.randn(b, 6, 64, generator=g)}
    inject_lora(unet, s)
    seen = {}

    def pack(tn):
        seen[(tn.data_ptr(), tuple(tn.shape))] = tn.numel() * tn.element_size()
        return tn
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tn: tn):
        den.predict(x, t, c)
    remove_lora(unet)
    return sum(seen.values())


def test_memory_budget_counts_the_deltas_loha_and_lokr_keep_for_backward(tiny_denoiser):
    from cat_train.adapters.lora import lora_saved_bytes

    unet = tiny_denoiser.module
    assert lora_saved_bytes(unet, spec("lora")) == 0  # LoRA's budget is what it was
    lora = saved_for_backward(tiny_denoiser, unet, spec("lora"))
    for algo in ("loha", "lokr"):
        estimate = lora_saved_bytes(unet, spec(algo))
        extra = saved_for_backward(tiny_denoiser, unet, spec(algo)) - lora
        assert 0.5 * estimate < extra <= 1.05 * estimate, (algo, extra, estimate)  # measured 0.98x (LoHa), 0.81x (LoKr)


@pytest.mark.parametrize("algo", ["dora", "loha", "lokr"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_denoiser, algo):
    unet = tiny_denoiser.module
    inject_lora(unet, spec(algo, dropout=0.1))  # LoHa/LoKr: module dropout draws in the forward, replayed on recompute
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    unet.train()
    grads = []
    for on in (False, True):
        unet.gradient_checkpointing = on
        unet.zero_grad()
        torch.manual_seed(5)
        objective(tiny_denoiser, *batch(), alpha=1.0).loss.backward()
        # a layer module dropout skipped has no grad: the same layers must be skipped on the recompute
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in adapter_parameters(unet)])
    unet.gradient_checkpointing = False
    remove_lora(unet)
    assert sum(a.abs().sum() > 0 for a in grads[0]) > 0.8 * len(grads[0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
