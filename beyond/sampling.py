"""pandas' df.sample(random_state=seed) without pandas: the same rows in the
same order, so that balancing and splitting give the book's split byte for byte."""
import random


def sample(rows, n, seed):
    return [rows[i] for i in sample_order(len(rows), seed)[:n]]


def sample_order(n, seed):
    """df.sample(frac=1, random_state=seed)'s order, NumPy's RandomState(seed).permutation(n):
    Python's Mersenne Twister, but seeded with init_genrand and shuffled with masked draws."""
    state = [seed]
    for i in range(1, 624):
        state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + i) & 0xFFFFFFFF)
    rng = random.Random()
    rng.setstate((3, (*state, 624), None))  # 624: regenerate before the first draw
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        mask = (1 << i.bit_length()) - 1
        j = rng.getrandbits(32) & mask
        while j > i:
            j = rng.getrandbits(32) & mask
        order[i], order[j] = order[j], order[i]
    return order
