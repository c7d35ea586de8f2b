"""The frozen reference model's per-token arrays, computed once over the training split, on disk.

``reference.mode = "cache"``: before training, the trainer runs its jitted reference function over
one epoch of the training split, and this module stores what it returns (``name -> float32
[B, T]`` per batch, e.g. ``ref/chosen/token_logps``, ``chosen/token_weights``; per-token, aligned
with the batch's positions after the next-token shift of ``mmpo_jax.data.batch``, 0 at masked
positions). Training then gathers each batch's rows by ``Batch.example_index`` instead of running
the reference forward.

Keying. A cache lives in ``<directory>/<key[:16]>/`` and is reused only when its manifest holds the
full ``key``; ``cache_key(**parts)`` is a sha256 of everything the arrays depend on, given as
JSON-able parts: the model preset and dtypes, the data settings, the method settings that shape the
reference arrays, ``tokenizer_digest(tokenizer)``, the template, and ``params_digest(state)`` of the
reference parameters. Any change in model weights, data settings, tokenizer or method settings
therefore gives a new key, hence a new directory and a rebuild; older caches are left in place.
What the key cannot see (a data file edited in place under the same config) is caught per record:
the cache stores a fingerprint of every record's tokens and ``lookup`` raises when a batch's
tokens differ from those the rows were computed on [our choice].

Layout [our choice: the largest-bucket layout]. One ``[num_records, max_length]`` float32 ``.npy``
per name (memory-mapped when read), where ``max_length`` is the largest bucket; row ``i`` is
record ``i``'s values trimmed to the record's length (its longest token group; zeros after it), so
a record reads back the same in any bucket of any later batch. Beside them ``record_lengths.npy``
(int32 ``[N]``, 0 for a record the pipeline dropped while building), ``record_fingerprints.npy``
(uint64 ``[N]``) and ``manifest.json`` (key, names, files, shapes, ``num_records``,
``max_length``, creation time, the caller's metadata).

Atomicity: ``write`` fills ``<directory>/.<key[:16]>.tmp-<random>/`` and renames it to
``<key[:16]>/`` only once every record has its row and the manifest is written, so an interrupted
build (an exception, a killed process) never leaves a directory that ``exists`` accepts. An
exception removes its temporary directory; a killed process leaves one behind, which nothing reads
and which may be deleted.

Processes: building needs every record of the split on one process, so ``write`` raises
NotImplementedError when ``jax.process_count() > 1``: precompute on one host (a one-process run of
the same config) and share the directory, or use ``reference.mode = "copy"``. ``lookup`` only reads
and works on every process of a pod.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
import tqdm

from mmpo_jax.data.batch import AnyBatch, token_field

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the on-disk layout or the meaning of a row changes; part of every key."""

MANIFEST = "manifest.json"
LENGTHS_FILE = "record_lengths.npy"
FINGERPRINTS_FILE = "record_fingerprints.npy"
_KEY_DIR_CHARS = 16
_MAX_LISTED = 10  # record indices quoted in an error message

ComputeFn = Callable[[Any], Mapping[str, Any]]
"""``compute_fn(batch) -> {name: float [B, T]}``, the trainer's (jitted) reference function."""


# ----------------------------------------------------------------------------- keys and digests


def _canonical(value: Any, where: str) -> Any:
    """``value`` as plain JSON types; mappings (``ConfigDict`` too) become key-sorted dicts."""
    if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{where} is a {type(value).__name__} ({value!r}); it must be JSON-able: dicts/"
        f"ConfigDicts, lists/tuples, str, int, float, bool or None (digest arrays first, e.g. "
        f"with params_digest)")


