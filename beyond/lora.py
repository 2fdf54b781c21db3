"""LoRA (appendix E): low-rank adapters on the blocks' Linear layers, and what a
LoRA checkpoint records of the base weights it sits on."""
import math
import os
from pathlib import Path
from beyond.cli import InputError
from beyond.download import download_gpt2, file_fingerprint
from beyond.weights import weights_file
import torch


def lora_description(args):
    """What classify.py needs to rebuild the base model under the adapters, and
    to check that it is the very file they were trained on: its size and sha256."""
    lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "model": args.model,
            "weights": args.weights, "seed": args.seed}
    if args.weights != "random":
        path = weights_file(args.weights, args.model)  # for OpenAI's checkpoint: its data file
        lora["path"] = str(Path(path).resolve())
        lora["bytes"], lora["sha256"] = file_fingerprint(path)
    return lora


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
