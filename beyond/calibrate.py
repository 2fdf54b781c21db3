"""How sure: a temperature fitted on validation, expected calibration error,
ROC and precision-recall curves, and a threshold for --target-fpr (finetune.py)."""
import math
from pathlib import Path
from beyond.plot import CHANCE_STYLE, TRAIN_STYLE, VALIDATION_STYLE, plot_unit_square
import torch


ECE_BINS = 15
MIN_PER_CLASS = 20  # validation messages of each class a temperature is fitted on
TEMPERATURE_RANGE = (0.05, 20.0)  # beyond it the probabilities are all 0/1 or all equal


def collect_logits(data_loader, model, device):
    """(logits (N, num_classes) in float32 on the CPU, targets (N,)) of a whole loader."""
    model.eval()
    logits, targets = [], []
    with torch.inference_mode():
        for input_batch, target_batch in data_loader:
            logits.append(model(input_batch.to(device))[:, -1, :].float().cpu())
            targets.append(target_batch)
    return torch.cat(logits), torch.cat(targets)


def nll(logits, targets, temperature=1.0):
    """Mean NLL of softmax(logits / temperature), in float64 (NaN without targets)."""
    return torch.nn.functional.cross_entropy(logits.double() / temperature, targets).item()


def fit_temperature(logits, targets):
    """Temperature scaling (Guo et al. 2017): the T minimizing the NLL of softmax(logits / T),
    convex in 1/T so with one minimum, by ternary search over log T; 1 where no T does better."""
    a, b = map(math.log, TEMPERATURE_RANGE)
    for _ in range(80):
        c, d = a + (b - a) / 3, b - (b - a) / 3
        if nll(logits, targets, math.exp(c)) < nll(logits, targets, math.exp(d)):
            b = d
        else:
            a = c
    temperature = math.exp((a + b) / 2)
    return temperature if nll(logits, targets, temperature) < nll(logits, targets) else 1.0


