"""
Real data, streamed: LLaVA-style JSONL and The Cauldron / FineVision Parquet files, read lazily
in DataLoader workers, in data.collate's layout (train.py --data_path).

StreamDataset indexes the files (byte offset of each JSONL line, row numbers of Parquet files;
only the text columns are read to index) without decoding any image. __getitem__ reads one
example back, tokenizes it and decodes + resizes its image, in the worker. make_loader gives
batches whose example indices are a pure function of (seed, step), split over DDP ranks,
starting at any step (resume).

JSONL lines: {"image"?: path or [paths], "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": ...}, ...]} or {"prompt", "response"}; optional "source"
(default "unknown"); image paths relative to image_root (default: the file's folder) and, once
resolved, inside it.
One conversation of n user/assistant turns gives n examples (conversation_examples). The
context of turn k is every earlier user and assistant text and the k-th user text joined
by "\\n"; its response is the k-th assistant text. The image belongs to every turn's context.
"""
import functools
import io
import json
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image

import data
from data import IMAGE_TOKEN, PAD_TOKEN, special_id
from scale import pack
from scale.tiles import encode_example, image_views

# ----------------------------------------------------------------------------------------
# Real data

def conversation_examples(turns, last_only=False):
    """[(user, assistant), ...] -> [(prompt, response), ...], one per assistant turn:
    prompt = "\\n".join(u1, a1, ..., u_k), response = a_k. last_only=True: the last turn only
    (for data whose earlier answers should not be trained on)."""
    texts = [text for pair in turns for text in pair]
    pairs = [("\n".join(texts[:2 * k + 1]), texts[2 * k + 1]) for k in range(len(turns))]
    return pairs[-1:] if last_only else pairs


def _parse_record(line, image_root):
    """Validate one JSONL line without reading its image's pixels -> {"turns": [(user,
    assistant), ...], "image": path or None, "source": str}. The image file must exist."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"bad JSON ({err.msg}); expected one JSON object per line") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    if "conversations" in obj:
        turns = obj["conversations"]
        roles = [t.get("from") if isinstance(t, dict) else None
                 for t in turns] if isinstance(turns, list) else []
        if len(roles) < 2 or len(roles) % 2 or roles != ["human", "gpt"] * (len(roles) // 2) \
                or not all(isinstance(t.get("value"), str) for t in turns):
            raise ValueError("expected 'conversations' as alternating human/gpt turns with string "
                             "'value's")
        values = [t["value"] for t in turns]
        pairs = list(zip(values[0::2], values[1::2]))
    elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        pairs = [(obj["prompt"], obj["response"])]
    else:
        raise ValueError("missing field: expected 'conversations' or string 'prompt' and "
                         f"'response', found keys {sorted(obj)}")
    source = obj.get("source", "unknown")
    if not isinstance(source, str) or not source:
        raise ValueError(f"expected 'source' to be a non-empty string, found {source!r}")
    if any(IMAGE_TOKEN in answer for _, answer in pairs):
        raise ValueError(f"the response has {IMAGE_TOKEN}; expected it only in the prompt")
    image = None
    if obj.get("image") is not None:
        paths = obj["image"] if isinstance(obj["image"], list) else [obj["image"]]
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise ValueError("expected 'image' to be a file path or a list of them, found "
                             f"{obj['image']!r}")
        paths = [image_file(image_root, p) for p in paths]
        image = paths if isinstance(obj["image"], list) else paths[0]
    # all but the last answer
    elif IMAGE_TOKEN in conversation_examples(pairs, last_only=True)[0][0]:
        raise ValueError(f"the prompt has {IMAGE_TOKEN} but the line names no 'image'")
    elif not pairs[0][0].strip():
        raise ValueError("empty prompt and no image: the context would be empty; expected some "
                         "prompt text for the first response token to be predicted from")
    return {"turns": pairs, "image": image, "source": source}


def image_file(root, name):
    """An image path of a data file -> the file it names, which must lie inside `root` once
    resolved (symlinks too): a data file never makes the trainer read files outside the folder
    given for its images. The file must exist and not be empty."""
    path, real_root = os.path.join(root, name), os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        raise ValueError(f"image path {name!r} resolves to {real}, outside the image root "
                         f"{real_root} (--image_root, default the data file's folder); expected "
                         "a path inside it")
    if not os.path.isfile(real):
        raise ValueError(f"image file not found: {path}")
    if os.path.getsize(real) == 0:
        raise ValueError(f"image file {path} is empty (0 bytes); expected an image file")
    return real


def _decode_utf8(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
                         "expected UTF-8 text") from None


def fit_to_max_len(n_context, n_response, max_len):
    """The max_len rule -> how many response tokens to keep (0: drop the example).

    The context (the prompt with its n_image_tokens image tokens) is never cut. If context +
    response > max_len, the response's tail is cut so the sequence is exactly max_len tokens
    (its <eos> is then lost); if the context alone leaves no room for one response token
    (n_context >= max_len), the example is dropped. max_len=None keeps everything."""
    if max_len is None:
        return n_response
    return max(0, min(n_response, max_len - n_context))


def _open_image(source, what):
    """A file path or encoded bytes -> RGB PIL image; any decoding failure, and a
    decompression bomb (PIL only warns between 1x and 2x MAX_IMAGE_PIXELS), is a ValueError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise ValueError(f"cannot read {what} ({type(err).__name__}: {err}); "
                         "expected a valid image file") from None


