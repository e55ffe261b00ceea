"""
The command-line conventions every script shares: one-line user errors (run_cli), argparse with
defaults in --help, flags generated from config dataclasses, the shared flags declared once
(--device, --threads, --dtype, the sampling flags), device and dtype choice, CPU threads.
"""

import argparse
import contextlib
import dataclasses
import errno
import fcntl  # flock, for hold_folder (POSIX: Linux, macOS)
import os
import sys

import torch

from errors import UserError

# ---------------------------------------------------------------------------------------------
# Errors: a user mistake is one line on stderr and exit code 2, never a stack trace. Only
# UserError (errors.py) is a user mistake; any other exception is our bug and keeps its traceback.


def run_cli(main, argv=None):
    """Run a script's main(argv), turning user mistakes into `error: ...` and exit code 2, and
    Ctrl-C into one line and exit code 130. Output into a closed pipe (`| head -1`) is dropped
    quietly while the job goes on (PipeSafe), so a run still writes its files."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PipeSafe(sys.stdout), PipeSafe(sys.stderr)
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        for stream in (sys.stdout, sys.stderr):  # what is still buffered, while a closed pipe is still caught
            if isinstance(stream, PipeSafe):
                stream.flush()
        sys.stdout, sys.stderr = streams


class PipeSafe:
    """sys.stdout or sys.stderr, surviving a reader that goes away (`python sample.py ... | head -1`).
    At the first BrokenPipeError the stream's file descriptor is pointed at os.devnull: what is
    still buffered and everything printed later is dropped, the job carries on and writes its
    files (a checkpoint, bench's --json), and Python's own flush at exit finds nothing to complain
    about. Everything else is the wrapped stream's."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)
        self.stream.flush()  # the bytes the failed write left in the buffer go to devnull now

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        silent = default is None or default is False or default is argparse.SUPPRESS or default == ""
        if action.option_strings and "default" not in text and not silent:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is the same one-line `error: ...` (exit 2) as every other mistake,
    not the usage block. `--help` still prints everything, with the defaults."""

    def __init__(self, description=None, **kwargs):
        super().__init__(description=description, formatter_class=_HelpFormatter, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


# ---------------------------------------------------------------------------------------------
# The shared flags, declared once (each script picks its defaults)


def add_runtime_flags(parser, threads: int, dtypes=None, dtype_default="float32"):
    """--device, --threads and (given the allowed names) --dtype, the inference dtype."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, default=threads, help="CPU threads for torch (0 = torch's default, "
                        "which follows OMP_NUM_THREADS); 1 keeps decoding steady on a busy machine")
    if dtypes:
        parser.add_argument("--dtype", default=dtype_default, choices=list(dtypes), help="inference dtype (bf16 is "
                            "fast on GPUs but may flip near-ties between AR and Orthrus)")


def add_sampling_flags(parser, temperature: float = 0.0, top_p=1.0, seed_help="seed of the sampling generator"):
    """--temperature, --top-k, --top-p and --seed: the settings of sampling.Sampling."""
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy argmax; > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass in (0, 1] (1 = off)")
    parser.add_argument("--seed", type=int, default=1337, help=seed_help)


def int_list(text: str, flag: str) -> list:
    """A comma list of integers such as 4,8,16 (sorted, duplicates dropped), or one line saying why not."""
    try:
        values = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise UserError(f"{flag} must be a comma list of integers like 8,16,32, got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty: give a comma list of integers like 8,16,32")
    return values


# ---------------------------------------------------------------------------------------------
# Device and dtype

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype:
    """A dtype name (float32, bfloat16, float16, float64 or a short form) as a torch.dtype: the one
    place the names are read."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or float64")
    return DTYPES[dtype]


def available_devices() -> list:
    """The --device values that work on this machine (besides 'auto')."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def pick_device(requested: str = "auto", verbose: bool = True) -> torch.device:
    """'auto' picks cuda, then mps, then cpu, and says which and why. Anything else must be a
    device this machine has (cpu, cuda, cuda:N, mps): checked here, before anything is loaded."""
    if requested != "auto":
        here = "available here: " + ", ".join(["auto"] + available_devices())
        try:
            device = torch.device(requested)
        except (RuntimeError, ValueError, TypeError):
            raise UserError(f"unknown --device {requested!r} ({here})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested} requested but CUDA is not available ({here})")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s) ({here})")
        if device.type == "mps" and "mps" not in available_devices():
            raise UserError(f"--device {requested} requested but Apple MPS is not available ({here})")
        if device.type not in ("cpu", "cuda", "mps"):
            raise UserError(f"--device {requested} is not supported: use cpu, cuda, cuda:N or mps ({here})")
        why = "requested"
    elif torch.cuda.is_available():
        device, why = torch.device("cuda"), f"CUDA available ({torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device, why = torch.device("mps"), "Apple MPS available"
    else:
        n = torch.get_num_threads()
        device, why = torch.device("cpu"), f"no accelerator; {n} CPU thread{'s' if n != 1 else ''}"
    if verbose:
        print(f"device: {device} ({why})")
    return device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_autocast_dtype(device: torch.device, requested: str = "auto", verbose: bool = True):
    """The autocast dtype for training: bf16 where the hardware runs it natively, else None (fp32)."""
    if requested in ("float32", "bfloat16"):
        dtype, why = (None if requested == "float32" else parse_dtype(requested)), "requested"
    elif requested != "auto":
        raise UserError(f"unknown --dtype {requested!r}: use auto, float32 or bfloat16")
    elif device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype, why = torch.bfloat16, "CUDA supports bf16"
    elif device.type == "cpu" and cpu_has_fast_bf16():
        dtype, why = torch.bfloat16, "this CPU has native bf16 (AMX/AVX512-BF16)"
    else:
        dtype, why = None, "no native bf16 on this device"
    if verbose:
        print(f"autocast: {'bfloat16' if dtype else 'off (float32)'} ({why})")
    return dtype


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Flags from dataclasses


