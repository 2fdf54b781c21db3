"""Token ids: a message encoded as plain text, and padding per batch."""
import torch

PAD_TOKEN_ID = 50256  # "<|endoftext|>", GPT-2's padding in the chapter


def encode(text, tokenizer, max_length=None):
    """A message's token ids, cut to max_length; "<|endoftext|>" in it is text, not the pad id."""
    if max_length is not None:  # a GPT-2 token is at most 128 bytes: the rest is never read,
        text = text[:256 * (max_length + 1)]  # so a 10 MB line is not tokenized whole
    return tokenizer.encode(text, disallowed_special=())[:max_length]


def pad_ids(sequences, pad_token_id=PAD_TOKEN_ID, length=None):
    """Token id lists or tensors -> (b, length), padded at the end; length: the longest's."""
    length = length or max(max((len(ids) for ids in sequences), default=0), 1)
    inputs = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    for i, ids in enumerate(sequences):
        inputs[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return inputs


def pad_batch(batch, pad_token_id=PAD_TOKEN_ID):
    """Collates (ids, label) pairs, padding ids to the batch's longest: (b, T), (b,)."""
    inputs = pad_ids([ids for ids, _ in batch], pad_token_id)
    return inputs, torch.stack([label for _, label in batch])
