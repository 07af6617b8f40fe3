"""Checks of a recipe's settings, which also arrive as parsed text (``--model-args``, YAML): the wrong type or range
is named with the setting, instead of failing later inside torch or being taken silently (``bool("maybe")``)."""

from __future__ import annotations

import argparse
import math
import operator
import os


def expand_home(values: dict, keys) -> None:
    """A ``~`` at the start of ``values[key]`` (paths from a command line) is the home folder, as in a config file:
    no shell expands one after "=" (``--data-path=~/imgs``) or in quotes."""
    for key in keys:
        if isinstance(values.get(key), str):
            values[key] = os.path.expanduser(values[key])


def says_usage_errors() -> bool:
    """Whether this process prints a usage error. Under torchrun every rank parses the same command and would print
    the same error once each: local rank 0 of each node says it, the others exit with the same status silently."""
    return os.environ.get("LOCAL_RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, with its errors printed once per node under torchrun (``says_usage_errors``)."""

    def error(self, message):
        if not says_usage_errors():
            self.exit(2)
        words = message.removeprefix("unrecognized arguments:").split()
        if message.startswith("unrecognized arguments:") and words and all(w.lower().endswith(".tar") for w in words):
            # (a pattern of shards left unquoted: the shell gave every shard after the first as an argument)
            n = len(words)
            self.exit(2, f"{self.prog}: error: {n} more .tar paths after the data path: the shell expanded a pattern "
                         "of shards into paths; put the pattern in quotes, e.g. "
                         "'/data/in1k/imagenet1k-train-{0000..1023}.tar'\n")  # fmt: skip
        super().error(message)


class Once(argparse.Action):
    """A flag that takes one value and may be given once: a path repeated is most likely a pattern the shell expanded
    (``--data-path=train-{0..3}.tar`` unquoted gives four flags; argparse would keep the last, silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if hasattr(namespace, self.dest):
            was = getattr(namespace, self.dest)
            hint = (": the shell expanded a pattern of shards into several flags; put it in quotes, e.g. "
                    f"{option_string}='/data/in1k/imagenet1k-train-{{0000..1023}}.tar'"
                    if str(values).lower().endswith(".tar") else "")  # fmt: skip
            parser.error(f"{option_string} given twice ({was!r}, then {values!r}){hint}")
        setattr(namespace, self.dest, values)


def as_int(value) -> int | None:
    """``value`` as an int when it is one of any integer type (numpy's too), else None (a bool, a float, a string)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(who: str, name: str, value, lo: int = 1, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (any integer type, numpy's too); a bool, a float or a string is refused."""
    v = as_int(value)
    if v is None or v < lo or (hi is not None and v > hi):
        where = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{who}: {name} must be an int {where}, got {value!r}")
    return v


def check_bool(who: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{who}: {name} must be true or false, got {value!r}")
    return value


def check_number(who: str, name: str, value, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` as a finite float in [lo, hi] (an int is taken; a bool or a string is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi or math.isinf(value):
        where = f"a finite number >= {lo:g}" if hi == math.inf else f"a number in [{lo:g}, {hi:g}]"
        raise ValueError(f"{who}: {name} must be {where}, got {value!r}")
    return float(value)


def check_momentum(who: str, momentum, with_updates: bool) -> tuple:
    """A teacher's momentum schedule: (start, end) in [0, 1], then, ``with_updates``, the number of updates over
    which it goes from start to end (a positive int)."""
    form = "[start, end, updates]" if with_updates else "[start, end]"
    n = 3 if with_updates else 2
    if isinstance(momentum, (str, bytes)) or not hasattr(momentum, "__len__") or len(momentum) != n:
        raise ValueError(f"{who}: momentum must be {form} (e.g. momentum=[0.996,1.0"
                         f"{',100000' if with_updates else ''}]), got {momentum!r}")  # fmt: skip
    start = check_number(who, "momentum's start", momentum[0], 0.0, 1.0)
    end = check_number(who, "momentum's end", momentum[1], 0.0, 1.0)
    if with_updates:
        return start, end, check_int(who, "momentum's updates", momentum[2], lo=1)
    return start, end


def out_of_memory_summary(e: BaseException) -> str:
    """The part of an out-of-memory message that says what ran out: torch's CUDA one is a paragraph on one line
    (what it tried to allocate, the totals, then advice and a documentation link), cut before the advice."""
    text = " ".join(str(e).split()) or type(e).__name__
    for tail in (" If reserved but unallocated", " See documentation"):
        text = text.split(tail)[0]
    return text if len(text) <= 400 else text[:397] + "..."
