"""The corpus of bad source records (one row per kind) and how to write it into the source vault.

Each Case names its direction, the source record (field overrides of a good record), optional
helper records it needs (a Person, an Account, a user...), and the expected outcome:
`quarantined` with a substring of the readable reason, `loaded` with the expected values of
target fields, or `not_sent` (the record is not one the connection moves).

Records are written over the sandbox's API when it accepts them ("api"); what the sandbox model
refuses over the API (unknown picklist values, malformed dates, over-long text, dangling
references, a missing required Person/Account, a chosen creator) goes straight into the
sandbox's SQLite file ("sqlite") with the sandbox's own bulk loader filling the standard fields.
The `via` of each row records which path was taken.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

OUT, IN = "ctms_to_crm", "crm_to_ctms"

LONG = "x" * 100_000
CONTROL = "Visit\x07bell\x1bescape\x0bvtab\x7fdel end"
EMOJI = "Follow-up 🧪💊 with 👩‍⚕️ team 🇩🇪"
RTL = "مراجعة البروتوكول \u202eevil\u202c שלום"
QUOTES = "O'Brien's \"quoted\" visit ''"
BACKSLASH = "C:\\trial\\n\\'end\\"
VQL = "SELECT id FROM account__v WHERE name__v = '' OR 1=1 LIMIT 1000"
SQLI = "'); DROP TABLE crm_activity__v; --"
ZERO_WIDTH = "ze\u200bro\u200d width e\u0301"
NEWLINES = "line one\nline two\r\n\ttabbed"


@dataclass
class Case:
    kind: str
    direction: str
    record: dict[str, Any] = field(default_factory=dict)   # overrides of the good record
    expect: str = "loaded"                                  # loaded | quarantined | not_sent
    reason: str = ""                                        # substring of a quarantine reason
    target: dict[str, Any] = field(default_factory=dict)    # expected target field values (loaded)
    person: dict | None = None      # OUT: a new CTMS Person for the activity (fields)
    account: dict | None = None     # IN: a new CRM Account for the call (fields)
    twins: int = 0                  # extra Accounts (OUT) / Persons (IN) with the same identifier
    creator: dict | None = None     # a new user (in the source vault) who "created" the record
    dangling: str | None = None     # reference field set to an id that does not exist
    deleted: str | None = None      # reference field set to a record deleted before the run
    force_sqlite: bool = False


def _d(days: int) -> str:
    return (date.today() + timedelta(days=days)).isoformat()


CASES: list[Case] = [
    # ---------------------------------------------------------------- CTMS -> CRM
    Case("no person", OUT, {"person__v": None}, "quarantined", "no Person on the Clinical Activity"),
    Case("person without identifier", OUT, person={"last_name__sys": "Noid", "veeva_network_id__c": None},
         expect="quarantined", reason="has no veeva_network_id__c"),
    Case("identifier matches two accounts", OUT,
         person={"last_name__sys": "Twin", "veeva_network_id__c": "VN-TWIN-OUT"},
         twins=2, expect="quarantined", reason="ambiguous: 2 CRM Accounts have veeva_network_id__v = 'VN-TWIN-OUT'"),
    Case("identifier matches no account", OUT, person={"last_name__sys": "Lonely", "veeva_network_id__c": "VN-NOBODY"},
         expect="quarantined", reason="no CRM Account has veeva_network_id__v = 'VN-NOBODY'"),
    Case("identifier with VQL quote injection", OUT,
         person={"last_name__sys": "Inject", "veeva_network_id__c": "x' OR veeva_network_id__v != '"},
         expect="quarantined", reason="no CRM Account has veeva_network_id__v = 'x' OR veeva_network_id__v != ''"),
    Case("identifier differs only in case", OUT, person={"last_name__sys": "Case", "veeva_network_id__c": "lower"},
         expect="quarantined", reason="no CRM Account has"),
    Case("person reference dangling", OUT, dangling="person__v", expect="quarantined", reason="does not exist in CTMS"),
    Case("person deleted", OUT, deleted="person__v", expect="quarantined", reason="does not exist in CTMS"),
    Case("unknown channel", OUT, {"channel__v": "carrier_pigeon__c"}, "quarantined",
         "channel 'carrier_pigeon__c' is not in the channel map"),
    Case("missing channel", OUT, {"channel__v": None}, "quarantined", "channel missing"),
    Case("missing date", OUT, {"activity_date__v": None}, "quarantined", "date missing"),
    Case("impossible date", OUT, {"activity_date__v": "2026-13-45"}, "quarantined",
         "date '2026-13-45' is not a valid date"),
    Case("29 February of a common year", OUT, {"activity_date__v": "2027-02-29"}, "quarantined", "is not a valid date"),
    Case("date is not a date", OUT, {"activity_date__v": "next tuesday"}, "quarantined",
         "date 'next tuesday' is not a valid date"),
    Case("date with a time", OUT, {"activity_date__v": "2026-11-20T10:00:00Z"}, "quarantined", "is not a valid date"),
    Case("far-future date", OUT, {"activity_date__v": "2999-01-01"}, "quarantined",
         "date '2999-01-01' is not a valid date"),
    Case("ancient date", OUT, {"activity_date__v": "1899-12-31"}, "quarantined", "is not a valid date"),
    Case("planned date next month", OUT, {"activity_date__v": _d(30)}, target={"interaction_date__v": _d(30)}),
    Case("100,000-character subject", OUT, {"subject__v": LONG}, "quarantined",
         "clinical_interaction__v refused the record: INVALID_DATA: Value of 'subject__v' is longer than 1500"),
    Case("subject of exactly 1,500 characters", OUT, {"subject__v": "y" * 1500}, target={"subject__v": "y" * 1500}),
    Case("control characters", OUT, {"subject__v": CONTROL}, target={"subject__v": CONTROL}),
    Case("emoji", OUT, {"subject__v": EMOJI}, target={"subject__v": EMOJI}),
    Case("right-to-left text", OUT, {"subject__v": RTL}, target={"subject__v": RTL}),
    Case("quotes", OUT, {"subject__v": QUOTES}, target={"subject__v": QUOTES}),
    Case("backslashes", OUT, {"subject__v": BACKSLASH}, target={"subject__v": BACKSLASH}),
    Case("VQL keywords", OUT, {"subject__v": VQL}, target={"subject__v": VQL}),
    Case("SQL injection text", OUT, {"subject__v": SQLI}, target={"subject__v": SQLI}),
    Case("zero-width and combining characters", OUT, {"subject__v": ZERO_WIDTH}, target={"subject__v": ZERO_WIDTH}),
    Case("newlines and tabs", OUT, {"subject__v": NEWLINES}, target={"subject__v": NEWLINES}),
    Case("blank subject", OUT, {"subject__v": "   "}, target={"subject__v": None}),
    Case("missing complete flag", OUT, {"complete__v": None}, target={"call2_status__v": "planned__v"}),
    Case("creator without email", OUT,
         creator={"first_name__sys": "Nomail", "last_name__sys": "User", "email__sys": None},
         target={"from__v": "Nomail User"}),
    Case("creator with quotes and emoji in name", OUT,
         creator={"first_name__sys": "Zoë 'Z'", "last_name__sys": "O\"Neil 🧬", "email__sys": "zoe@example.org"},
         target={"from__v": "Zoë 'Z' O\"Neil 🧬 (zoe@example.org)"}),
    Case("creator unknown (dangling user)", OUT, dangling="created_by__v", target={"from__v": None}),
    Case("study reference dangling", OUT, dangling="study__v", target={"clinical_study__v": None}),
    Case("study deleted", OUT, deleted="study__v", target={"clinical_study__v": None}),
    Case("site reference dangling", OUT, dangling="site__v", target={"clinical_site__v": None}),
    Case("site deleted", OUT, deleted="site__v", target={"clinical_site__v": None}),
    # ---------------------------------------------------------------- CRM -> CTMS
    Case("call without account", IN, {"account__v": None}, "quarantined", "no Account on the call"),
    Case("account without identifier", IN, account={"last_name__v": "Noid", "veeva_network_id__v": None},
         expect="quarantined", reason="has no veeva_network_id__v"),
    Case("account identifier matches two persons", IN,
         account={"last_name__v": "Twin", "veeva_network_id__v": "VN-TWIN-IN"}, twins=2, expect="quarantined",
         reason="ambiguous: 2 CTMS Persons have veeva_network_id__c = 'VN-TWIN-IN'"),
    Case("account identifier matches no person", IN,
         account={"last_name__v": "CrmOnly", "veeva_network_id__v": "VN-NOONE"},
         expect="quarantined", reason="no CTMS Person has veeva_network_id__c = 'VN-NOONE'"),
    Case("account identifier with backslash and quote", IN,
         account={"last_name__v": "Esc", "veeva_network_id__v": "a\\' OR 1=1 --"},
         expect="quarantined", reason="no CTMS Person has veeva_network_id__c"),
    Case("account reference dangling", IN, dangling="account__v", expect="quarantined", reason="does not exist in CRM"),
    Case("account deleted", IN, deleted="account__v", expect="quarantined", reason="does not exist in CRM"),
    Case("unknown call channel", IN, {"call_channel__v": "telepathy__c"}, "quarantined",
         "channel 'telepathy__c' is not in the channel map"),
    Case("missing call channel", IN, {"call_channel__v": None}, "quarantined", "channel missing"),
    Case("unknown status", IN, {"call2_status__v": "on_hold__c"}, target={"complete__v": False}),
    Case("missing status", IN, {"call2_status__v": None}, "quarantined", "status missing"),
    Case("missing call date", IN, {"call_date__v": None}, "quarantined", "date missing"),
    Case("malformed call date", IN, {"call_date__v": "25/11/2026"}, "quarantined",
         "date '25/11/2026' is not a valid date"),
    Case("far-future call date", IN, {"call_date__v": "3026-11-25"}, "quarantined", "is not a valid date"),
    Case("100,000-character call subject", IN, {"subject__v": LONG}, "quarantined",
         "crm_activity__v refused the record: INVALID_DATA: Value of 'subject__v' is longer than 1500"),
    Case("call subject with emoji", IN, {"subject__v": EMOJI}, target={"subject__v": EMOJI}),
    Case("call subject right-to-left", IN, {"subject__v": RTL}, target={"subject__v": RTL}),
    Case("call subject control characters", IN, {"subject__v": CONTROL}, target={"subject__v": CONTROL}),
    Case("call subject quotes and backslashes", IN, {"subject__v": QUOTES + BACKSLASH},
         target={"subject__v": QUOTES + BACKSLASH}),
    Case("call subject VQL keywords", IN, {"subject__v": VQL}, target={"subject__v": VQL}),
    Case("call creator without email", IN,
         creator={"first_name__sys": "Nomail", "last_name__sys": "Caller", "email__sys": None},
         target={"from__v": "Nomail Caller"}),
    Case("call not flagged for Vault Clinical", IN, {"send_to_vault_clinical__v": False}, "not_sent"),
]


def now_text() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
