"""Pretraining configuration: a dataclass, filled from defaults < YAML (--config) < command-line flags."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastmim._args import ArgumentParser, Once, expand_home

AMP_MODES = ("auto", "none", "bf16", "fp16")
LOADERS = ("auto", "dali", "torch", "torch-gpu")
CROPS = ("random-resized", "simple")  # fastmim.data.transforms.CROPS (not imported here: torchvision)
CROP_INTERPS = ("bicubic", "bilinear")  # fastmim.data.transforms.CROP_INTERPS
LR_SCHEDULES = ("cosine", "multistep")
DECAY_EXEMPT = ("official", "tokens")  # fastmim.train.optim.DECAY_EXEMPT (not imported here: torch)
DALI_DEVICES = ("auto", "mixed", "cpu")
REL_POS_BIASES = ("shared", "block")  # fastmim.models.vit.REL_POS_BIAS, but None
VIT_INITS = ("mae", "beit", "trunc")  # fastmim.models.vit.VIT_INITS
ABS_POS = ("sincos", "learned", "none")  # fastmim.models.vit.ABS_POS
# the recipes whose encoder sees every token (the masked ones as a mask token): they take a relative position bias
EVERY_TOKEN_RECIPES = ("simmim_", "a2mim_", "maskfeat_")
MASK_TYPES = ("random", "block", "simmim", "uniform")
SPARSE_BACKENDS = ("auto", "fastmim", "dense_masked", "spconv")


@dataclass
class PretrainConfig:
    """Every option of a pretraining run. The defaults are sized for the built-in CPU demo (ViT-tiny, 30 epochs,
    batch 16, blr 1.5e-3); configs/mae_vit_base_in1k.yaml holds the MAE paper's ImageNet recipe."""

    # model (Encoder + Head)
    model: str = field(default="mae_vit_tiny_patch16", metadata={"help": "registered model name"})
    img_size: int = field(default=224, metadata={"help": "input side, divisible by the patch size"})
    decoder_embed_dim: int | None = field(default=None, metadata={"help": "decoder width (None: the model's)"})
    decoder_depth: int | None = field(default=None, metadata={"help": "decoder blocks (None: the model's)"})
    decoder_num_heads: int | None = field(default=None, metadata={"help": "decoder heads (None: the model's)"})
    model_args: dict | None = field(
        default=None,
        metadata={"help": "more keyword arguments of the model, as fastmim.create_model takes them: KEY=VALUE[,...] "
                          "(a YAML mapping in a config), e.g. low_pass_radius=20 (PixMIM), pred_depth=6 (I-JEPA), "
                          "hog_cell=4 (MaskFeat), fft_weight=0.2 (A2MIM), target=hog|lowpass (MAE, SimMIM; A2MIM: "
                          "lowpass)"},
    )  # fmt: skip
    attn_impl: str = field(
        default="auto", metadata={"help": "auto, sdpa, flash, math or fastmim (fastmim.ops.attention's kernels)"}
    )
    fused_norm: bool = field(
        default=False,
        metadata={
            "help": "ViT recipes: fuse each residual add with the next LayerNorm; FCMAE: each block's "
            "LayerNorm written in the autocast dtype (fastmim.ops)"
        },  # fmt: skip
    )
    fused_gelu: bool = field(
        default=False, metadata={"help": "ViT recipes: each MLP's fc1 bias and GELU as one op (fastmim.ops.bias_gelu)"}
    )
    grad_ckpt: bool = field(
        default=False,
        metadata={"help": "activation checkpointing: each block's activations recomputed in the backward (memory "
                          "for ~1/3 more compute)"},
    )  # fmt: skip
    fused_ops: bool = field(default=True, metadata={"help": "fastmim.ops fused kernels (--no-fused-ops: reference)"})
    # Mask + Target
    mask_ratio: float | None = field(
        default=None,
        metadata={"help": "fraction of patches removed, in (0, 1) (None: the model's, MAE 0.75, FCMAE 0.6)"},
    )
    mask_type: str | None = field(
        default=None,
        metadata={"help": "mask strategy (--mask): random (MAE), block (BEiT), simmim (2x2-token cells: 32 px at "
                          "patch 16) or uniform (UM-MAE, 75%), for MAE, PixMIM, SimMIM, A2MIM and MaskFeat; None: the "
                          "recipe's own (MAE random, SimMIM/A2MIM simmim, MaskFeat block; data2vec 2.0, I-JEPA and "
                          "FCMAE draw only their own)"},
    )  # fmt: skip
    num_masks: int | None = field(
        default=None,
        metadata={"help": "masks per image, the teacher running once for all of them (data2vec 2.0: 16; None: the "
                          "model's)"},
    )  # fmt: skip
    sparse_backend: str = field(
        default="auto",
        metadata={"help": "FCMAE encoder: auto (fastmim where compiled kernels exist), fastmim, dense_masked, spconv"},
    )
    drop_path: float = field(
        default=0.0,
        metadata={
            "help": "stochastic depth rate of the encoder (ViT or FCMAE's ConvNeXt V2), rising linearly over "
            "its blocks (SimMIM and A2MIM pretrain with 0.1, MAE, PixMIM and MaskFeat with 0; not for "
            "data2vec 2.0 and I-JEPA)"
        },
    )
    layer_scale: float | None = field(
        default=None,
        metadata={"help": "the ViT encoder's layer scale: each block's branches times a learned per-channel gamma "
                          "starting at this value (SimMIM's and A2MIM's ViT-B: 0.1; timm's init_values) (None: none)"},
    )  # fmt: skip
    rel_pos_bias: str | None = field(
        default=None,
        metadata={"help": "the ViT encoder's relative position bias (BEiT's, on the attention logits): shared (one "
                          "for all blocks: SimMIM's ViT-B), block (one per block: A2MIM's) (None: none); SimMIM, "
                          "A2MIM and MaskFeat, whose encoders see every token"},
    )  # fmt: skip
    abs_pos: str = field(
        default="sincos",
        metadata={"help": "the ViT encoder's absolute position embedding: sincos (fixed, MAE's), learned (from a "
                          "truncated normal 0.02: MaskFeat's in mmpretrain, A2MIM's in openmixup), none (SimMIM's "
                          "ViT-B: positions from --rel-pos-bias alone); SimMIM, A2MIM and MaskFeat"},
    )  # fmt: skip
    vit_init: str = field(
        default="mae",
        metadata={"help": "the ViT encoder's initialisation: mae (xavier-uniform, MAE's), beit (normal 0.02 cut at "
                          "one std, the depth rescaling: BEiT's and SimMIM's), trunc (truncated normal 0.02: "
                          "mmpretrain's MaskFeat, openmixup's A2MIM); SimMIM, A2MIM and MaskFeat"},
    )  # fmt: skip
    norm_pix_loss: bool = field(default=True, metadata={"help": "normalise target patches (MAE norm-pix)"})
    # data
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "image folder, its scan list, or webdataset tar shards (a .tar, a folder of them, or a pattern "
            "in quotes: 'DIR/train-{0000..0146}.tar'); None: built-in sample photos"
        },
    )
    num_workers: int | None = field(
        default=None,
        metadata={
            "help": "loader processes (torch) or decoding threads (DALI) per rank (None: auto: "
            "the usable CPUs per process on the node less one, 1 to 8; DALI: all of them, its threads)"
        },
    )
    loader: str = field(
        default="auto",
        metadata={
            "help": "auto (DALI when installed and the data is scanned or built in; else torch-gpu on a CUDA "
            "run, torch on CPU), dali, torch (decode in loader processes), torch-gpu (loader processes "
            "read the files, the GPU decodes: torchvision's nvJPEG, no DALI needed)"
        },
    )
    dali_device: str = field(
        default="auto", metadata={"help": "DALI decoding: auto (mixed = nvJPEG on a CUDA run, else cpu), mixed, cpu"}
    )
    skip_bad_files: bool = field(
        default=False,
        metadata={"help": "torch loaders: replace an unreadable image by another sample (a fixed choice), counted as "
                          "skipped_files in metrics.jsonl, instead of stopping the run (the --eval-data monitor leaves "
                          "its unreadable images out)"},
    )  # fmt: skip
    allow_unscanned: bool = field(
        default=False,
        metadata={"help": "let DALI read a folder never checked by python -m fastmim.data.scan (a bad file stops "
                          "the run; a JPEG cut short is decoded as far as it goes, by DALI's CPU decoder, and trained "
                          "on)"},
    )  # fmt: skip
    # optimisation
    epochs: int = field(default=30, metadata={"help": "training epochs"})
    batch_size: int = field(default=16, metadata={"help": "images per device per step"})
    accum_iter: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    blr: float = field(default=1.5e-3, metadata={"help": "base lr: lr = blr * effective batch / 256"})
    lr: float | None = field(default=None, metadata={"help": "absolute lr (None: blr x effective batch / 256)"})
    min_lr: float = field(default=0.0, metadata={"help": "lr floor of the cosine schedule"})
    warmup_epochs: float = field(default=3.0, metadata={"help": "linear warmup epochs"})
    warmup_lr: float = field(default=0.0, metadata={"help": "lr the warmup starts from (MAE 0, I-JEPA 2e-4)"})
    lr_schedule: str = field(
        default="cosine",
        metadata={"help": "the lr after the warmup: cosine (half-cycle to --min-lr: MAE's and most recipes') or "
                          "multistep (times --lr-gamma at each of --lr-milestones: SimMIM's and A2MIM's, x0.1 at epoch "
                          "700)"},
    )  # fmt: skip
    lr_milestones: str | None = field(
        default=None, metadata={"help": "the multistep schedule's epochs, comma-separated (SimMIM, A2MIM: 700)"}
    )
    lr_gamma: float = field(default=0.1, metadata={"help": "the multistep schedule's factor at each milestone"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    weight_decay_end: float | None = field(
        default=None,
        metadata={"help": "cosine weight-decay schedule from --weight-decay to this over the run (I-JEPA 0.04 -> "
                          "0.4; None: constant)"},
    )  # fmt: skip
    decay_exempt: str = field(
        default="official",
        metadata={"help": "the parameters weight decay leaves alone: official (the recipe's official code's rule: "
                          "biases and 1-D parameters, and for some recipes tokens: MAE's, FCMAE's, I-JEPA's and "
                          "data2vec 2.0's class or mask tokens decay, SimMIM's mask token) or tokens (also every "
                          "class, mask and position token: timm's convention, but the relative position tables "
                          "decay; fastmim's rule before this option)"},
    )  # fmt: skip
    beta2: float = field(default=0.95, metadata={"help": "AdamW's second-moment decay (MAE 0.95, SimMIM 0.999)"})
    crop: str = field(
        default="random-resized",
        metadata={"help": "the pretraining crop: random-resized (MAE's RandomResizedCrop, bicubic; --crop-min) or "
                          "simple (PixMIM's: the short side resized to --img-size, bilinear, then a random square with "
                          "4 px reflect padding)"},
    )  # fmt: skip
    crop_interp: str | None = field(
        default=None,
        metadata={"help": "the crop's resize filter (antialiased): bicubic or bilinear (torchvision's default: SimMIM, "
                          "I-JEPA) (None: the crop's own: bicubic for random-resized, bilinear for simple)"},
    )  # fmt: skip
    crop_min: float = field(
        default=0.2, metadata={"help": "RandomResizedCrop's smallest area (MAE 0.2, MaskFeat 0.5, SimMIM 0.67)"}
    )
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip probability (MAE 0.5, I-JEPA 0: no flips)"})
    clip_grad: float | None = field(default=None, metadata={"help": "clip the gradient norm (None: no clip)"})
    amp: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA), none, bf16 or fp16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    compile_mode: str = field(
        default="auto",
        metadata={"help": "torch.compile's mode with --compile (ignored without): auto (the mode measured fastest "
                          "for this torch version and device, else default), default, reduce-overhead, max-autotune, "
                          "max-autotune-no-cudagraphs"},
    )  # fmt: skip
    cuda_graph: bool = field(
        default=False,
        metadata={"help": "replay each training step from a CUDA graph (CUDA only; captured after 3 eager steps)"},
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "stop after this many optimizer steps (resuming a "
            "run that had one: --max-steps None runs to the end)"
        },
    )
    fsdp: bool = field(
        default=False,
        metadata={"help": "shard weights, gradients and optimizer state over the processes (FSDP2, per block; "
                          "sharded checkpoint.dcp/ checkpoints); the default is DDP"},
    )  # fmt: skip
    # run
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda, cuda:N"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    output_dir: str | None = field(default=None, metadata={"help": "run directory (None: output/MODEL-TIME)"})
    resume: str | None = field(
        default=None,
        metadata={"help": "checkpoint to resume ('auto', or the flag alone: output_dir's; 'if-exists': output_dir's "
                          "when it has one, else a new run there: one command for a job's first start and requeues)"},
    )  # fmt: skip
    init_weights: str | None = field(
        default=None,
        metadata={"help": "start a new run from these weights: a fastmim run's folder, checkpoint.pt or "
                          "encoder.safetensors, or another code's checkpoint of the model or its encoder (MAE's "
                          "{'model': ...}, timm's); the whole model where the file holds exactly its tensors, else "
                          "the encoder (the decoder starts fresh). A resume takes its weights from its checkpoint"},
    )  # fmt: skip
    log_interval: int = field(default=10, metadata={"help": "steps between logged metrics (host syncs)"})
    save_interval: int = field(default=0, metadata={"help": "steps between checkpoints (0: every epoch)"})
    vis_interval: int = field(default=10, metadata={"help": "epochs between reconstruction images (0: none)"})
    keep_every: int = field(
        default=0,
        metadata={"help": "epochs between encoder snapshots kept for evaluating the run part way "
                          "(encoder-epochNNNN.safetensors beside encoder.safetensors; 0: none)"},
    )  # fmt: skip
    eval_data: str | None = field(
        default=None,
        metadata={"help": "labelled data for a kNN monitor of the encoder (metrics.jsonl: knn_top1): ROOT holding "
                          "train/<class>/ and val/<class>/ image folders, or builtin:digits (None: no monitor)"},
    )  # fmt: skip
    eval_every: int = field(default=1, metadata={"help": "epochs between kNN evaluations (--eval-data)"})
    eval_pool: str = field(
        default="auto",
        metadata={"help": "the kNN monitor's ViT feature: cls (the class token), avg (the patch tokens' mean), auto "
                          "(cls when the ViT has one; avg for data2vec 2.0, as python -m fastmim.eval)"},
    )  # fmt: skip

    def validate(self) -> None:
        """Raises ValueError naming the first bad value."""
        from fastmim.masking.random import check_mask_ratio

        if self.mask_ratio is not None:
            check_mask_ratio(self.mask_ratio)
        from fastmim.models.vit import ATTN_IMPLS
        from fastmim.train.compile_mode import COMPILE_MODES

        if self.attn_impl not in ATTN_IMPLS:  # (with the other keys: an error from a file names it)
            raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {self.attn_impl!r}")
        if self.compile_mode is not None and self.compile_mode not in ("auto", *COMPILE_MODES):  # (without --compile
            # too: saved in config.yaml, it failed a later run with --compile)
            raise ValueError(f"compile_mode must be one of auto, {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.sparse_backend not in SPARSE_BACKENDS:
            raise ValueError(f"sparse_backend must be one of {', '.join(SPARSE_BACKENDS)}, got {self.sparse_backend!r}")
        if not 0 <= self.seed < 2**32:  # numpy's and DALI's seeds are 32-bit
            raise ValueError(f"seed must be in [0, 2^32), got {self.seed}")
        positive = ("img_size", "epochs", "batch_size", "accum_iter", "log_interval", "eval_every")
        if self.vis_interval < 0:
            raise ValueError(f"vis_interval must be >= 0 (0: no reconstruction pictures), got {self.vis_interval}")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "max_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        for name in ("blr", "min_lr", "warmup_epochs", "weight_decay", "save_interval", "keep_every"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.blr == 0 and self.lr is None:  # (as --lr 0: a run that never moves its weights)
            raise ValueError("blr must be > 0 (lr = blr x images per step / 256 would be 0), got 0")
        for name in ("lr", "clip_grad"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0 (or none), got {v}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.lr_gamma) and self.lr_gamma > 0):
            raise ValueError(f"lr_gamma must be a finite number > 0, got {self.lr_gamma}")
        steps = self.milestone_epochs() if self.lr_schedule == "multistep" else ()
        if self.lr_schedule == "multistep" and not steps:
            raise ValueError("lr_schedule multistep needs --lr-milestones (the epochs it multiplies the lr by "
                             "--lr-gamma at: SimMIM's 700)")  # fmt: skip
        if steps and steps[0] < self.warmup_epochs:
            raise ValueError(f"lr_milestones {self.lr_milestones}: the first comes before the warmup ends (epoch "
                             f"{self.warmup_epochs:g})")  # fmt: skip
        if self.num_masks is not None and (isinstance(self.num_masks, bool) or not isinstance(self.num_masks, int)
                                           or self.num_masks < 1):  # fmt: skip
            raise ValueError(f"num_masks must be a positive int, got {self.num_masks!r}")
        if not (math.isfinite(self.beta2) and 0.0 < self.beta2 < 1.0):
            raise ValueError(f"beta2 must be in (0, 1), got {self.beta2}")
        if not (math.isfinite(self.crop_min) and 0.0 < self.crop_min <= 1.0):
            raise ValueError(f"crop_min must be in (0, 1], got {self.crop_min}")
        if self.decay_exempt not in DECAY_EXEMPT:
            raise ValueError(f"decay_exempt must be one of {', '.join(DECAY_EXEMPT)}, got {self.decay_exempt!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.crop_interp is not None and self.crop_interp not in CROP_INTERPS:
            raise ValueError(f"crop_interp must be one of {', '.join(CROP_INTERPS)} (or None: the crop's own), got "
                             f"{self.crop_interp!r}")  # fmt: skip
        if isinstance(self.hflip, bool) or not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")
        if not (math.isfinite(self.warmup_lr) and self.warmup_lr >= 0.0):
            raise ValueError(f"warmup_lr must be a finite number >= 0, got {self.warmup_lr}")
        wd_end = self.weight_decay_end
        if wd_end is not None and not (math.isfinite(wd_end) and wd_end >= 0):
            raise ValueError(f"weight_decay_end must be a finite number >= 0 (or none), got {self.weight_decay_end}")
        scale = self.layer_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float) or not (
                math.isfinite(scale) and scale > 0)):  # fmt: skip
            raise ValueError(f"layer_scale must be a finite number > 0 (or none), got {scale!r}")
        if self.rel_pos_bias is not None and self.rel_pos_bias not in REL_POS_BIASES:
            raise ValueError(f"rel_pos_bias must be shared or block (or none), got {self.rel_pos_bias!r}")
        if self.vit_init not in VIT_INITS:
            raise ValueError(f"vit_init must be one of {', '.join(VIT_INITS)}, got {self.vit_init!r}")
        if self.abs_pos not in ABS_POS:
            raise ValueError(f"abs_pos must be one of {', '.join(ABS_POS)}, got {self.abs_pos!r}")
        if self.abs_pos == "none" and self.rel_pos_bias is None:
            raise ValueError("abs_pos none without a rel_pos_bias leaves the encoder no position information: add "
                             "--rel-pos-bias shared (SimMIM's) or block (SimMIM, A2MIM and MaskFeat take "
                             "them)")  # fmt: skip
        if not (math.isfinite(self.drop_path) and 0.0 <= self.drop_path < 1.0):
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.eval_pool not in ("auto", "cls", "avg"):
            raise ValueError(f"eval_pool must be auto, cls or avg, got {self.eval_pool!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        if self.dali_device not in DALI_DEVICES:
            raise ValueError(f"dali_device must be one of {', '.join(DALI_DEVICES)}, got {self.dali_device!r}")
        given = sorted({"image_mean", "image_std"} & set(self.model_args or {}))
        if given:  # (a low-pass target computed for other constants than the images carry: silently another one)
            raise ValueError(f"model_args {', '.join(given)}: fastmim's loaders normalise the images with ImageNet's "
                             "mean and std, which the low-pass target already undoes; these are for a training loop "
                             "of your own whose images are normalised otherwise")  # fmt: skip
        if self.mask_type is not None and self.mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {', '.join(MASK_TYPES)} (or None: the recipe's own), got "
                             f"{self.mask_type!r}")  # fmt: skip

    def milestone_epochs(self) -> tuple[float, ...]:
        """``lr_milestones`` as increasing epochs (fractions allowed); () when unset. ValueError naming a bad one."""
        if self.lr_milestones is None or not str(self.lr_milestones).strip():
            return ()
        try:
            steps = tuple(float(t) for t in str(self.lr_milestones).split(","))
        except ValueError:
            raise ValueError(f"lr_milestones must be epochs separated by commas (700, or 300,700), got "
                             f"{self.lr_milestones!r}") from None  # fmt: skip
        if not all(math.isfinite(t) and t > 0 for t in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"lr_milestones must be increasing epochs > 0, got {self.lr_milestones!r}")
        return steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def encoder_options(settings: dict) -> dict | None:
    """The ViT keyword arguments a run's settings (config keys: a PretrainConfig's ``to_dict()``, a run's
    config.yaml, old ones included) give its encoder: layer scale and the patch size for every ViT recipe (the
    latter where model_args sets it); the relative position bias,
    the absolute embedding and the initialisation for those whose encoder sees every token; None for FCMAE."""
    model = str(settings.get("model") or "")
    if model.startswith("fcmae_"):
        return None
    options = {"init_values": settings.get("layer_scale")}
    patch = as_mapping("model_args", settings.get("model_args") or {}).get("patch_size")
    if patch is not None:  # (--model-args patch_size=8: another patch than the name's)
        options["patch_size"] = patch
    if model.startswith(EVERY_TOKEN_RECIPES):
        options.update(rel_pos_bias=settings.get("rel_pos_bias"), abs_pos_embed=settings.get("abs_pos") or "sincos",
                       init=settings.get("vit_init") or "mae")  # fmt: skip
    return options


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(PretrainConfig)}


