"""Sections 6.4-6.8: GPT-2 with a new head, fine-tuned to classify spam, evaluated,
plotted and saved. Listings 6.7-6.11 come first, in the book's order, then the
chapter's script (main) and its flags; what goes beyond the chapter is in beyond/,
each reached from one commented line.

python finetune.py                      # the whole chapter, with its defaults
python finetune.py --device cuda --out runs/a
"""
import argparse
import contextlib
import time
from pathlib import Path

from beyond.cli import InputError, positive_float, positive_int, run_cli, seed_number
from beyond.distributed import (check_processes, join_process_group, on_every_rank, printing_rank,
                                said_by_rank_0, torchrun_ranks, with_progress)
from beyond.fast import GPTClassifier, add_fast_options, cache_frozen_prefix
from beyond.files import (add_out_option, out_left_as_it_was, publish_run, said_if_interrupted,
                          work_folder)
from beyond.finite import stops_if_diverged
from beyond.labels import balance_classes, class_ids, count_labels
from beyond.lora import lora_description
from beyond.metrics import (add_metrics_options, baseline_and_calibration, check_target_fpr,
                            metrics_beyond_accuracy, run_record)
from beyond.overlap import add_dedup_option, drop_repeated
from beyond.plot import plt
from beyond.pooling import add_pool_option
from beyond.precision import add_precision_option, check_precision, loss_scaled
from beyond.trainable import add_trainable_options, check_trainable_options, choose_trainable
from beyond.weights import add_weights_options
import torch
from classify import (CHECKPOINT_NAME, add_device_option, classify_review, save_classifier,
                      select_device)
from data import (SEED, SPAM_CLASS_NAMES, SPAM_LABELS, SpamDataset, class_names,
                  create_balanced_dataset, create_data_loaders, data_file_path,
                  download_and_unzip_spam_data, extracted_path, load_messages, random_split,
                  read_tsv, url, write_csv, zip_path)
from gpt import MODEL_NAMES, build_gpt, get_tokenizer, weights_config


# ---------------------------------------------------- 6.5 Adding a classification head

# Listing 6.7 Adding a classification layer
def prepare_for_classification(model, num_classes, trainable="last_block", seed=SEED,
                               lora_rank=16, lora_alpha=16):
    # not the book's script statements: a function, for the tests and the flags; its
    # num_classes = 2 is a parameter (your own labels), its 123 the seed (--seed)
    for param in model.parameters():
        param.requires_grad = False

    torch.manual_seed(seed)
    # not the book's BASE_CONFIG["emb_dim"]: read from the model, so that any size
    # (--model) or config beside the weights gets a head that fits
    model.out_head = torch.nn.Linear(
        in_features=model.tok_emb.embedding_dim, out_features=num_classes)

    for param in model.trf_blocks[-1].parameters():
        param.requires_grad = True
    for param in model.final_norm.parameters():
        param.requires_grad = True
    # not the book's: --trainable's other choices (beyond/trainable.py)
    return choose_trainable(model, trainable, lora_rank, lora_alpha)


# ------------------------------------- 6.6 Calculating the classification loss and accuracy

# model: GPT-2 with its new head, or beyond/fast.py's GPTClassifier around it, whose last
# output position is the one --pool reads (the last token, as in the book, by default)

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


# ------------------------------------------ 6.7 Fine-tuning the model on supervised data

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


# Listing 6.11 Plotting the classification loss (out_dir: --out's work folder)
def plot_values(epochs_seen, examples_seen, train_values, val_values, label="loss",
                out_dir="."):
    # plt: beyond/plot.py's stand-in for matplotlib.pyplot (not a dependency), an SVG
    fig, ax1 = plt.subplots(figsize=(5, 3))

    # Plot training and validation loss against epochs
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()

    # Create a second x-axis for examples seen
    ax2 = ax1.twiny()  # Create a second x-axis that shares the same y-axis
    ax2.plot(examples_seen, train_values, alpha=0)  # Invisible plot for aligning ticks
    ax2.set_xlabel("Examples seen")

    fig.tight_layout()  # Adjust layout to make room
    # not the book's PDF, and no plt.show(): an SVG in --out, for a command line
    plt.savefig(Path(out_dir) / f"{label}-plot.svg")
    return Path(out_dir) / f"{label}-plot.svg"  # for the tests


