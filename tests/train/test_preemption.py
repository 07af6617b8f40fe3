"""Preemption: a real CLI run signalled with SIGTERM or SIGUSR1 finishes its step, checkpoints it, exits with the
requeue status, and resumes to the run an uninterrupted one makes; a second signal during the stop changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastmim import pretrain
from fastmim.train.checkpoint import load_checkpoint
from fastmim.train.preempt import REQUEUE_EXIT
from tests.conftest import ROOT, TINY_ARGS

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")


def _args(image_folder, out, *extra):
    return [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--log-interval", "1",
            "--vis-interval", "100", "--loader", "torch", "--epochs", "6", *extra]  # fmt: skip


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


# the CLI under another multiprocessing start method (the loader workers': spawn, or forkserver, Python 3.14's default)
_WITH_START_METHOD = """import multiprocessing, runpy, sys
multiprocessing.set_start_method(sys.argv[1])
sys.argv = ["fastmim.pretrain", *sys.argv[2:]]
runpy.run_module("fastmim.pretrain", run_name="__main__", alter_sys=True)"""


def _run_and_signal(args, out, signum, twice=False, group=False, start_method=None) -> subprocess.CompletedProcess:
    """Starts the CLI, waits for its first logged step (the trainer's handler is in place), signals it (``group``:
    its whole process group, loader workers included, as Slurm's preemption and scancel do)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the same threads as the in-process runs: the same sums
    cmd = ["-m", "fastmim.pretrain"] if start_method is None else ["-c", _WITH_START_METHOD, start_method]
    proc = subprocess.Popen([sys.executable, *cmd, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    if twice:
        time.sleep(0.01)
        proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=240)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    done.args_pgid = proc.pid  # with group=True, the run's process group
    return done


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_the_step_and_the_resume_equals_an_uninterrupted_run(image_folder, tmp_path, signum):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    r = _run_and_signal(_args(image_folder, cut), cut, signum, twice=signum == signal.SIGUSR1)
    assert r.returncode == REQUEUE_EXIT, r.stdout + r.stderr
    assert f"stopped on {signal.Signals(signum).name}: checkpointed at step" in r.stderr
    state = load_checkpoint(cut / "checkpoint.pt")
    total = 6 * 6  # 24 images, batch 4, 6 epochs
    assert 2 <= state["step"] < total and len(_losses(cut)) == state["step"]  # stopped early, at a logged step
    pretrain.run(["--resume", str(cut / "checkpoint.pt")])
    pretrain.run(_args(image_folder, straight))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["step"] == b["step"] == total
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert _losses(cut) == pytest.approx(_losses(straight), rel=1e-6)


@pytest.mark.slow
def test_signals_while_checkpoints_are_written_change_nothing(image_folder, tmp_path, monkeypatch):
    """SIGTERM and SIGUSR1 sent from inside every checkpoint write (torch.save): the epoch's save at step 6 completes
    and the run stops right after the epoch's end, from that save (before, one step later, with a save of its own).
    The run resumes to the one an uninterrupted run makes."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    real_save, during = torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "step" in obj:  # the trainer's checkpoint, before a byte of it is written
            during.append(obj["step"])
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_save(obj, f, *args, **kwargs)

    late = []  # a signal the trainer's handler did not take would end pytest: record it instead
    previous = {
        s: signal.signal(s, lambda signum, frame: late.append(signum)) for s in (signal.SIGTERM, signal.SIGUSR1)
    }
    try:
        monkeypatch.setattr(torch, "save", save)
        assert pretrain.main(_args(image_folder, cut, "--epochs", "2")) == REQUEUE_EXIT
        monkeypatch.setattr(torch, "save", real_save)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    assert during == [6] and not late  # 6 steps per epoch: the epoch's save is the stop's
    state = load_checkpoint(cut / "checkpoint.pt")
    assert state["step"] == 6 and len(_losses(cut)) == 6
    assert not list(cut.glob(".checkpoint.pt.*"))  # no temporary file left behind
    pretrain.run(["--resume", str(cut / "checkpoint.pt")])
    pretrain.run(_args(image_folder, straight, "--epochs", "2"))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["step"] == b["step"] == 12
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert _losses(cut) == pytest.approx(_losses(straight), rel=1e-6)


def test_signals_outside_the_training_loop_exit_with_the_requeue_status(image_folder, tmp_path, monkeypatch, capsys):
    """A stop signal while the run starts (here while the model is built, and while the checkpoint is read against
    its CRCs; on a cluster, also while files are listed) and one after the stop's save (while the loader closes) exit
    REQUEUE_EXIT, not the default 143 / 138 that a job script's requeue rule misses, nor a "corrupt checkpoint"; the
    checkpoint stays intact. After a run that finished, a signal changes nothing: exit 0, no requeue."""
    from fastmim.train import checkpoint as ckpt
    from fastmim.train import preempt

    out = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def then_signal(fn, sig):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            os.kill(os.getpid(), sig)
            return result

        return wrapped

    monkeypatch.setattr(pretrain, "build_model", then_signal(pretrain.build_model, signal.SIGUSR1))
    assert pretrain.main(_args(image_folder, out, "--epochs", "1")) == REQUEUE_EXIT
    assert "stopped on SIGUSR1 outside training" in capsys.readouterr().err
    monkeypatch.undo()
    assert pretrain.main(_args(image_folder, out, "--epochs", "1", "--max-steps", "2")) == 0  # a fresh start
    before = (out / "checkpoint.pt").read_bytes()

    real_check = ckpt.check_crc

    def check_then_signal(path):  # the signal inside the CRC check's own try/except
        real_check(path)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ckpt, "check_crc", check_then_signal)
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "3"]) == REQUEUE_EXIT
    err = capsys.readouterr().err
    assert "stopped on SIGTERM outside training" in err and "corrupt" not in err
    assert (out / "checkpoint.pt").read_bytes() == before
    monkeypatch.undo()

    real_install, real_close = preempt.PreemptionWatch.install, preempt.PreemptionWatch.close
    monkeypatch.setattr(preempt.PreemptionWatch, "install", then_signal(real_install, signal.SIGTERM))  # preempted
    monkeypatch.setattr(preempt.PreemptionWatch, "close", then_signal(real_close, signal.SIGTERM))  # then again
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "4"]) == REQUEUE_EXIT
    err = capsys.readouterr().err  # (the second, as torchrun's agent sends while the rank tears down, changes nothing)
    assert "stopped on SIGTERM: checkpointed at step 3" in err and "outside training" not in err, err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3  # the preemption's checkpoint, one step on
    monkeypatch.undo()

    monkeypatch.setattr(preempt.PreemptionWatch, "close", then_signal(real_close, signal.SIGTERM))
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "4"]) == 0  # finished: no requeue
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # main restores the handlers it found


@pytest.mark.slow
@pytest.mark.parametrize("start_method", [None, "forkserver"], ids=["default", "forkserver"])
def test_sigterm_to_the_whole_process_group_with_loader_workers(image_folder, tmp_path, start_method):
    """A scheduler signals every process of the job: the loader workers ignore SIGTERM (else one dies of it and the
    loader's error ends the run before its checkpoint); the trainer finishes its step, checkpoints and asks for a
    requeue. Also with workers forked by a fork server (Python 3.14's default; spawn is tested in
    tests/data/test_worker_signals.py), whose native threads could exist before the worker's init runs."""
    cut = tmp_path / "cut"
    args = _args(image_folder, cut)
    args[args.index("--num-workers") + 1] = "2"
    r = _run_and_signal(args, cut, signal.SIGTERM, group=True, start_method=start_method)
    assert r.returncode == REQUEUE_EXIT, r.stdout + r.stderr
    assert "stopped on SIGTERM: checkpointed at step" in r.stderr and "killed by signal" not in r.stderr
    state = load_checkpoint(cut / "checkpoint.pt")
    assert 2 <= state["step"] < 36 and len(_losses(cut)) == state["step"]
    # and no worker outlives the run: the loader's own SIGTERM still ends them
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(r.args_pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a loader worker outlived the run")


# the CLI with Python's own SIGINT handler, as from a terminal (a test run in the background inherits SIGINT ignored)
_WITH_CTRL_C = """import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["fastmim.pretrain", *sys.argv[1:]]
runpy.run_module("fastmim.pretrain", run_name="__main__", alter_sys=True)"""


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_step_and_a_second_one_stops_at_once(image_folder, tmp_path):
    """Ctrl-C reaches the whole foreground process group: the loader workers ignore it, the trainer finishes its step,
    checkpoints it and exits 130 (before: KeyboardInterrupt lost every step since the last checkpoint, up to an
    epoch, and the message gave no step)."""
    cut = tmp_path / "cut"
    args = _args(image_folder, cut)
    args[args.index("--num-workers") + 1] = "2"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for twice in (False, True):
        proc = subprocess.Popen([sys.executable, "-c", _WITH_CTRL_C, *args, *(["--resume"] if twice else [])],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
        metrics, logged = cut / "metrics.jsonl", (cut / "metrics.jsonl").read_text().count("\n") if twice else 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= logged + 2:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        if twice:  # at once: the step in flight is not saved, the last checkpoint stays
            time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 130, out + err
        assert "Ctrl-C: stopping after the step in flight" in err and "killed by signal" not in err
        state = load_checkpoint(cut / "checkpoint.pt")
        if not twice:
            assert "stopped on SIGINT: checkpointed at step" in err, err
            assert 2 <= state["step"] < 36 and len(_losses(cut)) == state["step"]
            first = state["step"]
        else:  # at once (or, had the first stop ended within the 10 ms, by it): the last checkpoint intact
            said = ("interrupted; the last checkpoint (if any) is intact", "stopped on SIGINT: checkpointed")
            assert any(text in err for text in said), err
            assert first <= state["step"] < 36 and len(_losses(cut)) >= state["step"]


def _run_until_the_terminal_closes(args, out, sighup, stderr="terminal") -> tuple[int, bytes]:
    """The CLI on a pseudo-terminal in a session of its own (the pty its controlling terminal), SIGHUP at ``sighup``
    (SIG_DFL as a login shell gives: a suite started under nohup would pass it on ignored), stderr on the terminal or
    a pipe; the terminal (and the pipe's reader) close after its second metrics row. (its exit status, what it said)"""
    import fcntl
    import select
    import termios

    master, slave = os.openpty()
    reader, writer = os.pipe() if stderr == "pipe" else (master, slave)

    def login():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGHUP, sighup)

    proc = subprocess.Popen([sys.executable, "-m", "fastmim.pretrain", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=slave, stdout=slave, stderr=writer,
                            start_new_session=True, preexec_fn=login)  # fmt: skip
    os.close(slave)
    if stderr == "pipe":
        os.close(writer)
    metrics, seen, deadline = out / "metrics.jsonl", b"", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # (its output read, so that it never blocks)
        for fd in select.select(sorted({master, reader}), [], [], 0.02)[0]:
            seen += os.read(fd, 65536)
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
    os.close(master)  # the terminal hangs up
    if stderr == "pipe":
        os.close(reader)  # and the pipe's reader goes with it
    return proc.wait(timeout=240), seen


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals")
@pytest.mark.parametrize("stderr", ["terminal", "pipe"])
def test_a_closed_terminal_checkpoints_the_step_and_exits_129(image_folder, tmp_path, stderr):
    """A run in a terminal that closes (an ssh session that dropped, without nohup): the kernel sends SIGHUP to the
    session, loader workers included. The trainer finishes its step, checkpoints it (its output, now going nowhere,
    does not end it: EIO on the terminal, EPIPE on a pipe whose reader went too, `2>&1 | tee log`) and exits 129;
    before, SIGHUP ended it at once, losing every step since the last save."""
    cut = tmp_path / "cut"
    args = _args(image_folder, cut)
    args[args.index("--num-workers") + 1] = "2"
    status, seen = _run_until_the_terminal_closes(args, cut, signal.SIG_DFL, stderr)
    assert status == 129, seen.decode(errors="replace")[-3000:]
    state = load_checkpoint(cut / "checkpoint.pt")
    assert 2 <= state["step"] < 36 and len(_losses(cut)) == state["step"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals")
def test_a_run_that_ignores_sighup_outlives_its_terminal(image_folder, tmp_path):
    """`python -m fastmim.pretrain ... &` then `disown` (or nohup with `| tee`): SIGHUP is ignored, so the run goes
    on when the terminal closes, but its next progress line failed with EIO and ended it (exit 1, every step since the
    last save lost). Its output now goes to /dev/null from that failure on, and it trains to the end."""
    out = tmp_path / "run"
    status, seen = _run_until_the_terminal_closes(_args(image_folder, out, "--max-steps", "8"), out, signal.SIG_IGN)
    assert status == 0, seen.decode(errors="replace")[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 8 and len(_losses(out)) == 8


@pytest.mark.slow
def test_torchrun_fsdp_ranks_checkpoint_the_same_step_on_sigterm_to_the_agent(image_folder, tmp_path):
    """torchrun, 2 processes, --fsdp: SIGTERM to the launcher's agent reaches both ranks (the agent forwards it); they
    agree on one step, write its sharded checkpoint and stop with the requeue status (the agent itself then exits
    1, its own SignalException); resumed on the same 2 processes, the run ends as an uninterrupted one. With drop
    path: each rank gets back its own random stream (rank 0's on both parted the runs)."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    args = [a for a in _args(image_folder, cut, "--fsdp", "--epochs", "3", "--drop-path", "0.2")]
    args[args.index("--batch-size") + 1] = "2"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*launch, "-m", "fastmim.pretrain", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics, deadline = cut / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode != 0 and out.count("stopped on SIGTERM: checkpointed at step") == 2, out
    state = load_checkpoint(cut / "checkpoint.dcp")
    assert 2 <= state["step"] < 18 and len(_losses(cut)) == state["step"]
    r = subprocess.run([*launch, "-m", "fastmim.pretrain", "--resume", "--output-dir", str(cut)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    straight_args = [a if a != str(cut) else str(straight) for a in args]
    r = subprocess.run([*launch, "-m", "fastmim.pretrain", *straight_args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert load_checkpoint(cut / "checkpoint.dcp")["step"] == load_checkpoint(straight / "checkpoint.dcp")["step"] == 18
    assert _losses(cut) == pytest.approx(_losses(straight), rel=1e-6)


def test_ranks_agree_on_the_stop_signal_and_its_exit_status():
    """Under DDP every rank exits with the same status: a rank that only hears of the stop takes the signal another
    rank got (it said "a signal on another rank" and exited 75 while the Ctrl-C'd rank exited 130); a scheduler's
    SIGTERM wins over a Ctrl-C, so that a preempted job is requeued."""
    from fastmim.train.distributed import DistInfo
    from fastmim.train.preempt import Preempted, PreemptionWatch

    def watch(mine, others):
        w = PreemptionWatch(DistInfo(rank=0, world_size=2, local_rank=0))
        w.signame = mine
        w.any_rank = lambda flag: True  # (the other rank's flag)
        w.gather = lambda obj: [obj, others]
        return w

    # (rank 0's view: the gathered names in rank order, the same list on every rank; a terminal's Ctrl-C on one rank
    # and hang-up on another agree on the first rank's: 130 on both, where each kept its own before)
    for mine, other, agreed in ((None, "SIGINT", "SIGINT"), ("SIGINT", None, "SIGINT"), (None, "SIGTERM", "SIGTERM"),
                                ("SIGINT", "SIGTERM", "SIGTERM"), ("SIGUSR1", "SIGINT", "SIGUSR1"),
                                ("SIGINT", "SIGHUP", "SIGINT"), ("SIGHUP", "SIGINT", "SIGHUP"),
                                ("SIGHUP", "SIGUSR1", "SIGUSR1"), (None, "SIGHUP", "SIGHUP")):  # fmt: skip
        w = watch(mine, other)
        assert w.requested() and w.signame == agreed, (mine, other)
        assert Preempted(3, w.signame).exit_status == {"SIGINT": 130, "SIGHUP": 129}.get(agreed, REQUEUE_EXIT)
    w = PreemptionWatch(DistInfo(rank=1, world_size=2, local_rank=1))  # rank 1 of the Ctrl-C / hang-up pair
    w.signame, w.any_rank, w.gather = "SIGHUP", lambda flag: True, lambda obj: ["SIGINT", obj]
    assert w.requested() and w.signame == "SIGINT"


def test_a_stop_signal_while_the_stopped_command_tears_down_keeps_the_requeue_status(tmp_path):
    """torchrun's agent sends SIGTERM to every rank as soon as one exits: a rank that had stopped for a requeue and was
    still tearing down (its process group, its loader workers) died of it with -15 instead of exiting 75. The command
    (not an in-process caller's run) exits 75 on it."""
    script = tmp_path / "stopped.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from fastmim import pretrain\n"
        "from fastmim.train.preempt import StopRequested\n"
        "def stopped(argv):\n"
        "    raise StopRequested('SIGTERM')\n"
        "pretrain.run = stopped\n"
        "assert pretrain.main(['--max-steps', '1']) == 75 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
        "status = pretrain.main()\n"
        "print('returned', status, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)  # (the agent's, during the teardown)\n"
        "time.sleep(30)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 75 and "returned 75" in done.stdout, (done.returncode, done.stdout, done.stderr)