def _base_type(tp) -> tuple[type, bool]:
    """(int/float/str/bool, optional?) of a field annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def _coerce(name: str, value, tp) -> object:
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"config key {name!r} cannot be null")
    if base is dict:
        return as_mapping(name, value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")  # (unquoted, YAML 1.1 reads on/off as booleans)
        raise ValueError(f"config key {name!r} must be true or false, got {value!r}")
    if base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and base in (int, float):
        try:
            return base(value)
        except ValueError:
            pass
        if base is int:  # (--epochs 3.0 as YAML's epochs: 3.0)
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
    if name == "lr_milestones" and isinstance(value, list | tuple | int | float | str) and not isinstance(value, bool):
        return milestones_text(value)
    if base is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, base) or isinstance(value, bool) != (base is bool):
        hint = (": a value that starts with '{' (a pattern of shards) is read as a YAML mapping; put it in quotes, "
                f"{name}: '{{/a,/b}}/train-*.tar'" if base is str and isinstance(value, dict) else "")  # fmt: skip
        raise ValueError(f"config key {name!r} must be of type {base.__name__}, got {value!r}{hint}")
    return value


def milestones_text(value) -> str:
    """lr_milestones as its canonical text, "300,700" (so that 700 and 700.0, a YAML list or an int, compare equal);
    what does not parse is kept as given, for ``validate`` to name."""
    parts = value if isinstance(value, list | tuple) else str(value).split(",")
    try:
        return ",".join(_number_text(float(t)) for t in parts)
    except (TypeError, ValueError):
        return ",".join(str(t) for t in parts) if isinstance(value, list | tuple) else str(value)


def _number_text(x: float) -> str:
    """700.0 -> "700", 0.1234567 -> "0.1234567": every digit kept (``:g`` would round to six)."""
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of a command line: the value a Python literal (``0.3``, ``(0.8, 1.0)``, ``True``), else YAML
    (``true``, ``null``, ``[0.8, 1.0]``), else the plain string (``attn_impl=math``). ValueError if not KEY=VALUE."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value


def _fold_mappings(name: str, values: list):
    """Repeated --model-args texts as one value: the pairs of each added in order; a clearing one (none, null, "")
    drops what came before it."""
    out = values[0]
    for v in values[1:]:
        clears = lambda x: isinstance(x, str) and x.strip().lower() in ("", "none", "null")  # noqa: E731
        if clears(v) or clears(out):
            out = v
            continue
        was, new = as_mapping(name, out), as_mapping(name, v)
        both = sorted(set(was) & set(new))
        if both:
            raise ValueError(f"config key {name!r} names {', '.join(both)} in two --{name.replace('_', '-')} flags "
                             f"({out!r}, {v!r}): one would silently win")  # fmt: skip
        out = {**was, **new}
    return out


def as_mapping(name: str, value) -> dict:
    """A mapping key's value: a dict with string keys, or ``KEY=VALUE[,KEY=VALUE]`` (``key_value``'s rules)."""
    if isinstance(value, str):
        pairs = [p for p in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", value) if p.strip()]  # commas inside [..] stay
        try:
            items = [key_value(p) for p in pairs]
        except ValueError:
            raise ValueError(f"config key {name!r} takes KEY=VALUE[,KEY=VALUE...], got {value!r}") from None
        keys = [k for k, _ in items]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:  # one would silently win
            raise ValueError(f"config key {name!r} names {', '.join(twice)} more than once in {value!r}")
        value = dict(items)
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise ValueError(f"config key {name!r} must map argument names to values, got {value!r}")
    return value


def apply_overrides(cfg: PretrainConfig, overrides: dict, source: str) -> PretrainConfig:
    """Returns a copy of cfg with the given keys replaced; an unknown key raises ValueError naming it."""
    fields = _fields()
    hints = typing.get_type_hints(PretrainConfig)
    values = {}
    for key, value in overrides.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r} in {source}{hint}")
        try:
            values[name] = _coerce(name, value, hints[name])
        except ValueError as e:
            raise ValueError(f"{e} (from {source})") from None
    return dataclasses.replace(cfg, **values)


PATH_KEYS = ("data_path", "output_dir", "resume", "eval_data", "init_weights")


def expand_path(name: str, value: str, source: str) -> str:
    """A path as a shell would give it: ``~`` and ``$VAR`` / ``${VAR}`` expanded (a YAML file is not a shell: without
    this, ``output_dir: ~/runs`` made a folder named ``~``). A variable that is not set is refused by name."""
    out = os.path.expandvars(os.path.expanduser(value))
    unset = re.findall(r"\$\{?([A-Za-z_]\w*)", out)
    if unset:
        raise ValueError(f"config key {name!r} ({value!r}, in {source}) names the environment variable "
                         f"${unset[0]}, which is not set")  # fmt: skip
    return out


# 2: mask_type None means the recipe's own masks (format 1 wrote "random" for every recipe, whatever it drew)
# 3: an I-JEPA run exports its target encoder; 4: decay_exempt (the runs before it exempted the tokens)
CONFIG_FORMAT = 4


def migrate_saved_config(saved: dict, config_format: int | None) -> dict:
    """A config written by a run (a checkpoint's, or its config.yaml) in an older format, read as this one: format 1's
    ``mask_type: random`` was its default for every recipe, the recipe's own masks (None now); before format 3 an
    I-JEPA run exported its context encoder (now the target encoder by default): a resumed one keeps exporting the
    same encoder (``export_encoder: context``), so its kNN series and encoder.safetensors do not switch mid-run;
    before format 4 every run exempted the class, mask and position tokens from weight decay (``decay_exempt:
    tokens``): a resumed one keeps its optimizer's groups."""
    fmt = config_format or 1
    if fmt < 2 and saved.get("mask_type") == "random":
        saved = {**saved, "mask_type": None}
    if fmt < 3 and str(saved.get("model", "")).startswith("ijepa_"):
        saved = {**saved, "model_args": {"export_encoder": "context", **(saved.get("model_args") or {})}}
    if fmt < 4 and "decay_exempt" not in saved:
        saved = {**saved, "decay_exempt": "tokens"}
    return saved


class _RepeatedKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a mapping that repeats a key (``epochs: 3`` ... ``epochs: 5``; a second
    ``model_args:`` that replaced a recipe's): config keys are compared as their option names (``batch-size`` is
    ``batch_size``)."""

    def flatten_mapping(self, node):
        # each mapping is checked as written, once, before PyYAML merges into it (<<: *anchor puts the merged keys,
        # which the mapping's own override, among its pairs: in place, so a node merged elsewhere first is seen so)
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                name = key.replace("-", "_") if isinstance(key, str) else key
                try:
                    if name in seen:
                        at = key_node.start_mark.line + 1
                        raise _RepeatedKey(f"{key!r} (line {seen[name]} and line {at})")
                    seen[name] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: the constructor says so
                    break
        super().flatten_mapping(node)


def load_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping of config keys; errors name the file, and a key given twice (YAML keeps the last without
    a word). A run's own config.yaml of an older format is migrated (``migrate_saved_config``); ``config_format`` is
    not a config key."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"config file {str(p)!r} is a folder: name one of its YAML files")
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        lines = p.read_text().splitlines()
        line = lines[mark.line] if mark is not None and 0 <= mark.line < len(lines) else ""
        hint = ("; a value that starts with '{' (a pattern of shards) is read as a YAML mapping: put it in quotes, "
                "data_path: '{/a,/b}/train-*.tar'" if re.search(r":\s*\{", line) else "")  # fmt: skip
        raise ValueError(f"config file {str(p)!r} is not valid YAML: {e}{hint}") from e
    except _RepeatedKey as e:
        raise ValueError(f"config file {str(p)!r} gives {e} twice (YAML would keep the last one silently): give "
                         "it once") from None  # fmt: skip
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    config_format = data.pop("config_format", None)
    if config_format is not None or _written_by_a_run(data):  # (a hand-written file says what it means: one with
        data = migrate_saved_config(data, config_format)  # a resume: key, as README's job scripts, is not migrated)
    return data


def _written_by_a_run(data: dict) -> bool:
    """A run's config.yaml from before ``config_format`` was written: save_yaml wrote every key, ``resume: null``."""
    return data.get("resume", "") is None and {"model", "seed", "epochs", "output_dir", "data_path"} <= data.keys()


def save_yaml(cfg: PretrainConfig, path: str | Path, provenance: dict | None = None) -> None:
    """Writes the resolved config; ``resume`` is left out, so passing the file back with --config starts (or is
    refused as) a new run instead of silently resuming one. ``provenance`` (``fastmim.provenance.run_provenance``:
    versions, the loader the run read with) follows as comments."""
    d = cfg.to_dict()
    d["resume"] = None
    d["config_format"] = CONFIG_FORMAT
    from fastmim.train.checkpoint import atomic_write

    text = yaml.safe_dump(d, sort_keys=False)
    if provenance:
        from fastmim.provenance import as_comments

        text += as_comments(provenance)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # (a full disk leaves the last one whole)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m fastmim.pretrain",
        description="Masked image modeling pretraining: MAE, PixMIM, SimMIM, A2MIM, MaskFeat, data2vec 2.0, I-JEPA "
        "and FCMAE (--model; fastmim.list_models() lists them). With no arguments: a small MAE on built-in photos.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", action="append", default=None, metavar="FILE",
                        help="YAML file of config keys; flags override it (repeatable: later files override earlier "
                        "ones, model_args mappings merge)")  # fmt: skip
    hints = typing.get_type_hints(PretrainConfig)
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        flags = (flag, "--mask") if f.name == "mask_type" else (flag,)
        base, _ = _base_type(hints[f.name])
        text = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")  # argparse formats help
        kw = dict(default=argparse.SUPPRESS, help=text)
        if base is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "resume":
            parser.add_argument(*flags, nargs="?", const="auto", metavar="CHECKPOINT", **kw)
        else:
            if base is dict:  # (repeatable: the pairs of every one, a key given twice refused, not the last kept)
                kw["help"] = kw["help"].replace(" (default:", "; repeatable (default:", 1)
                parser.add_argument(*flags, dest=f.name, action="append", metavar="KEY=VALUE[,...]", **kw)
            else:
                if f.name in ("data_path", "eval_data"):  # (a second path: a pattern the shell expanded)
                    kw["action"] = Once
                parser.add_argument(*flags, dest=f.name, type=str, metavar=base.__name__.upper(), **kw)
    return parser


def cli_overrides(argv: list[str] | None) -> tuple[list[str], dict]:
    """(the --config paths in order, the flags the user actually gave) from a command line; repeated --model-args
    flags are folded in order: each one's pairs added to the ones before (a key two of them give is refused), one
    that clears (none, "") clears what came before it."""
    ns = vars(build_parser().parse_args(argv))
    for k, v in ns.items():
        if isinstance(v, list) and k != "config":
            ns[k] = _fold_mappings(k, v)
    expand_home(ns, PATH_KEYS)
    return [os.path.expanduser(p) for p in ns.pop("config", None) or []], ns
