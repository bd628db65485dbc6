"""Normalise text as OpenAI's CLIP tokenizer does, and map each output character back to its source span.

Normalisation (identical to OpenAI's ``clip/simple_tokenizer.py``, in this order)::

    ftfy.fix_text -> html.unescape -> html.unescape -> str.strip
    -> regex.sub(r"\\s+", " ") -> str.strip -> str.lower

Each step records, for every output character, the span of input characters it
was produced from; the maps are composed, so every normalised character knows
its span in the original text:

* characters left unchanged map to themselves;
* a run of whitespace collapsed to ``" "`` maps to the whole run;
* lower-casing that expands a character (``"İ"`` -> ``"i̇"``) maps both output
  characters to the one input character;
* ``ftfy.fix_text`` is replayed step by step from ``ftfy.fix_and_explain``
  (same line segmentation; checked to give the same result, else the whole
  change is aligned at once).  A step that replaces matches of a pattern
  (``html.unescape``, ftfy's ``unescape_html``, ``remove_terminal_escapes``,
  ``remove_control_chars``, ligatures, widths, quotes, line breaks) is replayed
  match by match, which gives its map exactly; any other step is aligned with
  :class:`difflib.SequenceMatcher`, treating every HTML character reference
  that ``html.unescape`` would change (``&amp;``, ``&#233;`` ...) as one
  indivisible unit where the change may decode references (a ``replace`` block
  is re-aligned with its references decoded or written out, and terminal
  escapes / control characters at its ends are left out).  Replaced input (an
  entity, a mojibake sequence such as ``"Ã©"``, a ligature ``"ﬁ"``, a
  decomposed ``"e" + U+0301`` that NFC composes) maps as a whole to every
  output character that replaced it; a
  reference decoded by prefix (``"&ampx"`` -> ``"&x"``) maps its undecoded
  tail character by character.  Characters ftfy *inserts* (rare) get an empty
  span at their position; deleted characters (control characters, terminal
  escapes) map to nothing (they belong to no token).

:func:`normalize` gives the text, :func:`normalize_with_offsets` the text and
the spans; :mod:`cliplab.models.tokenizer` turns the spans of normalised
characters into the spans of BPE tokens.
"""

from __future__ import annotations

import difflib
import html
import unicodedata
from functools import lru_cache

import ftfy
import ftfy.fixes
import regex

__all__ = ["Span", "normalize", "normalize_with_offsets"]

Span = tuple[int, int]

_WS_PAT = regex.compile(r"\s+")
# what ftfy deletes: terminal escape sequences and (non-space) C0 control characters
_DELETED_PAT = regex.compile(r"\x1b\[[0-9;]*[a-zA-Z]|[\x00-\x08\x0b\x0e-\x1f\x7f]")
_NEEDS_COLLAPSE = regex.compile(r"[^\S ]|  ")  # whitespace other than isolated single spaces
# the pattern html.unescape uses to find character references
_CHARREF_PAT = regex.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


# --------------------------------------------------------------------------- maps
#
# A "map" for a string s (relative to the original text) is a pair of lists
# (starts, ends): character i of s came from original[starts[i]:ends[i]].
# None means the identity (s has the original's length and positions).

def _compose(prev, local: list[Span], prev_len: int):
    """Compose a stage map ``local`` (spans into the previous string) with ``prev``."""
    if prev is None:
        return [s for s, _ in local], [e for _, e in local]
    ps, pe = prev
    starts, ends = [], []
    for s, e in local:
        if e > s:
            starts.append(ps[s])
            ends.append(pe[e - 1])
        else:  # empty span: position only
            pos = ps[s] if s < prev_len else (pe[-1] if pe else 0)
            starts.append(pos)
            ends.append(pos)
    return starts, ends


def _ref_tail(unit: str, rep: str) -> int:
    """Length of the undecoded tail of a reference decoded by prefix (``"&ampx"`` -> ``"&x"``: 1)."""
    k = 0
    while k < len(rep) - 1 and k < len(unit) - 2 and unit[-1 - k] == rep[-1 - k]:
        k += 1
    return k


def _unit_map(span: Span, unit: str, rep: str) -> list[Span]:
    """Spans of the characters of ``rep``, which replaces the reference ``unit`` at ``span``.

    The decoded part maps to the whole reference, an undecoded tail (a reference
    decoded by prefix, ``"&ampx"`` -> ``"&x"``) character by character.
    """
    k = _ref_tail(unit, rep) if len(unit) > 1 and rep else 0
    a, b = span
    return [(a, b - k)] * (len(rep) - k) + [(b - k + t, b - k + t + 1) for t in range(k)]


