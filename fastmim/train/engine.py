"""The training loop: per-step lr, AMP, gradient accumulation, DDP, logging, checkpoints and resume mid-epoch."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastmim import _ext
from fastmim.config import CONFIG_FORMAT, PretrainConfig, save_yaml
from fastmim.data import decode_indices
from fastmim.data.dali import DaliDecodeError
from fastmim.data.folder import BadImageError
from fastmim.data.sampler import ResumableDistributedSampler
from fastmim.masking import Masks
from fastmim.train import checkpoint as ckpt
from fastmim.train.distributed import DistInfo, all_reduce_mean, barrier
from fastmim.train.logger import MetricsLogger
from fastmim.train.optim import lr_at, param_names, regroup_state, saved_param_names, set_lr, set_weight_decay, wd_at
from fastmim.train.preempt import Preempted, PreemptionWatch, training_finished
from fastmim.train.progress import progress_bar
from fastmim.train.step import TrainStep
from fastmim.train.visualize import NotPixels, reconstruction_grid, save_grid

MIN_LOSS_SCALE = 1e-4  # fp16: a scale below this (fairseq's --min-loss-scale) means every step is skipped


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp, or None for full fp32."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _masked_forward(
    model: nn.Module,
    ids: bool,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    num_hidden: int | None,
    targets: torch.Tensor | None = None,
    target_tokens: int | None = None,
) -> torch.Tensor:
    """The loss of one micro-batch; the masks' index form (``ids``: for models that drop the masked tokens) is made
    here, inside a captured step. ``targets``: the target blocks of a multi-block mask (I-JEPA), ``target_tokens``
    the smallest one's count where the host knows it."""
    info = Masks(mask, num_hidden=num_hidden).info(ids=ids)
    if targets is None:
        return model(imgs, mask=info)[0]
    tokens = {} if target_tokens is None else {"target_tokens": target_tokens}  # (a model that takes it)
    return model(imgs, mask=info, targets=targets, **tokens)[0]


def _cpu_count(mask: torch.Tensor) -> int | None:
    """The hidden count shared by every sample of a CPU mask batch (drawn in a loader worker), None if they differ:
    read here, it costs no device sync (I-JEPA's batch-shared masks have one count per batch)."""
    if mask.device.type != "cpu" or not mask.numel():
        return None
    counts = mask.flatten(1).sum(1)
    return int(counts[0]) if bool((counts == counts[0]).all()) else None


@dataclass
class Position:
    """Where the run is: ``epoch`` in progress, ``batch`` loader batches of it done, ``step`` optimizer steps."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


def _duration(seconds: float) -> str:
    """3h05m, 12m30s, 45s (a run's time left, in the progress bar)."""
    s = int(min(seconds, 99 * 86400))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _seconds(fn) -> float:
    """Runs ``fn()``; its wall-clock seconds (what a logged img/s leaves out)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Trainer:
    cfg: PretrainConfig
    info: DistInfo
    device: torch.device
    model: nn.Module  # what the step calls: possibly DDP- and compile-wrapped
    raw_model: nn.Module  # the plain recipe model (MaskedAutoencoderViT, FCMAE)
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    sampler: object
    dataset: object
    output_dir: Path
    lr: float
    amp_dtype: torch.dtype | None = None
    pos: Position = field(default_factory=Position)
    scaler: torch.amp.GradScaler | None = None
    monitor: object | None = None  # --eval-data: the kNN monitor (fastmim.eval.monitor.KnnMonitor), on rank 0
    provenance: dict | None = None  # fastmim.provenance.run_provenance: into checkpoints and config.yaml

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._bar = None  # the epoch's progress bar while fit() runs
        self.after_next_save: list = []  # rank 0's calls once the next checkpoint is in place (_checkpoint_written)
        # a whole epoch's batches, read before a resume starts the sampler mid-epoch (the loader is shorter then)
        self.loader_batches = len(self.loader)
        self.batches_per_epoch = (self.loader_batches // self.cfg.accum_iter) * self.cfg.accum_iter
        self.steps_per_epoch = self.batches_per_epoch // self.cfg.accum_iter
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"one epoch has {len(self.loader)} batches, fewer than --accum-iter {self.cfg.accum_iter}: "
                "lower --accum-iter or --batch-size"
            )
        self.schedule_steps = self.total_steps = self.steps_per_epoch * self.cfg.epochs
        if self.cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, self.cfg.max_steps)
        self.logger = MetricsLogger(self.output_dir, enabled=self.info.is_main)
        self.preempt: PreemptionWatch | None = None  # (fit() installs it: a save outside fit() has none)
        self.images_per_step = self.cfg.batch_size * self.cfg.accum_iter * self.info.world_size
        # each sample's mask from (seed, epoch, dataset index): the same whatever the workers, ranks or restarts
        self.masks = self.raw_model.mask_strategy(seed=self.cfg.seed)
        # MAE and FCMAE drop the masked tokens (index form: one count for the batch); SimMIM, MaskFeat and A2MIM keep
        # every token and take any count per sample (MaskFeat's BEiT masks stop short of the target)
        drops_tokens = getattr(self.raw_model, "drops_tokens", True)
        self.after_step = getattr(self.raw_model, "after_step", None)
        self.skipped_files = 0  # unreadable samples replaced (--skip-bad-files) by this rank (rank 0: + before resume)
        self.epoch_order: dict | None = None  # an epoch begun on another layout (ResumableDistributedSampler.set_order)
        self.saved_step = 0  # the step of the last checkpoint (of this run or the one it resumes)
        if hasattr(self.raw_model, "set_total_steps"):  # a schedule over the whole run (I-JEPA's teacher momentum):
            # over the configured epochs, as the learning rate's; --max-steps stops a run early, it does not shorten it
            self.raw_model.set_total_steps(self.schedule_steps)
        if self.cfg.cuda_graph and drops_tokens and self.masks.exact_hidden is None:
            raise ValueError(
                f"--cuda-graph needs masks that hide the same number of patches in every sample (a graph has fixed "
                f"shapes); the masks of --mask-type {self.cfg.mask_type or 'the recipe'} vary it"
            )
        from fastmim.train import fsdp

        self.sharded = fsdp.is_sharded(self.raw_model)  # --fsdp: FSDP2 shards, sharded checkpoints
        self.no_pictures = False  # set when the model's predictions turn out not to be pixels (visualize)
        # I-JEPA's forward takes the smallest target block's count from the host (no sync to count it)
        self._takes_target_tokens = "target_tokens" in inspect.signature(self.raw_model.forward).parameters
        ddp = self.info.enabled and hasattr(self.model, "no_sync")
        no_sync = self.model.no_sync if ddp else None
        if self.sharded:
            no_sync = functools.partial(fsdp.no_gradient_sync, self.raw_model)
        # the step holds the model, not the trainer: no reference cycle keeps a finished trainer (and its loader, whose
        # DALI pipeline maps the image files) alive until the garbage collector runs
        self.step = TrainStep(
            functools.partial(_masked_forward, self.model, drops_tokens), self.raw_model.parameters(), self.optimizer,
            self.scaler, device=self.device,
            accum_iter=self.cfg.accum_iter, clip_grad=self.cfg.clip_grad, amp_dtype=self.amp_dtype,
            graph=self.cfg.cuda_graph, warmup=11 if ddp else 3,  # DDP settles its buckets in its first iterations
            no_sync=no_sync,
        )  # fmt: skip

    # --- state ---
    def _from_every_rank(self, obj) -> list:
        """[rank 0's obj, rank 1's, ...] (a collective: every rank calls it)."""
        objs = [None] * self.info.world_size if self.info.enabled else [obj]
        if self.info.enabled:
            dist.all_gather_object(objs, obj)
        return objs

    def state_dict(self) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "optimizer_params": param_names(self.raw_model, self.optimizer), **self.run_state()}  # fmt: skip

    def run_state(self) -> dict:
        """Everything of a checkpoint but the weights and the optimizer's state (a collective)."""
        return {
            "scaler": self.scaler.state_dict(),
            "epoch": self.pos.epoch,
            "batch": self.pos.batch,
            "step": self.pos.step,
            "world_size": self.info.world_size,
            "layout": self.data_layout(),
            "epoch_order": self.epoch_order if (self.epoch_order or {}).get("epoch") == self.pos.epoch else None,
            "rng": self._from_every_rank(ckpt.rng_state()),
            "loader": self._from_every_rank(self.loader.state_dict()) if hasattr(self.loader, "state_dict") else None,
            "skipped_files": int(sum(self._from_every_rank(self.skipped_files))),  # so far, all ranks (collective)
            "config": self.cfg.to_dict(),
            "config_format": CONFIG_FORMAT,
            "fastmim_version": __import__("fastmim").__version__,
            "provenance": self.provenance,
            "data_digest": self.data_digest(),
            "monitor_pool": getattr(self.monitor, "pool", None),  # (the kNN monitor's feature, as resolved)
        }

    def data_digest(self) -> str | None:
        """A hash of the data set's file names, in the order samples are indexed, relative to their common folder:
        the same files wherever the folder is (copied elsewhere), and the same after a file is replaced at its path
        (how a bad file is fixed; a tar sample's id without its offset, which a replaced member moves); another after
        a file is added, removed or renamed. None for a data set without a file list."""
        if not hasattr(self, "_data_digest"):
            from fastmim.data.folder import dataset_digest

            self._data_digest = dataset_digest(self.dataset)
        return self._data_digest

    def data_layout(self) -> dict:
        """What positions are counted in: a change of any of these moves batch and step boundaries (the seed deals
        each epoch's order: changed inside an epoch, the rest of it is dealt from the order the run began it in)."""
        return {
            "seed": self.cfg.seed,
            "batch_size": self.cfg.batch_size,
            "accum_iter": self.cfg.accum_iter,
            "world_size": self.info.world_size,
            "dataset_size": len(self.dataset),
            "loader_batches": self.loader_batches,
        }  # fmt: skip (torch pads a rank's share, DALI drops the rest)

    def load_state_dict(self, state: dict) -> None:
        from fastmim.train import fsdp

        # the config's settings win over the saved ones (a changed --weight-decay; --cuda-graph's tensor learning rate
        # and capturable optimizer); the learning rate is set from the schedule before every step anyway
        fresh_hparams = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            if "dcp" in state:  # a sharded checkpoint, loaded into this run's shards or whole weights
                fsdp.load_dcp_into(Path(state["dcp"]), self.raw_model, self.optimizer, state.get("shard_crc"))
            elif self.sharded:  # a single-file checkpoint, cut into this run's shards
                fsdp.load_full_state(self.raw_model, self.optimizer, state["model"], state["optimizer"],
                                     saved_param_names(state, self.raw_model))  # fmt: skip
            else:
                self.raw_model.load_state_dict(state["model"])
                saved = saved_param_names(state, self.raw_model)
                now = param_names(self.raw_model, self.optimizer)
                self.optimizer.load_state_dict(regroup_state(state["optimizer"], saved, self.optimizer, now))
        except (RuntimeError, KeyError) as e:
            first = " ".join(str(e).split("\n")[:3]).strip()  # not the whole key list
            raise ValueError(f"the checkpoint does not fit model {self.cfg.model!r} as configured (a changed "
                             f"--decoder-embed-dim, --decoder-depth or --model-args? drop them to continue the run): "
                             f"{first[:300]}") from e  # fmt: skip
        ckpt.weights_check(self.state_sums(), state)  # a damaged file or shard: refused, not trained on
        for group, hp in zip(self.optimizer.param_groups, fresh_hparams, strict=True):
            group.update(hp)
            if group.get("fused") or group.get("capturable"):  # their step counts live with the parameters
                for p in group["params"]:  # (a checkpoint of a foreach optimizer left them on the CPU)
                    st = self.optimizer.state.get(p, {})
                    if isinstance(st.get("step"), torch.Tensor):
                        st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        if state["scaler"] and self.scaler.is_enabled():  # empty when saved without fp16 (a changed --amp)
            self.scaler.load_state_dict(state["scaler"])
        self.pos = Position(state["epoch"], state["batch"], state["step"])
        self._check_same_run_inputs(state)
        # the run's count continues (rank 0 carries what every rank had skipped: the sum is right on any world size)
        self.skipped_files = int(state.get("skipped_files", 0)) if self.info.is_main else 0
        layout = self.data_layout()
        saved_layout = state.get("layout")
        was_seed = (state.get("config") or {}).get("seed")
        if saved_layout is not None and "seed" not in saved_layout and isinstance(was_seed, int):
            saved_layout = {**saved_layout, "seed": was_seed}  # (a checkpoint from before the seed was in its layout)
        if saved_layout is not None:  # keys added since a checkpoint was written are not compared
            layout = {k: v for k, v in layout.items() if k in saved_layout}
        self.epoch_order = state.get("epoch_order")
        if saved_layout != layout:
            was = self.pos.step
            if self.pos.batch != 0:
                self._reshard_epoch(state, saved_layout, layout)
            else:  # at an epoch boundary the position converts exactly: steps are counted in the new units from here
                self.pos.step = self.pos.epoch * self.steps_per_epoch
            diff = [f"{k} {(saved_layout or {}).get(k)} -> {v}" for k, v in layout.items()
                    if (saved_layout or {}).get(k) != v]  # fmt: skip
            derived = [d for d in diff if not d.startswith("loader_batches")]  # (follows the others)
            changed = ", ".join(derived or diff)
            self._convert_step_counts(was, changed)
            self._say_lr_change(saved_layout)
        self.saved_step = self.pos.step  # (in this run's step units)
        if hasattr(self.loader, "load_state_dict"):  # DALI: its reader position and random state
            states = state.get("loader")
            fits = bool(states) and len(states) == self.info.world_size and saved_layout == layout
            problem = self.loader.state_problem(states[self.info.rank]) if fits else None
            if fits and problem is None:
                self.loader.load_state_dict(states[self.info.rank])
            elif self.pos.batch != 0 and problem:  # the pipeline changed (--crop): its state cannot be restored
                end = (self.pos.epoch + 1) * self.steps_per_epoch
                raise ValueError(
                    f"the checkpoint stopped mid-epoch and {problem}: resume with the run's crop to finish the epoch "
                    f"(--max-steps {end} stops at its end), then change it"
                )
            elif self.pos.batch != 0:
                raise ValueError(
                    "the checkpoint stopped mid-epoch without the DALI loader's state (saved with the torch loader "
                    "or another layout): resume with --loader torch, or from an end-of-epoch checkpoint"
                )
            else:  # an epoch boundary: DALI starts the epoch from its own seeded state
                self.loader.start_at(self.pos.epoch)
        elif state.get("loader") and self.pos.batch != 0:
            raise ValueError(
                "the checkpoint stopped mid-epoch reading with DALI (its state is in the checkpoint); the torch loader "
                "would see other samples for the rest of the epoch: resume with --loader dali, or from an "
                "end-of-epoch checkpoint"
            )
        if state.get("world_size") == self.info.world_size:
            ckpt.set_rng_state(state["rng"][self.info.rank])
        else:  # a different world size reshards the data anyway; keep ranks distinct
            torch.manual_seed(self.cfg.seed + self.info.rank + 7919 * self.pos.step)
            if self.info.is_main:
                n, was = self.info.world_size, state.get("world_size")
                print(f"note: resuming on {n} process{'es' * (n != 1)}, saved on {was}")

    def _check_same_run_inputs(self, state: dict) -> None:
        """What would make the resumed run read other data or draw other masks than the saved one did: its data set's
        files changed (samples are indexed in the sorted file list, so a file added, removed or renamed gives most
        indices other images): refused inside an epoch, said at its end; the masks' generator changed (fastmim's
        native extension, whose C++ generator draws the block, uniform and multi-block masks, present in one and not
        the other): said."""
        saved = state.get("data_digest")
        now = self.data_digest()
        layout = state.get("layout") or {}
        size = layout.get("dataset_size")
        what = f"{size} images then, {len(self.dataset)} now" if size is not None else f"{len(self.dataset)} now"
        how = ("a file added, removed or renamed; or the data path now a folder's scan list, which leaves out the "
               "files that failed the scan, or the other way round")  # fmt: skip
        if saved is not None and now is not None and saved != now:
            if self.pos.batch != 0:
                saved_steps = layout.get("loader_batches", 0) // max(layout.get("accum_iter", 1), 1)
                end = (self.pos.epoch + 1) * (saved_steps or self.steps_per_epoch)  # (the saved run's steps)
                raise ValueError(
                    f"the data set's files changed since the checkpoint ({what}: {how}), which stopped inside epoch "
                    f"{self.pos.epoch + 1}: the rest of that epoch would read other images at its positions. Put the "
                    f"files back to finish the epoch (--max-steps {end} stops at its end), or resume from an "
                    "end-of-epoch checkpoint"
                )
            if self.info.is_main:
                print(f"note: the data set's files changed since the checkpoint ({what}: {how}); from this epoch on "
                      "the samples are the new file list's", flush=True)  # fmt: skip
        dali = hasattr(self.loader, "load_state_dict")  # (DALI restores its own state: the same crops)
        if "provenance" not in state and self.info.is_main:  # a checkpoint of an earlier fastmim
            if saved is None and size is not None and size != len(self.dataset) and self.pos.batch == 0:
                newly = sum(f.lower().endswith((".jpe", ".jfif")) for f in getattr(self.dataset, "files", []))
                print(f"note: the data set has {len(self.dataset)} images, {size} when the checkpoint was written"
                      + (f" (this fastmim reads .jpe and .jfif files too: {newly} here)" if newly else "")
                      + "; from this epoch on the samples are the new file list's", flush=True)  # fmt: skip
            if not dali:  # what this one draws differently from here on
                rest = f"the rest of epoch {self.pos.epoch + 1}" if self.pos.batch else "the epochs from here"
                print(f"note: this checkpoint was written by an earlier fastmim: {rest} will have other crops and "
                      "flips than it would have drawn (the augmentation seeds are a hash of seed, epoch and index "
                      "now), the masks the same", flush=True)  # fmt: skip
        monitored = (state.get("config") or {}).get("eval_data")  # (the run had a monitor before this resume)
        pool = getattr(self.monitor, "pool", None)
        if pool == "avg" and monitored and "monitor_pool" not in state and self.cfg.eval_pool == "auto":
            # a data2vec 2.0 run monitored before the monitor took its recipe's feature (the evaluation's)
            print("note: the kNN monitor now takes the token mean of a data2vec 2.0 encoder with --eval-pool auto, "
                  "as python -m fastmim.eval does; this run's earlier knn_top1 rows are of the class token "
                  "(--eval-pool cls keeps to it)", flush=True)  # fmt: skip
        was = (state.get("provenance") or {}).get("native_ext")
        if was is not None and was != _ext.available() and self.masks.has_cpp and self.info.is_main:
            if was:
                why = f"fastmim's native extension drew them, and it does not load here ({_ext.load_error})"
            else:
                why = "torch drew them (the native extension did not load then), and the extension's C++ generator does"
            print(f"note: the {self.masks.name} masks from here on differ from the ones this run would have drawn (the "
                  f"same distribution): {why}", flush=True)  # fmt: skip

    def lr_of(self, step: int, epochs: int | None = None, milestones: tuple[float, ...] | None = None) -> float:
        """The learning rate the schedule sets for ``step`` (of this run's units); ``epochs``: planned over that many
        epochs instead (what a resume that changed --epochs re-planned)."""
        cfg = self.cfg
        if milestones is None:
            milestones = cfg.milestone_epochs() if cfg.lr_schedule == "multistep" else ()
        return lr_at(step / self.steps_per_epoch, self.lr, cfg.min_lr, cfg.warmup_epochs, epochs or cfg.epochs,
                     cfg.warmup_lr, milestones, cfg.lr_gamma)  # fmt: skip

    def _say_lr_change(self, saved: dict | None) -> None:
        """The peak lr follows the images per step (``--blr`` x images / 256) unless ``--lr`` fixes it: a resume on
        other processes, batch size or accumulation changes it, which is said with the way to keep the run's."""
        keys = ("batch_size", "accum_iter", "world_size")
        if self.cfg.lr is not None or not saved or not all(isinstance(saved.get(k), int) for k in keys):
            return
        before = saved["batch_size"] * saved["accum_iter"] * saved["world_size"]
        if before != self.images_per_step and self.info.is_main:
            was = self.lr * before / self.images_per_step
            print(f"note: the peak lr follows the images per step ({before} -> {self.images_per_step}, --blr "
                  f"{self.cfg.blr:g} x images / 256): {was:.4g} -> {self.lr:.4g}; --lr {was:.4g} keeps the run's",
                  flush=True)  # fmt: skip

    def _convert_step_counts(self, was: int, changed: str = "") -> None:
        """After a layout change moved the step count from ``was`` to this run's units: an EMA teacher's update count
        follows (its momentum schedule runs over the run's steps, as the learning rate does), and a --max-steps that
        now means something else is said (with what changed: ``changed``)."""
        from fastmim.targets.teacher import EMATeacher

        for m in self.raw_model.modules():
            if isinstance(m, EMATeacher):
                m.updates.fill_(self.pos.step)
        if self.pos.step != was and self.info.is_main:  # (said always: metrics.jsonl's and the encoder's steps follow)
            later = " (metrics.jsonl's rows from here carry the new numbers" + (
                ", and a row whose step goes back starts its plot over there)" if self.pos.step < was else ")"
            )
            capped = (f"; --max-steps {self.cfg.max_steps} counts steps of {self.images_per_step} images"
                      if self.cfg.max_steps is not None else "")  # fmt: skip
            print(f"note: step {was} of the saved run is step {self.pos.step} now: an epoch is "
                  f"{self.steps_per_epoch} steps ({changed or 'another layout'}){later}{capped}",
                  flush=True)  # fmt: skip

    def _reshard_epoch(self, state: dict, saved: dict | None, layout: dict) -> None:
        """A checkpoint from inside an epoch, resumed on another layout (processes, batch size, accumulation): the
        torch loader's epoch order is known, so the samples the stopped run had not reached are dealt over this run's
        ranks (ResumableDistributedSampler.set_order) and the epoch goes on from there; the position is counted in
        this run's units. Refused for DALI (its pipeline's state is per process) and for another data set."""
        e = self.pos.epoch
        why = None
        if saved is None:
            why = "it does not record its layout"
        elif saved.get("dataset_size") != layout["dataset_size"]:
            why = f"the data set had {saved.get('dataset_size')} images, now {layout['dataset_size']}"
            newly = [f for f in getattr(self.dataset, "files", []) if f.lower().endswith((".jpe", ".jfif"))]
            if "provenance" not in state and newly:  # (read since: an earlier fastmim's run left them out)
                end = (e + 1) * (saved.get("loader_batches", 0) // max(saved.get("accum_iter", 1), 1))
                fix = ("finish the epoch with that fastmim" if ":" in newly[0] and ".tar:" in newly[0] else
                       "rename them (add .hold, say) to finish the epoch")  # fmt: skip
                why += (f"; this fastmim reads .jpe and .jfif files too ({len(newly)} here), which the one that wrote "
                        f"the checkpoint left out: {fix} (--max-steps {end} stops at its end)")  # fmt: skip
        elif state.get("loader") and {k for k, v in layout.items() if saved.get(k) != v} == {"seed"}:
            end = (e + 1) * self.steps_per_epoch
            why = (f"DALI's file list is shuffled with the seed: --seed {saved['seed']} finishes the epoch, "
                   f"--max-steps {end} stops at its end, then change it")  # fmt: skip
        elif state.get("loader"):
            why = "DALI's pipeline position is per process"
        elif not isinstance(self.sampler, ResumableDistributedSampler):
            why = "this run reads with DALI, whose epoch order is its own: resume with --loader torch"
        if why is not None:
            raise ValueError(
                f"the checkpoint stopped mid-epoch with seed, batch size, accumulation, processes and dataset {saved}; "
                f"now they are {layout}, and the rest of that epoch cannot be dealt anew ({why}). Resume mid-epoch "
                "with the same ones, or from a checkpoint saved at the end of an epoch."
            )
        order = state.get("epoch_order") if (state.get("epoch_order") or {}).get("epoch") == e else None
        stages, offset = (order["stages"], order["offset"]) if order else ([], 0)
        consumed = (self.pos.batch * saved["batch_size"] - offset) * saved["world_size"]
        stages = [*stages, [saved["world_size"], consumed]]
        n = layout["dataset_size"]
        rest = len(ResumableDistributedSampler.rest(list(range(n)), stages))
        left = rest // self.info.world_size
        accum = self.cfg.accum_iter
        batches = left // self.cfg.batch_size // accum * accum  # whole optimizer steps of this run
        start = self.batches_per_epoch - batches
        seed = (order or {}).get("seed", saved.get("seed", self.cfg.seed))  # (the seed that dealt the epoch)
        self.epoch_order = {"epoch": e, "stages": stages, "offset": start * self.cfg.batch_size, "seed": seed}
        self.pos.batch, self.pos.step = start, e * self.steps_per_epoch + start // accum
        if self.info.is_main and seed != self.cfg.seed:
            print(f"note: the rest of epoch {e + 1} is dealt from seed {seed}'s order (the samples it has not "
                  f"reached); seed {self.cfg.seed} deals the epochs after it", flush=True)  # fmt: skip
        if self.info.is_main and any(saved.get(k) != v for k, v in layout.items() if k != "seed"):
            w = self.info.world_size
            dropped = rest - batches * self.cfg.batch_size * w
            print(f"note: resumed inside epoch {e + 1} on another layout ({saved} then): the {rest} samples it had "
                  f"not reached are dealt over this run's {w} process(es), {batches} batches each"
                  + (f" ({dropped} left out to make whole steps)" if dropped else ""), flush=True)  # fmt: skip

    def _check_finite(self, value: float, what: str) -> None:
        """Stops the run, before anything is saved, when ``what`` (the loss, the weights) is not finite."""
        if not math.isfinite(value):
            tips = ["--amp bf16 instead of fp16"] if self.amp_dtype == torch.float16 else []
            tips.append("a lower --lr" if self.cfg.lr is not None else "a lower --blr")
            tips.append("a lower --clip-grad" if self.cfg.clip_grad else "--clip-grad (e.g. 3.0)")
            err = FloatingPointError(
                f"{what} became {'non-finite' if what == 'the weights' else value} by step {self.pos.step} "
                f"(in epoch {self.pos.epoch + 1}); stopping without saving, so {self._kept()}. "
                f"Try {', '.join(tips[:-1])}{',' if len(tips) > 2 else ''} or {tips[-1]}."
            )
            # the all-reduced loss, or the sharded weights' all-reduced sums: every rank stops alike (said once);
            # a DDP rank's own weights may differ from the others': it says so itself
            err.same_on_every_rank = what == "the loss" or self.sharded
            raise err

    def _kept(self) -> str:
        """What a stop without saving leaves: the last checkpoint, or none yet."""
        if ckpt.run_checkpoint(self.output_dir) is not None:
            return f"the last checkpoint in {self.output_dir} is intact"
        return f"{self.output_dir} holds no checkpoint yet (run again there with other settings: it begins afresh)"

    def _optimizer_steps(self) -> int | None:
        """The optimizer steps taken so far (AdamW's own count: a step the fp16 GradScaler skipped is not one; 0
        before its first); None for an optimizer that keeps no count. A host read, at a logged step only."""
        kept = False
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if state:
                    kept = True
                    if state.get("step") is not None:
                        return int(state["step"])
        return None if kept else 0

    def _loss_scale_row(self, row: dict, steps: int) -> FloatingPointError | None:
        """fp16: the GradScaler's scale and the steps it skipped (inf/NaN gradients) since the last row, in ``row``;
        for a run whose scale has collapsed (the steps skipped over and over) the error that stops it with advice,
        as fairseq's minimum loss scale does, raised once the row is logged; one whose steps since the last row were
        all skipped is said."""
        scale = float(self.scaler.get_scale())
        row["loss_scale"] = scale
        taken, skipped = self._optimizer_steps(), None
        if taken is not None and self._steps_taken is not None:
            skipped = row["skipped_steps"] = max(steps - (taken - self._steps_taken), 0)
        self._steps_taken = taken
        every = skipped is not None and steps and skipped == steps
        if scale < MIN_LOSS_SCALE:
            if every:
                said = (
                    f"the gradients were inf or NaN at every scale tried (the {steps} steps since the last row "
                    "were skipped: the weights did not move in them)"
                )
            else:
                said = "the steps keep being skipped for inf or NaN gradients" + (
                    f" ({skipped} of the {steps} since the last row)" if skipped else ""
                )
            err = FloatingPointError(
                f"the fp16 loss scale fell to {scale:g} by step {self.pos.step}: {said}; stopping without saving, "
                f"so {self._kept()}. Try --amp bf16, a lower {'--lr' if self.cfg.lr is not None else '--blr'} or "
                f"{'a lower ' if self.cfg.clip_grad else ''}--clip-grad."
            )
            err.same_on_every_rank = True  # (the gradients are all-reduced: every rank's scaler alike)
            return err
        if every and scale < 1 and self.info.is_main:  # (not the first steps' usual back-off from 65536: below 1,
            # over 16 steps in a row were skipped)
            print(f"note: the fp16 loss scaler skipped all {steps} steps since the last row (inf or NaN gradients; "
                  f"the scale is now {scale:g}): the weights did not move in them", flush=True)  # fmt: skip
        return None

    def _stop_after_save(self) -> None:
        """A stop signal's end of the run just after a save of this step (an epoch's end)."""
        self.logger.close()
        # saved: another stop signal while the run tears down (torchrun's agent sends one to every rank as the first
        # exits) changes nothing; it had replaced this stop by one "outside training, nothing new to save"
        training_finished()
        raise Preempted(self.pos.step, self.preempt.signame)

    def save(self) -> None:
        with self.preempt.saving_now() if self.preempt is not None else contextlib.nullcontext():
            if self.sharded:
                self._save_sharded()
            else:
                self._save_whole()
        self.saved_step = self.pos.step
        if self.info.is_main:
            self._drop_other_format()

    def _drop_other_format(self) -> None:
        """A run that switched --fsdp holds its earlier checkpoint in the other format: once this save has replaced
        it (a later step, as each save replaces the last of its own format), it is removed, not left as a stale
        full-size copy that every resume would have to step over. One of a later step (copied in), or one whose step
        cannot be read (a damaged file may still be resumed unchecked), is kept; a removal that fails is said, not
        raised (this rank alone does it, after the save)."""
        import shutil

        d = self.output_dir
        if self.sharded:
            mine, others = ckpt.DCP_NAME, [d / ckpt.CHECKPOINT_NAME]
        else:
            mine, others = ckpt.CHECKPOINT_NAME, [d / ckpt.DCP_NAME, d / f"{ckpt.DCP_NAME}.old"]
        for other in others:
            if not other.exists():
                continue
            step = ckpt.saved_step(other)
            if step < 0 or step > self.pos.step:
                continue
            try:
                shutil.rmtree(other) if other.is_dir() else other.unlink()
            except OSError as e:
                print(f"note: could not remove {other} (step {step}, replaced by this run's {mine}): {e}", flush=True)
                continue
            print(f"note: removed {other.name} (step {step}): this run's {mine} (step {self.pos.step}) replaces it",
                  flush=True)  # fmt: skip

    def state_sums(self) -> tuple[float, float, float, float]:
        """(sum, sum of absolute values) of the model's weights, then of the optimizer's state, in fp32, over every
        rank's shards when sharded: one reduction and one host sync. Saved with each checkpoint and compared after a
        resume loads it (``checkpoint.weights_check``)."""
        from fastmim.train import fsdp

        w = ckpt.weights_sums(fsdp.local(p) for p in self.raw_model.parameters())
        o = ckpt.weights_sums(fsdp.local(t) for t in ckpt.optimizer_tensors(self.optimizer))
        sums = torch.cat([w, o.to(w.device)])
        if self.sharded and self.info.enabled:
            dist.all_reduce(sums)
        return tuple(sums.tolist())

    def _save_whole(self) -> None:
        # a finite loss can still be followed by an update that makes weights non-finite (an infinite gradient)
        total, abs_total, optim_total, optim_abs = self.state_sums()
        self._check_finite(total, "the weights")  # one reduction, one host sync per save
        # data-parallel ranks hold the same weights bit for bit; a rank that drifted would be saved as if it had not
        sums = self._from_every_rank(total)  # collective
        if len(set(sums)) > 1:
            raise RuntimeError(
                f"the ranks' weights differ at step {self.pos.step} (sums per rank: {sums}); stopping without saving"
            )
        state = self.state_dict()  # collective: every rank takes part
        state["weights_sum_per_rank"] = sums
        state.update(
            weights_abs_sum=abs_total, optim_sum=optim_total, optim_abs_sum=optim_abs, sums_dtype=ckpt.SUMS_DTYPE
        )
        if self.info.is_main:
            ckpt.save_checkpoint(self.output_dir / ckpt.CHECKPOINT_NAME, state)
            self._checkpoint_written()
            self._save_encoder(self.raw_model.encoder_state_dict())
        barrier(self.info)

    def _checkpoint_written(self) -> None:
        """Rank 0, as soon as a checkpoint is in place: config.yaml says what it holds, and what waited for it (a
        resume's resumes.jsonl row) is written, before the encoder's file (a disk that fills there loses neither)."""
        save_yaml(self.cfg, self.output_dir / "config.yaml", self.provenance)
        while self.after_next_save:
            self.after_next_save.pop(0)()

    def _keep_missed_snapshot(self) -> None:
        """A run resumed at the end of an epoch --keep-every keeps (stopped between its save and its snapshot, or
        given --keep-every on this resume): the snapshot from encoder.safetensors, when that is this step's."""
        k = self.cfg.keep_every
        if not k or self.pos.epoch % k or (self.output_dir / ckpt.snapshot_name(self.pos.epoch)).exists():
            return
        try:
            from safetensors import safe_open

            with safe_open(str(self.output_dir / "encoder.safetensors"), "pt") as f:
                step = int((f.metadata() or {}).get("step", -1))
        except Exception:  # (none, or unreadable: no snapshot to make)
            return
        if step == self.pos.step:
            self._keep_encoder_snapshot()

    def _keep_encoder_snapshot(self) -> None:
        """--keep-every: the encoder.safetensors just saved at the end of an epoch, kept as
        ``encoder-epochNNNN.safetensors`` (a hard link where the file system allows, else a copy; put in place
        atomically, replacing one an earlier attempt of this run left). Each save writes encoder.safetensors anew, so
        the link keeps this epoch's weights."""
        import shutil

        src = self.output_dir / "encoder.safetensors"
        dst = self.output_dir / ckpt.snapshot_name(self.pos.epoch)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")  # (a killed copy's: removed at the next start)
        try:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        except OSError as e:  # (a full disk: the run goes on; its checkpoint is intact)
            print(f"note: could not keep the encoder snapshot {dst.name}: {e}", flush=True)
        finally:
            tmp.unlink(missing_ok=True)

    def _save_encoder(self, encoder_state: dict) -> None:
        meta = ckpt.encoder_metadata(self.raw_model, self.cfg.model, self.pos.step, self.cfg.img_size)
        ckpt.save_encoder(self.output_dir / "encoder.safetensors", encoder_state, meta)

    def _save_sharded(self) -> None:
        """--fsdp: every rank writes its shards into ``checkpoint.dcp/``; rank 0 the run's state beside them, the
        gathered ``encoder.safetensors`` and ``config.yaml``."""
        from fastmim.train import fsdp

        total, abs_total, optim_total, optim_abs = self.state_sums()
        self._check_finite(total, "the weights")  # the same value on every rank: all stop, or none
        meta = {**self.run_state(), "weights_sum": total, "weights_abs_sum": abs_total, "optim_sum": optim_total,
                "optim_abs_sum": optim_abs, "sums_dtype": ckpt.SUMS_DTYPE}  # fmt: skip
        fsdp.save_dcp(self.output_dir / ckpt.DCP_NAME, self.raw_model, self.optimizer, meta, self.info.is_main)
        whole = fsdp.full_model_state(self.raw_model)  # collective; the tensors on rank 0
        if self.info.is_main:
            self._checkpoint_written()
            self._save_encoder(self.raw_model.encoder_state_dict(whole))
        barrier(self.info)

    # --- loop ---
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def visualize(self) -> None:
        if not getattr(self.raw_model, "predicts_pixels", True) or self.no_pictures:  # MaskFeat predicts HOG
            return
        if not self.info.is_main and not self.sharded:  # (sharded: every rank takes part in the forward)
            return
        from fastmim.data.transforms import eval_transform

        n = len(self.dataset)
        idx = sorted({round(i * (n - 1) / 7) for i in range(8)}) if n > 1 else [0]
        tf = eval_transform(self.cfg.img_size)
        shown = []
        for i in idx:  # the pictures are for the eye: a file that cannot be read is skipped, not fatal
            try:
                shown.append(tf(self.dataset.load(i)))
            except BadImageError as e:
                print(f"reconstructions: one picture left out ({e.summary()})", flush=True)
        if not shown:
            return
        imgs = torch.stack(shown).to(self.device)
        # after a whole epoch: epoch_<epochs done>; a stop inside an epoch: step_<steps done>
        name = f"epoch_{self.pos.epoch:04d}.png" if self.pos.batch == 0 else f"step_{self.pos.step:07d}.png"
        try:
            with self.autocast():
                grid = reconstruction_grid(self.raw_model, imgs)
        except NotPixels as e:  # the pictures are for the eye: the run goes on without them
            self.no_pictures = True
            if self.info.is_main:
                print(f"note: no reconstruction pictures in this run: {e}", flush=True)
            return
        if self.info.is_main:
            save_grid(grid, self.output_dir / "reconstructions" / name)

    def evaluate_knn(self) -> None:
        """--eval-data: the kNN accuracy of the encoder as it is now, on rank 0 (the others wait), logged at this step
        (metrics.jsonl, TensorBoard) and printed."""
        if not self.cfg.eval_data:
            return
        whole = None
        if self.sharded:
            from fastmim.train import fsdp

            whole = fsdp.full_model_state(self.raw_model)  # collective; the tensors on rank 0
        if self.info.is_main:
            row = self.monitor(self.raw_model.encoder_state_dict(whole))
            self.knn_seconds += row["knn_s"]
            self.logger.log({"epoch": self.pos.epoch + self.pos.batch / self.batches_per_epoch, **row}, self.pos.step)
            print(f"kNN at step {self.pos.step} (epoch {self.pos.epoch}): top-1 {row['knn_top1']:.2f}%, top-5 "
                  f"{row['knn_top5']:.2f}% ({row['knn_s']:.1f} s)", flush=True)  # fmt: skip
        barrier(self.info)

    def _draw_masks(self, idx: torch.Tensor, epoch: int) -> Masks:
        """The batch's masks, drawn here (a loader whose workers do not draw them: DALI's). For a GPU, a strategy with
        a C++ generator draws on the CPU, counted there, and the masks are copied asynchronously: drawn on the GPU,
        its counts (an exact count's top-up, I-JEPA's truncation and target size) were each a host sync."""
        s = self.masks
        if self.device.type == "cuda" and s.impl == "auto" and s.has_cpp and _ext.available():
            return s(indices=idx, epoch=epoch, device="cpu")
        return s(indices=idx, epoch=epoch, device=self.device)

    def _bad_file_on_any_rank(self, bad: Exception | None) -> Exception | None:
        """DDP: whether any rank's batch failed to load (a flag over the CPU group at every batch: the ranks that
        loaded theirs would otherwise wait in the gradient all-reduce for one that stopped). Then every rank gets the
        failing rank's error, so all stop at this batch, checkpoint together and report the same file."""
        if not self.preempt.any_rank(bad is not None):
            return None
        lines = self.preempt.gather(None if bad is None else str(bad.summary() if hasattr(bad, "summary") else bad))
        rank, line = next((r, x) for r, x in enumerate(lines) if x is not None)
        if bad is None:
            bad = BadImageError(line, None)
        if self.info.is_main:
            print(f"rank {rank} could not load its batch: every rank stops at this batch", flush=True)
        return bad

    def _stop_on_bad_file(self, batch: int) -> None:
        """A file the loader (DALI or the torch loader) cannot decode: a checkpoint of the run so far (at a step
        boundary; under DDP every rank is here, at the same batch), so the run resumes once the file is replaced;
        inside an accumulation the last saved checkpoint stands."""
        if batch % self.cfg.accum_iter or self.pos.step == 0 or self.pos.step == self.saved_step:
            return
        if hasattr(self.loader, "unread_last_batch"):  # DALI: the ranks that loaded this batch give it back, so
            self.loader.unread_last_batch()  # that every rank's saved reader state is from before it
        self.save()
        if self.info.is_main:
            print(f"checkpointed at step {self.pos.step} before stopping on a file that cannot be decoded", flush=True)

    def fit(self) -> Position:
        """Trains to the end (or to --max-steps); raises ``Preempted`` after checkpointing when a SIGTERM or SIGUSR1
        arrives (``fastmim.train.preempt``)."""
        self.preempt = PreemptionWatch(self.info).install()
        try:
            pos = self._fit()
            training_finished()  # trained to the end and saved: a later stop signal asks for no requeue
            return pos
        finally:
            self.preempt.close()
            if self._bar is not None:  # (an error's line below the bar, not appended to it in a log: a bad file,
                self._bar.close()  # a non-finite loss, out of memory, ...)

    def _fit(self) -> Position:
        cfg = self.cfg
        if self.pos.step >= self.total_steps:
            if self.info.is_main:
                capped = self.total_steps < self.schedule_steps  # (by --max-steps)
                print(f"nothing to do: the run is at step {self.pos.step} of {self.total_steps}"
                      + (f" (--max-steps {cfg.max_steps}; the schedule has {self.schedule_steps}: --max-steps None "
                         "or a larger one trains on)" if capped else ""))  # fmt: skip
            return self.pos
        milestones = cfg.milestone_epochs() if cfg.lr_schedule == "multistep" else ()  # (cosine: none)
        self._steps_taken = self._optimizer_steps() if self.scaler.is_enabled() else 0  # (fp16's skipped steps)
        running = torch.zeros((), device=self.device)
        count, t_log, step_log = 0, time.perf_counter(), self.pos.step
        first_row = None  # (when and at which step this process logged its first row: run_eta's start)
        self.knn_seconds, t_start = 0.0, t_log
        if self.pos.step == 0:  # the baseline: the encoder as initialised
            t_log += _seconds(self.evaluate_knn)  # (img/s counts the steps' time: saves, pictures and kNN left out)
        elif self.pos.batch == 0 and self.info.is_main:  # resumed at an epoch's end: its snapshot, if it was missed
            self._keep_missed_snapshot()
        for epoch in range(self.pos.epoch, cfg.epochs):
            self.pos.epoch = epoch
            start = self.pos.batch
            if isinstance(self.sampler, ResumableDistributedSampler):  # stop where the run will (--max-steps)
                self.sampler.set_order(self.epoch_order)
                left = (self.total_steps - self.pos.step) * cfg.accum_iter - self.pos.batch % cfg.accum_iter
                stop = min(self.batches_per_epoch, start + left) * cfg.batch_size
                self.sampler.set_epoch(epoch, start * cfg.batch_size, stop)
            else:  # DALI reads ahead in its own pipeline
                self.sampler.set_epoch(epoch, start * cfg.batch_size)
            if hasattr(self.dataset, "set_epoch"):  # augmentation seeded per (seed, epoch, index): exact resume
                self.dataset.set_epoch(epoch)
            collate = getattr(self.loader, "collate_fn", None)
            if hasattr(collate, "set_epoch"):  # masks drawn in the workers: (seed, epoch, index)
                collate.set_epoch(epoch)
            bar = self._bar = progress_bar(
                total=self.batches_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not self.info.is_main, dynamic_ncols=True, mininterval=1.0,
            )  # fmt: skip
            data = iter(self.loader)
            for b in range(start, self.batches_per_epoch):
                try:
                    imgs, idx, *drawn = next(data)  # drawn: the masks, when the loader workers make them
                    bad = None
                except (DaliDecodeError, BadImageError) as e:
                    bad = e
                if self.info.enabled:  # every rank stops where any rank's batch failed (also with --skip-bad-files,
                    bad = self._bad_file_on_any_rank(bad)  # which raises when a file and its stand-ins all fail)
                if bad is not None:
                    self._stop_on_bad_file(b)
                    bad.resumable = ckpt.run_checkpoint(self.output_dir) is not None  # what the error can advise
                    bad.saved_step, bad.steps_lost = self.saved_step, self.pos.step - self.saved_step
                    raise bad
                if self.cfg.skip_bad_files:  # stand-ins for unreadable samples come as -1 - index: counted
                    idx, stand_ins = decode_indices(idx)
                    self.skipped_files += stand_ins
                if drawn:  # the mask, and the target blocks of a multi-block mask
                    masks = Masks(drawn[0], targets=drawn[1] if len(drawn) > 1 else None,
                                  num_hidden=self.masks.exact_hidden or _cpu_count(drawn[0]))  # fmt: skip
                else:
                    masks = self._draw_masks(idx, epoch)
                micro = b % cfg.accum_iter
                lr_now = self.lr_of(self.pos.step, milestones=milestones)
                if micro == 0:
                    set_lr(self.optimizer, lr_now)
                    if cfg.weight_decay_end is not None:
                        at = self.pos.step / self.steps_per_epoch
                        set_weight_decay(self.optimizer, wd_at(at, cfg.weight_decay, cfg.weight_decay_end, cfg.epochs))
                last_micro = micro == cfg.accum_iter - 1
                # a graph-mode step copies the images into its buffers itself (pinned host memory: asynchronously);
                # the masks go pinned in every mode (drawn here on the CPU, they are not pinned yet), I-JEPA's
                # smallest target block counted on the host on the way (Masks.to)
                if not cfg.cuda_graph:
                    imgs = imgs.to(self.device, non_blocking=True)
                masks = masks.to(self.device)
                tokens = masks.target_tokens if self._takes_target_tokens else None
                loss = self.step(imgs, masks.mask, masks.num_hidden, masks.targets, tokens, last=last_micro)
                running += loss
                count += 1
                bar.update(1)
                self.pos.batch = b + 1
                if not last_micro:
                    continue
                if self.after_step is not None:  # a teacher's EMA update (data2vec 2.0), after the optimizer step
                    self.after_step()
                self.pos.step += 1
                done = self.pos.step >= self.total_steps
                end_of_epoch = self.pos.batch == self.batches_per_epoch
                # the interval's checkpoint, unless the run's end or the epoch's end saves one just after
                save_now = bool(cfg.save_interval) and self.pos.step % cfg.save_interval == 0 and not done
                save_now = save_now and not end_of_epoch
                if self.pos.step % cfg.log_interval == 0 or done or end_of_epoch or save_now:
                    loss_avg = float(all_reduce_mean(running / max(count, 1), self.info))  # host sync
                    self._check_finite(loss_avg, "the loss")
                    now = time.perf_counter()
                    ips = (self.pos.step - step_log) * self.images_per_step / max(now - t_log, 1e-9)
                    row = {"epoch": epoch + self.pos.batch / self.batches_per_epoch, "loss": loss_avg, "lr": lr_now,
                           "img_per_s": ips}  # fmt: skip
                    if cfg.weight_decay_end is not None:  # what the optimizer used for this step
                        row["weight_decay"] = max(g["weight_decay"] for g in self.optimizer.param_groups)
                    momentum = getattr(getattr(self.raw_model, "teacher", None), "last_momentum", None)
                    if momentum is not None:  # the teacher's EMA momentum at this step (fairseq logs ema_decay)
                        row["ema_momentum"] = momentum
                    if cfg.skip_bad_files:  # every rank's count so far (resumes included)
                        row["skipped_files"] = int(sum(self._from_every_rank(self.skipped_files)))
                    if self.device.type == "cuda":
                        row["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    collapsed = None
                    if self.scaler.is_enabled():
                        collapsed = self._loss_scale_row(row, self.pos.step - step_log)
                    self.logger.log(row, self.pos.step)
                    if collapsed is not None:  # (after its row: the collapsed scale is in metrics.jsonl)
                        raise collapsed
                    # (refresh=False: the bar redraws at most once a second, as mininterval says, even in a log file)
                    # the run's time left at its pace since this process's first row (saves, pictures and kNN
                    # included; the first steps' compile or graph capture and the baseline kNN left out)
                    if first_row is None:
                        first_row = (now, self.pos.step)
                    since = self.pos.step - first_row[1]
                    eta = (self.total_steps - self.pos.step) * ((now - first_row[0]) / since if since else
                                                                self.images_per_step / max(ips, 1e-9))  # fmt: skip
                    bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{ips:.1f}", lr=f"{lr_now:.2e}",
                                    run_eta=_duration(eta), refresh=False)  # fmt: skip
                    running.zero_()
                    count, t_log, step_log = 0, now, self.pos.step
                if save_now:  # the loss was checked finite just above
                    t_log += _seconds(self.save)
                if done:
                    break
                if self.preempt.requested():  # SIGTERM / SIGUSR1: a checkpoint of this step, then stop (requeue)
                    if not save_now:
                        self._check_finite(float(all_reduce_mean(running / max(count, 1), self.info)), "the loss")
                        self.save()
                    bar.close()
                    self._stop_after_save()
            bar.close()
            if self.pos.batch == self.batches_per_epoch:  # the epoch is complete
                self.pos.epoch, self.pos.batch = epoch + 1, 0
            last = self.pos.step >= self.total_steps
            t_log += _seconds(self.save)  # before the pictures: nothing they do can cost the checkpoint
            if cfg.keep_every and self.pos.batch == 0 and self.pos.epoch % cfg.keep_every == 0 and self.info.is_main:
                t_log += _seconds(self._keep_encoder_snapshot)
            if self.preempt.requested():  # a stop asked by now: this save holds the step; what would follow (the
                if not last:  # pictures, kNN: a scheduler's grace period is short) is left out, and no step more
                    self._stop_after_save()
                if self.info.is_main:  # the last step: the run is complete and saved
                    print(f"stopped on {self.preempt.signame} in the last step: the run is complete and saved at "
                          f"step {self.pos.step}; its reconstructions and kNN evaluation are left out",
                          flush=True)  # fmt: skip
                break
            if cfg.vis_interval and (last or self.pos.batch == 0 and self.pos.epoch % cfg.vis_interval == 0):
                t_log += _seconds(self.visualize)
            if last or self.pos.batch == 0 and self.pos.epoch % cfg.eval_every == 0:
                t_log += _seconds(self.evaluate_knn)
            if not last and self.preempt.requested():  # asked during the pictures or kNN: stop here
                self._stop_after_save()
            if last:
                break
        self.logger.close()
        if self.info.is_main:
            if self.knn_seconds:
                total = time.perf_counter() - t_start
                print(f"kNN monitor: {self.knn_seconds:.1f} s of {total:.1f} s ({100 * self.knn_seconds / total:.1f}%)",
                      flush=True)  # fmt: skip
            from fastmim.train.plot import plot_metrics

            plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "training.png")
        return self.pos
