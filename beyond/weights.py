"""GPT-2's weights in the three forms --weights takes (the Hub's safetensors,
the book's .pth, OpenAI's TensorFlow checkpoint) as the book's nested params."""
import pickle
import re
import zipfile
from pathlib import Path
from beyond.cli import InputError, parse_json
from beyond.download import gpt2_weights_path
from beyond.safetensors import DamagedFile, load_safetensors
from beyond.tf_checkpoint import read_tf_checkpoint, tf_data_file
import torch


def read_params(form, path):
    """The book's nested params from one file, every tensor a view of the file
    mapped into memory (a .pth's fused c_attn aside): nothing read yet."""
    source = f"{tf_prefix(path)}.index" if form == "tf" else path
    try:
        if form == "safetensors":
            return params_from_hub(load_safetensors(path)[0])
        if form == "pth":
            return params_from_book(read_pth(path))
        return params_from_tf(read_tf_checkpoint(tf_prefix(path)))
    except DamagedFile as e:
        raise InputError(f"{source} cannot be GPT-2's weights: {e}. Download or save them "
                         f"again.") from None


def settings_for(form, path, config, base):
    """(config, the file it came from or None): hparams.json beside OpenAI's checkpoint, a
    config.json (either naming) beside a model.safetensors or a .pth, else `config`."""
    beside = path.parent / ("hparams.json" if form == "tf" else "config.json")
    if beside.is_file():
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
    layers = len(params["blocks"])
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
    if match := re.fullmatch(r"(.+)(\.index|\.meta|\.data-.*)", path.name, re.S):
        return path.with_name(match[1])
    return path if not path.exists() and Path(f"{path}.index").is_file() else None


def weights_file(weights, model_name="gpt2-small", models_dir="gpt2", flag="--weights"):
    """The file whose bytes are the weights `flag` names (for fingerprints)."""
    if weights == "pretrained":
        return gpt2_weights_path(model_name, models_dir)
    return find_weights(weights, flag)[1]


# our config key -> its name in a Hub config.json, OpenAI's hparams.json and the
# book's config dict (as beside a .pth)
HUB_NAMES = {"vocab_size": "vocab_size", "context_length": "n_positions", "emb_dim": "n_embd",
             "n_layers": "n_layer", "n_heads": "n_head"}
CONFIG_NAMES = {"hub": HUB_NAMES, "book": {ours: ours for ours in HUB_NAMES},
                "openai": dict(HUB_NAMES, vocab_size="n_vocab", context_length="n_ctx")}


def config_from_json(path, base, naming=None):
    """Our config from a JSON file of hyper-parameters in one of CONFIG_NAMES'
    namings; naming None: the Hub's where the file has n_embd, else the book's."""
    try:
        raw = parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        raise InputError(f"cannot read the model config {path}: {e}.") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the model config is not a JSON object.")
    names = CONFIG_NAMES[naming or ("hub" if "n_embd" in raw else "book")]
    config = {ours: raw.get(theirs, base.get(ours)) for ours, theirs in names.items()}
    return check_config({**base, **config}, path)


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


def params_from_tf(variables):
    """The book's load_gpt2_params_from_tf_ckpt without TensorFlow: "model/h0/attn/c_attn/w"
    -> params["blocks"][0]["attn"]["c_attn"]["w"], squeezed ([1, in, out] -> (in, out));
    "model/ln_f/g" -> params["g"]."""
    params = {"blocks": {}}
    for name, tensor in variables.items():
        if not name.startswith("model/"):
            continue
        parts = name.split("/")[1:]  # without the "model/" prefix
        keys = ["blocks", layer_number(parts[0][1:], name), *parts[1:]] \
            if parts[0][:1] == "h" else parts[-1:]
        place(params, keys, tensor.squeeze(), name)
    return params


def layer_number(text, name):
    """The block a tensor's name puts it in: 0 to 999 (check_config's limit) in ASCII
    digits; int() would read "١" or "01" as 1, taking another tensor's place."""
    if not re.fullmatch("0|[1-9][0-9]{0,2}", text):
        raise DamagedFile(f"tensor {name} has the layer number {text!r}, not one of 0 to 999")
    return int(text)


def place(params, keys, tensor, name):
    """params[keys[0]][keys[1]]... = tensor, the dicts made as needed. params["blocks"]
    is {layer: block}, indexed as the book's list: a layer number allocates nothing."""
    target = params
    for key in keys[:-1]:  # not a dict: a tensor, which another name goes on inside
        target = target.setdefault(key, {}) if isinstance(target, dict) else None
    if not isinstance(target, dict) or isinstance(target.get(keys[-1]), dict):
        raise DamagedFile(f"the name of tensor {name} puts it inside another tensor, or "
                          f"another inside it")
    target[keys[-1]] = tensor


