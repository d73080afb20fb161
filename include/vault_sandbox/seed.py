"""Deterministic seed data for the sandbox vaults.

Both vaults are built from one ``World`` drawn from ``random.Random(seed_number)``, so a CTMS
vault and a CRM vault seeded with the same number and ``--now`` agree: CRM accounts carry the
identifiers of CTMS persons — ``veeva_network_id__c`` as ``veeva_network_id__v``, ``npi__c`` as
``npi__c``, and the OpenData ID ``opendata_id__v`` as ``veevaid__v`` (Vault Clinical's OpenData ID
is the HCP's id in Veeva's data products, which Vault CRM keeps in ``veevaid__v``).

Scenario ``demo`` — a small, realistic data set with these DELIBERATE DEFECTS (the pipeline's
quality step must catch each one):

1. Person without a CRM account: the first person (``DEMO_DEFECTS['person_without_account']``)
   has identifiers, but no CRM account carries them.
2. Person without an identifier: the second person has no ``veeva_network_id__c``, ``npi__c`` or
   ``opendata_id__v``; its Clinical Activities cannot be matched.
3. Identifier matching two accounts: the third person's network id / NPI is on two CRM accounts.
4. Call whose account has no CTMS person: one account exists only in CRM, and one of its calls
   is flagged ``send_to_vault_clinical__v = true``.
5. CTMS user without an email: one Clinical Operations user has no ``email__sys``; the "From"
   of the activities they created cannot include an email.

Scenario ``users`` — only the users of the vault with their security profiles, no business
records: a vault to write one's own records into (picklists and object types come from the model).

Scenario ``scale`` — for benchmarks: ``activities`` Clinical Activities on ~activities/20
persons (each with a matching CRM account), ~activities/1000+1 studies with two sites each.
Every activity's ``modified_date__v`` lies in ``scale_window(now)``: the whole hour before
``now`` rounded down to the hour.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from vault_sandbox.db import CREDENTIALS, Store, vault_datetime

DEMO_PASSWORD = "sandbox"
INTEGRATION_USER = "integration@sandbox.example"

FIRST_NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kara",
               "Luis", "Maya", "Nikolai", "Olivia", "Pavel", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera",
               "William", "Xenia", "Yusuf", "Zoe", "Amelie", "Bruno", "Chiara", "Dmitri", "Eva", "Felix"]
LAST_NAMES = ["Schmidt", "Rossi", "Dubois", "Nowak", "Jensen", "Garcia", "Keller", "Moreau", "Novak", "Silva",
              "Fischer", "Bianchi", "Lindqvist", "Horvat", "Costa", "Weber", "Martin", "Kowalski", "Meyer",
              "Ricci", "Laurent", "Berg", "Santos", "Vogel", "Marino", "Petit", "Larsen", "Wagner"]
COUNTRIES = ["Germany", "France", "Italy", "Spain", "Poland", "Sweden", "United States", "Canada"]
CITIES = {"Germany": ["Berlin", "Munich"], "France": ["Paris", "Lyon"], "Italy": ["Milan", "Rome"],
          "Spain": ["Madrid", "Barcelona"], "Poland": ["Warsaw", "Krakow"], "Sweden": ["Stockholm", "Uppsala"],
          "United States": ["Boston", "Houston"], "Canada": ["Toronto", "Montreal"]}
THERAPEUTIC_AREAS = ["Oncology", "Cardiology", "Neurology", "Immunology", "Respiratory"]
STUDY_TOPICS = ["Metastatic Breast Cancer", "Heart Failure with Reduced Ejection Fraction", "Early Alzheimer's "
                "Disease", "Moderate-to-Severe Plaque Psoriasis", "Severe Eosinophilic Asthma",
                "Relapsed Multiple Myeloma"]
PHASES = ["Phase I", "Phase II", "Phase III"]
CHANNELS = ["in_person__v", "video__v", "phone__v", "chat_text__v", "email__v", "other__v"]
ACTIVITY_SUBJECTS = ["Protocol amendment briefing", "Enrollment status check-in", "Safety update discussion",
                     "Investigator meeting follow-up", "Site feasibility questions", "Recruitment strategy review",
                     "Data query resolution", "Publication plan discussion"]
CALL_SUBJECTS = ["Medical information request", "Scientific exchange on trial data", "Advisory board follow-up",
                 "Congress debrief", "Unsolicited question on dosing", "Investigator-initiated study idea"]

DEMO_DEFECTS = {
    "person_without_account": 0,      # index into World.persons
    "person_without_identifier": 1,
    "person_with_two_accounts": 2,
}


def scale_window(now: datetime) -> tuple[datetime, datetime]:
    """The hour in which every activity of the scale scenario was modified."""
    end = now.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return end - timedelta(hours=1), end


@dataclass
class Person:
    first: str
    last: str
    email: str | None
    network_id: str | None
    npi: str | None
    opendata_id: str | None


@dataclass
class World:
    seed_number: int
    now: datetime
    persons: list[Person] = field(default_factory=list)


def _identifiers(rng: random.Random, index: int) -> tuple[str, str]:
    return f"VN{100000 + index:06d}{rng.randrange(100):02d}", f"{1000000000 + index * 7919 + rng.randrange(7):010d}"


def _opendata_id(seed_number: int, index: int) -> str:
    """An 18-digit OpenData-style id, derived without drawing from the world's random numbers
    (so adding it left every other seeded value as it was)."""
    return f"24{seed_number % 1000:03d}{index:013d}"


def build_world(seed_number: int, now: datetime, n_persons: int) -> World:
    rng = random.Random(seed_number)
    world = World(seed_number, now)
    for i in range(n_persons):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        network_id, npi = _identifiers(rng, i)
        email = f"{first.lower()}.{last.lower()}{i}@hospital{(i % 9) + 1}.example"
        world.persons.append(Person(first, last, email, network_id, npi, _opendata_id(seed_number, i)))
    return world


class _Loader:
    """Bulk inserts with the standard fields filled in."""

    def __init__(self, store: Store, conn):
        self.store = store
        self.conn = conn
        self.store_now = datetime.now(timezone.utc)   # created/modified stamp when none is given

    def insert(self, object_name: str, rows: list[dict], created_by: list[str] | str | None = None,
               stamps: list[tuple[datetime, datetime]] | None = None, object_type: str | None = None,
               chunk: int = 20000) -> list[str]:
        obj = self.store.model.objects[object_name]
        ids = self.store.allocate_ids(self.conn, obj.prefix, len(rows))
        type_id = self.store.object_type_id(object_name, object_type or obj.default_type)
        columns = list(obj.fields)
        full_rows = []
        for i, (row, record_id) in enumerate(zip(rows, ids)):
            full = dict.fromkeys(columns)
            full.update(row)
            creator = created_by[i % len(created_by)] if isinstance(created_by, list) else created_by
            created, modified = stamps[i] if stamps else (self.store_now, self.store_now)
            full.update(id=record_id, global_id__sys=self.store.global_id(record_id), object_type__v=type_id,
                        created_by__v=creator, modified_by__v=creator,
                        created_date__v=vault_datetime(created), modified_date__v=vault_datetime(modified))
            full["status__v"] = full.get("status__v") or "active__v"
            full["name__v"] = full.get("name__v") or record_id
            full_rows.append(full)
        table = self.store.table(object_name)
        for start in range(0, len(full_rows), chunk):
            self.conn.execute(table.insert(), full_rows[start:start + chunk])
        return ids


def _users(loader: _Loader, app: str, now: datetime) -> dict[str, str]:
    """The demo users of one vault; returns username -> id."""
    if app == "ctms":
        specs = [("Integration", "User", INTEGRATION_USER, "integration_user__c", True),
                 ("Claire", "Dubois", "clinops@sandbox.example", "clinical_operations_user__c", True),
                 ("Rafael", "Costa", "readonly@sandbox.example", "clinical_read_only__c", True),
                 ("Nora", "Blank", "noaccess@sandbox.example", "no_access__c", True),
                 ("Mia", "Keller", "mia.keller@sandbox.example", "clinical_operations_user__c", True),
                 ("Tomas", "Horvat", "tomas.horvat@sandbox.example", "clinical_operations_user__c", True),
                 # Defect 5: a CTMS user without an email.
                 ("Jonas", "Berg", "jonas.berg@sandbox.example", "clinical_operations_user__c", False)]
    else:
        specs = [("Integration", "User", INTEGRATION_USER, "integration_user__c", True),
                 ("Sofia", "Marino", "medical@sandbox.example", "medical_user__c", True),
                 ("Peter", "Vogel", "crmreadonly@sandbox.example", "crm_read_only__c", True),
                 ("Nora", "Blank", "noaccess@sandbox.example", "no_access__c", True),
                 ("Lena", "Fischer", "lena.fischer@sandbox.example", "medical_user__c", True)]
    rows = [{"first_name__sys": first, "last_name__sys": last, "email__sys": u if has_email else None,
             "username__sys": u, "security_profile__sys": p, "name__v": f"{first} {last}"}
            for first, last, u, p, has_email in specs]
    loader.store_now = now - timedelta(days=30)
    ids = loader.insert("user__sys", rows, created_by=None)
    # The integration user created every user record, itself included.
    users = loader.store.table("user__sys")
    loader.conn.execute(users.update().values(created_by__v=ids[0], modified_by__v=ids[0]))
    loader.conn.execute(loader.store.table(CREDENTIALS).insert(),
                        [{"user_id": i, "password": DEMO_PASSWORD} for i in ids])
    return {spec[2]: i for spec, i in zip(specs, ids)}


def _spread(rng: random.Random, now: datetime, count: int, hours: float = 4.0) -> list[tuple[datetime, datetime]]:
    """(created, modified) pairs with modified spread over the `hours` before now."""
    stamps = []
    for _ in range(count):
        modified = now - timedelta(seconds=rng.uniform(60, hours * 3600))
        created = modified - timedelta(seconds=rng.uniform(0, 6 * 3600)) if rng.random() < 0.5 else modified
        stamps.append((created, modified))
    return stamps


# ---------------------------------------------------------------------------------------------
# users


def seed_users(store: Store, now: datetime | None = None) -> dict:
    """Only the users (the same as in the other scenarios): every table else stays empty."""
    now = now or datetime.now(timezone.utc)
    store.clear()
    with store.write_lock, store.engine.begin() as conn:
        users = _users(_Loader(store, conn), store.model.app, now)
    return {"user__sys": len(users)}


# ---------------------------------------------------------------------------------------------
# demo


def seed_demo(store: Store, seed_number: int = 1, now: datetime | None = None) -> dict:
    now = now or datetime.now(timezone.utc)
    world = build_world(seed_number, now, n_persons=30)
    defects = DEMO_DEFECTS
    world.persons[defects["person_without_identifier"]].network_id = None
    world.persons[defects["person_without_identifier"]].npi = None
    world.persons[defects["person_without_identifier"]].opendata_id = None
    rng = random.Random(seed_number * 7919 + (1 if store.model.app == "ctms" else 2))
    store.clear()
    with store.write_lock, store.engine.begin() as conn:
        loader = _Loader(store, conn)
        users = _users(loader, store.model.app, now)
        loader.store_now = now - timedelta(days=10)
        if store.model.app == "ctms":
            counts = _demo_ctms(loader, world, users, rng, now)
        else:
            counts = _demo_crm(loader, world, users, rng, now)
    return counts


def _studies(world: World, n_studies: int) -> list[dict]:
    rng = random.Random(world.seed_number)
    studies = []
    for i in range(n_studies):
        topic = STUDY_TOPICS[i % len(STUDY_TOPICS)]
        studies.append({"name__v": f"CL-{2024 + i % 3}-{101 + i:03d}",
                        "study_title__v": f"A Randomized, Double-Blind Study in {topic}",
                        "study_phase__v": PHASES[(i + 1) % len(PHASES)],
                        "study_status__v": "active__v",
                        "therapeutic_area__v": THERAPEUTIC_AREAS[i % len(THERAPEUTIC_AREAS)],
                        "_countries": rng.sample(COUNTRIES, 2)})
    return studies


def _demo_ctms(loader: _Loader, world: World, users: dict, rng: random.Random, now: datetime) -> dict:
    creators = [users["clinops@sandbox.example"], users["mia.keller@sandbox.example"],
                users["tomas.horvat@sandbox.example"], users["jonas.berg@sandbox.example"]]
    person_ids = loader.insert("person__sys", _person_rows(world), created_by=users[INTEGRATION_USER])
    studies = _studies(world, 3)
    study_ids = loader.insert("study__v", [{k: v for k, v in s.items() if not k.startswith("_")} for s in studies],
                              created_by=users[INTEGRATION_USER])
    countries, sites = [], []
    for s, sid in zip(studies, study_ids):
        for c in s["_countries"]:
            countries.append({"study__v": sid, "country__v": c, "name__v": f"{s['name__v']} {c}"})
    country_ids = loader.insert("study_country__v", countries, created_by=users[INTEGRATION_USER])
    pi_cycle = iter(range(3, len(person_ids)))
    for crow, cid in zip(countries, country_ids):
        for city in CITIES[crow["country__v"]]:
            sites.append({"study__v": crow["study__v"], "study_country__v": cid,
                          "site_name__v": f"{city} University Hospital", "site_status__v": "active__v",
                          "principal_investigator__v": person_ids[next(pi_cycle) % len(person_ids)],
                          "name__v": f"{crow['name__v']} {city}"})
    site_ids = loader.insert("site__v", sites, created_by=users[INTEGRATION_USER])
    roles = ["principal_investigator__clin", "sub_investigator__clin", "study_coordinator__clin",
             "key_opinion_leader__clin"]
    study_persons = []
    for i, pid in enumerate(person_ids):
        site_index = i % len(site_ids)
        study_persons.append({"study__clin": sites[site_index]["study__v"], "person__clin": pid,
                              "site__clin": site_ids[site_index], "role__clin": roles[i % len(roles)]})
    sp_ids = loader.insert("study_person__clin", study_persons, created_by=users[INTEGRATION_USER])

    # Clinical Activities on every context, modified over the last ~4 hours.
    activities = []
    contexts = ["study", "site", "study_country", "study_person"]
    for i in range(80):
        context = contexts[i % 4]
        p_index = i % len(person_ids)
        sp = study_persons[p_index]
        site_index = p_index % len(site_ids)
        row = {"person__v": person_ids[p_index], "activity_date__v": (now - timedelta(days=rng.randrange(-7, 20)))
               .strftime("%Y-%m-%d"), "channel__v": rng.choice(CHANNELS), "complete__v": rng.random() < 0.6,
               "subject__v": rng.choice(ACTIVITY_SUBJECTS), "study__v": sp["study__clin"],
               "description__v": "Discussed with the investigator; notes in the site file."}
        if context == "site":
            row["site__v"] = site_ids[site_index]
        elif context == "study_country":
            row["study_country__v"] = sites[site_index]["study_country__v"]
        elif context == "study_person":
            row["study_person__v"] = sp_ids[p_index]
            row["site__v"] = sp["site__clin"]
        activities.append(row)
    loader.insert("crm_activity__v", activities, created_by=creators, stamps=_spread(rng, now, len(activities)),
                  object_type="clinical_activity__v")

    events = []
    kinds = ["site_initiation_visit__ctms", "interim_monitoring_visit__ctms", "close_out_visit__ctms"]
    for i in range(12):
        site_index = i % len(site_ids)
        events.append({"study__ctms": sites[site_index]["study__v"],
                       "study_country__ctms": sites[site_index]["study_country__v"],
                       "site__ctms": site_ids[site_index],
                       "person__ctms": sites[site_index]["principal_investigator__v"],
                       "event_type__ctms": kinds[i % 3],
                       "event_date__ctms": (now - timedelta(days=rng.randrange(-10, 30))).strftime("%Y-%m-%d"),
                       "monitoring_visit_method__ctms": rng.choice(["in_person__v", "video__v"]),
                       "event_complete__ctms": i % 3 == 0, "activity_update_required__ctms": i % 2 == 0})
    loader.insert("monitoring_event__ctms", events, created_by=creators, stamps=_spread(rng, now, len(events)))
    logs = []
    for i in range(12):
        p_index = (i * 5 + 3) % len(person_ids)
        site_index = p_index % len(site_ids)
        logs.append({"study__ctms": sites[site_index]["study__v"], "site__ctms": site_ids[site_index],
                     "person__ctms": person_ids[p_index],
                     "communication_date__ctms": (now - timedelta(days=rng.randrange(0, 14))).strftime("%Y-%m-%d"),
                     "channel__ctms": rng.choice(CHANNELS), "subject__ctms": rng.choice(ACTIVITY_SUBJECTS),
                     "communication_complete__ctms": i % 2 == 1, "activity_update_required__ctms": i % 3 != 2})
    loader.insert("study_communication_log__ctms", logs, created_by=creators, stamps=_spread(rng, now, len(logs)))
    return {"user__sys": len(users), "person__sys": len(person_ids), "study__v": len(study_ids),
            "study_country__v": len(country_ids), "site__v": len(site_ids), "study_person__clin": len(sp_ids),
            "crm_activity__v": len(activities), "monitoring_event__ctms": len(events),
            "study_communication_log__ctms": len(logs)}


def _person_rows(world: World) -> list[dict]:
    """CTMS persons; `_account_rows` gives their CRM accounts the same identifiers."""
    return [{"first_name__sys": p.first, "last_name__sys": p.last, "email__sys": p.email,
             "veeva_network_id__c": p.network_id, "npi__c": p.npi, "opendata_id__v": p.opendata_id,
             "name__v": f"{p.first} {p.last}"} for p in world.persons]


def _account_rows(world: World, skip: set[int]) -> list[dict]:
    rows = []
    for i, p in enumerate(world.persons):
        if i in skip or (p.network_id is None and p.npi is None):
            continue
        rows.append({"first_name__v": p.first, "last_name__v": p.last, "formatted_name__v": f"Dr. {p.first} {p.last}",
                     "veeva_network_id__v": p.network_id, "npi__c": p.npi, "veevaid__v": p.opendata_id,
                     "account_identifier__v": f"ACC-{i:07d}",
                     "name__v": f"{p.first} {p.last}"})
    return rows


def _demo_crm(loader: _Loader, world: World, users: dict, rng: random.Random, now: datetime) -> dict:
    d = DEMO_DEFECTS
    accounts = _account_rows(world, skip={d["person_without_account"]})
    twin = world.persons[d["person_with_two_accounts"]]
    accounts.append({"first_name__v": twin.first, "last_name__v": twin.last,
                     "formatted_name__v": f"{twin.first} {twin.last} (duplicate)",
                     "veeva_network_id__v": twin.network_id, "npi__c": twin.npi, "veevaid__v": twin.opendata_id,
                     "account_identifier__v": "ACC-DUPLICATE", "name__v": f"{twin.first} {twin.last}"})
    # An account that exists only in CRM (no CTMS person carries its identifiers).
    accounts.append({"first_name__v": "Henrik", "last_name__v": "Lindgren",
                     "formatted_name__v": "Dr. Henrik Lindgren", "veeva_network_id__v": "VN99999901",
                     "npi__c": "1999999901", "veevaid__v": "999999999999999901",
                     "account_identifier__v": "ACC-CRM-ONLY", "name__v": "Henrik Lindgren"})
    account_ids = loader.insert("account__v", accounts, created_by=users[INTEGRATION_USER])
    crm_only = account_ids[-1]
    creators = [users["medical@sandbox.example"], users["lena.fischer@sandbox.example"]]
    calls = []
    for i in range(40):
        calls.append({"account__v": account_ids[i % (len(account_ids) - 1)],
                      "call_date__v": (now - timedelta(days=rng.randrange(-5, 15))).strftime("%Y-%m-%d"),
                      "call_channel__v": rng.choice(CHANNELS),
                      "call2_status__v": rng.choice(["planned__v", "saved__v", "submitted__v"]),
                      "subject__v": rng.choice(CALL_SUBJECTS), "send_to_vault_clinical__v": i % 3 != 0})
    calls.append({"account__v": crm_only, "call_date__v": now.strftime("%Y-%m-%d"), "call_channel__v": "phone__v",
                  "call2_status__v": "submitted__v", "subject__v": "Question about eligibility criteria",
                  "send_to_vault_clinical__v": True})
    loader.insert("call2__v", calls, created_by=creators, stamps=_spread(rng, now, len(calls)))
    return {"user__sys": len(users), "account__v": len(account_ids), "call2__v": len(calls)}


# ---------------------------------------------------------------------------------------------
# scale


def seed_scale(store: Store, activities: int, seed_number: int = 1, now: datetime | None = None) -> dict:
    now = now or datetime.now(timezone.utc)
    n_persons = max(1, activities // 20)
    world = build_world(seed_number, now, n_persons)
    rng = random.Random(seed_number * 104729 + (1 if store.model.app == "ctms" else 2))
    store.clear()
    start, end = scale_window(now)
    with store.write_lock, store.engine.begin() as conn:
        loader = _Loader(store, conn)
        users = _users(loader, store.model.app, now)
        loader.store_now = start - timedelta(days=1)
        if store.model.app == "crm":
            ids = loader.insert("account__v", _account_rows(world, skip=set()), created_by=users[INTEGRATION_USER])
            return {"user__sys": len(users), "account__v": len(ids)}
        person_ids = loader.insert("person__sys", _person_rows(world), created_by=users[INTEGRATION_USER])
        studies = _studies(world, activities // 1000 + 1)
        study_ids = loader.insert("study__v", [{k: v for k, v in s.items() if not k.startswith("_")}
                                               for s in studies], created_by=users[INTEGRATION_USER])
        site_rows = [{"study__v": sid, "site_name__v": f"{city} University Hospital", "site_status__v": "active__v",
                      "name__v": f"{s['name__v']} {city}"}
                     for s, sid in zip(studies, study_ids) for city in CITIES[s["_countries"][0]]]
        site_ids = loader.insert("site__v", site_rows, created_by=users[INTEGRATION_USER])
        creators = [users["clinops@sandbox.example"], users["mia.keller@sandbox.example"],
                    users["tomas.horvat@sandbox.example"]]
        span = (end - start).total_seconds()
        # Built and inserted in chunks so that a million activities never sit in memory at once.
        for chunk_start in range(0, activities, 50_000):
            rows, stamps = [], []
            for i in range(chunk_start, min(chunk_start + 50_000, activities)):
                site_index = i % len(site_ids)
                modified = start + timedelta(seconds=rng.random() * (span - 1))
                stamps.append((modified, modified))
                rows.append({"person__v": person_ids[i % len(person_ids)],
                             "study__v": site_rows[site_index]["study__v"], "site__v": site_ids[site_index],
                             "activity_date__v": modified.strftime("%Y-%m-%d"),
                             "channel__v": CHANNELS[i % len(CHANNELS)], "complete__v": i % 2 == 0,
                             "subject__v": ACTIVITY_SUBJECTS[i % len(ACTIVITY_SUBJECTS)]})
            loader.insert("crm_activity__v", rows, created_by=creators, stamps=stamps,
                          object_type="clinical_activity__v")
        return {"user__sys": len(users), "person__sys": len(person_ids), "study__v": len(study_ids),
                "site__v": len(site_ids), "crm_activity__v": activities}


def is_empty(store: Store) -> bool:
    users = store.table("user__sys")
    with store.engine.connect() as conn:
        return conn.execute(select(users.c.id).limit(1)).first() is None
