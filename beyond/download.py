"""Downloads, whole or not at all: the SMS data and GPT-2's weights (the
Hub's model.safetensors, else OpenAI's files where chapter 5 gets them)."""
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from beyond.cli import InputError, progress


# size -> (the Hub's repository openai-community/<name>, OpenAI's folder gpt2/<size>/)
RELEASES = {"gpt2-small": ("gpt2", "124M"), "gpt2-medium": ("gpt2-medium", "355M"),
            "gpt2-large": ("gpt2-large", "774M"), "gpt2-xl": ("gpt2-xl", "1558M")}
HUB_URL = "https://huggingface.co/openai-community/{}/resolve/main/model.safetensors"
# where chapter 5's gpt_download.py fetches OpenAI's original release
OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}"
# the files of that release read here, the data file last (the release also
# holds model.ckpt.meta, encoder.json and vocab.bpe: tiktoken has the last two)
OPENAI_FILES = ["checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"]


def download_file(url, destination, what, hint):
    """Streams url to a ".part" file renamed to destination only when complete: a
    dropped connection, a full disk or Ctrl-C never leaves a partial file there."""
    destination = Path(destination)
    # folders this call creates, removed again if the download fails
    created = [p for p in [destination.parent, *destination.parent.parents] if not p.exists()]
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(f"{destination.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, start = 0, time.time()
            label = f"downloading {destination.name}, MB"
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                progress(label, done >> 20, total >> 20 if total else None, start)
            progress(label, done >> 20, done >> 20, start)  # clears the line
            if total and done != total:
                raise InputError(f"the download of {what} from {url} stopped after "
                                 f"{done:,} of {total:,} bytes; run again to start over, "
                                 f"or {hint}.")
        os.replace(part, destination)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise InputError(f"could not download {what} from {url} ({reason}). "
                         f"Nothing was saved at {destination}; {hint}.") from None
    finally:
        part.unlink(missing_ok=True)
        for folder in created:  # innermost first; none is empty once destination is there
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return destination


def gpt2_weights_path(model_name, models_dir="gpt2"):
    """The file --weights pretrained reads in gpt2/<size>/: OpenAI's data file where
    chapter 5 left it and no model.safetensors is there, else model.safetensors."""
    folder = Path(models_dir) / RELEASES[model_name][1]  # gpt2/124M/: where chapter 5 puts them
    hub_file, openai_data = folder / "model.safetensors", folder / OPENAI_FILES[-1]
    return openai_data if not hub_file.exists() and openai_data.exists() else hub_file


def download_gpt2(model_name, models_dir="gpt2", flag="--weights"):
    """The file of one GPT-2 size's weights, downloaded once: the Hub's, else OpenAI's
    from chapter 5's URLs; a failure names `flag`, which takes a local file."""
    path = gpt2_weights_path(model_name, models_dir)
    if path.exists():
        return path
    what = f"the {model_name} weights"
    try:
        return download_file(HUB_URL.format(RELEASES[model_name][0]), path, what,
                             "OpenAI's original files were tried next")
    except InputError as hub_error:
        size, folder = RELEASES[model_name][1], path.parent
        hint = (f"download model.safetensors of openai-community/{RELEASES[model_name][0]} "
                f"yourself and pass it with {flag} PATH (or place it, or chapter 5's "
                f"OpenAI files, in {folder})")
        try:
            for name in OPENAI_FILES:  # the data file last: its presence means all are there
                if not (folder / name).exists():
                    download_file(OPENAI_URL.format(size=size, file=name), folder / name,
                                  f"{what} ({name})", hint)
        except InputError as openai_error:
            second = str(openai_error)
            raise InputError(f"{hub_error} {second[:1].upper()}{second[1:]}") from None
        return folder / OPENAI_FILES[-1]


def file_fingerprint(path):
    """(size in bytes, sha256 hex) of a file."""
    with open(path, "rb") as f:
        return os.path.getsize(path), hashlib.file_digest(f, "sha256").hexdigest()
