"""The command line of every ``python -m hrdecoder_jax.<command>``: one flag syntax, one error format.

Every command takes absl-style flags (``--flag=value`` or ``--flag value``; ``--a-b`` and ``--a_b`` are the
same flag) and, where it needs one, ``--config file.py[:variant]`` with ``--config.field=value`` overrides
(ml_collections). ``--help`` lists the flags. An expected failure (a bad flag or config value, a missing or
corrupt file, an unusable checkpoint or dataset, a full disk, a locked workdir) ends the command with one
line ``error: <what>`` on stderr and a non-zero status (2 for bad flags, 1 otherwise, 130 for Ctrl-C);
``--verbose`` adds the traceback and the libraries' INFO logs.

A command module defines ``define_flags(flag_values)`` and ``run(flag_values) -> int`` and calls
``cli.main(...)``; ``parse(...)`` parses without running (the README test checks documented commands so).
"""
from __future__ import annotations

import errno
import importlib
import os
import sys
import traceback
from typing import Callable, Sequence

from absl import flags

from hrdecoder_jax.errors import CommandError, ExpectedError

CHECKPOINT_CHOICES = "'latest', 'best' or a step number"


def _normalise(argv: Sequence[str]) -> list[str]:
    """``--a-b=c`` -> ``--a_b=c`` (not for ``--config.x`` overrides, whose names are config fields)."""
    out = []
    for a in argv:
        if a.startswith("--") and not a.startswith("--config.") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


class _QuietLibraries:
    """A logging filter: drop the records of Orbax/TensorStore and tfds' chatter (``--verbose`` shows them)."""

    QUIET = ("/orbax/", "/tensorstore/", "/tensorflow_datasets/")

    def filter(self, record) -> bool:
        return not any(q in (record.pathname or "") for q in self.QUIET)


def define_checkpoint_flag(fv: flags.FlagValues, default: str = "latest") -> None:
    """``--checkpoint best|latest|STEP``, validated at parse time."""
    flags.DEFINE_string("checkpoint", default, f"Which checkpoint: {CHECKPOINT_CHOICES}.", flag_values=fv)
    flags.register_validator("checkpoint", lambda v: v in ("latest", "best") or str(v).isdigit(),
                             message=f"--checkpoint must be {CHECKPOINT_CHOICES}", flag_values=fv)


def checkpoint_choice(value: str) -> str | int:
    """The parsed ``--checkpoint``: 'latest', 'best' or an int step."""
    return int(value) if str(value).isdigit() else str(value)


def parse(name: str, define: Callable[[flags.FlagValues], None], argv: Sequence[str], *,
          config: bool = True) -> flags.FlagValues:
    """Parse ``argv`` (the arguments, without the program name) for command ``name``; raises
    ``flags.Error`` (or the config loader's error) for a bad flag. Nothing else happens."""
    argv = _normalise(argv)
    fv = flags.FlagValues()
    if config:
        from ml_collections import config_flags
        # sys_argv: the --config.x=y overrides are defined from the command line being parsed.
        config_flags.DEFINE_config_file("config", None, "Config file, configs/NAME.py[:variant]; override any "
                                        "field with --config.FIELD=VALUE.", flag_values=fv, lock_config=True,
                                        sys_argv=[name, *argv])
        flags.mark_flag_as_required("config", flag_values=fv)
    flags.DEFINE_bool("verbose", False, "On an error also print the traceback; show INFO logs.", flag_values=fv)
    define(fv)
    spec = _config_spec(argv) if config else None
    try:
        rest = fv([name, *argv])
    except Exception as e:  # noqa: BLE001 - the config file runs while the flags are parsed
        _raise_config_file_error(e, spec)
        raise
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments: {' '.join(rest[1:])}")
    if config:
        path = fv["config"].config_filename
        if not os.path.isfile(path.split(":")[0]):
            raise flags.Error(f"--config={path}: no such config file")
        try:
            fv.config     # ml_collections loads lazily; a broken file should fail here, not mid-run
        except Exception as e:  # noqa: BLE001 - whatever the file raised, one line naming it
            _raise_config_file_error(e, path)
            cause = e.__cause__ or e.__context__ or e
            raise flags.Error(f"--config={path}: cannot load it ({type(cause).__name__}: "
                              f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''})") from None
    return fv


def _config_spec(argv: Sequence[str]) -> str | None:
    """The ``--config`` value of ``argv`` (``file.py[:variant]``), if any."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _raise_config_file_error(e: BaseException, spec: str | None) -> None:
    """If ``e`` was raised by the code of the config file ``spec`` (a syntax error, a wrong name, an
    exception in ``get_config``), raise ``flags.Error`` naming the file and line instead."""
    if not spec:
        return
    path = os.path.abspath(spec.split(":")[0])
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        line = None
        if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
            line = e.lineno
        else:
            for frame, lineno in traceback.walk_tb(e.__traceback__):
                if os.path.abspath(frame.f_code.co_filename) == path:
                    line = lineno
        if line is not None:
            text = (e.msg if isinstance(e, SyntaxError) else str(e)).strip().splitlines()
            raise flags.Error(f"{spec.split(':')[0]}:{line}: {type(e).__name__}: {text[0] if text else ''}") from None
        e = e.__cause__ or e.__context__


def load_config(spec: str, overrides: Sequence[str] = ()):
    """``configs/x.py[:variant]`` with ``--config.a.b=value`` overrides, loaded as every command loads it."""
    return parse("config", lambda fv: None, [f"--config={spec}", *overrides]).config


def usage(name: str, doc: str, define: Callable[[flags.FlagValues], None], config: bool) -> str:
    fv = flags.FlagValues()
    if config:
        flags.DEFINE_string("config", None, "Config file, configs/NAME.py[:variant]; override any field with "
                            "--config.FIELD=VALUE.", flag_values=fv)
    flags.DEFINE_bool("verbose", False, "On an error also print the traceback; show INFO logs.", flag_values=fv)
    define(fv)
    lines = [f"python -m hrdecoder_jax.{name}", "", doc.strip(), "", "flags:"]
    for flag in sorted(fv._flags().values(), key=lambda f: f.name):
        if flag.name in ("help", "helpfull", "helpshort", "helpxml"):
            continue
        default = "" if flag.default is None else f" (default: {flag.default!r})"
        lines.append(f"  --{flag.name}: {flag.help}{default}")
    return "\n".join(lines)


def _os_error_in_chain(e: BaseException) -> OSError | None:
    """The operating-system error behind ``e`` (Orbax and TensorStore wrap them), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        if "No space left on device" in str(e):
            return OSError(errno.ENOSPC, "No space left on device")
        e = e.__cause__ or e.__context__
    return None


