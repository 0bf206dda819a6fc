"""tokenprune's C++/CUDA extension (sources in the repository's ``cuda/csrc``): the kept-token gather,
the weighted merge and the attention each token receives, as kernels.

The PyTorch functions in ``tokenprune.ops`` are the reference and the fallback; they call
``for_tensor(t)`` and use the extension when it returns one. The per-element logic is written once
(``csrc/kernels.h``) and compiled twice: by the host compiler into a CPU build, which the tests compare
with the reference, and by nvcc into the CUDA build, which serves CUDA tensors.

``TOKENPRUNE_EXT`` chooses:

* ``auto`` (default): CUDA tensors use the CUDA build, compiled on first use (about a minute; cached by
  torch in ``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by default) or ahead of time with
  ``tokenprune build-ext --cuda``. CPU tensors use the PyTorch ops (as fast there for ``ops.merge_mean`` or the
  attention received), except where the CPU build's kernel measured faster (``cpu_kernel_pays``: ToMe's matching
  and merge, ``ops.bipartite_merge``, one call for some thirty small ops; MCTF's matching, ``mctf.merge_plan``,
  one for some fifty; Zero-TPrune's S-stage, ``zero_tprune.s_stage_keep``, one for some twenty; the weighted
  merge of ``ops.assign_mean`` (MCTF's fusion); the kept-token gather, ``ops.keep_tokens``, a row copy for five
  ATen calls; the kept indices, ``ops.top_k_ascending``, one call for three), compiled on first use (about 30 s,
  then cached; or ``tokenprune build-ext``). If a build fails, one warning, then the PyTorch ops.
* ``off`` (or ``0``): the PyTorch ops everywhere.
* ``all``: the extension for CPU tensors too (the CPU build), and a build failure is an error; this is how
  the tests run whole models through the kernels without a GPU.

The extension is skipped where it would be wrong or slower: under differentiation (autograd recording,
forward-mode AD, ``torch.func`` transforms: the kernels have no derivatives), and under ``torch.compile``
(inductor fuses the PyTorch ops) except for the ops defined with ``torch.library`` below (``COMPILED``),
which a compiled graph calls as one kernel each: ToMe's and Zero-TPrune's steps, MCTF's matching and its merges,
where inductor's code (sorts, atomic scatter-adds) measured slower than the CPU build (docs/performance.md).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd import forward_ad

from .warn import warn_at_caller


def _sources() -> Path:
    """``cuda/csrc``: in a wheel, package data of ``tokenprune.cuda`` (a data-only package: a top-level
    ``cuda/__init__.py`` in the repository would shadow ``cuda.bindings``, which torch imports); in a
    checkout (editable install), the repository's ``cuda/`` next to the package."""
    package = Path(__file__).resolve().parent
    for root in (package / "cuda", package.parent / "cuda"):
        if (root / "csrc" / "ops.cpp").is_file():
            return root / "csrc"
    raise RuntimeError(f"tokenprune's extension sources (cuda/csrc) are missing next to {package}")



