"""Offline tests: no network, no pretrained weights, under 3 minutes on 2 cores.
Everything they read is in testdata/ (see its README): the real SMS data,
tiktoken's gpt2 files and a compact GPT-2 in the Hub's layout with the logits
Hugging Face transformers computes for it."""
import base64
import contextlib
import errno
import hashlib
import http.client
import http.server
import inspect
import io
import json
import math
import os
import pickle
import pty
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTDATA = HERE / "testdata"
SMS = TESTDATA / "sms_spam_collection" / "SMSSpamCollection"
SMS_ZIP = TESTDATA / "sms_spam_collection" / "sms+spam+collection.zip"
MINI = TESTDATA / "gpt2-mini-hf"
MINI_WEIGHTS = MINI / "model.safetensors"
MINI_TF = TESTDATA / "gpt2-mini-tf"
MINI_BOOK = TESTDATA / "gpt2-mini-book" / "gpt2-mini-book.pth"
# the repository's copy of tiktoken's cache, for this process and every subprocess
os.environ["TIKTOKEN_CACHE_DIR"] = str(TESTDATA / "tiktoken")

import gpt  # noqa: E402  (after TIKTOKEN_CACHE_DIR; gpt silences torch's NumPy warning)
import torch  # noqa: E402
import data  # noqa: E402
import finetune  # noqa: E402
import classify  # noqa: E402
import bench  # noqa: E402
from beyond.cli import InputError  # noqa: E402
import beyond.distributed  # noqa: E402
from beyond import (calibrate as bcalibrate, cli as bcli, download as bdownload,  # noqa: E402
                    explain as bexplain, fast as bfast, files as bfiles, labels as blabels,
                    lora as blora, memory as bmemory, metrics as bmetrics, overlap as boverlap,
                    pooling as bpooling, precision as bprecision, safetensors as bst,
                    sampling as bsampling, serve as bserve, stream as bstream,
                    tf_checkpoint as btf, tokens as btokens, trainable as btrainable,
                    weights as bweights)

KNOWN_SIZES = {name: gpt.model_config(name) for name in gpt.MODEL_NAMES}
TINY_CONFIG = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_layers": 2,
               "n_heads": 2, "drop_rate": 0.0, "qkv_bias": True}
SPAM_TEXT = ("You are a winner you have been specially selected to receive $1000 cash "
             "or a $2000 award.")


@pytest.fixture(scope="session")
def tokenizer():
    return gpt.get_tokenizer()


@pytest.fixture(scope="session")
def sample_tsv(tmp_path_factory):
    """60 ham and 60 spam messages of the real collection."""
    rows = data.read_tsv(SMS)
    rows = [r for r in rows if r[0] == "ham"][:60] + [r for r in rows if r[0] == "spam"][:60]
    path = tmp_path_factory.mktemp("data") / "sample.tsv"
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def chapter_splits():
    """The chapter's train, validation and test rows of the SMS data."""
    return data.random_split(data.create_balanced_dataset(data.read_tsv(SMS)), 0.7, 0.1)


def run(*args, cwd=HERE, env=None, stdin=None):
    """A CLI of this project as a subprocess: (returncode, stdout, stderr)."""
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          env=dict(os.environ, **(env or {})), text=True, input=stdin, timeout=300)
    return done.returncode, done.stdout, done.stderr


def output(result):
    """The stdout of a command line (run or cli) that succeeded."""
    code, stdout, stderr = result
    assert code == 0, stderr
    return stdout


def exit_status(main):
    """The exit status of run_cli(main). run_cli sets its own SIGTERM handler (the
    default would kill pytest); the one before it is put back."""
    def unhandled(signum, frame):
        raise AssertionError("run_cli left SIGTERM to its default: the process would die")
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        bcli.run_cli(main)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def cli(capsys, monkeypatch):
    """A command line of this project run in this process through run_cli, as its
    __main__ runs it: (exit status, stdout, stderr). Other exceptions fail the test."""
    def run_in_process(script, *args, cwd=None, env=None):
        module = {"finetune.py": finetune, "classify.py": classify, "gpt.py": gpt,
                  "bench.py": bench}[Path(script).name]
        argv = [str(a) for a in args]
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [Path(script).name, *argv])  # bench reads it
        capsys.readouterr()
        code = exit_status(module.main if module is bench else lambda: module.main(argv))
        return (code, *capsys.readouterr())
    return run_in_process


# a proxy on a closed port: every download fails at once, network or not
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}


def assert_error_names_file(read, path, content, problem):
    """read(path) of a file of content is the project's error naming the file and problem."""
    path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(problem)) as error:
        read(path)
    assert str(path) in str(error.value)


def tiny_classifier(num_classes=2, pool="last", trainable="last_block", seed=0, n_layers=2):
    torch.manual_seed(seed)
    model = gpt.GPTModel(dict(TINY_CONFIG, n_layers=n_layers))
    finetune.prepare_for_classification(model, num_classes, trainable=trainable, seed=seed)
    return bfast.GPTClassifier(model, pool=pool)


def fine_tune(data_file, out, *flags, weights=MINI_WEIGHTS):
    """finetune.main on data_file from weights (the test model), writing to out."""
    return finetune.main(["--data", str(data_file), "--weights", str(weights), "--out", str(out),
                          *map(str, flags)])


def mini_config():
    """The test model's config, read from its config.json in the Hub's naming."""
    return bweights.config_from_json(MINI / "config.json", gpt.BASE_CONFIG, "hub")


# ------------------------------------------------------------------------ gpt.py

def test_each_weights_form_gives_the_reference_implementations_logits_and_greedy_text(
        tokenizer, capsys, monkeypatch):
    """The Hub's safetensors, OpenAI's TF checkpoint and the book's .pth of one model."""
    model, config = gpt.build_gpt(weights=str(MINI_WEIGHTS))
    assert (config["emb_dim"], config["n_layers"], config["n_heads"],
            config["context_length"]) == (16, 2, 2, 128)
    for weights in (MINI_TF, MINI_BOOK):
        other, other_config = gpt.build_gpt(weights=str(weights))
        assert other_config == config
        assert all(torch.equal(t, model.state_dict()[n]) for n, t in other.state_dict().items())
    expected, _ = bst.load_safetensors(MINI / "expected.safetensors")
    reference = json.loads((MINI / "expected.json").read_text())
    assert expected["input_ids"].tolist() == [tokenizer.encode(t) for t in reference["texts"]]
    with torch.no_grad():
        logits = model.eval()(expected["input_ids"].long())
    assert logits.shape == (2, 4, 50257)
    assert torch.allclose(logits[:, -1], expected["logits_last"], atol=1e-4)
    assert torch.allclose(logits[..., :1024], expected["logits_first_1024"], atol=1e-4)
    assert logits[:, -1].argmax(-1).tolist() == reference["argmax_last"]
    expected = reference["greedy_8_new_tokens"]  # as gpt.py prints it
    flags = ["--max-new-tokens", "8", expected["prompt"]]
    code, out, err = run("gpt.py", "--weights", MINI_WEIGHTS, *flags)
    assert (code, out.strip()) == (0, expected["prompt"] + expected["continuation"]), err
    monkeypatch.setattr(gpt, "get_tokenizer", lambda: tokenizer)  # loaded once per session
    for weights in (MINI_TF, MINI_BOOK):  # in this process, without a Python start-up
        gpt.main(["--weights", str(weights), *flags])
        assert capsys.readouterr().out.strip() == expected["prompt"] + expected["continuation"]


def test_the_model_has_the_chapters_module_names_forward_signatures_and_parameter_count():
    printed = str(gpt.GPTModel(TINY_CONFIG))
    for name in ["(tok_emb): Embedding(50257, 16)", "(pos_emb): Embedding(64, 16)", "(drop_emb)",
                 "(trf_blocks): Sequential", "TransformerBlock", "(att): MultiHeadAttention",
                 "(W_query)", "(W_key)", "(W_value)", "(out_proj)", "(dropout)",
                 "(ff): FeedForward", "(layers): Sequential", "GELU()", "(norm1): LayerNorm()",
                 "(norm2): LayerNorm()", "(drop_resid)", "(final_norm): LayerNorm()",
                 "(out_head): Linear(in_features=16, out_features=50257, bias=False)"]:
        assert name in printed
    for module in (gpt.MultiHeadAttention, gpt.TransformerBlock):  # chapter 4's: x only
        assert list(inspect.signature(module.forward).parameters) == ["self", "x"]
    with torch.device("meta"):
        model = gpt.GPTModel(gpt.model_config("gpt2-small"))
    tied = sum(p.numel() for p in model.parameters()) - model.out_head.weight.numel()
    assert tied == 124_439_808  # GPT-2 small with its output layer tied to tok_emb
    assert gpt.model_config("gpt2-xl")["n_heads"] == 25


def test_fused_gelu_layer_norm_and_attention_equal_the_chapters_formulas():
    x = torch.randn(4, 7, 16) * 3
    gelu = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    assert torch.allclose(gpt.GELU()(x), gelu, atol=1e-6)
    norm = gpt.LayerNorm(16)
    with torch.no_grad():
        norm.scale.uniform_(0.5, 2)
        norm.shift.uniform_(-1, 1)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    expected = norm.scale * (x - mean) / torch.sqrt(var + 1e-5) + norm.shift
    assert torch.allclose(norm(x), expected, atol=1e-5)
    torch.manual_seed(1)  # the fused attention against chapter 3's masked softmax
    att = gpt.MultiHeadAttention(16, 16, 64, 0.0, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 9, 16)
    queries, keys, values = (att.split_heads(w(x)) for w in (att.W_query, att.W_key, att.W_value))
    attn_scores = queries @ keys.transpose(2, 3)  # (b, heads, num_tokens, num_tokens)
    attn_scores.masked_fill_(~torch.ones(9, 9, dtype=torch.bool).tril(), -torch.inf)
    context = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1) @ values
    expected = att.out_proj(context.transpose(1, 2).reshape(3, 9, 16))
    assert torch.allclose(att(x), expected, atol=1e-5)


def test_plain_path_is_the_chapters_last_token_the_fast_one_equals_it_and_flexible_skips_pads():
    model = tiny_classifier(pool="last")
    model.fast = False
    ids = torch.randint(0, 50000, (3, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outputs = model(ids)  # the chapter's GPTModel with its head swapped: every position
        assert outputs.shape == (3, 11, 2) and model.gpt.out_head.out_features == 2
        assert torch.equal(outputs, model.gpt(ids))
        model.fast = True  # the fast path computes the last position only
        assert torch.allclose(model(ids)[:, -1, :], outputs[:, -1, :], atol=1e-5)
    torch.manual_seed(2)  # through the last block at one position of each row
    block = gpt.TransformerBlock(TINY_CONFIG).eval()
    x = torch.randn(4, 10, 16)
    positions = torch.tensor([9, 0, 4, 7])
    one = bfast.last_block_at(block, x, positions)
    assert one.shape == (4, 1, 16)
    assert torch.allclose(one[:, 0], block(x)[torch.arange(4), positions], atol=1e-5)
    model = tiny_classifier(pool="flexible").eval()  # the last real token, whatever the padding
    ids = torch.tensor([[5, 6, 7, 50256, 50256], [8, 9, 10, 11, 12]])
    assert bpooling.pool_positions(ids, "flexible", 50256).tolist() == [2, 4]
    more_padding = torch.cat([ids, torch.full((2, 6), 50256)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(ids)[0, -1], model(ids[:1, :3])[0, -1], atol=1e-5)
        assert torch.allclose(model(more_padding)[:, -1, :], model(ids)[:, -1, :], atol=1e-5)
        model.fast = False  # the same through the full forward pass
        assert torch.allclose(model(more_padding)[:, -1, :], model(ids)[:, -1, :], atol=1e-5)


def test_loader_takes_a_transformer_prefix_extra_keys_and_models_without_qkv_biases():
    tensors, _ = bst.load_safetensors(MINI_WEIGHTS)
    prefixed = {"transformer." + k: v for k, v in tensors.items()}
    prefixed["lm_head.weight"] = tensors["wte.weight"]
    model = gpt.GPTModel(mini_config())
    params = bweights.params_from_hub(prefixed)
    assert params["blocks"][1]["attn"]["c_attn"]["w"].shape == (16, 48)  # the book's layout
    assert "bias" not in params["blocks"][0]["attn"]  # the mask buffer is left out
    gpt.load_weights_into_gpt(model, params)
    assert torch.equal(model.tok_emb.weight, tensors["wte.weight"].float())
    assert torch.equal(model.out_head.weight, tensors["wte.weight"].float())  # tied
    assert torch.equal(model.trf_blocks[1].att.W_key.weight,
                       tensors["h.1.attn.c_attn.weight"][:, 16:32].T.float())
    config = dict(mini_config(), qkv_bias=False)
    torch.manual_seed(5)
    source, model = gpt.GPTModel(config), gpt.GPTModel(config)
    gpt.load_weights_into_gpt(model, bweights.params_from_book(source.state_dict()))
    assert model.trf_blocks[0].att.W_query.bias is None
    for (name, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name, value, message", [
    ("h.1.mlp.c_fc.bias", None, r"params\['blocks'\]\[1\]\['mlp'\]\['c_fc'\]\['b'\] is "
     r"missing \(the model's trf_blocks\.1\.ff\.layers\.0\.bias\)"),
    ("h.0.attn.c_attn.weight", torch.tensor(1.0),  # 0-d: chunk would crash on it
     r"params\['blocks'\]\[0\]\['attn'\]\['c_attn'\]\['w'\] has shape \(\), but the model "
     r"needs \(16, 16\)"),
])
def test_loader_names_a_missing_tensor_or_one_of_the_wrong_rank_before_copying_any(
        name, value, message):
    tensors, _ = bst.load_safetensors(MINI_WEIGHTS)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    model = gpt.GPTModel(mini_config())
    before = model.tok_emb.weight.clone()
    with pytest.raises(InputError, match=message):
        gpt.load_weights_into_gpt(model, bweights.params_from_hub(tensors))
    assert torch.equal(model.tok_emb.weight, before)


def test_weights_of_another_size_name_the_shapes_and_the_right_model_a_config_json_the_size(
        tmp_path):
    params = bweights.params_from_hub(bst.load_safetensors(MINI_WEIGHTS)[0])
    with torch.device("meta"):  # gpt2-medium's shapes, without memory
        medium = {"wte": torch.empty(50257, 1024), "wpe": torch.empty(1024, 1024),
                  "blocks": [{"ln_1": {"g": torch.empty(1024)}} for _ in range(24)]}
    small = gpt.model_config("gpt2-small")
    for found, config, problem in [
            (params, dict(small, context_length=128), r"wte \(the token embedding\).*"
             r"\(50257, 16\).*\(50257, 768\)"),
            (params, dict(mini_config(), context_length=64), r"wpe \(the position embedding\) "
             r"has shape \(128, 16\), but the model needs \(64, 16\)"),
            (medium, small, "use --model gpt2-medium")]:  # the error suggests the right size
        with pytest.raises(InputError, match=problem):
            bweights.check_gpt2_size(found, config, "w.safetensors", KNOWN_SIZES)
    shutil.copy(MINI_WEIGHTS, tmp_path / "x.safetensors")  # beside the book's config.json
    shutil.copy(TESTDATA / "gpt2-mini-book" / "config.json", tmp_path / "config.json")
    assert gpt.load_gpt2(tmp_path / "x.safetensors")[0] == mini_config()
    (tmp_path / "config.json").unlink()  # without one, --model sets the size
    shutil.copy(MINI_BOOK, tmp_path / "gpt2-mini-book.pth")
    with pytest.raises(InputError, match=r"has shape \(50257, 16\) and there are 2 layers, "
                                         r"but the model needs \(50257, 768\) and 12 layers"):
        gpt.build_gpt("gpt2-small", str(tmp_path / "gpt2-mini-book.pth"))


def test_safetensors_round_trip_of_f32_f16_bf16_and_metadata(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(),
               "c": torch.randn(2, 2).bfloat16(), "empty": torch.zeros(0, 3)}
    bst.save_safetensors(tensors, tmp_path / "t.safetensors", {"k": "v"})
    loaded, metadata = bst.load_safetensors(tmp_path / "t.safetensors")
    assert metadata == {"k": "v"}
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    assert not list(tmp_path.glob("*.tmp"))


def safetensors_bytes(header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def lowered_into_padding(shift):
    """A header padded with 3 spaces, as writers align it, its length lowered by shift:
    the JSON still parses, and the tensor would move."""
    raw = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(raw) + 3 - shift) + raw + b"   " + b"\0" * 4


def tensors_file(data_bytes, **tensors):
    """A safetensors file of name=(dtype, shape, data_offsets) and data_bytes zeros."""
    return safetensors_bytes({name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}
                              for name, (dtype, shape, offsets) in tensors.items()},
                             b"\0" * data_bytes)


@pytest.mark.parametrize("content, problem", [
    (b"\x10\x00\x00", "fewer than the 8-byte header length"),
    (struct.pack("<Q", 200_000_000) + b"{}", "more than 100 MB"),
    (struct.pack("<Q", 500) + b"{}", "truncated"),
    (struct.pack("<Q", 4) + b"nope", "not JSON"),
    (safetensors_bytes(b'{"x": ' + b"9" * 5000 + b"}"), "not JSON (a number of 5,000 characters)"),
    (tensors_file(4, x=("F99", [1], [0, 4])), "unknown dtype"),
    (tensors_file(8, x=("F32", [4], [0, 16])), "ends at byte 16"),
    (tensors_file(12, x=("F32", [2], [0, 8]), y=("F32", [2], [4, 12])), "overlap"),
    (tensors_file(8, x=("F32", [3], [0, 8])), "needs 12"),
    (tensors_file(0, x=("F32", [-1], [0, 0])), "invalid shape"),
    (tensors_file(8, x=("F32", [1], [4, 8])),
     "4 bytes of the data area before the first tensor belong to no tensor"),
    (tensors_file(12, x=("F32", [1], [0, 4]), y=("F32", [1], [8, 12])),
     "4 bytes of the data area after tensor 'x' belong to no tensor"),
    (tensors_file(8, x=("F32", [1], [0, 4])), "the file has 4 bytes after the last tensor"),
    (lowered_into_padding(1), "the file has 1 bytes after the last tensor"),
    (lowered_into_padding(3), "the file has 3 bytes after the last tensor"),
])
def test_broken_safetensors_files_name_the_file_and_the_problem(tmp_path, content, problem):
    assert_error_names_file(bst.read_safetensors_header, tmp_path / "broken.safetensors",
                            content, problem)


class Hang(BaseException):
    """A case read for too long (not an Exception: no `except Exception` makes it a refusal)."""


def outcomes(path, contents, read, seconds=30):
    """Each content written at path and read: (how many read, how many the project's
    error refused). Any other exception fails the test with its traceback, and so does
    a case read for `seconds` (each takes milliseconds: a hang, not a busy machine)."""
    def hang(signum, frame):
        raise Hang(f"a case of {path.name} was read for {seconds} s")

    parsed = refused = 0
    previous = signal.signal(signal.SIGALRM, hang)
    try:
        for content in contents:
            path.write_bytes(content)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                read(path)
                parsed += 1
            except InputError:
                refused += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return parsed, refused


def test_fuzzed_safetensors_bytes_parse_or_raise_the_projects_error(tmp_path):
    rng = random.Random(0)
    bst.save_safetensors({"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4).half()},
                         tmp_path / "valid.safetensors", {"m": "x"})
    valid = (tmp_path / "valid.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", valid[:8])[0]

    def flipped(start, count):  # 1-3 random bytes at or after start
        for _ in range(count):
            content = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                content[rng.randrange(start, len(valid))] = rng.randrange(256)
            yield bytes(content)

    def read(path):
        return [tensor.sum() for tensor in bst.load_safetensors(path)[0].values()]

    path = tmp_path / "fuzz.safetensors"
    noise = [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(50)]
    assert outcomes(path, noise, read) == (0, 50)
    cut = [valid[:size] for size in range(0, len(valid), 3)]  # a shorter file is refused
    assert outcomes(path, cut, read) == (0, len(cut))
    assert outcomes(path, flipped(header_end, 30), read) == (30, 0)  # any data bytes are floats
    parsed, refused = outcomes(path, flipped(0, 150), read)  # the header's bytes too
    assert 0 < parsed < refused


ODD_VALUES = [[], ["F32"], {}, {"a": 1}, None, True, 10**30, -1, -(10**30), 2.5, "", "x" * 300,
              "F32", [10**30], [[1]], [-1, 2]]


def mutated_files(path, count, seed):
    """Copies of a safetensors file whose header has one JSON value of another type or
    size (a list, an object, null, a huge or negative number...) in an entry (a tensor
    or __metadata__, each as likely), inside the JSON strings of __metadata__ too."""
    raw = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + header_len]), raw[8 + header_len:]
    rng = random.Random(seed)

    def mutated(value):  # value, or one value inside it, replaced
        if isinstance(value, str) and value[:1] in "[{" and rng.random() < 0.8:
            with contextlib.suppress(ValueError):
                return json.dumps(mutated(json.loads(value)))
        if not value or not isinstance(value, (dict, list)) or rng.random() < 0.2:
            return rng.choice(ODD_VALUES)
        value = value.copy()
        key = rng.choice(list(value) if isinstance(value, dict) else range(len(value)))
        value[key] = mutated(value[key])
        return value

    for _ in range(count):
        key = rng.choice(sorted(header))
        text = json.dumps(dict(header, **{key: mutated(header[key])}))
        yield struct.pack("<Q", len(text)) + text.encode() + body


