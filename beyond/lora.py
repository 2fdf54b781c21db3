"""LoRA (appendix E): adapters on the blocks' Linear layers, and the base weights under them."""
import math
import os
from pathlib import Path
from beyond.cli import InputError
from beyond.download import download_gpt2, file_fingerprint
from beyond.weights import weights_file
import torch


def lora_description(args):
    """What classify.py needs to rebuild the base under the adapters and check its size, sha256."""
    lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "model": args.model,
            "weights": args.weights, "seed": args.seed}
    if args.weights != "random":
        path = weights_file(args.weights, args.model)  # for OpenAI's checkpoint: its data file
        lora["path"] = str(Path(path).resolve())
        lora["bytes"], lora["sha256"] = file_fingerprint(path)
    return lora


def lora_base_file(lora, checkpoint, base_weights=None):
    """A LoRA checkpoint's base weights file, checked by size and sha256: --base-weights,
    else where finetune.py read it, else the Hub's pretrained file."""
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
    # the size first: the sha256 is one pass over the whole file
    if (os.path.getsize(weights) != lora["bytes"]
            or file_fingerprint(weights)[1] != lora["sha256"]):
        raise InputError(f"{weights} is not the base {checkpoint} was fine-tuned on (its "
                         f"size or sha256 differs, so its predictions would too): {hint}.")
    return weights


class LoRALayer(torch.nn.Module):
    """Appendix E: alpha/rank * (x A B); B starts at 0, so training starts at the base model."""

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


def lora_base(info, checkpoint, base_weights, GPTModel, load_gpt2_file):
    """The base GPT-2 under a LoRA checkpoint's adapters (random with finetune.py's seed, or
    the checked file), with an empty ("meta") head and adapters for the checkpoint to fill.
    GPTModel and load_gpt2_file: gpt.py's (beyond/ never imports the chapter's files)."""
    lora, config = info["lora"], info["config"]
    if lora["weights"] == "random":
        if base_weights:
            raise InputError(f"{checkpoint} was fine-tuned on random base weights (seed "
                             f"{lora['seed']}), which classify.py rebuilds itself: leave "
                             f"out --base-weights.")
        torch.manual_seed(lora["seed"])  # finetune.py seeds the same way
        gpt = GPTModel(config)
    else:
        gpt = load_gpt2_file(lora_base_file(lora, checkpoint, base_weights), config)
    with torch.device("meta"):
        gpt.out_head = torch.nn.Linear(config["emb_dim"], info["num_classes"])
        replace_linear_with_lora(gpt.trf_blocks, lora["rank"], lora["alpha"])
    return gpt


def add_base_weights_option(parser):
    parser.add_argument("--base-weights", metavar="PATH",
                        help="for a checkpoint of finetune.py --trainable lora: the base "
                             "weights its adapters sit on, where they are no longer where "
                             "finetune.py read them: a model.safetensors, the book's .pth or "
                             "OpenAI's model.ckpt (its prefix or any of its files), or a "
                             "folder holding a model.safetensors or OpenAI's checkpoint; "
                             "checked by size and sha256 (of OpenAI's data file)")