def add_dataclass_flags(parser, cls, skip=()):
    """One flag per dataclass field (--field-name), with the field's help text and default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        # the flag's own default is None ("not given", so presets can fill it); show the real one,
        # unless it is empty (the help text then says what an empty value means)
        help_text = f.metadata.get("help", "")
        if f.default != "" and "default:" not in help_text:
            help_text += f" (default: {f.default})"
        help_text = help_text.replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"), help=help_text)
    return parser


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {s!r}")


def dataclass_from(cls, *layers: dict):
    """Build a dataclass from defaults overridden by each dict in turn (None values are skipped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for layer in layers:
        values.update({k: v for k, v in layer.items() if k in names and v is not None})
    return cls(**values)




# ---------------------------------------------------------------------------------------------
# Runtime


def set_threads(n: int):
    """Use n CPU threads for torch (0 leaves torch's default: all cores). Decoding a small model
    gains little from a second thread, and two OpenMP threads collapse ~10x whenever another
    process keeps a core busy, so the decoding scripts default to 1."""
    if n > 0:
        torch.set_num_threads(n)



def fmt_time(seconds: float) -> str:
    """An ETA or a duration: 4m05s, 2h07m."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# Output folders: writable, and written by one run at a time

# what a user fixes by picking another folder (or freeing space); any other OSError is not theirs
WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
LOCK_FILE = "run.lock"


def check_writable(folder: str, flag: str):
    """A folder a script will write into (created when missing), checked before any model is
    loaded: not a file, and it (or the folder it will be created in) writable."""
    if not folder:
        raise UserError(f"{flag} is empty; pass a folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file; pass a folder")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: cannot write into {existing}; pass a folder you can write to")


@contextlib.contextmanager
def writing_into(folder: str, flag: str):
    """Writes into `folder` that fail for a reason the user fixes (no permission, a read-only or
    full disk) end in one line. check_writable cannot see every such case: root passes every
    permission check, and a disk fills up during a run."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise UserError(f"cannot write into {flag} {folder} ({e.strerror}); pass a folder you can write to") from None


@contextlib.contextmanager
def hold_folder(folder: str, flag: str = "--out-dir"):
    """This run's hold on its output folder (created if missing): `run.lock`, locked with flock
    and holding our pid. A second run into the same folder is refused in one line, naming the
    first run's pid; the kernel drops the lock when its process dies however it dies, so the
    lock file of a killed run is simply taken over. Taking the lock is also the first write into
    the folder: a read-only one is refused here, before anything is loaded. The lock file is
    removed at the end (and the folder, if this run created it and left it empty)."""
    if not folder:
        raise UserError(f"{flag} is empty; pass a folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file; pass a folder")
    created = not os.path.isdir(folder)
    path = os.path.join(folder, LOCK_FILE)
    with writing_into(folder, flag):
        os.makedirs(folder, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{folder} is in use by another run (pid {pid}); wait for it to end or pass "
                                f"another {flag}") from None
            try:  # the previous holder removes the file as it ends: lock the file that is there now
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield folder
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty
