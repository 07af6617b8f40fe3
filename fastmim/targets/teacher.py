"""A momentum (EMA) teacher: a frozen fp32 copy of the student's encoder, moved toward the student after each optimizer
step (data2vec 2.0, I-JEPA; issue 17's first piece: recipes and the trainer's checkpoints use it next).

``teacher = EMATeacher(encoder, *DATA2VEC2_MOMENTUM, count_from=1)`` (``encoder``: the module to follow, e.g.
``fastmim.create_model("vit_base_patch16")``); after each ``optimizer.step()``, ``teacher.update(encoder)``;
``teacher(x)`` runs the copy in eval mode without gradients. The recipes with a teacher (data2vec 2.0, I-JEPA) hold
one: call their ``after_step()`` after each optimizer step (and I-JEPA's ``set_total_steps(N)`` before training), as
fastmim's trainer does. The update
is ``t <- m t + (1 - m) s`` over every parameter in one multi-tensor pass (``torch._foreach_lerp_`` with weight
``1 - m``) in fp32; buffers are copied. The momentum follows a linear schedule from ``start`` to ``end`` over
``total_updates`` updates, then stays at ``end``; the update count is a buffer, so a checkpoint of the teacher
(``state_dict``) resumes the schedule exactly.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from fastmim._args import check_int
from fastmim.train.fsdp import is_sharded

DATA2VEC2_MOMENTUM = (
    0.9998,
    0.99999,
    100_000,
)  # fairseq data2vec2: ema_decay -> ema_end_decay over ema_anneal_end_step


def ijepa_momentum(total_steps: int) -> tuple[float, float, int]:
    """I-JEPA's schedule: 0.996 -> 1.0 linearly over the whole run."""
    return 0.996, 1.0, total_steps


def momentum_at(update: int, start: float, end: float, total_updates: int) -> float:
    """The momentum of update number ``update`` (0-based): linear from start to end over total_updates, then end."""
    if total_updates <= 0 or update >= total_updates:
        return end
    return start + (end - start) * update / total_updates


class EMATeacher(nn.Module):
    """Args:
    student: the module to follow (its parameters' order and shapes are the teacher's).
    start, end, total_updates: the momentum schedule (``momentum_at``).
    count_from: the schedule's index of the first update: 0 (I-JEPA: its first update uses ``start``) or 1
        (fairseq's data2vec 2.0 reads the schedule at the update count after the increment).
    """

    def __init__(self, student: nn.Module, start: float = 0.9998, end: float = 0.99999, total_updates: int = 100_000,
                 count_from: int = 0):  # fmt: skip
        super().__init__()
        for name, v in (("start", start), ("end", end)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"EMATeacher: {name} momentum must be in [0, 1], got {v}")
        total_updates = check_int("EMATeacher", "total_updates", total_updates, lo=0)
        self.start, self.end, self.total_updates = float(start), float(end), total_updates
        self.count_from = check_int("EMATeacher", "count_from", count_from, lo=0, hi=1)
        self.model = copy.deepcopy(student).float().eval().requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        # the count on the host too: reading the buffer each step would wait for the GPU (a sync per step); it is
        # read again only when the buffer was written or replaced by something else (a load, .to(device))
        self._host_updates = (0, self._buffer_key())
        self.register_load_state_dict_post_hook(_reread_updates)  # (a load that swaps the tensor's contents in
        # place, torch's swap_module_params_on_conversion, keeps its id and may keep its version)
        self._shapes = [p.shape for p in self.model.parameters()]

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.model.eval()  # the teacher never trains: dropout, drop path and the like stay off
        return self

    def _buffer_key(self) -> tuple[int, int, int] | None:
        try:  # (in-place writes bump _version; a new tensor has another id or data)
            return id(self.updates), self.updates.data_ptr(), self.updates._version
        except RuntimeError:  # an inference-mode tensor has no version: read each time
            return None

    def _updates_now(self) -> int:
        count, key = self._host_updates
        if key is None or key != self._buffer_key():
            count = int(self.updates)
            self._host_updates = (count, self._buffer_key())
        return count

    def momentum(self) -> float:
        return self._momentum_of(self._updates_now())

    def _momentum_of(self, count: int) -> float:
        """The momentum of the update after ``count`` updates (``count_from``: where the schedule is read)."""
        return momentum_at(count + self.count_from, self.start, self.end, self.total_updates)

    @torch.no_grad()
    def update(self, student: nn.Module | None = None, params: list[torch.Tensor] | None = None) -> float:
        """One EMA step toward ``student`` (its parameters and buffers), or toward ``params`` (the student's tensors
        in the teacher's parameter order, for a student that holds more than the teacher: a decoder, the teacher
        itself); returns the momentum used."""
        mine = list(self.model.parameters())
        theirs = list(student.parameters()) if params is None else list(params)
        if [p.shape for p in theirs] != self._shapes:
            raise ValueError("EMATeacher.update: the student's parameters do not match the teacher's (another model?)")
        low = {t.dtype for t in mine} - {torch.float32, torch.float64}
        if low:  # (model.to(torch.bfloat16) / .half() casts the teacher too)
            raise ValueError(f"EMATeacher.update: the teacher was cast to {', '.join(map(str, sorted(low, key=str)))}; "
                             "it must stay fp32, where updates of (1 - momentum) ~ 1e-4 survive: keep the model in "
                             "fp32 and train under torch.autocast, as fastmim's trainer does")  # fmt: skip
        count = self._updates_now()
        m = self._momentum_of(count)
        src = [s.detach() if s.dtype == t.dtype else s.detach().to(t.dtype) for s, t in zip(theirs, mine, strict=True)]
        torch._foreach_lerp_(mine, src, 1.0 - m)
        if student is not None and params is None:
            for t, s in zip(self.model.buffers(), student.buffers(), strict=True):
                t.copy_(s)
        self.updates += 1
        self._host_updates = (count + 1, self._buffer_key())
        self.last_momentum = m  # (the trainer logs it: metrics.jsonl's ema_momentum)
        return m

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _reread_updates(module: EMATeacher, incompatible_keys) -> None:
    module._host_updates = (0, None)  # the loaded count is read at the next momentum()


