"""patch_hf_vit_mae: Hugging Face's own ViTMAEForPreTraining, run by transformers' code and by the patched one on
the same weights, inputs and noise, gives the same loss, outputs and every gradient."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face integration's tests need transformers "
                                   "(pip install 'fastmim[hf]')")  # fmt: skip
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

from fastmim.integrations import hf_vit_mae_is_patched, patch_hf_vit_mae, unpatch_hf_vit_mae  # noqa: E402


def tiny(norm_pix: bool = True, seed: int = 0) -> ViTMAEForPreTraining:
    torch.manual_seed(seed)
    cfg = ViTMAEConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
                       patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                       decoder_intermediate_size=64, norm_pix_loss=norm_pix, mask_ratio=0.75)  # fmt: skip
    return ViTMAEForPreTraining(cfg).train()


def _run(model, imgs, noise, **kw):
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=imgs, noise=noise, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm_pix", [True, False])
def test_patched_model_equals_transformers_own_in_loss_outputs_and_every_gradient(norm_pix):
    ref = tiny(norm_pix)
    ours = patch_hf_vit_mae(copy.deepcopy(ref))
    assert hf_vit_mae_is_patched(ours) and not hf_vit_mae_is_patched(ref)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    a, ga = _run(ref, imgs, noise)
    b, gb = _run(ours, imgs, noise)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(b.mask, a.mask) and torch.equal(b.ids_restore, a.ids_restore)
    assert ga.keys() == gb.keys() and len(ga) == len(list(ref.parameters())) - 2  # all but the fixed pos. embeddings
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # the tuple form, and a call that interpolates the position embeddings (transformers' own code path)
    tup = ours(pixel_values=imgs, noise=noise, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], b.loss.detach())
    big, big_noise = torch.randn(2, 3, 48, 48), torch.rand(2, 36)
    torch.testing.assert_close(ours(pixel_values=big, noise=big_noise, interpolate_pos_encoding=True).loss,
                               ref(pixel_values=big, noise=big_noise, interpolate_pos_encoding=True).loss)  # fmt: skip


def test_random_masking_without_noise_keeps_the_mask_ratio_and_the_mask_marks_what_was_dropped():
    ours = patch_hf_vit_mae(tiny())
    out = ours(pixel_values=torch.randn(4, 3, 32, 32))
    assert out.mask.shape == (4, 16) and (out.mask.sum(1) == 12).all()
    kept = torch.argsort(out.ids_restore, dim=1)[:, :4]  # ids_shuffle's first K: the kept patches
    assert (out.mask.gather(1, kept) == 0).all()


def test_noise_of_the_wrong_length_is_named():
    """transformers' own model fails deep inside on this; the patched one names the noise, not the position
    embedding it would otherwise trip over."""
    ours = patch_hf_vit_mae(tiny())
    with pytest.raises(ValueError, match=r"noise has shape \(2, 15\), expected \[batch, patches\] = \(2, 16\)"):
        ours(pixel_values=torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15))


def test_class_patch_reaches_every_model_and_both_patches_undo():
    before = tiny()
    try:
        patch_hf_vit_mae()
        patch_hf_vit_mae()  # twice: no change
        after = tiny(seed=1)
        assert hf_vit_mae_is_patched() and hf_vit_mae_is_patched(before) and hf_vit_mae_is_patched(after)
    finally:
        unpatch_hf_vit_mae()
    assert not hf_vit_mae_is_patched() and not hf_vit_mae_is_patched(before)
    model = tiny()
    patch_hf_vit_mae(model)
    patch_hf_vit_mae(model)
    assert unpatch_hf_vit_mae(model) is model and not hf_vit_mae_is_patched(model)
    for fn in (patch_hf_vit_mae, unpatch_hf_vit_mae, hf_vit_mae_is_patched):  # the same message for each
        with pytest.raises(TypeError, match=f"{fn.__name__.split('_vit')[0]}.*expected a transformers ViTMAEForPre"):
            fn(torch.nn.Linear(2, 2))


class _ExtraLoss(ViTMAEForPreTraining):
    """A user's subclass whose forward adds to the loss (and calls transformers' through super())."""

    def forward(self, pixel_values=None, noise=None, **kw):
        out = super().forward(pixel_values, noise=noise, **kw)
        out.loss = out.loss + 100.0
        return out


def test_a_subclass_that_overrides_forward_keeps_it():
    """The instance patch would hide the subclass's forward: refused, naming the class patch, which keeps it and runs
    transformers' forward, reached through super(), on fastmim's ops."""
    model = _ExtraLoss(tiny().config).train()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    want = model(pixel_values=imgs, noise=noise).loss
    with pytest.raises(TypeError, match="_ExtraLoss overrides forward.*patch_hf_vit_mae\\(\\) \\(no model"):
        patch_hf_vit_mae(model)
    assert not hf_vit_mae_is_patched(model) and "forward" not in model.__dict__  # nothing half-patched
    try:
        patch_hf_vit_mae()
        assert hf_vit_mae_is_patched(model)  # its forward is its own; the super() it calls is fastmim's
        torch.testing.assert_close(model(pixel_values=imgs, noise=noise).loss, want, rtol=1e-5, atol=1e-5)
    finally:
        unpatch_hf_vit_mae()


def test_a_patch_under_an_autocast_wrapper_is_still_seen():
    """accelerate's (and torch.autocast's) way of wrapping a model's forward keeps ``__wrapped__``."""
    import types

    model = patch_hf_vit_mae(tiny())
    model.forward = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__), model)
    assert hf_vit_mae_is_patched(model)
    assert not hf_vit_mae_is_patched(tiny())