def reliability_bins(probas, targets):
    """Per bin (i/n, (i+1)/n] of confidence, 0 in the first: (count, mean confidence,
    accuracy); None where empty."""
    confidence, predicted = probas.max(dim=1)
    correct = (predicted == targets).double()
    index = (confidence.double() * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1
    return [(int(in_bin.sum()), confidence[in_bin].double().mean().item(),
             correct[in_bin].mean().item()) if in_bin.any() else None
            for in_bin in (index == i for i in range(ECE_BINS))]


def expected_calibration_error(probas, targets):
    """ECE: the bins' |accuracy - confidence|, weighted by their share of messages."""
    rows = [row for row in reliability_bins(probas, targets) if row]
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
    """[(false-positive rate, true-positive rate)] and the area under it (trapezoids: ties
    count half); ([], None) without both classes."""
    n_pos = sum(map(bool, positives))
    n_neg = len(positives) - n_pos
    if not n_pos or not n_neg:
        return [], None
    points = [(fp / n_neg, tp / n_pos) for fp, tp in ranked_counts(scores, positives)]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return points, area


def pr_curve(scores, positives):
    """[(recall, precision)] and the average precision; ([], None) without positives."""
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
    None for a rate without messages of its class, or without a threshold."""
    if threshold is None:
        return None, None
    flagged = [[score > threshold for score, p in zip(scores, positives) if bool(p) == positive]
               for positive in (False, True)]  # the negatives', then the positives'
    return tuple(sum(flags) / len(flags) if flags else None for flags in flagged)


def calibrate(model, loaders, device, names, target_fpr, out):
    """The temperature fitted on validation, ECE and reliability on test, and for two
    classes ROC, PR and the threshold for target_fpr: (metrics.json's, the checkpoint's)."""
    val_logits, val_targets = collect_logits(loaders[1], model, device)
    test_logits, test_targets = collect_logits(loaders[2], model, device)
    fewest = min(int((val_targets == c).sum()) for c in range(len(names)))
    # a temperature fitted on a few messages says more about them than about the model
    fitted = fewest >= MIN_PER_CLASS
    temperature = fit_temperature(val_logits, val_targets) if fitted else 1.0
    if not fitted:
        print(f"note: the validation split has {fewest} message(s) of a class, fewer than "
              f"{MIN_PER_CLASS}: no temperature is fitted (T = 1)")
    # the probabilities as classify.py computes them, so that a threshold means the same there
    before, after = (torch.softmax(test_logits / t, dim=-1) for t in (1.0, temperature))
    result = {"temperature": temperature, "val_nll_before": nll(val_logits, val_targets),
              "val_nll_after": nll(val_logits, val_targets, temperature), "ece_bins": ECE_BINS}
    result.update(test_ece_before=expected_calibration_error(before, test_targets),
                  test_ece_after=expected_calibration_error(after, test_targets))
    plot_reliability(before, after, test_targets, temperature, out)
    print(f"Temperature scaling ({'fitted on the validation split' if fitted else 'none fitted'})"
          f": T = {temperature:.3f}, validation NLL {result['val_nll_before']:.3f} -> "
          f"{result['val_nll_after']:.3f}")
    if temperature > 0.99 * TEMPERATURE_RANGE[1] or temperature < 1.01 * TEMPERATURE_RANGE[0]:
        result["temperature_at_bound"] = True
        print(f"note: T is at the end of the range searched {TEMPERATURE_RANGE}: the model's "
              f"probabilities carry little information about its errors (a model near "
              f"chance, or one that is wrong where it is sure)")
    print(f"Test ECE ({ECE_BINS} bins): {result['test_ece_before']:.3f} before, "
          f"{result['test_ece_after']:.3f} after temperature scaling")
    if len(names) == 2:
        val_scores = torch.softmax(val_logits / temperature, dim=-1)[:, 1].tolist()
        result.update(operating_point(val_scores, val_targets.tolist(), after[:, 1].tolist(),
                                      test_targets.tolist(), names, target_fpr, out))
    return result, {"temperature": temperature, "threshold": result.get("threshold"),
                    "target_fpr": target_fpr if len(names) == 2 else None}


def operating_point(val_scores, val_targets, test_scores, test_targets, names, target_fpr,
                    out):
    """ROC and PR on test, and the threshold on P(class 1) chosen on validation for
    target_fpr, with the test split's rates at it."""
    roc, roc_auc = roc_curve(test_scores, test_targets)
    pr, pr_auc = pr_curve(test_scores, test_targets)
    negatives = [s for s, y in zip(val_scores, val_targets) if not y]
    # a rate measured on a few negatives says little: as for the temperature, none then
    few = len(negatives) < MIN_PER_CLASS
    threshold = None if few else threshold_for_fpr(negatives, target_fpr)
    val_fpr, _ = rates_at(threshold, val_scores, val_targets)
    test_fpr, test_recall = rates_at(threshold, test_scores, test_targets)
    plot_roc_pr(roc, roc_auc, pr, pr_auc, names[1], out)
    if roc_auc is not None:
        print(f"Test ROC AUC {roc_auc:.3f}, PR AUC (average precision) {pr_auc:.3f}, "
              f"{names[1]} as the positive class")
    if few:
        print(f"note: the validation split has {len(negatives)} {names[0]} message(s), fewer "
              f"than {MIN_PER_CLASS}: no threshold for --target-fpr is chosen (classify.py "
              f"--threshold validated will refuse this checkpoint)")
    elif None not in (test_fpr, test_recall):
        print(f"Threshold P({names[1]}) > {threshold:.4f} for a validation false-positive "
              f"rate <= {target_fpr:.1%} (there: {val_fpr:.1%}); on the test split: "
              f"false-positive rate {test_fpr:.1%}, recall {test_recall:.1%}")
    return {"positive_class": names[1], "roc_auc": roc_auc, "pr_auc": pr_auc,
            "target_fpr": target_fpr, "threshold": threshold, "val_fpr": val_fpr,
            "test_fpr": test_fpr, "test_recall": test_recall}


def plot_reliability(before, after, targets, temperature, out):
    """The reliability diagram: each bin's accuracy against its mean confidence."""
    before, after = ([row[1:] for row in reliability_bins(probas, targets) if row]
                     for probas in (before, after))
    plot_unit_square(Path(out) / "reliability-plot.svg",
                     f"Reliability on the test split, {ECE_BINS} bins", "Confidence", "accuracy",
                     [("Perfect calibration", [(0, 0), (1, 1)], CHANCE_STYLE),
                      ("T = 1", before, TRAIN_STYLE),
                      (f"T = {temperature:.2f}", after, VALIDATION_STYLE)],
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