def save_lora_checkpoint(checkpoint, **lora):
    """A --trainable lora checkpoint (rank 2) on the test model, its base recorded
    as MINI_WEIGHTS unless lora says otherwise."""
    base, config = gpt.build_gpt(weights=str(MINI_WEIGHTS))
    finetune.prepare_for_classification(base, 2, trainable="lora", lora_rank=2)
    size, sha256 = bdownload.file_fingerprint(MINI_WEIGHTS)
    classify.save_classifier(bfast.GPTClassifier(base), checkpoint, config, 20, ["a", "b"], lora={
        "rank": 2, "alpha": 16, "model": "gpt2-small", "weights": str(MINI_WEIGHTS),
        "seed": 123, "path": str(MINI_WEIGHTS), "bytes": size, "sha256": sha256, **lora})
    return checkpoint


def save_tiny(path, labels=("not spam", "spam"), model=None, **kwargs):
    """A checkpoint of tiny_classifier() (or of model), max_length 20, at path."""
    model = tiny_classifier() if model is None else model
    classify.save_classifier(model, path, TINY_CONFIG, 20, list(labels), **kwargs)
    return path


@pytest.mark.parametrize("kind", ["hub weights", "checkpoint", "lora checkpoint"])
def test_safetensors_headers_with_values_of_the_wrong_type_raise_the_projects_error(
        kind, tmp_path):
    """Some mutations still load (another string as a label or format note, a value
    replaced by an equal one, the Hub file's unused __metadata__), the rest are refused."""
    original = {"hub weights": lambda p: MINI_WEIGHTS, "checkpoint": save_tiny,
                "lora checkpoint": save_lora_checkpoint}[kind](tmp_path / "c.safetensors")
    read = classify.load_classifier
    if kind == "hub weights":  # beside its config.json
        shutil.copy(MINI / "config.json", tmp_path / "config.json")
        read = lambda path: gpt.build_gpt(weights=str(path))  # noqa: E731
    parsed, refused = outcomes(tmp_path / "model.safetensors",
                               mutated_files(original, 200, seed=0), read)
    assert 0 < parsed < refused


def test_a_failed_or_cut_download_leaves_nothing_and_the_next_run_succeeds(
        tmp_path, monkeypatch):
    monkeypatch.setattr(bdownload, "HUB_URL", "http://127.0.0.1:9/{}")
    monkeypatch.setattr(bdownload, "OPENAI_URL", "http://127.0.0.1:9/{size}/{file}")
    with pytest.raises(InputError, match="--weights PATH"):
        bdownload.download_gpt2("gpt2-small", tmp_path / "gpt2")
    assert not list(tmp_path.iterdir())  # no file, no .part, no empty folders either
    body, cut = os.urandom(300_000), [True]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # the whole length announced, half of the body sent while cut
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if cut[0] else body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, destination = f"http://127.0.0.1:{server.server_port}/f", tmp_path / "model.safetensors"
    try:
        with pytest.raises(InputError, match="Nothing was saved|stopped after"):
            bdownload.download_file(url, destination, "the weights", "use --weights PATH")
        assert not list(tmp_path.iterdir())
        cut[0] = False
        bdownload.download_file(url, destination, "the weights", "use --weights PATH")
        assert destination.read_bytes() == body
    finally:
        server.shutdown()


@pytest.mark.parametrize("stop", ["ctrl-c", "full disk"])
def test_a_download_stopped_by_ctrl_c_or_a_full_disk_leaves_no_partial_file(
        stop, tmp_path, monkeypatch):
    class Response(io.BytesIO):
        headers = {"Content-Length": str(3 << 20)}
        reads = 0

        def read(self, size=-1):
            Response.reads += 1
            if Response.reads == 2 and stop == "ctrl-c":
                raise KeyboardInterrupt
            return b"x" * size

    class FullDisk(io.BytesIO):
        def write(self, chunk):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(bdownload.urllib.request, "urlopen", lambda url, timeout: Response())
    if stop == "full disk":  # the file is made, then no write succeeds
        real_open = open
        monkeypatch.setattr(bdownload, "open", lambda path, mode: (
            real_open(path, mode).close(), FullDisk())[1], raising=False)
    error = (KeyboardInterrupt, None) if stop == "ctrl-c" else (InputError, "No space left on")
    with pytest.raises(error[0], match=error[1]):
        bdownload.download_file("http://example.invalid/m", tmp_path / "model.safetensors",
                                "the weights", "hint")
    assert Response.reads == {"ctrl-c": 2, "full disk": 1}[stop]
    assert not list(tmp_path.iterdir())


# ------------------------------------- weights: OpenAI's TF checkpoint, the book's .pth

def test_weights_paths_name_any_file_or_folder_of_each_form_and_each_gives_the_books_params(
        tmp_path):
    data = MINI_TF / "model.ckpt.data-00000-of-00001"
    for path in [MINI_TF, MINI_TF / "model.ckpt", MINI_TF / "model.ckpt.index", data,
                 MINI_TF / "model.ckpt.meta", MINI_TF / "checkpoint", MINI_TF / "hparams.json"]:
        assert bweights.find_weights(path) == ("tf", data), path
    assert bweights.find_weights(MINI) == ("safetensors", MINI_WEIGHTS)
    assert bweights.find_weights(MINI_WEIGHTS) == ("safetensors", MINI_WEIGHTS)
    assert bweights.find_weights(MINI_BOOK) == ("pth", MINI_BOOK)
    renamed = tmp_path / "weights.bin"  # torch.save's zip is known by its first bytes
    shutil.copy(MINI_BOOK, renamed)
    assert bweights.find_weights(renamed) == ("pth", renamed)
    with pytest.raises(InputError, match="has neither a model.safetensors nor OpenAI's"):
        bweights.find_weights(tmp_path)
    flats = {}
    for weights in (MINI_TF, MINI_BOOK, MINI_WEIGHTS):
        settings, params = gpt.download_and_load_gpt2(weights=str(weights))
        assert settings["emb_dim"] == 16 and len(params["blocks"]) == 2
        assert params["blocks"][1]["attn"]["c_attn"]["w"].shape == (16, 48)  # (in, 3 * out)
        assert params["blocks"][0]["mlp"]["c_fc"]["w"].shape == (16, 64)
        assert params["blocks"][0]["ln_2"]["g"].shape == params["g"].shape == (16,)
        flats[weights] = flat_params(params)
    assert set(flats[MINI_TF]) == set(flats[MINI_WEIGHTS])
    assert set(flats[MINI_BOOK]) == set(flats[MINI_TF]) | {("out_head",)}  # kept as given
    for keys, tensor in flats[MINI_TF].items():
        for other in (MINI_BOOK, MINI_WEIGHTS):
            assert torch.equal(flats[other][keys].float(), tensor.float()), (other, keys)
    assert flats[MINI_TF][("wte",)].dtype == torch.float16  # as stored: no copy made


def flat_params(params, keys=()):
    """The book's nested params as {("blocks", 0, "attn", "c_attn", "w"): tensor}."""
    items = params.items() if isinstance(params, dict) else enumerate(params)
    flat = {}
    for key, value in items:
        if isinstance(value, (dict, list)):
            flat.update(flat_params(value, keys + (key,)))
        else:
            flat[keys + (key,)] = value
    return flat


def with_data_block(index, change):
    """The mini index with its one data block changed by change(bytearray) and
    the block's checksum recomputed, as a writer would have written it."""
    footer = index[-btf.TABLE_FOOTER_BYTES:]
    _, pos = btf.block_handle(footer)
    index_handle, _ = btf.block_handle(footer, pos)
    [(_, handle)] = btf.block_entries(index, index_handle)
    offset, size = btf.block_handle(handle)[0]
    block = bytearray(index[offset:offset + size])
    change(block)
    crc = struct.pack("<I", btf.masked_crc32c(bytes(block) + b"\x00"))
    return index[:offset] + bytes(block) + b"\x00" + crc + index[offset + size + 5:]


def index_replacing(index, old, new):
    """The mini index with bytes old of its data block replaced by new (as long)."""
    def change(block):
        at = block.index(old)
        block[at:at + len(old)] = new
    return with_data_block(index, change)


def flip(content, rng):
    """content (a bytearray) with 1-3 of its bytes set at random."""
    for _ in range(rng.randrange(1, 4)):
        content[rng.randrange(len(content))] = rng.randrange(256)
    return content


def rezipped(content, change):
    """The zip archive content (a .pth's bytes) with each member's bytes changed by
    change(name, bytearray), its checksums and sizes written anew."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(content)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info, bytes(change(info.filename, bytearray(source.read(info)))))
    return out.getvalue()


def test_fuzzed_openai_checkpoints_and_pth_files_load_or_raise_the_projects_error(tmp_path):
    """Each mutation loads or is the project's error, none for long (outcomes)."""
    rng = random.Random(0)
    folder = tmp_path / "gpt2-mini-tf"
    shutil.copytree(MINI_TF, folder)
    index = (MINI_TF / INDEX).read_bytes()
    cases = [with_data_block(index, lambda block: flip(block, rng)) for _ in range(150)]
    cases += [bytes(flip(bytearray(index), rng)) for _ in range(50)]  # checksums broken
    parsed, refused = outcomes(folder / INDEX, cases, lambda path: gpt.load_gpt2(folder))
    assert 0 < parsed < refused  # past the checksum, a flip in a name or padding may read
    tiny = dict(TINY_CONFIG, vocab_size=10, context_length=4, emb_dim=4, n_layers=1, n_heads=1)
    (tmp_path / "config.json").write_text(json.dumps(tiny))  # beside the .pth: its size
    torch.save(gpt.GPTModel(tiny).state_dict(), tmp_path / "valid.pth")
    valid = (tmp_path / "valid.pth").read_bytes()
    pickle_flips = [rezipped(valid, lambda name, data: flip(data, rng)
                             if name.endswith("data.pkl") else data) for _ in range(150)]
    cases = [bytes(flip(bytearray(valid), rng)) for _ in range(100)] + pickle_flips
    parsed, refused = outcomes(tmp_path / "w.pth", cases,
                               lambda path: gpt.build_gpt(weights=str(path)))
    assert 0 < parsed < refused
    cuts = [valid[:size] for size in range(0, len(valid), 97)]  # cut anywhere, or one record
    cuts += [rezipped(valid, lambda name, data: data[:rng.randrange(len(data))]
                      if name.endswith(f"/data/{n}") else data) for n in range(21)]
    assert outcomes(tmp_path / "w.pth", cuts, gpt.load_gpt2) == (0, len(cuts))


INDEX, DATA = "model.ckpt.index", "model.ckpt.data-00000-of-00001"
HPARAMS = {"n_vocab": 50257, "n_ctx": 128, "n_embd": 16, "n_head": 2, "n_layer": 2}


@pytest.mark.parametrize("name, damage, problem", [
    (INDEX, lambda b: b[:500], "model.ckpt.index is not a valid TensorFlow checkpoint index: "
     "it does not end with a table footer (truncated?)"),
    (DATA, lambda b: b[:1_000_000], "model.ckpt.data-00000-of-00001 is truncated: variable "
     "model/wte ends at byte 1,642,784 and the file has 1,000,000"),
    (INDEX, lambda b: index_replacing(b, b"c_attn/b\x08\x01", b"c_attn/b\x08\x03"),  # DT_INT32
     "variable model/h0/attn/c_attn/b has dtype DT_INT32; GPT-2's weights are floats"),
    (INDEX, lambda b: index_replacing(b, b"\x20\xc0\x01\x28\x80\x18",  # offset 192 -> 128
                                      b"\x20\x80\x01\x28\x80\x18"),
     "variables model/h0/attn/c_attn/b and model/h0/attn/c_attn/w overlap"),
    ("hparams.json", lambda b: json.dumps(dict(HPARAMS, n_embd=32)).encode(),
     "has shape (50257, 16) and there are 2 layers, but"),
    ("hparams.json", lambda b: json.dumps(dict(HPARAMS, n_layer=1)).encode(),
     "hparams.json says (50257, 16) and 1 layers"),
    ("hparams.json", lambda b: b"[" * 100_000 + b"]" * 100_000, "nested more than 32 levels"),
    ("hparams.json", lambda b: b'{"n_layer": ' + b"9" * 5000 + b"}", "a number of 5,000 char"),
    (INDEX, lambda b: b.replace(b"model/h0", b"model/h7", 1), "fails its crc32c check"),
    (INDEX, lambda b: b + bytes(1_000_000), "has 1,000,940 bytes; GPT-2's has a few thousand"),
    # torch.load(mmap=True) gave the tensor the bytes after its record: garbage weights
    (MINI_BOOK.name, lambda b: rezipped(b, lambda name, data: data[:-4] if name.endswith(
        "/data/2") else data), "gpt2-mini-book.pth is damaged: its record gpt2-mini-book/data/2 "
     "has 65,532 bytes, its tensors need 65,536; save it again with torch.save("),
])
def test_a_damaged_openai_checkpoint_or_pth_is_a_one_line_error_naming_the_file(
        tmp_path, name, damage, problem):
    folder = tmp_path / "weights"
    shutil.copytree(MINI_BOOK.parent if name == MINI_BOOK.name else MINI_TF, folder)
    (folder / name).write_bytes(damage((folder / name).read_bytes()))
    with pytest.raises(InputError) as error:
        gpt.build_gpt(weights=str(folder / name))  # any file of OpenAI's names the checkpoint
    message = str(error.value)
    assert problem in message and str(folder) in message and "\n" not in message
    assert btf.crc32c(b"123456789") == 0xE3069283  # the standard check value of crc32c


def varint(n):
    return bytes([n & 0x7F | 0x80]) + varint(n >> 7) if n > 0x7F else bytes([n])


def test_an_openai_index_naming_one_block_many_times_is_refused_having_checked_it_once(
        tmp_path, monkeypatch):
    """Each entry re-checked the block's checksum: 1.9 MB of such an index took 1.5 h."""
    index = (MINI_TF / INDEX).read_bytes()
    start = len(index) - btf.TABLE_FOOTER_BYTES  # the new index block goes where the footer is
    metaindex, pos = btf.block_handle(index, start)
    [(key, handle)] = btf.block_entries(index, btf.block_handle(index, pos)[0])
    block = (bytes([0, len(key), len(handle)]) + key + handle) * 1000 + struct.pack("<II", 0, 1)
    footer = b"".join(varint(n) for n in (*metaindex, start, len(block))).ljust(40, b"\0")
    crc = struct.pack("<I", btf.masked_crc32c(block + b"\0"))
    shutil.copytree(MINI_TF, tmp_path / "tf")
    (tmp_path / "tf" / INDEX).write_bytes(index[:start] + block + b"\0" + crc + footer +
                                          struct.pack("<Q", btf.TABLE_MAGIC))
    checked, masked_crc32c = [], btf.masked_crc32c
    monkeypatch.setattr(btf, "masked_crc32c", lambda data: checked.append(data) or
                        masked_crc32c(data))
    with pytest.raises(InputError, match="names a block at byte 0, inside one it named before"):
        gpt.build_gpt(weights=str(tmp_path / "tf"))
    assert len(checked) == 2  # the index block, then the data block once


@pytest.mark.parametrize("form, name, value, problem", [
    ("hub", "h.100000000000.ln_1.weight", torch.ones(16),
     "tensor h.100000000000.ln_1.weight has the layer number '100000000000', not one of 0 "),
    ("pth", "trf_blocks.100000000000.norm1.scale", torch.ones(16), "number '100000000000'"),
    ("hub", "h.².ln_1.weight", torch.ones(16), "tensor h.².ln_1.weight has the layer number"),
    ("pth", "trf_blocks.١.norm1.scale", torch.ones(16), "layer number '١', not one of 0 to 999"),
    ("hub", "h.0.ln_1.g.weight", torch.ones(16), "puts it inside another tensor, or another"),
    ("pth", "trf_blocks.1.att.W_query.weight", torch.ones(16), "W_query.weight and its W_key "
     "and W_value are torch.float32 (16,), torch.float32 (16, 16), torch.float32 (16, 16)"),
    ("pth", "trf_blocks.1.att.W_query.weight", torch.ones(16, 16, 1), "(16, 16, 1), torch"),
    ("pth", "trf_blocks.0.att.W_query.bias", torch.ones(16, dtype=torch.int32), "torch.int32"),
    ("pth", "trf_blocks.0.att.W_query.weight", torch.ones(16, 16, dtype=torch.bool),
     "are torch.bool (16, 16), torch.float32 (16, 16), torch.float32 (16, 16), not floats"),
    ("hub", "h.0.mlp.c_fc.weight", lambda t: t.T.contiguous(), "has shape (64, 16) ((16, 64) "
     "once split or transposed), but the model needs (64, 16)"),
    ("hub", "wte.weight", lambda t: t.view(torch.int16),  # F16's bytes relabelled I16
     "params['wte'] holds torch.int16, not floats"),
])
def test_a_tensor_the_loader_cannot_place_or_use_is_one_error_naming_it_and_the_file(
        tmp_path, form, name, value, problem):
    """Layer 100000000000 grew a list at 1.4 GB/s until memory ran out, int() reads "١"
    as 1, a name inside a tensor's and a W_query torch.cat cannot join were tracebacks,
    and torch.cat made an integer W_query floats."""
    if form == "hub":
        path, tensors = tmp_path / "model.safetensors", bst.load_safetensors(MINI_WEIGHTS)[0]
    else:
        path, tensors = tmp_path / "w.pth", torch.load(MINI_BOOK, weights_only=True)
    tensors[name] = value(tensors[name]) if callable(value) else value
    (bst.save_safetensors if form == "hub" else torch.save)(tensors, path)
    shutil.copy((MINI if form == "hub" else MINI_BOOK.parent) / "config.json", tmp_path)
    with pytest.raises(InputError) as error:
        gpt.build_gpt(weights=str(path))
    message = str(error.value)
    assert problem in message and str(path) in message and "\n" not in message


class RunsWhenUnpickled:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["MARKER"]),))