def describe(e: BaseException) -> str:
    """The one line an error ends with."""
    os_error = _os_error_in_chain(e)
    if os_error is not None and (isinstance(e, OSError) or os_error.errno == errno.ENOSPC):
        e = os_error
    if isinstance(e, OSError) and e.errno is not None:
        where = e.filename or ""
        what = "disk full (no space left on device)" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        return f"{what}: {where}" if where else what
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(e, EXPECTED):
        return first or type(e).__name__
    return f"{type(e).__name__}: {first} (unexpected; rerun with --verbose for the traceback)"


# Expected failures: the package's own (``errors.ExpectedError``: a bad config, checkpoint, weight file,
# dataset or workdir, a command's refusal), a NaN loss, and what the operating system refuses.
EXPECTED = (ExpectedError, FloatingPointError, OSError)


def _flag_error_text(e: BaseException) -> str:
    """One line from a flag or config-override error. ml_collections reports an unknown field as a
    KeyError whose text is the repr of a two-line message ("'totl_steps'\\nDid you mean ..."), sometimes
    wrapped once more; undo that quoting."""
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    text = text.replace("\\n", "\n").replace("\\'", "'").strip()
    lines = [line.strip() for line in text.splitlines()[:2] if line.strip()]
    if len(lines) == 2 and "Did you mean" in lines[1]:
        return f"no config field {lines[0].strip(chr(39) + chr(34))}; {lines[1].rstrip(chr(39) + chr(34))}"
    return " ".join(lines) or type(e).__name__


def main(name: str, doc: str, define: Callable[[flags.FlagValues], None], run: Callable[[flags.FlagValues], int],
         argv: Sequence[str] | None = None, *, config: bool = True, purpose: str | None = "inference",
         tensorflow: bool = True) -> int:
    """Parse, set the process up (``runtime.configure(purpose)``; ``tensorflow=False`` for a command that
    never uses it), run; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h", "--helpfull", "--helpshort") for a in argv):
        print(usage(name, doc, define, config))
        return 0
    try:
        fv = parse(name, define, argv, config=config)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError, SyntaxError, NameError,
            ImportError) as e:
        # flags.Error for bad flags; the config loader raises the others for a bad file or override.
        msg = _flag_error_text(e)
        print(f"error: {msg} (python -m hrdecoder_jax.{name} --help lists the flags)", file=sys.stderr)
        return 2
    verbose = fv.verbose
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging
    logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # Orbax logs every failure of its background threads with a traceback before raising it to us; the
        # raised error becomes the one line below, so the libraries' logs stay out of the way.
        logging.get_absl_logger().addFilter(_QuietLibraries())
    if purpose is not None:
        from hrdecoder_jax import runtime
        runtime.configure(purpose, tensorflow=tensorflow, quiet=not verbose)
    try:
        return int(run(fv) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the one place every command's errors are turned into one line
        if verbose:
            traceback.print_exc()
        problem = None
        if not isinstance(e, EXPECTED) and "jax" in sys.modules:
            from hrdecoder_jax import runtime
            problem = runtime.platform_problem()       # e.g. JAX_PLATFORMS=cuda without a GPU backend
        print(f"error: {problem or describe(e)}", file=sys.stderr, flush=True)
        return 1


def exit_process(status: int) -> None:
    """End the process with ``status`` (the ``__main__`` of every command). After a failure the process
    ends at once: the background threads of a failed save (Orbax, TensorStore) would otherwise print
    hundreds of 'Event loop is closed' tracebacks while the interpreter tears them down, burying the one
    error line. Checkpoints stay consistent: Orbax renames a save into place only when it is complete."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status:
        os._exit(status)
    sys.exit(status)


def run_as_main(module: str) -> None:
    """The ``if __name__ == "__main__"`` block of every command: run ``module``'s ``main`` as imported, not
    the ``__main__`` copy of it that ``python -m`` executes, so its error classes are the ones the rest of
    the package (and the one-line handler of ``main``) knows; then ``exit_process``."""
    exit_process(importlib.import_module(module).main())


def check_writable_dir(path: str, what: str) -> str:
    """Create ``path`` if needed and make sure a file can be written there, before any work starts;
    raises ``CommandError`` naming ``what`` (e.g. '--output') otherwise. Returns the absolute path."""
    from hrdecoder_jax.workdir import probe_writable
    path = os.path.abspath(os.path.expanduser(path))
    try:
        probe_writable(path)
    except OSError as e:
        raise CommandError(f"{what} {path} is not writable ({describe(e)})") from None
    return path
