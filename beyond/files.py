"""The --out folder written whole or not at all: atomic writes, a work folder,
and the move into --out once a run has succeeded."""
import os
from pathlib import Path
import contextlib
import json
import sys
import tempfile
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
    # renames within one file system, each file whole, old or new; the checkpoint goes
    # last: if a rename fails, it is still the earlier run's
    moved = []
    for path in sorted(work.iterdir(), key=lambda p: p.suffix == ".safetensors"):
        try:
            os.replace(path, out / path.name)
        except OSError as e:
            raise InputError(
                f"cannot move {path.name} into {out}: {e.strerror or e}. Replaced by this "
                f"run's: {', '.join(moved) or 'none'}; the other files in {out} are the "
                f"earlier run's.") from None
        moved.append(path.name)
    plots = "reliability-plot.svg" + (", roc-plot.svg, pr-plot.svg" if len(names) == 2 else "")
    print(f"Saved {checkpoint}, metrics.json, loss-plot.svg, accuracy-plot.svg, "
          f"{plots} and the CSV splits in {out}")


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
