"""Many texts at once: classify.py's batches, its lines from stdin as they
arrive, and the lines it prints."""
import itertools
import json
import math
import os
import queue
import sys
import threading
import time
from beyond.cli import InputError, progress
from beyond.explain import EXPLAIN_DEFAULT, explain_texts, padded_batch
from beyond.tokens import PAD_TOKEN_ID, encode
import torch


class NonFiniteLogits(InputError):
    """The model computed NaN or infinity: its callers name the checkpoint."""


def classify_texts(texts, model, tokenizer, device, max_length, pad_token_id=PAD_TOKEN_ID,
                   batch_size=32, temperature=1.0):
    """Class probabilities (one list per text), in batches of similar length; the
    logits divided by temperature (the checkpoint's: the argmax does not change)."""
    model.eval()
    max_length = min(max_length, model.gpt.pos_emb.weight.shape[0])
    encoded = [encode(text, tokenizer, max_length) for text in texts]
    for i, ids in enumerate(encoded):
        if not ids:  # no token for the head to read
            raise InputError(f"text {i} is empty: there is nothing to classify.")
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    probabilities = [None] * len(texts)
    start_time = time.time()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        inputs = padded_batch([encoded[i] for i in batch], model, max_length, pad_token_id)
        with torch.inference_mode():
            logits = model(inputs.to(device))[:, -1, :].float()
        if not torch.isfinite(logits).all():
            raise NonFiniteLogits("its logits are not all finite numbers (NaN or infinity), "
                                  "so it has no answer: its weights are damaged. Fine-tune "
                                  "it again, or check the file.")
        probas = torch.softmax(logits / temperature, dim=-1).cpu()
        for row, i in enumerate(batch):
            probabilities[i] = probas[row].tolist()
        progress("classifying, messages", start + len(batch), len(texts), start_time)
    return probabilities


CHUNK = 1024  # at most this many lines of stdin classified and printed at a time
BLANK = "empty or only whitespace: nothing to classify"
# control characters as escapes (\n, \x1b): a label or a message can neither
# break the one line printed per message nor send commands to the terminal
CONTROL_ESCAPES = {c: chr(c).encode("unicode_escape").decode()
                   for c in [*range(0x20), *range(0x7f, 0xa0)]}


