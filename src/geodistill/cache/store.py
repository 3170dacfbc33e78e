"""The teacher cache: a Zarr v3 directory store of the teacher's top-k, target log-probs and features.

Layout (docs/design.md, "Teacher cache")::

    teacher_cache.zarr/                 attrs: format_version, fingerprint
      <shard name>/                     one group per manifest shard, written by one process
        record_keys      (R,)           str, :func:`record_key` of each record, in shard order
        token_offsets    (R+1,)         int64, record r owns token rows [off[r], off[r+1])
        topk_ids         (N, k)         uint16 when vocab_size <= 65536 else uint32
        <value arrays>   (N, k) / ...   per cache.codec.value_arrays(encoding, k)
        target_logprob   (N,)           float32, exact teacher log-prob of the ground-truth token
        image_keys       (I,)           str
        features         (I, P, D)      projector outputs (after pooling), stored per the fingerprint's
                                        feature_encoding: float32, float16 or int8
        feature_scales   (I, P)         float32, int8 only: per-token absmax / 127 (cache.feature_codec)
                                        attrs: records, tokens, images, k, encoding, feature_encoding,
                                        then complete = true

Writing streams: a :class:`ShardWriter` buffers rows and flushes whole chunks, so a shard with millions
of tokens (or gigabytes of 13B-teacher features) never sits in memory; the counts and ``complete`` go
into the group's attrs only after every array is written, ``complete`` last. A group without it (a
killed writer) is deleted and rebuilt by the next run, while complete groups are kept (resume).

Reading validates before it serves: the root fingerprint (``cache.fingerprint``) must equal the
expected one (anything else is an error naming the differing fields, never a silent reuse), and every
manifest shard must be a complete group whose counts equal the manifest's. Per-record random reads
from Zarr are slow (each touches whole compressed chunks), so :class:`CacheReader` loads a shard's
token arrays at once, keeps a few shards in an LRU, and slices records out of memory.

Concurrency: one process per shard group. Create the root (``CacheWriter`` on rank 0) before other
ranks open it; groups of different shards can then be written in parallel, since a group's metadata
lives in its own ``zarr.json`` and the root's is never rewritten.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from geodistill.cache import codec, feature_codec
from geodistill.cache.fingerprint import check_layout_fields, fingerprint_mismatch, jsonable
from geodistill.errors import CacheError

FORMAT_VERSION = 1
REBUILD_HINT = "rebuild it with `dvc repro teacher_cache` (or delete the store)"

# zstd level 3 with byte shuffle: measured 1.5x on raw top-k arrays (docs/design.md, "Library facts");
# for uint8 arrays shuffle is a no-op and bitshuffle measured no better.
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)
TOKEN_CHUNK = 1 << 16
"""Token rows per chunk: ~2 MB of ids at k = 16, large enough for zstd, small enough to buffer."""
FEATURE_CHUNK_BYTES = 4 << 20
"""Target raw bytes per features chunk (a 13B teacher's 1296 x 5120 image is one 13 MB chunk)."""


def record_key(sample_key: str, index: int) -> str:
    """A record's key: ``<sample key>#<index in sample>`` (GeoChat's own ids repeat within an image)."""
    return f"{sample_key}#{index}"


def _check_root(root: zarr.Group, path: Path, fingerprint: Mapping[str, Any]) -> None:
    attrs = dict(root.attrs)
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format_version {version!r}, this code reads {FORMAT_VERSION}; {REBUILD_HINT}"
        )
    diff = fingerprint_mismatch(fingerprint, attrs.get("fingerprint", {}))
    if diff:
        raise CacheError(
            f"{path} was built for another teacher/tokenizer/data/settings:\n  "
            + "\n  ".join(diff)
            + f"\n{REBUILD_HINT}"
        )


