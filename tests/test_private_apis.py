"""The private torch APIs that async_ckpt relies on still have the shape it uses; it uses no private ignite API.

Each torch test pins one use, by its behaviour where it has one: if torch changes it, the test fails here on the
CI's torch, instead of the package silently falling back to a slower path (plain ``torch.save``). The ignite tests pin
the public seams that replaced ignite's private names (issue 13): a ``Checkpoint``'s list read and replaced through
``state_dict``/``load_state_dict`` is the one ignite ranks, evicts from and ``last_checkpoint`` reads, and
``setup_filename_pattern`` gives the names ignite saves under. The last tests scan the package's code (not its
prose) for private torch and ignite names, so that a new use cannot go unpinned, and check that ``async_ckpt/ignite``
touches no private attribute of ignite's ``Checkpoint`` or ``DiskSaver``.

DCP (``async_ckpt.sharded``) is pinned in depth by ``tests/test_sharded.py``; here only the private name that module
sets is.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler

import async_ckpt.pipeline.serialize as serialize_module
from async_ckpt.ignite.kept import drop_oldest, ignite_file_name, kept, replace_kept
from async_ckpt.pipeline.serialize import serialize

PACKAGE = Path(serialize_module.__file__).parent.parent  # the async_ckpt package


def parameters(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def local_data_offset(archive: bytes, info: zipfile.ZipInfo) -> int:
    """Where the data of ``info``'s record starts in ``archive`` (after its local header)."""
    name_len, extra_len = struct.unpack_from("<HH", archive, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len


# -- torch: the serializer's fast path -------------------------------------------------------------------------------


def test_torch_serialization_save_takes_the_arguments_serialize_passes() -> None:
    """``torch.serialization._save`` takes (obj, zip_file, pickle_module, pickle_protocol, _disable_byteorder_record),
    so the fast path is on (``_FAST``), not silently replaced by plain ``torch.save``."""
    assert parameters(torch.serialization._save) == [
        "obj",
        "zip_file",
        "pickle_module",
        "pickle_protocol",
        "_disable_byteorder_record",
    ]
    assert serialize_module._FAST is True


@pytest.mark.parametrize(("compute_crc32", "alignment"), [(False, 4096), (True, 64)])
def test_pytorch_file_writer_positional_arguments_are_sink_crc_alignment(compute_crc32: bool, alignment: int) -> None:
    """``torch._C.PyTorchFileWriter(sink, compute_crc32, alignment)``: the second argument turns the record CRCs
    on or off and the third places every record's data at a multiple of it, as ``_writer_without_crc`` assumes."""
    sink = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(sink, compute_crc32, alignment)
    payload = bytes(range(256)) * 4
    writer.write_record("rec", payload, len(payload))
    writer.write_end_of_file()
    archive = sink.getvalue()
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        info = zf.getinfo("archive/rec")
        assert all(local_data_offset(archive, i) % alignment == 0 for i in zf.infolist())
    assert local_data_offset(archive, info) > 0
    assert archive[local_data_offset(archive, info) :][: len(payload)] == payload
    assert (zlib.crc32(payload) if compute_crc32 else 0) == info.CRC


def test_storage_alignment_is_the_one_torch_save_uses() -> None:
    """``torch.serialization._get_storage_alignment()`` is the alignment of tensor data in ``torch.save``'s files (the
    fast path passes it to the writer so that its files match)."""
    alignment = torch.serialization._get_storage_alignment()
    assert isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0
    out = io.BytesIO()
    torch.save({"a": torch.arange(5, dtype=torch.uint8), "b": torch.ones(3)}, out)
    archive = out.getvalue()
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        data = [i for i in zf.infolist() if "/data/" in i.filename and not i.filename.endswith("serialization_id")]
    assert len(data) == 2
    assert all(local_data_offset(archive, i) % alignment == 0 for i in data)


def test_serialize_into_a_real_file_uses_the_writer_without_crc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a real file, ``serialize`` takes the fast path (torch's writer with CRCs off, CRCs computed beside the
    writes and patched in, each record seen in one write, none read back) and writes ``torch.save``'s records."""
    patched: list[int] = []
    real_patch = serialize_module._patch_crcs

    def recording_patch(fd: int, crcs: dict[tuple[int, int], int], size: int) -> None:
        patched.append(len(crcs))
        real_patch(fd, crcs, size)

    def no_read_back(fd: int, offset: int, length: int) -> int:
        raise AssertionError(f"record at {offset} ({length} B) reached the file in several writes and was read back")

    monkeypatch.setattr(serialize_module, "_patch_crcs", recording_patch)
    monkeypatch.setattr(serialize_module, "_crc_of_range", no_read_back)
    # One record above the size at which CRC helper threads share the work, and small ones.
    state = {"big": torch.arange((32 << 20) + 3, dtype=torch.uint8), "w": torch.randn(100), "step": 7}
    path = tmp_path / "fast.pt"
    with open(path, "w+b") as f:
        serialize(state, f)
    assert patched and patched[0] > 0, "the fast path did not run: serialize fell back to torch.save"
    reference = io.BytesIO()
    torch.save(state, reference)
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(io.BytesIO(reference.getvalue())) as theirs:
        assert ours.testzip() is None
        mine, ref = ours.infolist(), theirs.infolist()
        assert [(i.filename, i.header_offset, i.file_size) for i in mine] == [
            (i.filename, i.header_offset, i.file_size) for i in ref
        ]
        for a, b in zip(mine, ref, strict=True):
            if a.filename.endswith("/.data/serialization_id"):
                continue  # torch derives it from the CRCs its writer computed; ours computed none
            assert (a.CRC, ours.read(a)) == (b.CRC, theirs.read(b)), a.filename
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["big"], state["big"]) and loaded["step"] == 7


