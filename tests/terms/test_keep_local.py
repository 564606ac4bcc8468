"""The layer-local keep estimator (CatLossConfig.keep_estimator = "local", cat_train/terms/keep_local.py): CAT's zero
from the frozen pass alone, for every algorithm, with no adapted y rows; exact CAT untouched."""
import functools

import pytest
import torch
import torch.nn.functional as F

from cat_train.adapters.algorithms import ADAPTER, of_layer
from cat_train.adapters.lora import LoraAdapter, LoraSpec, adapter_disabled, adapter_parameters, lora_layers
from cat_train.step.denoiser import FlowSchedule, ModuleDenoiser
from cat_train.step.objective import cat_objective as objective
from cat_train.terms import registry
from cat_train.terms.apt_config import AptConfig
from cat_train.terms.auto_config import AutoPreservationConfig
from cat_train.terms.keep_local import LocalKeep, LocalKeepSettings
from cat_train.training import CatLossConfig, TrainConfig, build_examples, checkpoint_path, train
from cat_train.training.run_folder import result_settings
from cat_train.world.unet import TINY_CONFIG, UNet

ALGOS = ["lora", "dora", "loha", "lokr"]
LOCAL = CatLossConfig(alpha=1.0, keep_estimator="local")


def batch(b=2, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, hw, hw, generator=g)
    return x0, torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (b,), generator=g), \
        {"context": torch.randn(b, 6, 64, generator=g)}, {"context": torch.randn(b, 6, 64, generator=g)}


def spec(algo="lora", rank=4, **kw):
    return LoraSpec(rank=rank, alpha=2.0 * rank, preset="full", algorithm=algo, **kw)


