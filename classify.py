"""What a fine-tuned classifier is, and section 6.8: using it.

The GPT-2 with its new head as one module (GPTClassifier: pooling, the frozen-
prefix cache, the one-position last block), the LoRA layers of appendix E, and
the checkpoint: review_classifier.safetensors, saved and loaded. finetune.py
trains what this file defines; this file never imports finetune.py. Listing
6.12 comes first, then the classifier and its saving; the rest follows under
"# ===== beyond the chapter".

python classify.py "You are a winner you have been specially selected ..."
python classify.py --checkpoint runs/a/review_classifier.safetensors - < messages.txt
"""
import argparse
import base64
import contextlib
import errno
import hashlib
import http.server
import ipaddress
import json
import math
import os
import queue
import re
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from gpt import (MODEL_NAMES, GPTModel, InputError, check_config, check_floating,
                 download_gpt2, file_fingerprint, get_tokenizer, load_gpt2_file,
                 load_safetensors, model_config, progress, read_safetensors_header, run_cli,
                 save_safetensors, tensor_bytes, weights_file, write_all)
import torch
import torch.distributed as dist
from data import PAD_TOKEN_ID, SPAM_CLASS_NAMES, encode, pad_ids

CHECKPOINT_NAME = "review_classifier.safetensors"


CHECKPOINT_FORMAT = "gpt2-classifier/1"


PRECISIONS = {  # --precision: the dtype of the matrix products (None: the weights' own)
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


POOLS = {  # which output position the head reads
    "last": "the last position of the padded sequence (the chapter)",
    "first": "the first token (Exercise 6.3)",
    "flexible": "the last real, non-padding token; batches padded to their own longest",
    "mean": "the average over the real tokens",
}


# ------------------------------------------- 6.8 using the model to classify (listing 6.12)

def classify_review(text, model, tokenizer, device, max_length=None,
                    pad_token_id=PAD_TOKEN_ID, class_names=SPAM_CLASS_NAMES):
    """Listing 6.12: the class name of one text."""
    model.eval()
    input_ids = encode(text, tokenizer)  # the book's tokenizer.encode(text), see encode
    # not the book's shape[1] (the embedding size): shape[0] is the context length,
    # as the book's own repository fixed it (rasbt/LLMs-from-scratch#371)
    supported_context_length = model.gpt.pos_emb.weight.shape[0]
    # not the book's: None means the whole context; the book's fails in min()
    # (rasbt/LLMs-from-scratch#666)
    if max_length is None:
        max_length = supported_context_length
    # not the book's: max_length is clamped before padding too; the book pads to
    # max_length, which past the context has no position embedding
    # (rasbt/LLMs-from-scratch#497)
    max_length = min(max_length, supported_context_length)
    input_ids = input_ids[:max_length]  # truncates sequences that are too long
    input_ids += [pad_token_id] * (max_length - len(input_ids))
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)  # adds batch dim
    with torch.inference_mode():  # the book's no_grad, with less bookkeeping
        logits = model(input_tensor)  # the chapter's model(input_tensor)[:, -1, :]
    predicted_label = torch.argmax(logits, dim=-1).item()
    # not the book's "spam" if 1 else "not spam": the checkpoint's class names,
    # which are those for the SMS data
    return class_names[predicted_label]


# ------------------ the classifier: GPT-2 with its new head, the chapter's model(x)[:, -1, :]

