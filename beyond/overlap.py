"""How far to trust a test accuracy. The SMS data repeats texts, so the book's split
puts some validation and test messages in the training set too: counted here, with
the accuracy on the messages that are not (the same text once leading and trailing
whitespace is stripped counts as seen; letter case makes another message). Each
accuracy gets its 95% Wilson score interval; --dedup drops repeated texts first."""
import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a 95% interval


def wilson_interval(correct, total, z=Z95):
    """(low, high): the Wilson score interval of the proportion correct/total."""
    if total == 0:
        return 0.0, 1.0
    p, denominator = correct / total, 1 + z * z / total
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
    first = {}  # stripped text -> its first row
    for label, text in rows:
        first.setdefault(text.strip(), (label, text))
    kept = list(first.values())
    relabelled = sum(first[text.strip()][0] != label for label, text in rows)
    other = f" ({relabelled} of them labelled unlike the first)" if relabelled else ""
    print(f"Dropped {len(rows) - len(kept)} repeated messages (--dedup){other}: "
          f"{len(kept)} left")
    return kept


def seen_in(train, rows):
    """For each of rows, whether its text (stripped) is also a text of train."""
    texts = {text.strip() for _, text in train}
    return [text.strip() in texts for _, text in rows]


def unseen_accuracy(labels, predicted, seen):
    """(correct, total) over the messages not seen in training."""
    pairs = [(p, y) for p, y, was_seen in zip(predicted, labels, seen) if not was_seen]
    return sum(p == y for p, y in pairs), len(pairs)


def held_out_figures(splits, labels, predicted):
    """For validation and test: each accuracy's interval and the accuracy on the messages
    not seen in training (a record for metrics.json), and those messages' (correct, total)."""
    record, unseen = {}, []
    for name, split, truth, guess in zip(("val", "test"), splits[1:], labels, predicted):
        correct = sum(p == y for p, y in zip(guess, truth))
        record[f"{name}_accuracy_interval95"] = list(wilson_interval(correct, len(truth)))
        right, total = unseen_accuracy(truth, guess, seen_in(splits[0], split))
        record[f"{name}_unseen"] = {
            "accuracy": right / total if total else None, "correct": right, "total": total,
            "interval95": list(wilson_interval(right, total)) if total else None}
        unseen.append((right, total))
    return record, unseen


def overlap_metrics(splits, labels, predicted, train_loader, train_accuracy):
    """After the chapter's final accuracies: how many validation and test messages were seen
    in training, the accuracy on the others and every interval, printed and returned."""
    seen = [sum(seen_in(splits[0], split)) for split in splits[1:]]
    print(f"Seen in training: {seen[0]} of the {len(splits[1])} validation messages "
          f"and {seen[1]} of the {len(splits[2])} test messages (the same text, "
          f"leading and trailing whitespace aside)")
    # the training loader drops its last, incomplete batch: every batch counted is full
    counted = len(train_loader) * train_loader.data_loader.batch_size
    figures, unseen = held_out_figures(splits, labels, predicted)
    for title, counts in zip(["Validation", "Test"], unseen):
        print(f"{title} accuracy on the {counts[1]} messages not seen in training: "
              + shown(*counts))
    return {"train_accuracy_interval95": list(
        wilson_interval(round(train_accuracy * counted), counted)),
        "val_seen_in_training": seen[0], "test_seen_in_training": seen[1], **figures}


def shown(correct, total):
    """An accuracy and its interval, as printed: 95.06% (95% interval 91.7-97.1%)."""
    if not total:
        return "none to count"
    low, high = wilson_interval(correct, total)
    return f"{correct / total * 100:.2f}% (95% interval {low * 100:.1f}-{high * 100:.1f}%)"