# -- torch: the device tagger of staging buffers ---------------------------------------------------------------------


def test_register_package_and_its_registry_have_the_shape_the_tagger_uses() -> None:
    """``register_package(priority, tagger, deserializer)`` adds to ``_package_registry``, a list of (priority,
    tagger, deserializer) tuples that the staging tagger reads to pick a free priority, and torch.save asks it."""
    from async_ckpt.pipeline.snapshot import _tag as tag
    from async_ckpt.pipeline.snapshot import _untag as untag

    assert parameters(torch.serialization.register_package) == ["priority", "tagger", "deserializer"]
    registry = torch.serialization._package_registry
    assert isinstance(registry, list) and registry
    assert all(isinstance(e, tuple) and len(e) == 3 and isinstance(e[0], int) for e in registry)
    buffer = torch.zeros(8)
    key = tag(buffer, "cuda:3")
    try:
        out = io.BytesIO()
        torch.save({"t": buffer}, out)
    finally:
        untag([key])
    locations: list[str] = []

    def record(storage: Any, location: str) -> Any:
        locations.append(location)
        return storage

    out.seek(0)
    torch.load(out, map_location=record, weights_only=True)
    assert locations == ["cuda:3"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudart_host_register_takes_pointer_size_flags() -> None:
    """``torch.cuda.cudart()`` exposes ``cudaHostRegister(ptr, nbytes, flags)`` returning an error code, and
    ``cudaHostUnregister(ptr)``, with which the staging arena is pinned for GPU copies."""
    runtime = torch.cuda.cudart()
    buffer = torch.empty(1 << 20, dtype=torch.uint8)
    err = runtime.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 1)  # 1: cudaHostRegisterPortable
    assert int(err) == 0
    assert int(runtime.cudaHostUnregister(buffer.data_ptr())) == 0


# -- ignite: the public seams the package uses instead of private names --------------------------------------------


class RecordingSaveHandler(BaseSaveHandler):
    """A save handler that only records what ignite's ``Checkpoint`` asks it to save and remove."""

    def __init__(self) -> None:
        self.saved: list[str] = []
        self.removed: list[str] = []

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        self.saved.append(filename)

    def remove(self, filename: str) -> None:
        self.removed.append(filename)


def scored(acc: float) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.iteration, engine.state.epoch = 30, 3
    engine.state.metrics["acc"] = acc
    return engine


def by_acc(engine: Engine) -> float:
    return float(engine.state.metrics["acc"])