class GPTClassifier(torch.nn.Module):
    """The chapter's `model(input_batch)[:, -1, :]` as one module: token ids
    (b, T) -> class logits (b, num_classes), read at the `pool` position.

    forward with fast=False is the chapter's plain pass. fast=True (the default)
    computes the same with less work, in fast_forward:
    - the output of the frozen prefix (embeddings and the first, frozen blocks)
      never changes when dropout is off, so it is computed once per message and
      kept in prefix_cache;
    - the last block computes its query, attention output and feed-forward at
      the pooled position only (last_block_at; keys and values still come from
      all positions)."""

    def __init__(self, gpt, pool="last", pad_token_id=PAD_TOKEN_ID, fast=True,
                 precision="fp32"):
        super().__init__()
        self.gpt = gpt
        self.pool = pool
        self.pad_token_id = pad_token_id
        self.fast = fast
        self.precision = precision  # "fp32" (the chapter), "bf16" or "fp16": see forward
        self.n_cached = None  # set by enable_prefix_cache
        self.prefix_cache = PrefixCache()
        self.rounding, self.rounds_after = None, None  # set by round_frozen_prefix
        self.grad_scaler = None  # --precision fp16's loss scaling, set by finetune.py

    def forward(self, input_batch):
        if self.precision != "fp32":  # --precision's speed, outside the chapter's pass
            return self.mixed_precision_forward(input_batch)
        if self.fast:
            return self.fast_forward(input_batch)
        outputs = self.gpt(input_batch)  # (b, num_tokens, num_classes)
        if self.pool == "last":
            return outputs[:, -1, :]  # the chapter's: the last output token
        return self.pool_outputs(outputs, input_batch)  # not the chapter's: --pool

    def pool_outputs(self, outputs, input_batch):
        # (b, T, n) -> (b, n): the chapter's outputs[:, -1, :] and its variants
        positions = pool_positions(input_batch, self.pool, self.pad_token_id)
        if positions is None:
            return mean_over_real_tokens(outputs, input_batch, self.pad_token_id)
        return take_positions(outputs, positions)[:, 0, :]

    # ------------------------------------ --precision bf16 and fp16

    def mixed_precision_forward(self, input_batch):
        """forward's result with the matrix products in bfloat16 or float16
        (torch.autocast: weights, layer norms, softmax's sums and the residual
        stream stay float32), logits returned as float32. The autocast opens and
        closes with each pass: one left open across optimizer steps keeps reusing
        its first low-precision copy of the weights, so training never sees its
        own updates (and AdamW drifts the float32 weights it cannot see)."""
        with self.autocast(input_batch):
            if self.fast:
                logits = self.fast_forward(input_batch)
            else:  # the plain pass, as forward's ("last": outputs[:, -1, :])
                logits = self.pool_outputs(self.gpt(input_batch), input_batch)
        logits = logits.float()  # (b, num_classes)
        if self.grad_scaler is not None and logits.requires_grad:
            # fp16's loss scaling, applied to the gradient where it enters the
            # model: the same as the book's loss.backward() on a scaled loss
            logits.register_hook(self.grad_scaler.scale)
        return logits

    def round_frozen_prefix(self):
        """Under bf16/fp16 the cache keeps the frozen prefix's output in that
        dtype (half the bytes). Rounding that output to it in every pass, cached
        or not, keeps --plain computing exactly what the cache gives."""
        if self.rounding is not None:
            self.rounding.remove()
            self.rounding, self.rounds_after = None, None
        n = frozen_prefix_length(self.gpt)
        if self.precision == "fp32" or n is None:
            return
        dtype = PRECISIONS[self.precision]
        self.rounds_after = n - 1  # the index of the last frozen block
        self.rounding = self.gpt.trf_blocks[n - 1].register_forward_hook(
            lambda block, inputs, output: output.to(dtype).to(output.dtype))

    def cache_dtype(self):
        """The dtype the prefix cache stores: the compute precision's."""
        return PRECISIONS[self.precision] or self.gpt.tok_emb.weight.dtype

    # ------------------------------------ the same result with less work

    def enable_prefix_cache(self, budget=None, spill_dir=None):
        """Caches the frozen prefix's output from now on, where it applies (frozen
        embeddings and first block, no dropout, budget not 0); returns whether it
        does. Only for fine-tuning: the cache keeps every message it has seen,
        budget bytes of them on the device (None: no limit), the rest in a
        temporary file in spill_dir (None: recomputed)."""
        self.n_cached = frozen_prefix_length(self.gpt) if self.fast and budget != 0 else None
        self.prefix_cache.close()
        self.prefix_cache = PrefixCache(budget, spill_dir)
        return self.n_cached is not None

    def fast_forward(self, input_batch):
        """forward's result: the frozen prefix from the cache (when enabled), the
        last block at the pooled position only (all positions for "mean")."""
        x = self.frozen_prefix(input_batch)  # (b, T, emb_dim)
        blocks = self.gpt.trf_blocks[self.n_cached or 0:]
        positions = pool_positions(input_batch, self.pool, self.pad_token_id)
        if positions is None or len(blocks) == 0:
            x = self.gpt.final_norm(blocks(x))
            return self.gpt.out_head(self.pool_outputs(x, input_batch))
        x = blocks[:-1](x)
        x = last_block_at(blocks[-1], x, positions)  # (b, 1, emb_dim)
        if self.rounds_after == len(self.gpt.trf_blocks) - 1:
            # every block frozen and no cache: last_block_at bypasses the hook
            x = x.to(PRECISIONS[self.precision]).to(x.dtype)
        return self.gpt.out_head(self.gpt.final_norm(x[:, 0, :]))

    def fill_prefix_cache(self, datasets, batch_size=32, rank=0, world=1):
        """Computes the frozen prefix of every message once, up front, in batches
        of similar length: far less padding than the shuffled training batches.
        The shortest come first, so a budget keeps as many messages as it can.
        Under torchrun (world processes) each computes every world-th batch and
        broadcasts it: each ends with the cache one process fills, world times
        sooner. Returns the seconds it took, the batches, and how many of them
        this process computed."""
        start_time = time.time()
        if self.n_cached is None:
            return {"fill_seconds": 0.0, "fill_batches": 0, "fill_batches_computed_here": 0}
        # each distinct message once: the SMS data repeats some texts word for word
        distinct = {tuple(ids.tolist()): ids for dataset in datasets for ids, _ in dataset}
        messages = sorted(distinct.values(), key=len)
        device = self.gpt.tok_emb.weight.device
        starts = range(0, len(messages), batch_size)
        for first in range(0, len(starts), world):  # a round: one batch per process
            hidden = {}
            batches = [pad_ids(messages[i:i + batch_size], self.pad_token_id).to(device)
                       for i in starts[first:first + world]]
            if rank < len(batches):
                hidden[rank] = self.prefix_hidden(batches[rank])
            for owner, batch in enumerate(batches):
                if world > 1:
                    hidden[owner] = broadcast_from(owner, hidden.get(owner), (
                        *batch.shape, self.gpt.tok_emb.weight.shape[1]), self.cache_dtype(),
                        device)
                self.store(batch, hidden[owner])
            done = min(starts[first + len(batches) - 1] + batch_size, len(messages))
            progress("caching the frozen layers' output, messages", done, len(messages),
                     start_time)
        return {"fill_seconds": round(time.time() - start_time, 1), "fill_batches": len(starts),
                "fill_batches_computed_here": len(range(rank, len(starts), world))}

    def prefix_keys(self, input_batch):
        """Each row's cache key (its token ids) and how many positions it keeps:
        all of them when pool is "last" (it reads a padding position), only the
        real tokens otherwise (later padding cannot change them, through the
        causal mask)."""
        b, num_tokens = input_batch.shape
        if self.pool == "last":
            keep = [num_tokens] * b
        else:
            keep = real_lengths(input_batch, self.pad_token_id).tolist()
        return [tuple(ids[:n]) for ids, n in zip(input_batch.tolist(), keep)], keep

    def prefix_hidden(self, input_batch):
        """The frozen prefix's output, (b, T, emb_dim), in the cache's dtype."""
        # outside inference mode: cached tensors are later used in training
        with torch.inference_mode(False), torch.no_grad(), self.autocast(input_batch):
            hidden = self.gpt.embed(input_batch.clone())
            hidden = self.gpt.trf_blocks[:self.n_cached](hidden)
        return hidden.to(self.cache_dtype())

    def autocast(self, input_batch):
        """--precision bf16/fp16's autocast on the batch's device (fp32: none)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(input_batch.device.type, dtype=dtype)

    def store(self, input_batch, hidden):
        keys, keep = self.prefix_keys(input_batch)
        for row, key in enumerate(keys):
            self.prefix_cache.put(key, hidden[row, :keep[row]])

    def frozen_prefix(self, input_batch):
        """Output of the embeddings and the first n_cached blocks, (b, T, emb_dim),
        each message computed once (keyed as prefix_keys says)."""
        if self.n_cached is None:
            return self.gpt.embed(input_batch)
        keys, keep = self.prefix_keys(input_batch)
        rows = {}  # batch row -> hidden states computed now
        missing = [i for i, key in enumerate(keys) if key not in self.prefix_cache]
        if missing:
            hidden = self.prefix_hidden(input_batch[missing])
            for row, i in enumerate(missing):
                rows[i] = hidden[row, :keep[i]]
                self.prefix_cache.put(keys[i], rows[i])
        weight = self.gpt.tok_emb.weight
        b, num_tokens = input_batch.shape
        # in the weights' dtype (float32 under --precision bf16/fp16): the residual
        # stream's, which holds the cache's values exactly
        x = torch.zeros(b, num_tokens, weight.shape[1], dtype=weight.dtype,
                        device=input_batch.device)
        for i, key in enumerate(keys):
            x[i, :keep[i]] = rows[i] if i in rows else self.prefix_cache.get(key, x.device)
        return x


def broadcast_from(owner, tensor, shape, dtype, device):
    """torchrun: rank owner's tensor, on every rank (the others pass None). Sent
    as its bytes: gloo has no bfloat16 in older versions of torch."""
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    tensor = tensor.contiguous()
    dist.broadcast(tensor.view(torch.uint8), src=owner)
    return tensor


# ------------------------------- saving and loading it (the chapter's torch.save, load_state_dict)

def save_classifier(classifier, path, config, max_length, class_names, lora=None,
                    trainable="last_block", calibration=None):
    """The chapter's torch.save(model.state_dict(), "review_classifier.pth"),
    without pickle: a safetensors file whose metadata (checkpoint_metadata)
    describes the model, so classify.py needs nothing else. Written atomically.
    With lora, only the adapters and the head are saved."""
    metadata = checkpoint_metadata(classifier, config, max_length, class_names, lora,
                                   trainable, calibration)
    tensors = classifier.gpt.state_dict()
    if lora:  # the base weights stay in their own file, which the metadata identifies
        tensors = {name: t for name, t in tensors.items()
                   if ".lora." in name or name.startswith("out_head.")}
    save_safetensors(tensors, path, metadata)


def load_classifier(path, device="cpu", base_weights=None, precision="fp32"):
    """A GPTClassifier and its metadata from a checkpoint written by finetune.py.
    The tensors' names and shapes are checked against the config on an empty
    ("meta") model first; then the model takes the memory-mapped tensors as its
    parameters, without copying them on the CPU. base_weights: the file under a
    LoRA checkpoint's adapters, where it is not where finetune.py read it.
    precision: --precision, the dtype of the matrix products (the weights stay
    float32 whatever precision trained them)."""
    try:
        entries, metadata = read_safetensors_header(path)
    except InputError:
        if not os.path.exists(path):
            raise InputError(f"no checkpoint at {path}. Fine-tune one first with "
                             f"python finetune.py (it writes {CHECKPOINT_NAME}), or pass "
                             f"--checkpoint PATH.") from None
        raise
    info = read_checkpoint_metadata(path, metadata)
    lora = info["lora"]
    if base_weights and not lora:
        raise InputError(f"{path} holds every weight of its model: --base-weights is only "
                         f"for checkpoints of --trainable lora.")
    if lora:  # adapters and head only: rebuild the base model they sit on
        gpt = lora_base(info, path, base_weights)
        expected = {name: tuple(t.shape) for name, t in gpt.state_dict().items()
                    if ".lora." in name or name.startswith("out_head.")}
    else:
        gpt = empty_gpt(info["config"], info["num_classes"])
        expected = {name: tuple(t.shape) for name, t in gpt.state_dict().items()}
    found = {name: entry[1] for name, entry in entries.items()}
    for name, shape in expected.items():
        if name not in found:
            raise InputError(f"{path} lacks tensor {name}: not a complete checkpoint.")
        if found[name] != shape:
            raise InputError(f"{path}: tensor {name} has shape {found[name]}, but its own "
                             f"config needs {shape}.")
    check_floating(entries, expected, path)
    tensors, _ = load_safetensors(path)
    state = {name: tensors[name].float() for name in expected}
    gpt.load_state_dict(state, assign=True, strict=not lora)
    model = GPTClassifier(gpt, pool=info["pool"], pad_token_id=info["pad_token_id"],
                          precision=precision)
    return model.to(device).eval(), info


def select_device(name):
    """The chapter's torch.device("cuda" if torch.cuda.is_available() else "cpu"),
    with the mps of its note and a --device flag. auto: cuda, then mps (only from
    torch 2.9: earlier versions were reported to compute differently there), then
    cpu. An unavailable device is an error."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available.append("cuda")
    if torch.backends.mps.is_available():
        available.append("mps")
    if name == "auto":
        mps = "mps" in available and torch_version() >= (2, 9)
        return torch.device("cuda" if "cuda" in available else "mps" if mps else "cpu")
    if name not in available:
        raise InputError(f"--device {name} is not available on this machine; "
                         f"available: {', '.join(available)} (or auto).")
    return torch.device(name)


def check_precision(precision, device):
    """--precision on this device, or an error naming what the device can do.
    bf16: cpu, cuda where the GPU has bfloat16 (Ampere or later), mps where this
    torch autocasts it. fp16: cuda only (a CPU without float16 matrix units runs
    it several times slower than fp32; mps is not verified)."""
    if precision == "fp32":
        return
    can = ["fp32"]
    if device.type == "cpu" or (device.type == "mps" and autocasts(device, torch.bfloat16)):
        can.append("bf16")
    if device.type == "cuda":
        if cuda_has_bf16():
            can.append("bf16")
        can.append("fp16")
    if precision not in can:
        raise InputError(f"--precision {precision} does not run on --device {device.type} "
                         f"here; it can run {' or '.join(can)}.")


def cuda_has_bf16():
    try:  # torch >= 2.4 counts emulated bfloat16 (a T4's, slower than fp32) unless told not to
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()


