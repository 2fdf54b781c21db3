"""Times the chapter's fine-tune three ways in one run, and classification;
with --beyond, the same beyond the chapter's size; with --seeds, how far one
fine-tune's test accuracy moves from seed to seed.

python bench.py --json docs/bench.json                  # the SMS data of testdata/, gpt2-small
python bench.py --beyond --json docs/bench-beyond.json  # long texts, a cache budget, all data
python bench.py --explain runs/a/review_classifier.safetensors  # how faithful --explain is
python bench.py --precision fp32,bf16 --json docs/bench-precision.json  # each mode in each
python bench.py --device cuda --precision fp32,bf16,fp16                # a GPU, in minutes
python bench.py --seeds 123,124,125 -- --dedup   # test accuracy over seeds: its spread

Each of MODES is the chapter's whole schedule with random weights (speed does not depend
on them) in a finetune.py process of its own; its losses are compared with the fp32 run's.
The processes work in a temporary folder, removed however bench.py ends.
"""
import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt import MODEL_NAMES, GPTModel, get_tokenizer, model_config
from data import load_messages, read_csv, write_csv
from classify import classify_review, load_classifier, save_classifier, select_device
import finetune
from beyond.cli import TOKENIZER_FILES, InputError, positive_int, run_cli, seed_number
from beyond.explain import EXPLAIN_METHODS, class_logits, explain_ids, without
from beyond.fast import GPTClassifier
from beyond.files import write_atomically
from beyond.precision import PRECISIONS, check_precision
from beyond.stream import NonFiniteLogits, classify_texts
from beyond.tokens import encode
import torch

HERE = Path(__file__).resolve().parent
MODES = {"plain": ["--plain"], "cache": [], "flexible": ["--pool", "flexible"]}
SET_PER_SEED = ("data", "epochs", "device", "seed", "out")  # bench.py sets these
AS_WORDS = {"ham": "ham", "spam": "spam"}  # CSV labels finetune.py reads as the SMS data's
TEXT = "You are a winner you have been specially selected to receive $1000 cash or a $2000 award."
IMPORTS = ["-c", "import torch, tiktoken; tiktoken.get_encoding('gpt2')"]  # classify.py's floor
TRAINED = re.compile(r"Training completed in ([\d.]+) minutes")
LOSS = re.compile(r"(?:loss:? )(\d+\.\d+)")  # every loss finetune.py prints


def run_child(command, log, until=None, stdin=None, stdout=None, **env):
    """python command here, its output in log: (seconds, peak RSS in MB, the log). Unless
    TIKTOKEN_CACHE_DIR is set, it reads the repository's tokenizer files (offline, tiktoken
    itself only downloads). Stopped once its log shows `until`, or when bench.py is stopped
    (before the folder goes); any other failure is an InputError quoting its last line."""
    start, stopped = time.time(), False
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, *command], cwd=HERE, stdin=stdin, stdout=stdout or output,
            stderr=output, env={"TIKTOKEN_CACHE_DIR": str(TOKENIZER_FILES), **os.environ, **env})
    try:
        while not (waited := os.wait4(process.pid, os.WNOHANG if until else 0))[0]:
            if until.search(log.read_text()):
                process.terminate()
                until, stopped = None, True
            time.sleep(1)
    except BaseException:  # Ctrl-C, SIGTERM
        process.terminate()
        process.wait()
        raise
    _, status, usage = waited
    text = log.read_text()
    if status != 0 and not stopped:
        last = ([line for line in text.splitlines() if line.strip()] or ["no output"])[-1]
        raise InputError(f"python {shlex.join(command)} failed (exit status "
                         f"{os.waitstatus_to_exitcode(status)}): {last.removeprefix('error: ')}")
    return time.time() - start, round(usage.ru_maxrss / 1024), text


