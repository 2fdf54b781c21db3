"""The default run's speed: the frozen layers' output computed once per message
(the prefix cache) and the last block at the pooled position only. --plain
runs the chapter's GPTModel instead; both give the same logits."""
import contextlib
import math
import os
import tempfile
import time
from types import SimpleNamespace
from beyond.cli import InputError, progress
from beyond.distributed import broadcast_from, ranks
from beyond.memory import cache_budget, cache_plan, memory_size
from beyond.pooling import mean_over_real_tokens, pool_positions, real_lengths, take_positions
from beyond.precision import PRECISIONS
from beyond.safetensors import tensor_bytes, write_all
from beyond.tokens import PAD_TOKEN_ID, pad_ids
import torch


def cache_frozen_prefix(classifier, args, datasets, device, work, cleanup):
    """Where it applies (not --plain, --cache-memory not 0): every message's frozen prefix,
    cached up front, past the budget in a file in `work`. Returns its budget, need and fill."""
    cleanup.callback(lambda: classifier.prefix_cache.close())  # frees the spill file
    classifier.round_frozen_prefix()  # bf16/fp16: where the cache stores, in both modes
    budget, source = cache_budget(args.cache_memory, device)
    needed, filled = 0, {}
    if classifier.enable_prefix_cache(budget, spill_dir=work):
        blocks = "block" if classifier.n_cached == 1 else "blocks"
        print(f"Caching the output of the frozen embeddings and first {classifier.n_cached} "
              f"{blocks} (--plain recomputes them on every batch, as the chapter does)")
        # every distinct message, padded where the datasets pad (pool "last" reads padding)
        lengths = {tuple(ids.tolist()): len(ids) for dataset in datasets for ids, _ in dataset}
        needed = (sum(lengths.values()) * classifier.gpt.tok_emb.weight.shape[1]
                  * classifier.cache_dtype().itemsize)
        print(cache_plan(needed, budget, source, work.parent))  # --out
        filled = classifier.fill_prefix_cache(datasets, *ranks())  # torchrun: a share each
    return {"needed_bytes": needed, "budget_bytes": budget if classifier.n_cached else 0,
            **filled}