def autocasts(device, dtype):
    """Whether torch.autocast runs dtype on device (it warns and does nothing
    where it cannot)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast(device.type, dtype=dtype):
                x = torch.ones(2, 2, device=device)
                return (x @ x).dtype == dtype
    except (RuntimeError, UserWarning):
        return False


# ===== beyond the chapter: the checkpoint's metadata, LoRA's base weights =====

def checkpoint_metadata(classifier, config, max_length, class_names, lora, trainable,
                        calibration):
    """What save_classifier writes beside the tensors, in this order. lora:
    finetune.py's lora_description (rank, alpha, the base weights and their size
    and sha256), what identifies the base weights the adapters sit on.
    calibration: finetune.py's fitted temperature and validated threshold, which
    classify.py applies."""
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(config),
        "num_classes": str(classifier.gpt.out_head.out_features),
        "max_length": str(max_length),
        "pad_token_id": str(classifier.pad_token_id),
        "labels": json.dumps(class_names),
        "pool": classifier.pool,
        "trainable": trainable,  # finetune.py's --trainable, to describe the model
    }
    if calibration:
        metadata["calibration"] = json.dumps(calibration)
    if lora:
        metadata["lora"] = json.dumps(lora)
    return metadata


def read_checkpoint_metadata(path, metadata):
    """Checks the metadata of a checkpoint before anything large is allocated."""
    def bad(problem):
        return InputError(f"{path} is not a classifier checkpoint this version can read: "
                          f"{problem}. Make a new one with python finetune.py.")

    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise bad(f"its format is {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    try:
        config = json.loads(metadata["config"])
        labels = json.loads(metadata["labels"])
        info = {key: int(metadata[key]) for key in ("num_classes", "max_length", "pad_token_id")}
        pool = metadata["pool"]
    except (KeyError, ValueError, TypeError) as e:
        raise bad(f"its metadata is incomplete or malformed ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise bad("its model config is not an object")
    check_config(config, path)
    if not 2 <= info["num_classes"] <= 100_000:
        raise bad(f"num_classes is {info['num_classes']}")
    if (not isinstance(labels, list) or len(labels) != info["num_classes"]
            or not all(isinstance(label, str) for label in labels)):
        raise bad("its labels do not name each class once")
    if not 1 <= info["max_length"] <= config["context_length"]:
        raise bad(f"max_length {info['max_length']} is outside 1..{config['context_length']}")
    if not 0 <= info["pad_token_id"] < config["vocab_size"]:
        raise bad(f"pad_token_id {info['pad_token_id']} is outside the vocabulary")
    if pool not in POOLS:
        raise bad(f"unknown pooling {pool!r}")
    try:
        lora = json.loads(metadata["lora"]) if "lora" in metadata else None
    except ValueError:
        lora = "not JSON"
    if lora is not None and not valid_lora(lora, config):
        raise bad("its LoRA description is malformed")
    temperature, threshold = read_calibration(metadata.get("calibration"), info, bad)
    return dict(info, config=config, labels=labels, pool=pool, lora=lora,
                trainable=metadata.get("trainable", "not recorded"),
                temperature=temperature, threshold=threshold)


def read_calibration(text, info, bad):
    """(temperature, threshold or None) of a checkpoint; the threshold chooses
    class 1 where its probability is above it. (1.0, None) for a checkpoint
    saved before finetune.py calibrated: it loads as it always did."""
    if text is None:
        return 1.0, None
    try:
        calibration = json.loads(text)
        temperature, threshold = calibration["temperature"], calibration["threshold"]
    except (ValueError, KeyError, TypeError):
        raise bad("its calibration is malformed") from None
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise bad(f"its temperature {temperature!r} is not a positive number")
    if threshold is not None and not (isinstance(threshold, (int, float))
                                      and info["num_classes"] == 2 and 0 <= threshold <= 1):
        raise bad(f"its threshold {threshold!r} is not a probability of a two-class model")
    return float(temperature), threshold


def valid_lora(lora, config):
    """Whether a LoRA description names a base model that can be rebuilt: random
    weights of a known size (no larger: nothing else bounds what they allocate),
    or a file identified by its size and sha256."""
    try:
        if not (isinstance(lora["rank"], int) and 1 <= lora["rank"] <= 4096 and lora["alpha"] > 0
                and lora["model"] in MODEL_NAMES and isinstance(lora["seed"], int)):
            return False
        if lora["weights"] == "random":
            return config == model_config(lora["model"])
        return (isinstance(lora["weights"], str) and isinstance(lora["path"], str)
                and isinstance(lora["bytes"], int) and isinstance(lora["sha256"], str))
    except (TypeError, KeyError):  # not a dict, or a field of the wrong type
        return False


def empty_gpt(config, num_classes):
    """A GPTModel with a num_classes head whose parameters take no memory and no
    time: "meta" tensors, to be replaced by a checkpoint's."""
    reset = torch.nn.Embedding.reset_parameters
    # normal_ on meta tensors imports torch._dynamo, a second of start-up
    torch.nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            gpt = GPTModel(config)
            gpt.out_head = torch.nn.Linear(config["emb_dim"], num_classes)
    finally:
        torch.nn.Embedding.reset_parameters = reset
    return gpt


def lora_base_file(lora, checkpoint, base_weights=None):
    """The base weights file of a LoRA checkpoint: --base-weights, else where
    finetune.py read it, else (for pretrained weights) the Hub's file downloaded
    into gpt2/. It must be the very file the adapters were trained on: its size
    is checked here, its sha256 by lora_base. Returns
    the path and the hint an error about it gives."""
    if base_weights:
        # a folder or OpenAI's prefix names a file: the one fingerprinted
        weights = weights_file(base_weights, flag="--base-weights")
    elif Path(lora["path"]).is_file() or lora["weights"] != "pretrained":
        weights = Path(lora["path"])
    else:
        weights = download_gpt2(lora["model"], flag="--base-weights")
    hint = (f"pass the file it was fine-tuned on with --base-weights PATH "
            f"({lora['bytes']:,} bytes, sha256 {lora['sha256']})")
    if not weights.is_file():
        what = "is a folder" if weights.is_dir() else "does not exist"
        raise InputError(f"{checkpoint} holds LoRA adapters for the base weights {weights}, "
                         f"which {what}: {hint}.")
    if os.path.getsize(weights) != lora["bytes"]:
        raise not_the_base(weights, checkpoint, hint)
    return weights, hint


def not_the_base(weights, checkpoint, hint):
    return InputError(f"{weights} is not the base {checkpoint} was fine-tuned on (its "
                      f"size or sha256 differs, so its predictions would too): {hint}.")


def lora_base(info, checkpoint, base_weights=None):
    """The base GPT-2 under a LoRA checkpoint's adapters (random with the seed
    finetune.py used, or the checked file), with an empty ("meta") head and
    adapters for the checkpoint's tensors to fill."""
    lora, config = info["lora"], info["config"]
    if lora["weights"] == "random":
        if base_weights:
            raise InputError(f"{checkpoint} was fine-tuned on random base weights (seed "
                             f"{lora['seed']}), which classify.py rebuilds itself: leave "
                             f"out --base-weights.")
        torch.manual_seed(lora["seed"])  # finetune.py seeds the same way
        gpt = GPTModel(config)
    else:
        weights, hint = lora_base_file(lora, checkpoint, base_weights)
        if file_fingerprint(weights)[1] != lora["sha256"]:  # the one pass over the file
            raise not_the_base(weights, checkpoint, hint)
        gpt = load_gpt2_file(weights, config)
    with torch.device("meta"):
        gpt.out_head = torch.nn.Linear(config["emb_dim"], info["num_classes"])
        replace_linear_with_lora(gpt.trf_blocks, lora["rank"], lora["alpha"])
    return gpt


def torch_version():
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


# ===== beyond the chapter: other pools, the prefix cache, the one-position last block =====

def frozen_prefix_length(gpt):
    """How many leading blocks (after the embeddings) never change, or None when
    their output cannot be cached: trainable embeddings or dropout."""
    if any(p.requires_grad for p in [gpt.tok_emb.weight, gpt.pos_emb.weight]):
        return None
    if any(m.p > 0 for m in gpt.modules() if isinstance(m, torch.nn.Dropout)):
        return None
    n = 0
    while n < len(gpt.trf_blocks) and not any(
            p.requires_grad for p in gpt.trf_blocks[n].parameters()):
        n += 1
    return n or None


def real_lengths(input_batch, pad_token_id):
    # messages are encoded without special tokens, so pad ids only ever trail
    return (input_batch != pad_token_id).sum(dim=1)  # (b,)


def pool_positions(input_batch, pool, pad_token_id):
    """The one position per message the head reads, (b,); None for "mean"."""
    b, num_tokens = input_batch.shape
    if pool == "last":
        return torch.full((b,), num_tokens - 1, device=input_batch.device)
    if pool == "first":
        return torch.zeros(b, dtype=torch.long, device=input_batch.device)
    if pool == "flexible":
        return (real_lengths(input_batch, pad_token_id) - 1).clamp(min=0)
    return None


def mean_over_real_tokens(x, input_batch, pad_token_id):
    # (b, T, d) -> (b, d)
    lengths = real_lengths(input_batch, pad_token_id)
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return (x * mask[..., None]).sum(dim=1) / lengths.clamp(min=1)[:, None]


