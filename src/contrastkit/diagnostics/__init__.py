"""Diagnostics: what a run did, shown so a person can judge it.

- :func:`write_report`: the self-contained ``report.html`` of a run folder (headline
  before -> after with the paired-bootstrap interval, forgetting guard, curves, mining
  statistics, time per phase, configuration); :func:`read_run`, :func:`render_report`
  are its two halves (:mod:`.report`). The figures are in :mod:`.figures` (matplotlib,
  Agg backend, imported only when a report is drawn).

Example::

    import json, tempfile, pathlib
    from contrastkit.diagnostics import write_report
    run = pathlib.Path(tempfile.mkdtemp())          # a run folder of `contrastkit train`
    (run / "metrics.json").write_text(json.dumps({"before": {"ndcg@10": 0.64}, "after": {"ndcg@10": 0.70}}))
    assert write_report(run) == run / "report.html"
"""

from .report import STS_DROP_POINTS, RunData, read_run, render_report, write_report

__all__ = ["write_report", "read_run", "render_report", "RunData", "STS_DROP_POINTS"]