def run_finetune(name, flags, out_dir, training_only=False, launcher=(), **env):
    """python [launcher] finetune.py with flags, printed as `name`: its wall-clock, peak RSS,
    printed losses and metrics.json; training_only: stopped after training, s/epoch only."""
    print(f"running {name} ...", flush=True)
    out_dir.mkdir(parents=True)
    seconds, peak_rss_mb, log = run_child(
        [*launcher, "finetune.py", "--out", str(out_dir), *flags], out_dir / "log.txt",
        until=TRAINED if training_only else None, **env)
    epochs = int(flags[flags.index("--epochs") + 1])
    if training_only:
        return {"seconds_per_epoch": round(float(TRAINED.search(log)[1]) * 60 / epochs, 1),
                "peak_rss_mb": peak_rss_mb}
    metrics = json.loads((out_dir / "metrics.json").read_text())
    result = {"seconds": round(seconds, 1),
              "seconds_per_epoch": round(metrics["train_seconds"] / epochs, 1),
              "peak_rss_mb": peak_rss_mb, "test_accuracy": metrics["test_accuracy"],
              "prefix_cache": metrics["prefix_cache"],
              "losses": [float(x) for x in LOSS.findall(log)],
              "checkpoint": str(out_dir / "review_classifier.safetensors")}
    print(f"  {result}", flush=True)
    return result


def timing_flags(args):
    """Every timing's finetune.py flags: random weights (speed does not depend on them)."""
    return ["--weights", "random", "--model", args.model, "--device", args.device]


def header(**fields):
    """What every report starts with: the machine, torch's version, the date."""
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name[^:]*:(.*)", cpuinfo.read_text(), re.M) \
        if cpuinfo.is_file() else []
    cpu = names[0].strip() if names else platform.processor() or platform.machine()
    return {"machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()}",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), **fields}


def save(report, path):
    if path:
        write_atomically(path, json.dumps(report, indent=2) + "\n")


def time_modes(args, work):
    """Each --modes in each --precision, then classification: the report, printed as a table."""
    runs = []
    for mode in args.modes:
        for precision in args.precision:
            flags = [*timing_flags(args), "--data", args.data, "--epochs", str(args.epochs),
                     "--precision", precision, *MODES[mode]]
            runs.append(dict(mode=mode, precision=precision, **run_finetune(
                f"{mode} {precision}", flags, work / f"{mode}-{precision}")))
    fp32 = {r["mode"]: r["losses"] for r in runs if r["precision"] == "fp32"}
    for r in runs:  # the largest printed-loss difference from the mode's fp32 run
        r["max_loss_difference"] = None if r["mode"] not in fp32 or r["precision"] == "fp32" \
            else round(max(abs(a - b) for a, b in zip(r["losses"], fp32[r["mode"]])), 3)
    report = header(model=args.model, epochs=args.epochs,
                    runs=[{k: v for k, v in r.items() if k != "checkpoint"} for r in runs],
                    **measure_classify(runs, args.device, args.precision, work))
    print_report(report, args.device)
    return report


def classify_throughput(checkpoint, device, precision):
    """Messages per second on the test.csv beside checkpoint: classify_review one at a
    time (the chapter's) vs batched."""
    model, info = load_classifier(checkpoint, device, precision=precision)
    tokenizer = get_tokenizer()
    texts = [text for _, text in read_csv(Path(checkpoint).parent / "test.csv")]
    model.fast, start = False, time.time()  # the chapter's forward pass
    for text in texts:
        classify_review(text, model, tokenizer, device, max_length=info["max_length"])
    model.fast, middle = True, time.time()
    classify_texts(texts, model, tokenizer, device, info["max_length"])
    return {"one_at_a_time_msgs_per_s": round(len(texts) / (middle - start), 1),
            "batched_msgs_per_s": round(len(texts) / (time.time() - middle), 1)}


def best_wall_clock(command, log, repeats=3):
    """The fastest of a few runs, after one that warms the file cache."""
    run_child(command, log)
    return round(min(run_child(command, log)[0] for _ in range(repeats)), 2)


