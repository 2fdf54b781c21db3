"""Sections 6.2-6.3: listings 6.1-6.5 in the book's order, on lists of (label, text)
rows where the book has pandas DataFrames; then the TSV and CSV reading and writing
that stand in for pandas."""
import csv
import io
import os
import shutil
import zipfile
from pathlib import Path

from beyond.cli import InputError  # first: it silences torch's NumPy warning
from beyond.download import download_file
from beyond.files import write_atomically
from beyond.sampling import sample
from beyond.tokens import PAD_TOKEN_ID, encode, pad_batch
import torch
from torch.utils.data import DataLoader, Dataset

url = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
zip_path = "sms_spam_collection.zip"
extracted_path = "sms_spam_collection"
data_file_path = Path(extracted_path) / "SMSSpamCollection.tsv"
ZIP_MEMBER = "SMSSpamCollection"
SPAM_LABELS = {"ham": 0, "spam": 1}     # the chapter's map of string labels to ids
SPAM_CLASS_NAMES = ["not spam", "spam"]  # what classify_review returns for 0 and 1
SEED = 123                               # the chapter's random_state and manual_seed
EMPTY_TEXT = "the message is empty (or only whitespace); remove the line or give it a text."


# --------------------------------------------------------- 6.2 Preparing the dataset

# Listing 6.1 Downloading and unzipping the dataset
def download_and_unzip_spam_data(url, zip_path, extracted_path, data_file_path):
    if data_file_path.exists():
        print(f"{data_file_path} already exists. Skipping download and extraction.")
        return

    # Downloading the file: beyond/download.py's, whole or not at all, one error offline
    zip_path = Path(f"{zip_path}.{os.getpid()}")  # torchrun's ranks may download at once
    download_file(url, zip_path, "the SMS Spam Collection",
                  "pass a local copy of SMSSpamCollection (or the UCI zip) with --data PATH")

    # Unzipping the file, into a folder of this process's own for the same reason
    unzipped = Path(extracted_path) / f".unzipped-{os.getpid()}"
    try:
        with zipfile.ZipFile(zip_path, "r") as zip_ref:
            zip_ref.extractall(unzipped)

        # Add .tsv file extension: a rename is atomic, so no rank reads half a file
        original_file_path = unzipped / "SMSSpamCollection"
        os.rename(original_file_path, data_file_path)
    except (zipfile.BadZipFile, FileNotFoundError) as e:  # not the zip the chapter reads
        raise InputError(f"{url} did not give the UCI zip of SMSSpamCollection ({e}).") from None
    finally:  # not the book's: neither the zip nor its other files are kept
        zip_path.unlink()
        shutil.rmtree(unzipped, ignore_errors=True)
    print(f"File downloaded and saved as {data_file_path}")


# Listing 6.2 Creating a balanced dataset (df: a list of (label, text) rows, no pandas)
def create_balanced_dataset(df, seed=SEED):  # seed: the book's 123, or --seed
    # Count the instances of "spam"
    num_spam = len([row for row in df if row[0] == "spam"])
    # Randomly sample "ham" instances to match the number of "spam" instances;
    # sample is pandas' df.sample(num_spam, random_state=seed): the same rows
    ham_subset = sample([row for row in df if row[0] == "ham"], num_spam, seed)
    # Combine ham subset with "spam" (pd.concat: lists are joined with +)
    balanced_df = ham_subset + [row for row in df if row[0] == "spam"]
    return balanced_df


# Listing 6.3 Splitting the dataset
def random_split(df, train_frac, validation_frac, seed=SEED):  # seed: 123, or --seed
    # Shuffle the entire DataFrame: pandas' df.sample(frac=1, random_state=seed); a list
    # has no index to reset
    df = sample(df, len(df), seed)

    # Calculate split indices
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)

    # Split the DataFrame
    train_df = df[:train_end]
    validation_df = df[train_end:validation_end]
    test_df = df[validation_end:]
    # not the book's: an empty split would divide by zero in calc_accuracy_loader
    if not train_df or not validation_df or not test_df:
        raise InputError(f"{len(df)} messages are too few to split {train_frac:.0%} / "
                         f"{validation_frac:.0%} / rest into non-empty training, validation "
                         f"and test sets.")
    return train_df, validation_df, test_df