def _parquet_turns(cell, row_source, default_source):
    """One Parquet row's texts -> ([(user, assistant), ...], [source per turn])."""
    if not isinstance(cell, list) or not cell:
        raise ValueError(f"expected 'texts' to be a non-empty list of turns, found {cell!r:.80}")
    pairs, sources = [], []
    for turn in cell:
        if not (isinstance(turn, dict) and isinstance(turn.get("user"), str)
                and isinstance(turn.get("assistant"), str)):
            raise ValueError(f"expected each turn of 'texts' as {{'user': str, 'assistant': str}}, "
                             f"found {turn!r:.80}")
        source = turn.get("source") or row_source or default_source
        if not isinstance(source, str):
            raise ValueError(f"expected 'source' to be a string, found {source!r}")
        pairs.append((turn["user"], turn["assistant"]))
        sources.append(source)
    return pairs, sources


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pq


class StreamDataset(torch.utils.data.Dataset):
    """Examples of LLaVA JSONL and Cauldron/FineVision Parquet files, read back lazily.

    paths: one file or a list; ".jsonl" files as the module docstring describes (image paths
    relative to image_root, default the file's folder, and inside it; the file must exist and
    not be empty at index time; "image" a path or a list of one),
    ".parquet" files as The Cauldron / FineVision store them: a 'texts' column (a list of
    {"user", "assistant", "source"?} turns), an optional 'images' column (a list of {bytes,
    path} structs or of binary; at most one image per row here), an optional 'source'
    column. An example's source is its turn's "source", else the row's, else default_source.
    Parquet rows are numbered from 0 within their file, JSONL lines from 1.

    Indexing keeps a few integers per example (file, byte offset or row, turn, source) and no
    text or pixels; it reads every line, and of Parquet the text columns and the images (counted
    and checked for empty bytes or a missing file, never decoded). turns="all": every assistant
    turn is an example (conversation_examples); "last": the last turn of each conversation only.
    A bad line or row found while indexing is a ValueError naming the file and line/row; with
    skip_bad it is skipped and counted (self.n_bad_index).

    dataset[i] -> {"context", "response": token id lists, "image": (n_views, 3, S, S) or None,
    "grids",
    "source", "index": the example actually returned, "skipped", "dropped", "errors"}. An
    example fit_to_max_len drops (context >= max_len) is replaced by the next index and counted
    in "dropped"; a bad one (unreadable image, too many <image> tags, ...) is a ValueError
    naming file and line/row, or, with skip_bad, replaced by the next index and counted in
    "skipped" (its message in "errors"). Parquet reads whole row groups (a worker caches the
    last cache_row_groups of them): random access is cheap only with small row groups."""

    def __init__(self, paths, tokenizer, n_image_tokens, image_size, max_len=None, image_root=None,
                 turns="all", skip_bad=False, default_source="unknown", cache_row_groups=2,
                 max_skip=1000, image_splitting=None):
        if turns not in ("all", "last"):
            raise ValueError(f"turns must be 'all' or 'last', got {turns!r}")
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.bind(tokenizer, n_image_tokens, image_splitting)
        self.image_size, self.max_len = image_size, max_len
        self.image_root, self.last_only, self.skip_bad = image_root, turns == "last", skip_bad
        self.default_source, self.cache_row_groups = default_source, cache_row_groups
        self.max_skip = max_skip
        self.sources, self.n_bad_index = [], 0
        self._source_id, self._row_groups, cols, bad = {}, {}, [], []
        for f, path in enumerate(self.paths):
            path = os.fspath(path)
            if path.endswith(".jsonl"):
                cols += self._index_jsonl(f, path, bad)
            elif path.endswith(".parquet"):
                cols += self._index_parquet(f, path, bad)
            else:
                raise ValueError(f"{path}: unknown data file type; expected .jsonl or .parquet")
        self.n_bad_index = len(bad)
        if bad:
            print(f"StreamDataset: skipped {len(bad)} bad line(s)/row(s) while indexing "
                  f"(first: {bad[0]})", file=sys.stderr)
        if not cols:
            raise ValueError(f"{', '.join(map(os.fspath, self.paths))}: no examples")
        # one row per example: file, byte offset (JSONL) or row (Parquet), line or row, turn, source
        index = np.array(cols, dtype=np.int64)
        self._file, self._pos, self._where, self._turn, self._src = index.T.copy()
        self._handles = None

    # -- indexing (main process; no image is opened)

    def _source(self, name):
        if name not in self._source_id:
            self._source_id[name] = len(self.sources)
            self.sources.append(name)
        return self._source_id[name]

    def _turn_rows(self, f, pos, where, sources):
        keep = range(len(sources) - 1, len(sources)) if self.last_only else range(len(sources))
        return [(f, pos, where, k, self._source(sources[k])) for k in keep]

    def _root(self, f):
        """Folder that relative image paths of file f start from."""
        if self.image_root is not None:
            return self.image_root
        return os.path.dirname(os.path.abspath(self.paths[f]))

    def _index_jsonl(self, f, path, bad):
        root = self._root(f)
        rows, offset = [], 0
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                pos, offset = offset, offset + len(raw)
                try:
                    line = _decode_utf8(raw)
                    if not line.strip():
                        continue
                    rec = _parse_record(line, root)
                    if isinstance(rec["image"], list) and len(rec["image"]) > 1:
                        raise ValueError(f"{len(rec['image'])} images in one line; expected at "
                                         "most 1 (StreamDataset reads one image per example)")
                except ValueError as err:
                    if not self.skip_bad:
                        raise ValueError(f"{path} line {n}: {err}") from None
                    bad.append(f"{path} line {n}: {err}")
                    continue
                rows += self._turn_rows(f, pos, n, [rec["source"]] * len(rec["turns"]))
        return rows

    def _index_parquet(self, f, path, bad):
        pq = _pyarrow()
        try:
            pf = pq.ParquetFile(path)
        except Exception as err:            # pyarrow raises its own error types for a bad file
            raise ValueError(f"{path}: cannot read as Parquet ({err})") from None
        names = pf.schema_arrow.names
        if "texts" not in names:
            raise ValueError(f"{path}: no 'texts' column; expected The Cauldron / FineVision "
                             f"layout (columns 'images', 'texts'), found {names}")
        columns = ["texts"] + [c for c in ("source", "images") if c in names]
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        self._row_groups[f] = np.cumsum([0] + sizes)
        rows, row = [], 0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=columns)
            texts = table.column("texts").to_pylist()
            row_sources = (table.column("source").to_pylist() if "source" in names
                           else [None] * len(texts))
            images = (table.column("images").to_pylist() if "images" in names
                      else [None] * len(texts))
            for cell, row_source, row_images in zip(texts, row_sources, images):
                try:
                    _, sources = _parquet_turns(cell, row_source, self.default_source)
                    self._parquet_image(f, row_images)          # counted and sized, not decoded
                except ValueError as err:
                    if not self.skip_bad:
                        raise ValueError(f"{path} row {row}: {err}") from None
                    bad.append(f"{path} row {row}: {err}")
                else:
                    rows += self._turn_rows(f, row, row, sources)
                row += 1
        return rows

    # -- reading back (worker process)

    def __len__(self):
        return len(self._file)

    def bind(self, tokenizer, n_image_tokens, image_splitting=None):
        """Set how examples become tokens. Indexing needs none of it, so a training run can
        check its data files first and bind the student's layout when the student exists
        (tokenizer=None: index only; dataset[i] then fails)."""
        self.tokenizer = tokenizer
        self.role_tokens = dict(getattr(tokenizer, "role_tokens", {}))
        self.pad_id = None if tokenizer is None else special_id(tokenizer, PAD_TOKEN)
        self.n_image_tokens, self.image_splitting = n_image_tokens, image_splitting

    def indices_of(self, sources):
        """The example indices whose source is in `sources` (a stage's share of the data)."""
        wanted = [k for k, name in enumerate(self.sources) if name in set(sources)]
        return np.flatnonzero(np.isin(self._src, wanted)).tolist()

    def source_counts(self):
        """source -> number of examples."""
        counts = np.bincount(self._src, minlength=len(self.sources))
        return {s: int(n) for s, n in zip(self.sources, counts)}

    def __getstate__(self):                 # open files and caches stay in their process
        return {**self.__dict__, "_handles": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.tokenizer.role_tokens = self.role_tokens     # a pickled Tokenizer loses its attributes

    def _open(self):
        """This process's open files and row-group cache (a forked worker opens its own)."""
        if self._handles is None or self._handles["pid"] != os.getpid():
            self._handles = {"pid": os.getpid(), "files": {}, "groups": {}}
        return self._handles

    def _read_jsonl(self, f, pos):
        files = self._open()["files"]
        if f not in files:
            files[f] = open(self.paths[f], "rb")
        files[f].seek(pos)
        rec = _parse_record(files[f].readline().decode("utf-8"), self._root(f))
        image = rec["image"][0] if isinstance(rec["image"], list) else rec["image"]   # [one] too
        return rec["turns"], [rec["source"]] * len(rec["turns"]), image, image

    def _read_parquet(self, f, row):
        h = self._open()
        g = int(np.searchsorted(self._row_groups[f], row, side="right") - 1)
        if (f, g) not in h["groups"]:
            if f not in h["files"]:
                h["files"][f] = _pyarrow().ParquetFile(self.paths[f])
            pf = h["files"][f]
            columns = [c for c in ("texts", "source", "images") if c in pf.schema_arrow.names]
            h["groups"][f, g] = pf.read_row_group(g, columns=columns)
            while len(h["groups"]) > self.cache_row_groups:
                del h["groups"][next(iter(h["groups"]))]        # the oldest
        table, j = h["groups"][f, g], row - int(self._row_groups[f][g])
        row_source = table.column("source")[j].as_py() if "source" in table.column_names else None
        texts = table.column("texts")[j].as_py()
        turns, sources = _parquet_turns(texts, row_source, self.default_source)
        images = table.column("images")[j].as_py() if "images" in table.column_names else None
        image = self._parquet_image(f, images)
        return turns, sources, image, "its image bytes" if isinstance(image, bytes) else image

    def _parquet_image(self, f, images):
        """One row's 'images' cell -> None, encoded bytes or a file path (inside the root);
        checked while indexing too (count, empty bytes, the file), without decoding."""
        if len(images or []) > 1:
            raise ValueError(f"{len(images)} images in one row; expected at most 1 "
                             "(one image per example)")
        if not images:
            return None
        image = images[0]
        if isinstance(image, dict):
            if image.get("path") and not image.get("bytes"):
                return image_file(self._root(f), image["path"])
            if image.get("bytes") is None:
                raise ValueError("the image has neither 'bytes' nor 'path'")
            image = image["bytes"]
        if isinstance(image, bytes):
            if not image:
                raise ValueError("the image's bytes are empty (0 bytes); expected an encoded "
                                 "image (PNG, JPEG, ...)")
            return image
        raise ValueError(f"expected an image as {{bytes, path}} or binary, "
                         f"found {type(image).__name__}")

    def _load(self, i):
        """Example i, or None if fit_to_max_len drops it. ValueError names file and line/row."""
        f, pos, where = int(self._file[i]), int(self._pos[i]), int(self._where[i])
        path = os.fspath(self.paths[f])
        jsonl = path.endswith(".jsonl")
        try:
            read = self._read_jsonl if jsonl else self._read_parquet
            turns, sources, image, what = read(f, pos)
            k = int(self._turn[i])
            prompt, response = conversation_examples(turns)[k]
            example = {"image": image, "prompt": prompt, "response": response, "source": sources[k]}
            views, grids = None, []                 # the grid (tile layout) sets the token count
            if image is not None:
                views, grid = image_views(_open_image(image, f"image {what}"), self.image_size,
                                          self.image_splitting)     # (n_views, 3, S, S)
                grids = [grid]
            context, reply = encode_example(example, self.tokenizer, self.n_image_tokens,
                                            grids if self.image_splitting is not None else None)
            keep = fit_to_max_len(len(context), len(reply), self.max_len)
            if keep == 0:
                return None
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{path} {'line' if jsonl else 'row'} {where}: {err}") from None
        return {"context": context, "response": reply[:keep], "image": views, "grids": grids,
                "source": sources[k]}

    def __getitem__(self, i):
        skipped, dropped, errors = 0, 0, []
        for j in range(i, i + self.max_skip + 1):
            j %= len(self)
            try:
                item = self._load(j)
            except ValueError as err:
                if not self.skip_bad:
                    raise
                skipped, errors = skipped + 1, errors + [str(err)]
                continue
            if item is None:
                dropped += 1
                continue
            return {**item, "index": j, "skipped": skipped, "dropped": dropped, "errors": errors}
        raise ValueError(f"no usable example among indices {i}..{i + self.max_skip} "
                         f"(mod {len(self)}): {skipped} bad, {dropped} longer than "
                         f"max_len={self.max_len}"
                         + (f"; first error: {errors[0]}" if errors else ""))

    def collate(self, items, packed=False):
        """dataset[i] items -> a batch in data.collate's layout (packed=True: pack.pack's, rows of
        max_len tokens), plus "index" (LongTensor), "skipped" / "dropped" (ints: bad / too-long
        examples replaced) and "errors" (messages)."""
        if packed and self.max_len is None:
            raise ValueError("StreamDataset.collate: pack=True needs max_len (the tokens of one "
                             "packed row)")
        views = [[] if it["image"] is None else [it["image"]] for it in items]
        pairs = [(it["context"], it["response"]) for it in items]
        return {**(pack.lay_out(pairs, views, self.pad_id, self.max_len) if packed
                   else data.lay_out(pairs, views, self.pad_id)),   # images: (N_views, 3, S, S)
                "grids": [it["grids"] for it in items],
                "source": [it["source"] for it in items],
                "index": torch.tensor([it["index"] for it in items]),
                "skipped": sum(it["skipped"] for it in items),
                "dropped": sum(it["dropped"] for it in items),
                "errors": [e for it in items for e in it["errors"]]}


class RealData:
    """Real data in place of the tiny world (train.py --data_path): the files' sources, the
    ones in kd_sources language-intensive (KD), the others vision-heavy. The files are indexed
    here (every line/row checked, no image decoded), so bad data fails before any training;
    examples then stream from disk through a StreamDataset, with the student's token layout
    bound by open() once the student exists. No corpus, no built-in benchmarks."""

    def __init__(self, paths, image_size, max_len=None, image_root=None, skip_bad=False,
                 kd_sources=()):
        self.dataset = StreamDataset(paths, None, 0, image_size, max_len=max_len,
                                     image_root=image_root, skip_bad=skip_bad)
        unknown = sorted(set(kd_sources) - set(self.dataset.sources))
        if unknown:
            raise ValueError(f"--kd_sources {unknown} not found in --data_path (sources: "
                             f"{sorted(self.dataset.sources)})")
        self.sources = list(self.dataset.sources)
        self.source_kinds = {s: "language" if s in kd_sources else "vision" for s in self.sources}
        self.corpus, self.language_bench, self.vision_bench, self.knowledge_bench = [], [], [], []

    def open(self, student, tokenizer):
        """The dataset, tokenizing for `student` (its image tokens per view and splitting)."""
        self.dataset.bind(tokenizer, student.n_image_tokens, student.image_splitting)
        return self.dataset

    def batches(self, student, tokenizer, sources, what, batch_size, seed, start_step, rank=0,
                world_size=1, num_workers=0, pin_memory=False, pack=False):
        """This rank's batches of the examples of `sources` (the stage `what` names), from
        global batch start_step on: the examples of batch k are a pure function of (seed, k)
        (make_loader), so a resumed run reads exactly what the uninterrupted one would have."""
        dataset = self.open(student, tokenizer)
        indices = dataset.indices_of(sources)
        if not indices:
            raise ValueError(f"--data_path has no examples for {what} (sources {sorted(sources)})")
        loader = make_loader(torch.utils.data.Subset(dataset, indices), batch_size, seed=seed,
                             start_step=start_step, rank=rank, world_size=world_size,
                             num_workers=num_workers, pin_memory=pin_memory,
                             collate_fn=functools.partial(dataset.collate, packed=pack),
                             timeout=600 if num_workers else 0)
        for batch in loader:
            yield {k: v for k, v in batch.items() if k not in ("index", "errors")}


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of example indices that are a pure function of (seed, step).

    The example stream is epoch 0's permutation, then epoch 1's, ... (epoch e:
    np.random.default_rng([seed, e]).permutation(n); shuffle=False: 0..n-1 every epoch, for
    data already shuffled on disk, which reads Parquet row groups in order). Global batch
    `step` is stream[step * G:(step + 1) * G] with G = batch_size * world_size (it may
    straddle two epochs); rank r gets its r-th slice of batch_size. Iteration yields this
    rank's batches from start_step on, until `steps` (None: forever)."""

    def __init__(self, n, batch_size, seed, start_step=0, rank=0, world_size=1, steps=None,
                 shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 examples and batch_size >= 1, "
                             f"got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.world_size, self.steps, self.shuffle = rank, world_size, steps, shuffle
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(self.n)
                                  if self.shuffle else np.arange(self.n))
        return self._perms[epoch]

    def global_batch(self, step):
        """The example indices of global batch `step`, all ranks' slices in rank order."""
        G = self.batch_size * self.world_size
        pos = np.arange(step * G, (step + 1) * G)
        return np.concatenate([self._perm(e)[pos[pos // self.n == e] % self.n]
                               for e in range(pos[0] // self.n, pos[-1] // self.n + 1)])

    def __iter__(self):
        step = self.start_step
        while self.steps is None or step < self.steps:
            lo = self.rank * self.batch_size
            yield self.global_batch(step)[lo:lo + self.batch_size].tolist()
            step += 1

    def __len__(self):
        if self.steps is None:
            raise TypeError("an endless StepBatchSampler (steps=None) has no length")
        return max(0, self.steps - self.start_step)


def make_loader(dataset, batch_size, seed, start_step=0, rank=0, world_size=1, num_workers=0,
                collate_fn=None, pin_memory=False, steps=None, shuffle=True, timeout=0,
                prefetch_factor=4):
    """DataLoader over `dataset` (a StreamDataset, or any map-style dataset with collate_fn)
    yielding this rank's batch of each step from start_step on (StepBatchSampler; batch_size
    is per rank). Workers (num_workers > 0) decode, resize and collate; they persist across
    epochs and prefetch prefetch_factor batches each. timeout (seconds, workers only): a
    worker that produces nothing for that long is an error instead of a hang. A worker's
    ValueError (bad line, corrupt image) is re-raised in this process with its one-line message
    (naming the file and line/row), without the worker's traceback."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, rank, world_size, steps,
                               shuffle)
    extra = {}
    if num_workers > 0:
        # the tokenizer's thread pool must not be used across fork; the workers are the parallelism
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor, "timeout": timeout}
    return _StoppingLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                           collate_fn=collate_fn or dataset.collate, pin_memory=pin_memory, **extra)


class _StoppingLoader(torch.utils.data.DataLoader):
    """A DataLoader that stops its workers as soon as iterating raises (a worker's error, a
    timeout, Ctrl-C). Left to garbage collection, an iterator caught in a traceback is torn
    down after its queues, and each worker then takes a 5 s join timeout to die."""

    def __iter__(self):
        it = super().__iter__()
        try:
            yield from it
        except BaseException as err:
            stop = getattr(it, "_shutdown_workers", None)       # private DataLoader API
            if stop is not None:
                stop()
                self._iterator = None                           # persistent workers: start anew
            # A worker's ValueError comes back as "Caught ValueError in DataLoader worker process
            # k.\nOriginal Traceback ...\nValueError: <message>": keep the one-line message
            # (it names the file and line/row), not the worker's traceback.
            head, sep, tb = str(err).partition("\nOriginal Traceback")
            if isinstance(err, ValueError) and sep and "DataLoader worker" in head:
                raise ValueError(tb.rstrip().splitlines()[-1].removeprefix("ValueError: ")) \
                    from None
            raise