def measure_classify(runs, device, precisions, work):
    """Throughput on the flexible checkpoint (padded per batch) and the chapter-pooling
    one (padded to max_length) in each precision; the CLI's wall-clock vs bare imports."""
    by_mode = {r["mode"]: r["checkpoint"] for r in runs if r["precision"] == precisions[0]}
    checkpoint = by_mode.get("flexible", runs[-1]["checkpoint"])
    throughput = {}
    for precision in precisions:
        print(f"classifying in {precision} ...", flush=True)
        throughput[precision] = classify_throughput(checkpoint, device, precision)
        if "cache" in by_mode:
            last_pool = classify_throughput(by_mode["cache"], device, precision)
            throughput[precision].update({f"last_pool_{k}": v for k, v in last_pool.items()})
    return {"classify": throughput, "classify_cli_seconds": best_wall_clock(
                ["classify.py", "--checkpoint", by_mode.get("cache", checkpoint), TEXT],
                work / "classify.log"),
            "import_seconds": best_wall_clock(IMPORTS, work / "imports.log")}


def print_report(report, device):
    print(f"\n{report['machine']}, torch {report['torch']}, {report['model']}, random weights, "
          f"{report['epochs']} epoch(s), device {device}")
    print(f"{'mode':<10}{'precision':>10}{'seconds':>9}{'s/epoch':>9}{'speed-up':>10}"
          f"{'peak RSS MB':>13}{'test acc':>10}{'final losses':>15}{'max loss diff':>15}")
    plain = next((r["seconds"] for r in report["runs"] if r["mode"] == "plain"
                  and r["precision"] == "fp32"), None)
    for r in report["runs"]:
        speedup = f"{plain / r['seconds']:.1f}x" if plain else "-"
        final = "/".join(f"{x:.3f}" for x in r["losses"][-2:])
        difference = "-" if r["max_loss_difference"] is None else \
            f"{r['max_loss_difference']:.3f}"
        print(f"{r['mode']:<10}{r['precision']:>10}{r['seconds']:>9.1f}"
              f"{r['seconds_per_epoch']:>9.1f}{speedup:>10}{r['peak_rss_mb']:>13.0f}"
              f"{r['test_accuracy']*100:>9.2f}%{final:>15}{difference:>15}")
    for precision, speed in report["classify"].items():
        for prefix, checkpoint in (("", "flexible"), ("last_pool_", "chapter-pooling")):
            if f"{prefix}batched_msgs_per_s" in speed:
                print(f"classify in {precision}, {checkpoint} checkpoint: "
                      f"{speed[prefix + 'one_at_a_time_msgs_per_s']} msgs/s one at a time "
                      f"(chapter), {speed[prefix + 'batched_msgs_per_s']} msgs/s batched")
    cli, imports = report["classify_cli_seconds"], report["import_seconds"]
    print(f"python classify.py \"text\": {cli:.2f} s; importing torch + tiktoken: "
          f"{imports:.2f} s (+{cli - imports:.2f} s)")


# ------------------------------------- --beyond, --torchrun: beyond the chapter's size

