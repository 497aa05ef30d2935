"""The data report: one dict (written as data_report.json) and its human summary in the terminal.

    gemcut data check my.jsonl            # prints the summary and writes data_report.json

`prepare` fills the sections (sources, records, errors, cleaning, duplicates, leakage, splits, labels,
limit, and `augment` and a data mixture's per-source `mixture`); this module adds the derived parts (label balance and its warning, the warnings list) and renders
rich tables. Every number that removes or changes records appears here: nothing is dropped without a line.
"""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from gemcut.data.records import sort_labels

# Warn when the largest class has more than this many times the records of the smallest.
SKEW_WARN_RATIO = 2.0


def label_balance(counts: dict[str, int], warn_ratio: float = SKEW_WARN_RATIO, declared: list[str] | None = None) -> dict:
    """Counts, shares, largest/smallest ratio, and a warning when the ratio exceeds `warn_ratio`; labels in
    label-id order (`sort_labels`)."""
    total = sum(counts.values())
    order = sort_labels(counts, declared)
    out: dict = {"counts": {k: counts[k] for k in order}, "warn_ratio": warn_ratio, "imbalance_ratio": None, "warning": None}
    if not counts or total == 0:
        return out
    out["shares"] = {k: round(counts[k] / total, 4) for k in order}
    big, small = max(counts, key=counts.get), min(counts, key=counts.get)
    ratio = counts[big] / max(counts[small], 1)
    out["imbalance_ratio"] = round(ratio, 3)
    if ratio > warn_ratio:
        out["warning"] = (f"labels are skewed: {big!r} has {ratio:.2f}x the records of {small!r} (warning above {warn_ratio}x); "
                          "consider objective.class_weights=balanced and watch per-class F1, not only accuracy")
    return out


def finish(report: dict) -> dict:
    """Add the warnings list from the filled sections."""
    warnings = []
    labels = report.get("labels") or {}
    if (labels.get("after_cleaning") or {}).get("warning"):
        warnings.append(labels["after_cleaning"]["warning"])
    for label, spellings in (labels.get("spellings_merged") or {}).items():
        ways = ", ".join(f"{w} in {n} record{'s' if n != 1 else ''}" for w, n in spellings.items())
        warnings.append(f'label "{label}" is written {len(spellings)} ways ({ways}); they are read as one label, "{label}"')
    for src in report.get("sources", []):
        if src.get("fallback_lines"):
            encs = ", ".join(f"{k}: {v}" for k, v in src["lines_by_encoding"].items())
            warnings.append(f"{src['path']}: {src['fallback_lines']} lines were not valid {report['encoding']} and were decoded by a fallback ({encs})")
        if src.get("ignored_columns"):
            warnings.append(f"{src['path']}: columns not used by {report['kind']} records: {', '.join(src['ignored_columns'])}")
    err = report.get("errors", {})
    if err.get("total") and err.get("policy") == "skip":
        warnings.append(f"{err['total']} bad records skipped (on_error=skip): " + ", ".join(f"{k} {v}" for k, v in err["by_reason"].items()))
    elif err.get("tolerated"):
        n = err["tolerated"]
        warnings.append(f"{n} malformed {'entry' if n == 1 else 'entries'} skipped even with on_error=fail (one bad item in an otherwise "
                        "well-formed file): " + ", ".join(f"{k} {v}" for k, v in err["by_reason"].items()))
    if report.get("unused_fields"):
        warnings.append("fields not used by " + report["kind"] + " records: " + ", ".join(f"{k} ({v})" for k, v in report["unused_fields"].items()))
    cleaning = report.get("cleaning", {})
    if cleaning.get("mojibake_suspect_after"):
        warnings.append(f"{cleaning['mojibake_suspect_after']} records still look garbled after mojibake repair (ftfy could not recover them)")
    leak = report.get("leakage", {})
    if leak.get("removed_from_train"):
        warnings.append(f"{leak['removed_from_train']} training records duplicated evaluation records and were removed from train")
    kept = report.get("files_kept_in_train")
    for split, n in report.get("splits", {}).items():
        if n.get("count", 0) == 0 and split != "train":
            why = (f" ({kept} file{'s' if kept != 1 else ''} drew only evaluation records and stayed in train, since no file goes whole "
                   f"to validation/test; name evaluation files in data.{split})") if kept else ""
            warnings.append(f"the {split} split is empty{why}")
    report["warnings"] = warnings
    return report


def summary_lines(report: dict) -> list[str]:
    """A few plain lines: what a person needs to know at a glance."""
    s = report["splits"]
    lines = [f"{report['kind']} records: " + ", ".join(f"{k} {v['count']}" for k, v in s.items())
             + f" (read {report['records']['rows_read']} rows; content hash {report['content_hash'][:12]})"]
    d = report["duplicates"]
    lines.append(f"duplicates removed: {d['exact_removed']} exact (raw text alone: {d['exact_before_normalization']}), "
                 f"{d['near_removed']} near; leakage removed from train: {report['leakage']['removed_from_train']}")
    for src in (report.get("mixture") or {}).get("sources", []):
        lines.append(f"source {src['name']} ({src['kind']}): " + ", ".join(f"{k} {v}" for k, v in src["splits"].items())
                     + f"; sampled share {src['sampling_share']:.1%}")
    if report.get("augment"):
        a = report["augment"]
        lines.append(f"augmented: {a['added']} training copies ({a['share_of_train']:.1%} of train; "
                     + ", ".join(f"{k} {v['made']}" for k, v in a["operations"].items())
                     + f"; {a['removed_by_leakage_check']} removed by the leakage check)")
    c = report["cleaning"]
    lines.append(f"cleaning: mojibake repaired in {c['mojibake_repaired']} records, "
                 + ", ".join(f"{k} {v}" for k, v in c["changed"].items() if k != "fix_mojibake")
                 + (f"; dropped {sum(c['dropped'].values())} ({', '.join(f'{k} {v}' for k, v in c['dropped'].items())})" if c["dropped"] else ""))
    return lines + [f"warning: {w}" for w in report["warnings"]]


