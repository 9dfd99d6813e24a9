"""Bounce classifier agreement with the labelled shared corpora, against a status-code baseline.

Labels: shared/data/bounces/sisimai/expected.csv (sisimai's reason per recipient, mapped to our
classes as shared/data/README.md suggests) and flufl-bounce/labels.csv (permanent/temporary per
address). One row per labelled recipient; our class for a row is the class of the report that
names that recipient, else of the file's first report. The baseline classifies by the RFC 3463
class digit alone (5 hard, 4 soft, 2 delivered), as the first version of the rules did.

Usage: python benchmarks/bounce_agreement.py [--table]
Prints one line: agreement, baseline agreement, ratio, recipient share, peak RSS.
"""

from __future__ import annotations

import csv
import resource
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.bounces import BounceClass, BounceReport, parse_report

REPO = Path(__file__).resolve().parent.parent
# shared/ sits beside the clone (CI), or beside the folder of worktrees (development).
DATA = (
    next(
        (
            p / "shared" / "data"
            for p in (REPO.parent, REPO.parent.parent)
            if (p / "shared").is_dir()
        ),
        REPO.parent / "shared" / "data",
    )
    / "bounces"
)
DOMAIN = "bounces.eob.example.com"
B = BounceClass

REASON_CLASS = {
    **dict.fromkeys(["userunknown", "hostunknown", "hasmoved", "suspend"], B.HARD_BOUNCE),
    **dict.fromkeys(
        "mailboxfull expired systemerror systemfull networkerror toomanyconn exceedlimit "
        "mesgtoobig onhold mailererror undefined".split(),
        B.SOFT_BOUNCE,
    ),
    **dict.fromkeys(
        "blocked filtered rejected spamdetected policyviolation badreputation requireptr "
        "authfailure securityerror norelaying virusdetected contenterror notcompliantrfc "
        "speeding failedstarttls syntaxerror".split(),
        B.POLICY_BLOCK,
    ),
    "feedback": B.COMPLAINT,
    "vacation": B.AUTO_REPLY,
    "delivered": B.DELIVERED,
}


@dataclass(frozen=True)
class Row:
    path: Path
    recipient: str | None
    expected: BounceClass


def labelled_rows(data: Path = DATA) -> list[Row]:
    rows = []
    with (data / "sisimai" / "expected.csv").open(encoding="utf-8") as f:
        for item in csv.DictReader(f):
            reason = item["expected_reason"]
            if reason == "notaccept":
                # A domain that accepts no mail (null MX) is a bad address when permanent.
                expected = B.HARD_BOUNCE if item["expected_hardbounce"] == "true" else B.SOFT_BOUNCE
            elif reason in REASON_CLASS:
                expected = REASON_CLASS[reason]
            else:
                continue  # no label in any public test table
            rows.append(
                Row(data / "sisimai" / "eml" / item["file"], item["expected_recipient"], expected)
            )
    for path in sorted((data / "sisimai" / "not-bounce").iterdir()):
        rows.append(Row(path, None, B.NOT_BOUNCE))
    kinds = {"permanent": B.HARD_BOUNCE, "temporary": B.SOFT_BOUNCE, "none": B.NOT_BOUNCE}
    with (data / "flufl-bounce" / "labels.csv").open(encoding="utf-8") as f:
        for item in csv.DictReader(f):
            if item["failure_kind"] not in kinds:
                continue
            path = data / "flufl-bounce" / "data" / item["file"]
            expected = kinds[item["failure_kind"]]
            for address in item["expected_addresses"].split() or [None]:
                rows.append(Row(path, address, expected))
    return rows


def flufl_agrees(expected: BounceClass, got: BounceClass) -> bool:
    """Mailman's labels say only permanent or temporary: a policy block is permanent too."""
    if expected == B.HARD_BOUNCE:
        return got in {B.HARD_BOUNCE, B.POLICY_BLOCK}
    if expected == B.NOT_BOUNCE:
        # "none" there means no address to extract, i.e. not a failure it could act on.
        return got in {B.NOT_BOUNCE, B.UNKNOWN, B.AUTO_REPLY, B.DELIVERED}
    return got == expected


def baseline_class(report: BounceReport) -> BounceClass:
    if report.bounce_class in {B.COMPLAINT, B.AUTO_REPLY, B.DELIVERED, B.NOT_BOUNCE}:
        return report.bounce_class
    first = (report.status or "")[:1]
    return {"5": B.HARD_BOUNCE, "4": B.SOFT_BOUNCE, "2": B.DELIVERED}.get(first, B.UNKNOWN)


@dataclass
class Result:
    rows: int
    agreed: Counter[BounceClass]
    total: Counter[BounceClass]
    recipients_found: int
    recipients_expected: int
    mismatches: list[tuple[Row, BounceClass]]

    @property
    def agreement(self) -> float:
        return sum(self.agreed.values()) / self.rows

    @property
    def recipient_share(self) -> float:
        return self.recipients_found / self.recipients_expected


def measure(
    rows: list[Row], classify: Callable[[BounceReport], BounceClass] = lambda r: r.bounce_class
) -> Result:
    result = Result(len(rows), Counter(), Counter(), 0, 0, [])
    parsed: dict[Path, list[BounceReport]] = {}
    for row in rows:
        if row.path not in parsed:
            parsed[row.path] = parse_report(row.path.read_bytes(), return_path_domain=DOMAIN)
        reports = parsed[row.path]
        wanted = (row.recipient or "").lower()
        named = [r for r in reports if r.recipient and r.recipient.lower() == wanted]
        if wanted and row.expected not in {B.COMPLAINT, B.NOT_BOUNCE}:
            result.recipients_expected += 1
            result.recipients_found += bool(named)
        got = classify((named or reports)[0])
        is_flufl = row.path.parent.parent.name == "flufl-bounce"
        ok = flufl_agrees(row.expected, got) if is_flufl else got == row.expected
        result.total[row.expected] += 1
        result.agreed[row.expected] += ok
        if not ok:
            result.mismatches.append((row, got))
    return result


def table(result: Result) -> str:
    lines = ["| class | labelled | agreed | agreement |", "|---|---:|---:|---:|"]
    for cls in BounceClass:
        if result.total[cls]:
            share = result.agreed[cls] / result.total[cls]
            lines.append(f"| {cls} | {result.total[cls]} | {result.agreed[cls]} | {share:.1%} |")
    lines.append(
        f"| all | {result.rows} | {sum(result.agreed.values())} | {result.agreement:.1%} |"
    )
    return "\n".join(lines)


def main() -> None:
    rows = labelled_rows()
    ours = measure(rows)
    base = measure(rows, baseline_class)
    if "--table" in sys.argv:
        print(table(ours))
        for row, got in ours.mismatches:
            print(f"  {row.path.name} expected={row.expected} got={got}")
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"bounce agreement {ours.agreement:.1%} over {ours.rows} labelled recipients; "
        f"baseline (status class only) {base.agreement:.1%}; "
        f"ratio {ours.agreement / base.agreement:.2f}; "
        f"recipients extracted {ours.recipient_share:.1%}; peak RSS {rss_mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