def test_checkpoint_item_is_a_priority_filename_pair() -> None:
    """``Checkpoint.Item`` is the (priority, filename) named tuple the savers build and sort by its first field."""
    item = Checkpoint.Item(0.5, "a.pt")
    assert Checkpoint.Item._fields == ("priority", "filename")
    assert (item[0], item[1], item.priority, item.filename) == (0.5, "a.pt", 0.5, "a.pt")


@pytest.mark.parametrize(
    ("to_save", "kwargs", "name", "priority"),
    [
        ({"net": None}, {"score_function": by_acc, "score_name": "acc"}, "net", 0.7),
        ({"net": None, "opt": None}, {"score_function": by_acc, "score_name": "acc"}, "checkpoint", 0.7),
        ({"net": None}, {"filename_prefix": "run", "score_function": by_acc, "score_name": "acc"}, "net", 0.7),
        ({"net": None}, {"score_function": lambda e: e.state.epoch, "score_name": "epoch"}, "net", 3),
        ({"net": None}, {"score_function": lambda e: e.state.iteration, "score_name": "final_iteration"}, "net", 30),
        ({"net": None}, {"score_function": by_acc}, "net", 0.7),
        ({"net": None}, {"filename_pattern": "{name}-{score}.{ext}", "score_function": by_acc}, "net", 0.7),
    ],
)
def test_setup_filename_pattern_gives_the_name_ignite_saves_under(
    to_save: dict[str, Any], kwargs: dict[str, Any], name: str, priority: float
) -> None:
    """Public seam: ``Checkpoint.setup_filename_pattern`` (or the ``filename_pattern`` given), formatted by
    ``ignite_file_name`` as the saver's resume does, is the name ignite's own call saves under (for one object or
    several, with a prefix, with and without a score name, float and integer scores)."""
    handler = RecordingSaveHandler()
    objects = {k: torch.nn.Linear(1, 1) for k in to_save}
    checkpoint = Checkpoint(objects, handler, **kwargs)
    checkpoint(scored(0.7))
    assert handler.saved == [ignite_file_name(checkpoint, name, priority)]


def test_state_dict_holds_the_list_ignite_ranks() -> None:
    """Public seam: ``Checkpoint.state_dict()`` holds one list, the (priority, filename) pairs ignite keeps, worst
    first, and ``kept`` reads it as ``Checkpoint.Item`` entries."""
    handler = RecordingSaveHandler()
    checkpoint = Checkpoint({"net": torch.nn.Linear(1, 1)}, handler, score_function=by_acc, n_saved=2)
    for acc in (0.5, 0.9, 0.7):
        checkpoint(scored(acc))
    state = checkpoint.state_dict()
    assert [key for key, value in state.items() if isinstance(value, list)] == list(state)
    assert kept(checkpoint) == [(0.7, "net_0.7000.pt"), (0.9, "net_0.9000.pt")]
    assert all(isinstance(it, Checkpoint.Item) for it in kept(checkpoint))
    assert handler.removed == ["net_0.5000.pt"]


def test_list_loaded_from_outside_drives_ignites_next_eviction_and_last_checkpoint() -> None:
    """Public seam: a list put in with ``load_state_dict`` (``replace_kept``, as the saver does on resume and after a
    failed write) is the one ignite's next call ranks, evicts from and appends to, and ``last_checkpoint`` reads."""
    handler = RecordingSaveHandler()
    net = torch.nn.Linear(2, 2)
    checkpoint = Checkpoint({"net": net}, handler, score_function=by_acc, score_name="acc", n_saved=2)
    replace_kept(checkpoint, [(0.1, "net_acc=0.1000.pt"), (0.5, "net_acc=0.5000.pt")])
    assert checkpoint.last_checkpoint == "net_acc=0.5000.pt"
    checkpoint(scored(0.7))
    assert handler.removed == ["net_acc=0.1000.pt"]
    assert handler.saved == ["net_acc=0.7000.pt"]
    assert kept(checkpoint) == [(0.5, "net_acc=0.5000.pt"), (0.7, "net_acc=0.7000.pt")]
    assert checkpoint.last_checkpoint == "net_acc=0.7000.pt"
    replace_kept(checkpoint, [])
    checkpoint(scored(0.2))
    assert handler.removed == ["net_acc=0.1000.pt"], "an emptied list evicted a file it no longer holds"
    assert kept(checkpoint) == [(0.2, "net_acc=0.2000.pt")]


