"""Any labels, not only ham and spam: counting them, and their class ids."""
from beyond.cli import InputError


def count_labels(rows):
    counts = {}
    for label, _ in rows:
        counts[label] = counts.get(label, 0) + 1
    return counts


def class_ids(rows):
    """label -> class id, in sorted label order (ham 0, spam 1, as in the chapter)."""
    labels = sorted(count_labels(rows))
    if len(labels) < 2:
        raise InputError(f"the data has a single class ({', '.join(labels)}); a classifier "
                         f"needs at least two.")
    return {label: i for i, label in enumerate(labels)}