def long_texts(data, path, count=2000, tokens=250):
    """A CSV of count texts of about `tokens` tokens, half ham and half spam, each joined
    from messages of one label drawn at random (seeded): anyone can rebuild them."""
    rows, tokenizer, rng = load_messages(data), get_tokenizer(), random.Random(0)
    texts = []
    for label in ("ham", "spam"):
        messages = [text for row_label, text in rows if row_label == label]
        lengths = [len(encode(text, tokenizer)) + 1 for text in messages]
        for _ in range(count // 2):
            parts, length = [], 0
            while length < tokens:
                i = rng.randrange(len(messages))
                parts.append(messages[i])
                length += lengths[i]
            texts.append((label, " ".join(parts)))
    write_csv(texts, path, AS_WORDS)
    return str(path)


def classify_stream(checkpoint, data, count, work, device):
    """python classify.py - on count messages of data (repeated as needed), one per line:
    messages per second and peak RSS."""
    texts = [" ".join(text.split()) for _, text in load_messages(data)]
    lines = work / f"{count}.txt"
    lines.write_text("".join(texts[i % len(texts)] + "\n" for i in range(count)),
                     encoding="utf-8")
    with open(lines, encoding="utf-8") as stdin:
        seconds, peak_rss_mb, _ = run_child(
            ["classify.py", "--checkpoint", str(checkpoint), "--device", device, "-"],
            lines.with_suffix(".log"), stdin=stdin, stdout=subprocess.DEVNULL)
    return {"lines": count, "seconds": round(seconds, 1),
            "msgs_per_s": round(count / seconds, 1), "peak_rss_mb": peak_rss_mb}


def beyond(args, work):
    """2,000 texts of ~250 tokens in each --modes and precision (and a third of the cache);
    all data (--no-balance); classify.py - on 3,000 and 100,000 lines. Saved after each."""
    report = header(model=args.model, runs={})
    long = ["--data", long_texts(args.data, work / "long.csv"), "--max-length", "256"]
    everything = ["--data", args.data, "--no-balance"]

    def run(name, flags, epochs=1, **options):
        report["runs"][name] = dict(epochs=epochs, **run_finetune(
            name, [*timing_flags(args), *flags, "--epochs", str(epochs)],
            work / re.sub(r"\W+", "-", name), **options))
        save(report, args.json)

    for mode in args.modes:
        for precision in args.precision:
            run(f"long {'default' if mode == 'cache' else mode}"
                + ("" if precision == "fp32" else f" {precision}"),
                [*long, *MODES[mode], "--precision", precision])
    if args.modes != list(MODES):  # only the modes asked for
        return report
    third = report["runs"]["long default"]["prefix_cache"]["needed_bytes"] // 3
    run("long budget a third", [*long, "--cache-memory", str(third)])
    run("all data default", everything, 5)
    print("running classify.py - ...", flush=True)
    config = dict(model_config("gpt2-small"), emb_dim=16, n_layers=2, n_heads=2,
                  context_length=128)  # a tiny model: classify.py's own memory
    torch.manual_seed(0)
    tiny = work / "tiny.safetensors"
    save_classifier(GPTClassifier(finetune.prepare_for_classification(GPTModel(config), 2)),
                    tiny, config, 120, ["not spam", "spam"])
    report["classify_stream"] = {
        f"{args.model}, long flexible checkpoint, 3,000 lines": classify_stream(
            report["runs"]["long flexible"]["checkpoint"], args.data, 3000, work, args.device),
        **{f"tiny model, {count:,} lines": classify_stream(tiny, args.data, count, work,
                                                            args.device)
           for count in (3000, 100_000)}}
    print(f"  {report['classify_stream']}", flush=True)
    run("all data plain, training only", [*everything, "--plain"], training_only=True)
    return report


def fill_under_torchrun(args, work):
    """The default mode for 1 epoch under torchrun, 1 then 2 processes of one thread:
    the cache fill's seconds (rank 0's), the whole run's, and its printed losses."""
    report = header(model=args.model, precision=args.precision[0], runs=[])
    for processes in (1, 2):
        run = run_finetune(
            f"torchrun --nproc_per_node={processes}",
            [*timing_flags(args), "--data", args.data, "--epochs", "1", "--precision",
             args.precision[0]], work / f"torchrun-{processes}",
            launcher=["-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={processes}"], OMP_NUM_THREADS="1")
        report["runs"].append({
            "processes": processes, "seconds": run["seconds"],
            "fill_seconds": run["prefix_cache"]["fill_seconds"],
            "fill_batches_computed_by_rank_0": run["prefix_cache"]["fill_batches_computed_here"],
            "test_accuracy": run["test_accuracy"], "losses": run["losses"]})
    one, two = report["runs"]
    ratio = f"{one['fill_seconds'] / two['fill_seconds']:.2f}x" if two["fill_seconds"] \
        else "too short to compare"  # seconds are rounded: a tiny model's fill reads 0.0
    print(f"cache fill: {one['fill_seconds']} s with 1 process, {two['fill_seconds']} s with 2 "
          f"({ratio}); printed losses "
          f"{'the same' if one['losses'] == two['losses'] else 'DIFFERENT'}")
    return report


# ------------------------------------- --seeds: how much of a difference is noise

def seed_list(text):
    """--seeds: two or more different seeds of finetune.py --seed, comma-separated."""
    seeds = [seed_number(part) for part in text.split(",")]
    if len(set(seeds)) < max(2, len(seeds)):
        raise argparse.ArgumentTypeError(f"give two or more different seeds, such as "
                                         f"123,124,125, not {text}")
    return seeds


def spread(accuracies):
    """The mean, sample standard deviation (n - 1) and range of two or more accuracies."""
    return {"mean": statistics.mean(accuracies), "stdev": statistics.stdev(accuracies),
            "min": min(accuracies), "max": max(accuracies)}


def check_finetune_flags(parser, flags):
    """The flags after --, parsed by finetune.py's own parser before any run starts;
    those bench.py sets for each run are refused there."""
    finetune_parser = finetune.build_parser()
    finetune_parser.error = lambda message: parser.error(f"after --: {message}")
    finetune_parser.set_defaults(**dict.fromkeys(SET_PER_SEED))
    given = vars(finetune_parser.parse_args(flags))
    for name in SET_PER_SEED:
        if given[name] is not None:
            parser.error(f"after --: bench.py sets each run's --{name} itself (from its own "
                         f"--seeds, --data, --epochs and --device; a temporary --out)")


def repeat_over_seeds(args, work):
    """One fine-tune per --seeds, each in a finetune.py process of its own: every seed's
    test accuracy, their mean and spread."""
    flags = ["--data", args.data, "--epochs", str(args.epochs), "--device", args.device,
             *args.finetune_flags]
    report = header(command=shlex.join(["python", "finetune.py", *flags, "--seed", "SEED"]),
                    runs=[])
    for seed in args.seeds:
        run = run_finetune(f"seed {seed}", [*flags, "--seed", str(seed)], work / f"seed-{seed}")
        report["runs"].append({"seed": seed, "test_accuracy": run["test_accuracy"],
                               "seconds": run["seconds"]})
    report["test_accuracy"] = s = spread([r["test_accuracy"] for r in report["runs"]])
    print(f"\n{report['machine']}, torch {report['torch']}, {report['date']}\n"
          f"{report['command']}")
    for r in report["runs"]:
        print(f"seed {r['seed']:>10}: test accuracy {r['test_accuracy'] * 100:6.2f}%")
    print(f"{len(args.seeds)} seeds: mean {s['mean'] * 100:.2f}%, sample standard deviation "
          f"{s['stdev'] * 100:.2f} points, min-max {s['min'] * 100:.2f}-{s['max'] * 100:.2f}%")
    return report


# ------------------------------------- --explain: how faithful each explanation is

ERASER_SHARES = (0.01, 0.05, 0.10, 0.20, 0.50)  # k: the top k% of a message's tokens


def ranking(method, model, max_length, pad_token_id, seed=123):
    """ids -> (class explained, token positions from the most important) by `method`, or
    in a random order ("random": the baseline every explanation must beat)."""
    rng = random.Random(seed)

    def rank(ids):
        if method != "random":
            target, scores = explain_ids(model, ids, max_length, pad_token_id, method)
            return target, sorted(range(len(ids)), key=lambda i: -scores[i])
        order = list(range(len(ids)))
        rng.shuffle(order)
        return int(class_logits(model, [ids], max_length, pad_token_id)[0].argmax()), order
    return rank


def aopc(model, messages, rank, max_length, pad_token_id):
    """ERASER's faithfulness (DeYoung et al. 2020), AOPC over ERASER_SHARES and messages:
    comprehensiveness p(y|x) - p(y|x without its top k%) (higher is better) and
    sufficiency p(y|x) - p(y|its top k% only) (lower is better); at least one token."""
    comprehensiveness = sufficiency = 0.0
    for ids in messages:
        target, order = rank(ids)
        variants = [ids]
        for share in ERASER_SHARES:
            top = set(order[:max(1, math.ceil(share * len(ids)))])
            variants += [without(ids, top, pad_token_id),
                         without(ids, set(range(len(ids))) - top, pad_token_id)]
        p = torch.softmax(class_logits(model, variants, max_length, pad_token_id), -1)[:, target]
        comprehensiveness += (p[0] - p[1::2]).mean().item()
        sufficiency += (p[0] - p[2::2]).mean().item()
    return comprehensiveness / len(messages), sufficiency / len(messages)


def faithfulness_table(checkpoint, device):
    """Each method's and a random ranking's AOPC on the test.csv beside checkpoint, and the
    time per message."""
    test_csv = Path(checkpoint).parent / "test.csv"
    model, info = load_classifier(checkpoint, device)
    max_length = min(info["max_length"], model.gpt.pos_emb.weight.shape[0])
    tokenizer, pad, rows = get_tokenizer(), info["pad_token_id"], []
    texts = [text for _, text in read_csv(test_csv, info["num_classes"])]
    try:  # an explanation of a model that computes NaN would be NaN too
        classify_texts(texts, model, tokenizer, device, max_length, pad)
    except NonFiniteLogits as e:
        raise InputError(f"{checkpoint}: {e}") from None
    messages = [encode(text, tokenizer, max_length) for text in texts]
    for name in [*EXPLAIN_METHODS, "random"]:
        rank, start = ranking(name, model, max_length, pad), time.time()
        for ids in messages:
            rank(ids)
        seconds = (time.time() - start) / len(messages)
        comprehensiveness, sufficiency = aopc(model, messages, rank, max_length, pad)
        rows.append({"method": name, "comprehensiveness": round(comprehensiveness, 4),
                     "sufficiency": round(sufficiency, 4),
                     "ms_per_message": round(1000 * seconds, 1)})
        print(f"{name:<12}comprehensiveness {comprehensiveness:.4f}  sufficiency "
              f"{sufficiency:.4f}  {1000 * seconds:.1f} ms per message", flush=True)
    return {"checkpoint": str(checkpoint), "test_csv": str(test_csv),
            "messages": len(messages), "mean_tokens": sum(map(len, messages)) / len(messages),
            "shares": ERASER_SHARES, "methods": rows}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="gpt2-small", choices=list(MODEL_NAMES),
                        help="GPT-2 size, with random weights")
    parser.add_argument("--data", help="the SMS Spam Collection TSV (or UCI zip)",
                        default=str(HERE / "testdata/sms_spam_collection/SMSSpamCollection"))
    parser.add_argument("--epochs", type=positive_int, default=5, help="epochs per run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"],
                        help="where every run and the classification run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 80 messages and 1 epoch per run")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes to run (with --beyond: the long-text "
                             "runs to make, and only those)")
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated finetune.py --precision values (fp32, bf16, "
                             "fp16) to run each mode in; losses are compared with the mode's "
                             "fp32 run, classification is timed in each (first's checkpoints)")
    parser.add_argument("--torchrun", action="store_true",
                        help="measure the cache fill under torchrun instead: the default mode in "
                             "one --precision, 1 epoch, 1 then 2 processes of one thread each")
    parser.add_argument("--beyond", action="store_true",
                        help="measure beyond the chapter's size instead (about 100 minutes on "
                             "2 CPU cores): long texts, a cache budget, all data, streaming")
    parser.add_argument("--explain", metavar="CHECKPOINT",
                        help="measure classify.py --explain's methods instead: ERASER's AOPC "
                             "against a random ranking, and the time per message, on the "
                             "test.csv beside CHECKPOINT")
    parser.add_argument("--seeds", type=seed_list, metavar="SEED,SEED,...",
                        help="fine-tune once per seed instead (finetune.py --seed N; its "
                             "other flags after --): each test accuracy, their mean, sample "
                             "standard deviation and min-max, to tell a difference from noise")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("finetune_flags", nargs="*", metavar="-- FINETUNE_FLAG",
                        help="with --seeds: finetune.py's flags for every run (its defaults "
                             "otherwise: pretrained weights), e.g. -- --weights testdata/"
                             "gpt2-mini-hf/model.safetensors --trainable all --lr 1e-3 --dedup")
    return parser