def test_drop_oldest_takes_the_lowest_entry_out_of_the_list() -> None:
    """MONAI's final-checkpoint deletion through the public seam: the lowest entry leaves the list and is returned,
    so ignite's next call does not evict it again; an empty list gives ``None``."""
    handler = RecordingSaveHandler()
    checkpoint = Checkpoint({"net": torch.nn.Linear(1, 1)}, handler, score_function=by_acc, n_saved=1)
    assert drop_oldest(checkpoint) is None
    checkpoint(scored(0.3))
    assert drop_oldest(checkpoint) == (0.3, "net_0.3000.pt")
    assert kept(checkpoint) == [] and checkpoint.last_checkpoint is None
    checkpoint(scored(0.1))
    assert handler.removed == [] and kept(checkpoint) == [(0.1, "net_0.1000.pt")]


# -- torch DCP: the one private name async_ckpt.sharded sets ---------------------------------------------------------


def test_async_stager_reads_synchronize_after_execute() -> None:
    """DCP's ``AsyncStager.should_synchronize_after_execute`` is the ``_synchronize_after_execute`` class attribute that
    the sharded saver's already-staged stager sets to ``False``."""
    from torch.distributed.checkpoint.staging import AsyncStager

    from async_ckpt.sharded.writer import _AlreadyStaged

    class Synchronizing(_AlreadyStaged):
        _synchronize_after_execute = True

    assert isinstance(inspect.getattr_static(AsyncStager, "should_synchronize_after_execute"), property)
    assert _AlreadyStaged().should_synchronize_after_execute is False
    assert Synchronizing().should_synchronize_after_execute is True


# -- every private use is pinned ---------------------------------------------------------------------------------------

PINNED = {
    "torch.serialization._save": test_torch_serialization_save_takes_the_arguments_serialize_passes,
    "torch._C.PyTorchFileWriter": test_pytorch_file_writer_positional_arguments_are_sink_crc_alignment,
    "torch.serialization._get_storage_alignment": test_storage_alignment_is_the_one_torch_save_uses,
    "torch.serialization._package_registry": test_register_package_and_its_registry_have_the_shape_the_tagger_uses,
    "AsyncStager._synchronize_after_execute": test_async_stager_reads_synchronize_after_execute,
}
# ignite Checkpoint objects by the names the package gives them; DCP attributes the package sets on its subclasses.
_TORCH = re.compile(r"\btorch(?:\.\w+)+")
_GETATTR = re.compile(r"""(?:getattr|hasattr)\((torch(?:\.\w+)*), ["'](_\w+)["']""")
_CHECKPOINT = re.compile(r"\b(?:checkpoint|Checkpoint|_ranking|ranking)\.(_[a-z]\w*)")
_DCP_SET = {"_synchronize_after_execute": "AsyncStager"}


def _docstring(node: ast.AST) -> ast.Expr | None:
    """The docstring statement of a module, class or function, if it has one."""
    body = getattr(node, "body", None)
    if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not body:
        return None
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


