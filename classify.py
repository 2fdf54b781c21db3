"""Section 6.8: listing 6.12 classifies a text; then the checkpoint finetune.py saves
(review_classifier.safetensors) and loads, and the choice of device. Pooling, the
prefix cache, LoRA, the server, explanations and many texts are in beyond/.

python classify.py "You are a winner you have been specially selected ..."
python classify.py --checkpoint runs/a/review_classifier.safetensors - < messages.txt
"""
import argparse
import os

from beyond.checkpoint import (check_tensors, checkpoint_metadata, empty_gpt,
                               read_checkpoint_metadata)
from beyond.cli import InputError, run_cli, torch_version
from beyond.explain import add_explain_options
from beyond.fast import GPTClassifier
from beyond.lora import add_base_weights_option, lora_base
from beyond.precision import add_precision_option, check_precision
from beyond.safetensors import load_safetensors, read_safetensors_header, save_safetensors
from beyond.serve import add_serve_options, check_serve_options, serve
from beyond.stream import add_output_options, add_texts_argument, check_texts, classify_arguments
from beyond.tokens import PAD_TOKEN_ID, encode
import torch
from data import SPAM_CLASS_NAMES
from gpt import GPTModel, MODEL_NAMES, get_tokenizer, load_gpt2_file, model_config

CHECKPOINT_NAME = "review_classifier.safetensors"


# Listing 6.12 Using the model to classify new texts
def classify_review(text, model, tokenizer, device, max_length=None,
                    pad_token_id=PAD_TOKEN_ID, class_names=SPAM_CLASS_NAMES):
    # PAD_TOKEN_ID: the book's 50256; class_names: see the last line
    model.eval()

    # Prepare inputs to the model; encode is tokenizer.encode(text) with a text's
    # "<|endoftext|>" kept as text, never the pad id
    input_ids = encode(text, tokenizer)
    # not the book's shape[1], the embedding size: shape[0] is the context length
    # (rasbt/LLMs-from-scratch#371)
    supported_context_length = model.pos_emb.weight.shape[0]
    # not the book's: None is the whole context (#666), and max_length is clamped
    # before the padding too, which past the context has no position (#497)
    max_length = min(max_length or supported_context_length, supported_context_length)

    # Truncate sequences if they are too long
    input_ids = input_ids[:max_length]

    # Pad sequences to the longest sequence
    input_ids += [pad_token_id] * (max_length - len(input_ids))
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)  # add batch dimension

    # Model inference
    with torch.no_grad():
        logits = model(input_tensor)[:, -1, :]  # Logits of the last output token
    predicted_label = torch.argmax(logits, dim=-1).item()

    # Return the classified result; not the book's "spam" if 1 else "not spam":
    # the checkpoint's class names, which are those for the SMS data
    return class_names[predicted_label]


# ------------------------------- saving and loading it (the chapter's torch.save, load_state_dict)

def save_classifier(classifier, path, config, max_length, class_names, lora=None,
                    trainable="last_block", calibration=None):
    """The chapter's torch.save(model.state_dict(), "review_classifier.pth"), without
    pickle: safetensors, with metadata that describes the model (beyond/checkpoint.py)."""
    metadata = checkpoint_metadata(classifier, config, max_length, class_names, lora,
                                   trainable, calibration)
    tensors = classifier.gpt.state_dict()
    if lora:  # the base weights stay in their own file, which the metadata identifies
        tensors = {name: t for name, t in tensors.items()
                   if ".lora." in name or name.startswith("out_head.")}
    save_safetensors(tensors, path, metadata)


