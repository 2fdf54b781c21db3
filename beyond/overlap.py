"""How far to trust a test accuracy. The SMS data repeats texts, so the book's split
puts some validation and test messages in the training set too: counted here, with
the accuracy on the messages that are not (the same text once leading and trailing
whitespace is stripped counts as seen; letter case makes another message). Each
accuracy gets its 95% Wilson score interval; --dedup drops repeated texts first."""
import math

import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a 95% interval


def wilson_interval(correct, total, z=Z95):
    """(low, high): the Wilson score interval of the proportion correct/total."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def add_dedup_option(parser):
    parser.add_argument("--dedup", action="store_true",
                        help="drop repeated messages (the same text once leading and "
                             "trailing whitespace is stripped), keeping the first, before "
                             "balancing and splitting: no validation or test message is "
                             "then also a training message (the book's split has some)")


def drop_repeated(rows):
    """rows without the texts seen before in them; prints how many were dropped, and
    how many of those had another label than the text's first."""
    first, kept = {}, []
    for label, text in rows:
        if text.strip() not in first:
            first[text.strip()] = label
            kept.append((label, text))
    relabelled = sum(first[text.strip()] != label for label, text in rows)
    other = f" ({relabelled} of them labelled unlike the first)" if relabelled else ""
    print(f"Dropped {len(rows) - len(kept)} repeated messages (--dedup){other}: "
          f"{len(kept)} left")
    return kept


def seen_in(train, rows):
    """For each of rows, whether its text (stripped) is also a text of train."""
    texts = {text.strip() for _, text in train}
    return [text.strip() in texts for _, text in rows]


def predictions(model, data_loader, device):
    """The class each message of a loader is given, in the loader's order."""
    model.eval()
    predicted = []
    with torch.no_grad():
        for input_batch, _ in data_loader:
            logits = model(input_batch.to(device))[:, -1, :]
            predicted += torch.argmax(logits, dim=-1).tolist()
    return predicted


def unseen_accuracy(labels, predicted, seen):
    """(correct, total) over the messages not seen in training."""
    pairs = [(p, y) for p, y, was_seen in zip(predicted, labels, seen) if not was_seen]
    return sum(p == y for p, y in pairs), len(pairs)


def interval_record(correct, total):
    return {"accuracy": correct / total if total else None, "correct": correct,
            "total": total, "interval95": list(wilson_interval(correct, total)) if total else None}


def overlap_metrics(model, loaders, splits, label_ids, device, train_accuracy,
                    names=("val", "test")):
    """After the chapter's final accuracies: how many validation and test messages
    were seen in training, the accuracy on the others and every interval, printed
    and returned for metrics.json."""
    train, *held_out = splits
    seen = [seen_in(train, split) for split in held_out]
    # the training loader drops its last, incomplete batch: every batch counted is full
    counted = len(loaders[0]) * loaders[0].data_loader.batch_size
    record = {"train_accuracy_interval95": list(
        wilson_interval(round(train_accuracy * counted), counted))}
    print(f"Seen in training: {sum(seen[0])} of the {len(seen[0])} validation messages "
          f"and {sum(seen[1])} of the {len(seen[1])} test messages (the same text, "
          f"leading and trailing whitespace aside)")
    for name, title, loader, split, was_seen in zip(names, ["Validation", "Test"],
                                                    loaders[1:], held_out, seen):
        labels = [label_ids[label] for label, _ in split]
        predicted = predictions(model, loader, device)
        correct = sum(p == y for p, y in zip(predicted, labels))
        unseen = unseen_accuracy(labels, predicted, was_seen)
        record[f"{name}_seen_in_training"] = sum(was_seen)
        record[f"{name}_accuracy_interval95"] = list(wilson_interval(correct, len(labels)))
        record[f"{name}_unseen"] = interval_record(*unseen)
        print(f"{title} accuracy on the {unseen[1]} messages not seen in training: "
              + shown(*unseen))
    return record


def shown(correct, total):
    """An accuracy and its interval, as printed: 95.06% (95% interval 91.7-97.1%)."""
    if not total:
        return "none to count"
    low, high = wilson_interval(correct, total)
    return f"{correct / total * 100:.2f}% (95% interval {low * 100:.1f}-{high * 100:.1f}%)"