def open_cache(path: str | Path, fingerprint: Mapping[str, Any], mode: str = "a") -> zarr.Group:
    """Open the cache root, validating (or, when new, writing) ``format_version`` and ``fingerprint``.

    mode ``r``: the store must exist and match; ``a``: create it if missing, else it must match;
    ``w``: delete any existing store and create a fresh one.
    """
    if mode not in ("r", "a", "w"):
        raise CacheError(f"open_cache mode must be 'r', 'a' or 'w', got {mode!r}")
    path = Path(path)
    fingerprint = jsonable(fingerprint)
    check_layout_fields(fingerprint)
    if mode == "w" and path.exists():
        shutil.rmtree(path)
    if not (path / "zarr.json").exists():
        if mode == "r":
            raise CacheError(f"no teacher cache at {path}; build it with `dvc repro teacher_cache`")
        attrs = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint}
        return zarr.open_group(path, mode="w", attributes=attrs, zarr_format=3)
    try:
        root = zarr.open_group(path, mode="r" if mode == "r" else "r+", zarr_format=3)
    except Exception as e:  # any unreadable metadata is one user-facing answer: rebuild
        raise CacheError(f"{path} is not a readable Zarr v3 store ({e}); {REBUILD_HINT}") from e
    _check_root(root, path, fingerprint)
    return root


def _strings(keys: list[str]) -> np.ndarray:
    """Keys as numpy's variable-length strings: zarr stores those as vlen UTF-8 (fixed-width "<U" arrays
    would get a dtype that has no Zarr v3 spec yet)."""
    return np.array(keys, dtype=np.dtypes.StringDType())


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or name.startswith("__"):
        raise CacheError(f"invalid shard group name {name!r}: no '/', not '.', '..' or '__*'")


def is_complete(root: zarr.Group, shard_name: str) -> bool:
    """True when the shard's group exists and its writer committed (``complete: true``)."""
    try:
        group = root[shard_name]
    except KeyError:
        return False
    except Exception:  # a writer killed mid-metadata-write leaves an unreadable zarr.json
        return False
    return isinstance(group, zarr.Group) and group.attrs.get("complete") is True


def reset_shard(root: zarr.Group, shard_name: str) -> None:
    """Delete a shard's group (complete or not) so that it can be rebuilt from scratch."""
    _check_name(shard_name)
    # Filesystem removal also handles a group whose zarr.json a killed writer left unreadable.
    local = Path(str(root.store.root)) / root.path / shard_name  # type: ignore[attr-defined]
    shutil.rmtree(local, ignore_errors=True)