def utf8_text(raw, what):
    """Bytes as text: those that are not UTF-8 become U+FFFD, and a note names `what`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        print(f"note: {what} is not UTF-8: its undecodable bytes are classified as U+FFFD.",
              file=sys.stderr)
        return raw.decode("utf-8", errors="replace")


def stdin_batches(stream):
    """The lines of a binary stream as texts, in lists of at most CHUNK, one as soon as every
    line that has arrived is in one: a pause in the input shows the answers so far."""
    pending = queue.Queue(maxsize=CHUNK)  # bounded: memory stays flat however long the input

    def read():  # each line as it arrives; then None, or the OSError that ended it
        try:
            for line in stream:
                pending.put(line.removesuffix(b"\n"))
            pending.put(None)
        except OSError as e:
            pending.put(e)

    threading.Thread(target=read, daemon=True).start()
    texts, number = [], 0
    while (line := pending.get()) is not None:
        if isinstance(line, OSError):
            raise InputError(f"cannot read stdin: {line.strerror or line}.")
        number += 1
        texts.append(utf8_text(line.removesuffix(b"\r"), f"line {number} of stdin"))
        if len(texts) == CHUNK or pending.empty():
            yield texts
            texts = []
    if texts:
        yield texts


def text_batches(args_texts, stdin):
    """The texts to classify in lists: the TEXTs, and for "-" each line of stdin."""
    for from_stdin, texts in itertools.groupby(args_texts, lambda text: text == "-"):
        if from_stdin:
            for _ in texts:  # each "-" reads stdin to its end
                yield from stdin_batches(stdin)
        else:
            yield list(texts)


def printable(text):
    return text.translate(CONTROL_ESCAPES)


def print_result(text, probas, explanation, labels, args, threshold):
    if args.json:
        print(json.dumps(result_record(text, probas, labels, threshold, explanation),
                         allow_nan=False))
        return
    best = predicted_class(probas, threshold)
    names = [printable(name) for name in labels]
    if args.all:
        shown = "  ".join(f"P({name})={p:.3f}" for name, p in zip(names, probas))
    elif len(labels) == 2 and labels[1] == "spam":
        shown = f"P(spam)={probas[1]:.3f}"  # the one number a spam filter thresholds
    else:
        shown = f"P({names[best]})={probas[best]:.3f}"
    print(f"{names[best]}\t{shown}\t{printable(text)}")
    if explanation is not None:
        print("\n".join(explanation_lines(explanation, names[best], sys.stdout.isatty())))


def classify_and_explain(texts, model, tokenizer, device, info, threshold=None, method=None,
                         between=lambda: None):
    """[(probabilities, explanation toward the predicted class by method, or None)] per text."""
    probabilities = classify_texts(texts, model, tokenizer, device, info["max_length"],
                                   info["pad_token_id"], temperature=info["temperature"])
    if not method:
        return [(probas, None) for probas in probabilities]
    targets = [predicted_class(p, threshold) for p in probabilities]
    explanations = explain_texts(texts, targets, model, tokenizer, info["max_length"],
                                 info["pad_token_id"], method, between)
    if not all(math.isfinite(piece["score"]) for pieces in explanations for piece in pieces):
        raise NonFiniteLogits("its explanation's scores are not all finite numbers (NaN or "
                              "infinity): its weights are out of range. Leave out --explain, "
                              "or fine-tune it again.")
    return list(zip(probabilities, explanations))


def classify_and_print(batches, model, tokenizer, device, info, args, threshold):
    """Classifies (and explains) each list of texts, prints a line per text; how many."""
    done = 0
    for texts in batches:
        answers = iter(classify_and_explain([text for text in texts if text.strip()], model,
                                            tokenizer, device, info, threshold,
                                            args.explain and args.explain_method))
        try:
            for text in texts:
                if text.strip():
                    print_result(text, *next(answers), info["labels"], args, threshold)
                else:  # a blank line gets a line too: output line N answers input line N
                    print(json.dumps({"text": text, "error": BLANK}) if args.json
                          else f"-\t{BLANK}\t{printable(text)}")
            sys.stdout.flush()
        except BrokenPipeError:
            raise  # the reader went away: run_cli ends quietly
        except OSError as e:  # a full disk, /dev/full: stdout to nothing, so exit is quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise InputError(f"cannot write the results to stdout: {e.strerror or e}.") from None
        done += len(texts)
    return done


def predicted_class(probas, threshold=None):
    """The chapter's argmax, or class 1 where its probability is above threshold."""
    return probas.index(max(probas)) if threshold is None else int(probas[1] > threshold)


def result_record(text, probas, labels, threshold=None, explanation=None):
    """One message's result, as --json prints it and /classify answers it."""
    record = {"text": text, "label": labels[predicted_class(probas, threshold)],
              "probabilities": dict(zip(labels, probas))}
    if explanation is not None:
        record["explanation"] = explanation
    return record


def explanation_lines(pieces, label, coloured, top=5):
    """Under a result: the message coloured by token (on a terminal: a background from
    white to red toward the class, to blue against it), then the top tokens."""
    lines = []
    if coloured:
        largest, why = max(abs(piece["score"]) for piece in pieces), ""
        for piece in pieces:
            strength = min(abs(piece["score"]) / largest, 1.0) if largest > 0 else 0.0
            fade = round(255 * (1 - 0.75 * strength))
            red, blue = (255, fade) if piece["score"] > 0 else (fade, 255)
            why += f"\x1b[30;48;2;{red};{fade};{blue}m{printable(piece['token'])}\x1b[0m"
        lines.append(f"  why: {why}   (\x1b[30;48;2;255;64;64m toward {label} \x1b[0m "
                     f"\x1b[30;48;2;64;64;255m against \x1b[0m)")
    strongest = sorted(pieces, key=lambda piece: -piece["score"])[:top]
    lines.append(f"  toward {label}: " + "  ".join(
        f"{piece['token']!r} {piece['score']:+.3f}" for piece in strongest))
    return lines