ENV = "TOKENPRUNE_EXT"
MODES = ("auto", "off", "all")
# Built for these when no GPU tells torch which one to target (CI, a build machine): every architecture
# since Turing, plus PTX for newer ones.
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def mode() -> str:
    """The ``TOKENPRUNE_EXT`` setting; a value outside ``auto``, ``off`` (``0``), ``all`` is an error."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    value = "off" if value in ("0", "false", "no") else value
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r} is not understood; accepted: auto, off (or 0), all")
    return value


@contextlib.contextmanager
def pytorch_ops_only():
    """``TOKENPRUNE_EXT=off`` while it lasts (the PyTorch reference everywhere), the caller's setting restored
    after (only that variable: a build started inside may set its own)."""
    previous = os.environ.get(ENV)
    os.environ[ENV] = "off"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def for_tensor(t: torch.Tensor, *inputs: torch.Tensor | None, floating: bool = False,
               cpu_kernel_pays: bool = False, cuda_kernel_pays: bool = True,
               in_compiled_graphs: bool = False) -> ModuleType | None:
    """The extension module that should handle ``t``, or None for the PyTorch reference. ``inputs``: the op's
    other tensors that its output depends on differentiably (a merge's weights, token sizes; None skipped): a
    gradient asked of any of them keeps the reference, as one asked of ``t`` does. ``floating``:
    the op computes (merge, attention), so only the dtypes its kernels take (float64 stays in PyTorch);
    a gather copies, so any dtype. ``cpu_kernel_pays``: the op's CPU kernel is measurably faster than the
    PyTorch ops (one call for many small ones), so ``auto`` uses the CPU build for CPU tensors too.
    ``cuda_kernel_pays=False``: the op's CUDA kernel measured slower than the PyTorch ops on a GPU, so ``auto``
    keeps the PyTorch ops for CUDA tensors (``all`` still runs the kernel, which the tests hold to the reference).
    ``in_compiled_graphs``: the op is one of ``COMPILED``'s, which a graph compiled for CPU calls too (returned
    instead of the module under ``torch.compile``; what it holds has the module's signatures)."""
    if floating and t.dtype not in KERNEL_DTYPES:
        return None
    if torch.compiler.is_compiling():  # dynamo traces nothing below: the other transforms are eager-only
        usable = in_compiled_graphs and cpu_kernel_pays and t.device.type == "cpu" and not differentiated(t, *inputs)
        return COMPILED if usable and _cpu_build_for_graphs() else None
    setting = mode()
    if setting == "off" or differentiated(t, *inputs):
        return None
    if t.is_cuda:
        if setting == "all":
            return load(cuda=True)
        return _load_or_warn(cuda=True) if cuda_kernel_pays else None
    if t.device.type == "cpu":
        if setting == "all":
            return load(cuda=False)
        if cpu_kernel_pays:
            return _load_or_warn(cuda=False)
    return None


@torch.compiler.assume_constant_result
def _cpu_build_for_graphs() -> bool:
    """Whether a graph compiled for CPU may call the CPU build: asked once while dynamo traces (the answer is
    baked into the graph), which builds it if needed, as an eager forward would."""
    setting = mode()
    return setting == "all" or (setting == "auto" and _load_or_warn(cuda=False) is not None)


# The ops a compiled graph may call (``COMPILED``): schemas and fake (meta) functions here, what tracing sees of
# them; their CPU kernels are the CPU build's, registered with the dispatcher from C++ (ops.cpp, no Python between
# the graph and the kernel), so they run once the build is loaded (``_cpu_build_for_graphs`` loads it while
# dynamo traces).
_LIBRARY = torch.library.Library("tokenprune", "DEF")
_LIBRARY.define("weighted_merge(Tensor x, Tensor weight, Tensor dest, int n_out) -> (Tensor, Tensor)")
_LIBRARY.define("bipartite_merge(Tensor k, Tensor x, Tensor? size, int r, int num_prefix) -> (Tensor, Tensor)")
_LIBRARY.define("similarity_prune(Tensor probs, Tensor k, int num_prefix, int remove, int emphasize, bool rms) "
                "-> Tensor")
_LIBRARY.define("mctf_plan(Tensor x, Tensor received, Tensor size, float[] tau, bool[3] criteria, int num_prefix, "
                "int remove, bool bidirectional) -> Tensor")


@torch.library.register_fake("tokenprune::weighted_merge")
def _(x, weight, dest, n_out):
    return x.new_empty(x.shape[0], n_out, x.shape[2]), weight.new_empty(x.shape[0], n_out, dtype=torch.float32)


@torch.library.register_fake("tokenprune::bipartite_merge")
def _(k, x, size, r, num_prefix):
    n_out = x.shape[1] - r
    return x.new_empty(x.shape[0], n_out, x.shape[2]), x.new_empty(x.shape[0], n_out, 1, dtype=torch.float32)


@torch.library.register_fake("tokenprune::similarity_prune")
def _(probs, k, num_prefix, remove, emphasize, rms):
    return probs.new_empty(probs.shape[0], probs.shape[2] - num_prefix - remove, dtype=torch.long)


@torch.library.register_fake("tokenprune::mctf_plan")
def _(x, received, size, tau, criteria, num_prefix, remove, bidirectional):
    return x.new_empty(x.shape[:2], dtype=torch.long)


class COMPILED:
    """The CPU build's ops a compiled graph may call, with the module's signatures (``for_tensor``)."""

    @staticmethod
    def weighted_merge(x, weight, dest, n_out):
        return torch.ops.tokenprune.weighted_merge(x, weight, dest, n_out)

    @staticmethod
    def bipartite_merge(k, x, size, r, num_prefix):
        return torch.ops.tokenprune.bipartite_merge(k, x, size, r, num_prefix)

    @staticmethod
    def similarity_prune(probs, k, num_prefix, remove, emphasize, rms):
        return torch.ops.tokenprune.similarity_prune(probs, k, num_prefix, remove, emphasize, rms)

    @staticmethod
    def mctf_plan(x, received, size, tau, criteria, num_prefix, remove, bidirectional):
        dest = torch.ops.tokenprune.mctf_plan(x, received, size, tau, criteria, num_prefix, remove, bidirectional)
        return dest, x.shape[1] - remove


def differentiated(*tensors: torch.Tensor | None) -> bool:
    """Whether a transform follows any of ``tensors`` (None skipped) through the ops, which the kernels (no
    derivatives, raw data pointers) and ``out=`` buffers would silently cut or fail: autograd recording one, a
    forward-mode dual level (a tangent rides on plain tensors), or a ``torch.func`` transform (vmap, jvp, grad).
    While dynamo traces, autograd alone (the one transform a compiled graph carries; the other checks would break
    the graph)."""
    if any(_asks_gradient(t) for t in tensors if t is not None):
        return True
    return not torch.compiler.is_compiling() and (forward_ad._current_level >= 0 or under_torch_func())


def under_torch_func() -> bool:
    """Whether a ``torch.func`` transform (vmap, jvp, grad) is running: its interpreter stack is not empty, and
    every tensor made meanwhile, a factory's too, is its wrapper, valid only inside it."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _asks_gradient(t: torch.Tensor) -> bool:
    """Whether autograd records ``t`` (the one transform a compiled graph can carry)."""
    return t.requires_grad and torch.is_grad_enabled()


def kernels_in_use(device: torch.device | str, compiled: bool = False) -> str:
    """What a forward on ``device`` runs, in words, for benchmark tables (on CPU, the default kernels decide
    whether pruning pays at small batches; a machine without a compiler falls back to the PyTorch ops). Asks
    for the build ``for_tensor`` would load, so a first call may compile it (before anything is timed).
    ``compiled``: what a graph from ``torch.compile`` runs (inductor's code, and ``COMPILED``'s ops on CPU)."""
    device, setting = torch.device(device), mode()
    if setting == "off" or device.type not in ("cpu", "cuda") or (compiled and device.type != "cpu"):
        return "pytorch ops"
    cuda = device.type == "cuda"
    if compiled:
        ready = _cpu_build_for_graphs()
        if not ready:
            return "pytorch ops (the CPU build failed)"
        return "CPU build: ToMe's and Zero-TPrune's steps, MCTF's matching and merges"
    build = "CUDA build" if cuda else "CPU build"
    if setting == "all":
        load(cuda=cuda)
        return f"{build}, every kernel"
    if _load_or_warn(cuda=cuda) is None:
        return f"pytorch ops (the {build} failed)"
    return "CUDA build: the merge, the gather" if cuda else ("CPU build: ToMe's, MCTF's and Zero-TPrune's steps, the "
                                                            "merge, the gather, the top-k, the attention map")


@functools.cache
def _load_or_warn(cuda: bool) -> ModuleType | None:
    build = "CUDA" if cuda else "CPU"
    try:
        if not cuda and not _is_built(build_name(cuda=False)):  # a silent half minute would look like a hang
            print("tokenprune: compiling the CPU kernels (once, about 30 s; then cached)", file=sys.stderr)
        return load(cuda=cuda)
    except Exception as error:  # a missing compiler or toolkit: fall back, once, loudly
        warn_at_caller(f"tokenprune: the {build} extension could not be built ({str(error).splitlines()[0]}); "
                       f"using the PyTorch ops. Set {ENV}=off to silence this, or see docs/design.md.",
                       RuntimeWarning)
        return None


def build_name(cuda: bool) -> str:
    """The build's name in torch's extension cache, which carries torch's version: torch keys a cached build by
    its sources and flags only, so two environments with different torch versions would otherwise load each
    other's build (and fail on its symbols)."""
    version = re.sub(r"[^0-9a-zA-Z]", "_", torch.__version__)
    return f"tokenprune_ext_{'cuda' if cuda else 'cpu'}_torch{version}"


def _is_built(name: str) -> bool:
    """Whether torch's extension cache holds a build of ``name`` (it may still rebuild a changed source). It
    reads a private function of torch's: if that ever fails, say False (the notice is said once too often)."""
    try:
        return any(Path(_cpp_extension()._get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:
        return False


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported after CUDA_HOME names the toolkit of the ``nvcc`` on PATH (torch
    reads it at import, and guesses when it is unset). Its import-time notice that a toolkit but no GPU was
    found is silenced: the CPU build (pruning on CPU) needs no CUDA runtime, and the CUDA build is compiled
    without a GPU on purpose (``DEFAULT_ARCHS``)."""
    if not os.environ.get("CUDA_HOME") and toolkit_root():
        os.environ["CUDA_HOME"] = toolkit_root()
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


@functools.cache
def load(cuda: bool, verbose: bool = False) -> ModuleType:
    """Build (once; torch caches the result and rebuilds when a source changes) and import one build."""
    cpp_extension = _cpp_extension()
    if cuda:
        _cuda_build_environment()

    if cuda and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        # torch resolved CUDA_HOME when it was first imported, before we set it (see _cuda_build_environment)
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    csrc = _sources()
    sources = [csrc / "ops.cpp"] + ([csrc / "kernels.cu"] if cuda else [])
    # no fused multiply-adds: the kernels round as the PyTorch reference does (bit-identical outputs, tested)
    openmp = openmp_flags()
    cflags = ["-O3", "-ffp-contract=off"] + (["-DTOKENPRUNE_WITH_CUDA"] if cuda else []) + openmp
    return cpp_extension.load(
        name=build_name(cuda),
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_ldflags=openmp,
        extra_cuda_cflags=["-O3"],
        extra_include_paths=[str(csrc)] + _pip_cuda_includes(),
        verbose=verbose,
    )


def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch runs its CPU threads on OpenMP (its Linux builds): ``at::parallel_for`` is a header
    template, so without the flag every loop of ``ops.cpp`` runs on one thread, whatever torch's thread count. The
    build links the ``libgomp.so.1`` that torch has already loaded (one runtime, one pool of threads). Elsewhere
    (macOS's clang takes no plain ``-fopenmp``; torch without OpenMP) none: the loops run serially there."""
    return ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []


def _cuda_build_environment() -> None:
    """Require a toolkit (``load`` set CUDA_HOME from nvcc where it could), and name architectures when
    there is no GPU to ask."""
    if not os.environ.get("CUDA_HOME"):
        raise RuntimeError("no CUDA toolkit found: put nvcc on PATH or set CUDA_HOME")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS


@functools.cache
def toolkit_root() -> str | None:
    """The CUDA toolkit the ``nvcc`` on PATH belongs to. Asked of nvcc itself, because an ``nvcc`` that is
    a wrapper script (as on this project's machines) makes torch guess the folder above the script."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "-dryrun", "-c", "probe.cu"], capture_output=True, text=True,
                             timeout=60)  # a dry run reads no file
    except (OSError, subprocess.TimeoutExpired):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    return str(Path(top.group(1).strip()).resolve()) if top else str(Path(nvcc).resolve().parent.parent)


def _pip_cuda_includes() -> list[str]:
    """CUDA headers that ship in the pip wheels torch depends on (``nvidia/cu13/include``), for toolkits
    that lack some of torch's headers."""
    try:
        import nvidia.cu13
    except ImportError:
        return []
    return [str(Path(p) / "include") for p in nvidia.cu13.__path__ if (Path(p) / "include").is_dir()]