# ----------------------------------------------------------- 6.3 Creating data loaders

# Listing 6.4 Setting up a Pytorch Dataset class
class SpamDataset(Dataset):

    # not the book's: num_classes checks the labels read; pad=False (--pool) leaves the
    # padding to each batch; PAD_TOKEN_ID is the book's 50256, "<|endoftext|>"
    def __init__(self, csv_file, tokenizer, max_length=None, pad_token_id=PAD_TOKEN_ID,
                 num_classes=2, pad=True):
        self.data = read_csv(csv_file, num_classes)  # pd.read_csv: (label, text) rows

        # Pre-tokenize texts: encode is the book's tokenizer.encode, which would refuse a
        # message holding "<|endoftext|>"; encode reads it as text
        self.encoded_texts = [encode(text, tokenizer) for _, text in self.data]

        if max_length is None:
            self.max_length = self._longest_encoded_length()
        else:
            self.max_length = max_length
            # Truncate sequences if they are longer than max_length
            self.encoded_texts = [encoded_text[:self.max_length]
                                  for encoded_text in self.encoded_texts]

        # Pad sequences to the longest sequence
        if pad:
            self.encoded_texts = [
                encoded_text + [pad_token_id] * (self.max_length - len(encoded_text))
                for encoded_text in self.encoded_texts
            ]

    def __getitem__(self, index):
        encoded = self.encoded_texts[index]
        label = self.data[index][0]  # the book's self.data.iloc[index]["Label"]
        return (torch.tensor(encoded, dtype=torch.long),
                torch.tensor(label, dtype=torch.long))

    def __len__(self):
        return len(self.data)

    def _longest_encoded_length(self):
        max_length = 0
        for encoded_text in self.encoded_texts:
            encoded_length = len(encoded_text)
            if encoded_length > max_length:
                max_length = encoded_length
        return max_length


# Listing 6.5 Creating PyTorch data loaders, a function for --batch-size. The book's
# torch.manual_seed(123) before it is left out: a loader draws its shuffle when iterated,
# and the first to iterate it (section 6.6's accuracies) seeds first: the book's batches.
# collate_fn: pad_batch stacks padded messages as the default does, pads others per batch
def create_data_loaders(train_dataset, val_dataset, test_dataset, batch_size=8,
                        num_workers=0):
    train_loader = DataLoader(dataset=train_dataset, batch_size=batch_size, shuffle=True,
                              num_workers=num_workers, drop_last=True, collate_fn=pad_batch)
    val_loader = DataLoader(dataset=val_dataset, batch_size=batch_size,
                            num_workers=num_workers, drop_last=False, collate_fn=pad_batch)
    test_loader = DataLoader(dataset=test_dataset, batch_size=batch_size,
                             num_workers=num_workers, drop_last=False, collate_fn=pad_batch)
    return train_loader, val_loader, test_loader


# ------------------------------- what the book gets from pandas and zipfile, by hand

def load_messages(path):
    """[(label, text)] from --data: the SMS data (TSV or UCI zip) or a TSV or CSV of yours."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputError(f"data file {path} {what}.")
    if zipfile.is_zipfile(path):  # parsed in memory: the zip's folder may be read-only
        return read_tsv(f"{path}:{ZIP_MEMBER}", SPAM_LABELS, raw=read_member(path))
    if path.suffix.lower() == ".csv":
        return read_labeled_csv(path)
    return read_tsv(path, labels=SPAM_LABELS if path.name.startswith(ZIP_MEMBER) else None)


def write_csv(rows, path, label_ids=SPAM_LABELS):
    """The chapter's map({"ham": 0, "spam": 1}) (label_ids) and to_csv(index=None)."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Label", "Text"])
    for label, text in rows:
        writer.writerow([label_ids[label], text])
    write_atomically(path, out.getvalue())