def params_from_hub(tensors):
    """The Hub's names ("h.0.attn.c_attn.weight", Conv1D weights already (in, out))
    -> the book's nested params; the h.N.attn.bias mask buffers are left out."""
    params = {"blocks": {}}
    for name, tensor in tensors.items():
        parts = name.removeprefix("transformer.").split(".")
        if parts[:1] in (["wte"], ["wpe"]) and parts[1:] == ["weight"]:
            place(params, parts[:1], tensor, name)
        elif parts[0] == "ln_f" and len(parts) == 2:
            place(params, [{"weight": "g", "bias": "b"}.get(parts[1], parts[1])], tensor, name)
        elif parts[0] == "h" and len(parts) in (4, 5) and parts[-1] in ("weight", "bias") \
                and parts[2:4] != ["attn", "bias"]:
            key = "b" if parts[-1] == "bias" else "g" if parts[2].startswith("ln_") else "w"
            place(params, ["blocks", layer_number(parts[1], name), *parts[2:-1], key], tensor, name)
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
            # checked first: torch.cat would turn an integer or a bool W_query into floats
            if len({(t.dtype, t.shape) for t in qkv}) > 1 or not qkv[0].is_floating_point() \
                    or qkv[0].dim() != (2 if name.endswith(".weight") else 1):
                found = ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in qkv)
                raise DamagedFile(f"{name} and its W_key and W_value are {found}, not floats "
                                  f"of one shape, matrices (vectors for biases)")
            # (3 * out, in), transposed below: the one copy this format needs
            state[name.replace("W_query", "c_attn")] = torch.cat(qkv)
    params = {"blocks": {}}
    for name, tensor in state.items():
        block = re.fullmatch(r"trf_blocks\.([^.]+)\.(.+)\.([^.]+)", name)
        if name in BOOK_NAMES:
            place(params, [BOOK_NAMES[name]], tensor, name)
        elif block and block[2] in BOOK_BLOCK_NAMES:
            key = {"scale": "g", "shift": "b", "weight": "w", "bias": "b"}.get(block[3], block[3])
            transpose = block[3] == "weight" and tensor.dim() == 2  # else the shape check names it
            place(params, ["blocks", layer_number(block[1], name), *BOOK_BLOCK_NAMES[block[2]],
                           key], tensor.T if transpose else tensor, name)
    return params


def read_pth(path):
    """The book's .pth, memory-mapped: torch.load(weights_only=True) runs no code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        short = short_pth_record(path)
    except Exception as e:  # torch raises several kinds for a damaged or unsafe file
        if "Weights only load failed" in str(e):
            # the class refused: "Unsupported global: GLOBAL m.C" or (torch < 2.4) "class m.C"
            found = re.search(r"Unsupported (?:global: GLOBAL |class )(\S+)", str(e))
            what = found.group(1).rstrip(".") if found else "other objects"
            raise InputError(f"{path} was refused by torch.load(weights_only=True): it refers "
                             f"to {what}, not only to tensors (nothing in it was run).") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise InputError(f"{path} could not be read as torch.save writes a .pth: "
                         f"{first.rstrip('.')}.") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{path} does not hold a state_dict (names -> tensors) as the "
                         f"book's torch.save(model.state_dict()) writes.")
    if short:
        raise InputError(f"{path} is damaged: its record {short}; save it again with "
                         f"torch.save(model.state_dict(), PATH).")
    return state


# bytes per element of the storage classes torch.save names (any other: at least 1)
STORAGE_ITEMSIZES = {"DoubleStorage": 8, "LongStorage": 8, "FloatStorage": 4, "IntStorage": 4,
                     "HalfStorage": 2, "BFloat16Storage": 2, "ShortStorage": 2}


def short_pth_record(path):
    """'NAME has N bytes, its tensors need M' for a .pth's first record shorter than its
    pickle says, else None: torch.load(mmap=True) does not check (without mmap it reads
    every byte), and a short record's tensor would take the bytes after it. The pickle is
    read again with a stand-in for every class: nothing is imported or run."""
    class StandIn(dict):  # built from any arguments, holding what the pickle puts in it
        def __init__(self, *args):
            pass

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):  # a storage class's name, or a stand-in
            return name if name.endswith("Storage") else StandIn

        def persistent_load(self, saved_id):  # ("storage", its class, key, where, numel)
            _, storage, key, _, numel = saved_id
            needs[key] = max(needs.get(key, 0), numel * STORAGE_ITEMSIZES.get(storage, 1))
            return StandIn()

    needs = {}
    with zipfile.ZipFile(path) as archive:
        pickled = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        with archive.open(pickled) as f:
            Reader(f).load()
        for key, size in needs.items():
            record = archive.getinfo(pickled.removesuffix("data.pkl") + f"data/{key}")
            if record.file_size < size:
                return f"{record.filename} has {record.file_size:,} bytes, its tensors need " \
                       f"{size:,}"
    return None


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