def code_of(path: Path) -> str:
    """The source of ``path`` with its docstrings and comments blanked: prose that names a private API is not a use
    of it (lines and columns are kept)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    spans: list[tuple[int, int, int, int]] = []  # (start row, start col, end row, end col), rows from 1
    for node in ast.walk(ast.parse(text)):
        doc = _docstring(node)
        if doc is not None:
            spans.append((doc.lineno, doc.col_offset, doc.end_lineno or doc.lineno, doc.end_col_offset or 0))
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            spans.append((*token.start, *token.end))
    for srow, scol, erow, ecol in spans:
        for row in range(srow, erow + 1):
            line = lines[row - 1]
            start = scol if row == srow else 0
            end = ecol if row == erow else len(line.rstrip("\n"))
            lines[row - 1] = line[:start] + " " * (end - start) + line[end:]
    return "".join(lines)


def test_code_of_blanks_prose_but_keeps_code(tmp_path: Path) -> None:
    """The scan below reads code only: a private name in a docstring or a comment is gone, one in code (also in a
    string that is not a docstring) stays."""
    source = tmp_path / "sample.py"
    source.write_text(
        '"""Module prose: ``Checkpoint._saved``."""\n'
        "import torch\n"
        "\n"
        "def f(checkpoint):\n"
        '    """Function prose: checkpoint._saved, torch.serialization._save."""\n'
        "    x = torch.serialization._save  # comment: torch._C._nothing\n"
        '    return checkpoint._compare_fn, getattr(torch.serialization, "_package_registry")\n',
        encoding="utf-8",
    )
    code = code_of(source)
    assert "_saved" not in code and "_nothing" not in code and "prose" not in code
    assert code.count("\n") == source.read_text(encoding="utf-8").count("\n")
    assert "x = torch.serialization._save" in code and "checkpoint._compare_fn" in code
    assert 'getattr(torch.serialization, "_package_registry")' in code


def private_uses() -> dict[str, set[str]]:
    """Private torch / ignite names used in the package's code (not its prose), each with the files that use it."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = code_of(path)
        names = set()
        for match in _TORCH.finditer(text):
            parts = match.group(0).split(".")
            cut = next((i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")), None)
            if cut is not None:
                names.add(".".join(parts[: cut + 2] if parts[cut] == "_C" else parts[: cut + 1]))
        names |= {f"{m.group(1)}.{m.group(2)}" for m in _GETATTR.finditer(text)}
        names |= {f"Checkpoint.{m.group(1)}" for m in _CHECKPOINT.finditer(text)}
        names |= {f"{owner}.{attr}" for attr, owner in _DCP_SET.items() if re.search(rf"\b{attr}\b", text)}
        for name in names:
            found.setdefault(name, set()).add(path.relative_to(PACKAGE).as_posix())
    return found


def test_every_private_torch_and_ignite_name_the_package_uses_is_pinned() -> None:
    """Each private torch or ignite name in the package's sources has a test in this file (a new use needs one)."""
    found = private_uses()
    # The scan sees real uses (the serializer's fast path), so an empty result cannot pass for a clean package.
    assert "torch.serialization._save" in found and "torch._C.PyTorchFileWriter" in found
    # Issue 13: neither the ignite nor the sharded saver reads or writes ignite's retention list any more.
    assert "Checkpoint._saved" not in found, found["Checkpoint._saved"]
    unpinned = {name: sorted(files) for name, files in found.items() if name not in PINNED}
    assert not unpinned, f"private APIs used without a test here: {unpinned}"


def ignite_private_names(directory: Path) -> set[str]:
    """The private attributes of ignite's ``Checkpoint`` and ``DiskSaver`` (the classes the ignite saver composes
    and subclasses), on the classes and on instances (a ``DiskSaver`` on ``directory``, which stays empty)."""
    from ignite.handlers import DiskSaver

    saver = DiskSaver(directory, require_empty=False)
    checkpoint = Checkpoint({"net": torch.nn.Linear(1, 1)}, saver, score_function=by_acc)
    names = {n for cls in (Checkpoint, DiskSaver) for base in cls.__mro__ for n in vars(base)}
    names |= set(vars(checkpoint)) | set(vars(saver))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_the_ignite_integration_uses_no_private_ignite_name(tmp_path: Path) -> None:
    """``async_ckpt/ignite`` neither reads nor writes a private attribute of ignite's ``Checkpoint`` or ``DiskSaver``
    (``_saved``, ``_get_filename_pattern``, ...): it goes through ``state_dict``/``load_state_dict`` and
    ``setup_filename_pattern``. The pattern is not vacuous: it finds ``_saved`` in the line the saver used to have."""
    private = ignite_private_names(tmp_path)
    assert {"_saved", "_get_filename_pattern", "_atomic"} <= private
    attribute = re.compile(r"\.(_[A-Za-z]\w*)\b")
    assert attribute.findall("before = list(checkpoint._saved)") == ["_saved"]
    used = {
        (path.relative_to(PACKAGE).as_posix(), name)
        for path in sorted((PACKAGE / "ignite").glob("*.py"))
        for name in attribute.findall(path.read_text(encoding="utf-8"))
        if name in private
    }
    assert not used, f"the ignite integration uses private ignite names: {sorted(used)}"
    in_ignite = {name for name, files in private_uses().items() if any(f.startswith("ignite/") for f in files)}
    assert not {n for n in in_ignite if n.startswith("Checkpoint.")}, in_ignite