def test_a_pth_or_checkpoint_holding_more_than_tensors_is_refused_without_running_it(
        tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("MARKER", str(marker))
    path = tmp_path / "gpt2-small-124M.pth"
    torch.save({"tok_emb.weight": RunsWhenUnpickled()}, path)
    with pytest.raises(InputError, match=r"refused by torch\.load\(weights_only=True\): it "
                                         r"refers to \S+, not only to tensors") as error:
        gpt.build_gpt(weights=str(path))
    assert "\n" not in str(error.value)
    path.write_bytes(pickle.dumps({"model": RunsWhenUnpickled()}))  # a checkpoint of old
    with pytest.raises(InputError, match="not a valid safetensors file"):
        classify.load_classifier(path)
    assert not marker.exists()
    torch.save([torch.zeros(2)], path)
    with pytest.raises(InputError, match="does not hold a state_dict"):
        gpt.build_gpt(weights=str(path))


def test_pretrained_falls_back_to_openais_files_and_reads_them_where_chapter_5_left_them(
        tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "124M"  # OpenAI's URLs, as file:// URLs
    shutil.copytree(MINI_TF, mirror)
    monkeypatch.setattr(bdownload, "HUB_URL", "http://127.0.0.1:9/{}")
    monkeypatch.setattr(bdownload, "OPENAI_URL", (tmp_path / "mirror").as_uri() + "/{size}/{file}")
    models_dir = tmp_path / "gpt2"
    model, config = gpt.build_gpt("gpt2-small", "pretrained", models_dir)
    folder = models_dir / "124M"
    assert sorted(p.name for p in folder.iterdir()) == sorted(bdownload.OPENAI_FILES)
    assert all((folder / n).read_bytes() == (MINI_TF / n).read_bytes()
               for n in bdownload.OPENAI_FILES)
    assert config["emb_dim"] == 16  # from the downloaded hparams.json

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(bdownload.urllib.request, "urlopen", no_network)
    again, _ = gpt.build_gpt("gpt2-small", "pretrained", models_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert bweights.weights_file("pretrained", "gpt2-small", models_dir) == folder / DATA


def test_help_documents_every_flag_its_chapter_reference_and_the_three_weight_forms(cli):
    helps = {}
    for script in ("gpt.py", "finetune.py", "classify.py"):
        # argparse wraps to the terminal's width
        helps[script] = " ".join(output(cli(script, "--help")).split())
        for words in ["model.safetensors", "the book's .pth", "OpenAI's model.ckpt",
                      "a folder holding a model.safetensors", "OpenAI's checkpoint"]:
            assert words in helps[script], (script, words)
    assert {"--device", "--model", "--weights", "--data", "--out", "--epochs", "--batch-size",
            "--lr", "--seed", "--max-length", "--trainable", "--pool", "--lora-rank",
            "--lora-alpha", "--no-balance", "--no-baseline", "--plain"} <= set(
        re.findall(r"--[a-z-]+", helps["finetune.py"]))
    for reference in ["Exercise 6.1", "Exercise 6.2", "Exercise 6.3", "appendix E",
                      "listing 6.2", "section 6.4"]:
        assert reference in helps["finetune.py"]

# ------------------------------------------------------------------------ data.py

def test_real_tsv_reads_balances_and_splits_row_for_row_as_the_chapters_pandas(capsys):
    rows = data.read_tsv(SMS, labels=data.SPAM_LABELS)
    assert len(rows) == 5572  # the chapter's figure 6.5
    assert blabels.count_labels(rows) == {"ham": 4825, "spam": 747}
    assert "lines 5082-5084 hold one quoted text" in capsys.readouterr().out
    label, text = rows[5081]  # pandas' row 5081 too: three lines, one quote left in
    assert label == "ham" and len(text) == 350 and text.count("\n") == 2
    assert text.startswith("Keep ur problems in ur heart") and text.endswith('I\x92L CALL U"')
    balanced = data.create_balanced_dataset(rows)
    assert blabels.count_labels(balanced) == {"ham": 747, "spam": 747}
    train, validation, test = data.random_split(balanced, 0.7, 0.1)
    assert (len(train), len(validation), len(test)) == (1045, 149, 300)
    # What the chapter's pandas code (pandas 3.1.1, NumPy 2.4.6) writes to its CSVs:
    assert [label for label, _ in train[:5]] == ["ham", "ham", "spam", "spam", "spam"]
    assert train[0][1] == "Dude how do you like the buff wind."
    assert train[-1][1] == "His frens go then he in lor. Not alone wif my mum n sis lor."
    assert [label for label, _ in validation[:5]] == ["spam", "spam", "ham", "ham", "spam"]
    assert validation[0][1].startswith("Mila, age23, blonde, new in UK. I look sex with UK guys.")
    assert [label for label, _ in test[:5]] == ["spam", "spam", "spam", "ham", "spam"]
    assert test[0][1] == "85233 FREE>Ringtone!Reply REAL"
    assert test[-1][1].startswith("Your unique user ID is 1172. For removal send STOP to 87239")
    # the sample order: np.random.RandomState(seed).permutation(n), as printed by NumPy 2.4.6
    assert bsampling.sample_order(10, 123) == [4, 0, 7, 5, 8, 3, 1, 6, 9, 2]
    assert bsampling.sample_order(8, 0) == [6, 2, 1, 7, 3, 0, 5, 4]
    assert bsampling.sample_order(8, 2**32 - 1) == [1, 7, 6, 0, 5, 4, 2, 3]
    assert bsampling.sample_order(300, 7)[:6] == [254, 57, 150, 66, 114, 280]
    assert bsampling.sample_order(0, 123) == [] and bsampling.sample_order(1, 123) == [0]


def test_the_uci_zip_reads_as_the_tsv_unzipping_writes_it_only_and_nothing_escapes(
        tmp_path, monkeypatch):
    assert data.load_messages(SMS_ZIP) == data.read_tsv(SMS)
    monkeypatch.chdir(tmp_path)
    tsv = Path("sms_spam_collection") / "SMSSpamCollection.tsv"
    data.download_and_unzip_spam_data(SMS_ZIP.as_uri(), "sms.zip", "sms_spam_collection", tsv)
    assert tsv.read_bytes() == SMS.read_bytes()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["SMSSpamCollection.tsv",
                                                           "sms_spam_collection"]
    monkeypatch.chdir(tmp_path / "sms_spam_collection")  # where ../escaped.txt would go up
    zip_file = tmp_path / "evil.zip"  # members with escaping paths are never written
    with zipfile.ZipFile(zip_file, "w") as z:
        z.writestr("../escaped.txt", "x")
        z.writestr("/tmp/absolute-evil.txt", "x")
        z.writestr("SMSSpamCollection", "ham\thello\nspam\tWIN\n")
    assert data.load_messages(zip_file) == [("ham", "hello"), ("spam", "WIN")]
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/absolute-evil.txt").exists()
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(InputError, match="no member 'SMSSpamCollection'"):
        data.load_messages(empty)


def test_tsv_tolerates_bom_crlf_and_blank_lines_and_quotes_like_pandas_read_csv(
        tmp_path, capsys):
    path = tmp_path / "d.tsv"
    path.write_bytes(b'\xef\xbb\xbfham\tHi "there", ok\r\n\r\nspam\tWIN\tnow\r\n\n\n')
    assert data.read_tsv(path, data.SPAM_LABELS) == [("ham", 'Hi "there", ok'),
                                                     ("spam", "WIN\tnow")]
    path.write_text('ham\t"Happy day" I said\n'        # quotes open a field, text may follow
                    'spam\t"a ""WIN"" with\ta tab"\n'  # "" is one quote; a quoted tab stays
                    '"ham"\t"two\nlines"\n'              # a quoted text may hold a newline
                    'ham\tmid "quote" stays\n', encoding="utf-8")
    assert data.read_tsv(path) == [("ham", "Happy day I said"), ("spam", 'a "WIN" with\ta tab'),
                                   ("ham", "two\nlines"), ("ham", 'mid "quote" stays')]
    assert "lines 3-4 hold one quoted text" in capsys.readouterr().out


@pytest.mark.parametrize("name, content, problem", [("bad.tsv", c, p) for c, p in [
    (b"ham\tok\nthis line has no tab\n", "line 2: no tab"),
    (b"ham\tok\n\nspma\ttypo\n", "line 3: unknown label 'spma'"),
    (b"ham\tok\nspam\t\xff\xfe bad\n", "line 2: not UTF-8"),
    (b"", "holds no messages"),
    (b"\n\r\n\n", "holds no messages"),
    (b'ham\tok\n\nspam\t"never closed\nham\tlost\n', "line 3: a quoted text opens here and never"),
    (b'ham\t"' + b"x" * 200_000 + b"\n", "line 1: field larger than field limit"),
    (b"ham\tok\nspam\t\nham\tfine\n", "line 2: the message is empty"),
    (b"ham\tok\n\nham\t  \t \n", "line 3: the message is empty (or only whitespace)"),
    (b'ham\tok\nspam\t""\n', "line 2: the message is empty"),
]] + [("bad.csv", c.encode(), p) for c, p in [
    ("Lab,Text\n0,hi\n", "no 'Label' column"),
    ("Label,Body\n0,hi\n", "no 'Text' column"),
    ("Label,Text\n0,hi\nspam,hello\n", "row 3: label 'spam'"),
    ("Label,Text\n0,hi\n7,hello\n", "row 3: label '7'"),
    ("Label,Text\n0,hi\n1,\n", "row 3: the message is empty"),
    ("Label,Text\n0,hi\n1\n", "row 3: the message is empty"),
    ('Label,Text\n0,hi\n1," "\n', "row 3: the message is empty"),
]])
def test_bad_tsv_lines_and_csv_split_rows_name_the_file_and_where(
        tmp_path, name, content, problem):
    read = {"bad.tsv": lambda path: data.read_tsv(path, data.SPAM_LABELS),
            "bad.csv": data.read_csv}[name]
    assert_error_names_file(read, tmp_path / name, content, problem)


def test_fuzzed_tsv_bytes_parse_or_raise_the_projects_error(tmp_path):
    """1-3 bytes of a valid file replaced, inserted or deleted: what reads with the
    spam labels reads the same with any labels, and every other file is refused."""
    rng = random.Random(1)
    alphabet = b"hamspm\t\n\r\" ,\xef\xbb\xbf\xff\xc3\xa9x"
    contents = []
    for _ in range(200):
        content = bytearray(b'ham\tHi "there", ok\r\nspam\tWIN a prize\n\nham\t"two\nlines"\n')
        for _ in range(rng.randrange(1, 4)):
            at, byte = rng.randrange(len(content)), rng.choice(alphabet)
            content[at:at + 1] = [[byte], [byte, content[at]], []][rng.randrange(3)]
        contents.append(bytes(content))
    spam = []

    def read(path):  # with any labels, after the spam labels
        try:
            spam.append(data.read_tsv(path, data.SPAM_LABELS))
        except InputError:
            data.read_tsv(path)
        else:
            assert data.read_tsv(path) == spam[-1]
    parsed, refused = outcomes(tmp_path / "fuzz.tsv", contents, read)
    assert 0 < len(spam) < parsed and refused > 0


def test_tricky_texts_round_trip_through_csv_and_the_dataset_pads_truncates_and_reads_eot(
        tmp_path, tokenizer):
    rows = [("ham", 'He said "hi", then left'), ("spam", "line one\nline two"),
            ("ham", "comma, comma,, \"\"quotes\"\""), ("spam", " leading and trailing "),
            ("ham", "emoji 😀 and 日本語"), ("spam", "carriage\r\nreturn")]
    data.write_csv(rows, tmp_path / "t.csv")
    assert data.read_csv(tmp_path / "t.csv") == [(data.SPAM_LABELS[l], t) for l, t in rows]
    data.write_csv([("ham", "Hi"), ("spam", "This is a longer message, really")],
                   tmp_path / "t.csv")
    longest = len(tokenizer.encode("This is a longer message, really"))
    dataset = data.SpamDataset(tmp_path / "t.csv", tokenizer)
    assert dataset.max_length == longest
    ids, label = dataset[0]
    assert ids.tolist() == tokenizer.encode("Hi") + [50256] * (longest - 1) and label.item() == 0
    short = data.SpamDataset(tmp_path / "t.csv", tokenizer, max_length=3)
    assert short[1][0].tolist() == tokenizer.encode("This is a longer message, really")[:3]
    unpadded = data.SpamDataset(tmp_path / "t.csv", tokenizer, pad=False)
    inputs, labels = btokens.pad_batch([unpadded[0], unpadded[1]])
    assert inputs.shape == (2, longest) and labels.tolist() == [0, 1]
    data.write_csv([("ham", "a <|endoftext|> b")], tmp_path / "t.csv")
    assert 50256 not in data.SpamDataset(tmp_path / "t.csv", tokenizer)[0][0].tolist()


def test_data_loaders_give_the_chapters_batch_counts_shapes_and_shuffle(
        tmp_path, tokenizer, chapter_splits):
    for name, rows in zip(["train", "validation", "test"], chapter_splits):
        data.write_csv(rows, tmp_path / f"{name}.csv")
    train = data.SpamDataset(tmp_path / "train.csv", tokenizer)
    val = data.SpamDataset(tmp_path / "validation.csv", tokenizer, max_length=train.max_length)
    test = data.SpamDataset(tmp_path / "test.csv", tokenizer, max_length=train.max_length)
    loaders = data.create_data_loaders(train, val, test)
    assert [len(loader) for loader in loaders] == [130, 19, 38]
    assert train.max_length == 120  # the chapter prints 120 and torch.Size([8, 120])
    # The chapter's loaders after torch.manual_seed(123), on pandas' splits, give these
    # first batches (labels, first token ids), in this order:
    torch.manual_seed(123)
    for expected_labels, expected_first_ids in [
            ([0, 0, 1, 0, 0, 0, 1, 0], [56, 40, 45048, 1135, 35, 25206, 5122, 8491]),
            ([1, 1, 1, 0, 0, 0, 1, 0], [4805, 39, 32945, 3987, 41856, 18690, 16827, 40])]:
        inputs, labels = next(iter(loaders[0]))
        assert inputs.shape == (8, 120) and labels.tolist() == expected_labels
        assert inputs[:, 0].tolist() == expected_first_ids


# -------------------------------------------------------------------- finetune.py

def test_freezing_leaves_exactly_last_block_final_norm_and_head_trainable_the_rest_cached():
    torch.manual_seed(0)
    model = finetune.prepare_for_classification(gpt.GPTModel(TINY_CONFIG), num_classes=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("trf_blocks.1.", "final_norm.", "out_head."))}
    assert trainable == expected
    assert model.out_head.out_features == 2 and model.out_head.bias is not None
    assert bfast.GPTClassifier(model).enable_prefix_cache()
    model = gpt.GPTModel(dict(TINY_CONFIG, drop_rate=0.1))  # dropout: no two passes alike
    finetune.prepare_for_classification(model, 2)
    assert not bfast.GPTClassifier(model).enable_prefix_cache()


def random_batches(n_batches, batch_size=4, length=12, seed=0, ragged=False):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, 50000, (batch_size, length), generator=g)
        if ragged:  # trailing padding of random lengths
            for row in range(batch_size):
                ids[row, int(torch.randint(1, length + 1, (1,), generator=g)):] = 50256
        batches.append((ids, torch.randint(0, 2, (batch_size,), generator=g)))
    return batches


def train_briefly(model, batches, epochs=3):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return finetune.train_classifier_simple(model, batches, batches[:2], optimizer, "cpu",
                                            num_epochs=epochs, eval_freq=2, eval_iter=2)


def test_ranks_sharing_uneven_batches_give_one_processs_loss_and_accuracy(monkeypatch):
    """3 simulated ranks (threads, all_gather over a barrier): batches of 5, 5 and 2
    rows shared 1/2/2 and 0/1/1, a rank with no row at all in the last."""
    model = tiny_classifier().eval()
    batches = [(ids[:n], labels[:n]) for (ids, labels), n in
               zip(random_batches(3, batch_size=5, seed=5), [5, 5, 2])]
    expected = (finetune.calc_loss_loader(batches, model, "cpu"),
                finetune.calc_accuracy_loader(batches, model, "cpu"))
    world, local, barrier, shared = 3, threading.local(), threading.Barrier(3, timeout=60), {}

    def all_gather(parts, tensor):
        shared[local.rank] = tensor
        barrier.wait()
        for r, part in enumerate(parts):
            part.copy_(shared[r])
        barrier.wait()  # every rank has read before the next gather overwrites

    monkeypatch.setattr(beyond.distributed, "ranks", lambda: (local.rank, world))
    monkeypatch.setattr(beyond.distributed.dist, "all_gather", all_gather)
    rows = {}

    def this_ranks_model(input_batch):
        rows[local.rank].append(len(input_batch))
        return model(input_batch)

    def rank_main(rank):
        local.rank, rows[rank] = rank, []
        whole = beyond.distributed.WholeBatches(this_ranks_model)
        return (finetune.calc_loss_loader(batches, whole, "cpu"),
                finetune.calc_accuracy_loader(batches, whole, "cpu"))

    with ThreadPoolExecutor(world) as pool:  # all three at once, each rank's errors raised
        results = list(pool.map(rank_main, range(world)))
    assert rows == {0: [1, 1, 0] * 2, 1: [2, 2, 1] * 2, 2: [2, 2, 1] * 2}
    assert results == [(pytest.approx(expected[0], abs=1e-6), expected[1])] * world


@pytest.mark.parametrize("pool, trainable", [("last", "last_block"), ("flexible", "last_block"),
                                             ("first", "last_two_blocks"), ("mean", "last_block"),
                                             ("last", "last_layer")])
def test_cached_fast_loop_equals_the_plain_loop(pool, trainable, capsys):
    batches = random_batches(5, ragged=pool != "last")
    plain = tiny_classifier(pool=pool, trainable=trainable, n_layers=3)
    plain.fast = False
    fast = tiny_classifier(pool=pool, trainable=trainable, n_layers=3)
    assert fast.enable_prefix_cache()
    assert fast.n_cached == {"last_block": 2, "last_two_blocks": 1, "last_layer": 3}[trainable]
    fast.fill_prefix_cache([[(ids[i], y[i]) for ids, y in batches for i in range(4)]])
    assert len(fast.prefix_cache) == 5 * 4
    plain_curves = train_briefly(plain, batches)
    fast_curves = train_briefly(fast, batches)
    for a, b in zip(plain_curves[:4], fast_curves[:4]):
        assert a == pytest.approx(b, abs=1e-4)
    assert len(fast.prefix_cache) == 5 * 4
    with torch.no_grad():
        for ids, _ in batches:
            assert torch.allclose(plain(ids)[:, -1, :], fast(ids)[:, -1, :], atol=1e-4)


def chapter_lines(printed):
    """The chapter's log lines of a run: losses and accuracies, no timing or cache talk."""
    return [line for line in printed.splitlines()
            if re.match(r"(Ep \d|Training|Validation|Test|Naive|not spam|spam )", line)
            and "completed in" not in line]


def test_any_cache_budget_prints_the_plain_runs_lines_bf16_its_own_and_a_rerun_the_same(
        tmp_path, sample_tsv, capsys, monkeypatch, cli):
    monkeypatch.setattr(bmemory, "available_memory", lambda device: (4 * 10**9, "RAM"))
    runs = {}
    for name, flags in [("plain", ["--plain"]),
                        ("budget", ["--cache-memory", "200kB", "--target-fpr", "0.05"]),
                        ("no-cache", ["--cache-memory", "0"]), ("auto", []), ("again", []),
                        ("bf16", ["--precision", "bf16"]),
                        ("bf16-plain", ["--precision", "bf16", "--plain"])]:
        result = fine_tune(sample_tsv, tmp_path / name, "--epochs", "2", *flags)
        printed = capsys.readouterr().out.replace(str(tmp_path / name), "OUT")
        runs[name] = (printed, result["prefix_cache"], chapter_lines(printed))
    assert len(runs["plain"][2]) > 15
    for name in ("budget", "no-cache", "auto"):
        assert runs[name][2] == runs["plain"][2], name
    printed, cache, _ = runs["budget"]
    assert re.search(r"Prefix cache: \d+ kB, over the budget of 200 kB \(--cache-memory\): "
                     r"200 kB stays in memory, the other \d+ kB goes to a temporary file", printed)
    assert 0 < cache["memory_bytes"] <= 200_000 < cache["memory_bytes"] + cache["file_bytes"]
    assert not [p for p in (tmp_path / "budget").iterdir() if "cache" in p.name]
    metrics = json.loads((tmp_path / "budget" / "metrics.json").read_text())
    assert metrics["calibration"]["target_fpr"] == 0.05
    assert "Caching" not in runs["no-cache"][0] and runs["no-cache"][1]["memory_bytes"] == 0
    assert "within the budget" in runs["auto"][0] and runs["auto"][1]["file_bytes"] == 0
    # the same run again: the same lines but for the time taken, the same splits
    timeless = [re.sub(r"Training completed in .*", "", runs[n][0]) for n in ("auto", "again")]
    assert timeless[0] == timeless[1]
    for split in ("train.csv", "validation.csv", "test.csv"):
        assert (tmp_path / "auto" / split).read_bytes() == (tmp_path / "again" / split).read_bytes()
    # bf16 computes in bf16, the same with --plain, and caches in half the bytes
    assert runs["bf16"][2] == runs["bf16-plain"][2] != runs["auto"][2]
    assert runs["bf16"][1]["needed_bytes"] * 2 == runs["auto"][1]["needed_bytes"] > 0
    assert runs["bf16"][1]["memory_bytes"] * 2 == runs["auto"][1]["memory_bytes"]
    # the checkpoint keeps float32 weights, whatever precision trained them
    tensors, _ = bst.load_safetensors(tmp_path / "bf16" / CHECKPOINT)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    # it classifies in fp32 and bf16 alike, and explains in bf16
    probabilities = {}
    for precision in ("fp32", "bf16"):
        stdout = output(cli("classify.py", "--checkpoint", tmp_path / "bf16" / CHECKPOINT,
                            "--precision", precision, "--json", SPAM_TEXT, "Hi there"))
        probabilities[precision] = [json.loads(line)["probabilities"]
                                    for line in stdout.splitlines()]
    for fp32, bf16 in zip(probabilities["fp32"], probabilities["bf16"]):
        assert bf16 == pytest.approx(fp32, abs=0.01)
    explanation = json.loads(output(cli(
        "classify.py", "--checkpoint", tmp_path / "bf16" / CHECKPOINT, "--precision", "bf16",
        "--explain", "--json", SPAM_TEXT)))["explanation"]
    assert "".join(t["token"] for t in explanation) == SPAM_TEXT
    assert all(math.isfinite(t["score"]) for t in explanation)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_classifier_gives_the_same_logits_with_the_cache(dtype, tmp_path):
    batches = random_batches(3, ragged=True)
    reference = tiny_classifier(pool="flexible").to(dtype).eval()
    assert not reference.enable_prefix_cache(budget=0)
    for budget, spill_dir in [(None, None), (1000, tmp_path), (1000, None)]:
        cached = tiny_classifier(pool="flexible").to(dtype).eval()
        assert cached.enable_prefix_cache(budget, spill_dir)
        with torch.no_grad():
            for _ in range(2):  # filling the cache, then reading it back
                for ids, _ in batches:
                    logits = cached(ids)
                    assert logits.dtype == dtype
                    assert torch.equal(logits, reference(ids))
        cache = cached.prefix_cache
        assert budget is None or cache.memory_bytes <= budget
        assert (cache.file_bytes > 0) == (spill_dir is not None)
    assert not list(tmp_path.iterdir())  # the spill file is unlinked at once


# ------------------------------------------------------------- --precision bf16, fp16

def separable_batches(n_batches, seed=0, batch_size=8, length=12):
    """Label 1: tokens drawn from 0-9; label 0: from 10-19. Padded at the end, so
    the chapter's last position reads padding and must attend back."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        labels = torch.randint(0, 2, (batch_size,), generator=g)
        ids = torch.randint(0, 10, (batch_size, length), generator=g) + 10 * (1 - labels[:, None])
        ids[:, length - 3:] = 50256
        batches.append((ids, labels))
    return batches


def fit(model, batches, val, epochs=4):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    finetune.train_classifier_simple(model, batches, val, optimizer, "cpu",
                                     num_epochs=epochs, eval_freq=1000, eval_iter=1)
    return finetune.calc_accuracy_loader(val, model, "cpu")


def precision_classifier(precision):
    torch.manual_seed(0)
    model = gpt.GPTModel(dict(TINY_CONFIG, emb_dim=32, n_heads=4))
    finetune.prepare_for_classification(model, 2, trainable="last_block")
    classifier = bfast.GPTClassifier(model, pool="last", precision=precision)
    classifier.round_frozen_prefix()
    return classifier


def test_training_lowers_the_loss_and_bf16_learns_as_fp32_where_one_autocast_does_not(capsys):
    train, val = separable_batches(20), separable_batches(6, seed=1)
    model = precision_classifier("fp32")
    before = finetune.calc_loss_loader(val, model, "cpu")
    fp32 = fit(model, train, val)
    assert finetune.calc_loss_loader(val, model, "cpu") < before - 0.05
    assert "Ep 1 (Step 000000): Train loss" in capsys.readouterr().out
    bf16 = fit(precision_classifier("bf16"), train, val)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the naive design: stale weights
        naive = fit(precision_classifier("fp32"), train, val)
    assert fp32 > 0.9 and abs(bf16 - fp32) <= 0.05
    assert naive < fp32 - 0.2


def test_bf16_logits_are_within_two_percent_of_fp32s_and_float32(tokenizer):
    gpt_model, _ = gpt.build_gpt(weights=str(MINI_WEIGHTS))
    finetune.prepare_for_classification(gpt_model, 2)
    texts = [text for _, text in data.read_tsv(SMS)[:64]]
    ids = btokens.pad_ids([btokens.encode(t, tokenizer, 60) for t in texts])
    logits = {}
    for precision in ("fp32", "bf16"):
        model = bfast.GPTClassifier(gpt_model, precision=precision).eval()
        with torch.no_grad():
            logits[precision] = model(ids)[:, -1, :]
    assert logits["bf16"].dtype == torch.float32
    scale = logits["fp32"].abs().max()
    assert 0 < (logits["bf16"] - logits["fp32"]).abs().max() <= 0.02 * scale


@pytest.mark.parametrize("trainable, budget", [("last_block", None), ("last_block", 0),
                                               ("last_layer", None), ("last_layer", 0)])
def test_in_bf16_the_fast_path_rounds_where_the_plain_pass_does(trainable, budget):
    """The frozen prefix's output is rounded to bfloat16 in both paths, with the
    cache or without, even where the frozen prefix is every block (last_layer)."""
    batches = random_batches(2)
    plain = tiny_classifier(trainable=trainable)
    fast = tiny_classifier(trainable=trainable)
    for model in (plain, fast):
        model.precision = "bf16"
        model.round_frozen_prefix()
    plain.fast = False
    fast.enable_prefix_cache(budget)
    with torch.no_grad():
        for ids, _ in batches:
            assert torch.equal(fast(ids), plain(ids))
    plain.precision = "fp32"
    plain.round_frozen_prefix()  # fp32: the hook removed
    with torch.no_grad():
        assert not torch.equal(fast(batches[0][0]), plain(batches[0][0]))


def test_a_precision_the_device_cannot_run_is_one_error_line(tmp_path, sample_tsv, cli):
    for script, flags in [("classify.py", ["text"]), ("finetune.py", [
            "--data", sample_tsv, "--weights", "random", "--out", tmp_path / "out"])]:
        code, _, stderr = cli(script, *flags, "--precision", "fp16", "--device", "cpu")
        assert (code, stderr.strip()) == (1, "error: --precision fp16 does not run on --device "
                                             "cpu here; it can run fp32 or bf16.")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"),
                    reason="torch < 2.3 has no GradScaler for the CPU (fp16 is CUDA's)")
def test_fp16_loss_scaling_skips_an_overflowing_step_then_trains(capsys):
    """fp16's GradScaler path, on the CPU (the CLI allows fp16 on CUDA only, where
    the same code runs): a scale so large that float16 overflows skips the step
    and lowers the scale; then the steps train."""
    model = precision_classifier("fp16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    wrapped = torch.nn.Module()  # as under torchrun: WholeBatches(DistributedDataParallel(.))
    wrapped.module = torch.nn.Module()
    wrapped.module.module = model
    optimizer = bprecision.loss_scaled(optimizer, wrapped, torch.device("cpu"))
    scaler = model.grad_scaler  # on the classifier, whose forward scales the loss
    scaler._init_scale = 2.0 ** 40
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    (ids, labels), = separable_batches(1)
    optimizer.zero_grad()
    finetune.calc_loss_batch(ids, labels, model, "cpu").backward()
    optimizer.step()
    assert scaler.get_scale() == 2.0 ** 39  # overflow: halved
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    train, val = separable_batches(20), separable_batches(6, seed=1)
    finetune.train_classifier_simple(model, train, val, optimizer, "cpu", num_epochs=3,
                                     eval_freq=1000, eval_iter=1)
    assert finetune.calc_accuracy_loader(val, model, "cpu") > 0.9
    assert scaler.get_scale() < 2.0 ** 39


def test_the_cache_keeps_its_messages_in_a_few_large_buffers_and_completes_short_writes(
        tmp_path, monkeypatch):
    cache = bfast.PrefixCache()
    hidden = [torch.randn(n, 16) for n in range(1, 200)]
    for i, h in enumerate(hidden):
        cache.put(i, h[:, :])
    stored = [cache.get(i, "cpu") for i in range(len(hidden))]
    assert all(torch.equal(a, b) for a, b in zip(stored, hidden))
    assert len({t.untyped_storage().data_ptr() for t in stored}) == 1
    assert cache.memory_bytes == sum(h.numel() * 4 for h in hidden)
    budgeted = bfast.PrefixCache(budget=1000)
    budgeted.put("a", hidden[3])
    assert budgeted.arena.numel() == 1000  # no more than the budget is reserved
    cache = bfast.PrefixCache(budget=0, spill_dir=tmp_path)  # the rest in a file
    hidden = torch.randn(5, 16)
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset:
                        real_pwrite(fd, bytes(data)[:7], offset))  # 7 bytes at a time
    cache.put("a", hidden)
    cache.put("b", hidden * 2)
    assert torch.equal(cache.get("a", "cpu"), hidden)
    assert torch.equal(cache.get("b", "cpu"), hidden * 2)
    disk_full_after(monkeypatch, "pwrite", 100)
    with pytest.raises(InputError, match=re.escape(
            f"cannot write the prefix cache's temporary file in {tmp_path} (No space left on "
            f"device, after 640 bytes)")):
        cache.put("c", hidden)
    assert "c" not in cache and torch.equal(cache.get("b", "cpu"), hidden * 2)
    cache.close()
    assert cache.file is None and not list(tmp_path.iterdir())


def test_plot_values_writes_a_well_formed_svg_with_both_axes(tmp_path):
    path = finetune.plot_values([0, 1.25, 2.5, 3.75, 5], [0, 1300, 2600, 3900, 5200],
                                [0.7, 0.5, 0.4, 0.2, 0.1], [0.75, 0.6, 0.4, 0.3, float("nan")],
                                label="loss", out_dir=tmp_path)
    root = ET.parse(path).getroot()
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"Epochs", "Examples seen", "Loss", "Training loss", "Validation loss"} <= set(texts)
    lines = list(root.iter("{http://www.w3.org/2000/svg}polyline"))
    assert len(lines) == 2 and "stroke-dasharray" in lines[1].attrib
    assert len(lines[1].attrib["points"].split()) == 4  # the NaN point is left out


def test_a_saved_checkpoint_loads_with_the_same_logits_classifies_in_batches_or_is_named_cut(
        tmp_path, tokenizer):
    model = tiny_classifier().eval()
    path = save_tiny(tmp_path / "c.safetensors", model=model)
    loaded, info = classify.load_classifier(path)
    assert info["max_length"] == 20 and info["labels"] == ["not spam", "spam"]
    ids = torch.tensor([tokenizer.encode(SPAM_TEXT)[:20]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))  # the same positions, the same values
    label = classify.classify_review(SPAM_TEXT, loaded, tokenizer, "cpu", max_length=20)
    assert label in ("spam", "not spam")
    probas = bstream.classify_texts([SPAM_TEXT, "hi", "x" * 20000, "😀 日本語 привет"],
                                     loaded, tokenizer, "cpu", 20)
    assert all(len(p) == 2 and sum(p) == pytest.approx(1) for p in probas)
    with pytest.raises(InputError, match="text 1 is empty"):
        bstream.classify_texts(["hi", ""], loaded, tokenizer, "cpu", 20)
    for pool in ("last", "flexible"):  # in batches, as one at a time
        model = tiny_classifier(pool=pool).eval()
        texts = ["hi", SPAM_TEXT, "see you at the station at 5", "ok " * 40]
        batched = bstream.classify_texts(texts, model, tokenizer, "cpu", 30, batch_size=3)
        for text, probas in zip(texts, batched):
            ids = tokenizer.encode(text)[:30]
            ids += [50256] * (30 - len(ids)) if pool == "last" else []
            with torch.no_grad():
                expected = torch.softmax(model(torch.tensor([ids]))[:, -1, :], dim=-1)[0]
            assert torch.allclose(torch.tensor(probas), expected, atol=1e-5)
    with pytest.raises(InputError, match="Fine-tune one first"):  # missing, then truncated
        classify.load_classifier(tmp_path / "nothing.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated"):
        classify.load_classifier(path)


def checkpoint_with(tmp_path, **changes):
    """A checkpoint of tiny_classifier() with these metadata, and tensors for callables."""
    path = save_tiny(tmp_path / "c.safetensors")
    tensors, metadata = bst.load_safetensors(path)
    tensors = {k: v.clone() for k, v in tensors.items()}
    for name, change in changes.items():
        if callable(change):
            tensors[name] = change(tensors[name])
        else:
            metadata[name] = change
    bst.save_safetensors(tensors, path, metadata)
    return path


@pytest.mark.parametrize("changes, problem", [
    ({"format": "gpt2-classifier/99"}, "its format is"),
    ({"config": json.dumps(dict(TINY_CONFIG, n_layers=10**9))}, "n_layers=1000000000"),
    ({"config": json.dumps(dict(TINY_CONFIG, n_layers=3))}, "lacks tensor trf_blocks.2"),
    ({"config": json.dumps(dict(TINY_CONFIG, emb_dim=32))}, "has shape"),
    ({"max_length": "1000"}, "max_length 1000"),
    ({"labels": json.dumps(["spam"])}, "labels"),
    ({"labels": json.dumps(["spam", "spam"])}, "its labels do not name each class once"),
    ({"pool": "middle"}, "unknown pooling"),
    ({"num_classes": "two"}, "malformed"),
    ({"calibration": "{}"}, "its calibration is malformed"),
    ({"calibration": json.dumps({"temperature": -1, "threshold": None})}, "temperature -1"),
    ({"calibration": json.dumps({"temperature": 1, "threshold": 2})}, "threshold 2"),
    ({"calibration": '{"temperature": Infinity, "threshold": null}'}, "calibration is malformed"),
    ({"config": "[" * 100_000 + "]" * 100_000}, "ValueError: it is nested more than 32 levels"),
    ({"labels": "9" * 5000}, "ValueError: a number of 5,000 characters"),
    ({"lora": "[" * 100_000 + "]" * 100_000}, "its LoRA description is malformed"),
    ({"calibration": "[" * 100_000 + "]" * 100_000}, "its calibration is malformed"),
    ({"out_head.weight": lambda t: t.view(torch.int32)},  # F32's bytes relabelled I32
     "tensor out_head.weight has dtype I32, but weights are floating point"),
] + [({"calibration": json.dumps({"temperature": t, "threshold": None, "target_fpr": None})},
      "is outside 0.05..20.0") for t in (1e-300, 0.01, 21)])
def test_bad_checkpoints_fail_before_allocating(tmp_path, changes, problem):
    path = checkpoint_with(tmp_path, **changes)
    with pytest.raises(InputError, match=re.escape(problem)):
        classify.load_classifier(path)


# ---------------------------------------------------------------------- the CLIs

@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, sample_tsv):
    """python finetune.py, 1 epoch, batches of 8, on the test model: (flags, out, stdout);
    the reference of the runs under torchrun."""
    out = tmp_path_factory.mktemp("one-process")
    flags = ["--data", sample_tsv, "--weights", MINI_WEIGHTS, "--epochs", "1",
             "--batch-size", "8", "--device", "cpu"]
    return flags, out, output(run("finetune.py", *flags, "--out", out,
                                  env={"OMP_NUM_THREADS": "1"}))


def test_finetune_then_classify_on_the_command_line(one_process_run, cli):
    _, out, stdout = one_process_run
    for line in ["10 training batches", "2 validation batches", "3 test batches",
                 "Ep 1 (Step 000000): Train loss"]:
        assert line in stdout
    assert re.search(r"Training accuracy: \d+\.\d\d% \| Validation accuracy: \d+\.\d\d%", stdout)
    assert re.search(r"Training completed in \d+\.\d\d minutes\.", stdout)
    assert re.search(r"Test accuracy: \d+\.\d\d%", stdout)
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy-plot.svg", "loss-plot.svg", "metrics.json", "pr-plot.svg",
        "reliability-plot.svg", "review_classifier.safetensors", "roc-plot.svg", "test.csv",
        "train.csv", "validation.csv"]
    calibration = json.loads((out / "metrics.json").read_text())["calibration"]
    assert calibration["val_nll_after"] <= calibration["val_nll_before"]
    assert calibration["threshold"] is None and calibration["target_fpr"] == 0.01  # 8 ham:
    assert "not spam message(s), fewer than 20: no threshold for --target-fpr" in stdout
    assert re.search(r"Test ECE \(15 bins\): \d\.\d{3} before, \d\.\d{3} after", stdout)
    checkpoint = out / "review_classifier.safetensors"
    lines = output(run("classify.py", "--checkpoint", checkpoint, SPAM_TEXT, "hi there"))
    lines = lines.splitlines()
    assert len(lines) == 2 and re.match(r"(spam|not spam)\tP\(spam\)=0\.\d{3}\t", lines[0])
    results = [json.loads(line) for line in output(run(
        "classify.py", "--checkpoint", checkpoint, "--json", "-",
        stdin="first message\n\nsecond 😀\n" + "long " * 4000 + "\n")).splitlines()]
    assert [r["text"][:6] for r in results] == ["first ", "", "second", "long l"]
    assert results[1] == {"text": "", "error": bstream.BLANK}
    for blank in ["", "   "]:
        code, stdout, stderr = cli("classify.py", "--checkpoint", checkpoint, blank)
        assert code == 1 and "empty or only whitespace" in stderr


def flag_cases(script, cases):
    return [(script, flags, message) for flags, message in cases]


@pytest.mark.parametrize("script, flags, message", flag_cases("finetune.py", [
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--lr=-1e-5"], "--lr: must be a positive number"),
    (["--max-length", "5000"], "--max-length 5000 is above the model's context length 1024"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--seed=-1"], "--seed: must be between 0 and 4294967295"),
    (["--seed", "4294967296"], "--seed: must be between 0 and 4294967295"),
    (["--cache-memory", "-1"], "use auto, 0 (no cache) or a number with B, KB, MB, GB"),
    (["--cache-memory", "lots"], "'lots' is not a size: use auto, 0 (no cache)"),
    (["--cache-memory", "5XB"], "'5XB' is not a size: use auto, 0 (no cache)"),
    (["--lora-rank", "4"], "--lora-rank and --lora-alpha go with --trainable lora"),
    (["--target-fpr", "1"], "--target-fpr: must be a rate from 0 up to (not including) 1"),
    (["--target-fpr=-0.1"], "--target-fpr: must be a rate from 0 up to (not including) 1"),
    (["--target-fpr", "often"], "--target-fpr: "),
    (["--precision", "fp64"], "argument --precision: invalid choice: 'fp64'"),
]) + flag_cases("bench.py", [
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--modes", "plain,fast"], "--modes: unknown mode 'fast'"),
    (["--model", "gpt3"], "invalid choice: 'gpt3'"),
    (["--data", "no-such-file.tsv"], "--data: no file at no-such-file.tsv"),
    (["--json", "no-such-folder/bench.json"], "--json: no folder no-such-folder"),
    (["--explain", "c.safetensors", "--beyond"], "--explain measures its checkpoint only"),
    (["--precision", "fp32,fp64"], "--precision: unknown precision 'fp64'"),
    (["--precision", "fp32,fp16"], "--precision fp16 does not run on --device cpu here"),
    (["--beyond", "--precision", "bf16"], "--beyond with every mode also makes its budget"),
    (["--torchrun", "--beyond"], "--torchrun measures the default mode's cache fill only"),
    (["--torchrun", "--precision", "fp32,bf16"], "--torchrun measures one precision"),
    (["--beyond", "--quick"], "--beyond makes its own runs, of 1 and 5 epochs: it takes no"),
    (["--seeds", ""], "argument --seeds: '' is not an integer"),
    (["--seeds", "123,abc"], "argument --seeds: 'abc' is not an integer"),
    (["--seeds", "123,124,123"], "argument --seeds: give two or more different seeds"),
    (["--seeds", "123"], "argument --seeds: give two or more different seeds"),
    (["--seeds=-1,123"], "argument --seeds: must be between 0 and 4294967295, got -1"),
    (["--seeds", "123,4294967296"], "argument --seeds: must be between 0 and 4294967295"),
    (["--seeds", "123,124", "--modes", "plain"], "--seeds repeats one fine-tune"),
    (["--", "--lr", "1e-3"], "finetune.py flags such as --lr go with --seeds"),
    (["--seeds", "123,124", "--", "--lr", "fast"], "after --: argument --lr: 'fast' is not"),
    (["--seeds", "123,124", "--", "--seed", "5"], "after --: bench.py sets each run's --seed"),
]) + flag_cases("classify.py", [
    (["--serve", "hello"], "--serve takes no TEXT"),
    (["--serve", "--explain"], "--serve takes no"),
    (["--port", "70000", "hello"], "'70000' is not a port"),
    (["--explain-method", "gradient", "hi"], "--explain-method goes with --explain"),
    (["--explain-method", "shap", "hi"], "invalid choice: 'shap'"),
    (["--precision", "half", "text"], "invalid choice: 'half'"),
]))
def test_bad_flags_are_one_argparse_error_before_anything_runs(
        script, flags, message, tmp_path, sample_tsv, cli):
    before = {"finetune.py": ["--data", sample_tsv, "--weights", "random", "--out",
                              tmp_path / "out"],
              "classify.py": ["--checkpoint", tmp_path / "none"], "bench.py": []}[script]
    code, stdout, stderr = cli(script, *before, *flags)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert stderr.count("error:") == 1 and stdout == "" and not (tmp_path / "out").exists()


def test_finetune_without_network_or_local_files_names_what_is_missing(
        tmp_path, sample_tsv, cli):
    code, _, stderr = cli("finetune.py", "--weights", "random", cwd=tmp_path, env=OFFLINE)
    assert code == 1 and "SMS Spam Collection" in stderr and "--data PATH" in stderr
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.glob("sms_spam_collection*"))
    code, _, stderr = cli("finetune.py", "--data", sample_tsv, cwd=tmp_path, env=OFFLINE)
    assert code == 1 and "gpt2-small weights" in stderr and "--weights PATH" in stderr
    assert not list(tmp_path.glob("gpt2/124M/*"))


def test_ctrl_c_during_fine_tuning_says_what_was_saved_and_keeps_the_checkpoint(
        tmp_path, sample_tsv):
    out = tmp_path / "run"
    out.mkdir()
    (out / classify.CHECKPOINT_NAME).write_bytes(b"an earlier checkpoint")
    process = subprocess.Popen(
        [sys.executable, "-u", "finetune.py", "--data", str(sample_tsv), "--weights",
         str(MINI_WEIGHTS), "--epochs", "500", "--out", str(out)],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell that starts a job in the background has it ignore SIGINT, and
        # children inherit that: give Ctrl-C its default meaning again
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith("Ep 1 (Step 000000)"):
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert "interrupted during training" in stderr and "is unchanged" in stderr
    assert (out / classify.CHECKPOINT_NAME).read_bytes() == b"an earlier checkpoint"


def test_bad_paths_and_files_are_one_line_errors_found_before_anything_is_written(
        tmp_path, sample_tsv, cli):
    a_file, out = tmp_path / "file.txt", tmp_path / "out"
    a_file.write_text("x")
    broken = tmp_path / "cut.safetensors"
    broken.write_bytes(MINI_WEIGHTS.read_bytes()[:5000])  # header intact, data cut
    tsv = tmp_path / "d.tsv"
    tsv.write_text(sample_tsv.read_text(encoding="utf-8") + "spam\t\n", encoding="utf-8")
    for flags, code, message in [
            (["--data", sample_tsv, "--out", a_file], 2, f"--out {a_file} is a file"),
            (["--data", tmp_path, "--out", out], 1, f"data file {tmp_path} is a folder"),
            (["--data", sample_tsv, "--weights", tmp_path, "--out", out], 1,
             f"weights folder {tmp_path} has neither a model.safetensors nor OpenAI's"),
            (["--data", sample_tsv, "--weights", broken, "--out", out], 1, "truncated"),
            (["--data", tsv, "--out", out], 1, f"{tsv}, line 121: the message is empty")]:
        # the last --weights counts; "Dataset" is printed once the data is read
        returned, stdout, stderr = cli("finetune.py", "--weights", MINI_WEIGHTS, *flags)
        assert returned == code and message in stderr and "Dataset" not in stdout
        assert not out.exists()
    for flags, message in [(["--checkpoint", tmp_path, "hello"], f"{tmp_path} is a folder"),
                           (["hello"], "python finetune.py")]:  # none in the working folder
        code, _, stderr = cli("classify.py", *flags, cwd=tmp_path)
        assert code == 1 and message in stderr


def test_progress_shows_on_a_terminal_never_in_a_pipe_and_a_pipe_closed_early_is_no_error(
        tmp_path):
    checkpoint = save_tiny(tmp_path / "c.safetensors")
    stdin = "".join(f"message {i}\n" for i in range(300))
    (tmp_path / "messages.txt").write_text(stdin)  # a file: all 300 lines arrive at once
    command = [sys.executable, "classify.py", "--checkpoint", str(checkpoint), "-"]
    master, terminal = pty.openpty()
    with open(tmp_path / "messages.txt") as messages:
        done = subprocess.run(command, cwd=HERE, stdin=messages, stdout=subprocess.PIPE,
                              stderr=terminal, text=True, timeout=120)
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):  # raised once the other end is closed and drained
        while chunk := os.read(master, 65536):
            shown += chunk
    os.close(master)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 300
    assert b"classifying, messages: 32/300" in shown and b"left" in shown
    assert shown.endswith(b"\r\x1b[K")  # the line is cleared at the end
    code, stdout, stderr = run(*command[1:], stdin=stdin)
    assert code == 0 and "classifying" not in stderr + stdout and "\r" not in stderr + stdout
    messages = tmp_path / "many.txt"  # into a pipe closed early: no traceback
    messages.write_text("".join(f"message number {i} about a prize\n" for i in range(4000)))
    done = subprocess.run(
        f'"{sys.executable}" classify.py --checkpoint "{checkpoint}" - < "{messages}" | head -1',
        shell=True, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert done.stdout.count("\n") == 1 and "message number 0" in done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def read_lines_within(pipe, count, seconds=120):
    """count lines from an unbuffered pipe; fails if they have not all come
    after `seconds`, a bound only a program waiting for more input misses."""
    data, deadline = b"", time.monotonic() + seconds
    while data.count(b"\n") < count:
        ready, _, _ = select.select([pipe], [], [], max(0, deadline - time.monotonic()))
        assert ready, f"only these lines came while the input paused: {data!r}"
        chunk = os.read(pipe.fileno(), 65536)
        assert chunk, f"the output ended after {data!r}"
        data += chunk
    return data.decode().splitlines()


def test_a_stream_gets_a_line_per_line_in_order_as_soon_as_the_input_pauses(tmp_path):
    """More than a chunk (bstream.CHUNK messages) at once, then a blank line, one of
    whitespace and one not UTF-8: all answered while the pipe stays open."""
    checkpoint = save_tiny(tmp_path / "c.safetensors")
    texts = [f"message {i} " + "word " * (i % 7) for i in range(bstream.CHUNK + 30)]
    process = subprocess.Popen(
        [sys.executable, "classify.py", "--checkpoint", str(checkpoint), "--json", "-"],
        cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        bufsize=0)
    try:
        process.stdin.write("".join(t + "\n" for t in texts).encode()
                            + b"\n \t\r\ncaf\xe9 \xff\xfe\n")
        first = [json.loads(line) for line in read_lines_within(process.stdout, len(texts) + 3)]
        process.stdin.write(b"last, with no line end")  # and the pipe stays open till now
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert [r["text"] for r in first] == texts + ["", " \t", "caf\ufffd \ufffd\ufffd"]
    assert first[-3] == {"text": "", "error": bstream.BLANK} == dict(first[-2], text="")
    assert set(first[-1]["probabilities"]) == {"not spam", "spam"}
    assert json.loads(stdout)["text"] == "last, with no line end"
    assert stderr.decode().splitlines() == [f"note: line {len(texts) + 3} of stdin is not UTF-8: "
                                            "its undecodable bytes are classified as U+FFFD."]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_closed_or_full_stdout_is_one_error(tmp_path, monkeypatch):
    checkpoint = save_tiny(tmp_path / "c.safetensors", ["a", "b"])
    monkeypatch.setattr(sys, "stdout", None)  # what Python makes of >&-
    with pytest.raises(InputError, match="stdout is closed: there is nowhere to print"):
        classify.main(["--checkpoint", str(checkpoint), "hello"])
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        with pytest.raises(InputError, match="cannot write the results to stdout: No space"):
            classify.main(["--checkpoint", str(checkpoint), "hello"])


def test_control_characters_are_escaped_and_an_argument_not_utf8_gets_replacements(
        tmp_path, cli):
    labels = ["\x1b[31mred", "two\nlines"]
    checkpoint = save_tiny(tmp_path / "c.safetensors", labels)
    _, printed, _ = cli("classify.py", "--checkpoint", checkpoint, "--all", "a\tb\rc\x85")
    assert printed.count("\n") == 1 and "\x1b" not in printed and "\r" not in printed
    columns = printed.rstrip("\n").split("\t")
    assert columns[0] in ("\\x1b[31mred", "two\\nlines") and columns[2] == "a\\tb\\rc\\x85"
    assert re.fullmatch(r"P\(\\x1b\[31mred\)=0\.\d{3}  P\(two\\nlines\)=0\.\d{3}", columns[1])
    # how Python hands over the argument bytes b"\xff win": a lone surrogate
    code, out, err = cli("classify.py", "--checkpoint", checkpoint, "--json", "\udcff win")
    result = json.loads(out)
    assert (code, result["text"], set(result["probabilities"])) == (0, "\ufffd win", set(labels))
    assert err == "note: TEXT 1 is not UTF-8: its undecodable bytes are classified as U+FFFD.\n"


def test_nan_logits_or_explanations_are_an_error_naming_the_checkpoint_never_an_answer(
        tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "broken.safetensors"
    model = tiny_classifier()
    with torch.no_grad():
        model.gpt.out_head.weight[1, 0] = float("nan")
    save_tiny(checkpoint, model=model)
    with pytest.raises(InputError, match="logits are not all finite") as error:
        classify.main(["--checkpoint", str(checkpoint), "--json", "hello"])
    assert str(error.value).startswith(f"{checkpoint}: ") and capsys.readouterr().out == ""
    model, info = classify.load_classifier(checkpoint)
    with serving(classify=bserve.classifier(model, info, "cpu", checkpoint,
                                            gpt.get_tokenizer())) as (_, url):
        status, _, body = request(url, "POST", "/classify", '{"texts": ["hello"]}')
    answer = json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert status == 500 and answer["error"].startswith("broken.safetensors: its logits")
    # finite logits, but scores that overflow (weights out of range): no NaN printed either
    monkeypatch.setattr(bstream, "explain_texts", lambda texts, *args: [
        [{"token": text, "score": math.nan}] for text in texts])
    checkpoint = save_tiny(tmp_path / "fine.safetensors")
    with pytest.raises(InputError, match="explanation's scores are not all finite numbers"):
        classify.main(["--checkpoint", str(checkpoint), "--json", "--explain", "hello"])
    assert capsys.readouterr().out == ""


def test_the_tokenizer_and_bench_children_fall_back_to_the_repositorys_files_offline(
        tmp_path, monkeypatch):
    out = output(run("-c", "import gpt, os; print(gpt.get_tokenizer().encode('Hello world'), "
                           "os.environ['TIKTOKEN_CACHE_DIR'])",
                     env=dict(OFFLINE, TIKTOKEN_CACHE_DIR=str(tmp_path))))
    assert out.split() == ["[15496,", "995]", str(tmp_path)]  # the setting is left as it was
    assert not list(tmp_path.iterdir())
    # bench.py's import timing child once died offline: tiktoken itself only downloads
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    for name, value in dict(OFFLINE, TMPDIR=str(tmp_path)).items():  # tiktoken's cache: empty
        monkeypatch.setenv(name, value)
    assert "Traceback" not in bench.run_child(bench.IMPORTS, tmp_path / "log.txt")[2]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # a setting of one's own is kept
    with pytest.raises(InputError, match=r"^python -c .* failed \(exit status 1\): "):
        bench.run_child(bench.IMPORTS, tmp_path / "log.txt")


# ------------------------------------------- beyond the chapter: own data, LoRA, metrics

def three_class_tsv(path, per_class=30):
    topics = {"sports": "the team won the match with a late goal number {}",
              "politics": "the minister announced a new election law, vote {}",
              "tech": "the new laptop chip runs faster than model {}"}
    lines = [f"{label}\t{template.format(i)}\n" for label, template in topics.items()
             for i in range(per_class)]
    lines.append("tech\tone extra message so the classes start unbalanced\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_own_labels_become_sorted_class_ids_and_a_three_class_run_takes_every_flag(
        tmp_path, capsys, monkeypatch, cli):
    tsv = three_class_tsv(tmp_path / "topics.tsv")
    rows = data.load_messages(tsv)
    assert blabels.class_ids(rows) == {"politics": 0, "sports": 1, "tech": 2}
    assert data.class_names(blabels.class_ids(rows)) == ["politics", "sports", "tech"]
    assert blabels.count_labels(blabels.balance_classes(rows, 123)) == {
        "politics": 30, "sports": 30, "tech": 30}
    assert data.class_names({"ham": 0, "spam": 1}) == ["not spam", "spam"]
    csv_path = tmp_path / "own.csv"
    csv_path.write_text('Label,Text\npositive,"great, really"\nnegative,bad\n', encoding="utf-8")
    assert data.load_messages(csv_path) == [("positive", "great, really"), ("negative", "bad")]
    with pytest.raises(InputError, match="single class"):  # before any model is built
        blabels.class_ids([("ham", "a"), ("ham", "b")])
    with pytest.raises(InputError, match="too few"):
        data.random_split([("ham", "a"), ("spam", "b"), ("ham", "c"), ("spam", "d")], 0.7, 0.1)
    for rate in ("0.05", "0.01"):  # given, even as the default's value: refused
        with pytest.raises(InputError, match="--target-fpr is for two classes.*has 3"):
            fine_tune(tsv, tmp_path / "run", "--target-fpr", rate)  # before any training
    calls, forward = [], gpt.GPTModel.forward  # --plain: the chapter's GPTModel.forward
    monkeypatch.setattr(gpt.GPTModel, "forward", lambda self, in_idx: (
        calls.append(self.training), forward(self, in_idx))[1])
    out = tmp_path / "run"
    result = fine_tune(tsv, out, "--pool", "flexible", "--max-length", 6, "--seed", 7, "--plain",
                       "--no-balance", "--trainable", "last_two_blocks", "--batch-size", 4,
                       "--epochs", 1)
    printed = capsys.readouterr().out
    assert "Confusion matrix" in printed and "Naive Bayes baseline" in printed
    assert "Caching" not in printed and "Balanced" not in printed
    assert "Longest training sequence (max_length): 6 tokens" in printed
    batches = int(re.search(r"^(\d+) training batches$", printed, re.M)[1])
    assert sum(calls) == batches > 0  # in training mode: once per step of the one epoch
    assert len(calls) > batches  # and in eval mode for every evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["politics", "sports", "tech"]
    assert metrics["model"] == f"{MINI_WEIGHTS} (2 layers, emb_dim 16)"  # not --model's name
    assert len(metrics["test_confusion_matrix"]) == 3
    assert sum(map(sum, metrics["test_confusion_matrix"])) == 91 - int(91 * 0.7) - int(91 * 0.1)
    assert metrics["test_accuracy"] == result["test_accuracy"]
    assert set(metrics["test_per_class"]["tech"]) == {"precision", "recall", "f1", "support"}
    label_ids = blabels.class_ids(rows)  # no balancing, split with seed 7
    expected = data.random_split(rows, 0.7, 0.1, seed=7)[0]
    assert data.read_csv(out / "train.csv", 3) == [(label_ids[l], t) for l, t in expected]
    assert expected != data.random_split(rows, 0.7, 0.1)[0]
    _, metadata = bst.read_safetensors_header(out / CHECKPOINT)
    assert (metadata["pool"], metadata["max_length"]) == ("flexible", "6")
    assert metadata["trainable"] == "last_two_blocks"
    assert classify.load_classifier(out / CHECKPOINT)[0].pool == "flexible"
    printed = output(cli("classify.py", "--checkpoint", out / CHECKPOINT, "--all",
                         "the striker scored a goal in the match"))
    assert re.match(r"(politics|sports|tech)\tP\(politics\)=0\.\d{3}  P\(sports\)=0\.\d{3}  "
                    r"P\(tech\)=0\.\d{3}\t", printed)


CHECKPOINT = classify.CHECKPOINT_NAME


def test_per_class_metrics_and_naive_bayes_which_gets_285_of_the_chapters_300_test_messages(
        chapter_splits):
    metrics = bmetrics.per_class_metrics([[8, 2], [1, 9]], ["not spam", "spam"])
    assert metrics["spam"]["precision"] == pytest.approx(9 / 11)
    assert metrics["spam"]["recall"] == pytest.approx(0.9)
    assert metrics["spam"]["f1"] == pytest.approx(2 * (9 / 11) * 0.9 / (9 / 11 + 0.9))
    assert metrics["not spam"]["support"] == 10
    assert bmetrics.per_class_metrics([[0, 0], [0, 3]], ["a", "b"])["a"]["f1"] == 0.0
    train = [(1, "WIN cash now"), (1, "free cash prize"), (0, "see you at lunch"),
             (0, "lunch at noon?")]
    model = bmetrics.fit_naive_bayes(train)
    assert bmetrics.predict_naive_bayes(model, "cash prize now") == 1
    assert bmetrics.predict_naive_bayes(model, "lunch today") == 0
    assert bmetrics.naive_bayes_accuracy(model, train) == 1.0
    as_ids = [[(data.SPAM_LABELS[l], t) for l, t in split] for split in chapter_splits]
    model = bmetrics.fit_naive_bayes(as_ids[0])  # 285 of the chapter's 300 test messages:
    assert bmetrics.naive_bayes_accuracy(model, as_ids[2]) == 285 / 300


def test_lora_starts_at_the_base_model_and_trains_only_adapters_and_head():
    torch.manual_seed(0)
    base = gpt.GPTModel(TINY_CONFIG)
    ids = torch.randint(0, 50000, (2, 8))
    with torch.no_grad():
        hidden = base.final_norm(base.trf_blocks(bfast.embed(base, ids)))
    finetune.prepare_for_classification(base, 2, trainable="lora", lora_rank=4, lora_alpha=8)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n or n.startswith("out_head.") for n in trainable)
    assert sum(".lora.A" in n for n in trainable) == 2 * 6  # 6 Linear layers per block
    with torch.no_grad():
        assert torch.allclose(base.final_norm(base.trf_blocks(bfast.embed(base, ids))), hidden)
    assert not bfast.GPTClassifier(base).enable_prefix_cache()
    layer = blora.LoRALayer(3, 5, rank=2, alpha=4)
    with torch.no_grad():
        layer.B.fill_(1.0)
    x = torch.randn(1, 3)
    assert torch.allclose(layer(x), 2.0 * (x @ layer.A @ layer.B))  # alpha / rank = 2


def test_a_lora_fine_tune_starts_alike_from_each_form_keeps_adapters_and_finds_its_base_moved(
        tmp_path, capsys, cli):
    base = tmp_path / "base" / "model.safetensors"  # a copy of the Hub's files, moved below
    shutil.copytree(MINI, base.parent)
    data, printed = three_class_tsv(tmp_path / "t.tsv", per_class=6), {}
    for weights in (MINI_TF, MINI_BOOK, base):  # their weights are equal (above)
        fine_tune(data, tmp_path / weights.name, "--trainable", "lora", "--lora-rank", "4",
                  "--lora-alpha", "8", "--epochs", "1", "--batch-size", "4", "--no-baseline",
                  weights=weights)
        printed[weights] = capsys.readouterr().out
        checkpoint = tmp_path / weights.name / CHECKPOINT
        lora = json.loads(bst.read_safetensors_header(checkpoint)[1]["lora"])
        assert lora["path"] == str(bweights.weights_file(weights).resolve())
        classify.load_classifier(checkpoint)  # the base rebuilt from the same file
    assert "Ep 1 (Step 000000): Train loss" in printed[base] and "Naive" not in printed[base]
    assert len({tuple(chapter_lines(out)) for out in printed.values()}) == 1
    assert bweights.weights_file(MINI_TF) == MINI_TF / "model.ckpt.data-00000-of-00001"
    entries, metadata = bst.read_safetensors_header(checkpoint)  # the Hub copy's
    assert entries and all(".lora." in n or n.startswith("out_head.") for n in entries)
    lora = json.loads(metadata["lora"])
    assert (lora["rank"], lora["alpha"]) == (4, 8.0)
    assert (lora["bytes"], lora["sha256"]) == (1693464, hashlib.sha256(
        MINI_WEIGHTS.read_bytes()).hexdigest())
    loaded, info = classify.load_classifier(checkpoint)
    assert info["labels"] == ["politics", "sports", "tech"]
    ids = torch.tensor([[101, 102, 103, 104]])
    with torch.no_grad():
        before = loaded(ids)
        assert torch.equal(classify.load_classifier(checkpoint)[0](ids), before)
        assert loaded.gpt.trf_blocks[0].att.W_query.lora.B.abs().sum() > 0  # trained
    moved = tmp_path / "elsewhere.safetensors"  # without its config.json
    base.rename(moved)
    with pytest.raises(InputError, match=r"does not exist: pass the file it was fine-tuned on "
                                         r"with --base-weights PATH \(1,693,464 bytes"):
        classify.load_classifier(checkpoint)
    with torch.no_grad():
        assert torch.equal(classify.load_classifier(checkpoint, base_weights=moved)[0](ids),
                           before)
    changed = bytearray(moved.read_bytes())
    changed[-1] ^= 1  # one bit of the last weight
    moved.write_bytes(bytes(changed))
    code, _, stderr = cli("classify.py", "--checkpoint", checkpoint, "--base-weights", moved,
                          "a goal in the match")
    assert code == 1 and f"{moved} is not the base {checkpoint} was fine-tuned on" in stderr
    assert set(re.findall(r"--[a-z-]+", stderr)) == {"--base-weights"}  # classify.py's only
    plain = save_tiny(tmp_path / "plain.safetensors")
    with pytest.raises(InputError, match="--base-weights is only for checkpoints of "
                                         "--trainable lora"):
        classify.load_classifier(plain, base_weights=moved)


def test_a_lora_base_is_hashed_once_and_one_that_cannot_be_found_names_base_weights(
        tmp_path, monkeypatch):
    checkpoint = save_lora_checkpoint(tmp_path / "lora.safetensors", weights="pretrained",
                                      path=str(tmp_path / "gone" / "model.safetensors"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bdownload, "HUB_URL", "http://127.0.0.1:9/{}")
    monkeypatch.setattr(bdownload, "OPENAI_URL", "http://127.0.0.1:9/{size}/{file}")
    with pytest.raises(InputError) as error:
        classify.load_classifier(checkpoint)
    assert "could not download the gpt2-small weights" in str(error.value)
    assert set(re.findall(r"--[a-z-]+", str(error.value))) == {"--base-weights"}
    assert not (tmp_path / "gpt2").exists()
    hashed = []  # a base that is found is hashed once
    monkeypatch.setattr(blora, "file_fingerprint",
                        lambda path: hashed.append(path) or bdownload.file_fingerprint(path))
    model, _ = classify.load_classifier(save_lora_checkpoint(checkpoint))
    assert hashed == [MINI_WEIGHTS]
    wte = bst.load_safetensors(MINI_WEIGHTS)[0]["wte.weight"]
    assert torch.equal(model.gpt.tok_emb.weight, wte.float())


@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_every_model_size_composes_with_every_trainable_choice(name):
    config = gpt.model_config(name)
    for trainable in btrainable.TRAINABLE:
        with torch.device("meta"):  # shapes only: no memory, no time
            model = finetune.prepare_for_classification(gpt.GPTModel(config), 3,
                                                        trainable=trainable)
        classifier = bfast.GPTClassifier(model, pool="flexible")
        cached = classifier.enable_prefix_cache()
        assert model.out_head.weight.shape == (3, config["emb_dim"])
        assert cached == (trainable not in ("all", "lora"))
        if cached:
            expected = {"last_layer": 0, "last_block": 1, "last_two_blocks": 2}[trainable]
            assert classifier.n_cached == config["n_layers"] - expected


# ------------------------------------------------------ classify.py --serve, a page to try it

def start_server(checkpoint, *flags):
    """classify.py --serve on a free port: (process, base URL)."""
    process = subprocess.Popen(
        [sys.executable, "classify.py", "--serve", "--port", "0", "--checkpoint",
         str(checkpoint), *map(str, flags)], cwd=HERE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Serving "):
            return process, re.search(r"(http://\S+/)", line)[1].rstrip("/"), lines
    process.kill()
    raise AssertionError("".join(lines) + process.stderr.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = save_tiny(tmp_path_factory.mktemp("serve") / "c.safetensors")
    process, url, _ = start_server(checkpoint)
    yield url, checkpoint
    process.kill()
    process.wait()


def request(url, method, path, body=None, headers=None):
    """(status, headers, body) of one request sent by http.client as given (never
    through a proxy): a Host header in `headers` replaces the one it would send."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.request(method, path, body, {"Content-Type": "application/json",
                                                **(headers or {})})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def test_served_page_info_head_and_classify_match_the_checkpoint_and_command_line(server, cli):
    url, checkpoint = server
    status, headers, page = request(url, "GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<textarea id="texts"' in page and b'<button id="go">' in page
    assert b"<script src" not in page and b"<link" not in page  # nothing from elsewhere
    assert request(url, "GET", "/?from=a-bookmark")[::2] == (200, page)
    status, _, body = request(url, "GET", "/info")
    assert status == 200 and json.loads(body) == {
        "checkpoint": checkpoint.name, "labels": ["not spam", "spam"], "model": "a custom size",
        "layers": 2, "emb_dim": 16, "max_length": 20, "pool": "last", "trainable": "last_block"}
    port = int(url.rsplit(":", 1)[1])
    for path, status, header in [("/", 200, f"Content-Length: {len(page)}\r\n"),
                                 ("/info", 200, "Content-Length: "),
                                 ("/classify", 405, "Allow: POST")]:
        answer = exchange(("127.0.0.1", port),
                          f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")  # the headers of GET, no body
        assert head.startswith(f"HTTP/1.0 {status} ".encode()) and body == b"", answer
        assert header.encode() in head + b"\r\n"
    texts = [SPAM_TEXT, "see you at lunch?", "😀 日本語", "long " * 300]
    status, _, body = request(url, "POST", "/classify", json.dumps({"texts": texts}))
    stdout = output(cli("classify.py", "--checkpoint", checkpoint, "--json", *texts))
    assert (status, json.loads(body)["results"]) == (200, [json.loads(line)
                                                           for line in stdout.splitlines()])
    status, _, body = request(url, "POST", "/classify", json.dumps({"texts": ["win a prize"],
                                                                     "explain": True}))
    result = json.loads(body)["results"][0]
    assert status == 200 and "".join(p["token"] for p in result["explanation"]) == "win a prize"
    status, _, body = request(url, "POST", "/classify", json.dumps({"texts": ["x"] * 17}))
    assert status == 200 and "explanation" not in json.loads(body)["results"][0]


@pytest.mark.parametrize("path, method, body, status, error", [
    ("/classify", "POST", "{not json", 400, "not JSON"),
    ("/classify", "POST", '["a list"]', 400, '{"texts": ['),
    ("/classify", "POST", '{"texts": "one string"}', 400, '{"texts": ['),
    ("/classify", "POST", '{"texts": []}', 400, "at least one text"),
    ("/classify", "POST", '{"texts": ["ok", 7]}', 400, "texts[1] is not a string"),
    ("/classify", "POST", '{"texts": ["ok", "  \\n"]}', 400, "texts[1] is empty"),
    ("/classify", "POST", json.dumps({"texts": ["x"] * 1001}), 413, "at most 1,000"),
    ("/classify", "POST", json.dumps({"texts": ["y" * 1_000_001]}), 413, "at most 1,000,000"),
    ("/classify", "POST", b"\xff\xfe", 400, "not JSON"),
    ("/classify", "POST", json.dumps({"texts": ["x"] * 17, "explain": True}), 413, "at most 16"),
    ("/classify", "POST", json.dumps({"texts": ["x"], "explain": "yes"}), 400, "explain"),
    ("/classify", "POST", '{"texts": ["x"], "n": ' + "9" * 5000 + "}", 400,
     "not JSON this server reads: a number of 5,000 characters"),
    ("/classify", "POST", '{"texts": ["x"], "n": ' + "[" * 33 + "]" * 33 + "}", 400,
     "nested more than 32 levels deep"),
    pytest.param("/classify", "POST", '{"texts": ' + "[" * 100_000 + "]" * 100_000 + "}", 400,
                 "not JSON", id="nested-100000-deep"),
    ("/nothing", "GET", None, 404, "no such page: /nothing"),
    ("/../classify.py", "GET", None, 404, "no such page"),
    ("/classify", "GET", None, 405, "/classify takes POST"),
    ("/", "POST", "{}", 405, "/ takes GET"),
    ("/classify", "PUT", "{}", 405, "/classify takes POST"),
    ("/info", "DELETE", None, 405, "/info takes GET"),
])
def test_a_bad_request_gets_its_status_and_the_server_keeps_serving(
        server, path, method, body, status, error):
    url, _ = server
    got, headers, answer = request(url, method, path, body)
    assert (got, headers["Content-Type"]) == (status, "application/json; charset=utf-8")
    assert error in json.loads(answer)["error"]
    got, _, answer = request(url, "POST", "/classify", '{"texts": ["still here"]}')
    assert got == 200 and json.loads(answer)["results"][0]["text"] == "still here"


def test_a_hundred_concurrent_requests_succeed_and_each_oversized_body_gets_413(server):
    url, _ = server

    def ask(i):
        status, _, body = request(url, "POST", "/classify", json.dumps({"texts": [f"m {i}"]}))
        return status, json.loads(body)["results"][0]["text"]

    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(ask, range(100)))
    assert answers == [(200, f"m {i}") for i in range(100)]
    for size in [1_100_000] * 10 + [12_000_000]:  # 12 MB: more than the sockets buffer
        body = json.dumps({"texts": ["z" * size]})
        assert request(url, "POST", "/classify", body)[::2] == (
            413, f'{{"error": "the body has {len(body):,} bytes; at most 1,000,000"}}'.encode())


def test_a_burst_of_connections_waits_in_the_listen_queue_and_one_over_the_cap_gets_503():
    server = bserve.make_server("127.0.0.1", 0, echo, {})
    # connected before the server accepts any: each waits in the kernel's queue
    clients = [socket.create_connection(server.server_address, timeout=60) for _ in range(100)]
    with serving(server):
        for client in clients:
            client.sendall(b"GET /info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for client in clients:
            with client:
                assert client.makefile("rb").readline() == b"HTTP/1.0 200 OK\r\n"
    # over the cap of connections: a 503
    with serving(timeout=60, max_connections=1) as (server, url), socket.create_connection(
            server.server_address, timeout=60):
        status, headers, body = request(url, "GET", "/info")  # behind the silent one
        assert status == 503 and "try again" in json.loads(body)["error"]


def test_serve_stops_on_ctrl_c_and_a_port_in_use_is_one_error(tmp_path, cli):
    checkpoint = save_tiny(tmp_path / "c.safetensors", ["a", "b"])
    process, url, printed = start_server(checkpoint, "--host", "0.0.0.0")
    assert "note: listening on 0.0.0.0, not only on this machine" in printed[0]
    assert request(url.replace("0.0.0.0", "127.0.0.1"), "GET", "/info")[0] == 200
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and stderr.strip() == "stopped."
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, stderr = cli("classify.py", "--serve", "--port", port, "--checkpoint",
                              checkpoint)
    assert code == 1 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert f"error: cannot listen on 127.0.0.1 port {port}" in stderr and "--port" in stderr


def echo(texts, explain=False, between=None):
    """A stand-in for the model in servers that test the HTTP side."""
    return [{"text": text, "label": "a", "probabilities": {"a": 1.0}} for text in texts]


@contextlib.contextmanager
def serving(server=None, classify=echo, host="127.0.0.1", info=None, **options):
    """server (by default a bserve.make_server server of classify on host, made with
    options) served from a thread: (server, its URL)."""
    if server is None:
        server = bserve.make_server(host, 0, classify, info or {}, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = server.server_address[0]
    try:
        yield server, (f"http://[{host}]:{server.server_port}" if ":" in host else
                       f"http://{host}:{server.server_port}")
    finally:
        server.server_close()
        thread.join()


def test_the_server_refuses_what_another_site_makes_a_browser_send(server):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    good = '{"texts": ["hi"]}'
    for host in [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST.",
                 "127.0.0.1:1234"]:  # a tunnel or port mapping changes the port
        assert request(url, "POST", "/classify", good, {"Host": host})[0] == 200, host
    for host in [f"rebind.example:{port}", f"127.0.0.1.nip.io:{port}", "", "[::1"]:
        for method, path, body in [("GET", "/info", None), ("POST", "/classify", good)]:
            status, _, answer = request(url, method, path, body, {"Host": host})
            assert status == 403 and "does not name this server" in json.loads(answer)["error"]
    for origin in ["http://evil.example", "null", f"http://localhost:{port}"]:
        status, _, answer = request(url, "POST", "/classify", good, {"Origin": origin})
        assert (status, json.loads(answer)["error"]) == (
            403, f"a page of {origin} may not use this server")
    assert request(url, "POST", "/classify", good, {"Origin": url})[0] == 200
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]:
        status, _, answer = request(url, "POST", "/classify", good,
                                    {"Content-Type": content_type})
        assert status == 415 and "application/json" in json.loads(answer)["error"]
    assert request(url, "POST", "/classify", good,
                   {"Content-Type": "application/json; charset=utf-8"})[0] == 200
    status, headers, page = request(url, "GET", "/")
    policy = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    script = re.search(rb"<script>(.*?)</script>", page, re.S)[1]
    digest = "sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode()
    assert f"script-src '{digest}';" in policy and "default-src 'none'" in policy
    assert (headers["X-Content-Type-Options"], headers["X-Frame-Options"]) == ("nosniff", "DENY")


def exchange(address, raw):
    """The whole answer to the raw bytes of a request: the server closes after one."""
    answer = b""
    with socket.create_connection(address, timeout=60) as client:
        client.sendall(raw)
        while chunk := client.recv(65536):
            answer += chunk
    return answer


def test_a_silent_client_is_dropped_after_the_timeout_while_others_are_served():
    with serving(timeout=0.5) as (server, url), socket.create_connection(
            server.server_address, timeout=60) as silent:
        silent.sendall(b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        status, _, body = request(url, "POST", "/classify", '{"texts": ["meanwhile"]}')
        assert (status, json.loads(body)["results"][0]["text"]) == (200, "meanwhile")
        assert silent.recv(65536) == b""  # closed by the server, not by this 60 s bound


def test_a_client_trickling_its_request_is_cut_at_the_deadline_while_others_are_served():
    # each read waits up to 60 s, so only the whole request's deadline can end this one
    with serving(timeout=60, deadline=0.5) as (server, url), socket.create_connection(
            server.server_address, timeout=60) as trickle:
        trickle.sendall(b"POST /classify HTTP/1.1\r\n")
        cut = False
        for i in range(600):  # a header line every 0.05 s, far within the 60 s per read
            try:
                trickle.sendall(f"X-Slow-{i}: x\r\n".encode())
            except OSError:  # reset: the server has cut it
                cut = True
                break
            time.sleep(0.05)
        assert cut or trickle.recv(65536) == b""
        status, _, body = request(url, "POST", "/classify", '{"texts": ["meanwhile"]}')
        assert (status, json.loads(body)["results"][0]["text"]) == (200, "meanwhile")


@pytest.mark.parametrize("headers, status", [
    (["Content-Length: 2_3"], 400),  # int() would take it
    (["Content-Length:  23"], 200),
    (["Content-Length: 5", "Content-Length: 23"], 400),  # two different lengths
    (["Transfer-Encoding: chunked"], 411),
    (["Content-Length: " + "9" * 5000], 400),  # int() would raise
    (["Content-Length: " + "0" * 60000 + "5"], 400),  # zeros: int() would raise too
])
def test_a_body_length_is_plain_digits_and_chunked_bodies_are_refused(headers, status):
    head = "".join(f"{header}\r\n" for header in headers)
    with serving() as (server, _):
        answer = exchange(server.server_address, (
            f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{head}\r\n").encode() + b'{"texts": ["a m"]}     ')  # 23 bytes
    assert answer.split(b" ", 2)[1] == str(status).encode()


def test_the_server_listens_on_ipv6_and_a_wrong_host_is_named_not_the_port():
    with serving(host="::1", info={"labels": ["a"]}) as (_, url):
        assert request(url, "GET", "/info")[::2] == (200, b'{"labels": ["a"]}')
    with pytest.raises(InputError, match=r"^cannot listen on 192\.0\.2\.1: .*--host") as error:
        bserve.make_server("192.0.2.1", 0, echo, {})  # a documentation address: not ours
    assert "--port" not in str(error.value)


def test_clients_that_go_away_are_no_traceback_but_a_bug_is(capsys):
    def classify(texts, explain=False, between=None):
        if texts == ["bug"]:
            raise ValueError("a bug")
        return echo(texts)

    with serving(classify=classify) as (server, url):
        for end in [20, 60, 200] * 5:  # reset in the request line, the headers, the body
            with socket.create_connection(server.server_address, timeout=60) as client:
                client.sendall(b"POST /classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                               b"application/json\r\nContent-Length: 99\r\n\r\n{"[:end])
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        until(lambda: server.open == 0)
        assert request(url, "GET", "/info")[0] == 200
        assert capsys.readouterr().err == ""
        with pytest.raises(ConnectionError):  # no answer
            request(url, "POST", "/classify", '{"texts": ["bug"]}')
        assert "ValueError: a bug" in capsys.readouterr().err


def until(condition):
    """Waits for condition() to hold: up to 60 s, for a busy machine."""
    for _ in range(6000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("still not so after 60 s")


def test_a_thousand_idle_and_trickling_connections_leave_a_request_answered_within_a_second():
    # issue 26: 300 idle sockets, or 130 sending a byte now and then, once took
    # all 128 connections served at a time, and a real request got 503
    with serving(timeout=60, deadline=60) as (server, url), contextlib.ExitStack() as stack:
        if server.max_connections < 1001:  # sized from the limit on file descriptors
            pytest.skip(f"this process may open {server.max_connections} connections at a time")
        idle = [stack.enter_context(socket.create_connection(server.server_address, timeout=60))
                for _ in range(1000)]
        for client in idle[:130]:
            client.sendall(b"POST /classify HTTP/1.1\r\nX-Slow: ")
        until(lambda: server.open == 1000)
        stop = threading.Event()

        def trickle():  # a byte from each of 130 every 0.1 s
            while not stop.wait(0.1):
                for client in idle[:130]:
                    client.sendall(b"x")
        trickler = threading.Thread(target=trickle)
        trickler.start()
        try:
            start = time.monotonic()
            answer = request(url, "POST", "/classify", '{"texts": ["real"]}')
            took = time.monotonic() - start
        finally:
            stop.set()
            trickler.join()
    assert answer[0] == 200 and json.loads(answer[2])["results"][0]["text"] == "real"
    assert took < 1.0


def test_a_classification_waits_behind_one_batch_of_explanations_and_few_explanations_wait():
    batches, finish = [], threading.Event()

    def explainer(texts, explain=False, between=None):  # 0.01 s a batch until finish is set
        while explain and not finish.is_set():
            between()
            time.sleep(0.01)
            batches.append(1)
        return echo(texts)

    explain = json.dumps({"texts": ["why?"], "explain": True})
    with serving(classify=explainer) as (server, url), ThreadPoolExecutor(5) as pool:
        explaining = [pool.submit(request, url, "POST", "/classify", explain)]
        until(lambda: batches)  # one at work
        explaining += [pool.submit(request, url, "POST", "/classify", explain) for _ in range(4)]
        until(lambda: len(server.waiting[True]) == 4)  # and four wait
        start = time.monotonic()
        status, _, body = request(url, "POST", "/classify", '{"texts": ["quick"]}')
        took = time.monotonic() - start
        refused = request(url, "POST", "/classify", explain)
        finish.set()
        assert [future.result()[0] for future in explaining] == [200] * 5
    assert status == 200 and took < 1.0  # not behind five explanations
    assert (refused[0], json.loads(refused[2])["error"]) == (
        503, '4 requests with "explain" are waiting already; try again in a moment')


def test_requests_whose_clients_left_are_never_run_and_at_most_max_waiting_wait(monkeypatch):
    seen, go = [], threading.Event()
    monkeypatch.setattr(bserve, "MAX_WAITING", 16)  # 256: as many sockets would be slow here

    def holding(texts, explain=False, between=None):  # an explanation holds the model thread
        seen.extend(texts)
        if explain:
            go.wait(60)
            between()  # runs what waits: its clients have left
        return echo(texts)

    with serving(classify=holding) as (server, url), ThreadPoolExecutor(1) as pool:
        explaining = pool.submit(request, url, "POST", "/classify",
                                 json.dumps({"texts": ["why?"], "explain": True}))
        until(lambda: seen)
        for i in range(16):  # sent, then the client goes
            body = json.dumps({"texts": [f"gone {i}"]}).encode()
            with socket.create_connection(server.server_address[:2]) as client:
                client.sendall(b"POST /classify HTTP/1.0\r\nHost: localhost\r\nContent-Type: "
                               b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body))
        until(lambda: len(server.waiting[False]) == 16
              and all(job.gone for job in server.waiting[False]))
        status, _, body = request(url, "POST", "/classify", '{"texts": ["one too many"]}')
        assert (status, json.loads(body)["error"]) == (
            503, "16 requests to classify are waiting already; try again in a moment")
        go.set()
        assert explaining.result()[0] == 200 and seen == ["why?"]


def test_an_explanation_is_cut_at_its_share_of_model_time_and_stops_when_its_client_leaves(
        tmp_path, monkeypatch):
    model, config = gpt.build_gpt(weights=str(MINI_WEIGHTS))  # 2 layers, 128 positions
    finetune.prepare_for_classification(model, 2, trainable="last_block", seed=0)
    compact = tmp_path / "compact.safetensors"
    classify.save_classifier(bfast.GPTClassifier(model), compact, config, 128, ["no", "yes"])
    model, info = classify.load_classifier(compact)
    texts = [f"{i} " + "win a prize " * 60 for i in range(16)]  # 16 texts of 128 tokens
    explain = json.dumps({"texts": texts, "explain": True})
    with serving(classify=bserve.classifier(model, info, "cpu", compact,
                                            gpt.get_tokenizer())) as (server, url):
        start = time.monotonic()  # the most one request may ask: a fraction of a second
        status, _, body = request(url, "POST", "/classify", explain)
        assert status == 200 and time.monotonic() - start < 10
        assert len(json.loads(body)["results"][15]["explanation"]) == 128
        server.explain_seconds, explained = 1.0, []  # the same at 0.2 s a text: cut at 1 s
        score = bexplain.SCORERS["integrated"]
        monkeypatch.setitem(bexplain.SCORERS, "integrated", lambda *args, **kwargs: (
            time.sleep(0.2), explained.append(args[1]), score(*args, **kwargs))[2])
        status, _, body = request(url, "POST", "/classify", explain)
        assert (status, json.loads(body)["error"]) == (413, (
            "explaining these texts takes more than the 1 s of the model thread a request "
            "may have; explain fewer or shorter texts"))
        assert len(explained) <= 8  # 5 where not busy
        explained.clear()  # a client that leaves after its first text
        with socket.create_connection(server.server_address, timeout=60) as leaving:
            leaving.sendall(f"POST /classify HTTP/1.0\r\nHost: localhost\r\nContent-Type: "
                            f"application/json\r\nContent-Length: {len(explain)}\r\n\r\n"
                            f"{explain}".encode())
            until(lambda: explained)
        status, _, body = request(url, "POST", "/classify", '{"texts": ["hi"], "explain": true}')
        assert status == 200 and len(explained) <= 4  # 2 (its first, this one) where not busy


def webdriver(base, method, path, body=None):
    status, _, answer = request(base, method, path, None if body is None else json.dumps(body))
    value = json.loads(answer)["value"]
    assert status == 200, value
    return value


@pytest.fixture
def browser(server, tmp_path):
    """(chromedriver's address, the session's path) of headless Chromium showing
    the served page, through the WebDriver protocol of Debian's chromium-driver."""
    url, _ = server
    port = free_port()
    driver = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # a busy machine starts it slowly
            try:
                request(base, "GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        options = {"args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server",
                            "--window-size=900,700", f"--user-data-dir={tmp_path}",
                            "--disable-background-networking", "--no-first-run"]}
        session = webdriver(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": options}}})["sessionId"]
        at = f"/session/{session}"
        webdriver(base, "POST", at + "/url", {"url": url + "/"})
        yield base, at
        webdriver(base, "DELETE", at)
    finally:
        driver.kill()


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs a browser: Debian's chromium and chromium-driver")
def test_a_real_browser_types_two_messages_sees_two_labels_and_why_in_highlighted_tokens(
        browser):
    base, at = browser

    def element(css):
        found = webdriver(base, "POST", at + "/element", {"using": "css selector", "value": css})
        return at + f"/element/{next(iter(found.values()))}"

    def wait_for(script):
        for _ in range(300):
            if value := webdriver(base, "POST", at + "/execute/sync", {"script": script,
                                                                       "args": []}):
                return value
            time.sleep(0.1)
        return value

    webdriver(base, "POST", element("#texts") + "/value",
              {"text": "WINNER! Claim your free prize now\nAre we still on for lunch?"})
    webdriver(base, "POST", element("#go") + "/click", {})
    shown = wait_for("const shown = [...document.querySelectorAll('.result')].map("
                     "r => r.innerText); return shown.length == 2 && shown")
    assert shown and "WINNER! Claim your free prize now" in shown[0]
    for text in shown:
        assert re.search(r"\n(spam|not spam)\n", text) and len(re.findall(r"\d+\.\d%", text)) == 2
    webdriver(base, "POST", element(".result .ask") + "/click", {})  # why, for the first
    tokens = wait_for("return [...document.querySelectorAll('.why .tok')].map("
                      "t => [t.textContent, getComputedStyle(t).backgroundColor, t.title])")
    assert "".join(text for text, _, _ in tokens) == "WINNER! Claim your free prize now"
    assert len(tokens) > 3 and all(re.fullmatch(r"[+-]\d+\.\d{3}", title)
                                   for _, _, title in tokens)
    assert any(colour.startswith(("rgba(220, 40, 40", "rgba(40, 80, 220"))
               for _, colour, _ in tokens)
    legend = wait_for("return document.querySelector('.why .legend').innerText")
    assert "toward" in legend and "against it" in legend


# ------------------------------------------------- several processes: torchrun and DDP

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nodes=None):
    """python -m torch.distributed.run (torchrun) finetune.py ARGS: on 2 local
    processes, or as node `nodes` = (rank, count, port) of a multi-machine job."""
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if nodes is None:
        launcher += ["--standalone", "--nproc_per_node=2"]
    else:
        rank, count, port = nodes
        launcher += [f"--nnodes={count}", f"--node_rank={rank}", "--nproc_per_node=1",
                     f"--rdzv-endpoint=127.0.0.1:{port}"]
    return subprocess.Popen([*launcher, "finetune.py", *map(str, args)], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def assert_same_run(reference, out, stdout):
    flags, reference_out, reference_stdout = reference
    assert len(chapter_lines(reference_stdout)) > 10
    assert chapter_lines(stdout) == chapter_lines(reference_stdout)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_out.iterdir())
    trained, _ = bst.load_safetensors(out / CHECKPOINT)
    expected, _ = bst.load_safetensors(reference_out / CHECKPOINT)
    assert trained.keys() == expected.keys()
    for name, tensor in expected.items():
        # A key bias has no true gradient (softmax ignores what it adds to a row of
        # scores), so AdamW turns rounding noise, which depends on the order of
        # the sums, into steps of up to lr: 10 steps of 5e-5 apart at most.
        tolerance = 10 * 5e-5 if name.endswith("W_key.bias") else 1e-5
        assert torch.allclose(trained[name], tensor, atol=tolerance), name
    for split in ("train.csv", "validation.csv", "test.csv"):
        assert (out / split).read_bytes() == (reference_out / split).read_bytes()


def test_two_torchrun_processes_or_nodes_split_the_cache_fill_and_print_what_one_process_does(
        one_process_run, tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("finetune-rank*"))
    process = torchrun(*one_process_run[0], "--out", tmp_path / "two")
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr
    assert_same_run(one_process_run, tmp_path / "two", stdout)
    assert stdout.count("Dataset: ") == 1  # one writer
    # the cache's fill was split: rank 0 computed every other batch, got the rest
    cache = json.loads((tmp_path / "two" / "metrics.json").read_text())["prefix_cache"]
    alone = json.loads((one_process_run[1] / "metrics.json").read_text())["prefix_cache"]
    assert cache["fill_batches"] == alone["fill_batches_computed_here"] >= 4
    assert cache["fill_batches_computed_here"] == (cache["fill_batches"] + 1) // 2
    assert cache["memory_bytes"] == alone["memory_bytes"] > 0
    assert set(Path(tempfile.gettempdir()).glob("finetune-rank*")) == before
    port = free_port()  # two nodes of one process each, on this machine
    nodes = [torchrun(*one_process_run[0], "--out", tmp_path / f"node{rank}",
                      nodes=(rank, 2, port)) for rank in (0, 1)]
    try:
        (stdout, stderr), (other_stdout, other_stderr) = [n.communicate(timeout=400)
                                                          for n in nodes]
    finally:  # a node left waiting would outlive the test: SIGTERM, which stops its worker
        for node in nodes:
            node.terminate()
    assert [n.returncode for n in nodes] == [0, 0], stderr + other_stderr
    assert_same_run(one_process_run, tmp_path / "node0", stdout)
    assert other_stdout == "" and not (tmp_path / "node1").exists()


def test_two_torchrun_processes_in_bf16_print_what_one_process_does(tmp_path, sample_tsv):
    flags = ["--data", sample_tsv, "--weights", MINI_WEIGHTS, "--epochs", "1",
             "--precision", "bf16", "--no-baseline"]
    process = torchrun(*flags, "--out", tmp_path / "two")  # meanwhile, one process:
    one_stdout = output(run("finetune.py", *flags, "--out", tmp_path / "one",
                            env={"OMP_NUM_THREADS": "1"}))
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr
    assert len(chapter_lines(stdout)) > 10 and chapter_lines(stdout) == chapter_lines(one_stdout)


def test_bad_data_a_batch_size_processes_cannot_share_or_mps_under_torchrun_are_one_error(
        tmp_path, sample_tsv, cli, monkeypatch):
    out = tmp_path / "out"
    process = torchrun("--data", "no-such-file.tsv", "--weights", MINI_WEIGHTS, "--out", out)
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode != 0 and stdout == ""
    ours = [line for line in stderr.splitlines() if "error: " in line]
    assert len(ours) == 1 and "data file no-such-file.tsv does not exist" in ours[0]
    assert 'finetune.py", line' not in stderr  # no traceback of ours (torchrun adds its own)
    assert not out.exists()
    # what torchrun sets; the flags are refused before any process group starts
    said = {}
    for rank in ("0", "1"):
        env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        said[rank] = cli("finetune.py", "--data", sample_tsv, "--weights", MINI_WEIGHTS,
                         "--out", out, "--batch-size", "7", env=env)
    code, stdout, stderr = said["0"]
    assert (code, stdout) == (2, "")
    assert "--batch-size 7 does not divide among 2 processes" in stderr
    assert said["1"] == (2, "", "")
    monkeypatch.setattr(finetune, "select_device", lambda name: torch.device("mps"))
    code, _, stderr = cli("finetune.py", "--data", sample_tsv, "--weights", MINI_WEIGHTS,
                          "--out", out, env={"RANK": "0", "LOCAL_RANK": "0"})
    assert code == 2
    assert "--device mps (which auto picks on a Mac) cannot run under torchrun" in stderr
    assert not out.exists()


# ------------------------------- writes: full disks, read-only folders, SIGTERM, formats

def disk_full_after(monkeypatch, name, allowed):
    """os.write or os.pwrite (name) writes `allowed` bytes in all, the last of
    them in a short write, then fails as a full disk does."""
    real = getattr(os, name)
    left = [allowed]

    def write(fd, data, *offset):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data = bytes(data)[:left[0]]
        left[0] -= len(data)
        return real(fd, data, *offset)
    monkeypatch.setattr(os, name, write)


@pytest.mark.parametrize("stop", ["full disk reading a tensor", "full disk writing", "SIGTERM"])
def test_a_full_disk_or_sigterm_while_a_checkpoint_is_written_keeps_the_old_one_and_no_tmp(
        stop, tmp_path, monkeypatch, capsys):
    path = checkpoint_with(tmp_path)
    before, real_tensor_bytes = path.read_bytes(), bst.tensor_bytes

    def tensor_bytes(t):
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives with the file half written
        if stop == "full disk reading a tensor":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_tensor_bytes(t)
    monkeypatch.setattr(bst, "tensor_bytes", tensor_bytes)
    if stop == "full disk writing":
        disk_full_after(monkeypatch, "write", 1000)
    said = "interrupted." if stop == "SIGTERM" else (
        f"error: cannot write {path}: No space left on device; {path} is unchanged.")
    status = exit_status(lambda: save_tiny(path, model=tiny_classifier(seed=5)))
    assert (status, capsys.readouterr().err.strip()) == (143 if stop == "SIGTERM" else 1, said)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


OUTPUT_NAMES = ["accuracy-plot.svg", "loss-plot.svg", "metrics.json",
                "review_classifier.safetensors", "test.csv", "train.csv", "validation.csv"]


@pytest.mark.parametrize("failure, flags, problem", [
    ("full disk", ["--trainable", "last_layer", "--no-baseline"],
     "review_classifier.safetensors: No space left on device; .*Nothing in OUT was replaced"),
    ("read-only out", [], "OUT.*: Permission denied"),
    ("divergence", ["--lr", "1e30"],
     r"training diverged in epoch 1, at step \d{6}: .*Lower --lr \(now 1e\+30\)"),
    ("weights out of range", [], "not finite .* before any training step: the weights are out"),
])
def test_a_run_that_diverges_or_cannot_write_is_one_error_and_leaves_the_earlier_outputs(
        failure, flags, problem, tmp_path, sample_tsv, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in OUTPUT_NAMES:
        (out / name).write_text(f"the earlier {name}")
    if failure == "full disk":
        disk_full_after(monkeypatch, "write", 0)  # only the checkpoint is written with os.write
    if failure == "weights out of range":  # loaded, then made so: not the learning rate's doing
        build = finetune.build_gpt

        def infinite(*args):
            model, config = build(*args)
            with torch.no_grad():
                model.final_norm.scale.fill_(math.inf)
            return model, config
        monkeypatch.setattr(finetune, "build_gpt", infinite)
    if failure == "read-only out":
        out.chmod(0o555)
    if failure == "read-only out" and os.geteuid() == 0:
        # root may write anywhere: give what the kernel gives everyone else
        def refused(real):
            def call(path, *args, **kwargs):
                if Path(path).parent == out:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real(path, *args, **kwargs)
            return call
        monkeypatch.setattr(os, "mkdir", refused(os.mkdir))
        monkeypatch.setattr(os, "open", refused(os.open))
        monkeypatch.setattr(bfiles, "open", refused(open), raising=False)
    try:
        with pytest.raises(InputError, match=problem.replace("OUT", re.escape(str(out)))):
            fine_tune(sample_tsv, out, "--epochs", "1", *flags)
    finally:
        out.chmod(0o755)
    assert not re.search(r"\bnan\b", capsys.readouterr().out)  # it stops before a NaN loss
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_NAMES  # no work folder left
    for name in OUTPUT_NAMES:
        assert (out / name).read_text() == f"the earlier {name}"


def publish_with(tmp_path, monkeypatch, after_a_move, names="ab"):
    """publish_run of a work folder of new outputs over an --out of earlier ones (a
    two-class run's), with after_a_move(destination) called after each rename into --out;
    (out, run_cli's exit)."""
    out, real_replace = tmp_path / "out", os.replace
    work = out / ".finetune-rank0-x"
    work.mkdir(parents=True)
    for name in set(OUTPUT_NAMES) - {"metrics.json"}:  # metrics.json: publish_run's own
        (out / name).write_text(f"the earlier {name}")
        (work / name).write_text(f"this run's {name}")
    (out / "roc-plot.svg").write_text("the earlier roc-plot.svg")

    def replace(source, destination):
        real_replace(source, destination)
        if Path(destination).parent == out:
            after_a_move(Path(destination))
    monkeypatch.setattr(os, "replace", replace)
    return out, exit_status(lambda: bfiles.publish_run({"a": 1}, work, out / CHECKPOINT, names))


def test_sigterm_between_two_moves_into_out_lets_the_moves_finish_then_exits_143(
        tmp_path, monkeypatch, capsys):
    out, status = publish_with(tmp_path, monkeypatch, lambda destination: os.kill(
        os.getpid(), signal.SIGTERM) if destination.name == "accuracy-plot.svg" else None)
    printed = capsys.readouterr()
    assert status == 143 and printed.err.strip() == "interrupted."
    assert printed.out.startswith(f"Saved {out / CHECKPOINT}")  # what was done, then stopped
    for name in OUTPUT_NAMES:  # all of this run's: no mix of two runs
        assert (out / name).read_text().startswith(("this run's", "{"))
    out, status = publish_with(tmp_path / "three", monkeypatch, lambda destination: None, "abc")
    assert status == 0 and not (out / "roc-plot.svg").exists()  # a two-class run's plot goes


def test_a_move_into_out_that_fails_puts_the_earlier_outputs_back(
        tmp_path, monkeypatch, capsys):
    def fail(destination):
        if destination.name == "test.csv":
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    out, status = publish_with(tmp_path, monkeypatch, fail)
    assert status == 1 and "Nothing in" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()
    for name in set(OUTPUT_NAMES) - {"metrics.json"} | {"roc-plot.svg"}:
        assert (out / name).read_text() == f"the earlier {name}"


def test_devices_unavailable_are_named_each_is_asked_its_memory_and_torchrun_shares_ram(
        monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="--device cuda is not available.*available: cpu"):
        classify.select_device("cuda")
    assert classify.select_device("auto").type in ("cpu", "mps")
    asked = []

    def mem_get_info(device=None):  # torch 2.1-2.4 refuse a device without an index
        if not isinstance(device, int):
            raise ValueError("Expected a torch.device with a specified index or an integer")
        asked.append(device)
        return 6 * 10**9, 8 * 10**9
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert bmemory.available_memory(torch.device("cuda")) == (6 * 10**9, "free GPU memory")
    assert bmemory.available_memory(torch.device("cuda", 1))[0] == 6 * 10**9
    assert asked == [0, 1]
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 10 * 10**9,
                        raising=False)  # on a Mac: what Metal recommends less what is held
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 2 * 10**9)
    assert bmemory.available_memory(torch.device("mps")) == (
        8 * 10**9, "memory Metal recommends for this process")
    # --cache-memory auto shares the RAM among torchrun's processes
    monkeypatch.setattr(bmemory, "available_memory", lambda device: (8 * 10**9, "RAM"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert bmemory.cache_budget("auto", torch.device("cpu")) == (
        10**9, "--cache-memory auto: half the RAM, shared by 4 processes")
    assert bmemory.cache_budget("auto", torch.device("cuda", 0))[0] == 4 * 10**9  # its own
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert bmemory.cache_budget("auto", torch.device("cpu"))[0] == 4 * 10**9


# ------------------------- why and how sure: explanations, calibration (issue 17)

RULE_CONFIG = dict(TINY_CONFIG, vocab_size=128, context_length=16)
RULE_WORD, RULE_PAD = 100, 127  # spam exactly when the rule's word is among the filler


def rule_messages(count, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        ids = [rng.randrange(10, 60) for _ in range(rng.randint(4, 12))]
        if i % 2:
            ids[rng.randrange(len(ids))] = RULE_WORD
        rows.append((ids, i % 2))
    return rows


def rule_batches(messages, size):
    return [(btokens.pad_ids([ids for ids, _ in messages[i:i + size]], RULE_PAD, length=12),
             torch.tensor([label for _, label in messages[i:i + size]]))
            for i in range(0, len(messages), size)]


@contextlib.contextmanager
def one_thread():
    """Tensors this small train and explain in a fraction of a second on one thread,
    and up to 40 times slower on two where another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rule_model():
    """A tiny classifier trained for a moment to the rule; 60 messages it has not seen."""
    torch.manual_seed(0)
    model = gpt.GPTModel(RULE_CONFIG)
    finetune.prepare_for_classification(model, 2, trainable="all", seed=0)
    classifier = bfast.GPTClassifier(model, pool="last", pad_token_id=RULE_PAD)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-2)
    train = rule_batches(rule_messages(256, seed=1), 32)
    with one_thread(), contextlib.redirect_stdout(io.StringIO()):
        finetune.train_classifier_simple(classifier, train, train[:1], optimizer, "cpu",
                                         num_epochs=3, eval_freq=1000, eval_iter=1)
    return classifier.eval(), rule_messages(60, seed=2)


def test_the_rule_word_tops_nine_in_ten_spam_and_occlusion_is_the_fall_in_log_odds(rule_model):
    model, messages = rule_model
    tops = []
    with one_thread():
        for ids, label in messages:
            target, scores = bexplain.explain_ids(model, ids, 12, RULE_PAD)
            if label == target == 1:
                tops.append(ids[max(range(len(ids)), key=lambda i: scores[i])] == RULE_WORD)
    assert len(tops) >= 25  # the model learnt the rule: most of the 30 spam found
    assert sum(tops) >= 0.9 * len(tops)
    ids = messages[0][0]  # occlusion: the fall in log-odds without each token
    target, scores = bexplain.explain_ids(model, ids, 12, RULE_PAD, "occlusion")
    with torch.no_grad():
        def log_odds(sequence):  # log p / (1 - p) with two classes
            logits = model(btokens.pad_ids([sequence], RULE_PAD, length=12))[0, -1]
            return (logits[target] - logits[1 - target]).item()
        expected = [log_odds(ids) - log_odds(ids[:i] + ids[i + 1:]) for i in range(len(ids))]
    assert scores == pytest.approx(expected, abs=1e-5)
    for method in ("gradient", "integrated"):
        assert len(bexplain.explain_ids(model, ids, 12, RULE_PAD, method)[1]) == len(ids)


def test_the_default_method_beats_a_random_ranking_on_erasers_faithfulness(rule_model):
    model, messages = rule_model
    sequences = [ids for ids, _ in messages]
    with one_thread():
        shipped = bench.aopc(model, sequences, bench.ranking(
            bexplain.EXPLAIN_DEFAULT, model, 12, RULE_PAD), 12, RULE_PAD)
        chance = bench.aopc(model, sequences, bench.ranking("random", model, 12, RULE_PAD), 12,
                            RULE_PAD)
    assert shipped[0] > chance[0] + 0.1  # comprehensiveness: removing the top tokens hurts
    assert shipped[1] < chance[1]  # sufficiency: the top tokens alone keep the decision


def test_explanation_tokens_join_to_the_classified_text_and_print_as_json_or_text(
        tokenizer, tmp_path, capsys):
    model = tiny_classifier().eval()
    texts = [SPAM_TEXT, "😀 日本語 привет", "x" * 200, "naïve 🙂🙂 " * 30]
    pieces = bexplain.explain_texts(texts, [1, 0, 1, 0], model, tokenizer, 20)
    for text, explanation in zip(texts, pieces):
        ids = tokenizer.encode(text)[:20]
        assert "".join(p["token"] for p in explanation) == tokenizer.decode(ids)
        assert all(isinstance(p["score"], float) for p in explanation)
    assert "".join(p["token"] for p in pieces[1]) == texts[1]  # whole characters
    assert len(pieces[1]) < len(tokenizer.encode(texts[1]))  # split ones merged
    path = save_tiny(tmp_path / "c.safetensors", model=model)  # json tokens, text in a pipe
    classify.main(["--checkpoint", str(path), "--explain", "--json", SPAM_TEXT])
    result = json.loads(capsys.readouterr().out)
    assert [p["token"] for p in result["explanation"]] == [p["token"] for p in pieces[0]]
    classify.main(["--checkpoint", str(path), "--explain", "--explain-method", "gradient",
                   SPAM_TEXT])
    printed = capsys.readouterr().out
    assert "\x1b[" not in printed
    assert re.search(r"\n  toward (spam|not spam): '.+' [+-]\d", printed)
    pieces = [{"token": "win", "score": 2.0}, {"token": " now", "score": -1.0}]
    coloured = bstream.explanation_lines(pieces, "spam", coloured=True)
    assert coloured[0].startswith("  why: \x1b[30;48;2;255;64;64mwin\x1b[0m")
    assert coloured[1] == "  toward spam: 'win' +2.000  ' now' -1.000"


def test_fitting_a_temperature_recovers_it_and_never_raises_the_nll():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(20000, 3, generator=g)
    targets = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)[:, 0]
    assert bcalibrate.fit_temperature(3.0 * logits, targets) == pytest.approx(3.0, abs=0.1)
    separable = torch.tensor([[5.0, -5.0], [-4.0, 4.0]])
    for case in [(logits[:50], targets[:50]), (separable, torch.tensor([0, 1])),
                 (-logits[:50], targets[:50])]:
        t = bcalibrate.fit_temperature(*case)
        assert bcalibrate.nll(*case, t) <= bcalibrate.nll(*case)
    assert bcalibrate.fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) == 1.0


def test_roc_auc_counts_correctly_ordered_pairs_and_pr_and_ece_equal_hand_computations():
    rng = random.Random(0)
    scores = [rng.choice([0.1, 0.2, 0.3, 0.5, 0.8, 0.9]) for _ in range(40)]
    positives = [rng.random() < 0.5 for _ in range(40)]
    pairs = [(s, t) for s, p in zip(scores, positives) if p
             for t, q in zip(scores, positives) if not q]
    expected = sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs) / len(pairs)
    points, area = bcalibrate.roc_curve(scores, positives)
    assert area == pytest.approx(expected) and points[0] == (0, 0) and points[-1] == (1, 1)
    points, average_precision = bcalibrate.pr_curve([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert average_precision == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert bcalibrate.roc_curve([0.1, 0.2], [1, 1]) == ([], None)
    probas = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.38, 0.62], [0.5, 0.5]])
    targets = torch.tensor([0, 1, 1, 0, 0])
    # one message per bin of width 1/15: (14/15, 1] 0.95 right, (13/15, 14/15] 0.9 wrong,
    # (10/15, 11/15] 0.7 right, (9/15, 10/15] 0.62 wrong, (7/15, 8/15] 0.5 right (argmax 0)
    expected = (abs(1 - 0.95) + abs(0 - 0.9) + abs(1 - 0.7) + abs(0 - 0.62) + abs(1 - 0.5)) / 5
    assert bcalibrate.expected_calibration_error(probas, targets) == pytest.approx(expected)
    bins = bcalibrate.reliability_bins(probas, targets)
    assert [i for i, row in enumerate(bins) if row] == [7, 9, 10, 13, 14]


def test_the_threshold_keeps_the_validation_fpr_within_the_target_or_is_none_on_few_ham(
        tmp_path, capsys):
    rng = random.Random(1)
    ham = [round(rng.random(), 2) for _ in range(300)]  # ties included
    for target in (0.0, 0.01, 0.05, 0.5):
        threshold = bcalibrate.threshold_for_fpr(ham, target)
        fpr, _ = bcalibrate.rates_at(threshold, ham, [0] * len(ham))
        assert fpr <= target
        lower = max(score for score in ham + [-1.0] if score < threshold)
        assert bcalibrate.rates_at(lower, ham, [0] * len(ham))[0] > target  # the lowest such
    assert bcalibrate.rates_at(0.5, [0.4, 0.6, 0.7, 0.2], [1, 1, 0, 0]) == (0.5, 0.5)
    for val_ham in (0, 19):  # none, or too few to measure a rate of 1% on
        result = bcalibrate.operating_point([0.9, 0.8] + ham[:val_ham], [1, 1] + [0] * val_ham,
                                            [0.7, 0.2], [1, 0], ["not spam", "spam"], 0.01,
                                            tmp_path)
        assert result["threshold"] is None and result["roc_auc"] == 1.0
        assert (f"the validation split has {val_ham} not spam message(s), fewer than 20: no "
                f"threshold for --target-fpr is chosen") in capsys.readouterr().out
    result = bcalibrate.operating_point(ham[:20], [0] * 20, [0.7, 0.2], [1, 0],
                                        ["not spam", "spam"], 0.01, tmp_path)
    assert result["threshold"] == max(ham[:20])  # 20 ham: 1% of them is none


def test_calibration_writes_metrics_svgs_what_the_checkpoint_keeps_and_no_t_for_few_messages(
        rule_model, tmp_path, capsys):
    model, messages = rule_model
    batches = rule_batches(messages, 20)
    result, kept = bcalibrate.calibrate(model, [batches, batches[:2], batches[2:]], "cpu",
                                      ["not spam", "spam"], 0.05, tmp_path)
    assert kept == {"temperature": result["temperature"], "threshold": result["threshold"],
                    "target_fpr": 0.05}
    assert result["val_nll_after"] <= result["val_nll_before"]
    assert result["val_fpr"] <= 0.05 and 0 <= result["test_ece_after"] <= 1
    assert 0.5 < result["roc_auc"] <= 1 and "Test ROC AUC" in capsys.readouterr().out
    for name in ("reliability-plot.svg", "roc-plot.svg", "pr-plot.svg"):
        root = ET.parse(tmp_path / name).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.findall(".//{http://www.w3.org/2000/svg}polyline")
    bcalibrate.plot_roc_pr([], None, [], None, "<b>&", tmp_path)  # one class only: still XML
    ET.parse(tmp_path / "roc-plot.svg")
    model = tiny_classifier().eval()  # on a few messages no temperature is fitted
    batches = random_batches(3, batch_size=6, seed=2)  # 6 validation messages
    result, kept = bcalibrate.calibrate(model, [batches, batches[:1], batches[1:]], "cpu",
                                        ["not spam", "spam"], 0.05, tmp_path)
    assert result["temperature"] == kept["temperature"] == 1.0
    printed = capsys.readouterr().out
    assert "fewer than 20: no temperature is fitted (T = 1)" in printed
    assert "Temperature scaling (none fitted): T = 1.000" in printed


def test_classify_applies_the_checkpoints_temperature_and_validated_threshold(
        tmp_path, tokenizer, capsys):
    model = tiny_classifier().eval()
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_tiny(old, model=model)
    save_tiny(new, model=model, calibration={"temperature": 0.05, "threshold": 0.0,
                                             "target_fpr": 0.01})
    _, info = classify.load_classifier(old)
    assert (info["temperature"], info["threshold"]) == (1.0, None)  # still loads
    loaded, info = classify.load_classifier(new)
    assert (info["temperature"], info["threshold"]) == (0.05, 0.0)
    ids = tokenizer.encode("hello")
    ids = torch.tensor([ids + [50256] * (20 - len(ids))])  # padded, as classify pads
    with torch.no_grad():
        expected = torch.softmax(model(ids)[:, -1, :] / 0.05, dim=-1)[0].tolist()
    assert bstream.classify_texts(["hello"], loaded, tokenizer, "cpu", 20, 50256,
                                   temperature=0.05)[0] == pytest.approx(expected, abs=1e-5)
    classify.main(["--checkpoint", str(new), "--json", "--threshold", "validated", "hello"])
    assert json.loads(capsys.readouterr().out)["label"] == "spam"  # any P(spam) > 0
    with pytest.raises(InputError, match="has no validated threshold"):
        classify.main(["--checkpoint", str(old), "--threshold", "validated", "hello"])
    three = tmp_path / "three.safetensors"
    save_tiny(three, ["a", "b", "c"], tiny_classifier(num_classes=3), calibration={
        "temperature": 1.0, "threshold": None, "target_fpr": None})
    with pytest.raises(InputError, match="has 3 classes: --threshold validated is for two"):
        classify.main(["--checkpoint", str(three), "--threshold", "validated", "hello"])


def test_nothing_in_beyond_imports_the_chapters_files_and_imports_run_one_way():
    import ast
    chapter = {"gpt", "data", "finetune", "classify"}
    order = ["gpt", "data", "classify", "finetune"]  # each may import those before it

    def imported(path):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):  # inside functions too
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        return names

    beyond_files = sorted((HERE / "beyond").glob("*.py"))
    assert len(beyond_files) > 10
    for path in beyond_files:
        assert not imported(path) & chapter, path.name
    for i, name in enumerate(order):
        assert not imported(HERE / f"{name}.py") & set(order[i:]), name


def test_a_checkpoint_written_before_the_beyond_split_classifies_as_it_did(capsys):
    """testdata/checkpoint-2b3c524: LoRA adapters (rank 2) and head, pool flexible,
    calibrated, written by finetune.py at commit 2b3c524; the lines below are what
    that commit's classify.py printed for them."""
    checkpoint = HERE / "testdata" / "checkpoint-2b3c524" / "review_classifier.safetensors"
    classify.main(["--checkpoint", str(checkpoint), "--base-weights", str(MINI_WEIGHTS),
                   "--json", "Win a free prize now, call 0800 to claim",
                   "Are we still on for dinner tonight?"])
    assert capsys.readouterr().out.splitlines() == [
        '{"text": "Win a free prize now, call 0800 to claim", "label": "not spam", '
        '"probabilities": {"not spam": 0.5000096559524536, "spam": 0.49999040365219116}}',
        '{"text": "Are we still on for dinner tonight?", "label": "spam", '
        '"probabilities": {"not spam": 0.4966579079627991, "spam": 0.5033420920372009}}']


def test_unseen_accuracy_leaves_out_messages_seen_in_training_with_wilson_intervals():
    z2 = 1.959963984540054 ** 2
    cases = {(0, 10): (0.0, z2 / (10 + z2)),  # k = 0: the upper end is z^2 / (n + z^2)
             (10, 10): (10 / (10 + z2), 1.0),  # k = n: the lower end is n / (n + z^2)
             (5, 10): (0.236593, 0.763407),
             (287, 300): (0.927283, 0.974504)}  # the chapter's 95.67% test accuracy
    for (k, n), expected in cases.items():
        assert boverlap.wilson_interval(k, n) == pytest.approx(expected, abs=1e-6)
    train = [("ham", "see you at 5"), ("spam", "WIN a prize"), ("ham", "ok")]
    test = [("ham", "see you at 5"),    # copied from training: seen
            ("spam", "WIN a prize \n"),  # trailing whitespace only: the same message
            ("spam", "win a prize"),     # letter case: another message
            ("ham", "something new")]
    seen = boverlap.seen_in(train, test)
    assert seen == [True, True, False, False]
    labels, predicted = [0, 1, 1, 0], [0, 1, 1, 1]
    assert boverlap.unseen_accuracy(labels, predicted, seen) == (1, 2)
    assert boverlap.shown(1, 2) == "50.00% (95% interval 9.5-90.5%)"


def test_dedup_leaves_no_evaluation_message_in_training_and_refuses_to_leave_one_class(
        tmp_path, capsys):
    fine_tune(SMS, tmp_path / "dedup", "--dedup", "--epochs", "1")
    out = capsys.readouterr().out
    # 5,169 distinct texts; 11 more differ only in leading or trailing whitespace
    assert "Dropped 414 repeated messages (--dedup): 5158 left" in out
    assert re.search(r"Seen in training: 0 of the \d+ validation messages and 0 of the", out)
    splits = [data.read_csv(tmp_path / "dedup" / f"{name}.csv")
              for name in ("train", "validation", "test")]
    train = {text.strip() for _, text in splits[0]}
    assert not any(text.strip() in train for split in splits[1:] for _, text in split)
    metrics = json.loads((tmp_path / "dedup" / "metrics.json").read_text())
    assert metrics["test_seen_in_training"] == 0
    low, high = metrics["test_accuracy_interval95"]
    assert low < metrics["test_accuracy"] < high
    baseline = metrics["naive_bayes"]  # the baseline gets the same figures
    assert baseline["test_unseen"]["total"] == len(splits[2])
    assert baseline["test_unseen"]["accuracy"] == baseline["test_accuracy"]
    assert "Naive Bayes on the messages not seen in training: validation" in out
    tsv = tmp_path / "same.tsv"  # dedup that leaves one class: the single class error
    tsv.write_text("".join(f"{label}\tmessage {i}\n" for i in range(20)
                           for label in ("ham", "spam")), encoding="utf-8")
    with pytest.raises(InputError, match="single class"):
        fine_tune(tsv, tmp_path / "out", "--dedup", "--no-balance")
    assert "Dropped 20 repeated messages (--dedup) (20 of them labelled unlike the first)" in (
        capsys.readouterr().out)
    assert not (tmp_path / "out").exists()


def test_bench_seeds_fine_tunes_once_per_seed_reports_the_spread_and_a_failed_one_is_an_error(
        tmp_path, monkeypatch, cli):
    # deviations from the mean 0.93: -0.03, -0.01, 0.04; squares summed 0.0026, over n - 1
    assert bench.spread([0.90, 0.92, 0.97]) == pytest.approx(
        {"mean": 0.93, "stdev": math.sqrt(0.0026 / 2), "min": 0.90, "max": 0.97})
    assert bench.spread([0.95, 0.96])["stdev"] == pytest.approx(0.01 / math.sqrt(2))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # bench.py's work folder
    runs, run_finetune = [], bench.run_finetune

    def recording(name, flags, out_dir, **options):  # each run, before its folder goes
        result = run_finetune(name, flags, out_dir, **options)
        runs.append((json.loads((out_dir / "metrics.json").read_text())["args"],
                     (out_dir / "test.csv").read_text()))
        return result
    monkeypatch.setattr(bench, "run_finetune", recording)
    stdout = output(cli("bench.py", "--seeds", "123,124", "--quick", "--json",
                        tmp_path / "seeds.json", "--", "--weights", MINI_WEIGHTS,
                        "--trainable", "all", "--lr", "1e-3", "--no-baseline"))
    report = json.loads((tmp_path / "seeds.json").read_text())
    assert [r["seed"] for r in report["runs"]] == [123, 124]
    assert report["test_accuracy"] == bench.spread([r["test_accuracy"] for r in report["runs"]])
    assert report["command"].endswith("--trainable all --lr 1e-3 --no-baseline --seed SEED")
    # a finetune.py process of its own per seed, in a folder removed once bench.py is done
    assert [(a["seed"], a["epochs"], a["trainable"]) for a, _ in runs] == [(123, 1, "all"),
                                                                           (124, 1, "all")]
    assert runs[0][1] != runs[1][1] and sorted(tmp_path.iterdir()) == [tmp_path / "seeds.json"]
    assert "seed        124: test accuracy" in stdout and "2 seeds: mean" in stdout
    (tmp_path / "seeds.json").unlink()  # a child that fails: one error, no work folder left
    code, stdout, stderr = cli("bench.py", "--seeds", "1,2", "--quick", "--", "--weights",
                               tmp_path / "none.safetensors")
    assert code == 1 and stderr.count("error:") == 1
    assert stderr.startswith("error: python finetune.py --out ") and "--seed 1 failed (exit " \
        f"status 1): weights file {tmp_path / 'none.safetensors'} does not exist" in stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_stopped_by_sigterm_stops_its_child_and_removes_its_work_folder(tmp_path):
    bench = subprocess.Popen(
        [sys.executable, "bench.py", "--seeds", "1,2", "--quick", "--", "--weights",
         MINI_WEIGHTS], cwd=HERE, env=dict(os.environ, TMPDIR=str(tmp_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")
    finetune_pid = None
    while finetune_pid is None:  # until finetune.py runs (exec'd, not just forked)
        assert bench.poll() is None, bench.stderr.read()
        finetune_pid = next((pid for pid in children.read_text().split() if b"finetune.py"
                             in Path(f"/proc/{pid}/cmdline").read_bytes()), None)
        time.sleep(0.05)
    bench.terminate()
    assert bench.wait(timeout=120) == 143 and "interrupted." in bench.stderr.read()
    assert not Path(f"/proc/{finetune_pid}").exists() and list(tmp_path.iterdir()) == []


def test_weights_holding_nan_and_logits_that_are_not_finite_numbers_are_refused(
        tmp_path, monkeypatch):
    tensors, _ = bst.load_safetensors(MINI_WEIGHTS)
    tensors["h.1.mlp.c_fc.weight"] = tensors["h.1.mlp.c_fc.weight"].index_fill(
        0, torch.tensor([0]), float("nan"))
    bst.save_safetensors(tensors, tmp_path / "model.safetensors")
    shutil.copy(MINI / "config.json", tmp_path)
    with pytest.raises(InputError, match=r"trf_blocks\.1\.ff\.layers\.0\.weight holds NaN"):
        gpt.build_gpt(weights=str(tmp_path))
    model, config = gpt.build_gpt(weights=str(MINI))
    with torch.no_grad():
        model.out_head.weight.fill_(3e38)  # finite, but the logits overflow
    monkeypatch.setattr(gpt, "build_gpt", lambda *args: (model, config))
    with pytest.raises(InputError, match="logits are not all finite numbers"):
        gpt.main(["--weights", str(MINI), "--max-new-tokens", "2"])


def test_the_default_splits_are_byte_for_byte_those_written_before_dedup_existed(tmp_path):
    """sha256 of the CSVs finetune.py wrote at commit 2b3c524 on the SMS data."""
    args = finetune.build_parser().parse_args(["--data", str(SMS)])
    with contextlib.redirect_stdout(io.StringIO()):
        finetune.prepare_splits(args, data.load_messages(SMS), tmp_path)
    digests = {name: hashlib.sha256((tmp_path / f"{name}.csv").read_bytes()).hexdigest()
               for name in ("train", "validation", "test")}
    assert digests == {
        "train": "c89a1156b8476e6f4c0bfa4bc944f3d934e3db2942c5dc2a1456a65a795afcde",
        "validation": "0ac7a07215729476975e070029ced8452a3d4e49fcdd8b17c167a317150b5439",
        "test": "a5764d4eed041dada859601e1715bc68885aa5e74713e127968ead8ddf6a9e04"}


def test_a_huge_message_is_cut_before_it_is_tokenized_with_the_same_tokens(tokenizer):
    text = "Win cash now! " * 1_000_000  # 14 MB: tokenized whole, it took seconds
    read = []

    class Recording:
        def encode(self, text, **kwargs):
            read.append(len(text))
            return tokenizer.encode(text, **kwargs)

    ids = btokens.encode(text, Recording(), 120)
    assert read == [256 * 121]
    assert ids == tokenizer.encode("Win cash now! " * 200)[:120]
