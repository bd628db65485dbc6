"""What every command shares: the CLI grammar's options (one name and short flag per meaning, see docs/cli.md),
one-line errors, warnings on stderr, and tables.

Grammar (enforced by ``tests/test_cli_grammar.py``, which walks every command):

=====================================  ==============================================================================
``-m/--model``                         the model (default: the shipped ``shapes-tiny`` where one makes sense)
``-o/--out``                           where results go
``-k/--top-k``                         how many results
``--json``                             machine-readable output on stdout
``--progress/--no-progress``           progress on stderr (default: a bar on a terminal, a plain line otherwise)
``--set KEY=VALUE``                    options of the thing being run (repeatable; values are JSON when they parse)
``--precision fp32|bf16``              the model's compute precision
``--debug``                            (on ``cliplab`` itself) full tracebacks instead of one-line errors
=====================================  ==============================================================================

Old spellings (``--k``, ``--topk``, ``-O/--option``, ``--quiet``) still work as hidden aliases for one release.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings

import click

MODEL_HELP = ("Model: a pretrained name (cliplab models), a checkpoint file or directory, a Hugging Face hub id in the "
              "local cache, or an architecture name (seeded random weights, for smoke tests).")
DEFAULT_MODEL_HELP = MODEL_HELP + " [default: shapes-tiny, the shipped model]"


class AliasedOption(click.Option):
    """An option whose old spellings (``hidden_aliases``) still parse but are left out of ``--help``."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden_aliases = set(hidden_aliases)

    def get_help_record(self, ctx):
        saved = self.opts
        self.opts = [o for o in self.opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = saved


# --- the grammar's options ------------------------------------------------------------------------------------------
def model_option(default: str | None = None, help: str | None = None, required: bool = False):
    """``-m/--model`` (``default=None`` means the shipped model, resolved by the library), with ``--pretrained
    FILE`` for OpenCLIP's spelling (``-m ViT-B-32 --pretrained open_clip.bin``): the command receives ``model`` as a
    :class:`cliplab.pipeline.PretrainedRef` then."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, pretrained=None, **kwargs):
            if pretrained is not None:
                from ..pipeline.modelref import PretrainedRef

                if not kwargs.get("model"):
                    raise click.UsageError("--pretrained FILE needs the architecture: -m ARCH (see cliplab models)")
                kwargs["model"] = PretrainedRef(kwargs["model"], pretrained)
            return fn(*args, **kwargs)

        wrapper = click.option("--pretrained", type=click.Path(dir_okay=False), default=None,
                               help="With -m ARCH: a weights file for that architecture (OpenCLIP's "
                                    "--model ARCH --pretrained FILE).")(wrapper)
        kwargs = {"default": default} if default is not None else {}  # see out_option
        return click.option("--model", "-m", "model", required=required, help=help or DEFAULT_MODEL_HELP,
                            **kwargs)(wrapper)

    return decorate


def out_option(help: str, default: str | None = None, required: bool = False, dest: str = "out_dir"):
    """``-o/--out`` for an output directory."""
    kwargs = {"default": default, "show_default": True} if default is not None else {}  # click 8.3+: an explicit
    return click.option("--out", "-o", dest, type=click.Path(file_okay=False), required=required, help=help,  # None
                        **kwargs)  # default would count as given and switch off `required`


def top_k_option(default: int = 10, help: str = "How many results.", max_k: int | None = None):
    """``-k/--top-k`` (old spellings ``--k`` and ``--topk`` are hidden aliases)."""
    return click.option("--top-k", "-k", "--k", "--topk", "top_k", cls=AliasedOption, hidden_aliases=("--k", "--topk"),
                        type=click.IntRange(1, max_k), default=default, show_default=True, help=help)


def json_option(help: str = "Print the result as JSON on stdout."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def _quiet(ctx, param, value):
    if value:
        ctx.params["progress"] = False
    return value


def progress_option():
    """``--progress/--no-progress``: tri-state, ``None`` = a bar on a terminal, a plain line every 10 s otherwise
    (``cliplab.progress``). ``--quiet`` is a hidden alias of ``--no-progress``."""

    def decorate(fn):
        fn = click.option("--quiet", "quiet", is_flag=True, hidden=True, expose_value=False, callback=_quiet,
                          is_eager=False)(fn)
        return click.option("--progress/--no-progress", "progress", default=None,
                            help="Progress on stderr [default: a bar on a terminal, a plain line every 10 s "
                                 "otherwise].")(fn)

    return decorate


def set_option(help: str = "An option of the run (repeatable), e.g. --set limit=50; values are JSON when they "
                           "parse.", aliases: tuple[str, ...] = ()):
    """``--set KEY=VALUE`` (repeatable); ``aliases`` are old spellings kept hidden (``-O``, ``--option``)."""
    return click.option("--set", *aliases, "settings", cls=AliasedOption, hidden_aliases=aliases, multiple=True,
                        metavar="KEY=VALUE", help=help)


def precision_option(help: str = "Model compute precision: fp32 (exact) or bf16 (fast where the CPU has native "
                                 "bf16).", int8: bool = False, auto: bool = False):
    """``--precision``; ``int8=True`` (commands with ``--backend``) also offers int8 (ONNX Runtime, OpenVINO);
    ``auto=True`` (``cliplab embed``) offers and defaults to ``auto``."""
    choices = (["auto"] if auto else []) + (["fp32", "bf16", "int8"] if int8 else ["fp32", "bf16"])
    if int8:
        help = help.rstrip(".") + ("; int8: --backend onnxruntime (dynamic int8) or openvino (NNCF int8 images, "
                                   "calibrated by `cliplab embed` on its first 300 images); fidelity in "
                                   "docs/backends.md.")
    if auto:
        help += " auto: bf16 where the CPU multiplies bf16 natively (cosine to exact >= 0.9999), else fp32."
    return click.option("--precision", type=click.Choice(choices), default="auto" if auto else "fp32",
                        show_default=True, help=help)


def backend_option(auto: bool = False):
    """``--backend torch|onnxruntime|openvino``: who runs the model (docs/backends.md); ``auto=True`` (``cliplab
    embed``) offers and defaults to ``auto``."""
    choices = (["auto"] if auto else []) + ["torch", "onnxruntime", "openvino"]
    return click.option("--backend", type=click.Choice(choices), default="auto" if auto else "torch",
                        show_default=True,
                        help="Inference backend: torch (every feature), or onnxruntime / openvino on the model's ONNX "
                             "export (made on first use and cached by weight fingerprint; pip install onnxruntime "
                             "/ openvino)." + (" auto: openvino where it is installed and the job runs locally on "
                                               "the CPU without --compile, else torch; a resumed job keeps what it "
                                               "started with." if auto else ""))


def compile_option():
    """``--compile`` and ``--compile-mode``: the torch model's plain encode paths through ``torch.compile``
    (docs/fast_path.md). The command gets ``compile_model``: ``False``, ``True`` or a mode name (which implies
    ``--compile``)."""

    def remember_flag(ctx, param, flag):  # eager, so always processed before --compile-mode
        ctx.meta["cliplab.compile"] = flag

    def to_setting(ctx, param, mode):
        return mode if mode != "default" else ctx.meta.get("cliplab.compile", False)

    def decorate(f):
        f = click.option("--compile-mode", "compile_model", type=click.Choice(["default", "max-autotune"]),
                         default="default", show_default=True, callback=to_setting,
                         help="torch.compile's mode; max-autotune (implies --compile) times inductor's own AMX/AVX "
                              "matmul kernels against oneDNN per shape: a few % faster, compiling longer.")(f)
        return click.option("--compile", "compile_flag", is_flag=True, is_eager=True, expose_value=False,
                            callback=remember_flag,
                            help="Run the torch backend through torch.compile: a minute or so of compiling on first "
                                 "use, then faster on CPU at the same features (docs/fast_path.md).")(f)

    return decorate


def with_backend(net, backend: str, precision: str):
    """``net`` run by ``backend`` at ``precision`` (torch: the model itself, cast when not fp32); a combination the
    backend does not offer is a usage error naming what to use instead."""
    if backend == "torch" and precision in ("fp32", "bf16"):
        return net.set_precision(precision) if precision != "fp32" else net
    from ..export.backends import check_backend, load_backend

    try:
        check_backend(backend, precision)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--backend/--precision") from None
    return load_backend(net, backend, precision)


def parse_settings(pairs, param_hint: str = "--set") -> dict:
    """``("a=1", "b.c=x")`` -> ``{"a": 1, "b.c": "x"}``: values parsed as JSON when they parse, strings otherwise."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {p!r}", param_hint=param_hint)
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


