"""BatchIterator and training augmentation."""

import numpy as np
import pytest

from u2ad_jax.data import pipeline
from u2ad_jax.data import sliceset


def make_slice_set(num_slices=23, size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.random((num_slices, size, size)).astype(np.float32)
  images[:, 0, 0] = 0.0  # every slice spans [0, 1] like a normalised slice
  images[:, 0, 1] = 1.0
  labels = np.zeros((num_slices, size, size), np.uint8)
  labels[:, 4:12, 6:9] = 3
  labels[:, 4:12, 9:11] = 4
  ids = [f"sub-{i // 5}" for i in range(num_slices)]
  return sliceset.SliceSet(
      images=images, train_roi=sliceset.train_roi_from_labels(labels),
      score_roi=sliceset.score_roi_from_labels(labels), labels=labels,
      vertebrae=np.zeros_like(labels), subject_ids=ids,
      slice_index=np.arange(num_slices) % 5, geometries={i: None for i in ids})


def iterator(slice_set, **kwargs):
  args = dict(global_batch=8, num_devices=2, seed=0, augment=False, drop_remainder=False)
  args.update(kwargs)
  return pipeline.BatchIterator(slice_set, **args)


def stack_epoch(it, epoch):
  return list(it.epoch(epoch))


def test_shapes_and_contents():
  data = make_slice_set()
  it = iterator(data)
  batches = stack_epoch(it, 0)
  assert it.steps_per_epoch == 3 == len(batches)
  for batch in batches:
    assert batch["image"].shape == (2, 4, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["train_roi"].shape == batch["score_roi"].shape == (2, 4, 16, 16)
    assert batch["train_roi"].dtype == bool and batch["score_roi"].dtype == bool
    assert batch["index"].shape == batch["valid"].shape == (2, 4)
    assert batch["index"].dtype == np.int32 and batch["valid"].dtype == bool
    # Without augmentation each example is exactly its slice.
    for d in range(2):
      for b in range(4):
        i = batch["index"][d, b]
        if i >= 0:
          np.testing.assert_array_equal(batch["image"][d, b, ..., 0], data.images[i])
          np.testing.assert_array_equal(batch["train_roi"][d, b], data.train_roi[i])
          np.testing.assert_array_equal(batch["score_roi"][d, b], data.score_roi[i])
  indices = np.concatenate([b["index"].ravel() for b in batches])
  real = indices[indices >= 0]
  assert sorted(real.tolist()) == list(range(23))  # every slice exactly once


def test_pad_remainder():
  it = iterator(make_slice_set(), drop_remainder=False)
  last = stack_epoch(it, 0)[-1]
  # 23 = 2 * 8 + 7: the last global batch has one padding example, at its end.
  assert last["valid"].sum() == 7
  assert not last["valid"][1, 3] and last["index"][1, 3] == -1
  assert np.all(last["image"][1, 3] == 0) and not last["train_roi"][1, 3].any()
  assert not last["score_roi"][1, 3].any()
  assert np.array_equal(last["valid"], last["index"] >= 0)


def test_drop_remainder():
  it = iterator(make_slice_set(), drop_remainder=True)
  batches = stack_epoch(it, 0)
  assert it.steps_per_epoch == 2 == len(batches)
  assert all(b["valid"].all() for b in batches)
  seen = np.concatenate([b["index"].ravel() for b in batches])
  assert len(set(seen.tolist())) == 16
  with pytest.raises(ValueError):
    iterator(make_slice_set(num_slices=5), drop_remainder=True)


def test_determinism_per_seed_and_epoch():
  data = make_slice_set()
  a = stack_epoch(iterator(data, seed=7, augment=True), 3)
  b = stack_epoch(iterator(data, seed=7, augment=True), 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  order = iterator(data, seed=7).epoch_order
  np.testing.assert_array_equal(order(3), np.random.default_rng([7, 3]).permutation(23))
  assert not np.array_equal(order(3), order(4))  # epochs differ
  assert not np.array_equal(order(3), iterator(data, seed=8).epoch_order(3))  # seeds differ
  # Resuming at epoch 3 does not depend on having run epochs 0..2 in the same iterator.
  it = iterator(data, seed=7, augment=True)
  for e in range(3):
    stack_epoch(it, e)
  again = stack_epoch(it, 3)
  np.testing.assert_array_equal(again[1]["image"], a[1]["image"])
  # Without shuffling the order is the SliceSet's.
  np.testing.assert_array_equal(iterator(data, shuffle=False).epoch_order(5), np.arange(23))


@pytest.mark.parametrize("process_count,num_devices", [(2, 2), (4, 1), (2, 1)])
def test_processes_partition_the_global_batch(process_count, num_devices):
  data = make_slice_set()
  single = stack_epoch(iterator(data, num_devices=1, seed=3, augment=True), 1)
  parts = [stack_epoch(iterator(data, num_devices=num_devices, seed=3, augment=True,
                                process_index=p, process_count=process_count), 1)
           for p in range(process_count)]
  assert all(len(p) == len(single) for p in parts)
  for step, reference in enumerate(single):
    for key in reference:
      # Process blocks in process order, devices in order, equal the one-process global batch.
      joined = np.concatenate([p[step][key].reshape((-1,) + p[step][key].shape[2:])
                               for p in parts])
      np.testing.assert_array_equal(joined, reference[key].reshape(joined.shape))
    assert parts[0][step]["index"].shape == (num_devices, 8 // (process_count * num_devices))


def test_bad_batch_split():
  with pytest.raises(ValueError):
    iterator(make_slice_set(), global_batch=6, num_devices=4)
  with pytest.raises(ValueError):
    iterator(make_slice_set(), process_index=2, process_count=2)


def test_augment_batch_ranges():
  data = make_slice_set(num_slices=64, size=32)
  rng = np.random.default_rng(0)
  out, params = pipeline.augment_batch(data.images, data.train_roi, rng, return_params=True)
  assert out.shape == data.images.shape and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  for key in ("brightness", "contrast"):
    assert np.all((params[key] >= 0.8) & (params[key] <= 1.2))
    assert params[key].max() - params[key].min() > 0.2  # actually spread over the range
  # Noise-free: exactly contrast about the ROI mean, brightness, clip (no min-max after).
  images = data.images.copy()
  images[data.train_roi] = 0.3 + 0.05 * images[data.train_roi]  # ROI level far from the image mean
  rng = np.random.default_rng(1)
  clean, params = pipeline.augment_batch(images, data.train_roi, rng, noise_std=0.0,
                                         return_params=True)
  pivot = np.array([im[r].mean() for im, r in zip(images, data.train_roi)])[:, None, None]
  x = ((images - pivot) * params["contrast"][:, None, None] + pivot) * params["brightness"][:, None, None]
  np.testing.assert_allclose(clean, np.clip(x, 0, 1), atol=1e-6)


def test_augmentation_moves_roi_level_and_contrast_both_ways():
  # An image kept inside (0, 1), so no clip saturates: brightness / contrast must still change it
  # (a min-max after them undid both: the augmented image came back bit-identical for b, c <= 1).
  data = make_slice_set(num_slices=64, size=32)
  inner = (data.images * 0.5 + 0.25).astype(np.float32)
  out, params = pipeline.augment_batch(inner, data.train_roi, np.random.default_rng(3),
                                       noise_std=0.0, return_params=True)
  roi = data.train_roi
  mean_in = np.array([im[r].mean() for im, r in zip(inner, roi)])
  mean_out = np.array([im[r].mean() for im, r in zip(out, roi)])
  std_in = np.array([im[r].std() for im, r in zip(inner, roi)])
  std_out = np.array([im[r].std() for im, r in zip(out, roi)])
  darker = params["brightness"] < 0.95
  brighter = params["brightness"] > 1.05
  assert darker.any() and brighter.any()
  # The ROI level follows the brightness factor, down AND up.
  np.testing.assert_allclose(mean_out / mean_in, params["brightness"], rtol=1e-4)
  assert np.all(mean_out[darker] < mean_in[darker] - 1e-3)
  assert np.all(mean_out[brighter] > mean_in[brighter] + 1e-3)
  # The ROI contrast follows contrast x brightness, shrinking AND growing.
  gain = params["contrast"] * params["brightness"]
  np.testing.assert_allclose(std_out / std_in, gain, rtol=1e-4)
  assert (gain < 0.9).any() and (gain > 1.1).any()
  # Every image is changed, factors below 1 included.
  low = (params["brightness"] < 0.95) & (params["contrast"] <= 1)
  assert low.any()
  assert np.all(np.abs(out[low] - inner[low]).max(axis=(1, 2)) > 1e-2)


def test_augmentation_noise_sigma():
  # Noise sigma 0.02 on a two-level image whose levels stay inside (0, 1).
  two_level = np.full((16, 32, 32), 0.3, np.float32)
  two_level[:, :, 16:] = 0.5
  noisy = pipeline.augment_batch(two_level, np.ones_like(two_level, bool),
                                 np.random.default_rng(2))
  within = np.sqrt((noisy[:, :, :16].var(axis=(1, 2)) + noisy[:, :, 16:].var(axis=(1, 2))) / 2)
  np.testing.assert_allclose(within, 0.02, rtol=0.1)


def test_training_batches_are_augmented_and_eval_batches_are_not():
  data = make_slice_set()
  plain = stack_epoch(iterator(data, seed=1, augment=False), 0)[0]
  augmented = stack_epoch(iterator(data, seed=1, augment=True), 0)[0]
  np.testing.assert_array_equal(plain["index"], augmented["index"])
  np.testing.assert_array_equal(plain["train_roi"], augmented["train_roi"])
  assert not np.allclose(plain["image"], augmented["image"])
  assert augmented["image"].min() >= 0 and augmented["image"].max() <= 1
  # Different epochs augment the same slice differently.
  other = stack_epoch(iterator(data, seed=1, augment=True, shuffle=False), 0)[0]
  later = stack_epoch(iterator(data, seed=1, augment=True, shuffle=False), 1)[0]
  assert not np.allclose(other["image"], later["image"])


def test_prefetch_same_batches_and_early_stop():
  data = make_slice_set()
  direct = stack_epoch(iterator(data, seed=2, augment=True), 0)
  prefetched = stack_epoch(iterator(data, seed=2, augment=True, prefetch=2), 0)
  assert len(direct) == len(prefetched)
  for x, y in zip(direct, prefetched):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  # Breaking out early stops the producer thread.
  import threading
  gen = iterator(data, prefetch=1).epoch(0)
  next(gen)
  gen.close()
  assert not any(t.name == "u2ad-prefetch" and t.is_alive() for t in threading.enumerate())


def test_index_only_batches_pick_the_same_rows():
  """What the trainer iterates (the step gathers the images on the device): the same index and
  valid arrays as full batches, nothing else."""
  data = make_slice_set()
  full = stack_epoch(iterator(data, seed=4), 1)
  light = stack_epoch(iterator(data, seed=4, with_examples=False), 1)
  assert len(full) == len(light)
  for x, y in zip(full, light):
    assert set(y) == {"index", "valid"}
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["valid"], y["valid"])
  with pytest.raises(ValueError, match="with_examples"):
    iterator(data, augment=True, with_examples=False)
