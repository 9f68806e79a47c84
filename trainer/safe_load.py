"""Refuse a checkpoint file whose pickle reaches beyond what DeepSpeed and torch write, before
anything unpickles it.

DeepSpeed loads its engine files (``mp_rank_*_model_states.pt``, ``*optim_states.pt``, the
universal format's ``fp32.pt``...) with ``torch.load(weights_only=False)``, and so do its
``zero_to_fp32`` and ``ds_to_universal``: a file from someone else would run their code. A
pickle can only reach code through an imported global (``GLOBAL``, ``STACK_GLOBAL``, ``INST``,
or the copyreg extension registry ``EXT*``): :func:`scan` walks the opcodes without executing
any (``pickletools.genops``) and accepts a file only when every global it imports is in
:data:`ALLOWED`, the globals that real ZeRO 0-3, offload, LoRA and Muon checkpoints hold (listed
by saving them: ``python -m trainer.safe_load DIR...`` prints what a checkpoint imports).

Why not torch's ``get_unsafe_globals_in_checkpoint`` with ``add_safe_globals``: its allow-list
is made for torch's restricted unpickler (which also limits what REDUCE and BUILD may call), not
for the full unpickler DeepSpeed uses; ``add_safe_globals`` widens every ``weights_only`` load in
the process; and it needs torch, where this module is standard library only, so ``dstrain run``
refuses a checkpoint before it spawns a rank. The rules here are stricter than it in one way
too: a ``STACK_GLOBAL`` whose names are not plain strings on the stack is refused, not skipped.

A torch file is a zip with one ``data.pkl``. So that no zip reader sees another pickle than the
one scanned here, every entry whose name ends in ``.pkl`` (any case) is scanned, and a zip with
two entries of the same name (any case) or a file that is not a zip (torch's legacy format) is
refused.
"""

from __future__ import annotations

import pickletools
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

from trainer.errors import CheckpointError

# Legacy typed storages (torch.FloatStorage ...) and the dtypes, layouts and memory formats a
# tensor's rebuild names: data, not code.
_STORAGE_KINDS = (
    "Float Double Half BFloat16 Long Int Short Char Byte Bool ComplexFloat ComplexDouble Untyped".split()
)
_TORCH_DATA = (
    "float32 float64 float16 bfloat16 float8_e4m3fn float8_e5m2 int64 int32 int16 int8 uint8 uint16 "
    "uint32 uint64 bool complex64 complex128 strided sparse_coo contiguous_format channels_last "
    "preserve_format"
).split()

# (module, name) pairs, exactly as the pickle names them: what 1-rank fp32 runs of ZeRO 0, 1, 2
# and 3, ZeRO-2 with optimizer offload, Muon, bf16 and LoRA (ZeRO 2 and 3) wrote with DeepSpeed
# 0.19.8 and torch 2.13 (`python -m trainer.safe_load DIR` lists a checkpoint's), and the few
# that other precisions and torch versions write for the same objects (marked). Each is data,
# or a class or function that builds data from its arguments: none reads or writes a file or
# runs code that its arguments name.
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [
        ("collections", "OrderedDict"),
        ("torch", "Size"),
        ("torch", "Tensor"),
        ("torch", "device"),  # tensors saved from a GPU
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),  # an nn.Parameter in a state dict
        ("torch.nn.parameter", "Parameter"),
        ("torch._tensor", "_rebuild_from_type_v2"),  # ZeRO-3: calls an allowed rebuild, then sets attributes
        ("torch.storage", "UntypedStorage"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # fp16 runs
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
        ("_codecs", "encode"),  # how protocol 2 writes a bytes value
        ("builtins", "set"),
    ]
    + [("torch", f"{kind}Storage") for kind in _STORAGE_KINDS]
    + [("torch", name) for name in _TORCH_DATA]
)

TRUST_HINT = "pass --trust-checkpoint only if you wrote this checkpoint yourself"