def test_missing_or_untested_library_is_named(monkeypatch):
    import importlib
    import importlib.metadata

    from fastmim.integrations import _versions

    real = importlib.import_module

    def no_transformers(name, *a, **k):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_transformers)
    with pytest.raises(ImportError, match=r"pip install 'fastmim\[hf\]'"):
        _versions.require("transformers", ("5.",), "hf")
    monkeypatch.setattr(importlib, "import_module", real)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.40.0")
    monkeypatch.setattr(_versions, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _versions.require("transformers", ("5.",), "hf")
    assert any("tested with transformers 5.x; found 4.40.0" in str(w.message) for w in caught)


def test_patched_model_traces_in_one_graph_like_transformers_own():
    """torch.compile sees the patched forward whole: fastmim's ops are custom ops, nothing breaks the graph."""
    import torch._dynamo as dynamo

    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    ours = dynamo.explain(patch_hf_vit_mae(tiny()))(pixel_values=x, noise=noise)
    theirs = dynamo.explain(tiny())(pixel_values=x, noise=noise)
    assert ours.graph_break_count == theirs.graph_break_count == 0, [b.reason[:300] for b in ours.break_reasons]


def test_a_saved_patched_model_loads_patched():
    """torch.save of the whole model (and pickle, deepcopy): the copy runs on fastmim's ops, on its own modules."""
    import io
    import pickle

    ours = patch_hf_vit_mae(tiny())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    want = ours(pixel_values=imgs, noise=noise).loss
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)]
    for other in copies:
        assert hf_vit_mae_is_patched(other)
        assert other.decoder.forward.module is other.decoder  # bound to the copy, not to the original
        torch.testing.assert_close(other(pixel_values=imgs, noise=noise).loss, want)
    assert not hf_vit_mae_is_patched(unpatch_hf_vit_mae(copies[0])) and hf_vit_mae_is_patched(ours)


def test_a_patched_models_forward_shows_transformers_signature():
    """Hugging Face's Trainer keeps the dataset columns that the model's forward names (remove_unused_columns)."""
    import inspect

    ref, ours = tiny(), patch_hf_vit_mae(tiny())
    assert list(inspect.signature(ours.forward).parameters)[:4] == list(inspect.signature(ref.forward).parameters)[:4]
    assert "pixel_values" in inspect.signature(ours.forward).parameters


