"""Sections 6.4-6.8: load GPT-2, swap its head, fine-tune it as a spam classifier,
evaluate, plot and save it. The classifier module and its checkpoint format are
classify.py's; this file trains them. Listings 6.7-6.11 come first, in the
book's order, then the run's steps as the chapter takes them (main); torchrun,
the metrics beyond accuracy, the SVG drawing and the rest follow under
"# ===== beyond the chapter".

python finetune.py                      # the whole chapter, with its defaults
python finetune.py --device cuda --out runs/a
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

from gpt import (InputError, MODEL_NAMES, build_gpt, download_gpt2, file_fingerprint,
                 get_tokenizer, gpt2_weights_path, interrupted_status, progress, run_cli,
                 weights_config, weights_file)
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from data import (SEED, SPAM_CLASS_NAMES, SPAM_LABELS, SpamDataset, class_ids, class_names,
                  count_labels, create_balanced_dataset, create_data_loaders, data_file_path,
                  download_and_unzip_spam_data, extracted_path, load_messages, random_split,
                  read_tsv, url, write_atomically, write_csv, zip_path)
from classify import (CHECKPOINT_NAME, POOLS, PRECISIONS, GPTClassifier, cache_size,
                      check_precision, classify_review, replace_linear_with_lora,
                      save_classifier, select_device)

# A collective that waits longer than this (a rank stuck or gone) ends the job.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


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
                # the chapter's model(input_batch)[:, -1, :]: GPTClassifier reads
                # the last output token itself (or the one --pool names)
                logits = model(input_batch)
            predicted_labels = torch.argmax(logits, dim=-1)
            num_examples += predicted_labels.shape[0]
            correct_predictions += (predicted_labels == target_batch).sum().item()
        else:
            break
    # not in the book: under torchrun each rank counted its rows (ThisRanksRows)
    correct_predictions, num_examples = global_sum(device, correct_predictions, num_examples)
    return correct_predictions / num_examples


def calc_loss_batch(input_batch, target_batch, model, device):
    input_batch = input_batch.to(device)
    target_batch = target_batch.to(device)
    logits = model(input_batch)  # the chapter's model(input_batch)[:, -1, :], as above
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
            # the book's loss.item(); under torchrun, over every rank's rows
            total_loss += whole_batch_loss(loss, target_batch)
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
    loaders = this_ranks_rows(loaders)  # under torchrun: each rank's rows of every batch
    for loader in loaders:
        print(f"{len(loader)} {loader.name} batches")
    classifier, config, cache = prepare_model(args, len(label_ids), datasets, device, work,
                                              cleanup)
    writer = ranks()[0] == 0
    # the base file is hashed once, by the process that writes the checkpoint
    lora = lora_description(args) if args.trainable == "lora" and writer else None
    model = on_every_rank(classifier, device)  # torchrun: DDP averages the gradients
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
        publish_run(metrics, work, out, names)
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
    *curves, examples_seen = results  # under torchrun, the rows this rank trained on: add up
    return (*curves, int(global_sum(device, examples_seen)[0])), end_time - start_time


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


# ===== beyond the chapter: several processes (torchrun), the same results =====

def torchrun_ranks():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0)
    for a plain python finetune.py."""
    return tuple(int(os.environ.get(name, default)) for name, default in
                 [("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)])


def ranks():
    """(this process's rank, number of processes) in the running process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ThisRanksRows:
    """A data loader's batches as this process uses them: under torchrun, its
    share of each batch's rows, so that N ranks step through the chapter's
    batches together (the gradients DDP averages, and the counts and losses
    the listings add up, are the whole batch's); on a terminal, a progress line.
    One process: the batches as they are."""

    def __init__(self, data_loader, name):
        self.data_loader, self.name = data_loader, name

    def __len__(self):
        return len(self.data_loader)

    def __iter__(self):
        rank, world = ranks()
        start = time.time()
        for i, batch in enumerate(self.data_loader, 1):
            # the last, short batch of a loader may split unevenly, or leave a rank none
            yield [rows[rank * len(rows) // world:(rank + 1) * len(rows) // world]
                   for rows in batch]
            progress(f"{self.name} batches", i, len(self.data_loader), start)


def this_ranks_rows(loaders):
    """The training, validation and test loaders as ThisRanksRows: the split of
    each batch among torchrun's ranks happens here, not in the listings."""
    return [ThisRanksRows(loader, name)
            for loader, name in zip(loaders, ["training", "validation", "test"])]


def on_every_rank(classifier, device):
    """The model the listings train: under torchrun, the classifier inside
    DistributedDataParallel, which averages the gradients over the ranks."""
    if ranks()[1] == 1:
        return classifier
    return DistributedDataParallel(
        classifier, device_ids=[device.index] if device.type == "cuda" else None)


def global_sum(device, *values):
    """The sums of values over all ranks (the values themselves in one process)."""
    if ranks()[1] == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def whole_batch_loss(loss, target_batch):
    """loss.item(): the batch's mean loss. Under torchrun, where loss is the mean
    over this rank's rows of the batch, the mean over all its rows."""
    if ranks()[1] == 1:
        return loss.item()
    rows = target_batch.shape[0]
    loss_sum, batch_rows = global_sum(loss.device, loss.item() * rows if rows else 0.0, rows)
    return loss_sum / batch_rows


@contextlib.contextmanager
def said_by_rank_0(rank):
    """Before the process group starts, every rank meets the same bad flag or bad
    data: only rank 0 says so, the others end quietly with the same status."""
    if rank == 0:
        yield
        return
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        try:
            yield
        except InputError:
            sys.exit(1)


def join_process_group(args, device, world, local_rank, cleanup):
    """Under torchrun (world > 1): the pretrained weights downloaded first, then
    this process in the process group, which `cleanup` (an ExitStack) ends with
    the run. Returns this process's device (in one process, the one given)."""
    if world == 1:
        return device
    if args.weights == "pretrained":
        download_before_process_group(args.model, local_rank)
    cleanup.callback(end_process_group)
    return start_process_group(device, local_rank)


def end_process_group():
    if dist.is_initialized():  # not if starting it failed
        dist.destroy_process_group()


def start_process_group(device, local_rank):
    """torchrun's environment -> a process group: NCCL between GPUs (one per
    process), gloo between CPU processes. Returns this process's device."""
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=COLLECTIVE_TIMEOUT)
    return device


def download_before_process_group(model_name, local_rank):
    """Under torchrun, the pretrained weights are downloaded before the process
    group starts, whose collectives time out (gpt2-xl is 6.4 GB): one download
    per machine, by local rank 0; the others wait for the file (torchrun ends
    them if the download fails)."""
    if local_rank == 0:
        download_gpt2(model_name)
    # asked anew each time: where the Hub fails, OpenAI's files arrive instead
    while not gpt2_weights_path(model_name).exists():
        time.sleep(1)


# ===== beyond the chapter: --precision fp16's loss scaling =====

class LossScaledOptimizer:
    """The optimizer, stepped through torch.amp's GradScaler: float16's small
    gradients underflow to 0 unless scaled up. The classifier multiplies the
    gradient by the scale where it enters the model (its grad_scaler); step()
    divides it out again, skips a step whose gradients overflowed and adjusts
    the scale. Listing 6.10 calls zero_grad and step, as on the optimizer."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()


def loss_scaled(optimizer, model, device):
    """The optimizer for --precision fp16, and the classifier's scaler set."""
    classifier = getattr(model, "module", model)  # inside DistributedDataParallel
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        scaler = torch.amp.GradScaler(device.type)
    else:
        scaler = torch.cuda.amp.GradScaler()
    classifier.grad_scaler = scaler
    return LossScaledOptimizer(optimizer, scaler)


# ===== beyond the chapter: metrics a spam filter needs, a baseline =====

def metrics_beyond_accuracy(model, test_loader, device, names):
    """The test set's per-class precision, recall and F1 and its confusion
    matrix, printed after the chapter's accuracies and kept for metrics.json."""
    counts = confusion_matrix_loader(test_loader, model, device, len(names))
    per_class = per_class_metrics(counts, names)
    print_test_metrics(per_class, counts, names)
    return {"labels": names, "test_per_class": per_class, "test_confusion_matrix": counts}


def run_record(args, train_seconds, classifier, cache):
    """What metrics.json keeps of the run beside its metrics: the training time,
    the flags, and what the prefix cache was allowed, needed and held."""
    return {"train_seconds": round(train_seconds, 1), "args": vars(args),
            "prefix_cache": dict(cache, memory_bytes=classifier.prefix_cache.memory_bytes,
                                 file_bytes=classifier.prefix_cache.file_bytes)}


def baseline_and_calibration(classifier, metrics, loaders, device, args, label_ids, splits,
                             work, out):
    """Rank 0's metrics after the chapter's final accuracy: the naive Bayes
    baseline and the calibration, added to metrics (its plots written into
    `work`). Returns what the checkpoint keeps of the calibration."""
    if not args.no_baseline:
        metrics["naive_bayes"] = naive_bayes_baseline(label_ids, splits)
    with out_left_as_it_was(out):
        # rank 0 alone, on every row: the loaders' whole batches, not its share
        metrics["calibration"], calibration = calibrate(
            classifier, [loader.data_loader for loader in loaders], device,
            class_names(label_ids), args.target_fpr, work)
    return calibration


def confusion_matrix_loader(data_loader, model, device, num_classes):
    """counts[true class][predicted class] over a whole loader."""
    model.eval()
    counts = [[0] * num_classes for _ in range(num_classes)]
    with torch.inference_mode():
        for input_batch, target_batch in data_loader:  # under torchrun, this rank's rows
            predicted = torch.argmax(model(input_batch.to(device)), dim=-1)
            for true, guess in zip(target_batch.tolist(), predicted.tolist()):
                counts[true][guess] += 1
    flat = global_sum(device, *(n for row in counts for n in row))
    return [[int(n) for n in flat[i:i + num_classes]]
            for i in range(0, len(flat), num_classes)]


def per_class_metrics(counts, names):
    """Precision, recall and F1 of each class from a confusion matrix."""
    metrics = {}
    for i, name in enumerate(names):
        predicted = sum(row[i] for row in counts)
        actual = sum(counts[i])
        precision = counts[i][i] / predicted if predicted else 0.0
        recall = counts[i][i] / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        metrics[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return metrics


def print_test_metrics(metrics, counts, names):
    width = max(len(name) for name in names) + 2
    print(f"{'Test set':<{width}}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}")
    for name, m in metrics.items():
        print(f"{name:<{width}}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>8.3f}"
              f"{m['support']:>9}")
    print("Confusion matrix (rows: true class, columns: predicted):")
    print(" " * width + "".join(f"{name[:10]:>11}" for name in names))
    for name, row in zip(names, counts):
        print(f"{name:<{width}}" + "".join(f"{n:>11}" for n in row))


def words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def fit_naive_bayes(rows):
    """Multinomial naive Bayes over lower-cased word counts, Laplace smoothing:
    the baseline a GPT classifier has to beat. rows: [(class id, text)]."""
    counts, totals, docs, vocabulary = {}, {}, {}, set()
    for label, text in rows:
        docs[label] = docs.get(label, 0) + 1
        class_counts = counts.setdefault(label, {})
        for word in words(text):
            class_counts[word] = class_counts.get(word, 0) + 1
            totals[label] = totals.get(label, 0) + 1
            vocabulary.add(word)
    return {"counts": counts, "totals": totals, "vocabulary_size": len(vocabulary),
            "log_priors": {c: math.log(n / len(rows)) for c, n in docs.items()}}


def predict_naive_bayes(model, text):
    def log_likelihood(label):
        counts, total = model["counts"][label], model["totals"].get(label, 0)
        denominator = math.log(total + model["vocabulary_size"] + 1)
        return model["log_priors"][label] + sum(
            math.log(counts.get(word, 0) + 1) - denominator for word in words(text))
    return max(model["log_priors"], key=log_likelihood)


def naive_bayes_accuracy(model, rows):
    return sum(predict_naive_bayes(model, text) == label for label, text in rows) / len(rows)


def naive_bayes_baseline(label_ids, splits):
    """The baseline's validation and test accuracy on the same split."""
    train, validation, test = ([(label_ids[label], text) for label, text in split]
                               for split in splits)
    baseline = fit_naive_bayes(train)
    result = {"val_accuracy": naive_bayes_accuracy(baseline, validation),
              "test_accuracy": naive_bayes_accuracy(baseline, test)}
    print(f"Naive Bayes baseline (word counts, same split): validation accuracy "
          f"{result['val_accuracy']*100:.2f}%, test accuracy {result['test_accuracy']*100:.2f}%")
    return result


# ===== beyond the chapter: a Matplotlib stand-in (SVG by hand) =====

SVG_SIZE = {"width": 500, "height": 300, "left": 64, "right": 16, "top": 48, "bottom": 44}
TRAIN_STYLE = 'stroke="#1f77b4"'                              # solid, as in the chapter
VALIDATION_STYLE = 'stroke="#ff7f0e" stroke-dasharray="7 4"'  # dashed


def nice_ticks(lo, hi, count=5):
    """About `count` round tick values covering [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw)
    first = math.floor(lo / step + 1e-9)
    ticks = []
    while not ticks or ticks[-1] < hi - 1e-9:
        ticks.append(round((first + len(ticks)) * step, 10))
    return ticks


def svg_figure(epochs_seen, examples_seen, train_values, val_values, label):
    """What plot_values asks of Matplotlib, as the text of an SVG file: training
    (solid) and validation (dashed) values against epochs (bottom axis) and
    examples seen (top axis, the book's ax2 = ax1.twiny()), with a legend."""
    epochs_seen, examples_seen = list(map(float, epochs_seen)), list(map(float, examples_seen))
    values = [v for v in list(train_values) + list(val_values) if math.isfinite(v)]
    y_ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
    x_ticks = nice_ticks(0.0, epochs_seen[-1] if epochs_seen[-1] > 0 else 1.0)
    w, h = SVG_SIZE["width"], SVG_SIZE["height"]
    left, right, top, bottom = (SVG_SIZE[k] for k in ("left", "right", "top", "bottom"))

    def sx(epoch):
        return left + (w - left - right) * epoch / x_ticks[-1]

    def sy(value):
        return h - bottom - (h - top - bottom) * (value - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])

    # the top axis: examples seen grow linearly with the epochs
    per_epoch = examples_seen[-1] / epochs_seen[-1] if epochs_seen[-1] else 0
    top_ticks = [(sx(n / per_epoch), n) for n in nice_ticks(0.0, max(per_epoch * x_ticks[-1], 1))
                 if n <= per_epoch * x_ticks[-1] + 1e-9] if per_epoch else []
    ends = [v[-1] for v in (train_values, val_values) if len(v) and math.isfinite(v[-1])]
    curves_end_high = bool(ends) and sum(ends) / len(ends) > (y_ticks[0] + y_ticks[-1]) / 2
    svg = (svg_axes(label, [(sx(x), x) for x in x_ticks], top_ticks, [(sy(y), y) for y in y_ticks])
           + [svg_curve([(sx(x), sy(y)) for x, y in zip(epochs_seen, train_values)
                         if math.isfinite(y)], TRAIN_STYLE),
              svg_curve([(sx(x), sy(y)) for x, y in zip(epochs_seen, val_values)
                         if math.isfinite(y)], VALIDATION_STYLE)]
           + svg_legend(label, at_bottom=curves_end_high) + ["</svg>"])
    return "\n".join(svg) + "\n"


def svg_axes(label, bottom_ticks, top_ticks, left_ticks, x_label="Epochs",
             top_label="Examples seen"):
    """The frame, ticks and axis labels; ticks are (position, value) pairs."""
    w, h = SVG_SIZE["width"], SVG_SIZE["height"]
    left, right, top, bottom = (SVG_SIZE[k] for k in ("left", "right", "top", "bottom"))
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
           f'fill="none" stroke="black"/>']
    for x, value in bottom_ticks:
        svg += [f'<line x1="{x:.1f}" y1="{h - bottom}" x2="{x:.1f}" y2="{h - bottom + 4}" '
                f'stroke="black"/>',
                f'<text x="{x:.1f}" y="{h - bottom + 16}" text-anchor="middle">{value:g}</text>']
    for x, value in top_ticks:
        svg += [f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top - 4}" stroke="black"/>',
                f'<text x="{x:.1f}" y="{top - 7}" text-anchor="middle">{value:g}</text>']
    for y, value in left_ticks:
        svg += [f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="black"/>',
                f'<text x="{left - 7}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>']
    middle = (left + w - right) / 2
    return svg + [
        f'<text x="{middle}" y="{h - 8}" text-anchor="middle">{x_label}</text>',
        f'<text x="{middle}" y="14" text-anchor="middle">{top_label}</text>',
        f'<text transform="translate(16 {(top + h - bottom) / 2}) rotate(-90)" '
        f'text-anchor="middle">{label.capitalize()}</text>']


def svg_curve(points, style):
    if len(points) == 1:  # a polyline of one point is invisible
        return f'<circle cx="{points[0][0]:.1f}" cy="{points[0][1]:.1f}" r="3" {style}/>'
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline points="{coords}" fill="none" stroke-width="1.8" {style}/>'


def svg_legend(label, at_bottom):
    """Top right, or bottom right where the curves end high (accuracy)."""
    width = 48 + 6.4 * len(f"Validation {label}")
    x = SVG_SIZE["width"] - SVG_SIZE["right"] - 10 - width
    y = SVG_SIZE["height"] - SVG_SIZE["bottom"] - 50 if at_bottom else SVG_SIZE["top"] + 10
    svg = [f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="40" fill="white" '
           f'stroke="#ccc"/>']
    for row, (name, style) in enumerate([("Training", TRAIN_STYLE),
                                         ("Validation", VALIDATION_STYLE)]):
        line_y = y + 13 + 16 * row
        svg += [f'<line x1="{x + 8:.1f}" y1="{line_y}" x2="{x + 34:.1f}" y2="{line_y}" '
                f'stroke-width="1.8" {style}/>',
                f'<text x="{x + 40:.1f}" y="{line_y + 4}">{name} {label}</text>']
    return svg


# ===== beyond the chapter: how sure: calibration and an operating point =====

ECE_BINS = 15


def collect_logits(data_loader, model, device):
    """(logits (N, num_classes) in float32 on the CPU, targets (N,)) of a whole loader."""
    model.eval()
    logits, targets = [], []
    with torch.inference_mode():
        for input_batch, target_batch in data_loader:
            logits.append(model(input_batch.to(device)).float().cpu())
            targets.append(target_batch)
    return torch.cat(logits), torch.cat(targets)


def scaled_probas(logits, temperature):
    # as classify.py computes them, so that a threshold means the same there
    return torch.softmax(logits.float() / temperature, dim=-1)


def nll(logits, targets, temperature=1.0):
    """Mean negative log-likelihood of softmax(logits / temperature), in float64."""
    if len(targets) == 0:
        return float("nan")
    return torch.nn.functional.cross_entropy(logits.double() / temperature, targets).item()


TEMPERATURE_RANGE = (0.05, 20.0)  # beyond it the probabilities are all 0/1 or all equal


def fit_temperature(logits, targets, lowest=TEMPERATURE_RANGE[0], highest=TEMPERATURE_RANGE[1],
                    steps=80):
    """Temperature scaling (Guo et al. 2017): the one T that minimizes the NLL of
    softmax(logits / T). The NLL is convex in 1/T, so one minimum: golden-section
    search over log T. T=1 stays where no T in range does better."""
    def cost(u):
        return nll(logits, targets, math.exp(u))

    ratio = (math.sqrt(5) - 1) / 2
    a, b = math.log(lowest), math.log(highest)
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    cost_c, cost_d = cost(c), cost(d)
    for _ in range(steps):
        if cost_c < cost_d:
            b, d, cost_d = d, c, cost_c
            c = b - ratio * (b - a)
            cost_c = cost(c)
        else:
            a, c, cost_c = c, d, cost_d
            d = a + ratio * (b - a)
            cost_d = cost(d)
    temperature = math.exp((a + b) / 2)
    return temperature if nll(logits, targets, temperature) < nll(logits, targets) else 1.0


def reliability_bins(probas, targets, bins=ECE_BINS):
    """Per equal-width bin of confidence (the top probability), bins (i/n, (i+1)/n]
    with 0 in the first: (count, mean confidence, accuracy); None where empty."""
    confidence, predicted = probas.max(dim=1)
    correct = (predicted == targets).double()
    index = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1
    rows = []
    for i in range(bins):
        in_bin = index == i
        count = int(in_bin.sum())
        rows.append((count, confidence[in_bin].double().mean().item(),
                     correct[in_bin].mean().item()) if count else None)
    return rows


def expected_calibration_error(probas, targets, bins=ECE_BINS):
    """ECE: the bins' |accuracy - confidence|, weighted by their share of messages."""
    rows = [row for row in reliability_bins(probas, targets, bins) if row]
    total = sum(count for count, _, _ in rows)
    return sum(count / total * abs(accuracy - confidence) for count, confidence, accuracy in rows)


def ranked_counts(scores, positives):
    """(false positives, true positives) above each distinct score, highest first,
    starting at (0, 0): tied scores move together."""
    pairs = sorted(zip(scores, positives), key=lambda pair: -pair[0])
    counts, fp, tp = [(0, 0)], 0, 0
    for i, (score, positive) in enumerate(pairs):
        tp, fp = tp + bool(positive), fp + (not positive)
        if i + 1 == len(pairs) or pairs[i + 1][0] != score:
            counts.append((fp, tp))
    return counts


def roc_curve(scores, positives):
    """[(false-positive rate, true-positive rate)] and the area under it (trapezoids:
    the share of (positive, negative) pairs ranked right, ties counting half);
    ([], None) without both classes."""
    n_pos = sum(map(bool, positives))
    n_neg = len(positives) - n_pos
    if not n_pos or not n_neg:
        return [], None
    points = [(fp / n_neg, tp / n_pos) for fp, tp in ranked_counts(scores, positives)]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return points, area


def pr_curve(scores, positives):
    """[(recall, precision)] and the average precision: the sum of precision times
    each step in recall; ([], None) without positives."""
    n_pos = sum(map(bool, positives))
    if not n_pos:
        return [], None
    points = [(tp / n_pos, tp / (tp + fp)) for fp, tp in ranked_counts(scores, positives)[1:]]
    steps = zip([(0.0, 1.0)] + points, points)
    return points, sum((r1 - r0) * p1 for (r0, _), (r1, p1) in steps)


def threshold_for_fpr(negative_scores, target_fpr):
    """The lowest threshold t such that "positive where the score is above t" calls
    at most target_fpr of these negatives positive; None without negatives."""
    if not negative_scores:
        return None
    ranked = sorted(negative_scores, reverse=True)
    allowed = math.floor(target_fpr * len(ranked) + 1e-9)  # false positives it may make
    return 0.0 if allowed >= len(ranked) else ranked[allowed]


def rates_at(threshold, scores, positives):
    """(false-positive rate, recall) of "positive where the score is above threshold";
    None for a rate without messages of its class."""
    flagged = [score > threshold for score in scores]
    negatives = [f for f, p in zip(flagged, positives) if not p]
    hits = [f for f, p in zip(flagged, positives) if p]
    return (sum(negatives) / len(negatives) if negatives else None,
            sum(hits) / len(hits) if hits else None)


def calibrate(model, loaders, device, names, target_fpr, out):
    """After the chapter's metrics: the temperature fitted on validation, ECE on
    test before and after, a reliability diagram, and for two classes ROC and PR
    curves and the threshold on P(class 1) for target_fpr. Returns metrics.json's
    "calibration" and what the checkpoint keeps of it."""
    val_logits, val_targets = collect_logits(loaders[1], model, device)
    test_logits, test_targets = collect_logits(loaders[2], model, device)
    temperature = fit_temperature(val_logits, val_targets)
    before, after = (scaled_probas(test_logits, t) for t in (1.0, temperature))
    result = {"temperature": temperature, "val_nll_before": nll(val_logits, val_targets),
              "val_nll_after": nll(val_logits, val_targets, temperature), "ece_bins": ECE_BINS}
    if len(test_targets):
        result.update(test_ece_before=expected_calibration_error(before, test_targets),
                      test_ece_after=expected_calibration_error(after, test_targets))
        plot_reliability(reliability_bins(before, test_targets),
                         reliability_bins(after, test_targets), temperature, out)
    print(f"Temperature scaling (fitted on the validation split): T = {temperature:.3f}, "
          f"validation NLL {result['val_nll_before']:.3f} -> {result['val_nll_after']:.3f}")
    if temperature > 0.99 * TEMPERATURE_RANGE[1] or temperature < 1.01 * TEMPERATURE_RANGE[0]:
        result["temperature_at_bound"] = True
        print(f"note: T is at the end of the range searched {TEMPERATURE_RANGE}: the model's "
              f"probabilities carry little information about its errors (a model near "
              f"chance, or one that is wrong where it is sure)")
    if "test_ece_before" in result:
        print(f"Test ECE ({ECE_BINS} bins): {result['test_ece_before']:.3f} before, "
              f"{result['test_ece_after']:.3f} after temperature scaling")
    if len(names) == 2:
        val_scores = scaled_probas(val_logits, temperature)[:, 1].tolist()
        result.update(operating_point(val_scores, val_targets.tolist(), after[:, 1].tolist(),
                                      test_targets.tolist(), names, target_fpr, out))
    kept = {"temperature": temperature, "threshold": result.get("threshold"),
            "target_fpr": target_fpr if len(names) == 2 else None}
    return result, kept


def operating_point(val_scores, val_targets, test_scores, test_targets, names, target_fpr,
                    out):
    """ROC and PR on the test split (SVG and areas), and the threshold on P(class 1)
    chosen on validation for target_fpr, with the test split's rates at it."""
    roc, roc_auc = roc_curve(test_scores, test_targets)
    pr, pr_auc = pr_curve(test_scores, test_targets)
    threshold = threshold_for_fpr([s for s, y in zip(val_scores, val_targets) if not y],
                                  target_fpr)
    val_fpr, _ = rates_at(threshold, val_scores, val_targets) if threshold is not None \
        else (None, None)
    test_fpr, test_recall = rates_at(threshold, test_scores, test_targets) \
        if threshold is not None else (None, None)
    plot_roc_pr(roc, roc_auc, pr, pr_auc, names[1], out)
    if roc_auc is not None:
        print(f"Test ROC AUC {roc_auc:.3f}, PR AUC (average precision) {pr_auc:.3f}, "
              f"{names[1]} as the positive class")
    if threshold is not None and test_fpr is not None and test_recall is not None:
        print(f"Threshold P({names[1]}) > {threshold:.4f} for a validation false-positive "
              f"rate <= {target_fpr:.1%} (there: {val_fpr:.1%}); on the test split: "
              f"false-positive rate {test_fpr:.1%}, recall {test_recall:.1%}")
    return {"positive_class": names[1], "roc_auc": roc_auc, "pr_auc": pr_auc,
            "target_fpr": target_fpr, "threshold": threshold, "val_fpr": val_fpr,
            "test_fpr": test_fpr, "test_recall": test_recall}


CHANCE_STYLE = 'stroke="#999" stroke-dasharray="3 3"'


def plot_unit_square(path, title, x_label, y_label, curves, key_corner="bottom right"):
    """Curves [(name, points, style)] on axes from 0 to 1, written as an SVG in the
    loss plot's style, the title where the loss plot has its top axis."""
    ticks = nice_ticks(0.0, 1.0)
    w, h = SVG_SIZE["width"], SVG_SIZE["height"]
    left, right, top, bottom = (SVG_SIZE[k] for k in ("left", "right", "top", "bottom"))

    def sx(x):
        return left + (w - left - right) * x

    def sy(y):
        return h - bottom - (h - top - bottom) * y

    svg = svg_axes(y_label, [(sx(t), t) for t in ticks], [], [(sy(t), t) for t in ticks],
                   x_label=x_label, top_label=escape(title))
    svg += [svg_curve([(sx(x), sy(y)) for x, y in points], style)
            for _, points, style in curves if points]
    svg += svg_key([(escape(name), style) for name, _, style in curves], key_corner)
    write_atomically(path, "\n".join(svg + ["</svg>"]) + "\n")


def svg_key(entries, corner):
    """The legend of (name, style) entries in a corner ("top left", "bottom right"...)
    that the curves leave empty."""
    width = 48 + 6.4 * max(len(name) for name, _ in entries)
    x = SVG_SIZE["left"] + 10 if corner.endswith("left") else \
        SVG_SIZE["width"] - SVG_SIZE["right"] - 10 - width
    height = 8 + 16 * len(entries)
    y = SVG_SIZE["top"] + 10 if corner.startswith("top") else \
        SVG_SIZE["height"] - SVG_SIZE["bottom"] - 10 - height
    svg = [f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{height}" fill="white" '
           f'stroke="#ccc"/>']
    for row, (name, style) in enumerate(entries):
        line_y = y + 12 + 16 * row
        svg += [f'<line x1="{x + 8:.1f}" y1="{line_y}" x2="{x + 34:.1f}" y2="{line_y}" '
                f'stroke-width="1.8" {style}/>',
                f'<text x="{x + 40:.1f}" y="{line_y + 4}">{name}</text>']
    return svg


def plot_reliability(bins_before, bins_after, temperature, out):
    """The reliability diagram: each bin's accuracy against its mean confidence."""
    def points(rows):
        return [(confidence, accuracy) for confidence, accuracy in
                ((row[1], row[2]) for row in rows if row)]
    plot_unit_square(Path(out) / "reliability-plot.svg",
                     f"Reliability on the test split, {ECE_BINS} bins", "Confidence",
                     "accuracy",
                     [("Perfect calibration", [(0, 0), (1, 1)], CHANCE_STYLE),
                      ("T = 1", points(bins_before), TRAIN_STYLE),
                      (f"T = {temperature:.2f}", points(bins_after), VALIDATION_STYLE)],
                     key_corner="top left")  # over-confidence: the curves fall below


def plot_roc_pr(roc, roc_auc, pr, pr_auc, positive, out):
    """roc-plot.svg and pr-plot.svg of the test split."""
    area = "undefined" if roc_auc is None else f"{roc_auc:.3f}"
    plot_unit_square(Path(out) / "roc-plot.svg", f"ROC on the test split ({positive}), "
                     f"AUC {area}", "False-positive rate", "true-positive rate",
                     [("Chance", [(0, 0), (1, 1)], CHANCE_STYLE), ("Model", roc, TRAIN_STYLE)])
    area = "undefined" if pr_auc is None else f"{pr_auc:.3f}"
    plot_unit_square(Path(out) / "pr-plot.svg", f"Precision-recall on the test split "
                     f"({positive}), AP {area}", "Recall", "precision",
                     [("Model", pr, TRAIN_STYLE)], key_corner="bottom left")


# ===== beyond the chapter: the command line =====

def integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text):
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_number(text):
    """0 to 2**32 - 1: the seeds pandas' sampler (NumPy's RandomState) accepts."""
    value = integer(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 4294967295, got {value}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text):
    """--target-fpr: a rate between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a rate from 0 up to (not including) 1, "
                                         f"such as 0.01, got {text}")
    return value


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


def lora_description(args):
    """What classify.py needs to rebuild the base model under the adapters, and
    to check that it is the very file they were trained on: its size and sha256."""
    lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "model": args.model,
            "weights": args.weights, "seed": args.seed}
    if args.weights != "random":
        path = weights_file(args.weights, args.model)  # for OpenAI's checkpoint: its data file
        lora["path"] = str(Path(path).resolve())
        lora["bytes"], lora["sha256"] = file_fingerprint(path)
    return lora


# ===== beyond the chapter: the frozen layers' output, computed once (--cache-memory) =====

def cache_frozen_prefix(classifier, args, datasets, device, work, cleanup):
    """Where it applies (not --plain, --cache-memory not 0): the frozen prefix's
    output of every message, computed up front, within the budget in memory and
    the rest in a file in the folder `work` (freed by `cleanup`). Returns what
    the cache was allowed and needed, and how its fill went."""
    cleanup.callback(lambda: classifier.prefix_cache.close())  # frees the spill file
    classifier.round_frozen_prefix()  # bf16/fp16: where the cache stores, in both modes
    budget, source = cache_budget(args.cache_memory, device)
    needed, filled = 0, {}
    if classifier.enable_prefix_cache(budget, spill_dir=work):
        blocks = "block" if classifier.n_cached == 1 else "blocks"
        print(f"Caching the output of the frozen embeddings and first {classifier.n_cached} "
              f"{blocks} (--plain recomputes them on every batch, as the chapter does)")
        needed = cache_size(datasets, classifier.gpt.tok_emb.weight.shape[1],
                            classifier.cache_dtype())
        print(cache_plan(needed, budget, source, work.parent))  # --out
        # torchrun: each rank fills its share, and all end with every message
        filled = classifier.fill_prefix_cache(datasets, rank=ranks()[0], world=ranks()[1])
    return {"needed_bytes": needed, "budget_bytes": budget if classifier.n_cached else 0,
            **filled}


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# --cache-memory auto: the other half stays for the model, its gradients and AdamW's
# two moments, the activations of a batch, and (on the CPU) the data and the OS
CACHE_SHARE = 0.5


def memory_size(text):
    """--cache-memory: auto, 0 (no cache) or a size such as 500MB, 2GB, 1.5GiB."""
    if text == "auto":
        return text
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]I?B|B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use auto, 0 (no cache) or a number with B, KB, MB, "
            f"GB, TB (or KiB, MiB, GiB, TiB), such as 500MB or 2GB")
    return int(float(match[1]) * SIZE_UNITS[(match[2] or "").upper()])


def available_memory(device):
    """(bytes free now, what they are); bytes None if unknown. CUDA: the card's
    free memory. MPS: what Metal recommends this process use, less what it holds
    (torch >= 2.5; before, the RAM, which Apple's GPUs share). Otherwise the
    available RAM, or the physical RAM where the system does not say what is
    available (macOS)."""
    if device.type == "cuda":
        # an index, not the device: before torch 2.5 "cuda" without one is refused
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.mem_get_info(index)[0], "free GPU memory"
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(),
                "memory Metal recommends for this process")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    for pages, what in [("SC_AVPHYS_PAGES", "available RAM"), ("SC_PHYS_PAGES", "RAM")]:
        try:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE"), what
        except (ValueError, OSError, AttributeError):
            pass
    return None, "available RAM"


def processes_per_machine():
    """torchrun's processes on this machine (1 without torchrun): they share its RAM."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def cache_budget(setting, device):
    """--cache-memory in bytes (None: no limit) and where the figure comes from.
    auto: half the free memory, shared among the processes that draw on it (under
    torchrun every process on a machine shares its RAM; each has its own GPU)."""
    if setting != "auto":
        return setting, "--cache-memory"
    free, where = available_memory(device)
    if free is None:
        return None, f"--cache-memory auto: the {where} is unknown, no limit"
    sharing = 1 if device.type == "cuda" else processes_per_machine()
    if sharing == 1:
        return int(free * CACHE_SHARE), f"--cache-memory auto: half the {where}"
    return (int(free * CACHE_SHARE / sharing),
            f"--cache-memory auto: half the {where}, shared by {sharing} processes")


def human_bytes(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else \
        f"{n / 1e3:.0f} kB"


def cache_plan(needed, budget, source, out):
    """The one line that says what the prefix cache will hold, and its cost."""
    if budget is None or needed <= budget:
        limit = "no memory limit" if budget is None else f"the budget of {human_bytes(budget)}"
        return f"Prefix cache: {human_bytes(needed)}, within {limit} ({source})"
    return (f"Prefix cache: {human_bytes(needed)}, over the budget of {human_bytes(budget)} "
            f"({source}): {human_bytes(budget)} stays in memory, the other "
            f"{human_bytes(needed - budget)} goes to a temporary file in {out} and is read "
            f"back from disk at every pass over the data")


# ===== beyond the chapter: the --out folder, written whole or not at all =====

def work_folder(out, rank, cleanup):
    """This process's folder for the run, a TemporaryDirectory inside --out (made
    if missing): the CSV splits it reads, the prefix cache's spill and (rank 0)
    every output, moved into --out only once the run has succeeded. `cleanup`
    (an ExitStack) removes it when the run ends, however it ends, and --out too
    if this run made it and it is still empty. Under torchrun every process has
    its own: --out may or may not be shared between machines."""
    made = [p for p in [out, *out.parents] if not p.exists()]
    cleanup.callback(remove_empty_folders, made)
    try:
        out.mkdir(parents=True, exist_ok=True)
        folder = tempfile.TemporaryDirectory(dir=out, prefix=f".finetune-rank{rank}-")
    except OSError as e:
        raise InputError(f"cannot write in the --out folder {out}: {e.strerror or e}.") from None
    return Path(cleanup.enter_context(folder))


def remove_empty_folders(folders):
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


@contextlib.contextmanager
def out_left_as_it_was(out):
    """A write into the work folder that fails says what the user cares about:
    nothing in --out was replaced."""
    try:
        yield
    except InputError as e:
        raise InputError(f"{e} Nothing in {out} was replaced.") from None


def publish_run(metrics, work, out, names):
    """Rank 0's last step: metrics.json beside the checkpoint in `work`, every
    output moved into `out`, and the line that says what is there."""
    with out_left_as_it_was(out):
        write_atomically(work / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    publish(work, out)
    plots = "reliability-plot.svg, roc-plot.svg, pr-plot.svg" if len(names) == 2 else \
        "reliability-plot.svg"
    print(f"Saved {out / CHECKPOINT_NAME}, metrics.json, loss-plot.svg, accuracy-plot.svg, "
          f"{plots} and the CSV splits in {out}")


@contextlib.contextmanager
def said_if_interrupted(checkpoint):
    """Ctrl-C (or SIGTERM, run_cli) during training: one rank says that nothing
    of this run was saved, and the run ends with the interrupt's exit status."""
    try:
        yield
    except KeyboardInterrupt as e:
        kept = f"{checkpoint} is unchanged" if checkpoint.exists() else "no checkpoint was written"
        if ranks()[0] == 0:  # every rank got Ctrl-C; one says so
            print(f"\ninterrupted during training: nothing of this run was saved, "
                  f"{checkpoint.parent} is as it was; {kept}.", file=sys.stderr)
        sys.exit(interrupted_status(e))


def publish(work, out):
    """Moves the run's outputs from its work folder into --out, over the last
    run's: renames within one file system, each file whole, old or new. The
    checkpoint goes last: if a rename fails, it is still the earlier run's."""
    moved = []
    for path in sorted(work.iterdir(), key=lambda p: p.name == CHECKPOINT_NAME):
        try:
            os.replace(path, out / path.name)
        except OSError as e:
            raise InputError(
                f"cannot move {path.name} into {out}: {e.strerror or e}. Replaced by this "
                f"run's: {', '.join(moved) or 'none'}; the other files in {out} are the "
                f"earlier run's.") from None
        moved.append(path.name)


if __name__ == "__main__":
    run_cli(main)
