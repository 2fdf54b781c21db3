"""Sections 6.4-6.8: load GPT-2, swap its head, fine-tune it as a spam classifier,
evaluate, plot and save it. The classifier module and its checkpoint format are
classify.py's; this file trains them. Listings 6.7-6.11 come first, in the
book's order, then the run's steps as the chapter takes them (main) and its
flags; torchrun, the metrics beyond accuracy, the SVG drawing, the prefix cache
and the rest are in beyond/, each reached from one commented line here.

python finetune.py                      # the whole chapter, with its defaults
python finetune.py --device cuda --out runs/a
"""
import argparse
import contextlib
import os
import time
from pathlib import Path

from beyond.cli import InputError, fraction, positive_float, positive_int, run_cli, seed_number
from beyond.distributed import join_process_group, on_every_rank, ranks, said_by_rank_0, this_ranks_rows, torchrun_ranks
from beyond.fast import GPTClassifier, cache_frozen_prefix
from beyond.files import out_left_as_it_was, publish_run, said_if_interrupted, work_folder, write_atomically
from beyond.labels import class_ids, count_labels
from beyond.lora import lora_description, replace_linear_with_lora
from beyond.memory import memory_size
from beyond.metrics import baseline_and_calibration, metrics_beyond_accuracy, run_record
from beyond.plot import svg_figure
from beyond.pooling import POOLS
from beyond.precision import PRECISIONS, check_precision, loss_scaled
import torch
from classify import CHECKPOINT_NAME, classify_review, save_classifier, select_device
from data import SEED, SPAM_CLASS_NAMES, SPAM_LABELS, SpamDataset, class_names, create_balanced_dataset, create_data_loaders, data_file_path, download_and_unzip_spam_data, extracted_path, load_messages, random_split, read_tsv, url, write_csv, zip_path
from gpt import MODEL_NAMES, build_gpt, get_tokenizer, weights_config


TRAINABLE = {  # which parts train (appendix B's layer experiments; Exercise 6.2 is "all")
    "last_layer": "only the new output layer",
    "last_block": "the last transformer block, final_norm and the new head (the chapter)",
    "last_two_blocks": "the last two transformer blocks, final_norm and the head",
    "all": "every parameter (Exercise 6.2)",
    "lora": "low-rank adapters on every Linear of the blocks, and the head (appendix E)",
}


# ---------------------------------------------------- 6.5 adding a classification head

def prepare_for_classification(model, num_classes, trainable="last_block", seed=SEED,
                               lora_rank=16, lora_alpha=16):
    """Freezes the model, replaces out_head by a num_classes head (listing 6.7),
    then unfreezes what `trainable` names (or adds LoRA adapters, which train)."""
    for param in model.parameters():
        param.requires_grad = False
    torch.manual_seed(seed)
    # not the book's BASE_CONFIG["emb_dim"]: read from the model, so that any size
    # (--model) or config beside the weights gets a head that fits
    emb_dim = model.tok_emb.weight.shape[1]
    model.out_head = torch.nn.Linear(in_features=emb_dim, out_features=num_classes)
    # the chapter unfreezes the last block and final_norm ("last_block"); the other
    # choices are Exercise 6.2's and appendix E's LoRA
    if trainable == "lora":
        replace_linear_with_lora(model.trf_blocks, lora_rank, lora_alpha)
        return model
    unfrozen = {"last_layer": [],
                "last_block": [model.trf_blocks[-1], model.final_norm],
                "last_two_blocks": [*model.trf_blocks[-2:], model.final_norm],
                "all": [model]}[trainable]
    for module in unfrozen:
        for param in module.parameters():
            param.requires_grad = True
    return model


# ------------------------------------------- 6.6 classification loss and accuracy

# Listing 6.8 Calculating the classification accuracy
def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    model.eval()
    correct_predictions, num_examples = 0, 0
    if num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            input_batch = input_batch.to(device)
            target_batch = target_batch.to(device)
            with torch.no_grad():
                logits = model(input_batch)[:, -1, :]  # logits of last output token
            predicted_labels = torch.argmax(logits, dim=-1)
            num_examples += predicted_labels.shape[0]
            correct_predictions += (predicted_labels == target_batch).sum().item()
        else:
            break
    return correct_predictions / num_examples


def calc_loss_batch(input_batch, target_batch, model, device):
    input_batch = input_batch.to(device)
    target_batch = target_batch.to(device)
    logits = model(input_batch)[:, -1, :]  # logits of last output token
    loss = torch.nn.functional.cross_entropy(logits, target_batch)
    return loss