def _align_sub(before: str, after: str, pattern, repl, refs: bool = False) -> list[Span] | None:
    """Exact map of a step that replaces each match of ``pattern`` by ``repl(match text)``.

    ``after`` must be ``before`` with every (non-overlapping, left to right)
    match replaced: a replaced match maps as a whole to each character that
    replaces it (nothing, for a deletion), everything else one to one.  With
    ``refs`` the matches are character references (``html.unescape``, ftfy's
    ``unescape_html``), so an undecoded tail maps character by character.  None if
    ``after`` is not that (the caller then aligns with :func:`_align`).
    """
    out: list[Span] = []
    pieces: list[str] = []
    last = 0
    for m in pattern.finditer(before):
        a, b = m.span()
        unit = m.group()
        rep = repl(unit)
        if rep == unit:
            continue
        pieces.append(before[last:a])
        out.extend((k, k + 1) for k in range(last, a))
        pieces.append(rep)
        out.extend(_unit_map((a, b), unit, rep) if refs else [(a, b)] * len(rep))
        last = b
    pieces.append(before[last:])
    out.extend((k, k + 1) for k in range(last, len(before)))
    if "".join(pieces) != after or len(out) != len(after):
        return None
    return out


def _table_rule(table):
    pat = regex.compile("[" + "".join(regex.escape(chr(k)) for k in sorted(table)) + "]")
    return pat, lambda u: u.translate(table), False


@lru_cache(maxsize=1)
def _ftfy_rules() -> dict:
    """ftfy steps (``("apply", name)``) replayable match by match: name -> (pattern, repl, refs).

    Each rule mirrors the step's own code; :func:`_align_sub` checks that it
    reproduces the step's output, else the step is aligned with :func:`_align`.
    """
    fx = ftfy.fixes
    makers = {
        "unescape_html": lambda: (fx.HTML_ENTITY_RE, fx.unescape_html, True),
        "remove_terminal_escapes": lambda: (fx.ANSI_RE, lambda u: "", False),
        "remove_control_chars": lambda: _table_rule(fx.CONTROL_CHARS),
        "fix_latin_ligatures": lambda: _table_rule(fx.LIGATURES),
        "fix_character_width": lambda: _table_rule(fx.WIDTH_MAP),
        "uncurl_quotes": lambda: (
            regex.compile(f"{fx.SINGLE_QUOTE_RE.pattern}|{fx.DOUBLE_QUOTE_RE.pattern}"),
            fx.uncurl_quotes,
            False,
        ),
        "fix_line_breaks": lambda: (regex.compile("\r\n|[\r\u2028\u2029\u0085]"), lambda u: "\n", False),
    }
    rules = {}
    for name, make in makers.items():
        try:
            rules[name] = make()
        except Exception:  # pragma: no cover - another ftfy version: align generically
            pass
    return rules


def _replace_block(seq: list[str], spans: list[Span], rep: str) -> list[Span]:
    """Spans for ``rep``, which replaces the units/characters ``seq`` (a ``replace`` opcode).

    The block is re-aligned with each reference written out, decoded and
    literally, so that characters the step deletes (control characters, terminal
    escapes) or keeps (spaces, an unchanged reference) do not join a replaced
    group; a reference must match as a whole.  Without any such match, every
    character of ``rep`` maps to the whole block.
    """
    best: list[Span] | None = None
    best_score = 0
    if len(seq) > 1 or len(seq[0]) > 1:
        for decoded in (True, False):
            flat: list[str] = []
            owner: list[int] = []  # element of `seq` each flat character comes from
            fspan: list[Span] = []
            for idx, e in enumerate(seq):
                a = spans[idx][0]
                if decoded and len(e) > 1:
                    d = html.unescape(e)
                    fspan.extend(_unit_map(spans[idx], e, d))
                else:  # a character, or a reference written out literally
                    d = e
                    fspan.extend((a + t, a + t + 1) for t in range(len(e)))
                flat.extend(d)
                owner.extend([idx] * len(d))
            sm = difflib.SequenceMatcher(None, flat, list(rep), autojunk=False)
            ops = sm.get_opcodes()
            nf = len(flat)
            whole = all(
                (i1 == 0 or owner[i1 - 1] != owner[i1]) and (i2 == nf or owner[i2 - 1] != owner[i2])
                for tag, i1, i2, _, _ in ops
                if tag != "insert"
            )
            score = sum(i2 - i1 for tag, i1, i2, _, _ in ops if tag == "equal")
            if not whole or score <= best_score:
                continue
            out: list[Span] = []
            for tag, i1, i2, j1, j2 in ops:
                if tag == "equal":
                    out.extend(fspan[i1:i2])
                elif tag == "replace":
                    e1, e2 = owner[i1], owner[i2 - 1] + 1
                    out.extend(_replace_block_whole(seq[e1:e2], spans[e1:e2], rep[j1:j2]))
                elif tag == "insert":
                    pos = fspan[i1][0] if i1 < nf else spans[-1][1]
                    out.extend([(pos, pos)] * (j2 - j1))
            best, best_score = out, score
    if best is not None:
        return best
    return _replace_block_whole(seq, spans, rep)


