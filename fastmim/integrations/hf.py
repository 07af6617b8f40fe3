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
"""

from __future__ import annotations

import inspect

import torch

from fastmim.integrations._versions import require
from fastmim.ops import gather_visible, masked_mse_loss, scatter_masked

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


def patch_hf_vit_mae(model=None):
    """Runs ``model`` (a ``ViTMAEForPreTraining``) on fastmim's ops; without ``model``, every ViTMAE model (the classes
    are patched, models built before included). Returns ``model``. Idempotent; ``unpatch_hf_vit_mae`` undoes it."""
    m = _modeling()
    targets = _targets(m)
    if model is None:
        for cls, name, fn in targets:
            setattr(cls, name, fn)
        return None
    if not isinstance(model, m.ViTMAEForPreTraining):
        raise TypeError(f"patch_hf_vit_mae: expected a transformers ViTMAEForPreTraining, got {type(model).__name__}")
    for (_, name, fn), obj in zip(targets, _owners(model), strict=True):
        obj.__dict__[name] = _PatchedMethod(obj, fn.__name__)  # an instance attribute: this model only
    return model


def unpatch_hf_vit_mae(model=None):
    """Undoes ``patch_hf_vit_mae(model)`` (or, without ``model``, the class patch). Returns ``model``."""
    targets = _targets(_modeling())
    if model is None:
        for cls, name, _ in targets:
            setattr(cls, name, _SAVED[(cls, name)])
        return None
    for (_, name, _), obj in zip(targets, _owners(model), strict=True):
        obj.__dict__.pop(name, None)
    return model


def is_patched(model=None) -> bool:
    """Whether ``model`` (or, without one, the ViTMAE classes) runs on fastmim's ops."""
    targets = _targets(_modeling())
    if model is None:
        return all(cls.__dict__[name] is fn for cls, name, fn in targets)
    return all(getattr(getattr(obj, name), "__func__", None) is fn
               for (_, name, fn), obj in zip(targets, _owners(model), strict=True))  # fmt: skip


def _owners(model) -> tuple:
    return model.vit.embeddings, model.decoder, model