def read_csv(path, num_classes=2):
    """[(label_id, text)] from a split write_csv wrote: the book's pd.read_csv."""
    rows = []
    for number, (label, text) in enumerate(read_labeled_csv(path), start=2):
        if not label.strip().isdigit() or not 0 <= int(label) < num_classes:
            raise InputError(f"{path}, row {number}: label {label!r} is not a class id "
                             f"from 0 to {num_classes - 1}.")
        rows.append((int(label), text))
    return rows


def read_member(zip_file):
    """The bytes of zip_file's one expected member; nothing else is read or written."""
    try:
        with zipfile.ZipFile(zip_file) as zip_ref:
            if ZIP_MEMBER not in zip_ref.namelist():
                raise InputError(f"{zip_file} has no member {ZIP_MEMBER!r} "
                                 f"(it has: {', '.join(zip_ref.namelist()[:5]) or 'nothing'}).")
            return zip_ref.read(ZIP_MEMBER)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise InputError(f"{zip_file} is not a readable zip file ({e}).") from None


def read_tsv(path, labels=None, raw=None):
    """[(label, text)] as the chapter's pd.read_csv(path, sep="\\t", header=None) reads them:
    a text opening with a quote may run over lines (the SMS data has one: 5,572 messages, as
    in the book); raw: the bytes, already read (path then only names them, as zip:member)."""
    try:
        raw = Path(path).read_bytes() if raw is None else raw
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}, line {line}: not UTF-8 text "
                         f"(byte {raw[e.start]:#04x}).") from None
    # A last line holding one quote reads as [""] unless a quote above is left open.
    reader = csv.reader(io.StringIO(text + '\n"', newline=""), delimiter="\t")
    records, number = [], 1  # number: the line a record starts on
    try:
        for fields in reader:
            records.append((fields, number, reader.line_num))
            number = reader.line_num + 1
    except csv.Error as e:  # e.g. an open quote that runs past csv's field size limit
        raise InputError(f"{path}, line {number}: {e}.") from None
    fields, number, _ = records.pop()
    if fields != [""]:
        raise InputError(f"{path}, line {number}: a quoted text opens here and never closes "
                         f"(a text starting with a double quote is a quoted field, as in "
                         f"pandas: close it, and write a quote inside it as \"\").")
    rows = []
    for fields, number, last in records:
        if "".join(fields).strip():
            rows.append(tsv_row(fields, path, number, labels))
            if last > number:
                print(f"note: {path}, lines {number}-{last} hold one quoted text, read as "
                      f"one message (as the chapter's pd.read_csv reads it).")
    if not rows:
        raise InputError(f"{path} holds no messages.")
    return rows


def tsv_row(fields, path, number, labels):
    """(label, text) from one TSV record; a tab inside the text stays in it."""
    if len(fields) < 2:
        raise InputError(f"{path}, line {number}: no tab between label and text.")
    label = fields[0].strip()
    if not label or (labels is not None and label not in labels):
        expected = f" (expected one of {', '.join(labels)})" if labels else ""
        raise InputError(f"{path}, line {number}: unknown label {label!r}{expected}.")
    text = "\t".join(fields[1:])
    if not text.strip():
        raise InputError(f"{path}, line {number}: {EMPTY_TEXT}")
    return label, text


def read_labeled_csv(path):
    """[(label, text)] from a CSV with Label and Text columns; labels are strings."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for column in ("Label", "Text"):
                if column not in columns:
                    raise InputError(f"{path} has no {column!r} column "
                                     f"(its header is {','.join(columns) or 'empty'}).")
            rows = []
            for number, row in enumerate(reader, start=2):
                if not (row["Label"] or "").strip():
                    raise InputError(f"{path}, row {number}: the label is empty.")
                if not (row["Text"] or "").strip():
                    raise InputError(f"{path}, row {number}: {EMPTY_TEXT}")
                rows.append((row["Label"].strip(), row["Text"]))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}.") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path} is not a readable UTF-8 CSV file ({e}).") from None
    if not rows:
        raise InputError(f"{path} holds no messages.")
    return rows


def class_names(label_ids):
    """What classify prints for each class id: the chapter's "not spam"/"spam"
    for ham/spam, the labels themselves otherwise."""
    if set(label_ids) == set(SPAM_LABELS):
        return SPAM_CLASS_NAMES
    return sorted(label_ids, key=label_ids.get)