def _replace_block_whole(seq: list[str], spans: list[Span], rep: str) -> list[Span]:
    """Every character of ``rep`` maps to the whole block, less deleted ends.

    Terminal escapes and C0 control characters at either end of the block are
    deleted by ftfy, so they are left out of the span.
    """
    if len(seq) == 1 and len(seq[0]) > 1 and html.unescape(seq[0]) == rep:
        return _unit_map(spans[0], seq[0], rep)
    n = len(seq)
    deleted = [False] * n
    i = 0
    while i < n:  # runs of single characters (references never hold escapes)
        j = i
        while j < n and len(seq[j]) == 1:
            j += 1
        if j > i:
            for m in _DELETED_PAT.finditer("".join(seq[i:j])):
                if m.group() not in rep:
                    deleted[i + m.start() : i + m.end()] = [True] * (m.end() - m.start())
        i = j + 1
    lo, hi = 0, n
    while lo < hi and deleted[lo]:
        lo += 1
    while hi > lo and deleted[hi - 1]:
        hi -= 1
    if lo == hi:
        lo, hi = 0, n
    return [(spans[lo][0], spans[hi - 1][1])] * len(rep)


def _align(before: str, after: str, units: bool = True) -> list[Span]:
    """Span in ``before`` of each character of ``after`` (see module docstring).

    With ``units``, every character reference that ``html.unescape`` would change
    is one indivisible unit (for a change that may decode references).
    """
    nb, na = len(before), len(after)
    # character references that html.unescape would change are indivisible units
    units_ = (
        [m.span() for m in _CHARREF_PAT.finditer(before) if html.unescape(m.group()) != m.group()]
        if units and "&" in before
        else []
    )
    # common prefix / suffix, never cutting through a unit
    p = 0
    lim = min(nb, na)
    while p < lim and before[p] == after[p]:
        p += 1
    q = 0
    while q < lim - p and before[nb - 1 - q] == after[na - 1 - q]:
        q += 1
    cut = nb - q
    if units_:
        # keep every unit in the middle part, so that each aligns as a whole
        # (the prefix/suffix trimming is only a shortcut)
        p = min(p, units_[0][0])
        cut = max(cut, units_[-1][1])
    q = nb - cut
    # units of the middle of `before`
    seq_b: list[str] = []
    spans_b: list[Span] = []
    i = p
    u = iter(units_)
    nxt = next(u, None)
    while nxt is not None and nxt[0] < p:
        nxt = next(u, None)
    end_b = nb - q
    while i < end_b:
        if nxt is not None and nxt[0] == i and nxt[1] <= end_b:
            seq_b.append(before[nxt[0] : nxt[1]])
            spans_b.append(nxt)
            i = nxt[1]
            nxt = next(u, None)
        else:
            seq_b.append(before[i])
            spans_b.append((i, i + 1))
            i += 1
            while nxt is not None and nxt[0] < i:
                nxt = next(u, None)
    mid_a = after[p : na - q]
    out: list[Span] = [(k, k + 1) for k in range(p)]
    sm = difflib.SequenceMatcher(None, seq_b, list(mid_a), autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            out.extend(spans_b[i1:i2])
        elif tag == "replace":
            out.extend(_replace_block(seq_b[i1:i2], spans_b[i1:i2], mid_a[j1:j2]))
        elif tag == "insert":
            pos = spans_b[i1][0] if i1 < len(spans_b) else end_b
            out.extend([(pos, pos)] * (j2 - j1))
        # delete: nothing in `after`
    out.extend((nb - q + k, nb - q + k + 1) for k in range(q))
    assert len(out) == na
    return out


def _chain(first: list[Span] | None, second: list[Span], first_src_len: int) -> list[Span]:
    """Compose local maps: ``second`` indexes the output of ``first``."""
    if first is None:
        return second
    out: list[Span] = []
    for s, e in second:
        if e > s:
            out.append((first[s][0], first[e - 1][1]))
        else:
            pos = first[s][0] if s < len(first) else first_src_len
            out.append((pos, pos))
    return out


def _ftfy_plan_groups(plan):
    """Split an ftfy plan into str -> str groups (an encode ... decode run is one group)."""
    group = []
    for step in plan:
        group.append(step)
        if step[0] in ("apply", "normalize", "decode"):
            yield group
            group = []
    if group:
        raise ValueError(f"incomplete ftfy plan {plan!r}")


def _ftfy_replay(text: str) -> tuple[str, list[Span]]:
    """``ftfy.fix_text`` replayed step by step (same segmentation), aligning each step.

    Aligning each step separately keeps e.g. a ligature fix and a mojibake fix in
    one word apart, instead of aligning the whole change at once.
    """
    config = ftfy.TextFixerConfig(explain=True)
    out: list[str] = []
    local: list[Span] = []
    pos = 0
    while pos < len(text):
        brk = text.find("\n", pos) + 1
        if brk == 0:
            brk = len(text)
        if brk - pos > config.max_decode_length:
            brk = pos + config.max_decode_length
        segment = text[pos:brk]
        if config.unescape_html == "auto" and "<" in segment:
            config = config._replace(unescape_html=False)
        fixed, plan = ftfy.fix_and_explain(segment, config)
        seg_map: list[Span] | None = None
        cur = segment
        try:
            for group in _ftfy_plan_groups(plan or []):
                if group[0][0] == "normalize":
                    nxt = unicodedata.normalize(group[0][1], cur)
                else:
                    nxt = ftfy.apply_plan(cur, group)
                if nxt != cur:
                    step: list[Span] | None = None
                    rule = _ftfy_rules().get(group[0][1]) if len(group) == 1 and group[0][0] == "apply" else None
                    if rule is not None:  # replay the step match by match (exact)
                        step = _align_sub(cur, nxt, *rule)
                    if step is None:
                        # only unescape_html decodes character references; other
                        # steps are aligned character by character (an "&amp;"
                        # they keep maps to itself instead of joining a change)
                        step = _align(cur, nxt, units=group == [("apply", "unescape_html")])
                    seg_map = _chain(seg_map, step, len(segment))
                    cur = nxt
        except Exception:  # unknown plan step: align the segment as a whole
            cur = None
        if cur != fixed:
            seg_map = _align(segment, fixed)
        elif seg_map is None:
            seg_map = [(k, k + 1) for k in range(len(segment))]
        out.append(fixed)
        local.extend((a + pos, b + pos) for a, b in seg_map)
        pos = brk
    return "".join(out), local


def _ftfy_local(text: str) -> tuple[str, list[Span] | None]:
    fixed = ftfy.fix_text(text)
    if fixed == text:
        return text, None
    try:
        replayed, local = _ftfy_replay(text)
    except Exception:
        replayed, local = None, None
    if replayed != fixed or local is None or len(local) != len(fixed):
        local = _align(text, fixed)
    return fixed, local


def _strip_local(s: str) -> tuple[str, list[Span] | None]:
    t = s.strip()
    if len(t) == len(s):
        return s, None
    off = len(s) - len(s.lstrip())
    return t, [(off + k, off + k + 1) for k in range(len(t))]


def _collapse_local(s: str) -> tuple[str, list[Span] | None]:
    if _NEEDS_COLLAPSE.search(s) is None:
        return s, None
    pieces: list[str] = []
    local: list[Span] = []
    last = 0
    changed = False
    for m in _WS_PAT.finditer(s):
        a, b = m.span()
        if b - a == 1 and s[a] == " ":
            continue
        changed = True
        pieces.append(s[last:a])
        local.extend((k, k + 1) for k in range(last, a))
        pieces.append(" ")
        local.append((a, b))
        last = b
    if not changed:
        return s, None
    pieces.append(s[last:])
    local.extend((k, k + 1) for k in range(last, len(s)))
    return "".join(pieces), local


def _lower_local(s: str) -> tuple[str, list[Span] | None]:
    low = s.lower()
    if len(low) == len(s):
        return low, None
    local: list[Span] = []
    for k, c in enumerate(s):
        local.extend([(k, k + 1)] * len(c.lower()))
    if len(local) != len(low):  # pragma: no cover - would need a context-dependent expansion
        return low, _align(s, low)
    return low, local


def normalize_map(text: str):
    """Normalised text and its map (None = identity) to ``text``."""
    cur = text
    cmap = None

    def apply(new: str, local):
        nonlocal cur, cmap
        if local is not None:
            cmap = _compose(cmap, local, len(cur))
        cur = new

    apply(*_ftfy_local(cur))
    for _ in range(2):
        if "&" in cur:
            un = html.unescape(cur)
            if un != cur:
                local = _align_sub(cur, un, _CHARREF_PAT, html.unescape, refs=True)
                apply(un, local if local is not None else _align(cur, un))
    apply(*_strip_local(cur))
    apply(*_collapse_local(cur))
    apply(*_strip_local(cur))
    apply(*_lower_local(cur))
    return cur, cmap


def normalize(text: str) -> str:
    """OpenAI CLIP text normalisation (ftfy, html unescape x2, whitespace, lower)."""
    return normalize_map(text)[0]


def normalize_with_offsets(text: str) -> tuple[str, list[Span]]:
    """Normalised text and, for each of its characters, the span of ``text`` it came from."""
    norm, cmap = normalize_map(text)
    if cmap is None:
        return norm, [(k, k + 1) for k in range(len(norm))]
    return norm, list(zip(cmap[0], cmap[1]))
