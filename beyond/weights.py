"""GPT-2's weights in the three forms --weights takes (the Hub's safetensors,
the book's .pth, OpenAI's TensorFlow checkpoint) as the book's nested params."""
import json
import re
from pathlib import Path
from beyond.cli import InputError
from beyond.download import gpt2_weights_path
from beyond.safetensors import load_safetensors
from beyond.tf_checkpoint import read_tf_checkpoint, tf_data_file
import torch


def read_params(form, path, n_layers):
    """The book's nested params from one file, every tensor a view of the file
    mapped into memory (a .pth's fused c_attn aside): nothing read yet."""
    if form == "safetensors":
        return params_from_hub(load_safetensors(path)[0])
    if form == "pth":
        return params_from_book(read_pth(path))
    prefix = tf_prefix(path)
    return params_from_tf(read_tf_checkpoint(prefix), n_layers, f"{prefix}.index")


def settings_for(form, path, config, base):
    """(config, the file it came from or None): hparams.json beside OpenAI's
    checkpoint, a config.json (the Hub's naming or the book's) beside a
    model.safetensors or a .pth, else `config`, --model's."""
    beside = path.parent / ("hparams.json" if form == "tf" else "config.json")
    if beside.is_file():
        # None: the naming the file itself shows (the Hub's or the book's)
        return config_from_json(beside, base, "openai" if form == "tf" else None), beside
    return config, None


def check_gpt2_size(params, config, source, known, config_file=None):
    """Compares the file's embeddings and layer count with the config before any
    tensor is read, so that no model larger than the file's tensors is ever
    allocated; suggests the --model the tensors fit among `known` (name -> config)."""
    if params.get("wte") is None or params.get("wpe") is None:
        raise InputError(f"{source} has no token or position embedding (wte, wpe): "
                         f"not GPT-2 weights.")
    wte, wpe = tuple(params["wte"].shape), tuple(params["wpe"].shape)
    layers = sum(1 for block in params["blocks"] if block)
    needs = "the model needs" if config_file is None else f"{config_file} says"
    if wte != (config["vocab_size"], config["emb_dim"]) or layers != config["n_layers"]:
        fits = [name for name, size in known.items()
                if (size["emb_dim"],) == wte[-1:] and size["n_layers"] == layers]
        hint = f" (these are {fits[0]} weights: use --model {fits[0]})" \
            if fits and config_file is None else ""
        raise InputError(
            f"{source}: wte (the token embedding) has shape {wte} and there are {layers} "
            f"layers, but {needs} {(config['vocab_size'], config['emb_dim'])} and "
            f"{config['n_layers']} layers{hint}.")
    if wpe != (config["context_length"], config["emb_dim"]):
        raise InputError(f"{source}: wpe (the position embedding) has shape {wpe}, but "
                         f"{needs} {(config['context_length'], config['emb_dim'])}.")


def find_weights(weights, flag="--weights"):
    """What a --weights PATH names -> (form, the file whose bytes are the weights):
    "safetensors", "tf" (OpenAI's checkpoint: its folder, prefix or any file) or "pth"."""
    path = Path(weights)
    if path.name in ("checkpoint", "hparams.json") and path.is_file():
        path = path.parent  # a file of OpenAI's release that names no weights: its folder
    prefix = tf_prefix(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return "safetensors", path / "model.safetensors"
        prefix = path / "model.ckpt"  # as OpenAI's release and chapter 5 name it
        if not Path(f"{prefix}.index").is_file():
            raise InputError(f"weights folder {path} has neither a model.safetensors nor "
                             f"OpenAI's checkpoint (hparams.json, model.ckpt.index, "
                             f"model.ckpt.data-...).")
    if prefix is not None:  # its first data file (OpenAI's have one)
        files = sorted(prefix.parent.glob(f"{prefix.name}.data-00000-of-*"))
        return "tf", files[0] if files else tf_data_file(prefix, 0, 1)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist ({flag} takes a "
                         f"model.safetensors, the book's .pth, OpenAI's model.ckpt or a "
                         f"folder holding a model.safetensors or OpenAI's checkpoint).")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format is a zip archive
    return ("pth" if is_zip or path.suffix in (".pth", ".pt") else "safetensors"), path


def tf_prefix(path):
    """The checkpoint prefix of model.ckpt, model.ckpt.index, .meta or .data-*, or None."""
    match = re.fullmatch(r"(.+)(\.index|\.meta|\.data-.*)", path.name, re.S)
    if match:
        return path.with_name(match[1])
    return path if not path.exists() and Path(f"{path}.index").is_file() else None


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


def config_from_json(path, base, naming=None):
    """Our config from a JSON file of hyper-parameters in one of CONFIG_NAMES'
    namings; naming None: the Hub's where the file has n_embd, else the book's."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the model config {path}: {e}.") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the model config is not a JSON object.")
    names = CONFIG_NAMES[naming or ("hub" if "n_embd" in raw else "book")]
    config = dict(base)
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


def params_from_tf(variables, n_layers, source):
    """The book's load_gpt2_params_from_tf_ckpt without TensorFlow: "model/h0/attn/c_attn/w"
    -> params["blocks"][0]["attn"]["c_attn"]["w"], squeezed ([1, in, out] -> (in, out))."""
    params = {"blocks": [{} for _ in range(n_layers)]}
    for name, tensor in variables.items():
        if not name.startswith("model/"):
            continue
        parts = name.split("/")[1:]  # without the "model/" prefix
        layer = int(parts[0][1:]) if parts[0][:1] == "h" and parts[0][1:].isdecimal() else None
        if layer is not None and layer >= n_layers:
            raise InputError(f"{source} has a layer {parts[0]}, but the model config "
                             f"has {n_layers} layers.")
        nested(params, parts[1:-1], layer)[parts[-1]] = tensor.squeeze()
    return params


def nested(target, keys, layer=None):
    """target[keys[0]][keys[1]]..., made as needed; with layer, in that block of params."""
    if layer is not None:
        target["blocks"].extend({} for _ in range(layer + 1 - len(target["blocks"])))
        target = target["blocks"][layer]
    for key in keys:
        target = target.setdefault(key, {})
    return target


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
        elif parts[0] == "h" and len(parts) in (4, 5) and parts[1].isdecimal() and \
                parts[-1] in ("weight", "bias") and parts[2:4] != ["attn", "bias"]:
            target = nested(params, parts[2:-1], int(parts[1]))
            layer_norm = parts[2].startswith("ln_")
            target[{"weight": "g" if layer_norm else "w", "bias": "b"}[parts[-1]]] = tensor
    return params


# the book's GPTModel names -> where the tensor goes in params (in a block: blocks[N])
BOOK_NAMES = {"tok_emb.weight": "wte", "pos_emb.weight": "wpe", "final_norm.scale": "g",
              "final_norm.shift": "b", "out_head.weight": "out_head"}
BOOK_BLOCK_NAMES = {
    "att.c_attn": ("attn", "c_attn"), "att.out_proj": ("attn", "c_proj"),
    "ff.layers.0": ("mlp", "c_fc"), "ff.layers.2": ("mlp", "c_proj"), "norm1": ("ln_1",),
    "norm2": ("ln_2",)}


def params_from_book(state):
    """The book's state_dict (.pth) -> nested params: Linear weights back to (in, out),
    W_query/W_key/W_value fused into c_attn, out_head kept (the book ties it to wte
    only when loading OpenAI's weights)."""
    state = dict(state)
    for name in [name for name in state if ".att.W_query." in name]:
        qkv = [state.get(name.replace("W_query", m)) for m in ("W_query", "W_key", "W_value")]
        if all(t is not None for t in qkv):  # a missing one is reported as missing
            # (3 * out, in), transposed below: the one copy this format needs
            state[name.replace("W_query", "c_attn")] = torch.cat(qkv)
    params = {"blocks": []}
    for name, tensor in state.items():
        block = re.fullmatch(r"trf_blocks\.([0-9]+)\.(.+)\.([^.]+)", name)
        if name in BOOK_NAMES:
            params[BOOK_NAMES[name]] = tensor
        elif block and block[2] in BOOK_BLOCK_NAMES:
            target = nested(params, BOOK_BLOCK_NAMES[block[2]], int(block[1]))
            key = {"scale": "g", "shift": "b", "weight": "w", "bias": "b"}.get(block[3], block[3])
            target[key] = tensor.T if block[3] == "weight" else tensor
    return params


def read_pth(path):
    """The book's .pth, memory-mapped: torch.load(weights_only=True) runs no code."""
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


def checked_value(params, keys, transform, param, name, source):
    """params[keys...] made into what the model's parameter `name` takes (transform:
    transposed or split, as load_weights_into_gpt's table says), or one error: the
    tensor missing, not floats, or of another shape."""
    where = "params" + "".join(f"[{key!r}]" for key in keys)
    tensor = params
    try:
        for key in keys:
            tensor = tensor[key]
    except (KeyError, IndexError, TypeError):  # IndexError: a tensor where keys go on
        raise InputError(f"{source}: {where} is missing (the model's {name}): not a "
                         f"complete GPT-2 checkpoint of this size.") from None
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise InputError(f"{source}: {where} holds "
                         f"{getattr(tensor, 'dtype', type(tensor).__name__)}, not floats.")
    same_dims = tensor.dim() == param.dim()  # split and transpose keep them
    value = transform(tensor) if transform and same_dims else tensor
    if not same_dims or value.shape != param.shape:
        how = f" ({tuple(value.shape)} once split or transposed)" if value is not tensor else ""
        raise InputError(f"{source}: {where} has shape {tuple(tensor.shape)}{how}, but the "
                         f"model needs {tuple(param.shape)} there. Check that "
                         f"--model matches the weights.")
    return value


def add_weights_options(parser, model_names, random=""):
    """--model (one of model_names, gpt.py's) and --weights, for gpt.py and
    finetune.py (random: what --weights random does there, or nothing)."""
    parser.add_argument("--model", choices=list(model_names), default="gpt2-small",
                        help="GPT-2 size (section 6.4's CHOOSE_MODEL; default: %(default)s); "
                             "a config.json (or OpenAI's hparams.json) beside --weights PATH "
                             "overrides it")
    parser.add_argument("--weights", default="pretrained",
                        help="'pretrained' (section 6.4: gpt2/<size>/ as chapter 5 left it "
                             "with OpenAI's checkpoint, else the Hub's model.safetensors "
                             f"downloaded there once, else OpenAI's files), {random}or a local "
                             "file: a model.safetensors (Hub layout), the book's .pth, or "
                             "OpenAI's model.ckpt (its prefix or any of its files); or a "
                             "folder holding a model.safetensors (+ config.json) or OpenAI's "
                             "checkpoint (hparams.json, model.ckpt.*) (default: %(default)s)")
