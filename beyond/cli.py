"""Command-line plumbing shared by the commands: one-paragraph errors, exit
statuses for Ctrl-C and SIGTERM, argument types, progress lines, and the
repository's copy of tiktoken's gpt2 files for a machine without network."""
import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
import torch


class InputError(Exception):
    """An expected failure (bad file, missing download, bad flag): one paragraph, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, torchrun stopping its workers), handled as Ctrl-C is; exit status 143."""


class StdoutAfterProgress:
    """sys.stdout while a progress line may be drawn: a printed line clears it first."""

    def __init__(self, stream):
        self.stream, self.line_drawn = stream, False

    def write(self, text):
        if self.line_drawn and text:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.line_drawn = False
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def clock(seconds):
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 \
        else f"{minutes}:{seconds:02d}"


def progress(label, done, total, start):
    """One updating line on a terminal's stderr (rank 0's): done/total, time elapsed and
    left (total None: a count); cleared once done >= total. Logs stay the chapter's."""
    if not sys.stderr.isatty() or os.environ.get("RANK", "0") != "0":
        return
    if not isinstance(sys.stdout, StdoutAfterProgress):
        sys.stdout = StdoutAfterProgress(sys.stdout)
    elapsed = time.time() - start
    if total is None:
        text = f"{label}: {done:,}, {clock(elapsed)} elapsed"
    else:
        left = elapsed / done * (total - done) if done else math.nan
        text = f"{label}: {done:,}/{total:,}, {clock(elapsed)} elapsed, {clock(left)} left"
    finished = total is not None and done >= total
    sys.stderr.write("\r\033[K" + ("" if finished else text))
    sys.stderr.flush()
    sys.stdout.line_drawn = not finished


# tiktoken's cache of OpenAI's two gpt2 files, kept in the repository for the tests
TOKENIZER_FILES = Path(__file__).resolve().parent.parent / "testdata" / "tiktoken"


def repository_tokenizer(error):
    """tiktoken's gpt2 encoding from the repository's copy of its files (tiktoken checks
    their sha256); else an InputError naming `error`, why the first try failed."""
    import tiktoken
    import unittest.mock  # patch.dict: TIKTOKEN_CACHE_DIR as it was afterwards
    with unittest.mock.patch.dict(os.environ, TIKTOKEN_CACHE_DIR=str(TOKENIZER_FILES)):
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:
            raise InputError(
                f"cannot load tiktoken's gpt2 encoding ({type(error).__name__}: {error}). "
                f"tiktoken downloads it on first use; without network, set "
                f"TIKTOKEN_CACHE_DIR to a folder holding its cached files.") from None


MAX_JSON_DEPTH = 32    # nesting: no file or request of ours needs more than a few levels
MAX_JSON_NUMBER = 40   # characters of one number: an int of 5,000 digits costs time to read


def parse_json(text):
    """json.loads with bounded nesting and number size, and no NaN or infinity: every
    failure is one ValueError saying what is wrong (the caller names the file)."""
    def number(kind, digits):
        if len(digits) > MAX_JSON_NUMBER:
            raise ValueError(f"a number of {len(digits):,} characters")
        if not math.isfinite(value := kind(digits)):
            raise ValueError(f"the number {digits} is out of range")
        return value

    def refuse(constant):
        raise ValueError(f"{constant} is not a JSON number")

    deep = ValueError(f"it is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        value = json.loads(text, parse_int=lambda digits: number(int, digits),
                           parse_float=lambda digits: number(float, digits), parse_constant=refuse)
    except RecursionError:  # json's parser stops at Python's recursion limit
        raise deep from None
    if nesting(value) > MAX_JSON_DEPTH:
        raise deep
    return value


def nesting(value, depth=0):
    """How deep lists and objects nest in value (at most MAX_JSON_DEPTH + 1 is looked at)."""
    if depth > MAX_JSON_DEPTH or not isinstance(value, (list, dict)):
        return depth
    items = value.values() if isinstance(value, dict) else value
    return max((nesting(item, depth + 1) for item in items), default=depth + 1)


def terminate(signum, frame):
    raise Terminated()


def run_cli(main):
    """Runs main(): an expected failure prints one paragraph and exits 1, Ctrl-C exits 130
    and SIGTERM 143, a closed output pipe (| head) ends it quietly."""
    signal.signal(signal.SIGTERM, terminate)
    try:
        main()
        sys.stdout.flush()  # inside the try: a reader that went away is seen here
    except BrokenPipeError:
        # nothing more can be printed; point stdout at nothing so that Python's
        # own flush at exit does not report the broken pipe either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank got it
            print("\ninterrupted.", file=sys.stderr)
        sys.exit(interrupted_status(e))


def interrupted_status(e):
    """The exit status of a program stopped by Ctrl-C or SIGTERM: 128 + signal."""
    return 143 if isinstance(e, Terminated) else 130


def number_type(kind, valid, problem):
    """An argparse type: text as kind (int or float) where valid(value), else an error
    argparse shows (problem, formatted with the value and the text)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(problem.format(value=value, text=text))
        return value
    return parse


positive_int = number_type(int, lambda value: value >= 1, "must be at least 1, got {value}")
# 0 to 2**32 - 1: the seeds pandas' sampler (NumPy's RandomState) accepts
seed_number = number_type(int, lambda value: 0 <= value < 2**32,
                          "must be between 0 and 4294967295, got {value}")
positive_float = number_type(float, lambda value: value > 0 and math.isfinite(value),
                             "must be a positive number, got {text}")
fraction = number_type(float, lambda value: 0 <= value < 1,  # --target-fpr: a rate
                       "must be a rate from 0 up to (not including) 1, such as 0.01, got {text}")


def torch_version():
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def port_number(text):
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0 to 65535")
    return int(text)