def randomize(unet, scale=0.05, seed=1):
    """Every adapter tensor random (DoRA's magnitude near its weight norm), so every layer adds something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            for name, p in layer.named_parameters():
                if not p.requires_grad:
                    continue
                if "magnitude" in name:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def install(den, lora_spec=None) -> LoraAdapter:
    """The LoRA on the denoiser as the loop installs it; the adapter is what the estimator asks for its layers."""
    adapter = LoraAdapter(lora_spec or spec())
    adapter.install(den, torch.Generator())
    return adapter


def adapter_on(net) -> LoraAdapter:
    """A LoraAdapter over a module that already carries peft layers (injected by hand)."""
    adapter = LoraAdapter(spec())
    adapter.module = net
    return adapter


def cat_objective(den, *args, **kw):
    """The objective with the frozen model the loop gives it: the adapter switched off."""
    return objective(den, functools.partial(adapter_disabled, den.module), *args, **kw)


def step_terms(cfg, den, adapter):
    return registry.build(cfg, None, den, adapter)


def local_terms(den, adapter, cfg=LOCAL):
    return step_terms(cfg, den, adapter)


def examples(text, n=4):
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(n)]
    return build_examples(items, text, CatLossConfig(class_word="dog"))


def run(den, exs, tmp, steps=6, loss=LOCAL, algo="lora", **kw):
    cfg = TrainConfig(steps=steps, lr=1e-2, batch_size=2, seed=7, save_every=kw.pop("save_every", 0),
                      checkpoint_dir=str(tmp), lr_schedule="cosine", warmup_steps=2)
    return train(den, exs, loss, spec(algo, dropout=0.1), cfg, **kw)


def counting(den):
    calls, predict = [], den.predict

    def wrapped(x, t, c):
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return predict(x, t, c)
    den.predict = wrapped
    return calls


@pytest.mark.parametrize("algo, weights", [(a, "unit") for a in ALGOS] + [("lora", "relative")])
def test_zero_at_init_for_every_algorithm(tiny_denoiser, algo, weights):
    adapter = install(tiny_denoiser, spec(algo))
    terms = local_terms(tiny_denoiser, adapter, CatLossConfig(alpha=1.0, keep_estimator="local",
                                                                keep_local_weights=weights))
    x0, noise, t, c_tok, c_pres = batch()
    local = cat_objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, 1.0, terms=terms)
    plain = cat_objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, 0.0)
    assert torch.equal(local.keep, torch.zeros(2))  # every algorithm starts with a zero factor: no change anywhere
    assert torch.equal(local.fit, plain.fit) and torch.equal(local.loss, plain.loss)
    assert terms[0].report()["layer_calls"] == len(lora_layers(tiny_denoiser.module))


@pytest.mark.parametrize("algo", ALGOS)
def test_each_layers_delta_is_the_layer_on_minus_off(tiny_denoiser, algo):
    """The per-algorithm shortcuts (LoRA's Gram form, DoRA's magnitude output, LyCORIS's delta activations) give what
    the injected layer adds when switched on, on the same input."""
    unet = tiny_denoiser.module
    install(tiny_denoiser, spec(algo))
    randomize(unet)
    g = torch.Generator().manual_seed(4)
    unet.eval()  # no dropout: the two sides see the same input
    checked = 0
    for name, layer in lora_layers(unet).items():
        base = layer.get_base_layer()
        h = torch.randn(3, base.in_channels, 5, 5, generator=g) if isinstance(base, torch.nn.Conv2d) else \
            torch.randn(3, 7, base.in_features, generator=g)
        with torch.no_grad():
            on, off = layer(h), base(h)
            energy = of_layer(layer).delta_energy(layer, h, off)
        expect = (on - off).pow(2).flatten(1).mean(1)
        assert float(expect.min()) > 1e-8, name  # the adapter adds something here
        torch.testing.assert_close(energy, expect, rtol=2e-4, atol=1e-9)
        checked += 1
    assert checked == len(lora_layers(unet)) > 20


@pytest.mark.parametrize("algo", ALGOS)
def test_only_adapter_parameters_get_gradients_and_no_adapted_y_rows_run(tiny_denoiser, algo):
    unet = tiny_denoiser.module
    adapter = install(tiny_denoiser, spec(algo))
    randomize(unet)
    calls = counting(tiny_denoiser)
    x0, noise, t, c_tok, c_pres = batch()
    terms = local_terms(tiny_denoiser, adapter)
    out = cat_objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, 1.0, terms=terms)
    assert calls == [(2, False), (2, True)]  # the frozen y pass and the adapted y_T pass; exact CAT's is 4 rows
    assert float(out.keep.min()) > 0
    # the keep term alone: a backward through the deltas only, to the adapter's tensors only
    torch.autograd.grad(out.loss, adapter_parameters(unet), allow_unused=True)  # the graph reaches them
    keep = terms[0]
    with torch.no_grad(), adapter_disabled(unet), keep.recording("frozen"):
        tiny_denoiser.predict(tiny_denoiser.schedule.add_noise(x0, noise, t), t, c_pres)
    keep.keep(2, 2).sum().backward()
    adapter = {id(p) for p in adapter_parameters(unet)}
    with_grad = [n for n, p in unet.named_parameters() if p.grad is not None]
    assert with_grad and all(id(p) in adapter for n, p in unet.named_parameters() if p.grad is not None)
    assert all(not p.requires_grad for p in unet.parameters() if id(p) not in adapter)
    nonzero = sum(float(p.grad.abs().sum()) > 0 for p in adapter_parameters(unet))
    # LoRA/DoRA: every tensor moves; LoHa and LoKr: peft's Hadamard/Kronecker factors each get a gradient too
    assert nonzero >= 0.9 * len(adapter_parameters(unet)), (nonzero, len(adapter_parameters(unet)))


def _project_out(layer, inputs):
    """Make the layer's A (LoRA's down) orthogonal to every input vector it was fed: A h = 0 on them, A != 0."""
    base, a = layer.get_base_layer(), layer.lora_A[ADAPTER]
    if isinstance(base, torch.nn.Conv2d):
        vecs = torch.cat([F.unfold(h, base.kernel_size, base.dilation, base.padding, base.stride).transpose(1, 2)
                          .reshape(-1, a.weight[0].numel()) for h in inputs])
    else:
        vecs = torch.cat([h.reshape(-1, base.in_features) for h in inputs])
    u, s, vh = torch.linalg.svd(vecs.double(), full_matrices=False)
    basis = vh[s > s.max() * 1e-10]  # an orthonormal basis of the inputs' span
    assert basis.shape[0] < vecs.shape[1]  # a 4x4 latent leaves every layer's input space most of its dimensions
    w = a.weight.data.reshape(a.weight.shape[0], -1).double()
    a.weight.data.copy_((w - (w @ basis.T) @ basis).reshape(a.weight.shape))
    return float(a.weight.norm())


@pytest.mark.parametrize("algo", ["lora", "dora"])
def test_zero_property_no_change_in_any_layer_means_the_frozen_prediction(tiny_denoiser, algo):
    """Force ΔW_l h_l(y) = 0 in every adapted layer of the tiny UNet, with every adapter tensor far from zero: the
    adapted prediction on y equals the frozen one, while on y_T, whose inputs differ, it does not. In float64: the
    forced zeros are exact only to rounding, which ~100 randomly adapted layers amplify layer by layer (at adapter
    weights of 0.2 even float64's 1e-14 grew to O(1) at the output)."""
    unet = tiny_denoiser.module.double()
    adapter = install(tiny_denoiser, spec(algo))
    for p in adapter_parameters(unet):
        p.data = p.data.double()
    randomize(unet, scale=0.05)
    x0, noise, t, c_tok, c_pres = (v.double() if torch.is_tensor(v) and v.is_floating_point() else
                                   {k: c.double() for k, c in v.items()} if isinstance(v, dict) else v
                                   for v in batch(b=1, hw=4))
    x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)
    keep = LocalKeep(adapter, LocalKeepSettings("local"))
    with torch.no_grad(), adapter_disabled(unet), keep.recording("frozen"):
        frozen_y = tiny_denoiser.predict(x_t, t, c_pres)
        recorded = {n: [h for h, _, _ in calls] for n, calls in keep.calls.items()}
    norms = []
    with torch.no_grad():
        for name, layer in lora_layers(unet).items():
            norms.append(_project_out(layer, recorded[name]))
            if algo == "dora":  # magnitude = ||W + s B A|| row-wise: DoRA's rescaling is 1, its change s B A h
                dora = layer.lora_magnitude_vector[ADAPTER]
                w = layer.get_base_layer().weight
                lw = layer.lora_B[ADAPTER].weight.flatten(1) @ layer.lora_A[ADAPTER].weight.flatten(1)
                lw = lw.reshape(w.shape)
                dora.weight.copy_(dora.get_weight_norm(w, lw, layer.scaling[ADAPTER]).reshape(dora.weight.shape))
    assert min(norms) > 0.1  # every A is still far from zero
    with torch.no_grad():
        adapted_y = tiny_denoiser.predict(x_t, t, c_pres)
        adapted_tok = tiny_denoiser.predict(x_t, t, c_tok)
        with adapter_disabled(unet):
            frozen_tok = tiny_denoiser.predict(x_t, t, c_tok)
        local = cat_objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, 1.0, terms=[keep])
        exact = cat_objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, 1.0)
    scale = float(frozen_y.abs().max())
    assert float((adapted_y - frozen_y).abs().max()) < 1e-9 * scale  # the adapted model predicts the frozen one on y
    assert float((adapted_tok - frozen_tok).abs().max()) > 0.1 * scale  # and not on y_T: the adapter is live
    assert float(local.keep) < 1e-20 and float(exact.keep) < 1e-20
    keep.close()