def take_positions(x, positions):
    """x[i, positions[i]] for each row: (b, T, d) -> (b, 1, d)."""
    return x[torch.arange(x.shape[0], device=x.device), positions].unsqueeze(1)


def attention_at(att, x, positions):
    """gpt.py's MultiHeadAttention `att` with one query per row, at `positions` (b,):
    (b, T, d_in) -> (b, 1, d_out). Keys and values still come from every position
    up to it: what the full attention computes there, for 1/T of the queries."""
    b, num_tokens, _ = x.shape
    keys = att.split_heads(att.W_key(x))
    values = att.split_heads(att.W_value(x))
    dropout_p = att.dropout.p if att.training else 0.0
    queries = att.split_heads(att.W_query(take_positions(x, positions)))
    key_pos = torch.arange(num_tokens, device=x.device)
    mask = key_pos <= positions[:, None]  # (b, T): causal for that query
    context = torch.nn.functional.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask[:, None, None, :], dropout_p=dropout_p)
    context = context.transpose(1, 2).reshape(b, 1, att.d_out)
    return att.out_proj(context)


def last_block_at(block, x, positions):
    """gpt.py's TransformerBlock `block` at one position per row, (b, T, d) ->
    (b, 1, d): block(x)[i, positions[i]], with the block's own layers, but the
    query, attention output and feed-forward computed there only."""
    shortcut = take_positions(x, positions)
    x = block.norm1(x)
    x = attention_at(block.att, x, positions)
    x = block.drop_resid(x)
    x = x + shortcut

    shortcut = x
    x = block.norm2(x)
    x = block.ff(x)
    x = block.drop_resid(x)
    return x + shortcut


ARENA_BYTES = 64 * 2**20  # the prefix cache's buffers: large enough to be few


class PrefixCache:
    """The frozen prefix's hidden states, one (tokens, emb_dim) tensor per
    message, in the compute dtype: kept on the device up to `budget` bytes, the
    rest appended to a spill file in `spill_dir` and read back per message (no
    file: recomputed when needed). In memory, the messages are views into a few
    large buffers (ARENA_BYTES each), not a tensor each: thousands of small
    allocations of many lengths, between the fill's large temporaries, left
    the allocator holding gigabytes more than the cache. The file is a
    tempfile.TemporaryFile, which has no name on disk, so nothing is left there,
    whatever ends the run; close() frees its space."""

    def __init__(self, budget=None, spill_dir=None):
        self.budget, self.spill_dir = budget, spill_dir
        self.in_memory, self.in_file = {}, {}  # key -> tensor; key -> (offset, shape, dtype)
        self.memory_bytes, self.file_bytes = 0, 0
        self.arena, self.arena_used = None, 0  # the buffer being filled, bytes used of it
        self.file = None

    def __len__(self):
        return len(self.in_memory) + len(self.in_file)

    def __contains__(self, key):
        return key in self.in_memory or key in self.in_file

    def put(self, key, hidden):
        if key in self:  # the same message twice in one batch
            return
        nbytes = hidden.numel() * hidden.element_size()
        if self.budget is None or self.memory_bytes + nbytes <= self.budget:
            self.in_memory[key] = self.place(hidden, nbytes)
            self.memory_bytes += nbytes
        elif self.spill_dir is not None:
            self.spill(key, hidden, nbytes)

    def place(self, hidden, nbytes):
        """A copy of hidden in the current arena (a new one when it is full)."""
        size = (nbytes + 7) // 8 * 8  # a view's offset: a multiple of its element size
        arena = self.arena
        if (arena is None or arena.device != hidden.device
                or self.arena_used + size > arena.numel()):
            room = ARENA_BYTES if self.budget is None else min(
                ARENA_BYTES, self.budget - self.memory_bytes)
            arena = self.arena = torch.empty(max(room, size), dtype=torch.uint8,
                                             device=hidden.device)
            self.arena_used = 0
        raw = arena[self.arena_used:self.arena_used + nbytes]
        self.arena_used += size
        copy = raw.view(hidden.dtype).view(hidden.shape)
        copy.copy_(hidden)
        return copy

    def spill(self, key, hidden, nbytes):
        try:
            if self.file is None:
                self.file = tempfile.TemporaryFile(dir=self.spill_dir, prefix=".prefix-cache-")
            write_all(self.file.fileno(), tensor_bytes(hidden), self.file_bytes)
        except OSError as e:
            raise InputError(
                f"cannot write the prefix cache's temporary file in {self.spill_dir} "
                f"({e.strerror or e}, after {self.file_bytes:,} bytes): free some space, "
                f"or lower --cache-memory to 0 to recompute the frozen layers instead.") from None
        self.in_file[key] = (self.file_bytes, tuple(hidden.shape), hidden.dtype)
        self.file_bytes += nbytes

    def get(self, key, device):
        if key in self.in_memory:
            return self.in_memory[key]
        offset, shape, dtype = self.in_file[key]
        nbytes = math.prod(shape) * dtype.itemsize
        raw = bytearray(os.pread(self.file.fileno(), nbytes, offset))
        if len(raw) != nbytes:
            raise InputError(f"the prefix cache's temporary file in {self.spill_dir} lost "
                             f"data: {len(raw):,} of {nbytes:,} bytes read back.")
        return torch.frombuffer(raw, dtype=dtype).view(shape).to(device)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def cache_size(datasets, emb_dim, dtype):
    """Bytes the prefix cache needs for every distinct message of the datasets
    (padded where the datasets pad: pool "last" reads a padding position)."""
    lengths = {tuple(ids.tolist()): len(ids) for dataset in datasets for ids, _ in dataset}
    return sum(lengths.values()) * emb_dim * dtype.itemsize


# ===== beyond the chapter: LoRA (appendix E) =====

