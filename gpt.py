"""The GPT-2 model of chapters 4-5 and the loading of OpenAI's weights (section 6.4).

python gpt.py [--model gpt2-small] [--weights pretrained|PATH] "Every effort moves you"
prints the greedy continuation, the chapter's check that the weights loaded.
Chapter 4's model and listing 6.6 come first; the file readers and the rest
follow under "# ===== beyond the chapter".
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
import re
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


# ----------------------------------- 6.4 loading the pretrained weights (listing 6.6)

def build_gpt(model_name="gpt2-small", weights="pretrained", models_dir="gpt2"):
    """Listing 6.6: GPTModel with its weights, "pretrained" (downloaded once),
    "random", or a local file or folder (find_weights). Returns (model, config)."""
    if weights == "random":  # not the book's: an untrained GPT-2, for tests and timings
        config = model_config(model_name)
        return GPTModel(config), config
    # the book's download_and_load_gpt2(model_size, models_dir), which also takes
    # a local file or folder here, and checks it before any model is built
    settings, params = download_and_load_gpt2(model_name, weights, models_dir)
    model = GPTModel(settings)
    load_weights_into_gpt(model, params)
    return model, settings


def download_and_load_gpt2(model_name="gpt2-small", weights="pretrained", models_dir="gpt2"):
    """The chapter's download_and_load_gpt2: (settings, params), params the book's
    nested dict, from the Hub's model.safetensors or OpenAI's checkpoint in
    gpt2/<size>/ (downloaded once), or from the file or folder `weights` names."""
    path = download_gpt2(model_name, models_dir) if weights == "pretrained" else weights
    return load_gpt2(path, model_name)


def load_weights_into_gpt(gpt, params, source="the weights"):
    """Listing 6.6's loader (the book's, from chapter 5): the book's nested params,
    whichever file they came from, into gpt. Not the book's assign calls: one table
    (params_targets), every tensor checked (matched_params) before any is copied."""
    with torch.no_grad():
        for param, value in matched_params(gpt, params, source):
            param.copy_(value)


def params_targets(gpt, params):
    """[(parameter, params keys, how that tensor becomes it)]: the book's assign
    lines as one table. OpenAI's Conv1D weights are (in, out), Linear's (out, in):
    transposed; c_attn holds query, key and value side by side: split in three.
    out_head is tied to wte as in the book, unless params has its own (a .pth)."""
    def transposed(t):
        return t.T

    targets = [(gpt.pos_emb.weight, ["wpe"], None), (gpt.tok_emb.weight, ["wte"], None),
               (gpt.final_norm.scale, ["g"], None), (gpt.final_norm.shift, ["b"], None),
               (gpt.out_head.weight, ["out_head" if "out_head" in params else "wte"], None)]
    for b, block in enumerate(gpt.trf_blocks):
        att, ff = block.att, block.ff
        for i, linear in enumerate([att.W_query, att.W_key, att.W_value]):
            targets += [(linear.weight, ["blocks", b, "attn", "c_attn", "w"],
                         lambda t, i=i: t.chunk(3, dim=-1)[i].T),
                        (linear.bias, ["blocks", b, "attn", "c_attn", "b"],
                         lambda t, i=i: t.chunk(3, dim=-1)[i])]
        for linear, keys in [(att.out_proj, ["attn", "c_proj"]),
                             (ff.layers[0], ["mlp", "c_fc"]), (ff.layers[2], ["mlp", "c_proj"])]:
            targets += [(linear.weight, ["blocks", b, *keys, "w"], transposed),
                        (linear.bias, ["blocks", b, *keys, "b"], None)]
        for norm, key in [(block.norm1, "ln_1"), (block.norm2, "ln_2")]:
            targets += [(norm.scale, ["blocks", b, key, "g"], None),
                        (norm.shift, ["blocks", b, key, "b"], None)]
    return targets


def matched_params(gpt, params, source):
    """[(parameter, value)] for every parameter of gpt, each value checked (a
    float tensor of the parameter's shape) before anything is copied: a missing
    tensor is an error naming it, not a silent random weight."""
    names = {id(param): name for name, param in gpt.named_parameters()}
    pairs = []
    for param, keys, transform in params_targets(gpt, params):
        if param is None:  # qkv_bias=False: W_query, W_key and W_value have no bias
            continue
        where = "params" + "".join(f"[{key!r}]" for key in keys)
        tensor = params
        try:
            for key in keys:
                if not isinstance(tensor, (dict, list)):  # a tensor where keys go on
                    raise KeyError(key)
                tensor = tensor[key]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{source}: {where} is missing (the model's "
                             f"{names[id(param)]}): not a complete GPT-2 checkpoint of "
                             f"this size.") from None
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise InputError(f"{source}: {where} holds "
                             f"{getattr(tensor, 'dtype', type(tensor).__name__)}, not floats.")
        same_dims = tensor.dim() == param.dim()  # split and transpose keep them
        value = transform(tensor) if transform and same_dims else tensor
        if not same_dims or value.shape != param.shape:
            how = " (after splitting and transposing)" if transform else ""
            raise InputError(f"{source}: {where} has shape {tuple(tensor.shape)}, but the "
                             f"model needs {tuple(param.shape)} there{how}. Check that "
                             f"--model matches the weights.")
        pairs.append((param, value))
    assert {id(param) for param, _ in pairs} == set(names), "a parameter params_targets misses"
    return pairs


# ===== beyond the chapter: which file, downloaded where, and checked =====

# the Hub's repository for each size: openai-community/<name>
HUB_NAMES = {"gpt2-small": "gpt2", "gpt2-medium": "gpt2-medium",
             "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl"}
HUB_URL = "https://huggingface.co/openai-community/{}/resolve/main/model.safetensors"
# where chapter 5's gpt_download.py fetches OpenAI's original release
OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}"
# the files of that release read here, the data file last (the release also
# holds model.ckpt.meta, encoder.json and vocab.bpe: tiktoken has the last two)
OPENAI_FILES = ["checkpoint", "hparams.json", "model.ckpt.index",
                "model.ckpt.data-00000-of-00001"]


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


def gpt2_folder(model_name, models_dir="gpt2"):
    """gpt2/124M/ for gpt2-small: where chapter 5 leaves OpenAI's files."""
    size = MODEL_NAMES[model_name].split("(")[-1].rstrip(")")  # "124M"
    return Path(models_dir) / size


def gpt2_weights_path(model_name, models_dir="gpt2"):
    """The file --weights pretrained reads in gpt2/<size>/: the Hub's
    model.safetensors, else OpenAI's checkpoint where chapter 5 left it (its data
    file, the last one downloaded), else model.safetensors, where a download goes."""
    folder = gpt2_folder(model_name, models_dir)
    hub_file, openai_data = folder / "model.safetensors", folder / OPENAI_FILES[-1]
    if not hub_file.exists() and openai_data.exists():
        return openai_data
    return hub_file


def download_gpt2(model_name, models_dir="gpt2", flag="--weights"):
    """The weights of one GPT-2 size in gpt2/<size>/, downloaded once: the Hub's
    model.safetensors, or where the Hub cannot be reached, OpenAI's original
    files from the URLs chapter 5 uses. Returns the file to read (as
    gpt2_weights_path); a failure names `flag`, the option of the calling
    command that takes a local file."""
    path = gpt2_weights_path(model_name, models_dir)
    if path.exists():
        return path
    what = f"the {model_name} weights"
    try:
        return download_file(HUB_URL.format(HUB_NAMES[model_name]), path, what,
                             "OpenAI's original files were tried next")
    except InputError as hub_error:
        size, folder = gpt2_folder(model_name, models_dir).name, path.parent
        hint = (f"download model.safetensors of openai-community/{HUB_NAMES[model_name]} "
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
    """(size in bytes, sha256 hex) of a file, read in 1 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return os.path.getsize(path), digest.hexdigest()


def load_gpt2(weights, model_name="gpt2-small", config=None):
    """(settings, params) from any of the three forms --weights takes, checked
    against the settings (or `config`, where the caller knows it) before a model
    is built: sizes first, then every tensor on an empty model."""
    form, path = find_weights(weights)
    config_file = None
    if config is None:
        config, config_file = settings_for(form, path, model_name)
    params = read_params(form, path, config["n_layers"])
    source = f"{path.parent} (OpenAI's checkpoint)" if form == "tf" else str(path)
    check_gpt2_size(params, config, source, config_file)
    with torch.device("meta"):  # shapes only: no memory
        matched_params(GPTModel(config), params, source)
    return config, params


def settings_for(form, path, model_name):
    """(config, the file it came from or None): hparams.json beside OpenAI's
    checkpoint, a config.json (the Hub's naming or the book's) beside a
    model.safetensors or a .pth, else --model's size."""
    beside = path.parent / ("hparams.json" if form == "tf" else "config.json")
    if beside.is_file():
        # None: the naming the file itself shows (the Hub's or the book's)
        return config_from_json(beside, "openai" if form == "tf" else None), beside
    return model_config(model_name), None


def read_params(form, path, n_layers):
    """The book's nested params from one file, every tensor a view of the file
    mapped into memory (a .pth's fused c_attn aside): nothing read yet."""
    if form == "safetensors":
        return params_from_hub(load_safetensors(path)[0])
    if form == "pth":
        return params_from_book(read_pth(path))
    prefix = tf_prefix(path)
    return params_from_tf(read_tf_checkpoint(prefix), n_layers, f"{prefix}.index")


def check_gpt2_size(params, config, source, config_file=None):
    """Compares the file's embeddings and layer count with the config before any
    tensor is read, so that no model larger than the file's tensors is ever
    allocated; suggests the --model the tensors fit."""
    if params.get("wte") is None or params.get("wpe") is None:
        raise InputError(f"{source} has no token or position embedding (wte, wpe): "
                         f"not GPT-2 weights.")
    wte, wpe = tuple(params["wte"].shape), tuple(params["wpe"].shape)
    layers = sum(1 for block in params["blocks"] if block)
    needs = "the model needs" if config_file is None else f"{config_file} says"
    if wte != (config["vocab_size"], config["emb_dim"]) or layers != config["n_layers"]:
        fits = [short for short, key in MODEL_NAMES.items()
                if (model_configs[key]["emb_dim"],) == wte[-1:]
                and model_configs[key]["n_layers"] == layers]
        hint = f" (these are {fits[0]} weights: use --model {fits[0]})" \
            if fits and config_file is None else ""
        raise InputError(
            f"{source}: wte (the token embedding) has shape {wte} and there are {layers} "
            f"layers, but {needs} {(config['vocab_size'], config['emb_dim'])} and "
            f"{config['n_layers']} layers{hint}.")
    if wpe != (config["context_length"], config["emb_dim"]):
        raise InputError(f"{source}: wpe (the position embedding) has shape {wpe}, but "
                         f"{needs} {(config['context_length'], config['emb_dim'])}.")


def weights_config(model_name, weights):
    """The model config for --weights: where a file or folder is given, from the
    config beside it (settings_for) or model_name, checked against the file's
    tensors here, before any data is read or written."""
    if weights in ("pretrained", "random"):
        return model_config(model_name)
    return load_gpt2(weights, model_name)[0]


def load_gpt2_file(path, config):
    """GPTModel(config) holding the weights of any --weights file or folder."""
    settings, params = load_gpt2(path, config=config)
    model = GPTModel(settings)
    load_weights_into_gpt(model, params, source=str(path))
    return model


def find_weights(weights, flag="--weights"):
    """What a --weights PATH names -> (form, file): "safetensors" (a
    model.safetensors, or a folder holding one), "tf" (OpenAI's checkpoint: its
    folder, the model.ckpt prefix or any of its files; file = its data file) or
    "pth" (the book's .pth). The file is the one whose bytes are the weights."""
    path = Path(weights)
    if path.name in ("checkpoint", "hparams.json") and path.is_file():
        path = path.parent  # a file of OpenAI's release that names no weights: its folder
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return "safetensors", path / "model.safetensors"
        prefix = path / checkpoint_prefix_name(path)
        if Path(f"{prefix}.index").is_file():
            return "tf", tf_data_file_of(prefix)
        raise InputError(f"weights folder {path} has neither a model.safetensors nor "
                         f"OpenAI's checkpoint (hparams.json, model.ckpt.index, "
                         f"model.ckpt.data-...).")
    prefix = tf_prefix(path)
    if prefix is not None:
        return "tf", tf_data_file_of(prefix)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist ({flag} takes a "
                         f"model.safetensors, the book's .pth, OpenAI's model.ckpt or a "
                         f"folder holding a model.safetensors or OpenAI's checkpoint).")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format is a zip archive
    return ("pth" if is_zip or path.suffix in (".pth", ".pt") else "safetensors"), path


def checkpoint_prefix_name(folder):
    """The checkpoint a folder's "checkpoint" file names (what TensorFlow's
    latest_checkpoint reads), else model.ckpt."""
    try:
        text = (folder / "checkpoint").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return "model.ckpt"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model_checkpoint_path":
            return Path(value.strip().strip('"')).name or "model.ckpt"
    return "model.ckpt"


def tf_prefix(path):
    """The checkpoint prefix of model.ckpt, model.ckpt.index, .meta or .data-*, or None."""
    name = path.name
    for ending in (".index", ".meta"):
        if name.endswith(ending):
            return path.with_name(name[:-len(ending)])
    if ".data-" in name:
        return path.with_name(name.rsplit(".data-", 1)[0])
    if not path.exists() and Path(f"{path}.index").is_file():
        return path
    return None


def tf_data_file_of(prefix):
    """A checkpoint's first data file (OpenAI's have one)."""
    files = sorted(Path(prefix).parent.glob(f"{Path(prefix).name}.data-00000-of-*"))
    return files[0] if files else tf_data_file(prefix, 0, 1)


def weights_file(weights, model_name="gpt2-small", models_dir="gpt2", flag="--weights"):
    """The file whose bytes are the weights `flag` names (for fingerprints)."""
    if weights == "pretrained":
        return gpt2_weights_path(model_name, models_dir)
    return find_weights(weights, flag)[1]


# our config key -> its name in a Hub config.json, OpenAI's hparams.json and the
# book's config dict (as beside a .pth)
CONFIG_NAMES = {
    "hub": {"vocab_size": "vocab_size", "context_length": "n_positions",
            "emb_dim": "n_embd", "n_layers": "n_layer", "n_heads": "n_head"},
    "openai": {"vocab_size": "n_vocab", "context_length": "n_ctx",
               "emb_dim": "n_embd", "n_layers": "n_layer", "n_heads": "n_head"},
    "book": {"vocab_size": "vocab_size", "context_length": "context_length",
             "emb_dim": "emb_dim", "n_layers": "n_layers", "n_heads": "n_heads"},
}


def config_from_json(path, naming=None):
    """Our config from a JSON file of hyper-parameters in one of CONFIG_NAMES'
    namings; naming None: the Hub's where the file has n_embd, else the book's."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the model config {path}: {e}.") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the model config is not a JSON object.")
    names = CONFIG_NAMES[naming or ("hub" if "n_embd" in raw else "book")]
    config = dict(BASE_CONFIG)
    for ours, theirs in names.items():
        config[ours] = raw.get(theirs, config.get(ours))
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


# ===== beyond the chapter: the book's params, from any of three files =====

def params_from_tf(variables, n_layers, source):
    """The book's load_gpt2_params_from_tf_ckpt without TensorFlow: OpenAI's names
    ("model/h0/attn/c_attn/w") become nested keys (params["blocks"][0]["attn"]
    ["c_attn"]["w"]), each array squeezed ([1, in, out] -> (in, out))."""
    params = {"blocks": [{} for _ in range(n_layers)]}
    for name, tensor in variables.items():
        parts = name.split("/")[1:]  # without the "model/" prefix
        if not name.startswith("model/") or not parts:
            continue
        target = params
        if parts[0][:1] == "h" and parts[0][1:].isdigit():
            layer = int(parts[0][1:])
            if layer >= n_layers:
                raise InputError(f"{source} has a layer {parts[0]}, but the model config "
                                 f"has {n_layers} layers.")
            target = params["blocks"][layer]
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = tensor.squeeze()
    return params


def params_from_hub(tensors):
    """The Hub's names ("h.0.attn.c_attn.weight", Conv1D weights already (in, out))
    -> the book's nested params; the h.N.attn.bias mask buffers are left out."""
    params = {"blocks": []}
    for name, tensor in tensors.items():
        parts = name.removeprefix("transformer.").split(".")
        if parts[:1] in (["wte"], ["wpe"]) and parts[1:] == ["weight"]:
            params[parts[0]] = tensor
        elif parts[0] == "ln_f" and len(parts) == 2:
            params[{"weight": "g", "bias": "b"}.get(parts[1], parts[1])] = tensor
        elif parts[0] == "h" and len(parts) in (4, 5) and parts[1].isdigit() and \
                parts[-1] in ("weight", "bias") and parts[2:4] != ["attn", "bias"]:
            blocks = params["blocks"]
            blocks.extend({} for _ in range(int(parts[1]) + 1 - len(blocks)))
            target = blocks[int(parts[1])]
            for key in parts[2:-1]:
                target = target.setdefault(key, {})
            layer_norm = parts[2].startswith("ln_")
            target[{"weight": "g" if layer_norm else "w", "bias": "b"}[parts[-1]]] = tensor
    return params


# the book's GPTModel names inside a block -> where the tensor goes in params
BOOK_BLOCK_NAMES = {
    "att.out_proj": ("attn", "c_proj"), "ff.layers.0": ("mlp", "c_fc"),
    "ff.layers.2": ("mlp", "c_proj"), "norm1": ("ln_1",), "norm2": ("ln_2",)}


def params_from_book(state):
    """The book's state_dict (.pth) -> its nested params: Linear weights back to
    (in, out), W_query/W_key/W_value fused into c_attn as OpenAI stores them, the
    att.mask buffers left out and out_head kept as given (the book ties it to wte
    only when loading OpenAI's weights)."""
    params = {"blocks": []}
    top = {"tok_emb.weight": "wte", "pos_emb.weight": "wpe", "final_norm.scale": "g",
           "final_norm.shift": "b", "out_head.weight": "out_head"}
    fused = {}  # block -> {"W_query.weight": tensor, ...}
    for name, tensor in state.items():
        if name in top:
            params[top[name]] = tensor
            continue
        parts = name.split(".")
        if parts[0] != "trf_blocks" or not parts[1].isdigit():
            continue
        layer, module, leaf = int(parts[1]), ".".join(parts[2:-1]), parts[-1]
        params["blocks"].extend({} for _ in range(layer + 1 - len(params["blocks"])))
        if module in ("att.W_query", "att.W_key", "att.W_value"):
            fused.setdefault(layer, {})[f"{module[4:]}.{leaf}"] = tensor
        elif module in BOOK_BLOCK_NAMES:
            target = params["blocks"][layer]
            for key in BOOK_BLOCK_NAMES[module]:
                target = target.setdefault(key, {})
            key = {"scale": "g", "shift": "b", "weight": "w", "bias": "b"}.get(leaf, leaf)
            target[key] = tensor.T if leaf == "weight" else tensor
    for layer, parts in fused.items():
        c_attn = params["blocks"][layer].setdefault("attn", {}).setdefault("c_attn", {})
        for leaf, key in (("weight", "w"), ("bias", "b")):
            qkv = [parts.get(f"{m}.{leaf}") for m in ("W_query", "W_key", "W_value")]
            if all(t is not None for t in qkv):  # a missing one is reported as missing
                # (in, 3 * out): the one copy this format needs, a quarter of a block
                c_attn[key] = torch.cat([t.T if leaf == "weight" else t for t in qkv], dim=-1)
    return params


def read_pth(path):
    """The book's .pth: torch.load with weights_only=True, which refuses anything
    but tensors and plain containers (no code runs), memory-mapped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several kinds for a damaged or unsafe file
        if "Weights only load failed" in str(e):
            # torch names the class it refused: "Unsupported global: GLOBAL m.C"
            # (torch 2.4+) or "Unsupported class m.C" (earlier)
            found = re.search(r"Unsupported (?:global: GLOBAL |class )(\S+)", str(e))
            what = found.group(1).rstrip(".") if found else "other objects"
            raise InputError(f"{path} was refused by torch.load(weights_only=True): it refers "
                             f"to {what}, not only to tensors (nothing in it was run).") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise InputError(f"{path} could not be read by torch.load(weights_only=True): "
                         f"{first.rstrip('.')}.") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{path} does not hold a state_dict (names -> tensors) as the "
                         f"book's torch.save(model.state_dict()) writes.")
    return state


# ===== beyond the chapter: safetensors files =====

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


# ===== beyond the chapter: OpenAI's TensorFlow checkpoint, by hand =====

# The .index file is a LevelDB-format table (TensorFlow's tensor_bundle): sorted
# keys, each a variable name, whose values are BundleEntryProto messages saying
# where in the data file its bytes are. Read here without TensorFlow or protobuf.
TABLE_MAGIC = 0xDB4775248B80FB57
TABLE_FOOTER_BYTES = 48  # two block handles, padding, the magic
# TensorFlow's DataType numbers: the floats a GPT-2 can be stored in -> (torch dtype, bytes)
TF_FLOAT_DTYPES = {1: (torch.float32, 4), 2: (torch.float64, 8), 14: (torch.bfloat16, 2),
                   19: (torch.float16, 2)}
TF_DTYPE_NAMES = {1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8",
                  5: "DT_INT16", 6: "DT_INT8", 7: "DT_STRING", 9: "DT_INT64", 10: "DT_BOOL",
                  14: "DT_BFLOAT16", 19: "DT_HALF"}


def crc32c_table():
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (0x82F63B78 if n & 1 else 0)  # the Castagnoli polynomial, reflected
        table.append(n)
    return table


CRC32C_TABLE = crc32c_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    """The form LevelDB stores a block's checksum in (rotated, plus a constant)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class DamagedFile(Exception):
    """A problem inside a checkpoint file; the caller names the file."""


def read_varint(raw, pos):
    """A protobuf/LevelDB varint at raw[pos:] -> (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise DamagedFile("a number runs past its end")
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def proto_fields(raw):
    """Protobuf wire format -> {field number: [values]}: varints and fixed
    numbers as ints, length-delimited fields (strings, messages) as bytes."""
    fields, pos = {}, 0
    while pos < len(raw):
        tag, pos = read_varint(raw, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = read_varint(raw, pos)
        elif wire in (1, 2, 5):
            size = {1: 8, 5: 4}.get(wire)
            if size is None:
                size, pos = read_varint(raw, pos)
            if pos + size > len(raw):
                raise DamagedFile("a field runs past the end of its entry")
            value = raw[pos:pos + size]
            if wire != 2:
                value = int.from_bytes(value, "little")
            pos += size
        else:
            raise DamagedFile(f"an entry has a field of unknown wire type {wire}")
        fields.setdefault(tag >> 3, []).append(value)
    return fields


def block_entries(raw, handle):
    """The (key, value) pairs of one table block; its checksum is checked first."""
    (offset, size), end = handle, len(raw) - TABLE_FOOTER_BYTES
    if offset + size + 5 > end:
        raise DamagedFile(f"a block at byte {offset:,} runs past the end of the file (truncated?)")
    block, kind = raw[offset:offset + size], raw[offset + size]
    (stored_crc,) = struct.unpack("<I", raw[offset + size + 1:offset + size + 5])
    if kind != 0:
        raise DamagedFile(f"a block is compressed (type {kind}); TensorFlow writes them "
                          f"uncompressed")
    if masked_crc32c(block + bytes([kind])) != stored_crc:
        raise DamagedFile(f"the block at byte {offset:,} fails its crc32c check")
    if size < 4:
        raise DamagedFile(f"the block at byte {offset:,} is too short")
    (num_restarts,) = struct.unpack("<I", block[-4:])
    entries_end = size - 4 - 4 * num_restarts
    if entries_end < 0:
        raise DamagedFile(f"the block at byte {offset:,} is too short")
    entries, pos, key = [], 0, b""
    while pos < entries_end:
        shared, pos = read_varint(block, pos)
        own, pos = read_varint(block, pos)
        value_size, pos = read_varint(block, pos)
        if shared > len(key) or pos + own + value_size > entries_end:
            raise DamagedFile(f"an entry of the block at byte {offset:,} is damaged")
        key = key[:shared] + block[pos:pos + own]  # keys share a prefix with the one before
        entries.append((key, block[pos + own:pos + own + value_size]))
        pos += own + value_size
    return entries


def block_handle(raw, pos=0):
    offset, pos = read_varint(raw, pos)
    size, pos = read_varint(raw, pos)
    return (offset, size), pos


def read_table(raw):
    """A LevelDB-format table (uncompressed) -> {key: value}: the footer points at
    the index block, whose values point at the data blocks."""
    if len(raw) < TABLE_FOOTER_BYTES or struct.unpack("<Q", raw[-8:])[0] != TABLE_MAGIC:
        raise DamagedFile("it does not end with a table footer (truncated?)")
    footer = raw[-TABLE_FOOTER_BYTES:]
    _, pos = block_handle(footer)  # the metaindex block: TensorFlow leaves it empty
    index_handle, _ = block_handle(footer, pos)
    table = {}
    for _, handle in block_entries(raw, index_handle):
        table.update(block_entries(raw, block_handle(handle)[0]))
    return table


def first_field(fields, number, kind):
    """The first value of a field, of the type its wire type must give."""
    value = fields.get(number, [kind()])[0]
    if not isinstance(value, kind):
        raise DamagedFile(f"field {number} of an entry has the wrong wire type")
    return value


def bundle_entry(value):
    """A BundleEntryProto -> (dtype, shape, shard, offset, size)."""
    fields = proto_fields(value)
    if 7 in fields:
        raise DamagedFile("a variable is stored in slices (partitioned), which is not read here")
    shape_fields = proto_fields(first_field(fields, 2, bytes))  # TensorShapeProto
    dims = shape_fields.get(2, [])
    if not all(isinstance(dim, bytes) for dim in dims):
        raise DamagedFile("a shape of an entry is damaged")
    shape = tuple(first_field(proto_fields(dim), 1, int) for dim in dims)
    dtype, shard, offset, size = (first_field(fields, n, int) for n in (1, 3, 4, 5))
    return dtype, shape, shard, offset, size


def tf_data_file(prefix, shard, num_shards):
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def read_tf_index(index):
    """model.ckpt.index -> ({variable name: (dtype, shape, shard, offset, size)},
    number of data files), each entry checked against its dtype and shape."""
    try:
        table = read_table(index.read_bytes())
        header = proto_fields(table.pop(b"", b""))  # BundleHeaderProto
        num_shards = first_field(header, 1, int) or 1
        if first_field(header, 2, int) != 0:
            raise DamagedFile("its data is big-endian")
        entries = {key.decode("utf-8", "replace"): bundle_entry(value)
                   for key, value in table.items()}
    except DamagedFile as e:
        raise InputError(f"{index} is not a valid TensorFlow checkpoint index: {e}.") from None
    except OSError as e:
        raise InputError(f"cannot read {index}: {e.strerror or e}.") from None
    for name, (dtype, shape, _, _, size) in entries.items():
        if dtype not in TF_FLOAT_DTYPES:
            raise InputError(f"{index}: variable {name} has dtype "
                             f"{TF_DTYPE_NAMES.get(dtype, dtype)}; GPT-2's weights are "
                             f"floats (DT_FLOAT, DT_HALF, DT_BFLOAT16 or DT_DOUBLE).")
        needed = math.prod(shape) * TF_FLOAT_DTYPES[dtype][1]
        if size != needed:
            raise InputError(f"{index}: variable {name} has {size:,} bytes but "
                             f"{TF_DTYPE_NAMES[dtype]} x {list(shape)} needs {needed:,}.")
    spans = sorted((shard, offset, offset + size, name)
                   for name, (_, _, shard, offset, size) in entries.items() if size)
    for (sh1, _, e1, n1), (sh2, s2, _, n2) in zip(spans, spans[1:]):
        if sh1 == sh2 and s2 < e1:
            raise InputError(f"{index}: variables {n1} and {n2} overlap in the data file.")
    return entries, num_shards


def read_tf_checkpoint(prefix):
    """{variable name: tensor} of a TensorFlow checkpoint (model.ckpt.index and its
    data file), each tensor a view of the memory-mapped data file: nothing is
    copied until used. Sizes, offsets, dtypes and the index's checksums are
    checked; the data's own crc32c are not (see notes/weights.md)."""
    entries, num_shards = read_tf_index(Path(f"{prefix}.index"))
    buffers, tensors = {}, {}
    for name, (dtype, shape, shard, offset, size) in entries.items():
        data_file = tf_data_file(prefix, shard, num_shards)
        if shard not in buffers:
            buffers[shard] = map_data_file(data_file)
        if offset + size > len(buffers[shard]):
            raise InputError(f"{data_file} is truncated: variable {name} ends at byte "
                             f"{offset + size:,} and the file has {len(buffers[shard]):,}.")
        torch_dtype, item_size = TF_FLOAT_DTYPES[dtype]
        flat = torch.frombuffer(buffers[shard], dtype=torch_dtype, count=size // item_size,
                                offset=offset) if size else torch.empty(0, dtype=torch_dtype)
        tensors[name] = flat.view(shape)
    return tensors


def map_data_file(path):
    """A copy-on-write memory map of a whole file (b"" when empty)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}.") from None


# ===== beyond the chapter: progress on a terminal =====

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


# ===== beyond the chapter: the tokenizer's files and the command line =====

# tiktoken's cache of OpenAI's two gpt2 files, kept in the repository for the tests
TOKENIZER_FILES = Path(__file__).resolve().parent / "testdata" / "tiktoken"


def get_tokenizer():
    """The chapter's tiktoken.get_encoding("gpt2"). tiktoken reads its cache or
    downloads the files; where it can do neither, the repository's copy is used
    (repository_tokenizer)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its files on first use
        return repository_tokenizer(e)


def repository_tokenizer(error):
    """tiktoken's gpt2 encoding from the repository's copy of its files (tiktoken
    checks their sha256), TIKTOKEN_CACHE_DIR left as it was; where that fails
    too, an InputError that names `error`, why the first try failed."""
    import tiktoken
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
                        help="GPT-2 size (default: %(default)s); a config.json (or "
                             "OpenAI's hparams.json) beside --weights PATH overrides it")
    parser.add_argument("--weights", default="pretrained",
                        help="'pretrained' (gpt2/<size>/ as chapter 5 left it with "
                             "OpenAI's checkpoint, else the Hub's model.safetensors "
                             "downloaded there once, else OpenAI's files) or a local file: "
                             "a model.safetensors (Hub layout), the book's .pth, or OpenAI's "
                             "model.ckpt (its prefix or any of its files); or a folder "
                             "holding a model.safetensors (+ config.json) or OpenAI's "
                             "checkpoint (hparams.json, model.ckpt.*) (default: %(default)s)")
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