def add_texts_argument(parser):
    parser.add_argument("texts", nargs="*", metavar="TEXT",
                        help="messages to classify; - reads one per line from stdin and "
                             "prints one line per line read, in order, as soon as the input "
                             f"pauses (at most {CHUNK:,} at a time). A blank line prints "
                             f"'-<tab>{BLANK}' (--json: an object with \"error\"); a line "
                             "that is not UTF-8 is classified with U+FFFD for its bad bytes, "
                             "and a note on stderr names it. Control characters in what is "
                             "printed (not --json) are escaped, as \\n or \\x1b. With "
                             "--explain (not --json), each result line is followed by its "
                             "explanation's lines, indented")


def add_output_options(parser):
    parser.add_argument("--all", action="store_true",
                        help="print the probability of every class, not only the chosen one")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per message: text, label, probabilities "
                             "(and with --explain: explanation, a list of {token, score} "
                             "whose tokens join to the text as classified, after truncation)")
    parser.add_argument("--threshold", default="argmax", choices=["argmax", "validated"],
                        help="how the label is chosen: argmax, the most probable class (the "
                             "chapter); validated, for two classes, class 1 (spam) where its "
                             "probability is above the threshold finetune.py chose on the "
                             "validation split for its --target-fpr (default: %(default)s)")


def check_texts(parser, args):
    """What classify.py needs before it loads a model to classify TEXTs."""
    if args.explain_method != EXPLAIN_DEFAULT and not args.explain:
        parser.error("--explain-method goes with --explain")
    if not args.texts:
        raise InputError("no message to classify: give texts as arguments, or - to read "
                         "one per line from stdin.")
    if any(not text.strip() for text in args.texts):
        raise InputError("a message to classify is empty or only whitespace.")
    if sys.stdout is None:  # started with >&-
        raise InputError("stdout is closed: there is nowhere to print the results.")
    if "-" in args.texts and sys.stdin is None:
        raise InputError("stdin is closed: - has no line to read.")


def classify_arguments(args, model, info, device, tokenizer):
    """classify.py's TEXTs (and stdin's lines for -), classified and printed in order."""
    validated = args.threshold == "validated"  # else the chapter's argmax: no threshold
    if validated and info["num_classes"] != 2:
        raise InputError(f"{args.checkpoint} has {info['num_classes']} classes: --threshold "
                         f"validated is for two (a threshold on P(class 1)); leave it out.")
    if validated and info["threshold"] is None:
        raise InputError(f"{args.checkpoint} has no validated threshold: it was saved before "
                         f"finetune.py chose one, or its validation split had fewer than 20 "
                         f"messages of class 0 ({info['labels'][0]}) to choose one on. "
                         f"Fine-tune again, or leave out --threshold validated.")
    threshold = info["threshold"] if validated else None
    # a TEXT's bytes that are not UTF-8 (Python keeps them as lone surrogates, which no
    # JSON reader takes) become U+FFFD, as on stdin
    texts = [utf8_text(text.encode("utf-8", errors="surrogateescape"), f"TEXT {i}")
             for i, text in enumerate(args.texts, 1)]
    batches = text_batches(texts, sys.stdin.buffer if "-" in texts else None)
    try:
        done = classify_and_print(batches, model, tokenizer, device, info, args, threshold)
    except NonFiniteLogits as e:
        raise InputError(f"{args.checkpoint}: {e}") from None
    if not done:
        raise InputError("no message to classify: stdin was empty.")
