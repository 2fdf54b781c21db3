"""Section 6.8: use a fine-tuned classifier.

python classify.py "You are a winner you have been specially selected ..."
python classify.py --checkpoint runs/a/review_classifier.safetensors - < messages.txt
"""
import argparse
import json
import os
import sys

from gpt import (MODEL_NAMES, GPTModel, InputError, build_gpt, check_config, get_tokenizer,
                 load_safetensors, read_safetensors_header, run_cli)
import torch
from data import PAD_TOKEN_ID, SPAM_CLASS_NAMES, encode, pad_ids
from finetune import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, POOLS, GPTClassifier,
                      prepare_for_classification, select_device)


def classify_review(text, model, tokenizer, device, max_length=None,
                    pad_token_id=PAD_TOKEN_ID, class_names=SPAM_CLASS_NAMES):
    """Listing 6.12: the class name of one text."""
    model.eval()
    input_ids = encode(text, tokenizer)
    supported_context_length = model.gpt.pos_emb.weight.shape[0]
    if max_length is None:
        max_length = supported_context_length
    max_length = min(max_length, supported_context_length)
    input_ids = input_ids[:max_length]  # truncates sequences that are too long
    input_ids += [pad_token_id] * (max_length - len(input_ids))
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)  # adds batch dim
    with torch.inference_mode():
        logits = model(input_tensor)  # logits of the last (pooled) output token
    predicted_label = torch.argmax(logits, dim=-1).item()
    return class_names[predicted_label]


def classify_texts(texts, model, tokenizer, device, max_length, pad_token_id=PAD_TOKEN_ID,
                   batch_size=32):
    """Class probabilities (one list per text) for many texts, in batches of
    similar length. Padded to max_length only where the checkpoint's pooling
    reads a padding position ("last"); otherwise to each batch's longest."""
    model.eval()
    max_length = min(max_length, model.gpt.pos_emb.weight.shape[0])
    encoded = [encode(text, tokenizer, max_length) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    width = max_length if model.pool == "last" else None  # None: the batch's longest
    probabilities = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        inputs = pad_ids([encoded[i] for i in batch], pad_token_id, length=width)
        with torch.inference_mode():
            probas = torch.softmax(model(inputs.to(device)).float(), dim=-1).cpu()
        for row, i in enumerate(batch):
            probabilities[i] = probas[row].tolist()
    return probabilities


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
    lora = None
    if "lora" in metadata:
        try:
            lora = json.loads(metadata["lora"])
            valid = (1 <= lora["rank"] <= 4096 and lora["alpha"] > 0
                     and lora["model"] in MODEL_NAMES and isinstance(lora["weights"], str)
                     and isinstance(lora["seed"], int))
        except (ValueError, TypeError, KeyError):
            valid = False
        if not valid:
            raise bad("its LoRA description is malformed")
    return dict(info, config=config, labels=labels, pool=pool, lora=lora)


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


def lora_base(info, path):
    """The base GPT-2 a LoRA checkpoint records (pretrained, random with its seed,
    or a local file), with the head and adapters of --trainable lora."""
    lora = info["lora"]
    if lora["weights"] == "random":
        torch.manual_seed(lora["seed"])  # finetune.py seeds the same way
    gpt, config = build_gpt(lora["model"], lora["weights"])
    if config != info["config"]:
        raise InputError(f"{path} was fine-tuned on base weights ({lora['weights']}) whose "
                         f"config differs from the ones found now.")
    return prepare_for_classification(gpt, info["num_classes"], trainable="lora",
                                      seed=lora["seed"], lora_rank=lora["rank"],
                                      lora_alpha=lora["alpha"])


def load_classifier(path, device="cpu"):
    """A GPTClassifier and its metadata from a checkpoint written by finetune.py.
    The tensors' names and shapes are checked against the config on an empty
    ("meta") model first; then the model takes the memory-mapped tensors as its
    parameters, without copying them on the CPU."""
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
    if lora:  # adapters and head only: rebuild the base model they sit on
        gpt = lora_base(info, path)
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
    tensors, _ = load_safetensors(path)
    state = {name: tensors[name].float() for name in expected}
    gpt.load_state_dict(state, assign=True, strict=not lora)
    model = GPTClassifier(gpt, pool=info["pool"], pad_token_id=info["pad_token_id"])
    return model.to(device).eval(), info


def read_texts(args_texts):
    """The texts to classify; "-" reads one per line from stdin."""
    texts = []
    for text in args_texts:
        if text == "-":
            texts += [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
        else:
            texts.append(text)
    for text in texts:
        if not text.strip():
            raise InputError("a message to classify is empty or only whitespace.")
    if not texts:
        raise InputError("no message to classify: give texts as arguments, or - to read "
                         "one per line from stdin.")
    return texts


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Classify messages with a classifier fine-tuned by finetune.py "
                    "(listing 6.12's classify_review, batched).")
    parser.add_argument("texts", nargs="*", metavar="TEXT",
                        help="messages to classify; - reads one per line from stdin")
    parser.add_argument("--checkpoint", default=CHECKPOINT_NAME,
                        help="the classifier finetune.py saved (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run the model (default: %(default)s)")
    parser.add_argument("--all", action="store_true",
                        help="print the probability of every class, not only the chosen one")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per message: text, label, probabilities")
    args = parser.parse_args(argv)
    texts = read_texts(args.texts)
    device = select_device(args.device)
    model, info = load_classifier(args.checkpoint, device)
    tokenizer = get_tokenizer()
    labels = info["labels"]
    for text, probas in zip(texts, classify_texts(
            texts, model, tokenizer, device, info["max_length"], info["pad_token_id"])):
        best = max(range(len(labels)), key=lambda i: probas[i])
        if args.json:
            print(json.dumps({"text": text, "label": labels[best],
                              "probabilities": dict(zip(labels, probas))}))
            continue
        if labels == SPAM_CLASS_NAMES:
            shown = f"P(spam)={probas[1]:.3f}"  # the one number a spam filter thresholds
        else:
            shown = f"P({labels[best]})={probas[best]:.3f}"
        if args.all:
            shown = "  ".join(f"P({name})={p:.3f}" for name, p in zip(labels, probas))
        print(f"{labels[best]}\t{shown}\t{text}")


if __name__ == "__main__":
    run_cli(main)
