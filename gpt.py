"""Chapter 4's GPT-2 model, then section 6.4's loading of its weights (listing 6.6).

python gpt.py [--model gpt2-small] [--weights pretrained|PATH] "Every effort moves you"
prints the greedy continuation, the chapter's check that the weights loaded."""
import argparse

from beyond.cli import repository_tokenizer, run_cli
from beyond.download import download_gpt2
from beyond.finite import check_finite_weights, refuse_non_finite_outputs
from beyond.weights import (add_weights_options, check_gpt2_size, checked_value, find_weights,
                            read_params, settings_for)
import torch
import torch.nn as nn


BASE_CONFIG = {
    "vocab_size": 50257,     # Vocabulary size
    "context_length": 1024,  # Context length
    "drop_rate": 0.0,        # Dropout rate
    "qkv_bias": True,        # Query-key-value bias
}

model_configs = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}
MODEL_NAMES = {key.split(" ")[0]: key for key in model_configs}  # the flags: "gpt2-small"


def model_config(name):
    """BASE_CONFIG updated with one of model_configs, as in section 6.4."""
    config = dict(BASE_CONFIG)
    config.update(model_configs[MODEL_NAMES.get(name, name)])
    return config


# ---------------------------------------------------------------- the model (ch. 3-4)

class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        # the chapter's (x - mean) / sqrt(var + eps) * scale + shift, var biased,
        # in one fused kernel (a quarter of a block's CPU time as separate ops)
        return nn.functional.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    def forward(self, x):
        # the tanh approximation GPT-2 was trained with,
        # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), fused
        return nn.functional.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # context_length stays in the chapter's signature, but no mask buffer of
        # that size is kept: the causal mask is built per call (is_causal)

    def split_heads(self, x):
        b, num_tokens, _ = x.shape  # (b, T, d_out) -> (b, heads, T, head_dim)
        return x.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, num_tokens, _ = x.shape  # (b, T, d_in) -> (b, T, d_out)
        keys = self.split_heads(self.W_key(x))
        values = self.split_heads(self.W_value(x))
        queries = self.split_heads(self.W_query(x))
        dropout_p = self.dropout.p if self.training else 0.0
        # chapter 3's masked softmax(queries @ keys.T / sqrt(head_dim)) @ values, fused
        context = nn.functional.scaled_dot_product_attention(
            queries, keys, values, dropout_p=dropout_p, is_causal=True)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"],
            context_length=cfg["context_length"], num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_resid = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x  # (b, T, d) -> (b, T, d)
        x = self.norm1(x)
        x = self.att(x)
        x = self.drop_resid(x)
        x = x + shortcut

        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_resid(x)
        return x + shortcut


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(
            *[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        batch_size, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = tok_embeds + pos_embeds  # Shape [batch_size, num_tokens, emb_size]
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        logits = self.out_head(x)
        return logits


# ---------------------------------------------------------- text generation (ch. 4-5)

def generate_text_simple(model, idx, max_new_tokens, context_size):
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # greedy
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def text_to_token_ids(text, tokenizer):
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)  # add batch dimension


def token_ids_to_text(token_ids, tokenizer):
    return tokenizer.decode(token_ids.squeeze(0).tolist())


# ------------------------------------ 6.4 Initializing a model with pretrained weights

# Listing 6.6 Loading a pretrained GPT model
def build_gpt(model_name="gpt2-small", weights="pretrained", models_dir="gpt2"):
    """(model, config): GPT-2 as listing 6.6 loads it. Not the book's: weights may
    also be "random" (untrained, for tests and timings) or a local file or folder."""
    if weights == "random":
        config = model_config(model_name)
        return GPTModel(config).eval(), config
    # the book's BASE_CONFIG.update(model_configs[CHOOSE_MODEL]) is model_config, its
    # model_size beyond/download.py's RELEASES; settings: that config (or the one beside a
    # local file) in BASE_CONFIG's keys, where the book's settings are OpenAI's hparams
    settings, params = download_and_load_gpt2(model_name, weights, models_dir)
    model = GPTModel(settings)
    load_weights_into_gpt(model, params)
    model.eval()
    return model, settings


def download_and_load_gpt2(model_name="gpt2-small", weights="pretrained", models_dir="gpt2"):
    """The book's gpt_download.py step, by model name: (config, params), params its
    nested dict, from gpt2/<size>/ (the Hub's model.safetensors downloaded once, else
    OpenAI's files as the book fetches them) or from the file or folder `weights`."""
    path = download_gpt2(model_name, models_dir) if weights == "pretrained" else weights
    return load_gpt2(path, model_name)


def load_gpt2(weights, model_name="gpt2-small", config=None):
    """(config, params) from any form --weights takes (beyond/weights.py), checked
    before a model is built: sizes first, then every tensor on an empty model."""
    form, path = find_weights(weights)
    config_file = None
    if config is None:
        config, config_file = settings_for(form, path, model_config(model_name),
                                           BASE_CONFIG)
    params = read_params(form, path)
    source = f"{path.parent} (OpenAI's checkpoint)" if form == "tf" else str(path)
    known = {name: model_config(name) for name in MODEL_NAMES}
    check_gpt2_size(params, config, source, known, config_file)
    with torch.device("meta"):  # shapes only: no memory
        matched_params(GPTModel(config), params, source)
    return config, params


def weights_config(model_name, weights):
    """The model config --weights gives, its file checked before any data is read."""
    if weights in ("pretrained", "random"):
        return model_config(model_name)
    return load_gpt2(weights, model_name)[0]


def load_gpt2_file(path, config):
    """GPTModel(config) holding the weights of any --weights file or folder."""
    settings, params = load_gpt2(path, config=config)
    model = GPTModel(settings)
    load_weights_into_gpt(model, params, source=str(path))
    return model


def load_weights_into_gpt(gpt, params, source="the weights"):
    """Listing 6.6's loader (the book's, from chapter 5): the book's nested params,
    whichever file they came from, into gpt. Not the book's assign calls: one table
    (params_targets), every tensor checked (matched_params) before any is copied."""
    with torch.no_grad():
        for param, value in matched_params(gpt, params, source):
            param.copy_(value)
    check_finite_weights(gpt, source)  # not the book's: NaN in a file is an error


def params_targets(gpt, params):
    """[(parameter, params keys, how that tensor becomes it)]: the book's assign
    lines as one table. OpenAI's Conv1D weights are (in, out), Linear's (out, in):
    transposed; c_attn holds query, key and value side by side: split in three.
    out_head is tied to wte as in the book, unless params has its own (a .pth)."""
    targets = [(gpt.pos_emb.weight, ["wpe"], None), (gpt.tok_emb.weight, ["wte"], None),
               (gpt.final_norm.scale, ["g"], None), (gpt.final_norm.shift, ["b"], None),
               (gpt.out_head.weight, ["out_head" if "out_head" in params else "wte"], None)]
    for b, block in enumerate(gpt.trf_blocks):
        att, ff = block.att, block.ff
        for i, linear in enumerate([att.W_query, att.W_key, att.W_value]):
            targets += [(linear.weight, ["blocks", b, "attn", "c_attn", "w"],
                         lambda t, i=i: t.chunk(3, dim=-1)[i].T),
                        (linear.bias, ["blocks", b, "attn", "c_attn", "b"],
                         lambda t, i=i: t.chunk(3, dim=-1)[i])]
        for linear, keys in [(att.out_proj, ["attn", "c_proj"]),
                             (ff.layers[0], ["mlp", "c_fc"]), (ff.layers[2], ["mlp", "c_proj"])]:
            targets += [(linear.weight, ["blocks", b, *keys, "w"], lambda t: t.T),
                        (linear.bias, ["blocks", b, *keys, "b"], None)]
        for norm, key in [(block.norm1, "ln_1"), (block.norm2, "ln_2")]:
            targets += [(norm.scale, ["blocks", b, key, "g"], None),
                        (norm.shift, ["blocks", b, key, "b"], None)]
    return targets


def matched_params(gpt, params, source):
    """[(parameter, value)] for every parameter of gpt, each value checked before
    anything is copied (beyond/weights.py: there, floats, the parameter's shape, as
    the book's assign checks the shape): a missing tensor is an error naming it."""
    names = {id(param): name for name, param in gpt.named_parameters()}
    pairs = [(param, checked_value(params, keys, transform, param, names[id(param)], source))
             for param, keys, transform in params_targets(gpt, params)
             if param is not None]  # qkv_bias=False: W_query, W_key, W_value have no bias
    assert {id(param) for param, _ in pairs} == set(names), "a parameter params_targets misses"
    return pairs


# ----------------------------------------------------- the tokenizer and the command line

def get_tokenizer():
    """The chapter's tiktoken.get_encoding("gpt2"); offline, the repository's copy."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its files on first use
        return repository_tokenizer(e)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Load GPT-2 and print the greedy continuation of a prompt "
                    "(the chapter's check that the weights loaded correctly).")
    parser.add_argument("prompt", nargs="?", default="Every effort moves you",
                        help="text to continue (default: %(default)r)")
    add_weights_options(parser, MODEL_NAMES)
    parser.add_argument("--max-new-tokens", type=int, default=15,
                        help="number of tokens to generate (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must be 0 or more")
    if args.weights == "random":
        parser.error("--weights must be 'pretrained' or a path here")
    tokenizer = get_tokenizer()
    model, config = build_gpt(args.model, args.weights)
    refuse_non_finite_outputs(model, args.weights)  # not the chapter's: as classify.py does
    token_ids = generate_text_simple(
        model=model, idx=text_to_token_ids(args.prompt, tokenizer),
        max_new_tokens=args.max_new_tokens, context_size=config["context_length"])
    print(token_ids_to_text(token_ids, tokenizer))


if __name__ == "__main__":
    run_cli(main)