def _forget_student_params(module: nn.Module, incompatible_keys) -> None:
    """After a ``load_state_dict`` (which with ``assign=True`` replaces the Parameter objects), the list of the
    student's parameters is built again at the next update."""
    module._student_params = None
    module._seen_version = None  # (loaded weights: not an optimizer step without an update)


class TeacherOfEncoder:
    """Mixin for a recipe (an ``nn.Module`` with ``encoder_state_dict()``) whose ``teacher`` is an EMA copy of its own
    encoder: ``init_teacher(encoder, ...)`` builds it from a fresh encoder module of the same shape, ``after_step()``
    (the trainer calls it after every optimizer step) moves it toward the encoder's current weights."""

    def init_teacher(self, encoder: nn.Module, start: float, end: float, total_updates: int,
                     count_from: int = 0) -> None:  # fmt: skip
        # the student's encoder (I-JEPA's exported encoder is the teacher itself)
        encoder.load_state_dict(getattr(self, "context_encoder_state_dict", self.encoder_state_dict)())
        self.teacher = EMATeacher(encoder, start, end, total_updates, count_from)
        self._student_params: list[nn.Parameter] | None = None
        self.register_load_state_dict_post_hook(_forget_student_params)  # (assign=True brings new Parameters)

    def student_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters in the teacher's order (what the EMA follows)."""
        if self._student_params is None:
            own = dict(self.named_parameters())
            self._student_params = [own[name] for name, _ in self.teacher.model.named_parameters()]
        return self._student_params

    def after_step(self) -> None:
        """The teacher's EMA update."""
        self.teacher.update(params=self.student_parameters())
        self._seen_version = self._student_version()

    def check_teacher_follows(self) -> None:
        """Called at the forward: warns once when the encoder's weights changed (an optimizer step) since the last
        forward with no ``after_step()`` between: the EMA teacher would silently stay at its initial weights in a
        training loop that forgot it. (Gradient accumulation's forwards without a step do not warn.)"""
        if torch.compiler.is_compiling() or not (self.training and torch.is_grad_enabled()) or is_sharded(self):
            return  # (FSDP2 swaps the parameters for gathered copies during the forward: nothing to compare)
        version, seen = self._student_version(), getattr(self, "_seen_version", None)
        if seen is not None and version != seen and not getattr(self, "_warned_no_update", False):
            self._warned_no_update = True
            warnings.warn(
                f"{type(self).__name__}: the encoder's weights changed since the last forward (an optimizer "
                "step) but after_step() was not called after it, so the EMA teacher did not follow them: "
                "call model.after_step() after every optimizer.step() (fastmim's trainer does)",
                stacklevel=5,
            )  # fmt: skip (the caller of model(...): through nn.Module's two call frames)
        self._seen_version = version

    def _student_version(self) -> int | None:
        """The in-place version counter of the student's first trainable parameter (an optimizer step bumps it)."""
        try:
            return next(p._version for p in self.student_parameters() if p.requires_grad)
        except (StopIteration, AttributeError, RuntimeError):  # (nothing trainable; a tensor without the counter)
            return None