class GPTClassifier(torch.nn.Module):
    """GPT-2 with its new head, as the listings call it: model(input_batch)[:, -1, :] is the
    class logits (b, num_classes) at the `pool` position; every position where the chapter's
    pass computes them (--plain, pool "last", fp32), else (b, 1, num_classes)."""

    def __init__(self, gpt, pool="last", pad_token_id=PAD_TOKEN_ID, fast=True,
                 precision="fp32"):
        super().__init__()
        self.gpt, self.pool, self.pad_token_id, self.fast = gpt, pool, pad_token_id, fast
        self.precision = precision  # "fp32" (the chapter), "bf16" or "fp16": see forward
        self.n_cached = None  # set by enable_prefix_cache
        self.prefix_cache = PrefixCache()
        self.rounding, self.rounds_after = None, None  # set by round_frozen_prefix
        self.grad_scaler = None  # --precision fp16's loss scaling, set by finetune.py

    @property
    def pos_emb(self):  # what listing 6.12 reads the context length from, as on GPTModel
        return self.gpt.pos_emb

    def forward(self, input_batch):
        if self.precision == "fp32" and not self.fast and self.pool == "last":
            return self.gpt(input_batch)  # the chapter's GPTModel, whose [:, -1, :] is read
        # --precision bf16/fp16: the autocast opens and closes with each pass; one left open
        # across optimizer steps keeps reusing its first low-precision copy of the weights,
        # so training never sees its own updates
        with self.autocast(input_batch):
            if self.fast:
                logits = self.fast_forward(input_batch)
            else:  # the plain pass, then --pool's position
                logits = self.pool_outputs(self.gpt(input_batch), input_batch)
        if self.precision != "fp32":
            logits = logits.float()  # a half-precision model's own dtype stays, under fp32
        logits = logits[:, None, :]  # (b, 1, num_classes)
        if self.grad_scaler is not None and logits.requires_grad:
            # fp16's loss scaling, applied to the gradient where it enters the
            # model: the same as the book's loss.backward() on a scaled loss
            logits.register_hook(self.grad_scaler.scale)
        return logits

    def pool_outputs(self, outputs, input_batch):
        # (b, T, n) -> (b, n): the chapter's outputs[:, -1, :] and its variants
        positions = pool_positions(input_batch, self.pool, self.pad_token_id)
        if positions is None:
            return mean_over_real_tokens(outputs, input_batch, self.pad_token_id)
        return take_positions(outputs, positions)[:, 0, :]

    def round_frozen_prefix(self):
        """Under bf16/fp16 the cache keeps the frozen prefix's output in that dtype;
        rounding it so in every pass keeps --plain computing what the cache gives."""
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
        return PRECISIONS[self.precision] or self.gpt.tok_emb.weight.dtype

    def autocast(self, input_batch):
        """--precision bf16/fp16's autocast on the batch's device (fp32: none)."""
        dtype = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(
            input_batch.device.type, dtype=dtype)

    # ------------------------------------ the same result with less work

    def enable_prefix_cache(self, budget=None, spill_dir=None):
        """Caches the frozen prefix's output from now on where it applies (frozen embeddings
        and first block, no dropout, budget not 0); returns whether it does. PrefixCache
        says what budget and spill_dir mean."""
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
        x = last_block_at(blocks[-1], blocks[:-1](x), positions)  # (b, 1, emb_dim)
        if self.rounds_after == len(self.gpt.trf_blocks) - 1:
            # every block frozen, no cache: the hook on the last one is bypassed here
            x = x.to(PRECISIONS[self.precision]).to(x.dtype)
        return self.gpt.out_head(self.gpt.final_norm(x[:, 0, :]))

    def fill_prefix_cache(self, datasets, rank=0, world=1, batch_size=32):
        """The frozen prefix of every message, once, the shortest first (a budget keeps as
        many as it can). Under torchrun each process computes every world-th batch and
        broadcasts it. Returns the seconds it took, the batches, how many computed here."""
        start_time = time.time()
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
                keys, keep = self.prefix_keys(batch)
                for row, key in enumerate(keys):
                    self.prefix_cache.put(key, hidden[owner][row, :keep[row]])
            done = min(starts[first + len(batches) - 1] + batch_size, len(messages))
            progress("caching the frozen layers' output, messages", done, len(messages),
                     start_time)
        return {"fill_seconds": round(time.time() - start_time, 1), "fill_batches": len(starts),
                "fill_batches_computed_here": len(range(rank, len(starts), world))}

    def prefix_keys(self, input_batch):
        """Each row's cache key (its token ids) and how many positions it keeps: all
        for pool "last" (it reads a padding position), else the real tokens (the
        causal mask keeps later padding from changing them)."""
        keep = ([input_batch.shape[1]] * len(input_batch) if self.pool == "last"
                else real_lengths(input_batch, self.pad_token_id).tolist())
        return [tuple(ids[:n]) for ids, n in zip(input_batch.tolist(), keep)], keep

    def prefix_hidden(self, input_batch):
        """The frozen prefix's output, (b, T, emb_dim), in the cache's dtype."""
        # outside inference mode: cached tensors are later used in training
        with torch.inference_mode(False), torch.no_grad(), self.autocast(input_batch):
            hidden = self.gpt.trf_blocks[:self.n_cached](embed(self.gpt, input_batch.clone()))
        return hidden.to(self.cache_dtype())

    def frozen_prefix(self, input_batch):
        """Output of the embeddings and the first n_cached blocks, (b, T, emb_dim),
        each message computed once (keyed as prefix_keys says)."""
        if self.n_cached is None:
            return embed(self.gpt, input_batch)
        keys, keep = self.prefix_keys(input_batch)
        rows = {}  # batch row -> hidden states computed now
        missing = [i for i, key in enumerate(keys) if key not in self.prefix_cache]
        if missing:
            hidden = self.prefix_hidden(input_batch[missing])
            for row, i in enumerate(missing):
                rows[i] = hidden[row, :keep[i]]
                self.prefix_cache.put(keys[i], rows[i])
        weight = self.gpt.tok_emb.weight
        # in the weights' dtype (float32 under --precision bf16/fp16): the residual
        # stream's, which holds the cache's values exactly
        x = torch.zeros(*input_batch.shape, weight.shape[1], dtype=weight.dtype,
                        device=input_batch.device)
        for i, key in enumerate(keys):
            x[i, :keep[i]] = rows[i] if i in rows else self.prefix_cache.get(key, x.device)
        return x