@pytest.mark.parametrize("case", ["nothing masked", "float64"])
def test_edge_configurations_match_transformers(case):
    """mask_ratio 0 (every patch reconstructed): transformers' loss is NaN (0 / 0) and its logits are returned; the
    patched model does the same rather than raising. A float64 model's loss is float64 in both."""
    ref = tiny()
    if case == "nothing masked":
        ref.config.mask_ratio = 0.0
    else:
        ref = ref.double()
    ours = patch_hf_vit_mae(copy.deepcopy(ref))
    dtype = next(ref.parameters()).dtype
    imgs, noise = torch.randn(2, 3, 32, 32, dtype=dtype), torch.rand(2, 16, dtype=dtype)
    a, b = ref(pixel_values=imgs, noise=noise), ours(pixel_values=imgs, noise=noise)
    assert b.loss.dtype == a.loss.dtype == dtype
    torch.testing.assert_close(b.loss, a.loss, equal_nan=True)
    torch.testing.assert_close(b.logits, a.logits)
    assert torch.isnan(b.loss).item() == (case == "nothing masked")


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_fused_layers_equal_transformers_own_and_fall_back_where_they_must(qkv_bias):
    """layers=True: every encoder and decoder layer re-classed onto fastmim's block ops, the loss, logits and every
    gradient as transformers' in fp32; attention recorded by a hook, or dropout in training, takes transformers' own
    layer forward; unpatching gives transformers' classes back; a fused model pickles fused."""
    import pickle

    from fastmim.integrations.hf import fused_layers

    ref = tiny()
    ref.config.qkv_bias = qkv_bias
    ref = ViTMAEForPreTraining(ref.config).train() if not qkv_bias else ref  # (the projections are built unbiased)
    ours = patch_hf_vit_mae(copy.deepcopy(ref), layers=True)
    assert fused_layers(ours) == 4 and fused_layers(ref) == 0 and type(ours.vit.layers[0]).__name__ == \
        "FusedViTMAELayer"  # fmt: skip
    assert ours.state_dict().keys() == ref.state_dict().keys()
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    a, ga = _run(ref, imgs, noise)
    b, gb = _run(ours, imgs, noise)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys()
    for n in ga:  # (mask_token's gradient is a sum over every masked token: fp32 rounding of a large sum)
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    again = pickle.loads(pickle.dumps(ours))  # (before any output capture: transformers' capture hooks do not pickle)
    assert fused_layers(again) == 4
    torch.testing.assert_close(again(pixel_values=imgs, noise=noise).loss, b.loss.detach())
    calls = {"fused": 0}
    fused_cls = type(ours.vit.layers[0])
    own = fused_cls.forward

    def counting(self, *args, **kw):
        calls["fused"] += self._plain(args[1] if len(args) > 1 else kw.get("attention_mask"), {})
        return own(self, *args, **kw)

    fused_cls.forward = counting
    try:
        ours(pixel_values=imgs, noise=noise)
        assert calls["fused"] == 4
        calls["fused"] = 0
        hook = ours.vit.layers[0].attention.register_forward_hook(lambda *a: None)
        ours(pixel_values=imgs, noise=noise)
        assert calls["fused"] == 3  # the hooked layer ran transformers' forward (its attention module)
        hook.remove()
        calls["fused"] = 0  # transformers' output capture: hidden states are the layers' outputs, fused or not
        want = ref(pixel_values=imgs, noise=noise, output_hidden_states=True).hidden_states
        got = ours(pixel_values=imgs, noise=noise, output_hidden_states=True).hidden_states
        assert calls["fused"] == 4 and len(got) == len(want)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        calls["fused"] = 0  # attention weights come from transformers' attention: the encoder's layers, whose
        ours(pixel_values=imgs, noise=noise, output_attentions=True)  # weights are returned, run unfused ...
        assert calls["fused"] == 2  # (the decoder's: its weights are not returned; sdpa returns none anyway)
        calls["fused"] = 0  # ... and the capture hooks it leaves behind do not keep later calls off the fused path
        ours(pixel_values=imgs, noise=noise)
        assert calls["fused"] == 4
        calls["fused"] = 0
        drop = copy.deepcopy(ours)
        drop.config.hidden_dropout_prob = 0.1
        for layer in (*drop.vit.layers, *drop.decoder.decoder_layers):
            layer.dropout.p = 0.1
        drop.train()(pixel_values=imgs, noise=noise)
        assert calls["fused"] == 0  # dropout while training: transformers' forward
        drop.eval()(pixel_values=imgs, noise=noise)
        assert calls["fused"] == 4
    finally:
        fused_cls.forward = own
    unpatch_hf_vit_mae(ours)
    assert fused_layers(ours) == 0 and type(ours.vit.layers[0]) is type(ref.vit.layers[0])
    with pytest.raises(ValueError, match="fuses one model's layers: pass the model"):
        patch_hf_vit_mae(layers=True)