def cache_key(**parts: Any) -> str:
    """A stable sha256 hex digest of everything that determines the reference arrays.

    Args:
      **parts: JSON-able values (``ConfigDict`` s are converted), e.g. ``model=config.model``,
        ``data=config.data``, ``method={...options that change the reference arrays...}``,
        ``tokenizer=tokenizer_digest(tok)``, ``template="llava_1_5"``,
        ``params=params_digest(reference_state)``. Key order does not matter; tuples and lists
        are the same. ``FORMAT_VERSION`` is mixed in.

    Returns:
      64 lower-case hex characters. Any change of any part (a weight, a data setting, the
      tokenizer, a method option) gives a different key.
    """
    canonical = _canonical({"format_version": FORMAT_VERSION, **parts}, "parts")
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def params_digest(state: Any) -> str:
    """sha256 hex digest of a parameter pytree's contents (an ``nnx.State`` or any pytree).

    Every leaf contributes its path (``jax.tree_util.keystr``), dtype, shape and raw bytes, in
    sorted path order. Device arrays are fetched one leaf at a time, so host memory peaks at the
    largest leaf, not the model. Leaves must be arrays or scalars; ``None`` subtrees are empty.

    Args:
      state: the reference parameters.

    Returns:
      64 lower-case hex characters; equal for equal contents (across calls and processes),
      different when any element, dtype, shape or path differs.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    digest = hashlib.sha256()
    for path, leaf in sorted(((jax.tree_util.keystr(p), leaf) for p, leaf in leaves),
                             key=lambda item: item[0]):
        host = np.ascontiguousarray(jax.device_get(leaf))
        header = json.dumps([path, host.dtype.str, host.dtype.name, list(host.shape)])
        digest.update(len(header).to_bytes(8, "little") + header.encode())
        digest.update(host.nbytes.to_bytes(8, "little"))
        digest.update(host.reshape(-1).view(np.uint8))  # no copy of the leaf
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 hex digest of a transformers tokenizer's behaviour-defining state.

    For a fast tokenizer: its ``tokenizers`` JSON (vocabulary, merges, normaliser, pre-tokeniser,
    post-processor, added tokens) plus the special-token map; for a slow one, the sorted
    vocabulary plus the special-token map.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{body}\n{specials}".encode()).hexdigest()


# ----------------------------------------------------------------------------- per-record identity


def _token_groups(batch: AnyBatch) -> list[str]:
    """The token groups present in ``batch`` (``Batch.token_groups`` order)."""
    return [g for g in type(batch).token_groups
            if getattr(batch, token_field(g, "input_ids")) is not None]


def record_lengths(batch: AnyBatch) -> np.ndarray:
    """Each row's length: the longest of its token groups' unpadded lengths; int32 ``[B]``.

    Every array a reference function returns is 0 at positions ``>= length`` (the shifted loss
    mask is 0 there in every group), and the length is the same in every batch holding the record.
    """
    lengths = [np.asarray(getattr(batch, token_field(g, "attention_mask"))).sum(axis=1)
               for g in _token_groups(batch)]
    return np.max(lengths, axis=0).astype(np.int32)


def record_fingerprints(batch: AnyBatch) -> np.ndarray:
    """A 64-bit digest of each row's tokens (ids and loss masks of every group, unpadded); uint64
    ``[B]``. Equal in any bucket for the same record; differs when its text or template changes."""
    groups = _token_groups(batch)
    fields = {g: (np.asarray(getattr(batch, token_field(g, "input_ids")), np.int32),
                  np.asarray(getattr(batch, token_field(g, "loss_mask")), np.int32),
                  np.asarray(getattr(batch, token_field(g, "attention_mask"))).sum(axis=1))
              for g in groups}
    fingerprints = np.zeros(batch.batch_size, np.uint64)
    for row in range(batch.batch_size):
        digest = hashlib.blake2b(digest_size=8)
        for group, (ids, loss_mask, lengths) in fields.items():
            length = int(lengths[row])
            digest.update(f"{group}:{length}:".encode())
            digest.update(ids[row, :length].tobytes() + loss_mask[row, :length].tobytes())
        fingerprints[row] = int.from_bytes(digest.digest(), "little")
    return fingerprints


def _listed(indices: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(indices) > _MAX_LISTED else ''}] ({len(indices)} in all)"


# ----------------------------------------------------------------------------- the cache


class ReferenceCache:
    """Per-record reference arrays of one key, under ``<directory>/<key[:16]>/``.

    Args:
      directory: the root that holds caches of several keys (``reference.cache_dir``).
      key: ``cache_key(...)``, 64 hex characters (at least 16).
      names: the arrays ``compute_fn`` returns, e.g. ``("ref/chosen/token_logps", ...)``.
      num_records: ``N``, the training split's length; rows are indexed by ``example_index``.
      max_length: the stored row length, the largest bucket (a batch's ``T`` never exceeds it
        unless buckets grew; ``lookup`` pads with zeros then).
    """

    def __init__(self, directory: str | os.PathLike[str], key: str, names: Sequence[str],
                 num_records: int, max_length: int):
        if (not isinstance(key, str) or len(key) < _KEY_DIR_CHARS
                or any(c not in "0123456789abcdef" for c in key)):
            raise ValueError(f"key must be a lower-case hex digest (cache_key(...)) of at least "
                             f"{_KEY_DIR_CHARS} characters, got {key!r}")
        names = tuple(names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str)
                                                                 for n in names):
            raise ValueError(f"names must be a non-empty sequence of distinct strings, got "
                             f"{names!r}")
        if num_records < 1 or max_length < 1:
            raise ValueError(f"num_records and max_length must be >= 1, got num_records="
                             f"{num_records}, max_length={max_length}")
        self.directory = pathlib.Path(directory).expanduser()
        self.key = key
        self.names = names
        self.num_records = int(num_records)
        self.max_length = int(max_length)
        self._arrays: dict[str, np.ndarray] | None = None
        self._lengths: np.ndarray | None = None
        self._fingerprints: np.ndarray | None = None

    @property
    def path(self) -> pathlib.Path:
        """This key's directory, ``<directory>/<key[:16]>``."""
        return self.directory / self.key[:_KEY_DIR_CHARS]

    def _files(self) -> dict[str, str]:
        return {name: f"values_{i}.npy" for i, name in enumerate(self.names)}

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            with open(self.path / MANIFEST, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        """True when ``path`` holds a complete cache of this key (checked against the manifest).

        Raises:
          ValueError: the manifest has this key but other names, ``num_records`` or
            ``max_length``: the key does not cover a setting that changed, so it cannot be trusted.
        """
        manifest = self._read_manifest()
        if manifest is None or manifest.get("key") != self.key:
            return False
        if manifest.get("format_version") != FORMAT_VERSION:
            return False
        found = (tuple(manifest["names"]), manifest["num_records"], manifest["max_length"])
        wanted = (self.names, self.num_records, self.max_length)
        if found != wanted:
            raise ValueError(
                f"reference cache {self.path} has key {self.key} but (names, num_records, "
                f"max_length) = {found}, not the requested {wanted}; the key must include every "
                f"setting these depend on (data split and buckets, method options)")
        shapes = {FINGERPRINTS_FILE: (self.num_records,), LENGTHS_FILE: (self.num_records,)}
        shapes.update({file: (self.num_records, self.max_length)
                       for file in self._files().values()})
        for file, shape in shapes.items():
            try:
                if np.load(self.path / file, mmap_mode="r").shape != shape:
                    return False
            except (FileNotFoundError, ValueError):
                return False
        return True

    # --------------------------------------------------------------------------- building

    def write(self, batches: Iterable[AnyBatch], compute_fn: ComputeFn, *, progress: bool = True,
              metadata: Mapping[str, Any] | None = None) -> None:
        """Runs ``compute_fn`` over ``batches`` and commits every record's rows atomically.

        Args:
          batches: ONE epoch over the whole split (e.g. ``preference_pipeline(...,
            num_epochs=1, shard_by_process=False)``, unshuffled or shuffled); padding rows are
            skipped. Records the pipeline dropped (counted in its ``stats``) may have no row.
          compute_fn: ``batch -> {name: float [B, T]}`` with exactly ``names``.
          progress: show a tqdm bar.
          metadata: JSON-able notes stored in the manifest (e.g. the key's parts).

        Raises:
          NotImplementedError: more than one JAX process.
          ValueError: an endless iterator, outputs with other names or shapes, an
            ``example_index`` outside ``[0, N)``, a record longer than ``max_length``, or records
            left without a row beyond those the pipeline reported dropped.
          FileExistsError: ``path`` holds a cache of another key with the same 16-character prefix.
        """
        if jax.process_count() > 1:
            raise NotImplementedError(
                f"building a reference cache with jax.process_count() = {jax.process_count()} is "
                f"not supported (each process sees only its shard of the records); precompute it "
                f"in a one-process run of the same config and share {self.directory}, or use "
                f"reference.mode='copy'")
        if getattr(batches, "num_batches", 0) is None:
            raise ValueError("write needs a finite iterator over one epoch (num_epochs=1); got one "
                             "that repeats forever (num_batches=None)")
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{self.key[:_KEY_DIR_CHARS]}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            self._fill(tmp, batches, compute_fn, progress=progress, metadata=metadata)
            self._commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _fill(self, tmp: pathlib.Path, batches: Iterable[AnyBatch], compute_fn: ComputeFn, *,
              progress: bool, metadata: Mapping[str, Any] | None) -> None:
        """Writes the arrays and the manifest of a complete cache into ``tmp``."""
        files = self._files()
        arrays = {name: np.lib.format.open_memmap(tmp / files[name], mode="w+", dtype=np.float32,
                                                  shape=(self.num_records, self.max_length))
                  for name in self.names}
        lengths = np.zeros(self.num_records, np.int32)
        fingerprints = np.zeros(self.num_records, np.uint64)
        total = getattr(batches, "num_batches", None)
        if total is None and hasattr(batches, "__len__"):
            total = len(batches)
        for batch in tqdm.tqdm(batches, total=total, disable=not progress,
                               desc="reference cache", unit="batch"):
            values = self._host_values(batch, compute_fn(batch))
            rows = np.flatnonzero(np.asarray(batch.example_mask) == 1)
            indices = self._record_indices(batch, rows)
            row_lengths = record_lengths(batch)[rows]
            if row_lengths.max(initial=0) > self.max_length:
                raise ValueError(
                    f"records {_listed(indices[row_lengths > self.max_length])} are "
                    f"{row_lengths.max()} tokens long, more than the cache's max_length="
                    f"{self.max_length}; use the largest bucket as max_length")
            width = min(batch.sequence_length, self.max_length)
            within = np.arange(width)[None, :] < row_lengths[:, None]
            for name, value in values.items():
                arrays[name][indices, :width] = np.where(within, value[rows, :width], 0.0)
            lengths[indices] = row_lengths
            fingerprints[indices] = record_fingerprints(batch)[rows]
        self._check_coverage(lengths, batches)
        for array in arrays.values():
            array.flush()
        del arrays
        np.save(tmp / LENGTHS_FILE, lengths)
        np.save(tmp / FINGERPRINTS_FILE, fingerprints)
        manifest = {
            "format_version": FORMAT_VERSION, "key": self.key, "names": list(self.names),
            "files": files, "shape": [self.num_records, self.max_length], "dtype": "float32",
            "num_records": self.num_records, "max_length": self.max_length,
            "missing_records": int(np.sum(lengths == 0)),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "metadata": _canonical(dict(metadata or {}), "metadata")}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())

    def _host_values(self, batch: AnyBatch, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``compute_fn``'s outputs as float32 NumPy, checked against ``names`` and ``[B, T]``."""
        if set(values) != set(self.names):
            raise ValueError(f"compute_fn returned arrays {sorted(values)}; the cache stores "
                             f"{sorted(self.names)}")
        expected = (batch.batch_size, batch.sequence_length)
        host = {}
        for name in self.names:
            host[name] = np.asarray(jax.device_get(values[name]), np.float32)
            if host[name].shape != expected:
                raise ValueError(f"compute_fn returned {name} of shape {host[name].shape}; the "
                                 f"batch needs [B, T] = {list(expected)}")
        return host

    def _record_indices(self, batch: AnyBatch, rows: np.ndarray) -> np.ndarray:
        """``example_index`` of the real ``rows``, checked to lie in ``[0, num_records)``."""
        indices = np.asarray(batch.example_index)[rows].astype(np.int64)
        bad = indices[(indices < 0) | (indices >= self.num_records)]
        if bad.size:
            raise ValueError(f"example_index values {_listed(bad)} of real rows lie outside "
                             f"[0, {self.num_records}); num_records must be the split's length")
        return indices

    def _check_coverage(self, lengths: np.ndarray, batches: Iterable[AnyBatch]) -> None:
        """Every record has a row, except at most as many as the pipeline reported dropped."""
        missing = np.flatnonzero(lengths == 0)
        stats = getattr(batches, "stats", None)
        dropped = sum(stats.dropped.values()) if stats is not None else 0
        if missing.size > dropped:
            raise ValueError(
                f"records {_listed(missing)} of {self.num_records} got no row, and the batches "
                f"reported only {dropped} dropped records; pass one full epoch over the split")
        if missing.size:
            logger.warning("reference cache %s: %d records dropped by the pipeline have no row: %s",
                           self.key[:_KEY_DIR_CHARS], missing.size, _listed(missing))

    def _commit(self, tmp: pathlib.Path) -> None:
        """Renames the finished ``tmp`` to ``path``; keeps an equal cache another writer made."""
        try:
            os.rename(tmp, self.path)
        except OSError:
            if not self.path.exists():
                raise
            if not self.exists():
                raise FileExistsError(
                    f"{self.path} holds something other than a reference cache of key "
                    f"{self.key} (manifest key: {(self._read_manifest() or {}).get('key')}); "
                    f"move it away or use another reference.cache_dir") from None
            logger.info("reference cache %s was completed by another writer; keeping it",
                        self.path)
            shutil.rmtree(tmp, ignore_errors=True)

    # --------------------------------------------------------------------------- reading

    def _open(self) -> None:
        if self._arrays is not None:
            return
        if not self.exists():
            raise FileNotFoundError(f"no complete reference cache of key {self.key} in "
                                    f"{self.path}; build it with write() or open_or_build()")
        self._arrays = {name: np.load(self.path / file, mmap_mode="r")
                        for name, file in self._files().items()}
        self._lengths = np.load(self.path / LENGTHS_FILE)
        self._fingerprints = np.load(self.path / FINGERPRINTS_FILE)

    def lookup(self, batch: AnyBatch) -> dict[str, np.ndarray]:
        """The stored arrays of ``batch``'s records, in its rows and bucket.

        Args:
          batch: a ``Batch`` from the pipeline the cache was built for (any batch size, bucket or
            order); NumPy or single-process jax leaves.

        Returns:
          ``{name: float32 [B, T]}`` with ``B, T`` of the batch: each real row holds its record's
          values (zeros past the record's length), padding rows (``example_mask == 0``) are zero.

        Raises:
          ValueError: a real row's ``example_index`` outside ``[0, N)``, a record that has no row
            (dropped while building), or a record whose tokens differ from those the cache was
            built on (the data changed without changing the key).
          FileNotFoundError: the cache is not complete.
        """
        self._open()
        batch_size, length = batch.batch_size, batch.sequence_length
        rows = np.flatnonzero(np.asarray(batch.example_mask) == 1)
        indices = self._record_indices(batch, rows)
        absent = indices[self._lengths[indices] == 0]
        if absent.size:
            raise ValueError(f"records {_listed(absent)} have no reference row: the pipeline "
                             f"dropped them when the cache {self.path} was built")
        changed = indices[(self._fingerprints[indices] != record_fingerprints(batch)[rows])
                          | (self._lengths[indices] != record_lengths(batch)[rows])]
        if changed.size:
            raise ValueError(
                f"records {_listed(changed)} have other tokens than when the reference cache "
                f"{self.path} was built; the data, tokenizer or template changed without "
                f"changing the cache key; delete the cache or include the change in the key")
        width = min(length, self.max_length)
        out = {}
        for name in self.names:
            values = np.zeros((batch_size, length), np.float32)
            values[rows, :width] = self._arrays[name][indices, :width]
            out[name] = values
        return out


def open_or_build(directory: str | os.PathLike[str], key: str, *, names: Sequence[str],
                  num_records: int, max_length: int,
                  batches_fn: Callable[[], Iterable[AnyBatch]], compute_fn: ComputeFn,
                  progress: bool = True, metadata: Mapping[str, Any] | None = None
                  ) -> ReferenceCache:
    """The cache of ``key`` under ``directory``, built first when it is absent or incomplete.

    Args:
      directory: root of the caches (``reference.cache_dir``); other keys' caches are untouched.
      key: ``cache_key(...)`` of the current model, data, tokenizer and method settings.
      names, num_records, max_length: as ``ReferenceCache``.
      batches_fn: ``() -> one epoch of batches``, called only when building.
      compute_fn: ``batch -> {name: float [B, T]}``, called only when building.
      progress: show a progress bar while building.
      metadata: JSON-able notes stored in the manifest when building.

    Returns:
      A ``ReferenceCache`` whose ``exists()`` is True.
    """
    cache = ReferenceCache(directory, key, names, num_records, max_length)
    if cache.exists():
        logger.info("reference cache: using %s (key %s)", cache.path, key)
        return cache
    logger.info("reference cache: building %s (key %s) over %d records", cache.path, key,
                num_records)
    cache.write(batches_fn(), compute_fn, progress=progress, metadata=metadata)
    logger.info("reference cache: built %s", cache.path)
    return cache
