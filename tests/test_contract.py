"""docs/contract.md is kept true: every metric, CLI verb, config key, status, reason and
webhook event the code has is named there."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tokend import config, events, metrics
from tokend.cli import build_parser
from tokend.model import PERMANENT_ERRORS, Reason, Status

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "contract.md"


def contract() -> str:
    return CONTRACT.read_text(encoding="utf-8")


def metric_names() -> set[str]:
    names = set()
    for family in metrics.Metrics().registry.collect():
        if family.name.startswith("process_"):
            continue
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def verbs(parser: argparse.ArgumentParser, prefix: str = "tokend") -> set[str]:
    """Every command line (``tokend grants list``) and every flag of each (``--json``)."""
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.add(f"{prefix} {name}")
                found |= verbs(sub, f"{prefix} {name}")
        else:
            found |= {f"{prefix}\t{o}" for o in action.option_strings if o.startswith("--")
                      and o != "--help"}
    return found


def test_every_metric_is_in_the_contract() -> None:
    names = metric_names()
    assert "tokend_refresh_attempts_total" in names and "tokend_grants" in names
    text = contract()
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"metrics not in docs/contract.md: {missing}"


def test_every_cli_verb_and_flag_is_in_the_contract() -> None:
    found = verbs(build_parser())
    assert "tokend grants list" in found and "tokend keys rotate" in found
    text = contract()
    missing = []
    for item in sorted(found):
        if "\t" in item:  # a flag: named on the line of its command
            command, flag = item.split("\t")
            lines = [ln for ln in text.splitlines() if f"`{command}" in ln
                     or (command == "tokend" and "Global:" in ln)]
            if not any(flag in ln for ln in lines):
                missing.append(f"{command} {flag}")
        elif not re.search(rf"`{re.escape(item)}(?![-\w])", text):
            missing.append(item)
    assert not missing, f"CLI not in docs/contract.md: {missing}"


def test_every_config_key_status_reason_and_event_is_in_the_contract() -> None:
    text = contract()
    missing = [f"{section}.{key}" for section, keys in config._SECTIONS.items()
               for key in sorted(keys)
               if f"`{section}.{key}`" not in text and f"`{key}`" not in text]
    missing += [f"clients.NAME.{key}" for key in sorted(config._CLIENT_KEYS)
                if f"clients.NAME.{key}`" not in text and f"`{key}`" not in text]
    missing += [s.value for s in Status if f"`{s.value}`" not in text]
    missing += [r.value for r in Reason if f"`{r.value}`" not in text]
    missing += [c for c in sorted(PERMANENT_ERRORS) if f"`{c}`" not in text]
    missing += [e for e in metrics.EVENTS if f"`{e}`" not in text]
    missing += [e for e in (events.REMINDER, events.RECOVERED) if f"`{e}`" not in text]
    assert not missing, f"not in docs/contract.md: {missing}"


def test_every_webhook_field_is_in_the_contract() -> None:
    from datetime import UTC, datetime

    from tokend.model import Grant, GrantType
    now = datetime(2030, 1, 1, tzinfo=UTC)
    grant = Grant(id=1, client="main", grant_type=GrantType.AUTHORIZATION_CODE,
                  user_id="1", tenant_id="2", status=Status.OK, reason=None,
                  access_expires_at=None, refresh_expires_at=None, obtained_at=None,
                  consented_at=None, failure_count=0, last_error=None, next_attempt_at=None,
                  in_doubt=False, token_version=1, has_refresh_token=True, created_at=now,
                  updated_at=now)
    fields = set(events.payload("recovered", grant, Status.OK, None, None, now)) | {
        "id", "consent_url"}
    text = contract()
    assert not [f for f in sorted(fields) if f"`{f}`" not in text]


def test_the_example_config_documents_every_key() -> None:
    import tomllib

    example = Path(__file__).resolve().parent.parent / "config" / "tokend.example.toml"
    raw = tomllib.loads(example.read_text(encoding="utf-8"))

    def documented(table: dict[str, object], key: str) -> bool:
        # A secret is documented by either of its forms (value or *_file).
        return any(k in table for k in (key, f"{key}_file", key.removesuffix("_file")))

    missing = [f"{section}.{key}" for section, keys in config._SECTIONS.items()
               for key in sorted(keys) if not documented(raw.get(section, {}), key)]
    client = raw["clients"]["main"]
    missing += [f"clients.main.{key}" for key in sorted(config._CLIENT_KEYS)
                if not documented(client, key)]
    assert not missing, f"not in config/tokend.example.toml: {missing}"
