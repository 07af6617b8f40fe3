"""Hugging Face transformers' ``ViTMAEForPreTraining`` on fastmim's ops, one call:

    from fastmim.integrations import patch_hf_vit_mae
    model = ViTMAEForPreTraining.from_pretrained("facebook/vit-mae-base")
    patch_hf_vit_mae(model)  # this model; patch_hf_vit_mae() patches the classes (every model, later ones too)

Three places change, each to the same values and gradients for the same ``noise``:

- the encoder's masking (``ViTMAEEmbeddings.random_masking``): the visible tokens gathered by ``gather_visible``
  (the index is not expanded D times) and the binary mask scattered from the kept ids;
- the decoder's input (``ViTMAEDecoder.forward``): ``scatter_masked`` puts the visible tokens back in place with the
  mask token elsewhere, the class token in front and the position embedding added, in one pass;
- the loss (``ViTMAEForPreTraining.forward``): ``masked_mse_loss`` reads the images in NCHW and normalises each
  masked patch (``norm_pix_loss``) without patchifying or normalising the whole batch first.

``interpolate_pos_encoding=True`` calls go through transformers' own code. ``unpatch_hf_vit_mae`` restores it.
Patching twice changes nothing.

``patch_hf_vit_mae(model, layers=True)`` also runs every ``ViTMAELayer`` of the encoder and the decoder on fastmim's
fused block ops (the module re-classed, its weights and names transformers' own): ``layernorm_before`` on
``layer_norm``; q, k and v as one matmul read packed by ``attention`` (no head transposes); the residual add and
``layernorm_after`` in one ``add_layer_norm`` pass; fc1's bias and the exact GELU in one ``bias_gelu``. A layer falls
back to transformers' forward for what these do not do: an attention mask or extra arguments, dropout while training,
a hook of the user's on its attention, and a call that asks for the attention weights (``output_attentions``). The
same values and gradients as transformers' layer in fp32 (tested); off by default, like fastmim's own fused block
options, until a GPU measures it (``benchmarks/hf_vit_mae.py --layers``). Not on CPU: there these ops run their
PyTorch references, slower than transformers' SDPA (0.41x at ViTMAE-tiny on the 2-core CI machine).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from fastmim.integrations._versions import require
from fastmim.ops import (
    add_layer_norm,
    attention,
    bias_gelu,
    gather_visible,
    layer_norm,
    masked_mse_loss,
    scatter_masked,
)

TESTED = ("5.",)  # transformers major versions whose ViTMAE code these replacements were checked against


_MODELING = None  # transformers' modeling_vit_mae, once imported (no import machinery in a traced forward)


def _modeling():
    global _MODELING
    if _MODELING is None:
        require("transformers", TESTED, extra="hf")
        from transformers.models.vit_mae import modeling_vit_mae

        _MODELING = modeling_vit_mae
    return _MODELING


# --- the replacements (methods: ``self`` is transformers' module) ---
def random_masking(self, sequence: torch.Tensor, noise: torch.Tensor | None = None):
    """``ViTMAEEmbeddings.random_masking`` with the gather and the mask on fastmim's ops (same ``noise`` rule)."""
    batch, length, _ = sequence.shape
    keep = int(length * (1 - self.config.mask_ratio))
    if noise is None:
        noise = torch.rand(batch, length, device=sequence.device)
    elif tuple(noise.shape) != (batch, length):
        raise ValueError(f"ViTMAE (fastmim's patch): noise has shape {tuple(noise.shape)}, expected [batch, patches] "
                         f"= ({batch}, {length})")  # fmt: skip
    ids_shuffle = torch.argsort(noise, dim=1).to(sequence.device)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, length, device=sequence.device)
    mask.scatter_(1, ids_keep, 0.0)  # 0: kept, 1: removed
    return gather_visible(sequence, ids_keep), mask, ids_restore


