"""The disk tier of prefix caching: complete cache blocks kept as files under a directory (`--cache-dir`), so that
a prompt's cached prefix outlives the memory pool and the process.

What is stored: one file per complete prefix-cache block, named by the block's chained hash (prefix_cache.py:
hashed over every token before it and seeded by the tenant's salt, so the disk tier is scoped by tenant exactly
as the memory tier is) mixed with the *namespace*: the model's identity (`model_fingerprint`: its config and a
digest of its weights) and the pool's block layout (`BlockLayout`: block size, each field's shape and dtype). A
different model, a retrained one or another cache dtype never opens another's files. The file holds what the pool
exports for that block (each pool kind's `export_blocks` / `import_blocks` pair: MLA latents and V3.2 indexer
keys in kv_cache.py, V4's window keys, compressed and indexer entries and compressor overlap state in
v4_cache.py), framed by a header naming the namespace, the block hash and each tensor, and ended by an
xxh3-128 digest of everything before it. A file that is short, torn, corrupt, for another key or of another
layout is a miss (and is deleted), never a wrong answer.

Writes are asynchronous: the engine copies a block's tensors out of the pool when the block becomes complete
(write-through, so a restart or a crash loses only what was still queued) and one writer thread frames, hashes
and writes them, each to a temporary file renamed into place (readers see whole files or none). When the queue
holds more than `max_pending_bytes` new blocks are dropped rather than stalling a step. Files and directories
are created readable by their owner only (0600 / 0700). The directory is capped at `max_bytes`: least recently
used files go first (use = written or loaded; a load touches the file's mtime, so the order survives restarts).

Several processes may share a directory (files appear atomically, a vanished file is a miss); each counts
toward the cap only the files it has seen (those present at its start and those it wrote).

Shape legend: n blocks.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import xxhash

FORMAT = 1
MAGIC = b"OR2BLK01"
_DIGEST = 16  # xxh3-128
_ALIGN = 64  # header and each tensor start at a multiple of this (tensors are read in place, aligned)
_SUFFIX, _TMP = ".blk", ".tmp"
_STALE_TMP_S = 3600  # temporary files this old were left by a killed writer
_SAMPLE = 1 << 16  # elements of a large tensor the fingerprint reads (evenly spaced)


@dataclass(frozen=True)
class BlockLayout:
    """What a pool exports per block: field name -> (shape of one block's tensor, dtype)."""

    block_size: int
    fields: tuple  # ((name, shape tuple, dtype name), ...)

    @classmethod
    def of(cls, pool) -> BlockLayout:
        tensors = pool.export_blocks([0])
        return cls(pool.block_size, tuple((k, tuple(t.shape[1:]), str(t.dtype).removeprefix("torch."))
                                          for k, t in tensors.items()))

    @property
    def nbytes(self) -> int:
        return sum(torch.empty((), dtype=getattr(torch, d)).element_size() * _numel(s) for _, s, d in self.fields)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def model_fingerprint(model: torch.nn.Module) -> bytes:
    """16 bytes naming a model: its config and its weights (every tensor's name, shape and dtype; the values of
    tensors up to 64Ki elements, and 64Ki evenly spaced values of larger ones, which any training step or other
    checkpoint changes). Computed once per engine (and again after reset_prefix_cache)."""
    h = hashlib.blake2b(digest_size=16, person=b"openr2-model")
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_hf(), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() > _SAMPLE:
            flat = flat[:: -(-flat.numel() // _SAMPLE)]
        h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()


def namespace(fingerprint: bytes, layout: BlockLayout) -> bytes:
    """The key space of one model's blocks of one layout."""
    text = json.dumps([FORMAT, layout.block_size, layout.fields])
    return hashlib.blake2b(fingerprint + text.encode(), digest_size=16, person=b"openr2-ns").digest()


@dataclass
class DiskStats:
    hits: int = 0  # blocks loaded
    misses: int = 0  # lookups that found no file
    corrupt: int = 0  # files that failed their checks (deleted)
    written: int = 0
    dropped: int = 0  # blocks not written: the queue was full
    evicted: int = 0  # files deleted for the size cap
    write_s: float = 0.0  # the writer thread's time
    read_s: float = 0.0


class DiskCache:
    """Block files under `path`, for one namespace (see the module docstring)."""

    def __init__(self, path: str, max_bytes: int, layout: BlockLayout, fingerprint: bytes,
                 max_pending_bytes: int = 256 << 20):
        if max_bytes < 1:
            raise ValueError(f"cache_dir_bytes must be >= 1 (got {max_bytes})")
        self.path, self.max_bytes, self.layout = os.path.abspath(path), max_bytes, layout
        self.max_pending_bytes = max_pending_bytes
        self.namespace = namespace(fingerprint, layout)
        self.stats = DiskStats()
        self._template: tuple = (None, b"", b"")  # (namespace, header bytes before / after the block hash)
        # every file of a layout has the same header length and size; (name, dtype, shape, offset, nbytes) per field
        self._fields, offset = [], len(self._head(self.namespace, bytes(16)))
        for name, shape, dtype in layout.fields:
            nbytes = _numel(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
            self._fields.append((name, getattr(torch, dtype), shape, offset, nbytes))
            offset += nbytes + (-nbytes % _ALIGN)
        self.file_size = offset + _DIGEST
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cache_dir: cannot create {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ValueError(f"cache_dir: {self.path} is not writable")
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # file path -> size, least recently used first
        self._total = 0
        self._scan()
        self._queued: set[str] = set()
        self._touched: list[str] = []  # files read since the writer last touched any
        self._pending_bytes = 0
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="openr2-disk-cache", daemon=True)
        self._writer.start()
        ref = weakref.ref(self)
        atexit.register(lambda: (c := ref()) is not None and c.close())  # queued blocks are written at exit

    # ------------------------------------------------------------------------------------ keys and files
    def set_fingerprint(self, fingerprint: bytes) -> None:
        """The model changed (reset_prefix_cache after a weight update): from now on, its own key space."""
        self.flush()
        self.namespace = namespace(fingerprint, self.layout)

    def file_of(self, block_hash: bytes) -> str:
        name = hashlib.blake2b(self.namespace + block_hash, digest_size=16).hexdigest()
        return os.path.join(self.path, name[:2], name + _SUFFIX)

    def _scan(self) -> None:
        found, now = [], time.time()
        for sub in os.scandir(self.path):
            if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub.path):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.endswith(_SUFFIX):
                    found.append((st.st_mtime, entry.path, st.st_size))
                elif _TMP in entry.name and now - st.st_mtime > _STALE_TMP_S:
                    _unlink(entry.path)
        for _, path, size in sorted(found):
            self._files[path] = size
            self._total += size

    @property
    def total_bytes(self) -> int:
        return self._total

    def known(self, block_hash: bytes) -> bool:
        """Written or queued by this process, or present at its start."""
        path = self.file_of(block_hash)
        return path in self._files or path in self._queued

    # ------------------------------------------------------------------------------------ writing
    def put(self, block_hash: bytes, tensors: dict[str, torch.Tensor]) -> bool:
        """Queue one block's tensors (the caller's own copies, not views of the pool) to be written; False when
        it is already there or the queue is full (then it is not written)."""
        self._touch()
        path = self.file_of(block_hash)
        if path in self._queued or path in self._files:
            return False
        nbytes = self.layout.nbytes
        if nbytes > self.max_bytes or self._pending_bytes + nbytes > self.max_pending_bytes:
            self.stats.dropped += 1
            return False
        with self._lock:
            self._queued.add(path)
            self._pending_bytes += nbytes
        self._queue.put((path, block_hash, self.namespace, tensors, nbytes))
        return True

    def _touch(self) -> None:
        if self._touched:
            self._queue.put(("touch", self._touched))
            self._touched = []

    def flush(self) -> None:
        """Wait until every queued block is written (and every read file touched)."""
        self._touch()
        self._queue.join()

    def close(self) -> None:
        if self._writer.is_alive():
            self._touch()
            self._queue.put(None)
            self._writer.join()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if item[0] == "touch":
                    for path in item[1]:
                        try:
                            os.utime(path)
                        except OSError:
                            pass
                    continue
                path, block_hash, ns, tensors, nbytes = item
                start = time.perf_counter()
                try:
                    size = self._write(path, block_hash, ns, tensors)
                except OSError:  # a full or read-only disk: the block stays in memory only
                    size = None
                with self._lock:
                    self._queued.discard(path)
                    self._pending_bytes -= nbytes
                    if size is not None:
                        self._files[path] = size
                        self._files.move_to_end(path)
                        self._total += size
                        self.stats.written += 1
                    self._evict()
                self.stats.write_s += time.perf_counter() - start
            finally:
                self._queue.task_done()

    def _head(self, ns: bytes, block_hash: bytes) -> bytes:
        """A file's magic, header (namespace, block hash, each tensor's name, dtype, shape and bytes) and padding:
        a function of the layout and the key alone, so a reader compares bytes instead of parsing."""
        if self._template[0] != ns:  # all but the block hash, once per namespace
            head = self._head_of(ns, bytes(16))
            i = head.index(b'"block": "') + len(b'"block": "')
            self._template = (ns, head[:i], head[i + 32 :])
        _, before, after = self._template
        return before + block_hash.hex().encode() + after

    def _head_of(self, ns: bytes, block_hash: bytes) -> bytes:
        tensors = [[name, dtype, list(shape), _numel(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()]
                   for name, shape, dtype in self.layout.fields]
        header = json.dumps({"format": FORMAT, "namespace": ns.hex(), "block": block_hash.hex(),
                             "tensors": tensors}).encode()
        head = MAGIC + len(header).to_bytes(4, "little") + header
        return head + bytes(-len(head) % _ALIGN)

    def _write(self, path: str, block_hash: bytes, ns: bytes, tensors: dict[str, torch.Tensor]) -> int:
        chunks = [self._head(ns, block_hash)]
        for name, dtype, shape, _, nbytes in self._fields:
            t = tensors[name]
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), f"{name}: not the layout's"
            chunks += [t.contiguous().reshape(-1).view(torch.uint8).numpy(), bytes(-nbytes % _ALIGN)]
        digest = xxhash.xxh3_128()
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}{_TMP}.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                f.write(digest.digest())
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        return os.path.getsize(path)

    def _evict(self) -> None:
        while self._total > self.max_bytes and self._files:
            path, size = self._files.popitem(last=False)
            self._total -= size
            _unlink(path)
            self.stats.evicted += 1

    # ------------------------------------------------------------------------------------ reading
    def get(self, block_hash: bytes) -> dict[str, torch.Tensor] | None:
        """One block's tensors (name -> the layout's shape), or None (see read)."""
        n, tensors = self.read([block_hash])
        return {name: t[0] for name, t in tensors.items()} if n else None

    def read(self, hashes: list[bytes]) -> tuple[int, dict[str, torch.Tensor]]:
        """(n, name -> [n, ...]): the blocks of the longest prefix of `hashes` whose files pass every check,
        read into one buffer (the tensors are views of it). A missing file ends the prefix; one that fails a
        check (size, header, key, checksum) too, and is deleted."""
        start, size = time.perf_counter(), self.file_size
        buffer = bytearray(len(hashes) * size)
        view = memoryview(buffer)
        n = 0
        for h in hashes:
            path = self.file_of(h)
            row = view[n * size : (n + 1) * size]
            try:
                with open(path, "rb", buffering=0) as f:
                    got = f.readinto(row)
                    extra = f.read(1)
            except OSError:  # no file (or one this process cannot read): a miss
                self.stats.misses += 1
                break
            if got != size or extra or not row[: len(head := self._head(self.namespace, h))] == head \
                    or xxhash.xxh3_128(row[:-_DIGEST]).digest() != row[-_DIGEST:]:
                self.stats.corrupt += 1
                with self._lock:
                    if path in self._files:
                        self._total -= self._files.pop(path)
                _unlink(path)
                break
            with self._lock:
                if path not in self._files:
                    self._total += size
                self._files[path] = size
                self._files.move_to_end(path)
            n += 1
        if n:  # recently used, also for the next start's scan: the writer thread touches the files, later (a
            # queued item now would wake it in the middle of a load)
            self._touched += [self.file_of(h) for h in hashes[:n]]
        self.stats.hits += n
        self.stats.read_s += time.perf_counter() - start
        rows = torch.frombuffer(buffer, dtype=torch.uint8).view(-1, size)[:n] if n else torch.empty(0, size,
                                                                                                 dtype=torch.uint8)
        return n, {name: rows[:, offset : offset + nbytes].view(dtype).view(n, *shape)
                   for name, dtype, shape, offset, nbytes in self._fields}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class DiskTier:
    """A pool's blocks to and from a DiskCache: the pool's `export_blocks` / `import_blocks` pair (each pool kind's
    own) and the cache's files. The block manager (prefix_cache.py) decides which blocks go and come."""

    LOAD_BATCH = 128  # blocks read into one buffer and imported per call

    def __init__(self, pool, cache: DiskCache):
        self.pool, self.cache = pool, cache

    @classmethod
    def open(cls, pool, model: torch.nn.Module, path: str, max_bytes: int) -> DiskTier:
        return cls(pool, DiskCache(path, max_bytes, BlockLayout.of(pool), model_fingerprint(model)))

    def spill(self, blocks: list[int], hashes: list[bytes]) -> None:
        """Queue the complete `blocks` (with their chained hashes) to be written, those not on disk already."""
        todo = [i for i, h in enumerate(hashes) if not self.cache.known(h)]
        if todo:
            tensors = self.pool.export_blocks([blocks[i] for i in todo])
            for j, i in enumerate(todo):
                self.cache.put(hashes[i], {name: t[j] for name, t in tensors.items()})

    def read(self, hashes: list[bytes]) -> tuple[int, dict[str, torch.Tensor]]:
        """(n, name -> [n, ...]): the blocks of the longest prefix of `hashes` on disk (read and checked)."""
        return self.cache.read(hashes)

    def load(self, blocks: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Write read blocks' tensors into the pool's `blocks`."""
        self.pool.import_blocks(blocks, tensors)
