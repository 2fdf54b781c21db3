"""The GPT-2 model of chapters 4-5 and the loading of OpenAI's weights (section 6.4).

python gpt.py [--model gpt2-small] [--weights pretrained|PATH] "Every effort moves you"
prints the greedy continuation, the chapter's check that the weights loaded.
"""
import argparse
import ctypes
import errno
import hashlib
import http.client
import json
import math
import mmap
import os
import signal
import struct
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

# torch warns on import when NumPy is absent; this project never uses NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


class InputError(Exception):
    """An expected failure (bad file, missing download, bad flag): shown as one
    paragraph, without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, torchrun stopping its workers), handled as Ctrl-C is: the
    same clean-up of temporary files, and exit status 143."""


BASE_CONFIG = {
    "vocab_size": 50257,     # Vocabulary size
    "context_length": 1024,  # Context length
    "drop_rate": 0.0,        # Dropout rate
    "qkv_bias": True,        # Query-key-value bias
}

model_configs = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}
# The short names the command lines take: "gpt2-small" -> "gpt2-small (124M)".
MODEL_NAMES = {key.split(" ")[0]: key for key in model_configs}


def model_config(name):
    """BASE_CONFIG updated with one of model_configs, as in section 6.4."""
    config = dict(BASE_CONFIG)
    config.update(model_configs[MODEL_NAMES.get(name, name)])
    return config


# ---------------------------------------------------------------- the model (ch. 3-4)

class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        # the chapter's (x - mean) / sqrt(var + eps) * scale + shift, var biased,
        # in one fused kernel (a quarter of a block's CPU time as separate ops)
        return nn.functional.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    def forward(self, x):
        # the tanh approximation GPT-2 was trained with,
        # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), fused
        return nn.functional.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


def explicit_causal_attention(queries, keys, values, mask, dropout):
    """Chapter 3's formula, kept as the reference the fast path is tested against.

    queries: (b, heads, n_queries, head_dim); keys, values: (b, heads, n_keys, head_dim);
    mask: bool, broadcastable to (b, heads, n_queries, n_keys), True where attending is allowed.
    """
    attn_scores = queries @ keys.transpose(2, 3)
    attn_scores = attn_scores.masked_fill(~mask, -torch.inf)
    attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
    attn_weights = dropout(attn_weights)
    return attn_weights @ values  # (b, heads, n_queries, head_dim)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # context_length stays in the chapter's signature, but no mask buffer of
        # that size is kept: the causal mask is built per call (is_causal)

    def split_heads(self, x):
        b, num_tokens, _ = x.shape  # (b, T, d_out) -> (b, heads, T, head_dim)
        return x.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, num_tokens, _ = x.shape  # (b, T, d_in) -> (b, T, d_out)
        keys = self.split_heads(self.W_key(x))
        values = self.split_heads(self.W_value(x))
        queries = self.split_heads(self.W_query(x))
        dropout_p = self.dropout.p if self.training else 0.0
        # equals explicit_causal_attention with a lower-triangular mask, fused
        context = nn.functional.scaled_dot_product_attention(
            queries, keys, values, dropout_p=dropout_p, is_causal=True)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"],
            context_length=cfg["context_length"], num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_resid = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x  # (b, T, d) -> (b, T, d)
        x = self.norm1(x)
        x = self.att(x)
        x = self.drop_resid(x)
        x = x + shortcut

        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_resid(x)
        return x + shortcut


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(
            *[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def embed(self, in_idx):
        # (b, T) token ids -> (b, T, emb_dim)
        pos = torch.arange(in_idx.shape[1], device=in_idx.device)
        return self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))

    def forward(self, in_idx):
        x = self.embed(in_idx)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)  # (b, T, vocab_size)


# ---------------------------------------------------------- text generation (ch. 4-5)

def generate_text_simple(model, idx, max_new_tokens, context_size):
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # greedy
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def text_to_token_ids(text, tokenizer):
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)  # add batch dimension


