"""The run report: one self-contained ``report.html`` drawn from a run folder.

A run of ``contrastkit train`` leaves a folder (see :mod:`contrastkit.training.run_folder`)
with ``config.yaml``, ``metrics.jsonl``, ``metrics.json`` and ``per_query.json``.
:func:`write_report` reads them and writes ``report.html`` next to them: one file, figures
embedded as base64 PNG (matplotlib, Agg backend), inline CSS, no script, no external
reference, so it opens offline and can be mailed or archived as is. It answers a retrieval
engineer's four questions:

- *did my model get better?* test nDCG@10 (and every other metric) before -> after;
- *is it real?* the paired-bootstrap 95% interval of the difference (Efron & Tibshirani
  1993; Sakai, SIGIR 2006) and whether it excludes 0, and the per-query differences
  (how many queries improved, stayed, got worse);
- *did it forget anything?* STS Spearman before -> after, flagged when it fell by more
  than 2 points;
- *where did the time go?* wall time per phase.

plus the dev curve with the best step, the training loss, the weight-interpolation curve
with the chosen ``a``, the hard-negative mining statistics, the environment and the
resolved configuration. Every number on the page is read from the files; a part the run
did not produce (no STS, no interpolation, no mining, no test split) is left out with a
one-line note, never invented. All text is escaped (:func:`html.escape`). Numbers that
disagree with each other (an interval whose mean is not ``after - before``, per-query
scores whose mean is not the summary's) are shown with a warning at the top.

Example::

    import json, tempfile, pathlib
    from contrastkit.diagnostics import write_report
    run = pathlib.Path(tempfile.mkdtemp())          # a run folder of `contrastkit train`
    (run / "metrics.json").write_text(json.dumps({"before": {"ndcg@10": 0.64}, "after": {"ndcg@10": 0.70}}))
    path = write_report(run)                        # run / "report.html"
    assert "0.64" in path.read_text()
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["RunData", "read_run", "render_report", "write_report", "STS_DROP_POINTS"]

STS_DROP_POINTS = 2.0  # an STS Spearman fall larger than this many points (x100) is flagged
_CONSISTENCY_TOL = 1e-6
_HEADLINE_METRIC = "ndcg@10"
_BAR_METRICS = ("ndcg@10", "mrr@10", "recall@100")
_METRIC_ORDER = ("ndcg", "mrr", "recall", "map", "precision", "accuracy")
_METRIC_RE = re.compile(r"^([A-Za-z_]+)@(\d+)$")
_CORRELATIONS = ("spearman", "pearson")


# --------------------------------------------------------------------------- reading


@dataclass
class RunData:
    """What a run folder holds, as read by :func:`read_run` (nothing derived yet).

    Attributes:
        path: the run folder.
        summary: ``metrics.json`` (``{}`` when the file is absent: an unfinished run).
        records: the records of ``metrics.jsonl`` in file order (``[]`` when absent).
        config_text: the text of ``config.yaml`` (``None`` when absent).
        per_query: ``per_query.json`` (``None`` when absent).
        notes: problems met while reading that did not stop it (shown on the page).
    """

    path: Path
    summary: Dict[str, Any] = field(default_factory=dict)
    records: List[Dict[str, Any]] = field(default_factory=list)
    config_text: Optional[str] = None
    per_query: Optional[Dict[str, Any]] = None
    notes: List[str] = field(default_factory=list)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def read_run(run_dir: Union[str, Path]) -> RunData:
    """Read a run folder (``metrics.json``, ``metrics.jsonl``, ``config.yaml``, ``per_query.json``).

    Raises ``ValueError`` naming the file (and line) when the folder holds neither
    ``metrics.json`` nor ``metrics.jsonl``, when a file is not valid JSON, when a
    ``metrics.jsonl`` record is not an object with a string ``"phase"``, or when
    ``per_query.json`` is malformed (field named). The one tolerated defect is an
    incomplete *last* line of ``metrics.jsonl`` (a run stopped while writing it): it is
    left out and said so in :attr:`RunData.notes`.

    Example::

        import json, tempfile, pathlib
        from contrastkit.diagnostics import read_run
        run_dir = pathlib.Path(tempfile.mkdtemp())
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in [
            {"phase": "dev", "step": 100, "ndcg@10": 0.66}, {"phase": "dev", "step": 200, "ndcg@10": 0.69}]))
        run = read_run(run_dir)
        assert [r["ndcg@10"] for r in run.records if r["phase"] == "dev"] == [0.66, 0.69]
    """
    p = Path(run_dir)
    if not p.is_dir():
        raise ValueError(f"run folder {p} does not exist or is not a folder")
    run = RunData(path=p)
    summary_path, jsonl_path = p / "metrics.json", p / "metrics.jsonl"
    if not summary_path.is_file() and not jsonl_path.is_file():
        raise ValueError(f"{p} is not a run folder: it holds neither metrics.json nor metrics.jsonl")
    if summary_path.is_file():
        summary = _load_json(summary_path)
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path}: expected a JSON object, got {type(summary).__name__}")
        run.summary = summary
    else:
        run.notes.append("metrics.json is missing (the run did not finish?): the page shows what metrics.jsonl "
                         "holds so far.")
    if jsonl_path.is_file():
        text = jsonl_path.read_text(encoding="utf-8")
        lines = text.split("\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                if i == last and not text.endswith("\n"):
                    run.notes.append(f"metrics.jsonl:{i + 1}: incomplete last record (the run stopped while "
                                     "writing it?), left out.")
                    continue
                raise ValueError(f"{jsonl_path}:{i + 1}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("phase"), str):
                raise ValueError(f"{jsonl_path}:{i + 1}: each record must be a JSON object with a string "
                                 f"\"phase\", got {line.strip()[:80]!r}")
            rec["_line"] = i + 1
            run.records.append(rec)
    cfg = p / "config.yaml"
    if cfg.is_file():
        run.config_text = cfg.read_text(encoding="utf-8")
    pq_path = p / "per_query.json"
    if pq_path.is_file():
        pq = _load_json(pq_path)
        if not isinstance(pq, dict):
            raise ValueError(f"{pq_path}: expected a JSON object, got {type(pq).__name__}")
        for key in ("query_ids", "before", "after"):
            if not isinstance(pq.get(key), list):
                raise ValueError(f"{pq_path}: field {key!r} must be a list (one entry per query)")
        if not isinstance(pq.get("metric", _HEADLINE_METRIC), str):
            raise ValueError(f"{pq_path}: field 'metric' must be a string such as 'ndcg@10'")
        n = len(pq["query_ids"])
        for key in ("before", "after"):
            if len(pq[key]) != n:
                raise ValueError(f"{pq_path}: field {key!r} has {len(pq[key])} entries for {n} query_ids")
            bad = next((j for j, v in enumerate(pq[key]) if not _is_num(v) or not math.isfinite(v)), None)
            if bad is not None:
                raise ValueError(f"{pq_path}: {key}[{bad}] must be a finite number, got {pq[key][bad]!r}")
        run.per_query = pq
    return run


# --------------------------------------------------------------------------- formatting


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(x: Any, nd: int = 4) -> str:
    if not _is_num(x):
        return _e(x)
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:.{nd}f}"


def _sf(x: float, nd: int = 4) -> str:
    return _f(x, nd) if not _is_num(x) or not math.isfinite(x) else f"{x:+.{nd}f}"


def _p(x: float) -> str:
    if not _is_num(x):
        return _e(x)
    return "&lt; 0.0001" if x < 1e-4 else f"{x:.4f}"


def _secs(s: float) -> str:
    if not _is_num(s) or not math.isfinite(s):
        return _f(s)
    if s < 60:
        return f"{s:.1f} s"
    m, r = divmod(int(round(s)), 60)
    return f"{s:.1f} s ({m} min {r:02d} s)" if m < 60 else f"{s:.1f} s ({m // 60} h {m % 60:02d} min)"


def _sign_class(d: float) -> str:
    if not _is_num(d) or not math.isfinite(d) or d == 0:
        return "neutral"
    return "better" if d > 0 else "worse"


def _num(d: Dict[str, Any], key: str, where: str) -> float:
    v = d.get(key)
    if not _is_num(v):
        raise ValueError(f"metrics.json: {where}.{key} must be a number, got {v!r}")
    return float(v)


def _obj(d: Any, key: str, where: str) -> Optional[Dict[str, Any]]:
    v = d.get(key) if isinstance(d, dict) else None
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"metrics.json: {where + '.' if where else ''}{key} must be an object, got "
                         f"{type(v).__name__}")
    return v


def _metric_key(name: str) -> Tuple[int, str, int]:
    m = _METRIC_RE.match(name)
    base, k = (m.group(1).lower(), int(m.group(2))) if m else (name.lower(), 0)
    rank = _METRIC_ORDER.index(base) if base in _METRIC_ORDER else len(_METRIC_ORDER)
    return rank, base, k


def _metric_names(before: Dict[str, Any], after: Dict[str, Any]) -> List[str]:
    names = [k for k in before if _METRIC_RE.match(k) and k in after]
    return sorted(names, key=_metric_key)


def _label(metric: str) -> str:
    m = _METRIC_RE.match(metric)
    if not m:
        return {"spearman": "Spearman", "pearson": "Pearson"}.get(metric, metric)
    base = {"ndcg": "nDCG", "mrr": "MRR", "recall": "Recall", "map": "MAP", "precision": "P",
            "accuracy": "Accuracy"}.get(
        m.group(1).lower(), m.group(1))
    return f"{base}@{m.group(2)}"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _img(png: bytes, alt: str) -> str:
    from .figures import png_data_uri

    return f'<img class="fig" src="{png_data_uri(png)}" alt="{_e(alt)}">'


def _table(header: Optional[Sequence[str]], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """Rows of already-escaped cell HTML (a cell may be ``(html, class)``); no header row
    when ``header`` is None."""
    out = [f'<table class="{cls}">']
    if header is not None:
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = []
        for c in row:
            if isinstance(c, tuple):
                cells.append(f'<td class="{c[1]}">{c[0]}</td>')
            else:
                cells.append(f"<td>{c}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _dedupe_by_step(recs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Keep the last record per step (a resumed run logs the steps after its checkpoint
    again), in step order."""
    by_step: Dict[int, Dict[str, Any]] = {}
    for r in recs:
        by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


