"""The one exception tree of eob-delivery.

Messages name the input (file, row, field, setting) and never carry a value read from a
record: values are PHI.

* EobError
  x ConfigError            a setting is missing or malformed (names the setting)
  x InputError             an input file cannot be used
    + FileRejected         the whole file is refused (names the file and the reason)
  x AccountingError        rows in != rows accepted + rows quarantined
  x LedgerError
    + IllegalTransition    a state change the state machine forbids
    + UnknownRun           a run id the ledger does not have
    + RunRefused           a run cannot start or resume now (names the run and what to do)
  x DeliveryError          a message could not be handed to SMTP safely
    + TlsRequired          the receiver offered no usable TLS: no PHI was sent
  x ReturnPathError        the return path (mailbox, IMAP server) failed or did not answer
"""

from __future__ import annotations


class EobError(Exception):
    """Base of every error raised by the pipeline."""


class ConfigError(EobError):
    """A setting is missing or malformed."""


class InputError(EobError):
    """An input file cannot be used."""


class FileRejected(InputError):
    """The whole file is refused; nothing of it is processed."""

    def __init__(self, file_name: str, reason: str) -> None:
        super().__init__(f"{file_name}: rejected: {reason}")
        self.file_name = file_name
        self.reason = reason


class AccountingError(EobError):
    """Rows in a file do not add up to accepted plus quarantined rows."""


class LedgerError(EobError):
    """The delivery ledger refused an operation."""


class IllegalTransition(LedgerError):
    """A state change that the state machine forbids."""

    def __init__(self, kind: str, entity_id: str, from_state: str, to_state: str) -> None:
        super().__init__(f"{kind} {entity_id}: illegal transition {from_state} -> {to_state}")
        self.from_state = from_state
        self.to_state = to_state


class UnknownRun(LedgerError):
    def __init__(self, run_id: str) -> None:
        # The id is typed by the operator: escaped, so it cannot forge a line of output.
        shown = run_id.encode("unicode_escape").decode("ascii")
        super().__init__(f"unknown run {shown} (`eob runs` lists the runs)")


class RunRefused(LedgerError):
    """A run cannot start or resume now; the message says why and what to do."""


class DeliveryError(EobError):
    """A message could not be handed to SMTP safely."""


class TlsRequired(DeliveryError):
    """The receiving server offered no usable TLS, so nothing was sent."""


class ReturnPathError(EobError):
    """The return path (a mailbox, an IMAP server) failed or did not answer (names it)."""