# ------------------------------------------------ the chapter's script, in its order

def main(argv=None):
    """The chapter's script, section by section. Not the book's: under torchrun every rank
    runs it and rank 0 prints and saves, into a work folder moved into --out at the end."""
    rank, world, local_rank = torchrun_ranks()
    with printing_rank(rank), contextlib.ExitStack() as cleanup:
        with said_by_rank_0(rank):  # every rank meets a bad flag or bad data; one says so
            args, device, BASE_CONFIG = parse_and_check(argv, world)
            out = Path(args.out)

            # 6.2 Preparing the dataset: listings 6.1-6.3
            df = load_rows(args)
            work = work_folder(out, rank, cleanup)  # only now: bad data leaves no folder
            label_ids, splits = prepare_splits(args, df, work)

            # 6.3 Creating data loaders: listing 6.4, then 6.5 below
            tokenizer = get_tokenizer()
            datasets = create_datasets(work, tokenizer, args, BASE_CONFIG["context_length"],
                                       num_classes=len(label_ids))
        device = join_process_group(args, device, world, local_rank, cleanup)  # torchrun
        loaders = with_progress(create_data_loaders(*datasets, batch_size=args.batch_size))
        for loader in loaders:
            print(f"{len(loader)} {loader.name} batches")

        # 6.4 Initializing a model with pretrained weights: listing 6.6
        torch.manual_seed(args.seed)  # not the book's: what --weights random draws
        model, BASE_CONFIG = build_gpt(args.model, args.weights)

        # 6.5 Adding a classification head: listing 6.7
        prepare_for_classification(model, len(label_ids), args.trainable, args.seed,
                                   args.lora_rank, args.lora_alpha)

        # 6.6 Calculating the classification loss and accuracy. Not the book's bare
        # model.to(device): beyond/fast.py's GPTClassifier around it reads --pool's
        # position and, unless --plain, computes the frozen layers once per message
        classifier = GPTClassifier(model, pool=args.pool, fast=not args.plain,
                                   precision=args.precision).to(device)
        cache = cache_frozen_prefix(classifier, args, datasets, device, work, cleanup)
        model = on_every_rank(classifier, device)  # torchrun: each rank a share of a batch
        stops_if_diverged(model, len(loaders[0]), args)  # outputs not finite: an error
        print_initial_metrics(model, loaders, device, args.seed)

        # 6.7 Fine-tuning the model on supervised data: listings 6.10 and 6.11
        results, train_seconds = fine_tune(model, loaders, device, args, out / CHECKPOINT_NAME)
        if rank == 0:
            with out_left_as_it_was(out):
                plot_curves(results, args.epochs, work)
        metrics = final_metrics(model, loaders, splits, label_ids, device)
        metrics.update(run_record(args, train_seconds, classifier, cache))

        # 6.8 Using the LLM as a spam classifier: saved first (the book classifies its two
        # examples, then saves), so that what follows "Saved" is the saved model's
        if rank == 0:
            save_run(classifier, metrics, BASE_CONFIG, datasets[0].max_length, label_ids,
                     splits, loaders, device, args, work, out)
            if metrics["labels"] == SPAM_CLASS_NAMES:
                classify_examples(classifier, tokenizer, device, datasets[0].max_length)
        return dict(metrics, checkpoint=str(out / CHECKPOINT_NAME))