class ShardWriter:
    """Streams one shard's records and images into its group; :meth:`commit` marks it complete.

    Use as a context manager: a clean exit commits, an exception leaves the group incomplete (so the
    next run rebuilds it instead of trusting half a shard).
    """

    def __init__(
        self,
        group: zarr.Group,
        *,
        vocab_size: int,
        k: int,
        encoding: str,
        feature_encoding: str,
        token_chunk: int = TOKEN_CHUNK,
        feature_chunk_bytes: int = FEATURE_CHUNK_BYTES,
    ) -> None:
        self.group = group
        self.vocab_size, self.k, self.encoding = vocab_size, k, encoding
        self.feature_encoding = feature_encoding
        self._feat_specs = feature_codec.feature_arrays(feature_encoding)
        self.token_chunk = token_chunk
        self.feature_chunk_bytes = feature_chunk_bytes
        self.committed = False
        self._record_keys: list[str] = []
        self._offsets: list[int] = [0]
        self._seen: set[str] = set()
        self._image_keys: list[str] = []
        self._seen_images: set[str] = set()
        # Token arrays: name -> (trailing shape, dtype); the buffers hold encoded rows not yet written.
        self._token_specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            "topk_ids": ((k,), codec.id_dtype(vocab_size)),
            **codec.value_arrays(encoding, k),
            "target_logprob": ((), np.dtype(np.float32)),
        }
        for name, (trail, dtype) in self._token_specs.items():
            group.create_array(
                name,
                shape=(0, *trail),
                dtype=dtype,
                chunks=(token_chunk, *(max(t, 1) for t in trail)),
                compressors=COMPRESSOR,
            )
        self._token_buf: dict[str, list[np.ndarray]] = {n: [] for n in self._token_specs}
        self._token_pending = 0
        self._tokens_written = 0
        self._feat_buf: dict[str, list[np.ndarray]] = {n: [] for n in self._feat_specs}
        self._feat_shape: tuple[int, int] | None = None
        self._feat_chunk = 1
        self._images_written = 0

    # -- records ---------------------------------------------------------------------------------

    def add_record(
        self, key: str, topk_ids: np.ndarray, topk_logprobs: np.ndarray, target_logprob: np.ndarray
    ) -> None:
        """Append one record's assistant tokens.

        topk_ids (n, k) int, topk_logprobs (n, k) float32 sorted descending and normalised over the full
        vocabulary, target_logprob (n,) float32; n may be 0.
        """
        self._check_open()
        if key in self._seen:
            raise CacheError(f"record {key!r} added twice to shard {self.group.basename!r}")
        ids = np.asarray(topk_ids)
        lp = np.asarray(topk_logprobs, dtype=np.float32)
        tgt = np.asarray(target_logprob, dtype=np.float32)
        n = lp.shape[0] if lp.ndim == 2 else -1
        if ids.shape != (n, self.k) or lp.shape != (n, self.k) or tgt.shape != (n,):
            raise CacheError(
                f"record {key!r}: expected topk_ids and topk_logprobs (n, {self.k}) and target_logprob "
                f"(n,), got {ids.shape}, {lp.shape}, {tgt.shape}"
            )
        if np.isnan(tgt).any():
            raise CacheError(f"record {key!r}: target_logprob contains NaN")
        try:
            values = codec.encode_values(lp, self.encoding)
            rows = {"topk_ids": codec.encode_ids(ids, self.vocab_size), **values}
        except CacheError as e:
            raise CacheError(f"record {key!r}: {e}") from e
        # Clip like the codec does, so that the target is finite and comparable to the top-k values.
        rows["target_logprob"] = np.maximum(tgt, np.float32(codec.LOGPROB_FLOOR))
        for name, block in rows.items():
            self._token_buf[name].append(block)
        self._seen.add(key)
        self._record_keys.append(key)
        self._offsets.append(self._offsets[-1] + n)
        self._token_pending += n
        if self._token_pending >= self.token_chunk:
            self._flush_tokens(final=False)

    def _flush_tokens(self, *, final: bool) -> None:
        """Write buffered token rows: whole chunks only, unless ``final`` (then the remainder too)."""
        n_write = self._token_pending if final else self._token_pending // self.token_chunk * self.token_chunk
        if n_write == 0:
            return
        start, stop = self._tokens_written, self._tokens_written + n_write
        for name, parts in self._token_buf.items():
            block = np.concatenate(parts) if len(parts) > 1 else parts[0]
            arr = self.group[name]
            arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = block[:n_write]
            self._token_buf[name] = [block[n_write:]] if n_write < len(block) else []
        self._tokens_written = stop
        self._token_pending -= n_write

    # -- images ----------------------------------------------------------------------------------

    def add_image(self, key: str, features: np.ndarray) -> None:
        """Append one image's projector features, (P, D) floats, stored per ``feature_encoding``."""
        self._check_open()
        if key in self._seen_images:
            raise CacheError(f"image {key!r} added twice to shard {self.group.basename!r}")
        feats = np.asarray(features)
        if feats.ndim != 2:
            raise CacheError(f"image {key!r}: features must be (P, D), got shape {feats.shape}")
        if self._feat_shape is None:
            p, d = feats.shape
            self._feat_shape = (p, d)
            per_image = feature_codec.feature_bytes(p, d, self.feature_encoding)
            self._feat_chunk = max(1, self.feature_chunk_bytes // max(1, per_image))
            self._create_feature_arrays(p, d)
        elif feats.shape != self._feat_shape:
            raise CacheError(f"image {key!r}: features {feats.shape}, earlier images had {self._feat_shape}")
        try:
            encoded = feature_codec.encode_features(feats, self.feature_encoding)
        except CacheError as e:
            raise CacheError(f"image {key!r}: {e}") from e
        for name, arr in encoded.items():
            self._feat_buf[name].append(arr)
        self._seen_images.add(key)
        self._image_keys.append(key)
        if len(self._feat_buf["features"]) >= self._feat_chunk:
            self._flush_features()

    def _create_feature_arrays(self, p: int, d: int) -> None:
        for name, (ndim, dtype) in self._feat_specs.items():
            trail = (p, d)[:ndim]
            self.group.create_array(
                name,
                shape=(0, *trail),
                dtype=dtype,
                chunks=(self._feat_chunk, *(max(t, 1) for t in trail)),
                compressors=COMPRESSOR,
            )

    def _flush_features(self) -> None:
        n = len(self._feat_buf["features"])
        if not n:
            return
        start, stop = self._images_written, self._images_written + n
        for name, buf in self._feat_buf.items():
            arr = self.group[name]
            arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = np.stack(buf)
            self._feat_buf[name] = []
        self._images_written = stop

    # -- commit ----------------------------------------------------------------------------------

    def commit(self) -> dict[str, int]:
        """Write the remaining rows and the index arrays, then the counts, then ``complete: true``."""
        self._check_open()
        self._flush_tokens(final=True)
        self._flush_features()
        if self._feat_shape is None:  # a shard without images still has the arrays readers expect
            self._create_feature_arrays(0, 0)
        n_rec = len(self._record_keys)
        chunks = (max(1, min(n_rec, TOKEN_CHUNK)),)
        self.group.create_array("record_keys", data=_strings(self._record_keys), chunks=chunks)
        self.group.create_array(
            "token_offsets",
            data=np.asarray(self._offsets, dtype=np.int64),
            chunks=(min(n_rec + 1, TOKEN_CHUNK),),
            compressors=COMPRESSOR,
        )
        n_img = len(self._image_keys)
        chunks = (max(1, min(n_img, TOKEN_CHUNK)),)
        self.group.create_array("image_keys", data=_strings(self._image_keys), chunks=chunks)
        counts = {"records": n_rec, "tokens": self._tokens_written, "images": n_img}
        self.group.update_attributes(
            {**counts, "k": self.k, "encoding": self.encoding, "feature_encoding": self.feature_encoding}
        )
        # Separate, final write: only a group whose every array and count is on disk claims completeness.
        self.group.update_attributes({"complete": True})
        self.committed = True
        return counts

    def _check_open(self) -> None:
        if self.committed:
            raise CacheError(f"shard {self.group.basename!r} is already committed")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None and not self.committed:
            self.commit()


class CacheWriter:
    """Creates (or reopens, checking the fingerprint) the cache and hands out one writer per shard.

    Resume: completed shard groups are kept (skip those in :meth:`pending`); :meth:`shard` deletes and
    recreates an incomplete group.
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: Mapping[str, Any],
        *,
        token_chunk: int = TOKEN_CHUNK,
        feature_chunk_bytes: int = FEATURE_CHUNK_BYTES,
    ) -> None:
        self.path = Path(path)
        self.fingerprint = jsonable(fingerprint)
        self.root = open_cache(self.path, self.fingerprint, mode="a")
        self.token_chunk = token_chunk
        self.feature_chunk_bytes = feature_chunk_bytes

    def is_complete(self, shard_name: str) -> bool:
        return is_complete(self.root, shard_name)

    def pending(self, shard_names: Iterable[str]) -> list[str]:
        """The given shards that still need building (missing or incomplete), in order."""
        return [s for s in shard_names if not self.is_complete(s)]

    def reset_shard(self, shard_name: str) -> None:
        reset_shard(self.root, shard_name)

    def shard(self, name: str, *, overwrite: bool = False) -> ShardWriter:
        """A writer for shard ``name``; an incomplete group is rebuilt, a complete one needs ``overwrite``."""
        _check_name(name)
        if self.is_complete(name) and not overwrite:
            raise CacheError(
                f"shard {name!r} of {self.path} is already complete; skip it (CacheWriter.pending) "
                "or pass overwrite=True"
            )
        self.reset_shard(name)
        group = self.root.create_group(name)
        fp = self.fingerprint
        return ShardWriter(
            group,
            vocab_size=int(fp["vocab_size"]),
            k=int(fp["k"]),
            encoding=str(fp["encoding"]),
            feature_encoding=str(fp["feature_encoding"]),
            token_chunk=self.token_chunk,
            feature_chunk_bytes=self.feature_chunk_bytes,
        )


@dataclass(frozen=True)
class TeacherTokens:
    """The cached teacher signals of one record's assistant tokens (n of them)."""

    ids: np.ndarray  # (n, k) int64, top-k token ids by descending log-prob
    logprobs: np.ndarray  # (n, k) float32, decoded; exp sums to <= 1, the rest is the tail bucket
    target_logprob: np.ndarray  # (n,) float32, teacher log-prob of the ground-truth token


@dataclass
class _ShardData:
    """One shard's token arrays, still encoded (a third of float32's memory), plus its features."""

    offsets: np.ndarray  # (R+1,) int64
    arrays: dict[str, np.ndarray]  # topk_ids (N, k), value arrays, target_logprob (N,)
    features: dict[str, np.ndarray | zarr.Array]  # feature_codec arrays, encoded; in memory when small


class CacheReader:
    """Validated, read-only access to a cache built for ``expected_fingerprint`` over ``manifest``.

    Token arrays are read a whole shard group at a time and kept in an LRU of ``max_shards`` shards
    (``None``: keep all, i.e. load-all once touched; :meth:`preload` touches all). A shard's features
    are held in memory too when they take at most ``max_feature_bytes``; larger ones (13B-teacher
    scale) are read per request, which is a chunk-aligned read since large images get a chunk each.
    Picklable (DataLoader workers): loaded data stays behind and is reloaded lazily.
    """

    def __init__(
        self,
        path: str | Path,
        expected_fingerprint: Mapping[str, Any],
        manifest: Mapping[str, Any],
        *,
        max_shards: int | None = 4,
        max_feature_bytes: int = 256 << 20,
    ) -> None:
        self.path = Path(path)
        self.fingerprint = jsonable(expected_fingerprint)
        self.shard_names: list[str] = [s["name"] for s in manifest["shards"]]
        self.max_shards = max_shards
        self.max_feature_bytes = max_feature_bytes
        self.k = int(self.fingerprint["k"])
        self.encoding = str(self.fingerprint["encoding"])
        self.feature_encoding = str(self.fingerprint["feature_encoding"])
        self._root: zarr.Group | None = None
        self._loaded: OrderedDict[str, _ShardData] = OrderedDict()
        self._records: dict[str, tuple[str, int]] | None = None
        self._images: dict[str, tuple[str, int]] | None = None
        self._validate(manifest)

    # -- validation ------------------------------------------------------------------------------

    @property
    def root(self) -> zarr.Group:
        if self._root is None:
            self._root = open_cache(self.path, self.fingerprint, mode="r")
        return self._root

    def _validate(self, manifest: Mapping[str, Any]) -> None:
        """Every manifest shard complete, with the manifest's counts and consistent array shapes."""
        root = self.root
        problems: list[str] = []
        for entry in manifest["shards"]:
            name = entry["name"]
            if not is_complete(root, name):
                exists = (self.path / name).exists()  # no zarr call: the group's metadata may be unreadable
                state = "incomplete (its writer did not finish)" if exists else "missing"
                problems.append(f"shard {name!r}: {state}")
                continue
            g = root[name]
            attrs = dict(g.attrs)
            for count, want in (("records", entry["records"]), ("images", entry["samples"])):
                if attrs.get(count) != want:
                    problems.append(f"shard {name!r}: {attrs.get(count)} {count}, the manifest says {want}")
            problems += [f"shard {name!r}: {p}" for p in self._shape_problems(g, attrs)]
        if problems:
            raise CacheError(
                f"{self.path} does not match the shard manifest:\n  "
                + "\n  ".join(problems)
                + f"\n{REBUILD_HINT}"
            )

    def _shape_problems(self, g: zarr.Group, attrs: Mapping[str, Any]) -> list[str]:
        r, n, i = attrs.get("records", -1), attrs.get("tokens", -1), attrs.get("images", -1)
        want = {"record_keys": (r,), "token_offsets": (r + 1,), "image_keys": (i,)}
        want |= {"topk_ids": (n, self.k), "target_logprob": (n,)}
        for name, (trail, _) in codec.value_arrays(self.encoding, self.k).items():
            want[name] = (n, *trail)
        out = []
        for name, shape in want.items():
            got = g[name].shape if name in g else None
            if got != shape:
                out.append(f"array {name} has shape {got}, expected {shape}")
        for name in feature_codec.feature_arrays(self.feature_encoding):
            n_feat = g[name].shape[0] if name in g else None
            if n_feat != i:
                out.append(f"array {name} holds {n_feat} images, expected {i}")
        return out

    # -- indices ---------------------------------------------------------------------------------

    def record_index(self) -> dict[str, tuple[str, int]]:
        """record key -> (shard name, row in that shard's record_keys)."""
        if self._records is None:
            self._records = self._build_index("record_keys", "record")
        return self._records

    def image_index(self) -> dict[str, tuple[str, int]]:
        """image key -> (shard name, row in that shard's features)."""
        if self._images is None:
            self._images = self._build_index("image_keys", "image")
        return self._images

    def _build_index(self, array: str, what: str) -> dict[str, tuple[str, int]]:
        index: dict[str, tuple[str, int]] = {}
        for name in self.shard_names:
            for row, key in enumerate(self.root[name][array][:].tolist()):
                if key in index:
                    raise CacheError(f"{what} key {key!r} is in shards {index[key][0]!r} and {name!r}")
                index[key] = (name, row)
        return index

    # -- data ------------------------------------------------------------------------------------

    def _shard(self, name: str) -> _ShardData:
        data = self._loaded.get(name)
        if data is not None:
            self._loaded.move_to_end(name)
            return data
        g = self.root[name]
        names = ["topk_ids", *codec.value_arrays(self.encoding, self.k), "target_logprob"]
        feats = {n: g[n] for n in feature_codec.feature_arrays(self.feature_encoding)}
        nbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in feats.values())
        small = nbytes <= self.max_feature_bytes
        data = _ShardData(
            offsets=g["token_offsets"][:],
            arrays={n: g[n][:] for n in names},
            features={n: a[:] if small else a for n, a in feats.items()},
        )
        self._loaded[name] = data
        if self.max_shards is not None:
            while len(self._loaded) > self.max_shards:
                self._loaded.popitem(last=False)
        return data

    def preload(self) -> None:
        """Load every shard now (with ``max_shards=None`` they then all stay in memory)."""
        for name in self.shard_names:
            self._shard(name)

    def tokens(self, keys: Sequence[str]) -> list[TeacherTokens]:
        """The cached signals of each record key, in the order given."""
        index = self.record_index()
        out: list[TeacherTokens | None] = [None] * len(keys)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for pos, key in enumerate(keys):
            if key not in index:
                raise CacheError(f"record {key!r} is not in the teacher cache {self.path}")
            shard, row = index[key]
            by_shard.setdefault(shard, []).append((pos, row))
        for shard, items in by_shard.items():  # one shard at a time, so the LRU never thrashes mid-batch
            data = self._shard(shard)
            for pos, row in items:
                a, b = int(data.offsets[row]), int(data.offsets[row + 1])
                sliced = {n: v[a:b] for n, v in data.arrays.items()}
                out[pos] = TeacherTokens(
                    ids=codec.decode_ids(sliced["topk_ids"]),
                    logprobs=codec.decode_values(sliced, self.encoding),
                    target_logprob=sliced["target_logprob"].astype(np.float32),
                )
        return [t for t in out if t is not None]

    def features(self, image_keys: Sequence[str]) -> np.ndarray:
        """(B, P, D) float32 projector features of the given images, in order, decoded from the stored
        ``feature_encoding`` (the error bounds: ``cache.feature_codec``)."""
        index = self.image_index()
        rows: list[np.ndarray] = []
        for key in image_keys:
            if key not in index:
                raise CacheError(f"image {key!r} is not in the teacher cache {self.path}")
            shard, row = index[key]
            stored = {n: np.asarray(a[row]) for n, a in self._shard(shard).features.items()}
            rows.append(feature_codec.decode_features(stored, self.feature_encoding))
        if not rows:
            return np.zeros((0, 0, 0), dtype=np.float32)
        return np.stack(rows)

    def __getstate__(self) -> dict[str, Any]:
        # zarr handles and loaded shards stay in the parent; a worker reopens and loads what it needs.
        state = self.__dict__.copy()
        state.update(_root=None, _loaded=OrderedDict())
        return state