# --- Ctrl-C ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def on_interrupt(message: str):
    """Within the block, Ctrl-C prints ``interrupted: message`` (what was kept, how to resume) and exits 130."""
    try:
        yield
    except KeyboardInterrupt as e:
        if not getattr(e, "cliplab_message", None):  # the innermost block knows best
            e.cliplab_message = message
        raise


def interrupt_message(exc: BaseException) -> str:
    return getattr(exc, "cliplab_message", None) or "nothing was saved; run the command again"


# --- output ---------------------------------------------------------------------------------------------------------
def emit(data, as_json: bool, render) -> None:
    """Print ``data`` as JSON (for scripts) or through ``render`` (for people)."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def fail(message: str, code: int = 1):
    """Stop with ``error: message`` on stderr and exit ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def warnings_to_stderr():
    """Show cliplab's user-facing warnings (random weights, truncation, ...) as one ``warning: ...`` line each,
    once per message, without file/line noise; third-party deprecation chatter is dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                msg = str(w.message)
                if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                    continue
                if msg not in seen:
                    seen.add(msg)
                    click.echo(f"warning: {msg}", err=True)


def shorten(text: str, limit: int = 80) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis (titles, table cells)."""
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


def render_table(title: str | None, columns: list[str], rows: list[list], caption: str | None = None) -> None:
    """A table on stdout: rich when installed, plain aligned text otherwise. Cells never wrap (long paths stay on
    one line; a narrow terminal scrolls instead of folding them)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is optional
        if title:
            click.echo(title)
        widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c))
                  for i, c in enumerate(columns)]
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for r in rows:
            click.echo("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
        if caption:
            click.echo(caption)
        return
    table = Table(title=title, caption=caption, show_lines=False)
    for c in columns:
        table.add_column(c, no_wrap=True, overflow="ignore",
                         justify="right" if c in ("#", "rank", "score", "prob") else "left")
    for r in rows:
        table.add_row(*[str(v) for v in r])
    Console(soft_wrap=True, width=10_000 if not sys.stdout.isatty() else None).print(table)