INSTEAD = {  # the flags each measurement made instead of the modes' takes no part in
    "explain": ("measures its checkpoint only", ("beyond", "quick", "modes")),
    "torchrun": ("measures the default mode's cache fill only, on the whole data",
                 ("beyond", "explain", "modes", "quick", "epochs")),
    "seeds": ("repeats one fine-tune, with finetune.py's flags after --",
              ("beyond", "explain", "torchrun", "precision", "modes", "model")),
    "beyond": ("makes its own runs, of 1 and 5 epochs", ("quick", "epochs")),
}


def check_args(parser, args):
    """Every combination that cannot run is refused before hours of runs, not after."""
    for flag, (what, refused) in INSTEAD.items():
        given = [name for name in refused if getattr(args, name) != parser.get_default(name)]
        if getattr(args, flag) and given:
            parser.error(f"--{flag} {what}: it takes no --{given[0]}")
    for flag, known in (("modes", MODES), ("precision", PRECISIONS)):
        setattr(args, flag, getattr(args, flag).split(","))
        unknown = [value for value in getattr(args, flag) if value not in known]
        if unknown:
            parser.error(f"--{flag}: unknown {flag.rstrip('s')} {unknown[0]!r} (choose from "
                         f"{', '.join(known)})")
    for precision in args.precision:
        try:
            check_precision(precision, select_device(args.device))
        except InputError as e:
            parser.error(str(e))
    if args.finetune_flags and not args.seeds:
        parser.error(f"finetune.py flags such as {args.finetune_flags[0]} go with --seeds")
    if args.torchrun and len(args.precision) > 1:
        parser.error("--torchrun measures one precision: give it one --precision")
    if args.beyond and args.modes == list(MODES) and args.precision != ["fp32"]:
        parser.error("--beyond with every mode also makes its budget, all-data and streaming "
                     "runs, in fp32: give it --precision fp32, or choose its long-text runs "
                     "with --modes (e.g. --modes cache,flexible --precision fp32,bf16)")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json: no folder {Path(args.json).parent} to write {args.json} in")
    if not Path(args.data).is_file():
        parser.error(f"--data: no file at {args.data}; pass the SMS Spam Collection's TSV "
                     f"(or the UCI zip)")
    if args.explain and not (Path(args.explain).parent / "test.csv").is_file():
        parser.error(f"--explain: no test.csv beside {args.explain}: pass the checkpoint "
                     f"in the --out folder finetune.py wrote")
    if args.seeds:
        check_finetune_flags(parser, args.finetune_flags)


def main():
    parser = build_parser()
    args = parser.parse_args()
    check_args(parser, args)
    if args.explain:
        return save(header(**faithfulness_table(args.explain, args.device)), args.json)
    measure = fill_under_torchrun if args.torchrun else beyond if args.beyond \
        else repeat_over_seeds if args.seeds else time_modes
    with tempfile.TemporaryDirectory(prefix="bench-", ignore_cleanup_errors=True) as work:
        if args.quick:  # 40 ham and 40 spam messages: a few training steps per run
            rows = load_messages(args.data)
            args.data, args.epochs = str(Path(work) / "sample.csv"), 1
            write_csv([r for r in rows if r[0] == "ham"][:40]
                      + [r for r in rows if r[0] == "spam"][:40], args.data, AS_WORDS)
        report = measure(args, Path(work))
    save(report, args.json)


if __name__ == "__main__":
    run_cli(main)