def decoder_forward(self, hidden_states: torch.Tensor, ids_restore: torch.Tensor,
                    interpolate_pos_encoding: bool = False):  # fmt: skip
    """``ViTMAEDecoder.forward`` with the unshuffle, mask tokens, class token and position embedding in one op."""
    m = _modeling()
    if interpolate_pos_encoding:  # transformers' own code
        return _original(m.ViTMAEDecoder, "forward")(self, hidden_states, ids_restore, True)
    x = self.decoder_embed(hidden_states)
    x = scatter_masked(x[:, 1:], ids_restore, self.mask_token, self.decoder_pos_embed, cls_token=x[:, :1])
    for layer in self.decoder_layers:
        x = layer(x)
    logits = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
    return m.ViTMAEDecoderOutput(logits=logits)


def pretraining_forward(self, pixel_values: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        interpolate_pos_encoding: bool | None = None, attention_mask: torch.Tensor | None = None,
                        **kwargs):  # fmt: skip
    """``ViTMAEForPreTraining.forward`` with the loss fused over the masked patches (``masked_mse_loss``)."""
    m = _modeling()
    if interpolate_pos_encoding:  # transformers' own code
        own = _original(m.ViTMAEForPreTraining, "forward")
        return own(self, pixel_values, noise=noise, interpolate_pos_encoding=True, attention_mask=attention_mask,
                   **kwargs)  # fmt: skip
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.vit(pixel_values, noise=noise, interpolate_pos_encoding=interpolate_pos_encoding,
                       attention_mask=attention_mask, **kwargs)  # fmt: skip
    logits = self.decoder(outputs.last_hidden_state, outputs.ids_restore).logits
    c = self.config
    if pixel_values.shape[1] != c.num_channels:
        raise ValueError("Make sure the number of channels of the pixel values is equal to the one set in the "
                         "configuration")  # fmt: skip
    n = outputs.mask.shape[1]
    if int(n * (1 - c.mask_ratio)) >= n:  # nothing masked (mask_ratio 0: every patch reconstructed, for a picture)
        loss = _unmasked_loss(self, pixel_values, logits, outputs.mask)  # transformers' formula: NaN (0 / 0)
    else:
        # (fp32, float64 for a float64 model: transformers' loss has the model's dtype)
        loss = masked_mse_loss(logits, pixel_values, outputs.mask, c.patch_size, norm_pix=c.norm_pix_loss, eps=1e-6)
    out = m.ViTMAEForPreTrainingOutput(loss=loss, logits=logits, mask=outputs.mask, ids_restore=outputs.ids_restore,
                                       hidden_states=outputs.hidden_states, attentions=outputs.attentions)  # fmt: skip
    use_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
    return out if use_dict else out.to_tuple()


def _unmasked_loss(model, pixel_values, logits, mask):
    """transformers' loss where no patch is masked (``mask_ratio`` 0): the mean over masked patches, 0 / 0."""
    target = model.patchify(pixel_values)
    if model.config.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1.0e-6) ** 0.5
    return (((logits - target) ** 2).mean(-1) * mask).sum() / mask.sum()


