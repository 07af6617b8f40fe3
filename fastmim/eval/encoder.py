"""Encoders to evaluate and their features: a fastmim run's ``encoder.safetensors`` (the architecture from its
metadata), a timm checkpoint of the same architecture (named with ``model``), or a random initialisation (the
baseline a pretrained encoder must beat); labelled class folders; features extracted once per encoder and cached."""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from pathlib import Path

import torch
from torch import nn

from fastmim.data.folder import open_rgb
from fastmim.models.registry import RECIPE_PREFIXES
from fastmim.models.vit import from_beit_state_dict

CACHE_VERSION = "v3"  # (v2: the evaluation view as MAE crops it above 224 px and rounds its resize; v3: ConvNeXt's
# as ConvNeXt V2's above 224 px)


def encoder_name(name: str) -> str:
    """``mae_vit_base_patch16`` -> ``vit_base_patch16`` (a recipe's encoder); an encoder name as it is."""
    for prefix in RECIPE_PREFIXES:
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def _plain_encoder(name: str) -> str | None:
    """The registered encoder (``vit_*``, ``convnextv2_*``) a model name stands for: a recipe's
    (``mae_vit_base_patch16`` -> ``vit_base_patch16``), or one whose name ends in it (a model registered by a
    user's script, ``mae_sobel_vit_tiny_patch16``); None: none."""
    import fastmim

    encoders = [m for m in fastmim.list_models() if m.startswith(("vit_", "convnextv2_"))]
    enc = encoder_name(name)
    if enc in encoders:
        return enc
    return next((m for m in sorted(encoders, key=len, reverse=True) if name.endswith("_" + m)), None)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    whole_run = ValueError(f"{str(path)!r} is a fastmim checkpoint (a run's whole state), not an encoder: pass the "
                           f"run's folder ({str(path.parent)!r}), or its encoder.safetensors (finetuned.safetensors "
                           "for a fine-tuning)")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if path.name == "checkpoint.pt":  # (torch's weights_only explanation runs to a dozen lines: not repeated;
            # an older fastmim's checkpoint: numpy's random state refused)
            raise whole_run from None
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # (torch's message carries terminal colours)
        other = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if other:  # a training checkpoint with objects beside its weights (SimMIM's: its yacs config), or a module
            take = "c.state_dict() if isinstance(c, torch.nn.Module) else c.get('model', c.get('state_dict'))"
            raise ValueError(f"{str(path)!r} holds an object of {other.group(1)}, which fastmim does not unpickle "
                             "(unpickling can run code); if you trust the file, save its weights alone and pass "
                             f"that: python -c \"import torch; c = torch.load({str(path)!r}, weights_only=False); "
                             f"torch.save({take}, 'weights.pth')\"") from None  # fmt: skip
        first = (text.strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{str(path)!r} is neither safetensors nor a plain torch state dict ({first}); a fastmim "
                         "run's encoder is RUN/encoder.safetensors") from e  # fmt: skip
    if isinstance(state, dict) and (
        {"model", "optimizer", "rng", "step"} <= state.keys() or {"net", "opt", "rng", "settings"} <= state.keys()
    ):  # fmt: skip (a pretraining's
        raise whole_run  # and a fine-tuning's checkpoint: the model with its decoder or head, not an encoder)
    from fastmim.train.checkpoint import weights_in

    state, target = weights_in(state)  # training checkpoints of timm, MAE, I-JEPA; saved from DDP or torch.compile
    if target:  # (the encoder I-JEPA evaluates, and fastmim exports, is its EMA target encoder)
        print(f"note: {path.name}: an I-JEPA checkpoint; its target_encoder is read", flush=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    if "blocks.0.attn.qkv.weight" in state and any(k.startswith("decoder_") for k in state):
        # MAE's pretraining checkpoint (facebookresearch/mae): the encoder's weights beside the decoder's, which
        # MAE's fine-tuning drops too (its strict=False load)
        state = {k: v for k, v in state.items() if not k.startswith("decoder_") and k != "mask_token"}
    if "encoder.stem.0.weight" in state and "proj.weight" in state:
        # an FCMAE pretraining's model (fastmim's, or ConvNeXt V2's own in fastmim's names): its encoder
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if any(k.startswith("encoder.") for k in state) and all(k.startswith(("encoder.", "decoder.")) for k in state):
        # a pretraining checkpoint of SimMIM's (microsoft/SimMIM): the encoder's weights, without its mask token
        state = {k.removeprefix("encoder."): v for k, v in state.items()
                 if k.startswith("encoder.") and k != "encoder.mask_token"}  # fmt: skip
    return state, {}


def _snapshots_there(folder: Path) -> str:
    """The --keep-every snapshots a folder holds, as a hint: "" when none."""
    from fastmim.train.checkpoint import SNAPSHOT_GLOB

    kept = sorted(p.name for p in folder.glob(SNAPSHOT_GLOB)) if folder.is_dir() else []
    if not kept:
        return ""
    shown = ", ".join(kept[:3] + (["..."] if len(kept) > 4 else []) + kept[3:][-1:])
    return f"; it holds {len(kept)} encoder snapshot(s) (--keep-every): {shown}"


def load_encoder(path: str | Path | None = None, model: str | None = None, img_size: int | None = None,
                 vit: dict | None = None) -> tuple[nn.Module, dict]:  # fmt: skip
    """(encoder in eval mode, description). ``path``: a run directory (its encoder.safetensors; a fine-tuning's:
    its finetuned.safetensors), an
    encoder.safetensors, a fine-tuning's finetuned.safetensors (without its classifier), or a timm state dict
    (.safetensors, .pth); None: ``model`` randomly initialised.
    ``model``: the encoder (``vit_base_patch16``, ``convnextv2_atto``) or recipe name; None: the file's metadata.
    ``img_size``: a ViT's comes from its position embedding (another size given: the embedding is interpolated to
    it); a ConvNeXt's is the one its run trained at (the file's metadata), else 224. ``vit``: a random ViT's
    ``init_values``, ``rel_pos_bias``, ``abs_pos_embed`` (a file's come with it). A ViT with a relative position bias
    (SimMIM's, A2MIM's) reads fastmim's keys or timm's ``Beit`` (a fine-tuning's, BEiT-style checkpoints)."""
    import fastmim

    state, meta = None, {}
    if path is not None:
        path = Path(path)
        if path.is_dir():  # a run's folder, or a fine-tuning's (its network, without the classifier)
            tuned = path / "finetuned.safetensors"
            path = tuned if tuned.is_file() and not (path / "encoder.safetensors").is_file() else \
                path / "encoder.safetensors"  # fmt: skip
            if not path.is_file():
                raise FileNotFoundError(f"no encoder.safetensors in {str(path.parent)!r} (a run writes it with its "
                                        "first checkpoint; a fine-tuning writes finetuned.safetensors at its "
                                        f"end){_snapshots_there(path.parent)}")  # fmt: skip
        if not path.is_file():
            raise FileNotFoundError(f"no encoder at {str(path)!r}{_snapshots_there(path.parent)}")
        state, meta = _read_weights(path)
    said = meta.get("model")
    known = _plain_encoder(said) if said else None  # the encoder the file's own name stands for
    if model and known is not None and model not in (said, known):
        raise ValueError(f"{str(path)!r} says it holds {said!r}; --model {model} contradicts it (--model, "
                         "model= in Python, is for files that do not say their architecture: drop it)")  # fmt: skip
    # the file's own name where it has one (a recipe's: the run it came from); --model for a name this process does
    # not know (a model registered by the script that pretrained it)
    name = model if model and said and known is None else said or model
    if name is None:
        raise ValueError(f"{str(path)!r} does not say its architecture: name it with --model (model= in Python; "
                         "e.g. vit_base_patch16)")  # fmt: skip
    enc = _plain_encoder(name)
    if enc is None:
        own = ("; a model registered by your own code: name its encoder's architecture with --model (model= in "
               "Python), e.g. --model vit_base_patch16") if path is not None else ""  # fmt: skip
        raise ValueError(f"unknown encoder {name!r}: ViTs are vit_<size>_patch<14|16>, ConvNeXt V2 "
                         f"convnextv2_<size>{own}")  # fmt: skip
    kwargs: dict = {"num_classes": 0}
    if enc.startswith("vit_"):
        class_token = "cls_token" in state if state is not None else not name.startswith("ijepa_")
        kwargs["class_token"] = class_token
        if state is not None and "blocks.0.attn.q_bias" in state:  # timm's Beit (a fine-tuning of such an encoder)
            state = from_beit_state_dict(state)
        if state is not None and "blocks.0.ls1.gamma" in state:
            kwargs["init_values"] = 1.0  # layer scale (SimMIM's, A2MIM's): its learned values come with the state
        elif state is None:
            kwargs.update({k: v for k, v in (vit or {}).items() if v is not None})
        if state is not None and "patch_embed.proj.weight" in state:  # the weights' patch, whatever the name says
            kwargs["patch_size"] = state["patch_embed.proj.weight"].shape[-1]  # (--model-args patch_size=8)
        if state is not None:
            shared, own = "rel_pos_bias.relative_position_bias_table", "blocks.0.attn.relative_position_bias_table"
            kwargs["rel_pos_bias"] = "shared" if shared in state else "block" if own in state else None
            learned = meta.get("abs_pos") == "learned"  # (a run's --abs-pos learned: it stays trainable)
            kwargs["abs_pos_embed"] = ("learned" if learned else True) if "pos_embed" in state else False
            if kwargs["rel_pos_bias"] is not None:
                rows = state[shared if shared in state else own].shape[0] - 3  # (2g - 1)^2 patch offsets
                grid = (math.isqrt(rows) + 1) // 2
                trained = grid * state["patch_embed.proj.weight"].shape[-1]
                if img_size is not None and img_size != trained:
                    raise ValueError(f"--img-size {img_size}: this encoder's relative position bias was trained on "
                                     f"{grid}x{grid} patches ({trained} px); resampling its table is not supported, "
                                     f"evaluate at {trained}")  # fmt: skip
                kwargs["img_size"] = trained
        if state is not None and "fc_norm.weight" in state and "norm.weight" not in state:
            kwargs["fc_norm"] = True  # a fine-tuning with MAE's global pool (finetuned.safetensors)
        if state is not None and "pos_embed" in state and "patch_embed.proj.weight" in state:
            tokens = state["pos_embed"].shape[1] - int(class_token)
            grid = math.isqrt(tokens)
            patch = state["patch_embed.proj.weight"].shape[-1]
            kwargs["img_size"] = grid * patch
            if img_size is not None and img_size != kwargs["img_size"]:
                if img_size % patch:
                    raise ValueError(f"--img-size {img_size} is not a multiple of the encoder's patch size {patch}")
                state = {
                    **state,
                    "pos_embed": resize_pos_embed(state["pos_embed"], int(class_token), img_size // patch),
                }
                new = img_size // patch
                print(f"note: the encoder was trained at {kwargs['img_size']} px: its position embedding is "
                      f"interpolated from {grid}x{grid} to {new}x{new} patches (bicubic, as MAE's "
                      "interpolate_pos_embed)", flush=True)  # fmt: skip
                kwargs["img_size"] = img_size
        elif img_size is not None:
            kwargs["img_size"] = img_size
        if state is not None:  # a classifier of a timm checkpoint is not the encoder
            state = {k: v for k, v in state.items() if not k.startswith("head.") and "relative_position_index" not in k}
    elif state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
        if "stem.0.weight" in state and not any(k.startswith("head.norm.") for k in state):
            # an FCMAE encoder from ConvNeXt V2's code (timm's keys): pretraining has no final norm, and its
            # fine-tuning starts a fresh one, as here (the kNN and probe features take it at its initial values)
            dim = state["stem.0.weight"].shape[0] * 8
            state = {**state, "head.norm.weight": torch.ones(dim), "head.norm.bias": torch.zeros(dim)}
    module = fastmim.create_model(enc, **kwargs)
    if state is not None:
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = [line if len(line) < 300 else line[:300] + "..." for line in str(e).splitlines()[1:4]]
            raise ValueError(f"the weights in {str(path)!r} do not fit encoder {enc!r}: {' '.join(first)}") from e
    side = getattr(module, "img_size", None)
    trained = int(meta["img_size"]) if meta.get("img_size", "").isdigit() else None  # a run's encoder says it
    size = kwargs.get("img_size") or img_size or (side[0] if isinstance(side, tuple) else side) or trained or 224
    if enc.startswith("vit_") and kwargs.get("patch_size") is not None:  # the weights' patch, whatever the name says
        named = enc
        enc = re.sub(r"_patch\d+$", f"_patch{kwargs['patch_size']}", enc)
        if model and named != enc and model in (named, name):
            print(f"note: the weights are in {kwargs['patch_size']}-pixel patches: --model {model} is read as "
                  f"{enc}", flush=True)  # fmt: skip
    info = {"encoder": enc, "model": name, "img_size": int(size), "path": os.path.abspath(path) if path else None,
            "step": int(meta["step"]) if meta.get("step", "").isdigit() else None,
            "random_init": path is None}  # fmt: skip
    if "classes" in meta:  # a fine-tuning's finetuned.safetensors (its step is the pretraining's it started from)
        info["finetuned"] = True
    return module.eval(), info


def resize_pos_embed(pos_embed: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """A ViT's position embedding [1, prefix + g*g, D] for a grid x grid patch grid: the prefix tokens' (class
    token) kept, the patch positions resampled bicubically as a g x g image of D channels (MAE's
    ``interpolate_pos_embed``, for an encoder used at another image size)."""
    pre, pos = pos_embed[:, :prefix], pos_embed[:, prefix:]
    g, d = math.isqrt(pos.shape[1]), pos.shape[2]
    pos = pos.reshape(1, g, g, d).permute(0, 3, 1, 2).float()
    pos = torch.nn.functional.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)
    return torch.cat([pre, pos], dim=1)


def global_pool_norm(encoder: nn.Module) -> nn.LayerNorm | None:
    """The ``fc_norm`` of a ViT fine-tuned with MAE's global pool (a LayerNorm on the patch tokens' mean), else None
    (timm's ViTs have ``fc_norm = Identity`` when they have none)."""
    norm = getattr(encoder, "fc_norm", None)
    return norm if isinstance(norm, nn.LayerNorm) else None


def check_pool(encoder: nn.Module, pool: str, flag: str = "--pool") -> bool:
    """Whether the ViT has a class token; ``pool`` cls on one without (I-JEPA's), or on a fine-tuning with the
    global pool (no final norm on its class token), is refused, naming ``flag``."""
    has_cls = getattr(encoder, "cls_token", None) is not None
    if pool == "cls" and not has_cls:
        raise ValueError(f"{flag} cls: this ViT has no class token (I-JEPA's); use {flag} avg")
    if pool == "cls" and global_pool_norm(encoder) is not None:
        raise ValueError(f"{flag} cls: this ViT was fine-tuned with MAE's global pool (fc_norm on the patch tokens' "
                         f"mean, no final norm on the class token); use {flag} avg")  # fmt: skip
    return has_cls


def recipe_pool(model: str | None, pool: str) -> str:
    """``pool`` for an encoder of recipe ``model``: "auto" is the token mean ("avg") for data2vec 2.0, whose own
    evaluation pools the tokens' mean (fairseq's mean pooling); else ``pool`` as given. The evaluation command and
    the pretraining's kNN monitor both read it, so their numbers are of one feature."""
    if pool == "auto" and str(model or "").startswith("data2vec2"):
        return "avg"
    return pool


def resolve_pool(encoder: nn.Module, pool: str) -> str | None:
    """What ``pool`` means for ``encoder``: a ViT's "cls" or "avg" (auto: the class token where it has one, unless it
    was fine-tuned with MAE's global pool); None for a ConvNeXt (its own pooled features). Checked (``check_pool``)."""
    if not hasattr(encoder, "blocks"):
        return None
    has_cls = check_pool(encoder, pool)
    if pool != "auto":
        return pool
    return "cls" if has_cls and global_pool_norm(encoder) is None else "avg"


def pooled_features(encoder: nn.Module, imgs: torch.Tensor, pool: str = "auto") -> torch.Tensor:
    """[B, D] features: a ViT's class token after the final norm (``cls``; MAE's probe, DINO's kNN) or the mean of
    its patch tokens (``avg``; ``auto``: cls when the ViT has one; a fine-tuning's ``fc_norm`` normalises the mean); a
    ConvNeXt V2's pooled, normalised features."""
    if hasattr(encoder, "blocks"):  # ViT
        h = encoder.forward_features(imgs)
        if resolve_pool(encoder, pool) == "cls":
            return h[:, 0]
        mean = h[:, encoder.num_prefix_tokens :].mean(1)
        fc_norm = global_pool_norm(encoder)  # fine-tuned with MAE's global pool: its norm follows the mean
        return mean if fc_norm is None else fc_norm(mean)
    return encoder(imgs)


# --- labelled data ---
LEFT_OUT = -1  # the label of an unreadable image ``LabelledFolder(bad="drop")`` leaves out


def kept(labels: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``labels`` and ``others`` (rows alike) without the rows labelled ``LEFT_OUT`` (unreadable images)."""
    keep = labels != LEFT_OUT
    if bool(keep.all()):
        return (labels, *others)
    return (labels[keep], *(t[keep.to(t.device)] for t in others))


class LabelledFolder(torch.utils.data.Dataset):
    """ImageNet-style ``root/<class>/<image>``: item i is (transform(RGB image), class index). ``classes``: the class
    names to index by (a validation folder takes its training folder's), default the folder's own, sorted.

    ``bad``: what an image that cannot be read or decoded does: "raise" (``BadImageError`` naming it, the default);
    "drop" (it is named on stderr and comes as a black view labelled ``LEFT_OUT``, which ``extract_features`` and
    the evaluations leave out: features, kNN and accuracies over the readable images); "replace" (it is named and a
    readable sample stands in for it, the same one in every run: ``fastmim.data.replacement_index`` of ``seed``;
    for training sets, whose batches must stay full)."""

    def __init__(self, root: str | Path, transform=None, classes: list[str] | None = None, bad: str = "raise",
                 seed: int = 0):  # fmt: skip
        from fastmim.data.folder import (
            IMG_EXTENSIONS,
            _note_skipped,
            _up_the_tree,
            check_pixel_limit,
            extension_counts,
            is_image_file,
            iter_files,
            note_other_files,
        )
        from fastmim.data.pathlist import LabelledPaths

        check_pixel_limit()
        if bad not in ("raise", "drop", "replace"):
            raise ValueError(f"bad={bad!r}: expected 'raise', 'drop' or 'replace'")
        self.root, self.transform, self.bad, self.seed = Path(root), transform, bad, seed
        if not self.root.is_dir():
            raise FileNotFoundError(f"labelled data folder {str(self.root)!r} does not exist")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise ValueError(f"{str(self.root)!r} has no class folders: labelled data is root/<class>/<image>")
        # hidden folders (.ipynb_checkpoints, ...) are skipped, as the pretraining loader does
        # a class's walk stays in its folder: a link in it up the tree (the root, above it) or into another class's
        # folder is not walked, or that class's images would be labelled as this one (a symlinked class folder, and
        # linked images, are read)
        root_above = _up_the_tree(self.root)  # (once: a class folder's ancestors are the root's and the root)
        loops = [c for c in found if os.path.realpath(self.root / c) in root_above]  # (a linked "class" holding the
        if loops:  # root, `up -> ..`: its walk would read the other classes' images, or the root's parent's)
            print(f"note: {str(self.root)!r}: folder(s) linking back up the tree are not classes: "
                  f"{', '.join(loops[:10])}", flush=True)  # fmt: skip
            found = [c for c in found if c not in loops]
            if not found:
                raise ValueError(f"{str(self.root)!r} has no class folders: labelled data is root/<class>/<image>")
        classes_real = {os.path.realpath(self.root / c) for c in found}  # (a class's own is walked: seen first)

        def above(c: str) -> set[str]:
            folder = self.root / c
            if folder.is_symlink():  # a class folder elsewhere: its own ancestors there
                return root_above | _up_the_tree(folder)
            return root_above | {os.path.realpath(folder), os.path.abspath(folder)}

        skipped: dict[str, int] = {}
        files, others = {}, {}
        for c in found:
            walked = list(iter_files(self.root / c, skipped, classes_real, above(c)))
            files[c] = sorted(f for f in walked if is_image_file(f))
            others[c] = [f for f in walked if not is_image_file(f)]
        _note_skipped(self.root, skipped)
        if classes is None:  # a class folder without images is not a class (it would widen a classifier's head)
            empty = [c for c in found if not files[c]]
            if empty and len(empty) < len(found):

                def why(c: str) -> str:  # files of a format not read, or none at all
                    return f"{c} ({extension_counts(others[c], 3)})" if others[c] else c

                print(f"note: {str(self.root)!r}: class folders without images ({', '.join(IMG_EXTENSIONS)}) left "
                      f"out: {', '.join(why(c) for c in empty[:10])}", flush=True)  # fmt: skip
                found = [c for c in found if files[c]]
        note_other_files(self.root, [f for c in found if files[c] for f in others[c]])  # (.gif, .heic: said, as the
        # pretraining's folder says them; an empty class's were said with it)
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(c for c in set(found) - set(self.classes) if files[c])  # an empty folder adds no image
        if unknown:
            import unicodedata

            nfc = {unicodedata.normalize("NFC", c): c for c in self.classes}

            def named(u: str) -> str:  # a name that prints as a training class's: what differs
                same = nfc.get(unicodedata.normalize("NFC", u))
                return u if same is None else (f"{u} (it differs from the training folder's {same!r} only in its "
                                               f"Unicode normalisation, {ascii(u)} vs {ascii(same)}, as a copy from "
                                               "macOS can leave it: rename one)")  # fmt: skip

            raise ValueError(f"{str(self.root)!r} has classes the training folder has not (or has no images of): "
                             f"{', '.join(named(u) for u in unknown[:10])}")  # fmt: skip
        index = {c: i for i, c in enumerate(self.classes)}
        # (packed, so that forked loader workers reading it do not each copy a Python list of every sample)
        self.samples = LabelledPaths((f, index[c]) for c in found if c in index for f in files[c])
        if not self.samples:
            raise ValueError(f"{str(self.root)!r} has class folders but no images in them")
        if bad != "raise":  # each unreadable file named once, not at every epoch's evaluation
            from fastmim.data import NamedOnce

            self.named = NamedOnce(len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int):
        """Item i, or ``BadImageError`` (one line naming the file, from a loader worker too) whatever ``bad``."""
        path, label = self.samples[i]
        img = open_rgb(path, path)
        return (self.transform(img) if self.transform else img), label

    def __getitem__(self, i: int):
        if self.bad == "raise":
            return self.load(i)
        from fastmim.data import load_or_stand_in
        from fastmim.data.folder import BadImageError

        try:
            return self.load(i)
        except BadImageError as e:
            if self.bad == "replace":  # (it names the file and its stand-in)
                return load_or_stand_in(_Loads(self), i, True, self.seed, self.named)[0]
            import sys

            from PIL import Image

            from fastmim.train.progress import line_break

            if self.named.first(i):
                print(
                    f"{line_break()}skipped: {e.summary()}; left out (--skip-bad-files; named once)",
                    file=sys.stderr,
                    flush=True,
                )
            black = Image.new("RGB", (32, 32))  # (a view of the transform's shape, so that the batch collates)
            return (self.transform(black) if self.transform else black), LEFT_OUT

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path, label in self.samples:
            st = Path(path).stat()
            # (the name's bytes as they are: one that is not UTF-8 decodes to surrogates, which .encode() refused)
            h.update(os.fsencode(path) + f"|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


class _Loads:
    """A ``LabelledFolder`` whose items raise ``BadImageError`` (``load_or_stand_in`` reads stand-ins from it)."""

    def __init__(self, folder: LabelledFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        return self.folder.load(i)


CROP_PCT = 0.875  # the evaluation view: resize to img_size / 0.875, centre-crop img_size (224 from 256)


def eval_crop_pct(img_size: int) -> float:
    """MAE's evaluation crop (``util/datasets.py``): 224 / 256 up to 224 px, the whole resized image (1.0) above."""
    return CROP_PCT if img_size <= 224 else 1.0


def eval_view(img_size: int, encoder: str = "") -> dict:
    """The evaluation view of an ``encoder`` (its name) at ``img_size``: MAE's (``eval_crop_pct``) for a ViT;
    ConvNeXt V2's (its ``datasets.py``) for a ConvNeXt: the 224 / 256 crop below 384 px, and from 384 the whole
    image squashed to img_size x img_size ("warp", no crop)."""
    if "convnext" in encoder:
        return {"warp": True} if img_size >= 384 else {"crop_pct": CROP_PCT}
    return {"crop_pct": eval_crop_pct(img_size)}


def eval_transform(img_size: int, encoder: str = ""):
    from fastmim.data.transforms import eval_transform as view

    return view(img_size, **eval_view(img_size, encoder))


def single_draw_crop_box(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, ...]:
    """(top, left, height, width) of MAE's linear-probe crop (its ``util/crop.py``, after BYOL's TF code): one draw of
    area share in ``scale`` and log-uniform aspect in ``ratio``, each side rounded then clipped to the image, placed
    uniformly. torchvision's RandomResizedCrop instead retries up to 10 draws until one fits whole and then falls
    back to a centre crop, which gives smaller crops on average (mean area share 0.44 against 0.52 on a 4:3 photo)."""
    area = width * height * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi).item())
    w = min(int(round(math.sqrt(area * aspect))), width)
    h = min(int(round(math.sqrt(area / aspect))), height)
    top = int(torch.randint(0, height - h + 1, size=(1,)).item())
    left = int(torch.randint(0, width - w + 1, size=(1,)).item())
    return top, left, h, w


class SingleDrawResizedCrop:
    """MAE's linear-probe crop (``single_draw_crop_box``) of a PIL image, resized to size x size (bicubic by
    default, antialiased as torchvision's RandomResizedCrop). A plain class at module level: loader workers started
    by spawn or forkserver pickle it."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bicubic"):
        self.size, self.scale, self.ratio, self.interpolation = size, tuple(scale), tuple(ratio), interpolation

    def __call__(self, img):
        import torchvision.transforms.functional as F

        width, height = F.get_image_size(img)
        top, left, h, w = single_draw_crop_box(width, height, self.scale, self.ratio)
        mode = F.InterpolationMode(self.interpolation)
        return F.resized_crop(img, top, left, h, w, [self.size, self.size], mode, antialias=True)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation})")  # fmt: skip


def train_transform(img_size: int):
    """MAE's linear-probe augmentation: its single-draw random-resized crop (``SingleDrawResizedCrop``; bicubic) and
    a horizontal flip."""
    import torchvision.transforms as T

    from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD

    return T.Compose([SingleDrawResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip


def _autocast(device: torch.device):
    import contextlib

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset, device: torch.device, batch_size: int = 256, workers: int = 0,
                     pool: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(features [N, D] fp32 on the CPU, labels [N]) of every sample of ``dataset``, in order, batched; samples
    labelled ``LEFT_OUT`` (unreadable images a ``LabelledFolder(bad="drop")`` skipped) are left out."""
    feats, labels = _features_of_all(encoder, dataset, device, batch_size, workers, pool)
    labels, feats = kept(labels, feats)
    return feats, labels


def _features_of_all(encoder, dataset, device, batch_size, workers, pool) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features`` with the samples labelled ``LEFT_OUT`` still in."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")  # fmt: skip
    encoder = encoder.to(device).eval()
    feats, labels = [], []
    for imgs, y in loader:
        with _autocast(device):
            feats.append(pooled_features(encoder, imgs.to(device, non_blocking=True), pool).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _readable(path: str) -> bool:
    from fastmim.data.folder import BadImageError

    try:
        open_rgb(path, path)
    except BadImageError:
        return False
    return True


def cached_features(encoder: nn.Module, info: dict, dataset, device: torch.device, batch_size: int, workers: int,
                    pool: str, use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor, float, bool]:  # fmt: skip
    """``extract_features``, kept under the cache folder per (encoder file, data, view, pool): a second evaluation of
    the same checkpoint reads them. Returns (features, labels, seconds spent extracting, from the cache)."""
    from fastmim.data.samples import cache_root

    path = None
    if use_cache and info.get("path"):
        st = Path(info["path"]).stat()
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"  # (_autocast's)
        key = f"{CACHE_VERSION}|{Path(info['path']).resolve()}|{st.st_size}|{st.st_mtime_ns}|{info['model']}|" \
              f"{info['img_size']}|{pool}|{dataset.root.resolve()}|{dataset.fingerprint()}|{precision}"  # fmt: skip
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()  # (a path that is not UTF-8)
        path = cache_root() / "features" / f"{digest[:24]}.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            left = saved.get("left_out", [])
            # features that leave out unreadable images: not those of a run that reads every image (it extracts them
            # again, which names the first unreadable one), nor once one of them reads again (a passing error)
            whole = len(saved["labels"]) == len(dataset) and not left
            if whole or (left and getattr(dataset, "bad", "raise") == "drop" and not any(map(_readable, left))):
                if left:
                    import sys

                    print(f"note: {len(left)} unreadable image(s) left out of the cached features of "
                          f"{str(dataset.root)!r}, e.g. {left[0]!r} (--skip-bad-files)", file=sys.stderr,
                          flush=True)  # fmt: skip
                return saved["features"], saved["labels"], 0.0, True
    t0 = time.perf_counter()
    feats, labels = _features_of_all(encoder, dataset, device, batch_size, workers, pool)
    left = [dataset.samples[i][0] for i in torch.nonzero(labels == LEFT_OUT).flatten().tolist()]
    labels, feats = kept(labels, feats)
    seconds = time.perf_counter() - t0
    if path is not None:
        from fastmim.train.checkpoint import WriteError, atomic_write

        record = {"features": feats, "labels": labels, "left_out": left}
        try:
            atomic_write(path, lambda tmp: torch.save(record, tmp))
        except (WriteError, PermissionError) as e:  # (a full disk, a read-only cache: the evaluation goes on)
            import sys

            print(f"note: the features were not cached ({e}); the evaluation goes on", file=sys.stderr, flush=True)
    return feats, labels, seconds, False
