"""Any labels, not only ham and spam: counting them, their class ids, and
balancing them as listing 6.2 balances ham and spam."""
from beyond.cli import InputError
from beyond.sampling import sample


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


def balance_classes(rows, seed):
    """Listing 6.2 for any number of classes: every class undersampled to the size
    of the smallest with pandas' df.sample, the sampled classes first,
    as the book puts ham_subset before the spam rows."""
    groups = {label: [row for row in rows if row[0] == label] for label in class_ids(rows)}
    smallest = min(len(group) for group in groups.values())
    sampled, kept = [], []
    for group in groups.values():
        if len(group) > smallest:
            sampled += sample(group, smallest, seed)
        else:
            kept += group
    return sampled + kept