class LoRALayer(torch.nn.Module):
    """Appendix E: a low-rank update alpha/rank * (x A B); B starts at zero, so
    training starts from the pretrained model exactly."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(in_dim, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(rank, out_dim))
        self.scaling = alpha / rank

    def forward(self, x):
        return self.scaling * (x @ self.A @ self.B)


class LinearWithLoRA(torch.nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(module, rank, alpha):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, LinearWithLoRA(child, rank, alpha))
        else:
            replace_linear_with_lora(child, rank, alpha)


# ===== beyond the chapter: many texts at once =====

class NonFiniteLogits(InputError):
    """The model computed NaN or infinity: its callers name the checkpoint."""


def classify_texts(texts, model, tokenizer, device, max_length, pad_token_id=PAD_TOKEN_ID,
                   batch_size=32, temperature=1.0):
    """Class probabilities (one list per text) for many texts, in batches of
    similar length. Padded to max_length only where the checkpoint's pooling
    reads a padding position ("last"); otherwise to each batch's longest.
    temperature: the checkpoint's, fitted by finetune.py (the logits divided by
    it; the argmax does not change)."""
    model.eval()
    max_length = min(max_length, model.gpt.pos_emb.weight.shape[0])
    encoded = [encode(text, tokenizer, max_length) for text in texts]
    for i, ids in enumerate(encoded):
        if not ids:  # no token for the head to read
            raise InputError(f"text {i} is empty: there is nothing to classify.")
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    width = max_length if model.pool == "last" else None  # None: the batch's longest
    probabilities = [None] * len(texts)
    start_time = time.time()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        inputs = pad_ids([encoded[i] for i in batch], pad_token_id, length=width)
        with torch.inference_mode():
            logits = model(inputs.to(device)).float()
        if not torch.isfinite(logits).all():
            raise NonFiniteLogits("its logits are not all finite numbers (NaN or infinity), "
                                  "so it has no answer: its weights are damaged. Fine-tune "
                                  "it again, or check the file.")
        probas = torch.softmax(logits / temperature, dim=-1).cpu()
        for row, i in enumerate(batch):
            probabilities[i] = probas[row].tolist()
        progress("classifying, messages", start + len(batch), len(texts), start_time)
    return probabilities


# ===== beyond the chapter: why: each token's share of the decision =====

IG_STEPS = 20  # integrated gradients: points on the path from a zero embedding
EXPLAIN_METHODS = {
    "occlusion": "leave one token out: how far the label's log-odds fall without it "
                 "(one forward pass per token, batched)",
    "gradient": "gradient x input: the gradient of the label's log-odds times each "
                "token's embedding (one forward and one backward pass)",
    "integrated": f"integrated gradients, {IG_STEPS} steps from a zero embedding "
                  f"({IG_STEPS} forward and backward passes, batched)",
}
# the most faithful of the three on ERASER's measures, by far (bench.py --explain)
EXPLAIN_DEFAULT = "integrated"
MAX_EXPLAINED = 16  # texts one /classify request may explain: each costs IG_STEPS passes
OCCLUSION_BATCH = 64


def padded_batch(sequences, model, max_length, pad_token_id):
    """Token id lists -> (b, T) as classify_texts pads them: to max_length where the
    pooling reads a padding position ("last"), else to the longest."""
    width = max_length if model.pool == "last" else None
    return pad_ids(sequences, pad_token_id, length=width)


def class_logits(model, sequences, max_length, pad_token_id):
    """The logits of token id lists, (b, num_classes), batched, on the CPU."""
    device = model.gpt.tok_emb.weight.device
    rows = []
    with torch.inference_mode():
        for start in range(0, len(sequences), OCCLUSION_BATCH):
            inputs = padded_batch(sequences[start:start + OCCLUSION_BATCH], model, max_length,
                                  pad_token_id).to(device)
            rows.append(model(inputs).float().cpu())
    return torch.cat(rows)


def log_odds(logits, target):
    """log p / (1 - p) of class target from logits (..., num_classes): unlike the
    probability it does not saturate, so a token that matters still shows where
    the model is already sure."""
    others = torch.cat([logits[..., :target], logits[..., target + 1:]], dim=-1)
    return logits[..., target] - torch.logsumexp(others, dim=-1)


def without(ids, drop, pad_token_id):
    """ids less the positions in drop; nothing left reads as one padding token."""
    kept = [token for i, token in enumerate(ids) if i not in drop]
    return kept or [pad_token_id]


def occlusion_scores(model, ids, target, max_length, pad_token_id):
    """The log-odds of target for ids less those without token i, for each i."""
    variants = [ids] + [without(ids, {i}, pad_token_id) for i in range(len(ids))]
    odds = log_odds(class_logits(model, variants, max_length, pad_token_id), target)
    return (odds[0] - odds[1:]).tolist()


def logits_from_token_embeddings(model, token_embeddings, input_batch):
    """The classifier's logits from the token embeddings (b, T, emb_dim) instead of
    ids, so that gradients reach them: every layer at every position."""
    gpt = model.gpt
    positions = torch.arange(input_batch.shape[1], device=input_batch.device)
    with model.autocast(input_batch):  # --precision, as the classification's
        x = gpt.drop_emb(token_embeddings + gpt.pos_emb(positions))
        x = gpt.final_norm(gpt.trf_blocks(x))  # (b, T, emb_dim)
        logits = gpt.out_head(model.pool_outputs(x, input_batch))
    return logits.float()


def path_gradients(model, ids, target, max_length, pad_token_id, scales):
    """The message's token embeddings (n, emb_dim) and the mean over `scales` of
    the gradient of target's log-odds at the real tokens' embeddings times each
    scale (the padding keeps its own embeddings)."""
    inputs = padded_batch([ids], model, max_length, pad_token_id)
    inputs = inputs.to(model.gpt.tok_emb.weight.device).expand(len(scales), -1)
    n = len(ids)
    with torch.inference_mode(False), torch.enable_grad():
        embeddings = model.gpt.tok_emb(inputs).detach()  # (steps, T, emb_dim)
        scale = torch.ones(inputs.shape, device=inputs.device)
        scale[:, :n] = torch.tensor(scales, device=inputs.device)[:, None]
        scaled = (embeddings * scale[..., None]).requires_grad_()
        odds = log_odds(logits_from_token_embeddings(model, scaled, inputs).float(), target)
        (gradient,) = torch.autograd.grad(odds.sum(), scaled)
    return embeddings[0, :n], gradient[:, :n].mean(dim=0)


def gradient_scores(model, ids, target, max_length, pad_token_id):
    embeddings, gradient = path_gradients(model, ids, target, max_length, pad_token_id, [1.0])
    return (gradient * embeddings).sum(dim=-1).tolist()


def integrated_gradient_scores(model, ids, target, max_length, pad_token_id, steps=IG_STEPS):
    # the midpoint rule on the straight path from a zero embedding to the message's
    scales = [(step + 0.5) / steps for step in range(steps)]
    embeddings, gradient = path_gradients(model, ids, target, max_length, pad_token_id, scales)
    return (gradient * embeddings).sum(dim=-1).tolist()


SCORERS = {"occlusion": occlusion_scores, "gradient": gradient_scores,
           "integrated": integrated_gradient_scores}


def explain_ids(model, ids, max_length, pad_token_id=PAD_TOKEN_ID, method=EXPLAIN_DEFAULT,
                target=None):
    """(class explained, one signed score per token): positive pushes toward the
    class, by default the predicted one. ids: the message's tokens as classified
    (truncated)."""
    model.eval()
    if target is None:
        target = int(class_logits(model, [ids], max_length, pad_token_id)[0].argmax())
    return target, SCORERS[method](model, ids, target, max_length, pad_token_id)


def token_pieces(ids, scores, tokenizer):
    """[{"token", "score"}] whose tokens join to the decoded message: tokens that
    split one character's UTF-8 bytes are merged, their scores summed."""
    pieces, pending, total = [], b"", 0.0
    for token, score in zip(ids, scores):
        pending += tokenizer.decode_single_token_bytes(token)
        total += score
        try:
            text = pending.decode("utf-8")
        except UnicodeDecodeError:  # a character continues in the next token
            continue
        pieces.append({"token": text, "score": round(total, 6)})
        pending, total = b"", 0.0
    if pending:  # truncation cut a character: decoded as tokenizer.decode does
        pieces.append({"token": pending.decode("utf-8", errors="replace"),
                       "score": round(total, 6)})
    return pieces


def explain_texts(texts, targets, model, tokenizer, max_length, pad_token_id=PAD_TOKEN_ID,
                  method=EXPLAIN_DEFAULT):
    """Each text's token pieces with their scores toward its class in targets."""
    max_length = min(max_length, model.gpt.pos_emb.weight.shape[0])
    explanations = []
    for text, target in zip(texts, targets):
        ids = encode(text, tokenizer, max_length)
        _, scores = explain_ids(model, ids, max_length, pad_token_id, method, target)
        explanations.append(token_pieces(ids, scores, tokenizer))
    return explanations


def ansi_colour(score, largest):
    """A background from white to red (toward the predicted class) or blue
    (against it), as strong as the score is against the message's largest."""
    strength = min(abs(score) / largest, 1.0) if largest > 0 else 0.0
    fade = round(255 * (1 - 0.75 * strength))
    red, blue = (255, fade) if score > 0 else (fade, 255)
    return f"\x1b[30;48;2;{red};{fade};{blue}m"


def explanation_lines(pieces, label, coloured, top=5):
    """What the terminal shows under a result: the message coloured token by token
    (on a terminal only), then the tokens that pushed most toward the label."""
    lines = []
    if coloured:
        largest = max(abs(piece["score"]) for piece in pieces)
        lines.append("  why: " + "".join(
            ansi_colour(piece["score"], largest) + printable(piece["token"]) + "\x1b[0m"
            for piece in pieces)
            + f"   (\x1b[30;48;2;255;64;64m toward {label} \x1b[0m "
              f"\x1b[30;48;2;64;64;255m against \x1b[0m)")
    strongest = sorted(pieces, key=lambda piece: -piece["score"])[:top]
    lines.append(f"  toward {label}: " + "  ".join(
        f"{piece['token']!r} {piece['score']:+.3f}" for piece in strongest))
    return lines


# ===== beyond the chapter: a page to try it: --serve =====

def predicted_class(probas, threshold=None):
    """The chapter's argmax or, given a validated threshold (two classes), class 1
    where its probability is above it."""
    if threshold is not None:
        return int(probas[1] > threshold)
    return max(range(len(probas)), key=lambda i: probas[i])


def result_record(text, probas, labels, threshold=None, explanation=None):
    """One message's result, as --json prints it and /classify answers it."""
    record = {"text": text, "label": labels[predicted_class(probas, threshold)],
              "probabilities": dict(zip(labels, probas))}
    if explanation is not None:
        record["explanation"] = explanation
    return record


def describe_checkpoint(path, info):
    """What /info answers and the page shows above the text box."""
    config = info["config"]
    size = next((name for name, key in MODEL_NAMES.items() if model_config(name) == config),
                "a custom size")
    return {"checkpoint": Path(path).name, "labels": info["labels"], "model": size,
            "layers": config["n_layers"], "emb_dim": config["emb_dim"],
            "max_length": info["max_length"], "pool": info["pool"],
            "trainable": info["trainable"]}


MAX_BODY = 1_000_000  # bytes of one /classify request
MAX_TEXTS = 1_000     # messages in one /classify request
TIMEOUT = 10.0          # seconds a client may stay silent before its connection is dropped
MAX_CONNECTIONS = 128   # connections served at a time; more are answered 503
REQUEST_DEADLINE = 30.0  # seconds a client has to send its whole request
MAX_DRAIN = 16_000_000  # bytes of an unread body read and dropped after an error answer