def test_stronger_than_eq3_a_compensated_change_is_zero_for_cat_not_for_local(tiny_denoiser):
    """Two layers whose changes cancel on y (the second undoes the first): exact CAT's term is 0, the local one is
    not."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)

        def forward(self, x, t, context=None):
            return self.to_k(self.to_q(x))

    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = Two()
    with torch.no_grad():
        net.to_k.weight.copy_(torch.eye(8))
        net.to_q.weight.copy_(torch.eye(8))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"]), net, adapter_name=ADAPTER)
    q, k = lora_layers(net)["to_q"], lora_layers(net)["to_k"]
    with torch.no_grad():  # q adds D, k (identity base) adds -D on its input: (I - D)(I + D) = I - D² = I
        d_a, d_b = torch.zeros(2, 8), torch.zeros(8, 2)
        d_a[0, 0], d_b[1, 0] = 1.0, 1.0  # D = e1 e0^T: D² = 0, so (I - D)(I + D) = I
        q.lora_A[ADAPTER].weight.copy_(d_a)
        q.lora_B[ADAPTER].weight.copy_(d_b)
        k.lora_A[ADAPTER].weight.copy_(d_a)
        k.lora_B[ADAPTER].weight.copy_(-d_b)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(net(x, None), x, atol=1e-6)  # the two changes cancel at the output
    keep = LocalKeep(adapter_on(net), LocalKeepSettings("local", "unit"))
    with torch.no_grad(), adapter_disabled(net), keep.recording("frozen"):
        net(x, None)
    local = keep.keep(3, 3)
    assert torch.allclose(local, 2 * x[:, 0].pow(2) / 8)  # each layer moves output 1 by x_0: (x_0²)/8 per layer
    keep.close()


def test_subset_rows_give_those_rows_values(tiny_denoiser):
    """keep_fraction picks rows: the estimator's values on the picked rows are the full batch's on those rows."""
    adapter = install(tiny_denoiser)
    randomize(tiny_denoiser.module)
    terms = local_terms(tiny_denoiser, adapter)
    x0, noise, t, c_tok, c_pres = batch(b=4)
    with torch.no_grad():
        full = cat_objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, 1.0, terms=terms)
        part = cat_objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, 1.0, terms=terms,
                             keep_rows=torch.tensor([1, 3]))
    torch.testing.assert_close(part.keep[[1, 3]], full.keep[[1, 3]], rtol=1e-4, atol=0)  # frozen GEMMs of 2 vs 4 rows
    assert torch.equal(part.keep[[0, 2]], torch.zeros(2)) and float(full.keep.min()) > 0


def test_exact_is_the_default_and_trains_as_before_bit_for_bit(tiny_denoiser, text, tmp_path):
    exs = examples(text)
    default = run(tiny_denoiser, exs, tmp_path / "a", loss=CatLossConfig(alpha=1.0, class_word="dog"))
    exact = run(tiny_denoiser, exs, tmp_path / "b",
                loss=CatLossConfig(alpha=1.0, class_word="dog", keep_estimator="exact", keep_local_weights="unit"))
    local = run(tiny_denoiser, exs, tmp_path / "c",
                loss=CatLossConfig(alpha=1.0, class_word="dog", keep_estimator="local"))
    assert CatLossConfig().keep_estimator == "exact"
    assert [h["loss"] for h in default.history] == [h["loss"] for h in exact.history]
    assert all(torch.equal(default.weights[n].up, exact.weights[n].up) for n in default.weights)
    assert [h["loss"] for h in default.history] != [h["loss"] for h in local.history]


def test_resume_is_bit_exact_with_local_and_a_row_fraction(tiny_denoiser, text, tmp_path):
    exs = examples(text)
    loss = CatLossConfig(alpha=1.0, class_word="dog", keep_estimator="local", keep_local_weights="relative",
                         keep_fraction=0.5)
    full = run(tiny_denoiser, exs, tmp_path / "a", 8, loss=loss, save_every=3)
    resumed = run(tiny_denoiser, exs, tmp_path / "b", 8, loss=loss, resume=checkpoint_path(tmp_path / "a", 3))
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert all(torch.equal(full.weights[n].up, resumed.weights[n].up)
               and torch.equal(full.weights[n].down, resumed.weights[n].down) for n in full.weights)
    assert full.history[0]["keep"] == 0 and max(h["keep"] for h in full.history) > 0  # zero at init, live after
    with pytest.raises(ValueError, match="keep_estimator"):  # resuming under the other estimator is another run
        run(tiny_denoiser, exs, tmp_path / "c", 8, resume=checkpoint_path(tmp_path / "a", 3),
            loss=CatLossConfig(alpha=1.0, class_word="dog", keep_fraction=0.5))


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_with_local_keep(tiny_denoiser, text, tmp_path, algo):
    calls = counting(tiny_denoiser)
    res = run(tiny_denoiser, examples(text), tmp_path, steps=3, algo=algo)
    assert [rows for rows, _ in calls] == [2, 2] * 3  # frozen y + adapted y_T, never the doubled batch
    assert res.history[0]["keep"] == 0 and res.history[-1]["keep"] > 0
    assert all(h["loss"] == h["loss"] for h in res.history)


def test_flow_matching_model_trains_with_local_keep(text, tmp_path):
    """A velocity-predicting (SD3/Flux-style) denoiser: the estimator never looks at the output space."""
    torch.manual_seed(0)
    den = ModuleDenoiser(UNet(**TINY_CONFIG), prediction_type="flow", schedule=FlowSchedule(shift=3.0))
    calls = counting(den)
    res = run(den, examples(text), tmp_path, steps=3)
    assert [rows for rows, _ in calls] == [2, 2] * 3
    assert res.history[0]["keep"] == 0 and res.history[-1]["keep"] > 0


def test_apt_and_auto_preservation_work_with_local_keep(tiny_denoiser, text, tmp_path):
    """Neither needs the adapted y pass: APT compares the y_T rows of the two passes (the frozen pass runs [y_T; y],
    the adapted one y_T only), auto preservation measures its probes with its own passes and swaps the y prompts."""
    adapter = install(tiny_denoiser)
    randomize(tiny_denoiser.module)
    apt = AptConfig(adaptive=1.0, stabilize=5.0, align=1000.0)
    x0, noise, t, c_tok, c_pres = batch()
    calls = counting(tiny_denoiser)
    pen = {}
    for est in ("exact", "local"):
        terms = step_terms(CatLossConfig(alpha=1.0, apt=apt, keep_estimator=est), tiny_denoiser, adapter)
        cat_objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, 1.0, terms=terms)
        pen[est] = terms[0].penalties
        for term in terms:
            term.close()
    assert calls == [(4, False), (4, True), (4, False), (2, True)]
    for k in ("stabilize", "align"):  # APT's terms see the same y_T rows; only GEMM batch sizes differ
        assert float(pen["local"][k]) > 0
        torch.testing.assert_close(pen["local"][k], pen["exact"][k], rtol=1e-3, atol=1e-9)
    adapter.remove()
    calls.clear()
    auto = AutoPreservationConfig(every=2, probes=("cat", "car"), top_k=2, threshold=0.0, points=1, images=2)
    loss = CatLossConfig(alpha=1.0, class_word="dog", keep_estimator="local", auto=auto)
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(3)]
    res = run(tiny_denoiser, build_examples(items, text, loss), tmp_path, steps=4, loss=loss)
    assert [p for p, _, _ in res.history[-1]["auto_added"]] and res.history[-1]["keep"] > 0
    assert max(rows for rows, grad in calls if grad) == 2  # the training passes never ran the y rows adapted


def test_refuses_a_model_without_adapter_layers(tiny_denoiser):
    with pytest.raises(ValueError, match="keep_estimator 'exact'"):
        LocalKeep(adapter_on(tiny_denoiser.module), LocalKeepSettings("local"))


def test_settings_header_and_errors():
    class A:
        name, spec = "lora", None
    settings = lambda loss: result_settings(TrainConfig(), loss, A(), {}, None)["loss"]
    assert "keep_estimator" not in settings(CatLossConfig()) and "keep_local_weights" not in settings(CatLossConfig())
    assert settings(LOCAL)["keep_estimator"] == "local"
    metadata = functools.partial(registry.metadata, cfg=None)
    # exact CAT writes no key (a file without it was trained with exact CAT, as every file before the option)
    assert not {"cat_keep_estimator", "cat_keep_local_weights"} & set(metadata(CatLossConfig()))
    assert metadata(LOCAL)["cat_keep_estimator"] == "local"
    assert metadata(LOCAL)["cat_keep_local_weights"] == "unit"  # the default weighting
    relative = CatLossConfig(keep_estimator="local", keep_local_weights="relative")
    assert metadata(relative)["cat_keep_local_weights"] == "relative"
    with pytest.raises(ValueError, match="keep_estimator must be one of exact, local"):
        CatLossConfig(keep_estimator="layerwise")
    with pytest.raises(ValueError, match="keep_local_weights must be one of unit, relative"):
        CatLossConfig(keep_estimator="local", keep_local_weights="one")


def test_memory_of_the_recorded_inputs_is_reported(tiny_denoiser):
    adapter = install(tiny_denoiser)
    terms = local_terms(tiny_denoiser, adapter)
    x0, noise, t, c_tok, c_pres = batch(b=2)
    cat_objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, 1.0, terms=terms)
    seen = {}  # data pointer -> the input, kept alive so no two inputs share an address
    layers = lora_layers(tiny_denoiser.module)
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(args[0].data_ptr(), args[0]))
             for m in layers.values()]
    with torch.no_grad(), adapter_disabled(tiny_denoiser.module):
        tiny_denoiser.predict(tiny_denoiser.schedule.add_noise(x0, noise, t), t, c_pres)
    for h in hooks:
        h.remove()
    # shared inputs (to_q/to_k/to_v of one self-attention, to_k/to_v of the context) counted once
    assert terms[0].report()["recorded_mb"] == pytest.approx(sum(h.numel() * 4 for h in seen.values()) / 2**20)
    assert len(seen) < len(layers)


def test_bench_methods_name_the_estimator_and_its_weights():
    from cat_train.world import bench

    class Text:
        def encode_text(self, ps):
            return {"context": torch.tensor([[[float(len(p))]] for p in ps])}

    _, lc, _ = bench.examples_for("cat1/local/k2", Text(), bench.BenchConfig(), seed=0)
    assert (lc.keep_estimator, lc.keep_local_weights, lc.keep_every, lc.alpha) == ("local", "unit", 2, 1.0)
    _, lc, _ = bench.examples_for("cat0.5/local:relative", Text(), bench.BenchConfig(), seed=0)
    assert (lc.keep_estimator, lc.keep_local_weights) == ("local", "relative")
    assert bench.label("cat1/local") == "CAT (α=1), local keep (unit w_l)"
    assert bench.method_name("cat1/local:unit/p0.5") == "cat1/local:unit/p0.5"
    with pytest.raises(Exception, match="local"):
        bench.method_name("cat1/local:one")
