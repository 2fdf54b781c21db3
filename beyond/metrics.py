"""Beyond accuracy: per-class precision, recall and F1, the confusion matrix, naive Bayes."""
from collections import Counter
import math
import re
from beyond.calibrate import calibrate, collect_logits
from beyond.cli import InputError, fraction
from beyond.files import out_left_as_it_was
from beyond.overlap import held_out_figures, overlap_metrics, shown


TARGET_FPR = 0.01  # --target-fpr: one real message in a hundred flagged


def metrics_beyond_accuracy(model, loaders, splits, label_ids, device, names, train_accuracy):
    """The test set's per-class precision, recall, F1 and confusion matrix, then overlap.py's
    figures, printed and kept; the validation and test sets are classified once for both."""
    predicted = [collect_logits(loader, model, device)[0].argmax(dim=-1).tolist()
                 for loader in loaders[1:]]
    labels = [[label_ids[label] for label, _ in split] for split in splits[1:]]
    counts = [[0] * len(names) for _ in names]  # counts[true class][predicted class]
    for true, guess in zip(labels[1], predicted[1]):
        counts[true][guess] += 1
    per_class = per_class_metrics(counts, names)
    print_test_metrics(per_class, counts, names)
    return {"labels": names, "test_per_class": per_class, "test_confusion_matrix": counts,
            **overlap_metrics(splits, labels, predicted, loaders[0], train_accuracy)}


def run_record(args, train_seconds, classifier, cache):
    """What metrics.json keeps of the run: training time, flags, the prefix cache's use."""
    gpt = classifier.gpt  # a --weights file's own config makes it no --model size
    size = f"{len(gpt.trf_blocks)} layers, emb_dim {gpt.tok_emb.embedding_dim}"
    model = args.model if args.weights in ("pretrained", "random") else f"{args.weights} ({size})"
    return {"model": model, "train_seconds": round(train_seconds, 1), "args": vars(args),
            "prefix_cache": dict(cache, memory_bytes=classifier.prefix_cache.memory_bytes,
                                 file_bytes=classifier.prefix_cache.file_bytes)}


def baseline_and_calibration(classifier, metrics, loaders, device, args, label_ids, splits,
                             work, out):
    """Rank 0 adds the baseline and calibration to metrics; returns the checkpoint's part."""
    if not args.no_baseline:
        metrics["naive_bayes"] = naive_bayes_baseline(label_ids, splits)
    with out_left_as_it_was(out):
        # rank 0 alone, on every row: the loaders' whole batches, not its share
        metrics["calibration"], calibration = calibrate(
            classifier, [loader.data_loader for loader in loaders], device,
            metrics["labels"], args.target_fpr, work)
    return calibration


def per_class_metrics(counts, names):
    """Precision, recall and F1 of each class from a confusion matrix."""
    metrics = {}
    for i, name in enumerate(names):
        predicted, actual = sum(row[i] for row in counts), sum(counts[i])
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
    """Multinomial naive Bayes on the word counts of [(class id, text)]: the baseline to beat."""
    docs, counts = Counter(label for label, _ in rows), {}
    for label, text in rows:
        counts.setdefault(label, Counter()).update(words(text))
    return {"counts": counts, "totals": {c: sum(n.values()) for c, n in counts.items()},
            "vocabulary_size": len(set().union(*counts.values())),
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
    """The baseline's validation and test accuracy on the same split, with the same
    figures as the GPT's (beyond/overlap.py): intervals, and the unseen messages'."""
    baseline = fit_naive_bayes([(label_ids[label], text) for label, text in splits[0]])
    labels = [[label_ids[label] for label, _ in split] for split in splits[1:]]
    predicted = [[predict_naive_bayes(baseline, text) for _, text in split]
                 for split in splits[1:]]
    val, test = (sum(p == y for p, y in zip(guess, truth)) / len(truth)
                 for truth, guess in zip(labels, predicted))
    figures, unseen = held_out_figures(splits, labels, predicted)
    print(f"Naive Bayes baseline (word counts, same split): validation accuracy "
          f"{val*100:.2f}%, test accuracy {test*100:.2f}%")
    print(f"Naive Bayes on the messages not seen in training: validation "
          f"{shown(*unseen[0])}, test {shown(*unseen[1])}")
    return {"val_accuracy": val, "test_accuracy": test, **figures}


def check_target_fpr(target_fpr, label_ids):
    """Before training: --target-fpr sets a threshold on P(class 1), a two-class decision."""
    # `is not`: argparse keeps its default object; a rate given, even 0.01, is a new float
    if len(label_ids) > 2 and target_fpr is not TARGET_FPR:
        raise InputError(f"--target-fpr is for two classes (a threshold on P(class 1)); the "
                         f"data has {len(label_ids)}: leave it out.")


def add_metrics_options(parser):
    parser.add_argument("--target-fpr", type=fraction, default=TARGET_FPR, metavar="RATE",
                        help="after the test metrics (two classes): choose the threshold on "
                             "P(spam) whose false-positive rate on the validation split, the "
                             "share of real messages flagged as spam, is at most RATE; saved "
                             "in the checkpoint for classify.py --threshold validated")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the naive Bayes baseline (word counts, same split) "
                             "printed beside the GPT's final accuracy (section 6.7)")
