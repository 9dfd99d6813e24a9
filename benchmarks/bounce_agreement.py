"""Bounce parsing agreement with the labelled shared corpora, against a status-code baseline.

Each corpus is measured by what its own labels assert, and reported per label and per corpus:

- sisimai (shared/data/bounces/sisimai/expected.csv): sisimai's reason per recipient, mapped to
  our classes as shared/data/README.md suggests; agreement is our class. Its "filtered" is a
  refusal after DATA (reason_descriptions.csv; go-sisimai reason/why-filtered.go), which is why
  the parser records the SMTP stage a refusal answered and the rules use it.
- flufl.bounce (flufl-bounce/labels.csv): Mailman's tests, "permanent" or "temporary" per
  address. In flufl.bounce's source that is not a cause: the DSN detector files Action: failed
  (or "error") as permanent and Action: delayed as temporary, SimpleWarning files delay
  warnings as temporary, and every other detector reports what it finds as permanent. So the
  labels say final failure or delay warning, and are compared with our parsed finality
  (failed or delayed), not with a class: a final failure for a full mailbox is a soft bounce
  and still "permanent" there. A test of one detector that expects no address asserts nothing
  about the message and is not a row; the library-wide scan's "none" is (no address must be
  extracted). Each (file, address) counts once.

One row per labelled recipient; our answer for a row is the report that names that recipient,
else the file's first report. The baseline reads the RFC 3463 class digit alone (5 hard and
failed, 4 soft and delayed, 2 delivered), as the first version of the rules did.

Beside that in-sample figure, a grouped cross-validation (see "grouped cross-validation"
below): each MTA or provider family held out in turn, judged by the rules that earn their place
on the other families only.

Usage: python benchmarks/bounce_agreement.py [--table] [--rules]
Prints one line: agreement in-sample and cross-validated (overall and per corpus), baseline
agreement, ratio, recipient share, peak RSS; --table adds the per-label tables and every
mismatch of both; --rules each deciding rule's net gain per family.
"""

from __future__ import annotations

import csv
import re
import resource
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.records.bounce_classes import rule_use
from pipeline.returns.bounces import BounceClass, BounceReport, Finality, parse_report

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


# What each flufl.bounce label asserts (see the module docstring).
FLUFL_FAILED = "final failure"
FLUFL_DELAYED = "delay warning"
FLUFL_NO_ADDRESS = "no address"


@dataclass(frozen=True)
class Row:
    path: Path
    corpus: str
    recipient: str | None
    # A BounceClass for sisimai's rows; one of the FLUFL_* labels for flufl.bounce's.
    expected: str


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
            path = data / "sisimai" / "eml" / item["file"]
            rows.append(Row(path, "sisimai", item["expected_recipient"], expected))
    for path in sorted((data / "sisimai" / "not-bounce").iterdir()):
        rows.append(Row(path, "sisimai", None, B.NOT_BOUNCE))
    return rows + _flufl_rows(data / "flufl-bounce")


def _flufl_rows(data: Path) -> list[Row]:
    """One row per (file, address) the flufl.bounce tests name, labelled by what they assert.

    A test row is one detector run on one file. Its address set with "permanent" or
    "temporary" says the message is a final failure or a delay warning for those addresses.
    A row of one detector with no address asserts only that this detector finds nothing (and
    the same file is labelled by the detector that does): no statement about the message. Only
    the whole-library scan's empty result ("none") says no address is detectable in it.
    """
    kinds = {"permanent": FLUFL_FAILED, "temporary": FLUFL_DELAYED}
    seen: dict[tuple[Path, str | None], str] = {}
    with (data / "labels.csv").open(encoding="utf-8") as f:
        for item in csv.DictReader(f):
            path = data / "data" / item["file"]
            addresses = item["expected_addresses"].split()
            if addresses and item["failure_kind"] in kinds:
                for address in addresses:
                    seen.setdefault((path, address.lower()), kinds[item["failure_kind"]])
            elif item["failure_kind"] == "none" and item["detector"].startswith("scan_message"):
                seen.setdefault((path, None), FLUFL_NO_ADDRESS)
    return [Row(path, "flufl.bounce", address, label) for (path, address), label in seen.items()]


def agrees(row: Row, report: BounceReport, reports: list[BounceReport]) -> bool:
    """Our parse against what the row's label asserts, in that corpus's own terms.

    sisimai's reasons map to our classes (shared/data/README.md). flufl.bounce's "permanent"
    and "temporary" are not about the cause: its DSN detector files Action: failed as
    permanent and Action: delayed as temporary, its warning detector (SimpleWarning) files
    delay warnings as temporary, and every other detector reports the failures it finds as
    permanent. So they are compared with our parsed finality (failed or delayed), not a class.
    """
    if row.corpus == "sisimai":
        return report.bounce_class == row.expected
    if row.expected == FLUFL_NO_ADDRESS:
        return all(r.recipient is None for r in reports)
    wanted = Finality.FAILED if row.expected == FLUFL_FAILED else Finality.DELAYED
    return report.finality == wanted