def load_rows(args):
    """(label, text) rows: the book's pd.read_csv of listing 6.1's TSV, or --data's."""
    if args.data:
        return load_messages(args.data)
    download_and_unzip_spam_data(url, zip_path, extracted_path, data_file_path)
    return read_tsv(data_file_path, labels=SPAM_LABELS)


def prepare_splits(args, df, out):
    """Section 6.2's steps into `out`: balanced, split, mapped to ids and written."""
    print(f"Dataset: {len(df)} messages, label counts {count_labels(df)}")
    if args.dedup:  # not the book's: no message both in training and in evaluation
        df = drop_repeated(df)
    label_ids = class_ids(df)  # the book's {"ham": 0, "spam": 1}; any labels: sorted
    check_target_fpr(args.target_fpr, label_ids)  # not the book's: a two-class flag
    if not args.no_balance:
        # listing 6.2 for ham and spam; any other labels: beyond/labels.py, alike
        balance = create_balanced_dataset if label_ids == SPAM_LABELS else balance_classes
        df = balance(df, seed=args.seed)
        print(f"Balanced: label counts {count_labels(df)}")
    splits = random_split(df, 0.7, 0.1, seed=args.seed)
    for name, split in zip(["train", "validation", "test"], splits):
        write_csv(split, out / f"{name}.csv", label_ids)  # the map and to_csv
    if len(splits[0]) < args.batch_size:
        raise InputError(f"the training set has {len(splits[0])} messages, fewer than one "
                         f"batch of {args.batch_size}: lower --batch-size or add data.")
    return label_ids, splits


def create_datasets(out, tokenizer, args, context_length, num_classes):
    """Section 6.3's three SpamDatasets, cut to the training set's max_length."""
    # not the book's: --pool's other positions read only real tokens: pad per batch, less work
    settings = {"pad": args.pool == "last", "num_classes": num_classes}
    train_dataset = SpamDataset(out / "train.csv", tokenizer, args.max_length, **settings)
    if train_dataset.max_length > context_length:  # rasbt's notebook asserts; here it cuts
        train_dataset = SpamDataset(out / "train.csv", tokenizer, context_length, **settings)
    max_length = train_dataset.max_length
    val_dataset = SpamDataset(out / "validation.csv", tokenizer, max_length, **settings)
    test_dataset = SpamDataset(out / "test.csv", tokenizer, max_length, **settings)
    print(f"Longest training sequence (max_length): {max_length} tokens")
    return train_dataset, val_dataset, test_dataset


def print_initial_metrics(model, loaders, device, seed):
    """Section 6.6: accuracy on 10 batches and loss on 5, before fine-tuning."""
    torch.manual_seed(seed)
    names = ["Training", "Validation", "Test"]
    for name, loader in zip(names, loaders):
        print(f"{name} accuracy: "
              f"{calc_accuracy_loader(loader, model, device, num_batches=10)*100:.2f}%")
    with torch.no_grad():
        for name, loader in zip(names, loaders):
            print(f"{name} loss: {calc_loss_loader(loader, model, device, num_batches=5):.3f}")


