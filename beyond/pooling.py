"""--pool: which output position the head reads (POOLS: last, first, flexible or mean)."""
import torch

POOLS = {  # which output position the head reads
    "last": "the last position of the padded sequence (the chapter)",
    "first": "the first token (Exercise 6.3)",
    "flexible": "the last real, non-padding token; batches padded to their own longest",
    "mean": "the average over the real tokens",
}


def real_lengths(input_batch, pad_token_id):
    # messages are encoded without special tokens, so pad ids only ever trail
    return (input_batch != pad_token_id).sum(dim=1)  # (b,)


def pool_positions(input_batch, pool, pad_token_id):
    """The one position per message the head reads, (b,); None for "mean"."""
    b, num_tokens = input_batch.shape
    if pool in ("last", "first"):
        return torch.full((b,), num_tokens - 1 if pool == "last" else 0, device=input_batch.device)
    if pool == "flexible":
        return (real_lengths(input_batch, pad_token_id) - 1).clamp(min=0)
    return None


def mean_over_real_tokens(x, input_batch, pad_token_id):
    # (b, T, d) -> (b, d)
    lengths = real_lengths(input_batch, pad_token_id)
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return (x * mask[..., None]).sum(dim=1) / lengths.clamp(min=1)[:, None]


def take_positions(x, positions):
    """x[i, positions[i]] for each row: (b, T, d) -> (b, 1, d)."""
    return x[torch.arange(x.shape[0], device=x.device), positions].unsqueeze(1)


def add_pool_option(parser):
    parser.add_argument("--pool", default="last", choices=list(POOLS), help="which output the "
                        "head reads: " + "; ".join(map(": ".join, POOLS.items())))