def baseline(report: BounceReport) -> BounceReport:
    """The RFC 3463 class digit alone: 5 hard and failed, 4 soft and delayed, 2 delivered."""
    if report.bounce_class in {B.COMPLAINT, B.AUTO_REPLY, B.DELIVERED, B.NOT_BOUNCE}:
        return report
    first = (report.status or "")[:1]
    return replace(
        report,
        bounce_class={"5": B.HARD_BOUNCE, "4": B.SOFT_BOUNCE, "2": B.DELIVERED}.get(
            first, B.UNKNOWN
        ),
        finality={"5": Finality.FAILED, "4": Finality.DELAYED, "2": Finality.DELIVERED}.get(first),
    )


@dataclass
class Result:
    # Per (corpus, expected label).
    agreed: Counter[tuple[str, str]]
    total: Counter[tuple[str, str]]
    # Per corpus: labelled bounced recipients, and those a report of ours names.
    recipients_found: Counter[str]
    recipients_expected: Counter[str]
    mismatches: list[tuple[Row, BounceReport]]

    @property
    def rows(self) -> int:
        return sum(self.total.values())

    @property
    def agreement(self) -> float:
        return sum(self.agreed.values()) / self.rows

    def corpus_agreement(self, corpus: str) -> float:
        keys = [k for k in self.total if k[0] == corpus]
        return sum(self.agreed[k] for k in keys) / sum(self.total[k] for k in keys)

    def label_agreement(self, corpus: str, label: str) -> float:
        return self.agreed[corpus, label] / self.total[corpus, label]

    @property
    def recipient_share(self) -> float:
        return sum(self.recipients_found.values()) / sum(self.recipients_expected.values())

    def corpus_recipient_share(self, corpus: str) -> float:
        return self.recipients_found[corpus] / self.recipients_expected[corpus]


Parser = Callable[[Path], list[BounceReport]]


def parse_file(path: Path) -> list[BounceReport]:
    return parse_report(path.read_bytes(), return_path_domain=DOMAIN)


def measure(
    rows: list[Row],
    judge: Callable[[BounceReport], BounceReport] = lambda r: r,
    parse: Parser = parse_file,
) -> Result:
    result = Result(Counter(), Counter(), Counter(), Counter(), [])
    parsed: dict[Path, list[BounceReport]] = {}
    for row in rows:
        if row.path not in parsed:
            parsed[row.path] = [judge(r) for r in parse(row.path)]
        reports = parsed[row.path]
        report, named, ok = answer(row, reports)
        if row.recipient and row.expected not in {B.COMPLAINT, B.NOT_BOUNCE}:
            result.recipients_expected[row.corpus] += 1
            result.recipients_found[row.corpus] += named
        result.total[row.corpus, row.expected] += 1
        result.agreed[row.corpus, row.expected] += ok
        if not ok:
            result.mismatches.append((row, report))
    return result


def answer(row: Row, reports: list[BounceReport]) -> tuple[BounceReport, bool, bool]:
    """Our report for a row (the one naming its recipient, else the first), whether one named
    the recipient, and whether it agrees with the row's label."""
    wanted = (row.recipient or "").lower()
    named = [r for r in reports if r.recipient and r.recipient.lower() == wanted]
    report = (named or reports)[0]
    return report, bool(named), agrees(row, report, reports)


# --- grouped cross-validation -----------------------------------------------------------
#
# The rules were written while reading these very files, so the in-sample figure flatters
# them. Each MTA or provider family is held out in turn and judged by the rules that earn their
# place on the other families alone: a rule is kept when disabling it loses rows elsewhere (net),
# or when it decides files of at least two other families without loss (a broad rule another
# broad rule happens to cover). A rule written for one family's files earns nothing elsewhere
# and is off while that family is judged.

# Names of one provider's or one MTA's files that are the same family.
FAMILY_ALIASES = {
    **dict.fromkeys(["gmail", "gsuite", "googleworkspace", "googlegroups"], "google"),
    **dict.fromkeys(["office365", "outlook", "exchange2003", "exchange2007"], "microsoft"),
    **dict.fromkeys(["amazonses", "receivingses", "amazonworkmail"], "amazon"),
    "v5sendmail": "sendmail",
}


def family(path: Path) -> str:
    """The MTA or provider a file comes from, by its name: sisimai's "lhost-postfix-07.eml"
    (the reporting MTA) or "rhost-aol-01.eml" (the receiving provider), flufl.bounce's
    "postfix_01.txt"; sisimai's standards files ("rfc3464-02.eml") are a family each."""
    name = path.stem
    if name.startswith(("lhost-", "rhost-")):
        name = name.split("-")[1]
    else:
        name = re.split(r"[-_]\d", name)[0]
    return FAMILY_ALIASES.get(name, name)