# --------------------------------------------------------------------------- the page


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"DejaVu Sans",sans-serif;color:#24292f;
background:#fff;margin:0;line-height:1.45;font-size:15px}
main{max-width:1080px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:19px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:34px}
h3{font-size:15px;margin:18px 0 6px}
.sub{color:#57606a;margin:0 0 14px}
nav{font-size:13px;margin:8px 0 18px;color:#57606a}
nav a{color:#0969da;text-decoration:none;margin-right:12px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:14px}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:right;font-variant-numeric:tabular-nums}
th{background:#f6f8fa;font-weight:600}
td:first-child,th:first-child{text-align:left}
table.kv td:first-child{color:#57606a}
table.kv td{text-align:left}
.better{color:#1a7f37;font-weight:600}
.worse{color:#cf222e;font-weight:600}
.neutral{color:#57606a}
.cards{display:flex;gap:16px;flex-wrap:wrap}
.cards + .sub{margin-top:10px}
.card{border:1px solid #d0d7de;border-radius:8px;padding:14px 18px;flex:1 1 300px;background:#fcfdfe}
.card .big{font-size:24px;font-weight:600;margin:4px 0;font-variant-numeric:tabular-nums}
.card.good{border-left:6px solid #1a7f37}
.card.bad{border-left:6px solid #cf222e}
.card.flat{border-left:6px solid #8c959f}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600;color:#fff}
.badge.better{background:#1a7f37;color:#fff}
.badge.worse{background:#cf222e;color:#fff}
.badge.neutral{background:#8c959f;color:#fff}
.note{color:#57606a;font-style:italic;margin:6px 0}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 14px;margin:12px 0}
.warn li{margin:2px 0}
.notes{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;margin:12px 0}
img.fig{max-width:100%;display:block;margin:8px 0 4px}
.caption{color:#57606a;font-size:13px;margin:0 0 12px}
details{margin:8px 0}
summary{cursor:pointer;color:#0969da}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:10px 14px;overflow:auto;font-size:13px;
font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,"DejaVu Sans Mono",monospace}
"""


class _Page:
    def __init__(self, run: RunData) -> None:
        self.run = run
        self.s = run.summary
        self.warnings: List[str] = list(run.notes)
        self.sections: List[Tuple[str, str, str]] = []  # (id, title, html)
        self.by_phase: Dict[str, List[Dict[str, Any]]] = {}
        for r in run.records:
            self.by_phase.setdefault(r["phase"], []).append(r)
        self.test_split = str(self.s.get("test_split", "test"))
        self.before, self.after = self._before_after()
        self.difference = _obj(self.s, "difference", "") or {}
        self._config: Optional[Dict[str, Any]] = None

    # ---- data helpers

    def _before_after(self) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
        before, after = _obj(self.s, "before", ""), _obj(self.s, "after", "")
        where = {"before": "metrics.json: before", "after": "metrics.json: after"}
        if before is None and after is None:
            # an unfinished run: the records, if the evaluations were logged
            for phase in ("before", "after"):
                recs = [r for r in self.by_phase.get(phase, []) if str(r.get("split", "test")) == self.test_split]
                if recs:
                    rec = {k: v for k, v in recs[-1].items() if k not in ("time", "phase", "split", "_line")}
                    where[phase] = f"metrics.jsonl:{recs[-1]['_line']}: {phase}"
                    if phase == "before":
                        before = rec
                    else:
                        after = rec
        for name, d in (("before", before), ("after", after)):
            for k, v in (d or {}).items():
                if _METRIC_RE.match(k) and not _is_num(v):
                    raise ValueError(f"{where[name]}.{k} must be a number, got {v!r}")
        return before, after

    def interval(self, metric: str) -> Optional[Dict[str, float]]:
        d = _obj(self.difference, metric, "difference")
        if d is None:
            return None
        where = f"difference.{metric}"
        out = {k: _num(d, k, where) for k in ("mean_diff", "low", "high")}
        out["p_value"] = _num(d, "p_value", where) if "p_value" in d else float("nan")
        out["confidence"] = _num(d, "confidence", where) if "confidence" in d else 0.95
        if out["low"] > out["high"]:
            raise ValueError(f"metrics.json: {where}: low {out['low']} is above high {out['high']}")
        return out

    def select_metric(self) -> str:
        """The dev metric the run selected on: metrics.json's dev.metric or dev.interpolation.metric,
        else config.yaml's evaluation.select_metric, else nDCG@10."""
        dev = _obj(self.s, "dev", "") or {}
        interp = _obj(dev, "interpolation", "dev") or {}
        for v in (dev.get("metric"), interp.get("metric"), self.config_value("evaluation", "select_metric")):
            if isinstance(v, str) and v:
                return v
        return _HEADLINE_METRIC

    def config_value(self, *keys: str) -> Any:
        if self._config is None:
            self._config = {}
            if self.run.config_text is not None:
                import yaml

                try:
                    cfg = yaml.safe_load(self.run.config_text)
                except yaml.YAMLError as err:
                    self.warnings.append(f"config.yaml is not valid YAML ({str(err).splitlines()[0]}).")
                    cfg = None
                self._config = cfg if isinstance(cfg, dict) else {}
        v: Any = self._config
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    def add(self, sid: str, title: str, body: str) -> None:
        self.sections.append((sid, title, body))

    # ---- sections

    def headline(self) -> None:
        s, b, a = self.s, self.before, self.after
        cards, facts = [], []
        m = _HEADLINE_METRIC
        if b is not None and a is not None and not _metric_names(b, a):
            recipe = f" (recipe {s['recipe']})" if isinstance(s.get("recipe"), str) else ""
            why = f"This run{recipe} measured no retrieval metric: its before / after test numbers are the STS ones."
            cards.append(f'<div class="card flat"><div>Retrieval</div>{_note(why)}</div>')
        elif b is None or a is None or m not in b or m not in a:
            if b is None and a is None:
                why = "No before / after evaluation on a test split in this run: nothing to compare."
            else:
                gone = [n for n, d in (("before", b), ("after", a)) if d is None or m not in d]
                why = f"No {' or '.join(gone)} {_label(m)} on the test split in this run: nothing to compare."
            cards.append(f'<div class="card flat"><div>Test {_e(_label(m))}</div>{_note(why)}</div>')
        else:
            bv, av = float(b[m]), float(a[m])
            diff = av - bv
            iv = self.interval(m)
            if iv is None:
                verdict, cls = "no interval was computed: whether the change is real is not known", "flat"
                detail = ""
            else:
                conf = f"{100 * iv['confidence']:g}%"
                if iv["low"] > 0:
                    verdict, cls = f"the {conf} interval excludes 0: a real improvement", "good"
                elif iv["high"] < 0:
                    verdict, cls = f"the {conf} interval excludes 0: a real regression", "bad"
                else:
                    verdict, cls = f"the {conf} interval includes 0: not distinguishable from no change", "flat"
                n_q = b.get("n_queries")
                nq = f", {int(n_q)} queries" if _is_num(n_q) else ""
                detail = (f"<div>difference {_sf(iv['mean_diff'])}, {conf} paired-bootstrap interval "
                          f"[{_sf(iv['low'])}, {_sf(iv['high'])}], p = {_p(iv['p_value'])}{nq}</div>")
            pq = self.run.per_query
            if pq is not None and pq.get("metric", _HEADLINE_METRIC) == m and pq["query_ids"]:
                d_q = [float(y) - float(x) for x, y in zip(pq["before"], pq["after"])]
                up, down = sum(x > 1e-9 for x in d_q), sum(x < -1e-9 for x in d_q)
                detail += (f'<div>per query: <span class="better">{up} better</span>, '
                           f'<span class="worse">{down} worse</span>, {len(d_q) - up - down} unchanged</div>')
            vcls = {"good": "better", "bad": "worse"}.get(cls, "neutral")
            cards.append(
                f'<div class="card {cls}" id="headline-retrieval"><div>Test {_e(_label(m))} '
                f"(split {_e(self.test_split)})</div>"
                f'<div class="big">{_f(bv)} &rarr; {_f(av)} '
                f'<span class="{_sign_class(diff)}">({_sf(diff)})</span></div>{detail}'
                f'<div class="{vcls}">{_e(verdict)}</div></div>')
        cards.append(self._sts_card())
        dev = _obj(s, "dev", "") or {}
        if _is_num(dev.get("best_step")):
            facts.append(f"best dev step {int(dev['best_step'])}")
        interp = _obj(dev, "interpolation", "dev")
        if interp is not None and _is_num(interp.get("chosen_alpha")):
            facts.append(f"interpolation a = {interp['chosen_alpha']:g} (0 = base, 1 = fine-tuned)")
        if _is_num(s.get("wall_seconds")):
            facts.append(f"wall time {_secs(s['wall_seconds'])}")
        body = f'<div class="cards">{"".join(cards)}</div>'
        if facts:
            body += f'<p class="sub">{_e("; ".join(facts))}</p>'
        self.add("headline", "Headline", body)

    def _sts_card(self) -> str:
        sts = _obj(self.s, "sts", "")
        if sts is None:
            return ('<div class="card flat"><div>General-domain check (STS)</div>'
                    f'{_note("No STS evaluation in this run: forgetting was not measured.")}</div>')
        name = f'{_e(sts.get("data", "STS-B"))} {_e(sts.get("split", ""))} Spearman x 100'
        sb, sa = _obj(sts, "before", "sts"), _obj(sts, "after", "sts")
        if sb is None or sa is None:
            have, miss = ("before", "after") if sa is None else ("after", "before")
            known = sb if sa is None else sa
            val = f"{100 * _num(known, 'spearman', 'sts.' + have):.2f}" if known is not None else ""
            return (f'<div class="card flat" id="headline-sts"><div>{name}</div>'
                    + (f'<div class="big">{have}: {val}</div>' if val else "")
                    + _note(f"No STS evaluation {miss} training: forgetting was not measured.") + "</div>")
        rb, ra = _num(sb, "spearman", "sts.before"), _num(sa, "spearman", "sts.after")
        dp = 100 * (ra - rb)
        fell = dp < -STS_DROP_POINTS
        cls = "bad" if fell else "good" if dp >= 0 else "flat"
        msg = (f"fell by {-dp:.2f} points, more than {STS_DROP_POINTS:g}: the model forgot part of what it knew"
               if fell else f"within {STS_DROP_POINTS:g} points of the base model" if dp < 0
               else "no loss on general-domain similarity")
        return (f'<div class="card {cls}" id="headline-sts"><div>{name}</div>'
                f'<div class="big">{100 * rb:.2f} &rarr; {100 * ra:.2f} '
                f'<span class="{_sign_class(dp)}">({dp:+.2f} points)</span></div>'
                f'<div class="{"worse" if fell else "neutral"}">{"&#9888; " if fell else ""}{_e(msg)}</div></div>')

    def retrieval(self) -> None:
        b, a = self.before, self.after
        if b is None or a is None:
            missing = "before" if b is None else "after"
            self.add("retrieval", "Test retrieval metrics",
                     _note(f"No test-split evaluation ({missing} is missing): the metrics table and bars are left out."))
            return
        names = _metric_names(b, a)
        if not names:
            self.add("retrieval", "Test retrieval metrics",
                     _note("The before / after results hold no retrieval metric (metric@k): nothing to tabulate."))
            return
        rows = []
        intervals: Dict[str, Tuple[float, float]] = {}
        for m in names:
            bv, av = float(b[m]), float(a[m])
            d = av - bv
            iv = self.interval(m)
            if iv is None:
                icell, pcell, vcell = ("&mdash;", "neutral"), ("&mdash;", "neutral"), ("not computed", "neutral")
            else:
                intervals[m] = (iv["low"], iv["high"])
                if abs(iv["mean_diff"] - d) > _CONSISTENCY_TOL:
                    self.warnings.append(
                        f"metrics.json: difference.{m}.mean_diff ({iv['mean_diff']:.6f}) is not after - before "
                        f"({d:.6f}): the interval may belong to other numbers.")
                v = "better" if iv["low"] > 0 else "worse" if iv["high"] < 0 else "neutral"
                vtext = {"better": "better", "worse": "worse", "neutral": "includes 0"}[v]
                icell = (f"[{_sf(iv['low'])}, {_sf(iv['high'])}]", "")
                pcell = (_p(iv["p_value"]), "")
                vcell = (f'<span class="badge {v}">{vtext}</span>', "")
            rows.append([_e(_label(m)), (_f(bv), ""), (_f(av), ""), (_sf(d), _sign_class(d)), icell, pcell, vcell])
        nb, na = b.get("n_queries"), a.get("n_queries")
        body = _table(["metric", "before", "after", "difference", "95% interval of the difference", "p-value",
                       "verdict"], rows)
        if _is_num(nb):
            body += f'<p class="caption">{int(nb)} test queries'
            if _is_num(na) and int(na) != int(nb):
                body += f" before, {int(na)} after"
                self.warnings.append(f"metrics.json: before.n_queries ({int(nb)}) differs from after.n_queries "
                                     f"({int(na)}): the two evaluations did not see the same queries.")
            res = {int(d["n_resamples"]) for d in self.difference.values()
                   if isinstance(d, dict) and _is_num(d.get("n_resamples"))}
            how = f" ({', '.join(f'{r:,}' for r in sorted(res))} resamples)" if res else ""
            body += (f". Intervals: paired bootstrap over queries{how}, the same resample for both models; "
                     "p-value: two-sided bootstrap test of no difference.</p>")
        bars = [m for m in _BAR_METRICS if m in names]
        if bars:
            from .figures import metric_bars

            body += _img(metric_bars({_label(m): float(b[m]) for m in bars}, {_label(m): float(a[m]) for m in bars},
                                     {_label(m): intervals[m] for m in bars if m in intervals},
                                     [_label(m) for m in bars]),
                         "before / after bars")
            body += ('<p class="caption">Left: the whisker on each <em>after</em> bar is before + the 95% interval '
                     "of the difference: when it stays clear of the grey bar's height, the change is real. Right: "
                     "the difference itself with its interval; green or red when the interval excludes 0.</p>")
        else:
            body += _note("None of nDCG@10, MRR@10, Recall@100 was measured: no bar figure.")
        self.add("retrieval", "Test retrieval metrics", body)

    def per_query(self) -> None:
        pq = self.run.per_query
        title = "Per-query differences"
        if pq is None:
            self.add("per-query", title, _note("No per_query.json in this run: the per-query histogram is left out."))
            return
        metric = str(pq.get("metric", _HEADLINE_METRIC))
        ids, pb, pa = pq["query_ids"], pq["before"], pq["after"]
        if not ids:
            self.add("per-query", title, _note("per_query.json holds no queries."))
            return
        diffs = [float(y) - float(x) for x, y in zip(pb, pa)]
        n = len(diffs)
        for name, vals, d in (("before", pb, self.before), ("after", pa, self.after)):
            if d is not None and _is_num(d.get(metric)):
                mean = sum(float(v) for v in vals) / n
                if abs(mean - float(d[metric])) > _CONSISTENCY_TOL:
                    self.warnings.append(f"per_query.json: the mean of {name} ({mean:.6f}) is not metrics.json's "
                                         f"{name}.{metric} ({float(d[metric]):.6f}).")
        from .figures import per_query_histogram

        better = sum(d > 1e-9 for d in diffs)
        worse = sum(d < -1e-9 for d in diffs)
        same = n - better - worse
        body = (f'<p><span class="better">{better} improved</span> &middot; <span class="neutral">{same} unchanged'
                f'</span> &middot; <span class="worse">{worse} worse</span> (of {n} queries, per-query '
                f"{_e(_label(metric))})</p>")
        body += _img(per_query_histogram(diffs, metric=_label(metric)), "per-query differences")
        order = sorted(range(n), key=lambda i: diffs[i])
        top_worse = [i for i in order[:5] if diffs[i] < -1e-9]
        top_better = [i for i in reversed(order[-5:]) if diffs[i] > 1e-9]
        for label, idx in (("Most improved queries", top_better), ("Most worsened queries", top_worse)):
            if idx:
                rows = [[_e(ids[i]), (_f(float(pb[i])), ""), (_f(float(pa[i])), ""),
                         (_sf(diffs[i]), _sign_class(diffs[i]))] for i in idx]
                body += f"<h3>{_e(label)}</h3>" + _table(["query id", "before", "after", "difference"], rows)
        self.add("per-query", title, body)

    def training(self) -> None:
        s = self.s
        dev = _obj(s, "dev", "") or {}
        metric = self.select_metric()
        body = ""
        train = _obj(s, "train", "")
        if train:
            labels = {"steps": "steps", "examples": "training examples", "batch_size": "batch size",
                      "epochs": "epochs", "steps_per_epoch": "steps per epoch", "loss_first": "first logged loss",
                      "loss_last": "last logged loss"}
            rows = []
            for k, v in train.items():
                if v is None:
                    val = "&mdash;"
                elif k == "epochs" and _is_num(v):
                    val = f"{v:g}"
                else:
                    val = _f(v) if isinstance(v, float) else _e(v)
                rows.append([_e(labels.get(k, k)), (val, "")])
            body += _table(None, rows, "kv")
        dev_recs = [r for r in self.by_phase.get("dev", []) if _is_num(r.get("step")) and _is_num(r.get(metric))]
        dev_recs = _dedupe_by_step(dev_recs)
        train_recs = _dedupe_by_step([r for r in self.by_phase.get("train", [])
                                      if _is_num(r.get("step")) and _is_num(r.get("loss"))])
        dev_before = _obj(dev, "before", "dev")
        best = _obj(dev, "best", "dev")
        best_step = int(dev["best_step"]) if _is_num(dev.get("best_step")) else None
        if dev_before is not None or best is not None:
            names = sorted({k for d in (dev_before or {}, best or {}) for k, v in d.items()
                            if _is_num(v) and (_METRIC_RE.match(k) or k in _CORRELATIONS)}, key=_metric_key)
            rows = []
            for m in names:
                bv = (dev_before or {}).get(m)
                tv = (best or {}).get(m)
                d = tv - bv if _is_num(bv) and _is_num(tv) else None
                rows.append([_e(_label(m)), (_f(bv) if bv is not None else "&mdash;", ""),
                             (_f(tv) if tv is not None else "&mdash;", ""),
                             (_sf(d), _sign_class(d)) if d is not None else ("&mdash;", "")])
            head = "best checkpoint" + (f" (step {best_step})" if best_step is not None else "")
            body += "<h3>Dev split</h3>" + _table(["metric", "base model", head, "difference"], rows)
        if best_step is not None and dev_recs and best_step not in [int(r["step"]) for r in dev_recs]:
            self.warnings.append(f"metrics.json: dev.best_step {best_step} has no dev record in metrics.jsonl.")
        if dev_recs or train_recs:
            from .figures import training_curves

            body += _img(training_curves([int(r["step"]) for r in dev_recs], [float(r[metric]) for r in dev_recs],
                                         _label(metric), best_step,
                                         float(dev_before[metric]) if dev_before and _is_num(dev_before.get(metric))
                                         else None,
                                         [int(r["step"]) for r in train_recs], [float(r["loss"]) for r in train_recs]),
                         "dev metric and training loss over steps")
            body += (f'<p class="caption">Dev metric: {_e(_label(metric))} (the one the run selects its '
                     "checkpoint and interpolation on). Training loss as logged.</p>")
            cap = []
            if not dev_recs:
                cap.append("no dev evaluations were logged")
            elif best_step is None:
                cap.append("the best step was not recorded, so none is marked")
            if not train_recs:
                cap.append("no training-loss records were logged")
            if cap:
                body += _note("; ".join(cap).capitalize() + ".")
        else:
            body += _note("metrics.jsonl holds no 'train' or 'dev' records: no training curves.")
        self.add("training", "Training", body or _note("No training information in this run."))

    def interpolation(self) -> None:
        title = "Weight interpolation with the base model"
        dev = _obj(self.s, "dev", "") or {}
        interp = _obj(dev, "interpolation", "dev")
        alphas: List[float] = []
        scores: List[float] = []
        chosen = None
        metric = self.select_metric()
        if interp is not None:
            metric = str(interp.get("metric", metric))
            alphas, scores = interp.get("alphas"), interp.get("scores")
            if not isinstance(alphas, list) or not isinstance(scores, list) or len(alphas) != len(scores):
                raise ValueError("metrics.json: dev.interpolation.alphas and .scores must be lists of the same length")
            for name, vals in (("alphas", alphas), ("scores", scores)):
                bad = next((i for i, v in enumerate(vals) if not _is_num(v)), None)
                if bad is not None:
                    raise ValueError(f"metrics.json: dev.interpolation.{name}[{bad}] must be a number, got "
                                     f"{vals[bad]!r}")
            chosen = float(interp["chosen_alpha"]) if _is_num(interp.get("chosen_alpha")) else None
        else:
            recs = [r for r in self.by_phase.get("interpolation", []) if _is_num(r.get("alpha"))
                    and _is_num(r.get(metric))]
            alphas, scores = [float(r["alpha"]) for r in recs], [float(r[metric]) for r in recs]
        if not alphas:
            self.add("interpolation", title, _note("No weight interpolation in this run (the fine-tuned weights are "
                                                   "used as they are)."))
            return
        from .figures import interpolation_curve

        body = ("<p>The final model is <code>(1 - a) &middot; base + a &middot; fine-tuned</code> (WiSE-FT, "
                "Wortsman et al. 2022; LM-Cocktail, Xiao et al. 2023), with <code>a</code> chosen on the dev "
                "split.</p>")
        order = sorted(range(len(alphas)), key=lambda i: alphas[i])
        rows = [[(f"{alphas[i]:g}", ""), (_f(scores[i]), "better" if chosen is not None
                                            and abs(alphas[i] - chosen) < 1e-9 else "")] for i in order]
        body += _img(interpolation_curve(alphas, scores, _label(metric), chosen), "interpolation curve")
        body += _table(["a", f"dev {_label(metric)}"], rows)
        if chosen is None:
            body += _note("The chosen a was not recorded (metrics.json has no dev.interpolation): none is marked.")
        self.add("interpolation", title, body)

    def mining(self) -> None:
        title = "Hard-negative mining"
        mining = _obj(self.s, "mining", "")
        if mining is None:
            self.add("mining", title, _note("No hard-negative mining in this run."))
            return
        labels = {"positive_score": "positive score", "negative_score": "mined negative score",
                  "gap": "gap (positive - mean negative, per query)"}
        cols = ("count", "mean", "std", "min", "q05", "q25", "q50", "q75", "q95", "max")
        rows = []
        for k, v in mining.items():
            if isinstance(v, dict) and "count" in v:
                if not v.get("count"):
                    rows.append([_e(labels.get(k, k))] + [("0", "")] + [("&mdash;", "")] * (len(cols) - 1))
                    continue
                cells = []
                for c in cols:
                    x = v.get(c)
                    cells.append((str(int(x)) if c == "count" and _is_num(x) else _f(x) if _is_num(x)
                                  else "&mdash;", ""))
                rows.append([_e(labels.get(k, k))] + cells)
        body = ""
        if rows:
            body += _table(["", "count", "mean", "std", "min", "5%", "25%", "median", "75%", "95%", "max"], rows)
        kv_labels = {"queries": "queries", "num_negatives": "negatives asked per query",
                     "negatives": "negatives mined", "candidates": "candidates in the rank window",
                     "filtered": "filtered as likely false negatives", "filtered_fraction": "filtered fraction",
                     "short_queries": "queries short of negatives",
                     "no_negative_queries": "queries with no negative", "rank_window": "rank window",
                     "relative_margin": "relative margin", "absolute_margin": "absolute margin",
                     "sampling": "sampling", "method": "search", "seed": "seed"}
        kv = []
        for k, v in mining.items():
            if isinstance(v, dict) and "count" in v:
                continue
            if k == "filtered_fraction" and _is_num(v):
                val = f"{100 * v:.2f}%"
            elif k == "rank_window" and isinstance(v, list) and len(v) == 2:
                val = f"ranks {_e(v[0])} to {_e(v[1])} (after removing known positives)"
            elif v is None:
                val = "off"
            elif isinstance(v, float):
                val = f"{v:g}"
            else:
                val = _e(json.dumps(v) if isinstance(v, (list, dict)) else v)
            kv.append([_e(kv_labels.get(k, k)), (val, "")])
        if kv:
            body += _table(None, kv, "kv")
        self.add("mining", title, body or _note("The mining statistics are empty."))

    def time(self) -> None:
        title = "Where the time went"
        phases = _obj(self.s, "phases", "")
        if phases is None:
            recs = [r for r in self.by_phase.get("timing", []) if isinstance(r.get("name"), str)
                    and _is_num(r.get("seconds"))]
            phases = {}
            for r in recs:
                phases[r["name"]] = phases.get(r["name"], 0.0) + float(r["seconds"])
        for k, v in phases.items():
            if not _is_num(v):
                raise ValueError(f"metrics.json: phases.{k} must be a number of seconds, got {v!r}")
        wall = self.s.get("wall_seconds")
        if not phases:
            self.add("time", title, _note("No time per phase was recorded.") +
                     (f"<p>Wall time: {_secs(wall)}</p>" if _is_num(wall) else ""))
            return
        total = sum(float(v) for v in phases.values())
        shown = {k: float(v) for k, v in phases.items()}
        if _is_num(wall) and wall - total > 0.5:
            shown["other (outside the phases)"] = float(wall) - total
        denom = float(wall) if _is_num(wall) and wall > 0 else total
        rows = [[_e(k), (_secs(v), ""), (f"{100 * v / denom:.1f}%" if denom > 0 else "&mdash;", "")]
                for k, v in shown.items()]
        if _is_num(wall):
            rows.append(["<strong>wall time</strong>", (f"<strong>{_secs(wall)}</strong>", ""), ("100%", "")])
        from .figures import phase_bars

        body = _table(["phase", "seconds", "share of the wall time" if _is_num(wall) else "share"], rows)
        body += _img(phase_bars(shown), "time per phase")
        self.add("time", title, body)

    def environment(self) -> None:
        s = self.s
        rows = []
        labels = [("recipe", "recipe"), ("model", "model"), ("data", "data"), ("test_split", "test split"),
                  ("device", "device"), ("precision", "precision"), ("world_size", "processes")]
        for k, lab in labels:
            if k in s:
                rows.append([_e(lab), (_e(s[k]), "")])
        versions = _obj(s, "versions", "") or {}
        for k, v in versions.items():
            rows.append([_e(f"{k} version"), (_e(v), "")])
        rows.append([_e("run folder"), (_e(self.run.path.resolve()), "")])
        self.add("environment", "Environment", _table(None, rows, "kv"))

    def config(self) -> None:
        text = self.run.config_text
        if text is None:
            self.add("config", "Resolved configuration", _note("No config.yaml in the run folder."))
            return
        n = len(text.splitlines())
        self.add("config", "Resolved configuration",
                 f"<details><summary>config.yaml ({n} lines): the exact settings of this run; "
                 f"<code>contrastkit train --config config.yaml</code> repeats it</summary>"
                 f"<pre>{_e(text)}</pre></details>")

    # ---- assembly

    def render(self) -> str:
        for part in (self.headline, self.retrieval, self.per_query, self.training, self.interpolation, self.mining,
                     self.time, self.environment, self.config):
            part()
        s = self.s
        title = f"contrastkit run report: {self.run.path.name}"
        sub = " &middot; ".join(_e(x) for x in (
            s.get("recipe"), s.get("model"), s.get("data") and f"data {s.get('data')}") if x)
        nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t, _ in self.sections)
        task = f'<p class="sub">{_e(s["task"])}</p>' if isinstance(s.get("task"), str) and s["task"] else ""
        run_notes = s.get("notes")
        notes = ""
        if isinstance(run_notes, list) and run_notes:
            notes = ('<div class="notes" id="run-notes"><strong>Notes from the run</strong><ul>' +
                     "".join(f"<li>{_e(n)}</li>" for n in run_notes) + "</ul></div>")
        run_warnings = s.get("warnings")
        if isinstance(run_warnings, list):  # the run's own warnings (e.g. no gain on dev) come first
            self.warnings[:0] = [str(w) for w in run_warnings if str(w) not in self.warnings]
        warn = ""
        if self.warnings:
            warn = ('<div class="warn" id="warnings"><strong>Check these</strong><ul>' +
                    "".join(f"<li>{_e(w)}</li>" for w in self.warnings) + "</ul></div>")
        body = "".join(f'<section id="{sid}"><h2>{_e(t)}</h2>{h}</section>' for sid, t, h in self.sections)
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
                f"<h1>{_e(title)}</h1><p class=\"sub\">{sub}</p>{task}<nav>{nav}</nav>{warn}{notes}{body}"
                "</main></body></html>\n")


def render_report(run: RunData) -> str:
    """The report page (a complete HTML document, as a string) of a :class:`RunData`.

    Raises ``ValueError`` naming the field when ``metrics.json`` holds a value of the
    wrong type (``metrics.json: before.ndcg@10 must be a number, got 'x'``).

    Example::

        import json, tempfile, pathlib
        from contrastkit.diagnostics import read_run, render_report
        run_dir = pathlib.Path(tempfile.mkdtemp())
        (run_dir / "metrics.json").write_text(json.dumps({"before": {"ndcg@10": 0.64}, "after": {"ndcg@10": 0.70}}))
        html_text = render_report(read_run(run_dir))
        assert html_text.startswith("<!DOCTYPE html>")
    """
    return _Page(run).render()


def write_report(run_dir: Union[str, Path], output: Union[str, Path, None] = None) -> Path:
    """Read the run folder ``run_dir`` and write its report (``run_dir/report.html``, or
    ``output``) atomically (a temporary file, then a rename); returns the path written.

    The page is one self-contained HTML file (base64 PNG figures, inline CSS, no script,
    no external reference) with: the headline (test nDCG@10 before -> after, the paired
    bootstrap interval of the difference and whether it excludes 0; STS Spearman before ->
    after, flagged below -2 points), every retrieval metric with its interval, before /
    after bars, the dev curve with the best step and the training loss, the interpolation
    curve with the chosen ``a``, the per-query difference histogram, the mining statistics,
    the time per phase, the environment and the resolved configuration. See
    ``docs/report.md``.

    Example::

        import json, tempfile, pathlib
        from contrastkit.diagnostics import write_report
        run = pathlib.Path(tempfile.mkdtemp())
        (run / "metrics.json").write_text(json.dumps(
            {"before": {"ndcg@10": 0.64}, "after": {"ndcg@10": 0.70}, "wall_seconds": 500.0}))
        write_report(run)                                   # run / "report.html"
    """
    run = read_run(run_dir)
    text = render_report(run)
    out = Path(output) if output is not None else run.path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=str(out.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out
