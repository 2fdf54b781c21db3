"""Times the chapter's fine-tune three ways in one run, and classification;
with --beyond, the same beyond the chapter's size; with --seeds, how far one
fine-tune's test accuracy moves from seed to seed.

python bench.py --json bench.json                  # the SMS data of testdata/, gpt2-small
python bench.py --beyond --json bench-beyond.json  # long texts, a cache budget, all data
python bench.py --explain runs/a/review_classifier.safetensors  # how faithful --explain is
python bench.py --precision fp32,bf16 --json bench-precision.json  # each mode in each
python bench.py --device cuda --precision fp32,bf16,fp16           # a GPU, in minutes
python bench.py --seeds 123,124,125 -- --dedup   # test accuracy over seeds: its spread

Each of MODES is the chapter's whole schedule with random weights (speed does not depend
on them) in a finetune.py process of its own; its losses are compared with the fp32 run's.
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
from finetune import build_parser, prepare_for_classification
from beyond.cli import InputError, positive_int, run_cli, seed_number
from beyond.explain import EXPLAIN_METHODS, class_logits, explain_ids, without
from beyond.fast import GPTClassifier
from beyond.files import write_atomically
from beyond.precision import PRECISIONS, check_precision
from beyond.stream import NonFiniteLogits, classify_texts
from beyond.tokens import encode
import torch

HERE = Path(__file__).resolve().parent
MODES = {"plain": ["--plain"], "cache": [], "flexible": ["--pool", "flexible"]}
RANDOM = ["--weights", "random"]  # every timing's: speed does not depend on the weights
SET_PER_SEED = ("data", "epochs", "device", "seed", "out")  # bench.py sets these
AS_WORDS = {"ham": "ham", "spam": "spam"}  # CSV labels finetune.py reads as the SMS data's
TEXT = "You are a winner you have been specially selected to receive $1000 cash or a $2000 award."
TRAINED = re.compile(r"Training completed in ([\d.]+) minutes")
LOSS = re.compile(r"(?:loss:? )(\d+\.\d+)")  # every loss finetune.py prints


def run_finetune(flags, out_dir, training_only=False, launcher=(), env=None):
    """python [launcher] finetune.py with flags: its wall-clock, peak RSS, printed losses and
    metrics.json; training_only: stopped after training, only its time per epoch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log, start = out_dir / "log.txt", time.time()
    with open(log, "w") as f:
        process = subprocess.Popen([sys.executable, *launcher, "finetune.py", "--out",
                                    str(out_dir), *flags],
                                   stdout=f, stderr=subprocess.STDOUT, cwd=HERE, env=env)
        while training_only and process.poll() is None and not TRAINED.search(log.read_text()):
            time.sleep(1)
        if training_only and process.poll() is None:
            process.terminate()
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.time() - start
    if training_only and (trained := TRAINED.search(log.read_text())):
        epochs = int(flags[flags.index("--epochs") + 1])
        return {"seconds_per_epoch": round(float(trained[1]) * 60 / epochs, 1),
                "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    if status != 0:
        sys.exit(f"finetune.py {' '.join(flags)} failed; its log ({log}) ends:\n"
                 + "\n".join(log.read_text().splitlines()[-15:]))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {"seconds": round(seconds, 1),
            "seconds_per_epoch": round(metrics["train_seconds"] / metrics["args"]["epochs"], 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "test_accuracy": metrics["test_accuracy"], "prefix_cache": metrics["prefix_cache"],
            "losses": [float(x) for x in LOSS.findall(log.read_text())],
            "checkpoint": str(out_dir / "review_classifier.safetensors")}


def loss_differences(runs):
    """Each run's largest printed-loss difference from its mode's fp32 run (or None)."""
    fp32 = {r["mode"]: r["losses"] for r in runs if r["precision"] == "fp32"}
    for r in runs:
        reference = fp32.get(r["mode"])
        r["max_loss_difference"] = None if reference is None or r["precision"] == "fp32" else \
            round(max(abs(a - b) for a, b in zip(r["losses"], reference)), 3)
    return runs


def classify_throughput(checkpoint, device, precision="fp32"):
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


def best_wall_clock(command, repeats=3):
    """Fastest of a few runs (the first warms the file cache)."""
    times = []
    for _ in range(repeats + 1):
        start = time.time()
        subprocess.run(command, cwd=HERE, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.time() - start)
    return min(times[1:])


def machine():
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name[^:]*:(.*)", cpuinfo.read_text(), re.M) \
        if cpuinfo.is_file() else []
    cpu = names[0].strip() if names else platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def quick_sample(data, path):
    """40 ham and 40 spam messages: a few training steps per mode."""
    rows = load_messages(data)
    write_csv([r for r in rows if r[0] == "ham"][:40] + [r for r in rows if r[0] == "spam"][:40],
              path, AS_WORDS)
    return str(path)


def measure_classify(runs, device, precisions):
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
    import_seconds = best_wall_clock(
        [sys.executable, "-c", "import torch, tiktoken; tiktoken.get_encoding('gpt2')"])
    cli_seconds = best_wall_clock([sys.executable, "classify.py", "--checkpoint",
                                   by_mode.get("cache", checkpoint), TEXT])
    return {"classify": throughput, "classify_cli_seconds": round(cli_seconds, 2),
            "import_seconds": round(import_seconds, 2)}


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
    for precision, throughput in report["classify"].items():
        print(f"classify in {precision}, flexible checkpoint: "
              f"{throughput['one_at_a_time_msgs_per_s']} msgs/s one at a time (chapter), "
              f"{throughput['batched_msgs_per_s']} msgs/s batched")
        if "last_pool_batched_msgs_per_s" in throughput:
            print(f"classify in {precision}, chapter-pooling checkpoint: "
                  f"{throughput['last_pool_one_at_a_time_msgs_per_s']} msgs/s one at a time, "
                  f"{throughput['last_pool_batched_msgs_per_s']} msgs/s batched")
    cli, imports = report["classify_cli_seconds"], report["import_seconds"]
    print(f"python classify.py \"text\": {cli:.2f} s; importing torch + tiktoken: "
          f"{imports:.2f} s (+{cli - imports:.2f} s)")


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


def message_lines(data, path, count):
    """count messages of the SMS data (repeated as needed), one per line."""
    texts = [" ".join(text.split()) for _, text in load_messages(data)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(texts[i % len(texts)] + "\n" for i in range(count))
    return path


def tiny_checkpoint(path):
    """A classifier of 2 blocks and 16 dimensions: classify.py's own memory, not the model's."""
    config = dict(model_config("gpt2-small"), emb_dim=16, n_layers=2, n_heads=2,
                  context_length=128)
    torch.manual_seed(0)
    gpt = prepare_for_classification(GPTModel(config), 2)
    save_classifier(GPTClassifier(gpt), path, config, 120, ["not spam", "spam"])
    return path


def classify_stream(checkpoint, lines, device):
    """python classify.py - < lines: messages per second and peak RSS."""
    with open(lines, encoding="utf-8") as stdin:
        count, start = sum(1 for _ in stdin), time.time()
        stdin.seek(0)
        process = subprocess.Popen([sys.executable, "classify.py", "--checkpoint",
                                    str(checkpoint), "--device", device, "-"],
                                   stdin=stdin, stdout=subprocess.DEVNULL, cwd=HERE)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        sys.exit(f"classify.py - < {lines} failed")
    seconds = time.time() - start
    return {"lines": count, "seconds": round(seconds, 1),
            "msgs_per_s": round(count / seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def beyond(args, work, save):
    """2,000 texts of ~250 tokens in each --modes and precision (and a third of the cache);
    all data (--no-balance); classify.py - on 3,000 and 100,000 lines. save(report) after each."""
    report = {"machine": machine(), "torch": torch.__version__, "model": args.model,
              "date": time.strftime("%Y-%m-%d"), "runs": {}}
    common = [*RANDOM, "--model", args.model, "--device", args.device]
    long = ["--data", long_texts(args.data, work / "long.csv"), "--max-length", "256"]
    everything = ["--data", args.data, "--no-balance"]

    def run(name, flags, epochs):
        print(f"running {name} ...", flush=True)
        report["runs"][name] = run_finetune([*common, *flags, "--epochs", str(epochs)],
                                            work / name.replace(" ", "-"))
        report["runs"][name]["epochs"] = epochs
        print(f"  {report['runs'][name]}", flush=True)
        save(report)

    precisions = args.precision.split(",")
    for mode in args.modes.split(","):
        for precision in precisions:
            name = f"long {'default' if mode == 'cache' else mode}" + \
                ("" if precision == "fp32" else f" {precision}")
            run(name, [*long, *MODES[mode], "--precision", precision], 1)
    if args.modes != ",".join(MODES):  # only the modes asked for
        return report
    third = report["runs"]["long default"]["prefix_cache"]["needed_bytes"] // 3
    run("long budget a third", [*long, "--cache-memory", str(third)], 1)
    run("all data default", everything, 5)
    print("running classify.py - ...", flush=True)
    report["classify_stream"] = {
        "gpt2-small, long flexible checkpoint, 3,000 lines": classify_stream(
            report["runs"]["long flexible"]["checkpoint"],
            message_lines(args.data, work / "3000.txt", 3000), args.device)}
    tiny = tiny_checkpoint(work / "tiny.safetensors")
    for count in (3000, 100_000):
        report["classify_stream"][f"tiny model, {count:,} lines"] = classify_stream(
            tiny, message_lines(args.data, work / f"{count}.txt", count), args.device)
    print(f"  {report['classify_stream']}", flush=True)
    save(report)
    print("running all data plain, training only ...", flush=True)
    report["runs"]["all data plain, training only"] = run_finetune(
        [*common, *everything, "--plain", "--epochs", "1"], work / "all-data-plain",
        training_only=True)
    save(report)
    return report


def fill_under_torchrun(args, work):
    """The default mode for 1 epoch under torchrun, 1 then 2 processes of one thread:
    the cache fill's seconds (rank 0's), the whole run's, and its printed losses."""
    report = {"machine": machine(), "model": args.model, "precision": args.precision,
              "date": time.strftime("%Y-%m-%d"), "runs": []}
    for processes in (1, 2):
        print(f"running torchrun --nproc_per_node={processes} ...", flush=True)
        run = run_finetune(
            [*RANDOM, "--model", args.model, "--data", args.data, "--epochs", "1", "--device",
             args.device, "--precision", args.precision], work / f"torchrun-{processes}",
            launcher=["-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={processes}"],
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        report["runs"].append({
            "processes": processes, "seconds": run["seconds"],
            "fill_seconds": run["prefix_cache"]["fill_seconds"],
            "fill_batches_computed_by_rank_0": run["prefix_cache"]["fill_batches_computed_here"],
            "test_accuracy": run["test_accuracy"], "losses": run["losses"]})
        print(f"  {report['runs'][-1]}", flush=True)
    one, two = report["runs"]
    print(f"cache fill: {one['fill_seconds']} s with 1 process, {two['fill_seconds']} s with 2 "
          f"({one['fill_seconds'] / two['fill_seconds']:.2f}x); printed losses "
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
    finetune_parser = build_parser()
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
    report = {"machine": machine(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"),
              "command": shlex.join(["python", "finetune.py", *flags, "--seed", "SEED"]),
              "runs": []}
    for seed in args.seeds:
        print(f"running seed {seed} ...", flush=True)
        run = run_finetune([*flags, "--seed", str(seed)], work / f"seed-{seed}")
        report["runs"].append({"seed": seed, "test_accuracy": run["test_accuracy"],
                               "seconds": run["seconds"]})
        print(f"  {report['runs'][-1]}", flush=True)
    report["test_accuracy"] = spread([r["test_accuracy"] for r in report["runs"]])
    print(f"\n{report['machine']}, torch {report['torch']}, {report['date']}\n"
          f"{report['command']}")
    for r in report["runs"]:
        print(f"seed {r['seed']:>10}: test accuracy {r['test_accuracy'] * 100:6.2f}%")
    s = report["test_accuracy"]
    print(f"{len(args.seeds)} seeds: mean {s['mean'] * 100:.2f}%, sample standard deviation "
          f"{s['stdev'] * 100:.2f} points, min-max {s['min'] * 100:.2f}-{s['max'] * 100:.2f}%")
    return report


# ------------------------------------- --explain: how faithful each explanation is

ERASER_SHARES = (0.01, 0.05, 0.10, 0.20, 0.50)  # k: the top k% of a message's tokens


def method_ranking(method, model, max_length, pad_token_id):
    """ids -> (class explained, token positions from the most important) by `method`."""
    def rank(ids):
        target, scores = explain_ids(model, ids, max_length, pad_token_id, method)
        return target, sorted(range(len(ids)), key=lambda i: -scores[i])
    return rank


def random_ranking(model, max_length, pad_token_id, seed=123):
    """The baseline every explanation must beat: the tokens in a random order."""
    rng = random.Random(seed)

    def rank(ids):
        target = int(class_logits(model, [ids], max_length, pad_token_id)[0].argmax())
        order = list(range(len(ids)))
        rng.shuffle(order)
        return target, order
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


def faithfulness_table(checkpoint, test_csv, device):
    """Each method's and a random ranking's AOPC on the test split, and time per message."""
    model, info = load_classifier(checkpoint, device)
    max_length = min(info["max_length"], model.gpt.pos_emb.weight.shape[0])
    tokenizer, pad = get_tokenizer(), info["pad_token_id"]
    texts = [text for _, text in read_csv(test_csv, info["num_classes"])]
    try:  # an explanation of a model that computes NaN would be NaN too
        classify_texts(texts, model, tokenizer, device, max_length, pad)
    except NonFiniteLogits as e:
        raise InputError(f"{checkpoint}: {e}") from None
    messages = [encode(text, tokenizer, max_length) for text in texts]
    rankings = {method: method_ranking(method, model, max_length, pad)
                for method in EXPLAIN_METHODS}
    rows, rankings["random"] = [], random_ranking(model, max_length, pad)
    for name, rank in rankings.items():
        start = time.time()
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


def main():
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
    parser.add_argument("--modes", default="plain,cache,flexible",
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
    args = parser.parse_args()
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json: no folder {Path(args.json).parent} to write {args.json} in")
    if args.explain and (args.beyond or args.quick or args.modes != ",".join(MODES)):
        parser.error("--explain measures its checkpoint only: it takes no --beyond, "
                     "--quick or --modes")
    if args.torchrun and (args.beyond or args.explain or args.modes != ",".join(MODES)):
        parser.error("--torchrun measures the default mode's cache fill only: it takes no "
                     "--beyond, --explain or --modes")
    changed = [flag for flag in ("beyond", "explain", "torchrun", "precision", "modes", "model")
               if getattr(args, flag) != parser.get_default(flag)]
    if args.seeds and changed:
        parser.error(f"--seeds repeats one fine-tune, with finetune.py's flags after --: it "
                     f"takes no --{changed[0]}")
    if args.finetune_flags and not args.seeds:
        parser.error(f"finetune.py flags such as {args.finetune_flags[0]} go with --seeds")
    for flag, known in (("modes", MODES), ("precision", PRECISIONS)):
        unknown = [value for value in getattr(args, flag).split(",") if value not in known]
        if unknown:
            parser.error(f"--{flag}: unknown {flag.rstrip('s')} {unknown[0]!r} (choose from "
                         f"{', '.join(known)})")
    for precision in args.precision.split(","):  # before hours of runs, not after
        try:
            check_precision(precision, select_device(args.device))
        except InputError as e:
            parser.error(str(e))
    if args.beyond and args.modes == ",".join(MODES) and args.precision != "fp32":
        parser.error("--beyond with every mode also makes its budget, all-data and streaming "
                     "runs, in fp32: give it --precision fp32, or choose its long-text runs "
                     "with --modes (e.g. --modes cache,flexible --precision fp32,bf16)")
    if args.torchrun and (args.quick or "," in args.precision):
        parser.error("--torchrun measures one precision on the whole data: it takes no "
                     "--quick and one --precision")
    if not Path(args.data).is_file():
        parser.error(f"--data: no file at {args.data}; pass the SMS Spam Collection's TSV "
                     f"(or the UCI zip)")
    if args.seeds:
        check_finetune_flags(parser, args.finetune_flags)

    def save(report):
        if args.json:
            write_atomically(args.json, json.dumps(report, indent=2) + "\n")
    if args.explain:
        test_csv = Path(args.explain).parent / "test.csv"
        if not test_csv.is_file():
            parser.error(f"--explain: no test.csv beside {args.explain}: pass the checkpoint "
                         f"in the --out folder finetune.py wrote")
        return save(dict(machine=machine(), **faithfulness_table(args.explain, test_csv,
                                                                 args.device)))
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    if args.torchrun:
        return save(fill_under_torchrun(args, work))
    if args.beyond:
        return beyond(args, work, save)
    if args.quick:
        args.data, args.epochs = quick_sample(args.data, work / "sample.csv"), 1
    if args.seeds:
        return save(repeat_over_seeds(args, work))
    runs = []
    for mode in args.modes.split(","):
        for precision in args.precision.split(","):
            print(f"running {mode} {precision} ...", flush=True)
            flags = [*RANDOM, "--model", args.model, "--data", args.data, "--epochs",
                     str(args.epochs), "--device", args.device, "--precision", precision,
                     *MODES[mode]]
            runs.append(dict(mode=mode, precision=precision,
                             **run_finetune(flags, work / f"{mode}-{precision}")))
            print(f"  {runs[-1]}", flush=True)
    report = {"machine": machine(), "torch": torch.__version__, "model": args.model,
              "epochs": args.epochs, "date": time.strftime("%Y-%m-%d"),
              "runs": [{k: v for k, v in r.items() if k != "checkpoint"}
                       for r in loss_differences(runs)],
              **measure_classify(runs, args.device, args.precision.split(","))}
    print_report(report, args.device)
    save(report)


if __name__ == "__main__":
    run_cli(main)