def load_classifier(path, device="cpu", base_weights=None, precision="fp32"):
    """The chapter's model.load_state_dict(torch.load(...)) of a checkpoint finetune.py
    wrote: (GPTClassifier, metadata), every tensor checked against an empty ("meta")
    model first, then taken memory-mapped, not copied. base_weights: under LoRA adapters."""
    if not os.path.exists(path):
        raise InputError(f"no checkpoint at {path}. Fine-tune one first with python "
                         f"finetune.py (it writes {CHECKPOINT_NAME}), or pass --checkpoint PATH.")
    entries, metadata = read_safetensors_header(path)
    known = {name: model_config(name) for name in MODEL_NAMES}
    info = read_checkpoint_metadata(path, metadata, known)
    lora = info["lora"]
    if base_weights and not lora:
        raise InputError(f"{path} holds every weight of its model: --base-weights is only "
                         f"for checkpoints of --trainable lora.")
    if lora:  # adapters and head only: rebuild the base model they sit on
        gpt = lora_base(info, path, base_weights, GPTModel, load_gpt2_file)
        expected = {name: tuple(t.shape) for name, t in gpt.state_dict().items()
                    if ".lora." in name or name.startswith("out_head.")}
    else:
        gpt = empty_gpt(GPTModel, info["config"], info["num_classes"])
        expected = {name: tuple(t.shape) for name, t in gpt.state_dict().items()}
    check_tensors(entries, expected, path)  # every one there, of its shape, floats
    tensors, _ = load_safetensors(path)
    state = {name: tensors[name].float() for name in expected}
    gpt.load_state_dict(state, assign=True, strict=not lora)
    model = GPTClassifier(gpt, pool=info["pool"], pad_token_id=info["pad_token_id"],
                          precision=precision)
    return model.to(device).eval(), info


def add_device_option(parser, default, what):
    parser.add_argument("--device", default=default, choices=["auto", "cpu", "cuda", "mps"],
                        help=f"{what}; auto picks cuda, then mps (torch >= 2.9), then cpu "
                             f"(default: %(default)s)")


def select_device(name):
    """The chapter's torch.device("cuda" if torch.cuda.is_available() else "cpu"), and
    its note's mps (from torch 2.9: earlier ones computed differently there), by --device."""
    available = [name for name, here in [("cpu", True), ("cuda", torch.cuda.is_available()),
                                         ("mps", torch.backends.mps.is_available())] if here]
    if name == "auto":
        mps = "mps" in available and torch_version() >= (2, 9)
        return torch.device("cuda" if "cuda" in available else "mps" if mps else "cpu")
    if name not in available:
        raise InputError(f"--device {name} is not available on this machine; "
                         f"available: {', '.join(available)} (or auto).")
    return torch.device(name)


# ----------------------------------------------------------------- the command line

def build_parser():
    parser = argparse.ArgumentParser(
        description="Classify messages with a classifier fine-tuned by finetune.py "
                    "(listing 6.12's classify_review, batched). The probabilities printed "
                    "are temperature-scaled with the temperature finetune.py fitted on the "
                    "validation split and saved in the checkpoint (none in an older "
                    "checkpoint: T=1); the label is the most probable class unless "
                    "--threshold validated.")
    add_texts_argument(parser)
    parser.add_argument("--checkpoint", default=CHECKPOINT_NAME,
                        help="the classifier finetune.py saved (default: %(default)s)")
    add_device_option(parser, "cpu", "where to run the model")
    # not the chapter's: each of these modules adds the flags of what it does
    for add_options in (add_base_weights_option, add_precision_option, add_output_options,
                        add_explain_options, add_serve_options):
        add_options(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_serve_options(parser, args)
    if not args.serve:
        check_texts(parser, args)  # beyond/stream.py: texts, stdin and stdout usable
    device = select_device(args.device)
    check_precision(args.precision, device)
    model, info = load_classifier(args.checkpoint, device, args.base_weights, args.precision)
    if args.serve:  # not the chapter's: a page and an API (beyond/serve.py)
        return serve(model, info, args, device, get_tokenizer())
    # classify_review's steps for many texts at once, printed (beyond/stream.py)
    classify_arguments(args, model, info, device, get_tokenizer())


if __name__ == "__main__":
    run_cli(main)