def embed(gpt, in_idx):
    """GPTModel.forward's first steps, with its modules: (b, T) ids -> (b, T, emb_dim)."""
    pos_embeds = gpt.pos_emb(torch.arange(in_idx.shape[1], device=in_idx.device))
    return gpt.drop_emb(gpt.tok_emb(in_idx) + pos_embeds)


def frozen_prefix_length(gpt):
    """How many leading blocks (after the embeddings) never change, or None when
    their output cannot be cached: trainable embeddings or dropout."""
    if (any(p.requires_grad for p in [gpt.tok_emb.weight, gpt.pos_emb.weight])
            or any(m.p > 0 for m in gpt.modules() if isinstance(m, torch.nn.Dropout))):
        return None
    return next((n for n, block in enumerate(gpt.trf_blocks)
                 if any(p.requires_grad for p in block.parameters())), len(gpt.trf_blocks)) or None


def last_block_at(block, x, positions):
    """block(x)[i, positions[i]] for each row, (b, T, d) -> (b, 1, d): the chapter's
    TransformerBlock.forward on the pooled rows, through a view of the block whose attention
    reads every position (a view, not the block changed: threads may share the model)."""
    att, normed = block.att, block.norm1(x)  # normed: (b, T, d), for the keys and values

    def attention(rows):  # (b, 1, d): each row's query, up to the row's own position
        keys = att.split_heads(att.W_key(normed))
        values = att.split_heads(att.W_value(normed))
        queries = att.split_heads(att.W_query(rows))
        key_pos = torch.arange(normed.shape[1], device=x.device)
        mask = key_pos <= positions[:, None]  # (b, T): causal for that query
        context = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask[:, None, None, :],
            dropout_p=att.dropout.p if att.training else 0.0)
        return att.out_proj(context.transpose(1, 2).reshape(x.shape[0], 1, att.d_out))

    view = SimpleNamespace(norm1=block.norm1, att=attention, drop_resid=block.drop_resid,
                           norm2=block.norm2, ff=block.ff)
    return type(block).forward(view, take_positions(x, positions))


ARENA_BYTES = 64 * 2**20  # the prefix cache's buffers: large enough to be few


class PrefixCache:
    """The frozen prefix's hidden states, one (tokens, emb_dim) tensor per message: on the
    device up to `budget` bytes (None: no limit), the rest in a spill file in `spill_dir`
    (None: recomputed) that has no name on disk, so nothing is left whatever ends the run.
    In memory, views into a few large buffers: a tensor each, thousands of small allocations
    between the fill's large temporaries, left the allocator holding gigabytes more."""

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
        if (self.arena is None or self.arena.device != hidden.device
                or self.arena_used + size > self.arena.numel()):
            room = ARENA_BYTES if self.budget is None else min(
                ARENA_BYTES, self.budget - self.memory_bytes)
            self.arena = torch.empty(max(room, size), dtype=torch.uint8, device=hidden.device)
            self.arena_used = 0
        copy = self.arena[self.arena_used:self.arena_used + nbytes].view(hidden.dtype)
        self.arena_used += size
        return copy.view(hidden.shape).copy_(hidden)

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
        # write_all wrote every byte of it to this file, which no other process can open
        raw = bytearray(os.pread(self.file.fileno(), math.prod(shape) * dtype.itemsize, offset))
        return torch.frombuffer(raw, dtype=dtype).view(shape).to(device)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def add_fast_options(parser):
    parser.add_argument("--plain", action="store_true",
                        help="run every layer on every batch as section 6.7 does, instead "
                             "of caching the frozen layers' output and computing the last "
                             "block at the pooled position only (same results, slower)")
    parser.add_argument("--cache-memory", type=memory_size, default="auto", metavar="SIZE",
                        help="memory the frozen layers' cached output may take on the device: "
                             "a size such as 500MB or 2GB, 0 for no cache, or auto: half of "
                             "the free GPU memory (cuda), of what Metal recommends (mps, "
                             "torch >= 2.5) or of the available RAM (cpu; the physical RAM "
                             "on macOS) when the cache is made, the RAM's half divided among "
                             "torchrun's processes on the machine. What does not fit goes to "
                             "a temporary file in --out, read back at each batch (same "
                             "results)")