# --- the fused layer (patch_hf_vit_mae(model, layers=True)) ---
def _fused_layer_class():
    m = _modeling()

    class FusedViTMAELayer(m.ViTMAELayer):
        """transformers' ``ViTMAELayer`` on fastmim's fused block ops (see the module's docstring)."""

        def _plain(self, attention_mask, kwargs) -> bool:
            attn = self.attention
            training_dropout = self.training and (self.dropout.p > 0 or attn.attention_dropout > 0)
            return (attention_mask is None and not kwargs and not training_dropout and not _attention_observed(attn)
                    and attn.q_proj.weight.shape[0] == attn.num_attention_heads * attn.head_dim
                    and len({p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj)}) == 1)  # fmt: skip

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
            if not self._plain(attention_mask, kwargs):
                return super().forward(hidden_states, attention_mask, **kwargs)
            attn, mlp, before, after = self.attention, self.mlp, self.layernorm_before, self.layernorm_after
            b, n, _ = hidden_states.shape
            h = layer_norm(hidden_states, before.weight, before.bias, before.eps)
            proj = (attn.q_proj, attn.k_proj, attn.v_proj)  # one matmul for the three (qkv_bias: all or none)
            bias = torch.cat([p.bias for p in proj]) if attn.q_proj.bias is not None else None
            qkv = F.linear(h, torch.cat([p.weight for p in proj]), bias)
            out = attention(qkv.view(b, n, 3, attn.num_attention_heads, attn.head_dim), attn.scaling)
            y, s = add_layer_norm(attn.o_proj(out.reshape(b, n, -1)), hidden_states, after.weight, after.bias,
                                  after.eps)  # fmt: skip
            if getattr(mlp.config, "hidden_act", None) == "gelu" and mlp.fc1.bias is not None:
                x = bias_gelu(F.linear(y, mlp.fc1.weight), mlp.fc1.bias)
            else:
                x = mlp.activation_fn(mlp.fc1(y))
            return mlp.fc2(x) + s

    FusedViTMAELayer.__module__ = __name__
    FusedViTMAELayer.__qualname__ = "FusedViTMAELayer"
    return FusedViTMAELayer


def _attention_observed(attn) -> bool:
    """Whether something reads ``attn``'s own forward: a hook of the user's, or transformers' output capture asked
    for the attention weights in this call (its capture hooks, installed once and kept, are idle otherwise)."""
    hooks = [*attn._forward_hooks.values(), *attn._forward_pre_hooks.values()]
    if any(getattr(h, "__name__", "") != "output_capturing_hook" for h in hooks):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # (a transformers without it records nothing there)
        return bool(hooks)
    collecting = _active_collector.get()
    return collecting is not None and "attentions" in collecting


_BUILT: dict[str, type] = {}


def __getattr__(name: str):
    """The fused layer class, built on first use (transformers imported only then; unpickling finds it)."""
    if name == "FusedViTMAELayer":
        if name not in _BUILT:
            _BUILT[name] = _fused_layer_class()
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _layers(model) -> list:
    return [*model.vit.layers, *model.decoder.decoder_layers]


def fused_layers(model) -> int:
    """How many of ``model``'s ViTMAE layers run on fastmim's fused block ops."""
    return sum(type(layer).__name__ == "FusedViTMAELayer" and type(layer).__module__ == __name__
               for layer in _layers(model))  # fmt: skip


# --- patching ---
_SAVED: dict[tuple[type, str], object] = {}  # transformers' own functions, recorded before any patch
_REPLACEMENTS = {f.__name__: f for f in (random_masking, decoder_forward, pretraining_forward)}


class _PatchedMethod:
    """One replacement bound to one module (an instance attribute of it, so this model only). Unlike a bound method,
    it pickles (by the replacement's name) and deep-copies with its module: a saved patched model loads patched."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name

    @property
    def __func__(self):
        return _REPLACEMENTS[self.name]

    @property
    def __signature__(self) -> inspect.Signature:
        """The replacement's, without ``self``: what a bound method shows (Hugging Face's Trainer keeps the dataset
        columns the forward's signature names)."""
        sig = inspect.signature(_REPLACEMENTS[self.name])
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __call__(self, *args, **kwargs):
        return _REPLACEMENTS[self.name](self.module, *args, **kwargs)


def _targets(m) -> list[tuple[type, str, object]]:
    targets = [(m.ViTMAEEmbeddings, "random_masking", random_masking), (m.ViTMAEDecoder, "forward", decoder_forward),
               (m.ViTMAEForPreTraining, "forward", pretraining_forward)]  # fmt: skip
    for cls, name, fn in targets:
        if (cls, name) not in _SAVED:
            own = cls.__dict__[name]
            if own is fn:
                raise RuntimeError(f"{cls.__name__}.{name} is patched but its original was not recorded")
            _SAVED[(cls, name)] = own
    return targets