# The page at /: one text box, a button, a bar per class; inline, nothing to fetch.
PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>GPT-2 classifier</title>
<style>
  body { font: 16px/1.45 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  main { max-width: 760px; margin: 0 auto; padding: 1.2rem; }
  h1 { font-size: 1.35rem; margin: 0 0 .3rem; }
  #info { color: #5b6475; font-size: .9rem; margin: 0 0 1rem; overflow-wrap: anywhere; }
  textarea { box-sizing: border-box; width: 100%; min-height: 8rem; padding: .6rem;
             font: inherit; border: 1px solid #c4c9d4; border-radius: 6px; resize: vertical; }
  .bar { display: flex; align-items: center; gap: .8rem; margin: .6rem 0 1.2rem; flex-wrap: wrap; }
  button { font: inherit; padding: .5rem 1.2rem; border: 0; border-radius: 6px;
           background: #2f5bd3; color: white; cursor: pointer; }
  button:disabled { background: #8ea3d9; cursor: wait; }
  .hint, #error { font-size: .85rem; color: #5b6475; }
  #error { color: #b3261e; }
  .result { background: white; border-radius: 8px; padding: .8rem 1rem; margin-bottom: .8rem;
            box-shadow: 0 1px 2px #0002; }
  .text { overflow-wrap: anywhere; margin-bottom: .4rem; }
  .label { font-weight: 600; }
  .row { display: grid; grid-template-columns: minmax(4rem, 9rem) 1fr 3.5rem; gap: .5rem;
         align-items: center; font-size: .9rem; }
  .track { background: #e6e9ef; border-radius: 4px; height: .7rem; }
  .fill { background: #8a94a8; border-radius: 4px; height: 100%; }
  .best .fill { background: #2f5bd3; }
  .p { text-align: right; font-variant-numeric: tabular-nums; }
  .ask { margin-top: .5rem; padding: .2rem .7rem; font-size: .85rem; }
  .why { margin-top: .6rem; border-top: 1px solid #e6e9ef; padding-top: .5rem; }
  .tokens { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.8; }
  .tok { border-radius: 3px; }
  .legend { font-size: .8rem; color: #5b6475; margin-top: .3rem; }
  .swatch { display: inline-block; width: .9rem; height: .9rem; border-radius: 3px;
            vertical-align: middle; margin: 0 .25rem 0 .6rem; }
</style>
</head>
<body>
<main>
  <h1>GPT-2 classifier</h1>
  <p id="info">Loading the checkpoint's description…</p>
  <textarea id="texts" placeholder="One message per line" autofocus></textarea>
  <div class="bar">
    <button id="go">Classify</button>
    <span class="hint">or Ctrl-Enter · one message per line</span>
    <span id="error" role="alert"></span>
  </div>
  <div id="results"></div>
</main>
<script>
const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // text, never HTML
  return node;
}

function showResult(result) {
  const box = element("div", "result");
  box.append(element("div", "text", result.text));
  box.append(element("div", "label", result.label));
  for (const [name, p] of Object.entries(result.probabilities)) {
    const row = element("div", name === result.label ? "row best" : "row");
    const track = element("div", "track"), fill = element("div", "fill");
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.append(fill);
    row.append(element("span", "", name), track, element("span", "p", (100 * p).toFixed(1) + "%"));
    box.append(row);
  }
  const ask = element("button", "ask", "why?");
  ask.addEventListener("click", () => explain(result.text, box, ask));
  box.append(ask);
  $("results").append(box);
}

// red pushes toward the label shown, blue away from it, as strong as the score
// is against the message's largest
function tint(score, largest) {
  const strength = largest > 0 ? Math.min(Math.abs(score) / largest, 1) : 0;
  return score > 0 ? `rgba(220, 40, 40, ${0.75 * strength})`
                   : `rgba(40, 80, 220, ${0.75 * strength})`;
}

function showExplanation(result, box) {
  const why = element("div", "why");
  const tokens = element("div", "tokens");
  const largest = Math.max(...result.explanation.map((piece) => Math.abs(piece.score)));
  for (const piece of result.explanation) {
    const span = element("span", "tok", piece.token);
    span.style.background = tint(piece.score, largest);
    span.title = (piece.score >= 0 ? "+" : "") + piece.score.toFixed(3);
    tokens.append(span);
  }
  const legend = element("div", "legend", "Each token's share of the decision:");
  const toward = element("span", "swatch"), against = element("span", "swatch");
  toward.style.background = tint(1, 1);
  against.style.background = tint(-1, 1);
  legend.append(toward, `toward ${result.label}`, against, `against it`,
                " · stronger colour, larger share; hover a token for its score");
  why.append(tokens, legend);
  box.append(why);
}

async function explain(text, box, ask) {
  ask.disabled = true;
  try {
    const response = await fetch("/classify", {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({texts: [text], explain: true})});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error);
    showExplanation(answer.results[0], box);
    ask.remove();
  } catch (error) {
    $("error").textContent = "Error: " + error.message;
    ask.disabled = false;
  }
}

async function classify() {
  const texts = $("texts").value.split("\n").filter((line) => line.trim());
  if (!texts.length) { $("error").textContent = "Type a message first."; return; }
  $("go").disabled = true;
  $("error").textContent = "";
  try {
    const response = await fetch("/classify", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({texts})});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error);
    $("results").replaceChildren();
    answer.results.forEach(showResult);
  } catch (error) {
    $("error").textContent = "Error: " + error.message;
  } finally {
    $("go").disabled = false;
  }
}

$("go").addEventListener("click", classify);
$("texts").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) classify();
});
fetch("/info").then((r) => r.json()).then((info) => {
  $("info").textContent = `${info.checkpoint} · classes: ${info.labels.join(", ")} · ` +
    `${info.model} (${info.layers} layers, ${info.emb_dim} dimensions) · ` +
    `max_length ${info.max_length} · pooling: ${info.pool} · trained: ${info.trainable}`;
});
</script>
</body>
</html>
"""


def inline_hashes(page, tag):
    """The Content-Security-Policy sources of the page's inline <tag>s: the
    sha256 of each one's text, so that no other script or style can run."""
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
        for text in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S))


# Sent with every answer: the page runs only its own inline script and style,
# talks only to this server, and no other site may frame it or sniff a type.
SECURITY_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {inline_hashes(PAGE, 'script')}; "
                               f"style-src {inline_hashes(PAGE, 'style')}; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def host_names(host, server_name):
    """The names, besides IP addresses, that a Host header may give this server."""
    names = {"localhost", host, server_name}
    if host in ("0.0.0.0", "::"):  # every interface: the machine's own name too
        names.add(socket.gethostname())
    return {name.lower().rstrip(".") for name in names}


def names_this_server(host_header, names):
    """Whether a Host header ("name:port", "[v6 address]:port") names this server:
    an IP address or one of `names`. A DNS-rebinding page can only send a domain
    name of its own. The port is not checked: a tunnel or port mapping changes it."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::\d*)?|([^:\[\]]+)(?::\d*)?",
                         (host_header or "").strip())
    if not match:
        return False
    name = (match[1] or match[2]).lower().rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name in names


class RequestError(Exception):
    """A request not answered 200: this HTTP status and a JSON error."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def parse_request(body):
    """The texts of a /classify body {"texts": [...], "explain": false} and whether
    to explain them; RequestError otherwise."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
        raise RequestError(400, "the body is not JSON") from None
    texts = request.get("texts") if isinstance(request, dict) else None
    if not isinstance(texts, list) or not texts:
        raise RequestError(400, 'expected {"texts": ["a message", ...]} with at least one text')
    if len(texts) > MAX_TEXTS:
        raise RequestError(413, f"{len(texts):,} texts; at most {MAX_TEXTS:,} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(400, f"texts[{i}] is not a string")
        if not text.strip():
            raise RequestError(400, f"texts[{i}] is empty or only whitespace")
    explain = request.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError(400, '"explain" is not true or false')
    if explain and len(texts) > MAX_EXPLAINED:
        raise RequestError(413, f"{len(texts):,} texts to explain; at most {MAX_EXPLAINED} "
                                f"per request")
    return texts, explain


def make_handler(classify, description, timeout=TIMEOUT, deadline=REQUEST_DEADLINE):
    """The request handler: classify(texts, explain) -> results; description: /info;
    timeout: seconds a client may stay silent; deadline: seconds it has to send
    its whole request."""

    class Handler(http.server.BaseHTTPRequestHandler):
        routes = {"/": "GET", "/info": "GET", "/classify": "POST"}
        busy = False  # True: the server is at its connection cap; answer 503
        body_read = False

        def answer(self, status, body, content_type="application/json"):
            data = body.encode("utf-8") if isinstance(body, str) else \
                json.dumps(body, allow_nan=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            if status == 405:
                self.send_header("Allow", "GET, HEAD" if self.routes[self.path] == "GET"
                                 else self.routes[self.path])
            self.end_headers()
            if self.command != "HEAD":  # HEAD: GET's headers, no body
                self.wfile.write(data)

        def setup(self):
            super().setup()
            # the timeout bounds each read; a client trickling a byte at a time
            # would still hold its connection, and a slot, for ever without this
            self.request_timer = threading.Timer(deadline, self.cut)
            self.request_timer.daemon = True
            self.request_timer.start()

        def cut(self):
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

        def finish(self):
            self.request_timer.cancel()
            super().finish()

        def route(self, method):
            self.path = self.path.split("?", 1)[0]  # the page may be opened as /?anything
            try:
                self.check(method)
                body = self.read_body() if method == "POST" else None
                self.request_timer.cancel()  # the whole request is in: the answer may take its time
                if self.path == "/":
                    return self.answer(200, PAGE, "text/html")
                if self.path == "/info":
                    return self.answer(200, description)
                texts, explain = parse_request(body)
                self.answer(200, {"results": classify(texts, explain)})
            except RequestError as e:
                self.answer(e.status, {"error": str(e)})
                self.linger()

        def check(self, method):
            """RequestError unless this server takes this request from this client."""
            if self.busy:
                raise RequestError(503, "the server is answering as many connections as it "
                                        "takes at a time; try again in a moment")
            host = self.headers.get("Host")
            if not names_this_server(host, self.server.host_names):
                raise RequestError(403, f"the Host header {host!r} does not name this server")
            if self.path not in self.routes:
                raise RequestError(404, f"no such page: {self.path}")
            if self.routes[self.path] != method:
                raise RequestError(405, f"{self.path} takes {self.routes[self.path]}")
            if method == "POST":  # what another site's page could make a browser send
                origin = self.headers.get("Origin")
                if origin is not None and origin.lower() != f"http://{host}".lower():
                    raise RequestError(403, f"a page of {origin} may not use this server")
                if self.headers.get_content_type() != "application/json":
                    raise RequestError(415, "the body must be sent as Content-Type: "
                                            "application/json")

        def read_body(self):
            if "Transfer-Encoding" in self.headers:  # chunked: not read here
                raise RequestError(411, "send the body with a Content-Length, not a "
                                        "Transfer-Encoding")
            lengths = set(self.headers.get_all("Content-Length") or [])
            if len(lengths) != 1 or not re.fullmatch(r"[0-9]+", next(iter(lengths)).strip()):
                raise RequestError(400, "the request has no valid Content-Length")
            length = int(next(iter(lengths)))
            if length > MAX_BODY:
                raise RequestError(413, f"the body has {length:,} bytes; at most "
                                        f"{MAX_BODY:,}")
            body = self.rfile.read(length)
            self.body_read = True
            return body

        def linger(self):
            """After an error answer, reads and drops the unread body (up to
            MAX_DRAIN bytes) before the connection closes: closing with unread
            data resets it, and a client still sending would never see the answer."""
            if self.body_read or (self.headers.get("Content-Length", "0") == "0"
                                  and "Transfer-Encoding" not in self.headers):
                return
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete
            left = MAX_DRAIN
            while left > 0 and (chunk := self.rfile.read1(min(left, 65536))):
                left -= len(chunk)

        def send_error(self, code, message=None, explain=None):
            # http.server's own errors (a malformed request line, an unknown method), in JSON
            self.close_connection = True
            self.answer(code, {"error": message or http.HTTPStatus(code).phrase})

        def do_GET(self):
            self.route("GET")

        def do_POST(self):
            self.route("POST")

        def refuse(self):
            self.route(self.command)

        do_HEAD = do_GET
        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = refuse

        def log_message(self, *args):  # the terminal shows the address, not every request
            pass

    Handler.timeout = timeout  # socketserver sets it on the socket: a silent client is dropped
    return Handler


class ClassifierServer(http.server.HTTPServer):
    """http.server with limits: a listen backlog for bursts, a thread per
    connection but at most max_connections served at a time (the others are
    answered 503), and no traceback when a client goes away or stays silent."""
    request_queue_size = 128  # socketserver's 5 resets connections in a burst

    def __init__(self, address, family, handler, max_connections):
        self.address_family = family
        self.connections = threading.BoundedSemaphore(max_connections)
        self.busy_handler = type("BusyHandler", (handler,), {"busy": True})
        super().__init__(address, handler)
        self.host_names = host_names(address[0], self.server_name)

    def process_request(self, request, client_address):
        # counted here, in the order the connections arrived
        handler = self.RequestHandlerClass if self.connections.acquire(blocking=False) \
            else self.busy_handler
        threading.Thread(target=self.process_connection, daemon=True,
                         args=(request, client_address, handler)).start()

    def process_connection(self, request, client_address, handler):
        try:
            handler(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if handler is self.RequestHandlerClass:
                self.connections.release()
            self.shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            super().handle_error(request, client_address)  # a bug: its traceback


def make_server(host, port, classify, description, timeout=TIMEOUT, deadline=REQUEST_DEADLINE,
                max_connections=MAX_CONNECTIONS):
    """The server of --serve, listening on host and port (IPv4 or IPv6, as the
    host's address is); serve_forever() serves it."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host}: {e.strerror}. --host takes an address "
                         f"or name of this machine: 127.0.0.1, ::1, 0.0.0.0 or ::.") from None
    handler = make_handler(classify, description, timeout, deadline)
    try:
        return ClassifierServer((host, port), family, handler, max_connections)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            raise InputError(f"cannot listen on {host} port {port}: {e.strerror or e}. Choose "
                             f"another with --port (0 lets the system pick a free one).") \
                from None
        raise InputError(f"cannot listen on {host}: {e.strerror or e}. --host takes an "
                         f"address of this machine: 127.0.0.1, ::1, 0.0.0.0 or ::.") from None


def classifier(model, info, device, checkpoint):
    """classify(texts) -> result records, for the server's threads: the model
    is used by one request at a time."""
    tokenizer, lock = get_tokenizer(), threading.Lock()

    def classify(texts, explain):
        with lock:
            try:
                probabilities = classify_texts(texts, model, tokenizer, device,
                                               info["max_length"], info["pad_token_id"],
                                               temperature=info["temperature"])
            except NonFiniteLogits as e:  # the name only: a client is not told paths
                raise RequestError(500, f"{Path(checkpoint).name}: {e}") from None
            targets = [predicted_class(p) for p in probabilities]
            explanations = explain_texts(texts, targets, model, tokenizer, info["max_length"],
                                         info["pad_token_id"]) if explain else [None] * len(texts)
        return [result_record(t, p, info["labels"], explanation=e)
                for t, p, e in zip(texts, probabilities, explanations)]

    return classify


def serve(checkpoint, device, base_weights, host, port, precision="fp32"):
    """Serves the page, /info and /classify until Ctrl-C; the model is loaded once."""
    model, info = load_classifier(checkpoint, device, base_weights, precision)
    server = make_server(host, port, classifier(model, info, device, checkpoint),
                         describe_checkpoint(checkpoint, info))
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}, not only on this machine: whoever reaches it on "
              f"port {server.server_port} can use the classifier.")
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {checkpoint} at http://{shown}:{server.server_port}/ "
          f"(Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
    finally:
        server.server_close()


