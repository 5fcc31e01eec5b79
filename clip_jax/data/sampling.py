"""Which record each process reads at each step: a pure function of its position.

The input order is an endless stream of *global positions* 0, 1, 2, ...;
position g reads record `shuffled_index(g % n)` of epoch g // n, where each
epoch is a seeded pseudo-random permutation of the n records (a Feistel
network: O(1) memory for any n, no shuffle buffer, a full shuffle per epoch).

Processes own disjoint blocks of `local_batch` consecutive positions, dealt
round robin: process p of N owns blocks p, p + N, p + 2N, ... Its *cursor*
counts the positions it has consumed in its own blocks. Each step it takes the
next `local_batch` good samples; a bad one (skipped by the decoder) is replaced
by the next position of the process's own blocks, never another's. Hence:

- no sample is read by two processes, and within an epoch every good record
  appears exactly once;
- with no bad samples, step s reads exactly positions [s * B, (s + 1) * B)
  with rows in that order, on any number of processes (global batch B);
- the cursor alone (one integer per process) resumes the stream exactly.
"""

import numpy as np

_ROUNDS = 6
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _round_keys(seed, epoch):
    return np.random.SeedSequence([seed, epoch]).generate_state(_ROUNDS, np.uint64)


def _mix(values, key, mask):
    """A 64-bit avalanche hash (splitmix64's finaliser) of values ^ key, cut to `mask`."""
    x = values ^ key
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (x ^ (x >> np.uint64(31))) & mask


def shuffled_index(positions, num_records, seed, epoch):
    """Epoch `epoch`'s permutation of range(num_records), evaluated at `positions`
    (ints in [0, num_records)). A balanced Feistel network permutes the smallest
    even power of two >= num_records; values that land outside are walked on
    (cycle walking) until they fall inside, which keeps it a bijection."""
    positions = np.asarray(positions, dtype=np.uint64)
    if num_records <= 1:
        return positions.astype(np.int64)
    half_bits = max(1, (int(num_records - 1).bit_length() + 1) // 2)
    half_mask = np.uint64((1 << half_bits) - 1)
    keys = _round_keys(seed, epoch)

    def permute(values):
        left, right = values >> np.uint64(half_bits), values & half_mask
        for key in keys:
            left, right = right, left ^ _mix(right, key, half_mask)
        return (left << np.uint64(half_bits)) | right

    with np.errstate(over="ignore"):  # the hash multiplies modulo 2**64 on purpose
        values = permute(positions)
        outside = values >= num_records
        while outside.any():
            values[outside] = permute(values[outside])
            outside = values >= num_records
    return values.astype(np.int64)


def global_positions(cursors, local_batch, process_index, process_count):
    """Positions in the global stream of a process's own positions `cursors`."""
    cursors = np.asarray(cursors, dtype=np.int64)
    blocks = cursors // local_batch * process_count + process_index
    return blocks * local_batch + cursors % local_batch


def record_indices(positions, num_records, seed):
    """(record index, epoch) of global stream positions."""
    positions = np.asarray(positions, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_records)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        indices[in_epoch] = shuffled_index(offsets[in_epoch], num_records, seed, int(epoch))
    return indices, epochs


def uniforms(seed, positions, count):
    """float64 [len(positions), count] uniform in [0, 1): the random draws of each
    stream position (crop, caption choice), from a counter-based hash, so a
    sample's augmentation depends on (seed, position) only and costs no
    per-sample generator set-up."""
    positions = np.asarray(positions, dtype=np.uint64)[:, None]
    counters = positions * np.uint64(count) + np.arange(count, dtype=np.uint64)[None, :]
    key = np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0]
    with np.errstate(over="ignore"):
        bits = _mix(counters * np.uint64(0x9E3779B97F4A7C15), key, _MASK64)
    return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def mixture_sources(positions, weights, seed):
    """(source index, position in that source's own stream) of global stream
    positions, for a mixture with integer `weights`.

    Source j takes the positions where its count count_j(g) (positions before g
    it owns) grows: count_0(g) = (g * w_0 + u_0) // W_0 with W_0 the sum of all
    weights, and each later source splits what the earlier ones left the same
    way, the last taking the rest. The counts are closed-form, so any position's
    source and source position cost O(sources) however far the run is, the
    sources keep their own positions exactly (and so their own epochs), the
    realised mix is within one sample of the weights over any prefix, and the
    seeded offsets u_j decide where in each period a source's samples fall.
    Exact integer arithmetic: weights <= 10**6 and positions <= 10**12 fit int64.
    """
    positions = np.asarray(positions, dtype=np.int64)
    weights = [int(weight) for weight in weights]
    if len(weights) == 1:
        return np.zeros_like(positions), positions
    offsets = np.random.SeedSequence([seed, 2]).generate_state(len(weights), np.uint64)
    source = np.full(positions.shape, len(weights) - 1, np.int64)
    source_position = np.zeros_like(positions)
    rest_here, rest_next = positions.copy(), positions + 1  # positions left at g and g + 1
    unassigned = np.ones(positions.shape, bool)
    for j, weight in enumerate(weights[:-1]):
        total = sum(weights[j:])
        offset = np.int64(offsets[j] % np.uint64(total))
        count_here = (rest_here * weight + offset) // total - offset // total
        count_next = (rest_next * weight + offset) // total - offset // total
        takes = unassigned & (count_next > count_here)
        source[takes], source_position[takes] = j, count_here[takes]
        unassigned &= ~takes
        rest_here, rest_next = rest_here - count_here, rest_next - count_next
    source_position[unassigned] = rest_here[unassigned]
    return source, source_position
