"""Any labels, not only ham and spam: their counts, class ids and listing 6.2's balancing."""
from collections import Counter
from beyond.cli import InputError
from beyond.sampling import sample


def count_labels(rows):
    return dict(Counter(label for label, _ in rows))


def class_ids(rows):
    """label -> class id, in sorted label order (ham 0, spam 1, as in the chapter)."""
    labels = sorted(count_labels(rows))
    if len(labels) < 2:
        raise InputError(f"the data has a single class ({', '.join(labels)}); a classifier "
                         f"needs at least two.")
    return {label: i for i, label in enumerate(labels)}


def balance_classes(rows, seed):
    """Listing 6.2 for any number of classes: each class undersampled to the smallest's size
    with df.sample, the sampled classes first, as the book puts ham_subset before spam."""
    groups = {label: [row for row in rows if row[0] == label] for label in class_ids(rows)}
    smallest = min(len(group) for group in groups.values())
    sampled = [row for group in groups.values() if len(group) > smallest
               for row in sample(group, smallest, seed)]
    return sampled + [row for group in groups.values() if len(group) == smallest for row in group]
