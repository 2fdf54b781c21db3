"""The --out folder written whole or not at all: atomic writes, a work folder,
and the move into --out once a run has succeeded."""
import contextlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from beyond.cli import InputError, interrupted_status
from beyond.distributed import ranks
from beyond.safetensors import write_kept


def write_atomically(path, content):
    """Bytes or str to path via a temporary file, never half a file; a failed write names path."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: ranks may race
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}; {write_kept(path)}.") from None
    finally:
        tmp.unlink(missing_ok=True)


def work_folder(out, rank, cleanup):
    """This process's own folder inside --out (ranks may or may not share --out): the splits,
    the cache's spill and (rank 0) the outputs, published once the run succeeds. `cleanup`
    removes it however the run ends, and --out if this run made it and it is still empty."""
    made = [p for p in [out, *out.parents] if not p.exists()]
    cleanup.callback(remove_empty_folders, made)
    try:
        out.mkdir(parents=True, exist_ok=True)
        folder = tempfile.TemporaryDirectory(dir=out, prefix=f".finetune-rank{rank}-")
    except OSError as e:
        raise InputError(f"cannot write in the --out folder {out}: {e.strerror or e}.") from None
    return Path(cleanup.enter_context(folder))


def remove_empty_folders(folders):
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


@contextlib.contextmanager
def out_left_as_it_was(out):
    """A failed write into the work folder says what the user cares about: --out is intact."""
    try:
        yield
    except InputError as e:
        raise InputError(f"{e} Nothing in {out} was replaced.") from None


def publish_run(metrics, work, checkpoint, names):
    """Rank 0's last step: metrics.json beside the checkpoint in `work`, every output moved
    into the checkpoint's folder over the last run's, and the line that says what is there."""
    out = checkpoint.parent
    with out_left_as_it_was(out):
        try:  # NaN is not JSON: a metric that is no number is an error, never written
            text = json.dumps(metrics, indent=2, allow_nan=False)
        except ValueError:
            raise InputError("a metric of this run is not a finite number (NaN or infinity): "
                             "nothing is saved.") from None
        write_atomically(work / "metrics.json", text + "\n")
    two = ["roc-plot.svg", "pr-plot.svg"]  # two classes only: an earlier run's go then
    with signals_held():  # Ctrl-C or SIGTERM now: the moves finish first, then it stops
        replace_all(work, out, stale=[] if len(names) == 2 else two)
        plots = ", ".join(["reliability-plot.svg"] + (two if len(names) == 2 else []))
        print(f"Saved {checkpoint}, metrics.json, loss-plot.svg, accuracy-plot.svg, "
              f"{plots} and the CSV splits in {out}")


def replace_all(work, out, stale=()):
    """Every file of work moved into out over the earlier run's: renames within one file
    system, each file whole. The earlier files (and those named in stale, which this run
    has none of) are set aside first; if a move fails, they are put back and this run's
    removed, so out is the one run's or the other's."""
    # the checkpoint last: should the process be killed, out keeps the earlier model
    paths = sorted([*work.iterdir(), *(work / name for name in stale)],
                   key=lambda path: (path.suffix == ".safetensors", path.name))
    earlier = work / ".earlier"
    earlier.mkdir()
    moved = []
    try:
        for path in paths:
            if (out / path.name).exists():
                os.replace(out / path.name, earlier / path.name)
            moved.append(path.name)
            if path.exists():
                os.replace(path, out / path.name)
    except OSError as e:
        for name in reversed(moved):
            with contextlib.suppress(OSError):
                os.replace(out / name, work / name)
            with contextlib.suppress(OSError):
                os.replace(earlier / name, out / name)
        raise InputError(f"cannot move {path.name} into {out}: {e.strerror or e}. Nothing in "
                         f"{out} was replaced.") from None


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block is done, then act as they would have."""
    caught = []
    held = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum))
            for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in caught[:1]:
            signal.raise_signal(signum)


@contextlib.contextmanager
def said_if_interrupted(checkpoint):
    """Ctrl-C or SIGTERM in training: one rank says nothing was saved; exits with its status."""
    try:
        yield
    except KeyboardInterrupt as e:
        kept = f"{checkpoint} is unchanged" if checkpoint.exists() else "no checkpoint was written"
        if ranks()[0] == 0:  # every rank got Ctrl-C; one says so
            print(f"\ninterrupted during training: nothing of this run was saved, "
                  f"{checkpoint.parent} is as it was; {kept}.", file=sys.stderr)
        sys.exit(interrupted_status(e))


def add_out_option(parser):
    parser.add_argument("--out", default=".", metavar="DIR",
                        help="where the CSV splits, plots, metrics.json and the checkpoint "
                             "are written (the chapter: the current directory); they replace "
                             "the earlier run's only once this run has succeeded")
