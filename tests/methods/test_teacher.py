"""The EMA teacher: the update against a per-parameter reference along the momentum schedule, the schedules, fp32
teacher for a bf16 student, a frozen eval-mode copy, and an exact resume from its state dict."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastmim.targets.teacher import DATA2VEC2_MOMENTUM, EMATeacher, ijepa_momentum, momentum_at


def _student(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.5), nn.LayerNorm(16), nn.Linear(16, 4))


def _perturb(model, step):
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def test_update_matches_the_per_parameter_formula_along_the_schedule():
    student = _student()
    teacher = EMATeacher(student, 0.5, 0.9, total_updates=4)
    ref = [p.detach().clone() for p in student.parameters()]
    for step in range(6):
        _perturb(student, step)
        m = teacher.update(student)
        assert m == pytest.approx(momentum_at(step, 0.5, 0.9, 4))
        ref = [m * r + (1 - m) * s.detach() for r, s in zip(ref, student.parameters(), strict=True)]
        for t, r in zip(teacher.model.parameters(), ref, strict=True):
            torch.testing.assert_close(t, r, rtol=1e-6, atol=1e-7)
    assert int(teacher.updates) == 6 and teacher.momentum() == 0.9


def test_schedules():
    start, end, total = DATA2VEC2_MOMENTUM
    assert momentum_at(0, start, end, total) == start and momentum_at(total, start, end, total) == end
    assert momentum_at(total // 2, start, end, total) == pytest.approx((start + end) / 2)
    assert momentum_at(10 * total, start, end, total) == end
    assert ijepa_momentum(1000) == (0.996, 1.0, 1000) and momentum_at(500, *ijepa_momentum(1000)) == pytest.approx(
        0.998
    )
    with pytest.raises(ValueError, match="start momentum"):
        EMATeacher(_student(), 1.5)
    fairseq = EMATeacher(_student(), 0.5, 0.9, total_updates=4, count_from=1)  # read after the count's increment
    assert [fairseq.update(_student()) for _ in range(5)] == pytest.approx([0.6, 0.7, 0.8, 0.9, 0.9])
    with pytest.raises(ValueError, match="count_from must be an int in"):
        EMATeacher(_student(), count_from=2)


def test_teacher_is_a_frozen_fp32_eval_copy_of_a_bf16_student():
    student = _student().bfloat16()
    teacher = EMATeacher(student, 0.9, 0.9, 1)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.model.parameters())
    teacher.train()
    assert not teacher.model.training  # dropout stays off
    x = torch.randn(3, 8)
    assert torch.equal(teacher(x), teacher(x)) and not teacher(x).requires_grad
    before = [p.clone() for p in teacher.model.parameters()]
    _perturb(student, 0)
    teacher.update(student)
    for t, b, s in zip(teacher.model.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s.float(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="do not match"):
        teacher.update(nn.Linear(8, 4))


def test_resume_from_the_state_dict_is_exact():
    student = _student()
    a = EMATeacher(student, 0.5, 0.99, total_updates=10)
    for step in range(3):
        _perturb(student, step)
        a.update(student)
    b = EMATeacher(_student(seed=1), 0.5, 0.99, total_updates=10)
    b.load_state_dict(a.state_dict())
    for step in range(3, 6):
        _perturb(student, step)
        assert a.update(student) == b.update(student)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


class _ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value onto the host (``int(t)``, ``t.item()``): each is a GPU sync on CUDA."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_the_schedule_does_not_read_the_update_count_back_each_step():
    # int(self.updates) in every update() was a host sync per step on the GPU (and breaks CUDA-graph capture)
    student = _student()
    teacher = EMATeacher(student, 0.5, 0.99, total_updates=10)
    with _ScalarReads() as mode:
        for step in range(4):
            _perturb(student, step)
            teacher.update(student)
        assert teacher.momentum() == pytest.approx(momentum_at(4, 0.5, 0.99, 10))
    assert mode.reads == 0
    # a count written from outside (a load, in place or with assign=True) is read back once, then counted again
    other = EMATeacher(_student(seed=1), 0.5, 0.99, total_updates=10)
    for assign in (False, True):
        other.load_state_dict(teacher.state_dict(), assign=assign)
        with _ScalarReads() as mode:
            assert other.momentum() == pytest.approx(momentum_at(4, 0.5, 0.99, 10))
            other.update(student)
            other.update(student)
            assert other.momentum() == pytest.approx(momentum_at(6, 0.5, 0.99, 10))
        assert mode.reads == 1
        other.updates.fill_(2)
        assert other.momentum() == pytest.approx(momentum_at(2, 0.5, 0.99, 10))
    # a load that swaps the new values into the same tensor object (torch's swap_module_params_on_conversion)
    swapped = EMATeacher(_student(seed=2), 0.5, 0.99, total_updates=10)
    swapped.update(student)
    buf = io.BytesIO()
    torch.save(teacher.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # (a checkpoint read back: its tensors' versions start over)
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        swapped.load_state_dict(state, assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    loaded = int(state["updates"])  # (2: the assign=True load above shared teacher's buffer with other)
    assert loaded != 1 and swapped.momentum() == pytest.approx(momentum_at(loaded, 0.5, 0.99, 10))


@pytest.mark.parametrize("name", ["data2vec2_vit_tiny_patch16", "ijepa_vit_tiny_patch16"])
def test_a_training_loop_that_forgets_after_step_is_warned(name):
    """A loop of one's own that steps the optimizer but never calls after_step() left the EMA teacher at its initial
    weights silently; now the next forward warns, once. after_step() after each step, gradient accumulation (two
    forwards per step) and a loaded state do not warn."""
    import warnings

    from fastmim import create_model

    model = create_model(name, img_size=32, patch_size=8)
    if hasattr(model, "set_total_steps"):
        model.set_total_steps(10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def messages(record):
        return [str(w.message) for w in record if "after_step() was not called" in str(w.message)]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            for _ in range(2):  # accumulation: no step between these forwards
                model(x)[0].backward()
            opt.step()
            opt.zero_grad()
            model.after_step()
        model.load_state_dict(model.state_dict())
        model(x)[0].backward()
        assert messages(record) == []
        for _ in range(3):  # no after_step()
            opt.step()
            opt.zero_grad()
            model(x)[0].backward()
    assert len(messages(record)) == 1 and "call model.after_step() after every optimizer.step()" in messages(record)[0]