def token_ids_to_text(token_ids, tokenizer):
    return tokenizer.decode(token_ids.squeeze(0).tolist())


# -------------------------------------------------------------- progress on a terminal

class StdoutAfterProgress:
    """sys.stdout while a progress line may be on the terminal: a printed line
    first clears it, so that the chapter's log lines never run into it."""

    def __init__(self, stream):
        self.stream = stream
        self.line_drawn = False

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
    """One updating line on stderr: done/total, time elapsed since `start` and
    time left (total None: a count). Only when stderr is a terminal: a pipe or a
    file gets nothing, so logs stay the chapter's. Cleared once done >= total.
    Under torchrun only rank 0 draws it."""
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


# ------------------------------------------------------------------ safetensors files

# dtype name in the file -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
MAX_HEADER_BYTES = 100_000_000  # the Hub's own readers refuse larger headers too


def read_safetensors_header(path):
    """Reads and checks the header: {name: (dtype, shape, start, end)} with offsets
    from the start of the file, and the string-to-string __metadata__.

    The layout: 8 bytes little-endian header length, a JSON header, raw data.
    Everything is checked before any tensor is read, so a crafted or truncated
    file fails here, naming the file and the problem."""
    def bad(problem):
        return InputError(f"{path} is not a valid safetensors file: {problem}.")

    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not a safetensors file.")
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"it has {len(prefix)} bytes, fewer than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise bad(f"its header claims {header_len:,} bytes (more than 100 MB)")
            if 8 + header_len > file_size:
                raise bad(f"its header claims {header_len:,} bytes but the file "
                          f"has {file_size:,} (truncated?)")
            raw_header = f.read(header_len)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}.") from None
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ is not a map of strings to strings")

    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        problem = entry_problem(info, file_size - data_start)
        if problem:
            raise bad(f"tensor {name!r} {problem}")
        start, end = info["data_offsets"]
        entries[name] = (info["dtype"], tuple(info["shape"]), data_start + start, data_start + end)

    problem = tiling_problem(entries, data_start, file_size)
    if problem:
        raise bad(problem)
    return entries, metadata


def tiling_problem(entries, data_start, file_size):
    """The format requires the tensors to tile the data area exactly, in the
    order of their offsets: a gap, an overlap or bytes after the last one mean
    the header's length or an offset is wrong, and every tensor read would be
    shifted. What is wrong, or None."""
    spans = sorted((start, end, name) for name, (_, _, start, end) in entries.items())
    position, previous = data_start, None
    for start, end, name in spans:
        if start < position:
            return f"tensors {previous!r} and {name!r} overlap"
        if start > position:
            after = f"after tensor {previous!r}" if previous else "before the first tensor"
            return f"{start - position:,} bytes of the data area {after} belong to no tensor"
        position, previous = end, name
    if position != file_size:
        return (f"the file has {file_size - position:,} bytes after the last tensor "
                f"(a wrong header length?)")
    return None