# Listing 6.9 Calculating the classification loss
def calc_loss_loader(data_loader, model, device, num_batches=None):
    total_loss = 0.
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            total_loss += loss.item()
        else:
            break
    return total_loss / num_batches


# --------------------------------------------------- 6.7 fine-tuning the model

# Listing 6.10 Fine-tuning the model to classify spam
def train_classifier_simple(model, train_loader, val_loader, optimizer, device,
                            num_epochs, eval_freq, eval_iter):
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1

    for epoch in range(num_epochs):
        model.train()

        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            examples_seen += input_batch.shape[0]  # examples instead of tokens
            global_step += 1

            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

        train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
        print(f"Training accuracy: {train_accuracy*100:.2f}% | ", end="")
        print(f"Validation accuracy: {val_accuracy*100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)

    return train_losses, val_losses, train_accs, val_accs, examples_seen


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def plot_values(epochs_seen, examples_seen, train_values, val_values, label="loss",
                out_dir="."):
    """Listing 6.11: training and validation values against epochs and examples
    seen, saved as <label>-plot.svg in out_dir."""
    # not the book's: an SVG drawn by hand (svg_figure, in "a Matplotlib stand-in"
    # below) for its plt.subplots, ax1.plot, twiny, legend and savefig, because
    # this project does not depend on Matplotlib; and the book's PDF is an SVG
    figure = svg_figure(epochs_seen, examples_seen, train_values, val_values, label)
    path = Path(out_dir) / f"{label}-plot.svg"
    write_atomically(path, figure)
    return path


# --------------------------- the chapter's steps in order: what `python finetune.py` runs

def main(argv=None):
    rank, world, local_rank = torchrun_ranks()
    # one writer: the other ranks print nothing but errors
    with contextlib.redirect_stdout(open(os.devnull, "w")) if rank else contextlib.nullcontext():
        return run(argv, rank, world, local_rank)


def run(argv, rank, world, local_rank):
    with contextlib.ExitStack() as cleanup:
        with said_by_rank_0(rank):
            args, device, config = parse_and_check(argv, world)  # the device: select_device
            out = Path(args.out)
            rows = load_rows(args)
            work = work_folder(out, rank, cleanup)  # only now: bad data leaves no folder
            label_ids, splits = prepare_splits(args, rows, work)  # 6.2
            tokenizer = get_tokenizer()  # 6.3
            datasets = create_datasets(work, tokenizer, args.max_length,
                                       config["context_length"], args.pool, len(label_ids))
        device = join_process_group(args, device, world, local_rank, cleanup)  # torchrun
        return fine_tune_and_save(args, label_ids, splits, tokenizer, datasets, device,
                                  out, work, cleanup)


def fine_tune_and_save(args, label_ids, splits, tokenizer, datasets, device, out, work,
                       cleanup):
    """Sections 6.4-6.8 once the data is ready: the model, its training and
    evaluation (by every rank), the plots, metrics and checkpoint (by rank 0),
    written into `work` and moved into `out` at the end."""
    names = class_names(label_ids)
    max_length = datasets[0].max_length
    loaders = create_data_loaders(*datasets, batch_size=args.batch_size)
    loaders = this_ranks_rows(loaders)  # a progress line on a terminal
    for loader in loaders:
        print(f"{len(loader)} {loader.name} batches")
    classifier, config, cache = prepare_model(args, len(label_ids), datasets, device, work,
                                              cleanup)
    writer = ranks()[0] == 0
    # the base file is hashed once, by the process that writes the checkpoint
    lora = lora_description(args) if args.trainable == "lora" and writer else None
    model = on_every_rank(classifier, device)  # torchrun: the batch's rows shared
    print_initial_metrics(model, loaders, device, args.seed)  # 6.6

    checkpoint = out / CHECKPOINT_NAME  # 6.7
    results, train_seconds = fine_tune(model, loaders[0], loaders[1], device, args, checkpoint)
    if writer:
        with out_left_as_it_was(out):
            plot_curves(results, args.epochs, work)
    metrics = final_metrics(model, loaders, device, names)
    metrics.update(run_record(args, train_seconds, classifier, cache))
    if writer:
        calibration = baseline_and_calibration(classifier, metrics, loaders, device, args,
                                               label_ids, splits, work, out)
        with out_left_as_it_was(out):  # 6.8
            save_classifier(classifier, work / CHECKPOINT_NAME, config, max_length, names,
                            lora=lora, trainable=args.trainable, calibration=calibration)
        publish_run(metrics, work, checkpoint, names)
        if names == SPAM_CLASS_NAMES:
            classify_examples(classifier, tokenizer, device, max_length)
    return dict(metrics, checkpoint=str(checkpoint))


def load_rows(args):
    """[(label, text)] from --data, or downloaded as listing 6.1 does."""
    if args.data:
        return load_messages(args.data)
    download_and_unzip_spam_data(url, zip_path, extracted_path, data_file_path)
    return read_tsv(data_file_path, labels=SPAM_LABELS)


def prepare_splits(args, rows, out):
    """Section 6.2: balance, split and write train/validation/test.csv into out.
    Returns label -> class id and the three splits of (label, text) rows."""
    print(f"Dataset: {len(rows)} messages, label counts {count_labels(rows)}")
    label_ids = class_ids(rows)
    if not args.no_balance:
        rows = create_balanced_dataset(rows, seed=args.seed)
        print(f"Balanced: label counts {count_labels(rows)}")
    splits = random_split(rows, 0.7, 0.1, seed=args.seed)
    for name, split in zip(["train", "validation", "test"], splits):
        write_csv(split, out / f"{name}.csv", label_ids)
    if len(splits[0]) < args.batch_size:
        raise InputError(f"the training set has {len(splits[0])} messages, fewer than one "
                         f"batch of {args.batch_size}: lower --batch-size or add data.")
    return label_ids, splits


def create_datasets(out, tokenizer, max_length, context_length, pool, num_classes):
    """Section 6.3: the three SpamDatasets, validation and test cut to the
    training set's max_length, which never exceeds the model's context."""
    settings = {"pad": pool == "last",  # the other pools read real tokens: pad per batch
                "num_classes": num_classes}
    train_dataset = SpamDataset(out / "train.csv", tokenizer, max_length=max_length, **settings)
    if train_dataset.max_length > context_length:
        train_dataset = SpamDataset(out / "train.csv", tokenizer, max_length=context_length,
                                    **settings)
    max_length = train_dataset.max_length
    val_dataset = SpamDataset(out / "validation.csv", tokenizer, max_length=max_length,
                              **settings)
    test_dataset = SpamDataset(out / "test.csv", tokenizer, max_length=max_length, **settings)
    print(f"Longest training sequence (max_length): {max_length} tokens")
    return train_dataset, val_dataset, test_dataset


def prepare_model(args, num_classes, datasets, device, work, cleanup):
    """Sections 6.4-6.5: GPT-2 with the new head, on the device. Returns the
    classifier, its config and what its prefix cache was allowed and needed."""
    torch.manual_seed(args.seed)  # 6.4
    gpt, config = build_gpt(args.model, args.weights)
    prepare_for_classification(gpt, num_classes=num_classes, trainable=args.trainable,
                               seed=args.seed, lora_rank=args.lora_rank,
                               lora_alpha=args.lora_alpha)  # 6.5
    classifier = GPTClassifier(gpt, pool=args.pool, fast=not args.plain,
                               precision=args.precision).to(device)
    # not the chapter's: the frozen layers' output computed once (not with --plain)
    cache = cache_frozen_prefix(classifier, args, datasets, device, work, cleanup)
    return classifier, config, cache


def print_initial_metrics(model, loaders, device, seed):
    """Section 6.6: accuracy on 10 batches and loss on 5, before fine-tuning."""
    torch.manual_seed(seed)
    names = ["Training", "Validation", "Test"]
    for name, loader in zip(names, loaders):
        print(f"{name} accuracy: "
              f"{calc_accuracy_loader(loader, model, device, num_batches=10)*100:.2f}%")
    with torch.inference_mode():
        for name, loader in zip(names, loaders):
            print(f"{name} loss: {calc_loss_loader(loader, model, device, num_batches=5):.3f}")


def fine_tune(model, train_loader, val_loader, device, args, checkpoint):
    """Section 6.7's run of train_classifier_simple; Ctrl-C says what is saved."""
    start_time = time.time()
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    if args.precision == "fp16":  # not the chapter's: float16's gradients need scaling
        optimizer = loss_scaled(optimizer, model, device)
    with said_if_interrupted(checkpoint):
        results = train_classifier_simple(model, train_loader, val_loader, optimizer, device,
                                          num_epochs=args.epochs, eval_freq=50, eval_iter=5)
    end_time = time.time()
    execution_time_minutes = (end_time - start_time) / 60
    print(f"Training completed in {execution_time_minutes:.2f} minutes.")
    return results, end_time - start_time


def plot_curves(results, num_epochs, out):
    """Listing 6.11's two calls: loss and accuracy against epochs and examples."""
    train_losses, val_losses, train_accs, val_accs, examples_seen = results
    for label, train_values, val_values in [("loss", train_losses, val_losses),
                                            ("accuracy", train_accs, val_accs)]:
        epochs_tensor = torch.linspace(0, num_epochs, len(train_values))
        examples_seen_tensor = torch.linspace(0, examples_seen, len(train_values))
        plot_values(epochs_tensor.tolist(), examples_seen_tensor.tolist(), train_values,
                    val_values, label=label, out_dir=out)


def final_metrics(model, loaders, device, names):
    """The full training, validation and test accuracy (section 6.7), then (not
    the chapter's) the test set's per-class metrics and confusion matrix."""
    train_accuracy, val_accuracy, test_accuracy = (
        calc_accuracy_loader(loader, model, device) for loader in loaders)
    print(f"Training accuracy: {train_accuracy*100:.2f}%")
    print(f"Validation accuracy: {val_accuracy*100:.2f}%")
    print(f"Test accuracy: {test_accuracy*100:.2f}%")
    return {"train_accuracy": train_accuracy, "val_accuracy": val_accuracy,
            "test_accuracy": test_accuracy,
            **metrics_beyond_accuracy(model, loaders[2], device, names)}


def classify_examples(model, tokenizer, device, max_length):
    """Section 6.8's two example texts."""
    for text in ["You are a winner you have been specially selected to receive $1000 "
                 "cash or a $2000 award.",
                 "Hey, just wanted to check if we're still on for dinner tonight? "
                 "Let me know!"]:
        print(f"{classify_review(text, model, tokenizer, device, max_length=max_length)}: {text}")


# ===== beyond the chapter: the command line =====


def build_parser():
    parser = argparse.ArgumentParser(
        description="Fine-tune GPT-2 to classify SMS messages as spam or not spam, "
                    "as chapter 6 does. With no flags it runs the whole chapter: "
                    "downloads the data and the gpt2-small weights, fine-tunes for 5 "
                    "epochs, writes train/validation/test.csv, loss-plot.svg, "
                    "accuracy-plot.svg and review_classifier.safetensors. After the "
                    "chapter's metrics: a temperature fitted on validation, expected "
                    "calibration error, reliability-plot.svg and, for two classes, "
                    "roc-plot.svg, pr-plot.svg and a threshold for --target-fpr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to train (section 6.6's device); auto picks cuda, then "
                             "mps (torch >= 2.9), then cpu")
    parser.add_argument("--model", default="gpt2-small", choices=list(MODEL_NAMES),
                        help="GPT-2 size (section 6.4's CHOOSE_MODEL); a config.json (or "
                             "OpenAI's hparams.json) beside --weights PATH overrides it")
    parser.add_argument("--weights", default="pretrained",
                        help="'pretrained' (section 6.4: gpt2/<size>/ as chapter 5 left it "
                             "with OpenAI's checkpoint, else the Hub's model.safetensors "
                             "downloaded there once, else OpenAI's files), 'random' "
                             "(untrained: appendix B's random-weights experiment, and "
                             "timing), or a local file: a model.safetensors (Hub layout), "
                             "the book's .pth, or OpenAI's model.ckpt (its prefix or any "
                             "of its files); or a folder holding a model.safetensors (+ "
                             "config.json) or OpenAI's checkpoint (hparams.json, "
                             "model.ckpt.*)")
    parser.add_argument("--data", metavar="PATH",
                        help="a local SMSSpamCollection TSV or the UCI zip, instead of "
                             "downloading it into sms_spam_collection/ (listing 6.1); or your own data: "
                             "a label<TAB>text TSV or a CSV with Label,Text columns, whose "
                             "distinct labels (2 or more) are the classes")
    parser.add_argument("--out", default=".", metavar="DIR",
                        help="where the CSV splits, plots, metrics.json and the checkpoint are "
                             "written (the chapter: the current directory); they replace the "
                             "earlier run's only once this run has succeeded")
    parser.add_argument("--epochs", type=positive_int, default=5, help="training epochs (section 6.7: num_epochs)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="messages per batch (listing 6.5)")
    parser.add_argument("--lr", type=positive_float, default=5e-5,
                        help="AdamW learning rate, weight decay 0.1 (section 6.7)")
    parser.add_argument("--seed", type=seed_number, default=SEED,
                        help="seed of the balancing, split, shuffling, new head and random "
                             "weights (the chapter's 123)")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="pad/truncate messages to N tokens (Exercise 6.1; 1024 is "
                             "the full context); default: the longest training message")
    parser.add_argument("--trainable", default="last_block", choices=list(TRAINABLE),
                        help="what trains: " + "; ".join(f"{k}: {v}" for k, v in TRAINABLE.items()))
    parser.add_argument("--pool", default="last", choices=list(POOLS),
                        help="which output the head reads: " + "; ".join(
                            f"{k}: {v}" for k, v in POOLS.items()))
    parser.add_argument("--lora-rank", type=positive_int, default=16,
                        help="rank r of the LoRA adapters (--trainable lora; appendix E)")
    parser.add_argument("--lora-alpha", type=positive_float, default=16,
                        help="LoRA scale alpha: the update is alpha/r * x A B (appendix E)")
    parser.add_argument("--no-balance", action="store_true",
                        help="keep the data as it is instead of undersampling every class "
                             "to the smallest (listing 6.2)")
    parser.add_argument("--target-fpr", type=fraction, default=0.01, metavar="RATE",
                        help="after the test metrics (two classes): choose the threshold on "
                             "P(spam) whose false-positive rate on the validation split, the "
                             "share of real messages flagged as spam, is at most RATE; saved "
                             "in the checkpoint for classify.py --threshold validated")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the naive Bayes baseline (word counts, same split) "
                             "printed beside the GPT's final accuracy (section 6.7)")
    parser.add_argument("--plain", action="store_true",
                        help="run every layer on every batch as section 6.7 does, instead "
                             "of caching the frozen layers' output and computing the last "
                             "block at the pooled position only (same results, slower)")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="the matrix products' precision: fp32 (the chapter); bf16, "
                             "bfloat16 mixed precision (torch.autocast: 1.4-1.8x faster on a "
                             "CPU with avx512_bf16, measured; slower where a CPU lacks "
                             "bfloat16 units; weights, AdamW's state "
                             "and the checkpoint stay float32; the frozen layers' cached "
                             "output is kept in bfloat16, half the bytes); fp16, float16 "
                             "mixed precision with loss scaling (CUDA only: GPUs without "
                             "bfloat16, such as the T4)")
    parser.add_argument("--cache-memory", type=memory_size, default="auto", metavar="SIZE",
                        help="memory the frozen layers' cached output may take on the device: "
                             "a size such as 500MB or 2GB, 0 for no cache, or auto: half of "
                             "the free GPU memory (cuda), of what Metal recommends (mps, "
                             "torch >= 2.5) or of the available RAM (cpu; the physical RAM "
                             "on macOS) when the cache is made, the RAM's half divided among "
                             "torchrun's processes on the machine. What does not fit goes to "
                             "a temporary file in --out, read back at each batch (same "
                             "results)")
    return parser


def parse_and_check(argv, world):
    """The flags, checked before any data is read, by every rank under torchrun
    (world processes): (args, the device select_device picks, the model config)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = select_device(args.device)
    if world > 1 and device.type == "mps":
        parser.error("--device mps (which auto picks on a Mac) cannot run under "
                     "torchrun: its gloo backend takes CPU tensors only; use "
                     "--device cpu, or one process without torchrun")
    config = check_args(parser, args, world)
    check_precision(args.precision, device)
    return args, device, config


def check_args(parser, args, world):
    """What the flags must satisfy beyond their own types; returns the model config
    (a --weights file's header is read here, before any data)."""
    config = weights_config(args.model, args.weights)
    if args.max_length and args.max_length > config["context_length"]:
        parser.error(f"--max-length {args.max_length} is above the model's context "
                     f"length {config['context_length']}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; it takes a folder (made if missing)")
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} does not divide among {world} "
                     f"processes: each takes an equal share of every batch")
    if args.trainable != "lora" and (args.lora_rank, args.lora_alpha) != (
            parser.get_default("lora_rank"), parser.get_default("lora_alpha")):
        parser.error("--lora-rank and --lora-alpha go with --trainable lora")
    return config


if __name__ == "__main__":
    run_cli(main)