def _table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def render(report: dict, console: Console | None = None) -> None:
    """Print the report as rich tables, then the warnings."""
    console = console or Console()
    console.print(_table("Sources", ["file", "format", "rows", "fallback-decoded lines", "ignored columns"],
                         [[s["path"], s["format"], s["rows"], s["fallback_lines"], ", ".join(s["ignored_columns"]) or "-"]
                          for s in report["sources"]]))
    r = report["records"]
    console.print(_table("Records", ["stage", "count"], [[k.replace("_", " "), v] for k, v in r.items()]))
    splits = report["splits"]
    seen = [k for v in [(report.get("labels") or {}).get("after_cleaning") or {}, *splits.values()] for k in (v.get("counts") or v.get("labels") or {})]
    label_names = list(dict.fromkeys(seen))  # label-id order, as the counts are written
    console.print(_table(f"Splits ({report['split_method']})", ["split", "records", *label_names],
                         [[k, v["count"], *[(v.get("labels") or {}).get(n, 0) for n in label_names]] for k, v in splits.items()]))
    _render_mixture(report.get("mixture"), console)
    _render_by_file(report.get("splits_by_file") or {}, console)
    c = report["cleaning"]
    rows = [[f"changed by {k}", v] for k, v in c["changed"].items()]
    rows += [[f"  {k.replace('_', ' ')}", v] for k, v in (c.get("changes") or {}).items()]
    rows += [["still garbled after repair", c["mojibake_suspect_after"]]] if "fix_mojibake" in c["changed"] else []
    rows += [[f"dropped: {k}", v] for k, v in c["dropped"].items()]
    d, leak = report["duplicates"], report["leakage"]
    rows += [["exact duplicates (raw text)", d["exact_before_normalization"]], ["exact duplicates removed (normalised)", d["exact_removed"]],
             ["near duplicates removed", d["near_removed"]], ["duplicates with conflicting labels", d["label_conflicts"]]]
    rows += [[f"leakage {how} ({split})", n] for how in ("exact", "near") for split, n in leak[how].items()]
    rows += [["limit: train records left out", report["limit"]["dropped"]]] if report.get("limit") else []
    console.print(_table("Cleaning, duplicates, leakage", ["what", "records"], rows))
    err = report["errors"]
    if err["total"]:
        console.print(_table(f"Skipped records (on_error={err['policy']})", ["reason", "count", "first example"],
                             [[k, v, (err["examples"].get(k) or [""])[0][:100]] for k, v in err["by_reason"].items()]))
    bal = (report.get("labels") or {}).get("after_cleaning")
    if bal and bal["counts"]:
        console.print(_table(f"Labels (imbalance {bal['imbalance_ratio']}x, warn above {bal['warn_ratio']}x)", ["label", "records", "share"],
                             [[k, v, f"{bal['shares'][k]:.1%}"] for k, v in bal["counts"].items()]))
    for line in summary_lines(report):
        console.print(line, style="yellow" if line.startswith("warning") else None, markup=False, highlight=False)


FILES_SHOWN = 25


def _render_mixture(mixture: dict | None, console: Console) -> None:
    """A data mixture's sources: what each read, skipped, lost to cleaning and duplicates, its splits, its sampling share."""
    if not mixture:
        return
    rows = [[s["name"], s["kind"], s["records"]["rows_read"], s["records"]["bad_records"], s["records"]["dropped_by_cleaning"],
             s["records"]["duplicates_removed"], s["records"]["leakage_removed"] + s.get("removed_across_sources", 0),
             s["splits"]["train"], s["splits"]["validation"], s["splits"]["test"], (s.get("augment") or {}).get("added", 0),
             f"{s['sampling_share']:.1%}"] for s in mixture["sources"]]
    console.print(_table(f"Mixture sources (shares from {mixture['shares_from']})",
                         ["source", "kind", "rows", "skipped", "cleaned away", "duplicates", "leaked", "train", "validation",
                          "test", "augmented", "sampled share"], rows))


def _render_by_file(by_file: dict[str, dict[str, int]], console: Console) -> None:
    """Records per source file and split: the first FILES_SHOWN files, then how many more the report lists."""
    if not by_file:
        return
    rows = [[f, v["train"], v["validation"], v["test"]] for f, v in list(by_file.items())[:FILES_SHOWN]]
    console.print(_table("Records per file", ["file", "train", "validation", "test"], rows))
    if len(by_file) > FILES_SHOWN:
        console.print(f"... and {len(by_file) - FILES_SHOWN} more files (data_report.json: splits_by_file)", markup=False, highlight=False)


def count_labels(records, declared: list[str] | None = None) -> dict[str, int]:
    """Records per label, in label-id order (`sort_labels`)."""
    counts = Counter(r["label"] for r in records if "label" in r)
    return {k: counts[k] for k in sort_labels(counts, declared)}