def entry_problem(info, data_size):
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(info, dict):
        return "has no description"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:  # a list is unhashable
        return f"has unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        return f"has an invalid shape {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"has invalid data_offsets {offsets!r}"
    if offsets[1] > data_size:
        return (f"ends at byte {offsets[1]:,} of the data area, which has {data_size:,} "
                f"bytes (truncated?)")
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
    if offsets[1] - offsets[0] != expected:
        return f"has {offsets[1] - offsets[0]:,} bytes but {dtype} x {shape} needs {expected:,}"
    return None


def check_floating(entries, names, source):
    """Weights must have a floating dtype: an F32 tensor relabelled I32 has the
    same size, passes every other check and would load as nonsense."""
    for name in names:
        dtype = entries[name][0]
        if not SAFETENSORS_DTYPES[dtype][0].is_floating_point:
            raise InputError(f"{source}: tensor {name} has dtype {dtype}, but weights are "
                             f"floating point (F16, BF16, F32 or F64).")


def _tensor_from_bytes(buffer, entry, offset=0):
    dtype, shape, start, end = entry
    torch_dtype = SAFETENSORS_DTYPES[dtype][0]
    if end == start:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(buffer, dtype=torch_dtype,
                            count=(end - start) // SAFETENSORS_DTYPES[dtype][1],
                            offset=start - offset)
    return flat.view(shape)


def iter_safetensors(path, digest=None):
    """Yields (name, tensor) one tensor at a time, so that loading a model needs
    the model's memory plus one tensor, even for gpt2-xl. The tensors come in
    the order of their offsets: as they tile the data area, `digest` (a hashlib
    object), when given, sees every byte of the file once, in order."""
    entries, _ = read_safetensors_header(path)
    with open(path, "rb") as f:
        if digest is not None:
            (header_len,) = struct.unpack("<Q", f.read(8))
            f.seek(0)
            digest.update(f.read(8 + header_len))
        for name, entry in sorted(entries.items(), key=lambda item: item[1][2]):
            f.seek(entry[2])
            data = bytearray(entry[3] - entry[2])
            if f.readinto(data) != len(data):
                raise InputError(f"{path} is truncated: tensor {name!r} is incomplete.")
            if digest is not None:
                digest.update(data)
            yield name, _tensor_from_bytes(data, entry, offset=entry[2])


def load_safetensors(path):
    """All tensors of a file as views of a copy-on-write memory map, and the
    metadata: nothing is copied until used, so a checkpoint opens at once."""
    entries, metadata = read_safetensors_header(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
    return {name: _tensor_from_bytes(buffer, entry) for name, entry in entries.items()}, metadata


def tensor_bytes(t):
    """The raw bytes of a tensor, in its own dtype (bfloat16 included), on the CPU."""
    t = t.detach().contiguous().cpu()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def save_safetensors(tensors, path, metadata=None):
    """Writes tensors (all contiguous, little-endian) atomically: to a temporary
    file beside path, renamed over it only once complete. The data starts on a
    64-byte boundary and tensors of whole 64-byte lines come first, so that a
    memory-mapped tensor is as aligned as one in memory: the CPU's kernels then
    take the same path and give the same bits."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    tensors = {name: tensors[name] for name in sorted(tensors, key=lambda n: sizes[n] % 64 > 0)}
    header, offset = {}, 0
    names = {dtype: name for name, (dtype, _) in SAFETENSORS_DTYPES.items()}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 64)  # the data starts 64-byte aligned
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: ranks may race
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            write_all(fd, struct.pack("<Q", len(raw)) + raw)
            for t in tensors.values():
                write_all(fd, tensor_bytes(t))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}; {write_kept(path)}.") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_kept(path):
    """What a failed write of path leaves: the file as it was, or none."""
    return f"{path} is unchanged" if Path(path).exists() else "nothing was written"


def write_all(fd, data, offset=None):
    """Writes every byte of data at the file position (or at offset, with
    pwrite): os.write and os.pwrite may write fewer bytes than asked, and a
    write that makes no progress means the disk is full."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        if offset is not None:
            offset += written


# ------------------------------------------------------------- GPT-2 weights (sec. 6.4)

# the Hub's repository for each size: openai-community/<name>
HUB_NAMES = {"gpt2-small": "gpt2", "gpt2-medium": "gpt2-medium",
             "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl"}
HUB_URL = "https://huggingface.co/openai-community/{}/resolve/main/model.safetensors"


def download_file(url, destination, what, hint):
    """Streams url to destination + ".part" (progress on a terminal), renamed to
    destination only when complete: a dropped connection, a full disk or Ctrl-C
    never leaves a partial file at destination, and the next run starts over."""
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
        if part.exists():
            part.unlink()
        if not destination.exists():
            for folder in created:  # innermost first
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    return destination


def gpt2_weights_path(model_name, models_dir="gpt2"):
    size = MODEL_NAMES[model_name].split("(")[-1].rstrip(")")  # "124M"
    return Path(models_dir) / size / "model.safetensors"


def download_gpt2(model_name, models_dir="gpt2", flag="--weights"):
    """The Hub's model.safetensors of one GPT-2 size, skipped when present; a
    failure names `flag`, the option of the calling command that takes a file."""
    path = gpt2_weights_path(model_name, models_dir)
    if path.exists():
        return path
    return download_file(
        HUB_URL.format(HUB_NAMES[model_name]), path,
        f"the {model_name} weights",
        f"download model.safetensors of openai-community/{HUB_NAMES[model_name]} "
        f"yourself and pass it with {flag} PATH (or place it at {path})")


def file_fingerprint(path):
    """(size in bytes, sha256 hex) of a file, read in 1 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return os.path.getsize(path), digest.hexdigest()


def config_from_hub_json(path):
    """Our config from a Hub-style config.json (n_embd, n_layer, ...)."""
    try:
        hub = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the model config {path}: {e}.") from None
    config = dict(BASE_CONFIG)
    for ours, theirs in [("vocab_size", "vocab_size"), ("context_length", "n_positions"),
                         ("emb_dim", "n_embd"), ("n_layers", "n_layer"), ("n_heads", "n_head")]:
        value = hub.get(theirs, config.get(ours)) if isinstance(hub, dict) else None
        config[ours] = value
    return check_config(config, path)


def check_config(config, source):
    """A model config from a file must be sane before a model is built from it."""
    limits = {"vocab_size": 1_000_000, "context_length": 1_000_000, "emb_dim": 100_000,
              "n_layers": 1_000, "n_heads": 1_000}
    for key, limit in limits.items():
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise InputError(f"{source}: the model config has {key}={value!r}; "
                             f"expected an integer from 1 to {limit:,}.")
    if config["emb_dim"] % config["n_heads"]:
        raise InputError(f"{source}: emb_dim {config['emb_dim']} is not divisible by "
                         f"n_heads {config['n_heads']}.")
    if not isinstance(config.get("drop_rate"), (int, float)) or not 0 <= config["drop_rate"] < 1:
        raise InputError(f"{source}: drop_rate must be a number in [0, 1).")
    if not isinstance(config.get("qkv_bias"), bool):
        raise InputError(f"{source}: qkv_bias must be true or false.")
    return config


def hf_key_targets(gpt):
    """Hub tensor name -> [(GPTModel parameter, how to turn the Hub tensor into it)].
    The Hub stores Conv1D weights as (in, out), Linear wants (out, in): transpose."""
    def part(i, transpose=False):  # one of query/key/value from the fused c_attn
        return lambda t: (t.chunk(3, dim=-1)[i].T if transpose else t.chunk(3, dim=-1)[i])

    targets = {
        "wte.weight": [(gpt.tok_emb.weight, None)],
        "wpe.weight": [(gpt.pos_emb.weight, None)],
        "ln_f.weight": [(gpt.final_norm.scale, None)],
        "ln_f.bias": [(gpt.final_norm.shift, None)],
    }
    if gpt.out_head.weight.shape == gpt.tok_emb.weight.shape:
        targets["wte.weight"].append((gpt.out_head.weight, None))  # weight tying
    for n, block in enumerate(gpt.trf_blocks):
        att, ff = block.att, block.ff
        h = f"h.{n}."
        targets.update({
            h + "ln_1.weight": [(block.norm1.scale, None)],
            h + "ln_1.bias": [(block.norm1.shift, None)],
            h + "attn.c_attn.weight": [(att.W_query.weight, part(0, True)),
                                       (att.W_key.weight, part(1, True)),
                                       (att.W_value.weight, part(2, True))],
            h + "attn.c_attn.bias": [(att.W_query.bias, part(0)), (att.W_key.bias, part(1)),
                                     (att.W_value.bias, part(2))],
            h + "attn.c_proj.weight": [(att.out_proj.weight, lambda t: t.T)],
            h + "attn.c_proj.bias": [(att.out_proj.bias, None)],
            h + "ln_2.weight": [(block.norm2.scale, None)],
            h + "ln_2.bias": [(block.norm2.shift, None)],
            h + "mlp.c_fc.weight": [(ff.layers[0].weight, lambda t: t.T)],
            h + "mlp.c_fc.bias": [(ff.layers[0].bias, None)],
            h + "mlp.c_proj.weight": [(ff.layers[2].weight, lambda t: t.T)],
            h + "mlp.c_proj.bias": [(ff.layers[2].bias, None)],
        })
    return targets


def load_weights_into_gpt(gpt, params, source="the weights"):
    """Copies the Hub's GPT-2 tensors, given as (name, tensor) pairs, into gpt.
    Every parameter must be filled: a missing tensor is an error, not a silent
    random weight."""
    targets = hf_key_targets(gpt)
    filled = set()
    with torch.no_grad():
        for name, tensor in params:
            name = name.removeprefix("transformer.")
            if name not in targets:
                continue  # h.N.attn.bias, h.N.attn.masked_bias, lm_head.weight (tied)
            for param, transform in targets[name]:
                value = transform(tensor) if transform else tensor
                if value.shape != param.shape:
                    raise InputError(
                        f"{source}: tensor {name} has shape {tuple(tensor.shape)}, but the "
                        f"model needs {tuple(param.shape)} there"
                        f"{' (after splitting and transposing)' if transform else ''}. "
                        f"{suggest_model(name, tensor)}")
                param.copy_(value)
                filled.add(id(param))
    missing = [n for n, p in gpt.named_parameters() if id(p) not in filled]
    if missing:
        raise InputError(f"{source} is missing {len(missing)} of the model's tensors, "
                         f"e.g. {', '.join(missing[:3])}: not a complete GPT-2 checkpoint "
                         f"of this size.")


def suggest_model(name, tensor):
    if name == "wte.weight" and tensor.dim() == 2:
        for short, key in MODEL_NAMES.items():
            if model_configs[key]["emb_dim"] == tensor.shape[1]:
                return f"These look like {short} weights: use --model {short}."
    return "Check that --model matches the weights."


def check_gpt2_size(entries, config, source):
    """Compares the file's header with the config before reading any tensor, so
    that no model larger than the file's tensors is ever allocated."""
    check_floating(entries, entries, source)
    names = {n.removeprefix("transformer."): e for n, e in entries.items()}
    layers = {int(n.split(".")[1]) for n in names if n.startswith("h.") and n.split(".")[1].isdigit()}
    if "wte.weight" not in names or "wpe.weight" not in names:
        raise InputError(f"{source} has no wte.weight or wpe.weight tensor: not a GPT-2 "
                         f"model.safetensors in the Hub's layout.")
    wte, wpe = names["wte.weight"], names["wpe.weight"]
    if (tuple(wte[1]) != (config["vocab_size"], config["emb_dim"])
            or len(layers) != config["n_layers"]):
        found = f"embedding {tuple(wte[1])}, {len(layers)} layers"
        for short, key in MODEL_NAMES.items():
            cfg = model_configs[key]
            if (cfg["emb_dim"],) == tuple(wte[1])[-1:] and cfg["n_layers"] == len(layers):
                found += f": these are {short} weights, use --model {short}"
        raise InputError(
            f"{source}: tensor wte.weight has shape {tuple(wte[1])} and the file has "
            f"{len(layers)} layers, but the model needs "
            f"{(config['vocab_size'], config['emb_dim'])} and {config['n_layers']} layers "
            f"({found}).")
    if tuple(wpe[1]) != (config["context_length"], config["emb_dim"]):
        raise InputError(f"{source}: tensor wpe.weight has shape {tuple(wpe[1])}, but the "
                         f"model needs {(config['context_length'], config['emb_dim'])}.")


def weights_config(model_name, weights):
    """The model config for --weights: a config.json beside a weights file sets
    the hyper-parameters, otherwise model_name does. A weights file's header is
    checked against it here, before any data is read or written."""
    if weights in ("pretrained", "random"):
        return model_config(model_name)
    path = Path(weights)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputError(f"weights file {path} {what} (--weights takes 'pretrained', "
                         f"'random' or the path of a model.safetensors).")
    hub_config = path.parent / "config.json"
    config = config_from_hub_json(hub_config) if hub_config.is_file() else model_config(model_name)
    check_gpt2_size(read_safetensors_header(path)[0], config, path)
    return config


def load_gpt2_file(path, config, digest=None):
    """GPTModel(config) holding the weights of a Hub-layout model.safetensors;
    digest: a hashlib object to feed the file's bytes as they are read."""
    check_gpt2_size(read_safetensors_header(path)[0], config, path)
    model = GPTModel(config)
    load_weights_into_gpt(model, iter_safetensors(path, digest), source=str(path))
    return model


def build_gpt(model_name="gpt2-small", weights="pretrained", models_dir="gpt2"):
    """Listing 6.6: GPTModel with its weights, "pretrained" (downloaded once, the
    chapter's download_and_load_gpt2), "random", or a path to a Hub-layout
    model.safetensors. Returns (model, config)."""
    config = weights_config(model_name, weights)
    if weights == "random":
        return GPTModel(config), config
    path = download_gpt2(model_name, models_dir) if weights == "pretrained" else Path(weights)
    return load_gpt2_file(path, config), config


# tiktoken's cache of OpenAI's two gpt2 files, kept in the repository for the tests
TOKENIZER_FILES = Path(__file__).resolve().parent / "testdata" / "tiktoken"


def get_tokenizer():
    """tiktoken's gpt2 encoding. tiktoken reads its cache or downloads the files;
    where it can do neither, the repository's copy is used (tiktoken checks the
    files' sha256 either way)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its files on first use
        error = e
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(TOKENIZER_FILES)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        raise InputError(
            f"cannot load tiktoken's gpt2 encoding ({type(error).__name__}: {error}). "
            f"tiktoken downloads it on first use; without network, set TIKTOKEN_CACHE_DIR "
            f"to a folder holding its cached files.") from None
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


def terminate(signum, frame):
    raise Terminated()


def run_cli(main):
    """Runs main(); an expected failure prints one paragraph and exits 1,
    Ctrl-C exits 130 and SIGTERM 143 (whatever main saved before is complete,
    no temporary file is left), a closed output pipe (| head) ends the program
    quietly."""
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


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Load GPT-2 and print the greedy continuation of a prompt "
                    "(the chapter's check that the weights loaded correctly).")
    parser.add_argument("prompt", nargs="?", default="Every effort moves you",
                        help="text to continue (default: %(default)r)")
    parser.add_argument("--model", choices=list(MODEL_NAMES), default="gpt2-small",
                        help="GPT-2 size (default: %(default)s); a config.json beside "
                             "--weights PATH overrides it")
    parser.add_argument("--weights", default="pretrained",
                        help="'pretrained' (downloads the Hub's model.safetensors into "
                             "gpt2/<size>/ once) or the path of a local model.safetensors "
                             "(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=15,
                        help="number of tokens to generate (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must be 0 or more")
    if args.weights == "random":
        parser.error("--weights must be 'pretrained' or a path here")
    tokenizer = get_tokenizer()
    model, config = build_gpt(args.model, args.weights)
    model.eval()
    token_ids = generate_text_simple(
        model=model, idx=text_to_token_ids(args.prompt, tokenizer),
        max_new_tokens=args.max_new_tokens, context_size=config["context_length"])
    print(token_ids_to_text(token_ids, tokenizer))


if __name__ == "__main__":
    run_cli(main)