# ===== beyond the chapter: the command line =====

CHUNK = 1024  # at most this many lines of stdin classified and printed at a time
BLANK = "empty or only whitespace: nothing to classify"
# control characters as escapes (\n, \x1b): a label or a message can neither
# break the one line printed per message nor send commands to the terminal
CONTROL_ESCAPES = {c: chr(c).encode("unicode_escape").decode()
                   for c in [*range(0x20), *range(0x7f, 0xa0)]}


def port_number(text):
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0 to 65535")
    return int(text)


def read_lines(stream, pending):
    """Puts the lines of a binary stream on the queue `pending` as they arrive,
    a list per read, without their "\n"; then None, or the OSError that ended it."""
    parts = []  # of a line not yet complete
    try:
        while data := stream.read1(65536):  # what has arrived, without waiting for more
            *lines, last = data.split(b"\n")
            if lines:
                lines[0] = b"".join(parts) + lines[0]
                parts = []
                pending.put(lines)
            parts.append(last)
        if b"".join(parts):
            pending.put([b"".join(parts)])
        pending.put(None)
    except OSError as e:
        pending.put(e)


def line_batches(stream, size):
    """The lines of a binary stream, in order, in lists of at most `size`: a
    list as soon as every line that has arrived is in one, so that a pause in
    the input (a person typing, tail -f) shows the answers so far."""
    pending = queue.Queue(maxsize=16)  # bounded: memory stays flat however long the input
    threading.Thread(target=read_lines, args=(stream, pending), daemon=True).start()
    lines, ended = [], False
    while True:
        while not ended and (not lines or (len(lines) < size and not pending.empty())):
            item = pending.get()
            if isinstance(item, OSError):
                raise InputError(f"cannot read stdin: {item.strerror or item}.")
            ended = item is None
            lines += item or []
        if not lines:
            return
        yield lines[:size]
        del lines[:size]


def decode_line(line, number):
    """A line of stdin as text, without its "\r"; bytes that are not UTF-8
    become U+FFFD, and a note on stderr names the line."""
    line = line[:-1] if line.endswith(b"\r") else line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        print(f"note: line {number} of stdin is not UTF-8: its undecodable bytes are "
              f"classified as U+FFFD.", file=sys.stderr)
        return line.decode("utf-8", errors="replace")


def argument_text(text, number):
    """A TEXT argument as text: bytes that are not UTF-8 (Python keeps them as
    lone surrogates, which no JSON reader takes) become U+FFFD, as on stdin."""
    raw = text.encode("utf-8", errors="surrogateescape")
    if raw.decode("utf-8", errors="replace") == text:
        return text
    print(f"note: TEXT {number} is not UTF-8: its undecodable bytes are classified as "
          f"U+FFFD.", file=sys.stderr)
    return raw.decode("utf-8", errors="replace")