_STRINGS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_MARK = object()  # the mark on the simulated stack
_UNKNOWN = object()  # any value this scan does not follow


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every global ``data`` imports, in order, found without unpickling it.

    The stack is simulated from each opcode's stack effect (pickletools' tables) so that the
    two names ``STACK_GLOBAL`` takes are known exactly, through the memo included. Raises
    ValueError for what cannot be followed: a malformed pickle, an ``EXT*`` opcode (a global by
    registry number), a ``STACK_GLOBAL`` whose names are not strings.
    """
    stack: list[object] = []
    memo: dict[int, object] = {}
    found: list[tuple[str, str]] = []

    def pop_to_mark() -> None:
        while stack:
            if stack.pop() is _MARK:
                return
        raise ValueError("stack underflow")

    def pop(n: int) -> list[object]:
        if len(stack) < n:
            raise ValueError("stack underflow")
        taken = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return taken

    for op, arg, pos in pickletools.genops(data):
        name = op.name
        if name in _STRINGS:
            stack.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise ValueError(f"memo {arg} read before it is written (byte {pos})")
            stack.append(memo[arg])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not stack:
                raise ValueError("stack underflow")
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            found.append((module, attr))
            if name == "INST":
                pop_to_mark()
            stack.append(_UNKNOWN)
        elif name == "STACK_GLOBAL":
            module, attr = pop(2)
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise ValueError(f"STACK_GLOBAL at byte {pos} takes names this scan cannot read")
            found.append((module, attr))
            stack.append(_UNKNOWN)
        elif name.startswith("EXT"):
            raise ValueError(f"{name} at byte {pos} imports a global by its copyreg number")
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "DUP":
            stack.extend(pop(1) * 2)
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                pop(before.index(pickletools.markobject))
            else:
                pop(len(before))
            stack.extend([_UNKNOWN] * len(op.stack_after))
    return found


def pickles_in(path: Path) -> Iterable[tuple[str, bytes]]:
    """``(entry name, bytes)`` of every pickle inside the torch zip file ``path``."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a zip-format torch file (torch.save's format since torch 1.6)")
    with zipfile.ZipFile(path) as zf:
        names = [info.filename for info in zf.infolist()]
        lowered = [n.lower() for n in names]
        if len(set(lowered)) != len(lowered):
            raise ValueError("the zip holds two entries of the same name")
        pickles = [n for n in names if n.lower().endswith(".pkl")]
        if not pickles:
            raise ValueError("no data.pkl inside")
        for entry in pickles:
            yield entry, zf.read(entry)


def unsafe_global(path: Path) -> str | None:
    """Why ``path`` may not be unpickled (the first global outside :data:`ALLOWED`, or what
    could not be read), or None when it is safe."""
    try:
        for entry, data in pickles_in(path):
            for module, name in pickle_globals(data):
                if (module, name) not in ALLOWED:
                    return (
                        f"its {entry} imports {module}.{name}, which no DeepSpeed or dstrain checkpoint holds"
                    )
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"it cannot be checked ({exc})"
    return None


def pickle_files(ckpt: Path) -> list[Path]:
    """The files of a checkpoint dir that torch.load may read: every ``*.pt`` and ``*.pth``,
    in subdirs too (a universal conversion shipped inside it is loaded the same way)."""
    return sorted(p for p in ckpt.rglob("*") if p.suffix in (".pt", ".pth") and p.is_file())


def check_files(files: Iterable[Path]) -> str | None:
    """One line naming the first refused file and why, or None."""
    for f in files:
        reason = unsafe_global(f)
        if reason is not None:
            return f"refusing to load {f}: {reason}; {TRUST_HINT}"
    return None


def check_checkpoint(ckpt: Path) -> None:
    """Raise a one-line CheckpointError when any pickle of ``ckpt`` reaches beyond ALLOWED."""
    problem = check_files(pickle_files(ckpt))
    if problem is not None:
        raise CheckpointError(problem)


def main(argv: list[str] | None = None) -> int:
    """Print every global the checkpoint dirs' pickles import, and which are not allowed."""
    seen: dict[tuple[str, str], int] = {}
    for root in argv if argv is not None else sys.argv[1:]:
        for f in pickle_files(Path(root)):
            for _, data in pickles_in(f):
                for g in pickle_globals(data):
                    seen[g] = seen.get(g, 0) + 1
    for (module, name), count in sorted(seen.items()):
        print(f"{'ok ' if (module, name) in ALLOWED else 'NEW'} {module}.{name} ({count})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
