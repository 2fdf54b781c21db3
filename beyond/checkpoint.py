"""The checkpoint's metadata: what save_classifier writes beside the tensors,
and its checks when classify.py reads it back, before anything large is allocated."""
import json
from beyond.calibrate import TEMPERATURE_RANGE
from beyond.cli import InputError, parse_json
from beyond.pooling import POOLS
from beyond.safetensors import SAFETENSORS_DTYPES
from beyond.weights import check_config
import torch


CHECKPOINT_FORMAT = "gpt2-classifier/1"


def checkpoint_metadata(classifier, config, max_length, class_names, lora, trainable,
                        calibration):
    """What save_classifier writes beside the tensors, in this order. lora: what
    identifies the adapters' base weights; calibration: the temperature and threshold."""
    metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(config),
                "num_classes": str(classifier.gpt.out_head.out_features),
                "max_length": str(max_length), "pad_token_id": str(classifier.pad_token_id),
                "labels": json.dumps(class_names), "pool": classifier.pool,
                "trainable": trainable}  # finetune.py's --trainable, to describe the model
    if calibration:
        metadata["calibration"] = json.dumps(calibration)
    if lora:
        metadata["lora"] = json.dumps(lora)
    return metadata


def read_checkpoint_metadata(path, metadata, sizes):
    """Checks the metadata of a checkpoint before anything large is allocated."""
    def bad(problem):
        return InputError(f"{path} is not a classifier checkpoint this version can read: "
                          f"{problem}. Make a new one with python finetune.py.")

    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise bad(f"its format is {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    try:
        config = parse_json(metadata["config"])  # bounded: a crafted file is read in no time
        labels = parse_json(metadata["labels"])
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
            or not all(isinstance(label, str) for label in labels)
            or len(set(labels)) != len(labels)):  # two alike: --json would lose a class
        raise bad("its labels do not name each class once")
    if not 1 <= info["max_length"] <= config["context_length"]:
        raise bad(f"max_length {info['max_length']} is outside 1..{config['context_length']}")
    if not 0 <= info["pad_token_id"] < config["vocab_size"]:
        raise bad(f"pad_token_id {info['pad_token_id']} is outside the vocabulary")
    if pool not in POOLS:
        raise bad(f"unknown pooling {pool!r}")
    try:
        lora = parse_json(metadata["lora"]) if "lora" in metadata else None
    except ValueError:
        lora = "not JSON"
    if lora is not None and not valid_lora(lora, config, sizes):
        raise bad("its LoRA description is malformed")
    temperature, threshold = read_calibration(metadata.get("calibration"), info, bad)
    model = next((name for name, known in sizes.items() if known == config), "a custom size")
    return dict(info, config=config, labels=labels, pool=pool, lora=lora, model=model,
                trainable=metadata.get("trainable", "not recorded"),
                temperature=temperature, threshold=threshold)


def read_calibration(text, info, bad):
    """(temperature, threshold or None) of a checkpoint; (1.0, None) for one saved
    before finetune.py calibrated: it loads as it always did."""
    if text is None:
        return 1.0, None
    try:
        calibration = parse_json(text)
        temperature, threshold = calibration["temperature"], calibration["threshold"]
    except (ValueError, KeyError, TypeError):
        raise bad("its calibration is malformed") from None
    lowest, highest = TEMPERATURE_RANGE  # what finetune.py fits in; beyond, no answer means much
    if not (isinstance(temperature, (int, float)) and lowest <= temperature <= highest):
        raise bad(f"its temperature {temperature!r} is outside {lowest}..{highest}, the range "
                  f"finetune.py fits it in")
    if threshold is not None and not (isinstance(threshold, (int, float))
                                      and info["num_classes"] == 2 and 0 <= threshold <= 1):
        raise bad(f"its threshold {threshold!r} is not a probability of a two-class model")
    return float(temperature), threshold


def valid_lora(lora, config, sizes):
    """Whether a LoRA description names a base model that can be rebuilt: random weights
    of a known size (nothing else bounds what they allocate), or a file's size and sha256."""
    try:
        if not (isinstance(lora["rank"], int) and 1 <= lora["rank"] <= 4096 and lora["alpha"] > 0
                and lora["model"] in sizes and isinstance(lora["seed"], int)):
            return False
        if lora["weights"] == "random":
            return config == sizes[lora["model"]]
        return (isinstance(lora["weights"], str) and isinstance(lora["path"], str)
                and isinstance(lora["bytes"], int) and isinstance(lora["sha256"], str))
    except (TypeError, KeyError):  # not a dict, or a field of the wrong type
        return False


def check_tensors(entries, expected, path):
    """The checkpoint's tensors (its header's entries) against what its own config
    needs (name -> shape), before any is read. Floats too: an F32 tensor relabelled
    I32 has the same size, passes every other check and would load as nonsense."""
    for name, shape in expected.items():
        if name not in entries:
            raise InputError(f"{path} lacks tensor {name}: not a complete checkpoint.")
        if entries[name][1] != shape:
            raise InputError(f"{path}: tensor {name} has shape {entries[name][1]}, but its own "
                             f"config needs {shape}.")
    for name in expected:
        if not SAFETENSORS_DTYPES[entries[name][0]].is_floating_point:
            raise InputError(f"{path}: tensor {name} has dtype {entries[name][0]}, but weights "
                             f"are floating point (F16, BF16, F32 or F64).")


def empty_gpt(GPTModel, config, num_classes):
    """A GPTModel (gpt.py's class) with a num_classes head whose parameters take no
    memory and no time: "meta" tensors, to be replaced by a checkpoint's."""
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