@dataclass
class RuleGain:
    # Per family: rows right with the rule that are wrong without it, less the reverse.
    net: Counter[str]
    # Families with a file the rule decided.
    decides: set[str]

    def earned_outside(self, held_out: str) -> bool:
        net = sum(n for f, n in self.net.items() if f != held_out)
        return net > 0 or (net == 0 and len(self.decides - {held_out}) >= 2)


def rule_gains(rows: list[Row]) -> dict[int, RuleGain]:
    """Each rule that decides a file, against the same rules without it, per family."""
    files = sorted({row.path for row in rows})
    decided: dict[Path, set[int]] = {}
    full: dict[Path, list[BounceReport]] = {}
    for path in files:
        with rule_use() as use:
            full[path] = parse_file(path)
        decided[path] = use.decided
    gains: dict[int, RuleGain] = defaultdict(lambda: RuleGain(Counter(), set()))
    for index in sorted(set().union(*decided.values())):
        touched = [p for p in files if index in decided[p]]
        gains[index].decides = {family(p) for p in touched}
        with rule_use(frozenset({index})):
            without = {p: parse_file(p) for p in touched}
        for row in rows:
            if row.path in without:
                with_rule = answer(row, full[row.path])[2]
                gains[index].net[family(row.path)] += with_rule - answer(row, without[row.path])[2]
    return dict(gains)


def grouped_cross_validation(rows: list[Row], gains: dict[int, RuleGain]) -> Result:
    """Every family judged by the rules that earn their place on the other families."""
    held_out: dict[Path, list[BounceReport]] = {}
    for name in sorted({family(row.path) for row in rows}):
        off = frozenset(i for i, gain in gains.items() if not gain.earned_outside(name))
        with rule_use(off):
            for path in {row.path for row in rows if family(row.path) == name}:
                held_out[path] = parse_file(path)
    return measure(rows, parse=held_out.__getitem__)


def table(result: Result) -> str:
    lines = ["| corpus | label | rows | agreed | agreement |", "|---|---|---:|---:|---:|"]
    for corpus in ("sisimai", "flufl.bounce"):
        labels = [label for c, label in result.total if c == corpus]
        for label in sorted(labels, key=lambda x: -result.total[corpus, x]):
            n, ok = result.total[corpus, label], result.agreed[corpus, label]
            lines.append(f"| {corpus} | {label} | {n} | {ok} | {ok / n:.1%} |")
        n = sum(result.total[corpus, label] for label in labels)
        ok = sum(result.agreed[corpus, label] for label in labels)
        lines.append(f"| {corpus} | all | {n} | {ok} | {ok / n:.1%} |")
    ok = sum(result.agreed.values())
    lines.append(f"| both | all | {result.rows} | {ok} | {result.agreement:.1%} |")
    return "\n".join(lines)


def main() -> None:
    rows = labelled_rows()
    ours = measure(rows)
    base = measure(rows, baseline)
    gains = rule_gains(rows)
    held_out = grouped_cross_validation(rows, gains)
    if "--table" in sys.argv:
        for title, result in (("in-sample", ours), ("grouped cross-validation", held_out)):
            print(f"{title}:\n{table(result)}")
            for row, got in result.mismatches:
                print(
                    f"  {row.corpus} {row.path.name} expected={row.expected} "
                    f"got={got.bounce_class}/{got.finality} stage={got.smtp_stage}"
                )
    if "--rules" in sys.argv:
        # Each deciding rule's net gain per family: one earning in one family alone is a
        # candidate for removal.
        for index, gain in sorted(gains.items()):
            earned = {f: n for f, n in gain.net.items() if n}
            print(f"rule {index}: decides {len(gain.decides)} families; net {earned}")
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"bounce agreement {ours.agreement:.1%} in-sample, {held_out.agreement:.1%} grouped "
        f"cross-validated (one MTA family held out at a time) over {ours.rows} labelled "
        f"recipients (sisimai {ours.corpus_agreement('sisimai'):.1%} / "
        f"{held_out.corpus_agreement('sisimai'):.1%}, "
        f"flufl.bounce {ours.corpus_agreement('flufl.bounce'):.1%} / "
        f"{held_out.corpus_agreement('flufl.bounce'):.1%}); "
        f"baseline (status class only) {base.agreement:.1%}; "
        f"ratio {ours.agreement / base.agreement:.2f}; "
        f"recipients extracted {ours.recipient_share:.1%} "
        f"(sisimai {ours.corpus_recipient_share('sisimai'):.1%}, "
        f"flufl.bounce {ours.corpus_recipient_share('flufl.bounce'):.1%}); "
        f"peak RSS {rss_mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