def fine_tune(model, loaders, device, args, checkpoint):
    """Section 6.7's run of train_classifier_simple; Ctrl-C says what is saved."""
    start_time = time.time()
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    if args.precision == "fp16":  # not the chapter's: float16's gradients need scaling
        optimizer = loss_scaled(optimizer, model, device)
    with said_if_interrupted(checkpoint):
        results = train_classifier_simple(model, loaders[0], loaders[1], optimizer, device,
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
        plot_values(epochs_tensor, examples_seen_tensor, train_values, val_values,
                    label=label, out_dir=out)


def final_metrics(model, loaders, splits, label_ids, device):
    """Section 6.7's accuracies on whole sets, then (beyond/metrics.py) the test set's
    per-class metrics, the messages also seen in training and each accuracy's interval."""
    train_accuracy, val_accuracy, test_accuracy = (
        calc_accuracy_loader(loader, model, device) for loader in loaders)
    print(f"Training accuracy: {train_accuracy*100:.2f}%")
    print(f"Validation accuracy: {val_accuracy*100:.2f}%")
    print(f"Test accuracy: {test_accuracy*100:.2f}%")
    return {"train_accuracy": train_accuracy, "val_accuracy": val_accuracy,
            "test_accuracy": test_accuracy,
            **metrics_beyond_accuracy(model, loaders, splits, label_ids, device,
                                      class_names(label_ids), train_accuracy)}


def save_run(classifier, metrics, config, max_length, label_ids, splits, loaders, device,
             args, work, out):
    """The chapter's torch.save(model.state_dict(), "review_classifier.pth"), and the
    baseline, calibration and metrics.json (beyond/), moved into --out together."""
    calibration = baseline_and_calibration(classifier, metrics, loaders, device, args,
                                           label_ids, splits, work, out)
    lora = lora_description(args) if args.trainable == "lora" else None
    with out_left_as_it_was(out):
        save_classifier(classifier, work / CHECKPOINT_NAME, config, max_length,
                        metrics["labels"], lora=lora, trainable=args.trainable,
                        calibration=calibration)
    publish_run(metrics, work, out / CHECKPOINT_NAME, metrics["labels"])


def classify_examples(model, tokenizer, device, max_length):
    """Section 6.8's two example texts."""
    for text in ["You are a winner you have been specially selected to receive $1000 "
                 "cash or a $2000 award.",
                 "Hey, just wanted to check if we're still on for dinner tonight? "
                 "Let me know!"]:
        print(f"{classify_review(text, model, tokenizer, device, max_length=max_length)}: {text}")


# ----------------------------------------------------------------- the command line

def build_parser():
    parser = argparse.ArgumentParser(
        description="Fine-tune GPT-2 to classify SMS messages as spam or not spam, as chapter "
                    "6 does. With no flags it runs the whole chapter (downloads, 5 epochs) and "
                    "writes train/validation/test.csv, loss-plot.svg, accuracy-plot.svg and "
                    "review_classifier.safetensors; beyond it, metrics.json, a calibration "
                    "(reliability-plot.svg; for two classes roc-plot.svg, pr-plot.svg).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_device_option(parser, "auto", "where to train (section 6.6's device)")
    add_weights_options(parser, MODEL_NAMES, random="'random' (untrained: appendix B's "
                                                    "random-weights experiment, and timing), ")
    parser.add_argument("--data", metavar="PATH",
                        help="a local SMSSpamCollection TSV or the UCI zip, instead of "
                             "downloading it into sms_spam_collection/ (listing 6.1); or "
                             "your own data: a label<TAB>text TSV or a CSV with Label,Text "
                             "columns, whose distinct labels (2 or more) are the classes")
    parser.add_argument("--epochs", type=positive_int, default=5,
                        help="training epochs (section 6.7: num_epochs)")
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
    parser.add_argument("--no-balance", action="store_true",
                        help="keep the data as it is instead of undersampling every class "
                             "to the smallest (listing 6.2)")
    # not the chapter's: each of these modules adds the flags of what it does
    for add_options in (add_out_option, add_dedup_option, add_trainable_options,
                        add_pool_option, add_metrics_options, add_fast_options,
                        add_precision_option):
        add_options(parser)
    return parser


def parse_and_check(argv, world):
    """(args, device, model config), every flag checked before any data is read (a
    --weights file's header too), by every rank under torchrun (world processes)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = select_device(args.device)
    check_processes(parser, args, device, world)  # torchrun: mps, --batch-size
    config = weights_config(args.model, args.weights)
    if args.max_length and args.max_length > config["context_length"]:
        parser.error(f"--max-length {args.max_length} is above the model's context "
                     f"length {config['context_length']}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; it takes a folder (made if missing)")
    check_trainable_options(parser, args)
    check_precision(args.precision, device)
    return args, device, config


if __name__ == "__main__":
    run_cli(main)
