"""torchrun: several processes, the results of one. Each rank computes its
share of every batch (WholeBatches), DDP averages the gradients."""
import contextlib
import datetime
import os
import sys
import time
from beyond.cli import InputError, progress
from beyond.download import download_gpt2, gpt2_weights_path
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# A collective that waits longer than this (a rank stuck or gone) ends the job.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def torchrun_ranks():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return tuple(int(os.environ.get(name, default)) for name, default in
                 [("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)])


def ranks():
    """(this process's rank, number of processes) in the running process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class WithProgress:
    """A data loader's batches, with a progress line on a terminal."""

    def __init__(self, data_loader, name):
        self.data_loader, self.name = data_loader, name

    def __len__(self):
        return len(self.data_loader)

    def __iter__(self):
        start = time.time()
        for i, batch in enumerate(self.data_loader, 1):
            yield batch
            progress(f"{self.name} batches", i, len(self.data_loader), start)


def with_progress(loaders):  # the training, validation and test loaders
    return list(map(WithProgress, loaders, ["training", "validation", "test"]))


def on_every_rank(classifier, device):
    """Under torchrun, the classifier inside DDP inside WholeBatches; else itself."""
    if ranks()[1] == 1:
        return classifier
    return WholeBatches(DistributedDataParallel(
        classifier, device_ids=[device.index] if device.type == "cuda" else None))


class WholeBatches(torch.nn.Module):
    """model(input_batch) on whole batches under torchrun: each rank computes its share of
    the rows and gathers the others' logits, so the listings' counts and losses are the whole
    batch's. Only this rank's rows carry the gradient, times the number of ranks, which
    DDP's average divides out again: the whole batch's gradient on every rank."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, input_batch):
        rank, world = ranks()
        bounds = [r * input_batch.shape[0] // world for r in range(world + 1)]
        # the last, short batch of a loader may split unevenly, or leave a rank none
        own = self.module(input_batch[bounds[rank]:bounds[rank + 1]])  # (rows, T', classes)
        if own.requires_grad:
            own.register_hook(lambda grad: grad * world)
        rows = [bounds[r + 1] - bounds[r] for r in range(world)]
        padded = own.new_zeros((max(rows), *own.shape[1:]))
        padded[:rows[rank]] = own.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([own if r == rank else parts[r][:rows[r]] for r in range(world)])


@contextlib.contextmanager
def said_by_rank_0(rank):
    """Before the process group starts, every rank meets the same bad flag or data: only
    rank 0 says so, the others end quietly with the same status."""
    if rank == 0:
        yield
        return
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        try:
            yield
        except InputError:
            sys.exit(1)


def join_process_group(args, device, world, local_rank, cleanup):
    """Under torchrun (world > 1), this process in a process group that `cleanup` ends with
    the run. Returns this process's device (in one process, the one given)."""
    if world == 1:
        return device
    if args.weights == "pretrained":
        # before the group starts, whose collectives time out (gpt2-xl is 6.4 GB): one
        # download per machine, by local rank 0; torchrun ends the others if it fails
        if local_rank == 0:
            download_gpt2(args.model)
        # asked anew each time: where the Hub fails, OpenAI's files arrive instead
        while not gpt2_weights_path(args.model).exists():
            time.sleep(1)
    cleanup.callback(lambda: dist.is_initialized() and dist.destroy_process_group())  # if begun
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=COLLECTIVE_TIMEOUT)
    return device


def broadcast_from(owner, tensor, shape, dtype, device):
    """Rank owner's tensor on every rank (the others pass None), sent as bytes: gloo has no
    bfloat16 in older versions of torch."""
    tensor = torch.empty(shape, dtype=dtype, device=device) if tensor is None else \
        tensor.contiguous()
    dist.broadcast(tensor.view(torch.uint8), src=owner)
    return tensor


def printing_rank(rank):
    """Under torchrun, one writer: the other ranks print nothing but errors."""
    return contextlib.nullcontext() if rank == 0 else \
        contextlib.redirect_stdout(open(os.devnull, "w"))


def check_processes(parser, args, device, world):
    """What the flags must satisfy where torchrun starts `world` processes."""
    if world > 1 and device.type == "mps":
        parser.error("--device mps (which auto picks on a Mac) cannot run under "
                     "torchrun: its gloo backend takes CPU tensors only; use "
                     "--device cpu, or one process without torchrun")
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} does not divide among {world} "
                     f"processes: each takes an equal share of every batch")
