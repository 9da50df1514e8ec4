"""The terminal summary of a run: one row per case, each quantity predicted vs measured.

A test leaves its row in its report's user_properties under PROPERTY (session.py writes it);
pytest_terminal_summary (pytest_plugin.py) collects the rows and prints format_table.
"""

from __future__ import annotations

from .checks import QUANTITIES, mib

PROPERTY = "sd_vram"


def rows(terminalreporter) -> list[dict]:
    """The rows the run's tests left, each once."""
    out, seen = [], set()
    for reports in terminalreporter.stats.values():
        for rep in reports:
            for name, value in getattr(rep, "user_properties", ()) or ():
                if name == PROPERTY and isinstance(value, dict) and (rep.nodeid, value["id"]) not in seen:
                    seen.add((rep.nodeid, value["id"]))
                    out.append(value)
    return out


def format_table(rows: list[dict], bands: dict) -> list[str]:
    head = f"{'case':<40} {'quantity':<15} {'predicted':>11} {'measured':>11} {'error':>8} {'band':>6}  {'stage (pred/meas)':<28} result"
    out = [head, "-" * len(head)]
    for r in rows:
        stage = r.get("stage") or {}
        stage_txt = f"{stage.get('predicted')}/{stage.get('measured')}" if stage else "-"
        if not r.get("errors"):
            out.append(f"{r['id']:<40} {'-':<15} {'':>11} {'':>11} {'':>8} {'':>6}  {stage_txt:<28} "
                       f"{r['outcome']} ({r.get('status')})")
            continue
        for i, q in enumerate(QUANTITIES):
            c = r["errors"].get(q, {})
            err = "-" if c.get("error") is None else f"{c['error']:+.2%}"
            verdict = "ok" if c.get("ok") else ("FAIL" if c.get("asserted") else "info")
            out.append(f"{r['id'] if i == 0 else '':<40} {q:<15} {mib(c.get('predicted')):>11} "
                       f"{mib(c.get('measured')):>11} {err:>8} {c.get('band', bands[q]):>6.1%}  "
                       f"{stage_txt if i == 0 else '':<28} {verdict}"
                       + (f"  => {r['outcome']}" if i == len(QUANTITIES) - 1 else ""))
    return out