def text_batches(args_texts, stdin, size=CHUNK):
    """The texts to classify, in order, in lists: the TEXTs, and for "-" each
    line of stdin (blank ones too: they get an error line), as line_batches
    gives them."""
    texts, number = [], 0
    for text in args_texts:
        if text != "-":
            texts.append(text)
            continue
        if texts:
            yield texts
            texts = []
        for lines in line_batches(stdin, size):
            yield [decode_line(line, number + i) for i, line in enumerate(lines, 1)]
            number += len(lines)
    if texts:
        yield texts


def printable(text):
    return text.translate(CONTROL_ESCAPES)


def print_result(text, probas, labels, as_json, show_all, threshold=None, explanation=None):
    if as_json:
        print(json.dumps(result_record(text, probas, labels, threshold, explanation),
                         allow_nan=False))
        return
    best = predicted_class(probas, threshold)
    names = [printable(name) for name in labels]
    if show_all:
        shown = "  ".join(f"P({name})={p:.3f}" for name, p in zip(names, probas))
    elif labels == SPAM_CLASS_NAMES:
        shown = f"P(spam)={probas[1]:.3f}"  # the one number a spam filter thresholds
    else:
        shown = f"P({names[best]})={probas[best]:.3f}"
    print(f"{names[best]}\t{shown}\t{printable(text)}")
    if explanation is not None:
        print("\n".join(explanation_lines(explanation, names[best], sys.stdout.isatty())))


def print_blank(text, as_json):
    """The line printed for a blank line of stdin, so that output line N stays
    the answer to input line N."""
    if as_json:
        print(json.dumps({"text": text, "error": BLANK}))
    else:
        print(f"-\t{BLANK}\t{printable(text)}")


def unwritable_stdout(error):
    """The error for a stdout that cannot be written (a full disk, /dev/full);
    stdout goes to nothing first, so that Python's own flush at exit is quiet."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return InputError(f"cannot write the results to stdout: {error.strerror or error}.")


def classify_and_print(batches, model, tokenizer, device, info, args, threshold):
    """Classifies (and with --explain explains) each list of texts and prints a
    line per text, in order; the number of texts."""
    done = 0
    for texts in batches:
        messages = [text for text in texts if text.strip()]
        probabilities = classify_texts(messages, model, tokenizer, device, info["max_length"],
                                       info["pad_token_id"], temperature=info["temperature"]) \
            if messages else []
        explanations = [None] * len(messages)
        if args.explain and messages:
            targets = [predicted_class(p, threshold) for p in probabilities]
            explanations = explain_texts(messages, targets, model, tokenizer, info["max_length"],
                                         info["pad_token_id"], args.explain_method)
        answers = zip(probabilities, explanations)
        try:
            for text in texts:
                if text.strip():
                    probas, explanation = next(answers)
                    print_result(text, probas, info["labels"], args.json, args.all, threshold,
                                 explanation)
                else:
                    print_blank(text, args.json)
            sys.stdout.flush()
        except BrokenPipeError:
            raise  # the reader went away: run_cli ends quietly
        except OSError as e:
            raise unwritable_stdout(e) from None
        done += len(texts)
    return done


def validated_threshold(choice, info, checkpoint):
    """The threshold --threshold validated asks for; None for the argmax."""
    if choice == "argmax":
        return None
    if info["num_classes"] != 2:
        raise InputError(f"{checkpoint} has {info['num_classes']} classes: --threshold "
                         f"validated is for two (a threshold on P(class 1)); leave it out.")
    if info["threshold"] is None:
        raise InputError(f"{checkpoint} has no validated threshold: it was saved before "
                         f"finetune.py chose one. Fine-tune again, or leave out --threshold "
                         f"validated.")
    return info["threshold"]


def build_parser():
    parser = argparse.ArgumentParser(
        description="Classify messages with a classifier fine-tuned by finetune.py "
                    "(listing 6.12's classify_review, batched). The probabilities printed "
                    "are temperature-scaled with the temperature finetune.py fitted on the "
                    "validation split and saved in the checkpoint (none in an older "
                    "checkpoint: T=1); the label is the most probable class unless "
                    "--threshold validated.")
    parser.add_argument("texts", nargs="*", metavar="TEXT",
                        help="messages to classify; - reads one per line from stdin and "
                             "prints one line per line read, in order, as soon as the input "
                             f"pauses (at most {CHUNK:,} at a time). A blank line prints "
                             f"'-<tab>{BLANK}' (--json: an object with \"error\"); a line "
                             "that is not UTF-8 is classified with U+FFFD for its bad bytes, "
                             "and a note on stderr names it. Control characters in what is "
                             "printed (not --json) are escaped, as \\n or \\x1b. With "
                             "--explain (not --json), each result line is followed by its "
                             "explanation's lines, indented")
    parser.add_argument("--checkpoint", default=CHECKPOINT_NAME,
                        help="the classifier finetune.py saved (default: %(default)s)")
    parser.add_argument("--base-weights", metavar="PATH",
                        help="for a checkpoint of finetune.py --trainable lora: the base "
                             "weights its adapters sit on, where they are no longer where "
                             "finetune.py read them: a model.safetensors, the book's .pth or "
                             "OpenAI's model.ckpt (its prefix or any of its files), or a "
                             "folder holding a model.safetensors or OpenAI's checkpoint; "
                             "checked by size and sha256 (of OpenAI's data file)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run the model (default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="the matrix products' precision: fp32; bf16, bfloat16 (1.7-2.1x "
                             "the messages/s on a CPU with avx512_bf16, measured; "
                             "probabilities within about 0.02 of fp32's, so a message near "
                             "0.5 may change label); fp16, float16 (CUDA only); "
                             "any checkpoint runs in any of them (default: %(default)s)")
    parser.add_argument("--all", action="store_true",
                        help="print the probability of every class, not only the chosen one")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per message: text, label, probabilities "
                             "(and with --explain: explanation, a list of {token, score} "
                             "whose tokens join to the text as classified, after truncation)")
    parser.add_argument("--explain", action="store_true",
                        help="also show each token's signed share of the label (positive: "
                             "toward it): on a terminal the message coloured token by token, "
                             "then the tokens that pushed most toward the label")
    parser.add_argument("--explain-method", default=EXPLAIN_DEFAULT,
                        choices=list(EXPLAIN_METHODS),
                        help="with --explain, how the shares are computed (default: "
                             "%(default)s, the most faithful here): " + "; ".join(
                                 f"{k}: {v}" for k, v in EXPLAIN_METHODS.items()))
    parser.add_argument("--threshold", default="argmax", choices=["argmax", "validated"],
                        help="how the label is chosen: argmax, the most probable class (the "
                             "chapter); validated, for two classes, class 1 (spam) where its "
                             "probability is above the threshold finetune.py chose on the "
                             "validation split for its --target-fpr (default: %(default)s)")
    parser.add_argument("--serve", action="store_true",
                        help="instead of classifying TEXTs, serve a page to try the classifier "
                             "in a browser (with a \"why?\" view per message), and POST "
                             "/classify with {\"texts\": [...]} as Content-Type: "
                             "application/json, and \"explain\": true for each token's share "
                             f"(at most {MAX_EXPLAINED} texts then)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="with --serve: the address to listen on (IPv4 or IPv6: ::1); "
                             "0.0.0.0 or :: opens it to other machines (default: %(default)s, "
                             "this machine only)")
    parser.add_argument("--port", type=port_number, default=8000,
                        help="with --serve: the port; 0 lets the system pick a free one "
                             "(default: %(default)s)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve:
        if args.texts or args.all or args.json or args.explain or args.threshold != "argmax":
            parser.error("--serve takes no TEXT, --all, --json, --explain or --threshold: the "
                         "page shows every class's probability, and explains on request")
        device = select_device(args.device)
        check_precision(args.precision, device)
        return serve(args.checkpoint, device, args.base_weights, args.host, args.port,
                     args.precision)
    if args.host != "127.0.0.1" or args.port != 8000:
        parser.error("--host and --port go with --serve")
    if args.explain_method != EXPLAIN_DEFAULT and not args.explain:
        parser.error("--explain-method goes with --explain")
    if not args.texts:
        raise InputError("no message to classify: give texts as arguments, or - to read "
                         "one per line from stdin.")
    if any(not text.strip() for text in args.texts):
        raise InputError("a message to classify is empty or only whitespace.")
    if sys.stdout is None:  # started with >&-
        raise InputError("stdout is closed: there is nowhere to print the results.")
    if "-" in args.texts and sys.stdin is None:
        raise InputError("stdin is closed: - has no line to read.")
    device = select_device(args.device)
    check_precision(args.precision, device)
    model, info = load_classifier(args.checkpoint, device, args.base_weights, args.precision)
    threshold = validated_threshold(args.threshold, info, args.checkpoint)
    texts = [argument_text(text, i) for i, text in enumerate(args.texts, 1)]
    batches = text_batches(texts, sys.stdin.buffer if "-" in texts else None)
    try:
        done = classify_and_print(batches, model, get_tokenizer(), device, info, args,
                                  threshold)
    except NonFiniteLogits as e:
        raise InputError(f"{args.checkpoint}: {e}") from None
    if not done:
        raise InputError("no message to classify: stdin was empty.")


if __name__ == "__main__":
    run_cli(main)