def _original(cls: type, name: str):
    _targets(_modeling())
    return _SAVED[(cls, name)]


def patch_hf_vit_mae(model=None, layers: bool = False):
    """Runs ``model`` (a ``ViTMAEForPreTraining``) on fastmim's ops; without ``model``, every ViTMAE model (the classes
    are patched, models built before included). ``layers``: its transformer layers on the fused block ops too (a
    model only). Returns ``model``. Idempotent; ``unpatch_hf_vit_mae`` undoes it."""
    m = _modeling()
    targets = _targets(m)
    if model is None:
        if layers:
            raise ValueError("patch_hf_vit_mae(layers=True) fuses one model's layers: pass the model")
        for cls, name, fn in targets:
            setattr(cls, name, fn)
        return None
    _check_model(model, "patch_hf_vit_mae")
    for (cls, name, fn), obj in zip(targets, _owners(model), strict=True):
        own = inspect.getattr_static(type(obj), name)
        if own is not fn and own is not _SAVED[(cls, name)]:  # a subclass's own method: an instance patch hides it
            raise TypeError(f"patch_hf_vit_mae: {type(obj).__name__} overrides {name}, which patching this model "
                            f"would replace; patch_hf_vit_mae() (no model: the classes) keeps your {name} and runs "
                            f"transformers' {cls.__name__}.{name} (its super()) on fastmim's ops")  # fmt: skip
    for (_, name, fn), obj in zip(targets, _owners(model), strict=True):
        obj.__dict__[name] = _PatchedMethod(obj, fn.__name__)  # an instance attribute: this model only
    if layers:
        fused = __getattr__("FusedViTMAELayer")
        for layer in _layers(model):
            if type(layer) is m.ViTMAELayer:  # re-classed (not wrapped): names, state dict and pickling unchanged
                layer.__class__ = fused
    return model


def unpatch_hf_vit_mae(model=None):
    """Undoes ``patch_hf_vit_mae(model)`` (or, without ``model``, the class patch). Returns ``model``."""
    targets = _targets(_modeling())
    if model is None:
        for cls, name, _ in targets:
            setattr(cls, name, _SAVED[(cls, name)])
        return None
    _check_model(model, "unpatch_hf_vit_mae")
    for (_, name, _), obj in zip(targets, _owners(model), strict=True):
        obj.__dict__.pop(name, None)
    for layer in _layers(model):
        if type(layer) is _BUILT.get("FusedViTMAELayer"):
            layer.__class__ = _modeling().ViTMAELayer
    return model


def is_patched(model=None) -> bool:
    """Whether ``model`` (or, without one, the ViTMAE classes) runs on fastmim's ops: for each patched method, the
    model's own (an instance patch, also inside a wrapper that keeps ``__wrapped__``, as ``torch.autocast``'s and
    accelerate's do) or, where the model has none, transformers' class method (the class patch: a subclass's
    method that calls ``super()`` reaches it)."""
    targets = _targets(_modeling())
    if model is None:
        return all(cls.__dict__[name] is fn for cls, name, fn in targets)
    _check_model(model, "is_patched")
    return all(_unwrapped(obj.__dict__[name]) is fn if name in obj.__dict__ else cls.__dict__[name] is fn
               for (cls, name, fn), obj in zip(targets, _owners(model), strict=True))  # fmt: skip


def _unwrapped(f):
    """The function under a bound method, a ``_PatchedMethod`` and ``functools.wraps`` wrappers."""
    for _ in range(64):  # (a bound cycle guard)
        inner = getattr(f, "__func__", None) or getattr(f, "__wrapped__", None)
        if inner is None or inner is f:
            return f
        f = inner
    return f


def _check_model(model, who: str) -> None:
    if not isinstance(model, _modeling().ViTMAEForPreTraining):
        raise TypeError(f"{who}: expected a transformers ViTMAEForPreTraining, got {type(model).__name__}")


def _owners(model) -> tuple:
    return model.vit.embeddings, model.decoder, model
