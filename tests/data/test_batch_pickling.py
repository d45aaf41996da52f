"""A batch ships to an actor (pickle) as its defining tensors, whatever torchrec cached on it."""

from __future__ import annotations

import pickle

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.data.batch import Batch


def multi_hot_batch(weighted: bool = False) -> Batch:
    generator = torch.Generator().manual_seed(0)
    batch_size, keys = 64, [f"cat_{i}" for i in range(8)]
    lengths = torch.randint(0, 30, (len(keys) * batch_size,), generator=generator)
    values = torch.randint(0, 1000, (int(lengths.sum()),), generator=generator)
    weights = torch.rand(values.shape, generator=generator) if weighted else None
    return Batch(
        dense=torch.rand(batch_size, 13, generator=generator),
        sparse=KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=values, lengths=lengths, weights=weights
        ),
        labels=torch.randint(0, 2, (batch_size,), generator=generator).float(),
    )


def assert_same_batch(got: Batch, expected: Batch) -> None:
    assert got.sparse.keys() == expected.sparse.keys()
    torch.testing.assert_close(got.dense, expected.dense, rtol=0, atol=0)
    torch.testing.assert_close(got.labels, expected.labels, rtol=0, atol=0)
    torch.testing.assert_close(got.sparse.values(), expected.sparse.values(), rtol=0, atol=0)
    torch.testing.assert_close(got.sparse.lengths(), expected.sparse.lengths(), rtol=0, atol=0)
    for key, jagged in expected.sparse.to_dict().items():
        torch.testing.assert_close(got.sparse[key].values(), jagged.values(), rtol=0, atol=0)


def test_cached_per_feature_views_do_not_travel_with_the_batch():
    batch = multi_hot_batch()
    fresh = len(pickle.dumps(batch))
    batch.sparse.to_dict()  # torchrec's modules do this; it caches one view per feature
    assert batch.sparse._jt_dict is not None
    assert len(pickle.dumps(batch)) == fresh
    assert_same_batch(pickle.loads(pickle.dumps(batch)), batch)


def test_a_view_of_a_larger_buffer_travels_as_its_own_bytes():
    big = torch.rand(10_000, 13)
    batch = multi_hot_batch()
    batch = Batch(dense=big[100:164], sparse=batch.sparse, labels=batch.labels)
    size = len(pickle.dumps(batch))
    assert size < big.nbytes / 4
    torch.testing.assert_close(pickle.loads(pickle.dumps(batch)).dense, big[100:164])


def test_per_sample_weights_survive_the_trip():
    batch = multi_hot_batch(weighted=True)
    got = pickle.loads(pickle.dumps(batch))
    torch.testing.assert_close(got.sparse.weights(), batch.sparse.weights(), rtol=0, atol=0)
    assert_same_batch(got, batch)


def test_tensor_bytes_travel_out_of_band_and_come_back_writable():
    # Ray pickles with protocol 5: out-of-band buffers go to its shared-memory store
    # without a copy, and come back as read-only views of it
    batch = multi_hot_batch(weighted=True)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    payload = sum(memoryview(b).nbytes for b in buffers)
    assert (
        payload
        == sum(
            t.nbytes
            for t in (batch.dense, batch.labels, batch.sparse.values(), batch.sparse.lengths())
        )
        + batch.sparse.weights().nbytes
    )
    assert len(data) < 2_000  # keys and framing only

    read_only = [memoryview(b).toreadonly() for b in buffers]
    got = pickle.loads(data, buffers=read_only)
    assert_same_batch(got, batch)
    got.dense.add_(1.0)  # a tensor of its own: writable, the sender's batch untouched
    assert not torch.equal(got.dense, batch.dense)
